"""A run file cut or edited outside trades-repro is bad input that names the file (exit 2),
not a crash of ours (exit 4): our writers are atomic, so only something else tears them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from factories import assert_one_line_error, digits
from typer.testing import CliRunner

from trades_repro import store
from trades_repro.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """One finished two-epoch digits run: (its spec file, its run folder)."""
    root = tmp_path_factory.mktemp("corrupt")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(digits()))
    result = runner.invoke(app, ["train", str(spec), "--runs-dir", str(root / "runs"),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    return spec, Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def run(finished, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished run to spoil: (spec file, run folder under tmp_path/runs)."""
    spec, folder = finished
    copy = tmp_path / "runs" / folder.name
    shutil.copytree(folder, copy)
    return spec, copy


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_cut_metrics_line_names_the_file_and_line(run):
    spec, folder = run
    lines = (folder / store.METRICS_FILE).read_text().splitlines()
    (folder / store.METRICS_FILE).write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    result = runner.invoke(app, ["train", str(spec), "--runs-dir", str(folder.parent)])
    assert_one_line_error(result, f"{folder / store.METRICS_FILE}, line 2: not an epoch record",
                          "move the run folder aside")


@pytest.mark.parametrize("name", [store.SPEC_FILE, store.CHECKPOINTS_FILE])
def test_a_json_file_that_is_not_json_names_the_file(run, name):
    _, folder = run
    (folder / name).write_text("garbage")
    result = runner.invoke(app, ["evaluate", str(folder), "--attacks", "pgd10",
                                 "--n-examples", "8", "--quiet"])
    assert_one_line_error(result, f"{folder / name}: not valid JSON")


def test_a_cut_last_checkpoint_names_the_file_and_how_to_go_on(run):
    spec, folder = run
    provenance = store.read_json(folder / store.PROVENANCE_FILE)
    (folder / store.PROVENANCE_FILE).write_text(json.dumps({**provenance,
                                                            "status": "interrupted"}))
    _cut(folder / store.LAST_FILE, 5000)
    result = runner.invoke(app, ["train", str(spec), "--runs-dir", str(folder.parent),
                                 "--quiet"])
    assert_one_line_error(result, f"{folder / store.LAST_FILE}: cannot be read",
                          "move it aside to train this run again")
    (folder / store.LAST_FILE).unlink()  # as the message says: the run starts over
    result = runner.invoke(app, ["train", str(spec), "--runs-dir", str(folder.parent),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(store.read_metrics(folder)) == 2


def test_read_json_and_read_metrics_raise_a_value_error_callers_already_catch(tmp_path):
    (tmp_path / "x.json").write_bytes(b"\xff\xfe")
    with pytest.raises(store.CorruptFile, match="x.json: not valid JSON") as caught:
        store.read_json(tmp_path / "x.json")
    assert isinstance(caught.value, ValueError)
    (tmp_path / store.METRICS_FILE).write_text("{}\n")
    with pytest.raises(store.CorruptFile, match=r"line 1: not an epoch record \(Field "
                                                r"required\)"):
        store.read_metrics(tmp_path)


@pytest.mark.parametrize("status", ["interrupted", "failed", "running", "unknown", None])
def test_evaluate_refuses_a_run_that_has_not_finished(run, status):
    """run-claim and verify take any record of a policy as that policy's result: a record
    of a mid-training best checkpoint, later replaced, would have stood for the finished
    run ('done', never evaluated again)."""
    _, folder = run
    provenance = folder / store.PROVENANCE_FILE
    recorded = store.read_json(provenance)
    if status is None:
        provenance.unlink()
    elif status == "unknown":  # a provenance without a status
        provenance.write_text(json.dumps({k: v for k, v in recorded.items() if k != "status"}))
    else:
        provenance.write_text(json.dumps({**recorded, "status": status}))
    result = runner.invoke(app, ["evaluate", str(folder), "--attacks", "pgd10",
                                 "--n-examples", "8", "--quiet"])
    assert_one_line_error(result, f"{folder}: the run has not finished")
    assert result.stderr == (
        f"error: {folder}: the run has not finished ({status or 'never started'}), so its "
        "checkpoints may still change; finish it with `trades-repro train`, or score a file "
        "as it is now with `trades-repro diagnose FILE --out ANOTHER_FOLDER`\n")
    assert not (folder / store.EVAL_FILE).exists()
