"""`python -m gptkit ...` is the same as the `gptkit` command."""

import sys

from .cli import main

sys.exit(main())
