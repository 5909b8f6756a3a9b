"""Checkpoints: a Hugging Face LLaDA/Dream directory <-> pdllm.model.Transformer.

* HF_KEY_MAP   one HF->ours name map per architecture; the checkpoint's tensors one to one
* FUSED        the model's fused matrices (q|k|v, gate|up) as the checkpoint's parts
* hardening    only regular files inside the checkpoint directory are opened (checkpoint_file);
               every problem is a CheckpointError that names the file and key and says the fix
* from_pretrained / save_pretrained

This module reads pdllm.model (ModelConfig, Transformer, the fused row layout _parts); the model
never imports it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import torch

from pdllm.model import ModelConfig, Transformer, _parts


# (HF name, our name) per architecture; {i} is a layer index, {p} is "weight" or "bias". Our names
# here are the checkpoint's tensors one to one; the model fuses some of them (FUSED, below).
HF_KEY_MAP = {
    "llada": [
        ("model.transformer.wte.weight", "tok_emb.weight"),
        ("model.transformer.blocks.{i}.attn_norm.weight", "blocks.{i}.attn_norm.weight"),
        ("model.transformer.blocks.{i}.q_proj.{p}", "blocks.{i}.attn.q.{p}"),
        ("model.transformer.blocks.{i}.k_proj.{p}", "blocks.{i}.attn.k.{p}"),
        ("model.transformer.blocks.{i}.v_proj.{p}", "blocks.{i}.attn.v.{p}"),
        ("model.transformer.blocks.{i}.attn_out.weight", "blocks.{i}.attn.o.weight"),
        ("model.transformer.blocks.{i}.ff_norm.weight", "blocks.{i}.mlp_norm.weight"),
        ("model.transformer.blocks.{i}.ff_proj.weight", "blocks.{i}.mlp.gate.weight"),  # the gate
        ("model.transformer.blocks.{i}.up_proj.weight", "blocks.{i}.mlp.up.weight"),
        ("model.transformer.blocks.{i}.ff_out.weight", "blocks.{i}.mlp.down.weight"),
        ("model.transformer.ln_f.weight", "norm_f.weight"),
        ("model.transformer.ff_out.weight", "lm_head.weight"),
    ],
    "dream": [
        ("model.embed_tokens.weight", "tok_emb.weight"),
        ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.attn_norm.weight"),
        ("model.layers.{i}.self_attn.q_proj.{p}", "blocks.{i}.attn.q.{p}"),
        ("model.layers.{i}.self_attn.k_proj.{p}", "blocks.{i}.attn.k.{p}"),
        ("model.layers.{i}.self_attn.v_proj.{p}", "blocks.{i}.attn.v.{p}"),
        ("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.o.weight"),
        ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
        ("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.gate.weight"),
        ("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up.weight"),
        ("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.weight"),
        ("model.norm.weight", "norm_f.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ],
}


def _rename(name: str, pairs) -> str | None:
    """Rename through (from, to) template pairs; None if no template matches."""
    for src, dst in pairs:
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        m = re.fullmatch(pattern, name)
        if m:
            return dst.format(**m.groupdict())
    return None


def hf_to_ours(arch: str, key: str) -> str | None:
    return _rename(key, HF_KEY_MAP[arch])


def ours_to_hf(arch: str, name: str) -> str:
    hf = _rename(name, [(dst, src) for src, dst in HF_KEY_MAP[arch]])
    if hf is None:
        raise KeyError(f"no HF name for parameter {name!r}")
    return hf


# Our fused parameters and the checkpoint tensors they are made of, concatenated along the rows in
# this order: the model runs one GEMM for q, k and v and one for gate and up, the checkpoint keeps
# the HF tensors. from_pretrained fuses after every tensor is checked, save_pretrained splits.
FUSED = {"attn.wqkv": ("attn.q", "attn.k", "attn.v"), "mlp.gate_up": ("mlp.gate", "mlp.up")}
_FUSED_NAME = re.compile(r"(blocks\.\d+\.)(attn\.wqkv|mlp\.gate_up)\.(weight|bias)")


def unfuse_state(cfg: ModelConfig, state: dict) -> dict:
    """Our parameters by checkpoint tensor: each fused one split into its parts (row views)."""
    out = {}
    for name, t in state.items():
        m = _FUSED_NAME.fullmatch(name)
        if m is None:
            out[name] = t
            continue
        prefix, fused, p = m.groups()
        for part, rows in zip(FUSED[fused], t.split(_parts(cfg, fused))):
            out[f"{prefix}{part}.{p}"] = rows
    return out


def fuse_state(cfg: ModelConfig, state: dict) -> dict:
    """The inverse of unfuse_state: every fused parameter's parts concatenated, in FUSED order.

    Consumes ``state``: each part is dropped from it as its fused parameter is made, so a load holds
    one copy of the weights (plus one fused parameter) on the device, not the parts and the fused
    copies together."""
    groups: dict[str, dict[str, str]] = {}  # fused name -> {part: its name in state}
    part_of = {part: fused for fused, parts in FUSED.items() for part in parts}
    for name in state:
        m = re.fullmatch(r"(blocks\.\d+\.)(attn\.[qkv]|mlp\.gate|mlp\.up)\.(weight|bias)", name)
        if m is not None:
            prefix, part, p = m.groups()
            groups.setdefault(f"{prefix}{part_of[part]}.{p}", {})[part] = name
    out = {}
    for name, parts in groups.items():
        fused = _FUSED_NAME.fullmatch(name).group(2)
        out[name] = torch.cat([state.pop(parts[part]) for part in FUSED[fused]])
    out.update(state)  # what is not fused, as it is
    return out


def checkpoint_shapes(model: Transformer) -> dict:
    """The shape of every tensor a checkpoint of this model holds, by our (unfused) name."""
    return {n: t.shape for n, t in unfuse_state(model.cfg, dict(model.named_parameters())).items()}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file/key and the fix."""


