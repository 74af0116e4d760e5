"""``Generator``: text generation over a generate bundle with a KV cache that never exceeds a budget.

Torch-free (numpy + onnxruntime + tokenizers). Per call: tokenize (optionally through the bundle's chat
template, :mod:`edge_sel.runtime.tokenizer`) -> plan the cache (:mod:`edge_sel.runtime.planning.kv`)
-> chunked prefill, layer by layer (:mod:`.prefill`) -> decode loop (:mod:`.decode`, :mod:`.sampling`:
greedy or seeded temperature / top-p, stop tokens) -> stats (:mod:`.stats`).

The cache of every layer is a set of numpy buffers preallocated at the start of the call with a fixed
capacity derived from ``kv_budget``; a policy (:mod:`edge_sel.runtime.policies`) decides what stays and,
at each decode step, what the attention reads.

``protect_suffix=n`` (``generate``/``score``): the last ``n`` prompt tokens (e.g. a question after a long
context) are not compressed (see :mod:`.prefill`); a fraction budget then means the fraction of the
context kept, with the suffix and the new tokens on top.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from edge_sel.runtime import trace
from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import InputError
from edge_sel.runtime.memory import PeakTracker, ReleaseLog

from ..kvcache import LayerCache
from ..planning import KVPlanner
from ..policies import Context, Policy, make_policy
from ..providers import Assignment, ProviderChoice
from ..providers import check_name as check_provider_name
from ..providers import resolve as resolve_provider
from ..sessions import backend_for
from ..tokenizer import Tokenizer
from .call import Call
from .decode import BoundDecoder, bindable, decode_step
from .model import DecoderModel
from .prefill import prefill
from .reconstruct import INSTRUCTION, repeat_passes
from .survey import survey
from .sampling import log_softmax_nll, sample
from .stats import GenerationStats, StatsRecorder


log = logging.getLogger("edge_sel")

# Prefill chunk (tokens): short chunks bound the attention's transient memory at no cost in speed.
DEFAULT_CHUNK_TOKENS = 256


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_ids: list[int]
    stats: dict[str, Any]
    logits: list[np.ndarray] | None = None
    finish_reason: str = "length"


class Generator:
    """Generate text from a generate bundle under a KV-cache budget.

    >>> gen = Generator("bundles/smol-gen", kv_budget="64MB", policy="mpcache")
    >>> gen.generate("Write a haiku about the sea.", chat=True, max_new_tokens=64).text
    >>> for piece in gen.stream("Once upon a time", max_new_tokens=32): print(piece, end="")

    policy: a name from :data:`edge_sel.runtime.policies.REGISTRY`, a ``+`` composition, or a
    :class:`Policy` instance. ``kv_budget``: see :mod:`edge_sel.runtime.planning.kv`. Prompts longer than
    the bundle's context are refused (not truncated); ``max_new_tokens`` is clamped so positions stay
    inside the context. ``prefill``: ``"layer"`` (look-once, exact) or ``"rolling"`` (strict bound).
    ``provider``: the onnxruntime execution provider (``"cpu"`` default, ``"auto"``, ``"coreml"``, ...; see
    :mod:`edge_sel.runtime.providers`); ``last_stats["provider"]`` reports the choice, the nodes that fell back to
    the CPU and the sessions' load time (every session is made once, in the constructor). ``"coreml"`` on a bundle
    with CoreML packages runs them with Core ML (macOS only; :mod:`edge_sel.runtime.coreml`).
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, kv_budget: int | float | str | None = None,
                 policy: str | Policy | None = "full", threads: int | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 prefill: str = "layer", provider: str | ProviderChoice | None = "cpu"):
        check_provider_name(provider)  # an unknown name fails before the bundle opens
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        # "coreml" on a bundle with CoreML packages: the Core ML backend (edge_sel.runtime.coreml); else onnxruntime
        self.providers = Assignment(resolve_provider(provider, packages=self.bundle.spec.coreml is not None))
        if self.bundle.task != "generate":
            raise InputError(f"{self.bundle.root} is a {self.bundle.task!r} bundle; generation needs a bundle exported "
                             f"with `edge-sel export MODEL -o OUT --task generate`")
        self.policy_spec = policy
        make_policy(policy)  # validate the name now
        if prefill not in ("layer", "rolling"):
            raise InputError(f"prefill must be 'layer' or 'rolling', got {prefill!r}")
        self.prefill_mode = prefill
        if chunk_tokens <= 0:
            raise InputError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.chunk_tokens = int(chunk_tokens)
        spec = self.bundle.spec
        d = spec.dims
        self.n_layers, self.H = len(spec.layers), d.hidden
        self.heads, self.kv_heads, self.head_dim = d.heads, d.kv_heads, d.head_dim
        self.context = self.bundle.max_length
        self.planner = KVPlanner(self.n_layers, self.kv_heads, self.head_dim, self.context, kv_budget, prefill, heads=self.heads)
        self.budget = self.planner.budget
        self.stop_ids = set(int(i) for i in spec.stop_ids)
        self.tokenizer = Tokenizer(self.bundle)
        self.model = DecoderModel(self.bundle, threads, self.providers,
                                  backend_for(self.bundle, self.providers, small_ops=True))
        self.stats: GenerationStats | None = None

    @property
    def last_stats(self) -> dict[str, Any]:
        """The last call's stats as a dict (:class:`GenerationStats` in ``stats``)."""
        return self.stats.as_dict() if self.stats is not None else {}

    # ---- public API ----------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        return self.tokenizer.encode_prompt(prompt, chat, system)

    def bytes_per_token(self, policy: Policy | None = None) -> int:
        """Budget bytes one cached token costs across all layers (K, V, position, score, policy statistics)."""
        return self.planner.bytes_per_token(policy or make_policy(self.policy_spec))

    def minimum_budget(self, prompt: str, max_new_tokens: int = 128, chat: bool = False) -> int:
        """Smallest ``kv_budget`` in bytes this prompt can run with under the policy."""
        ids = self.encode(prompt, chat)
        max_new = self.planner.clamp_new(len(ids), max_new_tokens)
        return self.planner.minimum_bytes(make_policy(self.policy_spec), len(ids), max_new)

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False, system: str | None = None, stop: bool = True,
                 return_logits: bool = False, protect_suffix: int = 0) -> GenerationResult:
        tokens: list[int] = []
        logits: list[np.ndarray] | None = [] if return_logits else None
        call = None
        for tok, lg, call in self.run(prompt, max_new_tokens, temperature, top_p, seed, chat, system, stop,
                                      suffix=protect_suffix):
            tokens.append(tok)
            if logits is not None:
                logits.append(lg)
        text_ids = [t for t in tokens if not (stop and t in self.stop_ids)]
        finish = "stop" if tokens and stop and tokens[-1] in self.stop_ids else "length"
        return GenerationResult(self.tokenizer.decode(text_ids), tokens,
                                list(call.prompt_ids) if call else [], self.last_stats, logits, finish)

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, chat: bool = False, system: str | None = None, stop: bool = True) -> Iterator[str]:
        """Yield the continuation as text pieces as tokens are generated (``last_stats`` is set at the end)."""
        ids: list[int] = []
        shown = ""
        for tok, _, _ in self.run(prompt, max_new_tokens, temperature, top_p, seed, chat, system, stop):
            if stop and tok in self.stop_ids:
                break
            ids.append(tok)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 sequence: wait for the next byte token
            if len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
            shown = text
        final = self.tokenizer.decode(ids)
        if len(final) > len(shown) and final.startswith(shown):
            yield final[len(shown):]

    def score(self, prompt: str | list[int], continuation: list[int], chat: bool = False,
              compress_continuation: bool = True) -> dict[str, Any]:
        """Teacher-forced negative log-likelihood of ``continuation`` token ids after ``prompt`` under the
        policy and budget: ``{"nll", "ppl", "n", "nll_tokens"}`` (``nll_tokens[t]``: token ``t``'s NLL). By
        default the cache is compressed exactly as during generation (the continuation is decoded token by
        token and may be evicted); with ``compress_continuation=False`` only the prompt is compressed and
        the continuation is run over it as a protected suffix (kvpress's perplexity: compressed prefix,
        continuation uncompressed). The prefix is compressed without seeing the continuation, and a policy
        that reads evicted tokens back does so causally (the suffix is marked as text being scored), so
        token ``t``'s prediction never depends on a token after ``t`` (tested)."""
        cont = [int(t) for t in continuation]
        if not cont:
            raise InputError("continuation is empty")
        if not compress_continuation:
            ids = (list(prompt) if isinstance(prompt, (list, tuple, np.ndarray)) else self.encode(prompt, chat)) + cont
            call = None
            with contextlib.closing(self.run(ids, 1, 0.0, 1.0, None, False, None, False, suffix=len(cont),
                                             suffix_hidden=True, causal_suffix=True)) as run:
                for _, _, call in run:
                    break
            nll_t = log_softmax_nll(self.model.head_logits(call.suffix_hidden[0, :-1]), cont)
            return {"nll": float(nll_t.mean()), "ppl": float(np.exp(nll_t.mean())), "n": len(cont),
                    "nll_tokens": nll_t.tolist()}
        nll_t = []
        for step, (tok, lg, _) in enumerate(self.run(prompt, len(cont), 0.0, 1.0, None, chat, None, False, forced=cont)):
            nll_t.append(float(log_softmax_nll(lg, cont[step])))
        nll = float(np.mean(nll_t))
        return {"nll": nll, "ppl": float(np.exp(nll)), "n": len(cont), "nll_tokens": nll_t}

    def close(self) -> None:
        self.model.close()

    def survey(self, policy: Policy, context: list[int], kept: float = 1.0) -> bool:
        """Run ``policy``'s survey of ``context`` (:mod:`.survey`; with the passes its recorder asks for) if it asks
        for one at the kept fraction ``kept``; whether it ran."""
        rec = policy.surveyor(kept)
        if rec is None:
            return False
        n = len(context)
        ctx = Context(self.n_layers, self.kv_heads, self.heads, self.head_dim, n, n, 1,
                      rope_theta=self.bundle.spec.rope_theta)
        tk = trace.begin("survey", tokens=n)
        survey(self.model, context, rec, ctx, self.chunk_tokens, release=self.model.releases_weights(n),
               passes=self.reconstruction_passes(rec, context))
        trace.end(tk)
        policy.surveyed(rec)
        return True

    def reconstruction_passes(self, policy: Policy, context: list[int]) -> list:
        """The context-reconstruction passes ``policy`` asks of a look-once prefill over ``context`` (KVzip)."""
        n = len(context)
        length = int(policy.reconstruction(n, max(0, self.context - n)))
        if length <= 0:
            return []
        bos = self.bundle.spec.bos_id
        return repeat_passes(self.tokenizer.encode(INSTRUCTION, add_special_tokens=False), context, length,
                             first=1 if bos is not None and context and context[0] == bos else 0)

    # ---- one call ---------------------------------------------------------------------------
    def _prompt_ids(self, prompt, chat, system) -> list[int]:
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in prompt]
            if not ids:
                raise InputError("prompt is empty")
        else:
            tk = trace.begin("tokenize")
            ids = self.encode(prompt, chat, system)
            trace.end(tk, tokens=len(ids))
        N = len(ids)
        if N >= self.context:
            raise InputError(f"prompt is {N} tokens, the model's context is {self.context}; refusing (not truncating): "
                             f"shorten the prompt to at most {self.context - 1} tokens")
        return ids

    def run(self, prompt, max_new_tokens, temperature, top_p, seed, chat, system, stop, forced=None, suffix=0,
            suffix_hidden=False, causal_suffix=False) -> Iterator[tuple[int, np.ndarray, Call]]:
        """The engine: yields ``(token, its logits, the call's state)`` per new token. ``forced``: tokens fed
        instead of sampled ones (teacher forcing); ``suffix``: protected prompt tokens; ``suffix_hidden``:
        keep the last layer's hidden states of the suffix (``call.suffix_hidden``); ``causal_suffix``: the
        suffix is text being scored, so a policy reading evicted tokens back must not look ahead in it."""
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not (np.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1):
            raise InputError(f"temperature must be finite and >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        ids = self._prompt_ids(prompt, chat, system)
        N = len(ids)
        if isinstance(suffix, bool) or not isinstance(suffix, (int, np.integer)) or not 0 <= suffix < N:
            raise InputError(f"protect_suffix must be an integer in [0, {N}) (the prompt is {N} tokens), got {suffix!r}")
        max_new = self.planner.clamp_new(N, int(max_new_tokens))
        released = ReleaseLog()
        if self.model.releases_weights(N):  # before this call allocates its cache (the last call's weights are mapped)
            self.model.release_weights()
        policy = make_policy(self.policy_spec)
        plan = self.planner.plan(policy, N, max_new, int(suffix))
        t0 = time.perf_counter()
        tracker = PeakTracker()
        tracker.__enter__()
        rec = None
        try:
            # a survey is part of the prefill (its time and memory counted with it)
            if plan.scratch and self.survey(policy, ids[:N - int(suffix)], plan.kept):
                plan = self.planner.plan(policy, N, max_new, int(suffix))  # the layers' shares measured on this prompt
            trace.instant("plan", resident=plan.resident, fetch=plan.fetch, scratch=plan.scratch, prompt_tokens=N,
                          max_new=max_new)
            policy.begin(Context(self.n_layers, self.kv_heads, self.heads, self.head_dim, plan.resident, N, max_new,
                                 fetch=plan.fetch, stream_suffix=bool(causal_suffix), look_once=plan.scratch,
                                 rope_theta=self.bundle.spec.rope_theta, capacities=plan.layers))
            call = Call(ids, max_new, plan.resident, policy, suffix=int(suffix), fetch=plan.fetch,
                        keep_suffix_hidden=bool(suffix_hidden))
            call.caches = [LayerCache(self.kv_heads, plan.layer(L), self.head_dim, fetch=plan.fetch)
                           for L in range(self.n_layers)]
            if plan.scratch:
                call.scratch = LayerCache(self.kv_heads, plan.scratch_tokens, self.head_dim)
                call.passes = self.reconstruction_passes(policy, ids[:N - int(suffix)])
            trace.counter("engine", lambda: {"kv_bytes": sum(c.nbytes for c in call.caches) + (call.scratch.nbytes if call.scratch else 0)})
            rng = np.random.default_rng(seed)
            logits = prefill(self.model, call, self.chunk_tokens, self.heads)
            # the decode steps run over IO bindings made at the first one (onnxruntime sessions; Core ML stages take feeds)
            bound, can_bind = None, bindable(self.model)
            rec = StatsRecorder(self.planner, call, tracker, time.perf_counter() - t0)
            pos = N
            n_decode = 0
            for step in range(max_new):
                tok = forced[step] if forced is not None else sample(logits, temperature, top_p, rng)
                self.stats = rec.stats(n_decode, step + 1)
                self.stats.shared_pool_threads = self.model.shared_pool
                self.stats.provider = self.providers.as_dict()
                self.stats.memory_release = released.report()
                yield tok, logits, call
                if (stop and tok in self.stop_ids) or step == max_new - 1:
                    break
                tk = trace.begin("decode", step=n_decode)
                if bound is None and can_bind:
                    bound = BoundDecoder(self.model, call, self.H, self.heads, self.kv_heads, self.head_dim)
                logits = bound.step(tok, pos) if bound is not None else decode_step(self.model, call, tok, pos)
                trace.end(tk)
                pos += 1
                n_decode += 1
        finally:
            policy.end()
            tracker.__exit__(None, None, None)
            if rec is not None and self.stats is not None:
                self.stats.peak_rss_bytes = max(self.stats.peak_rss_bytes, tracker.peak)
