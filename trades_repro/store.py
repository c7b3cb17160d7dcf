"""Run folders: the evidence a run leaves, written so that a crash never leaves half a file.

`runs/<digest>/` holds `spec.json`, `provenance.json`, `metrics.jsonl` (one validated
`EpochRecord` per line) and `best.safetensors`. Every write goes to a temporary file in the
same folder, is flushed to disk, and is then renamed over the target: readers see the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import save_file

from trades_repro import __version__
from trades_repro.spec import ExperimentSpec

SPEC_FILE = "spec.json"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.safetensors"


class EpochRecord(BaseModel):
    """One line of `metrics.jsonl`: what one epoch of training and validation measured.

    No wall times here, so that the same seed gives a bit-identical file; timings live in
    `provenance.json`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int
    lr: float
    train_loss: float
    train_clean_acc: float  # on the clean forward of the training step (Fig. 3)
    train_adv_acc: float  # on the TPGD examples of the training step (Fig. 3)
    train_gap: float  # train_clean_acc - train_adv_acc (Fig. 3's gap metric)
    val_source: Literal["holdout", "test"]
    val_clean_acc: float
    val_pgd10_acc: float
    val_fosc: float | None  # mean FOSC of the PGD-10 examples (Eq. 2); None when off
    val_sgcs: float | None  # mean SGCS of the same attack traces (Eq. 3); None when off
    is_best: bool  # this epoch's weights became best.safetensors (highest val PGD-10)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_jsonl(path: Path, records: Iterable[BaseModel]) -> None:
    lines = "".join(record.model_dump_json() + "\n" for record in records)
    atomic_write_bytes(path, lines.encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors' own writer, pointed at a temp name, then renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metrics(run_dir: Path) -> list[EpochRecord]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [EpochRecord.model_validate_json(line) for line in path.read_text().splitlines()]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def run_dir_for(spec: ExperimentSpec, runs_dir: Path) -> Path:
    """A run is named by its spec's digest: the same spec is the same run."""
    return runs_dir / spec.digest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the source tree this package was imported from, if any."""
    src = Path(__file__).resolve().parent
    try:
        sha = _git(src, "rev-parse", "HEAD")
        dirty = bool(_git(src, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha, "git_dirty": dirty}


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    )
    return out.stdout.strip()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and backend flags that can change a run's numbers."""
    import numpy
    import torchvision

    cuda = device.type == "cuda"
    return {
        "trades_repro": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
