"""`diagnose` on any checkpoint: loading without unpickling code, bad input, the verdict's exit."""

from __future__ import annotations

import json

import pytest
import torch
from _evalutil import Quantized, trained_run
from factories import assert_one_line_error
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from trades_repro import store
from trades_repro.checkpoints import (
    CheckpointError,
    build_arch,
    load_factory,
    load_state_dict,
    load_weights,
)
from trades_repro.cli import app
from trades_repro.diagnose import parse_attacks, parse_eps
from trades_repro.evaluate import EvaluationError
from trades_repro.spec import ModelSpec

runner = CliRunner()
FAST = ["--attacks", "square-only", "--square-queries", "300", "--n-examples", "30",
        "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_run(tmp_path_factory.getbasetemp()) / store.BEST_FILE


def _diagnose(path, *extra: str):
    return runner.invoke(app, ["diagnose", str(path), "--dataset", "digits", "--eps", "0.1",
                               *extra])


def _small_cnn(width: int = 16) -> torch.nn.Module:
    return build_arch(ModelSpec(arch="small_cnn", width=width), "digits", (1, 8, 8), 10)


def test_state_dicts_load_from_every_usual_container(tmp_path):
    tensors = _small_cnn().state_dict()
    torch.save(tensors, tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": tensors}, tmp_path / "nested.pth")
    torch.save({f"module.{k}": v for k, v in tensors.items()}, tmp_path / "parallel.pt")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "weights.bin")
    for name in ("plain.pt", "nested.pth", "parallel.pt", "weights.bin"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == tensors.keys(), name
        load_weights(_small_cnn(), loaded, tmp_path / name, "small_cnn")


class _Code:  # an arbitrary object: unpickling it would run code
    pass


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not a checkpoint at all", "not a checkpoint"),
        (None, "refusing to unpickle code"),
        ({"epoch": 3, "optimizer": "sgd"}, "no state dict inside"),
    ],
)
def test_files_that_are_not_weights_are_refused(tmp_path, content, needle):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content if content is not None else {"w": _Code()}, path)
    with pytest.raises(CheckpointError, match=needle):
        load_state_dict(path)


def test_architecture_mismatch_names_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_small_cnn(16).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not match architecture .*shape"):
        load_weights(_small_cnn(32), load_state_dict(path), path, "small_cnn")


def test_factory_is_imported_from_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text("import torch\n"
                                         "def tiny():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_factory("my_nets:tiny")(), torch.nn.Linear)
    for target, needle in [("my_nets", "module:function"), ("no_such_mod:f", "cannot import"),
                           ("my_nets:nothing", "no callable")]:
        with pytest.raises(CheckpointError, match=needle):
            load_factory(target)


def test_attack_and_eps_parsing():
    assert parse_attacks(["square-only"]) == ("pgd10", "square")
    assert parse_attacks(["square,pgd10", "apgd-t"]) == ("pgd10", "apgd-t", "square")
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    for bad in ("0", "1.5", "-0.1", "x"):
        with pytest.raises(EvaluationError, match="--eps"):
            parse_eps(bad)


def test_bad_input_exits_2_with_one_line(tmp_path, checkpoint):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(_diagnose(text, "--model", "small_cnn"), "not a checkpoint")
    assert_one_line_error(_diagnose(checkpoint, "--model", "small_cnn", "--width", "32"),
                    "does not match architecture small_cnn")
    assert_one_line_error(_diagnose(checkpoint, "--model", "small_cnn", "--attacks", "pgd20"),
                    "unknown attack 'pgd20'")
    assert_one_line_error(_diagnose(checkpoint, "--model", "small_cnn", "--eps", "2"),
                    "--eps 2", "out of range")
    assert_one_line_error(_diagnose(checkpoint, "--model", "small_cnn", "--width", "16",
                              "--n-examples", "1000"), "--n-examples 1000", "297")
    assert_one_line_error(_diagnose(checkpoint), "--model ARCH or --factory")
    assert_one_line_error(_diagnose(checkpoint, "--model", "vgg16"), "model.arch")
    assert_one_line_error(runner.invoke(app, ["evaluate", str(tmp_path)]), "not a run folder")


@pytest.mark.slow
def test_diagnose_prints_the_table_and_verdict_and_exits_0(checkpoint):
    result = _diagnose(checkpoint, "--model", "small_cnn", "--width", "16", *FAST)
    assert result.exit_code == 0, result.output
    for row in ("clean", "pgd10 (PGD-10)", "square (Square)", "FOSC", "SGCS",
                "landscape roughness", "autoattack", "adversarial re-check"):
        assert row in result.stdout
    assert "settings: n=30, eps=0.1, seed 0, Square (300 queries, reduced from AutoAttack's" \
        in result.stdout
    assert "verdict: no overestimation detected" in result.stdout
    assert "(rule pgd10_minus_square_v1)" in result.stdout
    assert "(rule pgd10_minus_square_v2)" in result.stdout


@pytest.mark.slow
def test_diagnose_flags_a_masked_factory_model_with_exit_1(tmp_path, monkeypatch, checkpoint):
    masked = Quantized(_small_cnn())
    masked.net.load_state_dict(load_file(checkpoint))
    path = tmp_path / "masked.safetensors"
    save_file(masked.state_dict(), path)
    (tmp_path / "masked_nets.py").write_text(
        "from _evalutil import Quantized\n"
        "from trades_repro.checkpoints import build_arch\n"
        "from trades_repro.spec import ModelSpec\n"
        "def quantized():\n"
        "    net = build_arch(ModelSpec(arch='small_cnn', width=16), 'digits', (1, 8, 8), 10)\n"
        "    return Quantized(net)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = _diagnose(path, "--factory", "masked_nets:quantized", "--json", *FAST,
                       "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    record = json.loads(result.stdout)
    verdicts = {v["rule"]: v for v in record["verdicts"]}
    v1, v2 = verdicts["pgd10_minus_square_v1"], verdicts["pgd10_minus_square_v2"]
    assert v1["flagged"] is True and v1["margin"] >= 0.08
    assert v2["outcome"] == "flagged" and v2["ci_low"] >= 0.08
    assert "zero_gradients" in {f["check"] for f in record["preflight"]["checks"]}
    assert (tmp_path / "out" / store.EVAL_FILE).is_file()
    assert list((tmp_path / "out").glob("landscape_masked_*.png"))
