"""Checkpoint converter: any readable DeepSeek-V3 folder → NVFP4 in the NVIDIA ModelOpt layout.

``convert_checkpoint(src, dst)`` reads BF16/FP16/FP32, DeepSeek FP8 block or ModelOpt NVFP4
checkpoints and writes the ModelOpt "unified HF" layout that TensorRT-LLM, vLLM and SGLang
read as well:

  <module>.weight          uint8           [N, K/2]   two E2M1 values per byte, low nibble first
  <module>.weight_scale    float8_e4m3fn   [N, K/16]
  <module>.weight_scale_2  float32         []         global scale, amax / (6·448)
  <module>.input_scale     float32         []         activation scale (see below)
  config.json              quantization_config {"quant_method": "modelopt", "quant_algo": "NVFP4", ...}
  hf_quant_config.json     {"producer": {"name": "modelopt", ...}, "quantization": {...}}

What is quantized: every linear layer except those matching the exclude patterns. The default
keeps ``lm_head`` and the MoE routers ``model.layers.*.mlp.gate`` in their source precision
(BF16 after FP8 dequantization): the router's scores pick the experts and the output head sets
every logit, and together they are under 1% of the model's bytes. Modules already stored in
NVFP4 are copied bit for bit. gate_proj/up_proj pairs and q_a_proj/kv_a_proj_with_mqa share one
``weight_scale_2`` (as ModelOpt exports do, since runtimes fuse each pair into one GEMM).

``input_scale`` is an activation calibration result that this library does not use (it keeps
activations in BF16). W4A4 runtimes require the tensor, so without calibration data the
converter writes ``input_scale`` (default 1.0: activation amax 6·448); calibrate with ModelOpt
for the best W4A4 accuracy. Values from an NVFP4 source are kept.

The multi-token-prediction layers (past num_hidden_layers) are not converted; the output
config.json says ``num_nextn_predict_layers: 0``.

Output shards mirror the source shards. Each is built in memory from tensors read one at a
time from the memory-mapped source, written to a temporary file in DST and renamed into place;
a progress manifest (``.convert-progress.json``, written before the first shard) records
finished shards with their size and SHA-256, so a rerun after an interruption verifies them
and redoes only the rest (and any finished shard damaged since).

Failures are one-line ``ConvertError`` (a ValueError) messages naming the path: a destination
that cannot be created or written, a full disk, an unreadable source. Temporary files are
always removed; a DST this run created is removed too unless it already holds finished shards,
which are kept so that running the same command again resumes.

config.json, hf_quant_config.json and the tokenizer files are written after the shards, and
``model.safetensors.index.json`` last, so a DST without the index is an unfinished conversion
and no reader takes it for a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from . import __version__, fp8_ops, ops
from .checkpoint import FP8_BLOCK, NVFP4
from .config import read_json_file
from .loader import (CONFIG_FILE, HF_QUANT_CONFIG_FILE, INDEX_FILE, NVFP4_GROUP_SIZE, SafetensorsCheckpoint,
                     exclude_match, linear_shapes, open_checkpoint, shared_input_groups)

DEFAULT_EXCLUDE = ("lm_head", "model.layers.*.mlp.gate")
MANIFEST_FILE = ".convert-progress.json"
MODELOPT_LAYOUT_VERSION = "0.23.0"   # the ModelOpt export layout these files follow
_PARTIAL_SUFFIX = ".partial"
MANIFEST_FORMAT = 2   # 2: finished shards carry a sha256


class ConvertError(ValueError):
    """The converter could not read or write a file; the message names it."""


def _reason(e: BaseException, hide: Optional[str] = None) -> str:
    """Short cause of an OS or safetensors error (without the temporary file's name)."""
    if isinstance(e, OSError) and e.strerror:
        other = e.filename if e.filename and str(e.filename) != hide else None
        return e.strerror + (f": {other}" if other else "")
    return " ".join(str(e).split())
_LINEAR_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale", "weight_scale_inv", "bias")


# ---------------------------------------------------------------------------------------
# plan: which source tensors go to which output shard, decided from the headers alone


@dataclass
class _Unit:
    kind: str                 # "linear": a group of linear modules; "tensor": one other tensor
    names: List[str]          # module names (linear) or [tensor name]
    src_bytes: int = 0


@dataclass
class _Shard:
    name: str
    units: List[_Unit] = field(default_factory=list)

    @property
    def src_bytes(self) -> int:
        return sum(u.src_bytes for u in self.units)


def _nbytes(ck: SafetensorsCheckpoint, name: str) -> int:
    n = torch.tensor([], dtype=ck.dtype_of(name)).element_size()
    for s in ck.shape_of(name):
        n *= s
    return n


def _resolve_exclude(ck: SafetensorsCheckpoint, exclude: Optional[Sequence[str]]) -> List[str]:
    nvfp4_modules = [m for m in linear_shapes(ck.config) if ck.linear_format(m) == NVFP4]
    if exclude is None:
        # keep the source's own exclusions; add the defaults that no NVFP4-stored module contradicts
        patterns = list(ck.quant.exclude) if ck.quant.method == "nvfp4" else []
        for p in DEFAULT_EXCLUDE:
            if p not in patterns and not any(exclude_match(m, [p]) for m in nvfp4_modules):
                patterns.append(p)
    else:
        if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"exclude must be a list of module-name patterns, got {exclude!r}")
        patterns = list(dict.fromkeys(exclude))
    modules = list(linear_shapes(ck.config))
    if patterns and all(exclude_match(m, patterns) is not None for m in modules):
        raise ValueError(f"exclude pattern(s) {patterns} keep every linear layer of {ck.path} unquantized: "
                         f"nothing to quantize (the output would declare NVFP4 and hold none)")
    for m in nvfp4_modules:
        p = exclude_match(m, patterns)
        if p is not None:
            raise ValueError(f"{ck.where(m + '.weight')}: module {m!r} is stored in NVFP4 but exclude "
                             f"pattern {p!r} asks to keep it unquantized "
                             f"(NVFP4 is not converted back to BF16)")
    return patterns


