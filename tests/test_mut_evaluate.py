"""evaluate.py's counting and plumbing, and verdict.py's rules, fast enough to mutate.

No real attack runs here: attack runners are replaced by fakes that return given per-example
robust flags, and pyautoattack's `AutoAttack` by a recorder, so every count (accuracy, the
cascade's AND, the worst case over attacks, the paired b and c) is checked against a brute
force count over those flags, and every statistic against scipy called from the counts.
The one model is `Brightest`: its logits are the image's K pixels, so an image's class is
its brightest pixel and an "attack" is moving the light to another pixel.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from scipy.stats import binomtest
from torch import nn

from trades_repro import evaluate as ev
from trades_repro import verdict as vd
from trades_repro.errors import BadInput
from trades_repro.landscape import LandscapeResult
from trades_repro.records import AttackResult, Flag, Preflight
from trades_repro.spec import LandscapeSpec

K = 4  # classes = pixels of a 2x2 image
CLEAN = "11111100"  # the first six images are lit at their label, the last two elsewhere
FAKE_ROBUST = {
    "pgd10": "11110010",
    "square": "11010000",
    "apgd-ce": "10110000",
    "apgd-t": "11100000",
    "fab-t": "11110010",
    "autoattack": "10000000",
}
ALL_SIX = ("pgd10", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack")
PREFLIGHT_FLAG = Flag(attack="preflight", check="zero_gradients", message="3 points")


class Brightest(nn.Module):
    """Logits = the K pixels: the predicted class is the brightest pixel."""

    def forward(self, x):
        return x.flatten(1) * 1.0


def _lit(labels: list[int]) -> torch.Tensor:
    """Images [n, 1, 2, 2], image i lit (0.8) at pixel labels[i], dark elsewhere."""
    x = torch.zeros(len(labels), K)
    x[torch.arange(len(labels)), torch.tensor(labels)] = 0.8
    return x.reshape(-1, 1, 2, 2)


def _world() -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    return _attacked(y, CLEAN), y


def _attacked(y: torch.Tensor, robust: str) -> torch.Tensor:
    """Adversarial images that keep the label exactly where `robust` says '1'."""
    return _lit([int(c) if r == "1" else (int(c) + 1) % K for c, r in zip(y, robust, strict=True)])


def _settings(**changes) -> ev.EvalSettings:
    base = dict(
        dataset="synthetic",
        n_examples=8,
        eps=1.0,
        step_size=0.25,
        steps=10,
        random_start=True,
        batch_size=3,
        seed=5,
        square_queries=50,
        device="cpu",
        landscape=LandscapeSpec(radius=0.5, steps=3),
        n_classes=K,
    )
    return ev.EvalSettings(**{**base, **changes})


def _result(name: str, robust: str, **fields) -> AttackResult:
    hits = robust.count("1")
    return AttackResult(
        name=name,
        paper_column=ev.PAPER_COLUMNS[name],
        accuracy=hits / max(1, len(robust)),
        n_robust=hits,
        n_examples=len(robust),
        robust=robust,
        seconds=fields.pop("seconds", 0.0),
        **fields,
    )


def _and(*strings: str) -> str:
    return "".join(
        "1" if all(s[i] == "1" for s in strings) else "0" for i in range(len(strings[0]))
    )


class World:
    """Fake runners, pre-flight and landscape, recording every call."""

    def __init__(self, monkeypatch, randomized: bool = False, lie: bool = False):
        self.lie = lie  # return the clean images whatever the flags say
        self.calls: list[tuple[str, bool]] = []
        self.preflights: list[dict] = []
        self.landscapes: list[dict] = []
        self.randomized = randomized
        runners = {name: self._runner(name) for name in ev.ALL_ATTACKS}
        monkeypatch.setattr(ev, "RUNNERS", runners)
        monkeypatch.setattr(ev, "preflight", self._preflight)
        monkeypatch.setattr(ev, "landscape_result", self._landscape)

    def _runner(self, name: str):
        flags = [Flag(attack=name, check="dynamic", message=f"{name} moves")] * 2  # once

        def run(model, x, y, s, randomized):
            self.calls.append((name, randomized))
            x_adv = x.clone() if self.lie else _attacked(y, FAKE_ROBUST[name])
            return _result(
                name, FAKE_ROBUST[name], seconds=2.0, params={"p": 1}, flags=flags
            ), x_adv

        return run

    def _preflight(self, model, x, y, n_classes, *, device, attacks):
        self.preflights.append(
            {"n": len(y), "n_classes": n_classes, "device": device, "attacks": attacks}
        )
        return Preflight(
            n_classes=K,
            batch=len(y),
            clean_correct=CLEAN.count("1"),
            randomized=self.randomized,
            checks=[PREFLIGHT_FLAG],
        )

    def _landscape(self, model, x, y, spec, **kwargs):
        self.landscapes.append({"spec": spec, **kwargs})
        return LandscapeResult(
            radius=spec.radius,
            steps=spec.steps,
            n_images=1,
            roughness=1.25,
            loss_min=0.0,
            loss_max=1.0,
        )


def _evaluate(attacks=ev.ALL_ATTACKS, settings=None, **kwargs) -> ev.CheckpointEval:
    x, y = _world()
    kwargs.setdefault("identity", ("ck/net.safetensors", "a" * 64, ["best_pgd10"]))
    return ev.evaluate_model(Brightest(), x, y, settings or _settings(), attacks, **kwargs)


# ------------------------------------------------------------------ evaluate_model, _run_steps


def test_every_count_of_a_full_evaluation_is_the_brute_force_count(monkeypatch):
    world = World(monkeypatch)
    saved: list[ev.CheckpointEval] = []
    lines: list[str] = []
    record = _evaluate(save=lambda r: saved.append(r.model_copy(deep=True)), report=lines.append)
    cascade = [FAKE_ROBUST[a] for a in ("apgd-ce", "apgd-t", "fab-t", "square")]
    # run order: the primary verdict's two first; AutoAttack composed, not run
    assert world.calls == [(a, False) for a in ("pgd10", "square", "apgd-ce", "apgd-t", "fab-t")]
    assert record.clean.robust == CLEAN and record.clean.n_robust == 6
    assert (record.clean.accuracy, record.clean.n_examples) == (0.75, 8)
    composed = record.attacks["autoattack"]
    assert composed.robust == _and(*cascade) and composed.n_robust == _and(*cascade).count("1")
    both = _and(*[record.attacks[a].robust for a in ev.ALL_ATTACKS])
    assert record.worst_case_accuracy == both.count("1") / 8
    assert record.requested == list(ev.ALL_ATTACKS) and record.policies == ["best_pgd10"]
    assert record.complete and record.landscape.roughness == 1.25
    assert [(f.attack, f.check) for f in record.flags] == [
        ("preflight", "zero_gradients"),
        ("pgd10", "dynamic"),
        ("square", "dynamic"),
        ("apgd-ce", "dynamic"),
        ("apgd-t", "dynamic"),
        ("fab-t", "dynamic"),
    ]
    v1 = {v.rule: v for v in record.verdicts}["pgd10_minus_square_v1"]
    assert v1.margin == (FAKE_ROBUST["pgd10"].count("1") - FAKE_ROBUST["square"].count("1")) / 8
    assert [v.rule for v in record.verdicts] == [r.name for r in vd.VERDICT_RULES]
    v2 = {v.rule: v for v in record.verdicts}["pgd10_minus_square_v2"]
    b, c = (
        sum(
            k == p == "1" and o == "0"
            for k, p, o in zip(CLEAN, FAKE_ROBUST[one], FAKE_ROBUST[two], strict=True)
        )
        for one, two in (("pgd10", "square"), ("square", "pgd10"))
    )
    assert (v2.b, v2.c) == (b, c) == (1, 0)  # not image 6: robust to PGD-10 only, wrong clean
    assert set(record.adversarial) == set(ev.ALL_ATTACKS)
    assert all(c.ok and c.file is None for c in record.adversarial.values())
    assert record.backend == {
        "tf32_matmul": False,
        "tf32_cudnn": False,
        "cudnn_deterministic": True,
        "cudnn_benchmark": False,
    }
    assert 0 <= record.seconds < 60
    assert world.preflights == [
        {"n": 8, "n_classes": K, "device": "cpu", "attacks": ev.ALL_ATTACKS}
    ]
    (land,) = world.landscapes
    assert land == {
        "spec": _settings().landscape,
        "seed": 5,
        "device": "cpu",
        "checkpoint": f"net_{record.key[:8]}",
        "folder": None,
    }
    assert (
        lines[0] == "pre-flight: 4 classes, logits, 6/8 correct; AutoAttack checks: zero_gradients"
    )
    assert lines[1] == "clean: 0.7500 (0.0 s)"
    assert lines[2:12] == [
        "pgd10: attacking 8 images ...",
        "pgd10: 0.6250 (2.0 s)",
        "square: attacking 8 images ...",
        "square: 0.3750 (2.0 s)",
        "apgd-ce: attacking 8 images ...",
        "apgd-ce: 0.3750 (2.0 s)",
        "apgd-t: attacking 8 images ...",
        "apgd-t: 0.3750 (2.0 s)",
        "fab-t: attacking 8 images ...",
        "fab-t: 0.6250 (2.0 s)",
    ]  # the composed cascade attacks nothing
    assert lines[12].startswith("autoattack: 0.1250 (") and len(lines) == 14
    assert lines[13] == "landscape roughness: 1.250"
    # saved after the pre-flight, the clean pass, each attack, and at the end
    assert len(saved) == 9 and saved[-1] == record
    assert saved[0].preflight is not None and saved[0].clean is None
    assert saved[1].clean is not None and not saved[1].attacks
    assert list(saved[2].attacks) == ["pgd10"] and saved[2].verdicts[0].pgd10 == 0.625
    assert not saved[7].complete and saved[7].landscape is None


def test_a_randomized_model_gets_every_attack_run_and_told(monkeypatch):
    world = World(monkeypatch, randomized=True)
    lines: list[str] = []
    record = _evaluate(report=lines.append)
    assert world.calls == [(a, True) for a in ev.RUN_ORDER]  # the cascade is not composed
    assert record.attacks["autoattack"].robust == FAKE_ROBUST["autoattack"]
    assert lines[0] == (
        "pre-flight: 4 classes, logits, 6/8 correct; AutoAttack checks: "
        "zero_gradients; the model is randomized (two forwards of one batch "
        "differ): AutoAttack runs its 'rand' version (EOT)"
    )


@pytest.mark.parametrize("randomized", [False, True])
def test_flags_contradicting_the_model_fail_the_recheck_unless_it_is_randomized(
    monkeypatch, randomized
):
    World(monkeypatch, randomized=randomized, lie=True)
    check = _evaluate(attacks=("pgd10",)).adversarial["pgd10"]
    assert check.disagreements == 3 and check.ok is randomized  # images 4, 5 and 6


def test_only_the_asked_attacks_run_in_run_order(monkeypatch):
    world = World(monkeypatch)
    record = _evaluate(attacks=("fab-t", "square", "pgd10"))
    assert [name for name, _ in world.calls] == ["pgd10", "square", "fab-t"]
    assert record.requested == ["pgd10", "fab-t", "square"] and record.complete
    assert world.preflights[0]["attacks"] == ("fab-t", "square", "pgd10")
    composed = {v.rule: v.outcome for v in record.verdicts}
    assert composed["pgd10_minus_autoattack_v2"] == "no_verdict"


def test_a_resumed_record_reruns_only_what_is_missing_and_keeps_its_time(monkeypatch):
    world = World(monkeypatch)
    first = _evaluate(attacks=("pgd10", "square"))
    first.seconds = 100.0
    before = first.model_copy(deep=True)
    world.calls.clear()
    monkeypatch.setattr(ev, "_clean", lambda *a: pytest.fail("clean was already done"))
    again = _evaluate(
        attacks=("apgd-ce",),
        previous=first,
        identity=("ck/net.safetensors", "a" * 64, ["best_pgd10_fosc_ok"]),
    )
    assert world.calls == [("apgd-ce", False)]
    assert len(world.preflights) == 1 and len(world.landscapes) == 1  # not redone
    assert again.requested == ["pgd10", "apgd-ce", "square"] and again.complete
    assert again.policies == ["best_pgd10_fosc_ok"]
    assert again.attacks["pgd10"] == first.attacks["pgd10"]
    assert 100.0 <= again.seconds < 160.0
    assert first == before  # the previous record is copied, never changed


def test_another_key_starts_afresh(monkeypatch):
    world = World(monkeypatch)
    first = _evaluate(attacks=("pgd10", "square"))
    first.seconds = 100.0
    world.calls.clear()
    other = _evaluate(attacks=("apgd-ce",), previous=first, settings=_settings(seed=6))
    assert world.calls == [("apgd-ce", False)] and len(world.preflights) == 2
    assert other.requested == ["apgd-ce"] and set(other.attacks) == {"apgd-ce"}
    assert other.seconds < 60 and other.key != first.key
    world.calls.clear()
    another_file = _evaluate(
        attacks=("pgd10",), previous=first, identity=("ck/net.safetensors", "c" * 64, [])
    )
    assert world.calls == [("pgd10", False)] and another_file.sha256 == "c" * 64
    # an unset model fingerprint and tf32 False are left out: keys made before they existed
    # still resume
    text = f"{'c' * 64}|{_settings().model_dump_json(exclude={'model_fingerprint', 'tf32'})}"
    assert another_file.key == hashlib.sha256(text.encode()).hexdigest()[:16]
    fingerprinted = _settings().model_copy(update={"model_fingerprint": "f" * 64})
    text = f"{'c' * 64}|{fingerprinted.model_dump_json(exclude={'tf32'})}"
    expected = hashlib.sha256(text.encode()).hexdigest()[:16]
    assert ev.settings_key("c" * 64, fingerprinted) == expected


def test_evaluation_time_is_kept_to_the_millisecond(monkeypatch):
    World(monkeypatch)
    ticks = iter([0.0])  # the clock starts at 0, then reads 1.23456 s forever
    monkeypatch.setattr(ev, "time", SimpleNamespace(perf_counter=lambda: next(ticks, 1.23456)))
    first = _evaluate(attacks=("pgd10",))
    assert first.seconds == 1.235
    ticks = iter([0.0])
    assert _evaluate(attacks=("square",), previous=first).seconds == 2.47  # 1.235 + 1.235


def test_adversarial_examples_and_landscape_go_to_the_given_folders(monkeypatch, tmp_path):
    world = World(monkeypatch)
    record = _evaluate(
        attacks=("pgd10", "square"),
        adversarial_dir=tmp_path / "adv",
        landscape_dir=tmp_path / "land",
    )
    stem = f"net_{record.key[:8]}"
    for step in ("pgd10", "square"):
        check = record.adversarial[step]
        assert check.file == f"adv_{stem}_{step}.safetensors"
        saved = load_file(tmp_path / "adv" / check.file)
        assert torch.equal(saved["x_adv"], _attacked(_world()[1], FAKE_ROBUST[step]))
    assert world.landscapes[0]["folder"] == tmp_path / "land"
    assert world.landscapes[0]["checkpoint"] == stem


def test_the_model_is_evaluated_in_eval_mode_and_fp32(monkeypatch):
    World(monkeypatch)
    x, y = _world()
    net = nn.Sequential(nn.Flatten(), nn.Linear(K, K)).double().train()
    ev.evaluate_model(net, x, y, _settings(), ("pgd10",), identity=("n", "b" * 64, []))
    assert not net.training and all(p.dtype == torch.float32 for p in net.parameters())


def test_out_of_memory_names_a_smaller_evaluation_batch(monkeypatch):
    World(monkeypatch)

    def explode(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setitem(ev.RUNNERS, "pgd10", explode)
    with pytest.raises(
        BadInput,
        match=r"^out of GPU memory at evaluation batch 3: pass "
        r"--eval-batch 1 \(or smaller\)$",
    ):
        _evaluate(attacks=("pgd10",))


# --------------------------------------------------------------------------- the cascade


def _cascade_record(robust: dict[str, str]) -> ev.CheckpointEval:
    record = ev.CheckpointEval(
        checkpoint="m", sha256="a" * 64, key="k", settings=_settings(), requested=[]
    )
    for i, name in enumerate(ev.CASCADE):
        record.attacks[name] = _result(
            name,
            robust[name],
            params={"n": i, "m": "x"},
            seconds=1.25 * (i + 1) + 0.0004,
            flags=[
                Flag(attack=name, check="other", message="same"),
                Flag(attack=name, check=name, message=name),
            ],
        )
    return record


def test_the_composed_cascade_is_the_and_and_the_first_breaking_attacks_example():
    robust = {"apgd-ce": "1101101", "apgd-t": "1011101", "fab-t": "1110011", "square": "1111100"}
    record = _cascade_record(robust)
    x = torch.zeros(7, 1, 2, 2)
    examples = {
        name: torch.full((7, 1, 2, 2), 0.1 * (i + 1), dtype=torch.float64)
        for i, name in enumerate(ev.CASCADE)
    }
    result, x_adv = ev.compose_cascade(record, examples, x)
    assert result.robust == "1000000" and result.n_robust == 1 and result.n_examples == 7
    assert (result.name, result.paper_column) == ("autoattack", "AutoAttack")
    assert result.seconds == 12.502  # the four attacks' time (12.5016), to the ms as any row
    assert result.accuracy == pytest.approx(1 / 7, rel=1e-7)  # a float32 mean
    # image 1: apgd-t first breaks it (0.2); 2: apgd-ce (0.1); 4: fab-t (0.3); 5: square; 6 ...
    first = []
    for i in range(7):
        breaking = [j for j, name in enumerate(ev.CASCADE) if robust[name][i] == "0"]
        first.append(0.0 if not breaking else 0.1 * (breaking[0] + 1))
    assert x_adv.dtype == torch.float32
    assert torch.allclose(x_adv.flatten(1)[:, 0], torch.tensor(first, dtype=torch.float32))
    assert result.params == {
        "apgd-ce.n": 0,
        "apgd-ce.m": "x",
        "apgd-t.n": 1,
        "apgd-t.m": "x",
        "fab-t.n": 2,
        "fab-t.m": "x",
        "square.n": 3,
        "square.m": "x",
        "version": "standard",
        "composed_from": "apgd-ce,apgd-t,fab-t,square",
    }
    assert [f.check for f in result.flags] == ["other", "apgd-ce", "apgd-t", "fab-t", "square"]


def test_the_cascade_is_composed_only_from_attacks_run_here_at_standard_settings():
    record = _cascade_record(dict.fromkeys(ev.CASCADE, "1"))
    here = dict.fromkeys(ev.CASCADE, torch.zeros(1))
    assert ev.composable(record, here, randomized=False)
    assert not ev.composable(record, here, randomized=True)
    for name in ev.CASCADE:
        assert not ev.composable(record, {k: v for k, v in here.items() if k != name}, False)
        partial = record.model_copy(deep=True)
        del partial.attacks[name]
        assert not ev.composable(partial, here, False)


# ------------------------------------------------------------------ the derived numbers


def test_refresh_derives_flags_verdicts_worst_case_and_completeness():
    record = ev.CheckpointEval(
        checkpoint="m",
        sha256="a" * 64,
        key="k",
        settings=_settings(),
        requested=["pgd10", "square"],
    )
    ev._refresh(record)
    assert record.worst_case_accuracy is None and record.flags == [] and not record.complete
    assert [v.outcome for v in record.verdicts] == [None, None, "no_verdict", "no_verdict"]
    record.attacks = {"pgd10": _result("pgd10", "1101"), "square": _result("square", "0111")}
    record.adversarial["square"] = ev.AdversarialCheck(
        max_linf=0.5, in_box=False, finite=True, disagreements=2, ok=False
    )
    record.adversarial["pgd10"] = ev.AdversarialCheck(
        max_linf=0.1, in_box=True, finite=True, disagreements=0, ok=True
    )
    ev._refresh(record)
    assert record.worst_case_accuracy == 0.5  # images 1 and 3 survive both
    assert not record.complete  # no landscape yet
    (flag,) = record.flags
    assert flag == Flag(
        attack="square",
        check="adversarial_check",
        message="re-check failed: max |delta| 0.5 (eps 1), in [0, 1]: False, "
        "finite: True, 2 predictions disagree with the attack",
    )
    record.landscape = LandscapeResult(
        radius=0.5, steps=3, n_images=1, roughness=1.0, loss_min=0.0, loss_max=1.0
    )
    record.preflight = Preflight(
        n_classes=K,
        batch=4,
        clean_correct=4,
        randomized=False,
        checks=[PREFLIGHT_FLAG, PREFLIGHT_FLAG],
    )
    ev._refresh(record)
    assert record.complete and [f.attack for f in record.flags] == ["preflight", "square"]
    record.requested.append("fab-t")
    ev._refresh(record)
    assert not record.complete


def test_paired_verdicts_see_clean_correctness_and_fired_checks():
    record = ev.CheckpointEval(
        checkpoint="m", sha256="a" * 64, key="k", settings=_settings(), requested=[]
    )
    # image 0 robust to PGD-10 only; 1 to Square only; 2 to PGD-10 only but wrong clean
    record.clean = _result("clean", "110" + "1" * 97)
    record.attacks = {
        "pgd10": _result("pgd10", "101" + "0" * 97),
        "square": _result("square", "010" + "0" * 97),
    }
    ev._refresh(record)
    v2 = {v.rule: v for v in record.verdicts}["pgd10_minus_square_v2"]
    assert (v2.b, v2.c, v2.outcome) == (1, 1, "clear")
    record.preflight = Preflight(
        n_classes=K, batch=4, clean_correct=4, randomized=False, checks=[PREFLIGHT_FLAG]
    )
    ev._refresh(record)
    v2 = {v.rule: v for v in record.verdicts}["pgd10_minus_square_v2"]
    assert v2.outcome == "inconclusive" and "zero_gradients" in v2.note


def test_results_count_robust_flags_and_round_their_time(monkeypatch):
    # a fixed clock: 1.23456 s spent, whatever the scheduler does between the two readings
    monkeypatch.setattr(ev, "time", SimpleNamespace(perf_counter=lambda: 101.23456))
    result = ev._result("square", torch.tensor([1.0, 0.0, 2.0]), 100.0, params={"q": 5})
    assert result.seconds == 1.235  # to the ms: not 1.2346 (4 places), not 1.23456
    assert (result.name, result.paper_column, result.robust) == ("square", "Square", "101")
    assert (result.n_robust, result.n_examples) == (2, 3)
    assert result.accuracy == pytest.approx(2 / 3, rel=1e-7)  # a float32 mean
    assert isinstance(result.n_robust, int) and result.params == {"q": 5}


def test_clean_accuracy_is_counted_over_every_batch():
    x, y = _world()
    result, same = ev._clean(Brightest(), x, y, _settings(batch_size=3))
    assert result.robust == CLEAN and same is x and result.name == "clean"


def test_preflight_line_lists_each_fired_check_once_in_order():
    record = ev.CheckpointEval(
        checkpoint="m", sha256="a" * 64, key="k", settings=_settings(), requested=[]
    )
    record.preflight = Preflight(
        n_classes=10,
        batch=64,
        clean_correct=60,
        randomized=False,
        checks=[
            PREFLIGHT_FLAG,
            Flag(attack="preflight", check="dynamic", message="d"),
            Flag(attack="preflight", check="zero_gradients", message="9 points"),
        ],
    )
    assert ev._preflight_line(record) == (
        "pre-flight: 10 classes, logits, 60/64 correct; AutoAttack checks: dynamic, zero_gradients"
    )
    record.preflight.checks = []
    assert ev._preflight_line(record).endswith("AutoAttack checks: none")


# ---------------------------------------------------------------------------- the re-check


def _recheck(x_adv, robust=CLEAN, randomized=False, eps=1.0, path=None, x=None, y=None):
    x0, y0 = _world()
    x, y = (x0 if x is None else x), (y0 if y is None else y)
    return ev.recheck(
        Brightest(), x, y, x_adv, _result("pgd10", robust), _settings(eps=eps), randomized, path
    )


def test_recheck_measures_the_perturbation_box_and_predictions_by_brute_force():
    x, y = _world()
    moved = _attacked(y, "10101010")  # images 1, 3, 5 move their light: |delta| 0.8
    check = _recheck(moved, robust="10101010")
    assert check.ok and check.max_linf == pytest.approx(0.8) and check.disagreements == 0
    assert check.in_box and check.finite and check.file is None
    wrong = _recheck(moved, robust="11111111")  # the attack claims what the model denies
    assert not wrong.ok and wrong.disagreements == 4
    assert _recheck(moved, robust="11111111", randomized=True).ok  # randomized: expected
    assert not _recheck(moved, robust="10101010", eps=0.5).ok


def test_recheck_of_flat_inputs():
    x = torch.tensor([[0.8, 0.0, 0.0, 0.0], [0.0, 0.8, 0.0, 0.0]])
    x_adv = torch.tensor([[0.8, 0.0, 0.0, 0.5], [0.8, 0.0, 0.0, 0.0]])
    check = ev.recheck(
        Brightest(),
        x,
        torch.tensor([0, 1]),
        x_adv,
        _result("pgd10", "10"),
        _settings(eps=0.8),
        False,
        None,
    )
    assert check.ok and check.max_linf == pytest.approx(0.8)


def test_recheck_slack_is_inclusive():
    eps = 0.25 - 1e-6
    assert eps + 1e-6 == 0.25  # so a perturbation of exactly 0.25 sits on the bound
    x = torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    x_adv = torch.tensor([[0.5, 0.0, 0.0, 0.25]])
    check = ev.recheck(
        Brightest(),
        x,
        torch.tensor([0]),
        x_adv,
        _result("pgd10", "1"),
        _settings(eps=eps),
        False,
        None,
    )
    assert check.max_linf == 0.25 and check.ok


def test_every_pass_over_the_examples_runs_on_the_settings_device(monkeypatch):
    devices: list[str] = []
    real = ev._batches

    def spy(x, y, size, device):
        devices.append(device)
        return real(x, y, size, device)

    monkeypatch.setattr(ev, "_batches", spy)
    x, y = _world()
    s = _settings(device="cpu")
    ev._clean(Brightest(), x, y, s)
    ev._pgd10(nn.Sequential(nn.Flatten(), nn.Linear(K, K)), x, y, s)
    ev.recheck(Brightest(), x, y, x, _result("pgd10", CLEAN), s, False, None)
    assert devices == ["cpu", "cpu", "cpu"]
    batches = list(real(x, y, 3, "meta"))
    assert [len(b) for b, _ in batches] == [3, 3, 2]
    assert all(b.device.type == c.device.type == "meta" for b, c in batches)


def test_recheck_allows_one_float32_rounding_above_eps_and_no_more():
    x = torch.tensor([0.5, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 2)  # class 0 throughout
    for excess, ok in ((0.0, True), (5e-7, True), (3e-6, False)):
        x_adv = x + torch.tensor([0.0, 0.0, 0.0, 0.25 + excess]).reshape(1, 1, 2, 2)
        check = ev.recheck(
            Brightest(),
            x,
            torch.tensor([0]),
            x_adv,
            _result("pgd10", "1"),
            _settings(eps=0.25),
            False,
            None,
        )
        assert check.ok is ok and check.in_box and check.disagreements == 0, (excess, check)


@pytest.mark.parametrize(
    ("value", "in_box", "finite"),
    [
        (-0.01, False, True),
        (1.01, False, True),
        (1.0, True, True),
        (0.0, True, True),
        (float("nan"), False, False),
        (float("inf"), False, False),
    ],
)
def test_recheck_refuses_pixels_outside_the_image_range(value, in_box, finite):
    x, y = _world()
    x_adv = x.clone()
    x_adv[6, 0, 0, 0] = value  # image 6 is misclassified (pixel 3 lit) and stays so
    check = _recheck(x_adv, eps=2.0)
    assert (check.in_box, check.finite) == (in_box, finite)
    assert check.ok is (in_box and finite)


def test_recheck_saves_the_examples_it_checked(tmp_path):
    x, y = _world()
    x_adv = x.transpose(2, 3).double()  # not contiguous, not fp32: saved as fp32 all the same
    check = ev.recheck(
        Brightest(),
        x,
        y[::1],
        x_adv,
        _result("pgd10", "11111100"),
        _settings(),
        False,
        tmp_path / "adv.safetensors",
    )
    assert check.file == "adv.safetensors"
    saved = load_file(tmp_path / "adv.safetensors")
    assert torch.equal(saved["x_adv"], x_adv.float()) and torch.equal(saved["y"], y)
    assert saved["x_adv"].dtype == torch.float32


# -------------------------------------------------------------------------------- PGD-10


def _reference_pgd(net, x, y, eps, alpha, steps, noise):
    """PGD-10 written out (Madry et al.): uniform start in the box, signed steps, projection
    onto the box and [0, 1]; the gradient of the per-example CE recorded at every iterate."""
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    x_adv = x if noise is None else torch.min(torch.max(x + eps * (2 * noise - 1), lower), upper)
    grads = []
    for i in range(steps + 1):
        point = x_adv.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(net(point), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, point)
        grads.append(g)
        if i < steps:
            x_adv = torch.min(torch.max(x_adv + alpha * g.sign(), lower), upper)
    fosc = [eps * g.abs().sum() - ((x_adv - x)[b] * g).sum() for b, g in enumerate(grads[-1])]
    sgcs = []
    for b in range(len(y)):
        signs = [grads[i][b].flatten().sign() for i in range(steps)]
        pairs = [
            float(signs[i] @ signs[j])
            / max(1.0, float((signs[i].abs().sum() * signs[j].abs().sum()).sqrt()))
            for i in range(steps)
            for j in range(steps)
            if i != j
        ]
        sgcs.append(sum(pairs) / len(pairs))
    robust = "".join("1" if c else "0" for c in (net(x_adv).argmax(1) == y).tolist())
    return x_adv, robust, float(torch.stack(fosc).mean()), sum(sgcs) / len(sgcs)


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd10_is_pgd_from_one_noise_draw_for_all_batches(random_start):
    torch.manual_seed(0)  # a curved network, 3 short steps: where PGD ends depends on its start
    net = nn.Sequential(nn.Flatten(), nn.Linear(K, 32), nn.Tanh(), nn.Linear(32, K)).eval()
    x = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    s = _settings(eps=0.3, step_size=0.05, steps=3, seed=7, random_start=random_start)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    x_ref, robust, fosc, sgcs = _reference_pgd(
        net, x, y, 0.3, 0.05, 3, noise if random_start else None
    )
    result, x_adv = ev._pgd10(net, x, y, s)
    assert torch.allclose(x_adv, x_ref, atol=1e-6) and result.robust == robust
    assert result.fosc_mean == pytest.approx(fosc, abs=1e-5)
    assert result.sgcs_mean == pytest.approx(sgcs, abs=1e-5)
    assert result.params == {"step_size": 0.05, "steps": 3, "random_start": random_start}
    assert result.name == "pgd10" and result.n_examples == 8
    whole, x_whole = ev._pgd10(net, x, y, s.model_copy(update={"batch_size": 8}))
    assert torch.equal(x_whole, x_adv) and whole.robust == result.robust
    _, x_other = ev._pgd10(net, x, y, s.model_copy(update={"seed": 8}))
    assert torch.equal(x_other, x_adv) is not random_start  # the seed picks the start
    wrong = _reference_pgd(net, x, y, 0.3, 0.05, 3, None if random_start else noise)[0]
    assert not torch.allclose(wrong, x_ref, atol=1e-6)  # so the start is tested


# ------------------------------------------------------------------- pyautoattack's runners


class FakeAutoAttack:
    """Stands in for pyautoattack.AutoAttack: standard's settings, a recorded run, warnings."""

    made: list[FakeAutoAttack] = []
    y_adv: torch.Tensor = torch.zeros(0)

    def __init__(self, model, *, device, eps, seed, version):
        self.model, self.made_with = (
            model,
            {"device": device, "eps": eps, "seed": seed, "version": version},
        )
        self.verbose = True
        self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]
        self.apgd = SimpleNamespace(n_iter=100, n_restarts=1, eot_iter=1)
        self.apgd_targeted = SimpleNamespace(n_iter=101, n_target_classes=9)
        self.fab = SimpleNamespace(n_iter=102, n_target_classes=9)
        self.square = SimpleNamespace(n_queries=5000, p_init=0.8)
        FakeAutoAttack.made.append(self)

    def run_standard_evaluation(self, x, y, *, batch_size=250):
        self.given = (x, y)
        self.ran = {
            "batch_size": batch_size,
            "autocast": torch.is_autocast_enabled("cpu"),
            "verbose": self.verbose,
            "attacks": list(self.attacks_to_run),
            "queries": self.square.n_queries,
        }
        for _ in range(2):  # the same warning twice: one flag
            warnings.warn(Warning("there are 3 points with zero gradient!"), stacklevel=1)
        logging.getLogger(ev.AUTOATTACK_LOGGER).warning("it seems to be a randomized defense!")
        return x + 0.5, self.y_adv


