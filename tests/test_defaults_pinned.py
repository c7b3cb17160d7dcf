"""The shipped defaults that define the standard evaluation, pinned where users meet them.

mutmut 3 mutates function bodies and simple literal defaults of undecorated functions only:
pydantic class-level field defaults, module-level tables and the options of the Typer
commands (decorated functions, skipped whole) are never mutated. So each of those defaults
is pinned here against the number the paper or AutoAttack's standard version gives, written
out by hand, and at the CLI by what the command actually passes on (the library function
monkeypatched to capture its arguments), not by reading the library constant back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from _evalutil import prototype_linear
from factories import assert_one_line_error
from safetensors.torch import save_file
from typer.testing import CliRunner

import trades_repro.diagnose as dg
from trades_repro import evaluate as ev
from trades_repro.cli import app
from trades_repro.records import STANDARD_SQUARE_QUERIES
from trades_repro.spec import (
    EvalSpec,
    ExperimentSpec,
    LandscapeSpec,
    SpecError,
    ValidationAttackSpec,
    load_spec,
    parse_spec,
)
from trades_repro.sweep import Sweep, load_sweep, set_dotted

runner = CliRunner()
ALL_SIX = ("pgd10", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack")  # Table 1's columns

# Every default of ExperimentSpec, written out from the paper (App. B, §3.1) and official
# TRADES, not read from the code: ExperimentSpec() *is* the paper's default CIFAR-100 run.
PAPER_SPEC = {
    "spec_version": 1,
    "name": "cifar100_default",
    "seed": 0,
    "device": "auto",
    "data": {
        "dataset": "cifar100",
        "root": None,
        "download": False,
        "validation": "test",
        "val_size": 1000,
        "train_subset": None,
        "augment": True,
        "crop_padding": 4,
        "synthetic": {
            "n_train": 512,
            "n_test": 256,
            "num_classes": 4,
            "channels": 1,
            "image_size": 8,
        },
    },
    "model": {"arch": "resnet18", "width": 32, "normalize": False},
    "method": {
        "name": "trades",
        "beta": 3.0,
        "attack": {
            "eps": 8 / 255,
            "step_size": 2 / 255,
            "steps": 10,
            "init_std": 0.001,
            "init_projected": False,
        },
        "awp": {"gamma": 0.005, "proxy_lr": 0.1, "warmup": 10},
    },
    "optim": {
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "batch_size": 256,
        "epochs": 200,
        "schedule": "constant",
        "milestones": [100, 150],
        "lr_decay": 0.1,
    },
    # PGD-10: 10 steps of α = 2/255 in the ε = 8/255 box, random start (App. B)
    "validation": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "random_start": True},
    "monitor": {"fosc": True, "sgcs": True, "batch_metrics": False},
    "healing": {"enabled": False, "fosc_threshold": 0.05, "noise_batches": 10, "noise_std": 0.1},
    "performance": {
        "precision": "fp32",
        "tf32": False,
        "channels_last": False,
        "compile": False,
        "cudnn_benchmark": False,
    },
    # AutoAttack's standard Square budget is 5,000 queries; every Table 1 column by default
    "evaluation": {
        "n_examples": None,
        "batch_size": None,
        "attacks": list(ALL_SIX),
        "square_queries": 5000,
        "seed": 0,
        "landscape": {"radius": None, "steps": 21, "n_images": 1},  # None: validation ε
    },
}


def test_every_spec_default_is_the_papers_protocol():
    assert ExperimentSpec().model_dump(mode="json") == PAPER_SPEC


def test_standard_square_budget_and_pgd10_are_the_papers_numbers():
    assert STANDARD_SQUARE_QUERIES == 5000  # AutoAttack standard: Square with 5,000 queries
    assert EvalSpec().square_queries == 5000
    pgd = ValidationAttackSpec()
    assert (pgd.steps, pgd.step_size, pgd.eps, pgd.random_start) == (10, 2 / 255, 8 / 255, True)
    assert LandscapeSpec().radius is None  # Fig. 1 spans the threat model: the validation ε


# ------------------------------------------------------------------- AutoAttack's settings


@pytest.fixture
def autoattack_calls(monkeypatch) -> list[dict]:
    """pyautoattack's run replaced by a recorder (no attack runs): what it was set up with."""
    from pyautoattack import AutoAttack

    calls: list[dict] = []

    def record(self, x, y, *, batch_size=250, **_):
        calls.append(
            {
                "version": self.version,
                "attacks": list(self.attacks_to_run),
                "queries": self.square.n_queries,
                "p_init": self.square.p_init,
                "eps": self.epsilon,
                "device": self.device,
                "seed": self.seed,
                "batch_size": batch_size,
            }
        )
        with torch.no_grad():
            return x.clone(), self.model(x.to(self.device)).argmax(1).cpu()

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", record)
    return calls


