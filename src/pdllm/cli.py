"""The ``pdllm`` command: generate, demo, eval, tune, train-toy.

The thinnest layer over the library: it parses, checks every knob before the model loads (an 8B
checkpoint takes minutes), and calls pdllm.loading, pdllm.methods and pdllm.sampler. A user error
is one line ``pdllm: error: ...`` on stderr and exit status 2; ``--debug`` anywhere on the command
line (or PDLLM_DEBUG=1) shows the traceback instead. A warning of pdllm's is one line
``pdllm: warning: ...``; other libraries' warnings keep Python's format.

Flags are derived, not written out (pdllm.knobs): every field of GenerationConfig is a decoding
flag, and every knob of every registered method (pdllm.methods.METHODS: the keywords of its
__init__, and the knobs of a config it takes, such as PrefillConfig's, which include every
registered selection stage's) is one flag, ``--chunk-size`` for ``chunk_size``. A knob left out
keeps the config's default (or the preset's). A field added to a config, or a stage registered with
its knobs, gets its flag with no change here.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from pdllm.notices import PdllmWarning
from pdllm.knobs import ArgumentError, ArgumentParser, UsageError, add_knob, all_method_knobs, config_knobs, given_knobs
from pdllm.loading import EMBEDDED_MODEL, check_device, check_dtype, default_device, load_model
from pdllm.methods import METHODS
from pdllm.prefill.stages import chunk_progress

DEBUG_ENV = "PDLLM_DEBUG"
CLI_DEFAULTS = {"gen_length": 32, "steps": 32}  # the command answers short questions: 32 tokens, 32 steps


# ---------------------------------------------------------------------------------------------
# Presets: a named starting point for a method's knobs (given flags go on top)
# ---------------------------------------------------------------------------------------------


@dataclass
class Preset:
    method: str  # the method it configures
    config: Callable[[str], Any]  # (model arch, **given knobs) -> the method object
    generation: dict  # GenerationConfig fields it sets unless given on the command line
    prompt: Callable | None = None  # (tokenizer, context, question) -> prompt; None: the chat template
    generate: Callable | None = None  # (model, prompts, config, method) -> GenerationOutput; None: sampler.generate
    greedy_only: bool = False
    help: str = ""


def _official_preset() -> Preset:
    from pdllm.official import OFFICIAL_GENERATION, generate_official, plain_long_context_prompt
    from pdllm.prefill import Prefill, PrefillConfig
    from pdllm.tokenizer import DEFAULT_INSTRUCTION, DEFAULT_QUESTION

    return Preset(
        method="prefill",
        config=lambda arch, **knobs: Prefill(PrefillConfig.official(arch, **knobs)),
        generation={"threshold": OFFICIAL_GENERATION["threshold"]},
        prompt=lambda tok, context, question: plain_long_context_prompt(tok, context, question, DEFAULT_INSTRUCTION,
                                                                        DEFAULT_QUESTION),
        generate=generate_official, greedy_only=True)


# name -> a function building the Preset (lazy: a preset's modules load only when it is used)
PRESETS: dict[str, Callable[[], Preset]] = {"official": _official_preset}
PRESET_HELP = {"official": "the official code's selection (PrefillConfig.official for the model's arch), its prompt "
                           "without chat template, its answer path (pdllm.official.generate_official), threshold "
                           "0.9 unless given"}


# ---------------------------------------------------------------------------------------------
# pdllm generate
# ---------------------------------------------------------------------------------------------


def add_generation_args(p: argparse.ArgumentParser):
    from pdllm.sampler import GenerationConfig

    g = p.add_argument_group("decoding (GenerationConfig)")
    for knob in config_knobs(GenerationConfig):
        add_knob(g, knob, CLI_DEFAULTS.get(knob.name))
    g.add_argument("--method", default="dual", choices=tuple(METHODS))
    g.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="; ".join(f"{name}: {PRESET_HELP.get(name, '')}" for name in PRESETS))
    groups = {}
    for knob in all_method_knobs(METHODS).values():
        owner = knob.methods[0]
        if owner not in groups:
            groups[owner] = p.add_argument_group(f"--method {owner}")
        add_knob(groups[owner], knob)
    m = p.add_argument_group("model")
    m.add_argument("--model", type=Path, default=EMBEDDED_MODEL, help="HF checkpoint directory (default: the "
                   "embedded toy model)")
    m.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if there is a GPU)")


def generation_config(args, preset: Preset | None = None):
    from pdllm.sampler import GenerationConfig

    values = {**CLI_DEFAULTS, **(preset.generation if preset else {}), **given_knobs(args, config_knobs(GenerationConfig))}
    return GenerationConfig(**values)


def method_kwargs(args) -> dict:
    """The knobs of --method given on the command line; a knob of another method is an error."""
    knobs = all_method_knobs(METHODS)
    given = given_knobs(args, knobs.values())
    for name in given:
        knob = knobs[name]
        if args.method not in knob.methods:
            raise UsageError(f"{knob.flag} is a knob of --method {', '.join(knob.methods)}; it does nothing with "
                             f"--method {args.method}")
    return given


def make_cli_method(args, arch: str, preset: Preset | None):
    """The method object: by name with the given knobs, or the preset's config with them on top."""
    from pdllm.methods import make_method

    kwargs = method_kwargs(args)
    return make_method(args.method, **kwargs) if preset is None else preset.config(arch, **kwargs)


