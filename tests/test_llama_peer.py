"""The llama.cpp peer of the paging benchmark: the GGUF writer (layout llama.cpp's deepseek2 loader
expects, finite scales, weight spread), the llama-bench runner (its flags, the per-MoE-layer
arithmetic, errors), and, where a llama-bench build exists (benchmarks/peers/build_llama_cpp.sh
cpu), the tiny model end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
if (ROOT / ".deps" / "llama.cpp" / "gguf-py").is_dir():  # the copy vendored with the llama.cpp built here
    sys.path.insert(0, str(ROOT / ".deps" / "llama.cpp" / "gguf-py"))
gguf = pytest.importorskip("gguf")
import llama_cpp
import make_gguf

T = gguf.GGMLQuantizationType
S = make_gguf.TINY
CPU_BIN = Path(os.environ.get("LLAMA_CPP_BIN", ROOT / ".deps" / "llama-cpu" / "bin"))


def _kv(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


@pytest.mark.parametrize("expert_type,qtype", [("q4_0", T.Q4_0), ("q4_k", T.Q4_K), ("nvfp4", T.NVFP4)])
def test_tiny_gguf_layout_and_values(tmp_path, expert_type, qtype):
    out = tmp_path / "m.gguf"
    info = make_gguf.write_gguf(out, 2, expert_type, "q8_0", S, seed=5, log=lambda *_: None)
    assert info["bytes"] == out.stat().st_size and not (tmp_path / "m.gguf.tmp").exists()
    r = gguf.GGUFReader(str(out))
    assert _kv(r, "general.architecture") == "deepseek2"
    expect = {"block_count": 2, "embedding_length": S.hidden, "expert_count": S.experts,
              "expert_used_count": S.top_k, "expert_group_count": S.groups,
              "expert_group_used_count": S.top_groups, "expert_shared_count": 1,
              "leading_dense_block_count": 0, "expert_gating_func": 2,
              "attention.head_count": S.heads, "attention.head_count_kv": 1,
              "attention.q_lora_rank": S.q_lora, "attention.kv_lora_rank": S.kv_lora,
              "attention.key_length": S.kv_lora + S.qk_rope, "attention.value_length": S.kv_lora,
              "attention.key_length_mla": S.qk_nope + S.qk_rope, "attention.value_length_mla": S.v_head,
              "rope.dimension_count": S.qk_rope, "expert_feed_forward_length": S.expert_ff,
              "vocab_size": S.vocab, "rope.scaling.original_context_length": 4096}
    for key, value in expect.items():
        assert _kv(r, "deepseek2." + key) == value, key
    assert _kv(r, "tokenizer.ggml.model") == "none"
    assert _kv(r, "deepseek2.expert_weights_scale") == pytest.approx(2.5)
    assert _kv(r, "deepseek2.rope.scaling.factor") == pytest.approx(40.0)
    assert _kv(r, "deepseek2.rope.scaling.yarn_log_multiplier") == pytest.approx(0.1)
    assert _kv(r, "deepseek2.rope.scaling.type") == "yarn"

    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 1 + 18 * 2 + 2
    # ggml order (ne0 first), as llama.cpp's deepseek2 loader creates them
    ne = {"token_embd.weight": [S.hidden, S.vocab], "output.weight": [S.hidden, S.vocab],
          "blk.1.attn_q_b.weight": [S.q_lora, S.heads * (S.qk_nope + S.qk_rope)],
          "blk.1.attn_kv_a_mqa.weight": [S.hidden, S.kv_lora + S.qk_rope],
          "blk.1.attn_k_b.weight": [S.qk_nope, S.kv_lora, S.heads],
          "blk.1.attn_v_b.weight": [S.kv_lora, S.v_head, S.heads],
          "blk.1.attn_output.weight": [S.heads * S.v_head, S.hidden],
          "blk.1.ffn_gate_inp.weight": [S.hidden, S.experts], "blk.1.exp_probs_b.bias": [S.experts],
          "blk.1.ffn_gate_exps.weight": [S.hidden, S.expert_ff, S.experts],
          "blk.1.ffn_up_exps.weight": [S.hidden, S.expert_ff, S.experts],
          "blk.1.ffn_down_exps.weight": [S.expert_ff, S.hidden, S.experts],
          "blk.1.ffn_down_shexp.weight": [S.expert_ff, S.hidden]}
    for name, shape in ne.items():
        assert [int(x) for x in tensors[name].shape] == shape, name
    for name, t in tensors.items():
        if "_exps." in name:
            assert t.tensor_type == qtype, name
        elif "norm" in name or "gate_inp" in name or "exp_probs_b" in name:
            assert t.tensor_type == T.F32, name
        else:
            assert t.tensor_type == T.Q8_0, name
        y = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(y).all(), name
        if "norm" in name:
            assert np.all(y == 1.0), name
        elif "exp_probs_b" not in name:
            assert 0.015 < float(y.std()) < 0.025, (name, float(y.std()))
            assert abs(float(y.mean())) < 0.002, name
    # experts are not one block repeated: two experts of a layer differ
    up = gguf.quants.dequantize(tensors["blk.0.ffn_up_exps.weight"].data, qtype)
    assert not np.array_equal(up[0], up[1])


def test_v3_plan_sizes():
    plan = make_gguf.tensor_plan(make_gguf.V3, 1, T.Q4_0, T.Q8_0)
    q_sizes = gguf.GGML_QUANT_SIZES
    size = {n: int(np.prod(s)) // q_sizes[q][0] * q_sizes[q][1] for n, s, q in plan}
    experts = sum(v for n, v in size.items() if "_exps." in n)
    assert experts == 3 * 256 * 2048 * 7168 // 32 * 18  # 6.34 GB of Q4_0 per layer
    assert size["token_embd.weight"] == 129280 * 7168 // 32 * 34


def test_writer_rejects_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="layers"):
        make_gguf.write_gguf(tmp_path / "a.gguf", 0, shape=S)
    with pytest.raises(ValueError, match="expert-type"):
        make_gguf.write_gguf(tmp_path / "a.gguf", 1, "q2_k", shape=S)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        make_gguf.write_gguf(tmp_path / "missing_dir" / "a.gguf", 1, shape=S)
    monkeypatch.setattr(make_gguf.shutil, "disk_usage", lambda p: SimpleNamespace(free=1 << 20))
    with pytest.raises(OSError, match="needs"):
        make_gguf.write_gguf(tmp_path / "a.gguf", 1, shape=S)
    assert list(tmp_path.iterdir()) == []


def test_writer_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = make_gguf.Filler.bytes_for

    def failing(self, qtype, n):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError("disk full (injected)")
        return real(self, qtype, n)

    monkeypatch.setattr(make_gguf.Filler, "bytes_for", failing)
    with pytest.raises(OSError, match="injected"):
        make_gguf.write_gguf(tmp_path / "a.gguf", 1, shape=S)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# the runner, against a stand-in llama-bench that records its arguments


def _row(repack, n_prompt, n_gen, ts):
    return {"repack": repack, "n_prompt": n_prompt, "n_gen": n_gen, "avg_ts": ts, "stddev_ts": 0.1,
            "samples_ts": [ts, ts]}


# llama-bench -o json rows (the fields the runner reads), two repack settings
ROWS = [_row(True, 512, 0, 400.0), _row(True, 0, 32, 25.0),
        _row(False, 512, 0, 800.0), _row(False, 0, 32, 20.0)]


def _stand_in(tmp_path, rows, rc=0):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "rows.json").write_text(json.dumps([{**r, "build_commit": "abc", "backends": "CUDA"} for r in rows]))
    exe = d / "llama-bench"
    exe.write_text(f'#!/bin/sh\necho "$@" > "{d}/args"\necho "$LD_LIBRARY_PATH" > "{d}/ldpath"\n'
                   f'cat "{d}/rows.json"\necho "load failed" >&2\nexit {rc}\n')
    exe.chmod(0o755)
    return d


def test_runner_flags_and_per_layer_figures(tmp_path):
    d = _stand_in(tmp_path, ROWS)
    model = tmp_path / "m.gguf"
    make_gguf.write_gguf(model, 1, "q4_0", "q8_0", S, log=lambda *_: None)
    res = llama_cpp.run_llama_bench(d, model, layers=4, threads=7, prompts=(512,), gen=32, reps=2)
    args = (d / "args").read_text().split()
    for flag, value in [("-ngl", "99"), ("-ot", "exps=CPU"), ("-t", "7"), ("-p", "512"), ("-n", "32"),
                        ("-r", "2"), ("-o", "json"), ("-lm", "none"), ("-ub", "512"), ("--repack", "1,0")]:
        assert args[args.index(flag) + 1] == value, flag
    assert (d / "ldpath").read_text().split(os.pathsep)[0] == str(d)
    assert res["commit"] == "abc" and res["threads"] == [7]
    assert res["quant_types"]["experts"] == "Q4_0" and res["quant_types"]["attention"] == "Q8_0"
    # decode: one token's step over 4 layers; prefill: the prompt's time over 4 layers
    assert res["phases"]["decode"]["moe_layer_ms"] == pytest.approx(1000 / 25.0 / 4)
    assert res["phases"]["decode"]["repack"] == 1
    assert res["phases"]["prefill_512"]["moe_layer_ms"] == pytest.approx(1000 * 512 / 800.0 / 4)
    assert res["phases"]["prefill_512"]["repack"] == 0
    assert {c["repack"] for c in res["configs"]} == {0, 1}
    assert len(res["raw"]) == 4


def test_runner_errors_are_clear(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="no llama-bench"):
        llama_cpp.run_llama_bench(tmp_path / "nowhere", model, 1)
    d = _stand_in(tmp_path, ROWS, rc=1)
    with pytest.raises(FileNotFoundError, match="no model"):
        llama_cpp.run_llama_bench(d, tmp_path / "absent.gguf", 1)
    with pytest.raises(RuntimeError, match="exit 1.*\n.*load failed"):
        llama_cpp.run_llama_bench(d, model, 1)
    rc = llama_cpp.main(["--bin", str(tmp_path / "nowhere"), "--gguf", str(model), "--layers", "1"])
    assert rc == 1


# ---------------------------------------------------------------------------------------
# the real llama-bench (CPU build), where one was built

needs_build = pytest.mark.skipif(
    not (CPU_BIN / "llama-bench").is_file(),
    reason=f"no llama-bench in {CPU_BIN} (benchmarks/peers/build_llama_cpp.sh cpu)")


@needs_build
@pytest.mark.parametrize("expert_type", ["q4_0", "nvfp4"])
def test_llama_cpp_runs_the_tiny_model(tmp_path, expert_type):
    model = tmp_path / "tiny.gguf"
    make_gguf.write_gguf(model, 2, expert_type, "q8_0", S, log=lambda *_: None)
    check = subprocess.run([str(CPU_BIN / "check_logits"), str(model), "48", "3", "2"], check=False,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.strip().endswith("ok"), check.stdout + check.stderr
    res = llama_cpp.run_llama_bench(CPU_BIN, model, layers=2, threads=2, prompts=(32, 64), gen=4, reps=1,
                                    repack=(1,), timeout=600)
    assert set(res["phases"]) == {"decode", "prefill_32", "prefill_64"}
    for name, ph in res["phases"].items():
        assert np.isfinite(ph["tok_s"]) and ph["tok_s"] > 0, name
        n = 1 if name == "decode" else int(name.split("_")[1])
        assert ph["moe_layer_ms"] == pytest.approx(1000 * n / ph["tok_s"] / 2, rel=1e-3)
    assert res["quant_types"]["experts"] == expert_type.upper()
    source = (ROOT / ".deps" / "llama.cpp" / "SOURCE").read_text().split()
    assert res["commit"] == source[source.index("llama.cpp") + 1]
