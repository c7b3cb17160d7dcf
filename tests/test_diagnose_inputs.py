"""`diagnose`'s inputs the auditor found mishandled: an edited factory resumed as the old one,
a model calling sys.exit, non-finite input gradients, wrapped and legacy checkpoint files,
and a sample too small for the chance check. Models are factories written to a temporary
module, with weights from `prototype_linear` (no training needed).
"""

from __future__ import annotations

import pickle
import sys

import pytest
import torch
from _evalutil import digits_test, prototype_linear
from factories import assert_one_line_error
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from trades_repro import evaluate as ev
from trades_repro.checkpoints import CheckpointError, load_state_dict
from trades_repro.cli import app
from trades_repro.diagnose import diagnose, read_eval
from trades_repro.preflight import PreflightError, preflight

runner = CliRunner()
NET = '''
import sys

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        {body}


def build():
    return Net()
'''
QUANTIZED = "return self.net(torch.round(x * 16) / 16)"  # digits are multiples of 1/16


@pytest.fixture
def weights(tmp_path):
    """`prototype_linear`'s weights under the factory's `Net` names."""
    path = tmp_path / "net.safetensors"
    save_file({f"net.{k}": v for k, v in prototype_linear().state_dict().items()}, path)
    return path


def _factory(tmp_path, monkeypatch, name: str, body: str) -> str:
    """Write module `name` with `Net.forward` = `body`; a fresh import on next use."""
    (tmp_path / f"{name}.py").write_text(NET.format(body=body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return f"{name}:build"


def _run(weights, factory: str, *extra: str):
    return runner.invoke(app, ["diagnose", str(weights), "--dataset", "digits", "--eps", "0.1",
                               "--factory", factory, "--quiet", *extra])


# ------------------------------------------------------------- (1) the resume key


def test_an_edited_factory_starts_a_new_record_and_the_same_one_resumes(
        tmp_path, monkeypatch, weights):
    # the key was (file hash, "factory mod:fn"): the edited model got the old verdict back
    runs: list[str] = []
    real = ev.RUNNERS["pgd10"]
    monkeypatch.setitem(ev.RUNNERS, "pgd10", lambda *a: runs.append("pgd10") or real(*a))
    out = tmp_path / "out"

    def run() -> ev.CheckpointEval:
        return diagnose(weights, dataset="digits", factory="edit_nets:build", eps=0.1,
                        n_examples=20, attacks=("pgd10",), device="cpu", out=out)

    _factory(tmp_path, monkeypatch, "edit_nets", QUANTIZED)
    first = run()
    _factory(tmp_path, monkeypatch, "edit_nets", "return self.net(x)")
    second = run()
    assert runs == ["pgd10", "pgd10"], "the edited model must be attacked, not resumed"
    assert second.key != first.key
    assert second.attacks["pgd10"].accuracy < first.attacks["pgd10"].accuracy  # unmasked
    third = run()  # the same model again: resumed, nothing attacked
    assert runs == ["pgd10", "pgd10"] and third.key == second.key
    assert len(read_eval(out / "eval.json").checkpoints) == 2
    # an edit the first batch cannot show (here a comment; in general a branch other
    # images take) is another file: attacked again, as any edit must be
    _factory(tmp_path, monkeypatch, "edit_nets", "return self.net(x)  # edited")
    fourth = run()
    assert runs == ["pgd10"] * 3 and fourth.key != second.key


# ------------------------------------------------------------- (2) sys.exit in forward


def test_a_model_calling_sys_exit_in_forward_exits_2(tmp_path, monkeypatch, weights):
    # SystemExit is not an Exception: diagnose exited 0, "not overestimated"
    factory = _factory(tmp_path, monkeypatch, "quit_nets", "sys.exit(0)")
    assert_one_line_error(_run(weights, factory, "--n-examples", "20"), "SystemExit")


class _ExitsWithGrad(nn.Module):
    """Exits only when the input requires a gradient: past the no-grad forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.net = prototype_linear()

    def forward(self, x):
        if x.requires_grad:
            sys.exit(0)
        return self.net(x)


def test_a_model_calling_sys_exit_in_the_gradient_check_is_bad_input():
    x, y = digits_test(50)
    with pytest.raises(CheckpointError, match="SystemExit"):
        preflight(_ExitsWithGrad(), x, y, 10, device="cpu", attacks=("pgd10",))


# ------------------------------------------------------------- (3) non-finite gradients


class _NaNGradient(nn.Module):
    """Finite logits, NaN input gradient: where's unused branch is sqrt of a negative."""

    def __init__(self, zeros_only: bool = False) -> None:
        super().__init__()
        self.net, self.zeros_only = prototype_linear(), zeros_only

    def forward(self, x):
        if self.zeros_only:  # d/dx sqrt(x)**2 at x = 0 is 0 * inf: NaN at black pixels only
            return self.net(torch.sqrt(x) ** 2)
        return self.net(torch.where(x > -1, x, torch.sqrt(x - 2)))


def _checks(model: nn.Module) -> dict[str, str]:
    x, y = digits_test(50)
    result = preflight(model, x, y, 10, device="cpu", attacks=("pgd10", "square"))
    return {f.check: f.message for f in result.checks}


def test_nonfinite_input_gradients_are_flagged_with_how_many():
    x, _ = digits_test(50)
    message = _checks(_NaNGradient())["nonfinite_gradients"]
    assert f"{x.numel()} of {x.numel()}" in message and "FOSC" in message
    zeros = int((x == 0).sum())
    assert f"{zeros} of {x.numel()}" in _checks(_NaNGradient(zeros_only=True))[
        "nonfinite_gradients"]
    assert "nonfinite_gradients" not in _checks(prototype_linear())


# ------------------------------------------------------------- (4), (6) checkpoint files


def test_a_wrapper_key_holding_a_string_is_skipped(tmp_path):
    tensors = prototype_linear().state_dict()
    for name, wrapped in [("str.pt", {"net": "small_cnn", "model_state_dict": tensors}),
                          ("meta.pt", {"model": {"arch": "small_cnn"}, "state_dict": None,
                                       "model_state_dict": tensors})]:
        torch.save(wrapped, tmp_path / name)
        assert load_state_dict(tmp_path / name).keys() == tensors.keys(), name


def test_a_raw_pickle_checkpoint_fails_in_one_line_without_torchs_warning(tmp_path):
    path = tmp_path / "raw.pkl"
    with path.open("wb") as handle:  # protocol > 2: torch's weights-only loader warns
        pickle.dump(prototype_linear().state_dict(), handle, protocol=4)
    result = runner.invoke(app, ["diagnose", str(path), "--dataset", "digits",
                                 "--model", "small_cnn", "--quiet"])
    assert_one_line_error(result, "raw.pkl", "not a checkpoint")



def test_a_folder_given_as_the_checkpoint_is_named_a_folder(tmp_path):
    """It said 'checkpoint file not found' for a folder that plainly exists."""
    result = runner.invoke(app, ["diagnose", str(tmp_path), "--dataset", "digits",
                                 "--model", "small_cnn", "--quiet"])
    assert_one_line_error(result, f"{tmp_path}: a folder, not a checkpoint file")
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_state_dict(tmp_path / "absent.pt")

# ------------------------------------------------------------- (5) too few examples


def test_too_few_examples_for_the_chance_check_name_the_option_not_the_weights():
    x, y = digits_test(2)
    model = prototype_linear()
    assert (model(x).argmax(1) == y).all()
    with pytest.raises(PreflightError) as caught:
        preflight(model, x[:1], y[:1], 10, device="cpu")
    message = str(caught.value)
    assert "--n-examples 1" in message and "at least 2" in message
    assert "weights" not in message
    assert preflight(model, x, y, 10, device="cpu").clean_correct == 2  # 2/2: p = 0.01


def test_diagnose_with_one_example_exits_2_naming_n_examples(tmp_path, monkeypatch, weights):
    factory = _factory(tmp_path, monkeypatch, "one_nets", "return self.net(x)")
    assert_one_line_error(_run(weights, factory, "--n-examples", "1"), "--n-examples 1",
                          "at least 2")
