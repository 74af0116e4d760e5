"""Evicted keys/values on disk, read back by groups (MPCache recall; see ``policies/mpcache_recall.py``).

One file per layer in a directory the generate call owns (:class:`~edge_sel.runtime.policies.recall.RecallPolicy`) (created
for the call, removed when it ends, also on an exception). The file is a sequence of fixed-size group
records of ``group`` cold tokens, in eviction order; inside a record, per KV head:
``K [group, head_dim] f32 | V [group, head_dim] f32 | positions [group] i64`` (little-endian), so one
(group, head) is one contiguous extent read with a single ``preadv`` straight into the caller's
buffers (the cache's fetch area) -- no mmap, nothing of the store is mapped into the process. A group
being filled is completed in place by the next eviction (its tail slots hold ``EMPTY_POS`` meanwhile,
which the attention graph masks).

Reads: by groups (``read_groups``, the linear selection), whole blocks of groups in one ``preadv``
(``read_block``, the exact scoring's passes over a layer) or runs of single tokens (``read_tokens``, the
exact selection's result), always into the caller's fetch-area views.

RAM: only, for the layers that select linearly (``stats_layers``; none for the exact selection), the per-group alpha-mix vector
``alpha*kmax + (1-alpha)*kmin`` per KV head (``[kv, groups, head_dim]`` f32: 1/``group`` of the keys;
with ``minmax`` also kmax and kmin, 3/``group``), preallocated for the most tokens the call can evict.
"""

from __future__ import annotations

import os

import numpy as np

from . import trace
from .manifest import EMPTY_POS


