"""Architecture rules of the package, checked on its source (``ast`` and text, nothing imported or run).

The package is four top-level folders mapped into the ``edge_sel`` namespace: ``runtime/`` (the lowest
layer), ``export/`` and ``devices/`` (may use the runtime), and the face ``edge_sel/`` (CLI, demo, public
API; uses everything). The rules:

(a) no import cycle between the four folders, and ``runtime/`` imports none of the others. Every import
    counts, also one inside a function (a lazy import is still a dependency): absolute ``edge_sel.X``
    and relative ones, resolved against the importing module's package;
(b) no access to another module's private attribute: ``x._name`` where ``x`` is not ``self``/``cls``/
    ``super()`` and ``_name`` is not defined in the same file (as a method or class attribute of a class
    of that file, a ``self._name`` / ``cls._name`` assignment, or a module-level name), and no
    ``from m import _name``. Dunder names are not private; namedtuple's ``_replace``/``_asdict``/
    ``_fields``/``_make`` are public API despite the underscore;
(c) no file in ``runtime/``, ``export/``, ``devices/``, ``edge_sel/`` longer than 400 lines unless one of the first
    five lines of its module docstring says why, starting ``Long because …`` or ``Over ~400 lines because …``;
(d) no reference to anything outside the repository in code or docs (tracked ``.py``/``.md``/``.toml``/
    ``.txt`` files): a section of a design document that is not here, a sibling checkout's shared folder, an
    issue tracker's issue or item by number — state the fact itself instead (the patterns are ``OUTSIDE``);
(e) no module outside the format modules (the ``runtime/manifest/`` package, ``runtime/bundle.py`` and
    ``runtime/bundle_writer.py``) indexes the bundle manifest by string. A *manifest expression* is an attribute
    ``.manifest``, a name ``manifest`` or ``*_manifest``, or a local name assigned from a manifest expression or
    from an indexing of one (``m = b.manifest``, ``p = m["prompt"]``); indexing one (``m["model"]``, in any
    context) or calling ``.get``/``.setdefault``/``.pop`` on one is a violation, reported once per outermost
    expression. Typed access goes through ``Bundle.spec``;
(f) the ``duplicates`` command (where installed) finds no pair of places sharing six or more lines
    with both places inside the four folders.
Each check also runs on planted violations (``test_checks_catch_planted_violations``), so none of them
passes vacuously.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"edge_sel": "edge_sel", "export": "edge_sel.export", "runtime": "edge_sel.runtime", "devices": "edge_sel.devices"}
FORMAT_MODULES = ("runtime/manifest/", "runtime/bundle.py", "runtime/bundle_writer.py")  # a folder: every module in it
MAX_LINES = 400
LONG_REASON = re.compile(r"(long|over\s+~?\d+\s+lines)\s+because\b", re.IGNORECASE)
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


# ---- source files -------------------------------------------------------------------------------
def py_files(root: Path, folders=tuple(FOLDERS)) -> list[Path]:
    return sorted(p for f in folders if (root / f).is_dir() for p in (root / f).rglob("*.py") if "__pycache__" not in p.parts)


def rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """(dotted name in the edge_sel namespace, is a package) of a file under one of the four folders."""
    parts = path.relative_to(root).with_suffix("").parts
    pkg = path.name == "__init__.py"
    if pkg:
        parts = parts[:-1]
    return ".".join([FOLDERS[parts[0]], *parts[1:]]), pkg


def folder_of(dotted: str) -> str | None:
    """The top-level folder a dotted ``edge_sel`` name lives in; None outside the four (third-party, benchmarks)."""
    if dotted != "edge_sel" and not dotted.startswith("edge_sel."):
        return None
    for folder, prefix in FOLDERS.items():
        if folder != "edge_sel" and (dotted == prefix or dotted.startswith(prefix + ".")):
            return folder
    if dotted.startswith("edge_sel.benchmarks"):
        return None
    return "edge_sel"


# ---- (a) imports ----------------------------------------------------------------------------------
def imported_names(tree: ast.AST, module: str, is_pkg: bool) -> list[tuple[str, int]]:
    """Every dotted name imported anywhere in the module (relative imports resolved), with its line."""
    out = []
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(mod if a.name == "*" else f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def folder_edges(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing folder, imported folder) -> evidence ``file:line name`` for imports crossing folders."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in py_files(root):
        src = rel(root, path).split("/")[0]
        mod, pkg = module_name(root, path)
        for name, line in imported_names(ast.parse(path.read_text(encoding="utf-8")), mod, pkg):
            dst = folder_of(name)
            if dst is not None and dst != src:
                edges.setdefault((src, dst), []).append(f"{rel(root, path)}:{line} {name}")
    return edges


def find_cycle(edges) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def layering_violations(root: Path) -> list[str]:
    edges = folder_edges(root)
    out = [f"runtime/ imports {dst}/: " + "; ".join(ev[:5]) for (src, dst), ev in sorted(edges.items()) if src == "runtime"]
    cycle = find_cycle(edges)
    if cycle:
        out.append("import cycle between folders " + " -> ".join(cycle) + ": " +
                   " | ".join(f"{a}->{b}: " + "; ".join(edges[(a, b)][:3]) for a, b in zip(cycle, cycle[1:])))
    return out


# ---- (b) private attributes --------------------------------------------------------------------
def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def own_private_names(tree: ast.Module) -> set[str]:
    own = set()
    for node in tree.body:  # module level
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                own |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    own |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")):
            own.add(node.attr)
    return {n for n in own if is_private(n)}


def private_access_violations(root: Path, folders=tuple(FOLDERS)) -> list[str]:
    out = []
    for path in py_files(root, folders):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = own_private_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                out += [f"{rel(root, path)}:{node.lineno} from {'.' * node.level}{node.module or ''} import {a.name}"
                        for a in node.names if is_private(a.name)]
            elif isinstance(node, ast.Attribute) and is_private(node.attr) and node.attr not in own | NAMEDTUPLE_API:
                v = node.value
                if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                    continue
                if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                    continue
                out.append(f"{rel(root, path)}:{node.lineno} {ast.unparse(node)}")
    return out


# ---- (c) file length ------------------------------------------------------------------------------
def long_file_violations(root: Path, folders=tuple(FOLDERS)) -> list[str]:
    out = []
    for path in py_files(root, folders):
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(LONG_REASON.match(line.strip()) for line in doc.splitlines()[:5]):
            out.append(f"{rel(root, path)}: {n} lines, no 'Long because ...' line in its docstring")
    return out


# ---- (d) references outside the repository ------------------------------------------------------
OUTSIDE = [re.compile(p, re.IGNORECASE) for p in (r"\bDESIGN(\.md)?\s*§", r"\.\./shared\b", r"\bissues?\s+#?\d+")]
TEXT_SUFFIXES = (".py", ".md", ".toml", ".txt", ".cfg", ".ini")


def tracked_text_files(root: Path) -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.splitlines()
        files = [root / n for n in names]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file below the root
        files = [p for p in root.rglob("*") if ".git" not in p.parts]
    return sorted(p for p in files if p.suffix in TEXT_SUFFIXES and p.is_file() and p.resolve() != Path(__file__).resolve())


def outside_reference_violations(root: Path) -> list[str]:
    out = []
    for path in tracked_text_files(root):
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE):
                out.append(f"{rel(root, path)}:{i}: {line.strip()[:100]}")
    return out


# ---- (e) manifest indexed by string --------------------------------------------------------------
def _is_manifest_name(name: str) -> bool:
    return name == "manifest" or name.endswith("_manifest")


GETTERS = ("get", "setdefault", "pop")
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _scope_nodes(scope: ast.AST):
    """The nodes of a module or function body, not descending into nested functions (scopes of their own)."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, SCOPES):
            todo.extend(ast.iter_child_nodes(node))


