"""Converter: BF16 / FP8 block / NVFP4 → NVFP4 (ModelOpt layout), bit-exact with the ops, resumable."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_fp4_plugin import convert as convert_mod
from deepseek_fp4_plugin.cli import main as cli_main
from deepseek_fp4_plugin import ops
from deepseek_fp4_plugin.checkpoint import NVFP4
from deepseek_fp4_plugin.convert import DEFAULT_EXCLUDE, MANIFEST_FILE, convert_checkpoint
from deepseek_fp4_plugin.loader import (INDEX_FILE, exclude_match, linear_shapes, open_checkpoint,
                                        other_tensor_shapes, shared_input_groups)
from deepseek_fp4_plugin.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {fmt: make_tiny(root / fmt, seed=1, format=fmt) for fmt in ("bf16", "fp8_block", "nvfp4")}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two layers (one dense, one MoE), three shards: quick to convert several times."""
    root = tmp_path_factory.mktemp("small")
    return make_tiny(root / "bf16", seed=2, format="bf16", num_shards=3, num_hidden_layers=3,
                     num_nextn_predict_layers=1)


def _all_tensors(folder):
    wm = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    out = {}
    for fname in sorted(set(wm.values())):
        t = load_file(str(folder / fname))
        assert {k for k, v in wm.items() if v == fname} == set(t)
        out.update(t)
    return out


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _assert_same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(_bits(a), _bits(b)), what


def _expected_nvfp4(src, quantize, share=True):
    """What the converter must write for every quantized module, computed with the ops directly:
    fused pairs share the larger of the two global scales the op picks on its own."""
    with open_checkpoint(src) as ck:
        shapes = linear_shapes(ck.config)
        modules = [m for m in shapes if exclude_match(m, DEFAULT_EXCLUDE) is None]
        own_gs = {m: quantize(ck, m, None)[2] for m in modules}
        gs = dict(own_gs)
        if share:
            for g in shared_input_groups(ck.config):
                shared = torch.stack([own_gs[m] for m in g]).max()
                gs.update({m: shared for m in g})
        return {m: quantize(ck, m, gs[m] if gs[m] is not own_gs[m] else None) for m in modules}, own_gs


def _q_dense(ck, m, gs):
    return ops.nvfp4_quantize(ck.get_tensor(m + ".weight"), gs)


def _q_fp8(ck, m, gs):
    w, scale_inv = ck.get_tensor(m + ".weight"), ck.get_tensor(m + ".weight_scale_inv")
    return ops.fp8_block_to_nvfp4(w, scale_inv, 128, 128, gs)


@pytest.mark.parametrize("fmt,quantize", [("bf16", _q_dense), ("fp8_block", _q_fp8)])
def test_bit_identical_to_ops(tiny, tmp_path, fmt, quantize):
    src = tiny[fmt]
    dst = convert_checkpoint(src, tmp_path / "out", progress=False)
    out = _all_tensors(dst)
    expected, own_gs = _expected_nvfp4(src, quantize)
    for m, (packed, scale, gs) in expected.items():
        _assert_same(out[m + ".weight"], packed, m)
        _assert_same(out[m + ".weight_scale"], scale, m)
        _assert_same(out[m + ".weight_scale_2"], gs.reshape(()), m)
        _assert_same(out[m + ".input_scale"], torch.tensor(1.0), m)
    # the pairs really share a scale, and it is not always the one the op would pick alone
    pairs = shared_input_groups(open_checkpoint(src).config)
    assert all(torch.equal(out[a + ".weight_scale_2"], out[b + ".weight_scale_2"]) for a, b in pairs)
    assert any(not torch.equal(own_gs[a], own_gs[b]) for a, b in pairs)

    src_t = _all_tensors(src)
    with open_checkpoint(src) as ck:
        cfg = ck.config
    for name in other_tensor_shapes(cfg):
        _assert_same(out[name], src_t[name], name)
    for m in ["lm_head"] + [m for m in linear_shapes(cfg) if m.endswith(".mlp.gate")]:
        _assert_same(out[m + ".weight"], src_t[m + ".weight"], m)
        assert m + ".weight_scale" not in out
    suffixes = ("weight", "weight_scale", "weight_scale_2", "input_scale")
    want_names = set(other_tensor_shapes(cfg)) | {"lm_head.weight"} | \
        {f"{m}.weight" for m in linear_shapes(cfg) if m.endswith(".mlp.gate")} | \
        {f"{m}.{s}" for m in expected for s in suffixes}
    assert set(out) == want_names


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_sources(small, tmp_path, dtype):
    import shutil

    src = shutil.copytree(small, tmp_path / "src")
    for f in sorted(p for p in src.iterdir() if p.suffix == ".safetensors"):
        t = load_file(str(f))
        save_file({k: v.to(dtype) if v.dtype == torch.bfloat16 else v for k, v in t.items()}, str(f))
    dst = convert_checkpoint(src, tmp_path / "out", progress=False)
    out = _all_tensors(dst)
    expected, _ = _expected_nvfp4(src, _q_dense)
    for m, (packed, scale, gs) in expected.items():
        _assert_same(out[m + ".weight"], packed, m)
        _assert_same(out[m + ".weight_scale"], scale, m)
        _assert_same(out[m + ".weight_scale_2"], gs.reshape(()), m)
    assert out["model.norm.weight"].dtype == dtype and out["lm_head.weight"].dtype == dtype


