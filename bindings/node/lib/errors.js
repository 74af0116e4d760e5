"use strict";
/** The error types every user error maps to (the Python runtime's BundleError, BudgetError, InputError). */

class EdgeSelError extends Error {
  constructor(message) {
    super(message);
    this.name = this.constructor.name;
  }
}

/** A bundle that is missing, corrupt, modified, or that this binding cannot run. */
class BundleError extends EdgeSelError {}

/** A memory budget below what the bundle or the input needs; `minimumBytes` names the minimum. */
class BudgetError extends EdgeSelError {
  constructor(message, minimumBytes) {
    super(message);
    this.minimumBytes = minimumBytes;
  }
}

/** Bad arguments: empty query or documents, a bad top-k, a schedule the bundle cannot use. */
class InputError extends EdgeSelError {}

module.exports = { EdgeSelError, BundleError, BudgetError, InputError };
