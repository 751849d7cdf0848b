"""CUDA FP8 block GEMM against float64 references: every path, M = 1…4096, odd sizes, split
weights, NaN-poisoned outputs, CUDA graphs, grouped (stacked slots, units in GPU memory and in
mapped host memory), activation / block quantization bit for bit with the CPU, and the model
(FP8 checkpoints, bfloat16 on CUDA) against transformers."""

import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401
from deepseek_fp4_plugin import Engine, Fp8Weight
from deepseek_fp4_plugin._ext import _C
from deepseek_fp4_plugin.fp8_ops import fp8_expert_unit, fp8_expert_unit_layout, scale_shape

BLOCK = 128
M_VALUES = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 128, 257, 512, 1000, 4096]
# (N, K, split_rows); N = 130: a row tile with 2 of 16 rows, and N % 8 != 0 (no CUTLASS path)
SHAPES = [(40, 48, 0), (1000, 1040, 0), (576, 7168, 0), (272, 320, 136), (130, 272, 0)]
PATH = {int(_C.Fp8GemmPath.fused): "fused", int(_C.Fp8GemmPath.blockscaled): "blockscaled",
        int(_C.Fp8GemmPath.dequant): "dequant"}


def make_weight(n, k, seed, split=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if not split:
        return Fp8Weight.from_float(w).to(device)
    a, b = Fp8Weight.from_float(w[:split]), Fp8Weight.from_float(w[split:] * 3)
    return Fp8Weight.concat_rows([a, b]).to(device)


def dense64(w: Fp8Weight) -> torch.Tensor:
    return w.dequantize(torch.float32).double()            # exact e4m3 × scale, on w's device


def run_raw(w: Fp8Weight, x, tactic=None, ldy=None):
    """The runner straight into a NaN-poisoned y (row stride ldy), so unwritten elements show."""
    m, k = x.shape
    ldy = ldy or w.n
    y = torch.full((m, ldy), float("nan"), dtype=torch.bfloat16, device="cuda")
    tac = tactic if tactic is not None else _C.Fp8GemmTactic()
    ws_bytes = _C.fp8_gemm_workspace_bytes(m, w.n, k, tac, w.split_rows)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device="cuda")
    _C.fp8_gemm(w.weight.data_ptr(), w.scale.data_ptr(), w.n, k, w.split_rows, x.data_ptr(), x.stride(0),
                y.data_ptr(), ldy, m, tac, ws.data_ptr(), ws_bytes, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    if ldy > w.n:
        assert torch.isnan(y[:, w.n:]).all(), "wrote past N"
    return y[:, :w.n]


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def reference(w: Fp8Weight, x, path: str):
    if path == "blockscaled":   # x as the path quantizes it (bit-exact with the CPU, tested below)
        xq, sx = torch.ops.dsfp4.fp8_act_quant(x)
        xd = xq.double() * sx.double().repeat_interleave(BLOCK, dim=1)[:, :x.shape[1]]
        return xd @ dense64(w).t()
    return x.double() @ dense64(w).t()


def check(y, w, x, path):
    assert not torch.isnan(y).any(), f"unwritten outputs ({path})"
    assert rel_err(y, reference(w, x, path)) < 4e-3, path
    if path == "blockscaled":   # the lossy path stays close to the exact product
        assert rel_err(y, reference(w, x, "fused")) < 5e-2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", M_VALUES)
def test_dense_default_tactic(shape, m, quick):
    n, k, split = shape
    if quick and (m > 64 or n * k > 1_100_000):
        pytest.skip("quick mode")
    if k >= 4096 and m > 512:
        pytest.skip("covered by the smaller shapes")
    w = make_weight(n, k, seed=n + k, split=split)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    path = PATH[int(_C.fp8_gemm_default_tactic(m, n, k, split).path)]
    y = run_raw(w, x, ldy=n + 8)
    check(y, w, x, path)
    assert torch.equal(w(x), y)   # the op gives the runner's result


@pytest.mark.parametrize("m", [1, 5, 16, 40, 100, 300])
def test_every_tactic(m, quick):
    n, k, split = (1000, 1040, 0) if not quick else (40, 48, 0)
    if m == 300:
        n, k, split = 272, 320, 136   # a split weight: no tensor-core path, the others must cope
    w = make_weight(n, k, seed=3, split=split)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    tactics = _C.fp8_gemm_candidate_tactics(m, n, k, split)
    assert len(tactics) > 0
    assert split == 0 or all(t.path != _C.Fp8GemmPath.blockscaled for t in tactics)
    for t in tactics:
        check(run_raw(w, x, tactic=t), w, x, PATH[int(t.path)])


def test_blockscaled_on_hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the FP8 tensor-core path is Hopper's")
    w = make_weight(1024, 2048, 7)
    x = torch.randn(300, 2048, device="cuda").to(torch.bfloat16)
    t = _C.Fp8GemmTactic(_C.Fp8GemmPath.blockscaled)
    check(run_raw(w, x, tactic=t), w, x, "blockscaled")
    assert _C.fp8_gemm_default_tactic(4096, 7168, 2048).path == _C.Fp8GemmPath.blockscaled
    split = make_weight(272, 320, 3, split=136)
    with pytest.raises(ValueError, match="split_rows"):
        split(torch.randn(256, 320, device="cuda").to(torch.bfloat16), [2, 0, 0, 0, 0])


def test_auto_tactic_with_unaligned_output_rows():
    """The heuristic assumes ldy = N; y rows the CUTLASS paths cannot store (ldy % 8 != 0) take
    the fused path instead of failing (on Hopper the heuristic picks blockscaled, then dequant)."""
    for n, k, split, m in ((1000, 1040, 0, 300), (272, 320, 136, 600)):
        w = make_weight(n, k, 9, split=split)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        check(run_raw(w, x, ldy=n + 3), w, x, "fused")


def test_nan_weight_codes_give_nan_columns():
    """e4m3fn's NaN codes (0x7F, 0xFF) make their output columns NaN on every path, as in the CPU
    reference (the fused path's shift-and-multiply alone reads them as ±480); other columns are
    bit for bit those of the weight without them."""
    n, k = 272, 320
    w = make_weight(n, k, 11)
    q = w.weight.view(torch.uint8).clone()
    nan_rows = [3, 130, 271]
    q[3, 5], q[130, 200], q[271, 319] = 0x7F, 0xFF, 0x7F
    bad = Fp8Weight(q.view(torch.float8_e4m3fn), w.scale)
    ok = [r for r in range(n) if r not in nan_rows]
    for m in (1, 16, 300):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        for t in _C.fp8_gemm_candidate_tactics(m, n, k):
            y = run_raw(bad, x, tactic=t)
            assert torch.isnan(y[:, nan_rows]).all(), (m, str(t))
            assert torch.equal(y[:, ok], run_raw(w, x, tactic=t)[:, ok]), (m, str(t))


def test_quantization_bit_exact_with_cpu():
    x = (torch.randn(37, 400) * torch.logspace(-3, 2, 400)).to(torch.bfloat16)
    x[4, 128:256] = 0
    q, s = torch.ops.dsfp4.fp8_act_quant(x.cuda())
    qc, sc = torch.ops.dsfp4.fp8_act_quant(x)
    assert torch.equal(q.cpu().view(torch.uint8), qc.view(torch.uint8)) and torch.equal(s.cpu(), sc)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = (torch.randn(300, 200) * torch.logspace(-4, 1, 200)).to(dtype)
        w[:128, 128:] = 0
        qg, sg = torch.ops.dsfp4.fp8_block_quantize(w.cuda())
        qc, sc = torch.ops.dsfp4.fp8_block_quantize(w)
        assert torch.equal(qg.cpu().view(torch.uint8), qc.view(torch.uint8)) and torch.equal(sg.cpu(), sc)
    w = make_weight(200, 96, 1, split=72)
    assert torch.equal(w.dequantize(torch.float32).cpu(), w.to("cpu").dequantize(torch.float32))
    want = w.to("cpu").dequantize(torch.float32)
    assert torch.equal(w.dequantize(torch.bfloat16).cpu(), want.to(torch.bfloat16))


@pytest.mark.parametrize("rows_per_group", [[0, 1, 3, 0, 2, 1], [5, 17, 0, 40, 2, 9], [130, 3, 0, 64, 1, 0]])
def test_grouped_gemm(rows_per_group):
    n, k, slots = 272, 320, 6
    ws = [make_weight(n, k, 50 + i, split=136) for i in range(slots)]
    qw = torch.stack([w.weight for w in ws])
    sc = torch.stack([w.scale for w in ws])
    slot_of_group = torch.tensor([5, 0, 2, 1, -1, 3], dtype=torch.int32, device="cuda")
    offs = torch.tensor([0, *torch.tensor(rows_per_group).cumsum(0).tolist()], dtype=torch.int32).cuda()
    x = torch.randn(int(offs[-1]), k, device="cuda").to(torch.bfloat16)
    y = torch.ops.dsfp4.fp8_grouped_gemm(x, offs, slot_of_group, qw, sc, max(rows_per_group), 136)
    for g, slot in enumerate(slot_of_group.tolist()):
        lo, hi = int(offs[g]), int(offs[g + 1])
        if hi == lo:
            continue
        if slot < 0:
            assert torch.all(y[lo:hi] == 0)
            continue
        assert rel_err(y[lo:hi], reference(ws[slot], x[lo:hi], "fused")) < 4e-3, f"group {g}"
    ycpu = torch.ops.dsfp4.fp8_grouped_gemm(x.cpu(), offs.cpu(), slot_of_group.cpu(), qw.cpu(), sc.cpu(),
                                            max(rows_per_group), 136)
    assert rel_err(y.cpu(), ycpu.double()) < 4e-3


@pytest.mark.parametrize("rows_per_group", [[1, 1, 1, 1], [3, 0, 17, 2]])
def test_grouped_gemm_units_gpu_and_host_memory(rows_per_group):
    """FP8 expert units: even experts in GPU memory, odd ones read in place from mapped pinned host
    memory; gate_up (split at I) and down against the per-expert FP8 GEMM."""
    H, I, E = 256, 144, 4
    lay = fp8_expert_unit_layout(H, I)
    experts = [(make_weight(I, H, 60 + e, device="cpu"), make_weight(I, H, 70 + e, device="cpu"),
                make_weight(H, I, 80 + e, device="cpu")) for e in range(E)]
    units = [fp8_expert_unit(*ex) for ex in experts]
    dev = torch.empty(E * lay["bytes"], dtype=torch.uint8, device="cuda")
    pinned = torch.empty(E * lay["bytes"], dtype=torch.uint8, pin_memory=True)   # mapped (UVA)
    addrs = []
    for e, u in enumerate(units):
        buf = (dev if e % 2 == 0 else pinned)[e * lay["bytes"]:(e + 1) * lay["bytes"]]
        buf.copy_(u)
        addrs.append(buf.data_ptr())
    table = torch.tensor(addrs, dtype=torch.int64, device="cuda")
    slot_of_group = torch.tensor([3, 1, 0, 2], dtype=torch.int32, device="cuda")
    offs = torch.tensor([0, *torch.tensor(rows_per_group).cumsum(0).tolist()], dtype=torch.int32).cuda()
    x = torch.randn(int(offs[-1]), H, device="cuda").to(torch.bfloat16)
    h = torch.randn(int(offs[-1]), I, device="cuda").to(torch.bfloat16)
    torch.cuda.synchronize()
    gu = torch.ops.dsfp4.fp8_grouped_gemm_units(x, offs, slot_of_group, table, lay["gate_up_weight"],
                                                lay["gate_up_scale"], 2 * I, H, max(rows_per_group), I)
    dn = torch.ops.dsfp4.fp8_grouped_gemm_units(h, offs, slot_of_group, table, lay["down_weight"],
                                                lay["down_scale"], H, I, max(rows_per_group))
    for g, e in enumerate(slot_of_group.tolist()):
        lo, hi = int(offs[g]), int(offs[g + 1])
        if hi == lo:
            continue
        gate, up, down = (w.to("cuda") for w in experts[e])
        want = torch.cat([reference(gate, x[lo:hi], "fused"), reference(up, x[lo:hi], "fused")], dim=1)
        assert rel_err(gu[lo:hi], want) < 4e-3, f"gate_up group {g}"
        assert rel_err(dn[lo:hi], reference(down, h[lo:hi], "fused")) < 4e-3, f"down group {g}"
    # a unit the store could not make readable (address 0): its group's rows are NaN, the rest unchanged
    lost = int(slot_of_group[2])
    table[lost] = 0
    gl = torch.ops.dsfp4.fp8_grouped_gemm_units(x, offs, slot_of_group, table, lay["gate_up_weight"],
                                                lay["gate_up_scale"], 2 * I, H, max(rows_per_group), I)
    lo, hi = int(offs[2]), int(offs[3])
    assert torch.isnan(gl[lo:hi]).all()
    assert torch.equal(torch.cat([gl[:lo], gl[hi:]]), torch.cat([gu[:lo], gu[hi:]]))


def test_cuda_graph_capture_and_replay():
    w = make_weight(1000, 1040, 5)
    static_x = torch.randn(4, 1040, device="cuda").to(torch.bfloat16)
    cases = {"default": None, "split_k": [int(_C.Fp8GemmPath.fused), 8, 1, 4, 4]}
    for name, tac in cases.items():
        w(static_x, tac)   # warm-up outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = w(static_x, tac)
        for _ in range(2):
            static_x.copy_(torch.randn(4, 1040, device="cuda").to(torch.bfloat16))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(y, w(static_x, tac)), name
    # grouped under capture
    qw, sc = torch.stack([w.weight, w.weight]), torch.stack([w.scale, w.scale])
    offs = torch.tensor([0, 1, 4], dtype=torch.int32, device="cuda")
    sog = torch.tensor([1, 0], dtype=torch.int32, device="cuda")
    torch.ops.dsfp4.fp8_grouped_gemm(static_x, offs, sog, qw, sc, 3)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = torch.ops.dsfp4.fp8_grouped_gemm(static_x, offs, sog, qw, sc, 3)
    static_x.copy_(torch.randn(4, 1040, device="cuda").to(torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, w(static_x))


def test_cuda_graph_large_m():
    """The large-M default (on Hopper: quantize + CUTLASS FP8) under capture."""
    w = make_weight(1000, 1040, 6)
    big_x = torch.randn(256, 1040, device="cuda").to(torch.bfloat16)
    w(big_x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yb = w(big_x)
    big_x.copy_(torch.randn(256, 1040, device="cuda").to(torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(yb, w(big_x))


def test_bad_inputs_cuda():
    w = make_weight(32, 64, 0)
    with pytest.raises(ValueError, match="is on"):
        w(torch.randn(2, 64).to(torch.bfloat16))
    x = torch.randn(3, 72, device="cuda").to(torch.bfloat16)[:, 1:65]   # rows not 16-byte aligned
    with pytest.raises(ValueError, match="aligned"):
        w(x)
    q = torch.zeros(32, 40, dtype=torch.float8_e4m3fn, device="cuda")
    with pytest.raises(ValueError, match="multiple of 16"):
        torch.ops.dsfp4.fp8_gemm(torch.zeros(1, 40, device="cuda", dtype=torch.bfloat16), q,
                                 torch.ones(*scale_shape(32, 40), device="cuda"))


# ---------------------------------------------------------------------------------------
# the model: FP8-block checkpoints on CUDA at the default policy


MODEL_CONFIGS = {
    "base": dict(),
    "mla128": dict(num_attention_heads=2, qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=144,
                   hidden_size=160, moe_intermediate_size=144, intermediate_size=272, q_lora_rank=96),
}


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_fp8_checkpoint_cuda_matches_transformers(name):
    """bf16 activations through the CUDA FP8 GEMMs (fused qkv_a / gate_up, stacked FP8 experts, FP8
    absorbed MLA in decode): within 2e-2 of transformers in float32 with the same weights (the
    reference routes as we do); CUDA-graph decode gives the eager tokens."""
    from tiny_reference import TinyModel, force_routing
    tm = TinyModel.build(seed=43, **MODEL_CONFIGS[name])
    ckpt, eff = tm.checkpoint("fp8_block")
    eng = Engine.from_pretrained(ckpt, device="cuda")
    assert eng.store.formats["model.layers.1.mlp.experts.0.gate_proj"] == "fp8"
    ref = tm.reference(eff)
    ids = torch.randint(2, 256, (29,), generator=torch.Generator().manual_seed(1)).tolist()
    eng.model.routing_trace = []
    ours = eng.logits(ids)
    undo = force_routing(ref, eng.model.routing_trace)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    undo()
    assert float((ours.float().cpu() - want).norm() / want.norm()) <= 2e-2
    eager = eng.generate(ids, max_tokens=8, ignore_eos=True).token_ids
    graph = Engine.from_pretrained(ckpt, device="cuda", use_cuda_graph=True)
    assert graph.generate(ids, max_tokens=8, ignore_eos=True).token_ids == eager
