"use strict";
/**
 * `Reranker`: rank documents for a query with an edge_sel bundle under a memory budget — the contract of the
 * Python runtime's `Reranker.rank`, implemented from docs/BUNDLE.md. A call tokenizes, plans the budget (layer
 * window, chunk size), embeds the rows it needs, moves every live candidate through one layer before the next
 * (GRATING's monolithic forwarding, so layers stream with a window of sessions and candidates can be pruned between
 * layers), prunes at the schedule's layers and scores with the head. Yes/no decoder bundles with split layers run
 * the prompt prefix shared by every document once per layer and each document against its keys and values.
 */
const { Bundle } = require("./bundle");
const { Embedder } = require("./embedding");
const { TextEncoder } = require("./text");
const { Planner } = require("./planner");
const { Packing, makeChunks, compact, allocateHidden, maskOf, positionsOf } = require("./chunks");
const { Scratch } = require("./scratch");
const { PeakRss, Collector } = require("./memory");
const { Pruner, checkSchedule } = require("./pruning");
const { Scoring, pool, dot } = require("./scoring");
const { loadSession, LayerStream, ort } = require("./sessions");
const { parseManifest } = require("./manifest");
const { BudgetError, InputError } = require("./errors");
const { parseSize, formatSize, formatMinSize } = require("./units");

const f32 = (data, dims) => new ort.Tensor("float32", data, dims);
const i64 = (data, dims) => new ort.Tensor("int64", data, dims);

function checkDocuments(documents) {
  if (typeof documents === "string") throw new InputError("documents must be an array of strings, not a single string");
  if (!Array.isArray(documents)) throw new InputError(`documents must be an array of strings, got ${typeof documents}`);
  if (documents.length === 0) throw new InputError("no documents to rank (the document list is empty)");
  documents.forEach((d, i) => { if (typeof d !== "string") throw new InputError(`document ${i} is ${typeof d}, expected a string`); });
  return documents;
}

class Reranker {
  /**
   * Open a bundle directory. Options: `memoryBudget` (bytes or "128MB"; null keeps every layer resident),
   * `pruning` ("auto": the bundle's calibrated schedule if any; "on": refuse a bundle without one; "off"; or a
   * schedule object as in the manifest), `threads`, `verify` ("once" | true | false, as Bundle.open).
   */
  static async open(dir, { memoryBudget = null, pruning = "auto", threads = 0, verify = "once" } = {}) {
    const bundle = Bundle.open(dir, { verify });
    const rr = new Reranker(bundle, { memoryBudget, pruning, threads });
    rr.head = await loadSession(bundle.path(bundle.spec.head.file), threads);
    rr.scoring = new Scoring(bundle.spec, rr.head);
    return rr;
  }

  constructor(bundle, { memoryBudget, pruning, threads }) {
    const spec = bundle.spec;
    if (spec.task !== "rerank") throw new InputError(`${bundle.root} is a "${spec.task}" bundle; ranking needs a bundle exported with --task rerank`);
    if (spec.dtype !== "float32") throw new InputError(`${bundle.root}: hidden states of type ${spec.dtype}; this binding runs float32 bundles only`);
    this.bundle = bundle;
    this.spec = spec;
    this.threads = threads;
    this.memoryBudget = memoryBudget === null || memoryBudget === undefined ? null : parseSize(memoryBudget);
    this.planner = new Planner(bundle);
    const need = this.planner.staticMinimum();
    if (this.memoryBudget !== null && this.memoryBudget < need)
      throw new BudgetError(`memory budget ${formatSize(this.memoryBudget)} is below the minimum this bundle can run in: ${formatMinSize(need)} `
        + `(two layers of ${formatSize(this.planner.layerBytes)} + fixed costs)`, need);
    this.schedule = this.resolveSchedule(pruning);
    this.probe = this.schedule && this.schedule.method === "probe" ? bundle.floatArray(this.schedule.probe) : null;
    this.encoder = new TextEncoder(bundle);
    this.embedder = new Embedder(bundle);
    this.split = spec.layerIO.split;
    this.stream = new LayerStream(spec.layers.length, (i) => this.loadLayer(i), (s) => this.releaseLayer(s));
    this.lastStats = null;
    this.observer = null;
    this.scratch = new Scratch();
  }

