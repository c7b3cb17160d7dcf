"""YAML loading: safe, identical to PyYAML's safe loader, except that a repeated key fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from trades_repro import yamlio
from trades_repro.claims import ClaimsError, load_catalogue
from trades_repro.cli import app
from trades_repro.errors import BadInput
from trades_repro.executor_config import load_config
from trades_repro.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]

keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=8)
scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.floats(
    allow_nan=False)
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(keys, inner, max_size=4), max_leaves=20)


@given(documents, st.booleans())
def test_any_document_without_repeated_keys_loads_as_pyyaml_loads_it(document, fast):
    text = yaml.safe_dump(document, allow_unicode=True)
    assert yamlio.load(text, fast=fast) == yaml.safe_load(text)


@pytest.mark.parametrize(("text", "line", "first"), [
    ("optim: {epochs: 2}\noptim: {lr: 0.01}\n", 2, 1),
    ("data:\n  dataset: digits\n  root: a\n  dataset: fashion_mnist\n", 4, 2),
    ("- {a: 1, b: 2, a: 3}\n", 1, 1),
    ("1: x\n1: y\n", 2, 1),
])
@pytest.mark.parametrize("fast", [False, True])
def test_a_repeated_key_is_an_error_at_its_second_line(text, line, first, fast):
    with pytest.raises(yaml.YAMLError) as err:
        yamlio.load(text, fast=fast)
    assert err.value.problem_mark.line + 1 == line
    assert f"given twice (first on line {first})" in err.value.problem


@pytest.mark.parametrize("fast", [False, True])
def test_merge_keys_may_be_overridden_and_distinct_keys_stay_distinct(fast):
    text = "base: &b {lr: 0.1, epochs: 5}\nrun:\n  <<: *b\n  lr: 0.01\n1: int\n'1': str\n"
    assert yamlio.load(text, fast=fast) == {"base": {"lr": 0.1, "epochs": 5},
                                 "run": {"lr": 0.01, "epochs": 5}, 1: "int", "1": "str"}


def test_a_spec_a_sweep_a_claims_file_and_a_config_refuse_repeated_keys(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: a spec with two `optim:`
    blocks trained with the second one alone."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("data: {dataset: digits}\noptim: {epochs: 2}\noptim: {lr: 0.01}\n")
    with pytest.raises(SpecError, match=r"spec.yaml: malformed YAML \(line 3, column 1\): "
                                        r"key 'optim' given twice \(first on line 2\)"):
        load_spec(spec)
    result = CliRunner().invoke(app, ["train", str(spec), "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 2 and "given twice" in result.stderr
    assert not (tmp_path / "r").exists()

    config = tmp_path / "slurm.yaml"
    config.write_text("slurm: {partition: a}\nslurm: {partition: b}\n")
    with pytest.raises(BadInput, match="given twice"):
        load_config(config)

    claims = tmp_path / "claims"
    claims.mkdir()
    (claims / "arms.yaml").write_text((REPO / "claims" / "arms.yaml").read_text())
    (claims / "table_x.yaml").write_text("artefact: table_x\nartefact: table_y\n")
    with pytest.raises(ClaimsError, match="table_x.yaml: malformed YAML: .*given twice"):
        load_catalogue(claims)


def test_the_repository_yaml_has_no_repeated_key():
    files = sorted([*REPO.glob("spec/**/*.yaml"), *REPO.glob("claims/*.yaml")])
    assert len(files) > 20
    for path in files:
        yamlio.load(path.read_text())  # raises, naming the line, on a repeated key


@pytest.mark.parametrize("fast", [False, True])
def test_a_key_repeated_after_a_merge_is_still_an_error(fast):
    text = "base: &b {lr: 0.1}\nrun:\n  <<: *b\n  lr: 0.01\n  lr: 0.02\n"
    with pytest.raises(yaml.YAMLError, match="key 'lr' given twice"):
        yamlio.load(text, fast=fast)


@pytest.mark.parametrize("fast", [False, True])
def test_an_unhashable_key_is_pyyamls_own_error(fast):
    with pytest.raises(yaml.YAMLError, match="unhashable key"):
        yamlio.load("{[1]: 2}\n", fast=fast)


@pytest.mark.skipif(not hasattr(yaml, "CSafeLoader"), reason="PyYAML without libyaml")
def test_specs_keep_pyyamls_messages_and_claims_use_libyaml():
    """Specs' error messages are pinned to PyYAML's pure loader (test_defaults_pinned.py);
    the claims, a hundred flow mappings per file, parse with libyaml."""
    with pytest.raises(yaml.YAMLError) as pure:
        yamlio.load("a: [1\n")
    with pytest.raises(yaml.YAMLError) as fast:
        yamlio.load("a: [1\n", fast=True)
    assert "expected ',' or ']', but got '<stream end>'" in str(pure.value)
    assert "did not find expected ',' or ']'" in str(fast.value)


def test_without_libyaml_the_fast_loader_is_pyyamls_own(monkeypatch):
    """libyaml only makes the claims faster to read: a PyYAML built without it gives the
    same data (the loader class is chosen when yamlio is imported, so it is re-imported)."""
    import importlib

    text = (REPO / "claims" / "arms.yaml").read_text()
    with_libyaml = yamlio.load(text, fast=True)
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    try:
        plain = importlib.reload(yamlio)
        assert plain.FastStrictLoader.__mro__[2] is yaml.SafeLoader
        assert plain.load(text, fast=True) == with_libyaml
        with pytest.raises(yaml.YAMLError, match="given twice"):
            plain.load("a: 1\na: 2\n", fast=True)
    finally:
        monkeypatch.undo()
        importlib.reload(yamlio)
