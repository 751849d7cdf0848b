"""The numerical guard and the one-generation rule on CUDA, with CUDA-graph decode: NaN logits
from a replayed graph end the sequence with finish_reason "error" exactly as eager decode does."""

import pytest
import torch

from deepseek_fp4_plugin import Engine, EngineBusyError
from deepseek_fp4_plugin.checkpoint import StateDictCheckpoint
from deepseek_fp4_plugin.guard import sample_checked
from deepseek_fp4_plugin.sampling import SamplingParams
from tiny_reference import TinyModel

EMBED = "model.embed_tokens.weight"


def ids_for(seed, n, vocab=256):
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tensors():
    ckpt, _ = TinyModel.build(seed=21).checkpoint("nvfp4")
    return ckpt.config, {n: ckpt.get_tensor(n) for n in ckpt.names()}


def engine(tensors, poison=None, graph=True):
    cfg, t = tensors
    t = dict(t)
    if poison is not None:
        e = t[EMBED].clone()
        e[poison] = float("nan")
        t[EMBED] = e
    return Engine.from_pretrained(StateDictCheckpoint(cfg, t), device="cuda", max_seq_len=96,
                                  max_batch_size=3, use_cuda_graph=graph)


def test_sample_checked_cuda():
    logits = torch.randn(4, 1000, device="cuda")
    logits[2, 5] = float("nan")
    logits[3, 0] = float("-inf")
    for params in (SamplingParams(), SamplingParams(temperature=0.8, seed=1)):
        tokens, finite = sample_checked(logits, params, params.generators(4, logits.device))
        assert finite == [True, True, False, False] and all(0 <= t < 1000 for t in tokens)


@pytest.mark.parametrize("graph", [True, False])
def test_nan_mid_decode_is_an_error(tensors, graph):
    prompts = [ids_for(1, 7), ids_for(2, 11)]
    clean = engine(tensors, graph=graph)
    assert clean.use_cuda_graph is graph
    free = clean.generate(prompts, max_tokens=10, ignore_eos=True)
    seen = set(prompts[0])
    i = next(j for j, t in enumerate(free[0].token_ids) if t not in seen and t not in free[0].token_ids[:j])
    token = free[0].token_ids[i]
    if token in prompts[1] + free[1].token_ids:
        pytest.skip("the poisoned token also appears in the other sequence")
    out = engine(tensors, poison=token, graph=graph).generate(prompts, max_tokens=10, ignore_eos=True)
    assert out[0].finish_reason == "error" and out[0].token_ids == free[0].token_ids[: i + 1]
    assert "non-finite logits" in out[0].error
    assert out[1].token_ids == free[1].token_ids and out[1].finish_reason == "length"


def test_busy_with_cuda_graphs(tensors):
    """While the engine is held (as an open stream holds it), a second generation is refused
    and the held one's graphs and cache are left alone."""
    eng = engine(tensors)
    want = eng.generate(ids_for(3, 5), max_tokens=6, ignore_eos=True)
    eng._occupancy.acquire("stream()")
    try:
        with pytest.raises(EngineBusyError):
            eng.generate(ids_for(4, 9), max_tokens=6, ignore_eos=True)
    finally:
        eng._occupancy.release()
    assert eng.generate(ids_for(3, 5), max_tokens=6, ignore_eos=True) == want