@pytest.fixture
def fake_autoattack(monkeypatch):
    import pyautoattack

    FakeAutoAttack.made = []
    monkeypatch.setattr(pyautoattack, "AutoAttack", FakeAutoAttack)
    return FakeAutoAttack


def _linear(classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(K, classes))


@pytest.mark.parametrize(
    ("name", "randomized", "version", "attacks", "params"),
    [
        ("square", False, "standard", ["square"], {"queries": 50, "p_init": 0.8}),
        ("apgd-ce", False, "standard", ["apgd-ce"], {"iterations": 100, "restarts": 1, "eot": 1}),
        ("apgd-ce", True, "rand", ["apgd-ce"], {"iterations": 100, "restarts": 1, "eot": 1}),
        ("apgd-t", True, "standard", ["apgd-t"], {"iterations": 101, "target_classes": 4}),
        ("fab-t", False, "standard", ["fab-t"], {"iterations": 102, "target_classes": 4}),
        (
            "autoattack",
            False,
            "standard",
            ["apgd-ce", "apgd-t", "fab-t", "square"],
            {
                "apgd-ce.iterations": 100,
                "apgd-ce.restarts": 1,
                "apgd-ce.eot": 1,
                "apgd-t.iterations": 101,
                "apgd-t.target_classes": 4,
                "fab-t.iterations": 102,
                "fab-t.target_classes": 4,
                "square.queries": 50,
                "square.p_init": 0.8,
            },
        ),
        ("autoattack", True, "rand", ["apgd-ce", "apgd-t", "fab-t", "square"], None),
    ],
)
def test_autoattack_runners_set_up_pyautoattack_and_count_its_result(
    fake_autoattack, name, randomized, version, attacks, params
):
    x, y = _world()
    fake_autoattack.y_adv = torch.tensor([0, 1, 0, 3, 0, 0, 2, 3])
    runner = ev._autoattack(name)  # what RUNNERS holds, built here so that mutants reach it
    model = _linear(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an enclosing autocast is switched off
        result, x_adv = runner(model, x, y, _settings(), randomized)
    (made,) = fake_autoattack.made
    assert made.made_with == {"device": "cpu", "eps": 1.0, "seed": 5, "version": version}
    assert made.ran == {
        "batch_size": 3,
        "autocast": False,
        "verbose": True,  # its debug lines are our progress (autoattack_progress)
        "attacks": attacks,
        "queries": 50,
    }
    assert result.robust == "11011011" and result.name == name and result.n_robust == 6
    assert made.model is model and made.given[0] is x and made.given[1] is y
    assert torch.equal(x_adv, x + 0.5)
    if params is not None:
        assert result.params == {**params, "version": version}
    assert [(f.attack, f.check) for f in result.flags] == [
        (name, "randomized"),
        (name, "zero_gradients"),
    ]


def test_autoattack_runners_assume_a_deterministic_model_and_fit_its_classes(fake_autoattack):
    x, y = _world()
    fake_autoattack.y_adv = y
    ev._autoattack("autoattack")(_linear(5), x, y, _settings())  # randomized not given
    assert fake_autoattack.made[0].made_with["version"] == "standard"
    with pytest.raises(ev.EvaluationError, match="needs >= 4 classes, not 3"):
        ev._autoattack("apgd-t")(_linear(3), x, y, _settings(), False)


@pytest.mark.parametrize(("classes", "targets"), [(4, 3), (5, 4), (10, 9), (12, 9)])
def test_target_classes_are_nine_or_every_other_class(fake_autoattack, classes, targets):
    adversary = FakeAutoAttack(None, device="cpu", eps=0.1, seed=0, version="standard")
    ev._fit_targets(adversary, "apgd-t", _linear(classes), torch.zeros(1, 1, 2, 2))
    assert (adversary.apgd_targeted.n_target_classes, adversary.fab.n_target_classes) == (
        targets,
        targets,
    )


@pytest.mark.parametrize("name", ["apgd-t", "autoattack"])
def test_targeted_dlr_refuses_fewer_than_four_classes(fake_autoattack, name):
    adversary = FakeAutoAttack(None, device="cpu", eps=0.1, seed=0, version="standard")
    with pytest.raises(
        ev.EvaluationError, match=rf"^{name}: the targeted DLR loss needs >= 4 classes, not 3$"
    ):
        ev._fit_targets(adversary, name, _linear(3), torch.zeros(1, 1, 2, 2))
    for fine in ("apgd-ce", "fab-t", "square"):  # no DLR: 3 classes are enough
        ev._fit_targets(adversary, fine, _linear(3), torch.zeros(1, 1, 2, 2))
        assert adversary.fab.n_target_classes == 2


def test_provenance_reads_pyautoattacks_own_standard_settings():
    from pyautoattack import AutoAttack

    standard = AutoAttack(_linear(10), device="cpu", eps=0.1, version="standard")
    # AutoAttack's standard version (Croce & Hein 2020): APGD 100 iterations, 1 restart;
    # targeted APGD and FAB over 9 target classes; Square 5000 queries with p_init 0.8
    assert ev._aa_params(standard, "apgd-ce") == {"iterations": 100, "restarts": 1, "eot": 1}
    assert ev._aa_params(standard, "apgd-t") == {"iterations": 100, "target_classes": 9}
    assert ev._aa_params(standard, "fab-t") == {"iterations": 100, "target_classes": 9}
    assert ev._aa_params(standard, "square") == {"queries": 5000, "p_init": 0.8}
    rand = AutoAttack(_linear(10), device="cpu", eps=0.1, version="rand")
    assert ev._aa_params(rand, "apgd-ce")["eot"] == 20  # EOT over 20 draws


# ------------------------------------------------------------------------------- verdicts

V1, V2 = vd.RULES["pgd10_minus_square_v1"], vd.RULES["pgd10_minus_square_v2"]


def _v2_pair(b: int, c: int, n: int) -> dict[str, AttackResult]:
    pgd = "1" * b + "0" * c + "0" * (n - b - c)
    other = "0" * b + "1" * c + "0" * (n - b - c)
    return {"pgd10": _result("pgd10", pgd), "square": _result("square", other)}


def test_a_v1_rule_without_its_attack_has_no_outcome_field():
    only = {"pgd10": _result("pgd10", "1100")}
    v1 = vd.apply_rule(V1, only)
    assert (v1.outcome, v1.flagged, v1.margin, v1.other) == (None, None, None, None)
    assert v1.pgd10 == 0.5
    assert vd.apply_rule(V2, only).outcome == "no_verdict"


def test_paired_counts_need_equally_long_flag_strings():
    with pytest.raises(ValueError):
        vd.discordant("110", "11")
    with pytest.raises(ValueError):
        vd.discordant("11", "110")
    with pytest.raises(ValueError):
        vd.discordant("11", "11", "1")


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), max_size=30))
def test_discordant_counts_are_the_brute_force_counts(rows):
    clean = "".join("1" if k else "0" for k, _, _ in rows)
    pgd = "".join("1" if p else "0" for _, p, _ in rows)
    other = "".join("1" if o else "0" for _, _, o in rows)
    b = sum(1 for k, p, o in rows if k and p and not o)
    c = sum(1 for k, p, o in rows if k and o and not p)
    assert vd.discordant(pgd, other, clean) == (b, c)
    assert vd.discordant(pgd, other) == (
        sum(1 for _, p, o in rows if p and not o),
        sum(1 for _, p, o in rows if o and not p),
    )


