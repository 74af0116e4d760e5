"""Developer benchmarks: edge_sel side by side with the engines users pick today (torch, optimum +
onnxruntime, sentence-transformers, kvpress), plus the studies behind the defaults.

Not installed with the wheel (``pip install edge-sel`` has no ``edge_sel.benchmarks``); run them from the root of
a checkout installed in editable mode (``pip install -e ".[bench]"``: from that root, the checkout's ``edge_sel/``
folder is what ``import edge_sel`` finds, and the editable install maps its subpackages), e.g.
``python -m benchmarks.rerank --help``. Users measuring edge_sel on their own device use ``edge-sel bench BUNDLE``
(:mod:`edge_sel.bench`), which needs no torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def module_cmd(module: str, *args: str) -> list[str]:
    """The command line that runs ``benchmarks.<module>`` in a fresh interpreter (with :func:`child_env`)."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def child_env(base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) with the checkout's root first on PYTHONPATH, so a
    child started from any directory imports these scripts."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env
