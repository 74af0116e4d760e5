"use strict";
/**
 * Memory planning, the same formulas as the Python reference (runtime/planning/rerank.py): a budget becomes a
 * window of resident layers and a chunk size, or a BudgetError naming the minimum, before any work. The budget covers
 * the model's share of the process: resident layer files, the embedding rows a call reads, hidden states kept for
 * every candidate between layers, one chunk's activations, fixed costs. This binding keeps hidden states in memory
 * (it does not spill them to files), so its minimum is the reference's minimum without spilling.
 */
const { BudgetError } = require("./errors");
const { formatSize } = require("./units");

const SESSION_OVERHEAD = 3 * 1024 ** 2;
const FIXED_OVERHEAD = 14 * 1024 ** 2;
const DEFAULT_CHUNK_TOKENS = 1024;
const DEFAULT_MAX_BATCH = 64;

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
  }

  actBytesPerToken(seqLen) {
    return 4 * (4 * this.H + 2 * this.kv + 3 * this.I + 2 * this.heads * seqLen);
  }

  hiddenBytes(totalTokens, maxLen) {
    return Math.trunc(4 * this.H * (totalTokens * 1.1 + 2 * maxLen));
  }

  minimum(totalTokens, maxLen, embedBytes = 0) {
    return Math.trunc(this.fixed + this.hiddenBytes(totalTokens, maxLen)
      + Math.max(embedBytes, 2 * this.layerBytes + this.actBytesPerToken(maxLen) * maxLen));
  }

  staticMinimum() {
    return this.minimum(64, 64);
  }

  plan(budget, totalTokens, maxLen, embedBytes) {
    if (budget === null) return { budget: null, window: this.nLayers, chunkTokens: Math.max(DEFAULT_CHUNK_TOKENS, maxLen), maxBatch: DEFAULT_MAX_BATCH };
    const need = this.minimum(totalTokens, maxLen, embedBytes);
    if (budget < need)
      throw new BudgetError(`memory budget ${formatSize(budget)} is below the minimum for this input: ${formatSize(need)} `
        + `(2 layers x ${formatSize(this.layerBytes)} + kept hidden states for ${totalTokens} tokens + one ${maxLen}-token `
        + `candidate's activations + fixed costs). Use memoryBudget ${Math.ceil(need / 1024 ** 2)}MiB or more, or rank shorter documents.`, need);
    const free = budget - this.fixed - this.hiddenBytes(totalTokens, maxLen);
    const perTok = this.actBytesPerToken(maxLen);
    const actMin = perTok * maxLen;
    let window = Math.trunc(Math.min(this.nLayers, Math.max(2, Math.floor((free - actMin) / this.layerBytes))));
    if (window < this.nLayers)
      window = free - 2 * this.layerBytes < perTok * Math.min(totalTokens, DEFAULT_CHUNK_TOKENS) ? 2 : window;
    const actRoom = free - window * this.layerBytes;
    const chunkTokens = Math.trunc(Math.max(maxLen, Math.min(DEFAULT_CHUNK_TOKENS, Math.floor(actRoom / perTok))));
    return { budget, window, chunkTokens, maxBatch: DEFAULT_MAX_BATCH };
  }
}

module.exports = { Planner };
