"""generate() and the sampler: greedy is argmax of a full forward, sampling is seeded per sequence."""
import numpy as np
import paddle
import pytest

from libernie.config import ernie_tiny
from libernie.model import ErnieForCausalLM
from libernie.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def model():
    paddle.seed(5)
    cfg = ernie_tiny(vocab_size=61)
    cfg.initializer_range = 0.3
    m = ErnieForCausalLM(cfg)
    m.eval()
    return m


def test_greedy_equals_repeated_full_forward_argmax(model):
    prompt = [3, 9, 27, 4]
    ids = list(prompt)
    with paddle.no_grad():
        for _ in range(6):
            ids.append(int(model(paddle.to_tensor([ids])).logits[0, -1].argmax()))
    assert model.generate(prompt, max_new_tokens=6, eos_token_id=-1)[0] == ids[len(prompt):]


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [[3, 9, 27, 4], [11], [7, 7, 8, 30, 31, 32, 50]]
    seeds = [10, 20, 30]
    batched = model.generate(prompts, max_new_tokens=5, temperature=0.8, seed=seeds, eos_token_id=-1)
    for p, s, got in zip(prompts, seeds, batched):
        assert got == model.generate([p], max_new_tokens=5, temperature=0.8, seed=[s], eos_token_id=-1)[0]
    greedy = model.generate(prompts, max_new_tokens=5, eos_token_id=-1)
    assert greedy == [model.generate([p], max_new_tokens=5, eos_token_id=-1)[0] for p in prompts]
    assert batched != greedy  # the sampling really sampled


def test_stops_at_eos_and_rows_leave_the_batch(model):
    first = model.generate([[3, 9]], max_new_tokens=4, eos_token_id=-1)[0]
    out = model.generate([[3, 9], [5, 6, 7]], max_new_tokens=4, eos_token_id=first[1])
    assert out[0] == first[:2]
    assert len(out[1]) <= 4


def test_sampler_cuts():
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    assert sample(logits, SamplingParams(temperature=0)) == 1
    rng = np.random.default_rng(0)
    assert {sample(logits, SamplingParams(temperature=5.0, top_k=1), rng) for _ in range(20)} == {1}
    # top_p 0.6: p = softmax([3,2,1,-1]) = .66,.24,.09,.01 -> only token 1 survives
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.6), rng) for _ in range(20)} == {1}
    draws = [sample(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(4000)]
    frac = np.mean(np.array(draws) == 2)
    assert abs(frac - 1 / (1 + np.e)) < 0.03  # two survivors with logits 3 and 2


def test_penalties_follow_their_definitions():
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(np.array([1.0, 1.5, -1.0]), p, seen=np.array([1])) == 0      # 1.5 / 2 < 1.0
    p = SamplingParams(temperature=0, frequency_penalty=0.4)
    assert sample(np.array([1.0, 1.5]), p, generated=np.array([1, 1])) == 0    # 1.5 - 0.8 < 1.0
    with pytest.raises(ValueError):
        SamplingParams(top_p=0).validate()