def _resolve_fp8(ck: SafetensorsCheckpoint, fp8: Optional[Sequence[str]]) -> List[str]:
    """Patterns of modules to write as DeepSeek FP8 blocks; an NVFP4-stored module cannot be one."""
    if fp8 is None:
        return []
    if isinstance(fp8, str) or not all(isinstance(p, str) for p in fp8):
        raise ValueError(f"fp8 must be a list of module-name patterns, got {fp8!r}")
    patterns = list(dict.fromkeys(fp8))
    for m in linear_shapes(ck.config):
        p = exclude_match(m, patterns)
        if p is not None and ck.linear_format(m) == NVFP4:
            raise ValueError(f"{ck.where(m + '.weight')}: module {m!r} is stored in NVFP4 but fp8 pattern "
                             f"{p!r} asks to write it in FP8 (NVFP4 is not converted to FP8)")
    return patterns


def _plan(ck: SafetensorsCheckpoint, share_scales: bool) -> List[_Shard]:
    shapes = linear_shapes(ck.config)
    group_of: Dict[str, List[str]] = {m: [m] for m in shapes}
    if share_scales:
        for g in shared_input_groups(ck.config):
            for m in g:
                group_of[m] = g
    owned = {}      # tensor name → module whose unit reads it
    for m in shapes:
        for s in _LINEAR_SUFFIXES:
            if ck.has(f"{m}.{s}"):
                owned[f"{m}.{s}"] = m
    # FP8 tensors outside the known linear layers: their scale is read with them
    for name in ck.names():
        if name.endswith(".weight_scale_inv") and name not in owned:
            owned[name] = None

    by_file: Dict[str, List[str]] = {}
    for name in ck.names():
        by_file.setdefault(ck.weight_map[name], []).append(name)
    shards, placed = [], set()
    for fname in sorted(by_file):
        shard = _Shard(fname)
        for name in sorted(by_file[fname]):
            if name in owned:
                m = owned[name]
                if m is None or name != m + ".weight" or m in placed:
                    continue
                group = group_of[m]
                placed.update(group)
                src = [f"{g}.{s}" for g in group for s in _LINEAR_SUFFIXES if ck.has(f"{g}.{s}")]
                shard.units.append(_Unit("linear", list(group), sum(_nbytes(ck, t) for t in src)))
            else:
                nb = _nbytes(ck, name)
                if ck.has(name[: -len("weight")] + "weight_scale_inv") and name.endswith(".weight"):
                    nb += _nbytes(ck, name[: -len("weight")] + "weight_scale_inv")
                shard.units.append(_Unit("tensor", [name], nb))
        if shard.units:
            shards.append(shard)
    return shards


