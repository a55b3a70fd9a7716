import numpy as np
import pytest

import edgeopt.measure.latency
from edgeopt.measure.latency import cpu_fingerprint, int8_warning, measure


class Clock:
    """A virtual ``time`` for the benchmark: each model call advances it by that model's cost, so the
    protocol is checked exactly, whatever the machine's load."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def perf_counter(self):
        return self.now


class Model:
    def __init__(self, clock, name, ms, first_ms):
        self.clock, self.name, self.ms, self.first_ms, self.calls = clock, name, ms, first_ms, 0

    def __call__(self, x):
        self.clock.now += (self.first_ms if self.calls == 0 else self.ms) / 1e3
        self.calls += 1
        self.clock.calls.append(self.name)
        return x


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(edgeopt.measure.latency, "time", c)
    return c


def test_protocol_times_the_first_inference_apart_and_interleaves_the_rounds(clock):
    fast, slow = Model(clock, "fast", 0.5, first_ms=30.0), Model(clock, "slow", 2.0, first_ms=50.0)
    lat = measure({"fast": fast, "slow": slow}, np.zeros(1), warmup=3, iterations=20, rounds=4)
    assert fast.calls == slow.calls == 1 + 3 + 20 and lat["fast"].iterations == lat["slow"].iterations == 20
    assert lat["fast"].first_ms == pytest.approx(30.0) and lat["slow"].first_ms == pytest.approx(50.0)
    assert lat["fast"].p50_ms == pytest.approx(0.5) and lat["slow"].p50_ms == pytest.approx(2.0)
    for L in lat.values():
        assert L.p50_ms <= L.p95_ms <= L.p99_ms and L.noise_pct == pytest.approx(0.0)
    timed = clock.calls[2 * (1 + 3):]  # after each model's first call and warm-up
    assert timed == (["fast"] * 5 + ["slow"] * 5) * 4  # interleaved: 4 rounds of 5 each, in turn


def test_time_budget_replaces_the_count(clock):
    m = Model(clock, "m", 1.0, first_ms=1.0)
    lat = measure({"m": m}, np.zeros(1), warmup=0, iterations=10, rounds=2, time_budget_s=0.2)
    assert lat["m"].iterations == 200 and clock.now == pytest.approx(0.001 + 0.2)  # 100 a round, 1 ms each


def test_fingerprint_and_int8_warning():
    fp = cpu_fingerprint()
    assert fp["cores"] >= 1 and fp["onnxruntime"] and fp["openvino"] and len(fp["id"]) == 12
    assert int8_warning({"cpu": "x", "isa": ["avx2"]}) and "VNNI" in int8_warning({"cpu": "x", "isa": ["avx2"]})
    assert int8_warning({"cpu": "x", "isa": ["avx2", "avx512_vnni"]}) is None