@pytest.mark.parametrize(("b", "c", "n", "low", "high"), [
    # Ends computed once with an independent solver (tests/test_verdict.py's `_tango_z`
    # root-found with scipy.optimize.brentq), to 1e-6.
    (25, 0, 100, 0.175452, 0.343045), (8, 0, 100, 0.040047, 0.149981),
    (10, 3, 100, -0.000766, 0.149864), (0, 0, 100, -0.036993, 0.036993),
    (0, 1, 5, -0.624465, 0.321379), (50, 10, 500, 0.051615, 0.111691)])
def test_the_score_interval_ends(b, c, n, low, high):
    assert vd.paired_interval(b, c, n) == pytest.approx((low, high, vd.INTERVAL), abs=1e-6)


def test_the_score_has_no_spread_only_where_the_margin_is_certain():
    """Z's variance vanishes at Δ = ±1 and, with no discordant pair, at Δ = 0: there the
    score is ±infinite when the counts disagree with Δ, and 0 when they agree."""
    assert vd._score(3, 1, 10, -1.0) == math.inf  # b > 0: Δ = -1 is impossible
    assert vd._score(1, 3, 10, 1.0) == -math.inf
    assert vd._score(0, 0, 10, 0.0) == 0.0
    assert vd._score(0, 10, 10, -1.0) == 0.0  # every example c: Δ = -1 is what was seen


