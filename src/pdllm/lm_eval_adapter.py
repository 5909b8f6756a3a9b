"""A ``pdllm`` model for lm-evaluation-harness (``generate_until`` tasks).

    python -m pdllm.lm_eval_adapter --model pdllm \\
        --model_args pretrained=/path/to/LLaDA-8B-Instruct,method=prefill,top_k=4,chunk_size=1024 \\
        --tasks my_task --include_path my_tasks/

(``python -m pdllm.lm_eval_adapter`` is lm-eval's own command line with this model registered.)
Every ``--model_args`` key that is not the adapter's own goes to the method, so a comparison is one
argument apart: ``method=vanilla``, ``method=dual``, ``method=prefill,top_k=2,score=draft`` ...

The prompt lm-eval gives is one string. It becomes one user turn of the model's chat template; for
``method=prefill`` it is split as Prefilling-dLLM needs: the template's header is the prefix, the
last ``query_tokens`` tokens of the user text (plus the assistant header) are the query, and what
lies between is the context that is chunked. Diffusion decoding has a fixed answer length:
``gen_length`` (default: the task's ``max_gen_toks``, rounded up to ``block_length``), then the text
is cut at the task's ``until`` strings.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pdllm.tokenizer import TEMPLATES, LongContextPrompt



@register_model("pdllm")
class PdllmLM(LM):
    def __init__(self, pretrained: str | None = None, method: str = "dual", device: str | None = None,
                 dtype: str | None = None, block_length: int = 32, threshold: float | None = 0.9,
                 gen_length: int | None = None, query_tokens: int = 64, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **method_kwargs):
        super().__init__()
        from pdllm.loading import EMBEDDED_MODEL, load_model
        from pdllm.methods import make_method

        path = pretrained or EMBEDDED_MODEL
        self.model, self.tok = load_model(path, device, dtype)
        self._device = str(self.model.device)  # lm-eval's LM.device
        self.method, self.method_kwargs = method, _typed(method_kwargs)
        make_method(method, **self.method_kwargs)  # bad knobs fail here, once, not per request
        self.block_length, self.threshold = int(block_length), None if threshold in (None, "None") else float(threshold)
        self.gen_length, self.query_tokens = gen_length, int(query_tokens)

    def prompt(self, text: str):
        """The chat prompt of one request: token ids, or (prefix, context, query) for prefill."""
        if self.method != "prefill":
            return self.tok.chat(text)
        start, user_head, turn_end = TEMPLATES[self.tok.family]
        body = self.tok.encode(text)
        cut = max(1, len(body) - self.query_tokens)
        return LongContextPrompt(prefix=self.tok.encode_template(start + user_head), context=body[:cut],
                                 query=body[cut:] + self.tok.encode_template(turn_end))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        from pdllm.sampler import GenerationConfig, generate

        answers = []
        for request in tqdm(requests, disable=disable_tqdm, desc="pdllm"):
            text, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(self.gen_length or kwargs.get("max_gen_toks", 32))
            n = -(-n // self.block_length) * self.block_length if n > self.block_length else n
            config = GenerationConfig(gen_length=n, block_length=min(n, self.block_length), steps=n,
                                      threshold=self.threshold)
            out = generate(self.model, [self.prompt(text)], config, method=self.method, **self.method_kwargs)
            answer = self.tok.decode(out.tokens[0])
            for stop in until:
                if stop and stop in answer:
                    answer = answer[: answer.index(stop)]
            answers.append(answer)
            self.cache_hook.add_partial("generate_until", (text, kwargs), answer)
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the pdllm adapter answers generate_until tasks; a diffusion LM has no "
                                  "left-to-right log-likelihood (use a generate_until variant of the task)")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.loglikelihood(requests, disable_tqdm)


def _typed(kwargs: dict) -> dict:
    """--model_args arrive as strings or already converted; make numbers, booleans and None real."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str):
            low = v.lower()
            if low in ("true", "false"):
                v = low == "true"
            elif low == "none":
                v = None
            else:
                for kind in (int, float):
                    try:
                        v = kind(v)
                        break
                    except ValueError:
                        pass
        out[k] = v
    return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
