"""Every exit code of `diagnose` (and the crash code of every command), through CliRunner.

0 not overestimated, 1 overestimated, 2 bad input (pre-flight included), 3 inconclusive,
4 the evaluation itself failed (traceback in a log file). Models are factories written to a
temporary module, with weights from `prototype_linear` (no training needed).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _evalutil import prototype_linear
from factories import assert_one_line_error
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from trades_repro import evaluate as ev
from trades_repro.cli import app
from trades_repro.diagnose import read_eval

runner = CliRunner()
NETS = '''
import torch
from torch import nn


def linear():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def softmax():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))


def five_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))


def cifar_shaped():  # expects 3x32x32 images
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def broken():
    raise RuntimeError("this factory needs a GPU")
'''


@pytest.fixture
def nets(tmp_path, monkeypatch) -> Path:
    (tmp_path / "exit_nets.py").write_text(NETS)
    (tmp_path / "exit_nets_bad.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = prototype_linear().state_dict()
    save_file(good, tmp_path / "linear.safetensors")
    save_file({"1.weight": good["1.weight"], "1.bias": good["1.bias"]},
              tmp_path / "softmax.safetensors")
    torch.manual_seed(0)
    for name, width, classes in (("five", 64, 5), ("cifar", 3072, 10)):
        layer = torch.nn.Linear(width, classes)
        save_file({"1.weight": layer.weight.detach(), "1.bias": layer.bias.detach()},
                  tmp_path / f"{name}.safetensors")
    return tmp_path


def _diagnose(folder: Path, weights: str, factory: str, *extra: str):
    return runner.invoke(app, ["diagnose", str(folder / f"{weights}.safetensors"),
                               "--dataset", "digits", "--eps", "0.1", "--factory",
                               _target(factory), "--quiet", *extra])


def _target(factory: str) -> str:
    return "exit_nets_bad:linear" if factory == "x:linear" else f"exit_nets:{factory}"


@pytest.mark.parametrize(("weights", "factory", "needles"), [
    ("cifar", "cifar_shaped", ("model fails on this dataset's images", "[1, 8, 8]")),
    ("five", "five_classes", ("outputs 5 classes", "dataset has 10")),
    ("linear", "broken", ("raised RuntimeError", "this factory needs a GPU")),
    ("linear", "x:linear", ("importing 'exit_nets_bad' raised ZeroDivisionError",)),
    ("softmax", "softmax", ("outputs probabilities", "remove its final softmax")),
])
def test_models_that_do_not_fit_exit_2_before_any_attack(nets, weights, factory, needles,
                                                         monkeypatch):
    monkeypatch.setattr(ev, "RUNNERS", {})  # any attack would raise KeyError: none may run
    assert_one_line_error(_diagnose(nets, weights, factory, "--attacks", "pgd10"), *needles)


def test_n_examples_0_is_bad_input_not_the_default(nets):
    result = _diagnose(nets, "linear", "linear", "--n-examples", "0")
    assert_one_line_error(result, "--n-examples 0", "at least 1")
    result = _diagnose(nets, "linear", "linear", "--save-adversarial")
    assert_one_line_error(result, "--save-adversarial needs --out")


def test_no_verdict_exits_3_and_keeps_the_checked_adversarial_examples(nets):
    out = nets / "out"
    result = _diagnose(nets, "linear", "linear", "--attacks", "pgd10", "--n-examples", "20",
                       "--out", str(out), "--save-adversarial", "--seed", "7")
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().startswith("error: inconclusive: no verdict")
    assert len(result.stderr.strip().splitlines()) == 1
    (record,) = read_eval(out / "eval.json").checkpoints.values()
    check = record.adversarial["pgd10"]
    assert check.ok and record.settings.seed == 7
    saved = load_file(out / check.file)
    assert saved["x_adv"].shape == (20, 1, 8, 8) and saved["y"].shape == (20,)


def test_an_unexpected_failure_exits_4_with_the_traceback_in_a_log(nets, monkeypatch):
    def explode(*args):
        raise ZeroDivisionError("deep inside an attack")

    monkeypatch.setitem(ev.RUNNERS, "pgd10", explode)
    result = _diagnose(nets, "linear", "linear", "--attacks", "pgd10", "--n-examples", "20")
    assert result.exit_code == 4, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ZeroDivisionError: deep inside an attack" in lines[0]
    log = Path(re.search(r"traceback in (\S+)\)", lines[0]).group(1))
    text = log.read_text()
    assert "Traceback" in text and "explode" in text
    log.unlink()


@pytest.mark.parametrize("error", [
    KeyError("surprise"),
    BrokenPipeError(32, "a worker's pipe"),  # not stdout's or stderr's: still our crash
    SystemExit(0),  # code we called ended the process: "0" must not pass for "held"
    SystemExit(1),
])
def test_every_wrapped_command_exits_4_on_an_unexpected_error(tmp_path, monkeypatch, error):
    import trades_repro.train as training

    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr(training, "train", explode)
    spec = Path(__file__).resolve().parents[1] / "spec" / "digits.yaml"
    result = runner.invoke(app, ["train", str(spec), "--runs-dir", str(tmp_path), "--quiet"])
    assert result.exit_code == 4, result.output
    assert f"train failed unexpectedly: {type(error).__name__}" in result.stderr
    Path(re.search(r"traceback in (\S+)\)", result.stderr).group(1)).unlink()



@pytest.mark.parametrize("command", [
    ["spec", "show", "spec/digits.yaml"],  # typer.echo
    ["verify", "--tier", "cpu", "--runs-dir", "evidence/cpu"],  # a rich table
])
def test_a_reader_that_closes_the_pipe_stops_the_command_quietly_with_141(command):
    """`trades-repro … | head` used to end 'spec_show failed unexpectedly: BrokenPipeError'
    (exit 4, a traceback log) or, through rich's own handler, exit 1, verify's 'a claim
    failed'. The reader's end is closed before the command has imported torch, so its
    first write meets the closed pipe."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "trades_repro", *command], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 141, stderr.decode()
    assert stderr.decode() == ""


