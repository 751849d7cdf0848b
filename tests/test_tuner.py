"""AutoTuner: the search on a simulated cost model (budget, fit, the known optimum), JSON,
and a real trial run on the tiny model."""

import itertools
import json

import pytest

from deepseek_fp4_plugin import AutoTuner, DeepseekInference
from deepseek_fp4_plugin.tiny import make_tiny
from deepseek_fp4_plugin.tuner import EngineTrials, TrialRunner, load_config

SPACE = {
    "batch_size": [1, 2, 4, 8],
    "use_cuda_graph": [False, True],
    "max_gpu_layers": [2, 4, 6, 8],
    "prefetch_layers": [0, 1, 2, 3, 4],
    "expert_threshold": [0.0, 0.1],
}
START = {
    "batch_size": 1,
    "use_cuda_graph": False,
    "max_gpu_layers": 2,
    "prefetch_layers": 1,
    "expert_threshold": 0.0,
}


class Simulated(TrialRunner):
    """A cost model: throughput grows with batch and resident layers, CUDA graphs help,
    prefetching peaks at 2 layers, the threshold helps (approximately); memory is
    2.5 GiB per GPU layer + 1 GiB per batch row + 0.5 per prefetched layer within 20 GiB.
    A trial takes 10 s, plus 20 s when it changes the memory plan (a reload)."""

    def __init__(self, budget_gib=20.0):
        self.t = 0.0
        self.budget = budget_gib
        self.cur = dict(START)
        self.measured = []

    def memory(self, c):
        return 2.5 * c["max_gpu_layers"] + 1.0 * c["batch_size"] + 0.5 * c["prefetch_layers"]

    def throughput(self, c):
        return (
            10
            * c["batch_size"] ** 0.7
            * (1 + 0.15 * c["max_gpu_layers"])
            * (1.4 if c["use_cuda_graph"] else 1.0)
            * (1.0 - 0.05 * abs(c["prefetch_layers"] - 2))
            * (1.3 if c["expert_threshold"] else 1.0)
        )

    def check(self, c):
        m = self.memory(c)
        return None if m <= self.budget else f"needs {m} GiB of {self.budget}"

    def measure(self, c):
        assert self.check(c) is None, "a configuration that does not fit was run"
        reload = any(c[k] != self.cur[k] for k in ("batch_size", "max_gpu_layers"))
        self.t += 10 + (20 if reload else 0)
        self.cur = dict(c)
        self.measured.append(dict(c))
        return {"decode_tokens_per_s": self.throughput(c), "latency_s": 1.0 / self.throughput(c)}

    def clock(self):
        return self.t

    def space(self, allow_approximation):
        return dict(SPACE)

    def current(self):
        return dict(START)


def brute_force(sim, approximate):
    best, best_cfg = -1, None
    for values in itertools.product(*SPACE.values()):
        c = dict(zip(SPACE, values))
        if not approximate and c["expert_threshold"]:
            continue
        if sim.check(c) is None and sim.throughput(c) > best:
            best, best_cfg = sim.throughput(c), c
    return best_cfg


def test_finds_the_known_optimum_and_never_runs_what_does_not_fit():
    sim = Simulated()
    tuner = AutoTuner(sim, min_gain=0.0)
    best = tuner.optimize("throughput", time_budget_s=10_000, progress=False)
    want = brute_force(sim, approximate=False)
    assert best == want
    assert best["expert_threshold"] == 0.0  # approximation was not allowed
    assert all(c["expert_threshold"] == 0.0 for c in sim.measured)
    assert all(sim.check(c) is None for c in sim.measured)
    r = tuner.result
    assert r["stopped"] == "converged" and r["gain"] > 1
    assert r["skipped"] and all("needs" in s["reason"] for s in r["skipped"])
    assert all(sim.check(s["config"]) is not None for s in r["skipped"])
    # with approximation allowed, the threshold is searched too
    sim2 = Simulated()
    best2 = AutoTuner(sim2, allow_approximation=True, min_gain=0.0).optimize(
        time_budget_s=10_000, progress=False
    )
    assert best2 == brute_force(sim2, approximate=True) and best2["expert_threshold"] == 0.1


