"use strict";
/** Bad input: each a thrown error with one clear message, never a crash or a silent wrong answer. */
const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { Reranker, Bundle, BundleError, BudgetError, InputError } = require("..");
const { bundleOf } = require("./helpers");
const { parseSize, formatMinSize } = require("../lib/units");

const { dir: SOURCE, skip } = bundleOf("tiny_bert_ce");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "edge-sel-node-"));
test.after(() => fs.rmSync(tmp, { recursive: true, force: true }));

let n = 0;
function copy() {
  const dst = path.join(tmp, `b${n++}`);
  fs.cpSync(SOURCE, dst, { recursive: true });
  fs.rmSync(path.join(dst, ".verified"), { force: true });
  return dst;
}
const manifestOf = (dir) => JSON.parse(fs.readFileSync(path.join(dir, "manifest.json"), "utf8"));
/** Rewrite the manifest and its digest (a careful edit: only the content check can catch it). */
function rewrite(dir, edit) {
  const m = manifestOf(dir);
  edit(m);
  const bytes = Buffer.from(JSON.stringify(m, null, 1));
  fs.writeFileSync(path.join(dir, "manifest.json"), bytes);
  const sha = require("node:crypto").createHash("sha256").update(bytes).digest("hex");
  fs.writeFileSync(path.join(dir, "manifest.json.sha256"), `${sha}  manifest.json\n`);
}
function flipByte(file) {
  const b = fs.readFileSync(file);
  b[b.length >> 1] ^= 0xff;
  fs.writeFileSync(file, b);
}
const rejects = (p, type, re) => assert.rejects(p, (e) => e instanceof type && re.test(e.message) && !e.message.includes("\n    at "));

test("missing bundle", async () => {
  await rejects(Reranker.open(path.join(tmp, "nope")), BundleError, /bundle not found/);
});

test("a folder that is not a bundle", async () => {
  const d = fs.mkdtempSync(path.join(tmp, "empty-"));
  await rejects(Reranker.open(d), BundleError, /no manifest\.json/);
});

test("corrupt manifest JSON", { skip }, async () => {
  const d = copy();
  fs.writeFileSync(path.join(d, "manifest.json"), "{ not json");
  await rejects(Reranker.open(d), BundleError, /not valid JSON/);
});

test("manifest edited after it was written (digest mismatch)", { skip }, async () => {
  const d = copy();
  fs.appendFileSync(path.join(d, "manifest.json"), " ");
  await rejects(Reranker.open(d), BundleError, /does not match its digest/);
});

test("a layer's weights changed on disk (hash mismatch), also after a verified open", { skip }, async () => {
  const d = copy();
  await (await Reranker.open(d)).close();  // verifies and stamps
  assert.ok(fs.existsSync(path.join(d, ".verified")));
  flipByte(path.join(d, "layers/layer_001.onnx.data"));
  await rejects(Reranker.open(d), BundleError, /sha256 .* does not match manifest/);
});

test("a truncated file", { skip }, async () => {
  const d = copy();
  fs.truncateSync(path.join(d, "embed/tokens.bin"), 100);
  await rejects(Reranker.open(d), BundleError, /size 100 bytes, manifest expects/);
});

test("a missing listed file", { skip }, async () => {
  const d = copy();
  fs.rmSync(path.join(d, "head.onnx"));
  await rejects(Reranker.open(d), BundleError, /bundle file missing/);
});

test("manifest fields of the wrong type, a path escaping the bundle, a newer format", { skip }, async () => {
  const cases = [
    [(m) => { m.layers[1].weights = 7; }, /layers\[1\]\.weights: expected a string or null, got 7/],
    [(m) => { m.tokenizer.file = "../outside.json"; }, /escapes the bundle directory/],
    [(m) => { m.format_version = 3; }, /newer than this binding understands/],
    // a quantized (format 2) bundle: say what it holds and the float32 way out, not "upgrade" (no version reads it)
    [(m) => { m.format_version = 2; m.weights = { format: "int4" }; },
      /format version 2 \(int4 weights\) is not read by this binding, which runs float32 bundles .*export one without --weights/],
    [(m) => { m.format_version = true; }, /format_version: expected an integer/],
    [(m) => { m.arrays.position.dtype = "object"; }, /arrays\.position\.dtype: "object" is not one of/],
  ];
  for (const [edit, re] of cases) {
    const d = copy();
    rewrite(d, edit);
    await rejects(Reranker.open(d), BundleError, re);
  }
});

