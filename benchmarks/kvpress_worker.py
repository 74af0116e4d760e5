"""One kvpress configuration of ``python -m benchmarks.generate``, run by the kvpress venv's python
(``benchmarks/peer_env.py``: kvpress 0.5.5, transformers 5.x, torch 2.13.0).

Standalone on purpose: it imports only the standard library, torch, transformers and kvpress (never
edge_sel, whose export side pins transformers 4.x). The driver hands it every prompt as token ids
(edge_sel's tokenizer = the model's tokenizer.json) and scores the answers itself, so all
configurations see the same ids and the same exact-match rule.

    <venv>/bin/python benchmarks/kvpress_worker.py CONFIG.json

Config keys: ``hf_dir``, ``press`` (a kvpress class name, or "none"), ``compression_ratio`` (fraction
REMOVED), ``cases`` ([{"context_ids", "question_ids", ...}]), ``max_new`` (12), ``ppl`` ({"prefix", "cont"}
or null), ``threads``, ``result`` (output path). Needle: the context is prefilled under the press (its
cache compressed layer by layer), then the question runs over the compressed cache uncompressed and
the answer is greedy-decoded without the press — kvpress's own pipeline (``KVPressTextGenerationPipeline``).
An empty ``question_ids`` compresses the whole prompt (question included) and answers from its last logits.
Perplexity: the prefix compressed under the press, the continuation teacher-forced over it.

Perplexity windows (``python -m benchmarks.perplexity``): ``windows`` ({name: {"prefix", "cont"}}) and ``runs``
([{"name", "press" (or "none"), "compression_ratio"}]) score every run on every window in this one process
(the model loaded once): ``result["windows"][run][window] = {"nll", "kept"}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time

from worker_memory import peak_rss_bytes  # this folder: the workers run as scripts


def kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "nelement"):
                total += t.nelement() * t.element_size()
    return total


def cache_len(cache) -> int:
    return int(cache.get_seq_length())


def main(path: str) -> int:
    cfg = json.loads(open(path).read())
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM, DynamicCache

    import kvpress

    if cfg.get("windows"):
        return windows_main(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg["hf_dir"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    press = None
    if cfg["press"] != "none":
        press = getattr(kvpress, cfg["press"])(compression_ratio=float(cfg["compression_ratio"]))
    max_new = int(cfg.get("max_new", 12))

    def under_press():
        return press(model) if press is not None else contextlib.nullcontext()

    def prefill(ids):
        """Compress ``ids`` under the press; the cache and the last position's logits."""
        cache = DynamicCache()
        with torch.no_grad(), under_press():
            out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[0, -1]

    res = {"config": cfg["name"], "needle": [], "ppl": None, "load_s": load_s,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "kvpress": getattr(kvpress, "__version__", None) or "0.5.5"}}
    for case in cfg["cases"]:
        ctx, q = list(case["context_ids"]), list(case["question_ids"])
        rec = {"length": case["length"], "depth": case["depth"], "number": case["number"]}
        try:
            c0 = time.perf_counter()
            cache, logits = prefill(ctx)
            kept_ctx = cache_len(cache)
            pos = len(ctx)
            with torch.no_grad():
                if q:  # the question over the compressed context, uncompressed, no press
                    out = model(input_ids=torch.tensor([q]), past_key_values=cache, use_cache=True,
                                position_ids=torch.arange(pos, pos + len(q))[None], logits_to_keep=1)
                    logits = out.logits[0, -1]
                    pos += len(q)
                toks = [int(logits.argmax())]
                c1, w1 = time.perf_counter(), time.process_time()
                for i in range(max_new - 1):
                    out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True,
                                position_ids=torch.tensor([[pos + i]]))
                    toks.append(int(out.logits[0, -1].argmax()))
                c2, w2 = time.perf_counter(), time.process_time()
        except Exception as e:  # record, do not abort the configuration
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
            res["needle"].append(rec)
            continue
        n_dec = max(1, max_new - 1)
        rec.update({"answer_ids": toks, "prefill_s": c1 - c0, "decode_ms_per_token": 1000 * (c2 - c1) / n_dec,
                    "decode_cpu_ms_per_token": 1000 * (w2 - w1) / n_dec, "kv_bytes": kv_bytes(cache),
                    "kv_tokens_context": kept_ctx, "prompt_tokens": len(ctx) + len(q)})
        res["needle"].append(rec)
        del cache
    if cfg.get("ppl"):
        prefix, cont = list(cfg["ppl"]["prefix"]), list(cfg["ppl"]["cont"])
        cache, last = prefill(prefix)
        res["ppl_kept_tokens"] = cache_len(cache)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([cont[:-1]]), past_key_values=cache, use_cache=True,
                        position_ids=torch.arange(len(prefix), len(prefix) + len(cont) - 1)[None])
            logits = torch.cat([last[None], out.logits[0]], 0).double()
            nll = torch.logsumexp(logits, -1) - logits.gather(1, torch.tensor(cont)[:, None])[:, 0]
        res["ppl"] = float(math.exp(float(nll.mean())))
    res["peak_rss_bytes"] = peak_rss_bytes()
    with open(cfg["result"], "w") as f:
        json.dump(res, f)
    return 0


