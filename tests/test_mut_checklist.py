"""The masking checklist (checklist.py), pinned where mutation testing found
tests/test_checklist.py silent (tests/mutation_gate.py, group `checklist`).

test_checklist.py's statuses come from a module-scoped fixture: mutmut credits a fixture's
calls to the first test that builds it, so the tests that read those rows never ran against
a mutant. The tests here build what they read. Each pins one thing against a computation of
its own (the paired counts, FGSM, the noise draws, PGD's parameters as documented) or a
crafted input (the sweep's decision, Square's paired count).
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from _evalutil import EPS, Saturated, digits_test, prototype_linear
from torch import Tensor, nn

from trades_repro import checklist as cl
from trades_repro.checklist import run_checklist
from trades_repro.evaluate import EvalSettings
from trades_repro.records import AttackResult, CheckpointEval
from trades_repro.spec import LandscapeSpec

N = 20
ITEMS = ["pgd100x5", "margin_loss", "fgsm", "eps_sweep", "noise", "square_only"]


def _settings(eps: float = EPS, batch_size: int = 500) -> EvalSettings:
    return EvalSettings(dataset="digits", n_examples=N, eps=eps, step_size=eps / 4, steps=10,
                        random_start=True, batch_size=batch_size, seed=0, square_queries=5000,
                        device="cpu", landscape=LandscapeSpec(radius=min(eps, 1), steps=5))


def _bits(t: Tensor) -> Tensor:
    return torch.tensor([c == "1" for c in t], dtype=torch.bool)


def _result(name: str, robust: str) -> AttackResult:
    n_robust = robust.count("1")
    return AttackResult(name=name, paper_column=name, accuracy=n_robust / len(robust),
                        n_robust=n_robust, n_examples=len(robust), robust=robust, seconds=1.0)


def _record(pgd10: str | None, square: str | None, clean: str | None = None,
            key: str = "0123456789abcdef") -> CheckpointEval:
    attacks = {name: _result(name, bits) for name, bits in (("pgd10", pgd10),
                                                            ("square", square)) if bits}
    return CheckpointEval(checkpoint="m.safetensors", sha256="0" * 64, key=key,
                          settings=_settings(), requested=list(attacks), attacks=attacks,
                          clean=clean and _result("clean", clean))


def _uniform(shape, seed: int = 0) -> Tensor:
    """The settings' seeded U[0, 1) draws, written out (checklist._starts and _noise)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_compare_is_the_paired_mcnemar_rule_with_its_numbers_and_words():
    """"A beats B" only when A leaves fewer images robust (b > c) AND the exact McNemar p is
    below 0.05: b = 12, c = 0 beats (p = 2⁻¹¹); b = 3, c = 1 does not (p = 0.625); c = 12,
    b = 0 does not (the other way round). The numbers' keys and the detail are what diagnose
    prints and saves."""
    weak = torch.tensor([True] * 12 + [False] * 8)
    row = cl._compare("fgsm", "FGSM", weak, torch.zeros(20, dtype=torch.bool))
    assert (row.item, row.status) == ("fgsm", "warn")
    assert row.numbers == {"weak_accuracy": 0.6000000238418579, "strong_accuracy": 0.0,
                           "b": 12, "c": 0, "p": 2.0**-11}
    assert row.detail == "FGSM beats the other: 0.000 vs 0.600 (b=12, c=0, p=0.00049)"

    strong = torch.tensor([False] * 3 + [True] * 9 + [True] + [False] * 7)
    row = cl._compare("noise", "uniform noise", weak, strong)
    assert row.status == "pass" and (row.numbers["b"], row.numbers["c"]) == (3, 1)
    assert row.numbers["p"] == pytest.approx(0.625)
    assert row.detail == ("uniform noise does not beat the other: 0.500 vs 0.600 "
                          "(b=3, c=1, p=0.62)")

    row = cl._compare("fgsm", "FGSM", torch.zeros(20, dtype=torch.bool), weak)
    assert row.status == "pass" and (row.numbers["b"], row.numbers["c"]) == (0, 12)
    assert row.numbers["p"] < 0.05


