"""Sweeps: a grid of specs as data, expanded exactly as the claims' arms are."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import assert_one_line_error
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from trades_repro.claims import load_catalogue
from trades_repro.cli import app
from trades_repro.spec import load_spec
from trades_repro.sweep import Sweep, load_sweep

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_table_2_sweep_is_the_claims_runs():
    _, specs = load_sweep(ROOT / "spec" / "sweeps" / "table_2_left.yaml")
    catalogue = load_catalogue(ROOT / "claims")
    arms = [f"c100_beta{b}_bs{n}_lr0p1" for b in (1, 3, 6) for n in (128, 256, 512)]
    wanted = {s.digest() for a in arms for s in catalogue.specs(a, "full")}
    assert {s.digest() for s in specs} == wanted and len(wanted) == 90


@given(betas=st.lists(st.sampled_from([0.5, 1, 3, 6]), min_size=1, max_size=3, unique=True),
       seeds=st.integers(1, 3))
def test_expansion_is_grid_times_seeds_with_overrides_applied(betas, seeds):
    sweep = Sweep(base="digits.yaml", set={"optim.epochs": 2}, grid={"method.beta": betas},
                  seeds=seeds)
    specs = sweep.expand(ROOT / "spec")
    assert len(specs) == len(betas) * seeds == len({s.digest() for s in specs})
    assert [s.method.beta for s in specs] == [b for b in betas for _ in range(seeds)]
    assert all(s.optim.epochs == 2 and s.data.dataset == "digits" for s in specs)
    base = load_spec(ROOT / "spec" / "digits.yaml")
    assert specs[0].model.width == base.model.width  # everything else is the base's


def test_spec_show_lists_a_sweeps_digests():
    result = runner.invoke(app, ["spec", "show", str(ROOT / "spec/sweeps/table_2_left.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith("90 runs") and len(lines) == 91
    assert "seed=9 method.beta=6 optim.batch_size=512" in lines[-1]


@pytest.mark.parametrize(("text", "needle"), [
    ("base: ../digits.yaml\ngrid: {method.beta: []}\n", "grid"),
    ("base: ../digits.yaml\nset: {method.colour: red}\n", "method.colour"),
    ("base: ../nowhere.yaml\n", "not found"),
    ("base: ../digits.yaml\nseeds: 0\n", "seeds"),
])
def test_bad_sweeps_exit_2(tmp_path, text, needle):
    (tmp_path / "digits.yaml").write_text((ROOT / "spec" / "digits.yaml").read_text())
    (tmp_path / "sweeps").mkdir()
    path = tmp_path / "sweeps" / "bad.yaml"
    path.write_text(text)
    assert_one_line_error(runner.invoke(app, ["spec", "show", str(path)]), needle)
