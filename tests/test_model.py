"""model.py and checkpoint.py: config, loading (and every bad input), RoPE, cached forwards, GQA."""

import copy
import json
import shutil
import warnings

import pytest
import torch

from pdllm.notices import PdllmWarning
from pdllm.cache import ChunkKVCache, DenseKVCache
from pdllm.checkpoint import (CheckpointError, checkpoint_shapes, from_pretrained, fuse_state, hf_to_ours, load_config,
                              ours_to_hf, save_pretrained, unfuse_state)
from pdllm.compiled import CompiledOrEager, compiled
from pdllm.model import ModelConfig, Transformer, apply_rope, block_halves, rope_cos_sin
from pdllm.testing import assert_close


@pytest.fixture
def copy_of(tmp_path):
    def _copy(src):
        dst = tmp_path / "ckpt"
        shutil.copytree(src, dst)
        return dst
    return _copy


# ---- config ----------------------------------------------------------------------------------

def test_config_from_llada_and_dream_names():
    llada = ModelConfig.from_hf({"model_type": "llada", "d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32,
                                 "mlp_hidden_size": 12288, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                                 "vocab_size": 126464, "embedding_size": 126464, "mask_token_id": 126336,
                                 "layer_norm_type": "rms", "weight_tying": False, "include_bias": False})
    assert (llada.arch, llada.head_dim, llada.logit_shift, llada.mask_id) == ("llada", 128, 0, 126336)
    dream = ModelConfig.from_hf({"model_type": "Dream", "hidden_size": 3584, "num_attention_heads": 28,
                                 "num_key_value_heads": 4, "num_hidden_layers": 28, "intermediate_size": 18944,
                                 "vocab_size": 152064, "rope_theta": 1e6, "rms_norm_eps": 1e-6})
    assert (dream.arch, dream.n_kv_heads, dream.qkv_bias, dream.logit_shift, dream.mask_id) == ("dream", 4, True, 1, 151666)
    assert ModelConfig.from_hf(dream.to_hf()) == dream and ModelConfig.from_hf(llada.to_hf()) == llada


