"""``pdllm demo``: long-context questions answered by each method, on a laptop CPU.

Generates a few synthetic long-context questions (passkey, multi-key needle, key-value lookup),
answers each with ``vanilla`` (the whole sequence every step), the Fast-dLLM ``dual`` cache and
Prefilling-dLLM ``prefill`` (top-K of the chunks), and prints the answers, accuracy, time and
speedup. The default model is the small one embedded in the package (see its model card).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

METHODS = ("vanilla", "dual", "prefill")


def main(argv=None) -> int:
    from pdllm.cli import EMBEDDED_MODEL, load_model
    from pdllm.data.synthetic import TASKS, make_example
    from pdllm.sampler import GenerationConfig, generate

    p = argparse.ArgumentParser(prog="pdllm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    p.add_argument("--device", default=None)
    p.add_argument("--questions", type=int, default=2, help="questions per task")
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if not (args.model / "config.json").exists():
        raise SystemExit(f"error: no model at {args.model}; pass --model DIR (the embedded model ships in "
                         "src/pdllm/assets/toy; `pdllm train-toy` rebuilds it)")
    model, tok = load_model(args.model, args.device)
    device = str(model.device)
    gen = GenerationConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length,
                           threshold=0.9)
    prefill = dict(chunk_size=args.chunk_size, top_k=args.top_k)
    questions = [make_example(task, args.context_tokens, seed=f"demo.{args.seed}.{i}", tokenizer=tok.tk)
                 for task in TASKS for i in range(args.questions)]
    n_chunks = -(-args.context_tokens // args.chunk_size)
    print(f"model {args.model.name} on {device}: {len(questions)} questions, ~{args.context_tokens}-token contexts, "
          f"prefill keeps {args.top_k} of ~{n_chunks} chunks of {args.chunk_size} tokens\n")

    totals = {m: {"correct": 0, "seconds": 0.0} for m in METHODS}
    for ex in tqdm(questions, desc="questions", unit="q"):
        prompt = tok.long_context_prompt(ex.context, ex.question)
        line = [f"[{ex.task}] {ex.question}  (answer {ex.answer}, needle at depth {ex.depth:.2f})"]
        for method in METHODS:
            t0 = time.perf_counter()
            out = generate(model, [prompt], gen, method=method, **(prefill if method == "prefill" else {}))
            dt = time.perf_counter() - t0
            answer = tok.decode(out.tokens[0]).strip()
            ok = answer == ex.answer
            totals[method]["correct"] += ok
            totals[method]["seconds"] += dt
            line.append(f"    {method:8s} {answer!r:14s} {'✓' if ok else '✗'}  {dt:6.2f}s")
        tqdm.write("\n".join(line))

    base = totals["vanilla"]["seconds"]
    print(f"\n{'method':8s} {'accuracy':>9s} {'time':>8s} {'speedup':>8s}")
    for method, t in totals.items():
        print(f"{method:8s} {t['correct'] / len(questions):9.2f} {t['seconds']:7.2f}s {base / t['seconds']:7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