test("tensor formats this binding does not read are refused by name", { skip }, async () => {
  const d = copy();
  rewrite(d, (m) => {
    m.embed.dtype = "int8";
    m.embed.shape = [m.embed.shape[0] * 4, m.embed.shape[1]];  // the same bytes read as int8
    m.dims.hidden = m.embed.shape[1];
  });
  await rejects(Reranker.open(d, { verify: false }), BundleError, /stored as int8; this binding reads float32 arrays only/);
});

test("unknown pruning rules and methods are refused, not guessed", { skip }, async () => {
  const d = copy();
  rewrite(d, (m) => { m.schedule = { ...m.schedule, rule: "adaptive" }; });  // a rule a later version may add
  await rejects(Reranker.open(d), BundleError, /pruning rule "adaptive" is not known/);
  await rejects(Reranker.open(SOURCE, { pruning: { method: "oracle", top_k: 3, layers: [] } }), InputError, /method "oracle" is not known/);
  await rejects(Reranker.open(SOURCE, { pruning: { method: "cosine", top_k: 3, layers: [{ layer: 0, margin: 0 }] } }), InputError, /needs a bi-encoder/);
  await rejects(Reranker.open(SOURCE, { pruning: { method: "head", top_k: 3, layers: [{ layer: 9, margin: 0 }] } }), InputError, /bundle has layers 0\.\.2/);
});

test("empty documents, empty query, bad topK", { skip }, async () => {
  const rr = await Reranker.open(SOURCE);
  await rejects(rr.rank("q", []), InputError, /document list is empty/);
  await rejects(rr.rank("q", "one string"), InputError, /not a single string/);
  await rejects(rr.rank("q", ["a", 3]), InputError, /document 1 is number/);
  await rejects(rr.rank("  ", ["a"]), InputError, /query is empty/);
  await rejects(rr.rank("q", ["a"], { topK: 0 }), InputError, /topK must be a positive integer/);
  assert.equal((await rr.rank("q", ["a", "b"], { topK: 10 })).length, 2); // clamped
  await rr.close();
});

test("infeasible budgets", { skip }, async () => {
  await rejects(Reranker.open(SOURCE, { memoryBudget: "1MB" }), BudgetError, /below the minimum this bundle can run in/);
  // the minimum an open refusal names is a budget this package runs in (it does not spill: no smaller one would do)
  const minimum = await Reranker.open(SOURCE, { memoryBudget: "1MB" }).catch((e) => e.minimumBytes);
  await rejects(Reranker.open(SOURCE, { memoryBudget: minimum - 1 }), BudgetError, /below the minimum this bundle can run in/);
  const least = await Reranker.open(SOURCE, { memoryBudget: minimum });
  // the figure the message shows works too: rounded up, not to nearest ('50.4 MiB is below the minimum: 50.4 MiB')
  for (const n of [minimum, 52868710, 999_950, 2 ** 30 + 1]) assert.ok(parseSize(formatMinSize(n).replace(" ", "")) >= n, n);
  const shown = await Reranker.open(SOURCE, { memoryBudget: "1MB" }).catch((e) => /can run in: ([0-9.]+ \w+)/.exec(e.message)[1]);
  await (await Reranker.open(SOURCE, { memoryBudget: shown.replace(" ", "") })).close();
  assert.equal((await least.rank("how to copy a file", ["copy a file with shutil", "sockets"])).length, 2);
  await least.close();
  await rejects(Reranker.open(SOURCE, { memoryBudget: "lots" }), InputError, /cannot read memory size/);
  const rr = await Reranker.open(SOURCE, { memoryBudget: "26MB" });
  const long = Array.from({ length: 1000 }, (_, i) => `document number ${i} about files and sockets and processes`);
  await assert.rejects(rr.rank("q", long), (e) => e instanceof BudgetError && e.minimumBytes > 26e6 && /Use memoryBudget \d+MiB/.test(e.message)
    && /keeps hidden states in memory/.test(e.message));
});

test("a generate bundle is not a rerank bundle", { skip }, async () => {
  const d = copy();
  rewrite(d, (m) => { m.model.task = "generate"; m.model.scoring = "lm"; });
  await rejects(Reranker.open(d), InputError, /"generate" bundle/);
});

test("the verification stamp is shared with the Python runtime's format", { skip }, async () => {
  const d = copy();
  const b = Bundle.open(d);
  assert.ok(b.stampHolds());
  const text = fs.readFileSync(path.join(d, ".verified"), "utf8");
  assert.match(text, /^\{"manifest_sha256": "[0-9a-f]{64}", "files": \{"/);
});
