"""Graph upgrades: bring a bundle exported in an older graph form to the exporter's current one, atomically.

:func:`fuse_bundle_attention` rewrites a prefix-reuse rerank bundle's split layer graphs into the current rerank form
(:mod:`edge_sel.export.prefix_layers`; same weights, same scores within float rounding). The new bundle is staged
beside the old one — unchanged files hard-linked, rewritten graphs as new files, the new manifest — and committed
over it (:class:`edge_sel.runtime.bundle_writer.BundleWriter`): a reader sees the old bundle or the upgraded one, never a
half-upgraded mixture, and hard-linked copies of the old bundle keep their graphs.
"""

from __future__ import annotations

import os

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.bundle_writer import BundleWriter

from .. import generate_layers as gl
from .. import prefix_layers as pl
from ..staging import link_files


def fuse_bundle_attention(path: str | os.PathLike) -> bool:
    """Upgrade a rerank bundle with split layers, exported before the current rerank form (:data:`RERANK_FORM`), in
    place: rewrite its attn graphs (:func:`~edge_sel.export.prefix_layers.fuse_rerank_attention`) and qkv graphs
    (:func:`~edge_sel.export.prefix_layers.fuse_rerank_qkv`) — weights unchanged, every rewritten graph checked
    against the old one on sample inputs — and their manifest entries. Returns True when the bundle changed (False:
    nothing to do). A qkv graph whose rotary pattern is not recognised stays as exported (correct, only slower);
    an attn graph that cannot be rewritten leaves the bundle untouched and raises ``ValueError``."""
    b = Bundle.open(path)
    spec = b.spec
    io = spec.layer_io
    if not io.prefix_reuse or io.rerank_form >= pl.RERANK_FORM:
        return False
    dims = spec.dims.to_dict()
    rotary = True
    with BundleWriter(b.root, overwrite=True) as w:
        link_files(b, w, spec.files)
        for i, layer in enumerate(spec.layers):
            if not pl.fuse_attn_file(w.file(layer.file), dims):
                raise ValueError(f"{b.path(layer.file)}: the attn graph does not have the expected pattern; "
                                 "re-export the bundle instead")
            rotary = pl.fuse_qkv_file(w.file(spec.qkv_graph(i).file), dims) and rotary
        io = io.replace(attn=io.attn.replace(outputs=list(pl.RERANK_ATTN_OUTPUTS)), attn_core="MultiHeadAttention",
                        qkv_rotary="RotaryEmbedding" if rotary else io.qkv_rotary, rerank_form=pl.RERANK_FORM)
        w.commit(spec.replace(layer_io=io))
    return True


def upgrade_generate_bundle(path: str | os.PathLike) -> bool:
    """Upgrade a generate bundle exported in an older graph form to the exporter's current one, in place: attn graphs
    in the broadcast form (queries ``[B,kv,G,T,D]`` against keys broadcast over the group, which reads the cache G
    times) become the grouped form (:func:`~edge_sel.export.generate_layers.group_generate_attention`), qkv graphs
    rotate q and k with RotaryEmbedding nodes (:func:`~edge_sel.export.prefix_layers.fuse_rerank_qkv`) from tables
    and reshapes of constant shapes (:func:`~edge_sel.export.generate_layers.compact_generate_qkv`), and
    block-quantized matrices reading the same activation are merged (:func:`~edge_sel.export.merge_nbits.merge_shared_input`)
    and kept GGUF Q4_1 matrices take the one-row forms (:func:`~edge_sel.export.nbits_forms.decode_forms`). Same inputs,
    outputs and weights; every rewritten graph is checked against the old one on sample inputs and a graph whose
    pattern is not recognised stays as it was (correct, only slower). Returns True when the bundle changed."""
    b = Bundle.open(path)
    spec = b.spec
    io = spec.layer_io
    if spec.task != "generate" or not io.split:
        return False
    dims = spec.dims.to_dict()
    changed = False
    with BundleWriter(b.root, overwrite=True) as w:
        link_files(b, w, spec.files)
        rotary = io.qkv_rotary != "RotaryEmbedding"
        for i, layer in enumerate(spec.layers):
            qkv = spec.qkv_graph(i)
            for rel, data, kind in ((layer.file, layer.weights, "attn"), (qkv.file, qkv.weights, "qkv")):
                changed = gl.merge_graph_file(b.path(rel), b.path(data) if data else None, w.file(rel), kind, dims) or changed
            changed = gl.group_attn_file(w.file(layer.file), dims) or changed
            changed = gl.core_attn_file(w.file(layer.file), dims) or changed
            if rotary:
                rotary = pl.fuse_qkv_file(w.file(qkv.file), dims)
                changed = changed or rotary
            if rotary or io.qkv_rotary == "RotaryEmbedding":
                changed = gl.compact_qkv_file(w.file(qkv.file), dims) or changed
            for rel, data, kind in ((layer.file, layer.weights, "attn"), (qkv.file, qkv.weights, "qkv")):
                changed = gl.forms_graph_file(w.file(rel), w.file(data) if data else None, kind, dims) or changed
        if rotary:
            io = io.replace(qkv_rotary="RotaryEmbedding")
        if not changed:
            return False
        w.commit(spec.replace(layer_io=io))
    return True
