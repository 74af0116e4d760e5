"use strict";
/**
 * Token ids for a query and documents (docs/BUNDLE.md, "Running a rerank bundle", step 1) with the Hugging Face
 * `tokenizers` binding reading the bundle's tokenizer.json: the same Rust tokenizer as the Python runtime's.
 *
 * cross_encoder: the pair (query, document) with special tokens, truncated `only_second` at max_length, with type ids.
 * bi_encoder: the query and each document alone with special tokens, truncated at max_length.
 * yes_no: prefix (instruction + query), document, suffix tokenized apart without special tokens, concatenated; the
 * document is cut to fit max_length; the prefix is shared by every document.
 */
const { Tokenizer } = require("tokenizers");
const { InputError } = require("./errors");

class TextEncoder {
  constructor(bundle) {
    this.spec = bundle.spec;
    this.tok = Tokenizer.fromFile(bundle.path(bundle.spec.tokenizer.file));
    this.tok.disablePadding();
    this.tok.disableTruncation();
  }

  async encode(query, documents, instruction = null) {
    if (typeof query !== "string" || !query.trim()) throw new InputError("query is empty");
    const s = this.spec.scoring;
    if (s === "cross_encoder") return this.pairs(query, documents);
    if (s === "bi_encoder") return this.single(query, documents);
    return this.prompt(query, documents, instruction);
  }

  async pairs(query, documents) {
    this.tok.setTruncation(this.spec.maxLength, { strategy: "OnlySecond" });
    let encs;
    try {
      encs = await Promise.all(documents.map((d) => this.tok.encode(query, d)));
    } catch (e) {
      throw new InputError(`query is too long to pair with documents within ${this.spec.maxLength} tokens (${e.message})`);
    } finally {
      this.tok.disableTruncation();
    }
    return { docIds: encs.map((e) => e.getIds()), docTypes: encs.map((e) => e.getTypeIds()), queryIds: null, prefixLen: 0,
      nTruncated: encs.filter((e) => e.getOverflowing().length > 0).length };
  }

  async single(query, documents) {
    this.tok.setTruncation(this.spec.maxLength);
    let encs;
    try {
      encs = await this.tok.encodeBatch([query, ...documents]);
    } finally {
      this.tok.disableTruncation();
    }
    return { docIds: encs.slice(1).map((e) => e.getIds()), docTypes: null, queryIds: encs[0].getIds(), prefixLen: 0,
      nTruncated: encs.slice(1).filter((e) => e.getOverflowing().length > 0).length };
  }

  async ids(texts) {
    const encs = await this.tok.encodeBatch(texts, { addSpecialTokens: false });
    return encs.map((e) => e.getIds());
  }

  async prompt(query, documents, instruction) {
    const p = this.spec.prompt;
    const fill = { instruction: instruction || p.instruction, query };  // one pass, as Python's str.format
    const prefix = p.prefix.replace(/\{(instruction|query)\}/g, (_, k) => fill[k]);
    const [head, tail] = await this.ids([prefix, p.suffix]);
    const room = this.spec.maxLength - head.length - tail.length;
    if (room < 1) throw new InputError(`query prompt takes ${head.length + tail.length} tokens, leaving no room for a document within max length ${this.spec.maxLength}`);
    const bodies = await this.ids(documents);
    return { docIds: bodies.map((b) => [...head, ...b.slice(0, room), ...tail]), docTypes: null, queryIds: null, prefixLen: head.length,
      nTruncated: bodies.filter((b) => b.length > room).length };
  }
}

module.exports = { TextEncoder };