def test_square_only_counts_the_records_paired_images_among_the_clean_ones():
    """b = robust to PGD-10 but broken by Square, c = the reverse, among the images right
    clean (the record's clean string), with Square's warning on b > c and p < 0.05; n/a
    unless the record holds both PGD-10 and Square."""
    na = "not counted: PGD-10 and Square were not both run"
    for record in (None, _record("1100", None), _record(None, "1100")):
        row = cl._square_only(record)
        assert (row.item, row.status, row.numbers, row.detail) == ("square_only", "n/a", {}, na)

    # 8 images only Square breaks, the 9th's is not counted (wrong clean), none the other way
    pgd10, square = "1" * 9 + "0" * 3, "0" * 9 + "0" * 3
    row = cl._square_only(_record(pgd10, square, clean="1" * 8 + "0" + "1" * 3))
    assert (row.item, row.status) == ("square_only", "warn")
    assert row.numbers == {"b": 8, "c": 0, "n": 12, "p": 2.0**-7}
    assert row.detail == "8 images only Square breaks, 0 only PGD-10 (p=0.0078)"

    row = cl._square_only(_record(pgd10, square))  # no clean result: every image counts
    assert row.numbers["b"] == 9

    row = cl._square_only(_record("1110", "0001"))  # b = 3 > c = 1, p = 0.625: pass
    assert (row.status, row.numbers["b"], row.numbers["c"]) == ("pass", 3, 1)
    row = cl._square_only(_record("0" * 9, "1" * 9))  # c = 9, p < 0.05, the other way: pass
    assert row.status == "pass" and row.numbers["p"] < 0.05


class _Seen(nn.Module):
    """Notes whether autocast was on in each forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.autocast = net, []

    def forward(self, x):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return self.net(x)


def test_run_checklist_reports_each_row_passes_record_and_folder_and_disables_autocast(
        tmp_path):
    """Each row's cost is its own wall time in seconds rounded to 3 decimals, reported in one
    line per row; the record reaches the Square count and the sweep's plot name, the folder
    the plot; the attacks run with autocast off even when the caller left it on (bf16 on the
    CPU would score another model than the record's fp32 PGD-10)."""
    x, y = digits_test(N)
    record = _record("1" * N, "0" * N)
    lines, seen = [], _Seen(prototype_linear())
    started = time.perf_counter()
    with torch.autocast("cpu"):
        rows = run_checklist(seen, x, y, _settings(), record=record, folder=tmp_path,
                             report=lines.append)
    wall = time.perf_counter() - started
    assert [r.item for r in rows] == ITEMS
    assert seen.autocast and not any(seen.autocast)
    assert lines == [f"checklist {r.item}: {r.status} ({r.detail}; {r.seconds:.1f} s)"
                     for r in rows]
    assert all(r.seconds == round(r.seconds, 3) >= 0 for r in rows)
    assert 0 < sum(r.seconds for r in rows) <= wall
    assert any(r.seconds != int(r.seconds) for r in rows)  # not rounded to whole seconds
    assert rows[-1].numbers["b"] == N and rows[-1].status == "warn"  # the record's Square
    assert rows[3].detail.endswith("; plot checklist_eps_01234567.png")
    assert (tmp_path / "checklist_eps_01234567.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row, name in zip(rows[:5], ("PGD-100x5 ", "APGD-DLR (margin) ", "FGSM ",
                                    "PGD-10 accuracy ", "uniform noise "), strict=True):
        assert row.detail.startswith(name), row.detail


def _spy(monkeypatch) -> list[dict]:
    calls = []

    def spy(model, x, y, **kw):
        calls.append({**kw, "n": len(x), "noise": None if kw["noise"] is None
                      else kw["noise"].clone()})
        return pgd(model, x, y, **kw)

    pgd = cl.pgd
    monkeypatch.setattr(cl, "pgd", spy)
    return calls


def test_the_pgd_items_attack_with_their_documented_parameters(monkeypatch):
    """PGD-10 with the settings' steps and α and a random start from the settings' seed
    drawn for the whole set; PGD-100x5 as 100 steps of ε/40, restart r starting from rows
    r·N + i of 5N draws; FGSM one step of ε from x itself; the sweep PGD-10 at radius r with
    α scaled by r/ε, from the whole set's draws, on the images right clean."""
    x, y = digits_test(N)
    s, net = _settings(), prototype_linear()
    calls = _spy(monkeypatch)
    run_checklist(net, x, y, s)
    clean = net(x).argmax(1) == y
    starts = _uniform(x.shape)

    base, *rest = calls
    assert (base["eps"], base["steps"], base["n"]) == (s.eps, 10, N)
    assert base["step_size"] == pytest.approx(s.step_size)  # ε·(α/ε): within an ulp
    assert base["random_start"] and torch.equal(base["noise"], starts)

    restarts = [c for c in rest if c["steps"] == cl.LONG_STEPS]
    assert 1 <= len(restarts) <= cl.RESTARTS and restarts[0]["n"] == int(clean.sum())
    five = _uniform((cl.RESTARTS * N, *x.shape[1:]))
    assert torch.equal(restarts[0]["noise"], five[:N][clean])
    for call in restarts:
        assert call["eps"] == s.eps and call["step_size"] == s.eps / 40 and call["random_start"]

    (fgsm,) = [c for c in rest if c["steps"] == 1]
    assert (fgsm["eps"], fgsm["step_size"], fgsm["noise"]) == (s.eps, s.eps, None)
    assert not fgsm["random_start"]

    sweep = [c for c in rest if c["steps"] == s.steps]
    radii = [r for r in sorted({min(1.0, f * s.eps) for f in cl.EPS_FACTORS}) if r != s.eps]
    assert [c["eps"] for c in sweep] == radii
    for call in sweep:
        assert call["step_size"] == pytest.approx(call["eps"] / 4) and call["random_start"]
        assert call["n"] == int(clean.sum()) and torch.equal(call["noise"], starts[clean])


