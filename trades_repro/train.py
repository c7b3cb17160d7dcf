"""The TRADES training loop: TPGD inner maximisation, Eq. 1 outer loss, PGD-10 validation.

One call of `train(spec, runs_dir)` turns a spec into a run folder (see `store.py`). Every
epoch ends with validation on the spec's validation set: clean accuracy, PGD-10 accuracy and
the mean FOSC / SGCS of the PGD-10 examples (Fig. 2's signals). The checkpoint with the
highest validation PGD-10 accuracy is kept (App. B's selection rule).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from trades_repro import data as datalib
from trades_repro import store
from trades_repro.attacks import pgd, tpgd
from trades_repro.losses import trades_objective
from trades_repro.metrics import correct, fosc, sgcs
from trades_repro.models import build_model, dataset_stats
from trades_repro.spec import ExperimentSpec

EVAL_BATCH = 512  # validation batch: large enough to be fast, small enough for 8 GB GPUs


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the run is marked failed."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    records: list[store.EpochRecord]
    skipped: bool  # the run was already finished: nothing was recomputed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def train(spec: ExperimentSpec, runs_dir: Path, *, progress: bool = True) -> RunResult:
    """Train `spec` into `runs_dir/<digest>/`; a finished run with that digest is skipped."""
    run_dir = store.run_dir_for(spec, runs_dir)
    if _finished(run_dir):
        return RunResult(run_dir, store.read_metrics(run_dir), skipped=True)
    device = resolve_device(spec.device)
    splits = datalib.load_splits(spec.data, spec.seed)  # bad data fails before any file appears
    torch.manual_seed(spec.seed)  # model initialisation
    model = _build(spec, splits).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=spec.optim.lr,
        momentum=spec.optim.momentum,
        nesterov=spec.optim.nesterov,
        weight_decay=spec.optim.weight_decay,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(run_dir / store.SPEC_FILE, spec.model_dump(mode="json"))
    provenance = _start_provenance(spec, device)
    store.atomic_write_json(run_dir / store.PROVENANCE_FILE, provenance)
    started = time.perf_counter()
    data_gen = torch.Generator().manual_seed(spec.seed + 1)  # order and augmentation
    attack_gen = torch.Generator(device=device).manual_seed(spec.seed + 2)  # TPGD starts
    records: list[store.EpochRecord] = []
    best = -math.inf
    try:
        with _progress(spec, enabled=progress) as update:
            for epoch in range(1, spec.optim.epochs + 1):
                batches = datalib.batches(
                    splits.train,
                    spec.optim.batch_size,
                    generator=data_gen,
                    shuffle=True,
                    augment=spec.data.augment,
                    padding=spec.data.crop_padding,
                    device=device,
                )
                stats = train_epoch(model, optimizer, batches, spec, attack_gen)
                val = validate(model, splits.val, spec, device, epoch)
                is_best = val["val_pgd10_acc"] > best
                if is_best:
                    best = val["val_pgd10_acc"]
                    store.atomic_save_safetensors(run_dir / store.BEST_FILE, model.state_dict())
                lr = optimizer.param_groups[0]["lr"]
                record = store.EpochRecord(
                    epoch=epoch, lr=lr, val_source=splits.val_source, is_best=is_best,
                    **stats, **val,
                )
                records.append(record)
                store.atomic_write_jsonl(run_dir / store.METRICS_FILE, records)
                update(record)
    except BaseException as err:
        _finish_provenance(run_dir, provenance, started, status="failed", error=str(err))
        raise
    _finish_provenance(run_dir, provenance, started, status="finished")
    return RunResult(run_dir, records, skipped=False)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    spec: ExperimentSpec,
    attack_gen: torch.Generator,
) -> dict[str, float]:
    """One epoch of TRADES (Eq. 1): TPGD in eval mode, then the outer loss in train mode."""
    attack = spec.method.attack
    loss_sum = clean_hits = adv_hits = seen = 0.0
    for x, y in batches:
        x_adv = tpgd(
            model, x, eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
            init_std=attack.init_std, generator=attack_gen,
        )
        model.train()
        logits_nat, logits_adv = model(x), model(x_adv)
        loss = trades_objective(logits_nat, logits_adv, y, spec.method.beta)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite training loss ({loss.item()}) in {spec.name}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(y)
        loss_sum += loss.item() * n
        clean_hits += correct(logits_nat.detach(), y).sum().item()
        adv_hits += correct(logits_adv.detach(), y).sum().item()
        seen += n
    clean, adv = clean_hits / seen, adv_hits / seen
    return {
        "train_loss": loss_sum / seen,
        "train_clean_acc": clean,
        "train_adv_acc": adv,
        "train_gap": clean - adv,
    }


def validate(
    model: nn.Module, val: datalib.ImageSet, spec: ExperimentSpec, device: torch.device,
    epoch: int,
) -> dict[str, float | None]:
    """Clean and PGD-10 accuracy on `val`, with mean FOSC/SGCS of the PGD-10 examples."""
    attack, monitor = spec.validation, spec.monitor
    record = monitor.fosc or monitor.sgcs
    gen = torch.Generator(device=device).manual_seed(spec.seed * 100_003 + epoch)  # fixed per epoch
    was_training = model.training
    model.eval()
    clean = robust = 0
    fosc_sum = sgcs_sum = 0.0
    for x, y in datalib.batches(val, EVAL_BATCH, generator=None, shuffle=False,
                                augment=False, padding=0, device=device):
        with torch.no_grad():
            clean += correct(model(x), y).sum().item()
        out = pgd(model, x, y, eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
                  random_start=attack.random_start, record=record, generator=gen)
        x_adv, trace = out if record else (out, None)
        with torch.no_grad():
            robust += correct(model(x_adv), y).sum().item()
        if monitor.fosc:
            fosc_sum += fosc(x_adv, x, trace[-1], attack.eps).sum().item()
        if monitor.sgcs:
            sgcs_sum += sgcs(trace).sum().item()
    model.train(was_training)
    n = len(val.labels)
    return {
        "val_clean_acc": clean / n,
        "val_pgd10_acc": robust / n,
        "val_fosc": fosc_sum / n if monitor.fosc else None,
        "val_sgcs": sgcs_sum / n if monitor.sgcs else None,
    }


def _build(spec: ExperimentSpec, splits: datalib.Splits) -> nn.Module:
    channels, height, _ = splits.shape
    mean, std = dataset_stats(spec.data.dataset) if spec.model.normalize else (None, None)
    return build_model(spec.model, in_channels=channels, num_classes=splits.num_classes,
                       image_size=height, mean=mean, std=std)


def _finished(run_dir: Path) -> bool:
    path = run_dir / store.PROVENANCE_FILE
    return path.exists() and store.read_json(path).get("status") == "finished"


def _start_provenance(spec: ExperimentSpec, device: torch.device) -> dict:
    return {
        "digest": spec.digest(),
        "seed": spec.seed,
        "status": "running",
        "started": store.now_iso(),
        **store.git_state(),
        **store.environment(device),
    }


def _finish_provenance(run_dir: Path, provenance: dict, started: float, *, status: str,
                       error: str | None = None) -> None:
    provenance.update(status=status, ended=store.now_iso(),
                      wall_time_s=round(time.perf_counter() - started, 3))
    if error is not None:
        provenance["error"] = error
    store.atomic_write_json(run_dir / store.PROVENANCE_FILE, provenance)


@contextmanager
def _progress(spec: ExperimentSpec, *, enabled: bool):
    """A rich progress bar over epochs showing loss, PGD-10 and FOSC; a no-op when quiet."""
    if not enabled:
        yield lambda record: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(spec.name, total=spec.optim.epochs, info="")

        def update(record: store.EpochRecord) -> None:
            fosc_text = "-" if record.val_fosc is None else f"{record.val_fosc:.4f}"
            info = (f"loss {record.train_loss:.3f}  clean {record.val_clean_acc:.3f}  "
                    f"PGD-10 {record.val_pgd10_acc:.3f}  FOSC {fosc_text}")
            bar.update(task, advance=1, info=info)

        yield update