@pytest.mark.parametrize("n", [1, 10, 50])
def test_all_discordant_one_way_reaches_the_edge_and_no_further(n):
    low, high, _ = vd.paired_interval(n, 0, n)
    assert high == 1.0 and -1 < low < 1 and (low > 0) == (n > 1)
    assert vd.paired_interval(0, n, n)[:2] == pytest.approx((-1.0, -low))
    low0, high0, _ = vd.paired_interval(0, 0, n)
    assert low0 == pytest.approx(-high0) and 0 < high0 < 1


def test_equal_counts_have_mcnemar_p_one_and_others_the_binomial_test():
    assert vd.mcnemar_exact(0, 0) == 1.0 and vd.mcnemar_exact(4, 4) == 1.0
    assert vd.mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)  # 2·P(X ≤ 1), X ~ B(10, ½)
    assert vd.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


@pytest.mark.parametrize(
    ("low", "high", "outcome"),
    [
        (0.08, 0.5, "flagged"),
        (0.58 - 0.5, 0.5, "flagged"),  # 0.07999999999999996 is 8 points
        (0.079, 0.5, "inconclusive"),
        (-0.1, 0.08, "inconclusive"),
        (-0.1, 0.58 - 0.5, "inconclusive"),
        (-0.1, 0.079, "clear"),
    ],
)
def test_the_threshold_is_inclusive_up_to_float_rounding(low, high, outcome):
    assert vd.decide(low, high, 0.08) == (outcome, None)


