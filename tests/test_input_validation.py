"""Bad spec and sweep input is exit 2 with one line naming the file and field (QA audit).

Each test here failed before its fix: a non-UTF-8 file or a malformed sweep crashed (exit 4),
overflowing or boolean numbers were accepted or crashed later, huge seed counts hung, sweep
grids listed one run twice, and three messages named the wrong problem.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.factories import assert_one_line_error
from trades_repro import yamlio
from trades_repro.cli import app
from trades_repro.errors import BadInput
from trades_repro.spec import ExperimentSpec, SpecError, load_spec, parse_spec
from trades_repro.sweep import Sweep, load_sweep

runner = CliRunner()
NOT_UTF8 = b"\xff\xfe\x00garbage"


def _base(folder: Path) -> Path:
    (folder / "base.yaml").write_text("data: {dataset: digits}\ndevice: cpu\n")
    return folder / "base.yaml"


def _file(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# ------------------------------------------------------------- 1, 2: reading YAML files


def _commands(path: Path, runs: Path) -> list[list[str]]:
    return [["spec", "show", str(path)], ["train", str(path), "--runs-dir", str(runs)],
            ["study", "sweep", str(path), "--dry-run", "--runs-dir", str(runs)],
            ["study", "probe", str(path), "--runs-dir", str(runs)]]


@pytest.mark.parametrize("command", range(4))
def test_a_file_that_is_not_utf8_is_bad_input_naming_it(tmp_path, command):
    path = _file(tmp_path, "bin.yaml", NOT_UTF8)
    result = runner.invoke(app, _commands(path, tmp_path / "runs")[command])
    assert_one_line_error(result, str(path), "not UTF-8")


def test_the_yaml_reader_names_the_file_for_every_problem(tmp_path):
    cases = {_file(tmp_path, "bin.yaml", NOT_UTF8): "not UTF-8 text (byte 0xff at offset 0)",
             _file(tmp_path, "m.yaml", "name: x\n  bad: [\n"): "malformed YAML (line 2",
             _file(tmp_path, "d.yaml", "name: x\nname: y\n"): "malformed YAML (line 2, column 1): "
                                                           "key 'name' given twice",
             tmp_path / "missing.yaml": "file not found", tmp_path: "a directory"}
    for path, message in cases.items():
        with pytest.raises(yamlio.YAMLFileError) as caught:
            yamlio.read(path)
        assert isinstance(caught.value, BadInput)
        assert str(caught.value).startswith(f"{path}: {message}")
    assert yamlio.read(_file(tmp_path, "ok.yaml", "a: [1, 2]\n")) == {"a": [1, 2]}


def test_a_sweep_base_that_is_not_utf8_is_a_spec_error(tmp_path):
    """An arm's base spec is read here too: `claims` wraps the SpecError with the claim."""
    _file(tmp_path, "base.yaml", NOT_UTF8)
    with pytest.raises(SpecError, match="base.yaml: not UTF-8"):
        Sweep(base="base.yaml").expand(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    ("name: x\n  bad: [\n", "malformed YAML (line 2, column 6): mapping values"),
    ("name: x\nname: y\n", "malformed YAML (line 2, column 1): key 'name' given twice"),
])
@pytest.mark.parametrize("command", ["sweep", "probe"])
def test_study_commands_report_malformed_sweep_files_as_bad_input(tmp_path, content, message,
                                                                  command):
    path = _file(tmp_path, "s.yaml", content)
    extra = ["--dry-run"] if command == "sweep" else []
    result = runner.invoke(app, ["study", command, str(path), *extra, "--runs-dir",
                                 str(tmp_path / "runs")])
    assert_one_line_error(result, f"{path}: {message}")
    with pytest.raises(SpecError, match="malformed YAML"):
        load_sweep(path)


# ------------------------------------------------------------------- 3, 4: numbers


@pytest.mark.parametrize(("text", "field"), [
    ("method: {attack: {eps: 1e400}}", "method.attack.eps"),  # YAML 1.1: a string; overflowed
    ("method: {beta: 1e400}", "method.beta"),
    ("seed: 99999999999999999999999", "seed"),
    ("seed: 4294967296", "seed"),  # 2**32: trained seed 0's weights bit for bit
    ("evaluation: {seed: 4294967296}", "evaluation.seed"),
    ("optim: {lr: 1e308}", "optim.lr"),
    ("optim: {lr: 1e13}", "optim.lr"),
    ("model: {width: 100000000}", "model.width"),
    ("optim: {epochs: 1000000}", "optim.epochs"),
    ("optim: {batch_size: 100000000}", "optim.batch_size"),
    ("method: {attack: {steps: 100000000}}", "method.attack.steps"),
    ("data: {synthetic: {n_train: 100000000}}", "data.synthetic.n_train"),
])
def test_overflowing_and_typo_sized_numbers_are_refused_by_field(tmp_path, text, field):
    path = _file(tmp_path, "bad.yaml", text + "\n")
    with pytest.raises(SpecError, match=rf"bad\.yaml: field '{field}'"):
        load_spec(path)
    assert_one_line_error(runner.invoke(app, ["spec", "show", str(path)]), field)


