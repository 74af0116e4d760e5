"""Calibrate early ranking for a bundle (runtime side: numpy + onnxruntime, no torch).

``calibrate(bundle, data="builtin", top_k=10)`` runs calibration queries through the *full* bundle and records
every candidate's pooled state after every layer (:mod:`.traces`), scores every candidate at every layer with
each method available to the bundle's scoring strategy (probe scores cross-fitted, so the margins account for
the probe's error on unseen queries), chooses the schedule (:mod:`.schedule_search`) and stores it.

Calibration data never overlaps the benchmark text: ``builtin`` draws CPython docstrings from the
modules in :data:`CALIBRATION_MODULES`, which are disjoint from ``edge_sel.export.textdata.MODULES`` (the
benchmark/demo pool); any passage that also appears in the benchmark pool is removed.
``--data FILE`` takes JSONL lines ``{"query": str, "documents": [str, ...]}``.

The bundle is rewritten in place through the staged writer (:mod:`.rewrite`): the probe array is written under
a fresh file name, the previous one left out.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.manifest import with_schedule
from edge_sel.runtime.rerank import Reranker
from edge_sel.runtime.rerank.schedule import PROBE_ARRAY, RULES, Schedule
from edge_sel.runtime.rerank.scoring import scoring_class

from .rewrite import editable_manifest, rewriting
from edge_sel.runtime.rerank.scoring import apply_probe

from ..domains import DOMAINS, domain_queries
from .schedule_search import DEFAULT_CLUSTER_GAP, DEFAULT_MAX_LAYERS, DEFAULT_SAFETY, simulate, validated_schedule
from .traces import Trace, agreement_table, collect_traces, features, fit_probes, method_scores

log = logging.getLogger("edge_sel")

# Disjoint from edge_sel.export.textdata.MODULES (checked in tests): calibration never sees benchmark text.
CALIBRATION_MODULES = [
    "asyncio", "concurrent.futures", "multiprocessing", "unittest", "unittest.mock", "email.message", "email.parser",
    "email.header", "xml.etree.ElementTree", "http.server", "http.cookies", "http.cookiejar", "urllib.request",
    "ftplib", "smtplib", "imaplib", "poplib", "mailbox", "xmlrpc.client", "wsgiref.util", "optparse", "getopt",
    "pdb", "bdb", "profile", "pstats", "timeit", "trace", "tracemalloc", "doctest", "pydoc", "code", "codeop",
    "importlib", "importlib.util", "pkgutil", "modulefinder", "runpy", "selectors", "signal", "dataclasses",
    "typing", "html.parser", "json.decoder", "netrc", "nntplib", "telnetlib", "imghdr", "sndhdr", "chunk",
    "aifc", "sunau", "encodings", "zipimport", "compileall", "py_compile", "tabnanny", "pyclbr",
    "symtable", "token", "tomllib", "rlcompleter", "fileinput", "smtpd", "asynchat", "socketserver",
]

# The fast default: the margin rule's off-domain identity and layer choice from 16 queries x 32 candidates match
# those from 24 x 48 and 64 x 48 (benchmarks/EARLY_RANK.md, "Calibration cost"), at a sixth of the 64 x 48 tokens.
DEFAULT_QUERIES = 16
DEFAULT_CANDIDATES = 32
# The rules ``--rule auto`` chooses from: only those whose validated schedule from builtin text kept the full top-10
# on text calibration never saw (benchmarks/EARLY_RANK.md, "Off-domain"); rank and spread stay available by name.
AUTO_RULES = ("margin",)


# ---- calibration data ---------------------------------------------------------------------------
def calibration_items() -> list[tuple[str, str]]:
    """``(query, passage)`` pairs from CALIBRATION_MODULES, minus any passage in the benchmark pool."""
    from edge_sel.export.textdata import MODULES, docstring_pairs, iter_docstrings

    bench = {p for _, p in docstring_pairs()}
    overlap = set(MODULES) & set(CALIBRATION_MODULES)
    assert not overlap, overlap
    return [(q, p) for _, q, p in iter_docstrings(CALIBRATION_MODULES, exclude=bench)]


def builtin_data(n_queries: int = 32, n_candidates: int = 48, seed: int = 0) -> list[tuple[str, list[str]]]:
    """Calibration queries, each with its own passage plus ``n_candidates - 1`` other calibration passages."""
    items = calibration_items()
    if len(items) < n_candidates:
        raise InputError(f"only {len(items)} calibration passages available, fewer than {n_candidates} candidates per query")
    return sample_queries(items, n_queries, n_candidates, seed)


def sample_queries(pairs: list[tuple[str, str]], n_queries: int, n_candidates: int, seed: int) -> list[tuple[str, list[str]]]:
    """``n_queries`` seeded queries from ``(query, passage)`` pairs, each with its own passage and ``n_candidates - 1``
    others, shuffled."""
    rng = np.random.default_rng(seed)
    qidx = rng.permutation(len(pairs))[:n_queries]
    data = []
    for qi in qidx:
        others = rng.permutation([j for j in range(len(pairs)) if j != qi])[: n_candidates - 1]
        cand = [pairs[qi][1]] + [pairs[j][1] for j in others]
        rng.shuffle(cand)
        data.append((pairs[qi][0], cand))
    return data


def load_data(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration data file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. `iconv -t UTF-8`") from None
    data = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: line {n} is not valid JSON ({e.msg}); expected {{\"query\": str, \"documents\": [str, ...]}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("query"), str) or not isinstance(obj.get("documents"), list) \
                or not all(isinstance(d, str) for d in obj["documents"]):
            raise InputError(f"{p}: line {n} needs a string 'query' and a list of strings 'documents'")
        data.append((obj["query"], obj["documents"]))
    if not data:
        raise InputError(f"{p} holds no calibration queries")
    return data


def calibrate(bundle: str | os.PathLike | Bundle, data: str | list = "builtin", top_k: int = 10, method: str = "auto",
              safety: float | None = None, max_layers: int = DEFAULT_MAX_LAYERS, n_queries: int = DEFAULT_QUERIES,
              n_candidates: int = DEFAULT_CANDIDATES, seed: int = 0, write: bool = True, memory_budget=None,
              progress: Callable[..., None] | None = None, keep_traces: bool = False, rule: str = "auto",
              check: tuple[str, ...] = (), check_queries: int = 8) -> dict:
    """Calibrate ``bundle`` and (with ``write``) store schedule + probes in it. Returns a report dict.

    ``rule``: ``margin`` (score margins), ``rank`` (keep fractions), ``spread`` (margins in units of the query's
    score spread) or ``auto`` (see :data:`AUTO_RULES`). ``safety``: None = the rule's default.
    ``progress(done, total, info)``: after each traced query; ``info`` holds the tokens done / in total and the
    seconds so far (an estimate of the whole run from the first query on). ``check``: text domains calibration never
    saw (:mod:`edge_sel.export.domains`, e.g. ``("botchan", "wordnet")``): ``check_queries`` queries of each are
    traced too and every candidate schedule replayed on them (``report["off_domain"]``)."""
    t0 = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    if b.task != "rerank":
        raise InputError(f"{b.root} is a {b.task!r} bundle; early ranking is calibrated on rerank bundles")
    if not isinstance(top_k, (int, np.integer)) or top_k <= 0:
        raise InputError(f"top_k must be a positive integer, got {top_k!r}")
    for name, value in (("max_layers", max_layers), ("n_queries", n_queries), ("n_candidates", n_candidates)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if safety is not None and not (np.isfinite(safety) and safety > 0):
        raise InputError(f"safety must be a positive number, got {safety!r}")
    if rule != "auto" and rule not in RULES:
        raise InputError(f"rule {rule!r} is not known (choose from auto, {', '.join(RULES)})")
    if isinstance(data, str):
        label = data
        # builtin: passages capped at the domains' length (a long docstring's tail adds tokens, not ranking signal)
        pairs = domain_queries("builtin", n_queries, n_candidates, seed) if data == "builtin" else load_data(data)
    else:
        label, pairs = "python", list(data)
    if len(pairs) < 2:
        raise InputError(f"calibration needs at least 2 queries (got {len(pairs)})")
    for i, (q, docs) in enumerate(pairs):
        if len(docs) <= top_k:
            raise InputError(f"calibration query {i} has {len(docs)} candidates, but top-{top_k} needs more than {top_k} "
                             f"to calibrate pruning (use more documents per query or a smaller --top-k)")
    unknown = [d for d in check if d not in DOMAINS]
    if unknown:
        raise InputError(f"unknown text domain(s) to check {unknown} (known: {', '.join(DOMAINS)})")
    scoring = scoring_class(b)
    methods = list(scoring.early_methods)
    if method != "auto" and method not in methods:
        raise InputError(f"method {method!r} is not available for a {scoring.name} bundle (choose from auto, {', '.join(methods)})")

    rr = Reranker(b, memory_budget=memory_budget, pruning="off")
    source = {"data": label, "queries": len(pairs), "candidates": int(np.median([len(d) for _, d in pairs])), "seed": seed}
    try:
        traces = collect_traces(rr, pairs, _token_progress(rr, pairs, progress))
        all_scores = method_scores(rr, traces, methods)
        report = decide_schedule(b, traces, all_scores, int(top_k), method=method, rule=rule, safety=safety,
                                 max_layers=max_layers, source=source, write=False, started=t0)
        held = {d: collect_traces(rr, domain_queries(d, check_queries, source["candidates"], seed + 1)) for d in check}
    finally:
        rr.close()
    if held:
        report["off_domain"] = off_domain(b, report, traces, held, int(top_k))
    if write:
        sched = Schedule.from_manifest(report["schedule"])
        if not sched.layers:
            log.warning("calibration found no layer where pruning keeps every calibration top-%d under split-half validation; "
                        "storing an empty schedule", top_k)
        write_schedule(b, sched, report["probes"])
    if keep_traces:
        report["traces"], report["method_scores"] = traces, all_scores
    report.pop("probes")
    return report


WARMUP_CANDIDATES = 8  # the timed slice behind the up-front estimate (under 2% of the default run's tokens)


def _token_progress(rr: Reranker, pairs: list, progress):
    """``progress(done, total)`` -> ``progress(done, total, info)`` with tokens done / in total and seconds so far.
    Before the first call, the first query's first :data:`WARMUP_CANDIDATES` candidates are traced and timed (this
    also loads every layer): ``info["estimate_s"]`` is the whole run's trace time at that rate, given up front."""
    if progress is None:
        return None
    tokens = [_tokens(rr, q, d) for q, d in pairs]
    total = sum(tokens)
    q, docs = pairs[0]
    warm = docs[:WARMUP_CANDIDATES]
    t = time.perf_counter()
    rr.trace(q, warm, lambda obs: None)
    rate = _tokens(rr, q, warm) / max(time.perf_counter() - t, 1e-9)
    started = time.perf_counter()
    progress(0, len(pairs), {"tokens_done": 0, "tokens_total": total, "seconds": 0.0, "estimate_s": total / rate,
                             "tokens_per_s": rate})

    def cb(done: int, n: int) -> None:
        progress(done, n, {"tokens_done": sum(tokens[:done]), "tokens_total": total, "seconds": time.perf_counter() - started})

    return cb


