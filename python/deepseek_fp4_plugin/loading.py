"""Loading: the device, the memory plan, and the weight store a model folder gets.

``load_store`` is what ``Engine.from_pretrained`` runs: it resolves the device and dtype, plans
the budget from shapes and stored formats (nothing is read but headers), and builds a
``ResidentWeightStore`` when everything fits or a ``PagedWeightStore`` when it does not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ._ext import has_cuda_kernels
from .checkpoint import CheckpointSource
from .memory_plan import MemoryPlan, PagingSettings, expert_unit_bytes, plan_memory, size_text
from .paged import PagedWeightStore, paged_expert_format
from .precision import PrecisionPolicy
from .resident import ResidentWeightStore
from .tokenizer import Tokenizer
from .weights import WeightStore

GiB = 1 << 30
CUBLAS_WORKSPACE = 32 << 20   # PyTorch's default per-stream cuBLAS workspace on Hopper (":4096:8")
DEFAULT_MAX_SEQ_LEN = 4096
MAX_MEMORY_LIMIT = 1 << 20   # GiB (1 PiB): larger budgets overflow byte counts


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """"auto" → cuda when a GPU and the CUDA kernels are present, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and has_cuda_kernels() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA device is available (use device='cpu' or 'auto')")
        if not has_cuda_kernels():
            raise ValueError(f"device={device!r}: this build of deepseek-fp4 has no CUDA kernels")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def as_paging_settings(paging: Union[None, PagingSettings, Dict[str, Any]]) -> PagingSettings:
    if paging is None:
        return PagingSettings()
    if isinstance(paging, PagingSettings):
        return paging.validate()
    if not isinstance(paging, dict):
        raise ValueError(f"paging must be a PagingSettings or a dict, got {type(paging).__name__}")
    known = set(PagingSettings.__dataclass_fields__)
    bad = sorted(set(paging) - known)
    if bad:
        raise ValueError(f"paging: unknown setting(s) {bad} (known: {', '.join(sorted(known))})")
    return PagingSettings(**paging).validate()


def plan_for(source: CheckpointSource, dev: torch.device, cdt: torch.dtype, policy: PrecisionPolicy,
             settings: PagingSettings, memory_limit: Optional[float], max_batch_size: int, max_seq_len: int,
             prefill_chunk: int) -> Optional[MemoryPlan]:
    """The memory plan, or None when there is no budget to plan (CPU without memory_limit)."""
    if memory_limit is not None and (
            isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float))
            or not math.isfinite(memory_limit) or not 0 < memory_limit <= MAX_MEMORY_LIMIT):
        raise ValueError(f"memory_limit must be a positive number of GiB up to {MAX_MEMORY_LIMIT}, "
                         f"got {memory_limit!r}")
    total = None
    budget = None if memory_limit is None else int(memory_limit * GiB)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        frac = settings.gpu_memory_fraction
        if budget is None:
            budget = int((frac if frac is not None else 0.9) * free)
        elif frac is not None:
            budget = min(budget, int(frac * total))
    if budget is None:
        return None
    unit = expert_unit_bytes(source, policy, cdt)   # as the experts will run: NVFP4, FP8 or dense
    if not hasattr(source, "tensor_info"):
        not_pageable = "paging reads routed experts from safetensors files (open the model folder)"
    elif cdt != torch.bfloat16:
        not_pageable = (f"paging runs the NVFP4 kernels on bfloat16 activations: use dtype='bfloat16' "
                        f"(got {str(cdt).replace('torch.', '')})")
    elif paged_expert_format(source, policy)[1] is not None:
        not_pageable = ("paging experts reads them from NVFP4 or FP8-block safetensors files, run as stored "
                        "(convert BF16 checkpoints with `deepseek-fp4 convert`)")
    else:
        not_pageable = ""
    pageable = not not_pageable
    # cuBLAS keeps a workspace per stream that runs a matmul: the compute and the graph side stream
    cublas = 2 * CUBLAS_WORKSPACE if dev.type == "cuda" else 0
    plan = plan_memory(source, policy, cdt, budget, settings, max_batch_size, max_seq_len, prefill_chunk, unit,
                       device_total=total, experts_pageable=pageable, library_workspace=cublas,
                       not_pageable_reason=not_pageable)
    if plan.paged and cdt != torch.bfloat16:
        raise ValueError(f"the model needs paging within {size_text(budget)}, which runs the FP4 kernels: "
                         f"use dtype='bfloat16' (got {str(cdt).replace('torch.', '')})")
    if plan.paged and plan.paged_layers and not pageable:
        raise ValueError(f"the model needs paging within {size_text(budget)}: {not_pageable}")
    return plan


def open_source(path: Union[str, Path, CheckpointSource]) -> Tuple[CheckpointSource, Optional[Tokenizer], bool]:
    """(source, tokenizer, owned): a CheckpointSource is used as given (no tokenizer); a folder is
    opened with its tokenizer.json (owned: the caller closes it)."""
    if isinstance(path, CheckpointSource):
        return path, None, False
    from .loader import open_checkpoint

    return open_checkpoint(path), Tokenizer.from_dir(path), True


def load_store(source: CheckpointSource, dev: torch.device, cdt: torch.dtype, policy: PrecisionPolicy,
               settings: PagingSettings, plan: Optional[MemoryPlan], max_rows: int, progress: bool,
               verbose: bool, max_batch: Optional[int] = None) -> WeightStore:
    """The store for ``plan``: paged when the plan pages, else every weight resident."""
    if plan is not None and plan.policy is not None:
        policy = plan.policy   # the plan may run BF16 attention in FP8 to fit the budget
    if plan is not None and plan.paged:
        if verbose:
            print(plan.table())
        return PagedWeightStore(source, dev, cdt, policy, plan, settings, max_rows=max_rows, progress=progress,
                                max_batch=max_batch)
    return ResidentWeightStore(source, dev, cdt, policy, progress=progress)