def test_fired_masking_checks_are_named_and_others_ignored():
    fired = [
        Flag(attack="preflight", check=c, message=c)
        for c in ("zero_gradients", "dynamic", "n_classes", "zero_gradients")
    ]
    assert vd.decide(-0.05, 0.02, 0.08, fired) == (
        "inconclusive",
        "clear by the interval, but checks fired: dynamic, zero_gradients",
    )
    assert vd.decide(-0.05, 0.0, 0.08, fired) == ("clear", None)  # at or below zero: decisive
    assert vd.decide(-0.05, 0.02, 0.08, fired[2:3]) == ("clear", None)
    assert vd.MASKING_CHECKS == {
        "randomized",
        "probability_output",
        "zero_gradients",
        "dynamic",
        "adversarial_check",
        "nonfinite_gradients",
    }


@pytest.mark.parametrize(
    ("name", "params", "label"),
    [
        ("square", {}, "Square"),
        ("square", {"queries": 5000}, "Square (5000 queries)"),
        ("square", {"queries": 300}, "Square (300 queries, reduced from AutoAttack's 5000)"),
        ("square", {"queries": 5000, "version": "standard"}, "Square (5000 queries)"),
        ("apgd-ce", {"version": "rand"}, "APGD-CE (AutoAttack version rand)"),
        ("autoattack", {"version": "rand"}, "AutoAttack (AutoAttack version rand)"),
        ("autoattack", {"version": "standard"}, "AutoAttack"),
        ("autoattack", {"square.queries": 5000}, "AutoAttack"),
        ("autoattack", {"square.queries": 300, "version": "standard"},
         "AutoAttack (Square at 300 queries, reduced from AutoAttack's 5000)"),
    ],
)
def test_attack_labels_name_non_standard_settings(name, params, label):
    assert vd.attack_label(_result(name, "1", params=params), name) == label
    assert vd.attack_label(None, name) == ev.PAPER_COLUMNS[name]


