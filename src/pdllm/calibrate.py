"""``pdllm calibrate``: the cheapest scoring setting that selects what full-depth scoring selects,
measured on the user's own checkpoint.

How early a chunk can be judged is the model's property, not the method's (GemFilter picks its
layer by hand; a toy model needs most of its depth, an 8B model may not). So: synthetic needle
questions at the length the user names, every candidate setting scored on the same requests, each
one's top-K agreement with full-depth selection in the model's precision (the fraction of the
reference's K chunks the candidate also keeps, averaged over requests) and its measured scoring
time; the cheapest candidate whose agreement is at least ``--target`` is the answer, written with
every candidate's figures to a JSON file and printed as the flags that select it.

Candidates: early exit (``score_depth``) at every ``--step``-th layer, cascades (``score=cascade``)
with one exit at each of those layers keeping 1/4, 1/2 or 3/4 of the chunks and with exits at 1/4,
1/2, 3/4 of the depth keeping half each time, and each of them and full depth with FP8 linear
layers (``score_fp8``) where this torch and device multiply FP8.

    pdllm calibrate --length 2048 --chunk-size 128 --n 200     # the embedded toy model
    pdllm calibrate --model DIR --length 32768 --n 50 --out calibration.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pdllm import fp8
from pdllm.data.synthetic import make_examples
from pdllm.environment import environment
from pdllm.knobs import ArgumentParser, UsageError
from pdllm.loading import EMBEDDED_MODEL, load_model
from pdllm.prefill import Chunked, PrefillConfig
from pdllm.sampler import synchronize

TASKS = ("passkey", "multikey_needle", "kv_lookup")


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Mean over requests of |candidate's chunks & reference's| / |reference's|."""
    return sum(len(set(c) & set(r)) / len(r) for r, c in zip(reference, candidate)) / len(reference)


def layer_work(knobs: dict, n_layers: int) -> float:
    """The fraction of full-depth scoring's layer-chunks a setting runs, if every exit keeps its share
    (a floor of survivors raises it on short contexts)."""
    if knobs.get("score") == "cascade":
        work, alive, start = 0.0, 1.0, 0
        for part in knobs["cascade"].split(","):
            layer, keep = part.split(":")
            work += alive * (int(layer) - start)
            alive, start = alive * float(keep), int(layer)
        return (work + alive * (n_layers - start)) / n_layers
    depth = knobs.get("score_depth")
    return (depth or n_layers) / n_layers


def candidates(n_layers: int, step: int, with_fp8: bool) -> list[dict]:
    exits = list(range(step, n_layers, step))
    out = [{"score_depth": d} for d in exits]
    out += [{"score": "cascade", "cascade": f"{e}:{k}"} for e in exits for k in (0.25, 0.5, 0.75)]
    quarters = sorted({max(1, round(n_layers * f)) for f in (0.25, 0.5, 0.75)} - {n_layers})
    if len(quarters) == 3:
        out.append({"score": "cascade", "cascade": ",".join(f"{q}:0.5" for q in quarters)})
    if with_fp8:
        out += [{**c, "score_fp8": True} for c in [{}] + out]
    return out


def select(model, cfg: PrefillConfig, requests: list[Chunked], block_length: int) -> tuple[list[list[int]], float]:
    """Every request's selection under cfg, and the seconds its scoring took (one pass, synchronised)."""
    scorer, selector = cfg.stage("score"), cfg.stage("selection")
    synchronize(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        scores = scorer(model, requests, block_length)
    synchronize(model.device)
    return [selector(s, r) for s, r in zip(scores, requests)], time.perf_counter() - t0


def calibrate(model, tok, length: int, n: int, base: dict, step: int, target: float, block_length: int = 32,
              seed: int = 0) -> dict:
    """Every candidate's agreement and scoring time on n synthetic requests (tasks in turn, random depths)."""
    per_task = -(-n // len(TASKS))
    examples = [e for t in TASKS for e in make_examples(t, per_task, length, seed=seed, tokenizer=tok.tk)][:n]
    prompts = [tok.long_context_prompt(e.context, e.question) for e in examples]
    reference_cfg = PrefillConfig(**base)
    bos = model.cfg.bos_id if reference_cfg.chunk_bos else None
    chunker = reference_cfg.stage("chunking")
    requests = [Chunked.of(p, chunker(p, bos), bos) for p in prompts]
    select(model, reference_cfg, requests[:2], block_length)  # warm-up: kernels compiled, weights quantized later
    reference, reference_s = select(model, reference_cfg, requests, block_length)
    L = model.cfg.n_layers
    with_fp8 = fp8.supported(model.device)
    rows = [{"knobs": {}, "agreement": 1.0, "seconds": reference_s, "layer_work": 1.0}]
    for knobs in candidates(L, step, with_fp8):
        floor = {"cascade_min": base["top_k"]} if knobs.get("score") == "cascade" else {}  # no exit drops below K
        cfg = PrefillConfig(**base, **knobs, **floor)
        if knobs.get("score_fp8"):
            select(model, cfg, requests[:2], block_length)  # warm-up: the FP8 copy made, the halves compiled
        chosen, seconds = select(model, cfg, requests, block_length)
        rows.append({"knobs": knobs, "agreement": agreement(reference, chosen), "seconds": seconds,
                     "layer_work": layer_work(knobs, L)})
        print(f"  {json.dumps(knobs):<60} agreement {rows[-1]['agreement']:.3f}  scoring {seconds:7.3f} s  "
              f"layer work {rows[-1]['layer_work']:.2f}", flush=True)
    good = [r for r in rows if r["agreement"] >= target]
    best = min(good, key=lambda r: r["seconds"])
    return {"environment": environment(), "length": length, "n": len(requests), "target": target, "base": base,
            "n_layers": L, "reference_seconds": reference_s, "candidates": rows, "chosen": best}


def flags(knobs: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in knobs.items()) or \
        "(the defaults: full-depth scoring in the model's precision)"


def main(argv=None) -> int:
    p = ArgumentParser(prog="pdllm calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    p.add_argument("--device", default=None)
    p.add_argument("--length", type=int, default=2048, help="context tokens of the synthetic requests")
    p.add_argument("--n", type=int, default=200, help="requests (the tasks in turn, random needle depths)")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--step", type=int, default=None, help="layers between candidate exits (default: depth / 8)")
    p.add_argument("--target", type=float, default=0.98, help="the agreement a setting must reach")
    p.add_argument("--out", type=Path, default=Path("runs/calibration.json"))
    args = p.parse_args(argv)
    if args.length < 1 or args.n < 1 or not 0 < args.target <= 1:
        raise UsageError("--length and --n must be >= 1 and --target in (0, 1]")
    base = dict(chunk_size=args.chunk_size, top_k=args.top_k)
    PrefillConfig(**base)  # a bad knob is one line before the model loads
    model, tok = load_model(args.model, args.device)
    step = args.step or max(1, model.cfg.n_layers // 8)
    print(f"calibrating {args.model} ({model.cfg.n_layers} layers) at {args.length} tokens, {args.n} requests, "
          f"top-{args.top_k} of {args.chunk_size}-token chunks", flush=True)
    report = calibrate(model, tok, args.length, args.n, base, step, args.target)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    best = report["chosen"]
    print(f"cheapest with agreement >= {args.target}: {flags(best['knobs'])}  (agreement {best['agreement']:.3f}, "
          f"scoring {best['seconds'] / report['reference_seconds']:.2f}x full depth's time); {args.out}")
    return 0
