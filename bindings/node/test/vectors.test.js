"use strict";
/** The binding reproduces the shared test vectors (tests/vectors/*.json, docs/BUNDLE.md "Proving a runtime"). */
const test = require("node:test");
const assert = require("node:assert/strict");
const { Reranker, BudgetError } = require("..");
const { cases, bundleOf, close } = require("./helpers");

function assertClose(got, want, tol, what) {
  assert.equal(got.length, want.length, `${what}: length`);
  got.forEach((g, i) => assert.ok(close(want[i], g, tol), `${what}[${i}]: expected ${want[i]}, got ${g}`));
}

for (const v of cases()) for (const form of ["onnx", "ort"]) {
  const { dir, skip } = bundleOf(v.case, form);
  const tol = v.tolerance;

  test(`${v.case} (${form}): token ids, pooled states per layer and scores`, { skip }, async () => {
    const rr = await Reranker.open(dir, { pruning: "off" });
    for (const q of v.queries) {
      const enc = await rr.encoder.encode(q.query, v.documents);
      assert.deepEqual(enc.docIds, q.tokens.ids, "token ids");
      assert.equal(enc.prefixLen, q.tokens.prefix_len);
      assert.deepEqual(enc.docTypes, q.tokens.type_ids);
      assert.deepEqual(enc.queryIds, q.tokens.query_ids);
      assert.equal(enc.nTruncated, q.tokens.n_truncated);
      const pooled = q.pooled.map(() => []);
      const scores = await rr.trace(q.query, v.documents, ({ layer, items, pooled: rows }) => {
        items.forEach((it, r) => { pooled[layer][it] = Array.from(rows[r].slice(0, v.pooled_values)); });
      });
      q.pooled.forEach((want, l) => assertClose(pooled[l].flat(), want.flat(), tol, `pooled after layer ${l}`));
      assertClose(scores, q.scores, tol, "scores");
    }
    await rr.close();
  });

  test(`${v.case} (${form}): rankings and pruning decisions of every schedule`, { skip }, async () => {
    for (const q of v.queries) {
      for (const [label, want] of Object.entries(q.rankings)) {
        const pruning = label === "none" ? "off" : label === "bundle" ? "auto" : want.schedule;
        const rr = await Reranker.open(dir, { pruning });
        const top = await rr.rank(q.query, v.documents, { topK: v.top_k });
        assert.deepEqual(top.map((r) => r.corpusId), want.top.map((x) => x[0]), `${label}: top ids`);
        assertClose(top.map((r) => r.score), want.top.map((x) => x[1]), tol, `${label}: top scores`);
        const all = await rr.rank(q.query, v.documents, { topK: null });
        assert.deepEqual(all.map((r) => r.corpusId), want.order, `${label}: order`);
        const dropped = v.documents.map((_, i) => all.find((r) => r.corpusId === i).prunedAtLayer ?? -1);
        assert.deepEqual(dropped, want.pruned_at_layer, `${label}: pruned at layer`);
        assert.deepEqual(rr.lastStats.livePerLayer, want.live_per_layer, `${label}: live per layer`);
        await rr.close();
      }
    }
  });

  // the plans' budgets follow the ONNX bundle's file sizes
  if (form === "onnx") test(`${v.case}: the planner's window and chunks under a budget`, { skip }, async () => {
    const q = v.queries[0].query;
    for (const p of v.plans) {
      if (p.error) {
        const rr = await Reranker.open(dir, { pruning: "off", memoryBudget: p.budget });
        await assert.rejects(rr.rank(q, v.documents, { topK: v.top_k }), (e) => e instanceof BudgetError && e.minimumBytes === p.minimum_bytes && /below the minimum/.test(e.message));
        continue;
      }
      const rr = await Reranker.open(dir, { pruning: "off", memoryBudget: p.budget });
      await rr.rank(q, v.documents, { topK: v.top_k });
      const s = rr.lastStats;
      assert.deepEqual([s.windowLayers, s.chunkTokens, s.nChunks, s.chunkSize], [p.window_layers, p.chunk_tokens, p.n_chunks, p.chunk_size], `budget ${p.budget}`);
      await rr.close();
    }
  });
}
