"""TensorRT plugins without a GPU: creators, fields and their errors, serialization, the
build-time queries (output shapes through a test IExprBuilder, formats, types, workspace),
enqueue's argument checks, and TensorRT's own plugin registry when a TensorRT runtime library
is at hand. Skipped when the plugins were not built (no TensorRT headers)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401
import trt_driver as td
from plugin_fixtures import Experts, gemm_fields, gemm_weight, routing_fields
from trt_driver import BF16, CHW2, FLOAT, FP8, HALF, INT8, INT32, LINEAR, f32, i8, i32, i64, text

drv = td.driver()
pytestmark = pytest.mark.skipif(drv is None, reason="TensorRT plugins not built (no TensorRT headers)")


def create_fails(plugin, fields, *names):
    """createPlugin returns null and the logger's message names every one of `names`."""
    drv.clear_log()
    assert drv.create(plugin, fields) is None
    log = drv.log()
    for n in names:
        assert n in log, f"{n!r} not in {log!r}"
    return log


# ---- creators -----------------------------------------------------------------------------


def test_creators_are_listed_once_with_name_version_namespace():
    cs = drv.creators()
    assert sorted(c[0] for c in cs) == sorted(td.PLUGINS)
    for name, version, ns, kind in cs:
        assert (version, ns, kind) == ("1", "dsfp4", "PLUGIN CREATOR_V3ONE")


def test_creators_advertise_their_fields():
    assert set(drv.field_names("Dsfp4Fp4Gemm")) == {"n", "k", "weights_as_inputs", "qweight", "qscale", "global_scale",
                                                  "tactic"}
    assert set(drv.field_names("Dsfp4MoeRouting")) == {"num_experts", "n_group", "topk_group", "top_k",
                                                     "routed_scaling_factor", "norm_topk_prob"}
    f = drv.field_names("Dsfp4MoeExperts")
    assert {"weight_source", "store_handle", "layer", "gate_up_qweight", "down_global_scale"} <= set(f)
    assert f["store_handle"] == (td.F_INT64, 1) and f["gate_up_qscale"] == (td.F_INT8, 0)


# ---- Dsfp4Fp4Gemm ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_tile", [False, True])
def test_fp4_gemm_fields_build_queries_and_roundtrip(per_tile):
    w = gemm_weight(48, 64, per_tile=per_tile)
    p = drv.create("Dsfp4Fp4Gemm", gemm_fields(w))
    assert p is not None, drv.log()
    assert p.names() == ("Dsfp4Fp4Gemm", "1", "dsfp4", 1)
    assert p.output_shapes([(None, 3, 64)]) == (0, "out0=[s0_0, 3, 48];")
    assert p.output_shapes([(None, 64)]) == (0, "out0=[s0_0, 48];")
    assert p.output_types([BF16]) == (0, [BF16])
    assert p.supports(0, 1, [BF16, BF16]) and p.supports(1, 1, [BF16, BF16])
    assert not p.supports(0, 1, [HALF, BF16]) and not p.supports(1, 1, [BF16, FLOAT])
    assert not p.supports(0, 1, [BF16, BF16], [CHW2, LINEAR])
    assert p.workspace([(4096, 64)], 1) >= 0
    q = p.roundtrip()
    assert q is not None and q.same_fields(p)
    assert q.output_shapes([(None, 64)]) == (0, "out0=[s0_0, 48];")
    assert p.clone().same_fields(p) and p.attach().same_fields(p)
    names = p.serialized_names()
    assert names[:3] == ["n", "k", "weights_as_inputs"] and "qweight" in names


