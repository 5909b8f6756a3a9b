"""The lm-evaluation-harness adapter, offline, on a local task (JSONL + task YAML) with the toy model."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """task: pdllm_passkey
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Answer the question based on the context below.\\n\\nContext:\\n{{{{context}}}}\\n\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|endoftext|>"]
  max_gen_toks: 16
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    from pdllm.loading import EMBEDDED_MODEL
    from pdllm.data.synthetic import make_examples
    from pdllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(EMBEDDED_MODEL)
    d = tmp_path_factory.mktemp("lm_eval_task")
    data = d / "passkey.jsonl"
    with data.open("w") as f:
        for e in make_examples("passkey", 4, 512, seed="lm-eval", tokenizer=tok.tk):
            f.write(json.dumps({"context": e.context, "question": e.question, "answer": e.answer}) + "\n")
    (d / "pdllm_passkey.yaml").write_text(TASK_YAML.format(data=data))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("model_args", ["method=dual", "method=prefill,chunk_size=64,top_k=4,chunk_bos=False"])
def test_local_task_end_to_end(local_task, model_args, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import pdllm.lm_eval_adapter  # noqa: F401  (registers the "pdllm" model)
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="pdllm", model_args=model_args, tasks=["pdllm_passkey"],
                                      task_manager=TaskManager(include_path=str(local_task)))
    score = results["results"]["pdllm_passkey"]["exact_match,none"]
    assert results["results"]["pdllm_passkey"]["alias"] == "pdllm_passkey"
    assert score == 1.0  # the toy model answers passkeys (dense 1.00 on its held-out set)


def test_bad_method_knob_fails_at_load():
    from pdllm.lm_eval_adapter import PdllmLM

    with pytest.raises(ValueError, match="top_k=0"):
        PdllmLM(method="prefill", top_k="0")
    with pytest.raises(NotImplementedError, match="generate_until"):
        PdllmLM(method="dual").loglikelihood([])
