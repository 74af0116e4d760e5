"use strict";
/**
 * Early ranking with the bundle's calibrated schedule (docs/BUNDLE.md, "Early ranking"): at each schedule layer but
 * the last, the live candidates are scored (probe, head or cosine) and the rule keeps a set — `margin`: clusters of
 * similar score (split at gaps wider than cluster_gap x margin) whose best member reaches s_K - margin; `rank`: the
 * best ceil(keep x N); `spread`: `margin` with the margin spread_l x the standard deviation of the best min(N, 2K)
 * live scores (the query's own scale around the boundary). Never fewer than max(K, floor). GRATING (EuroSys'26) prunes between layers this way.
 * A dropped candidate keeps its last early score and the layer it was dropped at.
 */
const { InputError } = require("./errors");

/** Indices sorted by descending score, ties by position (a stable sort, as numpy's argsort(kind="stable")). */
function descending(scores, idx = null) {
  const order = idx ? [...idx] : scores.map((_, i) => i);
  return order.sort((a, b) => (scores[b] - scores[a]) || (a - b));
}

/** The k-th best score. */
function kthBest(scores, k) {
  return [...scores].sort((a, b) => b - a)[k - 1];
}

function pruneMask(scores, k, margin, floor, clusterGap) {
  const n = scores.length;
  const atLeast = Math.min(n, Math.max(k, floor || 0));
  if (n <= atLeast || !scores.every(Number.isFinite)) return new Array(n).fill(true);
  const kth = kthBest(scores, k);
  // tiny slack so that a margin calibrated to exactly reach a score keeps it despite float rounding
  const threshold = kth - Math.max(margin, 0) - 1e-9 * Math.max(1, Math.abs(kth));
  const gap = Math.max(clusterGap, 0);
  const order = descending(scores);
  const keep = new Array(n).fill(false);
  let start = 0;
  for (let i = 1; i <= n; i++) {
    if (i === n || scores[order[i - 1]] - scores[order[i]] > gap) {
      if (scores[order[start]] >= threshold) for (let j = start; j < i; j++) keep[order[j]] = true;
      start = i;
    }
  }
  let short = atLeast - keep.filter(Boolean).length;
  if (short > 0) {
    const dropped = keep.map((x, i) => (x ? -1 : i)).filter((i) => i >= 0);
    for (const i of descending(scores, dropped).slice(0, short)) keep[i] = true;
  }
  return keep;
}

/** Standard deviation of the best min(n, 2k) scores (1 when they are all equal or not finite). */
function boundarySpread(scores, k) {
  const top = [...scores].sort((a, b) => b - a).slice(0, Math.min(scores.length, 2 * k));
  const mean = top.reduce((a, b) => a + b, 0) / top.length;
  const sd = Math.sqrt(top.reduce((a, b) => a + (b - mean) ** 2, 0) / top.length);
  return Number.isFinite(sd) && sd > 1e-12 ? sd : 1;
}

function pruneRankMask(scores, keepN, k, floor) {
  const n = scores.length;
  keepN = Math.min(n, Math.max(keepN, k, floor || 0));
  if (keepN >= n || !scores.every(Number.isFinite)) return new Array(n).fill(true);
  const cut = kthBest(scores, keepN);
  return scores.map((s) => s >= cut);
}

/** Refuse a schedule this bundle cannot use (the manifest parser checked its fields; this checks the fit). */
function checkSchedule(s, spec, where) {
  if (s.method === "cosine" && spec.scoring !== "bi_encoder") throw new InputError(`${where}: method 'cosine' needs a bi-encoder bundle, this one scores '${spec.scoring}'`);
  if (s.method === "head" && spec.scoring === "bi_encoder") throw new InputError(`${where}: use method 'cosine' (or 'probe') for a bi-encoder bundle`);
  if (s.sourceLayers) {
    const actual = s.layers.map((l) => spec.layers[l.layer].sourceIndex);
    if (actual.join() !== s.sourceLayers.join())
      throw new InputError(`${where}: schedule was calibrated for source layers [${s.sourceLayers}] but those positions now hold [${actual}]; recalibrate with \`edge-sel calibrate\``);
  }
  if (s.method === "probe") {
    const a = spec.arrays[s.probe];
    if (!a) throw new InputError(`${where}: schedule uses a probe array ${JSON.stringify(s.probe)} that the bundle does not list; recalibrate`);
    if (a.shape.length !== 2 || a.shape[0] !== spec.layers.length || a.shape[1] !== spec.dims.hidden + 1)
      throw new InputError(`${where}: probe array ${s.probe} has shape [${a.shape}], expected [${spec.layers.length}, ${spec.dims.hidden + 1}]`);
  }
}

class Pruner {
  constructor(schedule, scorer, nDocs, nLayers) {
    this.schedule = schedule;
    this.scorer = scorer;       // async (layer, pooledDocs [N][H] rows, queryPooled|null) -> number[]
    this.at = new Map(schedule.layers.map((l) => [l.layer, l]));
    this.k = schedule.topK;
    this.nDocs = nDocs;
    this.nLayers = nLayers;
    this.droppedAt = new Int32Array(nDocs).fill(-1);
    this.lastScore = new Float32Array(nDocs);
  }

  get prunesAnything() {
    return [...this.at.keys()].some((l) => l < this.nLayers - 1);
  }

  get nPruned() {
    return this.droppedAt.filter((x) => x >= 0).length;
  }

  /** Which items stay live after `layer` (null: all), given the live docs' items and pooled rows. */
  async decide(layer, items, pooled, queryPooled) {
    const entry = this.at.get(layer);
    if (!entry || layer >= this.nLayers - 1 || items.length <= this.k) return null;
    const est = await this.scorer(layer, pooled, queryPooled);
    const s = this.schedule;
    let keep;
    if (s.rule === "rank") keep = pruneRankMask(est, Math.ceil(entry.keep * this.nDocs - 1e-9), this.k, s.floor);
    else {
      const margin = s.rule === "spread" ? entry.margin * boundarySpread(est, this.k) : entry.margin;
      keep = pruneMask(est, this.k, margin, s.floor, s.clusterGap * margin);
    }
    if (keep.every(Boolean)) return null;
    keep.forEach((kept, j) => {
      if (!kept) {
        this.droppedAt[items[j]] = layer;
        this.lastScore[items[j]] = est[j];
      }
    });
    return keep;
  }
}

module.exports = { Pruner, pruneMask, pruneRankMask, boundarySpread, checkSchedule };
