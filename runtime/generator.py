"""``Generator``: text generation over a generate bundle with a KV cache that never exceeds a budget.

Torch-free (numpy + onnxruntime + tokenizers). Per call: tokenize (optionally through the bundle's
chat template) -> gather embedding rows -> **chunked prefill, layer by layer** (each layer runs the
prompt in chunks; its cache is filled chunk by chunk and, when the prompt is longer than the budget,
the policy evicts as it goes, so no full-length attention matrix and no over-budget cache ever exist)
-> decode loop (greedy or seeded temperature / top-p sampling, stop tokens).

The cache of every layer is a set of numpy buffers preallocated at the start of the call with a
fixed capacity derived from ``kv_budget``; a policy (:mod:`edge_sel.runtime.policies`) decides what
stays (``keep``) and, at each decode step, what the attention reads (``select``).

``kv_budget``: ``None`` (room for the whole prompt and every new token), tokens per layer (``int``),
a fraction of the prompt (``float`` in (0, 1]), or bytes for the whole cache (``"64MB"``: keys, values,
slot positions, scores and the policy's own statistics, all layers). An infeasible budget is refused
before any work with the minimum that would work (:class:`BudgetError.minimum_bytes`).

``protect_suffix=n`` (``generate``/``score``): the last ``n`` prompt tokens (e.g. a question after a long
context) are not compressed: each layer compresses the context first (its observation window is the
end of the context, so the policy never sees the suffix) and then runs the suffix over the compressed
cache and appends its keys/values — kvpress's "context compressed, question not". A fraction budget
then means the fraction of the context kept, with the suffix and the new tokens on top (as kvpress's
``compression_ratio``); a token or byte budget still bounds the whole cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import BudgetError, InputError
from edge_sel.runtime.memory import PeakTracker, trim_heap
from edge_sel.runtime.units import format_size, parse_size

from .embedding import Embedder
from .residency import WeightPages, release_array, snapshot
from .kvcache import LayerCache
from .policies import Context, Full, Policy, make_policy, policy_label
from .sessions import load_session, session_options

log = logging.getLogger("edge_sel")

RECALL_BLOCK = 32  # score(): suffix tokens per recall selection (each block selected by the queries before it)
DEFAULT_CHUNK_TOKENS = 256  # measured (SmolLM2, 1k prompt): 128-token chunks peak ~180 MB lower than 512 at equal speed
# A prefill chunk's attention materialises a few [heads, chunk, keys] f32 tensors (scores, masked scores,
# probabilities, the policy's statistics), so its transient memory grows with the prompt: long prompts get
# shorter chunks, keeping one such tensor under this many bytes. Measured (SmolLM2, 4k prompt, mpcache_recall
# @0.1, RssAnon peak / prefill s): 256-token chunks 541 MB / 36.6 s, 128: 324 / 42.8, 64: 215 / 40.7.
PREFILL_SCORES_BYTES = 12 << 20
TRIM_AFTER_TOKENS = 1024  # longer prompts trim the heap after every prefill layer: 4k, 64-token chunks, RssAnon
                          # peak 223 -> 217 MB and sampled anon+file peak 808 -> 725 MB at equal prefill time


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_ids: list[int]
    stats: dict[str, Any]
    logits: list[np.ndarray] | None = None
    finish_reason: str = "length"


@dataclass
class _Call:
    """State of one generate call."""

    prompt_ids: list[int]
    max_new: int
    capacity: int
    policy: Policy
    caches: list[LayerCache] = field(default_factory=list)
    scratch: LayerCache | None = None  # "layer" prefill: one layer's whole-prompt KV, reused layer after layer
    evictions: int = 0
    scratch_peak: int = 0
    suffix: int = 0  # protected prompt suffix: prefilled after the rest was compressed, never evicted by prefill
    suffix_hidden: np.ndarray | None = None  # last layer's hidden from the last compressed token to the end (score)
    fetch: int = 0  # recall fetch-area slots per layer, on top of ``capacity`` (resident), inside the budget
    causal_suffix: bool = False  # score(): the suffix is text being scored, recall must not look ahead in it


def _parse_budget(kv_budget) -> tuple[str, float] | None:
    if kv_budget is None:
        return None
    if isinstance(kv_budget, bool):
        raise InputError(f"kv_budget must be tokens, a fraction or a size, got {kv_budget!r}")
    if isinstance(kv_budget, (int, np.integer)):
        if kv_budget <= 0:
            raise BudgetError(f"kv_budget must be positive, got {kv_budget} tokens")
        return ("tokens", int(kv_budget))
    if isinstance(kv_budget, float):
        if not 0.0 < kv_budget <= 1.0:
            raise BudgetError(f"kv_budget as a fraction of the prompt must be in (0, 1], got {kv_budget}")
        return ("fraction", float(kv_budget))
    text = str(kv_budget).strip()
    try:  # "512" -> tokens, "0.2" -> fraction, "64MB" -> bytes
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        if value <= 0:
            raise BudgetError(f"kv_budget must be positive, got {text!r}")
        if "." in text or "e" in text.lower():
            return _parse_budget(value if value <= 1.0 else int(value))
        return ("tokens", int(value))
    try:
        return ("bytes", parse_size(text))
    except InputError as e:
        raise BudgetError(f"kv_budget {text!r}: {e}. Use tokens (512), a fraction of the prompt (0.2) or a size (64MB)") from None


class Generator:
    """Generate text from a generate bundle under a KV-cache budget.

    >>> gen = Generator("bundles/smol-gen", kv_budget="64MB", policy="mpcache")
    >>> gen.generate("Write a haiku about the sea.", chat=True, max_new_tokens=64).text
    >>> for piece in gen.stream("Once upon a time", max_new_tokens=32): print(piece, end="")

    policy: a name from :data:`edge_sel.runtime.policies.REGISTRY` (``full``, ``streaming_llm``, ``h2o``,
    ``snapkv``, ``mpcache``, ``windowkv``, ``prompt_distill``, ``layer_skip``), a ``+`` composition, or a
    :class:`Policy` instance. Prompts longer than the bundle's context are refused (not truncated);
    ``max_new_tokens`` is clamped so positions stay inside the context.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, kv_budget: int | float | str | None = None,
                 policy: str | Policy | None = "full", threads: int | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 prefill: str = "layer"):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if self.bundle.task != "generate":
            raise InputError(f"{self.bundle.root} is a {self.bundle.task!r} bundle; generation needs a bundle exported "
                             f"with `edge-sel export MODEL -o OUT --task generate`")
        self.budget = _parse_budget(kv_budget)
        self.policy_spec = policy
        make_policy(policy)  # validate the name now
        if prefill not in ("layer", "rolling"):
            raise InputError(f"prefill must be 'layer' or 'rolling', got {prefill!r}")
        self.prefill_mode = prefill
        if chunk_tokens <= 0:
            raise InputError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.chunk_tokens = int(chunk_tokens)
        m = self.bundle.manifest
        d = self.bundle.dims
        self.n_layers, self.H = len(self.bundle.layers), d["hidden"]
        self.heads, self.kv_heads, self.head_dim = d["heads"], d["kv_heads"], d["head_dim"]
        self.context = self.bundle.max_length
        self.stop_ids = set(int(i) for i in m.get("stop_ids", []))
        self.chat = m.get("chat")
        self.tok = Tokenizer.from_file(str(self.bundle.path(m["tokenizer"]["file"])))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.embedder = Embedder(self.bundle)
        self._table = self.embedder.open_table()
        so_threads = threads
        before = snapshot()  # the mappings the sessions below add are this generator's (see WeightPages)
        self.sessions = []
        for i, layer in enumerate(self.bundle.layers):
            qkv = m["extra_graphs"][layer["qkv"]]["file"]
            self.sessions.append((self._load(self.bundle.path(qkv), so_threads), self._load(self.bundle.layer_path(i), so_threads)))
        self.head = self._load(self.bundle.path(m["head"]["file"]), so_threads)
        # each layer's weight files (qkv graph, attention+MLP graph), released after its prefill pass
        self._layer_weights = [(self.bundle.path(m["extra_graphs"][layer["qkv"]]["weights"]), self.bundle.path(layer["weights"]))
                               for layer in self.bundle.layers]
        self._head_weights = self.bundle.path(m["head"]["weights"])
        self._pages = WeightPages([p for pair in self._layer_weights for p in pair] + [self._head_weights], before)
        self.last_stats: dict[str, Any] = {}

    @staticmethod
    def _load(path, threads):
        import onnxruntime as ort

        from edge_sel.runtime.errors import BundleError

        # spinning is already off in session_options (60+ sessions share the cores; setting it twice makes
        # onnxruntime print a warning per session); prefill shapes change every chunk, so no memory pattern
        so = session_options(threads, mem_pattern=False)
        try:
            return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BundleError(f"cannot load graph {path}: {e}") from None

    # ---- public API ----------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt is empty")
        if chat:
            c = self.chat
            if not c:
                raise InputError(f"{self.bundle.root} has no chat template; run without --chat")
            if system is not None and "system_before" in c:
                text = c["system_before"] + system + c["system_between"] + prompt + c["after"]
            else:
                text = c["before"] + prompt + c["after"]
            return self.tok.encode(text, add_special_tokens=False).ids
        return self.tok.encode(prompt, add_special_tokens=True).ids

    def bytes_per_token(self, policy: Policy | None = None) -> int:
        """Budget bytes one cached token costs across all layers (K, V, position, score, policy statistics)."""
        p = policy or make_policy(self.policy_spec)
        return self.n_layers * (LayerCache.bytes_per_slot(self.kv_heads, self.head_dim) + p.bytes_per_token(self.kv_heads, self.head_dim))

    def minimum_budget(self, prompt: str, max_new_tokens: int = 128, chat: bool = False) -> int:
        """Smallest ``kv_budget`` in bytes this prompt can run with under the policy."""
        ids = self.encode(prompt, chat)
        policy = make_policy(self.policy_spec)
        max_new = self._clamp_new(len(ids), max_new_tokens)
        return self._min_tokens(policy, len(ids), max_new) * self.bytes_per_token(policy) + self._fixed_bytes(policy, len(ids) + max_new)

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False, system: str | None = None, stop: bool = True,
                 return_logits: bool = False, protect_suffix: int = 0) -> GenerationResult:
        tokens: list[int] = []
        logits: list[np.ndarray] | None = [] if return_logits else None
        call = None
        for tok, lg, call in self._run(prompt, max_new_tokens, temperature, top_p, seed, chat, system, stop,
                                       suffix=protect_suffix):
            tokens.append(tok)
            if logits is not None:
                logits.append(lg)
        text_ids = [t for t in tokens if not (stop and t in self.stop_ids)]
        finish = "stop" if tokens and stop and tokens[-1] in self.stop_ids else "length"
        return GenerationResult(self.tok.decode(text_ids, skip_special_tokens=True), tokens,
                                list(call.prompt_ids) if call else [], dict(self.last_stats), logits, finish)

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, chat: bool = False, system: str | None = None, stop: bool = True) -> Iterator[str]:
        """Yield the continuation as text pieces as tokens are generated (``last_stats`` is set at the end)."""
        ids: list[int] = []
        shown = ""
        for tok, _, _ in self._run(prompt, max_new_tokens, temperature, top_p, seed, chat, system, stop):
            if stop and tok in self.stop_ids:
                break
            ids.append(tok)
            text = self.tok.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for the next byte token
            if len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
            shown = text
        final = self.tok.decode(ids, skip_special_tokens=True)
        if len(final) > len(shown) and final.startswith(shown):
            yield final[len(shown):]

    def close(self) -> None:
        self.sessions = []
        self.head = None
        self._table = None

    # ---- planning -------------------------------------------------------------------------
    def _clamp_new(self, n_prompt: int, max_new: int) -> int:
        room = self.context - n_prompt
        if max_new > room:
            log.warning("max_new_tokens=%d clamped to %d: the model's context is %d tokens", max_new, room, self.context)
        return max(1, min(max_new, room))

    def _min_tokens(self, policy: Policy, n_prompt: int, max_new: int) -> int:
        if isinstance(policy, Full):
            return n_prompt + max_new
        a = policy.align
        need = max(policy.min_tokens + 1, 2 * a, 8)
        return -(-need // a) * a

    def _fixed_bytes(self, policy: Policy, whole: int) -> int:
        return policy.fixed_bytes(self.n_layers, self.kv_heads, self.head_dim, whole) if policy.recalls else 0

    def _capacity(self, policy: Policy, n_prompt: int, max_new: int, suffix: int = 0) -> tuple[int, int, bool]:
        """Resident tokens per layer the cache holds, the recall fetch area on top of them (both inside
        the budget), and whether prefill uses a one-layer whole-prompt scratch."""
        whole = n_prompt + max_new
        per_tok = self.bytes_per_token(policy)
        need = self._min_tokens(policy, n_prompt, max_new)
        scratch = self.prefill_mode == "layer"
        fixed = self._fixed_bytes(policy, whole) if self.budget is not None else 0
        if self.budget is None:
            cap = whole
        else:
            kind, value = self.budget
            if kind == "bytes":
                value = max(0, int(value) - fixed)  # the recall statistics come out of the byte budget first
            cap = {"tokens": lambda: int(value), "bytes": lambda: int(value) // per_tok,
                   "fraction": lambda: (int(np.ceil(value * (n_prompt - suffix))) + suffix + max_new if suffix
                                        else int(np.ceil(value * n_prompt)))}[kind]()
            if kind == "bytes" and scratch and cap < whole:
                # the scratch counts against a byte budget; without room for it, prefill rolls instead
                with_scratch = (int(value) - n_prompt * LayerCache.bytes_per_slot(self.kv_heads, self.head_dim)) // per_tok
                if with_scratch // policy.align * policy.align >= need:
                    cap = with_scratch
                else:
                    scratch = False
        a = policy.align
        if self.budget is None:
            cap = -(-whole // a) * a
        elif suffix:  # exact: the context's share is not rounded down to the policy's alignment
            cap = min(-(-whole // a) * a, cap)
        else:
            cap = min(-(-whole // a) * a, cap // a * a)
        fetch = 0
        if self.budget is not None and policy.recalls:  # the fetch area only takes what the resident minimum leaves
            fetch = policy.fetch_tokens(cap, suffix, whole, max(0, cap - max(need, suffix + 8 if suffix else 0)))
            if fetch == 0 and cap < whole:
                log.warning("kv_budget leaves no room for %s's recall fetch area beside the %d resident tokens it needs: "
                            "running without recall", policy_label(policy), need)
        res = cap - fetch
        if (res < need or (suffix and res - suffix < 8)) and res < whole:
            what = {"tokens": "tokens", "fraction": "of the prompt", "bytes": "bytes"}[self.budget[0]] if self.budget else ""
            extra = (f"the 'full' policy keeps the {n_prompt}-token prompt and {max_new} new tokens"
                     if isinstance(policy, Full) else f"policy {policy_label(policy)!r} needs at least {need} tokens per layer")
            if suffix and not isinstance(policy, Full) and need < suffix + 8:
                extra += f" and room for the {suffix} protected suffix tokens plus 8"
                need = suffix + 8
            raise BudgetError(
                f"kv_budget {self.budget[1] if self.budget else None} {what} gives {cap} cached tokens per layer, below the "
                f"minimum {need} ({extra}); minimum budget: {need} tokens = {format_size(need * per_tok + fixed)} "
                f"(--kv-budget {need} or {-(-(need * per_tok + fixed) // 1024**2)}MiB)", minimum_bytes=need * per_tok + fixed)
        return res, fetch, scratch and res < whole

    # ---- engine ---------------------------------------------------------------------------
    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embedder(self._table, ids)

    def _logits(self, h_last: np.ndarray) -> np.ndarray:
        return self.head.run(None, {"hidden": np.ascontiguousarray(h_last, dtype=np.float32)})[0][0]

    @staticmethod
    def _sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            cut = int(np.searchsorted(cum, top_p)) + 1
            keep = order[:cut]
            q = p[keep] / p[keep].sum()
            return int(keep[rng.choice(len(keep), p=q)])
        return int(rng.choice(len(p), p=p))

    def _make_room(self, call: _Call, L: int, need: int, phase: str) -> None:
        c, policy = call.caches[L], call.policy
        a = policy.align
        block = need
        if phase == "decode":
            block = max(need, min(32, max(1, call.capacity // 8)))
        block = -(-block // a) * a
        target = max(0, (call.capacity - block) // a * a)
        idx = policy.keep(L, c, target, phase)
        if idx is None:  # no opinion: attention sinks + recent tokens (StreamingLLM), needs no scores
            sinks = min(4, target)
            idx = np.concatenate([np.arange(sinks), np.arange(c.n - (target - sinks), c.n)])
        policy.evicted(L, c, idx)
        c.compact(idx)
        policy.after_compact(L, c)
        call.evictions += 1

    def _plan_chunks(self, n: int, chunk: int, obs: int) -> list[tuple[int, int, str]]:
        """Chunks of at most ``chunk`` tokens; the last ``obs`` tokens (the observation window) get their own."""
        obs = min(obs, n)
        end = n - obs
        out = [(a, min(end, a + chunk), "prefill") for a in range(0, end, chunk)]
        out += [(a, min(n, a + chunk), "window") for a in range(end, n, chunk)]
        return out

    def score(self, prompt: str | list[int], continuation: list[int], chat: bool = False,
              compress_continuation: bool = True) -> dict[str, Any]:
        """Teacher-forced negative log-likelihood of ``continuation`` token ids after ``prompt`` under the
        policy and budget: ``{"nll", "ppl", "n", "nll_tokens"}`` (``nll_tokens[t]``: token ``t``'s NLL). By default the cache is compressed exactly as during
        generation (the continuation is decoded token by token and may be evicted); with
        ``compress_continuation=False`` only the prompt is compressed and the continuation is run over it
        as a protected suffix (kvpress's perplexity: compressed prefix, continuation uncompressed). The prefix
        is compressed without seeing the continuation; a recalling policy then reads evicted tokens back
        **causally**, in blocks of ``RECALL_BLOCK`` continuation tokens, each block's fetch area selected by
        the queries of the tokens before it (the prefix's last query for the first block), so token ``t``'s
        prediction never depends on a token after ``t`` (tested)."""
        cont = [int(t) for t in continuation]
        if not cont:
            raise InputError("continuation is empty")
        if not compress_continuation:
            ids = (list(prompt) if isinstance(prompt, (list, tuple, np.ndarray)) else self.encode(prompt, chat)) + cont
            call = None
            with contextlib.closing(self._run(ids, 1, 0.0, 1.0, None, False, None, False, suffix=len(cont),
                                              suffix_hidden=True, causal_suffix=True)) as run:
                for _, _, call in run:
                    break
            lg = self.head.run(None, {"hidden": np.ascontiguousarray(call.suffix_hidden[0, :-1], dtype=np.float32)})[0]
            z = lg.astype(np.float64)
            m = z.max(axis=1)
            lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
            nll_t = lse - z[np.arange(len(cont)), cont]
            return {"nll": float(nll_t.mean()), "ppl": float(np.exp(nll_t.mean())), "n": len(cont),
                    "nll_tokens": nll_t.tolist()}
        nll_t = []
        for step, (tok, lg, _) in enumerate(self._run(prompt, len(cont), 0.0, 1.0, None, chat, None, False, forced=cont)):
            z = lg.astype(np.float64)
            m = z.max()
            nll_t.append(float(m + np.log(np.exp(z - m).sum()) - z[cont[step]]))
        nll = float(np.mean(nll_t))
        return {"nll": nll, "ppl": float(np.exp(nll)), "n": len(cont), "nll_tokens": nll_t}

    def _run(self, prompt, max_new_tokens, temperature, top_p, seed, chat, system, stop, forced=None, suffix=0,
             suffix_hidden=False, causal_suffix=False):
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise InputError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in prompt]
            if not ids:
                raise InputError("prompt is empty")
        else:
            ids = self.encode(prompt, chat, system)
        N = len(ids)
        if N >= self.context:
            raise InputError(f"prompt is {N} tokens, the model's context is {self.context}; refusing (not truncating): "
                             f"shorten the prompt to at most {self.context - 1} tokens")
        if isinstance(suffix, bool) or not isinstance(suffix, (int, np.integer)) or not 0 <= suffix < N:
            raise InputError(f"protect_suffix must be an integer in [0, {N}) (the prompt is {N} tokens), got {suffix!r}")
        max_new = self._clamp_new(N, int(max_new_tokens))
        if self._releases_weights(N):  # before this call allocates its cache (the last call's weights are still mapped)
            self._release_weights()
        policy = make_policy(self.policy_spec)
        cap, fetch, use_scratch = self._capacity(policy, N, max_new, int(suffix))
        cold_dir = None
        t0 = time.perf_counter()
        tracker = PeakTracker()
        tracker.__enter__()
        try:
            if fetch:  # evicted K/V go to files of this call (MPCache recall), removed in `finally`
                cold_dir = tempfile.mkdtemp(prefix="edge_sel_cold_")
            policy.begin(Context(self.n_layers, self.kv_heads, self.heads, self.head_dim, cap, N, max_new,
                                 cold_dir=cold_dir, fetch=fetch, stream_suffix=bool(causal_suffix)))
            call = _Call(ids, max_new, cap, policy, suffix=int(suffix), fetch=fetch, causal_suffix=bool(causal_suffix))
            if suffix_hidden:
                call.suffix_hidden = np.empty(0)
            call.caches = [LayerCache(self.kv_heads, cap, self.head_dim, fetch=fetch) for _ in range(self.n_layers)]
            if use_scratch:
                call.scratch = LayerCache(self.kv_heads, N, self.head_dim)
            rng = np.random.default_rng(seed)
            cost_of = (lambda: dict(getattr(policy, "total_cost", policy.cost)))
            logits = self._prefill(call)
            prefill_s = time.perf_counter() - t0
            prefill_cost = cost_of()
            t1 = time.perf_counter()
            self._cpu0 = time.process_time()
            pos = N
            n_decode = 0
            for step in range(max_new):
                tok = forced[step] if forced is not None else self._sample(logits, temperature, top_p, rng)
                self._set_stats(call, prefill_s, t1, n_decode, tracker, prefill_cost, cost_of(), step + 1)
                yield tok, logits, call
                if (stop and tok in self.stop_ids) or step == max_new - 1:
                    break
                logits = self._decode_step(call, tok, pos)
                pos += 1
                n_decode += 1
        finally:
            policy.end()
            if cold_dir is not None:
                shutil.rmtree(cold_dir, ignore_errors=True)
            tracker.__exit__(None, None, None)
            if "prefill_s" in self.last_stats:
                self.last_stats["peak_rss_bytes"] = max(self.last_stats.get("peak_rss_bytes", 0), tracker.peak)

    def _set_stats(self, call: _Call, prefill_s: float, t_decode0: float, n_decode: int, tracker, prefill_cost, cost, n_tokens):
        decode_s = time.perf_counter() - t_decode0
        decode_cpu = time.process_time() - self._cpu0
        per_slot = LayerCache.bytes_per_slot(self.kv_heads, self.head_dim) + call.policy.bytes_per_token(self.kv_heads, self.head_dim)
        decode_cost = {k: cost.get(k, 0) - prefill_cost.get(k, 0) for k in ("comparisons", "multiplications", "exp_div", "gathers")}
        cold = call.policy.cold_stats()
        peak = max(tracker.peak, tracker.start)
        try:
            from edge_sel.runtime.memory import peak_rss_bytes

            peak = max(peak, peak_rss_bytes())
        except Exception:
            pass
        self.last_stats = {
            "policy": policy_label(call.policy),
            "prompt_tokens": len(call.prompt_ids),
            "new_tokens": n_tokens,
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_ms_per_token": 1000 * decode_s / n_decode if n_decode else None,
            "decode_cpu_ms_per_token": 1000 * decode_cpu / n_decode if n_decode else None,  # all threads; robust to a busy machine
            "kv_capacity_tokens": call.capacity + call.fetch,  # resident + recall fetch area: what attention may read
            "kv_resident_tokens": call.capacity,
            "kv_fetch_tokens": call.fetch,
            "kv_budget_bytes": self.budget[1] if self.budget and self.budget[0] == "bytes" else None,
            "kv_bytes_allocated": (call.capacity + call.fetch) * per_slot * self.n_layers + cold.get("cold_stats_bytes", 0),
            "kv_bytes_peak": sum(c.peak for c in call.caches) * per_slot + self._scratch_bytes(call) + cold.get("cold_stats_bytes", 0),
            "prefill_mode": "layer" if call.scratch is not None else "rolling",
            "prefill_scratch_bytes": self._scratch_bytes(call),
            "kv_tokens_peak_per_layer": max(c.peak for c in call.caches),
            "kv_tokens_kept": [c.n for c in call.caches],
            "selection_scratch_bytes_peak": call.scratch_peak,
            "evictions": call.evictions,
            "cost_prefill": {k: prefill_cost.get(k, 0) for k in ("comparisons", "multiplications", "exp_div", "gathers")},
            "cost_per_decode_step": {k: (v / n_decode if n_decode else 0.0) for k, v in decode_cost.items()},
            "skipped_layers": sorted(l for l in range(self.n_layers) if call.policy.skip_layer(l)),
            "peak_rss_bytes": peak,
        }
        if cold:  # evicted K/V on disk: sizes, and bytes read back (prefill's suffix, per decode step)
            self.last_stats["cold"] = {
                "tokens_per_layer_max": max(cold["cold_tokens"]), "file_bytes": cold["cold_file_bytes"],
                "stats_bytes": cold["cold_stats_bytes"], "bytes_written": cold["cold_bytes_written"],
                "bytes_read_suffix": cold["cold_bytes_read_suffix"],
                "bytes_read_per_decode_step": cold["cold_bytes_read_decode"] / n_decode if n_decode else 0.0,
                "selection": cold.get("selection"), "select_scratch_bytes_peak": cold.get("select_scratch_bytes_peak", 0)}

    def _scratch_bytes(self, call: _Call) -> int:
        return 0 if call.scratch is None else call.scratch.capacity * LayerCache.bytes_per_slot(self.kv_heads, self.head_dim)

    def _releases_weights(self, n_prompt: int) -> bool:
        """Long prompts prefill with each layer's weights mapped only during its own pass (see
        :mod:`edge_sel.runtime.residency`); decoding maps them all again, once."""
        return n_prompt > TRIM_AFTER_TOKENS and self._pages.releasable

    def _release_weights(self) -> None:
        self._pages.release(*[p for pair in self._layer_weights for p in pair], self._head_weights)

    def _prefill_chunk(self, n_keys: int) -> int:
        """Prefill chunk for a prompt of ``n_keys`` tokens: ``chunk_tokens``, or fewer (a multiple of 32, at
        least 32) when one ``[heads, chunk, n_keys]`` f32 tensor would exceed :data:`PREFILL_SCORES_BYTES`."""
        fit = PREFILL_SCORES_BYTES // (4 * self.heads * max(1, int(n_keys)))
        return min(self.chunk_tokens, max(32, fit // 32 * 32))

    def _prefill(self, call: _Call) -> np.ndarray:
        """Layer by layer, each layer over the prompt in chunks.

        "layer" mode (default when evicting): the layer's whole prompt K/V is built in one scratch buffer
        shared by all layers, so the prefill is exact; then the policy compresses it once into the layer's
        budgeted cache, scored by the observation window's attention over every prompt key (SnapKV /
        MPCache "look-once" semantics). "rolling" mode: the layer's own cache is the only buffer and the
        policy evicts as chunks arrive (strict bound, no scratch; the window sees only what survived)."""
        policy, cap = call.policy, call.capacity
        ids = np.asarray(call.prompt_ids, dtype=np.int64)[None]
        N, max_new = ids.shape[1], call.max_new
        release_weights = self._releases_weights(N)  # _run already dropped the last call's mappings
        hidden = self._embed(ids)
        release_array(self._table)  # the gathered rows (and their read-around) leave RSS; hidden is a copy
        positions = np.arange(ids.shape[1], dtype=np.int64)
        sfx_from = N - call.suffix  # positions >= sfx_from: the protected suffix
        evicting = N + max_new > cap
        scratch = call.scratch
        rolling = evicting and scratch is None
        chunk = self._prefill_chunk(N) if not rolling else max(1, min(self.chunk_tokens, cap // 4))
        obs = policy.observation_window(sfx_from)
        if rolling:
            obs = min(obs, max(1, cap // 2))
        for L, (qkv, attn) in enumerate(self.sessions):
            c = call.caches[L]
            work = c if scratch is None else scratch
            work.reset()
            out = np.empty_like(hidden)
            q = None
            in_window = False
            n_sfx = int((positions >= sfx_from).sum()) if call.suffix else 0
            n_ctx = hidden.shape[1] - n_sfx
            for a, b, phase in self._plan_chunks(n_ctx, chunk, obs):
                h = hidden[:, a:b]
                p = positions[None, a:b]
                q, k, v = qkv.run(None, {"hidden": h, "position_ids": p})
                if phase == "window" and not in_window:
                    in_window = True
                    if scratch is not None and getattr(policy, "window_reset", False):
                        work.score[:, : work.n] = 0.0  # look-once: only the window's queries score the keys
                if work.n + (b - a) > work.capacity:
                    self._make_room(call, L, b - a, phase)
                s = work.append(k, v, p[0])
                if scratch is None:
                    policy.after_append(L, c, s)
                kc, vc, kp = work.prefix()
                ho, asum, amax = attn.run(None, {"hidden": h, "q": q, "k_cache": kc, "v_cache": vc, "key_pos": kp,
                                                 "position_ids": p})
                policy.observe(L, work, asum, amax, None, phase)
                out[:, a:b] = ho
            if scratch is not None:
                idx = None
                if scratch.n + n_sfx + max_new > cap:
                    block = -(-min(32, max(1, cap // 8), max_new) // policy.align) * policy.align
                    target = max(0, (cap - block) // policy.align * policy.align)
                    if n_sfx:  # room for the suffix and, when it fits, every new token (no decode eviction)
                        room = cap - n_sfx
                        target = room - max_new if room - max_new >= room // 2 else \
                            max(1, room - block)
                    idx = policy.keep(L, scratch, target, "final")
                    if idx is None:
                        sinks = min(4, target)
                        idx = np.concatenate([np.arange(sinks), np.arange(scratch.n - (target - sinks), scratch.n)])
                    call.evictions += 1
                    policy.evicted(L, scratch, idx)
                c.load_from(scratch, idx)
                policy.after_compact(L, c)
            if n_sfx:
                q = self._prefill_suffix(call, L, hidden, positions, out, n_ctx, q)
                work = c
            keep = policy.after_layer(L, hidden, out, q[0, :, -1], work, positions)
            hidden = out
            if N > TRIM_AFTER_TOKENS:
                trim_heap()  # the layer's freed attention temporaries leave RSS before the next layer runs
            if release_weights:
                # ... and its weights: the prefill's activations and the whole model's weights never peak together
                self._pages.release(*self._layer_weights[L])
            if keep is not None:
                hidden = np.ascontiguousarray(hidden[:, keep])
                positions = positions[keep]
        if release_weights:  # decoding runs every layer per token: map the weights back now, inside prefill_s,
            self._pages.populate(*[p for pair in self._layer_weights for p in pair])  # so the first decode step
            # is not charged ~0.2 ms per MiB of page faults
        if call.suffix_hidden is not None:
            n_sfx = int((positions >= sfx_from).sum())
            call.suffix_hidden = hidden[:, hidden.shape[1] - n_sfx - 1:]
        return self._logits(hidden[:, -1])

    def _prefill_suffix(self, call: _Call, L: int, hidden, positions, out, n_ctx: int, q_ctx=None):
        """The protected suffix of layer ``L``: attends to the compressed context and to itself; its
        keys/values are appended uncompressed (in "rolling" mode the context makes room for them first).

        With a recalling policy (fetch area), evicted groups are read back before the attention: for a
        question (``generate``) selected by the suffix's own queries, all known up front; for text being
        scored (``causal_suffix``) block by block, each block by the queries before it (the context's
        last query ``q_ctx`` for the first), so no token's prediction depends on a later token."""
        policy, c = call.policy, call.caches[L]
        qkv, attn = self.sessions[L]
        T = hidden.shape[1]
        if c.n + (T - n_ctx) > c.capacity:
            room = c.capacity - (T - n_ctx)
            reserve = call.max_new if room - call.max_new >= room // 2 else 0
            self._make_room(call, L, T - n_ctx + reserve, "window")
        recalling = c.fetch > 0
        step = min(self.chunk_tokens, RECALL_BLOCK) if recalling and call.causal_suffix else self.chunk_tokens
        chunks = [(a, min(T, a + step)) for a in range(n_ctx, T, step)]
        qkvs = None
        if recalling:  # the layer's suffix queries, known before any of its attention runs
            qkvs = [qkv.run(None, {"hidden": hidden[:, a:b], "position_ids": positions[None, a:b]}) for a, b in chunks]
            if not call.causal_suffix:
                policy.recall(L, np.concatenate([x[0] for x in qkvs], axis=2), c, "suffix")
        q = None
        q_prev = q_ctx[:, :, -1:] if q_ctx is not None else None
        for i, (a, b) in enumerate(chunks):
            h = hidden[:, a:b]
            p = positions[None, a:b]
            if qkvs is None:
                q, k, v = qkv.run(None, {"hidden": h, "position_ids": p})
            else:
                q, k, v = qkvs[i]
                if call.causal_suffix:
                    if q_prev is not None:
                        policy.recall(L, q_prev, c, "suffix")
                    else:
                        c.set_fetched(0)
                    q_prev = q
            s = c.append(k, v, p[0])
            policy.after_append(L, c, s)
            kc, vc, kp = c.prefix()
            ho, asum, amax = attn.run(None, {"hidden": h, "q": q, "k_cache": kc, "v_cache": vc, "key_pos": kp,
                                             "position_ids": p})
            if policy.needs_decode_attention:  # read like decode steps (H2O / MPCache keep accumulating)
                slots = None
                if c.nf:  # the prefix read resident + fetched slots
                    slots = np.broadcast_to(np.concatenate([np.arange(c.n), c.fetched_slots()]), (c.kv_heads, c.n + c.nf))
                policy.observe(L, c, asum, amax, slots, "decode")
            out[:, a:b] = ho
        return q

    def _decode_step(self, call: _Call, tok: int, pos: int) -> np.ndarray:
        policy, cap = call.policy, call.capacity
        h = self._embed(np.array([[tok]], dtype=np.int64))
        release_array(self._table)  # a long generation must not map the table in row by row (25 us)
        p = np.array([[pos]], dtype=np.int64)
        observe = policy.needs_decode_attention
        for L, (qkv, attn) in enumerate(self.sessions):
            if policy.skip_layer(L):
                continue
            c = call.caches[L]
            q, k, v = qkv.run(None, {"hidden": h, "position_ids": p})
            if c.n + 1 > cap:
                self._make_room(call, L, 1, "decode")
            s = c.append(k, v, p[0])
            policy.after_append(L, c, s)
            policy.recall(L, q, c, "decode")  # recalling policies fill the fetch area (read with the cache below)
            slots = policy.select(L, q, c)
            if slots is None:
                kc, vc, kp = c.full()
            else:
                if c.nf:
                    slots = np.concatenate([slots, np.broadcast_to(c.fetched_slots(), (slots.shape[0], c.nf))], axis=1)
                kc, vc, kp = c.gather(slots)
                call.scratch_peak = max(call.scratch_peak, kc.nbytes + vc.nbytes + kp.nbytes)
            h, asum, amax = attn.run(None, {"hidden": h, "q": q, "k_cache": kc, "v_cache": vc, "key_pos": kp, "position_ids": p})
            if observe:
                policy.observe(L, c, asum, amax, slots, "decode")
        return self._logits(h[:, -1])


__all__ = ["Generator", "GenerationResult"]
