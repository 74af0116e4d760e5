"""One configuration of the rerank benchmark, in its own fresh process.

    python -m benchmarks.rerank_worker --config ort --spec spec.json --json

The parent (``benchmarks.rerank``) writes ``spec.json`` (model paths, the token ids of
every query's candidates, top-K, runs); this worker loads one engine, scores every query once as a
warm-up (the scores of that pass are the ones compared between configurations), then times ``runs``
passes over all queries, and reports JSON.

Memory, all from the kernel's counters for this process (``edge_sel.runtime.memory``):
  base_rss  RSS after the imports the configuration needs, before any model is loaded;
  idle_rss  RSS after the model is loaded (constructor returned), before the first query;
  peak_rss  whole-process high-water mark (VmHWM) at the end, i.e. over imports, load, warm-up and runs.
Time: wall seconds per query (``perf_counter``) and CPU seconds per query of the whole process, all
threads (``process_time``) — the latter is less distorted when other work shares the cores.
``peak - idle`` is the model's share while answering (what ``memory_budget`` bounds for edge_sel);
``peak - base`` additionally counts what loading the model keeps resident.

Configurations (``CONFIGS``): ``torch`` (transformers eager, full model), ``optimum``
(``ORTModelFor*`` over optimum's whole-model ONNX export), ``ort`` (the same ONNX graph in a bare
``onnxruntime.InferenceSession``; this module imports neither torch nor transformers for it),
``sbert`` (sentence-transformers ``CrossEncoder`` / ``SentenceTransformer``, encoders only),
``edge_sel`` (all layers resident, no pruning), ``edge_sel_budget`` (``memory_budget`` from the spec),
``edge_sel_pruned`` / ``edge_sel_pruned_budget`` (the same on the calibrated copy of the bundle, early-ranking
pruning on; for decoders every edge_sel config also reuses the shared prompt prefix, the exporter's default),
``edge_sel_dropped`` (the calibrated copy with ``--drop-layers auto``, pruning on, all resident).
Peers score length-sorted batches (``batch_size``, default 16) padded on the right with an
attention mask; decoders read the logits at each candidate's last real token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

from edge_sel.runtime.memory import peak_rss_bytes, rss_bytes

CONFIGS = ("torch", "optimum", "sbert", "ort", "edge_sel", "edge_sel_budget", "edge_sel_pruned", "edge_sel_pruned_budget",
           "edge_sel_dropped")
TORCH_FREE = ("ort", "edge_sel", "edge_sel_budget", "edge_sel_pruned", "edge_sel_pruned_budget", "edge_sel_dropped")
# edge_sel configurations: (bundle key in the spec, pruning, memory budget?)
EDGE_SEL = {"edge_sel": ("bundle", None, False), "edge_sel_budget": ("bundle", None, True),
            "edge_sel_pruned": ("bundle_calibrated", "auto", False), "edge_sel_pruned_budget": ("bundle_calibrated", "auto", True),
            "edge_sel_dropped": ("bundle_dropped", "auto", False)}


class _Peak:
    """Whole-process VmHWM, robust to code under test resetting the counter (edge_sel's PeakTracker does)."""

    def __init__(self):
        self.value = peak_rss_bytes()

    def snap(self) -> int:
        self.value = max(self.value, peak_rss_bytes(), rss_bytes())
        return self.value


def _batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(seqs: list[list[int]], idx: np.ndarray, pad_id: int, types: list[list[int]] | None = None):
    T = max(len(seqs[i]) for i in idx)
    ids = np.full((len(idx), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), T), dtype=np.int64)
    tt = np.zeros((len(idx), T), dtype=np.int64)
    for r, i in enumerate(idx):
        n = len(seqs[i])
        ids[r, :n] = seqs[i]
        mask[r, :n] = 1
        if types is not None:
            tt[r, :n] = types[i]
    return ids, mask, tt


