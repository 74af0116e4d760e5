"""Check a staged bundle against the torch model it was exported from (``export(..., verify=True)``).

Rerank: sample queries and documents from the builtin docstring text, scored by the edge_sel runtime and by the
adapter's torch reference on exactly the token ids the runtime built. Generate: a few prompts decoded greedily by
the runtime (policy ``full``), the logits at every step compared with the torch model's over the same tokens.
"""

from __future__ import annotations

import numpy as np

from edge_sel.runtime.bundle import Bundle
from edge_sel.runtime.errors import EdgeSelError

VERIFY_TOLERANCE = 1e-3
VERIFY_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


class ExportVerificationError(EdgeSelError):
    """The exported bundle's scores differ from the torch model's by more than the tolerance."""


def sample_texts() -> tuple[list[str], list[str]]:
    from edge_sel.export.textdata import docstring_pairs

    pairs = docstring_pairs(limit=40)
    return [q for q, _ in pairs[:3]], [d for _, d in pairs[:12]]


def verify_rerank(bundle: Bundle, adapter, model, tokenizer, scoring: str) -> float:
    """Largest |score difference| between the bundle (edge_sel runtime) and torch over sample queries."""
    from edge_sel.runtime import Reranker

    queries, docs = sample_texts()
    rr = Reranker(bundle, pruning="off")
    worst = 0.0
    try:
        for q in queries:
            enc = rr.encoder.encode(q, docs)
            mine = rr.score_encoded(enc)
            ref = adapter.reference_scores(model, tokenizer, scoring, enc.doc_ids, enc.doc_types, query_ids=enc.query_ids)
            worst = max(worst, float(np.max(np.abs(mine - ref))))
    finally:
        rr.close()
    return worst


def verify_generate(bundle: Bundle, adapter, model, steps: int = 6) -> float:
    """Max |logit difference| between the bundle (policy ``full``, greedy) and torch over a few steps."""
    from edge_sel.runtime import Generator

    gen = Generator(bundle, policy="full")
    worst = 0.0
    try:
        for p in VERIFY_PROMPTS:
            res = gen.generate(p, max_new_tokens=steps, return_logits=True, stop=False)
            ref = adapter.reference_logits(model, res.prompt_ids, res.tokens[:-1])
            mine = np.stack(res.logits)
            worst = max(worst, float(np.max(np.abs(mine - ref[: len(mine)]))))
    finally:
        gen.close()
    return worst


def check(diff: float, what: str) -> None:
    if diff > VERIFY_TOLERANCE:
        raise ExportVerificationError(
            f"bundle {what} differ from the torch model by {diff:.2e} (> {VERIFY_TOLERANCE:g}); export not written")
