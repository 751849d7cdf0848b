"""DeepseekInference: the configuration-style facade over Engine.

    model = DeepseekInference("path/to/DeepSeek-R1-FP4", device="cuda", memory_limit=70)
    model.set_memory_config(prefetch_layers=2, max_gpu_layers=4, expert_threshold=0.1)
    print(model.generate("Tell me about NVIDIA", max_tokens=256, temperature=0.6))

What takes effect today: device, memory_limit (checked: the model must fit, since every
weight is resident), generation settings, and ``use_cuda_graph``. The memory-tier settings
(``set_memory_config``, ``set_memory_strategy``, ``set_compute_streams`` and the matching keys
of ``apply_config``) are validated and stored in ``settings``; they take effect once weight
paging lands, and until then ``pending_settings()`` lists them and each setter warns once.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from .engine import Engine, GenerationStats

# settings that belong to the paging / stream-scheduling work, with their validators
_MEMORY_CONFIG = {
    "prefetch_layers": ("int", 0),
    "max_gpu_layers": ("int", 1),
    "expert_threshold": ("fraction", None),
}
_MEMORY_STRATEGY = {
    "gpu_reserved": ("gib", None),
    "cpu_cache_size": ("gib", None),
    "prefetch_size": ("gib", None),
    "min_layers": ("int", 0),
    "max_experts": ("int", 1),
}
_COMPUTE_STREAMS = {"prefetch": ("bool", None), "compute": ("bool", None), "transfer": ("bool", None)}
# apply_config keys from the tuning guide that change nothing until paging / tuning exist
_PENDING_CONFIG = {
    **_MEMORY_CONFIG,
    "expert_parallelism": ("int", 1),
    "prefetch_experts": ("int", 0),
    "pinned_memory": ("bool", None),
    "max_persistent_cache": ("gib", None),
    "enable_async_copy": ("bool", None),
    "overlap_compute": ("bool", None),
    "gpu_memory_fraction": ("fraction", None),
    "max_workspace_size": ("gib", None),
    "prefer_larger_batch": ("bool", None),
    "enable_tf32": ("bool", None),
}

_SINGLE_TASK = {"max_gpu_layers": 4, "prefetch_layers": 2, "expert_threshold": 0.15, "batch_size": 1}


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
    memory_limit : device memory budget in GiB (the model must fit in it for now)
    **engine_kwargs : passed to ``Engine.from_pretrained`` (dtype, precision, max_seq_len,
        max_batch_size, use_cuda_graph, progress)
    """

    def __init__(self, model_path: Union[str, Path], device: str = "auto",
                 memory_limit: Optional[float] = None, **engine_kwargs: Any):
        self.engine = Engine.from_pretrained(model_path, device=device, memory_limit=memory_limit,
                                             **engine_kwargs)
        self.model_path = Path(model_path)
        self.memory_limit = memory_limit
        self.batch_size = 1
        self.settings: Dict[str, Dict[str, Any]] = {"memory_config": {}, "memory_strategy": {},
                                                    "compute_streams": {}, "config": {}}
        self._warned: set = set()

    # ---- settings for the memory tiers (stored until paging lands) ----------------------
    def _store(self, section: str, schema: Dict[str, tuple], values: Dict[str, Any]) -> None:
        unknown = sorted(set(values) - set(schema))
        if unknown:
            raise ValueError(f"{section}: unknown setting(s) {unknown} (known: {', '.join(schema)})")
        checked = {k: _validate(section, k, *schema[k], v) for k, v in values.items()}
        self.settings[section].update(checked)
        if section not in self._warned:
            self._warned.add(section)
            warnings.warn(f"{section} is stored but has no effect yet: every weight is resident on the "
                          f"device until weight paging is implemented", stacklevel=3)

    def set_memory_config(self, prefetch_layers: Optional[int] = None, max_gpu_layers: Optional[int] = None,
                          expert_threshold: Optional[float] = None) -> None:
        """Layers to prefetch ahead, layers kept on the GPU, expert keep-threshold (0..1).
        Stored; takes effect once paging lands."""
        values = {k: v for k, v in dict(prefetch_layers=prefetch_layers, max_gpu_layers=max_gpu_layers,
                                        expert_threshold=expert_threshold).items() if v is not None}
        self._store("memory_config", _MEMORY_CONFIG, values)

    def set_memory_strategy(self, strategy: Dict[str, Any]) -> None:
        """{'gpu_reserved', 'cpu_cache_size', 'prefetch_size' (GiB), 'min_layers', 'max_experts'}.
        Stored; takes effect once paging lands."""
        if not isinstance(strategy, dict):
            raise ValueError(f"strategy must be a dict, got {type(strategy).__name__}")
        self._store("memory_strategy", _MEMORY_STRATEGY, strategy)

    def set_compute_streams(self, streams: Dict[str, bool]) -> None:
        """{'prefetch', 'compute', 'transfer'}: which streams to use. Stored; the stream
        scheduler arrives with paging (today everything runs on the current stream)."""
        if not isinstance(streams, dict):
            raise ValueError(f"streams must be a dict, got {type(streams).__name__}")
        self._store("compute_streams", _COMPUTE_STREAMS, streams)

    def pending_settings(self) -> Dict[str, Dict[str, Any]]:
        """Settings stored but not yet in effect."""
        return {k: dict(v) for k, v in self.settings.items() if v}

    # ---- settings that take effect now ----------------------------------------------------
    def optimize_for_single_task(self) -> Dict[str, Any]:
        """Latency settings for one request at a time: batch size 1 and CUDA-graph decode (on
        CUDA), plus the memory-tier values of the tuning guide (stored until paging lands).
        Returns the applied configuration."""
        cfg = dict(_SINGLE_TASK)
        cfg["use_cuda_graph"] = self.engine.device.type == "cuda" and self.engine.store.graph_safe
        self.apply_config(cfg)
        return cfg

    def apply_config(self, config: Dict[str, Any]) -> None:
        """Applies a configuration dict (e.g. from a tuner). ``use_cuda_graph`` and
        ``batch_size`` take effect now; the memory and stream keys of the tuning guide are
        stored until paging lands. Unknown keys raise ValueError."""
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        if "sliding_window" in config:
            raise ValueError("apply_config: sliding_window is not supported (DeepSeek-V3 attends over the "
                             "whole context)")
        now = {"use_cuda_graph", "batch_size"}
        unknown = sorted(set(config) - now - set(_PENDING_CONFIG))
        if unknown:
            raise ValueError(f"apply_config: unknown key(s) {unknown} "
                             f"(known: {', '.join(sorted(now | set(_PENDING_CONFIG)))})")
        if "batch_size" in config:
            self.batch_size = _validate("apply_config", "batch_size", "int", 1, config["batch_size"])
            self.engine.max_batch_size = self.batch_size
        if "use_cuda_graph" in config:
            self.engine.set_use_cuda_graph(_validate("apply_config", "use_cuda_graph", "bool", None,
                                                     config["use_cuda_graph"]))
        pending = {k: v for k, v in config.items() if k in _PENDING_CONFIG}
        if pending:
            self._store("config", _PENDING_CONFIG, pending)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompt: Union[str, List[str]], max_tokens: int = 1024, temperature: float = 0.7,
                 top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None, stop=None,
                 chat: bool = False) -> Union[str, List[str]]:
        """Generated text for a prompt (or a list of prompts). See ``Engine.generate``."""
        out = self.engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, seed=seed, stop=stop, chat=chat)
        return [c.text for c in out] if isinstance(out, list) else out.text

    def stream(self, prompt: str, max_tokens: int = 1024, temperature: float = 0.7, top_p: float = 1.0,
               top_k: int = 0, seed: Optional[int] = None, stop=None, chat: bool = False) -> Iterator[str]:
        """Text pieces as they are generated. See ``Engine.stream``."""
        return self.engine.stream(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, seed=seed, stop=stop, chat=chat)

    @property
    def stats(self) -> GenerationStats:
        """Timings of the last generate / stream call."""
        return self.engine.last_stats