# ---- engines: each is built once, then called as score(query_spec) -> np.ndarray of N scores ------------
class NumpyPeer:
    """Shared batching / scoring logic of the peers; subclasses supply ``forward``."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.scoring = spec["scoring"]
        self.bs = int(spec.get("batch_size", 16))
        self.pad_id = int(spec["pad_id"])
        self.yes, self.no = spec.get("yes_id"), spec.get("no_id")

    def forward(self, ids, mask, tt):  # -> np.ndarray: logits [B,T,V] (yes_no), [B] or [B,1] (ce), [B,T,H] (bi)
        raise NotImplementedError

    def _seqs(self, q: dict) -> list[list[int]]:
        seqs = list(q["doc_ids"])
        if self.scoring == "bi_encoder":
            seqs.append(q["query_ids"])
        return seqs

    def score(self, q: dict) -> np.ndarray:
        seqs = self._seqs(q)
        lengths = np.array([len(s) for s in seqs])
        types = q.get("doc_types") if self.scoring == "cross_encoder" else None
        out = np.zeros(len(seqs), dtype=np.float32)
        emb = None
        for idx in _batches(lengths, self.bs):
            ids, mask, tt = _pad(seqs, idx, self.pad_id, types)
            res = self.forward(ids, mask, tt)
            if self.scoring == "yes_no":
                last = res[np.arange(len(idx)), mask.sum(1) - 1]  # last real token of each row
                out[idx] = last[:, self.yes] - last[:, self.no]
            elif self.scoring == "cross_encoder":
                out[idx] = np.asarray(res).reshape(len(idx), -1)[:, 0]
            else:  # sentence-transformers recipe: mean over real tokens, L2-normalised
                m = mask[..., None].astype(np.float32)
                pooled = (res * m).sum(1) / np.maximum(m.sum(1), 1e-9)
                pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
                if emb is None:
                    emb = np.zeros((len(seqs), pooled.shape[1]), dtype=np.float32)
                emb[idx] = pooled
            del res
        if self.scoring == "bi_encoder":
            out = emb[:-1] @ emb[-1]
        return out


class OrtPeer(NumpyPeer):
    """optimum's whole-model graph in a bare onnxruntime session, default session options (what users do)."""

    def __init__(self, spec):
        super().__init__(spec)
        import onnxruntime as ort

        self.sess = ort.InferenceSession(spec["peer_onnx"], providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.output = self.sess.get_outputs()[0].name

    def forward(self, ids, mask, tt):
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = tt
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise RuntimeError(f"{self.spec['peer_onnx']}: unexpected graph inputs {sorted(missing)}")
        return self.sess.run([self.output], feeds)[0]


class TorchPeer(NumpyPeer):
    """transformers eager (default attention implementation), float32, ``torch.no_grad``."""

    def __init__(self, spec):
        super().__init__(spec)
        import torch
        import transformers as tf

        self.torch = torch
        cls = {"yes_no": tf.AutoModelForCausalLM, "cross_encoder": tf.AutoModelForSequenceClassification,
               "bi_encoder": tf.AutoModel}[self.scoring]
        self.model = cls.from_pretrained(spec["peer_hf"], dtype=torch.float32).eval()

    def forward(self, ids, mask, tt):
        torch = self.torch
        kw = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.scoring == "yes_no":
            kw["position_ids"] = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        if self.scoring == "cross_encoder":
            kw["token_type_ids"] = torch.from_numpy(tt)
        with torch.no_grad():
            out = self.model(**kw)
        t = out.logits if self.scoring != "bi_encoder" else out.last_hidden_state
        return t.numpy()


class OptimumPeer(NumpyPeer):
    """``ORTModelForCausalLM`` / ``ORTModelForSequenceClassification`` / ``ORTModelForFeatureExtraction``."""

    def __init__(self, spec):
        super().__init__(spec)
        import torch
        from optimum import onnxruntime as o

        self.torch = torch
        if self.scoring == "yes_no":
            self.model = o.ORTModelForCausalLM.from_pretrained(spec["peer_onnx_dir"], use_cache=False)
        elif self.scoring == "cross_encoder":
            self.model = o.ORTModelForSequenceClassification.from_pretrained(spec["peer_onnx_dir"])
        else:
            self.model = o.ORTModelForFeatureExtraction.from_pretrained(spec["peer_onnx_dir"])

    def forward(self, ids, mask, tt):
        torch = self.torch
        kw = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.scoring == "yes_no":
            kw["position_ids"] = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1).contiguous()
        if self.scoring == "cross_encoder":
            kw["token_type_ids"] = torch.from_numpy(tt)
        out = self.model(**kw)
        t = out.logits if self.scoring != "bi_encoder" else out.last_hidden_state
        return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


