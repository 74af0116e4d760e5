"""What the CLI does with an unexpected internal error.

A user error is one line and exit 2 (:mod:`edge_sel.cli`); anything else is a bug: the user sees one line saying
so and where its traceback went (``EDGE_SEL_DEBUG=1`` prints it instead), exit 1.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from edge_sel.runtime.errors import EdgeSelError
from edge_sel.runtime.home import home


def report_crash() -> str:
    """Call inside ``except``: the one-line summary of the exception being handled, naming where the details are."""
    exc = sys.exc_info()[1]
    summary = f"{type(exc).__name__}: {exc}".splitlines()[0][:300] if exc is not None else "unknown error"
    if os.environ.get("EDGE_SEL_DEBUG") == "1":
        traceback.print_exc(file=sys.stderr)
        return f"{summary} (traceback above)"
    details = traceback.format_exc()
    try:
        base = home()
    except EdgeSelError as e:
        return f"{summary} (set EDGE_SEL_DEBUG=1 for the traceback; no log written: {e})"
    try:
        logs = base / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log.write_text(f"edge-sel {' '.join(sys.argv[1:])}\n{details}", encoding="utf-8")
    except OSError:
        return f"{summary} (set EDGE_SEL_DEBUG=1 for the traceback; the log folder under {base} is not writable)"
    return f"{summary}; this is a bug, the traceback is in {log} (or set EDGE_SEL_DEBUG=1)"