def test_respects_the_time_budget():
    sim = Simulated()
    tuner = AutoTuner(sim)
    best = tuner.optimize("throughput", time_budget_s=120, progress=False)
    r = tuner.result
    assert r["stopped"] == "time budget"
    assert r["elapsed_s"] <= 120  # no trial started that could overrun
    assert len(sim.measured) < 10
    assert sim.check(best) is None
    assert best in [t["config"] for t in r["trials"]]  # only measured configurations are proposed
    assert r["value"] == max(t["value"] for t in r["trials"])


def test_latency_target_minimizes():
    sim = Simulated()
    best = AutoTuner(sim, min_gain=0.0).optimize("latency", time_budget_s=10_000, progress=False)
    assert best == brute_force(Simulated(), approximate=False)  # latency = 1 / throughput here


def test_bad_arguments():
    with pytest.raises(ValueError, match="target_metric"):
        AutoTuner(Simulated()).optimize("speed", progress=False)
    with pytest.raises(ValueError, match="time_budget_s"):
        AutoTuner(Simulated()).optimize(time_budget_s=0, progress=False)
    with pytest.raises(ValueError, match="AutoTuner takes"):
        AutoTuner(42)
    with pytest.raises(ValueError, match="model folder"):
        AutoTuner({"memory_limit": 1})
    with pytest.raises(ValueError, match="nothing to save"):
        AutoTuner(Simulated()).save("x.json")


def test_save_and_load(tmp_path):
    tuner = AutoTuner(Simulated())
    best = tuner.optimize(time_budget_s=10_000, progress=False)
    path = tuner.save(tmp_path / "t" / "tuned.json")
    assert load_config(path) == best
    assert AutoTuner.load(path)["trials"] == json.loads(path.read_text())["trials"]
    (tmp_path / "bad.json").write_text('{"trials": []}')
    with pytest.raises(ValueError, match="not a tuner result"):
        load_config(tmp_path / "bad.json")


def test_real_trials_on_the_tiny_model(tmp_path):
    make_tiny(tmp_path, seed=1)
    model = DeepseekInference(tmp_path, device="cpu", max_seq_len=64, max_batch_size=1)
    runner = EngineTrials(model, prompts=[[5, 6, 7, 8], [9, 10, 11], [12, 13]], max_tokens=3)
    assert runner.space(False) == {"batch_size": [1, 2]}  # resident on the CPU: batch only
    assert runner.check({"batch_size": 2, "use_cuda_graph": False}) is None
    tuner = AutoTuner(runner)
    best = tuner.optimize(time_budget_s=300, progress=False, space={"batch_size": [1, 2]})
    r = tuner.result
    assert [t["config"]["batch_size"] for t in r["trials"]] == [1, 2]
    assert all(t["value"] > 0 for t in r["trials"])
    assert model.engine.max_batch_size == best["batch_size"]  # the best is left in force
    model.apply_config(best)  # and applies as a config
    with pytest.raises(ValueError, match="gpu"):
        AutoTuner(runner).optimize("gpu", time_budget_s=300, progress=False, space={})


def test_a_failed_trial_is_recorded_and_the_search_goes_on():
    class Flaky(Simulated):
        def measure(self, c):
            if c["max_gpu_layers"] == 4:
                self.t += 5
                raise RuntimeError("CUDA out of memory while loading")
            return super().measure(c)

    sim = Flaky()
    tuner = AutoTuner(sim, min_gain=0.0)
    best = tuner.optimize(time_budget_s=10_000, progress=False)
    failed = [t for t in tuner.result["trials"] if "error" in t]
    assert failed and all(
        t["config"]["max_gpu_layers"] == 4 and "out of memory" in t["error"] for t in failed
    )
    assert best["max_gpu_layers"] != 4 and sim.check(best) is None