class SbertPeer:
    """sentence-transformers: ``CrossEncoder`` (cross-encoders) / ``SentenceTransformer`` (bi-encoders) on the peers'
    model directory, ONNX backend when it loads offline (``spec["sbert_backend"]``), else torch. Raw text in:
    sentence-transformers tokenizes itself (the timed call includes tokenization, as edge_sel's ``rank`` does)."""

    def __init__(self, spec):
        import torch

        try:
            import sentence_transformers as st
        except ModuleNotFoundError:
            raise RuntimeError("the sbert peer needs sentence-transformers: pip install -e '.[bench]' "
                               "(or leave sbert out of --configs)") from None

        self.scoring = spec["scoring"]
        self.bs = int(spec.get("batch_size", 16))
        if self.scoring == "yes_no":
            raise RuntimeError("sentence-transformers has no yes/no LLM reranker: not applicable to decoder models")
        self.backend = spec.get("sbert_backend", "onnx")
        kw = {"backend": self.backend}
        if self.backend == "onnx":
            kw["model_kwargs"] = {"provider": "CPUExecutionProvider", "file_name": "model.onnx"}
        path = spec["peer_onnx_dir"] if self.backend == "onnx" else spec["peer_hf"]
        if self.scoring == "cross_encoder":
            self.model = st.CrossEncoder(path, max_length=int(spec.get("max_length") or 512), activation_fn=torch.nn.Identity(), **kw)
        else:
            self.model = st.SentenceTransformer(path, **kw)

    def score(self, q: dict) -> np.ndarray:
        if self.scoring == "cross_encoder":
            return np.asarray(self.model.predict([(q["query"], d) for d in q["docs"]], batch_size=self.bs,
                                                 show_progress_bar=False), dtype=np.float32).reshape(-1)
        e = self.model.encode(q["docs"] + [q["query"]], batch_size=self.bs, normalize_embeddings=True,
                              show_progress_bar=False, convert_to_numpy=True)
        return e[:-1] @ e[-1]


class EdgeSel:
    """edge_sel ``Reranker``; timed calls go through the public ``rank()`` (tokenization included).

    The warm-up pass uses ``predict()`` (every score, never pruned) for the score comparison.
    """

    def __init__(self, spec, budget: int | None, bundle_key: str = "bundle", pruning: str | None = None):
        from edge_sel.runtime import Reranker

        if not spec.get(bundle_key):
            raise RuntimeError(f"the spec has no {bundle_key!r} (the parent did not prepare that bundle variant)")
        self.rr = Reranker(spec[bundle_key], memory_budget=budget, pruning=pruning or spec.get("pruning", "off"))
        self.top_k = int(spec["top_k"])

    def score(self, q: dict) -> np.ndarray:
        return self.rr.predict(q["query"], q["docs"])

    def rank(self, q: dict) -> list[int]:
        return [r["corpus_id"] for r in self.rr.rank(q["query"], q["docs"], top_k=self.top_k)]

    def check_ids(self, q: dict) -> bool:
        enc = self.rr.encoder.encode(q["query"], q["docs"])
        same = [np.array_equal(a, b) for a, b in zip(enc.doc_ids, q["doc_ids"])]
        return all(same) and len(same) == len(q["doc_ids"])


def _stats(rr) -> dict:
    keep = ("latency_s", "tokenize_s", "embed_s", "layers_s", "head_s", "layer_load_wait_s", "window_layers",
            "chunk_size", "chunk_tokens", "n_chunks", "layer_loads", "peak_rss_bytes", "start_rss_bytes", "plan_estimate",
            "live_per_layer", "n_layers", "pruning", "layer_work_saved", "token_work_saved", "n_pruned", "dropped_layers",
            "prefix_reuse_tokens")
    st = rr.last_stats
    return {k: st[k] for k in keep if k in st}


