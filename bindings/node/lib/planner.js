"use strict";
/**
 * Memory planning with the Python reference's formulas (runtime/planning/rerank.py): a budget becomes a window of
 * resident layers and a chunk size, or a BudgetError naming the minimum, before any work. The budget covers the
 * model's share of the process: fixed costs, per-candidate and per-chunk bookkeeping, then the largest of three
 * successive stages — tokenizing, embedding (kept hidden states, token ids, the table rows read) and the layers
 * (kept hidden states, the window of layer files, one chunk's activations). This binding keeps hidden states and
 * token ids in memory (it does not spill them to files), so its minimum is the reference's minimum without spilling.
 */
const { BudgetError } = require("./errors");
const { formatSize, formatMinSize } = require("./units");
const { SPLIT_PADDING_TOKENS } = require("./chunks");

const SESSION_OVERHEAD = 3 * 1024 ** 2;
const FIXED_OVERHEAD = 14 * 1024 ** 2;
const DEFAULT_CHUNK_TOKENS = 1024;
const DEFAULT_MAX_BATCH = 64;
const ITEM_BYTES = 112;
const CHUNK_BYTES = 512;
const TOKENIZE_BATCH_BYTES = 6 * 1024 ** 2;
const BYTES_PER_TOKEN = 4;
const BYTES_PER_TYPE = 1;
const STEPS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024];

/** How many chunks a chunk size makes of candidates of these lengths (the packing of chunks.js). */
function chunkCounter(lengths, maxBatch = DEFAULT_MAX_BATCH) {
  const s = [...lengths].sort((a, b) => a - b);
  const memo = new Map();
  return (chunkTokens) => {
    if (!memo.has(chunkTokens)) {
      let start = 0, k = s.length ? 1 : 0;
      for (let pos = 1; pos < s.length; pos++) {
        const rows = pos - start;
        if ((rows + 1) * s[pos] > chunkTokens || rows + 1 > maxBatch || rows * (s[pos] - s[pos - 1]) > SPLIT_PADDING_TOKENS) {
          start = pos;
          k += 1;
        }
      }
      memo.set(chunkTokens, k);
    }
    return memo.get(chunkTokens);
  };
}

class Planner {
  constructor(bundle) {
    const s = bundle.spec;
    this.H = s.dims.hidden;
    this.I = s.dims.intermediate;
    this.heads = s.dims.heads;
    this.kv = s.dims.kvHeads * s.dims.headDim;
    this.nLayers = s.layers.length;
    const layerFiles = (i) => bundle.fileSize(s.layers[i].file) + bundle.fileSize(s.layers[i].weights);
    const qkvFiles = (i) => (s.layers[i].qkv ? bundle.fileSize(s.extraGraphs[s.layers[i].qkv].file) + bundle.fileSize(s.extraGraphs[s.layers[i].qkv].weights) : 0);
    this.layerBytes = Math.max(...s.layers.map((_, i) => layerFiles(i))) + SESSION_OVERHEAD + Math.max(...s.layers.map((_, i) => qkvFiles(i)));
    this.fixed = FIXED_OVERHEAD + 6 * bundle.fileSize(s.tokenizer.file) + bundle.fileSize(s.head.file) + SESSION_OVERHEAD;
    this.itemExtra = s.scoring === "bi_encoder" ? 4 * this.H : 0;  // a bi-encoder keeps every candidate's embedding
    this.withTypes = s.scoring === "cross_encoder";
  }

  actBytesPerToken(seqLen) {
    return 4 * (4 * this.H + 2 * this.kv + 3 * this.I + 2 * this.heads * seqLen);
  }

  hiddenBytes(totalTokens, maxLen) {
    return Math.trunc(4 * this.H * (totalTokens * 1.1 + 2 * maxLen));
  }

  /** Bytes of the call's token ids (kept in memory by this binding). */
  tokenBytes(totalTokens) {
    return totalTokens * (BYTES_PER_TOKEN + (this.withTypes ? BYTES_PER_TYPE : 0));
  }

  bookkeeping(c, chunk) {
    return c.nItems * (ITEM_BYTES + this.itemExtra) + 2 * c.count(chunk) * CHUNK_BYTES;
  }

