"""A run's live objects and its crash-safe state: build, resume, commit an epoch, finish.

`last.pt` is the commit point of an epoch. The order of writes after epoch e is: policy
checkpoints to pending names (`.best.safetensors.e{e}.pending`) → `batches.jsonl` (e's steps
appended) → `last.pt` → pending checkpoints renamed into place → `metrics.jsonl`. A kill
before `last.pt` redoes epoch e from `last.pt` of e − 1 after deleting e's pending
checkpoints and cutting e's lines from `batches.jsonl`: a replay that is not bit-exact (a
resume on another device type re-seeds its streams) may not make e best again, and the
abandoned attempt's weights must not stay in a policy file. A kill after `last.pt` finds e's
pending checkpoints renamed into place and `metrics.jsonl` rewritten from the records held
in `last.pt`. Temporary files of writes a kill cut short are deleted on every start.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from trades_repro import data as datalib
from trades_repro import numerics, rngstate, store
from trades_repro.awp import TradesAWP
from trades_repro.errors import BadInput, NeedsGPU
from trades_repro.models import build_model, dataset_stats
from trades_repro.policies import POLICIES, PolicyState, select_checkpoints
from trades_repro.spec import ExperimentSpec, OptimSpec

POLICY_FILES = {"best_pgd10": store.BEST_FILE, "best_pgd10_fosc_ok": store.BEST_FOSC_OK_FILE}
# What training writes in a run folder: its temporary files are training's to delete.
# Not eval.json (an evaluation may be writing it) nor the lock's files.
TRAINING_FILES = (store.LAST_FILE, store.METRICS_FILE, store.BATCHES_FILE, store.SPEC_FILE,
                  store.PROVENANCE_FILE, store.CHECKPOINTS_FILE, *POLICY_FILES.values())


@dataclass
class RunState:
    """Everything besides weights and RNGs that the loop carries from epoch to epoch."""

    epoch: int = 0  # last finished epoch
    global_step: int = 0
    noise_left: int = 0  # Algorithm 1's add_noise_batches
    policies: PolicyState = field(default_factory=PolicyState)
    records: list[store.EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step,
                "noise_left": self.noise_left, "policies": asdict(self.policies),
                "records": [r.model_dump(mode="json") for r in self.records]}

    @classmethod
    def from_dict(cls, raw: dict) -> RunState:
        """The state `to_dict` wrote; ValueError, KeyError or TypeError for anything else."""
        counts = [raw[k] for k in ("epoch", "global_step", "noise_left")]
        if not all(type(c) is int and c >= 0 for c in counts):  # bool is no count
            raise ValueError(f"epoch, global_step and noise_left are not counts: {counts}")
        records = [store.EpochRecord.model_validate(r) for r in raw["records"]]
        if [r.epoch for r in records] != list(range(1, counts[0] + 1)):
            raise ValueError(f"its records are not those of epochs 1 to {counts[0]}")
        return cls(*counts, _policy_state(raw["policies"]), records)


def _policy_state(raw: dict) -> PolicyState:
    state = PolicyState(**raw)
    numbers = all(type(v) in (int, float) for v in state.best.values())
    epochs = all(v is None or type(v) is int for v in state.best_epoch.values())
    if not (numbers and epochs and set(state.best_epoch) == set(POLICIES)):
        raise ValueError(f"not a checkpoint-policy state: {raw}")
    return state


def lr_at(optim: OptimSpec, epoch: int) -> float:
    """LR of 1-based `epoch`: constant, or × lr_decay after each milestone epoch (App. D).

    Milestones 100 and 150 mean epochs 101 and 151 are the first with the decayed rate,
    as PyTorch's MultiStepLR stepped once per epoch would do.
    """
    if optim.schedule == "constant":
        return optim.lr
    return optim.lr * optim.lr_decay ** sum(m < epoch for m in optim.milestones)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the run is marked failed."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NeedsGPU("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


@dataclass
class Session:
    spec: ExperimentSpec
    run_dir: Path
    device: torch.device
    splits: datalib.Splits
    net: nn.Module  # the plain module: its state_dict is what checkpoints hold
    model: nn.Module  # `net`, or its torch.compile wrapper (`DynamicBatch`)
    optimizer: torch.optim.Optimizer
    awp: TradesAWP | None
    data_gen: torch.Generator  # batch order and augmentation (CPU)
    attack_gen: torch.Generator  # inner-max random starts (on the device)
    healing_gen: torch.Generator  # Algorithm 1 noise (on the device)
    state: RunState
    provenance: dict
    pending_batches: list[store.BatchRecord] = field(default_factory=list)
    eval_batch: int | None = None  # validation's batch; None: from image size and memory

    def batches(self):
        d = self.spec.data
        return datalib.batches(self.splits.train, self.spec.optim.batch_size,
                               generator=self.data_gen, shuffle=True, augment=d.augment,
                               padding=d.crop_padding, device=self.device)

    def prepare(self, x: Tensor) -> Tensor:
        if self.spec.performance.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def batch_record(self, epoch: int, step, noised: bool) -> store.BatchRecord:
        return store.BatchRecord(epoch=epoch, step=self.state.global_step,
                                 loss=float(step.loss), noised=noised, **step.batch_metrics)

    def commit_epoch(self, record: store.EpochRecord) -> None:
        """Pending checkpoints and batch log, then last.pt (the commit point), then the
        checkpoints renamed into place and metrics.jsonl (module docstring)."""
        self.state.epoch = record.epoch
        files = [POLICY_FILES[policy] for policy in POLICIES if getattr(record, policy)]
        for file in files:
            store.atomic_save_safetensors(self.run_dir / pending_name(file, record.epoch),
                                          self.net.state_dict())
        if self.pending_batches:
            store.append_jsonl(self.run_dir / store.BATCHES_FILE, self.pending_batches)
            self.pending_batches = []
        store.atomic_torch_save(self.run_dir / store.LAST_FILE, self._resume_state())
        for file in files:
            os.replace(self.run_dir / pending_name(file, record.epoch), self.run_dir / file)
        store.atomic_write_jsonl(self.run_dir / store.METRICS_FILE, self.state.records)

    def finish(self, started: float, *, status: str, error: str | None = None) -> None:
        if status == "finished":
            self._write_checkpoint_index()
        wall = self.provenance.get("wall_time_s", 0.0) + time.perf_counter() - started
        self.provenance.update(status=status, ended=store.now_iso(), wall_time_s=round(wall, 3))
        if error is not None:
            self.provenance["error"] = error
        store.atomic_write_json(self.run_dir / store.PROVENANCE_FILE, self.provenance)

    def _write_checkpoint_index(self) -> None:
        """checkpoints.json: policy → epoch and file; a policy agreeing with best_pgd10
        shares its file (the duplicate is removed), and `last` points at last.pt."""
        records = [r.model_dump() for r in self.state.records]
        chosen = select_checkpoints(records, self.spec.healing.fosc_threshold)
        index: dict = {"last": {"epoch": self.state.epoch, "file": store.LAST_FILE}}
        for policy, epoch in chosen.items():
            file = POLICY_FILES[policy]
            if policy != "best_pgd10" and epoch == chosen["best_pgd10"]:
                (self.run_dir / file).unlink(missing_ok=True)
                file = POLICY_FILES["best_pgd10"]
            index[policy] = {"epoch": epoch, "file": file if epoch is not None else None}
        index["fosc_threshold"] = self.spec.healing.fosc_threshold
        store.atomic_write_json(self.run_dir / store.CHECKPOINTS_FILE, index)

    def _resume_state(self) -> dict:
        return {
            "digest": self.spec.digest(),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"schedule": self.spec.optim.schedule, "last_epoch": self.state.epoch},
            "awp_proxy": self.awp.proxy.state_dict() if self.awp is not None else None,
            "rng": rngstate.saved(self),
            "device": str(self.device),
            "state": self.state.to_dict(),
        }


def build_session(spec: ExperimentSpec, run_dir: Path) -> Session:
    """Everything a run needs, fresh or restored from `last.pt`; data is read first."""
    device = resolve_device(spec.device)
    splits = datalib.load_splits(spec.data, spec.seed)
    splits = datalib.Splits(*(_to(s, device) for s in (splits.train, splits.val, splits.test)),
                            splits.num_classes, splits.val_source, splits.shape)
    torch.manual_seed(spec.seed)  # model initialisation
    net = _build(spec, splits).to(device)
    if spec.performance.channels_last:
        net = net.to(memory_format=torch.channels_last)
    session = Session(
        spec, run_dir, device, splits, net,
        compiled(net, spec),
        build_optimizer(net, spec.optim, device),
        _awp(spec, net),
        torch.Generator().manual_seed(spec.seed + 1),
        torch.Generator(device=device).manual_seed(spec.seed + 2),
        torch.Generator(device=device).manual_seed(spec.seed + 3),
        RunState(), {},
    )
    if (run_dir / store.LAST_FILE).exists():
        _restore(session)
    else:
        _start(session)
    return session


def build_optimizer(net: nn.Module, optim: OptimSpec, device: torch.device) -> torch.optim.SGD:
    """App. B's SGD; fused on CUDA (one kernel for all parameters), foreach elsewhere.

    Both implement torch's SGD update rule; on CPU the foreach path gives the same numbers as
    official TRADES' plain `optim.SGD` (tests/test_exact_path.py).
    """
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(net.parameters(), lr=optim.lr, momentum=optim.momentum,
                           nesterov=optim.nesterov, weight_decay=optim.weight_decay, **kernel)


def _to(images: datalib.ImageSet, device: torch.device) -> datalib.ImageSet:
    """Keep the dataset on the device: batches are then index + crop/flip, no host copies."""
    return datalib.ImageSet(images.images.to(device), images.labels.to(device))


def backend_flags(performance) -> Any:
    """The backend flags a run trains under (set for the block, restored after)."""
    return numerics.training(performance)


def compiled(net: nn.Module, spec: ExperimentSpec) -> nn.Module:
    """`net`, or with `performance.compile` its torch.compile wrapper, batch dimension dynamic.

    `DynamicBatch` marks each input's batch dimension dynamic, so each mode (train, attack
    with gradients, no-grad forward) compiles one graph that a short last batch reuses: 3
    graphs, where dynamo's automatic mode alone (`dynamic=None`) compiled 6, each mode again
    when the batch first changed (CPU, eager backend), near its limit of 8 past which a frame
    silently runs eager. `dynamic=True` would make the spatial dimensions symbolic too.
    """
    return DynamicBatch(torch.compile(net, dynamic=None)) if spec.performance.compile else net


class DynamicBatch(nn.Module):
    """A compiled module called with dimension 0 of its input marked dynamic (`maybe_`: a
    batch of one may still specialise, without an error). The eager path is not wrapped."""

    def __init__(self, compiled_net: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled_net

    def forward(self, x: Tensor) -> Tensor:
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return self.compiled(x)


def _build(spec: ExperimentSpec, splits: datalib.Splits) -> nn.Module:
    channels, height, _ = splits.shape
    mean, std = dataset_stats(spec.data.dataset) if spec.model.normalize else (None, None)
    return build_model(spec.model, in_channels=channels, num_classes=splits.num_classes,
                       image_size=height, mean=mean, std=std)


def _awp(spec: ExperimentSpec, net: nn.Module) -> TradesAWP | None:
    if spec.method.name != "trades_awp":
        return None
    awp = spec.method.awp
    return TradesAWP(net, copy.deepcopy(net), gamma=awp.gamma, proxy_lr=awp.proxy_lr,
                     beta=spec.method.beta)


def pending_name(file: str, epoch: int | str) -> str:
    """Where policy file `file` of `epoch` waits for that epoch's commit (hidden, like the
    temporary files); `epoch="*"` gives the glob of every epoch's."""
    return f".{file}.e{epoch}.pending"


