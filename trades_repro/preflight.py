"""Pre-flight checks, before any attack: does this model fit this dataset, and return logits?

A model built for other images (3×32×32 on 1×28×28) or another class count, a model that
returns probabilities, or one at chance accuracy would give attack numbers that mean
nothing; each is a `PreflightError` (bad input, exit 2) with one line saying what to fix. A
model whose two forwards of one batch differ is randomized: evaluation goes on, with
AutoAttack's ``rand`` version (EOT) for its gradient attacks.

AutoAttack's own checks (pyautoattack ``checks.py``: randomized, probability output,
dynamic, zero gradients, class count) run here once per model, whatever the attack preset;
pyautoattack otherwise runs them only inside its white-box evaluation, so ``square-only``
never saw the zero-gradient check. Our own ``nonfinite_gradients`` flag joins them: its
zero-gradient check compares ``== 0``, which a NaN gradient never is.

A model that calls ``sys.exit`` is a `CheckpointError` (exit 2), as a factory doing so is:
``SystemExit`` is no ``Exception``, and would otherwise end the command with its code.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from torch import Tensor, nn

from trades_repro import numerics
from trades_repro.checkpoints import CheckpointError
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
NONFINITE_GRADIENTS = "nonfinite_gradients"  # our own check: pyautoattack has none to map
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object addresses in a repr: new every process


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
    with no_exit("its forward"):  # outside the try: SystemExit is no Exception
        try:
            with torch.no_grad():
                out = model(xb)
        except Exception as err:  # noqa: BLE001 - any failure here is the model not fitting
            raise PreflightError(f"the model fails on this dataset's images (shape {shape}, "
                                 f"pixels in [0, 1]): {type(err).__name__}: {_first(err)}"
                                 ) from None
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
    if p < CHANCE_ALPHA:
        return
    # Too few images: even n/n correct would not be significant, so the failure is the sample
    # size, not the weights. Still bad input (exit 2), not a skipped check: this test is the
    # only guard against a wrong dataset or preprocessing, and a model let through unchecked
    # would carry a verdict that says nothing of it.
    least = _least_decidable(n_classes)
    if least is not None and n < least:
        raise PreflightError(f"--n-examples {n} is too few for the pre-flight check that clean "
                             f"accuracy is above chance (1/{n_classes}): even {n}/{n} correct "
                             f"is not significant at {CHANCE_ALPHA}; use at least {least}")
    raise PreflightError(f"clean accuracy {hits}/{n} is not above chance (1/{n_classes}; "
                         f"binomial p = {p:.2g}): wrong dataset, preprocessing or weights?")


def _least_decidable(n_classes: int) -> int | None:
    """The fewest images whose all-correct result passes the chance test (None: none does,
    as with one class); at most `BATCH`, the pre-flight's own batch."""
    return next((n for n in range(1, BATCH + 1) if binomtest(
        n, n, 1 / n_classes, alternative="greater").pvalue < CHANCE_ALPHA), None)


def autoattack_checks(model: nn.Module, xb: Tensor, yb: Tensor, n_classes: int,
                      attacks: tuple[str, ...]) -> list[Flag]:
    """pyautoattack's checks.py on one batch, its warnings returned as flags."""
    from pyautoattack import checks  # lazy: only evaluation needs it

    logger = logging.getLogger(AUTOATTACK_LOGGER)
    targets = min(9, n_classes - 1)  # as evaluate._fit_targets
    aa_attacks = sorted({_AA_NAMES[a] for a in attacks if a in _AA_NAMES})
    with no_exit("the pre-flight checks"), capture_checks("preflight") as flags:
        checks.check_randomized(model, xb, yb, logger=logger)
        checks.check_range_output(model, xb, logger=logger)
        checks.funcs.update(dict.fromkeys(checks.funcs, 0))  # its counters never reset
        checks.check_dynamic(model, xb, False, logger=logger)
        grad = input_grad(model, xb, yb)
        checks.check_zero_gradients(grad, logger=logger)
        checks.check_n_classes(n_classes, aa_attacks, targets, targets, logger=logger)
    return unique(flags + _nonfinite(grad))


