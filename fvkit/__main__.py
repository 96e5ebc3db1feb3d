"""``python -m fvkit``: the same as the ``fvkit`` command."""

from fvkit.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
