"""Sampling restricts the support the way each knob says, and seeds reproduce."""
import math

import pytest
import torch

from moed.engine.sampler import apply_penalties, sample_row, truncate
from moed.engine.sampling_params import SamplingParams
from moed.errors import InvalidRequestError

LOGITS = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0])


def support(params, draws=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {sample_row(LOGITS.clone(), params, [], [], g).token_id for _ in range(draws)}


def test_greedy_is_argmax():
    assert sample_row(LOGITS.clone(), SamplingParams(temperature=0), [], [], None).token_id == 0


def test_top_k_restricts_support():
    s = support(SamplingParams(temperature=5.0, top_k=3))
    assert s == {0, 1, 2}


def test_top_p_restricts_support():
    probs = torch.softmax(LOGITS, -1)
    # the smallest prefix of the sorted distribution whose mass reaches top_p
    top_p = float(probs[:2].sum()) + 1e-3
    s = support(SamplingParams(temperature=1.0, top_p=top_p))
    assert s == {0, 1, 2}
    kept = truncate(probs.clone(), SamplingParams(top_p=top_p))
    assert (kept[3:] == 0).all() and (kept[:3] > 0).all()


def test_min_p_restricts_support():
    probs = torch.softmax(LOGITS, -1)
    ratio = float(probs[2] / probs[0])      # e^-2
    s = support(SamplingParams(temperature=1.0, min_p=ratio * 0.99))
    assert s == {0, 1, 2}


def test_high_temperature_widens_support():
    assert len(support(SamplingParams(temperature=10.0))) >= 6


def test_same_seed_same_draws_different_seed_differs():
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_row(LOGITS.clone(), SamplingParams(temperature=3.0), [], [], g).token_id
                for _ in range(64)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_penalties():
    p = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(LOGITS.clone(), p, prompt_ids=[0], output_ids=[6])
    assert out[0] == 2.0 and out[6] == -4.0 and out[1] == 3.0
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(LOGITS.clone(), p, prompt_ids=[], output_ids=[1, 1, 2])
    assert out[1] == pytest.approx(3.0 - 0.5 - 0.5) and out[2] == pytest.approx(2.0 - 0.75)
    assert out[0] == 4.0


def test_logprobs_of_chosen_and_top_n():
    s = sample_row(LOGITS.clone(), SamplingParams(temperature=0, logprobs=3), [], [], None)
    logp = torch.log_softmax(LOGITS, -1)
    assert s.token_id == 0 and math.isclose(s.logprob, float(logp[0]), rel_tol=1e-6)
    assert [t for t, _ in s.top] == [0, 1, 2]


@pytest.mark.parametrize("field,kwargs", [
    ("temperature", dict(temperature=-0.1)), ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)), ("top_k", dict(top_k=-1)), ("min_p", dict(min_p=1.0)),
    ("repetition_penalty", dict(repetition_penalty=0)),
    ("max_new_tokens", dict(max_new_tokens=0)), ("logprobs", dict(logprobs=100)),
    ("stop", dict(stop=[""])),
])
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e-45),                               # logits / T past float range
    dict(temperature=0.7, repetition_penalty=1e-38),       # 4 / 1e-38: past it too
    dict(temperature=1e-45, repetition_penalty=1e-38),
    dict(temperature=1.0, top_p=1e-45),                    # top_p * mass at float32's smallest
])
def test_values_so_small_they_overflow_are_computed_safely(kwargs):
    """No NaN, no empty distribution: the top token (boosted by a penalty below 1) is
    drawn, as the limit of each knob says."""
    s = sample_row(LOGITS.clone(), SamplingParams(**kwargs), [0], [],
                   torch.Generator().manual_seed(0))
    assert s.token_id == 0