def _settle_pending(run_dir: Path, committed: int) -> None:
    """Rename the committed epoch's pending checkpoints into place (a kill came after its
    last.pt) and delete every other epoch's (attempts abandoned before their commit)."""
    for file in POLICY_FILES.values():
        for pending in run_dir.glob(pending_name(file, "*")):
            if pending.name == pending_name(file, committed):
                os.replace(pending, run_dir / file)
            else:
                pending.unlink()


def _remove_temporaries(run_dir: Path) -> None:
    """Delete what training's writes cut short by a kill left: for ResNet-18, about 90 MB
    per preemption in last.pt's alone."""
    pending = [pending_name(file, "*") for file in POLICY_FILES.values()]
    store.remove_temporaries(run_dir, (*TRAINING_FILES, *pending))


def _start(session: Session) -> None:
    run_dir, spec = session.run_dir, session.spec
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(run_dir)
    _settle_pending(run_dir, committed=0)  # no epoch is committed: every pending one goes
    # from a run killed in epoch 1, or whose last.pt was moved aside to start over
    for stale in (store.METRICS_FILE, store.BATCHES_FILE, store.CHECKPOINTS_FILE,
                  *POLICY_FILES.values()):
        (run_dir / stale).unlink(missing_ok=True)
    store.atomic_write_json(run_dir / store.SPEC_FILE, spec.model_dump(mode="json"))
    session.provenance = {
        "digest": spec.digest(), "seed": spec.seed, "status": "running",
        "started": store.now_iso(), "resumed": [], "data": store.data_location(spec.data),
        **store.git_state(), **store.environment(session.device),
    }
    store.atomic_write_json(run_dir / store.PROVENANCE_FILE, session.provenance)


