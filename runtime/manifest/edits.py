"""Edits of a raw manifest dict: what the exporter and the bundle passes change before the writer commits it."""

from __future__ import annotations

from typing import Any


def graph_entries(raw: dict[str, Any]) -> list[tuple[str, str | None, bool]]:
    """``(file, weights, is_head)`` of every graph a manifest being written names: layers, extra graphs, head."""
    graphs = [*raw["layers"], *raw.get("extra_graphs", {}).values()]
    return [(g["file"], g.get("weights"), False) for g in graphs] + [(raw["head"]["file"], raw["head"].get("weights"), True)]


def embed_entry(raw: dict[str, Any]) -> tuple[str, str, list[int]]:
    """The stored embedding table of a manifest being written: ``(file, dtype, shape)``."""
    e = raw["embed"]
    return e["file"], e["dtype"], list(e["shape"])


def embed_files(raw: dict[str, Any]) -> list[str]:
    """Every file the embedding table of a manifest being written is stored in: values, an encoding's scales and mins."""
    spec = raw["embed"]
    enc = spec.get("encoding") or {}
    return [spec["file"]] + [enc[k]["file"] for k in ("scales", "mins") if enc.get(k)]


def with_weights(raw: dict[str, Any], data: dict[str, str | None], embed: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with the graphs' external-data paths ``data`` (graph file -> new weights path), the embedding table
    spec ``embed`` and the ``weights`` record: what a weight-format conversion changes."""
    def moved(g):
        return {**g, "weights": data[g["file"]]} if g["file"] in data and g.get("weights") else g

    return {**raw, "layers": [moved(g) for g in raw["layers"]],
            "extra_graphs": {k: moved(g) for k, g in raw.get("extra_graphs", {}).items()},
            "head": moved(raw["head"]), "embed": embed, "weights": weights,
            **({"fused": None} if raw.get("fused") else {})}  # a fused graph reads the old weights


def with_weights_facts(raw: dict[str, Any], **facts) -> dict[str, Any]:
    """``raw`` with ``facts`` (seconds, agreement) added to its ``weights`` record."""
    return {**raw, "weights": {**raw["weights"], **facts}}


# ---- the edits bundle passes make (they rewrite a stored manifest; the exporter writes whole new ones) ------------
WRITER_KEYS = ("format", "format_version", "files")  # set by BundleWriter.commit


def editable(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored manifest without the keys the bundle writer sets on commit, ready to be edited and committed."""
    return {k: v for k, v in raw.items() if k not in WRITER_KEYS}


def with_schedule(raw: dict[str, Any], schedule: dict[str, Any] | None, probe_name: str,
                  probe: dict[str, Any] | None) -> dict[str, Any]:
    """``raw`` with ``schedule`` stored and the array ``probe_name`` replaced by ``probe`` (or removed)."""
    arrays = {k: v for k, v in raw.get("arrays", {}).items() if k != probe_name}
    if probe is not None:
        arrays[probe_name] = probe
    stale = {"fused": None} if raw.get("fused") else {}  # a fused graph holds the schedule it was built with
    return {**raw, "arrays": arrays, "schedule": schedule, **stale}


def without_layers(raw: dict[str, Any], drop: set[int], cost: dict[str, Any], probe_name: str,
                   files: Any = ()) -> tuple[dict[str, Any], set[str]]:
    """``raw`` without the layers at positions ``drop`` (and their qkv graphs), recording them as dropped; the
    schedule and its probe go (their layer positions no longer hold), and so do CoreML packages (``files``: the
    bundle's listed files, to find the packages' contents). Returns the new manifest and the files it no longer
    references."""
    gone: set[str] = set()
    extra = dict(raw.get("extra_graphs", {}))
    kept, newly = [], []
    for pos, layer in enumerate(raw["layers"]):
        if pos not in drop:
            kept.append({**layer, "index": len(kept)})
            continue
        newly.append(layer.get("source_index", layer["index"]))
        gone.update(x for x in (layer["file"], layer.get("weights")) if x)
        if layer.get("qkv"):
            g = extra.pop(layer["qkv"])
            gone.update(x for x in (g["file"], g.get("weights")) if x)
    out = {**raw, "layers": kept, "extra_graphs": extra, "dropped_layers": sorted(list(raw.get("dropped_layers") or []) + newly),
           "drop_cost": cost}
    if len(raw["layers"]) - 1 in drop and raw.get("final_layer_output") == "first_token":
        out["final_layer_output"] = "all_tokens"  # the first-token graph was the last layer's; a full one ends it now
    if raw.get("schedule"):
        out["schedule"] = None
    if raw.get("coreml"):  # packages are per layer position: they go with the layers' renumbering
        pkgs = [s["package"] + "/" for s in raw["coreml"]["stages"].values()]
        gone.update(f for f in files if any(f.startswith(pk) for pk in pkgs))
        out["coreml"] = None
    if raw.get("fused"):  # compiled from the old layers
        gone.add(raw["fused"]["file"])
        out["fused"] = None
    probe = raw.get("arrays", {}).get(probe_name)
    if probe:
        gone.add(probe["file"])
        out["arrays"] = {k: v for k, v in raw["arrays"].items() if k != probe_name}
    return out, gone
