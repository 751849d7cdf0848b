"""config.json validation: every field that changes the math is checked for type, range and
finiteness, and the error names the file and the field."""

import json
import math

import pytest

from deepseek_fp4_plugin.config import DeepseekV3Config, RopeScaling
from deepseek_fp4_plugin.loader import open_checkpoint
from deepseek_fp4_plugin.tiny import make_tiny
from tiny_reference import config_dict

YARN = dict(factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
            mscale_all_dim=1.0)


def test_valid_config_parses():
    cfg = DeepseekV3Config.from_dict(config_dict(rope=YARN, routed_scaling_factor=2))
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 4.0
    assert isinstance(cfg.routed_scaling_factor, float) and cfg.routed_scaling_factor == 2.0


BAD_FIELDS = [
    ("rms_norm_eps", float("nan")), ("rms_norm_eps", float("inf")), ("rms_norm_eps", 0.0),
    ("rms_norm_eps", -1e-6), ("rms_norm_eps", "1e-6"),
    ("routed_scaling_factor", float("nan")), ("routed_scaling_factor", -2.5), ("routed_scaling_factor", 0),
    ("routed_scaling_factor", float("-inf")), ("routed_scaling_factor", True),
    ("hidden_size", 0), ("hidden_size", 7168.0), ("hidden_size", "7168"), ("vocab_size", -1),
    ("num_attention_heads", True), ("kv_lora_rank", 0), ("v_head_dim", 0), ("qk_rope_head_dim", 0),
    ("qk_rope_head_dim", 15), ("n_group", True), ("n_group", 0), ("topk_group", 1.5),
    ("num_experts_per_tok", 0), ("max_position_embeddings", 0), ("first_k_dense_replace", -1),
    ("num_nextn_predict_layers", "one"), ("q_lora_rank", 0), ("q_lora_rank", 32.0),
    ("norm_topk_prob", "false"), ("norm_topk_prob", 0), ("rope_interleave", "yes"), ("attention_bias", 1),
    ("tie_word_embeddings", "no"), ("scoring_func", 1), ("scoring_func", "softmax"),
    ("topk_method", "greedy"), ("hidden_act", "gelu"),
    ("bos_token_id", 256), ("bos_token_id", -1), ("bos_token_id", "0"), ("eos_token_id", [1, 999]),
    ("eos_token_id", 1.0), ("rope_theta", 0), ("rope_theta", -10000.0), ("rope_theta", float("nan")),
    ("rope_theta", float("inf")), ("rope_theta", "10000"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_bad_field_named(field, value):
    d = config_dict(**{field: value})
    with pytest.raises(ValueError, match=rf"^cfg\.json: {field}\b"):
        DeepseekV3Config.from_dict(d, source="cfg.json")


BAD_ROPE = [
    ("factor", 0.0), ("factor", float("nan")), ("factor", -4.0), ("factor", "4"),
    ("beta_fast", 0.0), ("beta_slow", float("inf")), ("mscale", -1.0), ("mscale_all_dim", float("nan")),
    ("original_max_position_embeddings", 0), ("original_max_position_embeddings", 64.5),
]


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("field,value", BAD_ROPE)
def test_bad_yarn_field_named(key, field, value):
    d = config_dict(rope=dict(YARN, **{field: value}))
    if key == "rope_parameters":
        d["rope_parameters"] = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
    with pytest.raises(ValueError, match=rf"cfg\.json: {key}\.{field} must be"):
        DeepseekV3Config.from_dict(d, source="cfg.json")


def test_yarn_theta_must_exceed_one():
    """YaRN divides by log(theta): theta = 1 would be a division by zero, not a model."""
    with pytest.raises(ValueError, match=r"rope_theta must be a finite number > 1"):
        DeepseekV3Config.from_dict(config_dict(rope=YARN, rope_theta=1.0))


@pytest.mark.parametrize("key,value", [("rope_scaling", "yarn"), ("rope_parameters", [1, 2])])
def test_rope_object_must_be_an_object(key, value):
    d = config_dict()
    d[key] = value
    with pytest.raises(ValueError, match=rf"{key} must be an object"):
        DeepseekV3Config.from_dict(d)


def test_programmatic_config_validated():
    """Configs built in code go through the same checks (validate() is what from_dict calls)."""
    cfg = DeepseekV3Config(rms_norm_eps=float("nan"))
    with pytest.raises(ValueError, match="mine: rms_norm_eps must be a finite number > 0, got nan"):
        cfg.validate("mine")
    cfg = DeepseekV3Config(rope=RopeScaling(theta=0.0))
    with pytest.raises(ValueError, match="rope_theta"):
        cfg.validate()
    DeepseekV3Config().validate()   # the defaults are DeepSeek-V3's


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cfg") / "tiny", seed=0, format="bf16")


def _with_config(tmp_path, tiny, text=None, raw=None):
    import shutil

    d = shutil.copytree(tiny, tmp_path / "m")
    if raw is not None:
        (d / "config.json").write_bytes(raw)
    else:
        (d / "config.json").write_text(text)
    return d


@pytest.mark.parametrize("field", ["rms_norm_eps", "routed_scaling_factor"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_literals_refused_at_open(tmp_path, tiny, field, literal):
    """Python's json module reads NaN / Infinity; the loader refuses them, naming the file."""
    d = json.loads((tiny / "config.json").read_text())
    d[field] = "@@"
    m = _with_config(tmp_path, tiny, json.dumps(d).replace('"@@"', literal))
    with pytest.raises(ValueError, match=rf"{m / 'config.json'}: {field} must be a finite number > 0"):
        open_checkpoint(m)


def test_rope_theta_zero_refused(tmp_path, tiny):
    d = json.loads((tiny / "config.json").read_text())
    d["rope_theta"] = 0
    m = _with_config(tmp_path, tiny, json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json: rope_theta must be a finite number > 1, got 0"):
        open_checkpoint(m)


def test_non_utf8_config_names_the_file(tmp_path, tiny):
    raw = (tiny / "config.json").read_bytes().replace(b'"deepseek_v3"', b'"deepseek_v3\xff"')
    m = _with_config(tmp_path, tiny, raw=raw)
    with pytest.raises(ValueError, match=rf"{m / 'config.json'}: not UTF-8 text"):
        open_checkpoint(m)
    with pytest.raises(ValueError, match=rf"{m / 'config.json'}: not UTF-8"):
        DeepseekV3Config.from_file(m)


def test_config_json_not_an_object(tmp_path, tiny):
    m = _with_config(tmp_path, tiny, "[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        open_checkpoint(m)


def test_unreadable_config_names_the_file(tmp_path, tiny):
    m = _with_config(tmp_path, tiny, "{}")
    (m / "config.json").unlink()
    (m / "config.json").mkdir()   # a folder where the file should be
    with pytest.raises((ValueError, FileNotFoundError), match=r"config\.json"):
        open_checkpoint(m)


def test_math_fields_survive_round_trip():
    cfg = DeepseekV3Config.from_dict(config_dict(rope=YARN))
    again = DeepseekV3Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and math.isfinite(again.rope.theta)
