"""Long-context benchmarks for ``pdllm eval``: LongBench and InfiniteBench data, prompts and scores."""

from pdllm.eval.examples import BenchmarkDataError, BenchmarkExample
from pdllm.eval.infinitebench import load_infinitebench
from pdllm.eval.longbench import load_longbench
from pdllm.eval.metrics import score

__all__ = ["BenchmarkDataError", "BenchmarkExample", "load_infinitebench", "load_longbench", "score"]
