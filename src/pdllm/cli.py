"""The ``pdllm`` command: generate, demo, eval, tune, train-toy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

METHODS = ("vanilla", "prefix", "dual", "prefill", "dllm_cache", "dyllm")
EMBEDDED_MODEL = Path(__file__).parent / "assets" / "toy"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_generation_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("decoding")
    g.add_argument("--gen-length", type=int, default=32)
    g.add_argument("--block-length", type=int, default=32)
    g.add_argument("--steps", type=int, default=32, help="denoising steps over all blocks")
    g.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding threshold (e.g. 0.9)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
    g.add_argument("--cfg-scale", type=float, default=0.0)
    g.add_argument("--method", default="dual", choices=METHODS)
    f = p.add_argument_group("Prefilling-dLLM (--method prefill; a knob left out takes PrefillConfig's default, "
                             "or the preset's)")
    f.add_argument("--preset", default=None, choices=["official"],
                   help="official: the official code's selection (PrefillConfig.official for the model's arch), its "
                   "prompt without chat template, its answer path (pdllm.official.generate_official), threshold 0.9 "
                   "unless given")
    f.add_argument("--chunk-size", type=int, default=None, help="(1024)")
    f.add_argument("--top-k", type=int, default=None, help="(4)")
    f.add_argument("--score", default=None, choices=["attention", "draft"], help="(attention)")
    f.add_argument("--token-capacity", type=int, default=None)
    f.add_argument("--cache-mode", default=None, choices=["full_prompt_mask", "chunk_query"], help="(full_prompt_mask)")
    f.add_argument("--positions", default=None, choices=["continuous", "reuse", "absolute"], help="(continuous)")
    f.add_argument("--no-chunk-bos", action="store_true", help="do not put a BOS anchor in front of each chunk")
    f.add_argument("--chunk-parallel", action="store_true", help="under torchrun: each rank scores its share of "
                   "the chunks (pdllm.distributed)")
    m = p.add_argument_group("model")
    m.add_argument("--model", type=Path, default=EMBEDDED_MODEL, help="HF checkpoint directory (default: the "
                   "embedded toy model)")
    m.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    m.add_argument("--device", default=None)


def generation_config(args):
    from pdllm.sampler import GenerationConfig

    threshold = args.threshold
    if threshold is None and getattr(args, "preset", None) == "official":
        from pdllm.official import OFFICIAL_GENERATION

        threshold = OFFICIAL_GENERATION["threshold"]
    return GenerationConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                            temperature=args.temperature, remasking=args.remasking, threshold=threshold,
                            cfg_scale=args.cfg_scale)


def method_kwargs(args) -> dict:
    """The prefill knobs given on the command line (the others keep the config's or preset's)."""
    if args.method != "prefill":
        return {}
    given = dict(chunk_size=args.chunk_size, top_k=args.top_k, score=args.score, token_capacity=args.token_capacity,
                 cache_mode=args.cache_mode, positions=args.positions, chunk_bos=False if args.no_chunk_bos else None,
                 chunk_parallel=args.chunk_parallel or None)
    return {k: v for k, v in given.items() if v is not None}


def make_cli_method(args, model):
    """The method object: by name with the given knobs, or the preset's config with them on top."""
    from pdllm.methods import make_method

    if args.preset is None:
        return make_method(args.method, **method_kwargs(args))
    if args.method != "prefill":
        raise SystemExit(f"error: --preset {args.preset} is a Prefilling-dLLM preset; use it with --method prefill")
    from pdllm.prefill import Prefill, PrefillConfig

    return Prefill(PrefillConfig.official(model.cfg.arch, **method_kwargs(args)))


def load_model(path, device: str | None = None, dtype: str | None = None):
    """Model and tokenizer of a checkpoint directory; bf16 on a GPU, fp32 on a CPU unless told."""
    from pdllm.model import from_pretrained
    from pdllm.tokenizer import Tokenizer

    device = device or default_device()
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return from_pretrained(path, dtype, device), Tokenizer.from_dir(path)


class StepProgress:
    """A tqdm bar over denoising steps (one tick per step, the block shown as it fills)."""

    def __init__(self, total: int, tokenizer=None, visual: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="decoding", leave=False, file=sys.stderr)
        self.tokenizer, self.visual = tokenizer, visual

    def __call__(self, event):
        self.bar.update(1)
        if self.visual:
            from pdllm.visual import render_block

            self.bar.write(render_block(event, self.tokenizer), file=sys.stderr)

    def close(self):
        self.bar.close()


