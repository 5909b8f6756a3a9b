"""Data generated from a seed: the synthetic long-context tasks and the toy model's tokenizer."""
