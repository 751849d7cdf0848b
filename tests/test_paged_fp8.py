"""Routed experts stored as DeepSeek FP8 blocks page like NVFP4 ones: FP8 units hold the stored
bytes (weight e4m3, weight_scale_inv) and the grouped FP8 GEMM reads them through the unit table.
On the CPU the paged engine equals the resident FP8 engine bit for bit."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.tiny import make_tiny

KW = dict(device="cpu", dtype="bfloat16", max_batch_size=2, max_seq_len=128, prefill_chunk=32, verbose=False)
PROMPTS = [list(range(1, 30)), [5, 9, 13, 200, 17, 3]]
UNIT = _C.fp8_expert_unit_layout(256, 128)["bytes"]


def _make(d):
    make_tiny(d, seed=5, format="fp8_block", hidden_size=256, moe_intermediate_size=128, n_routed_experts=64,
              num_hidden_layers=4, n_group=8, topk_group=4, num_experts_per_tok=6)
    return d


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("tiny_fp8"))


@pytest.fixture(scope="module")
def reference(fp8_dir):
    eng = Engine.from_pretrained(fp8_dir, **KW)
    return [o.token_ids for o in eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)], eng.logits(PROMPTS[0])


def paged(d, **paging):
    # a host cache of 40 units for 192 experts, so units are refilled from the files all the time
    eng = Engine.from_pretrained(d, memory_limit=0.03, paging={"cpu_cache_size": 40.5 * UNIT / 2 ** 30, **paging}, **KW)
    assert isinstance(eng.store, PagedWeightStore) and eng.store.expert_format == "fp8_block"
    plan = eng.memory_plan
    assert plan.expert_unit_bytes == UNIT and plan.expert_slots < plan.total_experts
    return eng


@pytest.mark.parametrize("paging", [dict(), dict(sim_copy_delay_us=300, prefetch_min_accuracy=0.0),
                                    dict(decode_pipeline=True, sim_copy_delay_us=300, prefetch_min_accuracy=0.0),
                                    dict(enable_async_copy=False), dict(miss_mode="zero_copy")],
                         ids=["ready", "ready_sim", "pipeline_sim", "blocking", "zero_copy"])
def test_paged_fp8_equals_resident(fp8_dir, reference, paging):
    ref_tokens, ref_logits = reference
    eng = paged(fp8_dir, **paging)
    out = eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == ref_tokens
    assert torch.equal(eng.logits(PROMPTS[0]), ref_logits)
    c = eng.store.counters()["experts"]
    assert c["ssd_reads"] > eng.memory_plan.host_expert_slots and c["failed"] == 0
    assert (c["zero_copy"] > 0) == (paging.get("miss_mode") == "zero_copy")
    assert (c["publishes"] > 0) == bool(paging.get("decode_pipeline"))


def test_paged_fp8_refuses_the_cpu_lane(fp8_dir):
    with pytest.raises(ValueError, match="CPU expert kernels compute NVFP4"):
        paged(fp8_dir, cpu_experts=1)


def test_fp8_units_gemm_waits_for_ready_words_and_times_out():
    """The FP8 units GEMM, like the NVFP4 one, computes each group once its ready word reaches the
    epoch (written later by another thread, as the store's copy stream does), and a group whose
    word never comes gives NaN rows and sets the flag."""
    import threading
    import time

    from deepseek_fp4_plugin.fp8_ops import Fp8Weight, fp8_expert_unit, fp8_expert_unit_layout
    g = torch.Generator().manual_seed(3)
    H, I, E = 128, 64, 3
    lay = fp8_expert_unit_layout(H, I)
    ws = [[Fp8Weight.from_float(torch.randn(n, k, generator=g) * 0.1) for n, k in ((I, H), (I, H), (H, I))]
          for _ in range(E)]
    units = [fp8_expert_unit(*w) for w in ws]
    table = torch.zeros(E, dtype=torch.int64)
    ready = torch.zeros(E, dtype=torch.int32)
    epoch = torch.tensor([5], dtype=torch.int32)
    failed = torch.zeros(1, dtype=torch.int32)
    offs = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    x = torch.randn(6, H, generator=g).to(torch.bfloat16)
    groups = torch.arange(E, dtype=torch.int32)
    want = torch.ops.dsfp4.fp8_grouped_gemm_units(x, offs, groups, torch.tensor([u.data_ptr() for u in units]),
                                                  lay["gate_up_weight"], lay["gate_up_scale"], 2 * I, H, 3, I)

    def land():
        for e in (1, 0):     # expert 2 never lands
            time.sleep(0.05)
            table[e] = units[e].data_ptr()
            ready[e] = 5

    t = threading.Thread(target=land)
    t.start()
    y = torch.ops.dsfp4.fp8_grouped_gemm_units(x, offs, groups, table, lay["gate_up_weight"], lay["gate_up_scale"],
                                               2 * I, H, 3, I, 0, ready.data_ptr(), epoch.data_ptr(),
                                               failed.data_ptr(), 400_000_000)
    t.join()
    assert torch.equal(y[:5], want[:5])
    assert torch.isnan(y[5:]).all() and int(failed) == 1


def test_paged_fp8_corrupt_scale_names_the_file(tmp_path):
    """A NaN block scale in an expert's weight_scale_inv, seen only when the store reads the unit:
    generation fails naming the file and the tensor; nothing computes with it."""
    d = _make(tmp_path / "m")
    shard = next(p for p in sorted(d.glob("*.safetensors"))
                 if any(".mlp.experts." in k for k in safe_open(p, "pt").keys()))
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    for k in tensors:   # every expert of that shard: whichever the routing reads first
        if k.endswith(".weight_scale_inv") and ".mlp.experts." in k:
            tensors[k] = tensors[k].clone()
            tensors[k][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata=meta)
    eng = paged(d)
    with pytest.raises(ValueError, match=rf"{shard.name}: model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj\."
                                         rf"weight_scale_inv holds a non-finite or negative block scale"):
        eng.generate(PROMPTS, max_tokens=12, ignore_eos=True)


def test_presets_leave_the_cpu_lane_off_for_fp8_experts(fp8_dir):
    from deepseek_fp4_plugin import DeepseekInference
    m = DeepseekInference(fp8_dir, device="cpu", dtype="bfloat16", memory_limit=0.03, max_batch_size=2,
                          max_seq_len=128, paging={"cpu_cache_size": 40.5 * UNIT / 2 ** 30})
    assert m.engine.store.pages and m.engine.store.fp8
    cfg = m.optimize_for_single_task()
    assert "cpu_experts" not in cfg and m.engine.store.cpu_lane is None
    assert m.engine.max_batch_size == 1
