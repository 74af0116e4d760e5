"""Temporary folders a call owns (spilled hidden states, the recall cold store), named after their owner process.

A call removes its folder when it ends, also on an exception; a process that is killed cannot. Each folder is
named ``edge_sel-KIND-PID-RANDOM`` so that the next call creating a folder of the same kind in the same place
removes those whose owner process is gone (:func:`owned_tempdir`) and never touches a living process's folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .siblings import owner_alive

__all__ = ["owned_tempdir", "sweep_dead"]


def sweep_dead(kind: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the ``edge_sel-KIND-PID-*`` folders in ``root`` (default: the temp directory) whose owner is gone."""
    parent = Path(root) if root is not None else Path(tempfile.gettempdir())
    pattern = re.compile(rf"^edge_sel-{re.escape(kind)}-(\d+)-")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not owner_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def owned_tempdir(kind: str, root: str | os.PathLike | None = None) -> Path:
    """A fresh folder ``edge_sel-KIND-<this pid>-RANDOM`` in ``root``, after sweeping dead owners' folders there."""
    sweep_dead(kind, root)
    return Path(tempfile.mkdtemp(prefix=f"edge_sel-{kind}-{os.getpid()}-", dir=root))