def _is_manifest(e: ast.AST, aliases: set[str]) -> bool:
    while True:  # an indexing (or .get) of a manifest expression is part of the manifest
        if isinstance(e, ast.Subscript):
            e = e.value
        elif isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr in GETTERS:
            e = e.func.value
        else:
            break
    if isinstance(e, ast.Attribute):
        return _is_manifest_name(e.attr)
    return isinstance(e, ast.Name) and (_is_manifest_name(e.id) or e.id in aliases)


def _manifest_base(node: ast.AST) -> ast.AST | None:
    """What ``node`` indexes when it is an indexing of the manifest: ``x`` of ``x[...]`` or ``x.get(...)``."""
    if isinstance(node, ast.Subscript):
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in GETTERS:
        return node.func.value
    return None


def manifest_index_violations(root: Path) -> list[str]:
    out: set[str] = set()
    for path in py_files(root):
        r = rel(root, path)
        if any(r == m or (m.endswith("/") and r.startswith(m)) for m in FORMAT_MODULES):
            continue

        def visit(scope, inherited: set[str]):
            nodes = list(_scope_nodes(scope))
            aliases, changed = set(inherited), True
            while changed:  # to a fixed point: m = b.manifest; p = m["prompt"]
                changed = False
                for n in nodes:
                    if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None and _is_manifest(n.value, aliases):
                        for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                            if isinstance(t, ast.Name) and t.id not in aliases:
                                aliases.add(t.id)
                                changed = True
            hits = [n for n in nodes if (b := _manifest_base(n)) is not None and _is_manifest(b, aliases)]
            inner = {id(sub) for h in hits for sub in ast.walk(_manifest_base(h))}
            out.update(f"{r}:{h.lineno} {ast.unparse(h)[:80]}" for h in hits if id(h) not in inner)
            for n in nodes:
                if isinstance(n, SCOPES):
                    visit(n, aliases)

        visit(ast.parse(path.read_text(encoding="utf-8")), set())
    return sorted(out)


# ---- (f) duplicates --------------------------------------------------------------------------------
DUP_ROW = re.compile(r"^D\d+ (\S+):\d+-\d+ ~ (\S+):\d+-\d+")


