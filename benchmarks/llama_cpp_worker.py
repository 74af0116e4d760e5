"""One llama.cpp configuration of ``python -m benchmarks.generate``, run by the llama.cpp venv's python
(``benchmarks/peer_env.py``: llama-cpp-python compiled from the registry's source package).

Standalone on purpose: it imports only the standard library and ``llama_cpp``. The driver hands it every prompt as
token ids (the bundle's tokenizer.json is the GGUF's own vocabulary) and scores the answers itself, so llama.cpp
sees exactly the ids edge_sel sees. The GGUF is memory-mapped (``use_mmap``), full KV cache, ``threads`` threads.

    <venv>/bin/python benchmarks/llama_cpp_worker.py CONFIG.json

Config keys: ``gguf``, ``cases`` ([{"context_ids", "question_ids", "length", "depth", "number"}]), ``max_new``,
``ppl`` ({"prefix", "cont"} or null), ``threads``, ``result``. Needle: context + question evaluated in one batch
(prefill), then greedy decoding one token at a time. Perplexity: prefix + continuation evaluated with logits for
every position, the continuation's tokens scored (natural log, float64 log-sum-exp).
"""

from __future__ import annotations

import json
import sys
import time

from worker_memory import peak_rss_bytes  # this folder: the workers run as scripts


def _model(cfg: dict, n_ctx: int, logits_all: bool):
    from llama_cpp import Llama

    threads = int(cfg.get("threads") or 2)
    return Llama(model_path=cfg["gguf"], n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 use_mmap=True, logits_all=logits_all, verbose=False)


def _last_logits(llm):
    """The last evaluated token's logits (without ``logits_all`` llama-cpp-python keeps no score rows: read the
    context's own logits buffer, which holds the last token's row)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def needle(cfg: dict) -> list[dict]:
    import numpy as np

    max_new = int(cfg.get("max_new", 12))
    cases = cfg["cases"]
    if not cases:
        return []
    n_ctx = max(len(c["context_ids"]) + len(c["question_ids"]) for c in cases) + max_new + 8
    llm = _model(cfg, n_ctx, logits_all=False)
    out = []
    for c in cases:
        ids = c["context_ids"] + c["question_ids"]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1, w1 = time.perf_counter(), time.process_time()
        toks = [int(np.argmax(_last_logits(llm)))]
        for _ in range(max_new - 1):
            llm.eval([toks[-1]])
            toks.append(int(np.argmax(_last_logits(llm))))
        t2, w2 = time.perf_counter(), time.process_time()
        out.append({"length": c["length"], "depth": c["depth"], "number": c["number"], "answer_ids": toks,
                    "prefill_s": t1 - t0, "decode_ms_per_token": 1000 * (t2 - t1) / (max_new - 1),
                    "decode_cpu_ms_per_token": 1000 * (w2 - w1) / (max_new - 1)})
    return out


def perplexity(cfg: dict) -> float | None:
    import numpy as np

    p = cfg.get("ppl")
    if not p:
        return None
    ids = p["prefix"] + p["cont"]
    llm = _model(cfg, len(ids) + 8, logits_all=True)
    llm.eval(ids)
    C = len(p["cont"])
    logits = np.asarray(llm.scores[len(ids) - C - 1:len(ids) - 1], dtype=np.float64)
    m = logits.max(1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(1))
    nll = lse - logits[np.arange(C), ids[-C:]]
    return float(np.exp(nll.mean()))


def main(path: str) -> int:
    cfg = json.loads(open(path).read())
    t0 = time.perf_counter()
    res = {"config": cfg["name"], "needle": needle(cfg), "ppl": perplexity(cfg), "load_s": None}
    res["peak_rss_bytes"] = peak_rss_bytes()
    res["worker_s"] = time.perf_counter() - t0
    with open(cfg["result"], "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
