"use strict";
/**
 * Opening a bundle as docs/BUNDLE.md ("Opening a bundle", "Integrity") specifies: parse and validate the manifest,
 * check that every listed file is inside the bundle with its listed size, then verify the manifest's digest, every
 * file's SHA-256 and every graph's external-data locations. Like the Python reference, the first open verifies and
 * records a stamp (`.verified`: manifest digest + each file's size, mtime, ctime, inode) that later opens compare
 * with fresh `stat` results instead of hashing again; the stamp's format is the reference's, so either runtime
 * accepts the other's.
 */
const fs = require("node:fs");
const path = require("node:path");
const crypto = require("node:crypto");
const { BundleError } = require("./errors");
const { parseManifest, referenced } = require("./manifest");

const MANIFEST = "manifest.json";
const DIGEST = "manifest.json.sha256";
const STAMP = ".verified";
const RESERVED = [MANIFEST, DIGEST, STAMP];

function sha256File(file) {
  const h = crypto.createHash("sha256");
  const fd = fs.openSync(file, "r");
  try {
    const buf = Buffer.allocUnsafe(1 << 20);
    let n;
    while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) h.update(n === buf.length ? buf : buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest("hex");
}

/** External-data locations an ONNX file names: each is a StringStringEntryProto with key "location" (field 1)
 * followed by its value (field 2, length-delimited), found by scanning the serialized graph. */
function graphDataRefs(blob) {
  const key = Buffer.from("\x0a\x08location\x12", "latin1");
  const refs = [];
  let i = 0;
  while ((i = blob.indexOf(key, i)) >= 0) {
    let j = i + key.length, n = 0, shift = 0;
    while (j < blob.length) {
      const b = blob[j++];
      n += (b & 0x7f) * 2 ** shift;
      shift += 7;
      if (!(b & 0x80)) break;
    }
    refs.push(blob.subarray(j, j + n).toString("utf8"));
    i = j + n;
  }
  return refs;
}

class Bundle {
  /** Open and check the bundle at `dir`. `verify`: "once" (default: hash on the first open and whenever a file
   * changed since), true (always hash) or false (sizes only: the caller's explicit opt-out). */
  static open(dir, { verify = "once" } = {}) {
    if (![true, false, "once"].includes(verify)) throw new BundleError(`verify must be true, false or "once", got ${JSON.stringify(verify)}`);
    const root = path.resolve(dir);
    let st;
    try {
      st = fs.statSync(root);
    } catch {
      throw new BundleError(`bundle not found: ${root} (export one with \`edge-sel export MODEL -o ${root}\`)`);
    }
    if (!st.isDirectory()) throw new BundleError(`${root} is not a bundle directory (expected a folder holding ${MANIFEST})`);
    const mpath = path.join(root, MANIFEST);
    if (!fs.existsSync(mpath)) throw new BundleError(`${root}: no ${MANIFEST} — not an edge_sel bundle, or an export that did not finish`);
    const bytes = fs.readFileSync(mpath);
    let raw;
    try {
      raw = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
    } catch (e) {
      throw new BundleError(`${mpath}: manifest is not valid JSON (${e.message})`);
    }
    const b = new Bundle(root, parseManifest(raw, mpath), bytes);
    b.checkFiles();
    if (verify === true || (verify === "once" && !b.stampHolds())) b.verify();
    return b;
  }

  constructor(root, spec, manifestBytes) {
    this.root = root;
    this.spec = spec;
    this.manifestBytes = manifestBytes;
  }

  /** The absolute path of a listed file, refusing one that resolves (through symlinks) outside the bundle. */
  path(rel) {
    if (!(rel in this.spec.files)) throw new BundleError(`${path.join(this.root, MANIFEST)}: file ${JSON.stringify(rel)} is not listed in 'files' (refused)`);
    const full = path.join(this.root, rel);
    let real;
    try {
      real = fs.realpathSync(full);
    } catch {
      throw new BundleError(`bundle file missing: ${full} (listed in ${path.join(this.root, MANIFEST)}); re-export the bundle`);
    }
    const base = fs.realpathSync(this.root);
    if (!real.startsWith(base + path.sep)) throw new BundleError(`${path.join(this.root, MANIFEST)}: file path ${JSON.stringify(rel)} resolves outside the bundle directory (refused)`);
    return real;
  }

  checkFiles() {
    for (const [rel, info] of Object.entries(this.spec.files)) {
      if (RESERVED.includes(rel)) throw new BundleError(`${path.join(this.root, MANIFEST)}: 'files' lists ${JSON.stringify(rel)}, a name the format reserves`);
      const full = this.path(rel);
      const st = fs.statSync(full);
      if (!st.isFile()) throw new BundleError(`bundle file missing: ${full} (listed in ${path.join(this.root, MANIFEST)}); re-export the bundle`);
      if (st.size !== info.size) throw new BundleError(`bundle file ${full}: size ${st.size} bytes, manifest expects ${info.size} (corrupt or truncated)`);
    }
  }

  /** The digest, every file's SHA-256 and every graph's external-data locations; records the stamp. */
  verify() {
    const digest = path.join(this.root, DIGEST);
    if (fs.existsSync(digest)) {
      const want = fs.readFileSync(digest, "latin1").split(/\s+/)[0];
      if (want !== crypto.createHash("sha256").update(this.manifestBytes).digest("hex"))
        throw new BundleError(`${path.join(this.root, MANIFEST)}: does not match its digest in ${DIGEST} (modified after it was written, or a rewrite was interrupted); re-export the bundle`);
    }
    const graphs = new Set(referenced(this.spec).map(([rel]) => rel).filter((rel) => rel.endsWith(".onnx")));  // ORT files hold their weights
    for (const [rel, info] of Object.entries(this.spec.files)) {
      const full = this.path(rel);
      let got, blob = null;
      if (graphs.has(rel)) {
        blob = fs.readFileSync(full);
        got = crypto.createHash("sha256").update(blob).digest("hex");
      } else {
        got = sha256File(full);
      }
      if (got !== info.sha256)
        throw new BundleError(`bundle file ${full}: sha256 ${got.slice(0, 16)}… does not match manifest ${info.sha256.slice(0, 16)}… (corrupt or modified)`);
      if (blob) this.checkGraphRefs(rel, blob);
    }
    this.writeStamp();
  }

  checkGraphRefs(rel, blob) {
    const base = path.posix.dirname(rel);
    for (const loc of graphDataRefs(blob)) {
      const target = path.posix.normalize(path.posix.join(base, loc));
      if (loc.startsWith("/") || target.startsWith("../") || !(target in this.spec.files))
        throw new BundleError(`bundle graph ${path.join(this.root, rel)} loads external data ${JSON.stringify(loc)}, which is not a file listed in ${MANIFEST} (refused)`);
    }
  }

  /** The stamp as the Python reference writes it (json.dumps of {"manifest_sha256", "files": {rel: [size,
   * mtime_ns, ctime_ns, inode]}}), built by hand: nanosecond times exceed what a JS number holds exactly. */
  stampText() {
    const files = Object.keys(this.spec.files).map((rel) => {
      const st = fs.statSync(path.join(this.root, rel), { bigint: true });
      return `${JSON.stringify(rel)}: [${st.size}, ${st.mtimeNs}, ${st.ctimeNs}, ${st.ino}]`;
    });
    const sha = crypto.createHash("sha256").update(this.manifestBytes).digest("hex");
    return `{"manifest_sha256": "${sha}", "files": {${files.join(", ")}}}`;
  }

  stampHolds() {
    try {
      return fs.readFileSync(path.join(this.root, STAMP), "utf8") === this.stampText();
    } catch {
      return false;
    }
  }

  writeStamp() {
    const target = path.join(this.root, STAMP);
    const tmp = `${target}.tmp-${process.pid}`;
    try {
      fs.writeFileSync(tmp, this.stampText());
      fs.renameSync(tmp, target);
    } catch {
      try { fs.unlinkSync(tmp); } catch { /* read-only bundle: every open verifies */ }
    }
  }

  /** A small raw array read whole as a Float32Array (float32 only in this binding). */
  floatArray(name) {
    const a = name === "embed" ? this.spec.embed : this.spec.arrays[name];
    if (!a) throw new BundleError(`${path.join(this.root, MANIFEST)}: no array named ${JSON.stringify(name)}`);
    requireFloat32(this, name, a);
    const buf = fs.readFileSync(this.path(a.file));
    return new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  }

  fileSize(rel) {
    return rel ? this.spec.files[rel].size : 0;
  }
}

/** This binding reads float32 arrays only; a quantized or other tensor format is refused by name. */
function requireFloat32(bundle, name, a) {
  if (a.dtype !== "float32")
    throw new BundleError(`${path.join(bundle.root, MANIFEST)}: array ${name} is stored as ${a.dtype}; this binding reads float32 arrays only (re-export without that option, or use the Python runtime)`);
}

module.exports = { Bundle, graphDataRefs, requireFloat32, MANIFEST, DIGEST, STAMP };
