"""The old spec-resolution smoke script, kept under its name: it runs ``fvkit resolve``.

    python scripts/smoke_resolve_spec_outproj.py --model tiny-llama --model_spec llama --device cpu --dtype fp32 --quant none

Same flags and exit status as ``fvkit resolve`` (0: every block, attention module
and out-projection resolved and every hook fired; 2: a one-line error).
"""

import sys
from pathlib import Path

# The checkout this script sits in comes first, so the script checks this fvkit
# even where another copy of the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fvkit.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["resolve", *sys.argv[1:]]))
