"""``python -m pdllm.autotune``: the same as ``pdllm tune`` (see tune.py)."""

import sys

from pdllm.cli import main

raise SystemExit(main(["tune", *sys.argv[1:]]))
