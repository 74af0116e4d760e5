"""The embedding stage: gather rows from the memory-mapped table (only the rows used are touched).

The table is mapped for the duration of one call and unmapped afterwards, so its touched pages
leave the process's RSS again. A table stored at 8 or 4 bits (``embed.encoding``) is dequantized
only for the gathered rows (:class:`edge_sel.runtime.blocks.BlockTable`). BERT-family bundles add
position / token-type rows and a LayerNorm.
"""

from __future__ import annotations

import numpy as np

from edge_sel.runtime.blocks import BlockTable
from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.residency import release_array


class Embedder:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        rule = bundle.spec.embedding
        self.rule = rule.rule
        embed = bundle.spec.embed
        self.rows, self.hidden = embed.logical_shape
        # bytes stored per row: the values and, for an encoded table, the row's scales and mins
        self.row_bytes = sum(a.nbytes // max(a.shape[0], 1) for a in embed.parts())
        if self.rule == "bert":
            self.position = np.array(bundle.array("position"))
            self.token_type = np.array(bundle.array("token_type")) if bundle.has_array("token_type") else None
            self.ln_w = np.array(bundle.array("ln_weight"))
            self.ln_b = np.array(bundle.array("ln_bias"))
            self.eps = rule.layer_norm_eps
            self.offset = rule.position_offset

    def touched_bytes(self, unique_ids: int) -> int:
        """Upper bound of page-cache bytes a gather of ``unique_ids`` rows maps in."""
        page = 4096
        return unique_ids * (-(-self.row_bytes // page) + 1) * page

    def open_table(self) -> np.ndarray | BlockTable:
        embed = self.bundle.spec.embed
        e = embed.encoding
        if e is None:
            return self.bundle.array("embed")
        return BlockTable(self.bundle.map_raw(embed), self.bundle.map_raw(e.scales),
                          None if e.mins is None else self.bundle.map_raw(e.mins), e.bits, e.block_size, tuple(e.shape))

    @staticmethod
    def release(table: np.ndarray | BlockTable) -> int:
        """Drop the table's mapped pages from the process (they stay in the page cache)."""
        return sum(release_array(a) for a in (table.mapped() if isinstance(table, BlockTable) else [table]))

    def __call__(self, table: np.ndarray, ids: np.ndarray, types: np.ndarray | None = None,
                 positions: np.ndarray | None = None) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= self.rows):
            raise ValueError(f"token id out of range for embedding table of {self.rows} rows")
        h = np.asarray(table[ids], dtype=np.float32)
        if self.rule != "bert":
            return h
        T = ids.shape[1]
        pos = positions if positions is not None else np.arange(T)[None, :]
        h += self.position[pos + self.offset]
        if self.token_type is not None:
            if types is None or self.token_type.shape[0] == 1:  # RoBERTa-style: a single token type
                h += self.token_type[0]
            else:
                h += self.token_type[types]
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        h = (h - mean) / np.sqrt(var + self.eps)
        return (h * self.ln_w + self.ln_b).astype(np.float32, copy=False)
