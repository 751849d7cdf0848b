"""The README's Python snippets run as written, on the built-in tiny model, on the CPU.

A block is skipped only when its first line says what it needs (``# needs: ...``): a GPU
or a real checkpoint. The Run section's ``deepseek-fp4 make-tiny ./tiny`` is done first, in
a scratch folder that is the current directory while the blocks run.
"""

import re
from pathlib import Path

import pytest
import torch

from deepseek_fp4_plugin.tiny import make_tiny

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    text = README.read_text(encoding="utf-8")
    return [m.group(1) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def _needs(block):
    first = block.lstrip().splitlines()[0]
    return first[len("# needs:") :].strip() if first.startswith("# needs:") else None


def test_readme_has_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert sum(_needs(b) is None for b in blocks) >= 3  # most of them run here


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    make_tiny(d / "tiny")  # deepseek-fp4 make-tiny ./tiny
    return d


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index, workdir, monkeypatch, capsys):
    block = python_blocks()[index]
    needs = _needs(block)
    if needs is not None and ("GPU" in needs or "CUDA" in needs) and torch.cuda.is_available():
        needs = None if "checkpoint" not in needs else needs
    if needs is not None:
        pytest.skip(f"needs {needs}")
    monkeypatch.chdir(workdir)
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every block prints what it shows


def _section(title):
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_install_is_one_documented_command_that_ci_runs():
    """The seed documents say `pip install -r requirements.txt`: the README says what to run
    instead, and it is the command CI runs."""
    install = _section("Install")
    cmd = re.search(r"```bash\n(.*?)\n```", install, re.S).group(1).strip()
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert cmd == ci[ci.index("# README: install") + 1].strip()
    if not (README.parent / "requirements.txt").exists():
        assert "requirements.txt" in install and "pyproject.toml" in install