# ---------------------------------------------------------------------------------------
# per-tensor work


def _global_scale_from_amax(amax: float) -> Tensor:
    """The op's own global scale for a tensor whose amax is ``amax`` (one 16-wide row holding it)."""
    row = torch.zeros(1, NVFP4_GROUP_SIZE, dtype=torch.float32)
    row[0, 0] = amax
    return ops.nvfp4_quantize(row)[2]


def _fp8_block_amax(w: Tensor, scale_inv: Tensor, block: int) -> float:
    """max |fp8 × scale_inv| without materialising the whole float32 matrix. Exact: rounding of
    a product by a positive scale is monotonic, so the block maximum maps to the product maximum."""
    n, k = w.shape
    kb = -(-k // block)
    best = 0.0
    for rb in range(-(-n // block)):
        rows = w[rb * block:(rb + 1) * block].to(torch.float32).abs()
        pad = kb * block - k
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        col_amax = rows.reshape(rows.shape[0], kb, block).amax(dim=(0, 2))        # [kb]
        best = max(best, float((col_amax * scale_inv[rb]).max()))
    return best


class _Converter:
    def __init__(self, ck: SafetensorsCheckpoint, exclude: List[str], input_scale: Optional[float],
                 device: str, fp8: Sequence[str] = ()):
        self.ck = ck
        self.exclude = exclude
        self.fp8 = list(fp8)
        self.input_scale = input_scale
        self.device = torch.device(device)
        self.block = ck.quant.weight_block_size[0]
        self.shapes = linear_shapes(ck.config)

    def unit(self, u: _Unit) -> Dict[str, Tensor]:
        if u.kind == "tensor":
            return self._other(u.names[0])
        out: Dict[str, Tensor] = {}
        to_quantize = []
        for m in u.names:
            fmt = self.ck.linear_format(m)
            if fmt == NVFP4:
                out.update(self._copy_module(m))
            elif exclude_match(m, self.fp8) is not None:
                out.update(self._fp8_module(m, fmt))
            elif exclude_match(m, self.exclude) is not None:
                out.update(self._keep_module(m, fmt))
            else:
                to_quantize.append(m)
        if not to_quantize:
            return out
        srcs = {m: self._load_source(m) for m in to_quantize}
        gs = None
        if len(to_quantize) > 1:
            gs = _global_scale_from_amax(max(self._amax(*srcs[m]) for m in to_quantize))
        for m in to_quantize:
            out.update(self._quantize_module(m, *srcs[m], gs))
        return out

    def _load_source(self, m: str, for_nvfp4: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        n, k = self.shapes[m]
        lt = self.ck.linear(m, n, k)
        if for_nvfp4 and k % NVFP4_GROUP_SIZE:
            raise ValueError(f"{self.ck.where(m + '.weight')}: {m!r} has K = {k}, not a multiple of "
                             f"{NVFP4_GROUP_SIZE}, so it cannot be stored in NVFP4; add it to exclude")
        if lt.format == FP8_BLOCK:
            return lt.tensors["weight"], lt.tensors["weight_scale_inv"]
        return lt.tensors["weight"], None

    def _amax(self, w: Tensor, scale_inv: Optional[Tensor]) -> float:
        if scale_inv is None:
            return float(w.abs().max().to(torch.float32))
        return _fp8_block_amax(w, scale_inv, self.block)

    def _quantize_module(self, m: str, w: Tensor, scale_inv: Optional[Tensor],
                         gs: Optional[Tensor]) -> Dict[str, Tensor]:
        dev = self.device
        g = gs.to(dev) if gs is not None else None
        if scale_inv is None:
            packed, scale, gs_out = ops.nvfp4_quantize(w.to(dev).contiguous(), g)
        else:
            w, scale_inv = w.to(dev).contiguous(), scale_inv.to(dev).contiguous()
            packed, scale, gs_out = ops.fp8_block_to_nvfp4(w, scale_inv, self.block, self.block, g)
        out = {f"{m}.weight": packed.cpu(), f"{m}.weight_scale": scale.cpu(),
               f"{m}.weight_scale_2": gs_out.cpu().reshape(())}
        if self.input_scale is not None:
            out[f"{m}.input_scale"] = torch.tensor(self.input_scale, dtype=torch.float32)
        if self.ck.has(f"{m}.bias"):
            out[f"{m}.bias"] = self.ck.get_tensor(f"{m}.bias")
        return out

    def _copy_module(self, m: str) -> Dict[str, Tensor]:
        self.ck.linear(m, *self.shapes[m])   # checks shapes and scales: never copy a corrupt module
        names = [f"{m}.{s}" for s in _LINEAR_SUFFIXES if self.ck.has(f"{m}.{s}")]
        return {n: self.ck.get_tensor(n) for n in names}

    def _fp8_module(self, m: str, fmt: str) -> Dict[str, Tensor]:
        """DeepSeek FP8 blocks (128×128): FP8 sources with that block are copied bit for bit,
        others are quantized (fp8_block_quantize, the DeepSeek formula) from their dense values."""
        n, k = self.shapes[m]
        lt = self.ck.linear(m, n, k)   # checks shapes and scales
        t = lt.tensors
        if fmt == FP8_BLOCK and tuple(t["weight_scale_inv"].shape) == fp8_ops.scale_shape(n, k):
            out = {f"{m}.weight": t["weight"], f"{m}.weight_scale_inv": t["weight_scale_inv"]}
        else:
            w = t["weight"].to(self.device)
            if fmt == FP8_BLOCK:
                w = ops.fp8_block_dequantize(w, t["weight_scale_inv"].to(self.device), self.block, self.block)
            q, s = fp8_ops.fp8_block_quantize(w.contiguous())
            out = {f"{m}.weight": q.cpu(), f"{m}.weight_scale_inv": s.cpu()}
        if self.ck.has(f"{m}.bias"):
            out[f"{m}.bias"] = self.ck.get_tensor(f"{m}.bias")
        return out

    def _keep_module(self, m: str, fmt: str) -> Dict[str, Tensor]:
        out = {}
        if fmt == FP8_BLOCK:
            w, s = self._load_source(m, for_nvfp4=False)
            out[f"{m}.weight"] = ops.fp8_block_dequantize(w, s, self.block, self.block).to(torch.bfloat16)
        else:
            out[f"{m}.weight"] = self.ck.get_tensor(f"{m}.weight")
        if self.ck.has(f"{m}.bias"):
            out[f"{m}.bias"] = self.ck.get_tensor(f"{m}.bias")
        return out

    def _other(self, name: str) -> Dict[str, Tensor]:
        t = self.ck.get_tensor(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            inv = name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") else None
            if inv is not None and self.ck.has(inv) and t.dim() == 2:
                scale_inv = self.ck.get_tensor(inv, None, (torch.float32,))
                t = ops.fp8_block_dequantize(t, scale_inv, self.block, self.block)
            t = t.to(torch.bfloat16)
        return {name: t}


# ---------------------------------------------------------------------------------------
# atomic files and the progress manifest


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """rw for whom the umask allows (safetensors creates its files owner-only)."""
    return 0o666 & ~current_umask()


def _atomic_write(path: Path, write) -> None:
    """Calls write(tmp_path) on a temporary file next to ``path``, then renames it into place."""
    # a fresh name rather than mkstemp, so the file gets the usual umask permissions
    tmp = str(path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_PARTIAL_SUFFIX}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, SafetensorError)):
            raise ConvertError(f"{path}: cannot write ({_reason(e, tmp)})") from e
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _save_shard(tensors: Dict[str, Tensor], path: Path) -> None:
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 23)
            if not block:
                return h.hexdigest()
            h.update(block)


def _shard_keys(path: Path) -> Optional[List[str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception:   # unreadable means "redo this shard"
        return None


def _fingerprint(ck: SafetensorsCheckpoint, exclude: List[str], input_scale: Optional[float],
                 share_scales: bool, fp8: Sequence[str] = ()) -> Dict[str, Any]:
    options = {"exclude": exclude, "input_scale": input_scale, "share_scales": share_scales}
    if fp8:
        options["fp8"] = list(fp8)
    return {
        "source": str(ck.path.resolve()),
        "source_files": {f.name: f.stat().st_size for f in ck.files},
        "options": options,
    }


def _prepare_dst(dst: Path, fingerprint: Dict[str, Any]) -> Dict[str, Any]:
    """Creates DST or resumes the unfinished conversion in it; removes temporary files a crash left."""
    manifest_path = dst / MANIFEST_FILE
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a folder")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"{dst}: cannot create the destination folder ({_reason(e)})") from e
    if manifest_path.is_file():
        try:
            manifest = read_json_file(manifest_path)
        except ValueError as e:
            raise ConvertError(f"{e}; unreadable progress manifest: remove {dst} and convert again") from e
        if {k: manifest.get(k) for k in fingerprint} != fingerprint:
            raise ValueError(f"{dst}: holds a conversion of another source or with other options "
                             f"(see {manifest_path}); remove it or choose another destination")
    else:
        leftovers = [p.name for p in dst.iterdir() if not p.name.endswith(_PARTIAL_SUFFIX)]
        if leftovers:
            shown = ", ".join(sorted(leftovers)[:3]) + (", ..." if len(leftovers) > 3 else "")
            raise ValueError(f"{dst}: is not empty and holds no unfinished conversion ({shown}); "
                             f"choose an empty or new destination")
        manifest = dict(fingerprint, format=MANIFEST_FORMAT, done={}, complete=False)
    for p in dst.iterdir():
        if p.name.startswith(".") and p.name.endswith(_PARTIAL_SUFFIX) and p.is_file():
            p.unlink()
    manifest.setdefault("done", {})
    return manifest


# ---------------------------------------------------------------------------------------
# public API


def modelopt_quant_configs(exclude: Sequence[str], kv_cache_quant_algo: Optional[str] = None
                           ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(hf_quant_config.json content, config.json quantization_config) for an NVFP4 export.

    ``producer.name`` is "modelopt" because readers (vLLM, TensorRT-LLM) choose their NVFP4
    path by it; ``converter`` records which tool wrote the files.
    """
    producer = {"name": "modelopt", "version": MODELOPT_LAYOUT_VERSION}
    hf = {
        "producer": producer,
        "converter": {"name": "deepseek-fp4", "version": __version__},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": kv_cache_quant_algo,
                         "group_size": NVFP4_GROUP_SIZE, "exclude_modules": list(exclude)},
    }
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP_SIZE}
    cfg = {
        "config_groups": {"group_0": {"input_activations": dict(fp4), "weights": dict(fp4),
                                      "targets": ["Linear"]}},
        "ignore": list(exclude),
        "quant_algo": "NVFP4",
        "group_size": NVFP4_GROUP_SIZE,
        "producer": producer,
        "quant_method": "modelopt",
    }
    if kv_cache_quant_algo:
        cfg["kv_cache_scheme"] = ({"dynamic": False, "num_bits": 8, "type": "float"}
                                  if kv_cache_quant_algo == "FP8" else kv_cache_quant_algo)
    return hf, cfg


def convert_checkpoint(src: Union[str, Path], dst: Union[str, Path], exclude: Optional[Sequence[str]] = None,
                       progress: bool = True, input_scale: Optional[float] = 1.0, share_scales: bool = True,
                       device: str = "cpu", fp8: Optional[Sequence[str]] = None) -> Path:
    """Converts the model folder ``src`` to an NVFP4 checkpoint in the ModelOpt layout at ``dst``.

    Parameters
    ----------
    src : model folder (config.json + safetensors) in BF16/FP16/FP32, DeepSeek FP8 block or
        ModelOpt NVFP4
    dst : output folder: new, empty, or holding an unfinished conversion of the same source
        with the same options (which is resumed)
    exclude : module-name patterns (fnmatch) to keep unquantized; None means
        ``DEFAULT_EXCLUDE`` (lm_head and the MoE routers) plus, for an NVFP4 source, its own list
    progress : show a tqdm progress bar (bytes of source tensors)
    input_scale : value written as every quantized layer's ``input_scale`` float32 [], or None
        to write none (readers that need it will then refuse the checkpoint)
    share_scales : give gate_proj/up_proj and q_a_proj/kv_a_proj_with_mqa one weight_scale_2
    device : where to quantize ("cpu", or "cuda" with a CUDA build: same bits, faster)
    fp8 : module-name patterns (fnmatch) to write as DeepSeek FP8 blocks (``weight``
        float8_e4m3fn, ``weight_scale_inv`` float32 per 128×128 block) instead of NVFP4: FP8
        sources are copied, others quantized; recorded in hf_quant_config.json's
        ``converter.fp8_block_modules``. E.g. ``["model.layers.*.self_attn.*"]`` halves BF16
        attention at FP8 precision. This library reads such mixed checkpoints (formats are told
        apart per module); other NVFP4 runtimes do not know the mix.

    Returns
    -------
    Path of ``dst``.

    Raises
    ------
    FileNotFoundError, ValueError
        bad options, a bad source (see ``open_checkpoint``), a destination that holds something
        else, or a module that cannot be quantized; raised before anything is written when the
        source is bad.
    ConvertError (a ValueError)
        a file that cannot be created, written or read, named in the message. Temporary files
        are removed, and DST too when this run created it and finished no shard.
    """
    _check_options(input_scale, share_scales, progress)
    dev = _resolve_device(device)
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: destination is the source folder")
    ck = open_checkpoint(src)
    created = _missing_folders(dst)
    try:
        return _convert(ck, dst, exclude, progress, input_scale, share_scales, dev, fp8)
    except BaseException as e:
        kept = _clean_up(dst, created)
        note = (f"; {kept} finished shard(s) kept in {dst}: run the same command again to resume"
                if kept else "")
        if isinstance(e, OSError):
            raise ConvertError(f"{e.filename or dst}: {_reason(e, str(e.filename))}{note}") from e
        if isinstance(e, SafetensorError):   # writes are wrapped where they happen: this is a read
            raise ConvertError(f"{src}: cannot read the source ({_reason(e)}){note}") from e
        if isinstance(e, ValueError) and note:
            raise (ConvertError if isinstance(e, ConvertError) else ValueError)(f"{e}{note}") from e
        raise
    finally:
        ck.close()


def _convert(ck: SafetensorsCheckpoint, dst: Path, exclude: Optional[Sequence[str]], progress: bool,
             input_scale: Optional[float], share_scales: bool, device: torch.device,
             fp8: Optional[Sequence[str]] = None) -> Path:
    excl = _resolve_exclude(ck, exclude)
    fp8_patterns = _resolve_fp8(ck, fp8)
    shards = _plan(ck, share_scales)
    manifest = _prepare_dst(dst, _fingerprint(ck, excl, input_scale, share_scales, fp8_patterns))
    if not (dst / MANIFEST_FILE).is_file():
        # before any shard is renamed into place: a run killed after that rename still resumes
        _write_json(dst / MANIFEST_FILE, manifest)
    conv = _Converter(ck, excl, input_scale, device, fp8_patterns)
    weight_map: Dict[str, str] = {}
    total_bytes = 0
    with tqdm(total=sum(s.src_bytes for s in shards), unit="B", unit_scale=True, unit_divisor=1024,
              desc="convert", disable=not progress) as bar:
        for shard in shards:
            path = dst / shard.name
            done = manifest["done"].get(shard.name)
            intact = done and path.is_file() and path.stat().st_size == done["size"]
            keys = _shard_keys(path) if intact else None
            if keys is not None and done.get("sha256") != _sha256(path):
                keys = None   # damaged since it was written: redo it
            if keys is None or len(keys) != done["tensors"]:
                bar.set_postfix_str(shard.name)
                tensors: Dict[str, Tensor] = {}
                for u in shard.units:
                    tensors.update(conv.unit(u))
                    bar.update(u.src_bytes)
                _save_shard(tensors, path)
                keys = list(tensors)
                done = {"size": path.stat().st_size, "tensors": len(keys),
                        "data_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                        "sha256": _sha256(path)}
                del tensors
                manifest["done"][shard.name] = done
                _write_json(dst / MANIFEST_FILE, manifest)
            else:
                bar.update(shard.src_bytes)
            total_bytes += done["data_bytes"]
            weight_map.update({k: shard.name for k in keys})

    _write_metadata_files(ck, dst, excl, fp8_patterns)
    _write_json(dst / INDEX_FILE, {"metadata": {"total_size": total_bytes},
                                   "weight_map": dict(sorted(weight_map.items()))})
    manifest["complete"] = True
    _write_json(dst / MANIFEST_FILE, manifest)
    return dst


def _check_options(input_scale: Any, share_scales: Any, progress: Any) -> None:
    if input_scale is not None and (isinstance(input_scale, bool) or not isinstance(input_scale, (int, float))
                                    or not math.isfinite(input_scale) or input_scale <= 0):
        raise ValueError(f"input_scale must be a finite number > 0 (or None to write none), "
                         f"got {input_scale!r}")
    for name, v in (("share_scales", share_scales), ("progress", progress)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")


def _resolve_device(device: Any) -> torch.device:
    from .engine import resolve_device   # the engine's rules: cpu, cuda[:N] with CUDA kernels, auto

    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    return resolve_device(device)


def _missing_folders(dst: Path) -> List[Path]:
    """DST and its ancestors that do not exist yet, outermost first."""
    out = []
    p = dst.absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out[::-1]


def _clean_up(dst: Path, created: List[Path]) -> int:
    """After a failure: removes the folders this run created unless DST holds finished shards
    (a progress manifest), which stay for a resume. Returns the number of shards kept."""
    manifest = dst / MANIFEST_FILE
    if manifest.is_file():
        try:
            done = len(read_json_file(manifest).get("done") or {})
        except ValueError:
            done = 0
        if done:
            return done
        if not created:
            manifest.unlink()   # this run's, recording nothing
            return 0
    if not created:
        return 0
    shutil.rmtree(created[-1], ignore_errors=True)   # DST itself: everything in it is this run's
    for folder in reversed(created[:-1]):
        try:
            folder.rmdir()
        except OSError:
            break
    return 0


def _write_metadata_files(ck: SafetensorsCheckpoint, dst: Path, exclude: List[str],
                          fp8: Sequence[str] = ()) -> None:
    cfg = read_json_file(ck.path / CONFIG_FILE)
    hf, qc = modelopt_quant_configs(exclude, ck.quant.kv_cache_quant_algo)
    if fp8:   # this library tells formats apart per module; other NVFP4 readers do not know the mix
        hf["converter"]["fp8_block_modules"] = list(fp8)
    cfg["quantization_config"] = qc
    if cfg.get("num_nextn_predict_layers"):
        cfg["num_nextn_predict_layers"] = 0    # the MTP layers were not converted
    skip = {CONFIG_FILE, HF_QUANT_CONFIG_FILE, INDEX_FILE, MANIFEST_FILE}
    for p in sorted(ck.path.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".safetensors" and p.name not in skip:
            _atomic_write(dst / p.name, lambda tmp, p=p: shutil.copyfile(p, tmp))
    _write_json(dst / HF_QUANT_CONFIG_FILE, hf)
    _write_json(dst / CONFIG_FILE, cfg)
