"""The training loop of train.py, piece by piece, on seconds-long runs (issue 21's mutants).

Each test checks one thing the epoch records promise against a computation made here: the
per-epoch LR, Algorithm 1's noise on exactly the counted batches, the epoch's sums, the
record fields, and what a failed or interrupted run leaves behind.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from trades_repro import store
from trades_repro import train as trainlib
from trades_repro.engine import TrainingError, build_session, lr_at
from trades_repro.spec import parse_spec
from trades_repro.steps import NonFiniteLoss

TINY = {
    "name": "tiny-loop",
    "device": "cpu",
    "seed": 5,
    "data": {"dataset": "synthetic", "validation": "holdout", "val_size": 16, "augment": False,
             "synthetic": {"n_train": 80, "n_test": 16, "num_classes": 3, "image_size": 8}},
    "model": {"arch": "small_cnn", "width": 4},
    "method": {"beta": 3, "attack": {"eps": 0.1, "step_size": 0.05, "steps": 2}},
    "optim": {"batch_size": 16, "epochs": 2, "lr": 0.05},  # 4 batches of 16 per epoch
    "validation": {"eps": 0.1, "step_size": 0.05, "steps": 2},
}


def _spec(**changes):
    raw = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_spec(raw)


# ------------------------------------------------------------------ epoch sums and fields


def _step(loss, clean, adv):
    return SimpleNamespace(loss=torch.tensor(loss), clean_correct=torch.tensor(clean),
                           adv_correct=torch.tensor(adv))


def test_totals_weight_each_batch_loss_by_its_size_and_count_hits():
    totals = trainlib._Totals(torch.device("cpu"))
    totals.add(_step(2.0, 3, 1), 4)
    totals.add(_step(0.5, 2, 2), 2)
    read = totals.read()
    assert read == {"loss": 2.0 * 4 + 0.5 * 2, "clean": 5, "adv": 3, "n": 6}
    assert all(type(read[key]) is int for key in ("clean", "adv"))  # counts, exactly


def test_totals_sum_losses_in_float64():
    """An epoch of many batches: float32 would drop the small ones against a large sum."""
    totals = trainlib._Totals(torch.device("cpu"))
    totals.add(_step(1e8, 0, 0), 1)
    totals.add(_step(1.0, 0, 0), 1)
    assert totals.read()["loss"] == 100_000_001.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_totals_notice_a_non_finite_loss_in_any_batch(bad):
    totals = trainlib._Totals(torch.device("cpu"))
    totals.add(_step(1.0, 1, 1), 2)
    totals.add(_step(bad, 1, 1), 2)
    totals.add(_step(1.0, 1, 1), 2)  # a finite batch after it does not hide it
    with pytest.raises(NonFiniteLoss, match="^non-finite training loss$"):
        totals.read()
    with pytest.raises(NonFiniteLoss):
        totals.check_finite()


def test_epoch_fields_are_means_over_images_and_app_g_means_over_steps():
    app_g = [SimpleNamespace(w_grad_norm=1.0, ce_norm=2.0, kl_norm=4.0,
                             grad_cosine_similarity=0.5),
             SimpleNamespace(w_grad_norm=3.0, ce_norm=6.0, kl_norm=0.0,
                             grad_cosine_similarity=-0.5)]
    fields = trainlib._epoch_fields({"loss": 9.0, "clean": 3, "adv": 1, "n": 4}, app_g, [0, 2])
    assert fields == {"train_loss": 2.25, "train_clean_acc": 0.75, "train_adv_acc": 0.25,
                      "train_gap": 0.5, "noised_batches": [0, 2], "w_grad_norm": 2.0,
                      "ce_norm": 4.0, "kl_norm": 2.0, "grad_cosine_similarity": 0.0}


def test_epoch_fields_without_app_g_are_none():
    fields = trainlib._epoch_fields({"loss": 1.0, "clean": 1, "adv": 1, "n": 1}, [], [])
    assert all(fields[key] is None for key in trainlib.APP_G_KEYS)


# ------------------------------------------------------------------ one epoch


def _session(tmp_path, spec):
    return build_session(spec, tmp_path / spec.digest())


def test_each_epoch_trains_at_its_scheduled_lr(tmp_path, monkeypatch):
    spec = _spec(**{"optim.schedule": "multistep", "optim.milestones": [1],
                    "optim.lr_decay": 0.1})
    session = _session(tmp_path, spec)
    seen = []
    real = trainlib.train_epoch
    monkeypatch.setattr(trainlib, "train_epoch", lambda s, e: (
        seen.append([g["lr"] for g in s.optimizer.param_groups]), real(s, e))[1])
    records = [trainlib.run_epoch(session, epoch) for epoch in (1, 2)]
    assert seen == [[0.05], [pytest.approx(0.005)]]
    assert [r.lr for r in records] == [0.05, pytest.approx(0.005)]
    assert [r.lr for r in records] == [lr_at(spec.optim, e) for e in (1, 2)]


def test_run_epoch_commits_the_record_it_returns(tmp_path):
    session = _session(tmp_path, _spec())
    record = trainlib.run_epoch(session, 1)
    assert session.state.epoch == 1 and session.state.records == [record]
    (line,) = (session.run_dir / store.METRICS_FILE).read_text().splitlines()
    assert json.loads(line)["epoch"] == 1 and record.val_source == "holdout"
    assert record.best_pgd10 and record.val_pgd10_acc == json.loads(line)["val_pgd10_acc"]
    assert session.state.policies.best_epoch["best_pgd10"] == 1
    assert session.state.policies.best["best_pgd10"] == record.val_pgd10_acc


@pytest.mark.parametrize("enabled", [True, False])
def test_run_epoch_records_algorithm_1s_trigger(tmp_path, enabled):
    spec = _spec(**{"healing.enabled": enabled, "healing.fosc_threshold": 0.0})
    session = _session(tmp_path, spec)
    record = trainlib.run_epoch(session, 1)
    if enabled:  # any positive FOSC is above a threshold of 0
        assert record.healing_event.fosc == record.val_fosc > 0
        assert record.healing_event.epoch == 1 and session.state.noise_left == 10
    else:
        assert record.healing_event is None and session.state.noise_left == 0


def _spy_steps(monkeypatch):
    seen = []
    real = trainlib.train_step

    def spy(model, optimizer, x, y, *args):
        seen.append(x.clone())
        return real(model, optimizer, x, y, *args)

    monkeypatch.setattr(trainlib, "train_step", spy)
    return seen


def test_algorithm_1_noises_exactly_the_counted_batches_with_its_std(tmp_path, monkeypatch):
    spec = _spec(**{"healing.enabled": True, "healing.noise_std": 0.3})
    plain, noised = _session(tmp_path / "a", spec), _session(tmp_path / "b", spec)
    noised.state.noise_left = 3  # a trigger fired at the end of the previous epoch
    clean_inputs = _spy_steps(monkeypatch)
    trainlib.train_epoch(plain, 1)
    reference = [x.clone() for x in clean_inputs]
    clean_inputs.clear()
    gen = torch.Generator().set_state(noised.healing_gen.get_state())
    fields = trainlib.train_epoch(noised, 1)
    assert fields["noised_batches"] == [0, 1, 2] and noised.state.noise_left == 0
    for index, (x, x0) in enumerate(zip(clean_inputs, reference, strict=True)):
        if index < 3:  # line 8: img + N(0, σ) with σ the spec's, unclipped
            expected = x0 + 0.3 * torch.randn(x0.shape, generator=gen)
            assert torch.allclose(x, expected, atol=1e-6)
        else:
            assert torch.equal(x, x0)


def test_an_epoch_does_not_depend_on_the_global_rng(tmp_path):
    """The attack's starts come from the session's own generator, so what a run trains is
    fixed by its spec, whatever else drew from torch's global generator before."""
    results = []
    for i, noise in enumerate((0, 12345)):
        torch.manual_seed(noise)
        session = _session(tmp_path / str(i), _spec(**{"method.attack.init_std": 0.05}))
        torch.manual_seed(noise + 1)
        results.append(trainlib.train_epoch(session, 1))
    assert results[0] == results[1]