  resolveSchedule(pruning) {
    const where = this.bundle.root;
    if (pruning === null || pruning === "off") return null;
    if (pruning === "auto" || pruning === "on") {
      if (!this.spec.schedule && pruning === "on")
        throw new InputError(`${where} has no early-ranking schedule, so pruning cannot be used; calibrate it first: \`edge-sel calibrate ${where}\` (or use pruning "auto"/"off")`);
      if (this.spec.schedule) checkSchedule(this.spec.schedule, this.spec, where);
      return this.spec.schedule;
    }
    if (typeof pruning !== "object") throw new InputError(`pruning must be "auto", "on", "off" or a schedule object, got ${JSON.stringify(pruning)}`);
    // a schedule given by the caller is validated as the manifest's would be
    let s;
    try {
      const raw = { ...this.bundleManifestShell(), schedule: pruning };
      s = parseManifest(raw, `${where} (pruning option)`).schedule;
    } catch (e) {
      throw new InputError(e.message);
    }
    checkSchedule(s, this.spec, where);
    return s;
  }

  bundleManifestShell() {
    return JSON.parse(this.bundle.manifestBytes.toString("utf8"));
  }

  async loadLayer(i) {
    const l = this.spec.layers[i];
    // a memory pattern (one block per run, planned per input shape) pays off for sessions that stay resident; under a
    // budget it is off, since those blocks, freed after each run, fragment the C heap this process cannot trim
    const memPattern = this.stream.keepAll && this.memoryBudget === null;
    const attn = await loadSession(this.bundle.path(l.file), this.threads, memPattern);
    if (!this.split) return attn;
    return [await loadSession(this.bundle.path(this.spec.extraGraphs[l.qkv].file), this.threads, memPattern), attn];
  }

  async releaseLayer(s) {
    for (const x of Array.isArray(s) ? s : [s]) await x.release();
  }

  /** Rank `documents` for `query`: `[{ corpusId, score }]` best first (dropped candidates also carry
   * `prunedAtLayer`). `topK` null returns every document. */
  async rank(query, documents, { topK = 10, instruction = null } = {}) {
    checkDocuments(documents);
    const n = documents.length;
    const pruneK = topK;
    if (topK === null) topK = n;
    if (!Number.isInteger(topK) || topK <= 0) throw new InputError(`topK must be a positive integer, got ${JSON.stringify(topK)}`);
    topK = Math.min(topK, n);
    const { scores, droppedAt } = await this.run(query, documents, instruction, pruneK);
    const order = [...scores.keys()].sort((a, b) => {
      const da = droppedAt[a] < 0 ? Infinity : droppedAt[a], db = droppedAt[b] < 0 ? Infinity : droppedAt[b];
      return (db - da) || (scores[b] - scores[a]) || (a - b);
    });
    return order.slice(0, topK).map((i) => {
      const r = { corpusId: i, score: scores[i] };
      if (droppedAt[i] >= 0) r.prunedAtLayer = droppedAt[i];
      return r;
    });
  }

  /** `predict`, calling `observer({ layer, items, pooled })` after every layer ran on every chunk (pooled: one
   * Float32Array per item, as the head would read it). */
  async trace(query, documents, observer, { instruction = null } = {}) {
    checkDocuments(documents);
    this.observer = observer;
    try {
      return Array.from((await this.run(query, documents, instruction, undefined, false)).scores);
    } finally {
      this.observer = null;
    }
  }

  /** Full-model scores of every document in input order (never pruned). */
  async predict(query, documents, { instruction = null } = {}) {
    checkDocuments(documents);
    return Array.from((await this.run(query, documents, instruction, undefined, false)).scores);
  }

  async close() {
    this.stream.clear();
    if (this.head) await this.head.release();
    this.head = null;
  }

