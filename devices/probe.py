"""``edge-sel devices probe``: measure this machine and, given bundles, what their layers cost here.

Machine figures: memory bandwidth (a large array copy, read + write bytes per second), storage read (a fresh
file written, synced, dropped from the page cache with ``posix_fadvise`` and read back), fp32 matrix-multiply
GFLOPS (numpy's BLAS on all cores, the figure the packaged profiles estimate). Bundle costs come from real engine
calls on synthetic text at two lengths, so they include everything a call does: per token and layer
``a + b * length`` seconds (the ``b`` term is attention), the per-token embedding/head/tokenizer time, and the
time to load one layer's session. The planner (:mod:`.planner`) scales them to other devices.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import numpy as np
import psutil

WORDS = ("layer memory budget query document rank token model stream chunk cache value error file copy sort "
         "search find open close read write list time year people way day world school state family group").split()


def memory_bandwidth(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def storage_read(directory: str | None = None, nbytes: int = 128 << 20) -> float:
    fd, path = tempfile.mkstemp(prefix="edge-sel-probe-", dir=directory)
    try:
        block = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(4 << 20):
                pass
        return nbytes / (time.perf_counter() - t)
    finally:
        os.unlink(path)


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _texts(tok, n: int, tokens: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS, size=tokens * 2))
        enc = tok.encode(text, add_special_tokens=False)
        out.append(text[: enc.offsets[min(tokens, len(enc.ids)) - 1][1]])
    return out


def _fit(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    b = max(0.0, (y2 - y1) / (x2 - x1))
    return max(0.0, y1 - b * x1), b


def query_overhead(rr) -> int:
    """Tokens a candidate carries beyond its document (the query and special tokens, or the prompt around it)."""
    ids, _ = rr.scoring.items(rr.encoder.encode("how do I copy a file", ["x"]))
    return len(ids[0]) - 1


def resident_anon(path: str, tokens: int, n_docs: int) -> int | None:
    """In a fresh process: the anonymous growth of building an unbudgeted reranker and its first call."""
    from edge_sel.runtime.bundle import Bundle
    from edge_sel.runtime.profiler import Profiler
    from edge_sel.runtime.rerank import Reranker

    with Profiler() as prof:
        rr = Reranker(Bundle.open(path), pruning="off")
        rr.predict("how do I copy a file", _texts(rr.encoder.tok, n_docs, tokens, tokens))
        rr.close()
    res = prof.result
    return None if res.baseline.anon is None else max(s.anon for s in res.samples) - res.baseline.anon


def probe_rerank(bundle, lengths=(48, 192), n_docs: int = 32) -> dict:
    from edge_sel.runtime.rerank import Reranker
    from edge_sel.runtime.sessions import load_session

    query = "how do I copy a file"
    # a fresh process's engine construction and first call, every layer resident, at each length: its anonymous
    # growth (sessions, activations, onnxruntime's one-time set-up and memory patterns) is what an unbudgeted call
    # costs beside the mapped weights; a fresh process each time, as the first call pays the one-time part
    import multiprocessing

    grown = []
    if not bundle.spec.layer_io.split:  # split decoder bundles always run monolithically (the planner's formula)
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            grown = [(T, pool.apply(resident_anon, (str(bundle.root), T, n_docs))) for T in lengths]
    rr = Reranker(bundle, pruning="off")
    n_layers = len(rr.bundle.spec.layers)
    t = time.perf_counter()
    load_session(rr.bundle.layer_path(0))
    load_s = time.perf_counter() - t
    points = []
    try:
        for T in lengths:
            docs = _texts(rr.encoder.tok, n_docs, T, T)
            rr.predict(query, docs)  # loads the layers, warms the sessions
            ids, _ = rr.scoring.items(rr.encoder.encode(query, docs))
            lens = [len(x) for x in ids]
            best = None
            for _ in range(2):
                rr.predict(query, docs)
                s = rr.last_stats
                if best is None or s["latency_s"] < best["latency_s"]:
                    best = s
            tokens = sum(lens)
            points.append({"max_len": max(lens), "tokens": tokens, "layer_s_per_token": best["layers_s"] / (tokens * n_layers),
                           "other_s_per_token": (best["latency_s"] - best["layers_s"]) / tokens,
                           # every layer resident and warm: what a call adds is its activations (and onnxruntime's
                           # per-session memory patterns), which the static formula does not see
                           "call_growth_bytes": best["peak_rss_bytes"] - best["start_rss_bytes"],
                           "chunk_tokens": best["chunk_tokens"], "order": best["order"]})
    finally:
        rr.close()
    over = query_overhead(rr)
    p1, p2 = points
    a, b = _fit(p1["max_len"], p1["layer_s_per_token"], p2["max_len"], p2["layer_s_per_token"])
    return {"task": "rerank", "layers": n_layers, "layer_s_per_token": a, "layer_s_per_token_per_len": b,
            "other_s_per_token": float(np.mean([p["other_s_per_token"] for p in points])), "layer_load_s": load_s,
            "resident_anon_bytes": [[T + over, v] for T, v in grown if v is not None] or None, "points": points}


def probe_generate(bundle, lengths=(256, 1024), new_tokens: int = 8) -> dict:
    from edge_sel.runtime.generate import Generator

    gen = Generator(bundle)
    n_layers = len(gen.bundle.spec.layers)
    points = []
    try:
        for N in lengths:
            ids = list(np.random.default_rng(N).integers(100, 1000, size=N))
            gen.generate(ids[:64], max_new_tokens=2)  # warm
            gen.generate(ids, max_new_tokens=new_tokens, stop=False)
            s = gen.last_stats
            points.append({"prompt": N, "prefill_s_per_token_layer": s["prefill_s"] / (N * n_layers),
                           "decode_s_per_layer": s["decode_ms_per_token"] / 1000 / n_layers})
    finally:
        gen.close()
    p1, p2 = points
    a, b = _fit(p1["prompt"], p1["prefill_s_per_token_layer"], p2["prompt"], p2["prefill_s_per_token_layer"])
    d0, d1 = _fit(p1["prompt"], p1["decode_s_per_layer"], p2["prompt"], p2["decode_s_per_layer"])
    return {"task": "generate", "layers": n_layers, "prefill_s_per_token_layer": a, "prefill_s_per_token_layer_per_len": b,
            "decode_s_per_layer": d0, "decode_s_per_layer_per_context": d1, "points": points}


def bundle_key(bundle) -> str:
    return str(bundle.root.resolve())


def probe(name: str = "this-machine", bundles=(), storage_dir: str | None = None, say=lambda msg: None) -> dict:
    from edge_sel.runtime.bundle import Bundle

    say("memory bandwidth")
    bw = memory_bandwidth()
    say("storage read")
    st = storage_read(storage_dir)
    say("matmul GFLOPS")
    gf = matmul_gflops()
    freq = psutil.cpu_freq()
    ghz = (freq.max or freq.current) / 1000 if freq and (freq.max or freq.current) else 1.0
    cores = os.cpu_count() or 1
    measured: dict = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.machine(),
                      "system": platform.system(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                      "bundles": {}}
    for path in bundles:
        b = Bundle.open(path)
        say(f"layer costs of {b.root.name}")
        measured["bundles"][bundle_key(b)] = probe_rerank(b) if b.task == "rerank" else probe_generate(b)
    return {"name": name, "title": f"this machine ({platform.node() or 'probed'})", "kind": "measured",
            "os": f"{platform.system()} {platform.release()}", "ram_bytes": int(psutil.virtual_memory().total),
            "app_memory_limit_bytes": None, "app_memory_limit_note": "measured machine: no per-app limit assumed",
            "memory_bandwidth_bytes_per_s": float(bw), "storage_read_bytes_per_s": float(st),
            "cpu": {"model": platform.processor() or platform.machine(), "cores": cores,
                    "clusters": [{"cores": cores, "ghz": round(ghz, 3)}]},
            "sustained_gflops": round(gf, 2), "accelerators": [], "sources": [], "measured": measured,
            "notes": "measured by edge-sel devices probe; figures on a shared machine vary with its load"}
