"""What a new user and a hostile model folder hit: every store's counters, inputs the engine
must refuse with one clear line, failed setters that must leave everything as it was,
chat templates that must not run forever, model folders that must not crash or hang the
process. Each test failed before its fix."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from deepseek_fp4_plugin import DeepseekInference, Engine
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.resident import ResidentWeightStore
from deepseek_fp4_plugin.tiny import make_tiny

SMALL = dict(device="cpu", max_seq_len=128, max_batch_size=2, prefill_chunk=32, verbose=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("bad_input") / "tiny", seed=2)


@pytest.fixture(scope="module")
def engine(tiny):
    return Engine.from_pretrained(tiny, device="cpu")


def fresh_copy(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "model")


# ---- every store answers the same counters ----------------------------------------------------


def _shape(x):
    """Key structure of a counters dict (values replaced by their kind)."""
    if isinstance(x, dict):
        return {k: _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_shape(v) for v in x]
    return "number"


def test_every_store_answers_the_same_counters(tiny):
    resident = Engine.from_pretrained(tiny, memory_limit=1, dtype="bfloat16", **SMALL)
    paged = Engine.from_pretrained(
        tiny, memory_limit=0.02, dtype="bfloat16", paging={"cpu_cache_size": 0.01}, **SMALL
    )
    assert isinstance(resident.store, ResidentWeightStore) and isinstance(paged.store, PagedWeightStore)
    resident.generate([1, 2, 3], max_tokens=2)
    c = resident.store.counters()
    p = paged.store.counters()
    assert set(c) == set(p) and set(c["experts"]) == set(p["experts"]) and set(c["files"]) == set(p["files"])
    assert len(c["per_layer"]) == len(p["per_layer"]) and set(c["per_layer"][0]) == set(p["per_layer"][0])
    # nothing pages: every count is zero, no rate is measured
    assert all(v == 0 for v in c["experts"].values()) and all(v == 0 for v in c["files"].values())
    assert c["h2d_bytes"] == c["ssd_bytes"] == c["wasted_bytes"] == c["zero_copy_bytes"] == 0
    assert c["expert_hit_rate"] is None and c["prefetch_accuracy"] is None and c["layers"] == {}
    resident.store.reset_counters()
    assert _shape(resident.store.counters()) == _shape(c)


def test_float32_paging_names_the_dtype_not_the_format(tiny):
    """An NVFP4 model that must page, in the CPU's default float32: the error says dtype."""
    import re

    with pytest.raises(ValueError) as small:  # the smallest budget float32 takes
        Engine.from_pretrained(tiny, memory_limit=0.005, **SMALL)
    least = float(re.search(r"at least ([0-9.]+) GiB", str(small.value)).group(1))
    with pytest.raises(ValueError, match=r"dtype='bfloat16'") as e:  # it pages: experts do not all fit
        Engine.from_pretrained(tiny, memory_limit=least, **SMALL)
    assert "convert" not in str(e.value) and "NVFP4 safetensors" not in str(e.value)


# ---- a failed setter leaves everything as it was ------------------------------------------------


@pytest.fixture(scope="module")
def facade(tiny):
    return DeepseekInference(tiny, device="cpu", max_seq_len=128, max_batch_size=2, verbose=False)


def _state(model):
    return (
        json.dumps(model.settings, sort_keys=True),
        json.dumps(model.pending_settings(), sort_keys=True),
        dict(model._paging),
        model.engine.max_batch_size,
        model.engine.use_cuda_graph,
        torch.backends.cuda.matmul.allow_tf32,
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.set_memory_config(expert_threshold=1.0),
        lambda m: m.set_memory_config(prefetch_layers=2, expert_threshold=1.0),
        lambda m: m.apply_config({"gpu_memory_fraction": 0}),
        lambda m: m.apply_config(
            {"enable_tf32": not torch.backends.cuda.matmul.allow_tf32, "gpu_memory_fraction": 0}
        ),
        lambda m: m.apply_config({"prefetch_layers": 3, "use_cuda_graph": "yes"}),
        lambda m: m.apply_config({"prefetch_layers": 3, "expert_threshold": 1.0}),
        lambda m: m.set_memory_strategy({"cpu_cache_size": 4, "max_experts": 0}),
        lambda m: m.set_compute_streams({"prefetch": False, "compute": "no"}),
        lambda m: m.optimize_for_single_task("yes"),
        lambda m: m.optimize_for_batch(approximate=1),
    ],
    ids=[
        "threshold",
        "threshold-with-good",
        "fraction",
        "tf32-with-bad",
        "graph-bool",
        "threshold-config",
        "strategy",
        "streams",
        "preset-yes",
        "preset-1",
    ],
)
def test_failed_setter_changes_nothing(facade, call):
    facade.set_memory_config(prefetch_layers=1)  # something recorded before
    before = _state(facade)
    engine = facade.engine
    with pytest.raises(ValueError):
        call(facade)
    assert _state(facade) == before and facade.engine is engine


