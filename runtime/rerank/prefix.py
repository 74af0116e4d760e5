"""Shared-prefix reuse for decoder rerankers (runtime side).

In a yes/no reranker prompt the instruction + query part (``prefix``, ``Encoded.prefix_len`` tokens) is
identical for every candidate. Bundles exported with split layer graphs (the generation bundles'
``qkv`` + ``attn`` graphs built by :mod:`edge_sel.export.adapters.decoder_graphs`) let the runtime
compute the prefix once per query and layer, and run each candidate's own tokens (positions
``P .. P+T-1``) against ``[prefix K/V ; own K/V]``. Visibility is the graph's one rule —
key ``j`` is visible to query ``i`` iff ``key_pos[j] <= position_ids[i]`` — so the prefix keys
(positions ``0..P-1``) are visible to every candidate token, the candidate's own keys causally, and
padding keys carry the manifest's ``layer_io.empty_pos`` (never visible). This is exactly the full model's causal attention
over ``prefix + candidate``, so scores match it (checked by ``export --verify`` within 1e-3).
"""

from __future__ import annotations

import numpy as np

from edge_sel.runtime import trace
from .stream import LayerStream

def is_split(bundle) -> bool:
    return bundle.spec.layer_io.split


def qkv_weight_bytes(bundle, i: int) -> int:
    graph, files = bundle.spec.qkv_graph(i), bundle.spec.files
    return files[graph.file].size + (files[graph.weights].size if graph.weights else 0)


class PairStream(LayerStream):
    """A :class:`LayerStream` whose 'session' per layer is the pair ``(qkv, attn)``."""

    def load_layer(self, i: int):
        """Load the session(s) of layer ``i`` (a subclass may load more than one graph per layer)."""
        tk = trace.begin("layer.load", layer=i)
        qkv = self.backend.open(self.bundle.path(self.bundle.spec.qkv_graph(i).file), self.threads, self.optimize,
                                mem_pattern=self.keep_all, prepack=self.packs)
        attn = self.backend.open(self.bundle.layer_path(i), self.threads, self.optimize, mem_pattern=self.keep_all,
                                 prepack=self.packs)
        trace.end(tk)
        self.loads += 1
        return qkv, attn


def run_prefix(pair, hidden: np.ndarray, positions: np.ndarray, kv_only: bool = False):
    """One layer over the shared prefix ``[1, P, H]``; returns ``(hidden_out, k, v)`` (K/V: ``[1, kv, P, D]``).
    ``kv_only``: the last layer — nothing reads the prefix's output, so only its K/V are computed (hidden_out None)."""
    qkv, attn = pair
    q, k, v = qkv.run(None, {"hidden": hidden, "position_ids": positions})
    if kv_only:
        return None, k, v
    out = attn.run(["hidden_out"], {"hidden": hidden, "q": q, "k_cache": k, "v_cache": v,
                                    "key_pos": positions[:, None, :], "position_ids": positions})[0]
    return out, k, v


def run_candidates(pair, hidden: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                   k_prefix: np.ndarray | None, v_prefix: np.ndarray | None, prefix_positions: np.ndarray | None,
                   empty_pos: int, last: np.ndarray | None = None) -> np.ndarray:
    """One layer over a chunk of candidates ``[B, T, H]`` attending to the prefix K/V and to themselves.

    ``last`` (``[B]`` token indices): only those tokens' outputs are wanted — the final layer of a reranker whose
    head reads one token per candidate. K/V still come from every token, but attention rows, o_proj and the MLP
    run for one query token per row: returns ``[B, 1, H]`` (the attn graph is shape-generic in its query length).
    """
    qkv, attn = pair
    B = hidden.shape[0]
    q, k, v = qkv.run(None, {"hidden": hidden, "position_ids": positions})
    own_pos = np.where(mask > 0.5, positions, empty_pos).astype(np.int64)
    if last is not None:
        rows = np.arange(B)
        q = np.ascontiguousarray(q[rows, :, last][:, :, None, :])        # [B, heads, 1, D]
        hidden = np.ascontiguousarray(hidden[rows, last][:, None, :])    # [B, 1, H]
        positions = np.ascontiguousarray(positions[rows, last][:, None])  # [B, 1]
    if k_prefix is not None and k_prefix.shape[2] > 0:
        kv, P, D = k_prefix.shape[1], k_prefix.shape[2], k_prefix.shape[3]
        k = np.concatenate([np.broadcast_to(k_prefix, (B, kv, P, D)), k], axis=2)
        v = np.concatenate([np.broadcast_to(v_prefix, (B, kv, P, D)), v], axis=2)
        own_pos = np.concatenate([np.broadcast_to(prefix_positions, (B, P)), own_pos], axis=1)
    return attn.run(["hidden_out"], {"hidden": hidden, "q": q, "k_cache": np.ascontiguousarray(k),
                                     "v_cache": np.ascontiguousarray(v), "key_pos": own_pos[:, None, :],
                                     "position_ids": positions})[0]