def test_restart_r_starts_image_i_from_row_r_n_plus_i_of_the_draws(monkeypatch):
    """Restart r attacks image i from row r·N + i of the 5N draws: with a model that breaks
    nothing, every image is attacked in every restart, from those rows in order."""
    x, y = digits_test(6)

    class Still(nn.Module):  # always right; zero input gradient
        def forward(self, x):
            return F.one_hot(y, 10).float() + 0 * x.flatten(1).sum(1, keepdim=True)

    calls = _spy(monkeypatch)
    clean = torch.ones(6, dtype=torch.bool)
    row = cl._restarts(Still(), x, y, _settings(), clean, clean)
    assert row.status == "pass" and row.numbers["strong_accuracy"] == 1.0
    five = _uniform((cl.RESTARTS * 6, *x.shape[1:]))
    assert len(calls) == cl.RESTARTS
    for r, call in enumerate(calls):
        assert torch.equal(call["noise"], five[r * 6:(r + 1) * 6]), r


def test_restarts_and_the_sweep_with_no_image_left_return_all_zero():
    """No image right clean: PGD-100x5 stops at once and the sweep attacks nothing; both
    still return their row."""
    x, y = digits_test(N)
    s, net = _settings(), prototype_linear()
    none = torch.zeros(N, dtype=torch.bool)
    row = cl._restarts(net, x, y, s, none, none)
    assert (row.item, row.status, row.numbers["b"], row.numbers["c"]) == ("pgd100x5", "pass",
                                                                          0, 0)
    row = cl._sweep(net, x, y, s, none, None, None, none)
    assert row.numbers["accuracy"] == [0.0] * 6 and row.status == "pass"


def test_a_sweep_of_one_radius_has_no_rise():
    """ε ≥ 2 (the library takes it; the CLI stops at 1) caps every radius at 1: one
    accuracy, no neighbour, no rise; PGD at radius 1 breaks every image, so it passes."""
    x, y = digits_test(N)
    net = prototype_linear()
    clean = net(x).argmax(1) == y
    row = cl._sweep(net, x, y, _settings(eps=2.0), clean, None, None, clean)
    assert (row.status, row.numbers) == ("pass", {"eps": [1.0], "accuracy": [0.0]})


