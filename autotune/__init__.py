"""Per-GPU kernel configs: the tuner (tune.py) and their lookup (configs.py), shipped as ``pdllm.autotune``."""