def test_verdict_lines_in_full():
    level = vd.apply_rule(V1, {"pgd10": _result("pgd10", "10"), "square": _result("square", "10")})
    assert vd.verdict_line(level) == (
        "no overestimation detected: PGD-10 exceeds Square by 0.0 "
        "points, below the 8.0-point threshold "
        "(rule pgd10_minus_square_v1)"
    )
    half = "1" + "0" * 199
    small = vd.apply_rule(
        V1, {"pgd10": _result("pgd10", half), "square": _result("square", "0" * 200)}
    )
    assert "PGD-10 exceeds Square by 0.5 points" in vd.verdict_line(small)
    clear = vd.apply_rule(V2, _v2_pair(2, 1, 100))
    low, high, _ = vd.paired_interval(2, 1, 100)  # its ends: test_the_score_interval_ends
    p = binomtest(2, 3, 0.5).pvalue
    assert vd.verdict_line(clear) == (
        f"no overestimation detected: PGD-10 exceeds Square by 1.0 points; 95% CI "
        f"[{100 * low:.1f}, {100 * high:.1f}], n=100, b=2, c=1, McNemar p={p:.2g}, below the "
        f"8.0-point threshold (rule pgd10_minus_square_v2)"
    )
    flagged = vd.apply_rule(V2, _v2_pair(30, 0, 100))
    low, high, _ = vd.paired_interval(30, 0, 100)
    assert vd.verdict_line(flagged) == (
        f"robustness overestimated: PGD-10 exceeds Square by 30.0 points; 95% CI "
        f"[{100 * low:.1f}, {100 * high:.1f}], n=100, b=30, c=0, McNemar p="
        f"{binomtest(30, 30, 0.5).pvalue:.2g}, above the 8.0-point threshold "
        f"(rule pgd10_minus_square_v2)"
    )
    straddles = vd.verdict_line(vd.apply_rule(V2, _v2_pair(8, 0, 100)))
    assert straddles.endswith(
        "the interval straddles the 8.0-point threshold (rule pgd10_minus_square_v2)"
    )


