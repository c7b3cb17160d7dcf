"""Run folders: the evidence a run leaves, written so that a crash never leaves half a file.

`runs/<digest>/` holds `spec.json`, `provenance.json`, `metrics.jsonl` (one validated
`EpochRecord` per line) and `best.safetensors`. Every write goes to a temporary file in the
same folder, is flushed to disk, and is then renamed over the target: readers see the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import save_file

from trades_repro import __version__
from trades_repro.errors import BadInput
from trades_repro.spec import SPEC_VERSION, DataSpec, ExperimentSpec, parse_spec

SPEC_FILE = "spec.json"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.jsonl"
BEST_FILE = "best.safetensors"  # policy best_pgd10
BEST_FOSC_OK_FILE = "best_pgd10_fosc_ok.safetensors"  # policy best_pgd10_fosc_ok
CHECKPOINTS_FILE = "checkpoints.json"  # policy -> epoch and file, written at the end
LAST_FILE = "last.pt"  # full resume state after every epoch
BATCHES_FILE = "batches.jsonl"
DIGEST_NAME = re.compile(r"[0-9a-f]{16}")  # a run folder's name: its spec's digest()
RESUME_KEYS = ("digest", "model", "optimizer", "state", "rng")  # what a resume reads of last.pt


class HealingEvent(BaseModel):
    """Algorithm 1 lines 19-21: validation FOSC passed the threshold after `epoch`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int  # the epoch whose validation FOSC triggered healing
    fosc: float
    threshold: float
    noise_batches: int  # how many of the following training batches get noise


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
    train_adv_acc: float  # on the inner-max examples of the training step (Fig. 3)
    train_gap: float  # train_clean_acc - train_adv_acc (Fig. 3's gap metric)
    w_grad_norm: float | None = None  # epoch means of App. G's per-step metrics (Eqs. 4-7);
    ce_norm: float | None = None  # None unless monitor.batch_metrics
    kl_norm: float | None = None
    grad_cosine_similarity: float | None = None
    val_source: Literal["holdout", "test"]
    val_clean_acc: float
    val_pgd10_acc: float
    val_fosc: float | None  # mean FOSC of the PGD-10 examples (Eq. 2); None when off
    val_sgcs: float | None  # mean SGCS of the same attack traces (Eq. 3); None when off
    fosc_ok: bool | None  # val_fosc <= healing.fosc_threshold; None without FOSC
    noised_batches: list[int] = []  # 0-based indices of this epoch's batches given noise
    healing_event: HealingEvent | None = None  # this epoch's FOSC triggered Algorithm 1
    best_pgd10: bool  # became best.safetensors (policy best_pgd10, App. B)
    best_pgd10_fosc_ok: bool  # became the best_pgd10_fosc_ok checkpoint (Alg. 1, 17-18)


class BatchRecord(BaseModel):
    """One line of `batches.jsonl`: App. G's metrics of one optimiser step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int
    step: int  # global optimiser step, 1-based
    loss: float
    w_grad_norm: float  # ‖∇θ(CE + β·KL)‖₂ (Eq. 4)
    ce_norm: float  # ‖∇θ CE‖₂ (Eq. 5)
    kl_norm: float  # ‖∇θ β·KL‖₂ (Eq. 6)
    grad_cosine_similarity: float  # full-loss gradient before vs after the step (Eq. 7)
    noised: bool  # Algorithm 1 noise was added to this batch


def remove_temporaries(folder: Path, names: Iterable[str]) -> None:
    """Delete the temporary files that writes of `names` a kill cut short left in `folder`
    (`_atomic` writes `.{name}.<random>.tmp`, then renames it)."""
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_jsonl(path: Path, records: Iterable[BaseModel]) -> None:
    lines = "".join(record.model_dump_json() + "\n" for record in records)
    atomic_write_bytes(path, lines.encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with _atomic(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


class CorruptFile(BadInput):
    """A run file that does not hold what it should (exit 2): our writers are atomic, so it
    was cut or edited outside them, and the message names the file and the line."""


OUTSIDE = "it was cut or edited outside trades-repro: move it, or its run folder, aside"


def read_metrics(run_dir: Path) -> list[EpochRecord]:
    """The run's epoch records; `CorruptFile` for a line that is not one."""
    return _read_jsonl(run_dir / METRICS_FILE, EpochRecord, "an epoch record")


def read_batches(run_dir: Path) -> dict[int, list[BatchRecord]]:
    """App. G's step records (`monitor.batch_metrics`) by epoch; {} without the file."""
    by_epoch: dict[int, list[BatchRecord]] = {}
    for record in _read_jsonl(run_dir / BATCHES_FILE, BatchRecord, "a step record"):
        by_epoch.setdefault(record.epoch, []).append(record)
    return by_epoch


def _read_jsonl(path: Path, model: type[BaseModel], what: str) -> list:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(read_text(path, "JSON lines").splitlines(), 1):
        try:
            records.append(model.model_validate_json(line))
        except ValidationError as err:
            problem = err.errors()[0]["msg"] if err.errors() else str(err)
            raise CorruptFile(f"{path}, line {number}: not {what} ({problem}); move "
                              "the run folder aside to go on without it") from None
    return records


