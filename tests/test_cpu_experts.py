"""CPU experts (deepseek_fp4_plugin.cpu_experts) against the C++ reference of the expert runner.

Every instruction set this CPU can run is tested, forced by name; the others are skipped here
and run on AVX-512 machines. Units are the paging store's (expert_unit_from_modelopt) with fresh
random weights; outputs start poisoned (NaN); token counts and sizes are odd.

Tolerance: every element within 2^-5·(|ref| + 0.01·rms(ref)) of the reference and at least 70%
of them bit-equal. The kernels sum in float32 in another order than the reference (which sums
in double), so a gate_up or h value may round to the neighbouring bf16 and move y slightly; a
wrong scale, row or column would change nearly every output.
"""

from __future__ import annotations

import pytest
import torch

import deepseek_fp4_plugin  # noqa: F401  (registers the torch ops)
from deepseek_fp4_plugin import cpu_experts as ce
from deepseek_fp4_plugin._ext import _C

P = _C.paging
ISAS = ("avx2", "avx512", "avx512_bf16")


def _available(isa: str) -> str | None:
    try:
        ce.resolve_isa(isa)
        return None
    except NotImplementedError as e:
        return str(e)


ISA_PARAMS = [pytest.param(i, marks=pytest.mark.skipif(_available(i) is not None, reason=str(_available(i))))
              for i in ISAS]


