"""``python -m serve --checkpoint URI [--config FILE] [--print-config]``: see serve/cli.py."""

import sys

from serve.cli import main

sys.exit(main())
