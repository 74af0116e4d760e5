"""Many KV configurations scored on one window in lockstep: the prefix runs once, each configuration's continuation
over its own compressed cache.

Per configuration this computes what ``Generator.score(prefix, cont, compress_continuation=False)`` computes (the
test holds them equal): a look-once prefill is exact up to each layer's compression, so every configuration sees
the same context hidden states, K/V and attention; only its votes, its compression and its continuation differ.
The shared prefix runs in chunks cut at every configuration's observation-window start, and each configuration's
policy is handed the chunks' attention with its own phase ("prefill" / "window"), as the engine's prefill would.
The continuation then runs through the engine's own ``prefill_suffix``, layer by layer, per configuration.
One prefill instead of one per configuration: the perplexity benchmark's many policies x ratios x windows fit
on a shared two-core machine.

:func:`generate_lockstep` does the same for generation: the context compressed per configuration, the question run
as a protected suffix over it, then greedy decoding through the engine's own ``decode_step`` per configuration
(equal to ``Generator.generate(context + question, protect_suffix=len(question))``, tested); the decode steps of the
configurations take turns, so their per-token times are measured under the same machine load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edge_sel.runtime.generate import Generator
from edge_sel.runtime.generate.call import Call
from edge_sel.runtime.generate.decode import decode_step
from edge_sel.runtime.generate.prefill import chunk_size, final_target, plan_chunks, prefill_suffix
from edge_sel.runtime.generate.reconstruct import run_passes
from edge_sel.runtime.generate.sampling import log_softmax_nll
from edge_sel.runtime.generate.survey import survey
from edge_sel.runtime.kvcache import LayerCache
from edge_sel.runtime.planning import KVPlanner
from edge_sel.runtime.policies import Context, make_policy


@dataclass
class _Run:
    name: str
    policy: object
    call: Call
    look_once: bool
    obs: int
    hidden: np.ndarray | None = None  # this configuration's continuation rows entering the current layer
    step_ms: list = field(default_factory=list)  # generation: each decode step's wall time
    compress_s: float = 0.0  # wall time of this configuration's own compression (votes, eviction, cold-store writes)
    suffix_s: float = 0.0    # wall time of its continuation over its own cache (recall: selection + disk reads)


def _runs(gen: Generator, configs, prompt: list[int], n_sfx: int, max_new: int = 1, stream_suffix: bool = True) -> list[_Run]:
    n_prompt = len(prompt)
    out = []
    surveys: dict[str, object] = {}  # one survey pass per kind of recorder, shared by the configurations asking for it
    for name, spec, ratio in configs:
        planner = KVPlanner(gen.n_layers, gen.kv_heads, gen.head_dim, gen.context, ratio, "layer", heads=gen.heads)
        policy = make_policy(spec() if callable(spec) else spec)
        max_new = planner.clamp_new(n_prompt, max_new)
        plan = planner.plan(policy, n_prompt, max_new, n_sfx)
        n = n_prompt - n_sfx
        rec = policy.surveyor(plan.kept) if plan.scratch else None
        if rec is not None:  # as Generator.run: the survey (with its recorder's passes), then the plan again
            if repr(rec) not in surveys:
                surveys[repr(rec)] = survey(gen.model, prompt[:n], rec, Context(
                    gen.n_layers, gen.kv_heads, gen.heads, gen.head_dim, n, n, 1, rope_theta=gen.bundle.spec.rope_theta),
                    gen.chunk_tokens, passes=gen.reconstruction_passes(rec, prompt[:n]))
            policy.surveyed(surveys[repr(rec)])
            plan = planner.plan(policy, n_prompt, max_new, n_sfx)
        policy.begin(Context(gen.n_layers, gen.kv_heads, gen.heads, gen.head_dim, plan.resident, n_prompt, max_new,
                             fetch=plan.fetch, stream_suffix=stream_suffix, look_once=plan.scratch,
                             rope_theta=gen.bundle.spec.rope_theta, capacities=plan.layers))
        call = Call(list(range(n_prompt)), max_new, plan.resident, policy, suffix=n_sfx, fetch=plan.fetch,
                    keep_suffix_hidden=True)
        call.caches = [LayerCache(gen.kv_heads, plan.layer(L), gen.head_dim, fetch=plan.fetch) for L in range(gen.n_layers)]
        call.passes = gen.reconstruction_passes(policy, prompt[:n]) if plan.scratch else []
        out.append(_Run(name, policy, call, plan.scratch, policy.observation_window(n_prompt - n_sfx)))
    return out


def score_lockstep(gen: Generator, prefix: list[int], cont: list[int], configs) -> dict[str, dict]:
    """``{name: {"nll", "ppl", "n", "nll_tokens"}}`` for ``configs`` = ``[(name, policy spec or factory, kv_budget)]``."""
    runs = _runs(gen, configs, [int(t) for t in prefix] + [int(t) for t in cont], len(cont))
    try:
        ctx = _prefill(gen, prefix, cont, runs)
        res = {}
        n_ctx = len(prefix)
        for r in runs:
            h = np.concatenate([ctx[:, -1:], r.hidden[:, :-1]], axis=1)[0]
            nll = log_softmax_nll(gen.model.head_logits(h), cont)
            res[r.name] = {"nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())), "n": len(cont), "nll_tokens": nll.tolist(),
                           "kept": [int((c.pos[0, :c.n] < n_ctx).sum()) for c in r.call.caches],
                           "fetch": r.call.caches[0].fetch, "compress_s": r.compress_s,
                           "suffix_ms_per_token": 1000 * r.suffix_s / len(cont)}
            cold = (r.policy.report(0) or {}).get("cold")
            if cold:  # a recalling policy: its disk traffic (the shared prefix's time is no configuration's own)
                res[r.name]["cold"] = cold
        return res
    finally:
        for r in runs:
            r.policy.end()


def generate_lockstep(gen: Generator, context: list[int], question: list[int], configs, max_new: int) -> dict[str, dict]:
    """``{name: {"tokens", "step_ms", "kept"}}``: greedy tokens after ``context`` + ``question`` (the question a protected
    suffix) per configuration, and each decode step's milliseconds (the configurations' steps interleaved)."""
    N = len(context) + len(question)
    runs = _runs(gen, configs, [int(t) for t in context] + [int(t) for t in question], len(question), max_new=max_new,
                 stream_suffix=False)
    try:
        _prefill(gen, context, question, runs)
        logits = {r.name: gen.model.logits(r.hidden[:, -1]) for r in runs}
        toks: dict[str, list[int]] = {r.name: [] for r in runs}
        for step in range(max_new):
            for r in runs:  # one step of every configuration before the next step of any
                tok = int(np.argmax(logits[r.name]))
                toks[r.name].append(tok)
                if step < r.call.max_new - 1 and step < max_new - 1:
                    t0 = time.perf_counter()
                    logits[r.name] = decode_step(gen.model, r.call, tok, N + step)
                    r.step_ms.append(1000 * (time.perf_counter() - t0))
        return {r.name: {"tokens": toks[r.name], "step_ms": r.step_ms, "capacity": r.call.capacity,
                         "kept": int((r.call.caches[0].pos[0, :r.call.caches[0].n] < len(context)).sum())} for r in runs}
    finally:
        for r in runs:
            r.policy.end()


def _prefill(gen: Generator, prefix: list[int], cont: list[int], runs: list[_Run]) -> np.ndarray:
    """The shared prefix once per layer, each run's compression and its suffix (``cont``) over its own cache; leaves
    each run's last-layer suffix rows in ``run.hidden`` and returns the prefix's last-layer hidden states."""
    ids = [int(t) for t in prefix] + [int(t) for t in cont]
    N, S = len(ids), len(cont)
    n_ctx = N - S
    model = gen.model
    chunk = chunk_size(gen.chunk_tokens, gen.heads, N)
    starts = sorted({a for r in runs for a, _, _ in plan_chunks(n_ctx, chunk, r.obs)})
    chunks = list(zip(starts, starts[1:] + [n_ctx]))
    positions = np.arange(N, dtype=np.int64)
    emb = model.embed(np.asarray(ids, dtype=np.int64)[None])
    ctx = emb[:, :n_ctx]
    for r in runs:
        r.hidden = emb[:, n_ctx:]
    # context-reconstruction passes (KVzip), run once per pass length and handed to every run that asked for them
    passes: dict[int, list] = {}
    for r in runs:
        if r.look_once and r.call.passes:
            passes.setdefault(len(r.call.passes[0].ids), r.call.passes)
    for ps in passes.values():
        for p in ps:
            p.hidden = model.embed(p.ids[None])
    extra = max((len(p.ids) for ps in passes.values() for p in ps), default=0)
    scratch = LayerCache(gen.kv_heads, n_ctx + extra, gen.head_dim)
    pass_chunk = chunk_size(gen.chunk_tokens, gen.heads, n_ctx + extra)
    for L, (qkv, attn) in enumerate(model.layers):
        scratch.reset()
        out_ctx = np.empty_like(ctx)
        seen = []
        for a, b in chunks:
            p = positions[None, a:b]
            q, k, v = qkv.run(None, {"hidden": ctx[:, a:b], "position_ids": p})
            scratch.append(k, v, p[0])
            kc, vc, kp = scratch.prefix()
            ho, asum, amax = attn.run(None, {"hidden": ctx[:, a:b], "q": q, "k_cache": kc, "v_cache": vc,
                                             "key_pos": kp, "position_ids": p})
            out_ctx[:, a:b] = ho
            seen.append((a, q, asum, amax))
        q_last = q
        rebuilt: dict[int, list] = {}
        for length, ps in passes.items():
            got = rebuilt[length] = []
            run_passes(qkv, attn, ps, scratch, pass_chunk, lambda asum, amax, got=got: got.append((asum, amax)))
        for r in runs:
            rec = rebuilt.get(len(r.call.passes[0].ids), []) if r.look_once and r.call.passes else []
            t0 = time.perf_counter()
            _compress_layer(r, L, scratch, seen, plan_chunks(n_ctx, chunk, r.obs), n_ctx, S, rec)
            t1 = time.perf_counter()
            hid = np.concatenate([ctx, r.hidden], axis=1)
            out = np.concatenate([out_ctx, np.empty_like(r.hidden)], axis=1)
            qs = prefill_suffix(model, r.call, L, hid, positions, out, n_ctx, gen.chunk_tokens, q_last)
            r.suffix_s += time.perf_counter() - t1
            r.compress_s += t1 - t0
            if r.policy.after_layer(L, hid, out, qs[0, :, -1], r.call.caches[L], positions) is not None:
                raise ValueError(f"{r.name}: a policy that drops prompt tokens from later layers is not scored in lockstep")
            r.hidden = out[:, n_ctx:]
        ctx = out_ctx
    return ctx


def _merged(seen, a0: int, b0: int):
    """The attention sums and maxima of the engine's chunk ``[a0, b0)`` from the shared sub-chunks inside it (a pooled
    vote, as SnapKV's, is taken per chunk, so the chunks the policy sees must be the engine's own)."""
    parts = [(asum, amax) for a, _, asum, amax in seen if a0 <= a < b0]
    if len(parts) == 1:
        return parts[0]
    shape = parts[-1][0].shape
    tot, top = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for asum, amax in parts:
        m = asum.shape[-1]
        tot[..., :m] += asum
        np.maximum(top[..., :m], amax, out=top[..., :m])
    return tot, top


def _compress_layer(r: _Run, L: int, scratch: LayerCache, seen, own_chunks, n_ctx: int, n_sfx: int, rebuilt=()) -> None:
    """Hand the shared prefix's attention to ``r``'s policy in its own chunks and phases, then compress into its cache."""
    policy, call = r.policy, r.call
    c = call.caches[L]
    scratch.score[:, :scratch.n] = 0.0  # each configuration votes afresh
    work = scratch if r.look_once else c
    if not r.look_once:  # everything fits: the engine prefills straight into the layer's cache
        c.reset()
        s = c.append(scratch.k[:, :, :n_ctx], scratch.v[:, :, :n_ctx], scratch.pos[0, :n_ctx])
        policy.appended(L, c, s)
    for a0, b0, phase in own_chunks:
        q = np.concatenate([q for a, q, _, _ in seen if a0 <= a < b0], axis=2)
        policy.queries(L, q, np.arange(a0, b0, dtype=np.int64), phase)
        asum, amax = _merged(seen, a0, b0)
        policy.observe(L, work, asum, amax, None, phase)
    for asum, amax in rebuilt:  # the reconstruction passes' attention over the context, as the engine hands it over
        policy.observe(L, work, asum, amax, None, "reconstruct")
    if r.look_once:
        target = None
        if n_ctx + n_sfx + call.max_new > c.capacity:
            target = final_target(c.capacity, n_sfx, call.max_new, policy.align)
            call.evictions += 1
        policy.compress(L, scratch, target, "final", into=c)
