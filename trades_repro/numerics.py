"""Backend numerics: the global flags that pick TF32 and cuDNN kernels, set and restored.

PyTorch's defaults differ between matmuls (TF32 off) and cuDNN convolutions (TF32 *on*), so
on an Ampere+ GPU an unpinned evaluation of a ResNet runs its convolutions in TF32 (10-bit
mantissa) while training ran them in fp32: the same checkpoint then gives a PGD-10 in
`eval.json` that differs from the one in `metrics.jsonl`. Every numerical entry point —
training, per-epoch validation, `evaluate`, `diagnose` — runs inside one of these contexts,
and records the flags it ran under.

* `evaluation()`: fp32 everywhere (TF32 off), cuDNN deterministic and not autotuned. The
  deterministic kernels cost little at evaluation, where no weight gradients are taken.
* `training(performance)`: the spec's own choices (`tf32`, `cudnn_benchmark`), and cuDNN's
  default (fastest, not bitwise deterministic) backward kernels, as official TRADES runs.

On a CPU the flags change nothing numerically; they are still set and recorded, so a
record says what a GPU would have used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def current() -> dict[str, bool]:
    """The four flags as they stand now (for provenance records)."""
    return {
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def _apply(flags: dict[str, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["tf32_matmul"]
    torch.backends.cudnn.allow_tf32 = flags["tf32_cudnn"]
    torch.backends.cudnn.deterministic = flags["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]


@contextmanager
def pinned(*, tf32: bool = False, cudnn_benchmark: bool = False,
           deterministic: bool = True) -> Iterator[dict[str, bool]]:
    """Set the flags for the block and restore the previous ones on exit (also on error).

    Yields the flags in force inside the block, for the caller to record.
    """
    before = current()
    inside = {"tf32_matmul": tf32, "tf32_cudnn": tf32,
              # autotuning picks kernels by timing, so it and determinism exclude each other
              "cudnn_deterministic": deterministic and not cudnn_benchmark,
              "cudnn_benchmark": cudnn_benchmark}
    _apply(inside)
    try:
        yield dict(inside)
    finally:
        _apply(before)


def evaluation(*, tf32: bool = False) -> Any:
    """The flags of every evaluation: fp32 (TF32 off unless asked), deterministic cuDNN."""
    return pinned(tf32=tf32, cudnn_benchmark=False, deterministic=True)


def training(performance: Any) -> Any:
    """The flags a run trains under: the spec's `performance.tf32` and `cudnn_benchmark`."""
    return pinned(tf32=performance.tf32, cudnn_benchmark=performance.cudnn_benchmark,
                  deterministic=False)


__all__ = ["current", "evaluation", "pinned", "training"]
