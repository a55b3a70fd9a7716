import time

import numpy as np

from edgeopt.benchmark import cpu_fingerprint, int8_warning, measure


class Sleeper:
    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self, x):
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_protocol_counts_first_inference_apart_and_orders_percentiles():
    fast, slow = Sleeper(0.0005), Sleeper(0.002)
    lat = measure({"fast": fast, "slow": slow}, np.zeros(1), warmup=3, iterations=20, rounds=4)
    assert fast.calls == 1 + 3 + 20 and lat["fast"].iterations == 20
    for L in lat.values():
        assert L.p50_ms <= L.p95_ms <= L.p99_ms
    assert 2.0 < lat["slow"].p50_ms / lat["fast"].p50_ms < 8  # ~4x, measured in the same loop


def test_time_budget_replaces_the_count():
    s = Sleeper(0.001)
    t = time.perf_counter()
    lat = measure({"s": s}, np.zeros(1), warmup=0, iterations=10, rounds=2, time_budget_s=0.2)
    assert 0.18 < time.perf_counter() - t < 1.0 and lat["s"].iterations > 50


def test_fingerprint_and_int8_warning():
    fp = cpu_fingerprint()
    assert fp["cores"] >= 1 and fp["onnxruntime"] and fp["openvino"] and len(fp["id"]) == 12
    assert int8_warning({"cpu": "x", "isa": ["avx2"]}) and "VNNI" in int8_warning({"cpu": "x", "isa": ["avx2"]})
    assert int8_warning({"cpu": "x", "isa": ["avx2", "avx512_vnni"]}) is None
