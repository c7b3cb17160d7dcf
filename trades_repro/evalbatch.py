"""How many images an attack processes at once: chosen from the image size and free memory.

A fixed batch either wastes a large GPU or does not fit a small one: PGD on 64×64
TinyImageNet at batch 512 holds ≈ 9 GiB of ResNet-18 activations, an out-of-memory crash on
a 12 GB card. So on CUDA the batch is the largest power of two whose estimated footprint fits
in half the free memory, between `MIN_BATCH` and `MAX_BATCH`; on a CPU it is the fixed
`CPU_BATCH` (`CPU_VALIDATION_BATCH` for the validation of every epoch). `--eval-batch`
overrides all three, and running out of memory anyway becomes one line that names that
option (exit 2).

PGD-10's result does not depend on the batch (its random starts are drawn for the whole set
at once, see `attacks.pgd`'s ``noise``, and validation sums its per-example values once), up
to how a kernel rounds an example at another batch (≈ 1e-8 relative in FOSC); AutoAttack's
does slightly (it draws its restarts per batch), which is why the evaluation key records the
batch that was used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from trades_repro.errors import BadInput

# ResNet-18 PGD (forward + input-gradient backward), fp32: ≈ 9 GiB at batch 512 on 64×64
# inputs (measured), i.e. ≈ 4.5 KiB per input pixel; smaller models need less, so this bound
# is safe for every architecture we build.
BYTES_PER_PIXEL = 9 * 2**30 / (512 * 64 * 64)
MIN_BATCH, MAX_BATCH = 16, 2048
CPU_BATCH = 500  # the historical default: evaluation keys written on CPUs stay the same
# Validation's result does not depend on its batch, so on a CPU it runs at the batch that is
# fastest there: PGD-10 with FOSC on Fashion-MNIST's small CNN took 2.2x as long per image at
# batch 512 as at 128, and digits' 1.1x (benchmarks/bench_monitor.py; 2-core AMD EPYC).
CPU_VALIDATION_BATCH = 128
MEMORY_SHARE = 0.5  # the rest is for the model, the optimiser (training) and fragmentation


def eval_batch_size(image_shape: Sequence[int], device: torch.device | str,
                    requested: int | None = None) -> int:
    """`requested` if given, else the CPU default or the largest power of two that fits."""
    if requested is not None:
        return checked(requested)
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    return fitting_batch(free, image_shape)


def validation_batch_size(image_shape: Sequence[int], device: torch.device | str,
                          requested: int | None = None) -> int:
    """Like `eval_batch_size`, with `CPU_VALIDATION_BATCH` on a CPU: no key records it."""
    if requested is None and torch.device(device).type != "cuda":
        return CPU_VALIDATION_BATCH
    return eval_batch_size(image_shape, device, requested)


def checked(requested: int) -> int:
    """A batch size the user asked for (`--eval-batch`), refused below 1 as bad input."""
    if requested < 1:
        raise BadInput(f"--eval-batch {requested}: must be at least 1")
    return int(requested)


def fitting_batch(free_bytes: int, image_shape: Sequence[int]) -> int:
    """The largest power of two in [MIN_BATCH, MAX_BATCH] whose estimate fits the budget."""
    pixels = 1
    for d in image_shape[-2:]:
        pixels *= int(d)
    fits = int(free_bytes * MEMORY_SHARE / (BYTES_PER_PIXEL * pixels))
    size = MIN_BATCH
    while size * 2 <= min(fits, MAX_BATCH):
        size *= 2
    return size


@contextmanager
def out_of_memory_hint(batch_size: int) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into one line naming ``--eval-batch``."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        smaller = max(1, batch_size // 2)
        raise BadInput(f"out of GPU memory at evaluation batch {batch_size}: pass "
                       f"--eval-batch {smaller} (or smaller)") from None


__all__ = ["CPU_BATCH", "CPU_VALIDATION_BATCH", "eval_batch_size", "fitting_batch",
           "out_of_memory_hint", "validation_batch_size"]
