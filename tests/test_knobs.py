"""The tuning guide's remaining knobs through DeepseekInference.apply_config: each changes
what the engine does (shown here on the CPU; tests/gpu/test_monitor_gpu.py shows enable_tf32,
use_cuda_graph and overlap_compute on the GPU) or is refused with the reason."""

import json
import shutil
import warnings

import pytest
import torch

from deepseek_fp4_plugin import DeepseekInference, Engine
from deepseek_fp4_plugin.memory_plan import GiB
from deepseek_fp4_plugin.tiny import make_tiny

PAGED = dict(
    device="cpu", dtype="bfloat16", max_batch_size=1, max_seq_len=64, prefill_chunk=16, verbose=False
)


@pytest.fixture(scope="module")
def resident_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("knobs_tiny")
    make_tiny(d, seed=6)
    return d


@pytest.fixture(scope="module")
def paged_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("knobs_paged")
    make_tiny(
        d,
        seed=3,
        hidden_size=256,
        moe_intermediate_size=128,
        n_routed_experts=32,
        num_hidden_layers=3,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
    )
    return d


def quarter_limit(paged_dir) -> float:
    """A budget whose expert cache holds a quarter of the experts."""
    from deepseek_fp4_plugin.bench import memory_limit_for

    return memory_limit_for(
        str(paged_dir), 0.25, device="cpu", max_seq_len=64, batch=1, prefill_chunk=16, dtype="bfloat16"
    )


def paged(paged_dir, **paging):
    m = DeepseekInference(
        paged_dir, memory_limit=quarter_limit(paged_dir), paging={"cpu_cache_size": 0.01, **paging}, **PAGED
    )
    assert m.engine.store.pages
    return m


def test_host_cache_workspace_and_batch_knobs(paged_dir):
    m = paged(paged_dir)
    plan = m.engine.memory_plan
    unit = plan.expert_unit_bytes
    # max_persistent_cache: the pinned host expert cache under the guide's name
    m.apply_config({"max_persistent_cache": 0.002})
    assert m.engine.memory_plan.host_expert_slots == int(0.002 * GiB) // unit < plan.host_expert_slots
    assert m.engine.paging.cpu_cache_size == 0.002
    with pytest.raises(ValueError, match="max_persistent_cache is cpu_cache_size"):
        m.apply_config({"max_persistent_cache": 0.002, "cpu_cache_size": 0.008})
    # max_workspace_size: the largest prefill chunk whose workspace fits; the rest goes to experts
    before = m.engine.memory_plan
    limit = (before.workspace - 64 * 1024) / GiB
    m.apply_config({"max_workspace_size": limit})
    after = m.engine.memory_plan
    assert m.engine.prefill_chunk < 16 and after.workspace <= limit * GiB < before.workspace
    assert after.expert_slots >= before.expert_slots
    bigger = Engine.plan(
        paged_dir,
        device="cpu",
        memory_limit=1024,
        max_batch_size=1,
        max_seq_len=64,
        prefill_chunk=m.engine.prefill_chunk + 1,
        dtype="bfloat16",
    )
    assert bigger.workspace > limit * GiB  # the chunk is the largest that fits
    engine = m.engine
    with pytest.raises(ValueError, match="max_workspace_size.*one-token"):
        m.apply_config({"max_workspace_size": 0.001})
    assert m.engine is engine  # refused before anything changed
    # prefer_larger_batch: the largest batch whose plan fits the budget
    m.apply_config({"prefer_larger_batch": True})
    b = m.engine.max_batch_size
    assert b > 1
    if b < 64:
        with pytest.raises(ValueError, match="too small"):
            Engine.plan(
                paged_dir,
                device="cpu",
                memory_limit=m.memory_limit,
                max_batch_size=2 * b,
                max_seq_len=64,
                prefill_chunk=m.engine.prefill_chunk,
                dtype="bfloat16",
                paging={"cpu_cache_size": 0.002},
            )
    with pytest.raises(ValueError, match="not both"):
        m.apply_config({"prefer_larger_batch": True, "batch_size": 2})


def test_prefetch_experts_and_runtime_paging_fields(paged_dir):
    m = paged(paged_dir)
    prompt = [5, 6, 7, 8, 9]

    def predicted():
        m.engine.store.reset_counters()
        m.engine.generate(prompt, max_tokens=6, ignore_eos=True)
        return m.paging_counters["experts"]["predicted"]

    full = predicted()  # top_k = 4 predicted per token
    engine = m.engine
    m.apply_config({"prefetch_experts": 1})
    assert m.engine is engine  # applied at once
    assert 0 < predicted() < full
    m.apply_config({"miss_mode": "zero_copy"})  # any PagingSettings field
    assert m.engine.store.settings.miss_mode == "zero_copy"
    m.engine.store.reset_counters()
    m.engine.generate(prompt, max_tokens=3, ignore_eos=True)
    assert m.paging_counters["experts"]["zero_copy"] > 0
    with pytest.raises(ValueError, match="miss_mode"):
        m.apply_config({"miss_mode": "teleport"})


def test_overlap_compute_and_tf32(paged_dir):
    m = paged(paged_dir)
    m.apply_config({"overlap_compute": False})
    s = m.engine.store.settings
    assert s.enable_async_copy is False and s.streams == {
        "compute": False,
        "prefetch": False,
        "transfer": False,
    }
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        m.apply_config({"enable_tf32": not before})
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_batch_size_presets_and_graphs(resident_dir):
    m = DeepseekInference(resident_dir, device="cpu", max_batch_size=4)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    m.apply_config({"batch_size": 2})
    m.engine.generate(prompts, max_tokens=2, ignore_eos=True)
    assert m.stats.batch_size == 2
    cfg = m.optimize_for_batch()
    assert m.engine.max_batch_size == 16 and cfg["prefetch_layers"] == 3 and cfg["expert_threshold"] == 0.0
    m.engine.generate(prompts, max_tokens=2, ignore_eos=True)
    assert m.stats.batch_size == 3
    m.optimize_for_single_task()
    assert m.engine.max_batch_size == 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m.apply_config({"use_cuda_graph": True})
    assert m.engine.use_cuda_graph is False and any("CPU" in str(x.message) for x in w)
    with pytest.raises(ValueError, match="prefer_larger_batch.*memory_limit"):
        m.apply_config({"prefer_larger_batch": True})


def test_refused_knobs_say_why(resident_dir, tmp_path):
    m = DeepseekInference(resident_dir, device="cpu", max_batch_size=1)
    with pytest.raises(ValueError, match="sliding_window.*trained with full-context attention"):
        m.apply_config({"sliding_window": 4096})
    with pytest.raises(ValueError, match="expert_parallelism.*one grouped GEMM"):
        m.apply_config({"expert_parallelism": 8})
    windowed = tmp_path / "windowed"
    shutil.copytree(resident_dir, windowed)
    cfg = json.loads((windowed / "config.json").read_text())
    cfg["sliding_window"] = 4096
    (windowed / "config.json").write_text(json.dumps(cfg))
    w = DeepseekInference(windowed, device="cpu", max_batch_size=1)
    with pytest.raises(ValueError, match="declares sliding_window = 4096.*full-context attention only"):
        w.apply_config({"sliding_window": 4096})
