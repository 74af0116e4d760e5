"use strict";
/**
 * The manifest, parsed and validated once (docs/BUNDLE.md, "Manifest fields"): every field this binding reads is
 * checked for type, range and allowed values, and a bad one is refused naming it, as the Python reference does
 * (`…/manifest.json: layers[3].weights: expected a string or null, got 7`). Keys it does not read are ignored.
 */
const { BundleError } = require("./errors");

const FORMAT = "edge-sel-bundle";
const FORMAT_VERSION = 1;
const TASK_SCORINGS = { rerank: ["yes_no", "cross_encoder", "bi_encoder"], generate: ["lm"] };
const DTYPES = { float32: 4, float16: 2, float64: 8, int8: 1, uint8: 1, int16: 2, uint16: 2, int32: 4, uint32: 4, int64: 8, uint64: 8 };
const POOLINGS = ["cls", "mean", "last"];
const EMBEDDING_RULES = ["gather", "bert"];
const SCHEDULE_METHODS = ["probe", "head", "cosine"];
const SCHEDULE_RULES = ["margin", "rank", "spread"];
const EMPTY_POS = 2 ** 40;
const SHA256 = /^[0-9a-f]{64}$/;

function show(v) {
  if (v === undefined) return "nothing";
  const s = JSON.stringify(v);
  return s.length > 60 ? s.slice(0, 60) + "…" : s;
}

class Reader {
  constructor(where) {
    this.where = where;
  }
  fail(path, msg) {
    throw new BundleError(`${this.where}: ${path}: ${msg}`);
  }
  obj(v, path) {
    if (v === null || typeof v !== "object" || Array.isArray(v)) this.fail(path, `expected an object, got ${show(v)}`);
    return v;
  }
  str(v, path, { optional = false, choices = null, nonempty = true } = {}) {
    if ((v === null || v === undefined) && optional) return null;
    if (typeof v !== "string") this.fail(path, `expected a string${optional ? " or null" : ""}, got ${show(v)}`);
    if (nonempty && !v) this.fail(path, "expected a non-empty string, got ''");
    if (choices && !choices.includes(v)) this.fail(path, `${show(v)} is not one of ${choices.join(", ")}`);
    return v;
  }
  int(v, path, { lo = null, hi = null, optional = false } = {}) {
    if ((v === null || v === undefined) && optional) return null;
    if (typeof v !== "number" || !Number.isInteger(v)) this.fail(path, `expected an integer${optional ? " or null" : ""}, got ${show(v)}`);
    if ((lo !== null && v < lo) || (hi !== null && v > hi)) this.fail(path, `expected an integer ${hi === null ? `>= ${lo}` : `in [${lo}, ${hi}]`}, got ${v}`);
    return v;
  }
  num(v, path, { positive = false, optional = false } = {}) {
    if ((v === null || v === undefined) && optional) return null;
    if (typeof v !== "number" || !Number.isFinite(v)) this.fail(path, `expected a finite number${optional ? " or null" : ""}, got ${show(v)}`);
    if (positive && v <= 0) this.fail(path, `expected a positive number, got ${v}`);
    return v;
  }
  bool(v, path) {
    if (typeof v !== "boolean") this.fail(path, `expected true or false, got ${show(v)}`);
    return v;
  }
  list(v, path, item, { nonempty = false } = {}) {
    if (!Array.isArray(v) || (nonempty && v.length === 0)) this.fail(path, `expected a${nonempty ? " non-empty" : ""} list, got ${show(v)}`);
    return v.map((x, i) => item(x, `${path}[${i}]`));
  }
  /** A file path inside the bundle: relative, POSIX, no `..`, no `~`, no backslash. */
  path(v, path, { optional = false } = {}) {
    if ((v === null || v === undefined) && optional) return null;
    const rel = this.str(v, path, { optional });
    if (rel.startsWith("/") || rel.split("/").includes("..") || rel.includes("\\") || rel.startsWith("~") || rel.includes("\0"))
      this.fail(path, `path ${show(rel)} escapes the bundle directory (refused)`);
    return rel;
  }
}

function readArray(r, v, p) {
  r.obj(v, p);
  const a = { file: r.path(v.file, `${p}.file`), dtype: r.str(v.dtype, `${p}.dtype`, { choices: Object.keys(DTYPES) }),
    shape: r.list(v.shape, `${p}.shape`, (x, q) => r.int(x, q, { lo: 0 }), { nonempty: true }) };
  a.nbytes = a.shape.reduce((x, y) => x * y, 1) * DTYPES[a.dtype];
  return a;
}

