"""pdllm: Prefilling-dLLM for LLaDA and Dream, readable from the model to the Triton kernels (see README.md).

The decoding methods register themselves by name where they are defined (pdllm.methods.METHODS);
importing the package imports the built-in ones, so ``generate(..., method="prefill")`` finds them.
"""

from pdllm import sampler  # noqa: F401  vanilla, prefix, dual
from pdllm import prefill  # noqa: F401  prefill
from pdllm.baselines import dllm_cache, dyllm  # noqa: F401
from pdllm.notices import PdllmWarning  # noqa: F401  (pdllm.PdllmWarning, to filter or catch pdllm's warnings)
