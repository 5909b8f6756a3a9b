"""The toy-model trainer: its batches, its loss, and a smoke run on CPU loaded back from disk."""

from __future__ import annotations

import json

import pytest
import torch

from pdllm.data.synthetic import piece_encoder
from pdllm.data.toy_tokenizer import build_toy_tokenizer
from pdllm.checkpoint import from_pretrained
from pdllm.model import ModelConfig, Transformer
from pdllm.tokenizer import Tokenizer
from pdllm.train_toy import SMOKE, PromptBuilder, TrainConfig, diffusion_loss, lr_at, main, make_train_batch


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(build_toy_tokenizer())


def _batch(tok, step=3, seed=0, **kw):
    cfg = TrainConfig(**{**SMOKE, "seed": seed, **kw})
    builder = PromptBuilder(tok, cfg.answer_length)
    return cfg, builder, make_train_batch(cfg, step, builder, piece_encoder(tok.tk))


def test_batches_reproducible_and_prompt_never_masked(tok):
    cfg, builder, b = _batch(tok)
    _, _, again = _batch(tok)
    assert all(torch.equal(b[k], again[k]) for k in b)
    assert not torch.equal(b["idx"], _batch(tok, seed=1)[2]["idx"])
    A = cfg.answer_length
    assert (b["idx"][:, :-A] != tok.mask_id).all()  # prompt: never masked
    assert torch.equal(b["idx"] == tok.mask_id, b["masked"])
    assert torch.equal(torch.where(b["masked"], b["target"], b["idx"]), b["target"])
    assert (b["n_maskable"] == A).all()
    # left padding is masked out of attention and does not shift positions
    for row_valid, row_pos, row_idx in zip(b["valid"], b["pos"], b["idx"]):
        n_pad = int((~row_valid).sum())
        assert (row_idx[:n_pad] == tok.eos_id).all()
        assert row_pos[n_pad:].tolist() == list(range(row_valid.numel() - n_pad))
        assert row_idx[n_pad] == tok.bos_id
    # the answer region: digits then EOS padding
    text = tok.decode(b["target"][0, -A:].tolist())
    assert text.isdigit() and b["target"][0, -1] == tok.eos_id


def test_pretrain_rows_are_packed_bos_documents_masked_everywhere(tok):
    cfg, _, b = _batch(tok, pretrain_frac=1.0, max_context=600, min_context=600, tokens_per_batch=4000)
    A = cfg.answer_length
    assert not b["sft"].any() and (b["task"] == len(cfg.task_list)).all()
    assert b["valid"].all()  # packed to the full length: no padding
    assert (b["target"][:, 0] == tok.bos_id).all() and ((b["target"] == tok.bos_id).sum(1) >= 2).any()
    assert b["masked"][:, :-A].any()  # every token maskable
    assert torch.equal(b["n_maskable"], b["valid"].sum(1))


def test_mixed_batches_keep_the_answer_region_of_sft_rows(tok):
    cfg, _, b = _batch(tok, pretrain_frac=0.5, tokens_per_batch=4000)
    A = cfg.answer_length
    sft = b["sft"]
    assert sft.any() and (~sft).any()
    assert not b["masked"][sft][:, :-A].any() and (b["n_maskable"][sft] == A).all()
    mcfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=64,
                       mask_id=tok.mask_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    _, _, per_task = diffusion_loss(Transformer(mcfg), b, n_tasks=len(cfg.task_list))
    assert per_task[:, 1].sum() == b["masked"][sft][:, -A:].sum()  # accuracy counts SFT answers only


def test_passage_rows_cut_the_context_into_bos_led_passages(tok):
    cfg, _, b = _batch(tok, passage_frac=1.0, passage_min=8, passage_max=16, tasks="passkey")
    A = cfg.answer_length
    for row in range(b["idx"].shape[0]):
        ids = b["target"][row][b["valid"][row]].tolist()
        assert ids.count(tok.bos_id) >= 3  # the prompt's own BOS and one per passage
        answer = tok.decode([t for t in ids[-A:] if t != tok.eos_id])
        prompt = tok.decode(ids[:-A])
        assert answer.isdigit() and answer in prompt


