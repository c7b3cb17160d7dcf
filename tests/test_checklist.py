"""The masking checklist: a regular model passes, a saturated one warns, the CLI shows rows."""

from __future__ import annotations

import json

import pytest
import torch
from _evalutil import EPS, Saturated, digits_test, prototype_linear
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from trades_repro import numerics
from trades_repro.checklist import run_checklist
from trades_repro.cli import app
from trades_repro.errors import BadInput
from trades_repro.evaluate import EvalSettings
from trades_repro.spec import LandscapeSpec

N = 60
ITEMS = ["pgd100x5", "margin_loss", "fgsm", "eps_sweep", "noise", "square_only"]


def _settings(batch_size: int = 500) -> EvalSettings:
    return EvalSettings(dataset="digits", n_examples=N, eps=EPS, step_size=EPS / 4, steps=10,
                        random_start=True, batch_size=batch_size, seed=0, square_queries=5000,
                        device="cpu", landscape=LandscapeSpec(radius=EPS, steps=5))


class Watched(nn.Module):
    """A model that notes each forward's batch size and the backend flags in force."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.batches, self.flags = net, [], []

    def forward(self, x):
        self.batches.append(len(x))
        self.flags.append(numerics.current())
        return self.net(x)


@pytest.fixture(scope="module")
def rows():
    x, y = digits_test(N)
    regular = run_checklist(prototype_linear(), x, y, _settings())
    saturated = run_checklist(Saturated(prototype_linear()), x, y, _settings())
    return {r.item: r for r in regular}, {r.item: r for r in saturated}


def test_the_checklist_runs_in_evaluation_batches_under_the_evaluation_numerics(rows):
    """Batches of the settings' batch size (unbatched, PGD-100x5 was one 5N batch: 23 GB at
    CIFAR n=1000), under `numerics.evaluation()` whatever the caller left on (TF32 on a GPU
    would score another model than the fp32 PGD-10 in the same record); the PGD items give
    the unbatched numbers, their random starts drawn for the whole set."""
    x, y = digits_test(N)
    watched = Watched(prototype_linear())
    with numerics.pinned(tf32=True, deterministic=False):  # torch's default TF32 cuDNN
        batched = {r.item: r for r in run_checklist(watched, x, y, _settings(batch_size=16))}
    assert max(watched.batches) == 16
    evaluation = {"tf32_matmul": False, "tf32_cudnn": False, "cudnn_deterministic": True,
                  "cudnn_benchmark": False}
    assert all(flags == evaluation for flags in watched.flags)
    regular, _ = rows  # the same model, batch 500: every set in one batch
    for item in ("pgd100x5", "fgsm", "eps_sweep", "noise"):
        assert batched[item].numbers == regular[item].numbers, item
        assert batched[item].status == regular[item].status, item
    assert batched["margin_loss"].status == regular["margin_loss"].status  # APGD: per batch


def test_the_checklist_running_out_of_gpu_memory_names_the_eval_batch_option():
    class Exhausted(nn.Module):
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    x, y = digits_test(8)
    with pytest.raises(BadInput, match="--eval-batch 8"):
        run_checklist(Exhausted(), x, y, _settings(batch_size=16))


def test_a_regular_model_passes_every_item_it_can_check(rows):
    regular, _ = rows
    assert list(regular) == ITEMS
    assert [r.status for r in regular.values()] == ["pass"] * 5 + ["n/a"]
    sweep = regular["eps_sweep"].numbers
    assert sweep["eps"][0] == pytest.approx(EPS / 2) and sweep["eps"][-1] == 1.0
    assert sweep["accuracy"][-1] <= 0.1 and all(r.seconds >= 0 for r in regular.values())


def test_saturated_logits_fail_the_margin_loss_and_eps_sweep_items(rows):
    _, saturated = rows
    assert saturated["margin_loss"].status == "warn"  # DLR is scale-free, CE saturates
    assert saturated["eps_sweep"].status == "warn"  # PGD cannot move: accuracy stays up
    numbers = saturated["margin_loss"].numbers
    assert numbers["strong_accuracy"] < numbers["weak_accuracy"] and numbers["p"] < 0.05


@pytest.mark.slow
def test_diagnose_checklist_records_rows_with_their_cost(tmp_path):
    path = tmp_path / "linear.safetensors"
    save_file(prototype_linear().state_dict(), path)
    (tmp_path / "cl_nets.py").write_text(
        "from torch import nn\n\ndef linear():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        result = CliRunner().invoke(app, [
            "diagnose", str(path), "--dataset", "digits", "--eps", "0.1", "--factory",
            "cl_nets:linear", "--n-examples", "40", "--attacks", "square-only",
            "--square-queries", "500", "--checklist", "--json", "--quiet",
            "--out", str(tmp_path / "out")])
    finally:
        sys.path.remove(str(tmp_path))
    assert result.exit_code in (0, 1, 3), result.output
    record = json.loads(result.stdout)
    assert [r["item"] for r in record["checklist"]] == ITEMS
    assert record["checklist"][-1]["status"] != "n/a"  # Square ran: its images are counted
    assert list((tmp_path / "out").glob("checklist_eps_*.png"))


def test_every_attack_item_of_the_checklist_attacks():
    """pgd100x5, fgsm and noise were only ever asked to pass on a regular model: a step size
    or noise scale of 0 passed too. Each must leave fewer images robust than clean, and on a
    linear model PGD-100x5 and FGSM must be at least as strong as PGD-10."""
    x, y = digits_test(N)
    net = prototype_linear()
    clean = (net(x).argmax(1) == y).float().mean().item()
    rows = {r.item: r for r in run_checklist(net, x, y, _settings())}
    for item in ("pgd100x5", "fgsm", "noise"):
        assert rows[item].numbers["strong_accuracy"] < clean, item
    for item in ("pgd100x5", "fgsm"):
        assert rows[item].numbers["strong_accuracy"] <= rows[item].numbers["weak_accuracy"], item


def test_restarts_and_the_sweep_attack_only_images_that_can_still_count():
    """An image counts as robust only if it is right clean and survives every restart, so
    PGD-100x5 attacks each restart only the images still robust, and the eps sweep only the
    images right clean, reusing PGD-10 at eps itself: the numbers of attacking every image
    every time, with fewer images through the model."""
    from trades_repro import checklist as cl

    x, y = digits_test(N)
    s, net = _settings(batch_size=16), prototype_linear()
    clean = cl._predicted(net, x, s) == y
    base = cl._robust(net, cl._pgd(net, x, y, s, s.eps, s.steps), y, clean, s)

    everything = Watched(net)  # the former way: the 5N images, all attacked
    reps = (cl.RESTARTS,) + (1,) * (x.dim() - 1)
    x_adv = cl._pgd(everything, x.repeat(reps), y.repeat(cl.RESTARTS), s, s.eps,
                    cl.LONG_STEPS, step_size=s.eps / 40)
    every = cl._robust(net, x_adv, y.repeat(cl.RESTARTS), clean.repeat(cl.RESTARTS), s)
    expected = cl._compare("pgd100x5", "PGD-100x5", base, every.view(cl.RESTARTS, -1).all(0))
    pruned = Watched(net)
    assert cl._restarts(pruned, x, y, s, clean, base).numbers == expected.numbers
    assert sum(pruned.batches) < 0.8 * sum(everything.batches)

    radii = sorted({min(1.0, f * s.eps) for f in cl.EPS_FACTORS})
    accs = [int(cl._robust(net, cl._pgd(net, x, y, s, r, s.steps), y, clean, s).sum()) / N
            for r in radii]
    swept = Watched(net)
    row = cl._sweep(swept, x, y, s, clean, None, None, base)
    assert row.numbers == {"eps": radii, "accuracy": accs}
    # the images right clean, at every radius but eps, and PGD-10's forwards per image
    assert sum(swept.batches) == int(clean.sum()) * (len(radii) - 1) * (s.steps + 1)
