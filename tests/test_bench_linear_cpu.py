"""The fused-linear benchmark's measurement, on CPU with stand-in timers: interleaved rounds, the
order rotated per round, and ratios taken within a round (what the GPU figures rest on)."""
import pytest
import torch

from lora_kernels import _bench
from lora_kernels._bench import linear as LB


def test_interleaved_rounds_rotate_the_order_and_ratios_stay_within_a_round():
    seen = []
    ms = _bench.interleaved_ms({"a": "A", "b": "B", "c": "C"}, lambda f: seen.append(f) or len(seen), rounds=4)
    assert seen == list("ABC" "BCA" "CAB" "ABC")
    assert ms == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}
    assert _bench.round_ratios(ms["b"], ms["a"]) == [2.0, 4 / 6, 9 / 8, 11 / 10]
    assert _bench.round_ratios([1.0, None], [1.0, 2.0]) is None


def test_linear_rows_report_the_median_of_per_round_ratios(monkeypatch):
    """A clock that drifts from call to call: the median of two separate medians would read the
    drift; the within-round ratios read the true 1.5x of 'fused' to 'base'."""
    case = LB.Case(16, 8, 8, 2, 0.0, torch.float32)
    clock = [1.0]
    cost = {"base": 2.0, "fused": 3.0, "naive": 4.0}

    def fake_build(case, impls):
        x, dy = torch.zeros(case.M, case.K), torch.zeros(case.M, case.N)
        return x, dy, {impl: ((lambda x, impl=impl: impl), []) for impl in impls}

    def timer(fn, *args, **kwargs):
        clock[0] *= 1.1  # every timing runs 10% slower than the one before it
        return cost[fn()] * clock[0]

    monkeypatch.setattr(LB, "build", fake_build)
    monkeypatch.setattr(LB, "step_fn", lambda fwd, params, x, dy, mode: (lambda: fwd(x)))
    monkeypatch.setattr(LB, "gpu_time_ms", timer)
    monkeypatch.setattr(LB, "graph_time_ms", timer)
    rows = LB.time_case(case, modes=("fwd",), impls=("fused", "naive"), with_memory=False, rounds=3)
    by = {r.impl: r for r in rows}
    assert set(by) == {"base", "fused", "naive"}
    # rounds time (base, fused, naive), (fused, naive, base), (naive, base, fused): within a round a
    # ratio is off by 1.1^(positions apart), fused/base by 1.1, 1.1^-2, 1.1 and naive/base by
    # 1.1^2, 1.1^-1, 1.1^-1; a ratio of separate medians would be off by the whole call's drift
    assert by["fused"].ratio == pytest.approx(1.5 * 1.1)
    assert by["naive"].ratio == pytest.approx(2.0 / 1.1)
    assert by["fused"].extra["graph_ratio"] == pytest.approx(1.5 * 1.1)
    assert len(by["fused"].extra["round_ratios"]) == 3 and "rounds" in by["fused"].note