def test_grow_layers_keeps_the_function(tok):
    from pdllm.train_toy import grow_layers

    small = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden=64,
                        mask_id=tok.mask_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    a = Transformer(small)
    b = Transformer(ModelConfig(**{**small.__dict__, "n_layers": 4}))
    b.load_state_dict(grow_layers(a.state_dict(), 2, 4))
    idx = torch.randint(3, tok.vocab_size, (2, 20))
    pos = torch.arange(20).expand(2, -1)
    torch.testing.assert_close(a(idx, pos), b(idx, pos))
    assert torch.equal(b.blocks[1].attn.wqkv.weight, a.blocks[0].attn.wqkv.weight)  # the copy keeps its attention
    with pytest.raises(ValueError, match="multiple"):
        grow_layers(a.state_dict(), 2, 3)


@pytest.mark.parametrize("pretrain_frac", [0.0, 0.5])
def test_loss_is_llada_weighting(tok, pretrain_frac):
    cfg, builder, b = _batch(tok, pretrain_frac=pretrain_frac)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=64,
                       mask_id=tok.mask_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    model = Transformer(mcfg)
    loss, _, _ = diffusion_loss(model, b)
    # by hand, one sequence at a time, without padding
    A, total = cfg.answer_length, 0.0
    for i in range(b["idx"].shape[0]):
        keep = b["valid"][i]
        logits = model(b["idx"][i, keep][None], b["pos"][i, keep][None])[0]
        ce = torch.nn.functional.cross_entropy(logits, b["target"][i, keep], reduction="none")
        n = A if pretrain_frac == 0 else int(b["n_maskable"][i])
        total += (ce[b["masked"][i, keep]] / b["p_mask"][i]).sum() / n
    torch.testing.assert_close(loss, total / b["idx"].shape[0], rtol=1e-4, atol=1e-4)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 99) == pytest.approx(1e-4, rel=1e-2)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 99))


