"""The planner against measurement: for each configuration, `edge-sel plan --device DEVICE` predicts peak memory
(above the idle process) and latency, then `edge-sel profile` measures the same call in a fresh process.

    python -m benchmarks.planner_accuracy --bundle bundles/minilm:128,512:none,96MB --bundle bundles/smollm2:32,128:none,128MB

Documents are CPython docstrings (`edge_sel.export.textdata`, real English text) cut to exactly --doc-tokens tokens by
each bundle's own tokenizer (shorter ones are left out), pruning off (the planner assumes no pruning). Probe the device first (`edge-sel devices probe --bundle ...`):
with no probed costs the latency is FLOPs over the profile's GFLOPS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from edge_sel.bench import bundle_tokenizer, cut_to_tokens, synthetic_text
from edge_sel.export.textdata import docstring_pairs
from edge_sel.runtime.bundle import Bundle

QUERY = "how do I copy a file to another directory"


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_sel.cli", *cmd], capture_output=True, text=True)


def measure(bundle: str, n: int, budget: str | None, doc_tokens: int, device: str, out: str) -> dict:
    tok = bundle_tokenizer(Bundle.open(bundle))
    docs = os.path.join(out, f"{os.path.basename(bundle)}-{n}.txt")
    texts = [t.replace("\n", " ") for _, t in docstring_pairs(limit=4 * n)]
    texts = [cut_to_tokens(tok, t, doc_tokens) for t in texts if len(tok.encode(t, add_special_tokens=False).ids) >= doc_tokens]
    if len(texts) < n:
        texts += [cut_to_tokens(tok, synthetic_text(doc_tokens * 2, i), doc_tokens) for i in range(n - len(texts))]
    with open(docs, "w") as f:
        f.writelines(t + "\n" for t in texts[:n])
    q = len(tok.encode(QUERY, add_special_tokens=False).ids)
    tag = f"{os.path.basename(bundle)} N={n} budget={budget or 'none'}"
    plan = run(["plan", bundle, "--device", device, "--task", "rerank", "-n", str(n), "--doc-tokens", str(doc_tokens),
                "--query-tokens", str(q), "--budget", budget or "1TB", "--json"])
    if plan.returncode != 0:
        return {"config": tag, "refused": plan.stderr.strip()}
    plan = json.loads(plan.stdout)
    prof = run(["profile", bundle, "rerank", "-q", QUERY, "-d", docs, "--pruning", "off",
                *(["-m", budget] if budget else []), "--out", os.path.join(out, tag.replace(" ", "_")), "--json"])
    if prof.returncode != 0:
        return {"config": tag, "error": prof.stderr.strip()}
    prof = json.loads(prof.stdout)
    mem, lat = prof["measured"]["total"], prof["stats"]["latency_s"]
    return {"config": tag, "window": f"{plan['window_layers']}/{plan['layers']}", "spill": plan["spill"],
            "pred_peak_mib": plan["peak_bytes"] / 2**20, "meas_peak_mib": mem / 2**20,
            "peak_err": (plan["peak_bytes"] - mem) / mem, "pred_latency_s": plan["latency_s"], "meas_latency_s": lat,
            "latency_err": (plan["latency_s"] - lat) / lat, "load_average": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", action="append", required=True, help="PATH:N1,N2:BUDGET1,BUDGET2 (budget 'none' = unbudgeted)")
    p.add_argument("--device", default="this-machine")
    p.add_argument("--doc-tokens", type=int, default=96)
    p.add_argument("--out", default=None, help="folder for the profiles (default: a temporary one)")
    args = p.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="planner-accuracy-")
    os.makedirs(out, exist_ok=True)
    rows = []
    for spec in args.bundle:
        path, ns, budgets = spec.rsplit(":", 2)
        for n in map(int, ns.split(",")):
            for b in budgets.split(","):
                row = measure(path, n, None if b == "none" else b, args.doc_tokens, args.device, out)
                rows.append(row)
                print(json.dumps(row), flush=True)
    ok = [r for r in rows if "peak_err" in r]
    if ok:
        print("| config | window | spill | predicted peak | measured peak | error | predicted latency | measured latency | error |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in ok:
            print(f"| {r['config']} | {r['window']} | {'yes' if r['spill'] else 'no'} | {r['pred_peak_mib']:.0f} | "
                  f"{r['meas_peak_mib']:.0f} | {100 * r['peak_err']:+.0f}% | {r['pred_latency_s']:.1f} s | "
                  f"{r['meas_latency_s']:.1f} s | {100 * r['latency_err']:+.0f}% |")
        print(f"median |error|: peak {100 * statistics.median(abs(r['peak_err']) for r in ok):.0f}%, "
              f"latency {100 * statistics.median(abs(r['latency_err']) for r in ok):.0f}% over {len(ok)} configurations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
