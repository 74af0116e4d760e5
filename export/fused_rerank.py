"""One ONNX graph that runs a rerank bundle's whole early-ranking call: token ids in, scores and the ranking out.

For an app that has stock onnxruntime and nothing else, :func:`build_fused` composes the bundle's own graphs
(:mod:`.fused_graph`; no re-export, no copied weights) into a single graph that does what the streaming runtime does
for a model that fits in memory: the embedding gather (and BERT's embedding LayerNorm), every layer on every live
candidate, and at each layer of the calibrated schedule the early scores (probe, head or cosine), the schedule's rule
as graph nodes (:mod:`.fused_rules`) and a ``Compress`` that shrinks the candidate batch — GRATING-style progressive
pruning (EuroSys'26) inside one ``session.run``. Yes/no decoder bundles with split layers reuse the prompt prefix in
the graph: the prefix runs once per layer and every document attends to its keys and values, as in the runtime.

The I/O contract is ``docs/BUNDLE.md`` ("Fused graph"). The schedule is compiled in: its K is the K the graph protects.
"""

from __future__ import annotations

from typing import Any

from edge_sel.runtime.errors import InputError
from edge_sel.runtime.rerank.schedule import Schedule

from .fused_graph import Inliner, Net, value_info
from .fused_rules import FUSED_RULES, keep_mask

INT64, FLOAT, DOUBLE, BOOL = 7, 1, 11, 9
OUTPUTS = ("scores", "pruned_at_layer", "order")


def inputs_for(spec) -> list[str]:
    """The fused graph's input names for a bundle (``docs/BUNDLE.md``, "Fused graph")."""
    names = ["input_ids", "attention_mask"]
    if spec.scoring == "cross_encoder" and _typed(spec):
        names.append("token_type_ids")
    if spec.scoring == "bi_encoder":
        names.append("query_ids")
    if spec.scoring == "yes_no" and spec.layer_io.split:
        names.append("prefix_ids")
    return names


def _typed(spec) -> bool:
    tt = spec.arrays.get("token_type")
    return spec.embedding.rule == "bert" and tt is not None and tt.shape[0] > 1


def check_fusable(bundle, schedule: Schedule | None) -> None:
    """Refuse (InputError, one line) what a fused graph cannot hold."""
    spec, root = bundle.spec, bundle.root
    if spec.task != "rerank":
        raise InputError(f"{root} is a {spec.task!r} bundle; a fused graph ranks documents (export with --task rerank)")
    if spec.graph_format != "onnx":
        raise InputError(f"{root} holds {spec.graph_format.upper()}-format graphs; a fused graph is composed from the ONNX "
                         "graphs and their weight files, which conversion removes: fuse the ONNX bundle it was converted from")
    if spec.embed.encoding is not None:
        raise InputError(f"{root}: the embedding table is stored block-encoded ({spec.embed.encoding.bits}-bit), which a "
                         "graph cannot gather from; fuse the fp32 or fp16 bundle")
    for name in ("embed", *spec.arrays):
        a = spec.array_spec(name)
        if a.dtype not in ("float32", "float16"):
            raise InputError(f"{root}: array {name!r} is {a.dtype}; a fused graph reads float32 or float16 arrays")
    if spec.dtype != "float32":
        raise InputError(f"{root}: hidden states are {spec.dtype}; fused graphs are float32")
    if schedule is not None:
        if schedule.rule not in FUSED_RULES:
            raise InputError(f"{root}: pruning rule {schedule.rule!r} has no in-graph form (fused graphs run the rules "
                             f"{', '.join(FUSED_RULES)}); recalibrate with one of them or fuse without pruning")
        schedule.validate(bundle)


