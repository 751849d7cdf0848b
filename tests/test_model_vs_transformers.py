"""The forward against transformers' own DeepseekV3ForCausalLM (float32, eager attention and
experts), both holding the same weights: what each checkpoint form stores, dequantized with the
ModelOpt-layout ops (tiny_reference.py), while our engine goes through the weight store's
conversions, the tiled FP4 layout and fused GEMMs.

CPU float32 path: logits within 1e-4 relative (max |Δ| / max |ref|). CPU bfloat16 path (the
FP4 kernels' code path with the CPU reference ops): within 2e-2 (‖Δ‖ / ‖ref‖).
"""

import zlib

import pytest
import torch

from deepseek_fp4_plugin.engine import Engine
from deepseek_fp4_plugin.weights import PrecisionPolicy
from tiny_reference import TinyModel, all_linear_modules, force_routing

CONFIGS = {
    # q LoRA, interleaved rope, 1 dense + 2 MoE layers, 4 groups keep 2, attention biases
    "base": dict(attention_bias=True),
    # DeepSeek-V3's YaRN: factor 40 over 4096 positions, mscale = mscale_all_dim = 1 (softmax
    # scale × mscale², cos/sin × 1); the ramp spans rope dims 2..6 (floor / ceil bounds)
    "yarn_v3": dict(rope=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                              mscale=1.0, mscale_all_dim=1.0)),
    # YaRN without mscale_all_dim: cos/sin scaled by 0.1·ln(factor) + 1, plain softmax scale
    "yarn_cos_scaled": dict(rope=dict(factor=8.0, original_max_position_embeddings=32, beta_fast=16,
                                      beta_slow=2, mscale=1.0, mscale_all_dim=0.0), rope_theta=50000.0),
    # no q LoRA (direct q_proj), half-split rope, one group, every layer MoE, unnormalised
    # weights, two shared experts, another norm eps
    "direct_q": dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                     first_k_dense_replace=0, norm_topk_prob=False, n_shared_experts=2, rms_norm_eps=1e-5,
                     num_experts_per_tok=3),
    # 32 experts in 8 groups keeping 3, top-6, 2 dense + 1 MoE layers
    "wide_moe": dict(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6,
                     first_k_dense_replace=2),
    # dense only, lm_head tied to the embedding
    "dense": dict(first_k_dense_replace=3, tie_word_embeddings=True),
}

ALL_FP4 = PrecisionPolicy.parse("fp4")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def tokens_for(seed: int, n: int, vocab: int = 256):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_logits(ref, ids):
    return ref(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("form", ["nvfp4_default", "nvfp4_all"])
def test_logits_match_transformers(name, form):
    seed = zlib.crc32(f"{name}-{form}".encode()) % 1000
    tm = TinyModel.build(seed=seed, **CONFIGS[name])
    if form == "nvfp4_default":
        ckpt, eff = tm.checkpoint("nvfp4")
        policy = None
    else:
        ckpt, eff = tm.checkpoint("nvfp4", fp4_modules=all_linear_modules(tm.config), policy=ALL_FP4)
        policy = ALL_FP4
    engine = Engine.from_pretrained(ckpt, device="cpu", precision=policy)
    assert engine.dtype == torch.float32
    fp4 = {m for m, f in engine.store.formats.items() if f == "fp4"}
    assert fp4, "nothing ran in FP4"
    if form == "nvfp4_all":
        assert any(".self_attn." in m for m in fp4)
        assert ("lm_head" in fp4) != tm.config.tie_word_embeddings   # a tied head stays the embedding
    ref = tm.reference(eff)
    ids = tokens_for(seed, 23)
    ours = engine.logits(ids)                                                   # [T, V]
    theirs = reference_logits(ref, ids)
    assert ours.shape == theirs.shape == (23, tm.config.vocab_size)
    assert rel_err(ours[-1], theirs[-1]) <= 1e-4
    assert rel_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("name", ["base", "yarn_v3", "direct_q", "wide_moe"])
def test_greedy_continuation_matches_transformers(name):
    """Greedy tokens through prefill + absorbed decode with the KV cache; the reference scores
    the same sequence in one pass, and must pick the same token wherever its top-1 margin is clear."""
    seed = 100 + list(CONFIGS).index(name)
    tm = TinyModel.build(seed=seed, **CONFIGS[name])
    ckpt, eff = tm.checkpoint("nvfp4")
    engine = Engine.from_pretrained(ckpt, device="cpu")
    ref = tm.reference(eff)
    prompt = tokens_for(seed, 9)
    out = engine.generate(prompt, max_tokens=12, ignore_eos=True)
    assert len(out.token_ids) == 12
    seq = prompt + out.token_ids
    logits = reference_logits(ref, seq)[len(prompt) - 1: -1]   # row j predicts generated token j
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]) / logits.abs().max(dim=-1).values
    clear = margin > 1e-3
    assert clear.sum() >= 8, "too few clear margins to say anything"
    picked = logits.argmax(dim=-1)
    for j in range(12):
        if clear[j]:
            assert picked[j].item() == out.token_ids[j], f"step {j}: reference picks {picked[j].item()}"


