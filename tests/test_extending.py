"""A fork's variant of Prefilling-dLLM is one file: a chunker, a scorer and a selection rule written
and registered here, outside the package, then run by generate, measured by the eval's recall and
ablations, and chosen from the command line, with no edit to pdllm."""

import json
from dataclasses import dataclass

import pytest
import torch

from pdllm.cli import main
from pdllm.eval import harness
from pdllm.prefill import CHUNKERS, SCORERS, SELECTORS, Chunked, Prefill, PrefillConfig, Span, Stage
from pdllm.sampler import GenerationConfig, generate
from pdllm.tokenizer import LongContextPrompt

# ---- the fork's file: three stages, each its code and one registry line -------------------------


@dataclass(frozen=True)
class EvenChunks(Stage):
    """Cut the context into n_chunks pieces of (nearly) equal length, each with its BOS anchor."""

    name = "even_chunks"
    n_chunks: int = 3

    def problems(self):
        return [] if self.n_chunks >= 1 else [f"n_chunks={self.n_chunks} must be >= 1"]

    def __call__(self, prompt, bos_id):
        n = len(prompt.context)
        cuts = sorted({round(n * k / self.n_chunks) for k in range(self.n_chunks + 1)})
        return [Span(a, b, bos_id is not None) for a, b in zip(cuts, cuts[1:])]


@dataclass(frozen=True)
class LexicalScorer(Stage):
    """Score a chunk by the share of the query's distinct n-grams it contains (no model forward)."""

    name = "lexical"
    lexical_ngram: int = 1

    def provides_kv(self, model):
        return False

    def __call__(self, model, requests, block_length, sink=None):
        def grams(ids):
            n = self.lexical_ngram
            return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}

        out = []
        for r in requests:
            wanted = grams(r.prompt.query)
            out.append(torch.tensor([len(wanted & grams(c)) / max(1, len(wanted)) for c in r.chunks]))
        return out


@dataclass(frozen=True)
class NearBest(Stage):
    """Keep every chunk whose score is within near_best_margin of the best (relative): any number of them."""

    name = "near_best"
    near_best_margin: float = 0.1

    def held(self, n_chunks):
        return 1  # only the best is sure to be kept: the others are encoded again if kept

    def __call__(self, scores, r: Chunked):
        best = float(scores.max())
        return [i for i, s in enumerate(scores.tolist()) if s >= best - self.near_best_margin * abs(best)]


@pytest.fixture
def registered():
    for registry, cls in ((CHUNKERS, EvenChunks), (SCORERS, LexicalScorer), (SELECTORS, NearBest)):
        registry.register(cls)
    yield
    for registry, cls in ((CHUNKERS, EvenChunks), (SCORERS, LexicalScorer), (SELECTORS, NearBest)):
        registry.unregister(cls.name)


KNOBS = dict(chunking="even_chunks", n_chunks=4, score="lexical", selection="near_best", near_best_margin=0.1)

# ---- the proof ----------------------------------------------------------------------------------


def test_the_forks_stages_run_in_generate_with_any_number_of_chunks_kept(registered, llada):
    ids = list(range(20, 60))
    query = [30, 31, 50, 51]  # in chunks 1 and 3 of 4 (10 tokens each): equal scores, both kept
    prompt = LongContextPrompt(prefix=[llada.cfg.bos_id, 5, 6], context=ids, query=query)
    gc = GenerationConfig(gen_length=4, block_length=4, steps=4)
    for cache_mode in ("full_prompt_mask", "chunk_query"):
        method = Prefill(**KNOBS, cache_mode=cache_mode)
        out = generate(llada, [prompt], gc, method=method)
        assert (out.tokens != llada.cfg.mask_id).all()
        assert [(s.start, s.end) for s in method.spans[0]] == [(0, 10), (10, 20), (20, 30), (30, 40)]
        assert method.scores[0].tolist() == [0.0, 0.5, 0.0, 0.5] and method.selected[0] == [1, 3]
        assert out.stats["kv_rows"][0] == 3 + 2 * 11 + 4 + 4  # prefix, two chunks with their anchors, query, answer
    knobs = {k: v for k, v in KNOBS.items() if k != "score"}  # the fork's chunks and rule under pdllm's scorer,
    once = Prefill(**knobs, cache_mode="chunk_query")  # encoded once: a kept chunk past the one held is
    again = Prefill(**knobs, cache_mode="chunk_query", encode_once=False)  # encoded again by its scoring forward
    generate(llada, [prompt], gc, method=once)
    generate(llada, [prompt], gc, method=again)
    assert once.stats["encode_once"] and once.selected == again.selected
    with pytest.raises(ValueError, match="n_chunks=0 must be >= 1"):
        PrefillConfig(**{**KNOBS, "n_chunks": 0})


def test_the_eval_measures_the_forks_stages(registered, llada_dir, tmp_path):
    assert [label for label, _ in harness.ablations()["score"]][-1] == "lexical"  # after the built-in scorers
    assert "even_chunks" in dict(harness.ablations()["chunking"])
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(llada_dir), "--out", str(out), "--tasks", "passkey", "--lengths", "96",
                 "--depths", "0.5", "--n", "2", "--methods", "prefill", "--ablations", "selection",
                 "--ablation-n", "1", "--gen-length", "4", "--chunking", "even_chunks", "--n-chunks", "3",
                 "--score", "lexical", "--selection", "near_best", "--near-best-margin", "0.1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    cell = report["grid"]["prefill"]["passkey"]["96"]["0.5"]
    assert cell["n"] == 2 and 0.0 <= cell["recall"] <= 1.0 and len(cell["needle_cut"]) == 2  # from the fork's spans
    assert [r["label"] for r in report["ablations"]["selection"]] == ["top_k", "near_best"]


def test_the_command_line_chooses_the_forks_stages(registered, llada_dir, tmp_path, capsys):
    context = tmp_path / "context.txt"
    context.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    argv = ["generate", "--model", str(llada_dir), "--context-file", str(context), "--question", "what is the fox",
            "--method", "prefill", "--gen-length", "4", "--block-length", "4", "--steps", "4"]
    assert main(argv + ["--chunking", "even_chunks", "--n-chunks", "3", "--score", "lexical",
                        "--lexical-ngram", "2", "--selection", "near_best", "--near-best-margin", "0.5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(argv + ["--chunking", "even_chunks", "--n-chunks", "0"]) == 2
    assert "n_chunks=0 must be >= 1" in capsys.readouterr().err