def _fgsm_robust(net: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    x = x.clone().requires_grad_(True)
    F.cross_entropy(net(x), y, reduction="sum").backward()
    x_adv = (x + eps * x.grad.sign()).clamp(0, 1).detach()
    return net(x_adv).argmax(1) == y


def test_fgsm_and_noise_leave_robust_what_their_definitions_do(monkeypatch):
    """FGSM = one signed-gradient step of ε from x; noise = 10 uniform draws in the ε-box
    (the settings' seed, clipped to [0, 1]: the model sees exactly those inputs), robust
    only if every draw leaves it right. Both among the images right clean, written out
    here."""
    x, y = digits_test(N)
    s, net = _settings(eps=0.3), prototype_linear()
    clean = net(x).argmax(1) == y
    seen = {}
    monkeypatch.setattr(cl, "_compare", lambda item, name, weak, strong:
                        seen.setdefault(item, strong))
    cl._fgsm(net, x, y, s, clean, clean)
    inputs = []
    cl._noise(lambda batch: inputs.append(batch) or net(batch), x, y, s, clean, clean)
    with torch.no_grad():
        draws = _uniform((10 * N, *x.shape[1:])) * 2 - 1
        noisy = (x.repeat(10, 1, 1, 1) + 0.3 * draws).clamp(0, 1)
        noise = (net(noisy).argmax(1) == y.repeat(10)).view(10, N).all(0) & clean
    assert torch.equal(torch.cat(inputs), noisy)  # in the ε-box and in [0, 1]
    fgsm = _fgsm_robust(net, x, y, 0.3) & clean
    assert torch.equal(seen["fgsm"], fgsm) and 0 < fgsm.sum() < clean.sum()
    assert torch.equal(seen["noise"], noise) and 0 < noise.sum() < clean.sum()


def test_the_margin_loss_item_is_apgd_ce_against_apgd_dlr(monkeypatch):
    """Saturated logits: APGD-CE finds no gradient, APGD-DLR (scale-free) does, so the item
    warns. Each attack is pyautoattack's APGD with 100 iterations, the settings' ε, seed and
    device, on the batches of the settings' size with their labels; its warnings are
    captured (as flags of `apgd-ce` / `apgd-dlr`), not raised."""
    x, y = digits_test(N)
    s, net = _settings(), prototype_linear()
    clean = net(x).argmax(1) == y
    row = cl._margin_loss(Saturated(net), x, y, s, clean)
    assert row.status == "warn" and row.numbers["b"] > 0 == row.numbers["c"]

    import pyautoattack.autopgd_base as apgd

    made, batches = [], []

    class Fake:
        def __init__(self, model, **kw):
            made.append(kw)

        def perturb(self, xb, yb):
            batches.append((len(xb), yb))
            warnings.warn("there are zero gradients", stacklevel=1)  # as APGD's checks do
            return xb

    monkeypatch.setattr(apgd, "APGDAttack", Fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # captured as the attack's flags, never escaping
        cl._margin_loss(net, x, y, _settings(batch_size=8), clean)
    assert made == [{"n_iter": 100, "eps": s.eps, "seed": 0, "loss": loss, "device": "cpu"}
                    for loss in ("ce", "dlr")]
    assert [n for n, _ in batches] == [8, 8, 4] * 2
    assert all(torch.equal(yb, part) for (_, yb), part in
               zip(batches, [*y.split(8)] * 2, strict=True))


class _Scripted(nn.Module):
    """Right on image i at radius r iff i < robust[r]: x holds i in column 0 and r in 1."""

    def __init__(self, robust: dict[float, int]) -> None:
        super().__init__()
        self.robust = robust

    def forward(self, x):
        right = torch.tensor([int(i) < self.robust[round(float(r), 6)] for i, r in x])
        return F.one_hot((~right).long(), 2).float()


def _sweep(accuracies: list[int], n: int = 50, folder=None, record=None):
    """_sweep on n images with `accuracies` robust images at the six radii (ε = 0.1)."""
    s = _settings(eps=0.1)
    radii = sorted({min(1.0, f * s.eps) for f in cl.EPS_FACTORS})
    model = _Scripted({round(r, 6): k for r, k in zip(radii, accuracies, strict=True)})
    x = torch.stack([torch.arange(n, dtype=torch.float32), torch.zeros(n)], 1)
    y = torch.zeros(n, dtype=torch.long)
    clean = torch.ones(n, dtype=torch.bool)
    base = torch.arange(n) < accuracies[radii.index(s.eps)]

    def fake_pgd(model, x, y, s, r, steps, noise=None):
        return torch.stack([x[:, 0], torch.full((len(x),), r)], 1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cl, "_pgd", fake_pgd)
        return cl._sweep(model, x, y, s, clean, folder, record, base)


def test_the_sweep_passes_only_a_fall_to_near_zero_without_a_rise():
    """Pass: the accuracy at the largest radius at most 10 % and no rise between
    neighbouring radii above 2 points; the detail names the first and last accuracies and
    radii, and the rise when there is one."""
    row = _sweep([40, 30, 20, 10, 4, 0])
    assert row.status == "pass" and row.numbers["eps"][-1] == 1.0
    assert row.detail == "PGD-10 accuracy 0.800 at eps 0.05 -> 0.000 at 1"

    row = _sweep([40, 30, 20, 10, 8, 6])  # ends at 0.12 > 0.10, never rises
    assert row.status == "warn"
    assert row.detail == "PGD-10 accuracy 0.800 at eps 0.05 -> 0.120 at 1"

    row = _sweep([40, 30, 20, 10, 8, 0])  # 0.16 at the second-largest radius: still pass
    assert row.status == "pass"

    row = _sweep([40, 30, 35, 20, 5, 0])  # rises by 0.1 between neighbours, ends at 0
    assert row.status == "warn"
    assert row.detail == "PGD-10 accuracy 0.800 at eps 0.05 -> 0.000 at 1; rises by 0.100"

    row = _sweep([40, 30, 30, 20, 10, 0])  # two radii apart it falls, neighbours: flat
    assert row.status == "pass"
    row = _sweep([25, 20, 22, 10, 5, 0])  # neighbours rise by 0.04; two apart it falls
    assert row.status == "warn"


def test_the_sweep_plot_is_named_by_the_record_key_or_sweep(tmp_path):
    """The plot goes to the folder as checklist_eps_<first 8 characters of the record's
    key>.png (checklist_eps_sweep.png without a record), and the detail names it."""
    accuracies = [40, 30, 20, 10, 4, 0]
    row = _sweep(accuracies, folder=tmp_path, record=_record("1", "1", key="fedcba9876543210"))
    assert row.detail == ("PGD-10 accuracy 0.800 at eps 0.05 -> 0.000 at 1; "
                          "plot checklist_eps_fedcba98.png")
    row = _sweep(accuracies, folder=tmp_path)
    assert row.detail.endswith("; plot checklist_eps_sweep.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checklist_eps_fedcba98.png",
                                                          "checklist_eps_sweep.png"]


def test_the_sweep_plot_draws_accuracy_against_log_eps_with_eps_marked(monkeypatch):
    """The PNG: accuracy (y, 0 to 1) against the radii (x, log scale), markers, a dotted
    grey line at ε, labelled axes, a 4 x 3 inch figure saved as a tight PNG at 100 dpi."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def savefig(fig, fname, **kw):
        saved.append((fig, kw))
        return original(fig, fname, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    png = cl._sweep_png([0.05, 0.1, 1.0], [0.8, 0.5, 0.0], 0.1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (fig, kw), = saved
    assert kw == {"format": "png", "dpi": 100, "bbox_inches": "tight"}
    assert tuple(fig.get_size_inches()) == (4, 3)
    (ax,) = fig.axes
    assert (ax.get_xscale(), ax.get_ylim()) == ("log", (0, 1))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("eps (L-inf)", "PGD-10 robust accuracy")
    data, eps_line = ax.get_lines()
    assert list(data.get_xdata()) == [0.05, 0.1, 1.0] and data.get_marker() == "o"
    assert list(data.get_ydata()) == [0.8, 0.5, 0.0]
    assert list(eps_line.get_xdata()) == [0.1, 0.1]
    assert (eps_line.get_color(), eps_line.get_linestyle()) == ("grey", ":")


def test_the_sweep_judges_exact_fractions_at_its_limits():
    """5 of 50 is the 10 % limit and a one-image rise of 50 is the 2-point slack: both pass.
    Judged on float32 means, 5/50 was 0.10000000149 (warn, with the detail reading 0.100),
    and a rise of 13 -> 14 warned while 20 -> 21 passed."""
    assert _sweep([40, 30, 20, 10, 8, 5]).status == "pass"
    assert _sweep([40, 30, 20, 10, 8, 6]).status == "warn"
    assert _sweep([40, 30, 13, 14, 5, 0]).status == "pass"
    assert _sweep([40, 30, 20, 21, 5, 0]).status == "pass"
    row = _sweep([40, 30, 13, 15, 5, 0])  # two images: 4 points
    assert row.status == "warn" and row.detail.endswith("; rises by 0.040")
    assert _sweep([40, 30, 20, 10, 8, 5]).numbers["accuracy"][-1] == 0.1


def test_the_checklists_pgd10_is_the_records_own(monkeypatch):
    """Its PGD-10 (the base every item compares with, and the sweep at each radius) takes
    the settings' random start and their α itself: it always started at random, and used
    ε·(α/ε), an ulp off α."""
    x, y = digits_test(N)
    s = _settings().model_copy(update={"random_start": False})
    assert s.eps * s.step_size / s.eps != s.step_size  # 0.025000000000000005 at eps 0.1
    calls = _spy(monkeypatch)
    run_checklist(prototype_linear(), x, y, s)
    base, *rest = calls
    assert base["step_size"] == s.step_size and not base["random_start"]
    assert base["noise"] is None
    sweep = [c for c in rest if c["steps"] == s.steps]
    assert sweep and all(not c["random_start"] and c["noise"] is None for c in sweep)
    restarts = [c for c in rest if c["steps"] == cl.LONG_STEPS]
    assert restarts and all(c["random_start"] for c in restarts)  # random by definition
