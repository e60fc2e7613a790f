"""``python -m llada``: the `llada` command under this interpreter (what Ray Job entrypoints run)."""

import sys

from llada.cli import main

sys.exit(main())