function readGraphIO(r, v, p) {
  r.obj(v, p);
  const names = (x, q) => r.list(x, q, (s, qq) => r.str(s, qq), { nonempty: true });
  return { inputs: names(v.inputs, `${p}.inputs`), outputs: names(v.outputs, `${p}.outputs`) };
}

function readSchedule(r, d, p, nLayers) {
  r.obj(d, p);
  const rule = r.str(d.rule ?? "margin", `${p}.rule`);
  if (!SCHEDULE_RULES.includes(rule))
    r.fail(`${p}.rule`, `pruning rule ${show(rule)} is not known to this runtime (known: ${SCHEDULE_RULES.join(", ")}); upgrade the binding or recalibrate with a known rule`);
  const method = r.str(d.method ?? "head", `${p}.method`);
  if (!SCHEDULE_METHODS.includes(method))
    r.fail(`${p}.method`, `early-ranking method ${show(method)} is not known to this runtime (known: ${SCHEDULE_METHODS.join(", ")})`);
  const layers = r.list(d.layers, `${p}.layers`, (x, q) => {
    r.obj(x, q);
    const layer = r.int(x.layer, `${q}.layer`, { lo: 0 });
    if (rule === "rank") {
      const keep = r.num(x.keep, `${q}.keep`, { positive: true });
      if (keep > 1) r.fail(`${q}.keep`, `expected a fraction in (0, 1], got ${keep}`);
      return { layer, keep, margin: 0 };
    }
    const key = rule === "spread" ? "spread" : "margin";  // spread: the margin in units of the scores' spread
    const margin = r.num(x[key], `${q}.${key}`);
    if (margin < 0) r.fail(`${q}.${key}`, `expected a number >= 0, got ${margin}`);
    return { layer, margin, keep: null };
  });
  for (let i = 0; i < layers.length; i++) {
    if (layers[i].layer >= nLayers) r.fail(`${p}.layers[${i}].layer`, `layer ${layers[i].layer}, but the bundle has layers 0..${nLayers - 1}; recalibrate`);
    if (i > 0 && layers[i].layer <= layers[i - 1].layer) r.fail(`${p}.layers`, "schedule layers must be strictly increasing");
  }
  const src = d.source_layers;
  return {
    method, rule, layers,
    topK: r.int(d.top_k, `${p}.top_k`, { lo: 1 }),
    floor: r.int(d.floor, `${p}.floor`, { lo: 0, optional: true }),
    clusterGap: r.num(d.cluster_gap ?? 0, `${p}.cluster_gap`),
    probe: r.str(d.probe, `${p}.probe`, { optional: true }),
    sourceLayers: src === null || src === undefined ? null : r.list(src, `${p}.source_layers`, (x, q) => r.int(x, q, { lo: 0 })),
  };
}

