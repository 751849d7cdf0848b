"""Hugging Face-style model folders: config.json + safetensors shards, read lazily.

``open_checkpoint(path)`` reads ``config.json``, detects the quantization, checks every shard
(present, header parses, data length matches the header) and every tensor the config implies
(present, shape, dtype) from the safetensors headers alone, then serves tensors from
memory-mapped files one at a time: opening even a 700 GB checkpoint reads only headers.

Quantization is declared by one of
  hf_quant_config.json    {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4",
                           "group_size": 16, "exclude_modules": [...]}}             (ModelOpt)
  config.json             "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4",
                           "ignore": [...]}                                          (newer ModelOpt)
  config.json             "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                           "weight_block_size": [128, 128]}                          (DeepSeek FP8)
and nothing for BF16/FP16/FP32. Exclude patterns use fnmatch; a pattern also covers the
modules below it ("model.layers.0.self_attn" excludes "model.layers.0.self_attn.o_proj").

Layers at or past ``num_hidden_layers`` (the multi-token-prediction layer of DeepSeek-V3/R1)
are not served: ``names()`` leaves them out.
"""

from __future__ import annotations

import fnmatch
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .checkpoint import DENSE, FP8_BLOCK, NVFP4, CheckpointSource, LinearTensors
from .config import DeepseekV3Config, read_json_file

CONFIG_FILE = "config.json"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# quant_algo values of ModelOpt exports that this library reads
SUPPORTED_QUANT_ALGOS = ("NVFP4",)
NVFP4_GROUP_SIZE = 16

# safetensors header dtype names
_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


# ---------------------------------------------------------------------------------------
# expected tensors, from the config alone


