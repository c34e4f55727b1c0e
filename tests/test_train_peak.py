"""The MFU peak: a float32 matmul timed once per machine and cached by device kind and CPU model
(the fixed 160 GFLOP/s was another machine's)."""

import json
import os

import pytest

from train import metrics


def test_peak_is_measured_once_and_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # a quiet machine
    calls = []

    def fake_time(*a, **k):
        calls.append(1)
        return 123.0e9

    monkeypatch.setattr(metrics, "time_matmul", fake_time)
    metrics.measured_peak_flops.cache_clear()
    key = metrics.peak_key()
    assert metrics.cpu_model() in key and key.startswith("cpu|")
    assert metrics.measured_peak_flops() == 123.0e9
    metrics.measured_peak_flops.cache_clear()
    assert metrics.measured_peak_flops() == 123.0e9 and len(calls) == 1  # read from the file
    saved = json.load(open(tmp_path / "jaxarith" / "peak.json"))
    assert saved[key]["flops"] == 123.0e9 and saved[key]["load_average"] == 0.1
    # another machine (key) is measured separately; a busy machine's timing is not cached
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    assert metrics.measured_peak_flops("cpu|cpu|Other CPU") == 123.0e9 and len(calls) == 2
    assert set(json.load(open(tmp_path / "jaxarith" / "peak.json"))) == {key}
    # fake CPU devices share the host: the total is the host's peak, not 8 x
    metrics.measured_peak_flops.cache_clear()
    assert metrics.total_peak_flops(8) == 123.0e9
    metrics.measured_peak_flops.cache_clear()


def test_time_matmul_counts_two_n_cubed_flops(monkeypatch):
    """2 n^3 FLOPs over the best timed call: with a clock that advances 0.25 s between
    readings, n = 64 gives 2 * 64^3 / 0.25 FLOP/s."""
    ticks = iter(i * 0.25 for i in range(100))
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(ticks))
    assert metrics.time_matmul(64, repeats=3) == pytest.approx(2 * 64**3 / 0.25)