def run(config: str, spec: dict) -> dict:
    peak = _Peak()
    t0 = time.perf_counter()
    if config in ("torch", "optimum", "sbert"):
        import torch  # noqa: F401  (counted in base_rss: it is part of what this configuration needs)
        import transformers  # noqa: F401
        if config == "optimum":
            import optimum.onnxruntime  # noqa: F401
        if config == "sbert":
            import sentence_transformers  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    if config.startswith("edge_sel"):
        import edge_sel.runtime  # noqa: F401
    base = rss_bytes()
    t_imports = time.perf_counter() - t0

    t1 = time.perf_counter()
    if config == "torch":
        engine = TorchPeer(spec)
    elif config == "optimum":
        engine = OptimumPeer(spec)
    elif config == "ort":
        engine = OrtPeer(spec)
    elif config == "sbert":
        engine = SbertPeer(spec)
    elif config in EDGE_SEL:
        key, pruning, budgeted = EDGE_SEL[config]
        engine = EdgeSel(spec, int(spec["memory_budget"]) if budgeted else None, key, pruning)
    else:
        raise ValueError(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
    load_s = time.perf_counter() - t1
    idle = rss_bytes()
    peak.snap()
    peak_load = peak.value

    queries = spec["queries"]
    top_k = int(spec["top_k"])
    # warm-up pass over every query: its scores are the ones compared across configurations
    scores, warm_times, stats = [], [], []
    for q in queries:
        peak.snap()
        t = time.perf_counter()
        s = engine.score(q)
        warm_times.append(time.perf_counter() - t)
        peak.snap()
        scores.append(np.asarray(s, dtype=np.float64))

    runs, cpu_runs, topk = [], [], []
    for r in range(int(spec["runs"])):
        times, cpu, tk = [], [], []
        for q in queries:
            peak.snap()
            c = time.process_time()
            t = time.perf_counter()
            if isinstance(engine, EdgeSel):
                ids = engine.rank(q)
            else:
                s = engine.score(q)
                ids = np.argsort(-s, kind="stable")[:top_k].tolist()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            peak.snap()
            tk.append([int(i) for i in ids])
            if isinstance(engine, EdgeSel) and r == int(spec["runs"]) - 1:
                stats.append(_stats(engine.rr))
        runs.append(times)
        cpu_runs.append(cpu)
        topk = tk  # top-K of the last run (identical across runs: deterministic engines)
    per_query = [float(np.mean(t)) for t in runs]
    out = {
        "config": config, "ok": True, "pid": os.getpid(),
        "base_rss": base, "idle_rss": idle, "peak_rss": peak.snap(), "peak_after_load": peak_load,
        "imports_s": t_imports, "load_s": load_s,
        "warmup_s": warm_times, "runs_s": runs, "latency_per_query_runs": per_query,
        "latency_per_query": float(np.median(per_query)) if per_query else None,
        "cpu_runs_s": cpu_runs, "cpu_per_query": float(np.median([np.mean(c) for c in cpu_runs])) if cpu_runs else None,
        "topk": topk, "topk_warmup": [np.argsort(-s, kind="stable")[:top_k].tolist() for s in scores],
        "scores": [s.tolist() for s in scores],
        "torch_imported": "torch" in sys.modules,
        "transformers_imported": "transformers" in sys.modules,
    }
    if isinstance(engine, EdgeSel):
        out["edge_sel_stats"] = stats
        out["ids_match_workload"] = all(engine.check_ids(q) for q in queries)
    import onnxruntime

    out["versions"] = {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}
    if config == "sbert":
        import sentence_transformers

        out["versions"]["sentence_transformers"] = sentence_transformers.__version__
        out["sbert_backend"] = engine.backend
    if config in ("torch", "optimum", "sbert"):
        import torch
        import transformers

        out["versions"].update({"torch": torch.__version__, "transformers": transformers.__version__})
        out["torch_threads"] = torch.get_num_threads()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerank_worker",
                                description="Run one rerank-benchmark configuration in this (fresh) process.")
    p.add_argument("--config", required=True, choices=CONFIGS)
    p.add_argument("--spec", required=True, help="spec JSON written by `python -m benchmarks.rerank`")
    p.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    p.add_argument("--out", help="write the result JSON to this file")
    args = p.parse_args(argv)
    with open(args.spec, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        res = run(args.config, spec)
        rc = 0
    except Exception as e:  # report, don't hide: the parent shows the error in the table
        res = {"config": args.config, "ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
               "peak_rss": peak_rss_bytes()}
        rc = 1
    text = json.dumps(res)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.out)
    if args.json:
        print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
