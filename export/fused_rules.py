"""The early-ranking rules as graph nodes: one schedule layer's keep-mask computed inside the fused graph.

Each function mirrors a rule of :mod:`edge_sel.runtime.rerank.rules` (GRATING-style progressive pruning, EuroSys'26)
with ONNX operators only, in float64 like the reference: ``TopK`` sorts (ties: the lower index first, as the
reference's stable argsort), cluster boundaries are the gaps of the sorted scores, and the keep-set is a mask over
the live rows. A rule not listed in :data:`FUSED_RULES` has no in-graph form and is refused.
"""

from __future__ import annotations

from .fused_graph import Net


def _all_finite(net: Net, s: str) -> str:
    """Scalar bool: every score is finite (a non-finite score prunes nothing)."""
    bad = net.op("Or", net.op("IsNaN", s), net.op("IsInf", s))
    return net.op("Not", net.op("Cast", net.op("ReduceMax", net.op("Cast", bad, to=7), axes=[0], keepdims=0), to=9))


def _scalar(net: Net, x: str, i: str) -> str:
    """Element ``i`` (a scalar int64 tensor) of the 1-D tensor ``x``, as a scalar."""
    return net.op("Gather", x, i, axis=0)


def rank_keep(net: Net, s: str, n: str, n_call: str, keep: float, at_least: int) -> str:
    """Rule ``rank``: the best ``max(ceil(keep * n_call), at_least)`` of the ``n`` live rows, ties at the cut kept."""
    want = net.op("Ceil", net.op("Sub", net.op("Mul", net.op("Cast", n_call, to=11), net.const(keep, "float64")),
                                  net.const(1e-9, "float64")))
    keep_n = net.op("Min", n, net.op("Max", net.op("Cast", want, to=7), net.const(at_least)))
    top = net.op("TopK", s, net.op("Reshape", keep_n, net.const([1])), outputs=2, axis=0, largest=1, sorted=1)[0]
    cut = _scalar(net, top, net.op("Sub", keep_n, net.const(1)))
    mask = net.op("GreaterOrEqual", s, cut)
    return net.op("Or", mask, net.op("Not", _all_finite(net, s)))


def boundary_spread(net: Net, s: str, n: str, k: int) -> str:
    """Population standard deviation of the best ``min(n, 2k)`` scores; 1 when it is 0 or not finite."""
    m = net.op("Min", n, net.const(2 * k))
    top = net.op("TopK", s, net.op("Reshape", m, net.const([1])), outputs=2, axis=0, largest=1, sorted=1)[0]
    mean = net.op("ReduceMean", top, axes=[0], keepdims=1)
    d = net.op("Sub", top, mean)
    sd = net.op("Sqrt", net.op("ReduceMean", net.op("Mul", d, d), axes=[0], keepdims=0))
    ok = net.op("And", net.op("Greater", sd, net.const(1e-12, "float64")),
                net.op("Not", net.op("Or", net.op("IsNaN", sd), net.op("IsInf", sd))))
    return net.op("Where", ok, sd, net.const(1.0, "float64"))


def margin_keep(net: Net, s: str, n: str, k: int, margin: str, cluster_gap: float, at_least: int) -> str:
    """Rules ``margin``/``spread``: sort descending, split into clusters at gaps wider than ``cluster_gap * margin``,
    keep each cluster whose best member reaches ``s_K - margin``; at least ``min(n, at_least)`` rows (the best of the
    dropped ones taken back). ``margin``: a scalar float64 tensor."""
    margin = net.op("Max", margin, net.const(0.0, "float64"))
    gap = net.op("Max", net.op("Mul", margin, net.const(cluster_gap, "float64")), net.const(0.0, "float64"))
    vals, idx = net.op("TopK", s, net.op("Reshape", n, net.const([1])), outputs=2, axis=0, largest=1, sorted=1)
    kth = _scalar(net, vals, net.op("Sub", net.op("Min", n, net.const(k)), net.const(1)))
    slack = net.op("Mul", net.const(1e-9, "float64"), net.op("Max", net.const(1.0, "float64"), net.op("Abs", kth)))
    threshold = net.op("Sub", net.op("Sub", kth, margin), slack)
    reach = net.op("ReduceSum", net.op("Cast", net.op("GreaterOrEqual", vals, threshold), to=7), net.const([0]), keepdims=0)
    # a cut between sorted positions i-1 and i (i = 1..n-1) where the gap is wider than ``gap``
    pos = net.op("Range", net.const(1), n, net.const(1))
    gaps = net.op("Sub", net.op("Slice", vals, net.const([0]), net.const([-1]), net.const([0])),
                  net.op("Slice", vals, net.const([1]), net.const([2**62]), net.const([0])))
    cut_here = net.op("And", net.op("Greater", gaps, gap), net.op("GreaterOrEqual", pos, reach))
    ends = net.op("Where", cut_here, pos, n)
    kept = net.op("ReduceMin", net.op("Concat", ends, net.op("Reshape", n, net.const([1])), axis=0), keepdims=0)
    kept = net.op("Max", kept, net.op("Min", n, net.const(at_least)))
    rank = net.op("ScatterElements", net.op("ConstantOfShape", net.op("Reshape", n, net.const([1])),
                                           value=net.helper.make_tensor("zero", 7, [1], [0])),
                  idx, net.op("Range", net.const(0), n, net.const(1)), axis=0)
    mask = net.op("Less", rank, kept)
    everything = net.op("Or", net.op("LessOrEqual", n, net.const(at_least)), net.op("Not", _all_finite(net, s)))
    return net.op("Or", mask, everything)


def keep_mask(net: Net, rule: str, s: str, n: str, n_call: str, param: float, k: int, floor: int | None,
              cluster_gap: float) -> str:
    """Bool ``[n]`` keep-mask of ``rule`` over the float64 scores ``s`` of the ``n`` live rows (``n``, ``n_call``:
    scalar int64 tensors; ``n_call`` = the call's number of documents)."""
    at_least = max(int(k), int(floor or 0))
    if rule == "rank":
        return rank_keep(net, s, n, n_call, param, at_least)
    if rule == "margin":
        return margin_keep(net, s, n, k, net.const(param, "float64"), cluster_gap, at_least)
    if rule == "spread":
        margin = net.op("Mul", net.const(param, "float64"), boundary_spread(net, s, n, k))
        return margin_keep(net, s, n, k, margin, cluster_gap, at_least)
    raise KeyError(rule)


FUSED_RULES = ("margin", "rank", "spread")
