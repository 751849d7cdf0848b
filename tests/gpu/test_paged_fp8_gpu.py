"""FP8-block routed experts paged on the GPU (units in GPU slots and, zero-copy, in mapped host
memory), eager and from CUDA graphs, against the resident FP8 engine."""

import pytest
import torch

from deepseek_fp4_plugin import Engine
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.paged import PagedWeightStore
from deepseek_fp4_plugin.tiny import make_tiny

KW = dict(device="cuda", max_batch_size=4, max_seq_len=256, prefill_chunk=64, verbose=False)
PROMPTS = [list(range(3, 60)), [5, 9, 13, 200, 17, 3], list(range(100, 140))]


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_fp8_gpu")
    make_tiny(d, seed=7, format="fp8_block", hidden_size=512, moe_intermediate_size=256, n_routed_experts=128,
              num_hidden_layers=5, n_group=8, topk_group=4, num_experts_per_tok=6)
    return d


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("miss_mode", ["copy", "zero_copy"])
def test_paged_fp8_equals_resident_gpu(fp8_dir, graph, miss_mode):
    res = Engine.from_pretrained(fp8_dir, **KW)
    res.set_use_cuda_graph(graph)
    want = res.generate(PROMPTS, max_tokens=24, ignore_eos=True)
    want_logits = res.logits(PROMPTS[0])
    del res
    unit = _C.fp8_expert_unit_layout(512, 256)["bytes"]
    eng = Engine.from_pretrained(fp8_dir, memory_limit=0.125,
                                 paging=dict(cpu_cache_size=100.5 * unit / 2 ** 30, miss_mode=miss_mode), **KW)
    assert isinstance(eng.store, PagedWeightStore) and eng.store.expert_format == "fp8_block"
    assert eng.memory_plan.expert_slots < eng.memory_plan.total_experts
    eng.set_use_cuda_graph(graph)
    got = eng.generate(PROMPTS, max_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert (eng.logits(PROMPTS[0]) - want_logits).abs().max().item() < 1e-3
    c = eng.store.counters()["experts"]
    assert c["failed"] == 0 and c["ssd_reads"] > 0
