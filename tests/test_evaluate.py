"""The evaluation suite: verdict rules, AutoAttack's checks as flags, resume, `evaluate`."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
from _evalutil import trained_run
from factories import assert_one_line_error
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from trades_repro import evaluate as ev
from trades_repro import store
from trades_repro.cli import app
from trades_repro.diagnose import read_eval, run_checkpoints, run_records
from trades_repro.evalfile import EvalFileError, locked
from trades_repro.spec import LandscapeSpec

runner = CliRunner()


def _attack(name: str, robust: str) -> ev.AttackResult:
    hits = robust.count("1")
    return ev.AttackResult(name=name, paper_column=ev.PAPER_COLUMNS[name],
                           accuracy=hits / len(robust), n_robust=hits,
                           n_examples=len(robust), robust=robust, seconds=0.0)


def _pair(pgd_hits: int, other_hits: int, other: str = "square", n: int = 100):
    return {"pgd10": _attack("pgd10", "1" * pgd_hits + "0" * (n - pgd_hits)),
            other: _attack(other, "1" * other_hits + "0" * (n - other_hits))}


@pytest.mark.parametrize(("pgd", "square", "flagged"), [(58, 50, True), (57, 50, False),
                                                         (50, 60, False), (90, 10, True)])
def test_primary_rule_flags_a_gap_of_eight_points_or_more(pgd, square, flagged):
    verdict = ev.apply_rule(ev.PRIMARY_RULE, _pair(pgd, square))
    assert verdict.rule == "pgd10_minus_square_v1" and verdict.version == 1
    assert verdict.flagged is flagged
    assert verdict.margin == pytest.approx((pgd - square) / 100)
    assert (verdict.pgd10, verdict.other) == (pgd / 100, square / 100)


def test_rules_live_in_one_table_and_name_their_attack():
    assert [r.name for r in ev.VERDICT_RULES] == [
        "pgd10_minus_square_v1", "pgd10_minus_autoattack_v1",
        "pgd10_minus_square_v2", "pgd10_minus_autoattack_v2"]
    assert all(r.threshold == 0.08 and r.attack in ev.ALL_ATTACKS for r in ev.VERDICT_RULES)
    missing = ev.apply_rule(ev.VERDICT_RULES[1], _pair(60, 50))  # no AutoAttack result
    assert missing.flagged is None and missing.margin is None
    assert ev.verdict_line(missing).startswith("no verdict")


def test_verdict_line_says_what_happened():
    flagged = ev.apply_rule(ev.PRIMARY_RULE, _pair(400, 258, n=1000))
    assert ev.verdict_line(flagged) == ("robustness overestimated: PGD-10 exceeds Square by "
                                        "14.2 points (rule pgd10_minus_square_v1)")
    fine = ev.verdict_line(ev.apply_rule(ev.PRIMARY_RULE, _pair(50, 52)))
    assert fine.startswith("no overestimation detected: PGD-10 is 2.0 points below Square")


def test_autoattack_checks_become_flags_and_nothing_escapes(capsys):
    logger = logging.getLogger(ev.AUTOATTACK_LOGGER)
    with ev._autoattack_checks("square") as flags:
        logger.warning("it seems to be a randomized defense! Please use version=\"rand\".")
        warnings.warn(Warning("there are 3 points with zero gradient!"), stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [f.check for f in flags] == ["randomized", "zero_gradients", "other"]
    assert {f.attack for f in flags} == {"square"}
    assert logger.propagate and not logger.handlers
    assert capsys.readouterr().err == ""


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(x.flatten(1) * 4)


def _settings(**changes) -> ev.EvalSettings:
    base = dict(dataset="synthetic", n_examples=12, eps=0.1, step_size=0.025, steps=10,
                random_start=True, batch_size=5, seed=0, square_queries=50, device="cpu",
                landscape=LandscapeSpec(radius=0.1, steps=3))
    return ev.EvalSettings(**{**base, **changes})


def _data():
    """Images labelled by the model itself (pre-flight wants accuracy above chance), 2 wrong."""
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = _Linear()(x).argmax(1)
    y[:2] = (y[:2] + 1) % 10
    return x, y


def test_record_holds_every_number_and_its_settings():
    x, y = _data()
    record = ev.evaluate_model(_Linear(), x, y, _settings(), ev.ALL_ATTACKS,
                               identity=("m.safetensors", "a" * 64, ["best_pgd10"]))
    assert record.complete and set(record.attacks) == set(ev.ALL_ATTACKS)
    assert record.requested == list(ev.ALL_ATTACKS)
    assert {"n_examples", "batch_size", "seed", "device"} <= set(record.settings.model_dump())
    assert all(len(r.robust) == 12 for r in record.attacks.values())
    worst = min(r.accuracy for r in record.attacks.values())
    assert record.worst_case_accuracy <= worst
    assert record.attacks["square"].params["queries"] == 50
    assert record.attacks["pgd10"].fosc_mean >= 0 and record.attacks["pgd10"].sgcs_mean <= 1
    assert [v.rule for v in record.verdicts] == [r.name for r in ev.VERDICT_RULES]
    assert record.preflight.n_classes == 10 and not record.preflight.randomized
    assert record.preflight.clean_correct == 10 and record.clean.n_robust == 10
    assert set(record.adversarial) == set(ev.ALL_ATTACKS)
    assert all(c.ok and c.max_linf <= 0.1 + 1e-6 for c in record.adversarial.values())
    assert record.landscape is not None and record.landscape.files == []


class _Killed(Exception):
    pass


def test_a_stopped_evaluation_resumes_without_redoing_finished_attacks(monkeypatch):
    x, y = _data()
    calls: list[str] = []
    killed: list[str] = []
    real = dict(ev.RUNNERS)

    def spy(name):
        def run(*args):
            calls.append(name)
            if name == "apgd-ce" and not killed:
                killed.append(name)
                raise _Killed  # the process dies during the third attack
            return real[name](*args)
        return run

    monkeypatch.setattr(ev, "RUNNERS", {name: spy(name) for name in real})
    saved: list[ev.CheckpointEval] = []
    attacks = ("pgd10", "square", "apgd-ce")
    ident = ("m", "b" * 64, [])
    with pytest.raises(_Killed):
        ev.evaluate_model(_Linear(), x, y, _settings(), attacks, identity=ident,
                          save=lambda r: saved.append(r.model_copy(deep=True)))
    partial = saved[-1]
    assert set(partial.attacks) == {"pgd10", "square"} and not partial.complete
    assert partial.verdicts[0].flagged is not None  # the primary verdict is already there
    calls.clear()
    done = ev.evaluate_model(_Linear(), x, y, _settings(), attacks, identity=ident,
                             previous=partial)
    assert calls == ["apgd-ce"] and done.complete
    assert done.attacks["pgd10"] == partial.attacks["pgd10"]
    calls.clear()
    ev.evaluate_model(_Linear(), x, y, _settings(eps=0.2), attacks, identity=ident,
                      previous=done)
    assert calls == ["pgd10", "square", "apgd-ce"], "other settings: nothing may be reused"
    calls.clear()
    ev.evaluate_model(_Linear(), x, y, _settings(), attacks, identity=("m", "c" * 64, []),
                      previous=done)
    assert len(calls) == 3, "another checkpoint file: nothing may be reused"


def test_run_checkpoints_follow_the_policy_index(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / store.BEST_FILE)
    assert run_checkpoints(tmp_path) == [(store.BEST_FILE, ["best_pgd10"])]
    save_file({"w": torch.ones(1)}, tmp_path / store.BEST_FOSC_OK_FILE)
    assert [f for f, _ in run_checkpoints(tmp_path)] == [store.BEST_FILE, store.BEST_FOSC_OK_FILE]
    same = {"best_pgd10": {"epoch": 3, "file": store.BEST_FILE},
            "best_pgd10_fosc_ok": {"epoch": 3, "file": store.BEST_FILE}}
    store.atomic_write_json(tmp_path / store.CHECKPOINTS_FILE, same)
    assert run_checkpoints(tmp_path) == [(store.BEST_FILE, ["best_pgd10", "best_pgd10_fosc_ok"])]


@pytest.mark.slow
def test_evaluate_cli_writes_a_valid_resumable_eval_json(tmp_path_factory):
    run = trained_run(tmp_path_factory.getbasetemp())
    args = ["evaluate", str(run), "--attacks", "square-only", "--n-examples", "40", "--quiet"]
    result = runner.invoke(app, args)
    evals = read_eval(run / store.EVAL_FILE)
    (record,) = [r for r in run_records(run) if r.settings.n_examples == 40]
    assert result.exit_code == _exit_of(record), result.output
    assert record.complete and record.policies[0] == "best_pgd10"
    assert evals.checkpoints[record.key] == record and evals.schema_version == 2
    assert record.settings.device == "cpu" and record.settings.n_classes == 10
    assert set(record.settings.versions) == {"torch", "pyautoattack", "trades_repro"}
    assert "small_cnn" in record.settings.model
    assert record.sha256 == __import__("hashlib").sha256(
        (run / store.BEST_FILE).read_bytes()).hexdigest()
    assert {"torch", "git_sha", "pyautoattack", "device"} <= set(evals.provenance)
    for name in record.landscape.files:
        assert (run / name).stat().st_size > 0
    assert "pgd10_minus_square_v1" in result.stdout
    again = runner.invoke(app, args + ["--attacks", "apgd-ce"])
    resumed = read_eval(run / store.EVAL_FILE).checkpoints[record.key]
    assert again.exit_code == _exit_of(resumed), again.output
    assert resumed.attacks["square"] == record.attacks["square"]
    assert set(resumed.attacks) == {"pgd10", "square", "apgd-ce"}
    other = runner.invoke(app, ["evaluate", str(run), "--attacks", "pgd10", "--n-examples", "20",
                                "--seed", "3", "--quiet"])
    assert other.exit_code == 3, other.output  # PGD-10 alone: no verdict, cannot decide
    assert other.stderr.strip().startswith("error: inconclusive: no verdict: PGD-10 and Square")
    both = {(r.settings.n_examples, r.settings.seed): r for r in run_records(run)}
    assert both[(40, 0)] == resumed, "another key must not replace a finished evaluation"
    assert both[(20, 3)].complete and len(both) == 2 and not both[(20, 3)].attacks.keys() - {
        "pgd10"}
    probe = runner.invoke(app, ["evaluate", str(run), "--attacks", "square", "--n-examples",
                                "20", "--seed", "3", "--square-queries", "200", "--quiet"])
    assert probe.exit_code == 3, probe.output
    (short,) = [r for r in run_records(run) if r.settings.square_queries == 200]
    assert short.complete and set(short.attacks) == {"square"}
    assert short.attacks["square"].params["queries"] == 200
    assert read_eval(run / store.EVAL_FILE).checkpoints[record.key] == resumed
    bad = runner.invoke(app, ["evaluate", str(run), "--square-queries", "0"])
    assert_one_line_error(bad, "--square-queries 0", "at least 1")


def _exit_of(record) -> int:
    """`evaluate`'s exit code for one record: its pgd10_minus_square_v2 outcome's."""
    (v2,) = [v for v in record.verdicts if v.rule == "pgd10_minus_square_v2"]
    return {"flagged": 1, "clear": 0}.get(v2.outcome, 3)


def test_version_1_eval_files_are_rekeyed_not_lost(tmp_path):
    x, y = _data()
    record = ev.evaluate_model(_Linear(), x, y, _settings(), ("pgd10",),
                               identity=("m.safetensors", "a" * 64, []))
    old = {"schema_version": 1, "source": "run", "checkpoints": {"m.safetensors": record}}
    path = tmp_path / store.EVAL_FILE
    path.write_text(ev.EvalFile.model_validate(old).model_dump_json())
    evals = read_eval(path)
    assert evals.schema_version == 2 and evals.checkpoints == {record.key: record}


def test_a_second_writer_is_refused_while_the_lock_is_held(tmp_path):
    path = tmp_path / store.EVAL_FILE
    with locked(path):
        with pytest.raises(EvalFileError, match="being written by pid"):
            with locked(path):
                pass
    with locked(path):  # released: the next evaluation may write
        pass


def test_adversarial_examples_are_rechecked_independently_and_saved(tmp_path):
    x, y = _data()
    net, settings = _Linear(), _settings()
    result, x_adv = ev.RUNNERS["pgd10"](net, x, y, settings, False)
    good = ev.recheck(net, x, y, x_adv, result, settings, False, tmp_path / "adv.safetensors")
    assert good.ok and good.disagreements == 0 and good.file == "adv.safetensors"
    saved = load_file(tmp_path / "adv.safetensors")
    assert torch.equal(saved["x_adv"], x_adv) and torch.equal(saved["y"], y)
    too_far = ev.recheck(net, x, y, (x + 0.2).clamp(0, 1), result, settings, False, None)
    assert not too_far.ok and too_far.max_linf > 0.1 + 1e-6
    outside = ev.recheck(net, x, y, x_adv + 2, result, settings, False, None)
    assert not outside.ok and not outside.in_box
    lying = result.model_copy(update={"robust": "".join("1" if c == "0" else "0"
                                                        for c in result.robust)})
    wrong = ev.recheck(net, x, y, x_adv, lying, settings, False, None)
    assert not wrong.ok and wrong.disagreements == 12
    assert ev.recheck(net, x, y, x_adv, lying, settings, True, None).ok  # randomized: expected


@pytest.mark.parametrize("name", ["fab-t", "autoattack"])
def test_autoattack_runs_on_frozen_weights_with_the_unfrozen_results(name):
    """FAB calls ``backward()``, which on weights requiring gradients also computes theirs:
    slower (1.29x for FAB-T on a CPU ResNet-18) and left behind in ``.grad``. The runner
    freezes them for the attack; the adversarial examples must not change, and the weights
    must require gradients again afterwards."""
    from pyautoattack import AutoAttack

    x, y = _data()
    settings = _settings()
    net = _Linear()
    _, x_adv = ev.RUNNERS[name](net, x, y, settings, False)
    assert all(p.requires_grad and p.grad is None for p in net.parameters())

    plain = _Linear()  # what pyautoattack does with the weights left requiring gradients
    adversary = AutoAttack(plain, device="cpu", eps=settings.eps, seed=settings.seed,
                           version="standard")
    adversary.verbose = False
    adversary.square.n_queries = settings.square_queries
    ev._fit_targets(adversary, name, plain, x[:1])
    if name != "autoattack":
        adversary.attacks_to_run = [name]
    reference, _ = adversary.run_standard_evaluation(x, y, batch_size=settings.batch_size)
    assert any(p.grad is not None for p in plain.parameters())  # what freezing avoids
    assert torch.equal(x_adv, reference)


def test_autoattack_reports_each_batch_and_each_cascade_stage_as_progress():
    """AutoAttack on 10,000 CIFAR images runs for most of an hour on a GPU and said nothing
    until its end: its own per-batch lines (and the cascade's per-attack ones) now reach
    `report`, and the step says when it begins."""
    x, y = _data()
    lines: list[str] = []
    record = ev.evaluate_model(_Linear(), x, y, _settings(), ("apgd-ce", "autoattack"),
                               identity=("m.safetensors", "a" * 64, []), report=lines.append)
    seconds = [int(s) for s in re.findall(r"\((\d+) s\)$", "\n".join(lines), re.MULTILINE)]
    assert seconds and all(0 <= s < 300 for s in seconds)  # since the step began
    started = lines.index("apgd-ce: attacking 12 images ...")
    # 10 of 12 right clean, in batches of 5
    assert re.fullmatch(r"apgd-ce: batch 1/2 done, \d+ of 5 broken \(\d+ s\)", lines[started + 1])
    assert re.fullmatch(r"apgd-ce: batch 2/2 done, \d+ of 5 broken \(\d+ s\)", lines[started + 2])
    assert lines[started + 3].startswith("apgd-ce: ")
    cascade = [line for line in lines if line.startswith("autoattack: ")]
    assert cascade[0] == "autoattack: attacking 12 images ..."
    assert any(re.fullmatch(r"autoattack: apgd-ce batch 1/2 done, \d+ of 5 broken \(\d+ s\)",
                            line) for line in cascade)
    assert any(re.fullmatch(r"autoattack: [\d.]{6} left after apgd-ce \(\d+ s\)", line)
               for line in cascade)
    last = [line for line in cascade if " left after " in line][-1]  # the cascade's result
    assert last.startswith(f"autoattack: {record.attacks['autoattack'].accuracy:.4f} left")
    logger = logging.getLogger(ev.AUTOATTACK_LOGGER)
    assert logger.level == logging.NOTSET and not logger.handlers  # all put back
    one: list[str] = []  # a single batch: its line would only repeat the attack's own
    ev.evaluate_model(_Linear(), x, y, _settings(batch_size=500), ("apgd-ce",),
                      identity=("m.safetensors", "a" * 64, []), report=one.append)
    begins = one.index("apgd-ce: attacking 12 images ...")
    assert re.fullmatch(r"apgd-ce: [\d.]{6} \([\d.]+ s\)", one[begins + 1])
    assert not any("batch" in line for line in one)
