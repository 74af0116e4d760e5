"use strict";
/**
 * Candidates sorted by length (stable) and cut into chunks of at most `chunkTokens` padded tokens and `maxBatch`
 * rows, each padded to its longest row, and ended where the next row would pad the rows already in it by more than
 * `SPLIT_PADDING_TOKENS` in all; after pruning the survivors are re-packed the same way (`compact`), so
 * dropped candidates cost nothing in later layers. The packing is the Python reference's (runtime/rerank/chunks.py).
 *
 * A chunk keeps its token ids compactly (4 bytes a padded token, 1 more for token types), as the planner counts
 * them; the attention mask and position ids a layer run needs are made for that run (`maskOf`, `positionsOf`): a
 * row's positions are `posOffset + t` and its mask is 1 over its length.
 */

// A new chunk rather than padding the open one's rows by more tokens than this in all (the reference's
// SPLIT_PADDING_TOKENS, runtime/planning/rerank.py).
const SPLIT_PADDING_TOKENS = 8;

class Packing {
  constructor(padId, posOffset, chunkTokens, maxBatch) {
    Object.assign(this, { padId, posOffset, chunkTokens, maxBatch });
  }
  full(rows, width) {
    return rows * width > this.chunkTokens || rows > this.maxBatch;
  }
}

/** A chunk: item indices, lengths, token ids (Int32Array B*T, padded), types (Uint8Array B*T) or null, its
 * positions' offset, and its hidden state (Float32Array B*T'*H with `width` T' = T, or 1 after a one-token final
 * layer). */
function newChunk(items, lengths, packing, hasTypes) {
  const B = items.length, T = Math.max(...lengths);
  return { items, lengths, B, T, ids: new Int32Array(B * T).fill(packing.padId), types: hasTypes ? new Uint8Array(B * T) : null,
    posOffset: packing.posOffset, hidden: null, width: T };
}

/** Attention mask [B, T] of a chunk: 1 over each row's tokens, 0 over its padding. */
function maskOf(c) {
  const m = new Float32Array(c.B * c.T);
  for (let r = 0; r < c.B; r++) m.fill(1, r * c.T, r * c.T + c.lengths[r]);
  return m;
}

/** Position ids [B, T] of a chunk (int64). */
function positionsOf(c) {
  const p = new BigInt64Array(c.B * c.T);
  for (let i = 0; i < p.length; i++) p[i] = BigInt(c.posOffset + (i % c.T));
  return p;
}

function groupByLength(entries, packing) {
  entries.sort((a, b) => a.length - b.length); // stable
  const groups = [];
  let cur = [];
  for (const e of entries) {
    if (cur.length && (packing.full(cur.length + 1, e.length)
        || cur.length * (e.length - cur[cur.length - 1].length) > SPLIT_PADDING_TOKENS)) {
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
      c.ids.set(ids[e.item], r * c.T);
      if (c.types) c.types.set(types[e.item], r * c.T);
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
      c.ids.set(s.ids.subarray(e.r * s.T, e.r * s.T + e.length), r * c.T);
      if (c.types) c.types.set(s.types.subarray(e.r * s.T, e.r * s.T + e.length), r * c.T);
      c.hidden.set(s.hidden.subarray(e.r * s.width * H, (e.r * s.width + e.length) * H), r * c.T * H);
    });
    return c;
  });
}

module.exports = { Packing, makeChunks, compact, allocateHidden, maskOf, positionsOf, SPLIT_PADDING_TOKENS };