def linear_shapes(config: DeepseekV3Config) -> "OrderedDict[str, Tuple[int, int]]":
    """Every linear module the config implies, with its weight shape [n, k] (y = x·Wᵀ).

    Parameters
    ----------
    config : DeepseekV3Config

    Returns
    -------
    OrderedDict[str, (int, int)]
        module name (checkpoint prefix, no ``.weight``) → (n, k), in layer order. Includes the
        MoE router ``model.layers.L.mlp.gate`` [n_routed_experts, hidden] and ``lm_head``
        [vocab, hidden] (left out when ``tie_word_embeddings``); MTP layers are not included.
    """
    c = config
    h = c.hidden_size
    out: "OrderedDict[str, Tuple[int, int]]" = OrderedDict()
    for layer in range(c.num_hidden_layers):
        a = f"model.layers.{layer}.self_attn"
        if c.q_lora_rank is not None:
            out[f"{a}.q_a_proj"] = (c.q_lora_rank, h)
            out[f"{a}.q_b_proj"] = (c.num_attention_heads * c.qk_head_dim, c.q_lora_rank)
        else:
            out[f"{a}.q_proj"] = (c.num_attention_heads * c.qk_head_dim, h)
        out[f"{a}.kv_a_proj_with_mqa"] = (c.kv_lora_rank + c.qk_rope_head_dim, h)
        out[f"{a}.kv_b_proj"] = (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        out[f"{a}.o_proj"] = (h, c.num_attention_heads * c.v_head_dim)
        m = f"model.layers.{layer}.mlp"
        if not c.is_moe_layer(layer):
            _mlp(out, m, h, c.intermediate_size)
            continue
        out[f"{m}.gate"] = (c.n_routed_experts, h)
        for e in range(c.n_routed_experts):
            _mlp(out, f"{m}.experts.{e}", h, c.moe_intermediate_size)
        if c.n_shared_experts > 0:
            _mlp(out, f"{m}.shared_experts", h, c.moe_intermediate_size * c.n_shared_experts)
    if not c.tie_word_embeddings:
        out["lm_head"] = (c.vocab_size, h)
    return out


def _mlp(out: Dict[str, Tuple[int, int]], prefix: str, hidden: int, inter: int) -> None:
    out[f"{prefix}.gate_proj"] = (inter, hidden)
    out[f"{prefix}.up_proj"] = (inter, hidden)
    out[f"{prefix}.down_proj"] = (hidden, inter)


def other_tensor_shapes(config: DeepseekV3Config) -> "OrderedDict[str, Tuple[int, ...]]":
    """The non-linear tensors the config implies (embedding, norms, router bias) and their shapes.

    Returns
    -------
    OrderedDict[str, tuple]
        tensor name → shape. Embedding [vocab, hidden]; RMSNorm weights [dim];
        ``mlp.gate.e_score_correction_bias`` [n_routed_experts] for ``noaux_tc`` MoE layers.
    """
    c = config
    out: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict()
    out["model.embed_tokens.weight"] = (c.vocab_size, c.hidden_size)
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = (c.hidden_size,)
        out[f"{p}.post_attention_layernorm.weight"] = (c.hidden_size,)
        if c.q_lora_rank is not None:
            out[f"{p}.self_attn.q_a_layernorm.weight"] = (c.q_lora_rank,)
        out[f"{p}.self_attn.kv_a_layernorm.weight"] = (c.kv_lora_rank,)
        if c.is_moe_layer(layer) and c.topk_method == "noaux_tc":
            out[f"{p}.mlp.gate.e_score_correction_bias"] = (c.n_routed_experts,)
    out["model.norm.weight"] = (c.hidden_size,)
    return out


def shared_input_groups(config: DeepseekV3Config) -> List[List[str]]:
    """Linear modules that read the same input and that runtimes fuse into one GEMM.

    ModelOpt exports give each such group one ``weight_scale_2`` (vLLM and TensorRT-LLM keep a
    single global scale per fused GEMM): gate_proj + up_proj of every MLP and expert, and
    q_a_proj + kv_a_proj_with_mqa of every attention layer with a q LoRA.
    """
    groups = []
    for module in linear_shapes(config):
        if module.endswith(".gate_proj"):
            base = module[: -len(".gate_proj")]
            groups.append([module, base + ".up_proj"])
        elif module.endswith(".q_a_proj"):
            base = module[: -len(".q_a_proj")]
            groups.append([module, base + ".kv_a_proj_with_mqa"])
    return groups


def layer_of(name: str) -> Optional[int]:
    """Decoder layer index of a tensor name (``model.layers.L.…``), None for other tensors."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def is_mtp_tensor(name: str, config: DeepseekV3Config) -> bool:
    """True for tensors of the multi-token-prediction layers (layer ≥ num_hidden_layers)."""
    layer = layer_of(name)
    return layer is not None and layer >= config.num_hidden_layers


# ---------------------------------------------------------------------------------------
# quantization config


@dataclass
class QuantConfig:
    """The quantization a model folder declares.

    method             "nvfp4" (ModelOpt), "fp8_block" (DeepSeek FP8) or "none"
    exclude            module-name patterns (fnmatch) stored unquantized
    group_size         NVFP4 elements per E4M3 scale (16)
    weight_block_size  FP8 block (rows, cols), (128, 128) in the DeepSeek release
    kv_cache_quant_algo  ModelOpt KV-cache algorithm, if any (not used by this library)
    source             the file the declaration came from, for error messages
    """

    method: str = "none"
    exclude: List[str] = field(default_factory=list)
    group_size: int = NVFP4_GROUP_SIZE
    weight_block_size: Tuple[int, int] = (128, 128)
    kv_cache_quant_algo: Optional[str] = None
    source: str = ""

    def is_excluded(self, module: str) -> bool:
        return exclude_match(module, self.exclude) is not None


def exclude_match(module: str, patterns: Iterable[str]) -> Optional[str]:
    """The first pattern that excludes ``module`` (fnmatch, or a parent module), else None."""
    for p in patterns:
        if fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*"):
            return p
    return None


def read_quant_config(path: Union[str, Path], config_dict: Optional[Dict[str, Any]] = None) -> QuantConfig:
    """Detects the quantization of model folder ``path``.

    Parameters
    ----------
    path : folder holding config.json (and hf_quant_config.json for ModelOpt exports)
    config_dict : the parsed config.json, when the caller already has it

    Raises
    ------
    ValueError
        naming the file, for an unknown quant_method or quant_algo, malformed fields, or
        hf_quant_config.json and config.json declaring different schemes.
    """
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if config_dict is None:
        config_dict = _read_json(cfg_path)
    qc = config_dict.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ValueError(f"{cfg_path}: quantization_config must be an object")

    from_hf = None
    hf_path = path / HF_QUANT_CONFIG_FILE
    if hf_path.is_file():
        d = _read_json(hf_path)
        q = d.get("quantization")
        if not isinstance(q, dict):
            raise ValueError(f"{hf_path}: expected a 'quantization' object")
        from_hf = _modelopt(q, "exclude_modules", hf_path)

    from_cfg = None
    if qc is not None:
        method = str(qc.get("quant_method", "")).lower()
        if method == "modelopt":
            key = "ignore" if "ignore" in qc else "exclude_modules"
            from_cfg = _modelopt(qc, key, cfg_path)
        elif method == "fp8":
            from_cfg = _fp8_block(qc, cfg_path)
        else:
            raise ValueError(f"{cfg_path}: unsupported quantization_config.quant_method "
                             f"{qc.get('quant_method')!r} "
                             f"(supported: 'modelopt' with NVFP4, 'fp8' with block scales)")

    if from_hf is not None and from_cfg is not None and from_cfg.method != from_hf.method:
        raise ValueError(f"{hf_path} declares {from_hf.method} but {cfg_path} declares {from_cfg.method}")
    if from_hf is not None:
        if from_cfg is not None and not from_hf.exclude:
            from_hf.exclude = from_cfg.exclude
        return from_hf
    return from_cfg if from_cfg is not None else QuantConfig(source=str(cfg_path))


def _modelopt(q: Dict[str, Any], exclude_key: str, src: Path) -> QuantConfig:
    algo = q.get("quant_algo")
    if algo is None:
        raise ValueError(f"{src}: ModelOpt quantization without 'quant_algo'")
    if str(algo).upper() not in SUPPORTED_QUANT_ALGOS:
        raise ValueError(f"{src}: unsupported quant_algo {algo!r} "
                         f"(supported: {', '.join(SUPPORTED_QUANT_ALGOS)})")
    gs = q.get("group_size", NVFP4_GROUP_SIZE)
    if gs is None:
        gs = NVFP4_GROUP_SIZE
    if not isinstance(gs, int) or gs != NVFP4_GROUP_SIZE:
        raise ValueError(f"{src}: NVFP4 group_size must be {NVFP4_GROUP_SIZE}, got {gs!r}")
    exclude = q.get(exclude_key) or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise ValueError(f"{src}: {exclude_key} must be a list of module-name patterns")
    kv = q.get("kv_cache_quant_algo")
    return QuantConfig("nvfp4", list(exclude), gs, (128, 128), None if kv is None else str(kv), str(src))


def _fp8_block(q: Dict[str, Any], src: Path) -> QuantConfig:
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{src}: unsupported FP8 fmt {fmt!r} (supported: 'e4m3')")
    block = q.get("weight_block_size")
    if block is None:
        raise ValueError(f"{src}: FP8 quantization_config without weight_block_size "
                         f"(per-tensor FP8 is not supported)")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{src}: weight_block_size must be two positive integers, got {block!r}")
    if block[0] != block[1]:
        raise ValueError(f"{src}: weight_block_size {list(block)} is not square "
                         f"(only square blocks are supported)")
    exclude = q.get("modules_to_not_convert") or q.get("ignored_layers") or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise ValueError(f"{src}: modules_to_not_convert must be a list of module names")
    return QuantConfig("fp8_block", list(exclude), NVFP4_GROUP_SIZE, (int(block[0]), int(block[1])), None,
                       str(src))


def _read_json(path: Path) -> Dict[str, Any]:
    return read_json_file(path)


# ---------------------------------------------------------------------------------------
# the safetensors-backed source


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: its shard, dtype, shape and the byte range of its data."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: Tuple[int, ...]
    offset: int   # absolute byte offset of the data in ``file``
    nbytes: int


class SafetensorsCheckpoint(CheckpointSource):
    """A model folder: tensors memory-mapped from safetensors shards, read when asked.

    Use ``open_checkpoint(path)``. Attributes: ``path``, ``config`` (DeepseekV3Config),
    ``quant`` (QuantConfig), ``files`` (shard paths in index order), ``weight_map``
    (tensor name → shard file name, MTP layers included).
    """

    def __init__(self, path: Union[str, Path], validate: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such model folder")
        cfg_path = self.path / CONFIG_FILE
        self.config = DeepseekV3Config.from_file(cfg_path)
        self.quant = read_quant_config(self.path, _read_json(cfg_path))
        self._lock = threading.Lock()
        self._handles: Dict[str, Any] = {}
        self._headers: Dict[str, Dict[str, Any]] = {}
        self.weight_map, self.index_file = self._read_weight_map()
        self._check_counts()
        self.files = [self.path / f for f in dict.fromkeys(self.weight_map.values())]
        self._open_all()
        self._names = [n for n in self.weight_map if not is_mtp_tensor(n, self.config)]
        self._names_cache = set(self._names)
        if validate:
            self.validate()

    # ---- files -----------------------------------------------------------------------
    def _read_weight_map(self) -> Tuple[Dict[str, str], Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            d = _read_json(index)
            wm = d.get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in wm.items()):
                raise ValueError(f"{index}: 'weight_map' must map tensor names to file names")
            for f in set(wm.values()):
                if Path(f).name != f or f in (".", ".."):
                    raise ValueError(f"{index}: shard name {f!r} must be a plain file name "
                                     f"in the model folder")
            odd = sorted(f for f in set(wm.values())
                         if (self.path / f).exists() and not (self.path / f).is_file())
            if odd:
                raise ValueError(f"{self.path / odd[0]}: is not a regular file (the shard {index.name} names "
                                 f"must be a safetensors file)")
            missing = sorted(f for f in set(wm.values()) if not (self.path / f).is_file())
            if missing:
                raise FileNotFoundError(f"{index}: shard{'s' if len(missing) > 1 else ''} "
                                        f"{', '.join(missing)} missing from {self.path}")
            return dict(wm), index
        single = self.path / SINGLE_FILE
        if single.is_file():
            with self._open(SINGLE_FILE) as f:
                return {k: SINGLE_FILE for k in f.keys()}, single
        raise FileNotFoundError(f"{self.path}: no {INDEX_FILE} or {SINGLE_FILE}")

    def _check_counts(self) -> None:
        """config.json's layer and expert counts against the index, before anything is sized by
        them (a count far beyond the checkpoint would otherwise build a huge tensor list)."""
        c = self.config
        layers: set = set()
        experts: Dict[int, set] = {}
        for name in self.weight_map:
            m = _EXPERT_RE.match(name)
            if m:
                experts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            layer = layer_of(name)
            if layer is not None:
                layers.add(layer)
        where = f"{self.path / CONFIG_FILE}: {{}} but {self.index_file} holds {{}}"
        if c.num_hidden_layers > len(layers):
            raise ValueError(where.format(f"num_hidden_layers = {c.num_hidden_layers}",
                                          f"the tensors of {len(layers)} layers"))
        most = max((len(e) for e in experts.values()), default=0)
        moe = any(c.is_moe_layer(x) for x in range(min(c.num_hidden_layers, len(layers))))
        if c.n_routed_experts > most and moe:
            raise ValueError(where.format(f"n_routed_experts = {c.n_routed_experts}",
                                          f"{most} experts per layer"))

    def _open(self, fname: str):
        p = self.path / fname
        try:
            with open(p, "rb"):   # the OS's own reason (safetensors reports a denied read as missing)
                pass
        except OSError as e:
            raise ValueError(f"{p}: cannot be read ({e.strerror or e})") from e
        try:
            return safe_open(str(p), framework="pt", device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{p}: not a readable safetensors file, truncated or corrupt ({e})") from e
        except OSError as e:
            raise ValueError(f"{p}: cannot be read ({e})") from e

    def _open_all(self) -> None:
        by_file: Dict[str, List[str]] = {}
        for name, f in self.weight_map.items():
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            h = self._open(f)
            self._handles[f] = h
            have = set(h.keys())
            absent = [n for n in names if n not in have]
            if absent:
                more = f" ({len(absent) - 1} more)" if len(absent) > 1 else ""
                raise ValueError(f"{self.index_file}: lists {absent[0]!r} in {self.path / f}, "
                                 f"which does not hold it{more}")

    def close(self) -> None:
        with self._lock:
            for h in self._handles.values():
                h.__exit__(None, None, None)
            self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            with self._lock:
                h = self._handles.get(fname)
                if h is None:
                    h = self._handles[fname] = self._open(fname)
        return h

    # ---- CheckpointSource --------------------------------------------------------------
    def names(self) -> Iterable[str]:
        return list(self._names)

    def _raw(self, name: str) -> Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def where(self, name: str) -> str:
        f = self.weight_map.get(name)
        return str(self.path / f) if f is not None else str(self.path)

    def file_of(self, name: str) -> Path:
        """The shard file holding tensor ``name``."""
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint {self.path}")
        return self.path / self.weight_map[name]

    def dtype_of(self, name: str) -> torch.dtype:
        s = self._handle(self.weight_map[name]).get_slice(name).get_dtype()
        if s not in _ST_DTYPES:
            raise ValueError(f"{self.where(name)}: tensor {name!r} has unsupported dtype {s}")
        return _ST_DTYPES[s]

    def shape_of(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def tensor_info(self, name: str) -> TensorInfo:
        """Dtype, shape and absolute byte range of a stored tensor, read from the header (for
        direct reads such as O_DIRECT into pinned memory)."""
        f = self.weight_map[name]
        hdr = self._headers.get(f)
        if hdr is None:
            p = self.path / f
            with open(p, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                hdr = json.loads(fh.read(n))
            hdr["__data_start__"] = 8 + n
            self._headers[f] = hdr
        e = hdr[name]
        begin, end = e["data_offsets"]
        return TensorInfo(name, self.path / f, _ST_DTYPES[e["dtype"]], tuple(e["shape"]),
                          hdr["__data_start__"] + begin, end - begin)

    def get_tensor(self, name: str, shape: Optional[Tuple[int, ...]] = None,
                   dtypes: Optional[Tuple[torch.dtype, ...]] = None) -> Tensor:
        """A stored tensor, checked against an expected shape and dtypes before it is read."""
        if not self.has(name):
            raise KeyError(f"tensor {name!r} is missing from the checkpoint {self.path}")
        self._check(name, shape, dtypes)
        return self._raw(name)

    def linear(self, module: str, n: int, k: int, block: Optional[int] = None) -> LinearTensors:
        """Tensors of linear layer ``module`` [n, k]; the FP8 block size defaults to the config's."""
        return super().linear(module, n, k, self.quant.weight_block_size[0] if block is None else block)

    # ---- validation --------------------------------------------------------------------
    def _check(self, name: str, shape, dtypes) -> None:
        got = self.shape_of(name)
        if shape is not None and got != tuple(shape):
            raise ValueError(f"{self.where(name)}: tensor {name!r} has shape {got}, "
                             f"config.json implies {tuple(shape)}")
        if dtypes is not None:
            dt = self.dtype_of(name)
            if dt not in dtypes:
                raise ValueError(f"{self.where(name)}: tensor {name!r} has dtype {dt}, "
                                 f"expected {' or '.join(map(str, dtypes))}")

    def _require(self, name: str, why: str) -> None:
        if not self.has(name):
            raise ValueError(f"{self.index_file}: tensor {name!r} is missing ({why})")

    def validate(self) -> None:
        """Checks every tensor config.json implies against the headers, and the quantization
        declaration against what is stored. Reads no tensor data."""
        counts = {NVFP4: 0, FP8_BLOCK: 0, DENSE: 0}
        b = self.quant.weight_block_size[0]
        for module, (n, k) in linear_shapes(self.config).items():
            w = module + ".weight"
            self._require(w, f"config.json implies a [{n}, {k}] linear layer {module!r}")
            fmt = self.linear_format(module)
            if fmt == DENSE and self.has(module + ".weight_scale"):
                self._require(module + ".weight_scale_2",
                              f"{module}.weight_scale is stored, so NVFP4 needs it")
            counts[fmt] += 1
            if fmt == NVFP4:
                if k % NVFP4_GROUP_SIZE:
                    raise ValueError(f"{self.where(w)}: {w!r}: K = {k} is not a multiple of "
                                     f"{NVFP4_GROUP_SIZE}")
                self._check(w, (n, k // 2), (torch.uint8,))
                self._check(module + ".weight_scale", (n, k // NVFP4_GROUP_SIZE), (torch.float8_e4m3fn,))
                for s in ("weight_scale_2", "input_scale"):
                    if self.has(f"{module}.{s}"):
                        self._check_scalar(f"{module}.{s}")
            elif fmt == FP8_BLOCK:
                self._check(w, (n, k), (torch.float8_e4m3fn,))
                self._check(module + ".weight_scale_inv", (-(-n // b), -(-k // b)), (torch.float32,))
            else:
                self._check(w, (n, k), _DENSE_DTYPES)
            if self.has(module + ".bias"):
                self._check(module + ".bias", (n,), _DENSE_DTYPES)
            if fmt != DENSE:
                pat = exclude_match(module, self.quant.exclude)
                if pat is not None:
                    raise ValueError(f"{self.where(w)}: module {module!r} is stored in {fmt} but "
                                     f"{self.quant.source} excludes it from quantization (pattern {pat!r})")
        for name, shape in other_tensor_shapes(self.config).items():
            self._require(name, f"config.json implies a tensor of shape {shape}")
            self._check(name, shape, _DENSE_DTYPES)

        q = self.quant
        if q.method == "nvfp4" and counts[NVFP4] == 0:
            raise ValueError(f"{q.source}: declares quant_algo NVFP4 but no linear layer has a weight_scale "
                             f"and weight_scale_2")
        if q.method == "fp8_block" and counts[FP8_BLOCK] == 0:
            raise ValueError(f"{q.source}: declares FP8 block quantization but no linear layer has "
                             f"a weight_scale_inv")
        if q.method == "none" and counts[NVFP4] + counts[FP8_BLOCK]:
            module = next(m for m in linear_shapes(self.config) if self.linear_format(m) != DENSE)
            raise ValueError(f"{self.where(module + '.weight')}: {module!r} is stored quantized "
                             f"({self.linear_format(module)}) but {q.source} declares no quantization "
                             f"(is {HF_QUANT_CONFIG_FILE} missing?)")

    def _check_scalar(self, name: str) -> None:
        shape = self.shape_of(name)
        numel = 1
        for s in shape:
            numel *= s
        if numel != 1:
            raise ValueError(f"{self.where(name)}: {name!r} must hold one value, has shape {shape}")
        self._check(name, None, (torch.float32,))


def open_checkpoint(path: Union[str, Path], validate: bool = True) -> SafetensorsCheckpoint:
    """Opens a Hugging Face-style DeepSeek-V3 model folder.

    Parameters
    ----------
    path : folder with config.json and model.safetensors.index.json (or one model.safetensors)
    validate : check every tensor config.json implies (presence, shape, dtype) and the declared
        quantization against the stored tensors, from the headers; reads no tensor data

    Returns
    -------
    SafetensorsCheckpoint
        tensors are memory-mapped and read one at a time, when asked

    Raises
    ------
    FileNotFoundError
        the folder, config.json or a shard the index names is missing
    ValueError
        naming the file or tensor: bad config.json, unknown quant_method / quant_algo, a
        truncated or corrupt shard, a tensor whose shape or dtype contradicts config.json
    """
    return SafetensorsCheckpoint(path, validate=validate)
