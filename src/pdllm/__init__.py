"""pdllm: Prefilling-dLLM for LLaDA and Dream, readable from the model to the Triton kernels (see README.md)."""


class PdllmWarning(UserWarning):
    """Every warning pdllm itself gives (the CLI shows these as one ``pdllm: warning:`` line; others
    as Python shows them)."""
