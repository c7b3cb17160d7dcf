"""Pre-flight checks, before any attack: does this model fit this dataset, and return logits?

A model built for other images (3×32×32 on 1×28×28) or another class count, a model that
returns probabilities, or one at chance accuracy would give attack numbers that mean
nothing; each is a `PreflightError` (bad input, exit 2) with one line saying what to fix. A
model whose two forwards of one batch differ is randomized: evaluation goes on, with
AutoAttack's ``rand`` version (EOT) for its gradient attacks.

AutoAttack's own checks (pyautoattack ``checks.py``: randomized, probability output,
dynamic, zero gradients, class count) run here once per model, whatever the attack preset;
pyautoattack otherwise runs them only inside its white-box evaluation, so ``square-only``
never saw the zero-gradient check.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import Tensor, nn

from trades_repro.errors import BadInput
from trades_repro.records import Flag, Preflight

BATCH = 500  # images in the pre-flight batch (all of them when fewer)
CHANCE_ALPHA = 0.05  # one-sided binomial test: clean accuracy above 1/K at this level
AUTOATTACK_LOGGER = "auto-attack"  # the logger pyautoattack's checks write warnings to
# pyautoattack's check messages (checks.py) -> short codes; unknown warnings keep "other"
CHECK_CODES = (("randomized defense", "randomized"), ("probability distribution",
               "probability_output"), ("zero gradient", "zero_gradients"),
               ("Square Attack has decreased", "square_beats_gradient_attacks"),
               ("dynamic defense", "dynamic"), ("classes", "n_classes"))
_AA_NAMES = {"apgd-t": "apgd-t", "fab-t": "fab-t", "autoattack": "apgd-t"}


class PreflightError(BadInput):
    """The model does not fit the dataset or does not return logits; one line says why."""


def preflight(model: nn.Module, x: Tensor, y: Tensor, n_classes: int | None, *, device: str,
              attacks: tuple[str, ...] = ()) -> Preflight:
    """Check `model` on the first `BATCH` images of `x` ``[N, C, H, W]`` (labels `y`).

    Raises `PreflightError` when the forward fails, the output is not ``[B, n_classes]``
    finite logits, the rows are probabilities, or clean accuracy is not above chance.
    Returns the numbers and pyautoattack's check flags (attack ``"preflight"``).
    """
    started = time.perf_counter()
    xb, yb = x[:BATCH].to(device), y[:BATCH].to(device)
    first = _forward(model, xb)
    n_classes = n_classes or first.shape[-1]
    _check_shape(first, len(xb), n_classes)
    _check_logits(first)
    randomized = not torch.allclose(first, _forward(model, xb), rtol=1e-4, atol=1e-6)
    hits = int((first.argmax(1) == yb).sum())
    _check_chance(hits, len(yb), n_classes)
    flags = autoattack_checks(model, xb, yb, n_classes, attacks)
    return Preflight(n_classes=n_classes, batch=len(yb), clean_correct=hits,
                     randomized=randomized, checks=flags,
                     seconds=round(time.perf_counter() - started, 3))


def _forward(model: nn.Module, xb: Tensor) -> Tensor:
    shape = list(xb.shape[1:])
    try:
        with torch.no_grad():
            out = model(xb)
    except Exception as err:  # noqa: BLE001 - any failure here is the model not fitting
        raise PreflightError(f"the model fails on this dataset's images (shape {shape}, "
                             f"pixels in [0, 1]): {type(err).__name__}: {_first(err)}") from None
    if not isinstance(out, Tensor):
        raise PreflightError(f"the model returns {type(out).__name__}, not a tensor of logits")
    return out.float()


def _check_shape(out: Tensor, batch: int, n_classes: int) -> None:
    if out.dim() != 2 or out.shape[0] != batch:
        raise PreflightError(f"the model returns shape {list(out.shape)} for {batch} images; "
                             f"expected [{batch}, {n_classes}] logits")
    if out.shape[1] != n_classes:
        raise PreflightError(f"the model outputs {out.shape[1]} classes; the dataset has "
                             f"{n_classes}")
    if not torch.isfinite(out).all():
        raise PreflightError("the model returns non-finite outputs (NaN or inf) on clean images")


def _check_logits(out: Tensor) -> None:
    """Probabilities make CE gradients vanish near confident points: a self-made mask."""
    if (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(len(out)).to(out), atol=1e-4):
        raise PreflightError("the model outputs probabilities (rows non-negative, summing to 1), "
                             "not logits: remove its final softmax and return the scores before "
                             "it")


def _check_chance(hits: int, n: int, n_classes: int) -> None:
    p = binomtest(hits, n, 1 / n_classes, alternative="greater").pvalue
    if p >= CHANCE_ALPHA:
        raise PreflightError(f"clean accuracy {hits}/{n} is not above chance (1/{n_classes}; "
                             f"binomial p = {p:.2g}): wrong dataset, preprocessing or weights?")


def autoattack_checks(model: nn.Module, xb: Tensor, yb: Tensor, n_classes: int,
                      attacks: tuple[str, ...]) -> list[Flag]:
    """pyautoattack's checks.py on one batch, its warnings returned as flags."""
    from pyautoattack import checks  # lazy: only evaluation needs it

    logger = logging.getLogger(AUTOATTACK_LOGGER)
    targets = min(9, n_classes - 1)  # as evaluate._fit_targets
    aa_attacks = sorted({_AA_NAMES[a] for a in attacks if a in _AA_NAMES})
    with capture_checks("preflight") as flags:
        checks.check_randomized(model, xb, yb, logger=logger)
        checks.check_range_output(model, xb, logger=logger)
        checks.funcs.update(dict.fromkeys(checks.funcs, 0))  # its counters never reset
        checks.check_dynamic(model, xb, False, logger=logger)
        checks.check_zero_gradients(input_grad(model, xb, yb), logger=logger)
        checks.check_n_classes(n_classes, aa_attacks, targets, targets, logger=logger)
    return unique(flags)


def input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓ CE(f(x), y) per example, in eval mode (what APGD's zero-gradient check reads)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


@contextmanager
def capture_checks(attack: str) -> Iterator[list[Flag]]:
    """Collect pyautoattack's check warnings (logged, or `warnings.warn`) as flags.

    Its logger stops propagating meanwhile, so nothing reaches stderr; no warning escapes
    (the test suite turns warnings into errors).
    """
    flags: list[Flag] = []
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    handler = _FlagHandler(attack, flags)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield flags
        flags.extend(flag(attack, str(w.message)) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class _FlagHandler(logging.Handler):
    def __init__(self, attack: str, flags: list[Flag]) -> None:
        super().__init__(level=logging.WARNING)
        self.attack, self.flags = attack, flags

    def emit(self, record: logging.LogRecord) -> None:
        self.flags.append(flag(self.attack, record.getMessage()))


def flag(attack: str, message: str) -> Flag:
    code = next((c for needle, c in CHECK_CODES if needle in message), "other")
    return Flag(attack=attack, check=code, message=message)


def unique(flags: list[Flag]) -> list[Flag]:
    return list({(f.check, f.message): f for f in flags}.values())


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
