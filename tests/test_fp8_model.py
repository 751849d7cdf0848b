"""FP8 in the model: the precision policy, FP8-block checkpoints at the default policy against
transformers' DeepseekV3ForCausalLM, BF16 attention quantized to FP8 at load, the FP8 kernel code
path (bfloat16 on the CPU reference ops: fp8_gemm, fused gate_up / qkv_a, stacked FP8 experts,
FP8 absorbed MLA), the planner's FP8 attention and ``convert --fp8``."""

import json
import zlib

import pytest
import torch

from deepseek_fp4_plugin.checkpoint import CheckpointSource
from deepseek_fp4_plugin.config import DeepseekV3Config
from deepseek_fp4_plugin.engine import Engine
from deepseek_fp4_plugin.memory_plan import (GiB, PagingSettings, attention_bytes, expert_unit_bytes,
                                             plan_memory)
from deepseek_fp4_plugin.precision import PrecisionPolicy
from deepseek_fp4_plugin.weights import Fp8KvB, Fp8Linear, Fp8RoutedExperts
from tiny_reference import TinyModel, force_routing

CONFIGS = {
    "base": dict(attention_bias=True),
    "yarn_v3": dict(rope=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                              mscale=1.0, mscale_all_dim=1.0)),
    "direct_q": dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                     first_k_dense_replace=0, norm_topk_prob=False, n_shared_experts=2,
                     num_experts_per_tok=3),
    # heads of 128 + 128 (whole scale blocks): the absorbed products run as FP8 GEMMs (Fp8KvB);
    # moe_intermediate 144 > 128: gate_up split inside a block row
    "mla128": dict(num_attention_heads=2, qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=144,
                   hidden_size=160, moe_intermediate_size=144, intermediate_size=272, q_lora_rank=96),
}


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def tokens_for(seed, n, vocab=256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_logits(ref, ids):
    return ref(torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------------------------------
# the policy


def test_runtime_formats_of_the_policies():
    expert, attn, head = "model.layers.1.mlp.experts.3.up_proj", "model.layers.0.self_attn.q_b_proj", \
        "lm_head"
    d = PrecisionPolicy()
    # as stored: NVFP4 → fp4, FP8 → fp8 (no lossy conversion), BF16 → dense
    assert [d.runtime_format(expert, f) for f in ("nvfp4", "fp8_block", "dense")] == ["fp4", "fp8", "dense"]
    assert [d.runtime_format(attn, f) for f in ("nvfp4", "fp8_block", "dense")] == ["fp4", "fp8", "dense"]
    assert d.runtime_format("model.layers.1.mlp.gate", "fp8_block") == "dense"    # the router
    fp4 = PrecisionPolicy.parse("fp4")
    assert all(fp4.runtime_format(m, f) == "fp4"
               for m in (expert, attn, head) for f in ("fp8_block", "dense"))
    fp8 = PrecisionPolicy.parse("fp8")
    assert fp8.runtime_format(attn, "dense") == "fp8" and fp8.runtime_format(head, "dense") == "dense"
    assert fp8.runtime_format(expert, "nvfp4") == "fp4"
    bf16 = PrecisionPolicy.parse("bf16")
    assert all(bf16.runtime_format(m, f) == "dense"
               for m in (expert, attn) for f in ("nvfp4", "fp8_block", "dense"))
    assert not bf16.auto_fp8_attention
    assert d.with_fp8("attention").runtime_format(attn, "dense") == "fp8"
    with pytest.raises(ValueError, match="fp8_groups"):
        PrecisionPolicy(fp8_groups=frozenset({"embeddings"}))


# ---------------------------------------------------------------------------------------
# FP8-block checkpoints at the default policy: the checkpoint's own math


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp8_checkpoint_default_policy_matches_transformers(name):
    seed = zlib.crc32(name.encode()) % 1000
    tm = TinyModel.build(seed=seed, **CONFIGS[name])
    ckpt, eff = tm.checkpoint("fp8_block")
    engine = Engine.from_pretrained(ckpt, device="cpu")
    assert engine.dtype == torch.float32
    f = engine.store.formats
    moe = next(x for x in range(tm.config.num_hidden_layers) if tm.config.is_moe_layer(x))
    assert f[f"model.layers.{moe}.mlp.experts.0.gate_proj"] == "fp8"
    assert f["model.layers.0.self_attn.o_proj"] == "fp8" and f["lm_head"] == "dense"
    assert f[f"model.layers.{moe}.mlp.gate"] == "dense"
    ids = tokens_for(seed, 19)
    ours, theirs = engine.logits(ids), reference_logits(tm.reference(eff), ids)
    assert rel_err(ours[-1], theirs[-1]) <= 1e-4
    assert rel_err(ours, theirs) <= 1e-4


def test_requantizing_fp8_to_fp4_is_opt_in_and_lossy():
    """What the old default did: the FP8 MLPs converted to NVFP4 move the logits far more."""
    tm = TinyModel.build(seed=5, **CONFIGS["base"])
    ckpt, eff = tm.checkpoint("fp8_block")
    ids = tokens_for(6, 15)
    want = reference_logits(tm.reference(eff), ids)
    req = PrecisionPolicy(requantize_fp8=True)
    lossy = Engine.from_pretrained(ckpt, device="cpu", precision=req)
    assert lossy.store.formats["model.layers.1.mlp.experts.0.gate_proj"] == "fp4"
    exact = Engine.from_pretrained(ckpt, device="cpu")
    assert rel_l2(exact.logits(ids), want) < 1e-5 < 1e-2 < rel_l2(lossy.logits(ids), want)


@pytest.mark.parametrize("name", ["base", "direct_q", "mla128"])
def test_fp8_kernel_code_path_close_to_transformers(name):
    """dtype=bfloat16 runs the GPU code path (fp8_gemm, fused qkv_a / gate_up, Fp8RoutedExperts,
    FP8 absorbed MLA in decode) on the CPU reference ops; the reference is made to route like us
    (bf16 rounding can flip a near-tied expert)."""
    tm = TinyModel.build(seed=21, **CONFIGS[name])
    ckpt, eff = tm.checkpoint("fp8_block")
    engine = Engine.from_pretrained(ckpt, device="cpu", dtype="bfloat16")
    c = tm.config
    last = engine.store.acquire_layer(c.num_hidden_layers - 1)
    assert isinstance(last.moe.experts, Fp8RoutedExperts)
    a = last.attn
    assert isinstance(a.o, Fp8Linear) and isinstance(a.kv_b, Fp8Linear)
    assert (a.w_uk is None and isinstance(a.kv_b, Fp8KvB)) == (name == "mla128")
    ref = tm.reference(eff)
    prompt = tokens_for(22, 11)
    engine.model.routing_trace = []
    ours = engine.logits(prompt)
    undo = force_routing(ref, engine.model.routing_trace)
    theirs = reference_logits(ref, prompt)
    undo()
    assert rel_l2(ours, theirs) <= 2e-2
    # decode (absorbed form with the KV cache) picks the reference's token wherever its margin is clear
    out = engine.generate(prompt, max_tokens=8, ignore_eos=True)
    logits = reference_logits(ref, prompt + out.token_ids)[len(prompt) - 1: -1]
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) / logits.abs().max(dim=-1).values > 0.05
    assert clear.sum() >= 2, "too few clear margins to say anything"
    picked = logits.argmax(-1)
    assert all(picked[j].item() == out.token_ids[j] for j in range(8) if clear[j])


def test_fp8_absorbed_products_equal_the_dense_ones():
    """Fp8KvB: q_nope · W_uk and o_c · W_uvᵀ per head, read in FP8, against the dequantized kv_b."""
    from deepseek_fp4_plugin import Fp8Weight
    H, nope, v, C = 3, 128, 128, 144
    w = Fp8Weight.from_float(torch.randn(H * (nope + v), C) * 0.05)
    kvb = Fp8KvB(w, H, nope, v)
    dense = w.dequantize(torch.float32).double().view(H, nope + v, C)
    w_uk, w_uv = dense[:, :nope], dense[:, nope:]                               # [H, nope, C], [H, v, C]
    q = torch.randn(2, 3, H, nope).to(torch.bfloat16)
    o = torch.randn(2, 3, H, C).to(torch.bfloat16)
    want_q = torch.einsum("bthd,hdc->bthc", q.double(), w_uk)
    want_o = torch.einsum("bthc,hvc->bthv", o.double(), w_uv)
    assert rel_l2(kvb.q_to_latent(q), want_q) < 4e-3 and rel_l2(kvb.latent_to_v(o), want_o) < 4e-3
    assert kvb.uk_t.dtype == torch.float8_e4m3fn and kvb.uv.data_ptr() == w.weight.data_ptr() + nope * C
    assert kvb.nbytes == w.nbytes + H * C * nope + kvb.uk_t_scale.numel() * 4
    assert not Fp8KvB.fits(H * 48, C, H, 16, 32)


def test_bf16_attention_quantized_to_fp8_at_load():
    tm = TinyModel.build(seed=31, **CONFIGS["mla128"])
    policy = PrecisionPolicy().with_fp8("attention")
    ckpt, eff = tm.checkpoint("bf16", policy=policy)
    engine = Engine.from_pretrained(ckpt, device="cpu", precision=policy)
    f = engine.store.formats
    assert f["model.layers.0.self_attn.kv_b_proj"] == "fp8" and f["model.layers.0.mlp.down_proj"] == "dense"
    ids = tokens_for(32, 13)
    assert rel_err(engine.logits(ids), reference_logits(tm.reference(eff), ids)) <= 1e-4
    # the effective weights really are FP8: a plain BF16 reference differs
    plain = tm.reference({k: v.to(torch.bfloat16).float() for k, v in tm.weights.items()})
    assert rel_err(engine.logits(ids), reference_logits(plain, ids)) > 1e-3


# ---------------------------------------------------------------------------------------
# the planner


class ShapesOnly(CheckpointSource):
    """Names and formats of a checkpoint without data: what the planner reads."""

    def __init__(self, config: DeepseekV3Config, fmt_of):
        from deepseek_fp4_plugin.loader import linear_shapes, other_tensor_shapes
        self.config = config
        names = set(other_tensor_shapes(config))
        for m in linear_shapes(config):
            fmt = fmt_of(m)
            names.add(m + ".weight")
            if fmt == "nvfp4":
                names |= {m + ".weight_scale", m + ".weight_scale_2"}
            elif fmt == "fp8_block":
                names.add(m + ".weight_scale_inv")
        self._names = names

    def names(self):
        return self._names

    def _raw(self, name):
        raise AssertionError("the planner must not read tensor data")


def r1_fp4_config() -> DeepseekV3Config:
    """DeepSeek-R1's shapes (671B, 61 layers)."""
    return DeepseekV3Config(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                            moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                            n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
                            kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                            qk_nope_head_dim=128,
                            n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
                            max_position_embeddings=163840)


def r1_fp4_source() -> ShapesOnly:
    """nvidia/DeepSeek-R1-FP4's formats: MLPs and experts NVFP4; attention, lm_head, routers BF16."""
    return ShapesOnly(r1_fp4_config(), lambda m: "dense" if (".self_attn." in m or m == "lm_head"
                                                             or m.endswith(".mlp.gate")) else "nvfp4")


def r1_plan(policy=None, budget_gib=16.0, **kw):
    src = r1_fp4_source()
    pol = PrecisionPolicy.parse(policy)
    args = dict(max_batch_size=1, max_seq_len=4096, prefill_chunk=512, host_bytes=1024 * GiB)
    args.update(kw)
    return plan_memory(src, pol, torch.bfloat16, int(budget_gib * GiB), PagingSettings(cpu_cache_size=400),
                       expert_unit_bytes=expert_unit_bytes(src, pol, torch.bfloat16),
                       library_workspace=64 << 20, **args)


def paged_bytes(plan) -> int:
    return sum(plan.layer_unit_bytes[x] for x in plan.paged_layers)


def test_r1_fp4_in_16_gib_runs_attention_in_fp8():
    """nvidia/DeepSeek-R1-FP4's shapes in 16 GiB at batch 1: BF16 attention (≈ 23 GB) keeps 26 of 61
    layers resident; the planner converts it to FP8 (≈ 12 GB), which keeps 49 resident and cuts the
    per-layer bytes paged every token from 13 to 2.5 GiB. (All 61 need ≈ 2 GiB more: the BF16
    embedding and lm_head hold 3.5 GiB of the budget.)"""
    src = r1_fp4_source()
    dense = attention_bytes(src, PrecisionPolicy(), torch.bfloat16)
    fp8 = attention_bytes(src, PrecisionPolicy().with_fp8("attention"), torch.bfloat16)
    assert 22e9 < dense < 24e9 and fp8 < 0.56 * dense            # ≈ 23 GB in BF16, about half in FP8
    bf16 = r1_plan(PrecisionPolicy(auto_fp8_attention=False))
    plan = r1_plan()
    assert "attention" in plan.policy.fp8_groups and "attention" not in bf16.policy.fp8_groups
    assert len(bf16.resident_layers) <= 30 and len(plan.resident_layers) >= 45
    assert paged_bytes(plan) < paged_bytes(bf16) / 4
    assert plan.paged and plan.expert_slots >= 16                # one step's experts + their prefetch
    assert any("attention runs in FP8" in n for n in plan.notes)
    assert "attention runs in FP8" in plan.table()
    assert plan.as_dict()["policy"]["fp8_groups"] == ["attention"]
    # FP8 lm_head too (opt-in) keeps more; NVFP4 attention keeps every layer
    both = r1_plan(PrecisionPolicy(fp8_groups=frozenset({"attention", "lm_head"})))
    assert len(both.resident_layers) > len(plan.resident_layers)
    assert r1_plan("fp4").paged_layers == []


def test_planner_keeps_bf16_when_it_fits_or_is_told_to():
    plan = r1_plan(budget_gib=60)
    assert plan.paged_layers == [] and "attention" not in plan.policy.fp8_groups
    assert "attention" not in r1_plan("bf16", budget_gib=16, max_batch_size=1).policy.fp8_groups


def test_engine_plan_converts_bf16_attention_when_paged(tmp_path):
    """A tiny R1-FP4-like model (NVFP4 MLPs and experts, BF16 attention as large as the rest) in a
    budget where BF16 attention pages: the engine loads attention in FP8, keeps every layer
    resident, and matches a resident engine with that policy."""
    from deepseek_fp4_plugin.convert import convert_checkpoint
    from deepseek_fp4_plugin.tiny import make_tiny
    src = make_tiny(tmp_path / "bf16", seed=3, format="bf16", hidden_size=512, moe_intermediate_size=64,
                    n_routed_experts=16, num_hidden_layers=4, num_attention_heads=16, qk_nope_head_dim=128,
                    v_head_dim=128, kv_lora_rank=256, q_lora_rank=384, n_group=4, topk_group=2,
                    num_experts_per_tok=4)
    model = convert_checkpoint(src, tmp_path / "r1like", progress=False,
                               exclude=["lm_head", "model.layers.*.mlp.gate", "model.layers.*.self_attn.*"])
    kw = dict(device="cpu", dtype="bfloat16", max_batch_size=2, max_seq_len=128, prefill_chunk=32)
    paging = {"cpu_cache_size": 0.05}
    bf16 = Engine.plan(model, memory_limit=0.04, precision=PrecisionPolicy(auto_fp8_attention=False),
                       paging=paging, **kw)
    assert bf16.paged_layers, "the budget must page BF16 attention for this test to say anything"
    eng = Engine.from_pretrained(model, memory_limit=0.04, paging=paging, verbose=False, **kw)
    plan = eng.memory_plan
    assert "attention" in plan.policy.fp8_groups and plan.paged_layers == []
    assert eng.store.formats["model.layers.1.self_attn.o_proj"] == "fp8"
    assert isinstance(eng.store.acquire_layer(1).attn.kv_b, Fp8KvB)   # heads of 128 + 128
    ref = Engine.from_pretrained(model, precision=plan.policy, **kw)
    prompt = list(range(1, 30))
    assert torch.equal(eng.logits(prompt), ref.logits(prompt))
    assert eng.generate(prompt, max_tokens=6, ignore_eos=True).token_ids == \
        ref.generate(prompt, max_tokens=6, ignore_eos=True).token_ids
    # a budget where FP8 attention still pages: the paged layer units carry FP8 weights
    small = Engine.from_pretrained(model, memory_limit=0.035, paging=paging, verbose=False, **kw)
    assert small.memory_plan.paged_layers and "attention" in small.memory_plan.policy.fp8_groups
    assert torch.equal(small.logits(prompt), ref.logits(prompt))


# ---------------------------------------------------------------------------------------
# convert --fp8


def test_convert_writes_fp8_for_chosen_modules(tmp_path):
    from deepseek_fp4_plugin.convert import convert_checkpoint
    from deepseek_fp4_plugin.loader import open_checkpoint
    from deepseek_fp4_plugin.tiny import make_tiny
    src = make_tiny(tmp_path / "bf16", seed=4, format="bf16")
    dst = convert_checkpoint(src, tmp_path / "mixed", fp8=["model.layers.*.self_attn.*"], progress=False)
    ck = open_checkpoint(dst)
    try:
        ck.validate()
        assert ck.linear_format("model.layers.0.self_attn.q_b_proj") == "fp8_block"
        assert ck.linear_format("model.layers.1.mlp.experts.0.up_proj") == "nvfp4"
        assert ck.linear_format("lm_head") == "dense"
        n, k = ck.shape_of("model.layers.0.self_attn.q_b_proj.weight")
        w = ck.get_tensor("model.layers.0.self_attn.q_b_proj.weight")
        s = ck.get_tensor("model.layers.0.self_attn.q_b_proj.weight_scale_inv")
        src_ck = open_checkpoint(src)
        stored = src_ck.get_tensor("model.layers.0.self_attn.q_b_proj.weight")
        want_q, want_s = torch.ops.dsfp4.fp8_block_quantize(stored)
        src_ck.close()
        assert torch.equal(w.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    finally:
        ck.close()
    hf = json.loads((dst / "hf_quant_config.json").read_text())
    assert hf["converter"]["fp8_block_modules"] == ["model.layers.*.self_attn.*"]
    engine = Engine.from_pretrained(dst, device="cpu")
    assert engine.store.formats["model.layers.0.self_attn.q_b_proj"] == "fp8"
    assert engine.store.formats["model.layers.1.mlp.experts.0.up_proj"] == "fp4"
    # an FP8 source's modules are copied bit for bit
    fsrc = make_tiny(tmp_path / "fp8", seed=4, format="fp8_block")
    dst2 = convert_checkpoint(fsrc, tmp_path / "mixed2", fp8=["model.layers.*.self_attn.*"], progress=False)
    a, b = open_checkpoint(fsrc), open_checkpoint(dst2)
    try:
        name = "model.layers.0.self_attn.o_proj.weight"
        assert torch.equal(a.get_tensor(name).view(torch.uint8), b.get_tensor(name).view(torch.uint8))
        assert torch.equal(a.get_tensor(name + "_scale_inv"), b.get_tensor(name + "_scale_inv"))
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="fp8 must be a list"):
        convert_checkpoint(src, tmp_path / "bad", fp8="model.layers.*", progress=False)