def test_preset_approximate_must_be_a_bool(facade):
    with pytest.raises(ValueError, match="approximate"):
        facade.optimize_for_long_sequence(approximate="no")
    assert facade.settings["config"].get("expert_threshold", 0.0) == 0.0


# ---- prompts and token ids: one clear ValueError naming the argument ------------------------------


@pytest.mark.parametrize(
    "prompt,chat,match",
    [
        ("", False, r"prompt is empty"),
        ("", True, r"prompt is empty"),
        (["ok", ""], False, r"prompts\[1\] is empty"),
        ([[]], False, r"prompts\[0\] is empty"),
        ([True, 2], False, r"prompt\[0\] must be an integer token id, got True \(bool\)"),
        ([3, 2.0], False, r"prompt\[1\] must be an integer token id, got 2.0 \(float\)"),
        ("a\ud800b", False, r"prompt: not valid Unicode.*index 1"),
        (["fine", "x\udcffy"], False, r"prompts\[1\]: not valid Unicode.*index 1"),
        ([{"role": 5, "content": "x"}], True, r"messages\[0\]\['role'\] must be a string, got 5"),
        ([{"role": "user", "content": 7}], True, r"messages\[0\]\['content'\] must be a string, got 7"),
        ([{"role": "user", "content": "\ud800"}], True, r"messages\[0\]\['content'\]: not valid Unicode"),
        ([{"role": "user"}], True, r"messages\[0\] needs 'role' and 'content'"),
    ],
)
def test_bad_prompts_are_one_clear_error(engine, prompt, chat, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompt, chat=chat, max_tokens=2)
    assert engine.generate([1, 2, 3], max_tokens=2).token_ids  # still usable


@pytest.mark.parametrize("bad", [-1, 512, 10**6])
def test_prefill_refuses_ids_outside_the_vocabulary(engine, bad):
    assert engine.config.vocab_size == 512
    with pytest.raises(ValueError, match=rf"tokens: token id {bad} is outside the vocabulary \[0, 512\)"):
        engine.prefill(torch.tensor([[5, bad, 7]]), [3])
    with pytest.raises(ValueError, match="tokens must be"):
        engine.prefill(torch.tensor([[5.0, 6.0]]), [2])
    assert engine.prefill(torch.tensor([[5, 6, 7]]), [3]).shape == (1, 512)


def test_stop_string_with_a_lone_surrogate(engine):
    with pytest.raises(ValueError, match=r"stop\[1\]: not valid Unicode"):
        engine.generate("hi", stop=["ok", "\udcff"], max_tokens=2)