@pytest.mark.parametrize("fmt", ["fp8_block", "bf16"])
def test_other_stored_forms_match_transformers(fmt):
    """FP8-block (every module FP8, as stored; test_fp8_model.py has more) and BF16 checkpoints."""
    tm = TinyModel.build(seed=7, **CONFIGS["yarn_v3"])
    ckpt, eff = tm.checkpoint(fmt)
    engine = Engine.from_pretrained(ckpt, device="cpu")
    stored = "fp8" if fmt == "fp8_block" else "dense"
    assert engine.store.formats["model.layers.1.mlp.experts.0.gate_proj"] == stored
    assert engine.store.formats["model.layers.0.self_attn.o_proj"] == stored
    ids = tokens_for(8, 17)
    assert rel_err(engine.logits(ids), reference_logits(tm.reference(eff), ids)) <= 1e-4


def test_bf16_weights_quantized_on_load_match_transformers():
    """precision='fp4' quantizes BF16-stored weights to NVFP4 while loading."""
    tm = TinyModel.build(seed=9)
    ckpt, eff = tm.checkpoint("bf16", policy=ALL_FP4)
    engine = Engine.from_pretrained(ckpt, device="cpu", precision="fp4")
    assert engine.store.formats["model.layers.0.self_attn.kv_b_proj"] == "fp4"
    ids = tokens_for(10, 15)
    assert rel_err(engine.logits(ids), reference_logits(tm.reference(eff), ids)) <= 1e-4


@pytest.mark.parametrize("name", ["base", "wide_moe", "direct_q", "dense"])
def test_bf16_fp4_kernel_path_close_to_transformers(name):
    """dtype=bfloat16 runs the GPU code path (fp4_gemm, fp4_grouped_gemm over stacked experts,
    fused gate_up with per-tile scales, bf16 KV latents) on the CPU reference ops.

    bf16 rounding of activations (about 0.1% per rounding, a dozen per layer) moves logits by
    about 1%, and can flip a near-tied expert choice, which moves a token's output by far more:
    the reference is therefore made to route like us (weights still from its own scores), and
    the routing itself is checked against our float32 path separately.
    """
    tm = TinyModel.build(seed=11, **CONFIGS[name])
    ckpt, eff = tm.checkpoint("nvfp4", fp4_modules=all_linear_modules(tm.config), policy=ALL_FP4)
    engine = Engine.from_pretrained(ckpt, device="cpu", dtype="bfloat16", precision=ALL_FP4)
    layer = engine.store.acquire_layer(tm.config.num_hidden_layers - 1)
    if layer.moe is not None:
        assert type(layer.moe.experts).__name__ == "Fp4RoutedExperts"
    ref = tm.reference(eff)
    ids = tokens_for(12, 19)
    engine.model.routing_trace = []
    ours = engine.logits(ids)
    trace = engine.model.routing_trace
    undo = force_routing(ref, trace)
    theirs = reference_logits(ref, ids)
    undo()
    assert rel_l2(ours[-1], theirs[-1]) <= 2e-2
    assert rel_l2(ours, theirs) <= 2e-2
    if trace:
        exact = Engine.from_pretrained(ckpt, device="cpu", precision=ALL_FP4)
        exact.model.routing_trace = []
        exact.logits(ids)
        same = [(a[1].sort(-1).values == b[1].sort(-1).values).all(-1)
                for a, b in zip(trace, exact.model.routing_trace)]
        assert float(torch.cat(same).float().mean()) >= 0.8


def test_forms_agree_within_quantization_error():
    """One model stored as BF16, FP8 blocks and NVFP4, each run as the default policy says
    (as stored): each form's logits stay within a small multiple of its own weight
    error from the float32 master model. Quantization noise flips near-tied expert choices,
    which is a difference in kind, so the master is made to route as each form does."""
    tm = TinyModel.build(seed=13, **CONFIGS["base"])
    master = tm.reference(dict(tm.weights))
    ids = tokens_for(14, 21)
    errs, weight_errs = {}, {}
    for fmt in ("bf16", "fp8_block", "nvfp4"):
        ckpt, eff = tm.checkpoint(fmt)
        engine = Engine.from_pretrained(ckpt, device="cpu")
        engine.model.routing_trace = []
        ours = engine.logits(ids)
        undo = force_routing(master, engine.model.routing_trace)
        want = reference_logits(master, ids)
        undo()
        errs[fmt] = rel_l2(ours, want)
        weight_errs[fmt] = max(float((eff[n] - w).norm() / w.norm()) for n, w in tm.weights.items()
                               if n.endswith(".weight") and w.dim() == 2)
    for fmt in errs:
        # errors of a dozen matrices add up, hence a small multiple of the worst single one
        assert errs[fmt] <= 4 * weight_errs[fmt], (fmt, errs, weight_errs)
    assert errs["bf16"] < errs["fp8_block"] and errs["bf16"] < errs["nvfp4"]