def _tokens(rr: Reranker, query: str, docs: list[str]) -> int:
    """Tokens a call runs through every layer (a shared prompt prefix, computed once, not counted)."""
    return int(sum(len(x) for x in rr.scoring.items(rr.encoder.encode(query, docs))[0]))


def off_domain(b: Bundle, report: dict, traces: list[Trace], held: dict[str, list[Trace]], k: int) -> dict:
    """Every candidate schedule of ``report`` replayed on traces of domains calibration never saw (probes fitted on
    the calibration traces only): per domain and schedule, top-K identical / overlap / layer-work saved."""
    scoring = scoring_class(b)
    W = fit_probes(scoring, traces)[0] if any(key.startswith("probe/") for key in report["candidates"]) else None
    out = {}
    for d, tr in held.items():
        scores = {"probe": [np.stack([apply_probe(W[l], features(scoring, t, l)) for l in range(W.shape[0])]) for t in tr]} if W is not None else {}
        out[d] = {}
        for key, c in report["candidates"].items():
            m, ru = key.split("/")
            if m == "probe":
                out[d][key] = simulate(scores["probe"], tr, k, c["layers"], c["params"], rule=ru)
    return out


def decide_schedule(b: Bundle, traces: list[Trace], all_scores: dict[str, list[np.ndarray]], k: int, method: str = "auto",
                    rule: str = "auto", safety: float | None = None, max_layers: int = DEFAULT_MAX_LAYERS,
                    source: dict | None = None, write: bool = True, started: float | None = None) -> dict:
    """Choose (method, rule) and the schedule from recorded calibration trajectories; store it with ``write``."""
    t0 = started if started is not None else time.perf_counter()
    methods = [m for m in all_scores if method in ("auto", m)]
    rules = list(AUTO_RULES) if rule == "auto" else [rule]
    table = {m: agreement_table(all_scores[m], traces, k) for m in methods}
    results = {}
    for m in methods:
        for ru in rules:
            layers, params, info = validated_schedule(all_scores[m], traces, k, safety, max_layers, rule=ru)
            results[(m, ru)] = {"layers": layers, "params": params, **info}
    chosen_m, chosen_r = max(results, key=lambda key: (results[key]["simulated"]["layer_work_saved"], key[0] == "probe", key[1] == "margin"))
    probes, probe_info = fit_probes(scoring_class(b), traces) if chosen_m == "probe" else (None, None)
    r = results[(chosen_m, chosen_r)]
    sched = Schedule(method=chosen_m, top_k=k, layers=r["layers"],
                     margins=[0.0] * len(r["layers"]) if chosen_r == "rank" else r["params"],
                     rule=chosen_r, keep=r["params"] if chosen_r == "rank" else None, floor=None,
                     cluster_gap=DEFAULT_CLUSTER_GAP, safety=r.get("safety_used", safety or DEFAULT_SAFETY),
                     probe=PROBE_ARRAY if chosen_m == "probe" else None,
                     source_layers=[b.spec.layers[l].source_index for l in r["layers"]],
                     info={"calibration": {**(source or {}), "seconds": None},
                           "agreement": r["simulated"],
                           "per_layer": [{"layer": row["layer"], "spearman": round(row["spearman"], 4),
                                          "topk_overlap": round(row["topk_overlap"], 4)} for row in table[chosen_m]]})
    sched.info["calibration"]["seconds"] = round(time.perf_counter() - t0, 1)
    report = {"probes": probes, "bundle": str(b.root), "method": chosen_m, "rule": chosen_r, "top_k": k, "schedule": sched.to_manifest(), "table": table,
              "candidates": {f"{m}/{ru}": {"layers": v["layers"], "params": v["params"], "simulated": v["simulated"],
                                           "safety_used": v.get("safety_used")} for (m, ru), v in results.items()},
              "influence": np.mean([t.influence for t in traces], 0).tolist()}
    if probe_info is not None:
        report["probe_cv"] = [round(i["cv_spearman"], 4) for i in probe_info]
    if write:
        if not r["layers"]:
            log.warning("calibration found no layer where pruning keeps every calibration top-%d under split-half validation; "
                        "storing an empty schedule", k)
        write_schedule(b, sched, probes)
    return report


def write_schedule(bundle: Bundle, schedule: Schedule | None, probes: np.ndarray | None) -> None:
    """Store ``schedule`` (and its probe array, replacing a previous one) in the bundle through the staged writer."""
    old = bundle.spec.arrays.get(PROBE_ARRAY)
    gone = [old.file] if old is not None else []
    if bundle.spec.fused is not None:  # it holds the schedule it was built with: the manifest drops it, so do the files
        gone.append(bundle.spec.fused.file)
    with rewriting(bundle, leave_out=gone) as w:
        probe = None
        if probes is not None:
            probe = w.write_array(f"calibration/probe-{uuid.uuid4().hex[:8]}.bin", np.ascontiguousarray(probes, dtype="<f4"))
        w.commit(with_schedule(editable_manifest(bundle), schedule.to_manifest() if schedule is not None else None,
                               PROBE_ARRAY, probe))
    bundle.manifest = Bundle.open(bundle.root).manifest
