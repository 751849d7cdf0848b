"""DeepSeek-V3/R1 model configuration: the config.json fields that change the math."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)


@dataclass
class RopeScaling:
    """Rotary embedding parameters (``rope_scaling`` / ``rope_parameters`` of config.json)."""

    rope_type: str = "default"        # "default" or "yarn"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: RopeScaling = field(default_factory=RopeScaling)
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 0
    eos_token_id: Union[int, List[int], None] = 1
    num_nextn_predict_layers: int = 0

    # ---- derived -----------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> List[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    # ---- parsing -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config.json") -> "DeepseekV3Config":
        """Builds a config from a config.json dict; errors name ``source`` and the field."""

        def err(msg: str) -> ValueError:
            return ValueError(f"{source}: {msg}")

        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise err(f"unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        cfg = cls()
        ints = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_shared_experts", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim",
                "v_head_dim", "qk_nope_head_dim", "num_experts_per_tok", "first_k_dense_replace",
                "max_position_embeddings"]
        for name in ints:
            if name in d and d[name] is not None:
                v = d[name]
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise err(f"{name} must be a non-negative integer, got {v!r}")
                setattr(cfg, name, v)
        for name in ["n_group", "topk_group"]:
            v = d.get(name)
            if v is not None:
                if not isinstance(v, int) or v < 1:
                    raise err(f"{name} must be a positive integer, got {v!r}")
                setattr(cfg, name, v)
        if "q_lora_rank" in d:
            v = d["q_lora_rank"]
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise err(f"q_lora_rank must be a positive integer or null, got {v!r}")
            cfg.q_lora_rank = v
        for name in ["routed_scaling_factor", "rms_norm_eps"]:
            if d.get(name) is not None:
                setattr(cfg, name, float(d[name]))
        for name in ["norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings"]:
            if d.get(name) is not None:
                setattr(cfg, name, bool(d[name]))
        for name in ["scoring_func", "topk_method", "hidden_act"]:
            if d.get(name) is not None:
                setattr(cfg, name, str(d[name]))
        cfg.bos_token_id = d.get("bos_token_id", cfg.bos_token_id)
        cfg.eos_token_id = d.get("eos_token_id", cfg.eos_token_id)
        cfg.num_nextn_predict_layers = int(d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0)
        cfg.rope = _parse_rope(d, err)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "DeepseekV3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str = "config") -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"{source}: {msg}")

        check(self.hidden_size > 0 and self.vocab_size > 0 and self.num_hidden_layers > 0,
              "hidden_size, vocab_size and num_hidden_layers must be positive")
        check(self.num_attention_heads > 0, "num_attention_heads must be positive")
        check(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim = {self.qk_rope_head_dim} must be even")
        check(self.kv_lora_rank > 0, "kv_lora_rank must be positive")
        check(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.n_routed_experts > 0:
            check(self.scoring_func == "sigmoid",
                  f"scoring_func {self.scoring_func!r} is not supported (DeepSeek-V3 uses 'sigmoid')")
            check(self.topk_method == "noaux_tc",
                  f"topk_method {self.topk_method!r} is not supported (DeepSeek-V3 uses 'noaux_tc')")
            check(self.n_routed_experts % self.n_group == 0,
                  f"n_group = {self.n_group} must divide n_routed_experts = {self.n_routed_experts}")
            check(self.n_routed_experts // self.n_group >= 2, "each expert group needs at least 2 experts")
            check(1 <= self.topk_group <= self.n_group, f"topk_group = {self.topk_group} must be in [1, n_group]")
            check(1 <= self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                  f"num_experts_per_tok = {self.num_experts_per_tok} exceeds the experts of topk_group groups")
        check(self.rope.rope_type in ("default", "yarn"),
              f"rope type {self.rope.rope_type!r} is not supported (default or yarn)")

    def to_dict(self) -> Dict[str, Any]:
        """config.json form (the HF DeepseekV3 field names)."""
        d = asdict(self)
        rope = d.pop("rope")
        d["model_type"] = "deepseek_v3"
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        d["rope_theta"] = rope["theta"]
        if rope["rope_type"] == "yarn":
            d["rope_scaling"] = {
                "type": "yarn", "rope_type": "yarn", "factor": rope["factor"],
                "original_max_position_embeddings": rope["original_max_position_embeddings"],
                "beta_fast": rope["beta_fast"], "beta_slow": rope["beta_slow"],
                "mscale": rope["mscale"], "mscale_all_dim": rope["mscale_all_dim"],
            }
        else:
            d["rope_scaling"] = None
        return d


def _parse_rope(d: Dict[str, Any], err) -> RopeScaling:
    """Reads rope_theta + rope_scaling (v4 configs) or rope_parameters (v5 configs)."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    src = params if isinstance(params, dict) and params else (scaling if isinstance(scaling, dict) else {})
    if not isinstance(src, dict):
        raise err("rope_scaling / rope_parameters must be an object")
    r = RopeScaling()
    theta = src.get("rope_theta", d.get("rope_theta", r.theta))
    r.theta = float(theta)
    rtype = src.get("rope_type", src.get("type", "default")) or "default"
    r.rope_type = str(rtype)
    if r.rope_type == "yarn":
        try:
            r.factor = float(src["factor"])
        except KeyError as e:
            raise err("yarn rope scaling needs 'factor'") from e
        orig = src.get("original_max_position_embeddings")
        r.original_max_position_embeddings = int(orig) if orig is not None else None
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if src.get(name) is not None:
                setattr(r, name, float(src[name]))
        if r.factor <= 0:
            raise err(f"rope scaling factor must be positive, got {r.factor}")
    return r
