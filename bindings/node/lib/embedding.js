"use strict";
/**
 * The embedding stage (docs/BUNDLE.md, "Running a rerank bundle", step 2): the rows a call uses are read from the
 * raw table at their offsets (one positioned read per distinct token id), so the table never enters memory whole.
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

  /** Read the rows of the distinct ids in `ids` (iterables of token ids): a Map id -> Float32Array row. */
  gatherRows(idLists) {
    const unique = new Set();
    for (const ids of idLists) for (const id of ids) unique.add(Number(id));
    const sorted = [...unique].sort((a, b) => a - b);
    if (sorted.length && (sorted[0] < 0 || sorted[sorted.length - 1] >= this.rows))
      throw new BundleError(`token id out of range for the embedding table of ${this.rows} rows (tokenizer and bundle do not match)`);
    const rows = new Map();
    const fd = fs.openSync(this.bundle.path(this.bundle.spec.embed.file), "r");
    try {
      for (const id of sorted) {
        const buf = Buffer.allocUnsafe(this.rowBytes);
        const n = fs.readSync(fd, buf, 0, this.rowBytes, id * this.rowBytes);
        if (n !== this.rowBytes) throw new BundleError(`embedding table ${this.bundle.spec.embed.file}: short read at row ${id}`);
        rows.set(id, new Float32Array(buf.buffer, buf.byteOffset, this.hidden));
      }
    } finally {
      fs.closeSync(fd);
    }
    return rows;
  }

  /** Hidden states [B, T, H] of a chunk (ids, positions: BigInt64Array B*T; types: BigInt64Array or null). */
  embed(rows, B, T, ids, positions, types) {
    const H = this.hidden;
    const out = new Float32Array(B * T * H);
    for (let i = 0; i < B * T; i++) {
      const row = rows.get(Number(ids[i]));
      const o = i * H;
      if (this.rule !== "bert") {
        out.set(row, o);
        continue;
      }
      const p = (Number(positions[i]) + this.offset) * H;
      let t = -1;
      if (this.tokenType) t = types === null || this.typeRows === 1 ? 0 : Number(types[i]) * H;
      let mean = 0;
      const x = new Float64Array(H);
      for (let k = 0; k < H; k++) {
        x[k] = row[k] + this.position[p + k] + (t >= 0 ? this.tokenType[t + k] : 0);
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
