"""The training engine: every variant of the paper from the spec alone, crash-safe.

`train(spec, runs_dir)` turns a spec into `runs/<digest>/`. Each epoch: training steps (see
`steps.py`), then validation on the spec's validation set (clean, PGD-10, mean FOSC/SGCS),
then checkpoint policies, Algorithm 1's healing trigger, and `last.pt`, the full resume
state. A killed run restarts from its last finished epoch and, on CPU, writes the same
`metrics.jsonl` as an uninterrupted run; a finished run is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from trades_repro import data as datalib
from trades_repro import evalbatch, numerics, store
from trades_repro.attacks import eval_mode, pgd
from trades_repro.awp import awp_active
from trades_repro.engine import RunState, Session, TrainingError, build_session, lr_at
from trades_repro.evalbatch import out_of_memory_hint, validation_batch_size
from trades_repro.metrics import attack_sgcs, correct, fosc
from trades_repro.policies import update_policies
from trades_repro.progress import progress_bar
from trades_repro.spec import ExperimentSpec
from trades_repro.steps import NonFiniteLoss, train_step

APP_G_KEYS = ("w_grad_norm", "ce_norm", "kl_norm", "grad_cosine_similarity")


def train(spec: ExperimentSpec, runs_dir: Path, *, progress: bool = True,
          eval_batch: int | None = None) -> store.RunResult:
    """Train `spec` into `runs_dir/<digest>/`: resume it if unfinished, skip it if finished.

    `eval_batch` sets validation's batch (default: `evalbatch.validation_batch_size`); beyond
    how a kernel rounds an example at another batch it changes no result, so it is not part
    of the spec.
    """
    if eval_batch is not None:
        evalbatch.checked(eval_batch)  # a bad value fails now, not after epoch 1
    run_dir = store.run_dir_for(spec, runs_dir)
    if store.is_finished(run_dir):
        return store.RunResult(run_dir, store.read_metrics(run_dir), skipped=True)
    session = build_session(spec, run_dir)  # loads data before writing anything
    session.eval_batch = eval_batch
    started = time.perf_counter()
    try:
        with (numerics.training(spec.performance) as flags,
              progress_bar(spec, session.state.epoch, enabled=progress) as update):
            session.provenance["backend"] = {"training": flags,
                                             "validation": _validation_flags()}
            for epoch in range(session.state.epoch + 1, spec.optim.epochs + 1):
                record = run_epoch(session, epoch)
                update(record)
    except NonFiniteLoss as err:
        last = run_dir / store.LAST_FILE
        kept = (f"last good checkpoint kept in {last}" if last.is_file() else
                "no checkpoint: no epoch had finished")
        message = f"{spec.name}: {err} in epoch {session.state.epoch + 1}; {kept}"
        session.finish(started, status="failed", error=message)
        raise TrainingError(message) from None
    except (KeyboardInterrupt, SystemExit) as err:  # stopped, not failed: it resumes
        session.finish(started, status="interrupted", error=f"{type(err).__name__}: {err}")
        raise
    except BaseException as err:
        session.finish(started, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    session.finish(started, status="finished")
    return store.RunResult(run_dir, session.state.records, skipped=False)


def run_epoch(session: Session, epoch: int) -> store.EpochRecord:
    """Train one epoch, validate, apply policies and healing, then commit the epoch to disk."""
    spec, state = session.spec, session.state
    lr = lr_at(spec.optim, epoch)
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    stats = train_epoch(session, epoch)
    # the plain module, as `evaluate` and `diagnose` run it: a compiled one would compile
    # again for the evaluation numerics (TF32 and autocast off), up to dynamo's limit
    val = validate(session.net, session.splits.val, spec, session.device, epoch,
                   batch_size=session.eval_batch, prepare=session.prepare)
    record = store.EpochRecord(
        epoch=epoch, lr=lr, val_source=session.splits.val_source, **stats, **val,
        **update_policies(state.policies, epoch, val, spec.healing.fosc_threshold),
        healing_event=_healing_trigger(state, epoch, val["val_fosc"], spec),
    )
    state.records.append(record)
    session.commit_epoch(record)
    return record


def train_epoch(session: Session, epoch: int) -> dict:
    """One pass over the training set; returns the epoch's training fields of the record."""
    spec, state = session.spec, session.state
    awp = session.awp if spec.method.name == "trades_awp" and awp_active(
        epoch, spec.method.awp.warmup) else None
    totals = _Totals(session.device)
    app_g: list[dict] = []
    noised: list[int] = []
    for index, (x, y) in enumerate(session.batches()):
        noise_now = state.noise_left > 0
        if noise_now:  # Algorithm 1, lines 7-10; no clipping to [0, 1], as written there
            x = x + spec.healing.noise_std * torch.randn(
                x.shape, generator=session.healing_gen, device=x.device)
            state.noise_left -= 1
            noised.append(index)
        step = train_step(session.model, session.optimizer, session.prepare(x), y, spec,
                          session.attack_gen, awp)
        state.global_step += 1
        totals.add(step, len(y))
        if step.batch_metrics is not None:  # App. G syncs each step anyway: check it now
            totals.check_finite()
            app_g.append(session.batch_record(epoch, step, noise_now))
    session.pending_batches = app_g
    return _epoch_fields(totals.read(), app_g, noised)