def test_fp4_gemm_weights_as_inputs():
    w = gemm_weight(40, 32)
    p = drv.create("Dsfp4Fp4Gemm", gemm_fields(w, weights_as_inputs=True))
    assert p is not None, drv.log()
    words, sbytes = td_sizes(40, 32)
    assert p.output_shapes([(5, 32), (words,), (sbytes,), (1,)]) == (0, "out0=[5, 40];")
    assert p.output_shapes([(5, 32), (None,), (None,), (None,)]) == (0, "out0=[5, 40];")
    drv.clear_log()
    rc, _ = p.output_shapes([(5, 32), (words - 4,), (sbytes,), (1,)])
    assert rc != 0 and "qweight" in drv.log()
    assert p.output_shapes([(5, 32)])[0] != 0  # weights missing
    types = [BF16, INT32, INT8, FLOAT, BF16]
    assert all(p.supports(i, 4, types) for i in range(5))
    assert not p.supports(2, 4, [BF16, INT32, FP8, FLOAT, BF16])
    assert not p.supports(3, 4, [BF16, INT32, INT8, HALF, BF16])
    assert "qweight" not in p.serialized_names()
    assert p.roundtrip().same_fields(p)


def td_sizes(n, k):
    from deepseek_fp4_plugin import ops
    return ops.tiled_sizes(n, k)


def test_fp4_gemm_shape_and_type_errors_name_the_tensor():
    p = drv.create("Dsfp4Fp4Gemm", gemm_fields(gemm_weight(48, 64)))
    drv.clear_log()
    assert p.output_shapes([(None, 32)])[0] != 0
    assert "input 0 (x) has K = 32" in drv.log() and "'k'" in drv.log()
    drv.clear_log()
    assert p.output_types([FLOAT])[0] != 0 and "BF16" in drv.log()
    assert p.output_shapes([(3, 64), (3, 64)])[0] != 0


def test_fp4_gemm_bad_fields():
    w = gemm_weight(48, 64)
    good = gemm_fields(w)
    create_fails("Dsfp4Fp4Gemm", {**good, "bogus": i32(1)}, "unknown field 'bogus'")
    create_fails("Dsfp4Fp4Gemm", {k: v for k, v in good.items() if k != "n"}, "missing field 'n'")
    create_fails("Dsfp4Fp4Gemm", {**good, "n": f32(48.0)}, "field 'n'", "FLOAT32", "INT32")
    create_fails("Dsfp4Fp4Gemm", {**good, "n": i32([48, 48])}, "field 'n'", "length 2")
    create_fails("Dsfp4Fp4Gemm", {**good, "k": i32(40)}, "field 'k'", "multiple of 16")
    create_fails("Dsfp4Fp4Gemm", {**good, "n": i32(64)}, "field 'qweight'", "expected")  # n contradicts the weights
    create_fails("Dsfp4Fp4Gemm", {**good, "qscale": i8(w.qscale.numpy()[:-16])}, "field 'qscale'")
    create_fails("Dsfp4Fp4Gemm", {**good, "global_scale": f32([1.0, 2.0])}, "field 'global_scale'")
    create_fails("Dsfp4Fp4Gemm", {**good, "qweight": f32(w.qweight.numpy().view(np.float32))}, "field 'qweight'",
                 "FLOAT32")
    create_fails("Dsfp4Fp4Gemm", {**good, "weights_as_inputs": i32(1)}, "field 'qweight'", "weights_as_inputs = 1")
    create_fails("Dsfp4Fp4Gemm", {**good, "weights_as_inputs": i32(2)}, "field 'weights_as_inputs'")
    create_fails("Dsfp4Fp4Gemm", {**good, "tactic": i32([1, 12, 1, 4, 1])}, "field 'tactic'")
    create_fails("Dsfp4Fp4Gemm", {**good, "tactic": i32([1, 8, 1])}, "field 'tactic'", "length 3")
    assert drv.create("Dsfp4Fp4Gemm", {**good, "tactic": i32([1, 8, 1, 4, 2])}) is not None


# ---- Dsfp4MoeRouting ------------------------------------------------------------------------


