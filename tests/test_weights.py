"""Weight store: precision policy, conversions, fused and stacked weights, memory planning."""

import pytest
import torch

from deepseek_fp4_plugin.weights import (DenseRoutedExperts, Fp4Linear, Fp4RoutedExperts, Fp8RoutedExperts,
                                         PrecisionPolicy, ResidentWeightStore, estimate_bytes, module_group)
from tiny_reference import TinyModel, all_linear_modules


@pytest.fixture(scope="module")
def tiny():
    return TinyModel.build(seed=31)


def test_module_groups():
    assert module_group("model.layers.3.self_attn.kv_b_proj") == "attention"
    assert module_group("model.layers.3.mlp.experts.7.up_proj") == "experts"
    assert module_group("model.layers.3.mlp.shared_experts.down_proj") == "shared_experts"
    assert module_group("model.layers.0.mlp.gate_proj") == "dense_mlp"
    assert module_group("model.layers.3.mlp.gate") is None
    assert module_group("lm_head") == "lm_head"


def test_policy_rules():
    d = PrecisionPolicy()
    expert, attn = "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.self_attn.o_proj"
    # FP8 blocks stay FP8 unless requantize_fp8 (test_fp8_model.py covers the FP8 formats)
    assert d.runs_fp4(expert, "nvfp4") and not d.runs_fp4(expert, "fp8_block")
    assert not d.runs_fp4(expert, "dense")
    assert PrecisionPolicy(requantize_fp8=True).runs_fp4(expert, "fp8_block")
    assert d.runs_fp4(attn, "nvfp4") and not d.runs_fp4(attn, "fp8_block") and not d.runs_fp4(attn, "dense")
    assert not d.runs_fp4("model.layers.1.mlp.gate", "nvfp4")
    fp4 = PrecisionPolicy.parse("fp4")
    assert fp4.runs_fp4(attn, "dense") and fp4.runs_fp4("lm_head", "fp8_block")
    bf16 = PrecisionPolicy.parse("bf16")
    assert not any(bf16.runs_fp4(m, f) for m in (expert, attn) for f in ("nvfp4", "fp8_block", "dense"))
    with pytest.raises(ValueError, match="unknown module group"):
        PrecisionPolicy(frozenset({"experts", "embeddings"}))
    with pytest.raises(ValueError, match="precision"):
        PrecisionPolicy.parse("int4")


@pytest.mark.parametrize("policy,expect", [
    (None, {"attention": "fp8", "experts": "fp8", "dense_mlp": "fp8", "lm_head": "dense"}),
    ("fp4", {"attention": "fp4", "experts": "fp4", "dense_mlp": "fp4", "lm_head": "fp4"}),
    ("bf16", {"attention": "dense", "experts": "dense", "dense_mlp": "dense", "lm_head": "dense"}),
])
def test_fp8_checkpoint_formats_follow_policy(tiny, policy, expect):
    ckpt, _ = tiny.checkpoint("fp8_block", policy=PrecisionPolicy.parse(policy))
    store = ResidentWeightStore(ckpt, "cpu", torch.bfloat16, policy)
    f = store.formats
    assert f["model.layers.0.self_attn.kv_b_proj"] == expect["attention"]
    assert f["model.layers.1.mlp.experts.3.down_proj"] == expect["experts"]
    assert f["model.layers.0.mlp.up_proj"] == expect["dense_mlp"]
    assert f["lm_head"] == expect["lm_head"]
    assert f["model.layers.1.mlp.gate"] == "dense"
    experts = store.acquire_layer(1).moe.experts
    stacked = {"fp4": Fp4RoutedExperts, "fp8": Fp8RoutedExperts}
    assert isinstance(experts, stacked.get(expect["experts"], DenseRoutedExperts))
    assert store.graph_safe == (expect["experts"] in stacked)