def cmd_generate(args) -> int:
    from pdllm.sampler import generate

    if args.context_file is not None or args.question is not None:
        if args.context_file is None or args.question is None:
            raise SystemExit("error: --context-file and --question go together")
        if args.prompt is not None or args.prompt_file is not None:
            raise SystemExit("error: give either --prompt/--prompt-file or --context-file/--question")
    elif args.prompt is None and args.prompt_file is None:
        raise SystemExit("error: give --prompt TEXT, --prompt-file F, or --context-file F with --question Q")
    model, tok = load_model(args.model, args.device, args.dtype)
    config = generation_config(args)
    if args.context_file is not None and args.preset == "official":  # its LongBench prompt: [BOS] + text, no template
        from pdllm.official import plain_long_context_prompt
        from pdllm.tokenizer import DEFAULT_INSTRUCTION, DEFAULT_QUESTION

        prompt = plain_long_context_prompt(tok, Path(args.context_file).read_text(), args.question,
                                           DEFAULT_INSTRUCTION, DEFAULT_QUESTION)
    elif args.context_file is not None:
        prompt = tok.long_context_prompt(Path(args.context_file).read_text(), args.question)
    else:
        text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
        if args.method == "prefill":
            raise SystemExit("error: --method prefill needs --context-file and --question (it chunks the context)")
        prompt = tok.chat(text)
    total = config.gen_length if config.threshold is not None else config.steps
    progress = StepProgress(total, tok, visual=args.visual)
    method = make_cli_method(args, model)
    if args.preset == "official":  # the official generate's answer path: slot 0 first, [MASK] drawable
        from pdllm.official import generate_official

        if config.temperature != 0 or config.cfg_scale != 0:
            raise SystemExit("error: --preset official decodes greedily by threshold: drop --temperature/--cfg-scale")
        out = generate_official(model, [prompt], config, method)
    else:
        out = generate(model, [prompt], config, method=method, callback=progress)
    progress.close()
    if args.visual and args.method == "prefill":
        from pdllm.visual import render_selection

        print(render_selection(method.scores[0], method.selected[0], method.chunk_lengths[0]), file=sys.stderr)
    print(tok.decode(out.tokens[0]))
    s = out.stats
    extra = ""
    if args.method == "prefill":
        extra = f"  selected chunks {s['selected'][0]} of {s['chunks'][0]}  score {s['score_s']:.3f}s  " \
                f"build {s['build_s']:.3f}s"
    n_prompt = len(prompt.token_ids()) if hasattr(prompt, "token_ids") else len(prompt)
    print(f"[{args.method}] prompt {n_prompt} tokens  gen {config.gen_length}  nfe {out.nfe}  "
          f"total {s['total_s']:.3f}s  decode {s['decode_s']:.3f}s{extra}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pdllm", description="Prefilling-dLLM for LLaDA-style diffusion LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt")
    g.add_argument("--prompt", default=None)
    g.add_argument("--prompt-file", default=None)
    g.add_argument("--context-file", default=None, help="long context (chunked by --method prefill)")
    g.add_argument("--question", default=None)
    g.add_argument("--visual", action="store_true", help="show the answer block filling in, step by step")
    add_generation_args(g)
    g.set_defaults(func=cmd_generate)

    for name, module, help_ in (("train-toy", "pdllm.train_toy", "train the small embedded model"),
                                ("tune", "pdllm.autotune.tune", "autotune the Triton kernels for this GPU"),
                                ("demo", "pdllm.demo", "long-context questions answered by each method"),
                                ("eval", "pdllm.eval.harness", "accuracy grids, ablations, LongBench/InfiniteBench")):
        s = sub.add_parser(name, help=help_, add_help=False)
        s.set_defaults(func=None, module=module)

    args, rest = parser.parse_known_args(argv)
    from pdllm import distributed

    if distributed.init():  # started by torchrun: join its process group; rank 0 prints
        distributed.quiet_other_ranks()
    if args.func is None:  # delegated sub-commands parse their own arguments
        import importlib

        return importlib.import_module(args.module).main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