def test_converted_checkpoint_loads(tiny, tmp_path):
    dst = convert_checkpoint(tiny["fp8_block"], tmp_path / "out", progress=False)
    hf = json.loads((dst / "hf_quant_config.json").read_text())
    assert hf["producer"]["name"] == "modelopt"
    assert hf["quantization"] == {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                  "exclude_modules": list(DEFAULT_EXCLUDE)}
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["quant_algo"], qc["group_size"], qc["ignore"]) == \
        ("modelopt", "NVFP4", 16, list(DEFAULT_EXCLUDE))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (tiny["fp8_block"] / f).read_bytes()
    assert not [p for p in dst.iterdir() if p.name.endswith(".partial")]
    with open_checkpoint(dst) as ck:
        assert ck.quant.method == "nvfp4" and ck.quant.exclude == list(DEFAULT_EXCLUDE)
        for m, (n, k) in linear_shapes(ck.config).items():
            want = NVFP4 if exclude_match(m, DEFAULT_EXCLUDE) is None else "dense"
            assert ck.linear(m, n, k).format == want
    # the config.json declaration alone is enough too (newer ModelOpt exports)
    (dst / "hf_quant_config.json").unlink()
    with open_checkpoint(dst) as ck:
        assert ck.quant.method == "nvfp4"


def test_nvfp4_source_copied(tiny, tmp_path):
    dst = convert_checkpoint(tiny["nvfp4"], tmp_path / "out", progress=False)
    src_t, out = _all_tensors(tiny["nvfp4"]), _all_tensors(dst)
    assert set(src_t) == set(out)
    for name in src_t:
        _assert_same(out[name], src_t[name], name)