def _restore(session: Session) -> None:
    """Load last.pt (weights_only) and rewrite the logs to the epoch it holds.

    Weights, optimizer and CPU random streams move between devices as they are; the
    device's random streams (attack starts, healing noise) only restore on the device type
    that saved them, and are otherwise re-seeded from (seed, epoch), recorded in provenance.
    """
    path = session.run_dir / store.LAST_FILE
    _remove_temporaries(session.run_dir)
    saved = store.read_last(path)
    if saved["digest"] != session.spec.digest():
        raise BadInput(f"{path} belongs to another spec (digest {saved['digest']}); "
                       "move the run folder away to start this run afresh")
    saved_on, reseeded = _load_resume_state(session, saved, path)
    _settle_pending(session.run_dir, session.state.epoch)
    _rewrite_logs(session, _resume_entry(session, saved_on, reseeded))


def _load_resume_state(session: Session, saved: dict, path: Path) -> tuple[str, list[str]]:
    """Weights, optimizer, AWP proxy, loop state and random streams from last.pt; returns the
    device type its streams were saved on and the streams re-seeded. store.read_last checks
    only the top-level keys: what does not fit this run is a `store.CorruptFile` (exit 2)."""
    try:
        session.net.load_state_dict(saved["model"])
        _load_optimizer(session.optimizer, saved["optimizer"])
        if session.awp is not None:
            session.awp.proxy.load_state_dict(saved["awp_proxy"])
        session.state = RunState.from_dict(saved["state"])
        saved_on = rngstate.tagged(saved["rng"]["attack"])["device"]
        return saved_on, rngstate.restore(session, saved["rng"], session.state.epoch)
    except (BadInput, torch.cuda.OutOfMemoryError):
        raise  # already one line (a stream of this device that will not restore), or no fault
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        raise store.CorruptFile(f"{path}: not a resume state of this run ({_problem(err)}); "
                                f"it was cut or edited outside trades-repro: "
                                f"{store.LAST_ASIDE}") from None


