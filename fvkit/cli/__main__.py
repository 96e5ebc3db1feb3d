import sys

from fvkit.cli.main import main

sys.exit(main())