@pytest.mark.parametrize("hf, message", [
    ({"model_type": "gpt2", "n_embd": 768}, "unknown model"),
    ({"d_model": 64, "n_heads": 3, "n_layers": 2, "mlp_hidden_size": 8, "vocab_size": 10, "mask_token_id": 1},
     "not divisible by n_heads"),
    ({"d_model": 64, "n_heads": 4, "n_kv_heads": 3, "n_layers": 2, "mlp_hidden_size": 8, "vocab_size": 10,
      "mask_token_id": 1}, "multiple of n_kv_heads"),
    ({"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 10, "mask_token_id": 1}, "mlp_hidden_size"),
    ({"d_model": 64, "n_heads": 4, "n_layers": 2, "mlp_hidden_size": 8, "vocab_size": 10, "mask_token_id": 99},
     "outside the vocabulary"),
    ({"d_model": 64, "n_heads": 4, "n_layers": 2, "mlp_hidden_size": 8, "vocab_size": 10, "mask_token_id": 1,
      "layer_norm_type": "default"}, "use 'rms'"),
])
def test_bad_configs_say_what_is_wrong(hf, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


def test_hf_name_maps_round_trip():
    for arch, cfg in (("llada", ModelConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=8, mask_id=1)),
                      ("dream", ModelConfig(arch="dream", vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                                            mlp_hidden=8, mask_id=1, qkv_bias=True))):
        for name in checkpoint_shapes(Transformer(cfg)):
            assert hf_to_ours(arch, ours_to_hf(arch, name)) == name
    assert ours_to_hf("llada", "blocks.3.mlp.gate.weight") == "model.transformer.blocks.3.ff_proj.weight"
    assert ours_to_hf("dream", "blocks.0.attn.k.bias") == "model.layers.0.self_attn.k_proj.bias"


# ---- loading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["llada_dir", "dream_dir"])
def test_round_trip(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    model = from_pretrained(src, torch.float32)
    save_pretrained(model, tmp_path / "again")
    again = from_pretrained(tmp_path / "again", "float32")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    idx = torch.randint(0, model.cfg.vocab_size, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    assert torch.equal(model(idx, pos), again(idx, pos))


def test_sharded_fixture_really_is_sharded(llada_dir):
    index = json.loads((llada_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2


def test_bf16_load(llada_dir):
    model = from_pretrained(llada_dir, torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.blocks[0].attn_norm.weight.dtype == torch.bfloat16


def _shard_of(ckpt, key):
    """The safetensors file that the checkpoint's index says holds key."""
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][key]


def _edit_tensors(path, edit):
    """Rewrite one safetensors file through edit(dict) -> dict."""
    from safetensors.torch import load_file, save_file
    tensors = edit(load_file(str(path)))
    save_file(tensors, str(path))


def test_missing_shard(llada_dir, copy_of):
    d = copy_of(llada_dir)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard model-00002-of-00002.safetensors"):
        from_pretrained(d)


def test_truncated_shard(llada_dir, copy_of):
    d = copy_of(llada_dir)
    f = d / "model-00001-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        from_pretrained(d)


def test_wrong_shape_names_key_and_file(llada_dir, copy_of):
    d = copy_of(llada_dir)
    key = "model.transformer.blocks.0.q_proj.weight"
    shard = _shard_of(d, key)
    _edit_tensors(shard, lambda t: {**t, key: t[key][:, :-1].contiguous()})
    with pytest.raises(CheckpointError, match=rf"{shard.name}: {key} has shape \(64, 63\), expected \(64, 64\)"):
        from_pretrained(d)


def test_unexpected_and_missing_keys(llada_dir, copy_of):
    d = copy_of(llada_dir)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "model.transformer.ln_f.weight"
    shard = _shard_of(d, key)
    _edit_tensors(shard, lambda t: {("model.transformer.ln_final.weight" if k == key else k): v for k, v in t.items()})
    index["weight_map"]["model.transformer.ln_final.weight"] = index["weight_map"].pop(key)
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensors.*ln_final"):
        from_pretrained(d)
    _edit_tensors(shard, lambda t: {k: v for k, v in t.items() if "ln_final" not in k})
    del index["weight_map"]["model.transformer.ln_final.weight"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.transformer.ln_f.weight'\]"):
        from_pretrained(d)


def test_index_lists_a_key_the_shard_lacks(llada_dir, copy_of):
    d = copy_of(llada_dir)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.transformer.extra.weight"] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists 'model.transformer.extra.weight' in this shard"):
        from_pretrained(d)


def test_integer_weights_are_refused(llada_dir, copy_of):
    d = copy_of(llada_dir)
    key = "model.transformer.ln_f.weight"
    shard = _shard_of(d, key)
    _edit_tensors(shard, lambda t: {**t, key: t[key].to(torch.int32)})
    with pytest.raises(CheckpointError, match="dtype torch.int32; weights must be floating point"):
        from_pretrained(d)


def test_directory_problems(tmp_path, llada_dir, copy_of):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    d = copy_of(llada_dir)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_config(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        from_pretrained(d)
    shutil.copy(llada_dir / "config.json", d / "config.json")
    for f in d.glob("model*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        from_pretrained(d)


# ---- nothing outside the checkpoint is opened ----------------------------------------------

def _set_index_entry(ckpt, key, value):
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"][key] = value
    index_file.write_text(json.dumps(index))


KEY = "model.transformer.ln_f.weight"


@pytest.mark.parametrize("entry, message", [
    ("../outside.safetensors", "points outside the checkpoint directory"),
    ("/etc/passwd", "points outside the checkpoint directory"),
    ("/dev/zero", "points outside the checkpoint directory"),
    ("", "is not a file name"),
    (5, r"weight_map\['model.transformer.ln_f.weight'\] is 5, not a shard file name"),
    (None, "not a shard file name"),
])
def test_index_entries_outside_the_directory_are_refused(llada_dir, copy_of, entry, message):
    d = copy_of(llada_dir)
    (d.parent / "outside.safetensors").write_bytes((d / _shard_of(d, KEY).name).read_bytes())
    _set_index_entry(d, KEY, entry)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(d)


def test_links_out_of_the_directory_and_non_regular_files_are_refused(llada_dir, copy_of, tmp_path):
    import os
    d = copy_of(llada_dir)
    shard = _shard_of(d, KEY)
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)  # a link leaving the directory: refused even though the file is fine
    with pytest.raises(CheckpointError, match=rf"{shard.name}' is a link to .*elsewhere.safetensors, outside the checkpoint"):
        from_pretrained(d)
    shard.unlink()
    os.mkfifo(shard)  # a named pipe would block open() forever: it must be refused without opening it
    with pytest.raises(CheckpointError, match="is not a regular file"):
        from_pretrained(d)
    shard.unlink()
    shard.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        from_pretrained(d)
    shard.unlink()
    (d / "inside.safetensors").write_bytes(outside.read_bytes())
    shard.symlink_to(d / "inside.safetensors")  # a link that stays inside is fine
    from_pretrained(d)
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    with pytest.raises(CheckpointError, match="config.json' in .* is not a regular file"):
        from_pretrained(d)


def test_hf_cache_snapshot_links_into_its_blobs(llada_dir, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> links to ../../blobs/<hash>; that is one checkpoint."""
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(llada_dir.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    from_pretrained(snap)


@pytest.mark.parametrize("weight_map", [["a", "b"], "model.safetensors", {}])
def test_weight_map_must_be_an_object(llada_dir, copy_of, weight_map):
    d = copy_of(llada_dir)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="needs a 'weight_map' object"):
        from_pretrained(d)


# ---- silent wrong answers become errors ----------------------------------------------------

def test_a_tensor_in_the_wrong_shard_is_refused(llada_dir, copy_of):
    from safetensors.torch import load_file
    d = copy_of(llada_dir)
    shard = _shard_of(d, KEY)
    other = next(f for f in d.glob("model-*.safetensors") if f != shard)
    stray = load_file(str(shard))[KEY] + 1  # would silently replace the real one
    _edit_tensors(other, lambda t: {**t, KEY: stray})
    with pytest.raises(CheckpointError, match=rf"{other.name}: holds '{KEY}', which the index assigns to {shard.name}"):
        from_pretrained(d)
    _edit_tensors(other, lambda t: {**t, "model.transformer.extra.weight": stray})
    with pytest.raises(CheckpointError, match="which the index does not list"):
        from_pretrained(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(llada_dir, copy_of, bad):
    d = copy_of(llada_dir)
    key = "model.transformer.blocks.1.ff_out.weight"
    shard = _shard_of(d, key)

    def poison(t):
        t[key][3, 5] = bad
        return t
    _edit_tensors(shard, poison)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: {key} holds NaN or Inf values"):
        from_pretrained(d)


def test_float16_overflow_is_named(llada_dir, copy_of):
    d = copy_of(llada_dir)
    shard = _shard_of(d, KEY)
    _edit_tensors(shard, lambda t: {**t, KEY: t[KEY] * 1e6})  # finite in fp32, beyond fp16's 65504
    from_pretrained(d, torch.float32)
    with pytest.raises(CheckpointError, match="NaN or Inf values in torch.float16.*overflow"):
        from_pretrained(d, torch.float16)


@pytest.mark.parametrize("edit, message", [
    (lambda hf: [hf], "holds a JSON list, not an object of model settings"),
    (lambda hf: {**hf, "max_sequence_length": 0}, "config.json: invalid model config: max_sequence_length=0 must be a positive integer"),
    (lambda hf: {**hf, "max_sequence_length": -5}, "max_sequence_length=-5 must be a positive integer"),
    (lambda hf: {**hf, "bos_token_id": 10**6}, "bos_token_id=1000000 is outside the vocabulary"),
    (lambda hf: {**hf, "eos_token_id": -1}, "eos_token_id=-1 is outside the vocabulary"),
    (lambda hf: {**hf, "d_model": "64"}, "d_model='64' must be a positive integer"),
    (lambda hf: {**hf, "rope_theta": "big"}, "rope_theta='big' must be a number"),
    (lambda hf: {**hf, "mask_token_id": 1.5}, "mask_token_id=1.5 must be a token id"),
])
def test_config_values_are_checked(llada_dir, copy_of, edit, message):
    d = copy_of(llada_dir)
    (d / "config.json").write_text(json.dumps(edit(json.loads((d / "config.json").read_text()))))
    with pytest.raises(CheckpointError, match=message):
        load_config(d)


def test_undecodable_config_is_a_checkpoint_error(llada_dir, copy_of):
    d = copy_of(llada_dir)
    (d / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        load_config(d)


def test_bad_dtype_name(llada_dir):
    with pytest.raises(ValueError, match="not a floating torch dtype"):
        from_pretrained(llada_dir, "int8")


# ---- layers ----------------------------------------------------------------------------------

def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), 16, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), 16, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert_close(score(3, 1), score(1003, 1001), torch.float32)
    # fp32 angles lose about position * 6e-8 radians, as in every fp32 RoPE: far out, compare looser
    assert_close(score(0, 7), score(70000, 70007), torch.bfloat16)
    assert not torch.allclose(score(3, 1), score(3, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fixture", ["llada_dir", "dream_dir"])
def test_block_against_cache_equals_full_forward(fixture, dtype, request):
    model = from_pretrained(request.getfixturevalue(fixture), dtype)
    torch.manual_seed(1)
    T, s, e = 24, 10, 16
    idx = torch.randint(0, model.cfg.vocab_size, (2, T))
    pos = torch.arange(T).expand(2, T) + 5
    full = model(idx, pos)
    cache = DenseKVCache.for_model(model, 2, T)
    assert_close(model(idx, pos, cache=cache.window(0)), full, dtype)  # filling the cache is a full forward
    assert_close(model(idx[:, s:e], pos[:, s:e], cache=cache.window(s)), full[:, s:e], dtype)  # dual cache
    assert_close(model(idx[:, s:], pos[:, s:], cache=cache.window(s)), full[:, s:], dtype)  # prefix cache


def test_gqa_equals_mha_with_repeated_kv(dream_dir):
    gqa = from_pretrained(dream_dir, torch.float32)
    cfg = gqa.cfg
    mha = Transformer(ModelConfig(**{**cfg.__dict__, "n_kv_heads": cfg.n_heads}))
    state = unfuse_state(cfg, gqa.state_dict())
    group, D = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    for name, t in list(state.items()):
        if ".attn.k." in name or ".attn.v." in name:  # each KV head serves `group` query heads
            state[name] = t.view(cfg.n_kv_heads, D, *t.shape[1:]).repeat_interleave(group, 0).reshape(-1, *t.shape[1:])
    mha.load_state_dict(fuse_state(mha.cfg, state))
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    assert_close(gqa(idx, pos), mha(idx, pos), torch.float32)


def test_reference_and_sdpa_backends_agree(llada_dir):
    model = from_pretrained(llada_dir, torch.float32)
    idx = torch.randint(0, model.cfg.vocab_size, (1, 16))
    pos = torch.arange(16)[None]
    sdpa = model(idx, pos)
    model.attention_backend = "reference"
    assert_close(model(idx, pos), sdpa, torch.float32)
    model.attention_backend = "flash3"
    with pytest.raises(ValueError, match="unknown attention backend"):
        model(idx, pos)


def test_forward_shape_errors(llada_dir):
    model = from_pretrained(llada_dir, torch.float32)
    with pytest.raises(ValueError, match="same"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_fused_projections_are_the_checkpoint_tensors_side_by_side(llada_dir):
    from safetensors import safe_open

    model = from_pretrained(llada_dir, torch.float32)
    index = json.loads((llada_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for key, shard in index.items():
        with safe_open(str(llada_dir / shard), framework="pt") as f:
            tensors[key] = f.get_tensor(key)
    blk, hf = model.blocks[1], "model.transformer.blocks.1."
    assert torch.equal(blk.attn.wqkv.weight, torch.cat([tensors[hf + n] for n in ("q_proj.weight", "k_proj.weight",
                                                                                   "v_proj.weight")]))
    assert torch.equal(blk.mlp.gate_up.weight, torch.cat([tensors[hf + "ff_proj.weight"], tensors[hf + "up_proj.weight"]]))
    x = torch.randn(2, 3, model.cfg.d_model)
    assert torch.equal(blk.attn.k(x), x @ tensors[hf + "k_proj.weight"].T)  # one projection alone (cache methods)


def test_unknown_block_backend(llada):
    llada.block_backend = "fused"
    try:
        with pytest.raises(ValueError, match="unknown block backend 'fused'"):
            llada(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    finally:
        llada.block_backend = "auto"


def _relative_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["llada_dir", "dream_dir"])
def test_compiled_and_eager_blocks_are_as_close_to_fp32(fixture, request):
    """The arbiter of the compiled block is fp32, not the eager block: two bf16 results differ by
    their roundings (with these weights, 10-20% of the logits beyond bf16's tolerance of each
    other), while each is as close to fp32 as the other. A block of tokens alone and against a
    DenseKVCache of the whole sequence (Fast-dLLM's dual cache); the reference has the same bf16
    weights upcast. The cache is filled by the eager block in each dtype, so the compiled block
    sees one shape (one graph per half)."""
    model = from_pretrained(request.getfixturevalue(fixture), torch.bfloat16, device="cuda")
    reference = copy.deepcopy(model).float()
    T, s, e = 40, 16, 24
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.cfg.vocab_size, (2, T), generator=g).cuda()
    pos = torch.arange(T, device="cuda").expand(2, T) + 3

    def forwards(m, backend):
        cache = DenseKVCache.for_model(m, 2, T)
        m.block_backend = "eager"
        m(idx, pos, cache=cache.window(0))
        m.block_backend = backend
        return {"plain": m(idx[:, s:e], pos[:, s:e]), "cached": m(idx[:, s:e], pos[:, s:e], cache=cache.window(s))}

    ref = forwards(reference, "eager")
    compiled.cache_clear()  # compiled afresh here, so the counters below see this test's graphs
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    errors = {b: {k: _relative_error(out, ref[k]) for k, out in forwards(model, b).items()} for b in ("eager", "compiled")}
    halves = block_halves("compiled", model.device, model.dtype, model.cfg)
    assert [h.error for h in halves] == [None, None], "the compiled block fell back to eager"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2, "nothing was compiled"
    for k in ref:
        assert errors["eager"][k] < 0.05 and errors["compiled"][k] < 0.05, errors
        assert errors["compiled"][k] <= 1.5 * errors["eager"][k] + 2e-3, errors


@pytest.fixture
def counted_compiles(monkeypatch):
    """torch.compile with dynamo's graph counter as its backend (tracing and guards, no code
    generation: fast on a CPU); yields [(function name, counter)] of every compile started."""
    from torch._dynamo.testing import CompileCounter

    started, compile_ = [], torch.compile

    def counting(fn, **kwargs):
        started.append((fn.__name__, CompileCounter()))
        return compile_(fn, **kwargs, backend=started[-1][1])

    monkeypatch.setattr(torch, "compile", counting)
    compiled.cache_clear()
    yield started
    compiled.cache_clear()


def _scaled_sum(x, n: int):
    return (x * n).sum(-1)


def test_each_compiled_copy_has_its_own_recompile_budget_and_falls_back_past_it(counted_compiles):
    """Dynamo keeps graphs per code object, at most recompile_limit of them; fullgraph=True raises
    past it. Each CompiledOrEager compiles a copy of its own: one exhausting its budget leaves
    another's intact, and the exhausted one runs eagerly, after one warning."""
    limit = torch._dynamo.config.recompile_limit
    first, second = CompiledOrEager(_scaled_sum), CompiledOrEager(_scaled_sum)
    inputs = [torch.ones((2,) * rank) for rank in range(1, limit + 2)]  # a new rank is a new graph
    for x in inputs[:limit]:
        first(x, 3)
    assert second(inputs[limit], 3).shape == inputs[limit].shape[:-1] and second.error is None
    with pytest.warns(PdllmWarning, match="torch.compile of _scaled_sum failed .FailOnRecompileLimitHit"):
        assert torch.equal(first(inputs[limit], 3), _scaled_sum(inputs[limit], 3))
    assert [c.frame_count for _, c in counted_compiles] == [limit, 1]


def test_a_process_of_several_models_and_shapes_keeps_the_compiled_block(llada, dream, counted_compiles):
    """Each model (device, dtype, sizes) compiles its own halves, and within a model only batch 1
    or more and one token or more (dynamo specialises sizes 0 and 1) and the first length are
    graphs of their own: the two attention layouts (SDPA's, the chunk cache's) are not."""
    with torch.no_grad():
        for model in (llada, dream):
            model.block_backend = "compiled"
            try:
                for B, T in ((2, 40), (1, 17), (3, 1)):
                    idx = torch.randint(0, model.cfg.vocab_size, (B, T))
                    pos = torch.arange(T).expand(B, T)
                    model(idx, pos)
                    pool = ChunkKVCache.for_model(model, B * T)
                    rows = pool.allocate(B * T).view(B, T)
                    pool.set_index(list(rows))
                    pool.set_write_rows(rows)
                    model(idx, pos, cache=pool)
                halves = block_halves("compiled", model.device, model.dtype, model.cfg)
                assert [h.error for h in halves] == [None, None]
            finally:
                model.block_backend = "auto"
    graphs = [c.frame_count for _, c in counted_compiles]
    assert len(graphs) == 4 and max(graphs) <= 5, graphs  # 2 models x 2 halves, well within the budget of 8


def test_a_failing_compiler_falls_back_to_eager_once(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    bad_input = CompiledOrEager(lambda x: x + "text")
    with pytest.raises(TypeError):  # the inputs were the problem: their error, and compiling stays on
        bad_input(torch.ones(1))
    assert bad_input.error is None
    run = CompiledOrEager(lambda x: x + 1)
    with pytest.warns(PdllmWarning, match="torch.compile of <lambda> failed .RuntimeError: no C compiler"):
        assert run(torch.ones(1)).item() == 2
    assert isinstance(run.error, RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert run(torch.ones(1)).item() == 2
