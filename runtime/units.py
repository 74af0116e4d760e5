"""Human sizes: parse ``256MB`` / ``1.5GiB`` / ``1048576`` and print bytes readably; integer settings from the
environment (``EDGE_SEL_THREADS``, allocator thresholds) read with one clear error."""

from __future__ import annotations

import os
import re

from .errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes from ``"256MB"``, ``"1.5GiB"``, ``"4096"`` or a number. MB/GB are decimal, MiB/GiB binary."""
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise InputError(
                f"cannot read size {text!r}: expected a number with an optional unit, e.g. 256MB, 1.5GiB, 1048576"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise InputError(f"size must be positive, got {text!r}")
    return value


def format_size(n: float | int | None) -> str:
    """``134217728`` -> ``'128.0 MiB'``."""
    if n is None:
        return "-"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} GiB"


def format_min_size(n: int) -> str:
    """``format_size(n)`` rounded up at the precision it shows, for a minimum: the figure given back as a budget works
    ('50.4 MiB is below the minimum ... 50.4 MiB' when the minimum was 50.43 MiB)."""
    shown = format_size(n)
    if parse_size(shown.replace(" ", "")) >= n:
        return shown
    value, unit = shown.split()
    return f"{float(value) + (1 if unit == 'B' else 0.1):.{0 if unit == 'B' else 1}f} {unit}"


def env_int(name: str, default: int) -> int:
    """The integer in environment variable ``name`` (unset or blank: ``default``); anything else is an InputError
    naming it (a user's setting, not a bug)."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{name} must be an integer, got {raw!r}") from None