  /** Peak share of a call with `chunk`-token chunks, `window` resident layers and `kept` bytes of hidden states. */
  need(chunk, window, kept, c) {
    const tokenize = c.tokenRam + TOKENIZE_BATCH_BYTES;
    const embedding = kept + c.tokenRam + c.embedBytes;
    const layers = kept + window * this.layerBytes + this.actBytesPerToken(c.maxLen) * chunk;
    return Math.trunc(this.fixed + this.bookkeeping(c, chunk) + Math.max(tokenize, embedding, layers));
  }

  chunkSizes(maxLen) {
    const top = Math.max(DEFAULT_CHUNK_TOKENS, maxLen);
    const set = new Set([top, ...STEPS.map((k) => k * maxLen).filter((x) => x < top)]);
    return [...set].sort((a, b) => b - a);
  }

  /** [budget, chunk] of the cheapest chunk size with a window of two layers. */
  smallestNeed(hidden, c) {
    let best = null;
    for (const ch of this.chunkSizes(c.maxLen)) {
      const n = this.need(ch, 2, hidden, c);
      if (best === null || n < best[0] || (n === best[0] && ch < best[1])) best = [n, ch];
    }
    return best;
  }

  /** The call's size: `lengths` of its items, the distinct rows it reads. */
  callSize(lengths, embedBytes) {
    const total = lengths.reduce((a, b) => a + b, 0);
    return { total, maxLen: Math.max(...lengths), embedBytes, nItems: lengths.length, tokenRam: this.tokenBytes(total), count: chunkCounter(lengths) };
  }

  minimum(c) {
    return this.smallestNeed(this.hiddenBytes(c.total, c.maxLen), c)[0];
  }

  /** Smallest budget that could run a single short candidate with its hidden states in memory (the reference's
   * `static_minimum` without spilling: this binding does not spill, so a budget below it could run nothing). */
  staticMinimum() {
    const c = { total: 64, maxLen: 64, embedBytes: 0, nItems: 1, tokenRam: 0, count: (chunk) => Math.floor(1 / Math.max(1, Math.min(DEFAULT_MAX_BATCH, Math.floor(chunk / 64)))) + 1 };
    return this.minimum(c);
  }

  plan(budget, c) {
    if (budget === null) return { budget: null, window: this.nLayers, chunkTokens: Math.max(DEFAULT_CHUNK_TOKENS, c.maxLen), maxBatch: DEFAULT_MAX_BATCH };
    const hidden = this.hiddenBytes(c.total, c.maxLen);
    const need = this.minimum(c);
    if (budget < need)
      throw new BudgetError(`memory budget ${formatSize(budget)} is below the minimum for this input: ${formatMinSize(need)} `
        + `(2 layers x ${formatSize(this.layerBytes)} + kept hidden states for ${c.total} tokens + bookkeeping for ${this.itemExtra ? `${c.nItems - 1} documents and the query` : `${c.nItems} candidates`} `
        + `+ one ${c.maxLen}-token candidate's activations + fixed costs). Use memoryBudget ${Math.ceil(need / 1024 ** 2)}MiB or more, or rank fewer or shorter documents `
        + `(this package keeps hidden states in memory; the Python runtime can spill them to files under a smaller budget).`, need);
    const free = budget - this.fixed - hidden - this.bookkeeping(c, Math.max(c.maxLen, DEFAULT_CHUNK_TOKENS));
    const perTok = this.actBytesPerToken(c.maxLen);
    let window = Math.trunc(Math.min(this.nLayers, Math.max(2, Math.floor((free - perTok * c.maxLen) / this.layerBytes))));
    if (window < this.nLayers) window = free - 2 * this.layerBytes < perTok * Math.min(c.total, DEFAULT_CHUNK_TOKENS) ? 2 : window;
    let chunk = Math.trunc(Math.max(c.maxLen, Math.min(DEFAULT_CHUNK_TOKENS, Math.floor((free - window * this.layerBytes) / perTok))));
    [window, chunk] = this.fit(budget, window, chunk, hidden, c);
    return { budget, window, chunkTokens: chunk, maxBatch: DEFAULT_MAX_BATCH };
  }

  fit(budget, window, chunk, hidden, c) {
    if (this.need(chunk, window, hidden, c) <= budget) return [window, chunk];
    for (const ch of this.chunkSizes(c.maxLen)) if (ch <= chunk && this.need(ch, 2, hidden, c) <= budget) return [2, ch];
    return [2, this.smallestNeed(hidden, c)[1]];
  }
}

module.exports = { Planner, chunkCounter };
