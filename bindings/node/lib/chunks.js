"use strict";
/**
 * Candidates sorted by length (stable) and cut into chunks of at most `chunkTokens` padded tokens and `maxBatch`
 * rows, each padded to its longest row; after pruning the survivors are re-packed the same way (`compact`), so
 * dropped candidates cost nothing in later layers. The packing is the Python reference's (runtime/rerank/chunks.py).
 */

class Packing {
  constructor(padId, posOffset, chunkTokens, maxBatch) {
    Object.assign(this, { padId, posOffset, chunkTokens, maxBatch });
  }
  full(rows, width) {
    return rows * width > this.chunkTokens || rows > this.maxBatch;
  }
}

/** A chunk: item indices, lengths, ids/positions (BigInt64Array B*T), mask (Float32Array B*T), types or null,
 * and its hidden state (Float32Array B*T'*H with `width` T' = T, or 1 after a one-token final layer). */
function newChunk(items, lengths, packing, hasTypes) {
  const B = items.length, T = Math.max(...lengths);
  const c = { items, lengths, B, T, ids: new BigInt64Array(B * T).fill(BigInt(packing.padId)), mask: new Float32Array(B * T),
    positions: new BigInt64Array(B * T), types: hasTypes ? new BigInt64Array(B * T) : null, hidden: null, width: T };
  for (let r = 0; r < B; r++) for (let t = 0; t < T; t++) c.positions[r * T + t] = BigInt(packing.posOffset + t);
  return c;
}

function groupByLength(entries, packing) {
  entries.sort((a, b) => a.length - b.length); // stable
  const groups = [];
  let cur = [];
  for (const e of entries) {
    if (cur.length && packing.full(cur.length + 1, e.length)) {
      groups.push(cur);
      cur = [];
    }
    cur.push(e);
  }
  if (cur.length) groups.push(cur);
  return groups;
}

/** Chunks of the items (`ids[i]`: token ids of item i; `types[i]` or null). */
function makeChunks(ids, types, packing) {
  const entries = ids.map((x, i) => ({ item: i, length: x.length }));
  return groupByLength(entries, packing).map((g) => {
    const c = newChunk(g.map((e) => e.item), g.map((e) => e.length), packing, types !== null);
    g.forEach((e, r) => {
      const src = ids[e.item];
      for (let t = 0; t < e.length; t++) {
        c.ids[r * c.T + t] = BigInt(src[t]);
        c.mask[r * c.T + t] = 1;
        if (c.types) c.types[r * c.T + t] = BigInt(types[e.item][t]);
      }
    });
    return c;
  });
}

/** Give every chunk its hidden states [B, T, H] as a view of one buffer for the whole call: the states live as long
 * as the call, so one allocation made before the layers run keeps them out of the C heap regions that each layer
 * run's short-lived activations reuse (many separate buffers there would fragment it). Returns the buffer. */
function allocateHidden(chunks, H) {
  const slab = new Float32Array(chunks.reduce((a, c) => a + c.B * c.T * H, 0));
  let o = 0;
  for (const c of chunks) {
    c.hidden = slab.subarray(o, o + c.B * c.T * H);
    c.width = c.T;
    o += c.B * c.T * H;
  }
  return slab;
}

/** Rebuild the chunks from the rows whose item `keep[item]` is true, with their hidden states. */
function compact(chunks, keep, packing, H) {
  const entries = [];
  chunks.forEach((c, ci) => c.items.forEach((it, r) => { if (keep[it]) entries.push({ item: it, length: c.lengths[r], ci, r }); }));
  const groups = groupByLength(entries, packing);
  const packed = groups.map((g) => newChunk(g.map((e) => e.item), g.map((e) => e.length), packing, chunks[g[0].ci].types !== null));
  allocateHidden(packed, H);
  return groups.map((g, gi) => {
    const c = packed[gi];
    g.forEach((e, r) => {
      const s = chunks[e.ci];
      for (let t = 0; t < e.length; t++) {
        c.ids[r * c.T + t] = s.ids[e.r * s.T + t];
        c.mask[r * c.T + t] = 1;
        c.positions[r * c.T + t] = s.positions[e.r * s.T + t];
        if (c.types) c.types[r * c.T + t] = s.types[e.r * s.T + t];
      }
      c.hidden.set(s.hidden.subarray(e.r * s.width * H, (e.r * s.width + e.length) * H), r * c.T * H);
    });
    return c;
  });
}

module.exports = { Packing, makeChunks, compact, allocateHidden };
