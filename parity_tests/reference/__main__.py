"""``python -m parity_tests.reference``: see :mod:`.cli`."""

import sys

from .cli import main

sys.exit(main())
