"""The runtime half must never import torch, transformers or optimum: it runs on a device with numpy and onnxruntime only."""

import json
import subprocess
import sys

CODE = r"""
import sys, json
import edge_sel, edge_sel.runtime
from edge_sel.runtime import Reranker
rr = Reranker(sys.argv[1], memory_budget=sys.argv[2] if sys.argv[2] != "none" else None)
res = rr.rank("Return the number of items in a container.", ["Return the length.", "Sort a list in place.", "Open a file."], top_k=2)
banned = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum")]
print(json.dumps({"banned": banned, "n": len(res)}))
"""


def _run(bundle, budget="none"):
    out = subprocess.run([sys.executable, "-c", CODE, str(bundle), budget], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runtime_rank_never_imports_torch(llama_bundle, bert_bi_bundle):
    for b in (llama_bundle, bert_bi_bundle):
        r = _run(b)
        assert r["n"] == 2
        assert r["banned"] == []


def test_cli_rerank_never_imports_torch(bert_ce_bundle, tmp_path):
    docs = tmp_path / "d.txt"
    docs.write_text("one document\nanother document\n")
    code = ("import sys, runpy; sys.argv=['edge-sel','rerank',sys.argv[1],'-q','x','-d',sys.argv[2],'--json'];"
            "from edge_sel.cli import main; rc=main(); "
            "print('BANNED', [m for m in sys.modules if m.split('.')[0] in ('torch','transformers','optimum')]); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(bert_ce_bundle), str(docs)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "BANNED []" in out.stdout