  // ---- one call -------------------------------------------------------------------------------------------------
  async run(query, documents, instruction, topK, prune = true) {
    const t0 = performance.now();
    const peak = new PeakRss();
    this.collector = new Collector(this.memoryBudget);
    const spec = this.spec, H = spec.dims.hidden;
    let enc = await this.encoder.encode(query, documents, instruction);
    const tTok = performance.now() - t0;
    const nDocs = documents.length, nTruncated = enc.nTruncated;
    const P = this.split ? enc.prefixLen : 0;
    const ids = enc.docIds.map((x) => (P ? x.slice(P) : x));
    if (enc.queryIds) ids.push(enc.queryIds);
    const lengths = ids.map((x) => x.length);
    const prefixIds = Int32Array.from(P ? enc.docIds[0].slice(0, P) : []);
    const distinct = new Set();
    for (const x of ids) for (const id of x) distinct.add(id);
    const plan = this.planner.plan(this.memoryBudget, this.planner.callSize(lengths, this.embedder.touchedBytes(distinct.size)));
    this.stream.setWindow(plan.window);
    await this.stream.preload();
    const packing = new Packing(spec.padId, P, plan.chunkTokens, plan.maxBatch);
    let chunks = makeChunks(ids, enc.docTypes, packing);
    enc = null;  // from here on the chunks hold the token ids, compactly
    ids.length = 0;
    const nChunks = chunks.length, chunkSize = Math.max(...chunks.map((c) => c.B));

    let pruner = null, note = this.schedule ? `${this.schedule.method} at layers [${this.schedule.layers.map((l) => l.layer)}] (top-${this.schedule.topK})` : "off";
    if (this.schedule && !prune) note = "off (predict computes every score)";
    else if (this.schedule && topK !== null && topK !== undefined && topK > this.schedule.topK) note = `off for this call (topK=${topK} > calibrated top-${this.schedule.topK})`;
    else if (this.schedule) pruner = new Pruner(this.schedule, this.scoring.layerScorer(this.schedule, this.probe), nDocs, spec.layers.length);

    // embedding: the rows this call uses, read once; then released
    const t1 = performance.now();
    let rows = this.embedder.gatherRows([...chunks.map((c) => c.ids), prefixIds]);
    allocateHidden(chunks, H);
    for (const c of chunks) this.embedder.embed(rows, c.B, c.T, c.ids, c.posOffset, c.types, c.hidden);
    let prefixH = null;
    const prefixPos = new BigInt64Array(P).map((_, t) => BigInt(t));
    if (P) prefixH = this.embedder.embed(rows, 1, P, prefixIds, 0, null);
    rows = null;
    this.collector.release();  // the rows read
    const tEmbed = performance.now() - t1;
    peak.sample();

    const t2 = performance.now();
    const live = [];
    const lastOnly = this.split && spec.pooling === "last";
    for await (const [i, sess] of this.stream.run()) {
      live.push(chunks.reduce((a, c) => a + c.items.filter((it) => it < nDocs).length, 0));
      const final = i === spec.layers.length - 1;
      let kp = null, vp = null;
      if (P) [prefixH, kp, vp] = await this.runPrefix(sess, prefixH, prefixPos, final && lastOnly);
      for (const c of chunks) {
        const out = this.split ? await this.runCandidates(sess, c, kp, vp, P, final && lastOnly) : await this.runLayer(sess, c);
        // the output replaces the states in place (same shape), or, one token a row, takes their place
        if (out.length === c.hidden.length) c.hidden.set(out);
        else c.hidden = out;
        c.width = c.hidden.length / (c.B * H);
        if (this.observer) this.observer({ layer: i, items: c.items, pooled: pool(spec.pooling, c, H) });
        peak.sample();
        this.collector.release(true);  // the run's output buffers
      }
      if (pruner) chunks = await this.pruneAfter(i, chunks, pruner, nDocs, packing, H);
      this.collector.release();  // what outlived the scavenges: the chunks before re-packing, the prefix's states
    }
    this.scratch.clear();
    const tLayers = performance.now() - t2;

    const t3 = performance.now();
    const scores = new Float32Array(nDocs);
    const emb = this.scoring.bi ? new Array(nDocs + 1) : null;
    for (const c of chunks) {
      const out = await this.scoring.runHead(pool(spec.pooling, c, H));
      c.items.forEach((it, r) => { if (emb) emb[it] = out[r]; else scores[it] = out[r]; });
    }
    if (emb) for (let d = 0; d < nDocs; d++) scores[d] = emb[d] ? dot(emb[d], emb[nDocs]) : 0;
    const droppedAt = pruner ? pruner.droppedAt : new Int32Array(nDocs).fill(-1);
    if (pruner) for (let d = 0; d < nDocs; d++) if (droppedAt[d] >= 0) scores[d] = pruner.lastScore[d];
    const tHead = performance.now() - t3;

    const nLayers = spec.layers.length;
    this.lastStats = {
      latencyS: (performance.now() - t0) / 1e3, tokenizeS: tTok / 1e3, embedS: tEmbed / 1e3, layersS: tLayers / 1e3, headS: tHead / 1e3,
      peakRssBytes: peak.finish(), startRssBytes: peak.start, windowLayers: this.stream.window, chunkSize, chunkTokens: plan.chunkTokens,
      nChunks, memoryBudgetBytes: plan.budget, livePerLayer: live, nLayers, nDocuments: nDocs, nTruncated,
      layerLoads: this.stream.loads, pruning: note, nPruned: pruner ? pruner.nPruned : 0,
      collections: this.collector.collections, collectS: this.collector.seconds,
      layerWorkSaved: 1 - live.reduce((a, b) => a + b, 0) / Math.max(1, nDocs * nLayers), prefixReuseTokens: P,
    };
    return { scores, droppedAt };
  }

