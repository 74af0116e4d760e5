"""The hidden siblings a bundle writer leaves beside its target, and how the next writer tidies them up.

While a bundle is written, its files are staged in ``.NAME.partial-PID-RANDOM`` next to the target ``NAME``; when it
replaces an existing bundle, the old one is first moved to ``.NAME.old-PID``, then the staged one is renamed into
place. Both names carry the writer's process id, so a later writer can tell a sibling whose owner is still running
(left alone) from one whose owner died (killed, crashed, power lost). :func:`sweep` removes dead partials and, for a
dead ``.old-PID``, restores it when its target is missing (the writer died between the two renames) or removes it
when the target holds a valid bundle. Nothing without a process id in its name is touched.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["staging_dir", "backup_path", "owner_alive", "sweep"]

_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:partial-(?P<ppid>\d+)-[^/]+|old-(?P<opid>\d+))$")


def staging_dir(target: Path) -> Path:
    """Create and return a fresh staging directory for ``target`` (same parent, so the final rename is atomic)."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))


def backup_path(target: Path) -> Path:
    """Where ``target``'s previous bundle waits while the new one is renamed into place."""
    return target.parent / f".{target.name}.old-{os.getpid()}"


def owner_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OverflowError:
        return False
    return True


def sweep(parent: Path, is_bundle: Callable[[Path], bool]) -> list[Path]:
    """Tidy the siblings in ``parent`` whose owner process is gone; returns the targets restored.

    A dead partial is removed. A dead ``.NAME.old-PID`` is renamed back to ``NAME`` when ``NAME`` is missing, removed
    when ``NAME`` is a bundle (``is_bundle``), and left alone otherwise (whatever is at ``NAME`` now is not ours)."""
    restored: list[Path] = []
    try:
        entries = sorted(parent.iterdir(), key=lambda p: _mtime(p), reverse=True)  # newest backup wins a restore
    except OSError:
        return restored
    for p in entries:
        m = _SIBLING.match(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        pid = int(m["ppid"] or m["opid"])
        if owner_alive(pid):
            continue
        if m["ppid"] is not None:
            shutil.rmtree(p, ignore_errors=True)
            continue
        target = parent / m["name"]
        if not os.path.lexists(target):
            try:
                os.replace(p, target)
                restored.append(target)
            except OSError:
                pass
        elif is_bundle(target):
            shutil.rmtree(p, ignore_errors=True)
    return restored


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return 0.0
