"""A run's random streams in `last.pt`: saved with their device type, restored, or re-seeded.

A generator state is bytes whose layout belongs to one device type, so a resume on another
device type (a run started on a GPU node, resumed where CUDA is absent) cannot restore the
attack, healing and global CUDA streams: they restart from `reseed_value(seed, epoch,
stream)`, and `engine` records which in `provenance.json`. The CPU streams (torch, Python,
numpy, the data order) restore everywhere.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from trades_repro import store
from trades_repro.errors import BadInput

if TYPE_CHECKING:
    from trades_repro.engine import Session

# A generator state is bytes whose layout belongs to one device type: the CPU's Mersenne
# Twister (5,056 bytes) or CUDA's Philox seed + offset (16 bytes). last.pt tags each state
# with its device type; untagged states (older last.pt files) are told apart by size.
CPU_STATE_BYTES = torch.Generator().get_state().numel()
RESEED_RULE = "manual_seed(sha256('<seed>/<epoch>/<stream>')[:8] >> 1)"
DEVICE_STREAMS = ("attack", "healing", "cuda")  # `cuda`: torch's global CUDA generator


def reseed_value(seed: int, epoch: int, stream: str) -> int:
    """The seed a device stream restarts from when its saved state cannot be restored."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63: any generator accepts it


def device_type(session: Session) -> str:
    """The device type whose generator states this session can restore."""
    return session.device.type


def tagged(saved) -> dict | None:
    """{"device": type, "state": bytes} from a tagged state or an untagged one (old files)."""
    if saved is None or isinstance(saved, dict):
        return saved
    if isinstance(saved, list):  # old last.pt: torch.cuda.get_rng_state_all(), one per GPU
        return {"device": "cuda", "state": saved[0]} if saved else None
    return {"device": "cpu" if saved.numel() == CPU_STATE_BYTES else "cuda", "state": saved}


def saved(session: Session) -> dict:
    """Every random stream of the session, each device stream tagged with its device type."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    here = device_type(session)
    cuda = torch.cuda.get_rng_state(session.device) if session.device.type == "cuda" else None
    return {
        "torch": torch.get_rng_state(),
        # only the run's own GPU: saving every visible GPU breaks resumes with fewer of them
        "cuda": {"device": "cuda", "state": cuda} if cuda is not None else None,
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "data": session.data_gen.get_state(),
        "attack": {"device": here, "state": session.attack_gen.get_state()},
        "healing": {"device": here, "state": session.healing_gen.get_state()},
    }


def restore(session: Session, rng: dict, epoch: int) -> list[str]:
    """Restore every random stream; returns the device streams that had to be re-seeded."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    session.data_gen.set_state(rng["data"])  # CPU generator on every device
    here, reseeded = device_type(session), []
    for stream in DEVICE_STREAMS:
        saved = tagged(rng.get(stream))
        if stream == "cuda" and session.device.type != "cuda":
            continue  # the global CUDA generator is not used off the GPU
        if saved is not None and saved["device"] == here:
            _set_stream(session, stream, saved["state"])
        else:
            _seed_stream(session, stream, reseed_value(session.spec.seed, epoch, stream))
            reseeded.append(stream)
    return reseeded


def _set_stream(session: Session, stream: str, state: Tensor) -> None:
    try:
        if stream == "cuda":
            torch.cuda.set_rng_state(state, session.device)
        else:
            getattr(session, f"{stream}_gen").set_state(state)
    except (RuntimeError, TypeError) as err:
        raise BadInput(f"{session.run_dir / store.LAST_FILE}: the {stream} random state cannot "
                       f"be restored ({str(err).splitlines()[0]}); delete last.pt to restart "
                       "the run from epoch 1") from None


def _seed_stream(session: Session, stream: str, value: int) -> None:
    if stream == "cuda":
        torch.cuda.manual_seed(value)
    else:
        getattr(session, f"{stream}_gen").manual_seed(value)
