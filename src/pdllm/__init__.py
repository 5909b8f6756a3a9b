"""pdllm: Prefilling-dLLM for LLaDA and Dream, readable from the model to the Triton kernels (see README.md).

The decoding methods register themselves by name where they are defined (pdllm.methods.METHODS);
importing the package imports the built-in ones, so ``generate(..., method="prefill")`` finds them.
"""


class PdllmWarning(UserWarning):
    """Every warning pdllm itself gives (the CLI shows these as one ``pdllm: warning:`` line; others
    as Python shows them)."""


from pdllm import sampler  # noqa: E402, F401  vanilla, prefix, dual
from pdllm import prefill  # noqa: E402, F401  prefill
from pdllm.baselines import dllm_cache, dyllm  # noqa: E402, F401