class ColdStore:
    def __init__(self, root: str | os.PathLike, n_layers: int, kv_heads: int, head_dim: int, max_tokens: int,
                 stats_layers, alpha: float = 0.6, group: int = 32, minmax: bool = False):
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"cold store directory {self.root} does not exist")
        self.kv, self.D, self.G, self.alpha = kv_heads, head_dim, int(group), float(alpha)
        self.n_layers = n_layers
        self.max_groups = -(-int(max_tokens) // self.G) + 1
        self.head_bytes = self.G * self.D * 4 * 2 + self.G * 8
        self.record_bytes = self.kv * self.head_bytes
        self.n = [0] * n_layers                      # cold tokens per layer (per head: all heads hold as many)
        self.mix = {int(L): np.zeros((kv_heads, self.max_groups, head_dim), np.float32) for L in stats_layers}
        # optional per-channel max/min too (2x the RAM), for the Quest-style bound sum_d max(q_d kmax_d, q_d kmin_d)
        self.kmax = {L: np.zeros_like(m) for L, m in self.mix.items()} if minmax else {}
        self.kmin = {L: np.zeros_like(m) for L, m in self.mix.items()} if minmax else {}
        self.fds: dict[int, int] = {}
        self.bytes_written = 0
        self.bytes_read = 0

    # ---- bookkeeping ------------------------------------------------------------------------
    @property
    def stats_bytes(self) -> int:
        return sum(m.nbytes for d in (self.mix, self.kmax, self.kmin) for m in d.values())

    def path(self, layer: int) -> str:
        return os.path.join(self.root, f"layer{layer:03d}.kv")

    def groups(self, layer: int) -> int:
        return -(-self.n[layer] // self.G)

    def file_bytes(self) -> int:
        return sum(self.groups(L) * self.record_bytes for L in range(self.n_layers))

    def _fd(self, layer: int) -> int:
        fd = self.fds.get(layer)
        if fd is None:
            fd = os.open(self.path(layer), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self.fds[layer] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}

    # ---- write -------------------------------------------------------------------------------
    def add(self, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        """Append ``E`` evicted tokens: ``k``/``v`` ``[kv, E, D]``, ``pos`` ``[kv, E]`` (per head, position order)."""
        kv, E, D = k.shape
        if (kv, D) != (self.kv, self.D) or v.shape != k.shape or pos.shape != (kv, E):
            raise ValueError(f"cold store expects k/v [{self.kv}, E, {self.D}] and pos [{self.kv}, E], "
                             f"got {k.shape}, {v.shape}, {pos.shape}")
        if E == 0:
            return
        G = self.G
        g0, fill = divmod(self.n[layer], G)
        tot = fill + E
        ng = -(-tot // G)
        if g0 + ng > self.max_groups:
            raise RuntimeError(f"cold store overflow: {self.n[layer]} + {E} tokens > {self.max_groups * G} (policy bug)")
        K = np.zeros((kv, ng * G, D), np.float32)
        V = np.zeros((kv, ng * G, D), np.float32)
        P = np.full((kv, ng * G), EMPTY_POS, np.int64)
        if fill:  # complete the partly filled group in place
            k0, v0, p0 = self._read_records(layer, g0, 1)
            K[:, :fill], V[:, :fill], P[:, :fill] = k0[:, :fill], v0[:, :fill], p0[:, :fill]
        K[:, fill:tot], V[:, fill:tot], P[:, fill:tot] = k, v, pos
        buf = np.empty((ng, kv, self.head_bytes), np.uint8)
        gd = G * D * 4
        buf[:, :, :gd] = np.ascontiguousarray(K.reshape(kv, ng, G * D).transpose(1, 0, 2)).view(np.uint8)
        buf[:, :, gd:2 * gd] = np.ascontiguousarray(V.reshape(kv, ng, G * D).transpose(1, 0, 2)).view(np.uint8)
        buf[:, :, 2 * gd:] = np.ascontiguousarray(P.reshape(kv, ng, G).transpose(1, 0, 2)).view(np.uint8)
        self._pwrite(self._fd(layer), memoryview(buf).cast("B"), g0 * self.record_bytes)
        trace.instant("cold.write", layer=layer, tokens=E, bytes=buf.nbytes)
        self.n[layer] += E
        mix = self.mix.get(layer)
        if mix is not None:
            Kg = K.reshape(kv, ng, G, D)
            valid = (P.reshape(kv, ng, G) != EMPTY_POS)[..., None]
            mx = np.where(valid, Kg, -np.inf).max(axis=2)
            mn = np.where(valid, Kg, np.inf).min(axis=2)
            mix[:, g0:g0 + ng] = self.alpha * mx + (1.0 - self.alpha) * mn
            if self.kmax:
                self.kmax[layer][:, g0:g0 + ng] = mx
                self.kmin[layer][:, g0:g0 + ng] = mn

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            w = os.pwrite(fd, data[done:], offset + done)
            if w <= 0:
                raise OSError(f"cold store: short write to {self.root}")
            done += w
        self.bytes_written += done

    # ---- read --------------------------------------------------------------------------------
    def read_groups(self, layer: int, groups: np.ndarray, k_out: np.ndarray, v_out: np.ndarray,
                    pos_out: np.ndarray) -> int:
        """Read groups ``[kv, m]`` (per head) into ``k_out``/``v_out`` ``[kv, >= m*G, D]`` and ``pos_out``
        ``[kv, >= m*G]`` (views of the cache's fetch area; rows must be contiguous). Returns bytes read."""
        G = self.G
        fd = self._fd(layer)
        total = 0
        for h in range(groups.shape[0]):
            for j, g in enumerate(groups[h]):
                off = int(g) * self.record_bytes + h * self.head_bytes
                bufs = [k_out[h, j * G:(j + 1) * G], v_out[h, j * G:(j + 1) * G], pos_out[h, j * G:(j + 1) * G]]
                got = os.preadv(fd, bufs, off)
                if got != self.head_bytes:
                    raise OSError(f"cold store {self.path(layer)}: read {got} of {self.head_bytes} bytes at {off}")
                total += got
        self.bytes_read += total
        trace.instant("recall", layer=layer, bytes=total)
        return total

    def read_block(self, layer: int, g0: int, g1: int, k_out: np.ndarray, v_out: np.ndarray, pos_out: np.ndarray) -> int:
        """Groups ``[g0, g1)`` of every head into rows ``[0, (g1-g0)*G)`` of ``k_out``/``v_out`` ``[kv, >=, D]`` and
        ``pos_out`` (views of the fetch area, used as the exact scoring's read buffer): one ``preadv`` for
        the whole block (the records are contiguous on disk). Returns bytes read."""
        G = self.G
        bufs = []
        for j in range(g1 - g0):
            r = slice(j * G, (j + 1) * G)
            for h in range(self.kv):
                bufs += [k_out[h, r], v_out[h, r], pos_out[h, r]]
        want = (g1 - g0) * self.record_bytes
        if want == 0:
            return 0
        got = os.preadv(self._fd(layer), bufs, g0 * self.record_bytes)
        if got != want:
            raise OSError(f"cold store {self.path(layer)}: read {got} of {want} bytes at group {g0}")
        self.bytes_read += got
        trace.instant("recall", layer=layer, bytes=got)
        return got

    def read_tokens(self, layer: int, idx: np.ndarray, k_out: np.ndarray, v_out: np.ndarray, pos_out: np.ndarray) -> int:
        """Cold tokens ``idx`` ``[kv, m]`` (per head, ascending, eviction order) into rows ``[0, m)`` of the fetch
        area views: one ``pread`` each for K, V and positions per run of consecutive tokens inside a group.
        Returns bytes read."""
        G, D = self.G, self.D
        fd = self._fd(layer)
        total = 0
        for h in range(idx.shape[0]):
            row = idx[h]
            j = 0
            m = row.shape[0]
            while j < m:
                t0 = int(row[j])
                g = t0 // G
                e = j + 1
                while e < m and int(row[e]) == int(row[e - 1]) + 1 and int(row[e]) // G == g:
                    e += 1
                r0 = t0 - g * G
                base = g * self.record_bytes + h * self.head_bytes
                for buf, off in ((k_out[h, j:e], base + r0 * D * 4), (v_out[h, j:e], base + G * D * 4 + r0 * D * 4),
                                 (pos_out[h, j:e], base + 2 * G * D * 4 + r0 * 8)):
                    got = os.preadv(fd, [buf], off)
                    if got != buf.nbytes:
                        raise OSError(f"cold store {self.path(layer)}: read {got} of {buf.nbytes} bytes at {off}")
                    total += got
                j = e
        self.bytes_read += total
        trace.instant("recall", layer=layer, bytes=total)
        return total

    def _read_records(self, layer: int, g0: int, ng: int):
        G, D, kv = self.G, self.D, self.kv
        raw = os.pread(self._fd(layer), ng * self.record_bytes, g0 * self.record_bytes)
        if len(raw) != ng * self.record_bytes:
            raise OSError(f"cold store {self.path(layer)}: read {len(raw)} of {ng * self.record_bytes} bytes")
        rec = np.frombuffer(raw, np.uint8).reshape(ng, kv, self.head_bytes)
        gd = G * D * 4
        k = np.ascontiguousarray(rec[:, :, :gd]).view(np.float32).reshape(ng, kv, G, D)
        v = np.ascontiguousarray(rec[:, :, gd:2 * gd]).view(np.float32).reshape(ng, kv, G, D)
        p = np.ascontiguousarray(rec[:, :, 2 * gd:]).view(np.int64).reshape(ng, kv, G)
        k = k.transpose(1, 0, 2, 3).reshape(kv, ng * G, D)
        v = v.transpose(1, 0, 2, 3).reshape(kv, ng * G, D)
        p = p.transpose(1, 0, 2).reshape(kv, ng * G)
        return k, v, p

    def read_all(self, layer: int):
        """Every cold token of ``layer`` (inspection/tests): ``k``, ``v`` ``[kv, n, D]``, ``pos`` ``[kv, n]``."""
        n = self.n[layer]
        if n == 0:
            return (np.zeros((self.kv, 0, self.D), np.float32),) * 2 + (np.zeros((self.kv, 0), np.int64),)
        k, v, p = self._read_records(layer, 0, self.groups(layer))
        return k[:, :n], v[:, :n], p[:, :n]
