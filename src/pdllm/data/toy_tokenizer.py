"""The toy model's tokenizer: a small byte-level BPE trained on the synthetic task corpus.

* Byte-level (ByteLevel pre-tokenizer and decoder, the 256-byte initial alphabet): any text,
  newlines and non-ASCII included, encodes and decodes back unchanged.
* Digits are split one by one before BPE (``Digits(individual_digits=True)``), so every digit is a
  single token and a pass key of n digits is n tokens: learnable and easy to score.
* LLaDA's special tokens with LLaDA's exact strings, at ids 0-5 (the ids differ from LLaDA-8B's;
  code must look them up by string, e.g. ``tok.token_to_id("<|mdm_mask|>")``).
* About 1.5K tokens, so the toy model's embedding stays small.

The result is an ordinary ``tokenizers.Tokenizer``; :func:`save` writes the standard
``tokenizer.json`` (plus a ``tokenizer_config.json`` naming the special tokens' roles).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pdllm.data.synthetic import corpus
from pdllm.tokenizer import SPECIAL_TOKENS

_LLADA = SPECIAL_TOKENS["llada"]  # the toy model speaks LLaDA's template, with LLaDA's strings
BOS, EOS, MASK, EOT = _LLADA["bos"], _LLADA["eos"], _LLADA["mask"], _LLADA["eot"]  # EOS is also the pad token
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
VOCAB_SPECIALS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT]  # the vocabulary's ids 0..5, in this order
ROLES = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK}

VOCAB_SIZE = 1536


@lru_cache(maxsize=4)
def _build_json(seed: int, vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=VOCAB_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return tok.to_str()


def build_toy_tokenizer(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train (once per process, then from a memo) and return a fresh ``Tokenizer``."""
    tok = Tokenizer.from_str(_build_json(seed, vocab_size))
    for i, s in enumerate(VOCAB_SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """{"bos", "eos", "pad", "mask", "start_header", "end_header", "eot"} -> id."""
    ids = {
        "bos": BOS, "eos": EOS, "pad": EOS, "mask": MASK,
        "start_header": START_HEADER, "end_header": END_HEADER, "eot": EOT,
    }
    return {k: tok.token_to_id(v) for k, v in ids.items()}


def save(out_dir: str | Path, tokenizer: Tokenizer | None = None, seed: int = 0) -> Path:
    """Write ``tokenizer.json`` (and ``tokenizer_config.json``) into ``out_dir``; returns the json path.

    ``tokenizer`` None builds the toy tokenizer from ``seed``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_toy_tokenizer(seed)
    path = out / "tokenizer.json"
    tok.save(str(path))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **ROLES,
              "additional_special_tokens": [START_HEADER, END_HEADER, EOT], "model_max_length": 1 << 20}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


__all__ = ["build_toy_tokenizer", "save", "special_ids", "VOCAB_SPECIALS", "BOS", "EOS", "MASK",
           "START_HEADER", "END_HEADER", "EOT", "VOCAB_SIZE"]
