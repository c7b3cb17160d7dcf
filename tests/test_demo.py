"""`trades-repro demo` (issue 19, part 4) on fabricated evidence for its three runs: the plan is
seed 0 of the cpu tier's arms, the table and plot come from the runs, and the exit codes hold.
Nothing here trains: the demo's real timing is in README.md and docs/small_scale.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from claimsutil import write_run
from typer.testing import CliRunner

from trades_repro import demo
from trades_repro import smallscale_stats as sst
from trades_repro.claims import load_catalogue
from trades_repro.cli import app
from trades_repro.executors import FAILED_FILE

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "claims"
runner = CliRunner()


@pytest.fixture(scope="module")
def planned() -> list[demo.DemoRun]:
    return demo.plan(load_catalogue(CLAIMS))


def _finish(runs_dir: Path, run: demo.DemoRun, **attacks) -> Path:
    """A finished, evaluated run of `run.spec`, its record made with the spec's evaluation
    settings for every policy the run is read at."""
    folder = write_run(runs_dir, run.spec, fosc=[0.3, 0.2, 0.6, 0.5], **attacks)
    evals = json.loads((folder / "eval.json").read_text())
    (record,) = evals["checkpoints"].values()
    record["settings"]["n_examples"] = run.spec.evaluation.n_examples
    record["policies"] = list(sst.policies_of(run.spec))
    (folder / "eval.json").write_text(json.dumps(evals))
    return folder


def test_the_demo_is_seed_0_of_each_cpu_tier_arm(planned):
    catalogue = load_catalogue(CLAIMS)
    assert [r.arm for r in planned] == [arm for _, arm in demo.ARMS]
    for run in planned:
        first = next(s for s in catalogue.specs(run.arm, "cpu") if s.seed == 0)
        assert run.spec.seed == 0 and run.spec.digest() == first.digest()
        assert run.spec.data.dataset == "fashion_mnist"
    assert [r.spec.healing.enabled for r in planned] == [False, True, False]
    assert [r.spec.optim.batch_size for r in planned] == [32, 32, 128]  # longest first


def test_download_is_asked_for_without_changing_the_runs(planned):
    fetched = demo.plan(load_catalogue(CLAIMS), download=True)
    assert all(r.spec.data.download for r in fetched)
    assert [r.spec.digest() for r in fetched] == [r.spec.digest() for r in planned]


def test_the_demo_prints_one_row_per_run_and_plots_them(planned, tmp_path):
    _finish(tmp_path, planned[0], pgd10=0.32, square=0.19, clean=0.71)  # flagged: 13 points
    _finish(tmp_path, planned[1], pgd10=0.21, square=0.15, clean=0.70)
    _finish(tmp_path, planned[2], pgd10=0.11, square=0.05, clean=0.54)
    png = tmp_path / "fig" / "demo.png"
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--claims-dir",
                                 str(CLAIMS), "--plot", str(png), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [row[0] for row in rows] == ["risky", "risky", "safe"]
    assert rows[0][1:5] == ["71.0", "32.0", "19.0", "13.0"] and rows[0][-2:] == ["flagged",
                                                                                 "0.60"]
    assert rows[2][-3:] == ["not", "flagged", "0.60"]
    assert "3 of 3 runs in" in result.output and png.stat().st_size > 10_000
    assert "β 1, batch 32, LR 0.05, Algorithm 1 at FOSC 0.58" in result.output


def test_a_failed_run_exits_1_and_the_others_are_still_shown(planned, tmp_path):
    for run in planned[1:]:
        _finish(tmp_path, run)
    broken = tmp_path / planned[0].spec.digest()
    broken.mkdir()
    (broken / FAILED_FILE).write_text(json.dumps({"error": "loss is NaN"}))
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--claims-dir",
                                 str(CLAIMS), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "loss is NaN" in result.output and "2 of 3 runs in" in result.output
    assert (tmp_path / "demo_fosc.png").is_file()


def test_missing_fashion_mnist_is_bad_input_in_one_line_before_any_run(planned, tmp_path,
                                                                       monkeypatch):
    from trades_repro import data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-copy")
    monkeypatch.setattr(data, "DEFAULT_ROOT", tmp_path / "no-data")
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["demo", "--runs-dir", str(runs), "--claims-dir", str(CLAIMS),
                                 "--quiet"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "apt-get install" in result.output
    assert not any(runs.glob("*/spec.json"))  # nothing started


@pytest.mark.parametrize("args", [["--plot", "."], ["--plot", "fosc.pdf"]])
def test_a_plot_path_that_is_no_png_file_is_bad_input_in_one_line(tmp_path, args):
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--claims-dir",
                                 str(CLAIMS), *args])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--plot" in result.output and not any(tmp_path.iterdir())  # nothing started


def test_jobs_below_one_is_bad_input(tmp_path):
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--jobs", "0"])
    assert result.exit_code == 2 and "--jobs" in result.output


def test_a_missing_claims_folder_is_bad_input_in_one_line(tmp_path):
    result = runner.invoke(app, ["demo", "--runs-dir", str(tmp_path), "--claims-dir",
                                 str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_text_table_aligns_numbers_right_and_names_left():
    lines = demo.text_table([["run", "clean"], ["risky + Alg. 1", "7.5"], ["safe", "54.4"]])
    assert lines == ["run             clean", "risky + Alg. 1    7.5", "safe             54.4"]
