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


def test_decode_rows_are_timed_in_interleaved_rounds(monkeypatch):
    """Decode rows (inference, host-bound and noisy) take the same rounds as the other cases: each
    callable timed once per round, the ratio the median of the within-round ratios."""
    cost = {"base": 2.0, "fused": 3.0, "naive": 5.0}
    modes, timed = [], []

    def fake_build(case, impls):
        assert case.p == 0.0 and set(impls) == {"base", "fused", "naive"}
        x, dy = torch.zeros(case.M, case.K), torch.zeros(case.M, case.N)
        return x, dy, {impl: ((lambda x, impl=impl: impl), []) for impl in impls}

    def timer(fn, *args, **kwargs):
        timed.append(fn())
        return cost[timed[-1]] * (1 + 0.1 * len(timed))  # a clock that drifts

    monkeypatch.setattr(LB, "build", fake_build)
    monkeypatch.setattr(LB, "step_fn", lambda fwd, params, x, dy, mode: modes.append(mode) or (lambda: fwd(x)))
    monkeypatch.setattr(LB, "gpu_time_ms", timer)
    monkeypatch.setattr(LB, "graph_time_ms", timer)
    rows = LB.time_decode(16, 8, 8, 2, rounds=4)
    assert set(modes) == {"infer"}
    assert {r.case for r in rows} == {"16x8->8 r2 p0 decode"} and {r.impl for r in rows} == {"base", "fused", "naive"}
    assert timed.count("fused") == 8  # 4 eager rounds, 4 graph rounds
    by = {r.impl: r for r in rows}
    assert len(by["fused"].extra["round_ratios"]) == 4 and len(by["naive"].extra["graph_round_ratios"]) == 4
    assert 1.3 < by["fused"].ratio < 1.7 and 2.2 < by["naive"].ratio < 2.8  # 1.5x and 2.5x, drift within rounds


def test_grid_shards_partition_the_grid_and_mix_sizes():
    grid = list(LB.full_grid())
    assert len(grid) == 3 * 6 * 3 * 3  # M x (K, N) x r x p, the grid
    shards = [LB.shard_cases(grid, (i, 3)) for i in (1, 2, 3)]
    assert sorted(map(repr, sum(shards, []))) == sorted(map(repr, grid))
    assert all({c.M for c in s} == {2048, 8192, 16384} for s in shards)
    with pytest.raises(ValueError, match="1 <= I <= N"):
        LB.shard_cases(grid, (4, 3))


def test_match_selects_cases_by_name():
    grid = list(LB.full_grid())
    picked = LB.match_cases(grid, "^2048x.* r64 ")
    assert len(picked) == 6 * 3 and all(c.M == 2048 and c.r == 64 for c in picked)
    assert LB.match_cases(grid, "") == grid
    with pytest.raises(ValueError, match="regular expression"):
        LB.match_cases(grid, "r64 (")


def _row(case, impl, ratio, graph_ratio):
    return _bench.Row("linear", case, impl, 1.0, ratio, extra={"graph_ratio": graph_ratio})


def test_versus_naive_lists_each_case_where_fused_is_slower():
    rows = [_row("a fwd", "base", 1.0, 1.0), _row("a fwd", "fused", 1.2, 1.1), _row("a fwd", "naive", 1.5, 1.05),
            _row("b fwd", "fused", 2.0, None), _row("b fwd", "naive", 1.9, None),
            _row("c kept", "fused", 1.0, None)]  # a memory row has no naive partner: not compared
    found = LB.versus_naive(rows)
    assert found["eager"] == ([("b fwd", 2.0, 1.9)], 2)
    assert found["graph"] == ([("a fwd", 1.1, 1.05)], 1)


def test_graph_timings_only_for_the_impls_asked(monkeypatch):
    case = LB.Case(16, 8, 8, 2, 0.0, torch.float32)
    graphed = []

    def fake_build(case, impls):
        x, dy = torch.zeros(case.M, case.K), torch.zeros(case.M, case.N)
        return x, dy, {impl: ((lambda x, impl=impl: impl), []) for impl in impls}

    monkeypatch.setattr(LB, "build", fake_build)
    monkeypatch.setattr(LB, "step_fn", lambda fwd, params, x, dy, mode: (lambda: fwd(x)))
    monkeypatch.setattr(LB, "gpu_time_ms", lambda fn, *a: 1.0)
    monkeypatch.setattr(LB, "graph_time_ms", lambda fn, *a: graphed.append(fn()) or 2.0)
    rows = LB.time_case(case, modes=("fwd",), impls=("fused", "naive", "peft"), with_memory=False,
                        rounds=2, graph_impls=("fused", "naive"))
    assert sorted(set(graphed)) == ["base", "fused", "naive"] and len(graphed) == 6
    by = {r.impl: r for r in rows}
    assert by["fused"].extra["graph_ratio"] == 1.0 and by["peft"].extra["graph_ratio"] is None


def test_bench_cli_rejects_a_bad_shard(capsys):
    from lora_kernels.__main__ import main

    with pytest.raises(SystemExit):
        main(["bench", "--only", "linear", "--shard", "3/2"])
    assert "1 <= I <= N" in capsys.readouterr().err
