"use strict";
/**
 * The embedding stage (docs/BUNDLE.md, "Running a rerank bundle", step 2): the rows a call uses are read from the
 * raw table at their offsets (one positioned read per run of consecutive distinct token ids), so the table never enters memory whole.
 * BERT-family bundles add position and token-type rows and a LayerNorm.
 */
const fs = require("node:fs");
const { BundleError } = require("./errors");
const { requireFloat32 } = require("./bundle");

class Embedder {
  constructor(bundle) {
    const spec = bundle.spec;
    this.bundle = bundle;
    requireFloat32(bundle, "embed", spec.embed);
    [this.rows, this.hidden] = spec.embed.shape;
    this.rowBytes = this.hidden * 4;
    this.rule = spec.embedding.rule;
    if (this.rule === "bert") {
      this.position = bundle.floatArray("position");
      this.tokenType = "token_type" in spec.arrays ? bundle.floatArray("token_type") : null;
      this.typeRows = this.tokenType ? spec.arrays.token_type.shape[0] : 0;
      this.lnW = bundle.floatArray("ln_weight");
      this.lnB = bundle.floatArray("ln_bias");
      this.eps = spec.embedding.layerNormEps;
      this.offset = spec.embedding.positionOffset;
    }
  }

  /** Upper bound of page-cache bytes a gather of `unique` rows touches (the planner's embedding term). */
  touchedBytes(unique) {
    const page = 4096;
    return unique * (Math.ceil(this.rowBytes / page) + 1) * page;
  }

  /** Read the rows of the distinct ids in `ids` (iterables of token ids) into one buffer: `{ index, data }`, row of
   * id `i` at `data[index.get(i) * H ...]`. Runs of consecutive ids are read with one positioned read each. */
  gatherRows(idLists) {
    const unique = new Set();
    for (const ids of idLists) for (const id of ids) unique.add(Number(id));
    const sorted = Int32Array.from(unique).sort();
    if (sorted.length && (sorted[0] < 0 || sorted[sorted.length - 1] >= this.rows))
      throw new BundleError(`token id out of range for the embedding table of ${this.rows} rows (tokenizer and bundle do not match)`);
    const index = new Map();
    const data = new Float32Array(sorted.length * this.hidden);
    const bytes = new Uint8Array(data.buffer);
    const fd = fs.openSync(this.bundle.path(this.bundle.spec.embed.file), "r");
    try {
      for (let i = 0; i < sorted.length;) {
        let j = i + 1;
        while (j < sorted.length && sorted[j] === sorted[j - 1] + 1) j++;
        const want = (j - i) * this.rowBytes;
        const n = fs.readSync(fd, bytes, i * this.rowBytes, want, sorted[i] * this.rowBytes);
        if (n !== want) throw new BundleError(`embedding table ${this.bundle.spec.embed.file}: short read at row ${sorted[i]}`);
        for (let k = i; k < j; k++) index.set(sorted[k], k);
        i = j;
      }
    } finally {
      fs.closeSync(fd);
    }
    return { index, data };
  }

  /** Hidden states [B, T, H] of a chunk (ids: B*T token ids, position of token t: `posOffset + t`; types: B*T or
   * null), written into `out` when given. */
  embed(rows, B, T, ids, posOffset, types, out = null) {
    const H = this.hidden;
    out = out || new Float32Array(B * T * H);
    const x = this.rule === "bert" ? new Float64Array(H) : null;  // one scratch row for the whole chunk
    for (let i = 0; i < B * T; i++) {
      const r = rows.index.get(ids[i]) * H;
      const o = i * H;
      if (this.rule !== "bert") {
        out.set(rows.data.subarray(r, r + H), o);
        continue;
      }
      const p = (posOffset + (i % T) + this.offset) * H;
      let t = -1;
      if (this.tokenType) t = types === null || this.typeRows === 1 ? 0 : types[i] * H;
      let mean = 0;
      for (let k = 0; k < H; k++) {
        x[k] = rows.data[r + k] + this.position[p + k] + (t >= 0 ? this.tokenType[t + k] : 0);
        mean += x[k];
      }
      mean /= H;
      let v = 0;
      for (let k = 0; k < H; k++) v += (x[k] - mean) ** 2;
      const inv = 1 / Math.sqrt(v / H + this.eps);
      for (let k = 0; k < H; k++) out[o + k] = (x[k] - mean) * inv * this.lnW[k] + this.lnB[k];
    }
    return out;
  }
}

module.exports = { Embedder };