def _settings(**changes) -> ev.EvalSettings:
    base = dict(
        dataset="digits",
        n_examples=4,
        eps=8 / 255,
        step_size=2 / 255,
        steps=10,
        random_start=True,
        batch_size=3,
        seed=0,
        square_queries=5000,
        device="cpu",
        landscape=LandscapeSpec(steps=3),
    )
    return ev.EvalSettings(**{**base, **changes})


def _digits(n: int = 4):
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, torch.arange(n) % 10


def test_square_runs_autoattack_standard_with_5000_queries_and_p_init_0_8(autoattack_calls):
    x, y = _digits()
    result, _ = ev.RUNNERS["square"](prototype_linear(), x, y, _settings(), False)
    (call,) = autoattack_calls
    assert call["version"] == "standard" and call["attacks"] == ["square"]
    assert (call["queries"], call["p_init"]) == (5000, 0.8)
    assert (call["eps"], call["device"], call["seed"]) == (8 / 255, "cpu", 0)
    assert result.params == {"queries": 5000, "p_init": 0.8, "version": "standard"}


@pytest.mark.parametrize(
    ("name", "randomized", "version"),
    [
        ("autoattack", False, "standard"),
        ("apgd-ce", False, "standard"),
        ("apgd-t", False, "standard"),
        ("fab-t", False, "standard"),
        ("autoattack", True, "rand"),
        ("apgd-ce", True, "rand"),  # EOT for a randomized model
        ("apgd-t", True, "standard"),
        ("fab-t", True, "standard"),
        ("square", True, "standard"),
    ],
)
def test_autoattack_version_is_standard_unless_the_model_is_randomized(
    autoattack_calls, name, randomized, version
):
    x, y = _digits()
    result, _ = ev.RUNNERS[name](prototype_linear(), x, y, _settings(), randomized)
    assert autoattack_calls[0]["version"] == version
    assert result.params["version"] == version


# ------------------------------------------------------------------------ diagnose (library)


def _small_cnn_checkpoint(folder: Path) -> Path:
    from trades_repro.checkpoints import build_arch
    from trades_repro.spec import ModelSpec

    torch.manual_seed(0)
    net = build_arch(ModelSpec(arch="small_cnn", width=32), "digits", (1, 8, 8), 10)
    path = folder / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture
def evaluations(monkeypatch) -> list[dict]:
    """`evaluate_model` replaced by a recorder: what `diagnose` would evaluate, and how."""
    calls: list[dict] = []

    def record(net, x, y, settings, attacks, **kwargs):
        calls.append({"settings": settings, "attacks": attacks, "n": len(y), **kwargs})
        return ev.CheckpointEval(
            checkpoint="net", sha256="0" * 64, key="k", settings=settings, requested=list(attacks)
        )

    monkeypatch.setattr(dg, "evaluate_model", record)
    return calls


def test_diagnose_defaults_are_the_standard_evaluation(tmp_path, evaluations, monkeypatch):
    asked: list[str] = []  # the device diagnose asks for: "auto" (CUDA when there is one)
    monkeypatch.setattr(dg, "resolve_device", lambda name: asked.append(name) or "cpu")
    dg.diagnose(_small_cnn_checkpoint(tmp_path), dataset="digits", arch="small_cnn")
    assert asked == ["auto"]
    (call,) = evaluations
    s = call["settings"]
    assert s.eps == 8 / 255 and s.step_size == 2 / 255  # App. B's ε and α = ε/4
    assert (s.steps, s.random_start) == (10, True)  # PGD-10 with a random start
    assert s.square_queries == 5000 and s.seed == 0
    assert (s.n_examples, call["n"]) == (100, 100)  # digits' default: 100 test images
    assert call["attacks"] == ALL_SIX
    assert (s.landscape.radius, s.landscape.steps, s.landscape.n_images) == (8 / 255, 21, 1)
    assert json.loads(s.model) == {"arch": "small_cnn", "width": 32, "normalize": False}
    assert call["adversarial_dir"] is None and call["landscape_dir"] is None  # writes nothing


