"""The built-in tiny model: loads in every format, formats agree, tokenizer round-trips, cache."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deepseek_fp4_plugin import ops, tiny as tiny_mod
from deepseek_fp4_plugin.cli import main as cli_main
from deepseek_fp4_plugin.checkpoint import DENSE, FP8_BLOCK, NVFP4
from deepseek_fp4_plugin.loader import INDEX_FILE, linear_shapes, open_checkpoint, other_tensor_shapes
from deepseek_fp4_plugin.tiny import (ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, default_tiny_path,
                                      ensure_tiny, make_tiny)

TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing tab\t and a newline\n",
    "深度学习 and 专家混合 with émojis 🙂🚀 and unseen words: zyzzyva quixotic",
    "def f(x):\n    return x ** 2  # 4096 / 7168\n",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: make_tiny(root / fmt, seed=0, format=fmt) for fmt in ("bf16", "fp8_block", "nvfp4")}


def _shards(folder):
    return sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))


@pytest.mark.parametrize("fmt", ["bf16", "fp8_block", "nvfp4"])
def test_loads_and_is_sharded(tiny, fmt):
    folder = tiny[fmt]
    assert len(_shards(folder)) >= 2
    with open_checkpoint(folder) as ck:
        cfg = ck.config
        assert (cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.n_routed_experts) == (4, 1, 16)
        assert cfg.rope.rope_type == "yarn"
        for m, (n, k) in linear_shapes(cfg).items():
            assert k % 64 == 0, m
            ck.linear(m, n, k)
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".partial")]


def _dequantized(ck, module, n, k):
    lt = ck.linear(module, n, k)
    t = lt.tensors
    if lt.format == NVFP4:
        return ops.nvfp4_dequantize(t["weight"], t["weight_scale"], t["weight_scale_2"], torch.float32), lt
    if lt.format == FP8_BLOCK:
        return ops.fp8_block_dequantize(t["weight"], t["weight_scale_inv"]), lt
    return t["weight"].float(), lt


def test_formats_are_one_model(tiny):
    """Same seed, same model: quantized weights lie within their format's rounding bound of the
    BF16 master; everything left unquantized is identical."""
    cks = {fmt: open_checkpoint(p) for fmt, p in tiny.items()}
    master = cks["bf16"]
    cfg = master.config
    for name in other_tensor_shapes(cfg):
        for fmt in ("fp8_block", "nvfp4"):
            assert torch.equal(cks[fmt].get_tensor(name), master.get_tensor(name)), (fmt, name)
    seen = {FP8_BLOCK: 0, NVFP4: 0, DENSE: 0}
    for m, (n, k) in linear_shapes(cfg).items():
        w = master.get_tensor(m + ".weight").float()
        for fmt in ("fp8_block", "nvfp4"):
            deq, lt = _dequantized(cks[fmt], m, n, k)
            err = (deq - w).abs()
            seen[lt.format] += 1
            if lt.format == DENSE:
                assert torch.equal(deq, w), (fmt, m)
            elif lt.format == FP8_BLOCK:
                # e4m3: 3 mantissa bits → relative error ≤ 2⁻⁴; subnormals (< 2⁻⁶·scale) absolute
                # error ≤ 2⁻¹⁰·scale
                s = lt.tensors["weight_scale_inv"].repeat_interleave(128, 0)[:n]
                s = s.repeat_interleave(128, 1)[:, :k]
                assert bool((err <= w.abs() * 2**-4 + s * 2**-10 + 1e-12).all()), (fmt, m)
            else:
                # E2M1 grid gaps are at most 2 steps of the block scale; amax sits at 6 steps
                s = lt.tensors["weight_scale"].float().repeat_interleave(16, 1) * lt.tensors["weight_scale_2"]
                assert bool((err <= s * 1.0 + 1e-12).all()), (fmt, m)
            assert err.max() <= w.abs().max()
    assert seen[FP8_BLOCK] > 0 and seen[NVFP4] > 0 and seen[DENSE] > 0
    for ck in cks.values():
        ck.close()


def test_deterministic(tmp_path):
    a = make_tiny(tmp_path / "a", seed=5, format="bf16")
    b = make_tiny(tmp_path / "b", seed=5, format="bf16")
    c = make_tiny(tmp_path / "c", seed=6, format="bf16")
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    shard = _shards(a)[0]
    assert (a / shard).read_bytes() != (c / shard).read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tokenizer_round_trip(tiny):
    from tokenizers import Tokenizer

    folder = tiny["nvfp4"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cfg = json.loads((folder / "config.json").read_text())
    assert tok.get_vocab_size() == cfg["vocab_size"]
    assert tok.token_to_id(BOS_TOKEN) == cfg["bos_token_id"]
    assert tok.token_to_id(EOS_TOKEN) == cfg["eos_token_id"]
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids[0] == cfg["bos_token_id"] and max(ids) < cfg["vocab_size"]
        assert tok.decode(ids, skip_special_tokens=True) == text
    # merges were learned: common words are single tokens, not bytes
    assert len(tok.encode("the experts").ids) < len("the experts")


def test_tokenizer_config_and_chat_template(tiny):
    transformers = pytest.importorskip("transformers")
    folder = tiny["nvfp4"]
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["bos_token"] == BOS_TOKEN and tc["eos_token"] == EOS_TOKEN
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text).ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == (f"{BOS_TOKEN}Be brief.{USER_TOKEN}Hi{ASSISTANT_TOKEN}Hello.{EOS_TOKEN}"
                    f"{USER_TOKEN}Bye{ASSISTANT_TOKEN}")
    ids = tok.encode(text, add_special_tokens=False).ids
    for special in (BOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, EOS_TOKEN):
        assert tok.token_to_id(special) in ids


def test_loads_in_transformers(tiny):
    """An independent reader of the HF DeepSeek-V3 layout takes the BF16 folder as it is."""
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tiny["bf16"]),
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[0, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert logits.shape == (1, 7, 512) and bool(logits.isfinite().all())
    # random but sane: neither collapsed nor exploding
    assert 0.01 < float(logits.std()) < 10.0
    hf_cfg = model.config
    with open_checkpoint(tiny["bf16"]) as ck:
        ours = ck.config
    assert (hf_cfg.hidden_size, hf_cfg.q_lora_rank, hf_cfg.kv_lora_rank, hf_cfg.n_routed_experts) == \
        (ours.hidden_size, ours.q_lora_rank, ours.kv_lora_rank, ours.n_routed_experts)


def test_ensure_tiny_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSFP4_CACHE", str(tmp_path / "cache"))
    assert default_tiny_path() == tmp_path / "cache" / "tiny-v1"
    path = ensure_tiny()
    assert path == default_tiny_path()
    with open_checkpoint(path) as ck:
        assert ck.quant.method == "nvfp4"
    stamp = (path / INDEX_FILE).stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(tiny_mod, "make_tiny", lambda *a, **k: calls.append(a))
    assert ensure_tiny() == path and not calls
    assert (path / INDEX_FILE).stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-v1"]


def test_default_path_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DSFP4_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_tiny_path() == tmp_path / "deepseek-fp4" / "tiny-v1"


def test_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="full: exists and is not an empty folder"):
        make_tiny(tmp_path / "full", format="bf16")
    with pytest.raises(ValueError, match="format must be one of"):
        make_tiny(tmp_path / "new", format="int4")
    with pytest.raises(ValueError, match="unknown config field 'hidden'"):
        make_tiny(tmp_path / "new", format="bf16", hidden=3)
    assert not (tmp_path / "new").exists()


def test_fp8_block_quantize_matches_dequantize():
    w = torch.randn(200, 300) * 0.05
    q, s = tiny_mod.fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    deq = ops.fp8_block_dequantize(q, s)
    s_full = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert bool(((deq - w).abs() <= w.abs() * 2**-4 + s_full * 2**-10).all())
    # block amax maps to ±448 exactly
    assert float(q[:128, :128].float().abs().max()) == 448.0


def test_command_line(tmp_path, capsys):
    assert cli_main(["make-tiny", str(tmp_path / "t"), "--format", "bf16", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_file(str(tmp_path / "t" / _shards(tmp_path / "t")[0]))
