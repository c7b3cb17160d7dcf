"""CI's mutation gate (tests/mutation_gate.py) decides by its rules, and never exits 0 or 1
when it could not measure."""

from __future__ import annotations

import json

import mutation_gate as gate
import pytest


def _rate(killed: int, mutants: int) -> dict:
    return {"mutants": mutants, "killed": killed, "survived": []}


def test_a_drop_below_the_recorded_rate_fails_and_equal_or_better_passes():
    recorded = {"m.py": _rate(9, 10)}
    assert gate._compare({"m.py": _rate(9, 10)}, recorded) == 0
    assert gate._compare({"m.py": _rate(12, 12)}, recorded) == 0
    assert gate._compare({"m.py": _rate(8, 10)}, recorded) == 1
    assert gate._compare({"m.py": _rate(0, 0)}, recorded) == 1  # nothing tested any more


def test_missing_results_are_our_failure_exit_4(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gate, "_copy_tree", lambda root, copy: None)
    monkeypatch.setattr(gate, "_configure", lambda path: None)
    monkeypatch.setattr(gate.subprocess, "run", lambda *a, **k: None)  # mutmut did nothing
    assert gate.main(["--children", "1"]) == gate.OWN_FAILURE
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mutation gate: mutmut wrote no results for")


def test_a_pyproject_without_the_mutmut_keys_is_refused(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.mutmut]\nsource_paths = []\n")
    with pytest.raises(gate.GateError, match="no only_mutate"):
        gate._configure(pyproject)


def test_the_subset_replaces_the_full_runs_modules_and_tests(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.mutmut]\nonly_mutate = [\n    "a.py",\n]\n'
                         'pytest_add_cli_args_test_selection = ["t.py"]\nalso_copy = []\n')
    gate._configure(pyproject)
    text = pyproject.read_text()
    assert f"only_mutate = {json.dumps(gate.MODULES)}" in text
    assert f"pytest_add_cli_args_test_selection = {json.dumps(gate.TESTS)}" in text
    assert "also_copy = []" in text and '"a.py"' not in text
