"use strict";
/**
 * Reusable float buffers of one call: inputs rebuilt for every chunk (a split decoder layer's keys and values, the
 * shared prefix's followed by the chunk's own) are written into one buffer per name instead of a fresh one per chunk,
 * so they leave no garbage behind between layer runs.
 */
class Scratch {
  constructor() {
    this.buffers = new Map();
  }

  /** A Float32Array view of `n` elements of buffer `name` (grown when too small; contents undefined). */
  take(name, n) {
    let b = this.buffers.get(name);
    if (!b || b.length < n) {
      b = new Float32Array(n);
      this.buffers.set(name, b);
    }
    return b.subarray(0, n);
  }

  clear() {
    this.buffers.clear();
  }
}

module.exports = { Scratch };