def _problem(err: Exception) -> str:
    """One short line: a record's first bad field, else the error's own words."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"an epoch record's {'.'.join(map(str, first['loc']))}: {first['msg']}"
    words = " ".join(f"{type(err).__name__}: {err}".split())
    return words if len(words) <= 240 else words[:239] + "…"


def _rewrite_logs(session: Session, resumed: dict) -> None:
    """Logs back to the restored epoch; spec.json and provenance.json note this resume."""
    run_dir, epoch = session.run_dir, session.state.epoch
    store.atomic_write_jsonl(run_dir / store.METRICS_FILE, session.state.records)
    store.truncate_jsonl(run_dir / store.BATCHES_FILE, lambda r: r["epoch"] <= epoch)
    # data.root is outside the digest, so the data may live elsewhere now: spec.json follows
    store.atomic_write_json(run_dir / store.SPEC_FILE, session.spec.model_dump(mode="json"))
    session.provenance = store.read_json(run_dir / store.PROVENANCE_FILE)
    session.provenance["status"] = "running"
    session.provenance.setdefault("resumed", []).append(resumed)
    store.atomic_write_json(run_dir / store.PROVENANCE_FILE, session.provenance)


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load the optimizer state but keep this device's kernel choice (fused on CUDA, foreach
    elsewhere): a state saved on a GPU names `fused`, which is not this device's kernel."""
    kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, kernel in zip(optimizer.param_groups, kernels, strict=True):
        group.update(kernel)
    _check_buffer_shapes(optimizer)


def _check_buffer_shapes(optimizer: torch.optim.Optimizer) -> None:
    """torch checks a loaded state's group sizes, not its buffers' shapes: a wrong one would
    fail only at the first step (a crash, exit 4, instead of a corrupt file, exit 2)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() and value.shape != param.shape:
                raise ValueError(f"optimizer {key} of shape {tuple(value.shape)} for a "
                                 f"parameter of shape {tuple(param.shape)}")


def _resume_entry(session: Session, saved_device: str, reseeded: list[str]) -> dict:
    entry = {"at": store.now_iso(), "epoch": session.state.epoch, "device": str(session.device),
             "data": store.data_location(session.spec.data)}
    if reseeded:
        entry["rng_reseeded"] = {"streams": reseeded, "saved_on": saved_device,
                                 "rule": rngstate.RESEED_RULE}
    return entry