def _nonfinite(grad: Tensor) -> list[Flag]:
    """A NaN or inf input gradient (sqrt at 0, a where's unused branch): PGD steps and FOSC
    become NaN, and nothing else fires (pyautoattack's check compares with 0)."""
    bad = int((~torch.isfinite(grad)).sum())
    if not bad:
        return []
    return [Flag(attack="preflight", check=NONFINITE_GRADIENTS,
                 message=f"{bad} of {grad.numel()} input-gradient entries are non-finite (NaN "
                 "or inf): gradient attacks and FOSC are unreliable on this model")]


def input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓ CE(f(x), y) per example, in eval mode (what APGD's zero-gradient check reads)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def fingerprint(model: nn.Module, x: Tensor, y: Tensor, n_classes: int | None, *,
                device: str, source: bytes = b"") -> str:
    """Hex SHA-256 of the model as built, beyond its weights: `source` (its factory's file),
    its repr, and its logits and input gradient on the pre-flight batch of `x`, `y`.

    A factory edited under the same name (``net(round(x))`` -> ``net(x)``) is another model
    with the same weights; clean digits survive that rounding, so the gradient is hashed
    too. Torch's RNG is seeded meanwhile, so a randomized model hashes alike in every process;
    bit-exact, so another machine, thread count or library may hash differently: a mismatch
    only means the evaluation is recomputed. Fails as `preflight` does on a model that does
    not fit.
    """
    xb, yb = x[:BATCH].to(device), y[:BATCH].to(device)
    digest = hashlib.sha256(source)
    digest.update(_ADDRESS.sub("", repr(model)).encode())
    with numerics.evaluation(), torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(0)
        logits = _forward(model, xb)
        _check_shape(logits, len(xb), n_classes or logits.shape[-1])
        with no_exit("its gradient"):
            grad = input_grad(model, xb, yb)
    for tensor in (logits, grad):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _rng_devices(device: str) -> list[int]:
    """The CUDA device whose RNG `fork_rng` restores (torch warns when left to guess)."""
    if device == "cpu":
        return []
    index = torch.device(device).index
    return [index if index is not None else torch.cuda.current_device()]


@contextmanager
def no_exit(step: str) -> Iterator[None]:
    """User model code calling ``sys.exit``: its failure (exit 2), as in `call_factory`;
    ``sys.exit(0)`` must not pass for "not overestimated"."""
    try:
        yield
    except SystemExit as err:
        raise CheckpointError(f"the model raised SystemExit ({_first(err)}) in {step}: it must "
                              "return logits, not end the process") from None


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



# pyautoattack's verbose lines (autoattack.py): one per batch of each attack, one per stage
_BATCH_DONE = re.compile(r"^(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed")
_STAGE_DONE = re.compile(r"^robust accuracy after (\S+): ([\d.]+)%")


@contextmanager
def autoattack_progress(step: str, report: Callable[[str], None]) -> Iterator[None]:
    """pyautoattack's own progress (its verbose debug log: each batch of each attack, and in
    the cascade each attack's end) passed to `report`, a line each with the seconds since
    the step began. AutoAttack on 10,000 CIFAR images runs for most of an hour on one GPU,
    and was silent until its end."""
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    handler = _ProgressHandler(step, report)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _ProgressHandler(logging.Handler):
    def __init__(self, step: str, report: Callable[[str], None]) -> None:
        super().__init__(level=logging.DEBUG)
        self.step, self.report, self.started = step, report, time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        line, seconds = record.getMessage(), time.perf_counter() - self.started
        if (found := _BATCH_DONE.match(line)) and found[3] != "1":  # one batch: the end
            attack, done, batches, broken, of = found.groups()
            stage = "" if attack == self.step else f"{attack} "  # the cascade names its stage
            self.report(f"{self.step}: {stage}batch {done}/{batches} done, {broken} of {of} "
                        f"broken ({seconds:.0f} s)")
        elif self.step == "autoattack" and (found := _STAGE_DONE.match(line)):
            self.report(f"autoattack: {float(found[2]) / 100:.4f} left after "
                        f"{found[1].lower()} ({seconds:.0f} s)")


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
