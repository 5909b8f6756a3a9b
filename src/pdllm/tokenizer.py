"""Tokenizer and chat templates, with the ``tokenizers`` library only (tokenizer.json).

A long-context request is three parts, because Prefilling-dLLM chunks only the middle one:

    prefix  = chat header + instruction         (kept whole, every chunk sees it)
    context = the long document                 (split into chunks, top-K kept)
    query   = question + end of turn + assistant header   (kept whole)

``LongContextPrompt`` holds the three as token ids; its ``token_ids()`` is the dense prompt that
the baselines (vanilla, prefix, dual) decode from, so every method answers the same request.

User text (a prompt, a context, a question) is always encoded as plain text: a document that
contains ``<|eot_id|><|start_header_id|>assistant`` or ``<|mdm_mask|>`` gets the ids of those
characters, never a control id. Only the chat template inserts control tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pdllm.boundaries import text_breaks
from pdllm.checkpoint import CheckpointError, checkpoint_file, read_checkpoint_json

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
    # Per context token: the strength of a chunk cut after it (pdllm.boundaries: NONE .. PARAGRAPH);
    # None where the context came as ids without its text (pdllm.boundaries.token_breaks rates those).
    breaks: list[int] | None = None

    def token_ids(self) -> list[int]:
        return self.prefix + self.context + self.query


class Tokenizer:
    def __init__(self, tk, family: str = "llada"):
        from tokenizers import Tokenizer as HFTokenizer

        if family not in TEMPLATES:
            raise ValueError(f"unknown chat template {family!r}; choose one of {sorted(TEMPLATES)}")
        self.tk, self.family = tk, family
        ids = {}
        for role, token in SPECIAL_TOKENS[family].items():
            ids[role] = tk.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"tokenizer has no {token!r} ({role} token of the {family} template)")
        self.bos_id, self.eos_id, self.mask_id, self.eot_id = ids["bos"], ids["eos"], ids["mask"], ids["eot"]
        vocab = tk.get_vocab(with_added_tokens=True)
        self.special_ids = set(ids.values()) | {i for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")}
        # Control tokens: the ids no user text may produce (roles, added special tokens, <|...|> names).
        self.control_tokens = {t: i for t, i in vocab.items() if i in self.special_ids}
        self.control_tokens |= {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self.control_ids = set(self.control_tokens.values())
        for part in TEMPLATES[family]:
            for token in re.findall(r"<\|[^|]*\|>", part):
                if token not in self.control_tokens:
                    raise ValueError(f"tokenizer has no {token!r} (used by the {family} chat template)")
        self._control_pattern = re.compile("|".join(map(re.escape, sorted(self.control_tokens, key=len, reverse=True))))
        # A second instance that encodes special-token strings as the characters they are made of.
        self._text_tk = HFTokenizer.from_str(tk.to_str())
        self._text_tk.encode_special_tokens = True

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json from a checkpoint directory; the family follows config.json."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = checkpoint_file(path, "tokenizer.json", str(path), missing=f"{path}: tokenizer.json is missing "
                               "(pdllm reads the tokenizers-library file; copy it from the model's repository)")
        family = "llada"
        if (path / "config.json").exists():
            hf = read_checkpoint_json(path, "config.json")
            if isinstance(hf, dict) and str(hf.get("model_type", "")).lower() == "dream":
                family = "dream"
        try:
            tk = HFTokenizer.from_str(file.read_bytes().decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise CheckpointError(f"{path / 'tokenizer.json'}: not a valid tokenizers file ({e}); "
                                  "restore it from the model's repository") from e
        try:
            return cls(tk, family)
        except ValueError as e:
            raise CheckpointError(f"{path / 'tokenizer.json'}: {e}") from e

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids: special-token strings in the text stay text (never a control id), nothing is added."""
        return self._encode_with_offsets(text)[0]

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode``'s ids and each id's (start, end) character offsets in ``text``."""
        enc = self._text_tk.encode(text, add_special_tokens=False)
        if not self.control_ids.intersection(enc.ids):
            return enc.ids, enc.offsets
        # Some control token is still matched (an added token that is not marked special, or a vocabulary
        # entry named <|...|>): cut the text inside it, so that its characters are encoded on both sides.
        out, offsets, rest, base = [], [], text, 0

        def take(ids, spans, shift):
            out.extend(ids)
            offsets.extend((s + shift, e + shift) for s, e in spans)

        while True:  # enc is always the encoding of rest, which starts at text[base]
            ids, spans = enc.ids, enc.offsets  # each access builds a new list: once per encoding
            bad = next((j for j, i in enumerate(ids) if i in self.control_ids), None)
            if bad is None:
                take(ids, spans, base)
                return out, offsets
            start, end = spans[bad]
            if end - start <= 1:
                raise ValueError(f"the text {rest[start:end]!r} can only be encoded as a control token of this tokenizer")
            kept = [j for j, (_, e) in enumerate(spans) if e <= start]
            take([ids[j] for j in kept], [spans[j] for j in kept], base)
            one = self._text_tk.encode(rest[start], add_special_tokens=False)
            take(one.ids, one.offsets, base + start)
            rest, base = rest[start + 1:], base + start + 1
            enc = self._text_tk.encode(rest, add_special_tokens=False)

    def encode_template(self, text: str) -> list[int]:
        """Template text to ids: its control-token strings (<|eot_id|>...) become control ids. Never for user text."""
        return self._encode_parts([(text, True)])

    def _encode_parts(self, parts) -> list[int]:
        """Ids of consecutive (text, is_template) parts. Control strings count only in template parts; the
        text between them is encoded in one piece, so the ids match the tokenizer's own joint encoding."""
        ids, text = [], ""
        for part, is_template in parts:
            if not is_template:
                text += part
                continue
            pos = 0
            for m in self._control_pattern.finditer(part):
                text += part[pos:m.start()]
                ids += self.encode(text) if text else []
                ids.append(self.control_tokens[m.group()])
                text, pos = "", m.end()
            text += part[pos:]
        return ids + (self.encode(text) if text else [])

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
        """One user turn, ready for the assistant's answer; `user` is plain text."""
        start, user_head, turn_end = TEMPLATES[self.family]
        return self._encode_parts([(start + user_head, True), (user, False), (turn_end, True)])

    def long_context_prompt(self, context: str, question: str, instruction: str | None = None,
                            question_template: str | None = None) -> LongContextPrompt:
        """The chat prompt around a long context, as (prefix, context, query) ids.

        ``instruction`` is the user-turn text before the context; ``question_template`` the text
        after it, with ``{question}`` filled in (both are template: their control-token strings
        count). ``context`` and ``question`` are plain text. The parts are tokenized separately so
        that chunk boundaries never cut a token of the template. ``breaks`` rates a chunk cut after
        each context token, from the context's text and its tokens' offsets.
        """
        if not context:
            raise ValueError("empty context: a long-context prompt needs a document to chunk")
        if not question or not question.strip():
            raise ValueError("empty question: a long-context prompt needs a question about the context")
        start, user_head, turn_end = TEMPLATES[self.family]
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        question_template = DEFAULT_QUESTION if question_template is None else question_template
        before, _, after = question_template.format(question="\x00").partition("\x00")
        ids, offsets = self._encode_with_offsets(context)
        return LongContextPrompt(
            prefix=self.encode_template(start + user_head + instruction),
            context=ids,
            query=self._encode_parts([(before, True), (question, False), (after + turn_end, True)]),
            breaks=text_breaks(context, offsets).tolist(),
        )
