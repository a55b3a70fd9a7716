from edgeopt.select.pareto import select


def m(acc, lat, size, drop=0.0):
    return {"accuracy": acc, "latency_p50_ms": lat, "size_mb": size, "accuracy_drop": drop}


def test_front_constraints_and_objective():
    metrics = {
        "fast": m(0.95, 0.1, 0.5, drop=1.0),
        "small": m(0.95, 0.3, 0.1, drop=1.0),
        "accurate": m(0.99, 1.0, 2.0, drop=0.0),
        "dominated": m(0.94, 0.4, 0.6, drop=1.5),
        "too_inaccurate": m(0.80, 0.01, 0.01, drop=15.0),
        "broken": None,
    }
    c = {"max_accuracy_drop": 2.0, "max_latency_ms": None, "max_size_mb": None}
    status = {v.variant: v.status for v in select(metrics, c, "latency").verdicts}
    assert status == {"fast": "front", "small": "front", "accurate": "front", "dominated": "dominated",
                      "too_inaccurate": "infeasible", "broken": "failed"}
    assert select(metrics, c, "latency").winner == "fast"
    assert select(metrics, c, "size").winner == "small"
    assert select(metrics, c, "accuracy").winner == "accurate"
    sel = select(metrics, {**c, "max_size_mb": 0.2}, "latency")
    assert sel.winner == "small" and "small" in sel.reason


def test_no_feasible_variant_means_no_winner():
    sel = select({"a": m(0.5, 1, 1, drop=40)}, {"max_accuracy_drop": 1.0}, "latency")
    assert sel.winner is None and "no variant meets the constraints" in sel.reason
    assert sel.verdicts[0].reasons == ["val accuracy drop 40.00 pt > 1.0 pt"]


def test_ties_break_deterministically():
    metrics = {"b": m(0.9, 0.1, 0.2), "a": m(0.9, 0.1, 0.2)}
    assert select(metrics, {}, "latency").winner == "a"
    # both on the front (x smaller, y more accurate) and tied on the objective: the smaller one wins
    metrics = {"x": m(0.9, 0.1, 0.2), "y": m(0.95, 0.1, 0.3)}
    sel = select(metrics, {}, "latency")
    assert set(sel.front) == {"x", "y"} and sel.winner == "x" and "ties on latency with y" in sel.reason
    # tied on the objective and the size: fewer MACs, whatever the names' order
    metrics = {"a": {**m(0.9, 0.1, 0.2), "macs": 2e6}, "b": {**m(0.95, 0.1, 0.2), "macs": 1e6}}
    assert select(metrics, {}, "latency").winner == "b"