def test_the_largest_32_bit_seed_is_a_seed():
    assert parse_spec({"seed": 2**32 - 1}).seed == 2**32 - 1


@pytest.mark.parametrize(("raw", "field"), [
    ({"optim": {"epochs": True}}, "optim.epochs"),
    ({"seed": False}, "seed"),
    ({"model": {"width": True}}, "model.width"),
    ({"optim": {"lr": True}}, "optim.lr"),
    ({"method": {"beta": True}}, "method.beta"),
    ({"method": {"attack": {"eps": False}}}, "method.attack.eps"),
])
def test_a_boolean_is_not_a_number(raw, field):
    """`epochs: true` trained one epoch: pydantic's lax mode reads True as 1."""
    with pytest.raises(SpecError, match=rf"field '{field}'"):
        parse_spec(raw)


def test_yaml_ints_floats_and_fractions_still_read_as_before(tmp_path):
    path = _file(tmp_path, "ok.yaml", "seed: 3\nmethod: {beta: 6, attack: {eps: 8/255}}\n"
                                      "optim: {lr: 0.05, epochs: 10, batch_size: 32}\n")
    spec = load_spec(path)
    assert (spec.seed, spec.method.beta, spec.method.attack.eps) == (3, 6.0, 8 / 255)
    assert (spec.optim.lr, spec.optim.epochs, spec.optim.batch_size) == (0.05, 10, 32)
    assert ExperimentSpec().digest() == "357e671213af2a9e"  # bounds add no field


# ----------------------------------------------------------------- 5, 6: sweeps


@pytest.mark.parametrize("seeds", ["100000000", "[" + ", ".join(map(str, range(1001))) + "]"],
                         ids=["count", "list"])
def test_a_huge_seed_count_is_refused_at_once(tmp_path, seeds):
    _base(tmp_path)
    path = _file(tmp_path, "s.yaml", f"base: base.yaml\nseeds: {seeds}\n")
    start = time.monotonic()
    result = runner.invoke(app, ["spec", "show", str(path)])
    assert_one_line_error(result, str(path), "seeds")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(("seeds", "runs"), [(1, 100_000), (1000, 10_000_000)])
def test_a_huge_grid_is_refused(seeds, runs):
    axes = {f"axis{i}": list(range(10)) for i in range(4 if seeds > 1 else 5)}
    with pytest.raises(ValueError, match=f"{runs} runs"):
        Sweep(base="base.yaml", grid=axes, seeds=seeds)


@pytest.mark.parametrize(("sweep", "message"), [
    ("grid: {method.beta: [1, 1]}", "field 'grid': Value error, axis 'method.beta' lists 1 twice"),
    ("grid: {method.beta: [1, 1.0]}", "axis 'method.beta' lists 1.0 twice"),
    ("grid: {seed: [1]}\nseeds: 2", "field 'grid': Value error, 'seed' is set by 'seeds'"),
    ("grid: {seed: [1, 2]}", "'seed' is set by 'seeds'"),
    ("set: {seed: 5}", "field 'set': Value error, 'seed' is set by 'seeds'"),
    ("set: {method.beta: 1}\ngrid: {method.beta: [3, 6]}",
     "'method.beta' is in both 'set' and 'grid'"),
    ("grid: {method.beta: [1, 3]}\nseeds: [3, 3]", "a seed is listed twice"),
    ("grid: {evaluation.attacks: [[square], [pgd10], [square]]}",
     "axis 'evaluation.attacks' lists ['square'] twice"),
])
def test_a_sweep_lists_each_run_once_under_its_own_values(tmp_path, sweep, message):
    _base(tmp_path)
    path = _file(tmp_path, "s.yaml", f"base: base.yaml\n{sweep}\n")
    assert_one_line_error(runner.invoke(app, ["spec", "show", str(path)]), str(path), message)


def test_grid_values_that_make_the_same_spec_are_refused(tmp_path):
    """1 and "1/1" are different YAML but the same β: the sweep would list one run twice."""
    _base(tmp_path)
    sweep = Sweep(base="base.yaml", grid={"method.beta": [1, "1/1"]})
    with pytest.raises(SpecError, match=r"\(method.beta=1/1, seed=0\): the same spec as "
                                        r"\(method.beta=1, seed=0\)"):
        sweep.expand(tmp_path)