def test_the_step_counter_advances_once_per_batch(tmp_path):
    session = _session(tmp_path, _spec())
    trainlib.train_epoch(session, 1)
    trainlib.train_epoch(session, 2)
    assert session.state.global_step == 2 * 4


def test_awp_is_used_only_after_its_warmup(tmp_path, monkeypatch):
    spec = _spec(**{"method.name": "trades_awp", "method.awp.warmup": 2})  # epoch >= warmup
    session = _session(tmp_path, spec)
    used = []
    real = trainlib.train_step
    monkeypatch.setattr(trainlib, "train_step", lambda *a: (used.append(a[-1]), real(*a))[1])
    trainlib.train_epoch(session, 1)
    trainlib.train_epoch(session, 2)
    assert used[:4] == [None] * 4 and all(a is session.awp for a in used[4:])
    assert session.awp is not None and len(used) == 8


def test_app_g_records_wait_for_the_commit(tmp_path):
    session = _session(tmp_path, _spec(**{"monitor.batch_metrics": True}))
    fields = trainlib.train_epoch(session, 1)
    assert [r.step for r in session.pending_batches] == [1, 2, 3, 4]
    assert [r.noised for r in session.pending_batches] == [False] * 4
    assert fields["w_grad_norm"] == pytest.approx(
        sum(r.w_grad_norm for r in session.pending_batches) / 4)


