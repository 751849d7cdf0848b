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
