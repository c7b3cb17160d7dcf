"""`eval.json` on disk: read (old layouts re-keyed, nothing dropped, verdicts recomputed),
write atomically, lock.

Records are keyed by (checkpoint file hash, evaluation key): another `--n-examples`, seed,
device, architecture or library version makes a new record beside the old one instead of
replacing it. An exclusive lock (``eval.json.lock``, `fcntl.flock`, released by the kernel
when the process dies) stops a second process from writing the same file meanwhile.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import ValidationError

from trades_repro import store
from trades_repro.errors import BadInput
from trades_repro.records import CheckpointEval, EvalFile
from trades_repro.verdict import verdicts_of

LOCK_SUFFIX = ".lock"


class EvalFileError(BadInput):
    """An `eval.json` that cannot be read, or is being written by another process."""


class EvalFileBusy(EvalFileError):
    """An `eval.json` another process is writing (`locked`): `holder` says who."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def read_eval(path: Path) -> EvalFile | None:
    """The file's records keyed by their evaluation key (version 1 files re-keyed). Records
    are filed under the run folder's digest: its spec.json must still be that digest's."""
    spec_file = path.parent / store.SPEC_FILE
    if spec_file.is_file():
        store.run_digest(spec_file)
    if not path.exists():
        return None
    try:
        evals = EvalFile.model_validate_json(store.read_text(path, "JSON"))
    except ValidationError as err:
        raise EvalFileError(f"{path}: not a valid eval file ({err.errors()[0]['msg']}); "
                            "move it away to start over") from None
    records = {record.key: record.model_copy(update={"verdicts": verdicts_of(record)})
               for record in evals.checkpoints.values()}
    return evals.model_copy(update={"schema_version": 2, "checkpoints": records})


def records_for(evals: EvalFile | None, file: str | None = None) -> list[CheckpointEval]:
    """Every record in `evals` (of checkpoint file name `file` when given), oldest first."""
    if evals is None:
        return []
    return [r for r in evals.checkpoints.values() if file is None or r.checkpoint == file]


def made_with(record: CheckpointEval, evaluation) -> bool:
    """Whether `record` was made with `evaluation`'s (an `EvaluationSpec`) test images
    (`n_examples` None: any), Square budget and the pinned fp32 numerics: a record of another
    budget, such as a 1,000-query probe added to a run later, or one made with ``--tf32``
    (TF32 kernels, another rounding), is never the run's own evaluation, so claims,
    `run-claim` and `verify` judge only the pinned fp32 one."""
    return (evaluation.n_examples in (None, record.settings.n_examples)
            and record.settings.square_queries == evaluation.square_queries
            and not record.settings.tf32)


def write_eval(path: Path, evals: EvalFile, device: str) -> None:
    from pyautoattack import __version__ as autoattack_version

    evals.provenance = {**store.environment(torch.device(device)), **store.git_state(),
                        "pyautoattack": autoattack_version, "updated": store.now_iso()}
    text = evals.model_dump_json(indent=2)
    EvalFile.model_validate_json(text)  # what we write must read back (fields set in place)
    store.atomic_write_bytes(path, (text + "\n").encode())


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` exclusively, or fail at once naming the process that holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + LOCK_SUFFIX)
    with lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise EvalFileBusy(f"{path}: being written by {holder}; wait for it to finish "
                               "(or give another --out)", holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
