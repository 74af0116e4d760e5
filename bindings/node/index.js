"use strict";
/** edge-sel for Node.js: rank documents with an edge_sel bundle under a memory budget. */
const { Reranker } = require("./lib/reranker");
const { Bundle } = require("./lib/bundle");
const { EdgeSelError, BundleError, BudgetError, InputError } = require("./lib/errors");
const { parseSize } = require("./lib/units");

module.exports = { Reranker, Bundle, EdgeSelError, BundleError, BudgetError, InputError, parseSize };