def _allowed_roots(path: Path) -> list[Path]:
    """Where a checkpoint's files may live once links are resolved: the directory itself, and for a
    Hugging Face cache snapshot (<repo>/snapshots/<rev>/, whose files link to <repo>/blobs/) the
    repository's blobs folder. Nothing else is ever opened."""
    roots = [path.resolve()]
    if path.resolve().parent.name == "snapshots":
        roots.append(path.resolve().parent.parent / "blobs")
    return roots


def checkpoint_file(path: Path, name: str, source: str, missing: str | None = None) -> Path:
    """The regular file `name` inside checkpoint directory `path`, resolved; a CheckpointError for a
    name that leaves the directory (absolute, '..', a link pointing out), is missing (`missing` is
    that message) or is not a regular file (a named pipe would block the loader, a device would be
    read forever). `source` says who named the file (e.g. the index entry), for the message."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{source}: {name!r} is not a file name; give a file name inside {path}")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{source}: {name!r} points outside the checkpoint directory {path}; "
                              "only files inside it are read (give a plain file name such as model-00001.safetensors)")
    if not os.path.lexists(path / name):
        raise CheckpointError(missing or f"{source}: {name!r} is not in {path}; copy it there")
    target = (path / name).resolve()
    if not any(target.is_relative_to(root) for root in _allowed_roots(path)):
        raise CheckpointError(f"{source}: {name!r} is a link to {target}, outside the checkpoint directory {path}; "
                              "copy the file into the directory instead of linking to it")
    try:
        mode = os.stat(target).st_mode  # stat, never open: opening a named pipe blocks
    except OSError as e:
        raise CheckpointError(f"{source}: cannot read {name!r} in {path} ({e.strerror}); copy the file there") from e
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{source}: {name!r} in {path} is not a regular file (a pipe, device or directory); "
                              "replace it with the real file")
    return target


def read_checkpoint_json(path: Path, name: str, missing: str | None = None):
    """Parse the JSON file `name` of a checkpoint directory (checked as in checkpoint_file)."""
    file = checkpoint_file(path, name, str(path / name), missing)
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path / name}: invalid JSON ({e}); restore the file from the checkpoint") from e


def _weight_files(path: Path) -> dict[Path, list[str] | None]:
    """Map each safetensors file to the HF keys the index says it holds (None: no index)."""
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):
        content = read_checkpoint_json(path, index.name)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: not a valid safetensors index; it needs a 'weight_map' object "
                                  "mapping each tensor name to its shard file")
        names: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"{index}: weight_map[{key!r}] is {fname!r}, not a shard file name")
            names.setdefault(fname, []).append(key)
        files: dict[Path, list[str]] = {}
        for fname, keys in names.items():
            missing = (f"missing shard {fname} (listed in {index.name} for {len(keys)} tensors, e.g. {keys[0]!r}); "
                       f"download or copy it into {path}")
            files.setdefault(checkpoint_file(path, fname, f"{index.name} entry {keys[0]!r}", missing), []).extend(keys)
        return files
    single = path / "model.safetensors"
    if os.path.lexists(single):
        return {checkpoint_file(path, single.name, str(path)): None}
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" (found {found}: pickle files are never loaded; convert them to safetensors)" if found else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg_file = path / "config.json"
    hf = read_checkpoint_json(path, "config.json", f"{path}: config.json is missing; a HF checkpoint directory needs one")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: holds a JSON {type(hf).__name__}, not an object of model settings; "
                              "restore the checkpoint's config.json")
    try:
        return ModelConfig.from_hf(hf, str(cfg_file))
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from e


def _read_weights(path: Path, cfg: ModelConfig, expected: dict, dtype: torch.dtype, device) -> dict:
    """Every tensor of the checkpoint, checked (name, shard, shape, dtype, finite) and put on `device`."""
    from safetensors import SafetensorError, safe_open

    files = _weight_files(path)
    shard_of = {key: file.name for file, keys in files.items() for key in keys or []}
    state, origin, unexpected, extremes = {}, {}, [], []
    for file, listed in files.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                for key in listed or []:
                    if key not in keys:
                        raise CheckpointError(f"{file.name}: the index lists {key!r} in this shard but it is not there")
                for key in keys:
                    if listed is not None and key not in listed:  # the index puts it elsewhere, or nowhere
                        where = f"the index assigns to {shard_of[key]}" if key in shard_of else "the index does not list"
                        raise CheckpointError(f"{file.name}: holds {key!r}, which {where}; a tensor must be in "
                                              "exactly the shard the index names (restore the shard or the index)")
                    name = hf_to_ours(cfg.arch, key)
                    if name is None or name not in expected:
                        unexpected.append(f"{key} ({file.name})")
                        continue
                    if name in state:
                        raise CheckpointError(f"{file.name}: {key} is also in {origin[name]}; keep one copy")
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(expected[name]):
                        raise CheckpointError(f"{file.name}: {key} has shape {tuple(t.shape)}, expected "
                                              f"{tuple(expected[name])} from config.json; is this the right config?")
                    if not t.is_floating_point():
                        raise CheckpointError(f"{file.name}: {key} has dtype {t.dtype}; weights must be floating point")
                    state[name], origin[name] = t.to(device=device, dtype=dtype), file.name
                    extremes.append(torch.stack(torch.aminmax(state[name])))  # NaN and +-Inf survive min/max
        except CheckpointError:
            raise
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e}); it is truncated or corrupt, "
                                  "download it again") from e
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                              f"for a {cfg.arch} model with {cfg.n_layers} layers; is config.json right?")
    missing = [ours_to_hf(cfg.arch, n) for n in expected if n not in state]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    finite = torch.stack(extremes).isfinite().all(dim=1).tolist()  # one device sync for the whole model
    if not all(finite):
        name = list(state)[finite.index(False)]
        raise CheckpointError(f"{origin[name]}: {ours_to_hf(cfg.arch, name)} holds NaN or Inf values in {dtype}; "
                              "the file is corrupt (download it again) or its values overflow this dtype "
                              "(load in bfloat16 or float32)")
    return state


def from_pretrained(path: str | Path, dtype: torch.dtype | str = torch.bfloat16, device="cpu") -> Transformer:
    """Load a HF LLaDA/Dream checkpoint directory with safetensors, checking every key and shape.

    Only regular files inside `path` are opened (see checkpoint_file); every problem is a
    CheckpointError that names the file and key."""
    path = Path(path)
    cfg = load_config(path)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
            raise ValueError(f"dtype {dtype!r} is not a floating torch dtype (use float32, bfloat16 or float16)")
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = checkpoint_shapes(model)  # by checkpoint tensor (fused parameters as their parts); tied weights once
    state = _read_weights(path, cfg, expected, dtype, device)
    model.load_state_dict(fuse_state(cfg, state), assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def save_pretrained(model: Transformer, path: str | Path, max_shard_bytes: int | None = None):
    """Write config.json + model.safetensors (or shards + index when max_shard_bytes is set)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    tensors = {ours_to_hf(cfg.arch, n): p.detach().cpu().contiguous()
               for n, p in unfuse_state(cfg, dict(model.named_parameters())).items()}
    if max_shard_bytes is None:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        if current and size + t.numel() * t.element_size() > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += t.numel() * t.element_size()
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["HF_KEY_MAP", "FUSED", "hf_to_ours", "ours_to_hf", "fuse_state", "unfuse_state", "checkpoint_shapes",
           "CheckpointError", "checkpoint_file", "read_checkpoint_json", "load_config", "from_pretrained",
           "save_pretrained"]