/** Validate the parsed JSON `d` of `where` (a manifest path, for messages); returns the typed manifest. */
function parseManifest(d, where) {
  const r = new Reader(where);
  if (d === null || typeof d !== "object" || Array.isArray(d)) r.fail("(top level)", `expected an object, got ${show(d)}`);
  if (d.format !== FORMAT) r.fail("format", `not an edge_sel manifest (format=${show(d.format)}, expected "${FORMAT}")`);
  const version = d.format_version;
  // Version 2 is what the Python runtime writes for quantized weights (fp16 / int8 / int4, an encoded embedding table):
  // no release of this binding reads it, so "upgrade" would send the user looking for one; name the float32 way out.
  if (version === 2) {
    const w = d.weights && typeof d.weights === "object" ? d.weights.format : undefined;
    const stored = typeof w === "string" && w !== "fp32" ? `${w} weights` : "quantized weights";
    r.fail("format_version", `bundle format version 2 (${stored}) is not read by this binding, which runs float32 bundles (format version 1) only; use the float32 bundle it was quantized from, or export one without --weights`);
  }
  if (Number.isInteger(version) && version > FORMAT_VERSION)
    r.fail("format_version", `bundle format version ${version} is newer than this binding understands (max ${FORMAT_VERSION}); upgrade edge-sel or re-export the bundle`);
  r.int(version, "format_version", { lo: 1, hi: FORMAT_VERSION });
  for (const key of ["model", "dims", "max_length", "embed", "layers", "head", "tokenizer", "files"])
    if (!(key in d)) r.fail(key, "required field missing");

  const model = r.obj(d.model, "model");
  const task = r.str(model.task, "model.task", { choices: Object.keys(TASK_SCORINGS) });
  const scoring = r.str(model.scoring, "model.scoring", { choices: ["yes_no", "cross_encoder", "bi_encoder", "lm"] });
  if (!TASK_SCORINGS[task].includes(scoring)) r.fail("model.scoring", `"${scoring}" is not a scoring of task "${task}"`);

  const dd = r.obj(d.dims, "dims");
  const hidden = r.int(dd.hidden, "dims.hidden", { lo: 1 });
  const heads = r.int(dd.heads, "dims.heads", { lo: 1 });
  const dims = { hidden, heads, kvHeads: r.int(dd.kv_heads ?? heads, "dims.kv_heads", { lo: 1 }),
    headDim: r.int(dd.head_dim ?? Math.floor(hidden / heads), "dims.head_dim", { lo: 1 }),
    intermediate: r.int(dd.intermediate, "dims.intermediate", { lo: 1, optional: true }) ?? 4 * hidden };
  if (heads % dims.kvHeads) r.fail("dims.kv_heads", `${dims.kvHeads} does not divide heads (${heads})`);

  const dtype = r.str(d.dtype ?? "float32", "dtype");
  const embed = readArray(r, d.embed, "embed");
  if (embed.shape.length !== 2 || embed.shape[1] !== hidden) r.fail("embed.shape", `expected [rows, ${hidden}], got ${show(embed.shape)}`);
  const arrays = {};
  for (const [k, v] of Object.entries(r.obj(d.arrays ?? {}, "arrays"))) arrays[k] = readArray(r, v, `arrays.${k}`);

  const layers = r.list(d.layers, "layers", (x, q) => {
    r.obj(x, q);
    return { file: r.path(x.file, `${q}.file`), weights: r.path(x.weights, `${q}.weights`, { optional: true }),
      qkv: r.str(x.qkv, `${q}.qkv`, { optional: true }), index: x.index ?? null, sourceIndex: null };
  }, { nonempty: true });
  layers.forEach((l, i) => {
    l.index = r.int(l.index ?? i, `layers[${i}].index`, { lo: 0 });
    if (l.index !== i) r.fail(`layers[${i}].index`, `expected ${i} (the layer's position in the list), got ${l.index}`);
    l.sourceIndex = r.int(d.layers[i].source_index ?? i, `layers[${i}].source_index`, { lo: 0 });
  });

  const lio = r.obj(d.layer_io ?? { inputs: ["hidden", "mask"], outputs: ["hidden_out"] }, "layer_io");
  const split = lio.qkv !== undefined && lio.qkv !== null;
  if (split !== (lio.attn !== undefined && lio.attn !== null)) r.fail("layer_io", "split layers need both 'qkv' and 'attn'");
  const layerIO = split
    ? { split, qkv: readGraphIO(r, lio.qkv, "layer_io.qkv"), attn: readGraphIO(r, lio.attn, "layer_io.attn"),
        emptyPos: r.int(lio.empty_pos ?? EMPTY_POS, "layer_io.empty_pos", { lo: 1 }) }
    : { split, inputs: lio.inputs === undefined ? ["hidden", "mask"] : r.list(lio.inputs, "layer_io.inputs", (s, q) => r.str(s, q), { nonempty: true }),
        outputs: lio.outputs === undefined ? ["hidden_out"] : r.list(lio.outputs, "layer_io.outputs", (s, q) => r.str(s, q), { nonempty: true }) };
  const extraGraphs = {};
  for (const [k, v] of Object.entries(r.obj(d.extra_graphs ?? {}, "extra_graphs"))) {
    r.obj(v, `extra_graphs.${k}`);
    extraGraphs[k] = { file: r.path(v.file, `extra_graphs.${k}.file`), weights: r.path(v.weights, `extra_graphs.${k}.weights`, { optional: true }) };
  }
  layers.forEach((l, i) => {
    if (split !== (l.qkv !== null)) r.fail(`layers[${i}].qkv`, split ? "split layers name their qkv graph" : "a qkv graph without split layer_io");
    if (l.qkv !== null && !(l.qkv in extraGraphs)) r.fail(`layers[${i}].qkv`, `${show(l.qkv)} is not a key of extra_graphs`);
  });

  const h = r.obj(d.head, "head");
  const head = { file: r.path(h.file, "head.file"), weights: r.path(h.weights, "head.weights", { optional: true }) };
  const tokenizer = { file: r.path(r.obj(d.tokenizer, "tokenizer").file, "tokenizer.file") };
  const e = r.obj(d.embedding ?? { rule: "gather" }, "embedding");
  const rule = r.str(e.rule ?? "gather", "embedding.rule", { choices: EMBEDDING_RULES });
  const embedding = { rule, layerNormEps: r.num(e.layer_norm_eps, "embedding.layer_norm_eps", { positive: true, optional: rule !== "bert" }),
    positionOffset: r.int(e.position_offset ?? 0, "embedding.position_offset", { lo: 0 }) };
  if (rule === "bert") for (const a of ["position", "ln_weight", "ln_bias"]) if (!(a in arrays)) r.fail("arrays", `embedding rule "bert" needs array ${show(a)}`);

  let prompt = null;
  if (d.prompt !== null && d.prompt !== undefined) {
    const pr = r.obj(d.prompt, "prompt");
    prompt = { prefix: r.str(pr.prefix, "prompt.prefix", { nonempty: false }), suffix: r.str(pr.suffix, "prompt.suffix", { nonempty: false }),
      instruction: r.str(pr.instruction ?? "", "prompt.instruction", { nonempty: false }) };
  }
  if (scoring === "yes_no" && !prompt) r.fail("prompt", "required for scoring yes_no");

  const files = {};
  for (const [k, v] of Object.entries(r.obj(d.files, "files"))) {
    const q = `files.${k}`;
    r.path(k, `${q} (key)`);
    r.obj(v, q);
    const sha256 = r.str(v.sha256, `${q}.sha256`);
    if (!SHA256.test(sha256)) r.fail(`${q}.sha256`, `expected 64 lowercase hex digits, got ${show(sha256)}`);
    files[k] = { size: r.int(v.size, `${q}.size`, { lo: 0 }), sha256 };
  }

  const m = {
    format: FORMAT, formatVersion: version, task, scoring, name: model.name ?? null, dims, dtype, maxLength: r.int(d.max_length, "max_length", { lo: 1 }),
    embed, arrays, layers, layerIO, extraGraphs, head, tokenizer, embedding,
    pooling: r.str(d.pooling ?? "cls", "pooling", { choices: POOLINGS }),
    finalLayerOutput: r.str(d.final_layer_output ?? "all_tokens", "final_layer_output", { choices: ["all_tokens", "first_token"] }),
    padId: r.int(d.pad_id ?? 0, "pad_id", { lo: 0 }), prompt, files,
    quantization: d.quantization ?? null,
    graphFormat: r.str(d.graph_format ?? "onnx", "graph_format", { choices: ["onnx", "ort"] }),
    ort: d.ort === null || d.ort === undefined ? null : { requiredOperators: r.path(r.obj(d.ort, "ort").required_operators, "ort.required_operators") },
    schedule: d.schedule === null || d.schedule === undefined ? null : readSchedule(r, d.schedule, "schedule", layers.length),
  };
  if ((m.graphFormat === "ort") !== (m.ort !== null)) r.fail("ort", "graph_format 'ort' and the 'ort' object come together");
  if (m.schedule && m.schedule.method === "probe" && !(m.schedule.probe in arrays))
    r.fail("schedule.probe", `names no entry of arrays (${show(m.schedule.probe)})`);

  // every referenced file is listed, and every raw array's byte size matches its shape
  for (const [rel, what] of referenced(m)) if (!(rel in files)) r.fail("files", `${what} file ${show(rel)} is not listed`);
  for (const [name, a] of [["embed", embed], ...Object.entries(arrays).map(([k, v]) => [`arrays.${k}`, v])])
    if (files[a.file].size !== a.nbytes) r.fail(`${name}.shape`, `${show(a.shape)} ${a.dtype} needs ${a.nbytes} bytes, files lists ${files[a.file].size}`);
  return m;
}

/** Every file the manifest points at: [[path, what]]. */
function referenced(m) {
  const refs = [[m.tokenizer.file, "tokenizer"], [m.embed.file, "embed"], [m.head.file, "head"]];
  if (m.head.weights) refs.push([m.head.weights, "head weights"]);
  for (const [k, a] of Object.entries(m.arrays)) refs.push([a.file, `array ${k}`]);
  m.layers.forEach((l, i) => {
    refs.push([l.file, `layer ${i}`]);
    if (l.weights) refs.push([l.weights, `layer ${i} weights`]);
  });
  for (const [k, g] of Object.entries(m.extraGraphs)) {
    refs.push([g.file, `graph ${k}`]);
    if (g.weights) refs.push([g.weights, `graph ${k} weights`]);
  }
  if (m.ort) refs.push([m.ort.requiredOperators, "ORT operator configuration"]);
  return refs;
}

module.exports = { parseManifest, referenced, FORMAT, FORMAT_VERSION, DTYPES, EMPTY_POS, SCHEDULE_RULES, SCHEDULE_METHODS };
