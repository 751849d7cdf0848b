"""The deepseek-fp4 command: make-tiny, generate (with and without --model), errors."""

import os
import subprocess
import sys

import pytest

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["make-tiny", str(d), "--seed", "5"]) == 0
    return d


def test_make_tiny_writes_a_loadable_model(tiny):
    assert (tiny / "config.json").is_file() and (tiny / "tokenizer.json").is_file()
    eng = Engine.from_pretrained(tiny, device="cpu")
    assert eng.tokenizer is not None


def test_generate_streams_what_the_engine_generates(tiny, capsys):
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny), "--prompt", "Hello", "--max-tokens", "12",
                 "--device", "cpu", "--temperature", "0.8", "--seed", "3", "--top-k", "30"]) == 0
    out = capsys.readouterr().out
    eng = Engine.from_pretrained(tiny, device="cpu")
    want = eng.generate("Hello", max_tokens=12, temperature=0.8, seed=3, top_k=30)
    assert out == want.text + "\n"


def test_generate_chat(tiny, capsys):
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny), "--prompt", "Hi", "--chat", "--max-tokens", "4",
                 "--device", "cpu", "--stats"]) == 0
    captured = capsys.readouterr()
    want = Engine.from_pretrained(tiny, device="cpu").generate("Hi", chat=True, max_tokens=4)
    assert captured.out == want.text + "\n"
    assert "tok/s" in captured.err


@pytest.mark.parametrize("args,word", [
    (["--top-p", "0"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--device", "tpu"], "device"),
])
def test_generate_bad_arguments(tiny, capsys, args, word):
    assert main(["generate", "--model", str(tiny), "--prompt", "x", *args]) == 2
    assert word in capsys.readouterr().err


def test_generate_missing_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err


def test_console_script_without_model_uses_builtin_tiny(tmp_path):
    """The README command on a fresh machine: no --model, the tiny model is built on first use."""
    env = dict(os.environ, DSFP4_CACHE=str(tmp_path / "cache"), PYTHONIOENCODING="utf-8")
    cmd = [sys.executable, "-m", "deepseek_fp4_plugin.cli", "generate", "--prompt", "Hello",
           "--max-tokens", "6", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "cache" / "tiny-v1" / "config.json").is_file()
    assert "built-in tiny" in r.stderr.decode()
    eng = Engine.from_pretrained(tmp_path / "cache" / "tiny-v1", device="cpu")
    want = eng.generate("Hello", max_tokens=6)
    assert r.stdout == (want.text + "\n").encode()


def test_generate_reports_non_finite_logits(tiny, tmp_path, capsys):
    """A model that produces NaN: the command says so and fails, rather than printing token 0s."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(tiny, tmp_path / "nan")
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shard = d / wm["model.norm.weight"]
    t = load_file(str(shard))
    t["model.norm.weight"] = torch.full_like(t["model.norm.weight"], float("nan"))
    save_file(t, str(shard), metadata={"format": "pt"})
    capsys.readouterr()
    args = ["generate", "--model", str(d), "--prompt", "Hello", "--max-tokens", "5", "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "generate: error: non-finite logits" in err


def test_errors_are_one_line(tiny, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_bytes(b"{\xff}")
    assert main(["generate", "--model", str(tmp_path / "bad"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'bad' / 'config.json'}: not UTF-8" in err


# ---- first use: version, the engine's options, progress, imports ------------------------------


def test_version(capsys):
    from deepseek_fp4_plugin import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert f"deepseek-fp4 {__version__}" in capsys.readouterr().out


def test_generate_takes_the_engines_memory_and_paging_options(tiny, capsys):
    """--memory-limit with the paging knobs pages the tiny model; the text equals the engine's,
    and the plan goes to stderr (stdout holds only the text)."""
    opts = ["--device", "cpu", "--dtype", "bfloat16", "--memory-limit", "0.02", "--max-batch-size", "2",
            "--max-seq-len", "128", "--prefill-chunk", "32", "--cpu-cache-size", "0.01",
            "--prefetch-layers", "0",
            "--max-gpu-layers", "3", "--expert-threshold", "0", "--miss-mode", "copy"]
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny), "--prompt", "Hello", "--max-tokens", "6", *opts]) == 0
    captured = capsys.readouterr()
    eng = Engine.from_pretrained(tiny, device="cpu", dtype="bfloat16", memory_limit=0.02, max_batch_size=2,
                                 max_seq_len=128, prefill_chunk=32, verbose=False,
                                 paging={"cpu_cache_size": 0.01, "prefetch_layers": 0, "max_gpu_layers": 3})
    assert eng.memory_plan.paged and eng.memory_plan.paged_layers
    assert captured.out == eng.generate("Hello", max_tokens=6).text + "\n"
    assert "GPU memory plan" in captured.err


def test_generate_shows_progress_while_loading(tiny, capsys):
    capsys.readouterr()
    args = ["generate", "--model", str(tiny), "--prompt", "Hi", "--max-tokens", "1", "--device", "cpu"]
    assert main(args) == 0
    assert "loading" in capsys.readouterr().err
    assert main(args + ["--no-progress"]) == 0
    assert "loading" not in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1e300", "inf", "nan", "-1"])
def test_memory_limit_out_of_range_is_one_line(tiny, capsys, value):
    assert main(["generate", "--model", str(tiny), "--prompt", "x", "--device", "cpu",
                 f"--memory-limit={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "memory_limit" in err


def test_budget_error_numbers_differ_and_name_existing_options(tiny, capsys):
    """A budget just below the minimum: the two sizes printed differ, and every option the
    advice names is an option of `deepseek-fp4 generate`."""
    import re

    from deepseek_fp4_plugin.cli import build_parser

    assert main(["generate", "--model", str(tiny), "--prompt", "x", "--device", "cpu", "--dtype", "bfloat16",
                 "--memory-limit", "0.015", "--max-seq-len", "128", "--max-batch-size", "2",
                 "--prefill-chunk", "32"]) == 2
    err = capsys.readouterr().err
    m = re.search(r"budget ([0-9.]+ [MG]iB) is too small: the minimum working set needs ([0-9.]+ [MG]iB)",
                  err)
    assert m and m.group(1) != m.group(2), err
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    flags = {s for a in sub._actions for s in a.option_strings}
    advice = err.split(" or lower ")[-1]
    named = re.findall(r"[a-z]+(?:_[a-z]+)+", advice) + ["memory_limit"]
    assert named and all("--" + n.replace("_", "-") in flags for n in named), (named, err)


def test_modules_import_downward():
    """The converter and the tiny model do not import the CLI (parsers live in the CLI)."""
    code = ("import sys, deepseek_fp4_plugin.convert, deepseek_fp4_plugin.tiny; "
            "assert 'deepseek_fp4_plugin.cli' not in sys.modules, 'cli imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import deepseek_fp4_plugin.convert as convert_mod
    import deepseek_fp4_plugin.tiny as tiny_mod

    for mod in (convert_mod, tiny_mod):
        assert "argparse" not in open(mod.__file__).read()


def test_convert_and_make_tiny_through_the_cli(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "t"), "--format", "bf16", "--seed", "3"]) == 0
    assert main(["convert", str(tmp_path / "t"), str(tmp_path / "c"), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert Engine.from_pretrained(tmp_path / "c", device="cpu").generate("Hi", max_tokens=2).token_ids
