"""Tiny random DeepSeek-V3 models in every checkpoint form, and transformers' own
DeepseekV3ForCausalLM loaded with the same weights, for tests.

``TinyModel.build(seed, **config)`` draws float32 weights under checkpoint names; ``checkpoint(fmt)``
stores them as ModelOpt NVFP4, DeepSeek FP8-block or BF16 (a StateDictCheckpoint) and returns
the float32 weights each stored module *means* — computed here with the ModelOpt-layout ops,
not through the weight store — which ``reference(...)`` loads into transformers.

Router correction biases are drawn non-negative: DeepSeek's routing masks the experts of dropped
groups with -inf, and some transformers versions mask them with 0.0; the two choices only differ
when a biased score is negative, which non-negative biases rule out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Set

import torch

import deepseek_fp4_plugin  # noqa: F401
from deepseek_fp4_plugin import ops
from deepseek_fp4_plugin.checkpoint import StateDictCheckpoint
from deepseek_fp4_plugin.config import DeepseekV3Config
from deepseek_fp4_plugin.loader import linear_shapes, other_tensor_shapes
from deepseek_fp4_plugin.precision import module_group
from deepseek_fp4_plugin.weights import PrecisionPolicy

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, n_shared_experts=1, n_routed_experts=16, routed_scaling_factor=2.5,
    kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16,
    n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1, norm_topk_prob=True,
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_interleave=True, bos_token_id=0, eos_token_id=1,
)


def config_dict(**overrides) -> dict:
    """config.json dict of a tiny model; ``rope`` = None or a YaRN dict."""
    d = dict(BASE)
    rope = overrides.pop("rope", None)
    d.update(overrides)
    d["model_type"] = "deepseek_v3"
    d["rope_theta"] = overrides.get("rope_theta", 10000.0)
    if rope is not None:
        d["rope_scaling"] = dict(rope, type="yarn", rope_type="yarn")
    return d


def hf_config(d: dict):
    from transformers import DeepseekV3Config as HFConfig

    keys = {k: v for k, v in d.items() if k not in ("model_type", "rope_scaling", "rope_theta")}
    rope = {"rope_type": "default", "rope_theta": d["rope_theta"]}
    if d.get("rope_scaling"):
        rope = {k: v for k, v in d["rope_scaling"].items() if k != "type"}
        rope["rope_theta"] = d["rope_theta"]
    keys["num_key_value_heads"] = d["num_attention_heads"]
    return HFConfig(**keys, rope_parameters=rope, attn_implementation="eager", experts_implementation="eager",
                    num_mtp_layers=0)


def _fp8_block_quantize(w: torch.Tensor, block: int = 128):
    """float32 [N, K] → (float8_e4m3fn [N, K], scale_inv float32 [ceil(N/b), ceil(K/b)]), as the
    DeepSeek release stores it (scale_inv = block amax / 448)."""
    n, k = w.shape
    rb, cb = -(-n // block), -(-k // block)
    pad = torch.zeros(rb * block, cb * block)
    pad[:n, :k] = w
    blocks = pad.view(rb, block, cb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale_inv = (amax / 448.0).float()
    q = (blocks / scale_inv[:, None, :, None]).view(rb * block, cb * block)[:n, :k]
    return q.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous()


@dataclass
class TinyModel:
    config: DeepseekV3Config
    config_json: dict
    weights: Dict[str, torch.Tensor]      # float32, checkpoint names

    @classmethod
    def build(cls, seed: int = 0, **overrides) -> "TinyModel":
        d = config_dict(**overrides)
        cfg = DeepseekV3Config.from_dict(d)
        g = torch.Generator().manual_seed(seed)
        w: Dict[str, torch.Tensor] = {}
        for name, shape in other_tensor_shapes(cfg).items():
            if name.endswith("e_score_correction_bias"):
                w[name] = torch.rand(shape, generator=g) * 0.05   # non-negative, see module docstring
            elif name == "model.embed_tokens.weight":
                # bf16-representable: the bf16 path keeps the table in bf16, as checkpoints store it
                w[name] = torch.randn(shape, generator=g).to(torch.bfloat16).float()
            else:   # RMSNorm weights
                w[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        for module, (n, k) in linear_shapes(cfg).items():
            std = 1.0 / k ** 0.5
            if module.endswith(".mlp.gate"):
                std *= 2.0   # router logits of order 1: varied expert choices
            if module == "lm_head":
                std *= 4.0   # clear top-1 margins
            w[module + ".weight"] = torch.randn(n, k, generator=g) * std
            if cfg.attention_bias and module.endswith(("q_a_proj", "kv_a_proj_with_mqa", "o_proj")):
                w[module + ".bias"] = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).float()
        return cls(cfg, d, w)

    # ---- stored forms ----
    def checkpoint(self, fmt: str = "nvfp4", fp4_modules: Optional[Iterable[str]] = None,
                   policy: Optional[PrecisionPolicy] = None):
        """Stores the model as ``fmt`` ("nvfp4", "fp8_block", "bf16" or "float32").

        nvfp4: modules in ``fp4_modules`` (default: the policy's FP4 groups, as NVIDIA's export
        quantizes MLPs and experts) are stored as ModelOpt NVFP4, gate/up of experts sharing one
        weight_scale_2 as ModelOpt exports do; the rest stays float32. fp8_block: every linear
        but the router and lm_head in FP8 blocks, as DeepSeek's release.

        Returns (StateDictCheckpoint, effective float32 weights for the reference), where the
        effective weights follow ``policy`` (the default one unless given) for conversions the
        store will make (FP8 → NVFP4, BF16 → NVFP4 or FP8 blocks).
        """
        policy = PrecisionPolicy.parse(policy)
        cfg = self.config
        shapes = linear_shapes(cfg)
        if fp4_modules is None:
            fp4_modules = {m for m in shapes if module_group(m) in policy.fp4_groups}
        fp4_modules = set(fp4_modules)
        tensors: Dict[str, torch.Tensor] = {}
        eff: Dict[str, torch.Tensor] = {}
        for name, t in self.weights.items():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module not in shapes:
                tensors[name] = t.clone()
                eff[name] = t.clone()
                continue
            if fmt == "nvfp4" and module in fp4_modules:
                gs = _shared_global_scale(self.weights, module)
                packed, scale, gs = torch.ops.dsfp4.nvfp4_quantize(t, gs)
                tensors[module + ".weight"] = packed
                tensors[module + ".weight_scale"] = scale
                tensors[module + ".weight_scale_2"] = gs
                tensors[module + ".input_scale"] = torch.tensor(1.0)
                eff[name] = torch.ops.dsfp4.nvfp4_dequantize(packed, scale, gs, torch.float32)
            elif fmt == "fp8_block" and not module.endswith(".mlp.gate") and module != "lm_head":
                q, s = _fp8_block_quantize(t)
                tensors[name] = q
                tensors[module + ".weight_scale_inv"] = s
                if policy.runs_fp4(module, "fp8_block"):
                    packed, scale, gs = torch.ops.dsfp4.fp8_block_to_nvfp4(q, s)
                    eff[name] = torch.ops.dsfp4.nvfp4_dequantize(packed, scale, gs, torch.float32)
                else:
                    eff[name] = ops.fp8_block_dequantize(q, s)
            elif fmt in ("bf16", "fp8_block"):
                tensors[name] = t.to(torch.bfloat16)
                eff[name] = _dense_effective(t.to(torch.bfloat16), module, policy)
            else:
                tensors[name] = t.clone()
                eff[name] = _dense_effective(t, module, policy)
        return StateDictCheckpoint(cfg, tensors), eff

    # ---- the reference ----
    def reference(self, weights: Dict[str, torch.Tensor]):
        """transformers' DeepseekV3ForCausalLM in float32 with ``weights`` (checkpoint names)."""
        from transformers import DeepseekV3ForCausalLM

        model = DeepseekV3ForCausalLM(hf_config(self.config_json)).float().eval()
        sd = hf_state_dict(weights, self.config)
        if self.config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True)
        return model


