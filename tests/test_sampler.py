"""sampler.py: the schedule, the unmasking rules, and every method against vanilla."""

import pytest
import torch

from pdllm.methods import make_method
from pdllm.sampler import (GenerationConfig, add_gumbel_noise, generate, num_transfer_tokens,
                           select_transfer, steps_to_fill)
from pdllm.testing import random_prompts


def test_transfer_schedule_spreads_the_remainder_first():
    s = num_transfer_tokens(torch.tensor([10, 32, 3]), 4)
    assert s.tolist() == [[3, 3, 2, 2], [8, 8, 8, 8], [1, 1, 1, 0]]
    assert s.sum(1).tolist() == [10, 32, 3]


def test_fixed_schedule_unmasks_the_k_most_confident():
    conf = torch.tensor([[0.1, 0.9, float("-inf"), 0.5, 0.7]])
    assert select_transfer(conf, torch.tensor([2]), None).tolist() == [[False, True, False, False, True]]
    # never more than the allowed positions
    assert select_transfer(conf, torch.tensor([9]), None).tolist() == [[True, True, False, True, True]]


def test_threshold_keeps_top1_and_everything_at_or_above_threshold():
    conf = torch.tensor([[0.2, 0.95, 0.9, float("-inf"), 0.89],
                         [0.3, 0.1, 0.2, 0.05, float("-inf")]])
    out = select_transfer(conf, None, 0.9)
    assert out[0].tolist() == [False, True, True, False, False]  # 0.9 >= 0.9 is kept (Fast-dLLM's rule)
    assert out[1].tolist() == [True, False, False, False, False]  # none above: the most confident alone
    tie = select_transfer(torch.tensor([[0.5, 0.5, 0.1]]), None, 0.9)
    assert tie.tolist() == [[True, False, False]]  # ties: the earlier position


def test_a_fixed_schedule_runs_until_its_last_busy_step():
    assert steps_to_fill(num_transfer_tokens(torch.tensor([3, 1]), 5)) == 3  # [1,1,1,0,0] and [1,0,0,0,0]
    assert steps_to_fill(num_transfer_tokens(torch.tensor([8]), 4)) == 4
    assert steps_to_fill(num_transfer_tokens(torch.tensor([0, 0]), 4)) == 0


def test_more_steps_than_tokens_stops_when_the_block_is_full(llada):
    p = random_prompts(llada.cfg.vocab_size, lengths=(7,))
    out = generate(llada, p, GenerationConfig(gen_length=8, block_length=4, steps=16), time_steps=True)
    assert out.nfe == 8 and (out.tokens != llada.cfg.mask_id).all()  # 4 steps per block unmask 1 token each
    assert len(out.stats["model_ms"]) == len(out.stats["sampler_ms"]) == 8
    assert all(t >= 0 for t in out.stats["model_ms"] + out.stats["sampler_ms"])


def test_gumbel_noise_is_float64_and_off_at_zero_temperature():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    assert add_gumbel_noise(logits, 0.0) is logits
    assert add_gumbel_noise(logits, 1.0).dtype == torch.float64


@pytest.mark.parametrize("kwargs, message", [
    (dict(gen_length=30, block_length=8), "multiple of block_length"),
    (dict(gen_length=32, block_length=8, steps=6), "multiple of the number of blocks"),
    (dict(remasking="greedy"), "remasking"),
    (dict(threshold=1.5), "threshold"),
    (dict(temperature=-1.0), "temperature"),
])
def test_generation_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_unknown_method_and_bad_refresh():
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        make_method("fast")
    with pytest.raises(ValueError, match="refresh_every"):
        make_method("dual", refresh_every=0)


def test_empty_prompt_is_an_error(llada):
    with pytest.raises(ValueError, match="empty prompt"):
        generate(llada, [[]], GenerationConfig(gen_length=8, block_length=8, steps=8))


@pytest.mark.parametrize("model_name", ["llada", "dream"])
@pytest.mark.parametrize("method", ["prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_caches_refreshed_every_step_equal_vanilla_exactly(model_name, method, threshold, request):
    model = request.getfixturevalue(model_name)
    gc = GenerationConfig(gen_length=16, block_length=8, steps=8, threshold=threshold)
    batch = random_prompts(model.cfg.vocab_size)
    vanilla = generate(model, batch, gc, method="vanilla")
    cached = generate(model, batch, gc, method=method, refresh_every=1)
    assert torch.equal(cached.tokens, vanilla.tokens)
    assert cached.nfe == vanilla.nfe


def test_output_is_varied_enough_to_mean_something(llada):
    out = generate(llada, random_prompts(llada.cfg.vocab_size), GenerationConfig(gen_length=16, block_length=8, steps=8))
    assert len(set(out.tokens.flatten().tolist())) > 3  # the equality tests above compare real decisions


@pytest.mark.parametrize("method", ["vanilla", "prefix", "dual"])
def test_padded_batch_equals_each_row_alone(llada, method):
    gc = GenerationConfig(gen_length=16, block_length=8, steps=8)
    batch = random_prompts(llada.cfg.vocab_size, lengths=(13, 5, 9))
    together = generate(llada, batch, gc, method=method).tokens
    for row, p in enumerate(batch):
        assert torch.equal(generate(llada, [p], gc, method=method).tokens[0], together[row])


def test_threshold_decoding_uses_fewer_steps(llada):
    p = random_prompts(llada.cfg.vocab_size, lengths=(11,))
    fixed = generate(llada, p, GenerationConfig(gen_length=16, block_length=16, steps=16))
    fast = generate(llada, p, GenerationConfig(gen_length=16, block_length=16, steps=16, threshold=0.3))
    assert fixed.nfe == 16 and 1 <= fast.nfe < 16
    assert (fast.tokens != llada.cfg.mask_id).all()


def test_random_remasking_and_temperature_are_seeded(llada):
    p = random_prompts(llada.cfg.vocab_size, lengths=(9,))
    gc = GenerationConfig(gen_length=8, block_length=8, steps=4, temperature=1.0, remasking="random")
    torch.manual_seed(3)
    a = generate(llada, p, gc).tokens
    torch.manual_seed(3)
    assert torch.equal(a, generate(llada, p, gc).tokens)


@pytest.mark.parametrize("method", ["vanilla", "dual"])
def test_classifier_free_guidance_runs_and_changes_the_answer(llada, method):
    p = random_prompts(llada.cfg.vocab_size, lengths=(12,))
    gc = GenerationConfig(gen_length=8, block_length=8, steps=8)
    plain = generate(llada, p, gc, method=method)
    guided = generate(llada, p, GenerationConfig(gen_length=8, block_length=8, steps=8, cfg_scale=2.0), method=method)
    assert guided.tokens.shape == plain.tokens.shape and (guided.tokens != llada.cfg.mask_id).all()
    refreshed = generate(llada, p, GenerationConfig(gen_length=8, block_length=8, steps=8, cfg_scale=2.0),
                         method="dual", refresh_every=1)
    assert torch.equal(refreshed.tokens, generate(llada, p, GenerationConfig(gen_length=8, block_length=8, steps=8,
                                                                             cfg_scale=2.0)).tokens)
