"""jaxchunk.timing: the one timing helper of `jaxchunk bench` and the experiments."""
import dataclasses
import time

import pytest

from jaxchunk.timing import Timing, timeit

SLEEP_S = 0.05


def test_a_known_sleep_is_timed():
    timing = timeit(lambda: time.sleep(SLEEP_S), repeats=4)
    assert len(timing.samples_s) == 4
    assert timing.min_s <= timing.median_s <= timing.max_s
    # A sleep never ends early; the upper bound is generous (a shared, busy machine).
    assert SLEEP_S <= timing.min_s and timing.median_s < SLEEP_S + 0.5
    assert timing.first_s >= SLEEP_S and timing.compile_s >= 0


def test_setup_runs_untimed_before_every_call_and_feeds_it():
    calls = []

    def setup():
        time.sleep(4 * SLEEP_S)  # untimed: must not show in the samples
        calls.append(len(calls))
        return (len(calls) - 1,)

    seen = []
    timing = timeit(lambda i: seen.append(i), repeats=3, setup=setup)
    assert seen == [0, 1, 2, 3]  # the warm-up call, then 3 timed ones, each with its own setup
    assert timing.max_s < 4 * SLEEP_S


def test_jax_results_are_waited_for(monkeypatch):
    """JAX dispatch is asynchronous: both the setup's and the call's results are blocked on."""
    jax = pytest.importorskip("jax")
    waited = []
    monkeypatch.setattr(jax, "block_until_ready", lambda value: waited.append(value) or value)
    timeit(lambda x: ("result", x), repeats=2, setup=lambda: ("input",))
    assert waited == [("input",), ("result", "input")] * 3


def test_timing_is_a_frozen_record_with_a_summary():
    timing = Timing(first_s=1.0, samples_s=(0.3, 0.1, 0.2))
    assert (timing.min_s, timing.median_s, timing.max_s) == (0.1, 0.2, 0.3)
    assert timing.compile_s == pytest.approx(0.8)
    assert Timing(first_s=0.1, samples_s=(0.2,)).compile_s == 0  # floored: a warm call was slower
    assert timing.summary() == {"first_s": 1.0, "min_s": 0.1, "median_s": 0.2, "max_s": 0.3,
                                "samples_s": [0.3, 0.1, 0.2]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        timing.first_s = 2.0


def test_at_least_one_timed_call():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timeit(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="at least one"):
        Timing(first_s=0.0, samples_s=())
