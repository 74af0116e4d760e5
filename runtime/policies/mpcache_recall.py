"""``mpcache_recall``: MPCache's query-aware selection adapted to a device, evicted K/V read back from disk.

Long because the exact (question-time) and the linear (per-step) selections share one policy's fetch area and costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..manifest import EMPTY_POS
from .base import Policy, log2c, max_pool, topk_sorted
from .recall import RecallPolicy
from .sharing import LayerSharing


@dataclass
class MPCacheRecall(RecallPolicy):
    """Query-aware recall of evicted key groups from disk: our on-device adaptation of MPCache's
    dynamic selection (Zeng et al., "MPCache: MPC-Friendly KV Cache Eviction for Efficient Private LLM
    Inference", NeurIPS 2025, arXiv:2501.06807).

    MPCache selects, at each step, the key groups whose linear similarity
    ``sum_d q_d * (alpha*kmax_d + (1-alpha)*kmin_d)`` with the current query is highest. On a device RAM
    is the binding constraint, so here the budgeted cache stays in RAM as the static policy left it and
    the tokens it evicts are **not dropped but written to disk** (a per-layer cold store in a temporary
    directory the generator call owns, removed when the call ends; read with ``preadv``, not mmap, so
    it stays out of the process's RSS). What comes back into a fixed fetch area carved out of the
    budget is chosen by ``selection`` (below): ``"linear"`` is MPCache's similarity, applied to the cold
    groups. With it RAM keeps only the alpha-mix vector of every ``group`` cold
    tokens per KV head (1/``group`` of the cold keys; counted in the reported KV bytes and against a
    byte budget). When a query arrives -- the protected suffix (the question; ``suffix_query``: its
    ``"last"`` token's query or the ``"max"`` over its queries per group) and every decode step -- the
    leader layer scores the cold groups by that similarity and reads the top ones into a fixed fetch
    area carved out of the budget (``fetch_frac`` of the context's share, whole groups), so resident +
    fetched never exceed the budget; attention reads both (keys are stored after rotary embedding with
    their positions, so positions stay right). With ``share=2`` (``mpcache_recall(share=2)``: the static
    eviction is then replayed from the leader too, so the pair's cold stores hold the same tokens in the
    same order) adjacent layers reuse the leader's group ids (cross-layer sharing); the default static
    eviction is per layer, so by default every layer selects its own. Cost per step: the similarity (``multiplications``), a top-k
    (``comparisons``), the fetched tokens (``gathers``) and the bytes read (``cold_stats``).

    ``fetch`` (tokens) fixes the fetch area explicitly; it is then carved out even when the budget
    would hold everything (tests use it to fetch every evicted group). The area never takes slots the
    resident cache needs for its minimum: a budget without that room runs without recall (a warning,
    ``stats["kv_fetch_tokens"] == 0``); the exact selection (tokens, not groups) takes a smaller area
    when less than a group is left (at least 8 tokens).

    ``selection`` chooses what the fetch area holds:

    * ``"exact"`` (default): **exact question-time scoring, then a fixed selection**. When the protected
      suffix (the question) arrives, every layer (``select_share`` > 1: one layer per group of that many,
      the others replay its token ids) scores ALL its cold keys exactly against the question's last
      ``question_tail`` queries (0: all of them), SnapKV-style: ``softmax(q.k / sqrt(d))`` over the layer's whole context (resident +
      cold keys; the normalizer is exact: a first pass computes each query's log-sum-exp, a second the
      probabilities), maxed (``vote="max"``) or summed (``"sum"``, SnapKV) over the query heads of a KV
      head and the question's tokens, max-pooled over ``vote_pool`` neighbouring cold tokens (a hit brings its
      neighbours, also across a cold-group boundary), and the top ``fetch`` tokens per KV head are read
      into the fetch area. ``question_tail=16`` by default: a question ends with the answer's lead-in
      ("... the code is"), whose queries point at the fact asked for, while its opening words also vote
      for passages that merely share them (on the needle benchmark's tuning split, 2k tokens at 5 % kept,
      both haystacks: 31/32 needles found with the last 16 queries, 29/32 with all, none lost).
      ``head_mix`` adds the layer's best vote per position (over its KV heads) to each head's, so a passage one
      head finds is fetched by all; ``carry`` adds the earlier layers' mean of that best vote, so a layer whose
      own heads vote diffusely still fetches the passage the question found below it (positions, not slots:
      every layer and head holds other cold tokens). Both cost a position row and two ``[tokens]`` vote rows
      (counted in ``fixed_bytes``); a scored continuation re-selects per block and mixes neither.
      The cold keys are read in blocks into the fetch area itself (it is empty
      until the selection is made), so no more K/V than the budget ever sits in RAM; the extra scratch
      is the per-token vote and one block of logits (both ``[kv, tokens]`` f32, preallocated, counted in
      ``fixed_bytes``). During decoding that selection stays as is: **no disk read per step**
      (``refresh=M`` > 0: the last ``refresh_frac`` of the area is refilled every ``M`` decode steps with
      the linear similarity's best groups for the current query, duplicates of the exact part masked).
      Without a protected suffix the first decode step's query makes the selection. In ``score()``'s
      causal path (text being scored, ``Context.stream_suffix``) the selection is re-made for every block
      of 32 continuation tokens from the queries of the tokens before it, with ``stream_pool`` /
      ``stream_follow`` (default 1 / 0: plain max votes) instead of ``vote_pool`` / ``vote_follow``. The exact scoring
      is **not MPC-friendly**: it costs exponentials (``exp_div``: two per query and cold key, one per
      resident key) and multiplications for every cold key, counted honestly in the cost report; RAM
      holds no group statistics unless ``refresh`` needs them.
    * ``"linear"``: MPCache's dynamic selection described above, at the question and every decode step
      (MPC-friendly: no exponentials; reads the fetch area from disk every step).
    """

    name: ClassVar[str] = "mpcache_recall"
    align: ClassVar[int] = 32
    share: int = 1       # linear selection: layers per selection; > 1 needs the static eviction shared alike
    suffix_query: str = "last"
    head_reduce: str = "sum"
    score: str = "mix"
    expand: int = 0
    selection: str = "exact"  # "exact" (question-time softmax voting, fixed) or "linear" (MPCache, every step)
    vote_pool: int = 7        # exact: max-pool kernel over neighbouring cold tokens (SnapKV's 7)
    vote_follow: int = 12     # exact: tokens after a hit that inherit its vote (a key brings the value after it)
    question_tail: int = 16   # exact: > 0 votes with the question's last this many tokens only (the answer's lead-in)
    # score()'s causal re-selection every 32 continuation tokens (text streaming in, no question): the continuation
    # brings its own next tokens, so a hit needs no followers and no pooling (lower perplexity than the question's)
    stream_follow: int = 0
    stream_pool: int = 1
    vote: str = "max"         # exact: probabilities maxed over the question's queries (or summed, "sum", as SnapKV)
    select_share: int = 1     # exact: layers per selection (1: every layer scores its own cold keys)
    refresh: int = 0          # exact: decode steps between linear refreshes of the area's tail (0: fixed)
    refresh_frac: float = 0.5  # exact + refresh: share of the area the linear refresh owns
    carry: float = 0.0        # exact: weight of the earlier layers' mean vote per position added to a layer's own
    head_mix: float = 0.0     # exact: weight of the layer's best vote per position (over its KV heads) added to each head's

    def __post_init__(self):
        if self.suffix_query not in ("last", "max"):
            raise ValueError(f"suffix_query must be 'last' or 'max', got {self.suffix_query!r}")
        if self.head_reduce not in ("sum", "max"):
            raise ValueError(f"head_reduce must be 'sum' or 'max', got {self.head_reduce!r}")
        if self.score not in ("mix", "bound"):
            raise ValueError(f"score must be 'mix' (MPCache) or 'bound' (Quest), got {self.score!r}")
        if not 0.0 < self.fetch_frac < 1.0:
            raise ValueError(f"fetch_frac must be in (0, 1), got {self.fetch_frac}")
        if self.selection not in ("exact", "linear"):
            raise ValueError(f"selection must be 'exact' or 'linear' (MPCache's similarity), got {self.selection!r}")
        if self.vote not in ("sum", "max"):
            raise ValueError(f"vote must be 'sum' or 'max', got {self.vote!r}")
        if self.carry < 0 or self.head_mix < 0:
            raise ValueError(f"carry and head_mix must be >= 0, got {self.carry}, {self.head_mix}")
        if self.question_tail < 0 or self.fetch_min < 0:
            raise ValueError(f"question_tail and fetch_min must be >= 0, got {self.question_tail}, {self.fetch_min}")
        if (self.vote_pool < 1 or self.vote_follow < 0 or self.stream_pool < 1 or self.stream_follow < 0 or self.select_share < 1 or self.refresh < 0
                or not 0.0 < self.refresh_frac < 1.0):
            raise ValueError("vote_pool and select_share must be >= 1, refresh >= 0, refresh_frac in (0, 1)")

    @property
    def _by_position(self) -> bool:
        """The exact votes are mixed by position across layers (``carry``) or KV heads (``head_mix``)."""
        return self.selection == "exact" and (self.carry > 0 or self.head_mix > 0)

    @property
    def _needs_stats(self) -> bool:
        """Group statistics in RAM: the linear selection, or the exact one's linear refresh."""
        return self.selection == "linear" or self.refresh > 0

    # ---- what the recall base needs to know --------------------------------------------------
    def stats_layers(self, n_layers):
        return [L for L in range(n_layers) if L % max(1, self.share) == 0] if self._needs_stats else []

    @property
    def minmax(self):
        return self.score == "bound"

    @property
    def token_granular(self):  # the exact selection reads tokens: an area below a group still works
        return self.selection == "exact" and not self.refresh

    def scratch_bytes(self, kv_heads, n_tokens):
        # exact: one per-token vote row and one block of logits, [kv, tokens] f32 each, reused layer after layer;
        # carry: the cold tokens' positions [kv, tokens] i64, three [tokens] f32 rows (the votes per position)
        if self.selection != "exact":
            return 0
        carry = (kv_heads * 8 + 3 * 4) * (n_tokens + self.group) if self._by_position else 0
        return 2 * kv_heads * (n_tokens + self.group) * 4 + carry

    def begin(self, ctx):
        super().begin(ctx)
        self.sharing = LayerSharing(self.share, ctx.n_layers)
        self.xsharing = LayerSharing(self.select_share, ctx.n_layers)
        self.selected: dict[int, int] = {}   # layer -> slots of the area the exact selection holds
        self.exact_ids: dict[int, np.ndarray] = {}
        self.dsteps: dict[int, int] = {}
        self.scratch_peak = 0
        if self.store is not None and self.selection == "exact":  # counted in fixed_bytes
            tokens = ctx.prompt_len + ctx.max_new_tokens
            self.vote_row = np.zeros((ctx.kv_heads, tokens + self.group), np.float32)
            self.logits_buf = np.zeros(ctx.kv_heads * (tokens + self.group), np.float32)
            if self._by_position:
                self.pos_row = np.zeros((ctx.kv_heads, tokens + self.group), np.int64)
                self.consensus = np.zeros(tokens + self.group, np.float32)
                self.layer_vote = np.zeros(tokens + self.group, np.float32)
                self.mix_row = np.zeros(tokens + self.group, np.float32)
                self.voted_layers = 0

    def report(self, decode_steps):
        out = super().report(decode_steps)
        if out:
            out["cold"].update(selection=self.selection, select_scratch_bytes_peak=self.scratch_peak)
        return out

    def _expand(self, s: np.ndarray, m: int) -> np.ndarray:
        """Per head: the best groups each with ``expand`` neighbours on both sides (a sentence cut by a
        group boundary comes back whole), ``m`` groups in all, ascending."""
        out = np.empty((s.shape[0], m), dtype=np.int64)
        n = s.shape[1]
        for h in range(s.shape[0]):
            chosen: list[int] = []
            seen = set()
            for g in np.argsort(-s[h], kind="stable"):
                for x in range(int(g) - self.expand, int(g) + self.expand + 1):
                    if 0 <= x < n and x not in seen and len(chosen) < m:
                        seen.add(x)
                        chosen.append(x)
                if len(chosen) >= m:
                    break
            out[h] = np.sort(chosen)
        return out

    # ---- disk -> fetch area ------------------------------------------------------------------
    def recall(self, layer, q, cache, phase):
        if self.store is None or cache.fetch == 0:
            return
        if self.selection == "linear":
            ids = self._linear_ids(layer, q, phase, min(self.store.groups(layer), cache.fetch // self.group))
            if ids is None or ids.size == 0:
                cache.set_fetched(0)
                return
            self._read_groups(layer, ids, cache, 0, phase)
            cache.set_fetched(ids.shape[1] * self.group)
            return
        G, F = self.group, cache.fetch
        tail = max(0, min(int(self.refresh_frac * F) // G * G, F - G)) if self.refresh else 0
        if phase == "decode":
            step = self.dsteps[layer] = self.dsteps.get(layer, 0) + 1
            if layer in self.selected:  # the question's selection stays: no disk read this step
                if tail and step % self.refresh == 0:
                    self._refill_tail(layer, q, cache, tail, phase)
                return
        ne = self._exact(layer, q, cache, F - tail, phase)
        self.selected[layer] = ne
        if tail:
            self._refill_tail(layer, q, cache, tail, phase)
        else:
            cache.set_fetched(ne)

    def _read_groups(self, layer, ids, cache, at, phase):
        k_out, v_out, p_out = cache.fetch_area()
        got = self.store.read_groups(layer, ids, k_out[:, at:], v_out[:, at:], p_out[:, at:])
        self.bytes_read["suffix" if phase == "suffix" else "decode"] += got
        self.count(gathers=ids.size * self.group)

    def _refill_tail(self, layer, q, cache, tail, phase):
        """Exact selection + linear refresh: the area's last ``tail`` slots get the linear best groups for
        ``q``; tokens the exact part already holds are masked there (no token is attended to twice)."""
        G, ne = self.group, self.selected[layer]
        ids = self._linear_ids(layer, q, phase, min(self.store.groups(layer), tail // G))
        if ids is None or ids.size == 0:
            cache.set_fetched(ne)
            return
        self._read_groups(layer, ids, cache, ne, phase)
        exact = self.exact_ids.get(layer)
        if exact is not None and exact.size:
            toks = ids[..., None] * G + np.arange(G)                                 # [kv, m, G] cold indices
            dup = np.stack([np.isin(toks[h].ravel(), exact[h]) for h in range(toks.shape[0])])
            _, _, p_out = cache.fetch_area()
            p_out[:, ne:ne + dup.shape[1]][dup] = EMPTY_POS
            self.count(comparisons=dup.size * log2c(exact.shape[1]))
        cache.set_fetched(ne + ids.shape[1] * G)

    def _exact(self, layer, q, cache, m, phase) -> int:
        """Exact selection of ``m`` cold tokens per KV head into the area's first slots; returns how many."""
        n = self.store.n[layer]
        m = min(n, m)
        if m == 0:
            self.xsharing.next_event(layer)
            return 0
        idx, _ = self.xsharing.decide(layer, n, m, lambda: self._score_exact(layer, q, cache, m, phase))
        k_out, v_out, p_out = cache.fetch_area()
        self.bytes_read["suffix" if phase == "suffix" else "decode"] += self.store.read_tokens(layer, idx, k_out, v_out, p_out)
        self.count(gathers=idx.size)
        if self.refresh:
            self.exact_ids[layer] = idx
        return int(idx.shape[1])

    def _score_exact(self, layer, q, cache, m, phase) -> np.ndarray:
        """Top ``m`` cold tokens per KV head by the question's softmax votes (max-pooled), ``[kv, m]`` ascending.

        Two passes over the layer's cold store, read in blocks into the (still empty) fetch area: the
        first completes each query's log-sum-exp over resident + cold keys, the second turns the cold
        logits into probabilities and votes."""
        st, G = self.store, self.group
        n = st.n[layer]
        kv, D = cache.kv_heads, cache.head_dim
        if m >= n:
            return np.broadcast_to(np.arange(n), (kv, n)).copy()
        if self.question_tail and not (phase == "suffix" and self.ctx.stream_suffix):
            q = q[:, :, -self.question_tail:]
        H, T = q.shape[1], q.shape[2]
        R = (H // kv) * T                                                           # queries per KV head
        Q = np.ascontiguousarray(q[0].reshape(kv, R, D), dtype=np.float32) * np.float32(1.0 / np.sqrt(D))
        F = cache.fetch
        B = max(G, min(F // G * G, self.logits_buf.size // (kv * R) // G * G))         # block of tokens
        if F < G:  # an area smaller than a group: blocks of F tokens, read as runs
            B = F
        buf = self.logits_buf if kv * R * B <= self.logits_buf.size else np.empty(kv * R * B, np.float32)
        self.scratch_peak = max(self.scratch_peak, self.vote_row[:, :n].nbytes + kv * R * B * 4)
        k_out, v_out, p_out = cache.fetch_area()
        key = "suffix" if phase == "suffix" else "decode"

        def logits(K):
            out = buf[:kv * R * K.shape[1]].reshape(kv, R, K.shape[1])
            np.matmul(Q, K.transpose(0, 2, 1), out=out)
            return out

        def blocks():
            if B < G:
                for a in range(0, n, B):
                    b = min(n, a + B)
                    run = np.broadcast_to(np.arange(a, b), (kv, b - a))
                    self.bytes_read[key] += st.read_tokens(layer, run, k_out, v_out, p_out)
                    yield a, b, k_out
                return
            ng, bg = st.groups(layer), B // G
            for g0 in range(0, ng, bg):
                g1 = min(ng, g0 + bg)
                self.bytes_read[key] += st.read_block(layer, g0, g1, k_out, v_out, p_out)
                yield g0 * G, min(n, g1 * G), k_out

        mx = np.full((kv, R), -np.inf, np.float32)
        se = np.zeros((kv, R), np.float64)

        def update(L):  # online log-sum-exp (L is overwritten)
            m_new = np.maximum(mx, L.max(axis=-1))
            se[:] = se * np.exp(mx - m_new) + np.exp(np.subtract(L, m_new[..., None], out=L), out=L).sum(axis=-1)
            mx[:] = m_new

        nres = cache.n
        for a in range(0, nres, B):
            update(logits(cache.k[0, :, a:min(nres, a + B)]))
        for a, b, K in blocks():
            update(logits(K[:, :b - a]))
        lse = (mx + np.log(se)).astype(np.float32)
        vote = self.vote_row[:, :n]
        stream = phase == "suffix" and self.ctx.stream_suffix
        # a scored continuation re-selects per block: votes are not mixed across layers or heads there
        carry = self._by_position and not stream
        for a, b, K in blocks():
            L = logits(K[:, :b - a])
            np.exp(np.subtract(L, lse[..., None], out=L), out=L)
            vote[:, a:b] = L.sum(axis=1) if self.vote == "sum" else L.max(axis=1)
            if carry:
                self.pos_row[:, a:b] = p_out[:, :b - a]
        pool, follow = (self.stream_pool, self.stream_follow) if stream else (self.vote_pool, self.vote_follow)
        pooled = max_pool(vote, pool) if pool > 1 else vote
        if follow:  # one-sided: token i also takes the votes of the ``follow`` tokens before it
            src, pooled = pooled, pooled.copy()
            for d in range(1, min(follow, n - 1) + 1):
                np.maximum(pooled[:, d:], src[:, :-d], out=pooled[:, d:])
        if carry:
            pooled = self._carried(pooled, self.pos_row[:, :n])
        idx = topk_sorted(pooled, m)
        keys = nres + 2 * n  # logits computed per query: resident once, cold twice
        self.count(multiplications=kv * R * (D * keys + D),
                   exp_div=kv * R * (keys + 1),                       # exponentials (+ one log per query)
                   comparisons=kv * R * (nres + n) + (kv * R * n if self.vote == "max" else 0)
                   + kv * n * (pool - 1 + follow) + kv * n * log2c(m))
        return idx

    def _carried(self, own: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Each KV head's votes plus ``head_mix`` times the layer's best vote at the same position (over its KV heads:
        a passage one head found is fetched by all) plus ``carry`` times the earlier layers' mean of that best vote
        (a passage the question found in earlier layers is fetched by a layer whose own heads vote diffusely).
        Heads and layers hold different cold tokens: a position none of them holds cold counts 0."""
        P, mine = self.consensus, self.layer_vote
        mine[:] = 0.0
        np.maximum.at(mine, pos.ravel(), own.ravel())
        mixed, hm = self.mix_row, np.float32(self.head_mix)
        c = np.float32(self.carry / self.voted_layers) if self.carry and self.voted_layers else np.float32(0.0)
        if hm:
            np.multiply(P, c / hm, out=mixed)
            mixed += mine
            mixed *= hm
        else:
            np.multiply(P, c, out=mixed)
        for h in range(own.shape[0]):  # in place (the votes are this call's scratch), one row at a time
            own[h] += mixed[pos[h]]
        P += mine
        self.voted_layers += 1
        self.count(multiplications=2 * own.size, comparisons=own.size, gathers=2 * own.size)
        return own

    def _linear_ids(self, layer, q, phase, m):
        """MPCache's linear selection of ``m`` cold groups per KV head (leader layers; followers replay)."""
        n_groups = self.store.groups(layer)
        m = min(n_groups, m)
        if not m:
            self.sharing.next_event(layer)
            return None
        ids, _ = self.sharing.decide(layer, n_groups, m, lambda: self._linear_score(layer, q, phase, m, n_groups),
                                     fallback=False)
        return ids

    def _linear_score(self, layer, q, phase, m, n_groups):
        kv = self.store.kv
        mix = self.store.mix[layer][:, :n_groups]                                     # [kv, g, D]
        T, D = q.shape[2], q.shape[3]
        if not (phase == "suffix" and self.suffix_query == "max"):
            q, T = q[:, :, -1:], 1
        qg = q[0].reshape(kv, -1, T, D)                                              # [kv, rep, T, D]
        if self.head_reduce == "sum":  # MPCache: the query group's sum (one product per group)
            qg = qg.sum(axis=1, keepdims=True)
        r = qg.shape[1]
        if self.score == "mix":  # MPCache's linear similarity
            s = np.einsum("hrtd,hgd->hrtg", qg, mix)
            self.count(multiplications=kv * r * T * D * n_groups)
        else:  # Quest's upper bound of q.k over the group: sum_d max(q_d kmax_d, q_d kmin_d)
            mx = self.store.kmax[layer][:, None, None, :n_groups]
            mn = self.store.kmin[layer][:, None, None, :n_groups]
            qe = qg[:, :, :, None, :]
            s = np.maximum(qe * mx, qe * mn).sum(axis=-1)
            self.count(multiplications=2 * kv * r * T * D * n_groups, comparisons=kv * r * T * D * n_groups)
        s = s.reshape(kv, r * T, n_groups).max(axis=1)   # best query (head, suffix token) per group
        self.count(comparisons=kv * (r * T - 1) * n_groups)
        if self.expand:
            ids = self._expand(s, m)
            self.count(comparisons=kv * n_groups * log2c(n_groups))
        else:
            ids = topk_sorted(s, m)                                                  # [kv, m]
            self.count(comparisons=kv * n_groups * log2c(m))
        return ids


# mpcache_recall's own defaults, chosen on the needle benchmark's tuning split (2k tokens, 5 % and 3 % kept, both
# haystacks): the question's recall fetches what the text holds for it, so the resident part is mostly the recent
# window (heavy hitters scored without the question draw the answer elsewhere), and each layer's question votes
# take in the earlier layers' (``carry``)
RECALL_DEFAULTS = {"recent_frac": 0.9, "carry": 1.0}


def mpcache_recall(**kw) -> "Policy":
    """``mpcache`` (static eviction + dynamic selection over the resident cache) + recall from disk, with
    :data:`RECALL_DEFAULTS` unless ``kw`` says otherwise."""
    from .composite import Composite
    from .mpcache import MPCacheDynamic, MPCacheStatic

    own = ("group", "fetch_frac", "fetch", "fetch_min", "question_tail", "suffix_query", "head_reduce", "score", "expand", "selection", "vote_pool", "vote_follow", "vote",
           "select_share", "refresh", "refresh_frac", "stream_follow", "stream_pool", "carry", "head_mix")  # recall's alone
    kw = dict(RECALL_DEFAULTS) | kw
    static_kw = {k: v for k, v in kw.items() if k in MPCacheStatic.__dataclass_fields__ and k not in own}
    rec_kw = {k: v for k, v in kw.items() if k in MPCacheRecall.__dataclass_fields__}
    dyn_kw = {k: v for k, v in kw.items() if k in MPCacheDynamic.__dataclass_fields__ and k not in own}
    return Composite(parts=(MPCacheStatic(**static_kw), MPCacheRecall(**rec_kw), MPCacheDynamic(**dyn_kw)),
                     title="mpcache_recall")
