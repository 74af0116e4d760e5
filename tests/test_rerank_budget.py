"""A budget holds for a large input: 20,000 short documents under a tight budget grow the process's RSS by no more
than the budget (+10% measurement slack). Measured in a fresh process from a baseline taken after the bundle is
opened, so this test process's own heap does not blur it."""

import json
import subprocess
import sys

from edge_sel.runtime import Reranker
from edge_sel.runtime.documents import DocumentsFile

N_DOCS = 20_000
QUERY = "how do I copy a file"

WORKER = r"""
import json, sys
from edge_sel.runtime import Reranker
from edge_sel.runtime.documents import DocumentsFile
from edge_sel.runtime.memory import peak_rss_bytes, reset_peak, rss_bytes, trim_heap

bundle, docs, budget, spill, query = sys.argv[1:6]
rr = Reranker(bundle, memory_budget=int(budget), spill_dir=spill)
trim_heap()
base = rss_bytes()
reset_peak()
with DocumentsFile(docs, spool_dir=spill) as d:
    top = rr.rank(query, d, top_k=5, return_documents=True)
growth = peak_rss_bytes() - base
st = rr.last_stats
print(json.dumps({"growth": growth, "top": top, "n_documents": st["n_documents"], "spill": st["spill"],
                  "tokens_in_ram": st["plan_estimate"]["tokens"], "n_chunks": st["n_chunks"]}))
"""


def test_twenty_thousand_documents_stay_within_a_tight_budget(bert_ce_bundle, tmp_path):
    docs = tmp_path / "docs.txt"
    words = ["file", "copy", "folder", "number", "string", "list", "path", "read", "write", "sort"]
    docs.write_text("".join(f"doc {i} about {words[i % 10]} and {words[i * 7 % 10]}\n" for i in range(N_DOCS)))
    with DocumentsFile(docs) as d:
        budget = Reranker(bert_ce_bundle).minimum_budget(QUERY, d)  # the tightest budget the plan accepts
    spill = tmp_path / "spill"
    spill.mkdir()
    out = subprocess.run([sys.executable, "-c", WORKER, str(bert_ce_bundle), str(docs), str(budget), str(spill), QUERY],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n_documents"] == N_DOCS and len(res["top"]) == 5
    assert res["spill"] is True and res["tokens_in_ram"] == 0  # hidden states and token ids in files
    assert res["growth"] <= budget * 1.1, f"RSS grew {res['growth'] / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB"
    assert list(spill.iterdir()) == []
    print(f"growth {res['growth'] / budget:.2f} x budget {budget / 2**20:.1f} MiB, {res['n_chunks']} chunks")