# ------------------------------------------------------------------ the whole run


def test_a_run_trains_every_epoch_and_then_is_skipped(tmp_path):
    spec = _spec()
    first = trainlib.train(spec, tmp_path, progress=False)
    assert first.skipped is False and [r.epoch for r in first.records] == [1, 2]
    provenance = store.read_json(first.run_dir / store.PROVENANCE_FILE)
    assert provenance["status"] == "finished" and provenance["wall_time_s"] > 0
    assert set(provenance["backend"]) == {"training", "validation"}
    again = trainlib.train(spec, tmp_path, progress=False)
    assert again.skipped is True and again.run_dir == first.run_dir
    assert [r.epoch for r in again.records] == [1, 2]


def test_a_bad_eval_batch_fails_before_any_run_folder(tmp_path):
    with pytest.raises(ValueError):
        trainlib.train(_spec(), tmp_path, progress=False, eval_batch=0)
    assert not any(tmp_path.iterdir())


def test_a_non_finite_loss_names_the_epoch_and_the_kept_checkpoint(tmp_path, monkeypatch):
    spec = _spec()
    real = trainlib.train_epoch
    calls = []

    def failing(session, epoch):
        calls.append(epoch)
        if epoch == 2:
            raise NonFiniteLoss("non-finite training loss")
        return real(session, epoch)

    monkeypatch.setattr(trainlib, "train_epoch", failing)
    with pytest.raises(TrainingError) as caught:
        trainlib.train(spec, tmp_path, progress=False)
    run_dir = tmp_path / spec.digest()
    message = str(caught.value)
    assert message == (f"{spec.name}: non-finite training loss in epoch 2; last good "
                       f"checkpoint kept in {run_dir / store.LAST_FILE}")
    provenance = store.read_json(run_dir / store.PROVENANCE_FILE)
    assert provenance["status"] == "failed" and provenance["error"] == message
    assert calls == [1, 2] and len(store.read_metrics(run_dir)) == 1



