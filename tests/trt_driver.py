"""ctypes access to the plugin test driver (tests/trt/trt_test_driver.cpp), which drives
libdsfp4_trt_plugins.so the way TensorRT does. Built when CMake found the TensorRT headers."""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# nvinfer1::PluginFieldType
F_FLOAT32, F_INT8, F_INT32, F_CHAR, F_INT64 = 1, 3, 5, 6, 10
# nvinfer1::DataType / TensorFormat
FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64 = 0, 1, 2, 3, 4, 5, 6, 7, 8
LINEAR, CHW2 = 0, 1

PLUGINS = ("Dsfp4Fp4Gemm", "Dsfp4MoeRouting", "Dsfp4MoeExperts")


def build_dir() -> Path:
    return Path(os.environ.get("DSFP4_BUILD_DIR", ROOT / "build")).resolve()


def plugin_library() -> Optional[Path]:
    p = build_dir() / "plugins" / "libdsfp4_trt_plugins.so"
    return p if p.exists() else None


def trt_runtime_library() -> Optional[str]:
    """A TensorRT runtime library exporting getPluginRegistry: DSFP4_TRT_LIB, or the lean runtime
    wheel unpacked under /tmp/site or .deps."""
    env = os.environ.get("DSFP4_TRT_LIB")
    if env:
        return env if os.path.exists(env) else None
    for pattern in ("/tmp/site/tensorrt_lean_libs/libnvinfer_lean.so.*", str(ROOT / ".deps/**/libnvinfer_lean.so.*"),
                    "/tmp/site/tensorrt_libs/libnvinfer.so.*"):
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    return None


class Field:
    def __init__(self, ftype: int, data: np.ndarray):
        self.type, self.data = ftype, np.ascontiguousarray(data)

    @property
    def length(self) -> int:
        return int(self.data.size)


def i32(v) -> Field:
    return Field(F_INT32, np.asarray(v, dtype=np.int32).reshape(-1))


def i64(v) -> Field:
    return Field(F_INT64, np.asarray([v], dtype=np.int64))


def f32(v) -> Field:
    return Field(F_FLOAT32, np.asarray(v, dtype=np.float32).reshape(-1))


def i8(v) -> Field:
    return Field(F_INT8, np.asarray(v).view(np.int8).reshape(-1))


def text(s: str) -> Field:
    return Field(F_CHAR, np.frombuffer(s.encode() + b"\0", dtype=np.uint8))


def _dims(shapes: Sequence[Sequence[Optional[int]]]) -> Tuple[ctypes.Array, ctypes.Array]:
    nb = (ctypes.c_int * max(1, len(shapes)))(*[len(s) for s in shapes])
    flat = []
    for s in shapes:
        flat += [-1 if d is None else int(d) for d in s] + [0] * (8 - len(s))
    return nb, (ctypes.c_int64 * max(1, len(flat)))(*flat)


class Plugin:
    def __init__(self, drv: "Driver", handle: int):
        self.drv, self.h = drv, handle

    def __del__(self):
        if self.h:
            self.drv.lib.drv_destroy(ctypes.c_void_p(self.h))
            self.h = 0

    def names(self) -> Tuple[str, str, str, int]:
        bufs = [ctypes.create_string_buffer(256) for _ in range(3)]
        nout = self.drv.lib.drv_names(ctypes.c_void_p(self.h), *bufs, 256)
        return bufs[0].value.decode(), bufs[1].value.decode(), bufs[2].value.decode(), nout

    def output_shapes(self, shapes) -> Tuple[int, str]:
        nb, flat = _dims(shapes)
        buf = ctypes.create_string_buffer(4096)
        rc = self.drv.lib.drv_output_shapes(ctypes.c_void_p(self.h), len(shapes), nb, flat, buf, 4096)
        return rc, buf.value.decode()

    def output_types(self, types: Sequence[int]) -> Tuple[int, List[int]]:
        nout = self.names()[3]
        out = (ctypes.c_int * nout)()
        rc = self.drv.lib.drv_output_types(ctypes.c_void_p(self.h), len(types), (ctypes.c_int * len(types))(*types), out)
        return rc, list(out)

    def supports(self, pos: int, nin: int, types: Sequence[int], formats: Optional[Sequence[int]] = None) -> bool:
        formats = formats or [LINEAR] * len(types)
        n = len(types)
        return bool(self.drv.lib.drv_supports(ctypes.c_void_p(self.h), pos, nin, n - nin, (ctypes.c_int * n)(*types),
                                              (ctypes.c_int * n)(*formats)))

    def workspace(self, max_shapes, nout: int) -> int:
        nb, flat = _dims(max_shapes)
        return self.drv.lib.drv_workspace(ctypes.c_void_p(self.h), len(max_shapes), nb, flat, nout)

    def roundtrip(self) -> Optional["Plugin"]:
        h = self.drv.lib.drv_roundtrip(ctypes.c_void_p(self.h))
        return Plugin(self.drv, h) if h else None

    def clone(self) -> Optional["Plugin"]:
        h = self.drv.lib.drv_clone(ctypes.c_void_p(self.h))
        return Plugin(self.drv, h) if h else None

    def attach(self) -> Optional["Plugin"]:
        h = self.drv.lib.drv_attach(ctypes.c_void_p(self.h))
        return Plugin(self.drv, h) if h else None

    def same_fields(self, other: "Plugin") -> bool:
        return bool(self.drv.lib.drv_same_fields(ctypes.c_void_p(self.h), ctypes.c_void_p(other.h)))

    def serialized_names(self) -> List[str]:
        buf = ctypes.create_string_buffer(4096)
        self.drv.lib.drv_serialized_names(ctypes.c_void_p(self.h), buf, 4096)
        return [s for s in buf.value.decode().split(";") if s]

    def enqueue(self, inputs, in_types, outputs, out_types, workspace=0, stream=0, ptrs_in=None, ptrs_out=None,
                shape_change=True) -> int:
        """inputs/outputs: tensors (their shapes and data_ptr) or (shape, pointer) pairs."""
        def unpack(ts, ptrs):
            shapes = [tuple(t.shape) if not isinstance(t, tuple) else t[0] for t in ts]
            p = [t.data_ptr() if not isinstance(t, tuple) else t[1] for t in ts] if ptrs is None else ptrs
            return shapes, p
        ishapes, iptr = unpack(inputs, ptrs_in)
        oshapes, optr = unpack(outputs, ptrs_out)
        nb, flat = _dims(ishapes)
        onb, oflat = _dims(oshapes)
        fn = self.drv.lib.drv_enqueue if shape_change else self.drv.lib.drv_enqueue_only
        return fn(ctypes.c_void_p(self.h), len(ishapes), nb, flat, (ctypes.c_int * len(in_types))(*in_types),
                  (ctypes.c_void_p * len(iptr))(*iptr), len(oshapes), onb, oflat,
                  (ctypes.c_int * len(out_types))(*out_types), (ctypes.c_void_p * len(optr))(*optr),
                  ctypes.c_void_p(workspace), ctypes.c_void_p(stream))