def continuation_nll(model, press, prefix, cont) -> tuple[float, int]:
    """Mean NLL of ``cont`` teacher-forced after ``prefix`` compressed under ``press`` (None: full cache), and the
    cache length the prefix left."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        kept = cache_len(cache)
        last = out.logits[0, -1]
        out = model(input_ids=torch.tensor([cont[:-1]]), past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(len(prefix), len(prefix) + len(cont) - 1)[None])
        logits = torch.cat([last[None], out.logits[0]], 0).double()
        nll = torch.logsumexp(logits, -1) - logits.gather(1, torch.tensor(cont)[:, None])[:, 0]
    return float(nll.mean()), kept


def shared_prefix_nll(model, presses: dict, prefix, cont) -> dict:
    """``{run: (mean NLL, kept)}`` for several score-and-evict presses (kvpress ``ScorerPress``) from ONE prefix pass.

    Under any press the prefix's hidden states are exact (a layer's cache is compressed by a hook after its own
    attention ran, and only later tokens read it), so every press sees the same ``compress()`` inputs whichever
    runs: this pass keeps the layer's whole cache live and hands each press's own ``compress()`` the layer's
    keys and values in the same hook, collecting each press's kept K/V in its own cache; each continuation then
    runs over its own cache: the same numbers as one prefill per press (``"own_prefill": true`` in a run forces that)."""
    import torch
    from transformers import DynamicCache

    from kvpress.presses.base_press import is_prefilling
    from kvpress.utils import extract_keys_and_values

    caches = {name: DynamicCache() for name in presses}

    def hook(module, args, kwargs, output):
        if not is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            return output
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for name, press in presses.items():
            k, v = press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
            caches[name].update(k, v, module.layer_idx)
        return output

    for press in presses.values():
        press.post_init_from_model(model)
    for layer in model.model.layers:  # as BasePress.__call__ does before its hooks
        layer.self_attn.rotary_emb = model.model.rotary_emb
    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prefix]), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    last = out.logits[0, -1]
    res = {}
    with torch.no_grad():
        for name, cache in caches.items():
            kept = cache_len(cache)
            o = model(input_ids=torch.tensor([cont[:-1]]), past_key_values=cache, use_cache=True,
                      position_ids=torch.arange(len(prefix), len(prefix) + len(cont) - 1)[None])
            logits = torch.cat([last[None], o.logits[0]], 0).double()
            nll = torch.logsumexp(logits, -1) - logits.gather(1, torch.tensor(cont)[:, None])[:, 0]
            res[name] = (float(nll.mean()), kept)
    return res


def windows_main(cfg: dict) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import kvpress

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    model = AutoModelForCausalLM.from_pretrained(cfg["hf_dir"], dtype=torch.float32).eval()
    res = {"windows": {}, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                       "kvpress": getattr(kvpress, "__version__", None) or "0.5.5"}}
    if cfg.get("resume"):  # keep what an interrupted worker measured on the same ids
        try:
            with open(cfg["result"]) as f:
                res["windows"] = json.load(f).get("windows", {})
        except (OSError, ValueError):
            pass
    from kvpress.presses.scorer_press import ScorerPress

    def todo(run, name):
        return "nll" not in res["windows"].setdefault(run["name"], {}).get(name, {})

    for name, w in cfg["windows"].items():  # windows outer: an interrupted worker has every run on the windows it did
        t0 = time.perf_counter()
        shared = {}
        for run in cfg["runs"]:  # score-and-evict presses: one prefix pass for all (see shared_prefix_nll)
            if run["press"] != "none" and not run.get("own_prefill") and todo(run, name):
                press = getattr(kvpress, run["press"])(compression_ratio=float(run["compression_ratio"]), **run.get("press_kw", {}))
                if isinstance(press, ScorerPress):
                    shared[run["name"]] = press
        if shared:
            for rname, (nll, kept) in shared_prefix_nll(model, shared, list(w["prefix"]), list(w["cont"])).items():
                res["windows"][rname][name] = {"nll": nll, "kept": kept, "shared_prefix": True}
            with open(cfg["result"], "w") as f:
                json.dump(res, f)
        for run in cfg["runs"]:
            press = None
            if run["press"] != "none":
                press = getattr(kvpress, run["press"])(compression_ratio=float(run["compression_ratio"]), **run.get("press_kw", {}))
            got = res["windows"].setdefault(run["name"], {})
            if "nll" in got.get(name, {}):
                continue
            try:
                nll, kept = continuation_nll(model, press, list(w["prefix"]), list(w["cont"]))
                got[name] = {"nll": nll, "kept": kept}
            except Exception as e:  # record, do not abort the other runs
                got[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            with open(cfg["result"], "w") as f:  # after every run: an interrupted worker keeps what it measured
                json.dump(res, f)
        print(f"kvpress {name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    res["peak_rss_bytes"] = peak_rss_bytes()
    with open(cfg["result"], "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
