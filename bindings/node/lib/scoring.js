"use strict";
/**
 * Pooling, the head and the early scores (docs/BUNDLE.md, "Running a rerank bundle" steps 5-6 and "Early
 * ranking"): `cls` token 0, `last` the last real token, `mean` the mask-weighted mean; cross-encoders and yes/no
 * rerankers score with the head's output, bi-encoders with the dot product of the head's unit vectors. An
 * intermediate layer is scored with the probe (rms-normalised features, or unit(doc) * unit(query) for
 * bi-encoders), the head itself, or the cosine with the query pooled at that layer.
 */
const { ort } = require("./sessions");
const { maskOf } = require("./chunks");

/** Pooled rows (Float32Array of H each) of a chunk's hidden state. */
function pool(pooling, c, H) {
  const out = [];
  const mask = pooling === "mean" ? maskOf(c) : null;
  for (let r = 0; r < c.B; r++) {
    if (pooling === "mean") {
      const acc = new Float64Array(H);
      let m = 0;
      for (let t = 0; t < c.T; t++) {
        const w = mask[r * c.T + t];
        if (!w) continue;
        m += w;
        const o = (r * c.width + t) * H;
        for (let k = 0; k < H; k++) acc[k] += c.hidden[o + k] * w;
      }
      out.push(Float32Array.from(acc, (x) => x / Math.max(m, 1e-9)));
      continue;
    }
    const t = pooling === "last" && c.width > 1 ? c.lengths[r] - 1 : 0;
    const o = (r * c.width + t) * H;
    out.push(c.hidden.slice(o, o + H));
  }
  return out;
}

function stack(rows, H) {
  const a = new Float32Array(rows.length * H);
  rows.forEach((x, i) => a.set(x, i * H));
  return a;
}

function unit(x) {
  let n = 0;
  for (const v of x) n += v * v;
  n = Math.max(Math.sqrt(n), 1e-12);
  return Float32Array.from(x, (v) => v / n);
}

function dot(a, b) {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

function rmsFeatures(x) {
  let s = 0;
  for (const v of x) s += v * v;
  const rms = Math.max(Math.sqrt(s / x.length), 1e-12);
  return Float32Array.from(x, (v) => v / rms);
}

class Scoring {
  constructor(spec, head) {
    this.spec = spec;
    this.H = spec.dims.hidden;
    this.head = head;
    this.bi = spec.scoring === "bi_encoder";
  }

  /** The head's output for pooled rows: a score per row, or (bi-encoders) a unit vector per row. */
  async runHead(rows) {
    const feeds = { [this.head.inputNames[0]]: new ort.Tensor("float32", stack(rows, this.H), [rows.length, this.H]) };
    const out = (await this.head.run(feeds))[this.head.outputNames[0]];
    if (!this.bi) return Array.from(out.data);
    const D = out.dims[1];
    return rows.map((_, i) => out.data.slice(i * D, (i + 1) * D));
  }

  /** The early scorer of a schedule: async (layer, rows, queryRow) -> scores. */
  layerScorer(schedule, probe) {
    if (schedule.method === "probe") {
      const F = this.H;
      return async (layer, rows, q) => {
        const w = probe.subarray(layer * (F + 1), (layer + 1) * (F + 1));
        const uq = this.bi ? unit(q) : null;
        return rows.map((p) => {
          const f = this.bi ? unit(p).map((v, k) => v * uq[k]) : rmsFeatures(p);
          return Math.fround(dot(f, w) + w[F]);
        });
      };
    }
    if (schedule.method === "cosine") return async (layer, rows, q) => rows.map((p) => dot(unit(p), unit(q)));
    return async (layer, rows) => this.runHead(rows);
  }
}

module.exports = { Scoring, pool, dot };
