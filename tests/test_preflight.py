"""Pre-flight: models that cannot be evaluated are refused before any attack, with why."""

from __future__ import annotations

import re

import pytest
import torch
from _evalutil import RandomDither, digits_test, prototype_linear
from torch import nn

from trades_repro import evaluate as ev
from trades_repro.preflight import PreflightError, preflight
from trades_repro.spec import LandscapeSpec


class _Fixed(nn.Module):
    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, x):
        return self.output(x)


@pytest.fixture(scope="module")
def data():
    return digits_test(50)


def test_a_regular_model_passes_and_its_autoattack_checks_run_once(data):
    x, y = data
    result = preflight(prototype_linear(), x, y, 10, device="cpu", attacks=("pgd10", "square"))
    assert result.n_classes == 10 and result.batch == 50 and not result.randomized
    assert result.clean_correct > 40 and result.checks == []


@pytest.mark.parametrize(("output", "needle"), [
    (lambda x: torch.zeros(len(x), 10, 2), "returns shape [50, 10, 2]"),
    (lambda x: torch.full((len(x), 10), float("nan")), "non-finite"),
    (lambda x: (x.flatten(1)[:, :10] * 0).fill_(1.0), "not above chance"),  # constant logits
    (lambda x: "logits", "returns str"),
])
def test_outputs_that_are_not_logits_of_the_dataset_are_refused(data, output, needle):
    x, y = data
    with pytest.raises(PreflightError, match=re.escape(needle)):
        preflight(_Fixed(output), x, y, 10, device="cpu")


def test_a_randomized_model_is_detected_and_gets_autoattacks_rand_version(data):
    x, y = data
    model = RandomDither(prototype_linear())
    result = preflight(model, x, y, 10, device="cpu", attacks=("apgd-ce",))
    assert result.randomized and "randomized" in {f.check for f in result.checks}
    settings = ev.EvalSettings(dataset="digits", n_examples=4, eps=0.1, step_size=0.025,
                               steps=10, random_start=True, batch_size=4, seed=0,
                               square_queries=100, device="cpu",
                               landscape=LandscapeSpec(radius=0.1, steps=3))
    attack, _ = ev.RUNNERS["apgd-ce"](model, x[:4], y[:4], settings, True)
    assert attack.params["version"] == "rand" and attack.params["eot"] == 20