def test_diagnose_defaults_per_dataset_are_pinned():
    square_only = ("pgd10", "square")  # the verdict's two attacks
    assert {name: (d.n_examples, d.attacks) for name, d in dg.DIAGNOSE_DEFAULTS.items()} == {
        "digits": (100, ALL_SIX),
        "synthetic": (100, ALL_SIX),
        "fashion_mnist": (500, square_only),
        "cifar10": (1000, ALL_SIX),
        "cifar100": (1000, ALL_SIX),
        "tinyimagenet": (1000, ALL_SIX),
    }
    assert ev.ATTACK_PRESETS == {"all": ALL_SIX, "square-only": square_only}


def test_a_dataset_without_a_default_gets_every_attack_on_the_whole_test_set(
    tmp_path, evaluations, monkeypatch
):
    monkeypatch.setattr(dg, "DIAGNOSE_DEFAULTS", {})
    dg.diagnose(_small_cnn_checkpoint(tmp_path), dataset="digits", arch="small_cnn")
    (call,) = evaluations
    assert call["n"] == 297 and call["attacks"] == ALL_SIX  # the digits test split: 297


# ----------------------------------------------------------------------- the CLI's defaults


def _clear_record(settings: ev.EvalSettings) -> ev.CheckpointEval:
    same = "1" * 50 + "0" * 50  # PGD-10 and Square agree on every image: clear
    attacks = {
        name: ev.AttackResult(
            name=name,
            paper_column=ev.PAPER_COLUMNS[name],
            accuracy=0.5,
            n_robust=50,
            n_examples=100,
            robust=same,
            seconds=0.0,
        )
        for name in ("pgd10", "square")
    }
    record = ev.CheckpointEval(
        checkpoint="net",
        sha256="0" * 64,
        key="k",
        settings=settings,
        requested=["pgd10", "square"],
        attacks=attacks,
    )
    record.verdicts = [ev.apply_rule(rule, attacks) for rule in ev.VERDICT_RULES]
    return record


@pytest.fixture
def diagnoses(monkeypatch) -> list[dict]:
    """The library's `diagnose` replaced by a recorder of what the CLI passes to it."""
    calls: list[dict] = []

    def record(checkpoint, **kwargs):
        calls.append({"checkpoint": checkpoint, **kwargs})
        return _clear_record(_settings())

    monkeypatch.setattr(dg, "diagnose", record)
    return calls


def test_cli_diagnose_passes_the_standard_defaults(tmp_path, diagnoses):
    result = runner.invoke(
        app, ["diagnose", str(tmp_path / "w.pt"), "--dataset", "digits", "--model", "small_cnn"]
    )
    assert result.exit_code == 0, result.output
    (call,) = diagnoses
    report = call.pop("report")
    assert call == {
        "checkpoint": tmp_path / "w.pt",
        "dataset": "digits",
        "arch": "small_cnn",
        "factory": None,
        "width": 32,
        "normalize": False,
        "eps": 8 / 255,
        "n_examples": None,
        "attacks": None,
        "device": "auto",
        "data_root": None,
        "download": False,  # a missing dataset stops with a line naming --download
        "square_queries": 5000,
        "seed": 0,
        "out": None,
        "save_adversarial": False,
        "checklist": False,
        "eval_batch": None,
        "tf32": False,  # the pinned fp32 unless --tf32
    }
    assert callable(report)


def _diagnose_with_eps(tmp_path, text):
    return runner.invoke(app, ["diagnose", str(tmp_path / "w.pt"), "--dataset", "digits",
                               "--model", "small_cnn", "--eps", text])


@pytest.mark.parametrize(
    ("text", "eps"),
    [
        ("8/255", 8 / 255),
        (" 8/255 ", 8 / 255),
        ("16/255", 16 / 255),
        ("0.2", 0.2),
        ("1", 1.0),
        ("0.031", 0.031),
    ],
)
def test_cli_eps_is_parsed_exactly(tmp_path, diagnoses, text, eps):
    result = _diagnose_with_eps(tmp_path, text)
    assert result.exit_code == 0, result.output
    assert diagnoses[0]["eps"] == eps  # exactly: one rounding of the fraction, no more


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("x", "format"),
        ("8//255", "format"),
        ("1/0", "format"),
        ("", "format"),
        ("0", "range"),
        ("-8/255", "range"),
        ("2", "range"),
        ("256/255", "range"),
    ],
)
def test_cli_refuses_bad_eps_with_exit_2_before_diagnosing(tmp_path, diagnoses, text, why):
    result = _diagnose_with_eps(tmp_path, text)
    assert_one_line_error(result)
    expected = {
        "format": f"--eps {text!r}: not a number or fraction like 8/255",
        "range": f"--eps {text}: out of range, must be in (0, 1] (pixel units)",
    }[why]
    assert result.stderr.strip() == f"error: {expected}"
    assert diagnoses == []


