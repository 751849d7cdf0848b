"""Checkpoint loading: config and quantization detection, lazy shard access, bad-input errors."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepseek_fp4_plugin.checkpoint import DENSE, FP8_BLOCK, NVFP4
from deepseek_fp4_plugin.config import DeepseekV3Config
from deepseek_fp4_plugin.loader import (INDEX_FILE, QuantConfig, linear_shapes, open_checkpoint,
                                        other_tensor_shapes, read_quant_config)
from deepseek_fp4_plugin.tiny import make_tiny

EXPERT = "model.layers.1.mlp.experts.3.gate_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: make_tiny(root / fmt, seed=0, format=fmt) for fmt in ("bf16", "fp8_block", "nvfp4")}


@pytest.fixture
def copy(tmp_path):
    def _copy(src):
        return shutil.copytree(src, tmp_path / src.name)
    return _copy


def _index(folder):
    return json.loads((folder / INDEX_FILE).read_text())["weight_map"]


def _rewrite(folder, edit):
    """Applies edit(dict of tensors) to the shard holding each edited tensor, keeping the index true."""
    wm = _index(folder)
    for fname in sorted(set(wm.values())):
        tensors = load_file(str(folder / fname))
        before = set(tensors)
        edit(tensors)
        for gone in before - set(tensors):
            del wm[gone]
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _edit_json(path, edit):
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


# ---- formats ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,method,expert_fmt", [("bf16", "none", DENSE),
                                                   ("fp8_block", "fp8_block", FP8_BLOCK),
                                                   ("nvfp4", "nvfp4", NVFP4)])
def test_format_detection(tiny, fmt, method, expert_fmt):
    with open_checkpoint(tiny[fmt]) as ck:
        assert ck.quant.method == method
        n, k = linear_shapes(ck.config)[EXPERT]
        lt = ck.linear(EXPERT, n, k)
        assert lt.format == expert_fmt
        # routers stay high precision in every format
        assert ck.linear_format("model.layers.1.mlp.gate") == DENSE
        assert ck.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        if fmt == "nvfp4":
            assert lt.tensors["weight"].shape == (n, k // 2) and lt.tensors["weight"].dtype == torch.uint8
            assert lt.tensors["weight_scale"].dtype == torch.float8_e4m3fn
            assert lt.tensors["weight_scale_2"].shape == () and "input_scale" in lt.tensors
            assert ck.quant.is_excluded("lm_head") and ck.linear_format("lm_head") == DENSE
        if fmt == "fp8_block":
            assert ck.quant.weight_block_size == (128, 128)
            assert lt.tensors["weight_scale_inv"].shape == (-(-n // 128), -(-k // 128))


def test_tensors_read_lazily_and_match_the_files(tiny):
    folder = tiny["nvfp4"]
    with open_checkpoint(folder) as ck:
        wm = _index(folder)
        for name in ["model.embed_tokens.weight", EXPERT + ".weight", EXPERT + ".weight_scale",
                     "model.norm.weight"]:
            with safe_open(str(folder / wm[name]), "pt") as f:
                want = f.get_tensor(name)
            got = ck.get_tensor(name)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            assert ck.where(name).endswith(wm[name])
            # the byte range tensor_info reports holds exactly this tensor's data
            info = ck.tensor_info(name)
            with open(info.file, "rb") as fh:
                fh.seek(info.offset)
                raw = fh.read(info.nbytes)
            assert raw == want.contiguous().view(torch.uint8).numpy().tobytes()
            assert info.shape == tuple(want.shape) and info.dtype == want.dtype


def test_single_file_without_index(tiny, tmp_path):
    src = tiny["bf16"]
    dst = tmp_path / "single"
    dst.mkdir()
    tensors = {}
    for fname in sorted(set(_index(src).values())):
        tensors.update(load_file(str(src / fname)))
    save_file(tensors, str(dst / "model.safetensors"))
    shutil.copy(src / "config.json", dst / "config.json")
    with open_checkpoint(dst) as ck:
        assert set(ck.names()) == set(tensors)
        assert torch.equal(ck.get_tensor("model.norm.weight"), tensors["model.norm.weight"])


def test_linear_shapes_match_deepseek_v3_gemm_shapes():
    # N × K of the full model as listed in the design docs (PERFORMANCE.md)
    shapes = linear_shapes(DeepseekV3Config())
    want = {
        "model.layers.5.self_attn.q_a_proj": (1536, 7168),
        "model.layers.5.self_attn.q_b_proj": (24576, 1536),
        "model.layers.5.self_attn.kv_a_proj_with_mqa": (576, 7168),
        "model.layers.5.self_attn.kv_b_proj": (32768, 512),
        "model.layers.5.self_attn.o_proj": (7168, 16384),
        "model.layers.5.mlp.experts.255.gate_proj": (2048, 7168),
        "model.layers.5.mlp.experts.0.down_proj": (7168, 2048),
        "model.layers.0.mlp.gate_proj": (18432, 7168),
        "model.layers.2.mlp.down_proj": (7168, 18432),
        "model.layers.60.mlp.gate": (256, 7168),
        "lm_head": (129280, 7168),
    }
    for m, nk in want.items():
        assert shapes[m] == nk, m
    assert "model.layers.3.mlp.gate_proj" not in shapes and "model.layers.2.mlp.gate" not in shapes
    assert not any(m.startswith("model.layers.61.") for m in shapes)


# ---- config ---------------------------------------------------------------------------------


def test_yarn_from_rope_scaling_and_rope_parameters(tiny, copy):
    with open_checkpoint(tiny["bf16"]) as ck:
        rope = ck.config.rope
    assert rope.rope_type == "yarn" and rope.factor == 4.0 and rope.original_max_position_embeddings == 512
    folder = copy(tiny["bf16"])

    def to_v5(d):
        params = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
        params.pop("type")
        d["rope_parameters"] = params
    _edit_json(folder / "config.json", to_v5)
    assert "rope_scaling" not in (folder / "config.json").read_text()
    with open_checkpoint(folder) as ck:
        assert ck.config.rope == rope


def test_unknown_model_type(tiny, copy):
    folder = copy(tiny["bf16"])
    _edit_json(folder / "config.json", lambda d: d.update(model_type="llama"))
    with pytest.raises(ValueError, match=r"config\.json.*model_type 'llama'"):
        open_checkpoint(folder)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_checkpoint(tmp_path)


# ---- quantization config --------------------------------------------------------------------


def test_unknown_quant_algo(tiny, copy):
    folder = copy(tiny["nvfp4"])
    _edit_json(folder / "hf_quant_config.json", lambda d: d["quantization"].update(quant_algo="INT4_AWQ"))
    with pytest.raises(ValueError, match=r"hf_quant_config\.json.*quant_algo 'INT4_AWQ'"):
        open_checkpoint(folder)


def test_unknown_quant_method(tiny, copy):
    folder = copy(tiny["bf16"])
    _edit_json(folder / "config.json",
               lambda d: d.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    with pytest.raises(ValueError, match=r"config\.json.*quant_method 'gptq'"):
        open_checkpoint(folder)


def test_modelopt_in_config_json_only(tiny, copy):
    # newer exports: no hf_quant_config.json, the declaration lives in config.json ("ignore")
    folder = copy(tiny["nvfp4"])
    (folder / "hf_quant_config.json").unlink()
    q = read_quant_config(folder)
    assert q.method == "nvfp4" and q.exclude == ["lm_head", "model.layers.*.mlp.gate"]
    assert q.source.endswith("config.json")
    with open_checkpoint(folder) as ck:
        assert ck.linear_format(EXPERT) == NVFP4


def test_quant_declarations_disagree(tiny, copy):
    folder = copy(tiny["fp8_block"])
    shutil.copy(tiny["nvfp4"] / "hf_quant_config.json", folder / "hf_quant_config.json")
    with pytest.raises(ValueError,
                       match="hf_quant_config.json declares nvfp4 but .*config.json declares fp8_block"):
        open_checkpoint(folder)


def test_nvfp4_declared_but_nothing_quantized(tiny, copy):
    folder = copy(tiny["bf16"])
    shutil.copy(tiny["nvfp4"] / "hf_quant_config.json", folder / "hf_quant_config.json")
    with pytest.raises(ValueError,
                       match=r"hf_quant_config\.json.*NVFP4 but no linear layer has a weight_scale"):
        open_checkpoint(folder)


def test_quantized_but_nothing_declared(tiny, copy):
    folder = copy(tiny["nvfp4"])
    (folder / "hf_quant_config.json").unlink()
    _edit_json(folder / "config.json", lambda d: d.pop("quantization_config"))
    with pytest.raises(ValueError, match=r"stored quantized \(nvfp4\).*declares no quantization"):
        open_checkpoint(folder)


def test_excluded_module_stored_quantized(tiny, copy):
    folder = copy(tiny["nvfp4"])
    _edit_json(folder / "hf_quant_config.json",
               lambda d: d["quantization"]["exclude_modules"].append("model.layers.1.mlp.experts.*"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.\d+\.\w+_proj' is stored in "
                                         r"nvfp4 .*excludes it.*'model\.layers\.1\.mlp\.experts\.\*'"):
        open_checkpoint(folder)


def test_exclude_patterns():
    q = QuantConfig("nvfp4", ["lm_head", "model.layers.*.mlp.gate", "model.layers.0.self_attn"])
    assert q.is_excluded("lm_head")
    assert q.is_excluded("model.layers.7.mlp.gate")
    assert not q.is_excluded("model.layers.7.mlp.gate_proj")
    assert not q.is_excluded("model.layers.7.mlp.shared_experts.gate_proj")
    assert q.is_excluded("model.layers.0.self_attn.o_proj")        # below an excluded module
    assert not q.is_excluded("model.layers.0.self_attn_x.o_proj")
    assert not q.is_excluded("model.layers.1.self_attn.o_proj")
    assert QuantConfig("nvfp4", ["*self_attn*"]).is_excluded("model.layers.3.self_attn.kv_b_proj")


# ---- bad files ------------------------------------------------------------------------------


def test_missing_shard(tiny, copy):
    folder = copy(tiny["nvfp4"])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(folder)


@pytest.mark.parametrize("keep", [0.5, 20 / 1e9])
def test_truncated_shard(tiny, copy, keep):
    folder = copy(tiny["nvfp4"])
    p = folder / "model-00001-of-00002.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors.*truncated or corrupt"):
        open_checkpoint(folder)


def test_index_names_tensor_absent_from_shard(tiny, copy):
    folder = copy(tiny["bf16"])
    extra = {"model.extra.weight": "model-00001-of-00002.safetensors"}
    _edit_json(folder / INDEX_FILE, lambda d: d["weight_map"].update(extra))
    with pytest.raises(ValueError, match=r"'model\.extra\.weight' in .*model-00001-of-00002\.safetensors"):
        open_checkpoint(folder)


def test_missing_tensor(tiny, copy):
    folder = copy(tiny["bf16"])
    _rewrite(folder, lambda t: t.pop("model.layers.2.mlp.experts.7.down_proj.weight", None))
    with pytest.raises(ValueError,
                       match=r"'model\.layers\.2\.mlp\.experts\.7\.down_proj\.weight' is missing"):
        open_checkpoint(folder)


def test_shape_contradicts_config(tiny, copy):
    folder = copy(tiny["bf16"])
    name = "model.layers.2.self_attn.kv_b_proj.weight"

    def edit(t):
        if name in t:
            t[name] = t[name][:, :32].contiguous()
    _rewrite(folder, edit)
    with pytest.raises(ValueError, match=r"model-0000\d-of-00002\.safetensors: tensor "
                                         r"'model\.layers\.2\.self_attn\.kv_b_proj\.weight' has shape "
                                         r"\(256, 32\), config\.json implies \(256, 64\)"):
        open_checkpoint(folder)


def test_config_contradicts_tensors(tiny, copy):
    folder = copy(tiny["nvfp4"])
    _edit_json(folder / "config.json", lambda d: d.update(moe_intermediate_size=64))
    with pytest.raises(ValueError,
                       match=r"tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' has shape"):
        open_checkpoint(folder)


def test_dtype_contradicts_format(tiny, copy):
    folder = copy(tiny["nvfp4"])
    name = EXPERT + ".weight_scale"

    def edit(t):
        if name in t:
            t[name] = t[name].to(torch.float32)
    _rewrite(folder, edit)
    with pytest.raises(ValueError, match=rf"tensor '{EXPERT}\.weight_scale' has dtype torch\.float32, "
                                         r"expected torch\.float8_e4m3fn"):
        open_checkpoint(folder)


def test_norm_dtype_checked(tiny, copy):
    folder = copy(tiny["bf16"])
    name = "model.layers.0.self_attn.kv_a_layernorm.weight"

    def edit(t):
        if name in t:
            t[name] = t[name].to(torch.int32)
    _rewrite(folder, edit)
    with pytest.raises(ValueError, match=r"kv_a_layernorm\.weight' has dtype torch\.int32"):
        open_checkpoint(folder)


def test_get_tensor_checks_before_reading(tiny):
    with open_checkpoint(tiny["bf16"]) as ck:
        with pytest.raises(ValueError,
                           match=r"model\.norm\.weight' has shape \(256,\), config\.json implies \(128,\)"):
            ck.get_tensor("model.norm.weight", (128,))
        with pytest.raises(KeyError, match="nope"):
            ck.get_tensor("nope")


# ---- MTP ------------------------------------------------------------------------------------


def test_mtp_layer_skipped(tmp_path):
    folder = make_tiny(tmp_path / "mtp", format="bf16", num_nextn_predict_layers=1)
    stored = _index(folder)
    mtp = [n for n in stored if n.startswith("model.layers.4.")]
    assert "model.layers.4.eh_proj.weight" in mtp and "model.layers.4.mlp.experts.0.up_proj.weight" in mtp
    with open_checkpoint(folder) as ck:
        assert ck.config.num_nextn_predict_layers == 1
        names = set(ck.names())
        assert not names & set(mtp)
        assert names == set(stored) - set(mtp)
        implied = {m + ".weight" for m in linear_shapes(ck.config)} | set(other_tensor_shapes(ck.config))
        assert names == implied
        with pytest.raises(KeyError):
            ck.get_tensor("model.layers.4.eh_proj.weight")
