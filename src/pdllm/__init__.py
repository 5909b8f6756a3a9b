"""pdllm: Prefilling-dLLM for LLaDA and Dream, readable from the model to the Triton kernels (see README.md)."""
