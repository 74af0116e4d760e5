"""Split layer graphs for decoder rerank bundles (shared-prefix reuse, issue 3 item 3).

A yes/no rerank bundle exported with ``prefix_reuse`` (the default for decoders) stores each layer as
the generation bundles' two graphs — ``qkv`` (norm, projections, rotary) and ``attn`` (attention over
explicit K/V inputs + MLP) — built by :func:`edge_sel.export.generate.build_graphs`, so the runtime
(:mod:`edge_sel.runtime.prefix`) computes the instruction + query prefix once per query and lets every
candidate attend to its K/V. The two graphs hold disjoint weights: the bundle is no larger.
"""

from __future__ import annotations

from .graphs import export_graph


def write_split_layers(w, torch_model, say) -> tuple[list[dict], dict, dict]:
    """Export every layer as ``qkv`` + ``attn`` graphs into the staging bundle ``w``.

    Returns ``(layer entries, extra_graphs, layer_io)`` for the manifest (same layout as generate bundles).
    """
    from .generate import EMPTY_POS, build_graphs

    pairs, _, _ = build_graphs(torch_model)
    layers, extra = [], {}
    n = len(pairs)
    for i, (qkv, attn) in enumerate(pairs):
        say("layers", i, n)
        rel = f"layers/layer_{i:03d}.onnx"
        data = export_graph(attn, w.file(rel))
        qrel = f"layers/layer_{i:03d}_qkv.onnx"
        qdata = export_graph(qkv, w.file(qrel))
        extra[f"qkv_{i:03d}"] = {"file": qrel, "weights": f"layers/{qdata}" if qdata else None}
        layers.append({"index": i, "source_index": i, "file": rel, "weights": f"layers/{data}" if data else None,
                       "qkv": f"qkv_{i:03d}"})
    say("layers", n, n)
    layer_io = {"qkv": {"inputs": pairs[0][0].input_names, "outputs": pairs[0][0].output_names},
                "attn": {"inputs": pairs[0][1].input_names, "outputs": pairs[0][1].output_names},
                "empty_pos": EMPTY_POS, "prefix_reuse": True}
    return layers, extra, layer_io