def test_a_non_finite_loss_in_epoch_1_says_no_checkpoint_exists(tmp_path, monkeypatch):
    """It named `last.pt`, which a run failing in its first epoch never wrote."""
    spec = _spec()

    def failing(session, epoch):
        raise NonFiniteLoss("non-finite training loss")

    monkeypatch.setattr(trainlib, "train_epoch", failing)
    with pytest.raises(TrainingError) as caught:
        trainlib.train(spec, tmp_path, progress=False)
    assert str(caught.value) == (f"{spec.name}: non-finite training loss in epoch 1; no "
                                 "checkpoint: no epoch had finished")
    assert not (tmp_path / spec.digest() / store.LAST_FILE).exists()

def test_any_other_error_marks_the_run_failed_and_propagates(tmp_path, monkeypatch):
    spec = _spec()

    def boom(session, epoch):
        raise MemoryError("out of host memory")

    monkeypatch.setattr(trainlib, "run_epoch", boom)
    with pytest.raises(MemoryError):
        trainlib.train(spec, tmp_path, progress=False)
    provenance = store.read_json(tmp_path / spec.digest() / store.PROVENANCE_FILE)
    assert provenance["status"] == "failed"
    assert provenance["error"] == "MemoryError: out of host memory"


def _stop_in_epoch_two(monkeypatch, stop: type[BaseException]):
    """Make epoch 2 raise `stop` (Ctrl-C and the like); returns the real `run_epoch`."""
    real = trainlib.run_epoch

    def stop_at_two(session, epoch):
        if epoch == 2:
            raise stop
        return real(session, epoch)

    monkeypatch.setattr(trainlib, "run_epoch", stop_at_two)
    return real


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_run_is_recorded_as_interrupted_and_resumes(tmp_path, monkeypatch,
                                                                   stop):
    from trades_repro.executors import failure
    from trades_repro.runclaim import run_state

    spec = _spec()
    _stop_in_epoch_two(monkeypatch, stop)
    with pytest.raises(stop):
        trainlib.train(spec, tmp_path, progress=False)
    run_dir = tmp_path / spec.digest()
    provenance = store.read_json(run_dir / store.PROVENANCE_FILE)
    assert provenance["status"] == "interrupted"
    assert provenance["error"].startswith(stop.__name__)
    assert failure(run_dir) is None and run_state(spec, tmp_path, ("best_pgd10",)) == "resume"


def test_validation_uses_the_runs_eval_batch_and_input_layout(tmp_path, monkeypatch):
    spec = _spec(**{"performance.channels_last": True})
    seen = {}
    real = trainlib.validate

    def spy(model, val, spec_, device, epoch, *, batch_size=None, prepare=None):
        seen.update(batch_size=batch_size, epoch=epoch, layout=prepare(torch.zeros(
            2, 1, 3, 3)).is_contiguous(memory_format=torch.channels_last))
        return real(model, val, spec_, device, epoch, batch_size=batch_size, prepare=prepare)

    monkeypatch.setattr(trainlib, "validate", spy)
    trainlib.train(spec.model_copy(update={"optim": spec.optim.model_copy(
        update={"epochs": 1})}), tmp_path, progress=False, eval_batch=5)
    assert seen == {"batch_size": 5, "epoch": 1, "layout": True}


def test_the_progress_bar_shows_each_epoch_and_a_resume(tmp_path, monkeypatch, capsys):
    spec = _spec()
    real = _stop_in_epoch_two(monkeypatch, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        trainlib.train(spec, tmp_path, progress=True)
    first = capsys.readouterr().out
    assert spec.name in first and "1/2" in first and "PGD-10" in first and "FOSC" in first
    monkeypatch.setattr(trainlib, "run_epoch", real)
    trainlib.train(spec, tmp_path, progress=True)
    resumed = capsys.readouterr().out  # one epoch left, counted from the resumed one
    assert "2/2" in resumed and "1/2" not in resumed


def test_train_shows_progress_unless_asked_not_to(tmp_path, capsys):
    spec = _spec(**{"optim.epochs": 1})
    trainlib.train(spec, tmp_path)
    assert spec.name in capsys.readouterr().out