def test_custom_exclude_fp8_dequantized(tiny, tmp_path):
    src = tiny["fp8_block"]
    dst = convert_checkpoint(src, tmp_path / "out", exclude=["*.self_attn.o_proj"], progress=False)
    out, src_t = _all_tensors(dst), _all_tensors(src)
    m = "model.layers.2.self_attn.o_proj"
    want = ops.fp8_block_dequantize(src_t[m + ".weight"], src_t[m + ".weight_scale_inv"]).to(torch.bfloat16)
    _assert_same(out[m + ".weight"], want, m)
    assert m + ".weight_scale_inv" not in out and m + ".weight_scale" not in out
    # the router is quantized now that the exclude list does not name it
    assert out["model.layers.1.mlp.gate.weight"].dtype == torch.uint8
    assert json.loads((dst / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"] == \
        ["*.self_attn.o_proj"]
    open_checkpoint(dst).close()


def test_exclude_contradicting_nvfp4_source(tiny, tmp_path):
    with pytest.raises(ValueError,
                       match=r"'model\.layers\.0\.self_attn\.o_proj' is stored in NVFP4 but exclude"):
        convert_checkpoint(tiny["nvfp4"], tmp_path / "out", exclude=["*o_proj"], progress=False)
    assert not (tmp_path / "out").exists()


def test_unshared_scales(tiny, tmp_path):
    dst = convert_checkpoint(tiny["bf16"], tmp_path / "out", progress=False, share_scales=False,
                             input_scale=None)
    out = _all_tensors(dst)
    expected, _ = _expected_nvfp4(tiny["bf16"], _q_dense, share=False)
    for m, (packed, scale, gs) in expected.items():
        _assert_same(out[m + ".weight"], packed, m)
        _assert_same(out[m + ".weight_scale_2"], gs, m)
        assert m + ".input_scale" not in out


def test_mtp_layer_dropped(small, tmp_path):
    dst = convert_checkpoint(small, tmp_path / "out", progress=False)
    assert not [n for n in _all_tensors(dst) if n.startswith("model.layers.3.")]
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 0


# ---- atomic and resumable -------------------------------------------------------------------


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != MANIFEST_FILE}


def test_interrupted_then_resumed(small, tmp_path, monkeypatch):
    reference = _snapshot(convert_checkpoint(small, tmp_path / "ref", progress=False))
    dst = tmp_path / "out"
    real_save = convert_mod._save_shard
    calls = []

    def crash_after_first(tensors, path):
        if calls:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(path.name)
        real_save(tensors, path)

    monkeypatch.setattr(convert_mod, "_save_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(small, dst, progress=False)
    monkeypatch.setattr(convert_mod, "_save_shard", real_save)

    # one finished shard and the manifest; no index, no config, no temporary files
    first = dst / calls[0]
    assert sorted(p.name for p in dst.iterdir()) == sorted([MANIFEST_FILE, calls[0]])
    assert list(json.loads((dst / MANIFEST_FILE).read_text())["done"]) == [calls[0]]
    with pytest.raises(FileNotFoundError):
        open_checkpoint(dst)

    # a temporary file a killed process left behind
    (dst / ".model-00002-of-00003.safetensors.999-deadbeef.partial").write_bytes(b"half a shard")
    stat = first.stat()
    written = []
    monkeypatch.setattr(convert_mod, "_save_shard", lambda t, p: (written.append(p.name), real_save(t, p)))
    convert_checkpoint(small, dst, progress=False)
    assert calls[0] not in written and written          # the finished shard was kept, the rest redone
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert _snapshot(dst) == reference
    assert not [p for p in dst.iterdir() if p.name.endswith(".partial")]
    open_checkpoint(dst).close()


def test_damaged_finished_shard_redone(small, tmp_path):
    reference = _snapshot(convert_checkpoint(small, tmp_path / "ref", progress=False))
    dst = convert_checkpoint(small, tmp_path / "out", progress=False)
    victim = dst / min(n for n in reference if n.endswith(".safetensors"))
    victim.write_bytes(victim.read_bytes()[:100])
    convert_checkpoint(small, dst, progress=False)
    assert _snapshot(dst) == reference


def test_resume_with_other_options_refused(small, tmp_path):
    dst = convert_checkpoint(small, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="another source or with other options"):
        convert_checkpoint(small, dst, exclude=["lm_head"], progress=False)


def test_destination_not_empty(small, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(small, dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]


def test_bad_source_writes_nothing(small, tmp_path):
    import shutil

    src = shutil.copytree(small, tmp_path / "src")
    os.unlink(src / "model-00003-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00003-of-00003.safetensors"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_command_line(small, tmp_path, capsys):
    assert cli_main(["convert", str(small), str(tmp_path / "out"), "--exclude", "lm_head"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "convert" in captured.err     # the progress bar
    with open_checkpoint(tmp_path / "out") as ck:
        assert ck.quant.exclude == ["lm_head"]
        assert ck.linear_format("model.layers.1.mlp.gate") == NVFP4


# ---- bad options, OS failures, damaged output -------------------------------------------------


def _leftovers(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("kw,word", [
    (dict(input_scale=float("nan")), "input_scale"),
    (dict(input_scale=float("inf")), "input_scale"),
    (dict(input_scale=-1.0), "input_scale"),
    (dict(input_scale=0.0), "input_scale"),
    (dict(input_scale=True), "input_scale"),
    (dict(input_scale="1.0"), "input_scale"),
    (dict(share_scales="yes"), "share_scales"),
    (dict(device="tpu"), "device"),
    (dict(device=3), "device"),
    (dict(exclude="lm_head"), "exclude"),
])
def test_bad_options_write_nothing(small, tmp_path, kw, word):
    with pytest.raises(ValueError, match=word):
        convert_checkpoint(small, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda(small, tmp_path, capsys):
    with pytest.raises(ValueError, match="no CUDA device"):
        convert_checkpoint(small, tmp_path / "out", progress=False, device="cuda")
    assert cli_main(["convert", str(small), str(tmp_path / "out"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_command_line_input_scale(small, tmp_path, capsys, value):
    assert cli_main(["convert", str(small), str(tmp_path / "out"), f"--input-scale={value}"]) == 2
    assert "input_scale must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_destination_under_a_file(small, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    dst = tmp_path / "afile" / "out"
    with pytest.raises(convert_mod.ConvertError, match=rf"{dst}: cannot create the destination folder "
                                                       rf"\(Not a directory"):
        convert_checkpoint(small, dst, progress=False)
    assert cli_main(["convert", str(small), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"convert: error: {dst}: cannot create" in err


def test_read_only_destination(small, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert cli_main(["convert", str(small), str(ro / "a" / "b"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{ro / 'a'}" in err and "Permission denied" in err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_permission_denied_named(small, tmp_path, capsys, monkeypatch):
    """What a read-only parent gives a non-root user, simulated so that it runs as root too."""
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if self == tmp_path / "ro" / "a":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    dst = tmp_path / "ro" / "a" / "b"
    assert cli_main(["convert", str(small), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"convert: error: {dst}: cannot create the destination folder (Permission denied: {dst.parent})" in err
    assert list((tmp_path / "ro").iterdir()) == []


def _failing_save(after, exc):
    """save_file that writes ``after`` shards, then writes half a file and raises ``exc``."""
    real = convert_mod.save_file
    count = []

    def save(tensors, path, metadata=None):
        if len(count) >= after:
            with open(path, "wb") as f:
                f.write(b"half")
            raise exc(path)
        count.append(path)
        real(tensors, path, metadata=metadata)
    return save


DISK_FULL = [
    lambda tmp: OSError(28, "No space left on device", tmp),
    lambda tmp: convert_mod.SafetensorError(f"Error while serializing: I/O error: No space left on device "
                                            f"(os error 28) at path \"{tmp}\""),
]


@pytest.mark.parametrize("exc", DISK_FULL)
def test_disk_full_on_first_shard_leaves_nothing(small, tmp_path, monkeypatch, exc):
    dst = tmp_path / "new" / "out"
    monkeypatch.setattr(convert_mod, "save_file", _failing_save(0, exc))
    with pytest.raises(convert_mod.ConvertError,
                       match=rf"^{dst / 'model-00001-of-00003.safetensors'}: cannot write \(.*No space left"):
        convert_checkpoint(small, dst, progress=False)
    assert _leftovers(tmp_path) == []   # the folders this run created are gone too


@pytest.mark.parametrize("exc", DISK_FULL)
def test_disk_full_later_keeps_finished_shards_for_resume(small, tmp_path, monkeypatch, exc):
    reference = _snapshot(convert_checkpoint(small, tmp_path / "ref", progress=False))
    dst = tmp_path / "out"
    monkeypatch.setattr(convert_mod, "save_file", _failing_save(1, exc))
    with pytest.raises(convert_mod.ConvertError, match=r"No space left on device.*1 finished shard\(s\) kept "
                                                       r".*run the same command again to resume"):
        convert_checkpoint(small, dst, progress=False)
    assert not [p for p in dst.iterdir() if p.name.endswith(".partial")]
    monkeypatch.undo()
    convert_checkpoint(small, dst, progress=False)
    assert _snapshot(dst) == reference


def test_existing_destination_kept_on_failure(small, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    monkeypatch.setattr(convert_mod, "save_file", _failing_save(0, DISK_FULL[0]))
    with pytest.raises(convert_mod.ConvertError):
        convert_checkpoint(small, dst, progress=False)
    assert dst.is_dir() and list(dst.iterdir()) == []


def test_finished_shard_damaged_in_place_is_redone(small, tmp_path):
    """Same size, one flipped byte in the tensor data: the checksum catches it."""
    import hashlib

    reference = _snapshot(convert_checkpoint(small, tmp_path / "ref", progress=False))
    dst = convert_checkpoint(small, tmp_path / "out", progress=False)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    for name, done in manifest["done"].items():
        assert done["sha256"] == hashlib.sha256((dst / name).read_bytes()).hexdigest()
    victim = dst / sorted(manifest["done"])[1]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x40
    victim.write_bytes(bytes(data))
    assert _snapshot(dst) != reference
    convert_checkpoint(small, dst, progress=False)
    assert _snapshot(dst) == reference


def test_manifest_without_checksums_redone(small, tmp_path, monkeypatch):
    """A manifest of the earlier format (no sha256) is not trusted: its shards are redone."""
    dst = convert_checkpoint(small, tmp_path / "out", progress=False)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    for done in manifest["done"].values():
        del done["sha256"]
    (dst / MANIFEST_FILE).write_text(json.dumps(manifest))
    written = []
    real = convert_mod._save_shard
    monkeypatch.setattr(convert_mod, "_save_shard", lambda t, p: (written.append(p.name), real(t, p)))
    convert_checkpoint(small, dst, progress=False)
    assert sorted(written) == sorted(manifest["done"])


def test_unreadable_manifest_named(small, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / MANIFEST_FILE).write_bytes(b"{\xff\xfe}")
    with pytest.raises(ValueError, match=rf"{dst / MANIFEST_FILE}: not UTF-8.*remove {dst}"):
        convert_checkpoint(small, dst, progress=False)


@pytest.mark.parametrize("which", ["first", "last"])
def test_corrupt_source_shard(tiny, tmp_path, which):
    """A corrupt scale in the first shard converted: nothing is left behind; in the last one:
    the finished shards stay and the message says how to resume."""
    import shutil

    src = shutil.copytree(tiny["nvfp4"], tmp_path / "src")
    wm = json.loads((src / INDEX_FILE).read_text())["weight_map"]
    shard = (min if which == "first" else max)(set(wm.values()))
    name = next(n for n in sorted(wm) if wm[n] == shard and n.endswith(".weight_scale_2"))
    t = load_file(str(src / shard))
    t[name] = torch.tensor(float("nan"))
    save_file(t, str(src / shard), metadata={"format": "pt"})
    dst = tmp_path / "dst" / "out"
    with pytest.raises(ValueError, match=rf"{src / shard}: tensor '{name}' = nan") as info:
        convert_checkpoint(src, dst, progress=False)
    if which == "first":
        assert not (tmp_path / "dst").exists()
    else:
        assert "finished shard(s) kept" in str(info.value)
        assert json.loads((dst / MANIFEST_FILE).read_text())["done"]


# ---- conversions that would leave an unusable folder ------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8_block", "bf16"])
def test_exclusion_that_leaves_nothing_quantized_is_refused(tiny, tmp_path, capsys, fmt):
    with pytest.raises(ValueError, match=r"exclude pattern.*'\*'.*every linear layer.*nothing to quantize"):
        convert_checkpoint(tiny[fmt], tmp_path / "out", exclude=["*"], progress=False)
    assert not (tmp_path / "out").exists()
    args = ["convert", str(tiny[fmt]), str(tmp_path / "out"), "--exclude", "*", "--no-progress"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to quantize" in err
    assert not (tmp_path / "out").exists()


_KILL_AFTER_FIRST_SHARD = """
import os, sys
from pathlib import Path
from deepseek_fp4_plugin import convert
from deepseek_fp4_plugin.convert import MANIFEST_FILE, convert_checkpoint

real_replace = os.replace

def replace(src, dst):
    # killed between renaming the first shard into place and renaming the manifest that records it
    if Path(dst).name == MANIFEST_FILE and any(Path(dst).parent.glob("*.safetensors")):
        os._exit(9)
    real_replace(src, dst)

os.replace = replace
convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


def test_killed_after_the_first_shard_resumes(small, tmp_path):
    import subprocess
    import sys

    reference = _snapshot(convert_checkpoint(small, tmp_path / "ref", progress=False))
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_SHARD, str(small), str(dst)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr
    assert list(dst.glob("*.safetensors"))                   # a shard renamed into place, not recorded
    convert_checkpoint(small, dst, progress=False)            # resumes
    assert _snapshot(dst) == reference
    assert not [p for p in dst.iterdir() if p.name.endswith(".partial")]
