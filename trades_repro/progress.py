"""Progress for people: one rich bar per run with epoch, loss, PGD-10 and FOSC."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from trades_repro.spec import ExperimentSpec
from trades_repro.store import EpochRecord


@contextmanager
def progress_bar(
    spec: ExperimentSpec, done: int, *, enabled: bool
) -> Iterator[Callable[[EpochRecord], None]]:
    """Yield `update(record)`; a no-op when not enabled (`--quiet`). `done`: resumed epochs."""
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
    with Progress(*columns) as bar:
        info = f"resumed after epoch {done}" if done else ""
        task = bar.add_task(spec.name, total=spec.optim.epochs, completed=done, info=info)

        def update(record: EpochRecord) -> None:
            fosc = "-" if record.val_fosc is None else f"{record.val_fosc:.4f}"
            heal = "  healing" if record.healing_event else ""
            bar.update(task, advance=1, info=(
                f"loss {record.train_loss:.3f}  clean {record.val_clean_acc:.3f}  "
                f"PGD-10 {record.val_pgd10_acc:.3f}  FOSC {fosc}{heal}"))

        yield update
