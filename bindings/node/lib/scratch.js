"use strict";
/**
 * Reusable float buffers of one call. Layer outputs are written by onnxruntime into a preallocated buffer from here
 * and copied over the chunk's own hidden states, so a layer never holds a second copy of every chunk's states:
 * replaced outputs would otherwise stay in the process as garbage until V8 collects them, and the C heap they leave
 * behind fragmented is not returned to the system.
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
