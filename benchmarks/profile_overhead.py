"""What the profiler's sampler costs: the same rerank call with and without it, alternating, in one process.

    python -m benchmarks.profile_overhead BUNDLE --documents docs.txt -n 128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from edge_sel.runtime import Reranker
from edge_sel.runtime.documents import read_documents
from edge_sel.runtime.profiler import Profiler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--documents", "-d", required=True)
    p.add_argument("-n", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--interval-ms", type=float, default=5.0)
    args = p.parse_args(argv)
    docs = read_documents(args.documents)[: args.n]
    rr = Reranker(args.bundle, pruning="off")
    rr.rank("copy a file", docs)  # warm: sessions loaded
    lat = {"off": [], "on": []}
    cpu = {"off": [], "on": []}
    samples = 0
    for i in range(args.repeats):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            c0 = time.process_time()
            if mode == "on":
                with Profiler(interval=args.interval_ms / 1000) as prof:
                    rr.rank("copy a file", docs)
                samples = len(prof.result.samples)
            else:
                rr.rank("copy a file", docs)
            cpu[mode].append(time.process_time() - c0)
            lat[mode].append(rr.last_stats["latency_s"])
    rr.close()
    for m in ("off", "on"):
        print(f"profiler {m}: latency median {statistics.median(lat[m]):.3f} s {[round(x, 3) for x in lat[m]]}, "
              f"process CPU median {statistics.median(cpu[m]):.3f} s")
    print(f"overhead: latency {100 * (statistics.median(lat['on']) / statistics.median(lat['off']) - 1):+.1f}%, "
          f"CPU {100 * (statistics.median(cpu['on']) / statistics.median(cpu['off']) - 1):+.1f}% "
          f"({samples} samples in the last profiled call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
