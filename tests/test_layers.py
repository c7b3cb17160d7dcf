"""The package's parts import only downward (../shared/DESIGN.md, "The house as built").

Every module belongs to one part; the test reads each module's `trades_repro` imports with
`ast` (top-level and inside functions alike) and checks them against the allowed directions,
so a new module must be placed in a part and a new import must respect the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trades_repro"

PARTS = {
    "face": {"__main__", "entry", "cli", "cli_claims", "cli_study", "demo"},
    "executors": {"runclaim", "executors", "executor_config", "runjob", "runlock", "status",
                  "smallscale"},
    "claims": {"claims", "claimkinds", "verify", "judges", "events", "stats", "report",
               "smallscale_stats", "smallscale_report"},
    "training": {"steps", "awp", "policies", "engine", "rngstate", "train", "progress"},
    "evaluation": {"evaluate", "landscape", "checkpoints", "diagnose", "preflight",
                   "checklist", "records", "evalfile", "verdict", "official"},
    "evidence": {"store"},
    "inputs": {"spec", "sweep", "data", "models", "tinyimagenet", "yamlio"},
    "math": {"attacks", "losses", "metrics"},
    "shared": {"__init__", "errors", "numerics", "evalbatch"},  # no part of ours imported
}
# What each part may import (besides itself and `shared`): downward only. Claims read
# evidence (eval.json records, the verdict rules) and inputs, and never train or attack.
ALLOWED = {
    "face": set(PARTS) - {"face"},
    "executors": {"claims", "training", "evaluation", "evidence", "inputs", "math"},
    "claims": {"evidence", "inputs"},  # and the READING modules of evaluation
    "training": {"evidence", "inputs", "math"},
    "evaluation": {"evidence", "inputs", "math"},
    "evidence": {"inputs"},
    "inputs": set(),
    "math": set(),
    "shared": set(),
}
# The evaluation modules that only describe or read results: what claims may import.
READING = {"records", "evalfile", "verdict", "landscape"}


def _part(module: str) -> str:
    (part,) = [name for name, members in PARTS.items() if module in members]
    return part


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "trades_repro":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("trades_repro."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("trades_repro.")}
    return found - {path.stem, "__version__"}


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_belongs_to_exactly_one_part():
    placed = [m for members in PARTS.values() for m in members]
    assert sorted(placed) == MODULES  # a new module is placed; no stale or doubled name


@pytest.mark.parametrize("module", MODULES)
def test_a_module_imports_only_downward(module):
    part = _part(module)
    for imported in _imports(PACKAGE / f"{module}.py"):
        target = _part(imported)
        if target in (part, "shared"):
            continue
        if part == "claims" and target == "evaluation":
            assert imported in READING, f"{module} (claims) runs evaluation: {imported}"
            continue
        assert target in ALLOWED[part], f"{module} ({part}) imports {imported} ({target})"


def test_the_rules_see_imports_inside_functions(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from trades_repro.train import train\n"
                      "    import trades_repro.attacks\n"
                      "from trades_repro import store, spec\n")
    assert _imports(source) == {"train", "attacks", "store", "spec"}
