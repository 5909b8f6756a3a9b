"""Shared test set-up: the Triton interpreter on CPU, Hypothesis profiles, tiny checkpoints and models.

Triton kernels run through the interpreter when there is no GPU: TRITON_INTERPRET must be set
before triton is first imported, which is why it happens here, at the top of the first conftest.
"""

import os

import torch

from pdllm.testing import HAS_CUDA, HYPOTHESIS_PROFILE

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# `ci`:       interpreter on CPU, small shapes, fp32/fp16, a few minutes in all (the default without CUDA).
# `gpu`:      native kernels, 10 examples per property, the same ones every run (the default on CUDA).
#             Its time is Triton compiling kernel variants, not the examples themselves: the
#             kernels' properties draw their variants from one short list they share
#             (test_chunk_attention.VARIANTS), and a second run finds them in Triton's cache.
# `thorough`: native kernels, 1000 fresh examples per property: HYPOTHESIS_PROFILE=thorough pytest.
#             Run it on a new GPU or after a kernel change.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
_GPU_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("gpu", max_examples=10, deadline=None, derandomize=True, suppress_health_check=_GPU_HEALTH)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_GPU_HEALTH)
settings.load_profile(HYPOTHESIS_PROFILE)


@pytest.fixture(autouse=True)
def no_user_config(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's tuned tables (~/.config/pdllm/autotune): the lookup finds
    the shipped tables only, whatever ran on this machine before, and a test that tunes says where
    it writes. The directory does not exist; a test that needs one sets its own."""
    monkeypatch.setenv("PDLLM_CONFIG_DIR", str(tmp_path_factory.getbasetemp() / "no-user-config"))


@pytest.fixture(autouse=True)
def eager_block_unless_asked(monkeypatch):
    """On a GPU a model's block_backend "auto" is the compiled block, and every tiny model and dtype
    of the suite would compile its own (seconds each, cold) for nothing its test checks. Tests run
    the eager block unless they set "compiled" (test_model's compiled-block tests)."""
    import pdllm.model

    resolve = pdllm.model.block_halves
    monkeypatch.setattr(pdllm.model, "block_halves",
                        lambda backend, *args: resolve("eager" if backend == "auto" else backend, *args))


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints in the real on-disk formats (written once per session)
# ---------------------------------------------------------------------------------------------

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "what is the pass key", "answer the question based on "
          "the context below", "context question answer user assistant system", "0 1 2 3 4 5 6 7 8 9"] * 20


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return tk


def tiny_config(arch: str):
    from pdllm.model import ModelConfig

    tk = make_tokenizer()
    ids = {t: tk.token_to_id(t) for t in SPECIALS}
    if arch == "llada":
        return tk, ModelConfig(arch="llada", vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                               mlp_hidden=96, mask_id=ids["<|mdm_mask|>"], bos_id=ids["<|startoftext|>"],
                               eos_id=ids["<|endoftext|>"])
    return tk, ModelConfig(arch="dream", vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           mlp_hidden=96, qkv_bias=True, norm_eps=1e-6, rope_theta=1e6, mask_id=ids["<|mask|>"],
                           bos_id=ids["<|endoftext|>"], eos_id=ids["<|endoftext|>"])


def write_checkpoint(path, arch: str, shards: int):  # shards: 1 or 2
    from pdllm.checkpoint import save_pretrained
    from pdllm.model import Transformer

    tk, cfg = tiny_config(arch)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.3)  # large weights: varied, confident outputs in a 2-layer model
    total = sum(p.numel() * 4 for p in model.parameters())
    save_pretrained(model, path, max_shard_bytes=int(total * 0.6) if shards == 2 else None)
    tk.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory):
    """A tiny random LLaDA-format checkpoint: config.json, 2 shards + index, tokenizer.json."""
    return write_checkpoint(tmp_path_factory.mktemp("llada"), "llada", shards=2)


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory):
    """A tiny random Dream-format checkpoint (Qwen2 names, q/k/v bias, GQA), single file."""
    return write_checkpoint(tmp_path_factory.mktemp("dream"), "dream", shards=1)


@pytest.fixture(scope="session")
def llada(llada_dir):
    """The tiny LLaDA checkpoint loaded in fp32 (shared: tests must leave it as they found it)."""
    from pdllm.checkpoint import from_pretrained

    return from_pretrained(llada_dir, torch.float32)


@pytest.fixture(scope="session")
def dream(dream_dir):
    from pdllm.checkpoint import from_pretrained

    return from_pretrained(dream_dir, torch.float32)
