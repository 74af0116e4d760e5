"""The Node.js binding (bindings/node, npm package ``edge-sel``) passes its own tests: the shared test vectors on the
tiny bundles rebuilt here (ONNX and ORT-format graphs), and its bad-input cases. Installs its npm dependencies first (``npm ci``;
``ONNXRUNTIME_NODE_INSTALL=skip`` because onnxruntime-node's install script otherwise downloads GPU binaries, while
the CPU binaries ship in the package)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bindings" / "node"
VECTORS = Path(__file__).resolve().parent / "vectors"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="Node.js (node and npm) is not installed on this machine")


def _installed(env) -> bool:
    """node_modules matches package-lock.json (npm ls exits non-zero on a missing or mismatched dependency)."""
    if not (PACKAGE / "node_modules").is_dir():
        return False
    return subprocess.run(["npm", "ls", "--depth=0"], cwd=PACKAGE, env=env, capture_output=True).returncode == 0


def _root(bundles: dict) -> str:
    roots = {Path(p).parent for p in bundles.values()}
    assert len(roots) == 1
    return str(roots.pop())


@pytest.fixture(scope="module")
def node_env() -> dict:
    """The environment to run the package in, its npm dependencies installed."""
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip", "npm_config_fund": "false", "npm_config_audit": "false"}
    if not _installed(env):
        out = subprocess.run(["npm", "ci"], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"npm ci failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return env


def test_node_binding_passes_its_tests(node_env, vector_bundles, vector_bundles_ort):
    env = dict(node_env)
    env.update(EDGE_SEL_VECTOR_BUNDLES=_root(vector_bundles), EDGE_SEL_VECTOR_BUNDLES_ORT=_root(vector_bundles_ort),
               EDGE_SEL_VECTORS=str(VECTORS))
    out = subprocess.run(["npm", "test", "--silent"], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=900)
    summary = [line for line in out.stdout.splitlines() if line.startswith(("# pass", "# fail", "# skipped", "not ok"))]
    assert out.returncode == 0, "node --test failed:\n" + "\n".join(summary) + "\n" + out.stdout[-6000:] + out.stderr[-2000:]
    assert "# fail 0" in summary and "# skipped 0" in summary, summary


OPEN_MINIMUM = r"""
const { Reranker } = require(process.argv[1]);
Reranker.open(process.argv[2], { memoryBudget: 1 }).then(() => process.exit(3), (e) => console.log(JSON.stringify(
  { name: e.name, minimum: e.minimumBytes })));
"""


def test_node_refuses_a_budget_below_what_it_can_run_with_pythons_numbers(node_env, vector_bundles):
    """The package keeps hidden states in memory, so the least budget it opens with is the Python planner's minimum
    without spilling (a single 64-token candidate); the per-call minimums are pinned by the vectors' plans."""
    from edge_sel.runtime.rerank import Reranker

    for name, bundle in vector_bundles.items():
        planner = Reranker(bundle, pruning="off", spill=False).planner
        expected = planner.minimum(64, 64, allow_spill=False, n_items=1)
        out = subprocess.run(["node", "-e", OPEN_MINIMUM, str(PACKAGE), str(bundle)], env=node_env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout) == {"name": "BudgetError", "minimum": expected}, name


def test_the_readme_install_line_gives_an_app_a_working_package(node_env, tmp_path):
    """The package README's install line, run as written from a fresh app folder against a clean copy of the package
    (no node_modules of its own, as in a fresh clone), gives an app whose ``import`` finds the package and its
    dependencies; a bare ``npm install FOLDER`` only links the folder and the import fails on 'tokenizers'."""
    line = next(l for l in (PACKAGE / "README.md").read_text().splitlines() if "npm install" in l and not l.startswith("#"))
    package = tmp_path / "edge_sel" / "bindings" / "node"
    package.mkdir(parents=True)
    for name in ("package.json", "package-lock.json", "index.js", "lib"):
        src = PACKAGE / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, package / name)
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "version": "1.0.0", "private": true}\n')
    command = line.replace("/path/to/edge_sel/bindings/node", str(package))
    out = subprocess.run(command, shell=True, cwd=app, env=node_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (app / "app.mjs").write_text('import { Reranker, BudgetError } from "edge-sel";\n'
                                 'console.log(typeof Reranker.open, typeof BudgetError);\n')
    run = subprocess.run(["node", "app.mjs"], cwd=app, env=node_env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["function", "function"], run.stderr[-2000:]