def test_non_utf8_command_line_prompt_is_one_line(tiny):
    """Bytes that are not UTF-8 on the command line (Python hands them over as lone surrogates)."""
    cmd = [
        sys.executable,
        "-m",
        "deepseek_fp4_plugin.cli",
        "generate",
        "--model",
        str(tiny),
        "--device",
        "cpu",
        "--max-tokens",
        "2",
        "--no-progress",
        "--prompt",
    ]
    r = subprocess.run(
        [os.fsencode(a) for a in cmd] + [b"caf\xe9"],
        capture_output=True,
        timeout=300,
        env=dict(os.environ, LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8"),
    )
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and "prompt: not valid Unicode" in err


# ---- chat templates: bounded in time and size, sandbox escapes named ---------------------------


def _with_template(tiny, tmp_path, template):
    from deepseek_fp4_plugin.tokenizer import Tokenizer

    d = fresh_copy(tiny, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d, Tokenizer(d)


NESTED = (
    "{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% for c in r %}"
    "{% endfor %}{% endfor %}{% endfor %}"
)
HUGE = "{% for a in range(100000) %}{% for b in range(100000) %}0123456789abcdef{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    "template,match",
    [
        (NESTED, r"took longer than 0.5 s"),
        (HUGE, r"output exceeds"),
        ("{{ 'x' * 10000000000 }}", r"too large"),
        ("{{ 'x' | center(10000000000) }}", r"too large"),
        ("{{ 'x'.ljust(10000000000) }}", r"too large"),
        ("{{ '%10000000000s' % 'x' }}", r"too large"),
        ("{{ 2 ** 1000000000 }}", r"too large"),
        (
            "{% set s = 'x' * 4000000 %}{% set s = s ~ s ~ s ~ s ~ s %}"
            "{% set s = s ~ s ~ s ~ s ~ s %}{{ s }}",
            r"too large",
        ),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", r"unsafe"),
        ("{{ messages.__class__.__name__ }}", r"unsafe"),
        ("{{ messages.append(1) }}", r"unsafe"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", r"recursion"),
        ("{{ messages[0]['content'] + 5 }}", r"TypeError"),
    ],
)
def test_chat_template_is_bounded_and_named(tiny, tmp_path, monkeypatch, template, match):
    import time

    from deepseek_fp4_plugin import tokenizer as tokmod

    monkeypatch.setattr(tokmod, "TEMPLATE_TIME_LIMIT", 0.5 if template == NESTED else 60)
    d, tok = _with_template(tiny, tmp_path, template)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=match) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 30
    assert "tokenizer_config.json" in str(e.value) and "chat template" in str(e.value)


def test_engine_stays_usable_after_a_hostile_template(tiny, tmp_path, monkeypatch):
    from deepseek_fp4_plugin import tokenizer as tokmod

    monkeypatch.setattr(tokmod, "TEMPLATE_TIME_LIMIT", 0.5)
    d, _ = _with_template(tiny, tmp_path, NESTED)
    eng = Engine.from_pretrained(d, device="cpu")
    with pytest.raises(ValueError, match="took longer"):
        eng.generate("hi", chat=True, max_tokens=2)
    assert eng.generate("hi", max_tokens=2).token_ids


def test_chat_template_file_is_named(tiny, tmp_path, monkeypatch):
    from deepseek_fp4_plugin import tokenizer as tokmod
    from deepseek_fp4_plugin.tokenizer import Tokenizer

    monkeypatch.setattr(tokmod, "TEMPLATE_TIME_LIMIT", 0.5)
    d = fresh_copy(tiny, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(NESTED)
    with pytest.raises(ValueError, match=r"chat_template\.jinja: chat template.*took longer"):
        Tokenizer(d).apply_chat_template("hi")


# ---- hostile model folders: one clear line naming the file, never a crash or a hang ---------------


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _run_limited(code, timeout=60):
    """Runs ``code`` in a fresh interpreter with 8 GiB of address space: a config that makes
    the loader build something huge fails there instead of taking this machine's memory."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


@pytest.mark.parametrize(
    "field,value,match",
    [
        (
            "num_hidden_layers",
            10**9,
            r"num_hidden_layers = 1000000000 but .*model\.safetensors\.index\.json holds "
            r"the tensors of 4 layers",
        ),
        (
            "n_routed_experts",
            10**12,
            r"n_routed_experts = 1000000000000 but .*model\.safetensors\.index\.json holds "
            r"16 experts per layer",
        ),
    ],
)
def test_config_sizes_are_checked_against_the_index_first(tiny, tmp_path, field, value, match):
    d = fresh_copy(tiny, tmp_path)
    _edit_config(d, **{field: value})
    code = (
        "from deepseek_fp4_plugin import Engine\n"
        "try:\n"
        f"    Engine.from_pretrained({str(d)!r}, device='cpu')\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    r = _run_limited(code)
    assert r.returncode == 0 and "ValueError:" in r.stdout, r.stderr[-2000:]
    import re

    assert re.search(match, r.stdout) and "config.json" in r.stdout, r.stdout


def test_deeply_nested_config_names_the_file(tiny, tmp_path):
    d = fresh_copy(tiny, tmp_path)
    (d / "config.json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(ValueError, match=r"config\.json: nested too deeply"):
        Engine.from_pretrained(d, device="cpu")


@pytest.mark.parametrize(
    "field",
    [
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "kv_lora_rank",
        "n_routed_experts",
        "moe_intermediate_size",
        "q_lora_rank",
    ],
)
def test_config_without_a_size_field_says_so(tiny, tmp_path, field):
    d = fresh_copy(tiny, tmp_path)
    _edit_config(d, **{field: None})
    with pytest.raises(ValueError, match=rf"config\.json: {field} is missing"):
        Engine.from_pretrained(d, device="cpu")


def test_shard_that_is_not_a_regular_file(tiny, tmp_path):
    d = fresh_copy(tiny, tmp_path)
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=rf"{shard.name}.* is not a regular file") as e:
        Engine.from_pretrained(d, device="cpu")
    assert "missing" not in str(e.value)


def test_unreadable_shard_says_permission_denied(tiny, tmp_path):
    d = fresh_copy(tiny, tmp_path)
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.chmod(0)
    prefix = []
    if os.geteuid() == 0:  # root reads anything: drop the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    code = (
        "from deepseek_fp4_plugin import Engine\n"
        "try:\n"
        f"    Engine.from_pretrained({str(d)!r}, device='cpu')\n"
        "except (ValueError, OSError) as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    r = subprocess.run(prefix + [sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shard.name in r.stdout and "ermission denied" in r.stdout and "No such file" not in r.stdout, (
        r.stdout
    )


# ---- weights of a loaded engine do not depend on the files ----------------------------------------

_TRUNCATE_AFTER_LOAD = """
import os, sys
from pathlib import Path
from deepseek_fp4_plugin import Engine
d, dtype = Path(sys.argv[1]), sys.argv[2]
kw = dict(device="cpu", dtype=dtype, max_seq_len=128, max_batch_size=2, prefill_chunk=32, verbose=False)
if len(sys.argv) > 3:   # paged: the layers' weights as well as the experts
    kw.update(memory_limit=float(sys.argv[3]), paging={"cpu_cache_size": 0.01, "prefetch_layers": 0})
eng = Engine.from_pretrained(d, **kw)
before = eng.generate([1, 2, 3, 4], max_tokens=6, ignore_eos=True).token_ids
for shard in d.glob("*.safetensors"):
    os.truncate(shard, 0)
try:
    after = eng.generate([1, 2, 3, 4], max_tokens=6, ignore_eos=True).token_ids
    print("same" if after == before else f"different {before} {after}")
except (ValueError, RuntimeError) as e:
    print("error:", e)
"""


@pytest.mark.parametrize(
    "fmt,dtype", [("nvfp4", "float32"), ("nvfp4", "bfloat16"), ("fp8_block", "bfloat16")]
)
def test_resident_weights_survive_truncated_files(tiny, tmp_path, fmt, dtype):
    """A resident engine keeps no pointer into the files: truncating every shard after loading
    changes nothing (it was a SIGBUS in moe_route; FP8 blocks run as stored)."""
    d = fresh_copy(tiny, tmp_path) if fmt == "nvfp4" else make_tiny(tmp_path / "model", seed=2, format=fmt)
    r = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_AFTER_LOAD, str(d), dtype],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip() == "same"


def test_paged_engine_survives_truncated_files(tiny, tmp_path):
    """A paged engine's resident layers do not point into the files either; the experts it
    reads fail that request with the file named."""
    d = fresh_copy(tiny, tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_AFTER_LOAD, str(d), "bfloat16", "0.02"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    out = r.stdout.strip()
    assert out == "same" or (out.startswith("error:") and ".safetensors" in out), out
