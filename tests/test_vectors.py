"""The reference runtime reproduces the shared test vectors (tests/vectors/*.json) on bundles rebuilt from scratch.

The same files are what every other binding proves itself against (docs/BUNDLE.md, "Proving a runtime"); when an
intended change moves the numbers, regenerate them with ``python tests/vectors/make.py``.
"""

import json
from pathlib import Path

import pytest

from edge_sel.runtime.manifest import SCHEDULE_RULES
from vectors.make import CASES, compare, make_vectors

VECTORS = Path(__file__).resolve().parent / "vectors"


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_reproduces_vectors(case, vector_bundles):
    expected = json.loads((VECTORS / f"{case}.json").read_text(encoding="utf-8"))
    got = make_vectors(vector_bundles[case], case)
    bad = compare(expected, got)
    assert not bad, "\n".join(bad[:10])


def test_vectors_exercise_pruning_and_truncation():
    """The committed files cover what a binding must implement: every scoring kind, truncation, a shared prefix,
    pruning by every rule at more than one layer."""
    seen = {}
    for case in CASES:
        v = json.loads((VECTORS / f"{case}.json").read_text(encoding="utf-8"))
        seen[v["scoring"]] = v
        assert any(q["tokens"]["n_truncated"] for q in v["queries"])
        pruned = [r for q in v["queries"] for r in q["rankings"].values() if max(r["pruned_at_layer"]) >= 0]
        assert {r["schedule"]["rule"] for r in pruned if r["schedule"]} == set(SCHEDULE_RULES)
    assert set(seen) == {"bi_encoder", "cross_encoder", "yes_no"}
    assert all(q["tokens"]["prefix_len"] > 0 for q in seen["yes_no"]["queries"])