  async runLayer(sess, c) {
    const H = this.spec.dims.hidden;
    const feeds = { hidden: f32(c.hidden, [c.B, c.width, H]), mask: f32(maskOf(c), [c.B, c.T]) };
    if (this.spec.layerIO.inputs.includes("position_ids")) feeds.position_ids = i64(positionsOf(c), [c.B, c.T]);
    return (await sess.run(feeds)).hidden_out.data;
  }

  /** One split layer over the shared prefix: [hiddenOut | null, k, v] (the last layer needs only its K/V). */
  async runPrefix([qkv, attn], h, pos, kvOnly) {
    const H = this.spec.dims.hidden, P = pos.length;
    const [qn, kn, vn] = this.spec.layerIO.qkv.outputs;
    const o = await qkv.run({ hidden: f32(h, [1, P, H]), position_ids: i64(pos, [1, P]) });
    if (kvOnly) return [null, o[kn], o[vn]];
    const out = await attn.run({ hidden: f32(h, [1, P, H]), q: o[qn], k_cache: o[kn], v_cache: o[vn], key_pos: i64(pos, [1, 1, P]),
      position_ids: i64(pos, [1, P]) }, ["hidden_out"]);
    return [out.hidden_out.data, o[kn], o[vn]];
  }

  /** One split layer over a chunk attending to [prefix K/V ; own K/V]; with `last`, only each row's last token. */
  async runCandidates([qkv, attn], c, kp, vp, P, last) {
    const { hidden: H, heads, kvHeads: KV, headDim: D } = this.spec.dims;
    const { B, T } = c;
    const [qn, kn, vn] = this.spec.layerIO.qkv.outputs;
    const pos = positionsOf(c);
    const o = await qkv.run({ hidden: f32(c.hidden, [B, T, H]), position_ids: i64(pos, [B, T]) });
    let q = o[qn], hidden = f32(c.hidden, [B, T, H]), positions = i64(pos, [B, T]);
    if (last) {
      const qd = new Float32Array(B * heads * D), hd = new Float32Array(B * H), pd = new BigInt64Array(B);
      for (let b = 0; b < B; b++) {
        const t = c.lengths[b] - 1;
        for (let n = 0; n < heads; n++) qd.set(q.data.subarray(((b * heads + n) * T + t) * D, ((b * heads + n) * T + t + 1) * D), (b * heads + n) * D);
        hd.set(c.hidden.subarray((b * T + t) * H, (b * T + t + 1) * H), b * H);
        pd[b] = pos[b * T + t];
      }
      q = f32(qd, [B, heads, 1, D]);
      hidden = f32(hd, [B, 1, H]);
      positions = i64(pd, [B, 1]);
    }
    const S = P + T, empty = BigInt(this.spec.layerIO.emptyPos);
    const k = this.scratch.take("kCache", B * KV * S * D), v = this.scratch.take("vCache", B * KV * S * D), keyPos = new BigInt64Array(B * S);
    for (let b = 0; b < B; b++) {
      for (let g = 0; g < KV; g++) {
        const dst = (b * KV + g) * S * D;
        if (P) {
          k.set(kp.data.subarray(g * P * D, (g + 1) * P * D), dst);
          v.set(vp.data.subarray(g * P * D, (g + 1) * P * D), dst);
        }
        k.set(o[kn].data.subarray((b * KV + g) * T * D, (b * KV + g + 1) * T * D), dst + P * D);
        v.set(o[vn].data.subarray((b * KV + g) * T * D, (b * KV + g + 1) * T * D), dst + P * D);
      }
      for (let t = 0; t < P; t++) keyPos[b * S + t] = BigInt(t);
      for (let t = 0; t < T; t++) keyPos[b * S + P + t] = t < c.lengths[b] ? pos[b * T + t] : empty;
    }
    const out = await attn.run({ hidden, q, k_cache: f32(k, [B, KV, S, D]), v_cache: f32(v, [B, KV, S, D]),
      key_pos: i64(keyPos, [B, 1, S]), position_ids: positions }, ["hidden_out"]);
    return out.hidden_out.data;
  }

  async pruneAfter(layer, chunks, pruner, nDocs, packing, H) {
    const items = [], pooled = [];
    let q = null;
    for (const c of chunks) {
      const p = pool(this.spec.pooling, c, H);
      c.items.forEach((it, r) => {
        if (it < nDocs) {
          items.push(it);
          pooled.push(p[r]);
        } else q = p[r];
      });
    }
    const keep = await pruner.decide(layer, items, pooled, q);
    if (!keep) return chunks;
    const keepItems = new Array(nDocs + 1).fill(true);
    keep.forEach((k, j) => { if (!k) keepItems[items[j]] = false; });
    return compact(chunks, keepItems, packing, H);
  }
}

module.exports = { Reranker, checkDocuments };