def test_smoke_run_saves_a_loadable_llada_checkpoint(tmp_path, tok):
    out = tmp_path / "toy"
    assert main(["--out", str(out), "--smoke", "--device", "cpu"]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "eval.json", "train_log.json"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["d_model"] == SMOKE["d_model"]
    assert cfg["mask_token_id"] == tok.mask_id and cfg["eos_token_id"] == tok.eos_id
    model = from_pretrained(out, dtype=torch.float32)
    assert model.cfg.vocab_size == tok.vocab_size
    reloaded = Tokenizer.from_dir(out)
    assert reloaded.tk.to_str() == tok.tk.to_str()
    ids = torch.tensor([reloaded.chat("What is the pass key?")])
    logits = model(ids, torch.arange(ids.shape[1])[None])
    assert logits.shape == (1, ids.shape[1], tok.vocab_size) and torch.isfinite(logits).all()
    results = json.loads((out / "eval.json").read_text())
    assert set(results["tasks"]) == {"passkey", "multikey_needle", "kv_lookup"}
    card = (out / "README.md").read_text()
    assert "Dense accuracy" in card and "--smoke" in card
    log = json.loads((out / "train_log.json").read_text())
    assert log["log"][-1]["step"] == SMOKE["steps"] - 1


def test_task_weights_steer_the_mix_and_are_checked(tok):
    _, _, b = _batch(tok, task_weights="passkey=0,multikey_needle=1,kv_lookup=0")
    assert (b["task"] == 1).all()
    cfg = TrainConfig(task_weights="kv_lookup=3")
    assert cfg.task_weight_list == (1.0, 1.0, 3.0)
    for bad in ("kv_lookup", "nope=1", "passkey=x", "passkey=0,multikey_needle=0,kv_lookup=0", "passkey=-1"):
        with pytest.raises(ValueError, match="task weight"):
            TrainConfig(task_weights=bad).task_weight_list


def test_per_task_accuracy_adds_up_to_the_batch_accuracy(tok):
    cfg, _, b = _batch(tok)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=64,
                       mask_id=tok.mask_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    _, acc, per_task = diffusion_loss(Transformer(mcfg), b, n_tasks=len(cfg.task_list))
    assert per_task.shape == (3, 2)
    assert per_task[:, 1].sum() == b["masked"][:, -cfg.answer_length:].sum()
    torch.testing.assert_close(per_task[:, 0].sum() / per_task[:, 1].sum(), acc)
    for t in range(3):  # counts land on the right task
        assert per_task[t, 1] == b["masked"][b["task"] == t][:, -cfg.answer_length:].sum()


def test_init_from_continues_from_a_checkpoint(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["--out", str(first), "--smoke", "--device", "cpu"]) == 0
    # learning rate 0 and no decay: the weights must come back exactly as they were loaded
    assert main(["--out", str(again), "--smoke", "--device", "cpu", "--init-from", str(first), "--lr", "0.0"]) == 0
    a, b = from_pretrained(first, torch.float32), from_pretrained(again, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "initialised from the weights of `first`" in (again / "README.md").read_text()


def test_init_from_errors_name_the_problem(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "first"), "--smoke", "--device", "cpu"]) == 0
    with pytest.raises(SystemExit):  # a size flag that contradicts the checkpoint
        main(["--out", str(tmp_path / "x"), "--smoke", "--init-from", str(tmp_path / "first"), "--d-model", "96"])
    assert "--d-model 96 does not match the checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not a checkpoint
        main(["--out", str(tmp_path / "x"), "--smoke", "--init-from", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert "--init-from" in err and "does not exist" in err


def test_needle_knobs_pack_short_contexts_and_defaults_stay_put(tok):
    import random as _random

    from pdllm.train_toy import task_kwargs

    rng = _random.Random(0)
    assert all(task_kwargs("multikey_needle", rng, 64)["num_needles"] == 1 for _ in range(20))  # default: 64 // 48
    packed = [task_kwargs("multikey_needle", rng, 64, needle_spacing=16, min_needles=2) for _ in range(50)]
    assert {k["num_needles"] for k in packed} == {2, 3, 4}
    assert all(k["num_needles"] + k["num_distractors"] <= 4 for k in packed)
    cfg, _, b = _batch(tok, tasks="multikey_needle", min_needles=3, needle_spacing=16)
    A = cfg.answer_length
    for row in range(b["idx"].shape[0]):  # each packed example holds its needles and its answer
        prompt = tok.decode(b["idx"][row, :-A][b["valid"][row, :-A]].tolist())
        answer = tok.decode([t for t in b["target"][row, -A:].tolist() if t != tok.eos_id])
        assert prompt.count("special magic numbers for") >= 3 and answer.isdigit() and answer in prompt


def test_embedding_init(tok):
    from pdllm.train_toy import init_for_training

    mcfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=1, n_heads=1, n_kv_heads=1, mlp_hidden=64,
                       mask_id=tok.mask_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    model = Transformer(mcfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_for_training(model, 0.02)  # the constructor's init: untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    init_for_training(model, 1.0)
    assert abs(model.tok_emb.weight.std().item() - 1.0) < 0.05
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k != "tok_emb.weight")


def test_full_mask_rows_hide_the_whole_answer(tok):
    cfg, _, b = _batch(tok, full_mask_frac=1.0)
    A = cfg.answer_length
    assert b["masked"][:, -A:].all() and not b["masked"][:, :-A].any()
    assert torch.allclose(b["p_mask"], torch.ones_like(b["p_mask"]))  # loss weight 1/p = 1
    _, _, half = _batch(tok, full_mask_frac=0.5)
    assert half["masked"][:, -A:].all(dim=1).any() and not half["masked"][:, -A:].all(dim=1).all()


def test_recipe_runs_its_stages_and_the_trainer_writes_the_card(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("SMALL = dict(d_model=64, n_heads=2, mlp_hidden=128, min_context=32, max_context=96, "
                      "chunk_size=32, answer_length=8, tokens_per_batch=1024, warmup=2, eval_n=5, eval_batch=5, "
                      "eval_steps=2, workers=0, log_every=2)\n"
                      "STAGES = [dict(name='short', what='from scratch', n_layers=1, steps=3, **SMALL),\n"
                      "          dict(name='deep', what='grown', n_layers=2, steps=4, stop_at=2, pretrain_frac=0.3, "
                      "passage_frac=0.5, **SMALL)]\n")
    out = tmp_path / "toy"
    assert main(["--recipe", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "stages" / "short" / "model.safetensors").exists() and (out / "recipe.py").exists()
    assert from_pretrained(out, torch.float32).cfg.n_layers == 2
    card = (out / "README.md").read_text()
    assert "`short`" in card and "`deep`" in card and "grown from 1 to 2 layers" in card
    log = json.loads((out / "train_log.json").read_text())
    assert log["info"]["steps_done"] == 2 and log["config"]["steps"] == 4
    # a later stage alone needs the stage before's output
    with pytest.raises(SystemExit, match="needs --init-from"):
        main(["--recipe", str(recipe), "--out", str(tmp_path / "x"), "--from-stage", "deep"])
    with pytest.raises(SystemExit, match="not a stage"):
        main(["--recipe", str(recipe), "--out", str(tmp_path / "x"), "--from-stage", "nope", "--init-from", str(out)])
