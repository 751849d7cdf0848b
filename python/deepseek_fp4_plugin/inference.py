"""DeepseekInference: the configuration-style facade over Engine.

    model = DeepseekInference("path/to/DeepSeek-R1-FP4", device="cuda", memory_limit=16)
    model.set_memory_config(prefetch_layers=2, max_gpu_layers=4)
    model.set_memory_strategy({"cpu_cache_size": 96})
    print(model.generate("Tell me about NVIDIA", max_tokens=256, temperature=0.6))

Every setting takes effect or raises. Settings that change how the GPU budget is carved
(max_gpu_layers, gpu_reserved, cpu_cache_size, prefetch_size, min_layers, max_experts,
gpu_memory_fraction, pinned_memory, enable_async_copy, batch_size, memory_limit) make a new
memory plan and reload the weights; the others (prefetch_layers within the plan's layer
slots, expert_threshold, prefetch_experts, the streams) apply at once. ``settings`` holds
everything set; ``engine.memory_plan`` shows the plan in force.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch

from .engine import Engine, GenerationStats
from .guard import stream_or_raise, text_or_raise
from .knobs import sliding_window_refusal, translate
from .memory_plan import PagingSettings
from .monitor import follow_reload, monitor_for

# seed name → (PagingSettings field or engine argument, validator kind, minimum)
_MEMORY_CONFIG = {
    "prefetch_layers": ("int", 0),
    "max_gpu_layers": ("int", 1),
    "expert_threshold": ("fraction", None),
}
_MEMORY_STRATEGY = {
    "gpu_reserved": ("gib", None),
    "cpu_cache_size": ("gib", None),
    "prefetch_size": ("gib", None),
    "min_layers": ("int", 1),
    "max_experts": ("int", 1),
}
_COMPUTE_STREAMS = {"prefetch": ("bool", None), "compute": ("bool", None), "transfer": ("bool", None)}
_CONFIG = {
    # any PagingSettings field (checked by PagingSettings.validate), then the seed names
    **{k: ("setting", None) for k in PagingSettings.__dataclass_fields__},
    **_MEMORY_CONFIG,
    **_MEMORY_STRATEGY,
    "prefetch_experts": ("int", 1),
    "pinned_memory": ("bool", None),
    "enable_async_copy": ("bool", None),
    "overlap_compute": ("bool", None),
    "gpu_memory_fraction": ("fraction", None),
    "enable_tf32": ("bool", None),
    # the guide's names that knobs.translate turns into the above
    "max_persistent_cache": ("gib", None),
    "max_workspace_size": ("gib", None),
    "prefer_larger_batch": ("bool", None),
}
# keys of the tuning guide that name things this runtime does not have
_UNSUPPORTED = {
    "sliding_window": "DeepSeek-V3 attends over the whole context",
    "expert_parallelism": "all selected experts of a layer run in one grouped GEMM launch",
}
# what changes the memory plan (a reload); the rest apply to the running engine
_PLAN_KEYS = {"max_gpu_layers", "gpu_reserved", "cpu_cache_size", "prefetch_size", "min_layers", "max_experts",
              "gpu_memory_fraction", "pinned_memory", "enable_async_copy", "cpu_isa"}

# The tuning guide's scenarios. Its expert_threshold values are left out: they make every answer
# approximate, so a preset applies them only when asked (approximate=True). The presets for one
# sequence turn the CPU expert lane on where the engine pages experts.
_PRESETS = {
    "single_task": {"prefetch_layers": 2, "batch_size": 1, "expert_threshold": 0.15},
    "batch": {"prefetch_layers": 3, "batch_size": 16, "expert_threshold": 0.1},
    "long_sequence": {"prefetch_layers": 4, "batch_size": 1, "expert_threshold": 0.08},
}
_CPU_LANE_PRESETS = ("single_task", "long_sequence")


def _validate(section: str, key: str, kind: str, minimum: Optional[int], value: Any) -> Any:
    where = f"{section}: {key}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be True or False, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    elif kind == "fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{where} must be a number in [0, 1], got {value!r}")
    elif kind == "gib":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0:
            raise ValueError(f"{where} must be a non-negative number of GiB, got {value!r}")
    return value


class DeepseekInference:
    """A model ready to generate, configured in the style of the original plugin.

    Parameters
    ----------
    model_path : model folder (config.json + safetensors + tokenizer)
    device : "auto" (CUDA when available), "cuda", "cuda:N" or "cpu"
    memory_limit : device memory budget in GiB (see Engine.from_pretrained): what does not fit
        is paged between GPU, pinned host memory and the checkpoint files
    **engine_kwargs : passed to ``Engine.from_pretrained`` (dtype, precision, max_seq_len,
        max_batch_size, use_cuda_graph, progress, prefill_chunk, paging, verbose)
    """

    def __init__(self, model_path: Union[str, Path], device: str = "auto",
                 memory_limit: Optional[float] = None, **engine_kwargs: Any):
        self.model_path = Path(model_path)
        self.device = device
        self.memory_limit = memory_limit
        paging = engine_kwargs.pop("paging", None)
        self._paging: Dict[str, Any] = dict(paging.__dict__ if isinstance(paging, PagingSettings) else paging or {})
        self._engine_kwargs = engine_kwargs
        self.engine = self._load()
        self.batch_size = self.engine.max_batch_size
        self.settings: Dict[str, Dict[str, Any]] = {"memory_config": {}, "memory_strategy": {},
                                                    "compute_streams": {}, "config": {}}

    def _load(self, **engine_overrides: Any) -> Engine:
        kw = {**self._engine_kwargs, **engine_overrides}
        engine = Engine.from_pretrained(self.model_path, device=self.device, memory_limit=self.memory_limit,
                                        paging=dict(self._paging), **kw)
        follow_reload(self, engine)   # a started perf_monitor records the new engine's steps
        return engine

    # ---- applying settings -----------------------------------------------------------------
    def _apply(self, changes: Dict[str, Any], batch_size: Optional[int] = None,
               prefill_chunk: Optional[int] = None) -> None:
        """Applies PagingSettings changes: a reload when the plan changes, else at once."""
        new = {**self._paging, **changes}
        PagingSettings(**new).validate()   # raises, naming the field, before anything changes
        reload = batch_size is not None and batch_size != self.engine.max_batch_size
        reload = reload or any(new.get(k) != self._paging.get(k) for k in _PLAN_KEYS if k in changes)
        reload = reload or (prefill_chunk is not None and prefill_chunk != self.engine.prefill_chunk)
        store = self.engine.store
        if not reload and store.pages:
            try:
                self.engine.reconfigure_paging(**{k: v for k, v in changes.items() if k not in _PLAN_KEYS})
            except ValueError:
                reload = True   # e.g. more prefetch_layers than the plan's layer slots
        elif not reload and "max_gpu_layers" not in changes and changes:
            # a resident engine: prefetching and expert_threshold have nothing to act on until the
            # plan pages something; recorded, and applied by the next plan
            pass
        if reload:
            cuda_graph = self.engine.use_cuda_graph
            overrides = {"max_batch_size": batch_size} if batch_size is not None else {}
            if prefill_chunk is not None:
                overrides["prefill_chunk"] = prefill_chunk
            kw = {**self._engine_kwargs, **overrides}
            # plan first (reads headers only): a budget the new settings cannot carve raises here,
            # with the old engine untouched
            Engine.plan(self.model_path, device=self.device, memory_limit=self.memory_limit, paging=new,
                        **{k: v for k, v in kw.items() if k in ("dtype", "precision", "max_seq_len", "max_batch_size",
                                                                "prefill_chunk")})
            old = self._paging
            self._paging = new
            self.engine = None   # release the old weights before loading the new plan
            try:
                self.engine = self._load(use_cuda_graph=cuda_graph, **overrides)
            except Exception:
                self._paging = old
                self.engine = self._load(use_cuda_graph=cuda_graph)
                raise
        self._paging = new
        if batch_size is not None:
            self.batch_size = batch_size
            self._engine_kwargs["max_batch_size"] = batch_size
        if prefill_chunk is not None:
            self._engine_kwargs["prefill_chunk"] = prefill_chunk

    @staticmethod
    def _check(section: str, schema: Dict[str, tuple], values: Dict[str, Any]) -> Dict[str, Any]:
        """The values, validated; nothing is recorded (a setter records after it took effect)."""
        unknown = sorted(set(values) - set(schema))
        if unknown:
            raise ValueError(f"{section}: unknown setting(s) {unknown} (known: {', '.join(schema)})")
        checked = {k: _validate(section, k, *schema[k], v) for k, v in values.items()}
        if checked.get("expert_threshold", 0) >= 1:
            raise ValueError(f"{section}: expert_threshold must be below 1 (1 would skip every expert)")
        return checked

    def set_memory_config(self, prefetch_layers: Optional[int] = None, max_gpu_layers: Optional[int] = None,
                          expert_threshold: Optional[float] = None) -> None:
        """Layers (and next-layer experts) prefetched ahead; most layers whose weights are on the
        GPU at once; expert_threshold (opt-in approximation, 0 = exact): a routed expert that is
        not on the GPU is skipped when its normalized routing weight is below it."""
        values = {k: v for k, v in dict(prefetch_layers=prefetch_layers, max_gpu_layers=max_gpu_layers,
                                        expert_threshold=expert_threshold).items() if v is not None}
        checked = self._check("memory_config", _MEMORY_CONFIG, values)
        self._apply(checked)
        self.settings["memory_config"].update(checked)

    def set_memory_strategy(self, strategy: Dict[str, Any]) -> None:
        """{'gpu_reserved', 'cpu_cache_size', 'prefetch_size' (GiB), 'min_layers', 'max_experts'}
        (see memory_plan.PagingSettings). Makes a new memory plan."""
        if not isinstance(strategy, dict):
            raise ValueError(f"strategy must be a dict, got {type(strategy).__name__}")
        checked = self._check("memory_strategy", _MEMORY_STRATEGY, strategy)
        self._apply(checked)
        self.settings["memory_strategy"].update(checked)

    def set_compute_streams(self, streams: Dict[str, bool]) -> None:
        """{'prefetch', 'compute', 'transfer'}: False runs that stream's work on the current
        stream (compute: the model; transfer: copies the current layer waits for; prefetch:
        speculative copies)."""
        if not isinstance(streams, dict):
            raise ValueError(f"streams must be a dict, got {type(streams).__name__}")
        checked = self._check("compute_streams", _COMPUTE_STREAMS, streams)
        self._apply({"streams": {**self._paging.get("streams", {}), **checked}})
        self.settings["compute_streams"].update(checked)

    def pending_settings(self) -> Dict[str, Dict[str, Any]]:
        """Settings recorded but with nothing to act on in the current engine (paging knobs of
        an engine that keeps every weight resident)."""
        if self.engine.store.pages:
            return {}
        idle = {"prefetch_layers", "expert_threshold", "prefetch_experts", "prefetch_size", "cpu_cache_size", "cpu_experts",
                "max_experts", "min_layers"}
        out = {s: {k: v for k, v in d.items() if k in idle} for s, d in self.settings.items()}
        return {k: v for k, v in out.items() if v}

    # ---- presets and tuner configs -------------------------------------------------------
    def _preset(self, name: str, approximate: bool) -> Dict[str, Any]:
        _validate(f"optimize_for_{name}", "approximate", "bool", None, approximate)
        cfg = dict(_PRESETS[name])
        if not approximate:
            cfg["expert_threshold"] = 0.0
        cfg["use_cuda_graph"] = self.engine.device.type == "cuda" and self.engine.store.graph_safe
        store = self.engine.store
        if (name in _CPU_LANE_PRESETS and store.pages and not getattr(store, "fp8", False)
                and self._paging.get("enable_async_copy", True)):
            cfg["cpu_experts"] = "auto"   # one sequence decoding: misses split between the bus and the CPU
        self.apply_config(cfg)
        return cfg

    def optimize_for_single_task(self, approximate: bool = False) -> Dict[str, Any]:
        """Latency for one request at a time: batch 1, CUDA-graph decode, two layers prefetched.
        ``approximate=True`` also applies the tuning guide's expert_threshold (0.15)."""
        return self._preset("single_task", approximate)

    def optimize_for_batch(self, approximate: bool = False) -> Dict[str, Any]:
        """Throughput: batch 16, three layers prefetched (threshold 0.1 with approximate=True)."""
        return self._preset("batch", approximate)

    def optimize_for_long_sequence(self, approximate: bool = False) -> Dict[str, Any]:
        """Long prompts: batch 1, four layers prefetched (threshold 0.08 with approximate=True).
        The guide's sliding_window does not apply: DeepSeek-V3 attends over the whole context."""
        return self._preset("long_sequence", approximate)

    def apply_config(self, config: Dict[str, Any]) -> None:
        """Applies a configuration dict (e.g. from a tuner or the presets): batch_size,
        use_cuda_graph, the memory_config keys, prefetch_experts, pinned_memory,
        enable_async_copy, overlap_compute, gpu_memory_fraction, enable_tf32. Keys the
        runtime has no counterpart for raise ValueError saying why."""
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        for k in config:
            if k in _UNSUPPORTED:
                why = sliding_window_refusal(self.model_path) if k == "sliding_window" else _UNSUPPORTED[k]
                raise ValueError(f"apply_config: {k} is not supported ({why})")
        now = {"use_cuda_graph", "batch_size", "prefill_chunk"}
        unknown = sorted(set(config) - now - set(_CONFIG))
        if unknown:
            raise ValueError(f"apply_config: unknown key(s) {unknown} "
                             f"(known: {', '.join(sorted(now | set(_CONFIG)))})")
        # everything is checked before anything changes
        batch = None
        if "batch_size" in config:
            batch = _validate("apply_config", "batch_size", "int", 1, config["batch_size"])
        chunk = _validate("apply_config", "prefill_chunk", "int", 1, config["prefill_chunk"]) \
            if "prefill_chunk" in config else None
        graphs = None
        if "use_cuda_graph" in config:
            graphs = _validate("apply_config", "use_cuda_graph", "bool", None, config["use_cuda_graph"])
        checked = self._check("apply_config", _CONFIG, {k: v for k, v in config.items() if k in _CONFIG})
        changes = dict(checked)
        tf32 = changes.pop("enable_tf32", None)
        if "overlap_compute" in changes:
            on = changes.pop("overlap_compute")
            changes["streams"] = {"compute": on, "prefetch": on, "transfer": on}
            changes["enable_async_copy"] = on
        engine = translate(self, changes, batch)   # the guide's names that are engine arguments
        self._apply(changes, batch_size=engine.get("max_batch_size", batch),
                    prefill_chunk=engine.get("prefill_chunk", chunk))
        if tf32 is not None:
            # float32 matmuls only (the CPU reference path, routers); the FP4/BF16 kernels are unaffected
            torch.backends.cuda.matmul.allow_tf32 = tf32
        if graphs is not None:
            self.engine.set_use_cuda_graph(graphs)
        self.settings["config"].update(checked)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompt: Union[str, List[str]], max_tokens: int = 1024, temperature: float = 0.7,
                 top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, stop=None,
                 chat: bool = False) -> Union[str, List[str]]:
        """Generated text for a prompt (or a list of prompts). See ``Engine.generate``. Raises
        GenerationError when a sequence ends on invalid numbers (finish_reason "error")."""
        out = self.engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, seed=seed, stop=stop, chat=chat)
        return [text_or_raise(c) for c in out] if isinstance(out, list) else text_or_raise(out)

    def stream(self, prompt: str, max_tokens: int = 1024, temperature: float = 0.7, top_p: float = 1.0,
               top_k: int = 0, seed: Optional[int] = None, stop=None, chat: bool = False) -> Iterator[str]:
        """Text pieces as they are generated. See ``Engine.stream``; raises GenerationError
        after the last piece when generation ended on invalid numbers."""
        return stream_or_raise(self.engine, self.engine.stream(
            prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=stop, chat=chat))

    @property
    def perf_monitor(self):
        """This model's PerfMonitor (monitor.py), created on first use; it follows the engine
        across reloads. ``start()`` it for a window with NVML samples and per-step figures."""
        return monitor_for(self)

    @property
    def stats(self) -> GenerationStats:
        """Timings of the last generate / stream call."""
        return self.engine.last_stats

    @property
    def paging_counters(self) -> Optional[Dict[str, Any]]:
        """Tier counters of a paged engine (hit rates, prefetch accuracy, bytes per tier), else None."""
        store = self.engine.store
        return store.counters() if store.pages else None
