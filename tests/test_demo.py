"""`python -m packed_vit demo`'s timing (packed_vit.demo): warm-up first, then interleaved rounds, the median.
The end-to-end run of the demo is tests/test_cli.py's."""

from packed_vit import demo


def test_timing_warms_up_then_interleaves_the_sides_and_takes_the_median(monkeypatch):
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(demo.time, "perf_counter", lambda: float(next(clock)))
    durations = {"a": iter([5, 1, 9, 3, 7, 2, 4]), "b": iter([50, 10, 90])}

    def side(name):
        def run():
            calls.append(name)
            for _ in range(next(durations[name], 0) - 1):
                next(clock)  # the call takes that many clock ticks

        return run

    monkeypatch.setattr(demo, "WARMUP_CALLS", 1)
    monkeypatch.setattr(demo, "TIMING_BUDGET_S", 0.0)  # MIN_ROUNDS only
    medians, rounds = demo.interleaved_median_seconds({"a": side("a"), "b": side("b")})
    assert rounds == demo.MIN_ROUNDS == 3
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then one call of each per round
    # timed durations: a 1, 9, 3 (its warm-up 5 untimed) -> median 3; b 10, 90 and a 0-tick call -> median 10
    assert medians == {"a": 3.0, "b": 10.0}


def test_timing_takes_more_rounds_within_its_budget_and_stops_at_the_maximum(monkeypatch):
    monkeypatch.setattr(demo, "TIMING_BUDGET_S", 1e9)
    medians, rounds = demo.interleaved_median_seconds({"a": lambda: None})
    assert rounds == demo.MAX_ROUNDS and medians["a"] >= 0


def test_timing_skips_the_warm_up_of_a_run_that_is_warm_already(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "TIMING_BUDGET_S", 0.0)
    demo.interleaved_median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warm=("b",))
    assert calls == ["a"] + ["a", "b"] * demo.MIN_ROUNDS
