"""DeepSeek-V3/R1 model configuration: the config.json fields that change the math."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)

# config.json fields that change the math, by kind (validate() checks each)
_INT_MIN = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 0, "moe_intermediate_size": 0,
    "num_hidden_layers": 1, "num_attention_heads": 1, "n_shared_experts": 0, "n_routed_experts": 0,
    "kv_lora_rank": 1, "qk_rope_head_dim": 2, "v_head_dim": 1, "qk_nope_head_dim": 0, "n_group": 1,
    "topk_group": 1, "num_experts_per_tok": 1, "first_k_dense_replace": 0, "max_position_embeddings": 1,
    "num_nextn_predict_layers": 0,
}
_INT_FIELDS = tuple(_INT_MIN)
# fields config.json must state (they size the tensors)
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
_FLOAT_FIELDS = ("routed_scaling_factor", "rms_norm_eps")
_BOOL_FIELDS = ("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings")
_STR_FIELDS = ("scoring_func", "topk_method", "hidden_act")
_ROPE_FLOAT_FIELDS = ("theta", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_json_file(path: Union[str, Path]) -> Dict[str, Any]:
    """A JSON object from ``path``; every failure (unreadable, not UTF-8, not JSON, not an
    object) is a ValueError naming the file (FileNotFoundError when it is missing)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such file") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a configuration file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


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

    def validate(self, source: str = "config", key: str = "rope_scaling") -> None:
        """Type, range and finiteness of the fields the rotary tables use; errors name the
        config.json field (``key`` is rope_scaling or rope_parameters)."""
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"{source}: {msg}")

        def positive(name: str, v: Any, floor: float = 0.0) -> None:
            check(_is_number(v) and math.isfinite(v) and v > floor,
                  f"{name} must be a finite number > {floor:g}, got {v!r}")

        check(isinstance(self.rope_type, str) and self.rope_type in ("default", "yarn"),
              f"{key}.rope_type {self.rope_type!r} is not supported (default or yarn)")
        # YaRN divides by log(theta)
        positive("rope_theta", self.theta, 1.0 if self.rope_type == "yarn" else 0.0)
        if self.rope_type != "yarn":
            return
        positive(f"{key}.factor", self.factor)
        for name in ("beta_fast", "beta_slow"):
            positive(f"{key}.{name}", getattr(self, name))
        for name in ("mscale", "mscale_all_dim"):
            v = getattr(self, name)
            check(_is_number(v) and math.isfinite(v) and v >= 0,
                  f"{key}.{name} must be a finite number >= 0, got {v!r}")
        v = self.original_max_position_embeddings
        check(v is None or (_is_int(v) and v > 0),
              f"{key}.original_max_position_embeddings must be a positive integer or null, got {v!r}")


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
        # the fields that size tensors have no default: a default would be blamed on a tensor shape
        experts = d.get("n_routed_experts")
        required = list(_SIZE_FIELDS)
        if isinstance(experts, int) and experts > 0:
            required += ["moe_intermediate_size", "num_experts_per_tok"]
        if not (isinstance(experts, int) and experts > 0) or d.get("first_k_dense_replace", 0) != 0:
            required.append("intermediate_size")
        for name in required:
            if name not in d:
                raise err(f"{name} is missing" + (" (null for a q_proj without LoRA)" if name == "q_lora_rank"
                                                   else " (it sizes the model's tensors)"))
        cfg = cls()
        # values are taken as JSON gives them; validate() checks type, range and finiteness
        for name in _INT_FIELDS + _FLOAT_FIELDS + _BOOL_FIELDS + _STR_FIELDS + ("q_lora_rank",):
            if name in d and (d[name] is not None or name == "q_lora_rank"):
                setattr(cfg, name, d[name])
        cfg.bos_token_id = d.get("bos_token_id", cfg.bos_token_id)
        cfg.eos_token_id = d.get("eos_token_id", cfg.eos_token_id)
        mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers"))
        cfg.num_nextn_predict_layers = 0 if mtp is None else mtp
        cfg.rope, rope_key = _parse_rope(d, err)
        cfg.validate(source, rope_key)
        for obj, names in ((cfg, _FLOAT_FIELDS), (cfg.rope, _ROPE_FLOAT_FIELDS)):
            for name in names:
                setattr(obj, name, float(getattr(obj, name)))
        return cfg

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "DeepseekV3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        d = read_json_file(path)
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str = "config", rope_key: str = "rope_scaling") -> None:
        """Checks every field that changes the math: type, range, finiteness, and how the
        fields fit together. Errors name ``source`` and the config.json field."""
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"{source}: {msg}")

        def got(v: Any) -> str:
            return f"got {v!r}" + ("" if _is_number(v) or v is None else f" ({type(v).__name__})")

        for name in _INT_FIELDS:
            v, lo = getattr(self, name), _INT_MIN[name]
            check(_is_int(v) and v >= lo, f"{name} must be an integer >= {lo}, {got(v)}")
        v = self.q_lora_rank
        check(v is None or (_is_int(v) and v > 0),
              f"q_lora_rank must be a positive integer or null, {got(v)}")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            check(_is_number(v) and math.isfinite(v) and v > 0,
                  f"{name} must be a finite number > 0, {got(v)}")
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            check(isinstance(v, bool), f"{name} must be true or false, {got(v)}")
        for name in _STR_FIELDS:
            v = getattr(self, name)
            check(isinstance(v, str), f"{name} must be a string, {got(v)}")
        vocab = self.vocab_size
        v = self.bos_token_id
        check(v is None or (_is_int(v) and 0 <= v < vocab), f"bos_token_id must be null or a token id in "
              f"[0, vocab_size = {vocab}), {got(v)}")
        v = self.eos_token_id
        ids = v if isinstance(v, (list, tuple)) else [] if v is None else [v]
        check(all(_is_int(t) and 0 <= t < vocab for t in ids),
              f"eos_token_id must be null, a token id or a list of token ids in "
              f"[0, vocab_size = {vocab}), {got(v)}")
        self.rope.validate(source, rope_key)

        check(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim = {self.qk_rope_head_dim} must be even")
        check(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.first_k_dense_replace > 0 or self.n_routed_experts == 0:
            check(self.intermediate_size > 0,
                  "intermediate_size must be positive (the model has dense layers)")
        if self.n_routed_experts > 0:
            check(self.moe_intermediate_size > 0,
                  "moe_intermediate_size must be positive (the model has experts)")
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


def _parse_rope(d: Dict[str, Any], err) -> "tuple[RopeScaling, str]":
    """Reads rope_theta + rope_scaling (v4 configs) or rope_parameters (v5 configs). Returns
    the RopeScaling (values as given; RopeScaling.validate checks them) and the key used."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    for key, v in (("rope_parameters", params), ("rope_scaling", scaling)):
        if v is not None and not isinstance(v, dict):
            raise err(f"{key} must be an object or null, got {v!r}")
    key, src = ("rope_parameters", params) if params else ("rope_scaling", scaling or {})
    r = RopeScaling()
    r.theta = src.get("rope_theta", d.get("rope_theta", r.theta))
    rtype = src.get("rope_type", src.get("type", "default")) or "default"
    r.rope_type = rtype
    if r.rope_type == "yarn":
        if src.get("factor") is None:
            raise err(f"{key}: yarn rope scaling needs 'factor'")
        r.factor = src["factor"]
        r.original_max_position_embeddings = src.get("original_max_position_embeddings")
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if src.get(name) is not None:
                setattr(r, name, src[name])
    return r, key
