"""Every ``edge-sel ...`` command line the README, docs/ and the ``--help`` examples show parses as written.

A newcomer copies these lines; a flag that was renamed or removed must fail here, not on their machine.
Lines with placeholders (``BUNDLE``, ``<...>``, ``[...]``) are skipped: they describe a syntax, not a command.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edge_sel.parser import EXAMPLES, build_parser
from edge_sel.profile import profile_options

ROOT = Path(__file__).resolve().parents[1]


def _doc_lines() -> list[tuple[str, str]]:
    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash)?\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            lines += [(doc.name, ln.strip()) for ln in block.splitlines() if ln.strip().startswith("edge-sel ")]
    for name, text in EXAMPLES.items():
        lines += [(f"--help of {name}", ln.strip()) for ln in text.splitlines() if ln.strip().startswith("edge-sel ")]
    return lines


def _is_syntax(line: str) -> bool:
    return any(a == "BUNDLE" or a.startswith(("<", "[")) for a in shlex.split(line, comments=True)[1:])


LINES = [(w, ln) for w, ln in _doc_lines() if not _is_syntax(ln)]  # a syntax line describes, it is not copied


def test_the_docs_show_commands():
    assert len(LINES) > 40  # the extraction itself still finds the tour, the generate and the profile sections


@pytest.mark.parametrize("where,line", LINES, ids=[f"{w}: {ln[:60]}" for w, ln in LINES])
def test_documented_command_parses(where, line):
    argv = shlex.split(line, comments=True)[1:]
    try:
        args = build_parser().parse_args(argv)
        if args.command == "profile":  # its own options, then the arguments of the call it profiles
            _, rest = profile_options().parse_known_args(args.rest)
            build_parser().parse_args([args.task, args.bundle, *rest])
    except SystemExit as e:
        pytest.fail(f"{where}: `{line}` does not parse (exit {e.code})")