def read_text_file(path: str, flag: str) -> str:
    """A user's text file, or one line naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: {'is not a regular file' if p.exists() else 'no such file'}")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag} {path}: not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t utf-8") from e
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be read ({e.strerror})") from e


def cmd_generate(args) -> int:
    from pdllm.checkpoint import load_config
    from pdllm.sampler import generate

    # Everything the user gave is checked here, before the weights are read.
    if args.context_file is not None or args.question is not None:
        if args.context_file is None or args.question is None:
            raise UsageError("--context-file and --question go together")
        if args.prompt is not None or args.prompt_file is not None:
            raise UsageError("give either --prompt/--prompt-file or --context-file/--question")
        context = read_text_file(args.context_file, "--context-file")
        if not context.strip():
            raise UsageError(f"--context-file {args.context_file} is empty; give a document to answer from")
        if not args.question.strip():
            raise UsageError("--question is empty; ask something about the context")
    elif args.prompt is None and args.prompt_file is None:
        raise UsageError("give --prompt TEXT, --prompt-file F, or --context-file F with --question Q")
    else:
        if args.prompt is not None and args.prompt_file is not None:
            raise UsageError("give --prompt or --prompt-file, not both")
        text = args.prompt if args.prompt is not None else read_text_file(args.prompt_file, "--prompt-file")
        if not text.strip():
            raise UsageError("the prompt is empty; give --prompt TEXT")
        if args.method == "prefill":
            raise UsageError("--method prefill needs --context-file and --question (it chunks the context)")
    preset = PRESETS[args.preset]() if args.preset else None
    if preset is not None and args.method != preset.method:
        raise UsageError(f"--preset {args.preset} is a preset of --method {preset.method}; "
                         f"use it with --method {preset.method}")
    config = generation_config(args, preset)
    if preset is not None and preset.greedy_only and (config.temperature != 0 or config.cfg_scale != 0):
        raise UsageError(f"--preset {args.preset} decodes greedily by threshold: drop --temperature/--cfg-scale")
    cfg = load_config(args.model)  # config.json only: the arch for a preset, and a bad checkpoint fails now
    method = make_cli_method(args, cfg.arch, preset)
    warn_if_every_rank_does_the_whole_job(method)
    device = check_device(args.device or default_device())
    if args.dtype is not None:
        check_dtype(args.dtype)

    model, tok = load_model(args.model, device, args.dtype)
    if args.context_file is not None and preset is not None and preset.prompt is not None:
        prompt = preset.prompt(tok, context, args.question)
    elif args.context_file is not None:
        prompt = tok.long_context_prompt(context, args.question)
    else:
        prompt = tok.chat(text)
    total = config.gen_length if config.threshold is not None else config.steps
    progress = StepProgress(total, tok, visual=args.visual)
    with chunk_progress(progress.chunks):
        if preset is not None and preset.generate is not None:
            out = preset.generate(model, [prompt], config, method)
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


def warn_if_every_rank_does_the_whole_job(method):
    """Under torchrun (WORLD_SIZE in the environment, as distributed.init reads it) only chunk-parallel
    scoring shares the work; otherwise each rank loads the model and answers the whole prompt."""
    from pdllm import distributed
    from pdllm.sampler import warn_once

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and distributed.is_main() and not getattr(getattr(method, "cfg", None), "chunk_parallel", False):
        warn_once("torchrun", f"started by torchrun with WORLD_SIZE={world} but without --chunk-parallel: each of the "
                              f"{world} ranks does the whole job; add --method prefill --chunk-parallel to share the "
                              "chunk scoring across them, or run one process")


class StepProgress:
    """tqdm bars: over the chunks scored (prefill, while it chooses them), then over the denoising
    steps (one tick per step, the block shown as it fills)."""

    def __init__(self, total: int, tokenizer=None, visual: bool = False):
        self.total, self.tokenizer, self.visual = total, tokenizer, visual
        self.bar = self.scoring = None

    def chunks(self, n: int, total: int):
        if self.scoring is None:
            self.scoring = tqdm(total=total, unit="chunk", desc="scoring", leave=False, file=sys.stderr)
        self.scoring.update(n)

    def __call__(self, event):
        if self.bar is None:
            if self.scoring is not None:
                self.scoring.close()
            self.bar = tqdm(total=self.total, unit="step", desc="decoding", leave=False, file=sys.stderr)
        self.bar.update(1)
        if self.visual:
            from pdllm.visual import render_block

            self.bar.write(render_block(event, self.tokenizer), file=sys.stderr)

    def close(self):
        for bar in (self.scoring, self.bar):
            if bar is not None:
                bar.close()


# ---------------------------------------------------------------------------------------------
# Entry point: parse, run, and turn user errors into one line
# ---------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pdllm", description="Prefilling-dLLM for LLaDA-style diffusion LLMs",
                            epilog="--debug (anywhere) or PDLLM_DEBUG=1: show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

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
                                ("eval", "pdllm.eval.harness", "accuracy grids, ablations, LongBench/InfiniteBench"),
                                ("calibrate", "pdllm.calibrate", "the cheapest scoring setting that selects as full "
                                                                 "depth does, on this checkpoint")):
        s = sub.add_parser(name, help=help_, add_help=False)
        s.set_defaults(func=None, module=module)
    return parser


def _run(argv) -> int:
    parser = build_parser()
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


def _one_line_warnings(show_others):
    """warnings.showwarning for the command: pdllm's own warnings (PdllmWarning) as one line
    ``pdllm: warning: ...``, every other warning (torch's, a library's) by ``show_others``, as
    Python shows it: it is not pdllm's to rephrase."""

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, PdllmWarning):
            return show_others(message, category, filename, lineno, file, line)

        text = " ".join(str(message).split()).removeprefix("pdllm: ")
        tqdm.write(f"pdllm: warning: {text}", file=sys.stderr if file is None else file)

    return show


def main(argv=None) -> int:
    from pdllm.autotune.configs import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warnings(shown)
    try:
        return _run(argv)
    except (UsageError, ValueError, OSError, ConfigError) as e:  # CheckpointError and ConfigError are ValueErrors
        if debug:
            raise
        print(f"pdllm: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ArgumentError:  # already printed
        return 2
    except SystemExit as e:  # a delegated command's `raise SystemExit("error: ...")`
        if debug or not isinstance(e.code, str):
            raise
        print(f"pdllm: error: {' '.join(e.code.split()).removeprefix('error: ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("pdllm: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