def test_an_inconclusive_verdict_says_inconclusive_once(nets):
    """The error line read 'error: inconclusive: inconclusive: PGD-10 exceeds Square …'."""
    result = runner.invoke(app, [  # at ε = 0.001 neither attack moves an image: margin 0
        "diagnose", str(nets / "linear.safetensors"), "--dataset", "digits", "--eps", "0.001",
        "--factory", "exit_nets:linear", "--quiet", "--attacks", "pgd10,square",
        "--n-examples", "10", "--square-queries", "20"])
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: inconclusive: PGD-10 ") and "straddles" in line, line
    assert line.count("inconclusive") == 1


def _record_with(outcome: str):
    from trades_repro.records import Verdict

    verdict = Verdict(rule="pgd10_minus_square_v2", version=2, attack="square", threshold=0.08,
                      pgd10=None, other=None, margin=None, flagged=None, outcome=outcome)
    return SimpleNamespace(verdicts=[verdict], attacks={})


@pytest.mark.parametrize(("outcomes", "code"), [
    (["clear", "clear"], 0), (["clear", "flagged"], 1), (["inconclusive", "flagged"], 1),
    (["clear", "inconclusive"], 3), (["no_verdict"], 3), ([], 3)])
def test_evaluate_exits_on_the_worst_verdict_of_its_checkpoints(outcomes, code):
    import typer

    from trades_repro.cli import _exit_on_verdicts
    from trades_repro.errors import Inconclusive

    records = [_record_with(o) for o in outcomes]
    if code == 0:
        assert _exit_on_verdicts(records) is None
    elif code == 1:
        with pytest.raises(typer.Exit) as stop:
            _exit_on_verdicts(records)
        assert stop.value.exit_code == 1
    else:
        with pytest.raises(Inconclusive) as caught:
            _exit_on_verdicts(records)
        if not records:
            assert str(caught.value) == "no checkpoint was evaluated"


def test_evaluates_inconclusive_line_names_squares_reduced_budget():
    from trades_repro.cli import _exit_on_verdicts
    from trades_repro.errors import Inconclusive
    from trades_repro.records import AttackResult, Verdict

    square = AttackResult(name="square", paper_column="Square", accuracy=0.5, n_robust=10,
                          n_examples=20, robust="1" * 10 + "0" * 10, seconds=1.0,
                          params={"queries": 200})
    verdict = Verdict(rule="pgd10_minus_square_v2", version=2, attack="square", threshold=0.08,
                      pgd10=0.6, other=0.5, margin=0.1, flagged=None, outcome="inconclusive",
                      n=20, b=2, c=0, p_value=0.5, ci_low=-0.01, ci_high=0.3)
    record = SimpleNamespace(verdicts=[verdict], attacks={"square": square})
    with pytest.raises(Inconclusive) as caught:
        _exit_on_verdicts([record])
    assert str(caught.value).startswith(
        "PGD-10 exceeds Square (200 queries, reduced from AutoAttack's 5000) by 10.0 points")
