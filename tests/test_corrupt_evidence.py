"""Evidence cut or edited outside trades-repro is bad input that names the file (exit 2) for
every command that reads it, never a run silently left out of a verdict or a report, and
never a crash of ours (exit 4) when the file is valid JSON or torch of the wrong shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_corrupt_files
import torch
import yaml
from claimsutil import arm, claims_folder, own_count, write_run
from factories import assert_one_line_error
from typer.testing import CliRunner

from trades_repro import store
from trades_repro.claims import load_catalogue
from trades_repro.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
finished = test_corrupt_files.finished  # one trained run, and `run`, a copy of it to spoil
run = test_corrupt_files.run
RATE = own_count("table_9.rate", "a", 2, 2)  # any count of the two runs holds: only the
# reading of their files is under test


@pytest.fixture
def evidence(tmp_path) -> tuple[Path, list[Path]]:
    """Fabricated evidence of a two-seed arm: (its claims folder, its two run folders)."""
    claims = claims_folder(tmp_path, {"a": arm(seeds=2)}, [RATE])
    specs = load_catalogue(claims).specs("a", "full")
    return claims, [write_run(tmp_path / "runs", spec, square=0.2) for spec in specs]


def _verify(claims: Path, runs: Path):
    return runner.invoke(app, ["verify", "table_9.rate", "--tier", "full", "--runs-dir",
                               str(runs), "--claims-dir", str(claims), "--allow-partial"])


def _report(runs: Path, out: Path):
    return runner.invoke(app, ["study", "report", "--evidence", str(runs), "--out", str(out)])


def _folder_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()


SPOILED = {  # file: (how it is spoiled, what the one line says)
    "eval.json cut": (store.EVAL_FILE, lambda p: p.write_text("{"), "not a valid eval file"),
    "eval.json a folder": (store.EVAL_FILE, _folder_instead, "a folder, not a file"),
    "spec.json not UTF-8": (store.SPEC_FILE, lambda p: p.write_bytes(b"\xff\xfe"),
                            "not valid JSON"),
    "spec.json not a spec": (store.SPEC_FILE, lambda p: p.write_text('{"foo": 1}'),
                             "field 'foo'"),
    "provenance.json a list": (store.PROVENANCE_FILE, lambda p: p.write_text("[]"),
                               "not a JSON object"),
    "metrics.jsonl a folder": (store.METRICS_FILE, _folder_instead, "a folder, not a file"),
}


@pytest.mark.parametrize("case", SPOILED.values(), ids=SPOILED.keys())
def test_verify_and_the_study_report_name_a_spoiled_run_file(evidence, tmp_path, case):
    """Both used to judge or report on the other runs (verify: 'held (partial)', exit 0)."""
    name, spoil, why = case
    claims, (folder, _) = evidence
    spoil(folder / name)
    assert_one_line_error(_verify(claims, folder.parent), f"{folder / name}: {why}")
    assert_one_line_error(_report(folder.parent, tmp_path / "r.md"), f"{folder / name}: {why}")
    assert not (tmp_path / "r.md").exists()


def test_a_run_not_evaluated_yet_is_not_spoiled(evidence, tmp_path):
    claims, (folder, _) = evidence
    (folder / store.EVAL_FILE).unlink()
    judged = _verify(claims, folder.parent)
    assert judged.exit_code == 0 and "partial" in judged.stdout, judged.output
    assert _report(folder.parent, tmp_path / "r.md").exit_code == 0


def _edit_eps(folder: Path, eps: float) -> None:
    raw = json.loads((folder / store.SPEC_FILE).read_text())
    raw["validation"]["eps"] = raw["method"]["attack"]["eps"] = eps
    (folder / store.SPEC_FILE).write_text(json.dumps(raw))


def test_a_spec_edited_away_from_its_folders_digest_is_named(evidence):
    claims, (folder, _) = evidence
    _edit_eps(folder, 0.3)
    assert_one_line_error(_verify(claims, folder.parent), f"{folder / store.SPEC_FILE}: its "
                          "digest", f"does not match the folder's name {folder.name}")
    folder.rename(folder.with_name("a copy"))  # a copy named by hand is not checked
    assert _verify(claims, folder.parent).exit_code == 0


def test_evaluate_refuses_a_spec_edited_away_from_its_folders_digest(run):
    """It evaluated at the edited ε 0.3 and filed the records under the old digest, exit 0."""
    _, folder = run
    _edit_eps(folder, 0.3)
    result = runner.invoke(app, ["evaluate", str(folder), "--attacks", "pgd10",
                                 "--n-examples", "8", "--quiet"])
    assert_one_line_error(result, f"{folder / store.SPEC_FILE}: its digest",
                          f"does not match the folder's name {folder.name}")
    assert not (folder / store.EVAL_FILE).exists()


@pytest.mark.skipif(not (ROOT / "evidence" / "cpu").is_dir(),
                    reason="a copy without the committed evidence (a mutation run's)")
def test_every_committed_run_folder_is_named_by_its_specs_digest():
    spec_files = sorted((ROOT / "evidence" / "cpu").glob(f"*/{store.SPEC_FILE}"))
    assert spec_files
    assert all(store.run_digest(path) == path.parent.name for path in spec_files)


@pytest.mark.parametrize("case", [(store.PROVENANCE_FILE, lambda p: p.write_text("[]"),
                                   "not a JSON object"),
                                  (store.EVAL_FILE, _folder_instead, "a folder, not a file")],
                         ids=["provenance.json a list", "eval.json a folder"])
def test_evaluate_names_a_run_file_of_the_wrong_shape(run, case):
    name, spoil, why = case
    _, folder = run
    (folder / store.EVAL_FILE).write_text("{}")
    spoil(folder / name)
    result = runner.invoke(app, ["evaluate", str(folder), "--attacks", "pgd10",
                                 "--n-examples", "8", "--quiet"])
    assert_one_line_error(result, f"{folder / name}: {why}")


def test_diagnose_names_an_eval_json_that_is_a_folder(run, tmp_path):
    _, folder = run
    (tmp_path / "out" / store.EVAL_FILE).mkdir(parents=True)
    model = yaml.safe_load((folder / store.SPEC_FILE).read_text())["model"]
    result = runner.invoke(app, ["diagnose", str(folder / store.BEST_FILE), "--dataset",
                                 "digits", "--model", model["arch"], "--width",
                                 str(model["width"]), "--eps", "0.1", "--attacks", "pgd10",
                                 "--n-examples", "8", "--out", str(tmp_path / "out"),
                                 "--quiet"])
    assert_one_line_error(result, f"{tmp_path / 'out' / store.EVAL_FILE}: a folder, not a file")


def _interrupt(folder: Path) -> None:
    provenance = store.read_json(folder / store.PROVENANCE_FILE)
    (folder / store.PROVENANCE_FILE).write_text(json.dumps({**provenance,
                                                            "status": "interrupted"}))


def _train(spec: Path, folder: Path):
    return runner.invoke(app, ["train", str(spec), "--runs-dir", str(folder.parent), "--quiet"])


@pytest.mark.parametrize("line", ["garbage{", "[]", "{}"])
def test_resuming_names_a_step_log_line_that_is_not_a_record(run, line):
    spec, folder = run
    _interrupt(folder)
    (folder / store.BATCHES_FILE).write_text(line + "\n")
    assert_one_line_error(_train(spec, folder), f"{folder / store.BATCHES_FILE}, line 1: not "
                          "a record", "move the run folder aside")


@pytest.mark.parametrize("saved", [{"x": 1}, [1, 2]], ids=["dict", "list"])
def test_read_last_names_a_torch_file_that_is_not_a_resume_state(tmp_path, saved):
    torch.save(saved, tmp_path / store.LAST_FILE)
    with pytest.raises(store.CorruptFile, match=r"last.pt: not a resume state \(lacks "
                                                r"digest, model, optimizer, state, rng\)"):
        store.read_last(tmp_path / store.LAST_FILE)


def test_read_last_reads_what_training_saved(run):
    _, folder = run
    assert store.read_last(folder / store.LAST_FILE)["digest"] == folder.name


def test_resuming_names_a_last_checkpoint_that_is_not_a_resume_state(run):
    spec, folder = run
    _interrupt(folder)
    torch.save({"x": 1}, folder / store.LAST_FILE)
    assert_one_line_error(_train(spec, folder), f"{folder / store.LAST_FILE}: not a resume "
                          "state", "move it aside to train this run again")
