"""``benchmarks.decode_profile`` on the tiny generate bundle: a step's session time is split by graph kind."""

from __future__ import annotations

import json


def test_plain_call_splits_the_session_time_by_graph(gen_llama_bundle, capsys):
    from benchmarks.decode_profile import main

    assert main([str(gen_llama_bundle), "--prompt-tokens", "40", "--steps", "6", "--threads", "1", "--no-profile"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["steps"] == 6
    parts = row["qkv_ms"] + row["attn_ms"] + row["head_ms"]
    assert all(row[k] > 0 for k in ("qkv_ms", "attn_ms", "head_ms"))
    # medians of the parts need not add up exactly to the median of the sums, but they measure the same calls
    assert 0.5 * row["session_call_ms"] <= parts <= 1.5 * row["session_call_ms"]
    assert row["step_ms"] >= row["session_call_ms"]
