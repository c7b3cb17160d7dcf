"""Inputs audit: a spec whose synthetic images are too small for `small_cnn` is bad input at
validation (exit 2, naming the fields), not a crash when the run builds its network (exit 4)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.factories import assert_one_line_error
from trades_repro.cli import app
from trades_repro.spec import SMALL_CNN_MIN_SIZE, SpecError, load_spec, parse_spec

TOO_SMALL = ("data: {dataset: synthetic, synthetic: {image_size: 4}}\n"
             "model: {arch: small_cnn}\noptim: {epochs: 1}\ndevice: cpu\n")
MESSAGE = "model.arch: small_cnn needs data.synthetic.image_size >= 8"


def _synthetic(size: int, arch: str) -> dict:
    return {"data": {"dataset": "synthetic", "synthetic": {"image_size": size}},
            "model": {"arch": arch}}


def test_small_synthetic_images_for_small_cnn_are_a_spec_error_naming_the_fields(tmp_path):
    path = tmp_path / "syn4.yaml"
    path.write_text(TOO_SMALL)
    with pytest.raises(SpecError, match=rf"^{path}: {MESSAGE} \(two stride-2 convs\), got 4$"):
        load_spec(path)


@pytest.mark.parametrize(("size", "arch"), [(SMALL_CNN_MIN_SIZE, "small_cnn"), (4, "resnet18")])
def test_what_the_networks_take_is_still_valid(size, arch):
    assert parse_spec(_synthetic(size, arch)).data.synthetic.image_size == size


def test_training_such_a_spec_exits_2_and_leaves_nothing(tmp_path):
    path, runs = tmp_path / "syn4.yaml", tmp_path / "runs"
    path.write_text(TOO_SMALL)
    result = CliRunner().invoke(app, ["train", str(path), "--runs-dir", str(runs), "--quiet"])
    assert_one_line_error(result, str(path), MESSAGE)
    assert not runs.exists() or not any(runs.iterdir())