def make_units(hidden: int, inter: int, count: int, seed: int) -> tuple[dict, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lay = dict(P.expert_unit_layout(hidden, inter))
    units = []
    for e in range(count):
        q = [torch.ops.dsfp4.nvfp4_quantize(torch.randn(n, k, generator=g) * s)
             for (n, k), s in (((inter, hidden), 0.05 * (1 + e % 3)), ((inter, hidden), 0.15), ((hidden, inter), 0.05))]
        u = torch.empty(lay["bytes"] + 256, dtype=torch.uint8)
        u = u[(-u.data_ptr()) % 256:][:lay["bytes"]]  # 256-byte aligned, as in the host cache
        P.expert_unit_from_modelopt(hidden, inter, q[0][0].data_ptr(), q[0][1].data_ptr(), float(q[0][2]),
                                    q[1][0].data_ptr(), q[1][1].data_ptr(), float(q[1][2]), q[2][0].data_ptr(),
                                    q[2][1].data_ptr(), float(q[2][2]), u.data_ptr())
        units.append(u)
    return lay, units


def check_close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Asserts the stated tolerance; returns the fraction of bit-equal outputs."""
    assert not torch.isnan(got).any(), "an output was not written"
    g, w = got.float(), want.float()
    rms = w.pow(2).mean().sqrt()
    bad = (g - w).abs() > (w.abs() + 0.01 * rms) / 32
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outputs outside the tolerance"
    return float((got.view(torch.int16) == want.view(torch.int16)).float().mean())


@pytest.fixture(scope="module")
def experts_256():
    return make_units(256, 128, 4, seed=3)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("hidden,inter", [(256, 128), (96, 48), (160, 208)])
def test_matches_reference(isa, hidden, inter):
    lay, units = make_units(hidden, inter, 3, seed=hidden + inter)
    cpu = ce.CpuExperts(hidden, inter, isa=isa, threads=min(2, ce.CpuExperts(hidden, inter).threads), spin_us=50)
    assert cpu.isa == isa
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, hidden + 8, generator=g).to(torch.bfloat16)[:, :hidden]  # row stride > hidden
    jobs, rows, padded = [], [], []
    for i, tokens in enumerate((1, 3, 5, 17, 8)):
        r = torch.randint(0, x.shape[0], (tokens,), generator=g, dtype=torch.int32)
        y = torch.full((tokens, hidden + 16), float("nan"), dtype=torch.bfloat16)  # row stride > hidden
        jobs.append(ce.CpuExpertJob(expert=i % 3, unit=units[i % 3], rows=r, y=y[:, :hidden]))
        rows.append(r)
        padded.append(y)
    stats = cpu.run(5, x, jobs)
    assert stats["experts"] == len(jobs) and stats["weight_bytes"] > 0
    equal = []
    for job, r, y in zip(jobs, rows, padded):
        want = ce.expert_reference(lay, job.unit, x[r.long()])
        equal.append(check_close(job.y, want))
        assert torch.isnan(y[:, hidden:].float()).all()  # nothing written past hidden
    assert min(equal) >= 0.7, equal


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_async_calls_and_callbacks(isa, experts_256):
    lay, units = experts_256
    cpu = ce.CpuExperts(256, 128, isa=isa, threads=2 if ce.CpuExperts(256, 128).threads > 1 else 1)
    x = torch.randn(5, 256).to(torch.bfloat16)
    calls, outs, messages = [], [], {}
    for c in range(5):
        ys = [torch.full((5, 256), float("nan"), dtype=torch.bfloat16) for _ in units]
        jobs = [ce.CpuExpertJob(expert=e, unit=u, rows=None, y=y) for e, (u, y) in enumerate(zip(units, ys))]
        calls.append(cpu.submit(c, x, jobs, on_done=lambda m, c=c: messages.__setitem__(c, m)))
        outs.append(ys)
    for c in reversed(range(5)):
        st = calls[c].wait()
        assert calls[c].done() and st["experts"] == len(units)
        assert messages[c] == ""  # the callback ran before wait() returned
        for e, y in enumerate(outs[c]):
            check_close(y, ce.expert_reference(lay, units[e], x))


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_fault_names_layer_and_expert_and_pool_survives(isa, experts_256):
    lay, units = experts_256
    cpu = ce.CpuExperts(256, 128, isa=isa, threads=1)
    x = torch.randn(3, 256).to(torch.bfloat16)
    ys = [torch.full((3, 256), float("nan"), dtype=torch.bfloat16) for _ in units]
    jobs = [ce.CpuExpertJob(expert=10 + e, unit=u, rows=None, y=y) for e, (u, y) in enumerate(zip(units, ys))]
    cpu.inject_fault(4, 12)
    with pytest.raises(RuntimeError, match="layer 4 expert 12: injected fault"):
        cpu.run(4, x, jobs)
    assert torch.isnan(ys[2].float()).all()  # the failed job's output is untouched
    for e in (0, 1, 3):
        check_close(ys[e], ce.expert_reference(lay, units[e], x))

    bad = units[0].clone()
    bad[lay["down_qscale"] + 5] = 0x7F  # e4m3 NaN block scale
    y = torch.full((3, 256), float("nan"), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="layer 9 expert 77: a down block scale .* NaN"):
        cpu.run(9, x, [ce.CpuExpertJob(expert=77, unit=bad, rows=None, y=y)])
    assert torch.isnan(y.float()).all()

    cpu.run(4, x, jobs)  # still usable, and the injected fault was used up
    for e in range(len(units)):
        check_close(ys[e], ce.expert_reference(lay, units[e], x))


def test_bad_arguments(experts_256):
    lay, units = experts_256
    cpu = ce.CpuExperts(256, 128, threads=1)
    x = torch.randn(4, 256).to(torch.bfloat16)
    y = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must be a CPU bfloat16"):
        cpu.run(0, x.float(), [ce.CpuExpertJob(0, units[0], None, y)])
    with pytest.raises(ValueError, match=r"rows\[1\] = 4 is outside x's 4 rows"):
        cpu.run(0, x, [ce.CpuExpertJob(0, units[0], torch.tensor([0, 4], dtype=torch.int32), y)])
    with pytest.raises(ValueError, match="16-byte aligned"):
        cpu.run(0, x, [ce.CpuExpertJob(0, units[0].data_ptr() + 4, None, y)])
    with pytest.raises(ValueError, match="layout is for"):
        ce.CpuExperts(512, 128, layout=lay)
    assert torch.equal(y, torch.zeros_like(y))
    with pytest.raises(ValueError, match="core"):
        ce.CpuExperts(256, 128, cores=[4096])
    assert cpu.read_bandwidth(torch.ones(1 << 22, dtype=torch.uint8), reps=1) > 0


def test_isa_choice_and_refusal():
    with pytest.raises(NotImplementedError, match=r"need AVX2 and FMA.*cpu_experts to \"off\""):
        ce.resolve_isa("auto", {})
    avx2 = {"avx2": True, "fma": True, "os_avx": True}
    assert ce.resolve_isa("auto", avx2) == "avx2"
    with pytest.raises(NotImplementedError, match="AVX512F, AVX512BW, AVX512VL"):
        ce.resolve_isa("avx512", avx2)
    wide = dict(avx2, avx512f=True, avx512bw=True, avx512vl=True, os_avx512=True)
    assert ce.resolve_isa("auto", wide) == "avx512"
    assert ce.resolve_isa("auto", dict(wide, avx512_bf16=True)) == "avx512_bf16"
    with pytest.raises(ValueError, match="unknown isa"):
        ce.resolve_isa("sse", avx2)
    missing = [i for i in ISAS if _available(i) is not None]
    for isa in missing:  # a pool refuses what this CPU lacks
        with pytest.raises(NotImplementedError, match="lacks"):
            ce.CpuExperts(256, 128, isa=isa)
    assert ce.CpuExperts(256, 128, threads=1).isa == ce.resolve_isa("auto")
