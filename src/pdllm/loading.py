"""A checkpoint ready to use: model + tokenizer, checked against each other, on a device that exists.

    model, tok = load_model("/path/to/LLaDA-8B-Instruct")        # bf16 on a GPU, fp32 on a CPU
    model, tok = load_model(EMBEDDED_MODEL, device="cpu")          # the toy model in the package

Everything that is cheap is checked before the weights are read (minutes for an 8B checkpoint):
the device, the dtype name, config.json, tokenizer.json and whether the two agree (vocabulary size,
mask token). Every problem is a ValueError (a CheckpointError for the checkpoint's files) whose
message names the file or key and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pdllm.checkpoint import CheckpointError, from_pretrained, load_config
from pdllm.model import ModelConfig
from pdllm.tokenizer import SPECIAL_TOKENS, Tokenizer

EMBEDDED_MODEL = Path(__file__).parent / "assets" / "toy"
DTYPES = ("float32", "bfloat16", "float16")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """`device` if this machine has it, else a ValueError saying what it has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a torch device name; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA GPU (torch {torch.__version__}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: pdllm runs on cpu or cuda")
    return device


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def check_compatible(path: Path, cfg, tok: Tokenizer):
    """The tokenizer must fit the model: its ids inside the embedding, the same mask token."""
    names = {ours: theirs for ours, theirs, _ in ModelConfig.HF_NAMES[cfg.arch]}
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer.json has {tok.vocab_size} tokens but the model's vocabulary is "
                              f"{cfg.vocab_size} (config.json {names['vocab_size']}); the tokenizer belongs to "
                              "another model: copy this model's tokenizer.json")
    if tok.mask_id != cfg.mask_id:
        mask = SPECIAL_TOKENS[tok.family]["mask"]
        raise CheckpointError(f"{path}: config.json {names['mask_id']}={cfg.mask_id} but the tokenizer's mask token "
                              f"{mask} is id {tok.mask_id}; set {names['mask_id']} to {tok.mask_id} in config.json "
                              "(or use this model's tokenizer.json)")


def load_model(path, device: str | None = None, dtype: str | None = None):
    """Model and tokenizer of a checkpoint directory; bf16 on a GPU, fp32 on a CPU unless told."""
    path = Path(path)
    device = check_device(device or default_device())
    dtype = check_dtype(dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    cfg = load_config(path)
    tok = Tokenizer.from_dir(path)
    check_compatible(path, cfg, tok)
    return from_pretrained(path, dtype, device), tok


__all__ = ["EMBEDDED_MODEL", "DTYPES", "default_device", "check_device", "check_dtype", "check_compatible",
           "load_model"]