def test_cli_diagnose_seed_and_attacks_pass_through(tmp_path, diagnoses):
    result = runner.invoke(
        app,
        [
            "diagnose",
            str(tmp_path / "w.pt"),
            "--dataset",
            "digits",
            "--model",
            "small_cnn",
            "--seed",
            "3",
            "--attacks",
            "square-only",
            "--square-queries",
            "300",
        ],
    )
    assert result.exit_code == 0, result.output
    call = diagnoses[0]
    assert (call["seed"], call["attacks"], call["square_queries"]) == (3, ("pgd10", "square"), 300)


def test_cli_evaluate_leaves_every_setting_to_the_runs_spec(tmp_path, monkeypatch):
    calls: list[dict] = []

    def record(run_dir, **kwargs):
        calls.append({"run_dir": run_dir, **kwargs})
        return []

    monkeypatch.setattr(dg, "evaluate_run", record)
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 3, result.output  # no record came back: nothing to decide on
    (call,) = calls
    call.pop("report")
    assert call == {
        "run_dir": tmp_path,
        "attacks": None,
        "n_examples": None,
        "device": None,
        "seed": None,
        "save_adversarial": False,
        "eval_batch": None,
        "square_queries": None,
        "tf32": False,  # the pinned fp32 unless --tf32
    }  # None: the spec's, AutoAttack's standard 5000


def test_cli_options_show_the_standard_defaults():
    """The defaults `--help` documents are the ones the command runs with."""
    import typer

    command = typer.main.get_command(app).commands["diagnose"]
    defaults = {p.name: p.default for p in command.params}
    assert (defaults["square_queries"], defaults["eps"]) == (5000, "8/255")
    assert (defaults["width"], defaults["device"], defaults["seed"]) == (32, "auto", None)


# ------------------------------------------------ end to end: the CLI to pyautoattack's objects


NETS = (
    "from torch import nn\n\ndef linear():\n    return nn.Sequential(nn.Flatten(), "
    "nn.Linear(64, 10))\n"
)


def test_cli_diagnose_runs_standard_autoattack_and_pgd10_by_default(
    tmp_path, monkeypatch, autoattack_calls
):
    (tmp_path / "pin_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    save_file(prototype_linear().state_dict(), tmp_path / "linear.safetensors")
    result = runner.invoke(
        app,
        [
            "diagnose",
            str(tmp_path / "linear.safetensors"),
            "--dataset",
            "digits",
            "--factory",
            "pin_nets:linear",
            "--json",
            "--attacks",
            "square-only",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    s = record["settings"]
    assert (s["eps"], s["step_size"], s["steps"], s["random_start"]) == (8 / 255, 2 / 255, 10, True)
    assert (s["square_queries"], s["seed"], s["n_examples"]) == (5000, 0, 100)
    assert record["attacks"]["pgd10"]["params"] == {
        "step_size": 2 / 255,
        "steps": 10,
        "random_start": True,
    }
    assert record["attacks"]["square"]["params"] == {
        "queries": 5000,
        "p_init": 0.8,
        "version": "standard",
    }
    (call,) = autoattack_calls
    assert (call["version"], call["queries"], call["p_init"], call["eps"]) == (
        "standard",
        5000,
        0.8,
        8 / 255,
    )


# ------------------------------------------------------- specs at the boundary (spec.py)


def test_the_digest_is_sha256_of_the_canonical_training_spec_and_stable():
    spec = parse_spec(
        {
            "seed": 3,
            "data": {"dataset": "digits", "root": "/scratch/x", "download": True},
            "evaluation": {"n_examples": 10},
        }
    )
    training = spec.model_dump(mode="json")
    del training["evaluation"]  # how a run is evaluated is not part of the run
    training["data"].update(root=None, download=False)  # nor is where its data lives
    canonical = json.dumps(training, sort_keys=True, separators=(",", ":"))
    assert spec.digest() == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    # run folders are named by digest: the default's must never move
    assert ExperimentSpec().digest() == "357e671213af2a9e"


def test_bad_fractions_are_named_with_the_field(tmp_path):
    with pytest.raises(SpecError) as caught:
        parse_spec({"method": {"attack": {"eps": "eight"}}})
    assert str(caught.value) == (
        "<spec>: field 'method.attack.eps': Value error, not a number or fraction: 'eight'"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"seed": -1}, "<spec>: field 'seed': Input should be greater than or equal to 0"),
        (
            {"seed": -1, "device": "tpu"},
            "<spec>: field 'seed': Input should be greater than or equal to 0 (and 1 more)",
        ),
        (
            {"seed": -1, "device": "tpu", "name": 3},
            "<spec>: field 'name': Input should be a valid string (and 2 more)",
        ),
        (
            [1],
            "<spec>: field '<root>': Input should be a valid dictionary or instance of "
            "ExperimentSpec",
        ),
    ],
)
def test_validation_errors_are_one_line_naming_the_first_field(raw, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"seed: 1\nmethod: {beta: 3\n",
            "malformed YAML (line 3, column 1): expected ',' or '}', but got '<stream end>'",
        ),
        (
            b"seed: 1\n  beta: [3\n",
            "malformed YAML (line 2, column 7): mapping values are not allowed here",
        ),
        (
            b"seed: 1\x00\n",
            "malformed YAML: unacceptable character #x0000: special characters are not allowed",
        ),  # a reader error: no line mark, no 'problem'
        (b"- 1\n- 2\n", "a spec must be a YAML mapping, got list"),
        (b"3\n", "a spec must be a YAML mapping, got int"),
    ],
)
def test_unreadable_specs_are_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == f"{path}: {message}"


