"""Tokenizer and chat templates, with the ``tokenizers`` library only (tokenizer.json).

A long-context request is three parts, because Prefilling-dLLM chunks only the middle one:

    prefix  = chat header + instruction         (kept whole, every chunk sees it)
    context = the long document                 (split into chunks, top-K kept)
    query   = question + end of turn + assistant header   (kept whole)

``LongContextPrompt`` holds the three as token ids; its ``token_ids()`` is the dense prompt that
the baselines (vanilla, prefix, dual) decode from, so every method answers the same request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Chat templates: (conversation start, user turn, end of turn + assistant header).
TEMPLATES = {
    # LLaDA (Llama-3 style): BOS once, header per message.
    "llada": ("<|startoftext|>", "<|start_header_id|>user<|end_header_id|>\n\n",
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    # Dream (Qwen2 ChatML), with Qwen's default system turn.
    "dream": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "<|im_start|>user\n",
              "<|im_end|>\n<|im_start|>assistant\n"),
}

# Special-token strings by role, per template family.
SPECIAL_TOKENS = {
    "llada": {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "mask": "<|mdm_mask|>", "eot": "<|eot_id|>"},
    "dream": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "mask": "<|mask|>", "eot": "<|im_end|>"},
}

# The instruction around context and question when the caller gives none.
DEFAULT_INSTRUCTION = "Answer the question based on the context below.\n\nContext:\n"
DEFAULT_QUESTION = "\n\nQuestion: {question}\nAnswer:"


@dataclass
class LongContextPrompt:
    prefix: list[int]
    context: list[int]
    query: list[int]

    def token_ids(self) -> list[int]:
        return self.prefix + self.context + self.query


class Tokenizer:
    def __init__(self, tk, family: str = "llada"):
        if family not in TEMPLATES:
            raise ValueError(f"unknown chat template {family!r}; choose one of {sorted(TEMPLATES)}")
        self.tk, self.family = tk, family
        ids = {}
        for role, token in SPECIAL_TOKENS[family].items():
            ids[role] = tk.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"tokenizer has no {token!r} ({role} token of the {family} template)")
        self.bos_id, self.eos_id, self.mask_id, self.eot_id = ids["bos"], ids["eos"], ids["mask"], ids["eot"]
        self.special_ids = set(ids.values()) | {i for t, i in tk.get_vocab(with_added_tokens=True).items()
                                                if t.startswith("<|") and t.endswith("|>")}

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json from a checkpoint directory; the family follows config.json."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"{path}: tokenizer.json is missing (pdllm reads the tokenizers-library file)")
        family = "llada"
        cfg = path / "config.json"
        if cfg.exists() and str(json.loads(cfg.read_text()).get("model_type", "")).lower() == "dream":
            family = "dream"
        try:
            tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"{file}: not a valid tokenizers file ({e})") from e
        return cls(tk, family)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token strings in the text become their ids, nothing is added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True, stop_at_eos: bool = True) -> str:
        """Ids to text; generation stops at the first EOS / end of turn (only after decoding)."""
        ids = [int(i) for i in ids]
        if stop_at_eos:
            for j, i in enumerate(ids):
                if i in (self.eos_id, self.eot_id):
                    ids = ids[:j]
                    break
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.tk.decode(ids, skip_special_tokens=False)

    def chat(self, user: str) -> list[int]:
        """One user turn, ready for the assistant's answer."""
        start, user_head, turn_end = TEMPLATES[self.family]
        return self.encode(start + user_head + user + turn_end)

    def long_context_prompt(self, context: str, question: str, instruction: str | None = None,
                            question_template: str | None = None) -> LongContextPrompt:
        """The chat prompt around a long context, as (prefix, context, query) ids.

        ``instruction`` is the user-turn text before the context; ``question_template`` the text
        after it, with ``{question}`` filled in. The parts are tokenized separately so that chunk
        boundaries never cut a token of the template.
        """
        if not context:
            raise ValueError("empty context: a long-context prompt needs a document to chunk")
        start, user_head, turn_end = TEMPLATES[self.family]
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        question_template = DEFAULT_QUESTION if question_template is None else question_template
        return LongContextPrompt(
            prefix=self.encode(start + user_head + instruction),
            context=self.encode(context),
            query=self.encode(question_template.format(question=question) + turn_end),
        )