def test_settings_outside_the_digest_may_still_vary_in_a_grid(tmp_path):
    _base(tmp_path)
    specs = Sweep(base="base.yaml", grid={"evaluation.square_queries": [1000, 5000]}).expand(
        tmp_path)
    assert len({s.digest() for s in specs}) == 1 and len(specs) == 2


# --------------------------------------------------------------------- 7: messages


def test_a_directory_given_as_a_spec_is_called_a_directory(tmp_path):
    assert_one_line_error(runner.invoke(app, ["spec", "show", str(tmp_path)]),
                          f"{tmp_path}: a directory, not a spec file")
    assert_one_line_error(runner.invoke(app, ["train", str(tmp_path), "--runs-dir",
                                              str(tmp_path / "runs")]), "a directory")


@pytest.mark.parametrize("command", ["sweep", "probe"])
def test_a_missing_sweep_file_is_called_missing(tmp_path, command):
    extra = ["--dry-run"] if command == "sweep" else []
    result = runner.invoke(app, ["study", command, str(tmp_path / "nonexist.yaml"), *extra,
                                 "--runs-dir", str(tmp_path / "runs")])
    assert_one_line_error(result, f"{tmp_path / 'nonexist.yaml'}: sweep file not found")
    result = runner.invoke(app, ["study", command, str(tmp_path), *extra, "--runs-dir",
                                 str(tmp_path / "runs")])
    assert_one_line_error(result, f"{tmp_path}: a directory, not a sweep file")


def test_training_a_sweep_file_says_it_is_a_sweep(tmp_path):
    _base(tmp_path)
    path = _file(tmp_path, "s.yaml", "base: base.yaml\ngrid: {method.beta: [1, 3]}\n")
    result = runner.invoke(app, ["train", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert_one_line_error(result, f"{path}: a sweep file", "study sweep")


def test_an_axis_of_distinct_lists_is_fine(tmp_path):
    _base(tmp_path)
    path = _file(tmp_path, "s.yaml", "base: base.yaml\n"
                 "grid: {evaluation.attacks: [[square], [pgd10]]}\n")
    sweep, specs = load_sweep(path)
    assert [s.evaluation.attacks for s in specs] == [("square",), ("pgd10",)]


def test_number_messages_say_what_is_wrong():
    with pytest.raises(SpecError, match=r"a boolean is not a number: True$"):
        parse_spec({"method": {"beta": True}})
    with pytest.raises(SpecError, match=r"too large for a float: '1e400'$"):
        parse_spec({"optim": {"lr": "1e400"}})


def test_the_sweep_file_message_names_the_commands(tmp_path):
    _base(tmp_path)
    path = _file(tmp_path, "s.yaml", "base: base.yaml\ngrid: {method.beta: [1, 3]}\n")
    with pytest.raises(SpecError) as refused:
        load_spec(path)
    assert str(refused.value) == (f"{path}: a sweep file (it has 'base'), not a spec: run its "
                                  "specs with `trades-repro study sweep`, or list them with "
                                  "`trades-repro spec show`")


def test_a_bad_base_spec_is_named_by_its_own_path(tmp_path):
    base = _file(tmp_path, "base.yaml", "optim: {epochs: 0}\n")
    path = _file(tmp_path, "s.yaml", "base: base.yaml\n")
    with pytest.raises(SpecError) as refused:
        load_sweep(path)
    assert str(refused.value).startswith(f"{base.resolve()}: field 'optim.epochs'")


def test_a_yaml_error_without_a_position_is_still_one_line():
    import yaml

    assert yamlio.describe(yaml.YAMLError("boom\nmore")) == "malformed YAML: boom"


def test_an_unreadable_yaml_file_says_why(tmp_path, monkeypatch):
    path = _file(tmp_path, "x.yaml", "a: 1\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(yamlio.YAMLFileError) as refused:
        yamlio.read(path)
    assert str(refused.value) == f"{path}: cannot read: Permission denied"


def test_a_parse_error_says_the_problem_not_the_context(tmp_path):
    # PyYAML's message starts with the context ("while parsing a flow sequence"); the line
    # says what is wrong, where
    path = _file(tmp_path, "m.yaml", "a: [1, 2\n")
    with pytest.raises(yamlio.YAMLFileError) as refused:
        yamlio.read(path)
    assert str(refused.value) == (f"{path}: malformed YAML (line 2, column 1): expected ',' or "
                                  "']', but got '<stream end>'")
