"""Corrupt checkpoints and mismatched tokenizers are refused at load, naming the file and the
tensor, instead of loading and generating garbage."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin.checkpoint import StateDictCheckpoint
from deepseek_fp4_plugin.convert import convert_checkpoint
from deepseek_fp4_plugin.loader import INDEX_FILE, open_checkpoint
from deepseek_fp4_plugin.tiny import build_tokenizer, make_tiny
from deepseek_fp4_plugin.validation import check_block_scales, check_global_scale
from tiny_reference import TinyModel

EXPERT = "model.layers.1.mlp.experts.5.down_proj"
ATTN = "model.layers.2.self_attn.o_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {fmt: make_tiny(root / fmt, seed=0, format=fmt) for fmt in ("nvfp4", "fp8_block")}


def _corrupt(src, dst, name, edit):
    """Copy of model folder ``src`` with tensor ``name`` replaced by edit(tensor); returns
    (folder, shard file holding the tensor)."""
    d = shutil.copytree(src, dst)
    shard = json.loads((d / INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(str(d / shard))
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(d / shard), metadata={"format": "pt"})
    return d, d / shard


def _set_e4m3(t, value):
    t.view(torch.uint8)[3, 1] = value
    return t


CORRUPTIONS = [
    ("nvfp4", f"{EXPERT}.weight_scale_2", lambda t: torch.full_like(t, float("nan"))),
    ("nvfp4", f"{EXPERT}.weight_scale_2", lambda t: -t),
    ("nvfp4", f"{EXPERT}.weight_scale_2", lambda t: torch.zeros_like(t)),
    ("nvfp4", f"{EXPERT}.weight_scale_2", lambda t: torch.full_like(t, float("inf"))),
    ("nvfp4", f"{EXPERT}.input_scale", lambda t: torch.full_like(t, float("nan"))),
    ("nvfp4", f"{EXPERT}.input_scale", lambda t: -t),
    ("nvfp4", f"{EXPERT}.weight_scale", lambda t: _set_e4m3(t, 0x7F)),     # NaN
    ("nvfp4", f"{EXPERT}.weight_scale", lambda t: _set_e4m3(t, 0xFF)),     # NaN
    ("nvfp4", f"{EXPERT}.weight_scale", lambda t: _set_e4m3(t, 0xB8)),     # -1.0
    ("fp8_block", f"{ATTN}.weight_scale_inv", lambda t: t.index_fill_(0, torch.tensor([0]), float("nan"))),
    ("fp8_block", f"{ATTN}.weight_scale_inv", lambda t: -t),
    ("fp8_block", f"{ATTN}.weight_scale_inv", lambda t: t.index_fill_(0, torch.tensor([0]), float("-inf"))),
]


@pytest.mark.parametrize("fmt,name,edit", CORRUPTIONS)
def test_corrupt_scale_refused_at_load(tiny, tmp_path, fmt, name, edit):
    d, shard = _corrupt(tiny[fmt], tmp_path / "m", name, edit)
    with pytest.raises(ValueError, match=rf"{shard}: tensor '{name}'.*(must be a finite number > 0|"
                                         rf"NaN, infinite or negative)"):
        Engine.from_pretrained(d, device="cpu")


@pytest.mark.parametrize("fmt,name,edit", CORRUPTIONS[:3] + CORRUPTIONS[6:8])
def test_convert_refuses_corrupt_scales(tiny, tmp_path, fmt, name, edit):
    """An NVFP4 source is copied bit for bit, so its scales are checked on the way."""
    d, shard = _corrupt(tiny[fmt], tmp_path / "m", name, edit)
    with pytest.raises(ValueError, match=rf"{shard}: tensor '{name}'"):
        convert_checkpoint(d, tmp_path / "out", progress=False)


def test_zero_block_scales_and_negative_zero_are_fine():
    """An all-zero block stores scale 0 (ModelOpt) or -0: both dequantize to zeros."""
    s = torch.tensor([[1.0, 0.0, -0.0, 448.0]]).to(torch.float8_e4m3fn)
    check_block_scales(s, "s", "here")
    check_block_scales(torch.tensor([[0.0, 2.0]]), "s", "here")
    check_global_scale(torch.tensor(1e-30), "g", "here")
    with pytest.raises(ValueError, match="here: tensor 'g' = 0.0"):
        check_global_scale(torch.tensor(0.0), "g", "here")


def test_state_dict_checkpoint_checked_too():
    tm = TinyModel.build(seed=1)
    ckpt, _ = tm.checkpoint("nvfp4")
    name = next(n for n in ckpt.names() if n.endswith("experts.2.up_proj.weight_scale_2"))
    tensors = {n: ckpt.get_tensor(n) for n in ckpt.names()}
    tensors[name] = torch.tensor(float("nan"))
    bad = StateDictCheckpoint(ckpt.config, tensors)
    with pytest.raises(ValueError, match=rf"state dict: tensor '{name}' = nan"):
        Engine.from_pretrained(bad, device="cpu")


def test_state_dict_checkpoint_validates_its_config():
    cfg = TinyModel.build(seed=1).config
    cfg.routed_scaling_factor = float("nan")
    with pytest.raises(ValueError, match="routed_scaling_factor must be a finite number"):
        StateDictCheckpoint(cfg, {})


def test_scales_read_once_per_load(tiny, monkeypatch):
    """The check runs where a layer's tensors are read, once per linear module at load (the
    routers are dense tensors, read as such)."""
    from deepseek_fp4_plugin import checkpoint

    seen = []
    real = checkpoint.check_linear_scales
    monkeypatch.setattr(checkpoint, "check_linear_scales", lambda lt, where: (seen.append(lt.module),
                                                                              real(lt, where)))
    Engine.from_pretrained(tiny["nvfp4"], device="cpu")
    with open_checkpoint(tiny["nvfp4"]) as ck:
        from deepseek_fp4_plugin.loader import linear_shapes

        want = [m for m in linear_shapes(ck.config) if not m.endswith(".mlp.gate")]
    assert sorted(seen) == sorted(want)


# ---- tokenizer against the model's vocabulary ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tok") / "m", seed=0, format="bf16")


def test_tokenizer_larger_than_vocab_refused(tiny_bf16, tmp_path):
    d = shutil.copytree(tiny_bf16, tmp_path / "m")
    build_tokenizer(vocab_size=600).save(str(d / "tokenizer.json"))   # the model has 512
    with pytest.raises(ValueError, match=rf"{d / 'tokenizer.json'}: token ids go up to 599, beyond the "
                                         rf"model's vocabulary \(config.json vocab_size = 512\)"):
        Engine.from_pretrained(d, device="cpu")


def test_added_token_beyond_vocab_refused(tiny_bf16, tmp_path):
    d = shutil.copytree(tiny_bf16, tmp_path / "m")
    tok = build_tokenizer()
    tok.add_special_tokens(["<｜tool▁call｜>"])   # id 512 in a 512-token model
    tok.save(str(d / "tokenizer.json"))
    with pytest.raises(ValueError, match="token ids go up to 512"):
        Engine.from_pretrained(d, device="cpu")


def test_tokenizer_that_fits_loads(tiny_bf16, tmp_path):
    d = shutil.copytree(tiny_bf16, tmp_path / "m")
    build_tokenizer(vocab_size=400).save(str(d / "tokenizer.json"))   # smaller is fine
    eng = Engine.from_pretrained(d, device="cpu")
    assert eng.generate("The sea", max_tokens=3, ignore_eos=True).token_ids


# ---- paged experts: read from the files, not through CheckpointSource.linear -----------------

PAGED = dict(device="cpu", dtype="bfloat16", memory_limit=0.02, verbose=False, max_batch_size=1,
             max_seq_len=128, prefill_chunk=64)


def test_tiny_model_pages_under_this_budget(tiny):
    eng = Engine.from_pretrained(tiny["nvfp4"], **PAGED)
    assert type(eng.store).__name__ == "PagedWeightStore"


@pytest.mark.parametrize("name,edit", [(n, e) for _, n, e in CORRUPTIONS[:6]])
def test_corrupt_expert_global_scale_refused_when_paged(tiny, tmp_path, name, edit):
    d, shard = _corrupt(tiny["nvfp4"], tmp_path / "m", name, edit)
    with pytest.raises(ValueError, match=rf"{shard}: tensor '{name}' = .* must be a finite number > 0"):
        Engine.from_pretrained(d, **PAGED)


def test_nan_expert_block_scales_when_paged_end_in_error(tiny, tmp_path):
    """Block scales of a paged expert are read when it is paged in, not at open: NaN there fails
    that request with an error naming the file and tensor instead of flowing out as tokens."""
    d = shutil.copytree(tiny["nvfp4"], tmp_path / "m")
    wm = json.loads((d / INDEX_FILE).read_text())["weight_map"]
    names = [n for n in wm if n.startswith("model.layers.1.mlp.experts.") and n.endswith(".weight_scale")]
    for shard in {wm[n] for n in names}:
        tensors = load_file(str(d / shard))
        for n in names:
            if wm[n] == shard:
                tensors[n] = _set_e4m3(tensors[n].clone(), 0x7F)
        save_file(tensors, str(d / shard), metadata={"format": "pt"})
    eng = Engine.from_pretrained(d, **PAGED)
    with pytest.raises(ValueError, match=r"\.safetensors: model\.layers\.1\.mlp\.experts\.\d+\.\w+\.weight_scale "
                                         r"holds a NaN block scale"):
        eng.generate("Hello there", max_tokens=4, ignore_eos=True)
