"""The thread-pool rule (``EDGE_SEL_SHARED_THREADS``, runtime/sessions.py) on a quiet and on a loaded machine.

    python -m benchmarks.thread_pools BUNDLE --prompt-tokens 2048 --busy 2

Each setting (``0``: per-session pools, ``N``: the shared spinning pool, unset: the auto rule) runs one generate call
in its own process (the pool is chosen once per process) on the same Botchan prompt, full cache, ``--threads``
threads, 24 decode steps; first with the machine as it is, then beside ``--busy`` busy loops started at this script's
own priority. Prints decode ms/token, CPU ms/token and the pool each process ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys
from tokenizers import Tokenizer
from edge_sel.export.textdata import botchan
from edge_sel.runtime.generate import Generator
from edge_sel.runtime.sessions import own_process
own_process()
g = Generator(sys.argv[1], policy="full", threads=int(sys.argv[3]))
t = Tokenizer.from_file(str(g.bundle.path(g.bundle.spec.tokenizer.file)))
t.no_padding(); t.no_truncation()
ids = t.encode(botchan(), add_special_tokens=True).ids[:int(sys.argv[2])]
for _ in g.run(ids, 25, 0.0, 1.0, None, False, None, False):
    pass
s = g.last_stats
print(json.dumps({"ms": s["decode_ms_per_token"], "cpu_ms": s["decode_cpu_ms_per_token"], "pool": s["shared_pool_threads"]}))
"""


def one(bundle: str, prompt: int, threads: int, value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_SEL_SHARED_THREADS"}
    if value is not None:
        env["EDGE_SEL_SHARED_THREADS"] = value
    out = subprocess.run([sys.executable, "-c", CHILD, bundle, str(prompt), str(threads)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=2, help="busy loops for the loaded machine")
    a = ap.parse_args(argv)
    print(f"nice {os.getpriority(os.PRIO_PROCESS, 0)}, load {os.getloadavg()}", flush=True)
    for cond, loops in (("quiet", 0), ("loaded", a.busy)):
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(loops)]
        try:
            time.sleep(1 if busy else 0)
            for value in ("0", str(a.threads), None):
                r = one(a.bundle, a.prompt_tokens, a.threads, value)
                print(f"{cond:7s} EDGE_SEL_SHARED_THREADS={value if value is not None else 'unset':5s} {r}", flush=True)
        finally:
            for b in busy:
                b.kill()
                b.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
