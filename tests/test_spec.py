"""Experiment specs: paper defaults, exact fractions, a stable digest, errors naming fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from trades_repro.spec import ExperimentSpec, LandscapeSpec, SpecError, load_spec, parse_spec

SPEC_DIR = Path(__file__).resolve().parents[1] / "spec"


def test_defaults_are_the_papers_protocol():
    spec = ExperimentSpec()
    assert spec.data.dataset == "cifar100" and spec.model.arch == "resnet18"
    attack = spec.method.attack
    assert (attack.eps, attack.step_size, attack.steps) == (8 / 255, 2 / 255, 10)
    assert spec.method.beta == 3.0
    optim = spec.optim
    assert (optim.lr, optim.batch_size, optim.epochs) == (0.1, 256, 200)
    assert (optim.momentum, optim.nesterov, optim.weight_decay) == (0.9, True, 5e-4)
    assert (spec.validation.steps, spec.validation.step_size) == (10, 2 / 255)


def test_fractions_parse_exactly():
    spec = parse_spec({"method": {"attack": {"eps": "8/255", "step_size": " 2/255 "}}})
    assert spec.method.attack.eps == 8 / 255
    assert spec.method.attack.step_size == 2 / 255


def test_spec_is_frozen():
    with pytest.raises(ValidationError):
        ExperimentSpec().seed = 3  # type: ignore[misc]


def test_digest_ignores_field_order_and_yaml_layout(tmp_path):
    block = tmp_path / "block.yaml"
    block.write_text("seed: 3\nmethod:\n  beta: 6\n  attack:\n    eps: 8/255\n")
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "# same spec, other layout\n"
        "method: {attack: {eps: 0.03137254901960784}, beta: 6.0}\nseed: 3\n"
    )
    assert load_spec(block).digest() == load_spec(flow).digest()


def test_digest_changes_with_any_value():
    base = ExperimentSpec()
    assert base.digest() != parse_spec({"seed": 1}).digest()
    assert base.digest() != parse_spec({"method": {"beta": 6}}).digest()


def test_explicit_defaults_give_the_same_digest():
    assert parse_spec({"optim": {"lr": 0.1}}).digest() == ExperimentSpec().digest()


@given(st.permutations(["seed", "device", "name"]), st.integers(0, 10**6))
def test_digest_is_independent_of_key_order(order, seed):
    values = {"seed": seed, "device": "cpu", "name": "x"}
    reordered = {key: values[key] for key in order}
    assert parse_spec(reordered).digest() == parse_spec(values).digest()


def test_spec_round_trips_through_its_json():
    spec = parse_spec({"data": {"dataset": "digits"}, "method": {"attack": {"eps": "16/255"}}})
    assert ExperimentSpec.model_validate(json.loads(spec.model_dump_json())) == spec


@pytest.mark.parametrize("name", ["digits.yaml", "cifar100_default.yaml", "fashion_mnist.yaml"])
def test_shipped_specs_load(name):
    spec = load_spec(SPEC_DIR / name)
    assert len(spec.digest()) == 16


def test_shipped_paper_spec_is_the_default_protocol():
    assert load_spec(SPEC_DIR / "cifar100_default.yaml") == ExperimentSpec(
        name="cifar100_default", data={"download": True}
    )
    assert ExperimentSpec().data.validation == "test"  # Fig. 4: no holdout in the paper


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("optim: {batch_size: 0}", "optim.batch_size"),
        ("method: {attack: {eps: -0.1}}", "method.attack.eps"),
        ("method: {attack: {eps: 8/0}}", "method.attack.eps"),
        ("data: {dataset: mnist}", "data.dataset"),
        ("optim: {lr: fast}", "optim.lr"),
        ("model: {arch: resnet18, depth: 50}", "model.depth"),
    ],
)
def test_bad_values_name_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=rf"bad\.yaml: field '{field}'"):
        load_spec(path)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\nmethod: {beta: 3\n")
    with pytest.raises(SpecError, match=r"broken\.yaml: malformed YAML \(line \d+"):
        load_spec(path)


def test_non_mapping_yaml_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_evaluation_settings_do_not_change_the_run_digest():
    evaluated = parse_spec({"evaluation": {"n_examples": 100, "attacks": ["square"]}})
    assert evaluated.digest() == ExperimentSpec().digest()


def _float_fields(model: type, prefix: str = "") -> list[str]:
    """Every float field of a spec model, as a dotted path (nested models walked)."""
    from pydantic import BaseModel

    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _float_fields(annotation, f"{prefix}{name}.")
        elif annotation is float or "float" in str(annotation):
            out.append(f"{prefix}{name}")
    return out


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_number_anywhere_in_a_spec_is_refused_by_field(value):
    """`method.beta: .inf` passed `ge=0`, trained, and stopped with a non-finite loss (exit
    1, a failed run) instead of being refused as bad input (exit 2)."""
    from trades_repro.sweep import set_dotted

    fields = _float_fields(ExperimentSpec)
    assert {"method.beta", "optim.lr", "healing.fosc_threshold", "method.attack.eps"} <= set(
        fields)
    for field in fields:
        raw: dict = {"data": {"dataset": "digits"}}
        set_dotted(raw, field, value)
        with pytest.raises(SpecError, match=rf"field '{field}'.*finite"):
            parse_spec(raw)


@pytest.mark.parametrize(("landscape", "radius"), [({}, 0.2), ({"radius": 0.05}, 0.05),
                                                   ({"radius": 0}, 0.0)])
def test_the_landscape_radius_resolves_to_the_validation_eps_unless_set(landscape, radius):
    spec = parse_spec({"validation": {"eps": 0.2, "step_size": 0.05},
                       "evaluation": {"landscape": {**landscape, "steps": 5}}})
    assert spec.landscape() == LandscapeSpec(radius=radius, steps=5)
    assert spec.evaluation.landscape.radius == landscape.get("radius")  # the spec keeps None


@pytest.mark.parametrize("radius", [-0.1, 2, "wide", ".inf"])
def test_a_nonsense_landscape_radius_is_one_line_bad_input(tmp_path, radius):
    from factories import assert_one_line_error
    from typer.testing import CliRunner

    from trades_repro.cli import app

    path = tmp_path / "bad.yaml"
    path.write_text(f"evaluation:\n  landscape:\n    radius: {radius}\n")
    result = CliRunner().invoke(app, ["spec", "show", str(path)])
    assert_one_line_error(result, "bad.yaml", "evaluation.landscape.radius")


def test_a_check_across_sections_speaks_in_its_own_words():
    """A validator of the whole spec has no field to name: its message is the line, without
    pydantic's "field '<root>': Value error," in front (fields of a section keep theirs)."""
    with pytest.raises(SpecError) as caught:
        parse_spec({"monitor": {"fosc": False}, "healing": {"enabled": True}}, source="s.yaml")
    assert str(caught.value) == ("s.yaml: healing.enabled: true needs monitor.fosc: true "
                                 "(Algorithm 1 is triggered by validation FOSC)")
    with pytest.raises(SpecError) as caught:
        parse_spec({"optim": {"momentum": 0}}, source="s.yaml")
    assert str(caught.value) == (
        "s.yaml: field 'optim': Value error, optim.nesterov: true needs optim.momentum > 0 "
        "(Nesterov's look-ahead is along the momentum); set nesterov: false for plain SGD")
    with pytest.raises(SpecError) as caught:
        parse_spec(5, source="s.yaml")
    assert str(caught.value) == ("s.yaml: field '<root>': Input should be a valid dictionary "
                                 "or instance of ExperimentSpec")