class Driver:
    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        self.lib = lib
        vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        lib.drv_error.restype = cp
        lib.drv_plugin_last_error.restype = cp
        lib.drv_log.restype = cp
        lib.drv_create.restype = vp
        lib.drv_create.argtypes = [cp, ip, ctypes.POINTER(cp), ctypes.POINTER(vp), ctypes.POINTER(ip),
                                   ctypes.POINTER(ip), ip]
        lib.drv_roundtrip.restype = vp
        lib.drv_clone.restype = vp
        lib.drv_attach.restype = vp
        lib.drv_workspace.restype = ctypes.c_int64
        lib.drv_source_new.restype = vp
        lib.drv_source_new.argtypes = [vp, ip, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ip, ip]
        lib.drv_set_source.argtypes = [ctypes.c_int64, vp]
        lib.drv_source_free.argtypes = [vp]
        lib.drv_source_fail.argtypes = [vp, ip]
        for fn in (lib.drv_destroy, lib.drv_clone, lib.drv_attach, lib.drv_roundtrip):
            fn.argtypes = [vp]
        lib.drv_same_fields.argtypes = [vp, vp]
        lib.drv_source_stats.argtypes = [vp, ctypes.POINTER(ip), ctypes.POINTER(ip), ctypes.POINTER(ip),
                                         ctypes.POINTER(ctypes.c_int64)]
        lib.drv_capture_log(1)

    def log(self) -> str:
        return self.lib.drv_log().decode()

    def clear_log(self) -> None:
        self.lib.drv_clear_log()

    def creators(self) -> List[Tuple[str, str, str, str]]:
        out, i = [], 0
        while True:
            bufs = [ctypes.create_string_buffer(256) for _ in range(4)]
            n = self.lib.drv_creator_info(i, *bufs, 256)
            if i >= n:
                return out
            out.append(tuple(b.value.decode() for b in bufs))
            i += 1

    def field_names(self, plugin: str) -> Dict[str, Tuple[int, int]]:
        buf = ctypes.create_string_buffer(4096)
        self.lib.drv_field_names(plugin.encode(), buf, 4096)
        out = {}
        for item in buf.value.decode().split(";"):
            if item:
                name, t, n = item.split(":")
                out[name] = (int(t), int(n))
        return out

    def create(self, plugin: str, fields: Dict[str, Field], phase: int = 0) -> Optional[Plugin]:
        names = [k.encode() for k in fields]
        vals = list(fields.values())
        n = len(vals)
        h = self.lib.drv_create(plugin.encode(), n, (ctypes.c_char_p * max(1, n))(*names),
                                (ctypes.c_void_p * max(1, n))(*[v.data.ctypes.data for v in vals]),
                                (ctypes.c_int * max(1, n))(*[v.type for v in vals]),
                                (ctypes.c_int * max(1, n))(*[v.length for v in vals]), phase)
        return Plugin(self, h) if h else None

    def registry_check(self, trt_lib: str, plugin_lib: str) -> Tuple[int, str]:
        buf = ctypes.create_string_buffer(4096)
        n = self.lib.drv_registry_check(trt_lib.encode(), plugin_lib.encode(), buf, 4096)
        return n, buf.value.decode() or self.lib.drv_error().decode()


_DRIVER: Optional[Driver] = None


def driver() -> Optional[Driver]:
    """The loaded driver, or None when the plugins were not built."""
    global _DRIVER
    if _DRIVER is None:
        p = build_dir() / "tests" / "trt" / "libdsfp4_trt_test_driver.so"
        if p.exists():
            _DRIVER = Driver(p)
    return _DRIVER