def test_routing_build_queries_and_roundtrip():
    p = drv.create("Dsfp4MoeRouting", routing_fields())
    assert p is not None, drv.log()
    assert p.names() == ("Dsfp4MoeRouting", "1", "dsfp4", 2)
    assert p.output_shapes([(None, 16), (16,)]) == (0, "out0=[s0_0, 4];out1=[s0_0, 4];")
    assert p.output_shapes([(7, None), (None,)]) == (0, "out0=[7, 4];out1=[7, 4];")
    assert p.output_types([FLOAT, FLOAT]) == (0, [FLOAT, INT32])
    assert p.output_types([BF16, FLOAT]) == (0, [FLOAT, INT32])
    drv.clear_log()
    assert p.output_types([HALF, FLOAT])[0] != 0 and "scores" in drv.log()
    for types in ([FLOAT, FLOAT, FLOAT, INT32], [BF16, FLOAT, FLOAT, INT32]):
        assert all(p.supports(i, 2, types) for i in range(4))
    assert not p.supports(1, 2, [FLOAT, BF16, FLOAT, INT32])
    assert not p.supports(3, 2, [FLOAT, FLOAT, FLOAT, FLOAT])
    assert p.workspace([(64, 16), (16,)], 2) == 0
    q = p.roundtrip()
    assert q.same_fields(p)
    assert p.serialized_names() == ["num_experts", "n_group", "topk_group", "top_k", "routed_scaling_factor",
                                    "norm_topk_prob"]


def test_routing_shapes_contradicting_fields():
    p = drv.create("Dsfp4MoeRouting", routing_fields())
    drv.clear_log()
    assert p.output_shapes([(3, 17), (17,)])[0] != 0 and "num_experts" in drv.log()
    drv.clear_log()
    assert p.output_shapes([(3, 16), (15,)])[0] != 0 and "input 1 (bias)" in drv.log()
    assert p.output_shapes([(3, 4, 16), (16,)])[0] != 0


def test_routing_bad_fields():
    create_fails("Dsfp4MoeRouting", routing_fields(g=3), "field 'n_group'")
    create_fails("Dsfp4MoeRouting", routing_fields(tg=5), "field 'topk_group'")
    create_fails("Dsfp4MoeRouting", routing_fields(k=9), "field 'top_k'")
    create_fails("Dsfp4MoeRouting", routing_fields(e=2000, g=1, tg=1), "field 'num_experts'")
    create_fails("Dsfp4MoeRouting", routing_fields(norm=2), "field 'norm_topk_prob'")
    create_fails("Dsfp4MoeRouting", {**routing_fields(), "routed_scaling_factor": i32(2)},
                 "field 'routed_scaling_factor'", "INT32", "FLOAT32")
    f = routing_fields()
    del f["top_k"]
    create_fails("Dsfp4MoeRouting", f, "missing field 'top_k'")


# ---- Dsfp4MoeExperts ------------------------------------------------------------------------

E, H, I, K = 6, 64, 32, 2


@pytest.fixture(scope="module")
def experts():
    return Experts(E, H, I)


def test_experts_fields_build_queries_and_roundtrip(experts):
    p = drv.create("Dsfp4MoeExperts", experts.fields(K))
    assert p is not None, drv.log()
    assert p.names() == ("Dsfp4MoeExperts", "1", "dsfp4", 1)
    assert p.output_shapes([(None, H), (None, K), (None, K)]) == (0, "out0=[s0_0, 64];")
    assert p.output_types([BF16, FLOAT, INT32]) == (0, [BF16])
    drv.clear_log()
    assert p.output_types([BF16, FLOAT, FLOAT])[0] != 0 and "topk_ids" in drv.log()
    types = [BF16, FLOAT, INT32, BF16]
    assert all(p.supports(i, 3, types) for i in range(4))
    assert not p.supports(0, 3, [FLOAT, FLOAT, INT32, BF16])
    # x_perm, gate_up, h and y_perm of 128·K rows at least
    assert p.workspace([(128, H), (128, K), (128, K)], 1) >= 128 * K * (H + 2 * I + I + H) * 2
    assert p.roundtrip().same_fields(p)
    drv.clear_log()
    assert p.output_shapes([(None, 32), (None, K), (None, K)])[0] != 0 and "hidden" in drv.log()
    drv.clear_log()
    assert p.output_shapes([(None, H), (None, 3), (None, K)])[0] != 0 and "topk_weights" in drv.log()


