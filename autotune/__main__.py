"""``python -m pdllm.autotune``: tune the chunk-attention kernels for this GPU (see tune.py)."""

from pdllm.autotune.tune import main

raise SystemExit(main())
