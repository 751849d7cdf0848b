"""The tuning guide's knobs that are not PagingSettings fields, turned into ones that are.

``DeepseekInference.apply_config`` calls ``translate`` with the checked configuration:

  max_persistent_cache  GiB of pinned host memory kept for expert units (the persistent host
                        cache): cpu_cache_size under the guide's name
  max_workspace_size    GiB the activation workspace may take: the largest prefill chunk whose
                        planned workspace fits (a reload with that ``prefill_chunk``)
  prefer_larger_batch   True: the largest batch size (≤ 64) whose plan fits the budget
  sliding_window        refused: see ``sliding_window_refusal``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

GiB = 1 << 30
MAX_PREFERRED_BATCH = 64


def sliding_window_refusal(model_path: Path) -> str:
    """Why a sliding window is refused for this model: one trained with full attention would
    compute something else; one trained with a window needs windowed attention, which this
    engine (DeepSeek-V3's MLA) does not have."""
    declared = None
    try:
        raw = json.loads((Path(model_path) / "config.json").read_text())
        declared = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
    except (OSError, ValueError):
        pass
    if declared:
        return (
            f"config.json declares sliding_window = {declared}, but this engine implements DeepSeek-V3's "
            f"full-context attention only"
        )
    return (
        "the model was trained with full-context attention (config.json declares no sliding_window): a "
        "window would change its outputs"
    )


def translate(model, checked: Dict[str, Any], batch_size: Optional[int]) -> Dict[str, Any]:
    """Pops the guide's non-PagingSettings knobs from ``checked`` (in place) and returns the
    engine arguments they set: {"max_batch_size", "prefill_chunk"} (either may be absent)."""
    out: Dict[str, Any] = {}
    if "max_persistent_cache" in checked:
        gib = checked.pop("max_persistent_cache")
        if "cpu_cache_size" in checked and checked["cpu_cache_size"] != gib:
            raise ValueError(
                "apply_config: max_persistent_cache is cpu_cache_size under the tuning guide's name; "
                f"got both ({gib} and {checked['cpu_cache_size']})"
            )
        checked["cpu_cache_size"] = gib
    if "max_workspace_size" in checked:
        out["prefill_chunk"] = _chunk_for_workspace(
            model, checked.pop("max_workspace_size"), checked, batch_size
        )
    if checked.pop("prefer_larger_batch", False):
        if batch_size is not None:
            raise ValueError("apply_config: give batch_size or prefer_larger_batch=True, not both")
        out["max_batch_size"] = _largest_batch(model, checked, out.get("prefill_chunk"))
    return out


def _plan(model, source, paging: Dict[str, Any], batch: int, chunk: int, memory_limit):
    from .engine import Engine

    kw = {k: v for k, v in model._engine_kwargs.items() if k in ("dtype", "precision", "max_seq_len")}
    return Engine.plan(
        source,
        device=model.device,
        memory_limit=memory_limit,
        paging=paging,
        max_batch_size=batch,
        prefill_chunk=chunk,
        **kw,
    )


def _paging(model, checked: Dict[str, Any]) -> Dict[str, Any]:
    from .memory_plan import PagingSettings

    known = set(PagingSettings.__dataclass_fields__)
    return {**model._paging, **{k: v for k, v in checked.items() if k in known}}


def _chunk_for_workspace(model, gib: float, checked: Dict[str, Any], batch_size: Optional[int]) -> int:
    from .loader import open_checkpoint

    limit = int(gib * GiB)
    batch = batch_size or model.engine.max_batch_size
    hi = model.engine.max_seq_len * batch
    source = open_checkpoint(model.model_path)
    try:
        paging = _paging(model, checked)

        def ws(chunk: int) -> int:
            # the workspace does not depend on the budget: plan against a large one
            return _plan(model, source, paging, batch, chunk, 1024).workspace

        if ws(1) > limit:
            raise ValueError(
                f"apply_config: max_workspace_size = {gib} GiB is below the workspace of a one-token "
                f"prefill chunk ({ws(1) / GiB:.3f} GiB)"
            )
        lo = 1
        while lo < hi:  # largest chunk whose workspace fits
            mid = (lo + hi + 1) // 2
            if ws(mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo
    finally:
        source.close()


def _largest_batch(model, checked: Dict[str, Any], chunk: Optional[int]) -> int:
    from .loader import open_checkpoint

    source = open_checkpoint(model.model_path)
    try:
        paging = _paging(model, checked)
        chunk = chunk or model.engine.prefill_chunk
        b = MAX_PREFERRED_BATCH
        while b >= 1:
            try:
                plan = _plan(model, source, paging, b, chunk, model.memory_limit)
            except ValueError:
                b //= 2
                continue
            if plan is None:
                raise ValueError(
                    "apply_config: prefer_larger_batch sizes the batch to the memory budget, and this "
                    "engine has none (give memory_limit, or set batch_size)"
                )
            return b
        raise ValueError("apply_config: prefer_larger_batch: not even batch 1 fits the budget")
    finally:
        source.close()
