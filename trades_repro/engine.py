"""A run's live objects and its crash-safe state: build, resume, commit an epoch, finish.

`last.pt` is the commit point of an epoch. The order of writes after epoch e is: policy
checkpoints → `batches.jsonl` (e's steps appended) → `last.pt` → `metrics.jsonl`. A kill
before `last.pt` redoes epoch e from `last.pt` of e − 1 (deterministically, so rewritten
checkpoints are the same) after cutting e's lines from `batches.jsonl`; a kill after it
finds `metrics.jsonl` rewritten from the records held in `last.pt`.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from trades_repro import data as datalib
from trades_repro import store
from trades_repro.awp import TradesAWP
from trades_repro.models import build_model, dataset_stats
from trades_repro.policies import POLICIES, PolicyState, select_checkpoints
from trades_repro.spec import ExperimentSpec, OptimSpec

POLICY_FILES = {"best_pgd10": store.BEST_FILE, "best_pgd10_fosc_ok": store.BEST_FOSC_OK_FILE}


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
        return cls(raw["epoch"], raw["global_step"], raw["noise_left"],
                   PolicyState(**raw["policies"]),
                   [store.EpochRecord.model_validate(r) for r in raw["records"]])


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
        raise TrainingError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


@dataclass
class Session:
    spec: ExperimentSpec
    run_dir: Path
    device: torch.device
    splits: datalib.Splits
    net: nn.Module  # the plain module: its state_dict is what checkpoints hold
    model: nn.Module  # `net`, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    awp: TradesAWP | None
    data_gen: torch.Generator  # batch order and augmentation (CPU)
    attack_gen: torch.Generator  # inner-max random starts (on the device)
    healing_gen: torch.Generator  # Algorithm 1 noise (on the device)
    state: RunState
    provenance: dict
    pending_batches: list[store.BatchRecord] = field(default_factory=list)

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
        """Checkpoints and batch log, then last.pt (the commit point), then metrics.jsonl."""
        self.state.epoch = record.epoch
        for policy in POLICIES:
            if getattr(record, policy):
                store.atomic_save_safetensors(self.run_dir / POLICY_FILES[policy],
                                              self.net.state_dict())
        if self.pending_batches:
            store.append_jsonl(self.run_dir / store.BATCHES_FILE, self.pending_batches)
            self.pending_batches = []
        store.atomic_torch_save(self.run_dir / store.LAST_FILE, self._resume_state())
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
            "rng": _rng_state(self),
            "state": self.state.to_dict(),
        }


def build_session(spec: ExperimentSpec, run_dir: Path) -> Session:
    """Everything a run needs, fresh or restored from `last.pt`; data is read first."""
    device = resolve_device(spec.device)
    splits = datalib.load_splits(spec.data, spec.seed)
    splits = datalib.Splits(*(_to(s, device) for s in (splits.train, splits.val, splits.test)),
                            splits.num_classes, splits.val_source, splits.shape)
    _backend_flags(spec, device)
    torch.manual_seed(spec.seed)  # model initialisation
    net = _build(spec, splits).to(device)
    if spec.performance.channels_last:
        net = net.to(memory_format=torch.channels_last)
    session = Session(
        spec, run_dir, device, splits, net,
        torch.compile(net) if spec.performance.compile else net,
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


def _backend_flags(spec: ExperimentSpec, device: torch.device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = spec.performance.tf32
    torch.backends.cudnn.allow_tf32 = spec.performance.tf32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = spec.performance.cudnn_benchmark


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


def _start(session: Session) -> None:
    run_dir, spec = session.run_dir, session.spec
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (store.METRICS_FILE, store.BATCHES_FILE):  # from a run killed in epoch 1
        (run_dir / stale).unlink(missing_ok=True)
    store.atomic_write_json(run_dir / store.SPEC_FILE, spec.model_dump(mode="json"))
    session.provenance = {
        "digest": spec.digest(), "seed": spec.seed, "status": "running",
        "started": store.now_iso(), "resumed": [],
        **store.git_state(), **store.environment(session.device),
    }
    store.atomic_write_json(run_dir / store.PROVENANCE_FILE, session.provenance)


def _restore(session: Session) -> None:
    """Load last.pt (weights_only) and rewrite the logs to the epoch it holds."""
    saved = torch.load(session.run_dir / store.LAST_FILE, map_location="cpu", weights_only=True)
    if saved["digest"] != session.spec.digest():
        raise RuntimeError(f"{session.run_dir / store.LAST_FILE} belongs to another spec")
    session.net.load_state_dict(saved["model"])
    session.optimizer.load_state_dict(saved["optimizer"])
    if session.awp is not None:
        session.awp.proxy.load_state_dict(saved["awp_proxy"])
    _set_rng_state(session, saved["rng"])
    session.state = RunState.from_dict(saved["state"])
    epoch = session.state.epoch
    store.atomic_write_jsonl(session.run_dir / store.METRICS_FILE, session.state.records)
    store.truncate_jsonl(session.run_dir / store.BATCHES_FILE, lambda r: r["epoch"] <= epoch)
    session.provenance = store.read_json(session.run_dir / store.PROVENANCE_FILE)
    session.provenance["status"] = "running"
    session.provenance.setdefault("resumed", []).append({"at": store.now_iso(), "epoch": epoch})
    store.atomic_write_json(session.run_dir / store.PROVENANCE_FILE, session.provenance)


def _rng_state(session: Session) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "data": session.data_gen.get_state(),
        "attack": session.attack_gen.get_state(),
        "healing": session.healing_gen.get_state(),
    }


def _set_rng_state(session: Session, rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    session.data_gen.set_state(rng["data"])
    session.attack_gen.set_state(rng["attack"])
    session.healing_gen.set_state(rng["healing"])