def test_verdict_rules_are_the_papers():
    assert [(r.name, r.version, r.attack, r.threshold) for r in vd.VERDICT_RULES] == [
        ("pgd10_minus_square_v1", 1, "square", 0.08),
        ("pgd10_minus_autoattack_v1", 1, "autoattack", 0.08),
        ("pgd10_minus_square_v2", 2, "square", 0.08),
        ("pgd10_minus_autoattack_v2", 2, "autoattack", 0.08),
    ]
    assert (vd.PRIMARY_RULE.name, vd.DIAGNOSE_RULE.name) == (
        "pgd10_minus_square_v1",
        "pgd10_minus_square_v2",
    )
    assert vd.CONFIDENCE == 0.95


def test_module_tables_are_pinned():
    assert ev.RUN_ORDER == ("pgd10", "square", "apgd-ce", "apgd-t", "fab-t", "autoattack")
    assert ev.CASCADE == ("apgd-ce", "apgd-t", "fab-t", "square")  # AutoAttack standard's order
    assert ev.LINF_SLACK == 1e-6
    made_by = {n: r.__qualname__ for n, r in ev.RUNNERS.items()}  # (mutmut renames them)
    assert "_pgd10" in made_by.pop("pgd10") and list(made_by) == list(ALL_SIX[1:])
    assert all("_autoattack" in q and q.endswith(".<locals>.run") for q in made_by.values())
