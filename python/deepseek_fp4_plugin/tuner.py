"""AutoTuner: short measured trials of knob settings on the caller's own prompts.

    model = DeepseekInference("path/to/model", memory_limit=16)
    tuner = AutoTuner(model, prompts=my_prompts)
    best = tuner.optimize(target_metric="throughput", time_budget_s=300)
    tuner.save("tuned.json")
    model.apply_config(best)                       # or DeepseekInference(...).apply_config(load_config(...))

The search is coordinate descent: from the configuration in force, each knob in turn is tried
at each of its candidate values with the others held at the best so far; a value is kept
when it beats the best by ``min_gain``; passes repeat until one changes nothing or the time
budget runs out. Before every trial the configuration is checked against the budget
(``Engine.plan``: headers only, nothing loaded), so a configuration that does not fit is never
run nor proposed. A trial is not started when the longest trial so far would overrun the
budget.

Trials run through a ``TrialRunner``: ``EngineTrials`` applies a configuration to a
DeepseekInference and generates the prompts; tests put a simulated cost model in its place.

Knobs searched (those that exist for the model and device): batch_size, use_cuda_graph (CUDA,
graph-safe stores), and for a paged model max_gpu_layers, prefetch_layers, cpu_cache_size
(host expert cache), miss_mode, the CPU expert threads when the runtime has such a knob, and
expert_threshold only with ``allow_approximation=True`` (it changes outputs). The GPU expert
cache takes what the budget leaves, so it moves with max_gpu_layers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .memory_plan import PagingSettings

GiB = 1 << 30
# metric name → (key in a trial's measurements, True when larger is better)
METRICS = {
    "throughput": ("decode_tokens_per_s", True),
    "latency": ("latency_s", False),
    "prefill": ("prefill_tokens_per_s", True),
    "gpu": ("gpu_util", True),
}
DEFAULT_PROMPTS = (
    "Explain how a mixture-of-experts layer chooses which experts to run for each token.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "List five practical tips for reading a long technical paper efficiently, with reasons.",
    "What are the trade-offs between keeping model weights on the GPU and streaming them from host memory?",
)


def cpu_thread_knob() -> Optional[str]:
    """The PagingSettings field that sets the CPU expert lane ("off", "auto" or threads)."""
    for f in fields(PagingSettings):
        if f.name == "cpu_experts" or re.search(r"cpu.*thread|thread.*cpu", f.name):
            return f.name
    return None


class TrialRunner:
    """Runs trials for the tuner. ``check`` says why a configuration cannot run (None: it
    fits); ``measure`` applies it and returns measurements (METRICS keys); ``clock`` is the
    time the budget is counted in; ``space`` the candidate values per knob; ``current`` the
    configuration in force."""

    def check(self, config: Dict[str, Any]) -> Optional[str]:
        raise NotImplementedError

    def measure(self, config: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def clock(self) -> float:
        return time.perf_counter()

    def space(self, allow_approximation: bool) -> Dict[str, List[Any]]:
        raise NotImplementedError

    def current(self) -> Dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {}


class EngineTrials(TrialRunner):
    """Trials on a DeepseekInference: apply_config, a short warm-up, then the prompts.

    Parameters
    ----------
    model : DeepseekInference
    prompts : strings or token-id lists (default: four built-in prompts)
    max_tokens : tokens generated per prompt in a trial
    """

    def __init__(self, model, prompts: Optional[Sequence[Any]] = None, max_tokens: int = 32):
        self.model = model
        self.prompts = list(prompts or DEFAULT_PROMPTS)
        if not self.prompts:
            raise ValueError("prompts must not be empty")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
        self.max_tokens = max_tokens
        eng = model.engine
        if eng.tokenizer is None and any(isinstance(p, str) for p in self.prompts):
            raise ValueError("this model has no tokenizer: give prompts as token-id lists")

    # ---- the space ---------------------------------------------------------------------
    def current(self) -> Dict[str, Any]:
        eng = self.model.engine
        s = eng.paging
        cur: Dict[str, Any] = {"batch_size": eng.max_batch_size, "use_cuda_graph": eng.use_cuda_graph}
        if eng.store.pages:
            L = eng.config.num_hidden_layers
            cur.update(
                max_gpu_layers=s.max_gpu_layers if s.max_gpu_layers is not None else L,
                prefetch_layers=s.prefetch_layers,
                miss_mode=s.miss_mode,
                cpu_cache_size=s.cpu_cache_size if s.cpu_cache_size is not None else self._host_gib(),
                expert_threshold=s.expert_threshold,
            )
            knob = cpu_thread_knob()
            if knob is not None:
                cur[knob] = getattr(s, knob)
        return cur

    def _host_gib(self) -> float:
        plan = self.model.engine.memory_plan
        return math.floor(plan.host_expert_slots * plan.expert_unit_bytes / GiB * 1000) / 1000

    def space(self, allow_approximation: bool) -> Dict[str, List[Any]]:
        eng = self.model.engine
        cur = self.current()
        n = len(self.prompts)
        sp: Dict[str, List[Any]] = {
            "batch_size": sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= n} | {cur["batch_size"]})
        }
        if eng.device.type == "cuda" and eng.store.graph_safe:
            sp["use_cuda_graph"] = [False, True]
        if eng.store.pages:
            L = eng.config.num_hidden_layers
            plan = eng.memory_plan
            sp["max_gpu_layers"] = sorted({x for x in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48) if x < L} | {L})
            sp["prefetch_layers"] = [0, 1, 2, 3, 4]
            unit = plan.expert_unit_bytes / GiB
            have, total = plan.host_expert_slots, plan.total_experts
            host = {have // 2, min(2 * have, total), total} - {have, 0}   # beyond total changes nothing
            sp["cpu_cache_size"] = sorted(
                {cur["cpu_cache_size"]} | {math.ceil(h * unit * 1000) / 1000 for h in host}
            )
            sp["miss_mode"] = ["copy", "auto", "zero_copy"]
            knob = cpu_thread_knob()
            if knob is not None and not getattr(eng.store, "fp8", False):   # the lane computes NVFP4 experts
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                sp[knob] = ["off", "auto"] + [t for t in (1, 2, 4, 8) if t < cores]
            if allow_approximation:
                sp["expert_threshold"] = [0.0, 0.05, 0.1, 0.15]
        return sp

    # ---- trials ------------------------------------------------------------------------
    def _paging(self, config: Dict[str, Any]) -> Dict[str, Any]:
        eng = self.model.engine
        p = dict(eng.paging.__dict__)
        for k in set(config) & set(p):
            p[k] = config[k]
        return p

    def check(self, config: Dict[str, Any]) -> Optional[str]:
        from .engine import Engine

        m = self.model
        kw = {
            k: v
            for k, v in m._engine_kwargs.items()
            if k in ("dtype", "precision", "max_seq_len", "prefill_chunk")
        }
        try:
            PagingSettings(**self._paging(config)).validate()
            Engine.plan(
                m.model_path,
                device=m.device,
                memory_limit=m.memory_limit,
                paging=self._paging(config),
                max_batch_size=config.get("batch_size", m.engine.max_batch_size),
                **kw,
            )
        except ValueError as e:
            return " ".join(str(e).split())
        return None

    def measure(self, config: Dict[str, Any]) -> Dict[str, Any]:
        from .monitor import PerfMonitor

        m = self.model
        cur = self.current()
        m.apply_config({k: v for k, v in config.items() if cur.get(k) != v})
        eng = m.engine
        batch = eng.max_batch_size
        eng.generate(self.prompts[:batch], max_tokens=2, ignore_eos=True)  # graphs captured, caches warm
        mon = PerfMonitor(eng, ceilings={})
        mon.start()
        t = time.perf_counter()
        eng.generate(self.prompts, max_tokens=self.max_tokens, ignore_eos=True)
        wall = time.perf_counter() - t
        mon.stop()
        s = eng.last_stats
        u = mon.get_utilization()
        batches = math.ceil(len(self.prompts) / batch)
        gpu = u["gpu"].get("utilization_pct")
        return {
            "decode_tokens_per_s": s.decode_tokens_per_s,
            "prefill_tokens_per_s": s.prefill_tokens_per_s,
            "latency_s": wall / batches,
            "gpu_util": gpu if isinstance(gpu, (int, float)) else None,
            "expert_hit_rate": u["memory"]["expert_hit_rate_pct"],
            "wall_s": wall,
        }

    def describe(self) -> Dict[str, Any]:
        m = self.model
        return {
            "model": str(m.model_path),
            "device": str(m.engine.device),
            "memory_limit": m.memory_limit,
            "prompts": len(self.prompts),
            "max_tokens": self.max_tokens,
        }


class AutoTuner:
    """Searches knob settings by measured trials (see the module docstring).

    Parameters
    ----------
    target : a DeepseekInference; a dict {"model": folder, plus DeepseekInference arguments
        (device, memory_limit, ...)}; or a TrialRunner
    prompts, max_tokens : the trial workload (EngineTrials)
    allow_approximation : also search expert_threshold (changes outputs)
    min_gain : relative improvement a value must bring to be kept (measurement noise)
    """

    def __init__(
        self,
        target: Any,
        prompts: Optional[Sequence[Any]] = None,
        max_tokens: int = 32,
        allow_approximation: bool = False,
        min_gain: float = 0.02,
    ):
        if isinstance(target, TrialRunner):
            self.runner = target
        else:
            if isinstance(target, dict):
                from .inference import DeepseekInference

                cfg = dict(target)
                if "model" not in cfg:
                    raise ValueError("AutoTuner config must name the model folder: {'model': path, ...}")
                target = DeepseekInference(cfg.pop("model"), **cfg)
            if not hasattr(target, "apply_config"):
                raise ValueError(
                    f"AutoTuner takes a DeepseekInference, a config dict or a TrialRunner, "
                    f"got {type(target).__name__}"
                )
            self.runner = EngineTrials(target, prompts, max_tokens)
        if not isinstance(allow_approximation, bool):
            raise ValueError(f"allow_approximation must be True or False, got {allow_approximation!r}")
        self.allow_approximation = allow_approximation
        self.min_gain = float(min_gain)
        self.result: Optional[Dict[str, Any]] = None

    def optimize(
        self,
        target_metric: str = "throughput",
        time_budget_s: float = 300.0,
        prompts: Optional[Sequence[Any]] = None,
        progress: bool = True,
        space: Optional[Dict[str, List[Any]]] = None,
    ) -> Dict[str, Any]:
        """The best configuration found (a dict for ``apply_config``); the whole record is
        ``self.result`` (trials, skipped configurations, baseline, elapsed time).

        target_metric : "throughput" (decode tokens/s), "latency" (seconds per request),
            "prefill" (prompt tokens/s) or "gpu" (GPU utilization, needs NVML)
        time_budget_s : wall-clock budget for all trials (model reloads included)
        prompts : replaces the workload's prompts (EngineTrials)
        space : knob → candidate values (default: the runner's)
        """
        if target_metric not in METRICS:
            raise ValueError(f"target_metric must be one of {', '.join(METRICS)}, got {target_metric!r}")
        if (
            isinstance(time_budget_s, bool)
            or not isinstance(time_budget_s, (int, float))
            or not time_budget_s > 0
        ):
            raise ValueError(f"time_budget_s must be a positive number of seconds, got {time_budget_s!r}")
        if prompts is not None:
            if not isinstance(self.runner, EngineTrials):
                raise ValueError("prompts apply to trials on a model (EngineTrials)")
            self.runner.prompts = list(prompts)
        key, higher = METRICS[target_metric]
        r = self.runner
        space = dict(space if space is not None else r.space(self.allow_approximation))
        if not self.allow_approximation:
            space.pop("expert_threshold", None)
        start = r.clock()
        best_cfg = dict(r.current())
        trials: List[Dict[str, Any]] = []
        skipped: List[Dict[str, Any]] = []
        seen: Dict[str, Optional[float]] = {}
        bar = _bar(progress, time_budget_s, target_metric)

        def run(cfg: Dict[str, Any]) -> Optional[float]:
            t0 = r.clock()
            try:
                meas, err = r.measure(cfg), None
            except (ValueError, RuntimeError, OSError) as e:  # e.g. out of device memory at load
                if not trials:
                    raise  # the configuration in force cannot run: nothing to compare against
                meas, err = {}, " ".join(str(e).split())
            dt = r.clock() - t0
            val = meas.get(key)
            if val is None and target_metric == "gpu" and err is None:
                raise ValueError("target_metric='gpu' needs NVML GPU figures, which are unavailable here")
            trials.append(
                {
                    "config": dict(cfg),
                    "value": val,
                    "measurements": meas,
                    "seconds": dt,
                    **({"error": err} if err else {}),
                }
            )
            seen[_key(cfg)] = val
            if bar is not None:
                bar.n = min(time_budget_s, r.clock() - start)
                bar.set_postfix_str(f"{len(trials)} trials, best {_best_value(trials, higher):.4g}")
                bar.refresh()
            return val

        best = run(best_cfg)
        stopped = None
        improved = True
        while improved and stopped is None:
            improved = False
            for knob, values in space.items():
                for v in values:
                    cand = dict(best_cfg, **{knob: v})
                    k = _key(cand)
                    if k in seen or any(_key(s["config"]) == k for s in skipped):
                        continue
                    why = r.check(cand)
                    if why is not None:
                        skipped.append({"config": cand, "reason": why})
                        continue
                    longest = max(t["seconds"] for t in trials)
                    if r.clock() - start + longest > time_budget_s:
                        stopped = "time budget"
                        break
                    val = run(cand)
                    if _better(val, best, higher, self.min_gain):
                        best, best_cfg, improved = val, cand, True
                if stopped:
                    break
        if stopped is None:
            stopped = "converged"
        if bar is not None:
            bar.close()
        if trials[-1]["config"] != best_cfg and isinstance(r, EngineTrials):
            cur = r.current()
            r.model.apply_config(
                {k: v for k, v in best_cfg.items() if cur.get(k) != v}
            )  # leave the best in force
        base = trials[0]
        self.result = {
            "target_metric": target_metric,
            "metric_key": key,
            "higher_is_better": higher,
            "config": best_cfg,
            "value": best,
            "baseline": {"config": base["config"], "value": base["value"]},
            "gain": (best / base["value"] if higher else base["value"] / best)
            if best and base["value"]
            else None,
            "trials": trials,
            "skipped": skipped,
            "elapsed_s": r.clock() - start,
            "time_budget_s": time_budget_s,
            "stopped": stopped,
            "space": space,
            "allow_approximation": self.allow_approximation,
            "workload": r.describe(),
        }
        return dict(best_cfg)

    def save(self, path: Union[str, Path]) -> Path:
        """Writes ``self.result`` as JSON (atomically)."""
        if self.result is None:
            raise ValueError("nothing to save: run optimize() first")
        return save_result(self.result, path)

    @staticmethod
    def load(path: Union[str, Path]) -> Dict[str, Any]:
        """A saved result (its ``config`` is what apply_config takes)."""
        return load_result(path)


def save_result(result: Dict[str, Any], path: Union[str, Path]) -> Path:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default))
    os.replace(tmp, path)
    return path


def load_result(path: Union[str, Path]) -> Dict[str, Any]:
    from .config import read_json_file

    d = read_json_file(path)
    if not isinstance(d.get("config"), dict):
        raise ValueError(f"{path}: not a tuner result (no 'config' object)")
    return d


def load_config(path: Union[str, Path]) -> Dict[str, Any]:
    """The configuration of a saved tuner result (for apply_config)."""
    return dict(load_result(path)["config"])


def _key(cfg: Dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


def _better(val: Optional[float], best: Optional[float], higher: bool, gain: float) -> bool:
    if val is None or (isinstance(val, float) and math.isnan(val)):
        return False
    if best is None:
        return True
    return val > best * (1 + gain) if higher else val < best * (1 - gain)


def _best_value(trials: List[Dict[str, Any]], higher: bool) -> float:
    vals = [t["value"] for t in trials if t["value"] is not None]
    return (max(vals) if higher else min(vals)) if vals else float("nan")


def _bar(progress: bool, total: float, metric: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=round(total, 1),
        desc=f"tuning ({metric})",
        unit="s",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}",
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return None
    return str(o)
