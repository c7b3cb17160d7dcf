"""The mutation runs (tests/mutation_gate.py) decide by their rules, never exit 0 or 1 when
they could not measure, and name only tests and modules that exist."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import mutation_gate as gate
import pytest

ROOT = Path(gate.__file__).resolve().parents[1]


def _rate(killed: int, mutants: int) -> dict:
    return {"mutants": mutants, "killed": killed, "survived": []}


def test_a_drop_below_the_recorded_rate_fails_and_equal_or_better_passes():
    recorded = {"m.py": _rate(9, 10)}
    assert gate._compare({"m.py": _rate(9, 10)}, recorded) == 0
    assert gate._compare({"m.py": _rate(12, 12)}, recorded) == 0
    assert gate._compare({"m.py": _rate(8, 10)}, recorded) == 1
    assert gate._compare({"m.py": _rate(0, 0)}, recorded) == 1  # nothing tested any more
    assert gate._compare({}, recorded) == 1  # a recorded module left out of the run
    assert gate._compare({}, recorded, partial=True) == 0  # --group: another group's module
    assert gate._compare({"m.py": _rate(8, 10)}, recorded, partial=True) == 1


def test_missing_results_are_our_failure_exit_4(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gate, "_copy_tree", lambda root, copy: None)
    monkeypatch.setattr(gate, "_configure", lambda path, group: None)
    monkeypatch.setattr(gate.subprocess, "run", lambda *a, **k: None)  # mutmut did nothing
    assert gate.main(["--children", "1"]) == gate.OWN_FAILURE
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mutation gate: mutmut wrote no results for")


def test_a_run_with_no_recorded_rates_stops_before_mutating(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gate.SUITES, "full", (gate.FULL, tmp_path / "absent.json"))
    monkeypatch.setattr(gate, "_run", lambda *a: pytest.fail("ran without a baseline"))
    assert gate.main(["--full"]) == gate.OWN_FAILURE
    assert "run it with --record first" in capsys.readouterr().err


def test_a_pyproject_without_the_mutmut_keys_is_refused(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.mutmut]\nsource_paths = []\n")
    with pytest.raises(gate.GateError, match="no only_mutate"):
        gate._configure(pyproject, gate.QUICK[0])


def test_the_subset_replaces_the_full_runs_modules_and_tests(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.mutmut]\nonly_mutate = [\n    "a.py",\n]\n'
                         'pytest_add_cli_args_test_selection = ["t.py"]\nalso_copy = []\n')
    group = gate.FULL[-1]
    gate._configure(pyproject, group)
    text = pyproject.read_text()
    assert f"only_mutate = {json.dumps(list(group.modules))}" in text
    assert f"pytest_add_cli_args_test_selection = {json.dumps(list(group.tests))}" in text
    assert "also_copy = []" in text and '"a.py"' not in text


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("group", gate.QUICK + gate.FULL, ids=lambda g: g.name)
def test_every_group_names_modules_and_tests_that_exist(group):
    """A renamed test or module would otherwise drop out of the selection silently (mutmut
    collects what it finds) and lower what the run checks without failing it."""
    for module in group.modules:
        assert (ROOT / module).is_file(), module
    for test in group.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        assert not name or name in _test_functions(ROOT / path), test
    dotted = tuple(m.removesuffix(".py").replace("/", ".") + "." for m in group.modules)
    assert all(pattern.startswith(dotted) for pattern in group.mutants), group.mutants


def test_the_full_run_mutates_each_module_in_one_group_only():
    modules = [m for g in gate.FULL for m in g.modules]
    assert len(modules) == len(set(modules))
    assert {"trades_repro/train.py", "trades_repro/verdict.py"} <= set(modules)


def test_groups_are_chosen_by_name_and_only_with_the_full_run(capsys):
    assert gate._parse(["--full", "--group", "verdict"]).group == ["verdict"]
    for argv in (["--group", "verdict"], ["--full", "--group", "nonsense"], ["--children", "0"]):
        with pytest.raises(SystemExit) as stop:
            gate._parse(argv)
        assert stop.value.code == 2  # bad input
    assert "add --full" in capsys.readouterr().err


def test_recording_some_groups_keeps_the_other_modules(tmp_path, monkeypatch):
    baseline = tmp_path / "full.json"
    monkeypatch.setattr(gate, "ROOT", tmp_path)
    gate._record(baseline, {"a.py": _rate(1, 2), "b.py": _rate(2, 2)}, {"ga": 3.0, "gb": 1.0},
                 4.2, partial=False)
    assert json.loads(baseline.read_text())["minutes"] == 4.2
    gate._record(baseline, {"b.py": _rate(1, 2)}, {"gb": 2.0}, 2.0, partial=True)
    record = json.loads(baseline.read_text())
    assert record["modules"] == {"a.py": _rate(1, 2), "b.py": _rate(1, 2)}
    assert record["group_minutes"] == {"ga": 3.0, "gb": 2.0} and record["minutes"] == 5.0


def test_an_unexpected_error_is_our_failure_never_0_or_1(monkeypatch, capsys):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(gate, "_run", broken)
    assert gate.main(["--children", "1"]) == gate.OWN_FAILURE
    assert capsys.readouterr().err.strip() == "mutation gate: OSError: disk full"
