"""The numerical guard: non-finite logits end that sequence with finish_reason "error" and a
message, never a stream of token 0, and leave the other sequences of a batch untouched."""

import pytest
import torch

from deepseek_fp4_plugin import DeepseekInference, Engine, GenerationError
from deepseek_fp4_plugin.checkpoint import StateDictCheckpoint
from deepseek_fp4_plugin.guard import sample_checked
from deepseek_fp4_plugin.sampling import SamplingParams, sample
from deepseek_fp4_plugin.tiny import make_tiny
from tiny_reference import TinyModel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EMBED = "model.embed_tokens.weight"


def rand_ids(seed, n, vocab=256):
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tensors():
    ckpt, _ = TinyModel.build(seed=21).checkpoint("nvfp4")
    return ckpt.config, {n: ckpt.get_tensor(n) for n in ckpt.names()}


def engine_with(tensors, edit=None, **kw):
    cfg, t = tensors
    t = dict(t)
    if edit is not None:
        edit(t)
    return Engine.from_pretrained(StateDictCheckpoint(cfg, t), device="cpu", max_seq_len=96, max_batch_size=4,
                                  **kw)


def poison_token(t, token):
    """NaN embedding row: everything after ``token`` enters the sequence is NaN."""
    e = t[EMBED].clone()
    e[token] = float("nan")
    t[EMBED] = e


# ---- sample_checked ------------------------------------------------------------------------


@pytest.mark.parametrize("params", [SamplingParams(),
                                    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1)])
def test_sample_checked_flags_bad_rows(params):
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    bad = logits.clone()
    bad[1, 7] = float("nan")
    bad[2, 0] = float("inf")
    bad[4, 299] = float("-inf")
    gens = params.generators(5, torch.device("cpu"))
    tokens, finite = sample_checked(bad, params, gens)
    assert finite == [True, False, False, True, False]
    want = sample(logits, params, params.generators(5, torch.device("cpu"))).tolist()
    assert [t for t, f in zip(tokens, finite) if f] == [want[0], want[3]]


def test_sample_checked_does_not_touch_finite_logits():
    logits = torch.randn(3, 50)
    before = logits.clone()
    sample_checked(logits, SamplingParams(temperature=1.0, seed=3), None)
    assert torch.equal(logits, before)


# ---- generation -----------------------------------------------------------------------------


def _first_new_token(prompt, tokens):
    """(index, token): the first generated token that appears neither in the prompt nor earlier."""
    seen = set(prompt)
    for i, t in enumerate(tokens):
        if t not in seen:
            return i, t
        seen.add(t)
    raise AssertionError("no new token")


def test_nan_everywhere_ends_at_once(tensors):
    def edit(t):
        t["model.norm.weight"] = torch.full_like(t["model.norm.weight"], float("nan"))

    eng = engine_with(tensors, edit)
    for kw in (dict(), dict(temperature=0.9, seed=4), dict(temperature=0.7)):
        out = eng.generate(rand_ids(1, 6), max_tokens=10, ignore_eos=True, **kw)
        assert out.finish_reason == "error" and out.token_ids == [] and out.text == ""
        assert "non-finite logits" in out.error and "token 0" in out.error


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, seed=11, top_k=30)])
def test_nan_mid_generation_keeps_the_good_prefix(tensors, kw):
    prompt = rand_ids(2, 9)
    free = engine_with(tensors).generate(prompt, max_tokens=12, ignore_eos=True, **kw).token_ids
    i, token = _first_new_token(prompt, free)
    eng = engine_with(tensors, lambda t: poison_token(t, token))
    out = eng.generate(prompt, max_tokens=12, ignore_eos=True, **kw)
    assert out.token_ids == free[: i + 1]           # the poisoned token was sampled from good logits
    assert out.finish_reason == "error" and f"token {i + 1}" in out.error
    assert 0 not in out.token_ids[i + 1:]


def test_batch_neighbours_unaffected(tensors):
    clean = engine_with(tensors)
    prompts = [rand_ids(s, n) for s, n in ((3, 5), (4, 12), (5, 8))]
    free = clean.generate(prompts, max_tokens=10, ignore_eos=True)
    i, token = _first_new_token(prompts[1], free[1].token_ids)
    others = [p + c.token_ids for j, (p, c) in enumerate(zip(prompts, free)) if j != 1]
    if any(token in seq for seq in others):
        pytest.skip("the poisoned token also appears in another sequence")
    eng = engine_with(tensors, lambda t: poison_token(t, token))
    out = eng.generate(prompts, max_tokens=10, ignore_eos=True)
    assert out[1].finish_reason == "error" and out[1].token_ids == free[1].token_ids[: i + 1]
    for j in (0, 2):
        assert out[j].token_ids == free[j].token_ids and out[j].finish_reason == "length"
    # the engine stays usable
    assert eng.generate(prompts[0], max_tokens=10, ignore_eos=True).token_ids == free[0].token_ids


def test_stream_stops_and_reports(tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = make_tiny(tmp_path / "tiny", seed=3)
    d = shutil.copytree(src, tmp_path / "bad")
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shard = d / wm["model.norm.weight"]
    t = load_file(str(shard))
    t["model.norm.weight"] = torch.full_like(t["model.norm.weight"], float("nan"))
    save_file(t, str(shard), metadata={"format": "pt"})
    eng = Engine.from_pretrained(d, device="cpu")
    pieces = list(eng.stream("Hello", max_tokens=8, ignore_eos=True))
    assert pieces == [] and eng.last_completion.finish_reason == "error"
    model = DeepseekInference(d, device="cpu")
    with pytest.raises(GenerationError, match="non-finite logits"):
        model.generate("Hello", max_tokens=4)
    with pytest.raises(GenerationError, match="non-finite logits"):
        list(model.stream("Hello", max_tokens=4))
    good = DeepseekInference(src, device="cpu")
    assert good.generate("Hello", max_tokens=4, temperature=0.0) == "".join(good.stream("Hello", max_tokens=4,
                                                                                         temperature=0.0))
