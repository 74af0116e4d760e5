"use strict";
/** Where the tests find the shared test vectors and the bundles they were made from. */
const fs = require("node:fs");
const path = require("node:path");

const VECTORS = process.env.EDGE_SEL_VECTORS || path.resolve(__dirname, "../../../tests/vectors");
// built by tests/vectors/make.py --keep-bundles DIR (tests/test_node_binding.py does it): DIR/<case>
const BUNDLES = process.env.EDGE_SEL_VECTOR_BUNDLES || null;
// the same bundles converted to ORT-format graphs (`edge-sel convert`), when given
const ORT_BUNDLES = process.env.EDGE_SEL_VECTOR_BUNDLES_ORT || null;

function cases() {
  return fs.readdirSync(VECTORS).filter((f) => f.endsWith(".json")).map((f) => JSON.parse(fs.readFileSync(path.join(VECTORS, f), "utf8")));
}

/** The bundle of a vector case in graph form "onnx" or "ort", or a skip reason. */
function bundleOf(name, form = "onnx") {
  const root = form === "ort" ? ORT_BUNDLES : BUNDLES;
  const variable = form === "ort" ? "EDGE_SEL_VECTOR_BUNDLES_ORT" : "EDGE_SEL_VECTOR_BUNDLES";
  if (!root) return { skip: `${variable} is not set (run tests/test_node_binding.py, which builds the bundles)` };
  const dir = path.join(root, name);
  return fs.existsSync(dir) ? { dir } : { skip: `no bundle for ${name} under ${root}` };
}

function close(a, b, tol) {
  return Math.abs(a - b) <= tol * Math.max(1, Math.abs(a));
}

module.exports = { VECTORS, BUNDLES, cases, bundleOf, close };