def duplicate_pairs(root: Path) -> tuple[list[str], list[str]]:
    """(rows with both places inside the four folders, incomplete/left-out notes)."""
    res = subprocess.run(["duplicates", "--most", "200", "--seconds", "120"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    rows, notes = [], []
    for line in res.stdout.splitlines():
        m = DUP_ROW.match(line)
        if m and all(p.split("/")[0] in FOLDERS for p in m.groups()):
            rows.append(line)
        elif line.startswith("incomplete:"):
            notes.append(line)
    return rows, notes


# ---- the checks on this repository ---------------------------------------------------------------
RULES = [
    pytest.param(layering_violations, id="a-no-folder-import-cycle-runtime-imports-nothing"),
    pytest.param(private_access_violations, id="b-no-cross-module-private-access"),
    pytest.param(long_file_violations, id="c-no-long-file-without-a-reason"),
    pytest.param(outside_reference_violations, id="d-no-reference-outside-the-repository"),
    pytest.param(manifest_index_violations, id="e-only-the-format-modules-index-the-manifest"),
]


@pytest.mark.parametrize("rule", RULES)
def test_the_repository_follows_the_rule(rule):
    assert rule(REPO) == []


def test_f_no_duplicated_code():
    if shutil.which("duplicates") is None:
        pytest.skip("the `duplicates` command is not installed on this machine")
    rows, notes = duplicate_pairs(REPO)
    assert notes == [] and rows == []


# One line matching every OUTSIDE pattern, assembled from pieces so that this file itself points nowhere.
PLANTED_DESIGN = "DESIGN" + " \u00a73"
PLANTED_OUTSIDE = f"See {PLANTED_DESIGN} and {'..'}/shared/x.md; {'issue'} 3 item 3."

# ---- every check can fail -------------------------------------------------------------------------
def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checks_catch_planted_violations(tmp_path):
    bad = _plant(tmp_path / "bad", {
        "runtime/__init__.py": "",
        "runtime/engine.py": "from edge_sel.export import graphs\n\ndef f(b):\n    return b._pool + b.manifest['dims']['hidden']\n",
        "runtime/helpers.py": "from ..devices import probe\nfrom .engine import _hidden\n",
        "runtime/manifests.py": "def h(manifest):\n    return manifest['files']\n",  # beside the format package, not in it
        "export/__init__.py": "def g(bundle):\n    m = bundle.manifest\n    p = m['prompt']\n    return p.get('prefix'), m.get('x')\n",
        "export/graphs.py": "from ..runtime import engine\n",
        "devices/__init__.py": "from edge_sel import cli\n",
        "edge_sel/__init__.py": "from edge_sel.runtime import engine\n",
        "edge_sel/cli.py": '"""The CLI."""\n' + "x = 1\n" * 401,
        "edge_sel/ok.py": '"""Fine.\n\nLong because one table of 402 rows reads best in one place."""\n' + "x = 1\n" * 402,
        "export/ok.py": '"""Fine.\n\nOver ~400 lines because it is one table."""\n' + "x = 1\n" * 402,
        "docs/NOTES.md": PLANTED_OUTSIDE + "\n",
    })
    errs = layering_violations(bad)
    assert any(e.startswith("runtime/ imports export/") for e in errs)
    assert any(e.startswith("runtime/ imports devices/") for e in errs)
    assert any("import cycle" in e for e in errs)
    priv = private_access_violations(bad)
    assert any("b._pool" in e for e in priv) and any("import _hidden" in e for e in priv)
    assert long_file_violations(bad) == ["edge_sel/cli.py: 402 lines, no 'Long because ...' line in its docstring"]
    assert len(outside_reference_violations(bad)) == 1 and PLANTED_DESIGN in outside_reference_violations(bad)[0]
    assert len(OUTSIDE) == 3 and all(p.search(PLANTED_OUTSIDE) for p in OUTSIDE)
    mani = manifest_index_violations(bad)
    assert any("b.manifest['dims']['hidden']" in e for e in mani) and not any(e.endswith("b.manifest['dims']") for e in mani)
    assert any("m['prompt']" in e for e in mani) and any("p.get('prefix')" in e for e in mani)
    assert any("m.get('x')" in e for e in mani)
    assert any(e.startswith("runtime/manifests.py") for e in mani)

    good = _plant(tmp_path / "good", {
        "runtime/__init__.py": "",
        "runtime/engine.py": "class E:\n    def __init__(self):\n        self._pool = 1\n    def same(self, other):\n"
                             "        return other._pool + self._pool\n",
        "runtime/manifest/document.py": "def parse(manifest):\n    return manifest['dims']\n",
        "export/__init__.py": "from edge_sel.runtime.engine import E\n\ndef g(bundle):\n    return bundle.spec.dims.hidden\n",
        "edge_sel/__init__.py": "from edge_sel import export, runtime\n",
    })
    assert layering_violations(good) == [] and private_access_violations(good) == []
    assert manifest_index_violations(good) == [] and long_file_violations(good) == []
