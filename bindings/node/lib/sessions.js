"use strict";
/**
 * onnxruntime sessions that keep weights file-backed (external data mapped, no prepacking, no CPU arena; the
 * Python reference's options), and the layer stream: layers run in order with a window of W >= 2 resident
 * sessions, the next ones loading while the current one computes; when W covers every layer the sessions stay
 * resident across calls.
 */
const ort = require("onnxruntime-node");
const { BundleError } = require("./errors");

function sessionOptions(threads, memPattern) {
  return {
    executionProviders: ["cpu"], graphOptimizationLevel: "all", enableCpuMemArena: false, enableMemPattern: memPattern,
    intraOpNumThreads: threads || 0, interOpNumThreads: 1, logSeverityLevel: 3,
    extra: { session: { disable_prepacking: "1", intra_op: { allow_spinning: "0" } } },
  };
}

async function loadSession(file, threads = 0, memPattern = true) {
  try {
    return await ort.InferenceSession.create(file, sessionOptions(threads, memPattern));
  } catch (e) {
    throw new BundleError(`cannot load graph ${file}: ${e.message}`);
  }
}

class LayerStream {
  /** `load(i)` returns layer i's session(s); `release(s)` frees them. */
  constructor(n, load, release) {
    Object.assign(this, { n, load, release });
    this.resident = new Map();
    this.loads = 0;
    this.setWindow(n);
  }

  setWindow(w) {
    this.window = this.n > 1 ? Math.max(2, Math.min(w, this.n)) : 1;
    this.keepAll = this.window >= this.n;
    if (!this.keepAll) this.clear();
  }

  clear() {
    for (const s of this.resident.values()) this.release(s);
    this.resident.clear();
  }

  /** When every layer stays resident, load the ones not loaded yet now, one after the other, before a call allocates
   * its states: sessions live for the process, and loaded in the middle of a call their allocations would sit between
   * its short-lived ones in the C heap and keep it from being reused. */
  async preload() {
    if (!this.keepAll) return;
    for (let i = 0; i < this.n; i++) {
      if (this.resident.has(i)) continue;
      this.loads++;
      this.resident.set(i, await this.load(i));
    }
  }

  /** Yields [i, session] for every layer; at most `window` loaded at once. */
  async *run() {
    const pending = new Map();
    const want = (i) => {
      if (i < this.n && !this.resident.has(i) && !pending.has(i)) {
        this.loads++;
        const p = this.load(i);
        p.catch(() => {}); // awaited below; a prefetch nobody reaches must not be an unhandled rejection
        pending.set(i, p);
      }
    };
    try {
      for (let i = 0; i < Math.min(this.window, this.n); i++) want(i);
      for (let i = 0; i < this.n; i++) {
        let s = this.resident.get(i);
        if (!s) {
          s = await pending.get(i);
          pending.delete(i);
          if (this.keepAll) this.resident.set(i, s);
        }
        want(i + this.window - 1);
        yield [i, s];
        if (!this.keepAll) await this.release(s);
      }
    } finally {
      for (const p of pending.values()) p.then((s) => this.release(s), () => {});
    }
  }
}

module.exports = { loadSession, LayerStream, ort };
