"use strict";
/** Sizes such as "128MB", "1.5GiB" or plain bytes (the same units as the Python runtime's `parse_size`). */
const { InputError } = require("./errors");

// MB/GB are decimal, MiB/GiB binary
const UNITS = { b: 1, k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9, t: 1e12, tb: 1e12, kib: 1024, mib: 1024 ** 2, gib: 1024 ** 3, tib: 1024 ** 4 };

function parseSize(value) {
  if (typeof value === "number") {
    if (!Number.isFinite(value) || value <= 0) throw new InputError(`memory size must be a positive number of bytes, got ${value}`);
    return Math.floor(value);
  }
  if (typeof value !== "string") throw new InputError(`memory size must be a number or a string like "128MB", got ${typeof value}`);
  const m = /^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$/.exec(value);
  const unit = m ? (m[2] || "b").toLowerCase() : null;
  if (!m || !(unit in UNITS)) throw new InputError(`cannot read memory size ${JSON.stringify(value)} (use e.g. 256MB, 1.5GiB or bytes)`);
  const bytes = Math.floor(parseFloat(m[1]) * UNITS[unit]);
  if (bytes <= 0) throw new InputError(`memory size must be positive, got ${JSON.stringify(value)}`);
  return bytes;
}

function formatSize(n) {
  if (n >= 1024 ** 3) return `${(n / 1024 ** 3).toFixed(2)} GiB`;
  if (n >= 1024 ** 2) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} B`;
}

/** formatSize rounded up at the precision it shows, for a minimum: the figure given back as a budget works. */
function formatMinSize(n) {
  const shown = formatSize(n);
  if (parseSize(shown.replace(" ", "")) >= n) return shown;
  const [value, unit] = shown.split(" ");
  const digits = unit === "B" ? 0 : unit === "GiB" ? 2 : 1;
  return `${(parseFloat(value) + 10 ** -digits).toFixed(digits)} ${unit}`;
}

module.exports = { parseSize, formatSize, formatMinSize };
