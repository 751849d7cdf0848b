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
