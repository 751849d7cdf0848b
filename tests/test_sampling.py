"""Sampling: greedy, temperature, top-k, top-p, seeds, parameter checks."""

import math

import pytest
import torch

from deepseek_fp4_plugin.sampling import SamplingParams, filter_logits, sample


def rand_logits(seed, b=4, v=300, scale=3.0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax():
    logits = rand_logits(0)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def test_top_k_one_is_greedy_at_any_temperature():
    logits = rand_logits(1)
    p = SamplingParams(temperature=5.0, top_k=1, seed=0)
    assert torch.equal(sample(logits, p, p.generators(4, logits.device)), logits.argmax(-1))


def test_seeded_generators_reproduce_and_differ():
    logits = rand_logits(2, b=3, scale=0.5)
    p = SamplingParams(temperature=1.0, seed=123)
    runs = [torch.stack([sample(logits, p, gens) for _ in range(20)])
            for gens in (p.generators(3, logits.device), p.generators(3, logits.device))]
    assert torch.equal(runs[0], runs[1])
    q = SamplingParams(temperature=1.0, seed=124)
    gens = q.generators(3, logits.device)
    other = torch.stack([sample(logits, q, gens) for _ in range(20)])
    assert not torch.equal(runs[0], other)
    # row i of a batch draws with seed + i: row 1 here draws as a lone sequence seeded 124
    single = SamplingParams(temperature=1.0, seed=124)
    g1 = single.generators(1, logits.device)
    alone = torch.stack([sample(logits[1:2], single, g1) for _ in range(20)])
    assert torch.equal(alone[:, 0], runs[0][:, 1])


def test_top_k_keeps_only_the_k_most_likely():
    logits = rand_logits(3, b=1, v=50)
    p = SamplingParams(temperature=2.0, top_k=5, seed=1)
    allowed = set(logits[0].topk(5).indices.tolist())
    gens = p.generators(1, logits.device)
    drawn = {int(sample(logits, p, gens)) for _ in range(300)}
    assert drawn <= allowed and len(drawn) >= 3


def test_top_p_keeps_the_nucleus():
    logits = rand_logits(4, b=1, v=40, scale=2.0)
    probs = logits[0].softmax(-1).double()
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = [], 0.0
    for t in order:            # smallest prefix of the sorted tokens whose mass reaches top_p
        nucleus.append(t)
        mass += float(probs[t])
        if mass >= 0.6:
            break
    kept = torch.isfinite(filter_logits(logits, 1.0, top_p=0.6))[0].nonzero().flatten().tolist()
    assert sorted(kept) == sorted(nucleus)
    p = SamplingParams(temperature=1.0, top_p=0.6, seed=2)
    gens = p.generators(1, logits.device)
    drawn = {int(sample(logits, p, gens)) for _ in range(300)}
    assert drawn <= set(nucleus)


def test_temperature_sampling_matches_softmax():
    """Empirical frequencies of 40k draws against softmax(logits / T): every token within
    5 standard errors."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    t = 0.7
    want = (logits / t).softmax(-1)[0]
    n = 40000
    torch.manual_seed(0)
    draws = sample(logits.expand(n, -1), SamplingParams(temperature=t))
    freq = torch.bincount(draws, minlength=6).double() / n
    se = torch.sqrt(want.double() * (1 - want.double()) / n)
    assert bool(((freq - want.double()).abs() <= 5 * se + 1e-9).all()), (freq, want)


@pytest.mark.parametrize("kw,word", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=3.0), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(seed=2 ** 64), "seed"),
    (dict(seed="7"), "seed"),
])
def test_invalid_parameters_name_themselves(kw, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kw)


def test_sample_checks_shapes():
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(5), SamplingParams())
    p = SamplingParams(temperature=1.0, seed=0)
    with pytest.raises(ValueError, match="generators"):
        sample(torch.zeros(2, 5), p, p.generators(3, torch.device("cpu")))