class _Totals:
    """An epoch's loss and hit counts, summed on the device: one host sync per epoch.

    A non-finite loss is noticed at the epoch's end (or at once when App. G's metrics are
    monitored); the epoch is then discarded, so no state from after the bad step is kept.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.hits = torch.zeros(2, dtype=torch.int64, device=device)  # clean, adversarial
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.n = 0

    def add(self, step, n: int) -> None:
        self.loss += step.loss.double() * n
        self.hits += torch.stack([step.clean_correct, step.adv_correct])
        self.finite &= torch.isfinite(step.loss)
        self.n += n

    def check_finite(self) -> None:
        if not self.finite.item():
            raise NonFiniteLoss("non-finite training loss")

    def read(self) -> dict:
        self.check_finite()
        clean, adv = self.hits.tolist()
        return {"loss": self.loss.item(), "clean": clean, "adv": adv, "n": self.n}


def _validation_flags() -> dict[str, bool]:
    with numerics.evaluation() as flags:
        return flags


def _epoch_fields(totals: dict, app_g: list, noised: list[int]) -> dict:
    n = totals["n"]
    clean, adv = totals["clean"] / n, totals["adv"] / n
    fields = {"train_loss": totals["loss"] / n, "train_clean_acc": clean,
              "train_adv_acc": adv, "train_gap": clean - adv, "noised_batches": noised}
    for key in APP_G_KEYS:
        fields[key] = sum(getattr(r, key) for r in app_g) / len(app_g) if app_g else None
    return fields


def _healing_trigger(state: RunState, epoch: int, val_fosc: float | None,
                     spec: ExperimentSpec) -> store.HealingEvent | None:
    """Algorithm 1, lines 19-21: FOSC above the threshold noises the next batches."""
    healing = spec.healing
    if not healing.enabled or val_fosc is None or val_fosc <= healing.fosc_threshold:
        return None
    state.noise_left = healing.noise_batches
    return store.HealingEvent(epoch=epoch, fosc=val_fosc, threshold=healing.fosc_threshold,
                              noise_batches=healing.noise_batches)


def validate(model: nn.Module, val: datalib.ImageSet, spec: ExperimentSpec,
             device: torch.device, epoch: int, *, batch_size: int | None = None,
             prepare: Callable[[Tensor], Tensor] | None = None) -> dict[str, float | None]:
    """Clean and PGD-10 accuracy on `val`, with mean FOSC/SGCS of the PGD-10 examples.

    Runs under the evaluation numerics (fp32, deterministic cuDNN; `numerics.evaluation`)
    whatever the training precision, in eval mode, and restores each submodule's mode after.
    The random starts are drawn for the whole set at once from (seed, epoch) and the
    per-example values are summed once, so the result does not depend on `batch_size`
    (default: `evalbatch.validation_batch_size`) beyond kernel rounding. `prepare` converts
    each input as training does (channels_last), the layout the model's weights are in.
    """
    attack, monitor = spec.validation, spec.monitor
    record = monitor.fosc or monitor.sgcs
    n = len(val.labels)
    gen = torch.Generator(device=device).manual_seed(spec.seed * 100_003 + epoch)  # per epoch
    noise = torch.rand((n, *val.images.shape[1:]), generator=gen, device=device)
    size = validation_batch_size(val.images.shape[1:], device, batch_size)
    prepare = prepare or (lambda x: x)
    rows = []  # per example: clean, robust, FOSC, SGCS, summed once so no batch regroups them
    batches = datalib.batches(val, size, generator=None, shuffle=False, augment=False,
                              padding=0, device=device)
    with eval_mode(model), numerics.evaluation(), out_of_memory_hint(size):
        for index, (x, y) in enumerate(batches):
            x = prepare(x)
            start = noise[index * size:index * size + len(y)]
            rows.append(_validate_batch(model, x, y, attack, monitor, record, start))
    sums = torch.cat(rows).sum(dim=0)
    clean, robust, fosc_sum, sgcs_sum = sums.tolist()  # the one host sync of validation
    return {
        "val_clean_acc": clean / n,
        "val_pgd10_acc": robust / n,
        "val_fosc": fosc_sum / n if monitor.fosc else None,
        "val_sgcs": sgcs_sum / n if monitor.sgcs else None,
    }


def _validate_batch(model: nn.Module, x: Tensor, y: Tensor, attack, monitor, record: bool,
                    noise: Tensor) -> Tensor:
    """The batch's per-example [clean correct, robust correct, FOSC, SGCS] in float64."""
    out = pgd(model, x, y, eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
              random_start=attack.random_start, record=record, noise=noise.to(x))
    x_adv, trace = out if record else (out, None)
    row = torch.zeros(len(y), 4, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        row[:, 0] = correct(model(x), y)
        row[:, 1] = correct(model(x_adv), y)
    if monitor.fosc:
        row[:, 2] = fosc(x_adv, x, trace[-1], attack.eps)
    if monitor.sgcs:
        row[:, 3] = attack_sgcs(trace)  # Eq. 3: the k step gradients
    return row


__all__ = ["TrainingError", "train", "train_epoch", "validate"]
