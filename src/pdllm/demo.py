"""``pdllm demo``: Prefilling-dLLM in its regime, on a laptop CPU.

Long-context questions (passkey, multi-key needle, key-value lookup) at the length the embedded
model was trained on and at a few times that, each answered with ``vanilla`` (the whole sequence
every step), the Fast-dLLM ``dual`` cache (dense, cached) and Prefilling-dLLM ``prefill`` (top-K
of the BOS-anchored chunks); it prints the answers, accuracy, time and speedup per length.
The default model is the small one embedded in the package (see its model card).
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

METHODS = ("vanilla", "dual", "prefill")


def main(argv=None) -> int:
    from pdllm.loading import EMBEDDED_MODEL, load_model
    from pdllm.data.synthetic import TASKS, make_example
    from pdllm.eval.harness import DEFAULT_PREFILL
    from pdllm.sampler import GenerationConfig, generate

    from pdllm.knobs import ArgumentParser

    p = ArgumentParser(prog="pdllm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    p.add_argument("--device", default=None)
    p.add_argument("--questions", type=int, default=1, help="questions per task and length")
    p.add_argument("--context-tokens", default="2048,8192",
                   help="comma-separated context lengths (the embedded model is trained at 2048)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_PREFILL["chunk_size"])
    p.add_argument("--top-k", type=int, default=DEFAULT_PREFILL["top_k"])
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-methods", action="store_true", help="run vanilla beyond the trained length too (it "
                   "re-runs the whole sequence every step: minutes on a laptop at 8192 tokens)")
    args = p.parse_args(argv)

    if not (args.model / "config.json").exists():
        raise SystemExit(f"error: no model at {args.model}; pass --model DIR (the embedded model ships in "
                         "src/pdllm/assets/toy; its recipe.py rebuilds it)")
    try:
        lengths = [int(v) for v in args.context_tokens.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --context-tokens {args.context_tokens!r}: give comma-separated integers") from None
    if not lengths or min(lengths) < 1:
        raise SystemExit("error: --context-tokens needs at least one positive length")
    model, tok = load_model(args.model, args.device)
    trained = model.cfg.max_positions
    gen = GenerationConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length,
                           threshold=0.9)
    prefill = {**DEFAULT_PREFILL, "chunk_size": args.chunk_size, "top_k": args.top_k}
    kept = args.top_k * args.chunk_size
    print(f"model {args.model.name} on {model.device}, trained on sequences of {trained} positions; prefill keeps "
          f"{args.top_k} chunks of {args.chunk_size} tokens ({kept} tokens of context)\n")

    summary = []
    for L in lengths:
        questions = [make_example(task, L, seed=f"demo.{args.seed}.{i}", tokenizer=tok.tk)
                     for task in TASKS for i in range(args.questions)]
        methods = METHODS if L <= trained or args.all_methods else METHODS[1:]
        totals = {m: {"correct": 0, "seconds": 0.0} for m in methods}
        for ex in tqdm(questions, desc=f"{L} tokens", unit="q"):
            prompt = tok.long_context_prompt(ex.context, ex.question)
            line = [f"[{L} tokens, {ex.task}] {ex.question}  (answer {ex.answer}, needle at depth {ex.depth:.2f})"]
            for method in methods:
                t0 = time.perf_counter()
                out = generate(model, [prompt], gen, method=method, **(prefill if method == "prefill" else {}))
                dt = time.perf_counter() - t0
                answer = tok.decode(out.tokens[0]).strip()
                ok = answer == ex.answer
                totals[method]["correct"] += ok
                totals[method]["seconds"] += dt
                line.append(f"    {method:8s} {answer!r:14s} {'✓' if ok else '✗'}  {dt:6.2f}s")
            tqdm.write("\n".join(line))
        summary.append((L, len(questions), totals))

    print(f"\n{'context':>8s} {'method':8s} {'accuracy':>9s} {'time':>8s} {'speedup':>8s}")
    for L, n, totals in summary:
        first = next(iter(totals))
        for method, t in totals.items():
            print(f"{L:8d} {method:8s} {t['correct'] / n:9.2f} {t['seconds']:7.2f}s "
                  f"{totals[first]['seconds'] / t['seconds']:7.1f}x (vs {first})")
    if any(L > trained for L in lengths):
        print(f"\nWhy: within the {trained} positions it was trained on, the dense model answers and is cheap at this "
              f"size. Beyond them it attends over distances and positions it never saw and its cost grows with the "
              f"context (vanilla re-runs all of it every step{'' if args.all_methods else ', so it is left out there; --all-methods runs it'}); "
              f"prefill scores each {args.chunk_size}-token chunk on its own and decodes over the {args.top_k} best "
              f"({kept} tokens), inside the trained length at any context length, so it answers as it does there.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