def test_experts_weights_as_inputs(experts):
    p = drv.create("Dsfp4MoeExperts", experts.base_fields(K, "inputs"))
    assert p is not None, drv.log()
    shapes = [(None, H), (None, K), (None, K)] + [tuple(t.shape) for t in experts.tensors()]
    assert p.output_shapes(shapes) == (0, "out0=[s0_0, 64];")
    shapes_per_tensor = shapes[:5] + [(E,)] + shapes[6:]  # one global scale per expert is fine too
    assert p.output_shapes(shapes_per_tensor)[0] == 0
    drv.clear_log()
    bad = shapes[:3] + [(E + 1, shapes[3][1])] + shapes[4:]
    assert p.output_shapes(bad)[0] != 0 and "gate_up_qweight" in drv.log()
    types = [BF16, FLOAT, INT32, INT32, INT8, FLOAT, INT32, INT8, FLOAT, BF16]
    assert all(p.supports(i, 9, types) for i in range(10))
    assert not p.supports(4, 9, types[:4] + [INT32] + types[5:])
    assert p.serialized_names() == ["num_experts", "hidden", "inter", "top_k", "weight_source"]
    assert p.roundtrip().same_fields(p)


def test_experts_store_handle_fields(experts):
    p = drv.create("Dsfp4MoeExperts", experts.store_fields(K, handle=77, layer=3))
    assert p is not None, drv.log()
    assert p.serialized_names() == ["num_experts", "hidden", "inter", "top_k", "weight_source", "store_handle",
                                    "layer"]
    assert p.roundtrip().same_fields(p)
    ws_store = p.workspace([(64, H), (64, K), (64, K)], 1)
    ws_fields = drv.create("Dsfp4MoeExperts", experts.fields(K)).workspace([(64, H), (64, K), (64, K)], 1)
    assert ws_store == ws_fields  # the grouped GEMMs read the units in place: no staging room


def test_experts_bad_fields(experts):
    good = experts.fields(K)
    create_fails("Dsfp4MoeExperts", {**good, "weight_source": text("disk")}, "field 'weight_source'")
    create_fails("Dsfp4MoeExperts", {**good, "hidden": i32(128)}, "field 'gate_up_qweight'", "expected")
    create_fails("Dsfp4MoeExperts", {**good, "inter": i32(24)}, "field 'inter'", "multiple of 16")
    create_fails("Dsfp4MoeExperts", {**good, "top_k": i32(E + 1)}, "field 'top_k'")
    create_fails("Dsfp4MoeExperts", {**good, "down_global_scale": f32(np.ones(E + 1))}, "field 'down_global_scale'")
    create_fails("Dsfp4MoeExperts", {**good, "store_handle": i64(5)}, "field 'store_handle'", "'fields'")
    store = experts.store_fields(K, handle=5, layer=0)
    create_fails("Dsfp4MoeExperts", {**store, "gate_up_qweight": good["gate_up_qweight"]}, "field 'gate_up_qweight'")
    create_fails("Dsfp4MoeExperts", {k: v for k, v in store.items() if k != "store_handle"},
                 "missing field 'store_handle'")
    create_fails("Dsfp4MoeExperts", {**store, "store_handle": i64(0)}, "field 'store_handle'")
    create_fails("Dsfp4MoeExperts", {**store, "store_handle": i32(5)}, "field 'store_handle'", "INT32", "INT64")
    create_fails("Dsfp4MoeExperts", {**store, "layer": i32(-1)}, "field 'layer'")


# ---- enqueue checks its arguments before touching memory -------------------------------------