def append_jsonl(path: Path, records: Iterable[BaseModel]) -> None:
    """Append lines atomically: old content + new lines to a temp file, then rename."""
    old = path.read_bytes() if path.exists() else b""
    new = "".join(record.model_dump_json() + "\n" for record in records).encode()
    atomic_write_bytes(path, old + new)


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Atomically rewrite `path` keeping whole lines for which `keep` holds."""
    if not path.exists():
        return
    lines = []
    for number, line in enumerate(read_text(path, "JSON lines").splitlines(), 1):
        try:
            kept = keep(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError):  # not JSON, or lacks keep's field
            raise CorruptFile(f"{path}, line {number}: not a record of this file; move the "
                              "run folder aside to go on without it") from None
        if kept:
            lines.append(line + "\n")
    atomic_write_bytes(path, "".join(lines).encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    with _atomic(path) as tmp:
        torch.save(obj, tmp)


LAST_ASIDE = "move it aside to train this run again from its start"  # a bad last.pt's way on


def read_last(path: Path) -> dict[str, Any]:
    """`last.pt`'s resume state, read with ``weights_only``; `CorruptFile` when it cannot be
    read or is not a mapping holding every one of `RESUME_KEYS`."""
    aside = LAST_ASIDE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise CorruptFile(
            f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); it "
            f"was cut or edited outside trades-repro: {aside}") from None
    missing = [k for k in RESUME_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise CorruptFile(f"{path}: not a resume state (lacks {', '.join(missing)}); it was "
                          f"written or edited outside trades-repro: {aside}")
    return saved


def read_text(path: Path, what: str = "text") -> str:
    """A run file's text; `CorruptFile` when it is not UTF-8 or a folder stands in its place
    (`what` names the format the file should hold, for the message)."""
    try:
        return path.read_text()
    except IsADirectoryError:
        raise CorruptFile(f"{path}: a folder, not a file; {OUTSIDE}") from None
    except UnicodeDecodeError as err:
        raise CorruptFile(f"{path}: not valid {what} ({err}); {OUTSIDE}") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object of ours; `CorruptFile` (a ValueError) when the file holds anything else."""
    try:
        data = json.loads(read_text(path, "JSON"))
    except json.JSONDecodeError as err:
        raise CorruptFile(f"{path}: not valid JSON ({err}); {OUTSIDE}") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{path}: not a JSON object (holds {type(data).__name__}); {OUTSIDE}")
    return data


def run_digest(spec_file: Path) -> str | None:
    """The digest of a run folder's `spec.json`; None for another SPEC_VERSION's spec (not
    this version's evidence). A run folder is named by its spec's digest (`run_dir_for`):
    when `spec_file`'s folder is so named and the spec is another's, the file was edited
    after the run wrote it (`CorruptFile`); folders named otherwise (copies) are not checked."""
    raw = read_json(spec_file)
    if raw.get("spec_version", SPEC_VERSION) != SPEC_VERSION:
        return None
    digest = parse_spec(raw, source=str(spec_file)).digest()
    folder = spec_file.parent.name
    if DIGEST_NAME.fullmatch(folder) and digest != folder:
        raise CorruptFile(f"{spec_file}: its digest {digest} does not match the folder's name "
                          f"{folder}; {OUTSIDE}")
    return digest


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    records: list[EpochRecord]
    skipped: bool  # the run was already finished: nothing was recomputed


def is_finished(run_dir: Path) -> bool:
    path = run_dir / PROVENANCE_FILE
    return path.exists() and read_json(path).get("status") == "finished"


def run_dir_for(spec: ExperimentSpec, runs_dir: Path) -> Path:
    """A run is named by its spec's digest: the same spec is the same run."""
    return runs_dir / spec.digest()


def data_location(data: DataSpec) -> dict[str, Any]:
    """Where this run read its data: not part of the digest (moving the data folder is the
    same run), so provenance keeps it, as given and resolved."""
    from trades_repro.data import DEFAULT_ROOT  # lazy: torchvision is slow to import

    root = Path(data.root) if data.root is not None else DEFAULT_ROOT
    return {"root": data.root, "resolved_root": str(root.resolve()), "download": data.download}


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


def _cpuinfo(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_features() -> dict[str, Any]:
    """What decides torch's CPU kernels: its dispatch level and the vector units present.
    Two VMs both named 'AMD EPYC' measured bf16 at 0.25x and at 1.03x of fp32: one of them
    had avx512_bf16; and the same seed trained on the two gave different runs (the study's
    cross-VM replicates, docs/small_scale.md)."""
    flags = (_cpuinfo("flags") or "").split()
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags": [f for f in CPU_FEATURES if f in flags]}


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
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        **cpu_features(),  # CPU kernels differ by vector unit, so CPU numbers do too
        "torch_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


EVAL_FILE = "eval.json"  # evaluate.EvalFile: final evaluation of the run's checkpoints
