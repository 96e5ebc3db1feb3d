"""Print the weights hash of zoo recipes, for committing a new recipe's ``weights_sha256``.

    python -m fvkit.models.architectures.weights_hash tiny-llama
    699778ce2c07580b6bb662ecb232e7369c29fdcda660498ee8ac036f7f515ee3  tiny-llama

The model is built in memory exactly as the zoo builds it (nothing is written
to the cache). A hash that differs from the committed one is reported on
stderr and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import sys

from fvkit.errors import FvkitError


def recipe_hash(alias: str) -> str:
    from fvkit.models import zoo

    model, _ = zoo.build_in_memory(zoo.get_entry(alias))
    return zoo.weights_sha256(model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fvkit.models.architectures.weights_hash",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("aliases", nargs="+", metavar="ALIAS", help="zoo alias, e.g. tiny-llama")
    args = parser.parse_args(argv)
    status = 0
    try:
        from fvkit.models import zoo

        for alias in args.aliases:
            digest = recipe_hash(alias)
            print(f"{digest}  {alias}")
            committed = zoo.get_entry(alias).weights_sha256
            if committed and committed != digest:
                print(f"{alias}: differs from the committed weights_sha256 {committed}", file=sys.stderr)
                status = 1
    except FvkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