def test_dotted_fields_create_sections_and_refuse_values_in_the_way():
    raw: dict = {"a": 1}
    set_dotted(raw, "b.c.d", 2)
    assert raw == {"a": 1, "b": {"c": {"d": 2}}}
    with pytest.raises(SpecError) as caught:
        set_dotted(raw, "a.x", 3)
    assert str(caught.value) == "field 'a.x': 'a' is not a section"


def _base(folder: Path, text: str = "data: {dataset: digits}\n") -> Path:
    (folder / "base.yaml").write_text(text)
    return folder / "base.yaml"


def test_sweeps_expand_explicit_seeds_and_name_the_bad_cell(tmp_path):
    _base(tmp_path)
    sweep = Sweep(base="base.yaml", set={"healing.enabled": True}, seeds=[3, 5])
    assert sweep.seed_list() == (3, 5)
    assert [(s.seed, s.healing.enabled) for s in sweep.expand(tmp_path)] == [(3, True), (5, True)]
    bad = Sweep(base="base.yaml", grid={"method.beta": [1, -1]}, seeds=1)
    with pytest.raises(SpecError) as caught:
        bad.expand(tmp_path)
    assert str(caught.value).startswith(
        f"{(tmp_path / 'base.yaml').resolve()} (method.beta=-1, seed=0): field 'method.beta': "
    )


def test_a_changed_base_spec_is_read_again(tmp_path):
    import os

    base = _base(tmp_path, "name: a\n")
    assert Sweep(base="base.yaml").expand(tmp_path)[0].name == "a"
    base.write_text("name: bb\n")
    assert Sweep(base="base.yaml").expand(tmp_path)[0].name == "bb"
    (tmp_path / "other").mkdir()  # same size and time, other path: not the same base
    twin = _base(tmp_path / "other", "name: cc\n")
    stamp = base.stat().st_mtime_ns
    os.utime(base, ns=(stamp, stamp))
    os.utime(twin, ns=(stamp, stamp))
    assert Sweep(base="base.yaml").expand(tmp_path)[0].name == "bb"
    assert Sweep(base="base.yaml").expand(tmp_path / "other")[0].name == "cc"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not a sweep file (a YAML mapping with 'base')"),
        ("grid: {method.beta: [1]}\n", "not a sweep file (a YAML mapping with 'base')"),
        ("- base\n", "not a sweep file (a YAML mapping with 'base')"),
        (
            "base: base.yaml\nseeds: 0\n",
            "field 'seeds.constrained-int': Input should be greater than 0 (and 1 more)",
        ),
    ],
)
def test_bad_sweep_files_are_named(tmp_path, content, message):
    _base(tmp_path)
    path = tmp_path / "sweep.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError) as caught:
        load_sweep(path)
    assert str(caught.value) == f"{path}: {message}"