def _shared_global_scale(weights: Dict[str, torch.Tensor], module: str) -> Optional[torch.Tensor]:
    """gate_proj and up_proj of a routed expert share one global scale (ModelOpt export)."""
    if ".mlp.experts." not in module or module.endswith(".down_proj"):
        return None
    base = module.rsplit(".", 1)[0]
    amax = max(weights[f"{base}.gate_proj.weight"].abs().max(), weights[f"{base}.up_proj.weight"].abs().max())
    return (amax / (6.0 * 448.0)).reshape(()).float()


def _dense_effective(t: torch.Tensor, module: str, policy: PrecisionPolicy) -> torch.Tensor:
    fmt = policy.runtime_format(module, "dense")
    if fmt == "fp4":
        packed, scale, gs = torch.ops.dsfp4.nvfp4_quantize(t.contiguous())
        return torch.ops.dsfp4.nvfp4_dequantize(packed, scale, gs, torch.float32)
    if fmt == "fp8":   # quantized at load with DeepSeek's block formula
        q, s = torch.ops.dsfp4.fp8_block_quantize(t.contiguous())
        return ops.fp8_block_dequantize(q, s)
    return t.float()


def hf_state_dict(weights: Dict[str, torch.Tensor], cfg: DeepseekV3Config) -> Dict[str, torch.Tensor]:
    """Checkpoint names → transformers 5 names: routed experts become stacked
    ``experts.gate_up_proj`` [E, 2I, D] (gate rows first) and ``experts.down_proj`` [E, D, I]."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if ".mlp.experts." not in name:
            out[name] = t.float()
    for layer in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(layer):
            continue
        p = f"model.layers.{layer}.mlp.experts"
        e_range = range(cfg.n_routed_experts)
        out[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([weights[f"{p}.{e}.gate_proj.weight"], weights[f"{p}.{e}.up_proj.weight"]])
             for e in e_range]).float()
        out[f"{p}.down_proj"] = torch.stack([weights[f"{p}.{e}.down_proj.weight"] for e in e_range]).float()
    return out


def force_routing(model, trace):
    """Makes transformers' ``model`` route every MoE layer to the experts in ``trace`` (a list
    of (layer, ids [N, K]) as ``DeepseekV3.routing_trace`` records them), with weights from its
    own scores. Compares numerics where bf16 rounding would flip a near-tied expert choice.
    Returns a function that restores the original routing."""
    forced = {layer: ids.long().cpu() for layer, ids in trace}
    restore = []
    for layer, ids in forced.items():
        router = model.model.layers[layer].mlp.gate
        orig = router.forward

        def forward(h, router=router, orig=orig, ids=ids):
            logits, _, _ = orig(h)
            w = logits.sigmoid().gather(1, ids)
            if router.norm_topk_prob:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return logits, w * router.routed_scaling_factor, ids

        router.forward = forward
        restore.append((router, orig))

    def undo():
        for r, o in restore:
            r.forward = o
    return undo


def all_linear_modules(cfg: DeepseekV3Config, exclude_router: bool = True) -> Set[str]:
    return {m for m in linear_shapes(cfg) if not (exclude_router and m.endswith(".mlp.gate"))}