def test_enqueue_rejects_bad_pointers_and_shapes(experts):
    r = drv.create("Dsfp4MoeRouting", routing_fields())
    drv.clear_log()
    assert r.enqueue([((4, 16), 0), ((16,), 0)], [FLOAT, FLOAT], [((4, 4), 0), ((4, 4), 0)], [FLOAT, INT32],
                     shape_change=False) != 0
    assert "null" in drv.log()
    drv.clear_log()
    assert r.enqueue([((4, 17), 8), ((16,), 8)], [FLOAT, FLOAT], [((4, 4), 8), ((4, 4), 8)], [FLOAT, INT32],
                     shape_change=False) != 0
    assert "input 0 (scores)" in drv.log()
    assert r.enqueue([((4, 16), 8), ((16,), 8)], [FLOAT, FLOAT], [((4, 3), 8), ((4, 4), 8)], [FLOAT, INT32],
                     shape_change=False) != 0

    g = drv.create("Dsfp4Fp4Gemm", gemm_fields(gemm_weight(48, 64)))
    drv.clear_log()
    assert g.enqueue([((2, 64), 0)], [BF16], [((2, 48), 0)], [BF16], shape_change=False) != 0
    assert "null" in drv.log()
    assert g.enqueue([((2, 32), 8)], [BF16], [((2, 48), 8)], [BF16], shape_change=False) != 0
    assert g.enqueue([((2, 64), 8)], [BF16], [((3, 48), 8)], [BF16], shape_change=False) != 0

    x = drv.create("Dsfp4MoeExperts", experts.fields(K))
    io = [((4, H), 16), ((4, K), 16), ((4, K), 16)]
    drv.clear_log()
    assert x.enqueue(io, [BF16, FLOAT, INT32], [((4, H), 16)], [BF16], workspace=0, shape_change=False) != 0
    assert "workspace" in drv.log()
    assert x.enqueue(io, [BF16, FLOAT, FLOAT], [((4, H), 16)], [BF16], workspace=256, shape_change=False) != 0
    drv.clear_log()
    s = drv.create("Dsfp4MoeExperts", experts.store_fields(K, handle=991, layer=0))
    assert s.enqueue(io, [BF16, FLOAT, INT32], [((4, H), 16)], [BF16], workspace=256, shape_change=False) != 0
    assert "store_handle = 991" in drv.log()


def test_set_expert_source_rejects_handle_zero():
    assert drv.lib.drv_set_source(0, None) == -1


# ---- TensorRT's plugin registry --------------------------------------------------------------


def test_tensorrt_registry_loads_library_and_finds_every_creator():
    lib = td.trt_runtime_library()
    if lib is None:
        pytest.skip("no TensorRT runtime library (set DSFP4_TRT_LIB, e.g. to libnvinfer_lean.so.11)")
    n, report = drv.registry_check(lib, str(td.plugin_library()))
    assert n == 3, report
    assert "loadLibrary ok" in report and "created Dsfp4MoeRouting" in report


def test_register_plugins_with_the_loaded_tensorrt():
    lib = td.trt_runtime_library()
    if lib is None:
        pytest.skip("no TensorRT runtime library (set DSFP4_TRT_LIB, e.g. to libnvinfer_lean.so.11)")
    # in a fresh process: registering is global to the process's TensorRT
    code = (
        "import ctypes, sys\n"
        f"trt = ctypes.CDLL({lib!r})\n"
        f"plugins = ctypes.CDLL({str(td.plugin_library())!r})\n"
        "first = plugins.dsfp4_trt_register_plugins(None)\n"
        "again = plugins.dsfp4_trt_register_plugins(None)\n"
        "get = trt.getPluginRegistry; get.restype = ctypes.c_void_p\n"
        "explicit = plugins.dsfp4_trt_register_plugins(ctypes.c_void_p(get()))\n"
        "print(first, again, explicit)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # three creators registered once; a second registration adds none
    assert out.stdout.split() == ["3", "0", "0"], out.stdout + out.stderr
