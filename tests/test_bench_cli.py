"""`deepseek-fp4 bench` and `deepseek-fp4 tune` on the tiny model, on the CPU."""

import json

import pytest

from deepseek_fp4_plugin import DeepseekInference
from deepseek_fp4_plugin import ceilings as ceil_mod
from deepseek_fp4_plugin.cli import main
from deepseek_fp4_plugin.tiny import make_tiny
from deepseek_fp4_plugin.tuner import load_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_cli") / "tiny"
    make_tiny(d, seed=5)
    return d


@pytest.fixture
def small_ceilings(tmp_path, monkeypatch):
    monkeypatch.setattr(ceil_mod, "HOST_READ_BYTES", 8 << 20)
    monkeypatch.setattr(ceil_mod, "SCRATCH_BYTES", 8 << 20)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DSFP4_DISK_DIR", str(tmp_path))


def test_bench_writes_json_and_report(tiny, tmp_path, capsys, small_ceilings):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--requests",
                "3",
                "--batch",
                "2",
                "--prompt-tokens",
                "16",
                "--decode-tokens",
                "3",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "decode" in table and "verdict" in table and "perf_report.html" in table
    r = json.loads((out / "bench.json").read_text())
    assert r["identity"]["commit"] and "date" in r["identity"]
    assert r["workload"] == {
        "requests": 3,
        "batch": 2,
        "prompt_tokens": 16,
        "decode_tokens": 3,
        "use_cuda_graph": False,
    }
    assert r["results"]["decode_tokens_per_s"] > 0 and r["results"]["prefill_tokens_per_s"] > 0
    steps = r["trace"]["steps"]
    assert [s["stage"] for s in steps].count("prefill") == 2  # two batches: 2 + 1
    assert [s["rows"] for s in steps if s["stage"] == "prefill"] == [32, 16]
    assert r["ceilings"]["host_read_GBps"] > 0 and r["analysis"]["verdict"]
    html = (out / "perf_report.html").read_text()
    assert "Benchmark" in html and html.count("<img") == 7


def test_bench_bad_arguments(tiny, tmp_path, capsys):
    assert (
        main(["bench", "--model", str(tiny), "--out", str(tmp_path), "--device", "cpu", "--requests", "0"])
        == 2
    )
    assert "requests" in capsys.readouterr().err
    assert main(["bench", "--model", str(tmp_path / "nope"), "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err


def test_tune_writes_a_config_apply_config_takes(tiny, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nWhat is a mixture of experts?\n")
    out = tmp_path / "tuned.json"
    assert (
        main(
            [
                "tune",
                "--model",
                str(tiny),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--time-budget",
                "120",
                "--max-tokens",
                "2",
                "--prompts",
                str(prompts),
            ]
        )
        == 0
    )
    assert "tuned throughput" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["workload"]["prompts"] == 2 and len(r["trials"]) >= 1
    cfg = load_config(out)
    model = DeepseekInference(tiny, device="cpu")
    model.apply_config(cfg)
    assert model.engine.max_batch_size == cfg["batch_size"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert (
        main(["tune", "--model", str(tiny), "--out", str(out), "--device", "cpu", "--prompts", str(empty)])
        == 2
    )
    assert "no prompts" in capsys.readouterr().err


def test_bench_pages_on_the_cpu_with_the_cpu_lane(tiny, tmp_path, capsys, small_ceilings):
    """--dtype bfloat16 lets a CPU run page (the budget holds a third of the experts), with the CPU
    expert lane on."""
    from deepseek_fp4_plugin import Engine

    out = tmp_path / "bench"
    plan = Engine.plan(str(tiny), device="cpu", dtype="bfloat16", memory_limit=1.0, max_batch_size=1, max_seq_len=21)
    fixed = sum(b for name, b, _ in plan.rows() if not name.startswith("expert cache"))
    limit = (fixed + plan.total_experts * plan.expert_unit_bytes // 3) / 2 ** 30   # a third of the experts
    args = ["bench", "--model", str(tiny), "--out", str(out), "--device", "cpu", "--dtype", "bfloat16",
            "--memory-limit", str(limit), "--cpu-experts", "1", "--requests", "2", "--prompt-tokens", "16",
            "--decode-tokens", "4"]
    assert main(args) == 0
    r = json.loads((out / "bench.json").read_text())
    assert r["plan"]["paged"] and r["plan"]["cpu_expert_threads"] == 1
    assert r["results"]["decode_tokens_per_s"] > 0
