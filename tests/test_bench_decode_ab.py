"""``benchmarks.decode_ab`` on the tiny generate bundle: the bound and the feeds step agree, and the bundle mode times
each bundle."""

from __future__ import annotations

import json


def test_bound_against_feeds_and_bundles(gen_llama_bundle, capsys):
    from benchmarks.decode_ab import main

    args = ["--prompt-tokens", "40", "--threads", "1", "--rounds", "2", "--steps", "3"]
    assert main([str(gen_llama_bundle), *args]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["logits_max_abs_diff"] == 0.0 and row["feeds_ms"] > 0 and row["bound_ms"] > 0
    assert main([str(gen_llama_bundle), str(gen_llama_bundle), "--bundles", *args]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(row["ms"]) == 2 and row["ratio"][0] == 1.0 and all(v > 0 for v in row["ms"])