class _Builder:
    """State of one graph under construction: the live rows' tensors and the per-document outputs."""

    def __init__(self, bundle, schedule: Schedule | None, groups: int = 1):
        self.bundle, self.spec, self.schedule = bundle, bundle.spec, schedule
        self.net = Net()
        self.inline = Inliner(bundle, self.net)
        self.kind = self.spec.scoring
        self.split = self.spec.layer_io.split
        self.query_row = self.kind == "bi_encoder"   # the query runs as one more row, the last
        self.groups = max(1, int(groups))

    # ---- small helpers ---------------------------------------------------------------------------
    def op(self, *a, **kw):
        return self.net.op(*a, **kw)

    def c(self, v, dtype="int64"):
        return self.net.const(v, dtype)

    def dim(self, x: str, axis: int) -> str:
        """Scalar int64: ``x.shape[axis]``."""
        return self.op("Gather", self.op("Shape", x), self.c(axis), axis=0)

    def vec(self, *scalars: str) -> str:
        return self.op("Concat", *[self.op("Reshape", s, self.c([1])) for s in scalars], axis=0)

    def arange(self, n: str) -> str:
        return self.op("Range", self.c(0), n, self.c(1))

    def array(self, name: str) -> str:
        a = self.spec.array_spec(name)
        t = self.net.external(f"array/{name}", a.dtype, a.shape, a.file)
        return t if a.dtype == "float32" else self.op("Cast", t, to=FLOAT)

    def gather_rows(self, name: str, idx: str) -> str:
        a = self.spec.array_spec(name)
        t = self.net.external(f"array/{name}", a.dtype, a.shape, a.file)
        g = self.op("Gather", t, idx, axis=0)
        return g if a.dtype == "float32" else self.op("Cast", g, to=FLOAT)

    # ---- embedding ---------------------------------------------------------------------------------
    def embed(self, ids: str, positions: str, types: str | None) -> str:
        """``[B, T, H]`` from ids ``[B, T]`` (positions ``[B, T]``, types ``[B, T]`` or None), as the runtime's Embedder."""
        h = self.gather_rows("embed", ids)
        rule = self.spec.embedding
        if rule.rule != "bert":
            return h
        h = self.op("Add", h, self.gather_rows("position", self.op("Add", positions, self.c(rule.position_offset))))
        if "token_type" in self.spec.arrays:
            tt = self.spec.arrays["token_type"]
            if types is None or tt.shape[0] == 1:
                h = self.op("Add", h, self.gather_rows("token_type", self.c(0)))
            else:
                h = self.op("Add", h, self.gather_rows("token_type", types))
        return self.op("LayerNormalization", h, self.array("ln_weight"), self.array("ln_bias"), axis=-1,
                       epsilon=float(rule.layer_norm_eps))

    def positions(self, like: str, start: str | None = None) -> str:
        """``[B, T]`` positions ``start .. start+T-1`` for every row of ``like`` (``[B, T]``)."""
        r = self.arange(self.dim(like, 1))
        if start is not None:
            r = self.op("Add", r, start)
        return self.op("Expand", self.op("Unsqueeze", r, self.c([0])), self.op("Shape", like))

    # ---- pooling and scores ------------------------------------------------------------------------
    def pool(self, h: str, rows: dict[str, str], one_token: bool) -> str:
        """``[B, H]`` as the head reads it (``one_token``: ``h`` holds one token per row)."""
        how = self.spec.pooling
        if one_token or how == "cls":
            return self.op("Gather", h, self.c(0), axis=1)
        if how == "last":
            idx = self.op("Unsqueeze", self.op("Sub", rows["lengths"], self.c(1)), self.c([1]))
            return self.op("GatherND", h, idx, batch_dims=1)
        m = self.op("Unsqueeze", rows["maskf"], self.c([2]))
        total = self.op("ReduceSum", self.op("Mul", h, m), self.c([1]), keepdims=0)
        count = self.op("Max", self.op("ReduceSum", m, self.c([1]), keepdims=0), self.c(1e-9, "float32"))
        return self.op("Div", total, count)

    def head(self, pooled: str, scope: str) -> str:
        h = self.spec.head
        out = self.inline(h.file, scope, {(h.inputs or ("pooled",))[0]: pooled})
        return out[(h.outputs or ("score",))[0]]

    def unit(self, x: str) -> str:
        norm = self.op("ReduceL2", x, axes=[-1], keepdims=1)
        return self.op("Div", x, self.op("Max", norm, self.c(1e-12, "float32")))

    def split_query(self, pooled: str) -> tuple[str, str]:
        """Documents' rows and the query's row (``[1, H]``) of a bi-encoder's pooled states."""
        docs = self.op("Slice", pooled, self.c([0]), self.c([-1]), self.c([0]))
        q = self.op("Slice", pooled, self.c([-1]), self.c([2**62]), self.c([0]))
        return docs, q

    def early_scores(self, layer: int, pooled: str) -> str:
        """float32 ``[n]``: the schedule's method at ``layer`` (:class:`edge_sel.runtime.rerank.scoring.LayerScorer`)."""
        method = self.schedule.method
        q = None
        if self.query_row:
            pooled, q = self.split_query(pooled)
        if method == "head":
            return self.op("Reshape", self.head(pooled, f"early{layer}/head"), self.c([-1]))
        if method == "cosine":
            return self.op("MatMul", self.unit(pooled), self.op("Reshape", self.unit(q), self.c([-1])))
        if q is not None:  # bi-encoder probe: a learned weighted cosine
            f = self.op("Mul", self.unit(pooled), self.unit(q))
        else:              # the pooled state over its RMS
            rms = self.op("Sqrt", self.op("ReduceMean", self.op("Mul", pooled, pooled), axes=[-1], keepdims=1))
            f = self.op("Div", pooled, self.op("Max", rms, self.c(1e-12, "float32")))
        row = self.op("Gather", self.array(self.schedule.probe), self.c(layer), axis=0)
        F = self.spec.arrays[self.schedule.probe].shape[1] - 1
        w = self.op("Slice", row, self.c([0]), self.c([F]), self.c([0]))
        b = self.op("Slice", row, self.c([F]), self.c([F + 1]), self.c([0]))
        return self.op("Add", self.op("MatMul", f, w), b)

    def final_scores(self, pooled: str) -> str:
        out = self.head(pooled, "head")
        if not self.query_row:
            return self.op("Reshape", out, self.c([-1]))
        docs, q = self.split_query(out)
        return self.op("MatMul", docs, self.op("Reshape", q, self.c([-1])))

    # ---- pruning -----------------------------------------------------------------------------------
    def prune(self, layer: int, rows: dict[str, str], out: dict[str, str], n_call: str) -> dict[str, str]:
        s = self.schedule
        est = self.early_scores(layer, self.pool(rows["hidden"], rows, False))
        n = self.dim(rows["live"], 0)
        keep = keep_mask(self.net, s.rule, self.op("Cast", est, to=DOUBLE), n, n_call, s.param_at(layer), int(s.top_k),
                         s.floor, s.cluster_gap)
        live = rows["live"]
        out["pruned"] = self.op("ScatterElements", out["pruned"], live, self.op("Where", keep, self.c(-1), self.c(layer)), axis=0)
        out["last"] = self.op("ScatterElements", out["last"], live, est, axis=0)
        keep_rows = self.op("Concat", keep, self.c([True], "bool"), axis=0) if self.query_row else keep
        new = {k: self.op("Compress", v, keep_rows, axis=0) for k, v in rows.items() if k != "live"}
        new["live"] = self.op("Compress", live, keep, axis=0)
        # the survivors' longest row bounds the width: drop the columns that are padding for every survivor
        width = self.op("Reshape", self.op("ReduceMax", new["lengths"], axes=[0], keepdims=0), self.c([1]))
        for k in ("hidden", "maskf", "maskb", "pos"):
            new[k] = self.op("Slice", new[k], self.c([0]), width, self.c([1]))
        return new

    # ---- layers ------------------------------------------------------------------------------------
    def grouped(self, i: int, rows: dict[str, str], last: bool) -> tuple[str, bool]:
        """Layer ``i`` on the live rows in ``self.groups`` groups of consecutive rows, each cut to its own longest
        row (rows are kept sorted by length, so a group's padding is small — the runtime's chunks by length); the
        outputs padded back to the batch's width and joined. Group ``g`` covers rows ``floor(g n / G) ..
        ceil((g + 1) n / G)``: never empty (a layer graph cannot run zero rows), overlapping by a row where ``G``
        does not divide ``n`` (that row's second result is not used)."""
        pq = self.prefix_layer(i, last) if self.split else None
        G = self.groups
        if G == 1:
            return self.layer(i, rows, last, pq, "")
        n, T = self.dim(rows["hidden"], 0), self.dim(rows["hidden"], 1)
        pieces, one = [], False
        for g in range(G):
            lo = self.op("Div", self.op("Mul", n, self.c(g)), self.c(G))
            hi = self.op("Div", self.op("Add", self.op("Mul", n, self.c(g + 1)), self.c(G - 1)), self.c(G))
            end = self.op("Div", self.op("Mul", n, self.c(g + 1)), self.c(G))  # rows this group's output gives
            lo1, hi1 = self.op("Reshape", lo, self.c([1])), self.op("Reshape", hi, self.c([1]))
            part = {k: self.op("Slice", v, lo1, hi1, self.c([0])) for k, v in rows.items() if k != "live"}
            width = self.op("Reshape", self.op("ReduceMax", part["lengths"], axes=[0], keepdims=0), self.c([1]))
            for k in ("hidden", "maskf", "maskb", "pos"):
                part[k] = self.op("Slice", part[k], self.c([0]), width, self.c([1]))
            h, one = self.layer(i, part, last, pq, f"/g{g}")
            h = self.op("Slice", h, self.c([0]), self.op("Reshape", self.op("Sub", end, lo), self.c([1])), self.c([0]))
            if not one:
                grow = self.op("Sub", T, self.op("Reshape", width, self.c([])))
                h = self.op("Pad", h, self.vec(self.c(0), self.c(0), self.c(0), self.c(0), grow, self.c(0)))
            pieces.append(h)
        return self.op("Concat", *pieces, axis=0), one

    def prefix_layer(self, i: int, last: bool) -> dict[str, str]:
        """Split decoders: layer ``i`` on the shared prefix (once per call); its K/V for the documents."""
        qkv, attn = self.spec.qkv_graph(i).file, self.spec.layers[i].file
        p = self.prefix
        pq = self.inline(qkv, f"layer{i}/prefix/qkv", {"hidden": p["hidden"], "position_ids": p["pos"]})
        if not last:  # the last layer's prefix output is read by nothing
            key_pos = self.op("Unsqueeze", p["pos"], self.c([1]))
            p["next"] = self.inline(attn, f"layer{i}/prefix/attn", {"hidden": p["hidden"], "q": pq["q"], "k_cache": pq["k"],
                                                                     "v_cache": pq["v"], "key_pos": key_pos,
                                                                     "position_ids": p["pos"]})["hidden_out"]
        return pq

    def layer(self, i: int, rows: dict[str, str], last: bool, pq: dict[str, str] | None, tag: str) -> tuple[str, bool]:
        """Layer ``i`` on ``rows``: its output and whether it holds one token per row (``pq``: the prefix's K/V)."""
        spec = self.spec
        if not self.split:
            feeds = {"hidden": rows["hidden"], "mask": rows["maskf"], "position_ids": rows["pos"]}
            h = self.inline(spec.layers[i].file, f"layer{i}{tag}", feeds)["hidden_out"]
            return h, last and spec.final_layer_output == "first_token"
        qkv, attn = spec.qkv_graph(i).file, spec.layers[i].file
        p = self.prefix
        h, pos = rows["hidden"], rows["pos"]
        d = self.inline(qkv, f"layer{i}{tag}/docs/qkv", {"hidden": h, "position_ids": pos})
        own = self.op("Where", rows["maskb"], pos, self.c(int(spec.layer_io.empty_pos)))
        B = self.op("Reshape", self.dim(h, 0), self.c([1]))
        kv_shape = self.op("Concat", B, self.op("Slice", self.op("Shape", pq["k"]), self.c([1]), self.c([4]), self.c([0])), axis=0)
        k = self.op("Concat", self.op("Expand", pq["k"], kv_shape), d["k"], axis=2)
        v = self.op("Concat", self.op("Expand", pq["v"], kv_shape), d["v"], axis=2)
        ppos = self.op("Expand", p["pos"], self.op("Concat", B, self.c([1]), axis=0))
        key_pos = self.op("Unsqueeze", self.op("Concat", ppos, own, axis=1), self.c([1]))
        q = d["q"]
        if last and spec.pooling == "last":  # the head reads the last token only: compute only its row
            idx = self.op("Unsqueeze", self.op("Sub", rows["lengths"], self.c(1)), self.c([1]))
            h = self.op("Unsqueeze", self.op("GatherND", h, idx, batch_dims=1), self.c([1]))
            q = self.op("Unsqueeze", self.op("GatherND", self.op("Transpose", q, perm=[0, 2, 1, 3]), idx, batch_dims=1), self.c([2]))
            pos = self.op("Unsqueeze", self.op("GatherND", pos, idx, batch_dims=1), self.c([1]))
        out = self.inline(attn, f"layer{i}{tag}/docs/attn", {"hidden": h, "q": q, "k_cache": k, "v_cache": v, "key_pos": key_pos,
                                                         "position_ids": pos})["hidden_out"]
        return out, last and spec.pooling == "last"

    # ---- the whole graph ---------------------------------------------------------------------------
    def build(self):
        spec, net = self.spec, self.net
        names = inputs_for(spec)
        ids, mask = "input_ids", "attention_mask"
        types = "token_type_ids" if "token_type_ids" in names else None
        n_call = self.dim(ids, 0)
        if self.query_row:  # pad documents and query to one width; the query is the last row
            q = "query_ids"
            width = self.op("Max", self.dim(ids, 1), self.dim(q, 1))
            pad = lambda x, value: self.op("Pad", x, self.vec(self.c(0), self.c(0), self.c(0),  # noqa: E731
                                                                self.op("Sub", width, self.dim(x, 1))), self.c(value))
            ids = self.op("Concat", pad(ids, spec.pad_id), pad(q, spec.pad_id), axis=0)
            mask = self.op("Concat", pad(mask, 0), pad(self.op("Expand", self.c(1), self.op("Shape", q)), 0), axis=0)
        start = None
        if self.split:
            pids = "prefix_ids"
            P = self.dim(pids, 1)
            ppos = self.op("Unsqueeze", self.arange(P), self.c([0]))
            self.prefix = {"hidden": self.embed(pids, ppos, None), "pos": ppos}
            start = P
        pos = self.positions(ids, start)
        maskb = self.op("Cast", mask, to=BOOL)
        rows = {"hidden": self.embed(ids, self.positions(ids) if start is not None else pos, types),
                "maskf": self.op("Cast", mask, to=FLOAT), "maskb": maskb, "pos": pos,
                "lengths": self.op("ReduceSum", mask, self.c([1]), keepdims=0),
                "live": self.arange(n_call)}
        n_vec = self.op("Reshape", n_call, self.c([1]))
        if self.groups > 1:  # documents by length (ties: input order), so that consecutive rows make tight groups
            doc_len = self.op("Slice", rows["lengths"], self.c([0]), n_vec, self.c([0]))
            perm = self.op("TopK", doc_len, n_vec, outputs=2, axis=0, largest=0, sorted=1)[1]
            rows_perm = self.op("Concat", perm, n_vec, axis=0) if self.query_row else perm  # the query stays last
            rows = {k: self.op("Gather", v, rows_perm, axis=0) for k, v in rows.items() if k != "live"}
            rows["live"] = perm
        out = {"pruned": self.op("ConstantOfShape", n_vec, value=net.helper.make_tensor("v", INT64, [1], [-1])),
               "last": self.op("ConstantOfShape", n_vec, value=net.helper.make_tensor("v", FLOAT, [1], [0.0]))}
        at = set(self.schedule.layers) if self.schedule is not None else set()
        L = len(spec.layers)
        one_token = False
        for i in range(L):
            rows["hidden"], one_token = self.grouped(i, rows, i == L - 1)
            if self.split and i < L - 1:
                self.prefix["hidden"] = self.prefix.pop("next")
            if i in at and i < L - 1:
                rows = self.prune(i, rows, out, n_call)
        final = self.final_scores(self.pool(rows["hidden"], rows, one_token))
        scores = self.op("ScatterElements", out["last"], rows["live"], final, axis=0)
        # the runtime's order: survivors by score, then the dropped (later drop first, then by their last score)
        by_score = self.op("TopK", scores, n_vec, outputs=2, axis=0, largest=1, sorted=1)[1]
        drop_key = self.op("Where", self.op("Less", out["pruned"], self.c(0)), self.c(2**62), out["pruned"])
        by_drop = self.op("TopK", self.op("Gather", drop_key, by_score, axis=0), n_vec, outputs=2, axis=0, largest=1, sorted=1)[1]
        order = self.op("Gather", by_score, by_drop, axis=0)
        for name, t in zip(OUTPUTS, (scores, out["pruned"], order)):
            net.nodes.append(net.helper.make_node("Identity", [t], [name], name=f"output/{name}"))
        shapes = {"input_ids": ["documents", "tokens"], "attention_mask": ["documents", "tokens"],
                  "token_type_ids": ["documents", "tokens"], "query_ids": [1, "query_tokens"], "prefix_ids": [1, "prefix_tokens"]}
        ins = [value_info(n, "int64", shapes[n]) for n in names]
        outs = [value_info("scores", "float32", ["documents"]), value_info("pruned_at_layer", "int64", ["documents"]),
                value_info("order", "int64", ["documents"])]
        return net.model(ins, outs, doc="edge_sel fused early-ranking reranker (docs/BUNDLE.md, 'Fused graph')")


GROUPS = 4   # row groups per layer: padding saved against nodes added (each layer's nodes appear once per group)


def build_fused(bundle, schedule: Schedule | None, groups: int = GROUPS) -> tuple[Any, dict[str, Any]]:
    """The fused graph of ``bundle`` with ``schedule`` compiled in (None: no pruning, the whole model for every
    document) and what the manifest records of it: ``(ModelProto, {"inputs", "outputs", "reads"})``. The graph's
    external data locations are relative to the bundle's root, where its file must be written."""
    check_fusable(bundle, schedule)
    b = _Builder(bundle, schedule, groups)
    model = b.build()
    return model, {"inputs": inputs_for(bundle.spec), "outputs": list(OUTPUTS), "reads": sorted(b.net.reads), "groups": b.groups}

