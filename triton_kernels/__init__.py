"""The Triton kernels, shipped as ``pdllm.triton_kernels``: chunk-sparse attention and attention mass per key."""