def test_fused_gate_up_is_exact(tiny):
    """gate_proj and up_proj with different global scales fuse into one GEMM whose weight is
    exactly the two stacked (per-tile scales)."""
    ckpt, eff = tiny.checkpoint("nvfp4")
    store = ResidentWeightStore(ckpt, "cpu", torch.bfloat16)
    mlp = store.acquire_layer(0).mlp
    assert isinstance(mlp.gate_up, Fp4Linear) and mlp.gate_up.weight.global_scale.numel() > 1
    want = torch.cat([eff["model.layers.0.mlp.gate_proj.weight"], eff["model.layers.0.mlp.up_proj.weight"]])
    assert torch.equal(mlp.gate_up.dense_weight(torch.float32), want)
    attn = store.acquire_layer(0).attn
    qkv = torch.cat([eff["model.layers.0.self_attn.q_a_proj.weight"],
                     eff["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]])
    # attention stays dense under the default policy: held in the bf16 compute dtype
    assert torch.equal(attn.qkv_a.dense_weight(torch.float32), qkv.to(torch.bfloat16).float())
    c = tiny.config
    kv_b = eff["model.layers.0.self_attn.kv_b_proj.weight"].view(c.num_attention_heads, -1, c.kv_lora_rank)
    assert torch.equal(attn.w_uk, kv_b[:, : c.qk_nope_head_dim].to(torch.bfloat16))
    assert torch.equal(attn.w_uv, kv_b[:, c.qk_nope_head_dim:].to(torch.bfloat16))


def test_grouped_experts_match_per_expert_loop(tiny):
    """The stacked experts run by fp4_grouped_gemm equal each expert's own FP4 GEMM, and hold
    what the checkpoint stores."""
    ckpt, eff = tiny.checkpoint("nvfp4")
    store = ResidentWeightStore(ckpt, "cpu", torch.bfloat16)
    experts = store.acquire_layer(2).moe.experts
    e, h = experts.num_experts, experts.hidden
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, e, (40, 3), generator=g, dtype=torch.int32)
    x = torch.randn(40, h, generator=g).to(torch.bfloat16)
    x_perm, offsets, perm = torch.ops.dsfp4.moe_permute(x, ids, e)
    groups = experts.group(offsets, x_perm.shape[0], 40)
    active = (offsets[1:] > offsets[:-1]).sum()
    assert int((groups.slot_of_group >= 0).sum()) == int(active)
    y = experts.gate_up(x_perm, groups)
    offs = offsets.tolist()
    for k in range(e):
        gu, _ = experts.expert_weights(k)
        p = f"model.layers.2.mlp.experts.{k}"
        want_w = torch.cat([eff[f"{p}.gate_proj.weight"], eff[f"{p}.up_proj.weight"]])
        assert torch.equal(gu.dequantize(torch.float32), want_w)
        lo, hi = offs[k], offs[k + 1]
        if hi > lo:
            assert torch.equal(y[lo:hi], gu(x_perm[lo:hi]))


def test_estimate_matches_what_is_loaded(tiny):
    for fmt, policy, dtype in (("nvfp4", None, torch.bfloat16), ("fp8_block", "fp4", torch.bfloat16),
                               ("bf16", None, torch.float32)):
        ckpt, _ = tiny.checkpoint(fmt, policy=PrecisionPolicy.parse(policy))
        store = ResidentWeightStore(ckpt, "cpu", dtype, policy)
        got = store.memory_report()["total"]
        assert abs(estimate_bytes(ckpt, policy, dtype) - got) <= 0.05 * got, (fmt, policy)


def test_missing_or_misshaped_tensors_are_named(tiny):
    ckpt, _ = tiny.checkpoint("nvfp4")
    del ckpt._tensors["model.layers.1.self_attn.o_proj.weight"]
    ckpt._names_cache = set(ckpt._tensors)
    with pytest.raises((KeyError, ValueError), match="o_proj"):
        ResidentWeightStore(ckpt, "cpu")
    ckpt, _ = tiny.checkpoint("bf16")
    ckpt._tensors["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="model.norm.weight"):
        ResidentWeightStore(ckpt, "cpu")


def test_all_fp4_store_on_float32_keeps_fp4_values(tiny):
    """The float32 path holds the dequantized FP4 values, and records them as FP4."""
    ckpt, eff = tiny.checkpoint("nvfp4", fp4_modules=all_linear_modules(tiny.config),
                                policy=PrecisionPolicy.parse("fp4"))
    store = ResidentWeightStore(ckpt, "cpu", torch.float32, "fp4")
    assert store.formats["model.layers.2.self_attn.o_proj"] == "fp4"
    o = store.acquire_layer(2).attn.o
    assert o.weight.dtype == torch.float32
    assert torch.equal(o.weight, eff["model.layers.2.self_attn.o_proj.weight"])
