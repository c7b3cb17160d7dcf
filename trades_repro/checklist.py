"""The gradient-masking checklist (Athalye et al. 2018; Carlini et al. 2019; Pintor et al. 2022).

Each item compares two ways of attacking the same examples and says ``pass`` or ``warn``
with its numbers and its cost in seconds:

* ``pgd100x5``: PGD-10 vs PGD-100 with 5 restarts (each on the images still robust);
* ``margin_loss``: APGD on CE vs APGD on the DLR margin loss (pyautoattack, 100 iterations);
* ``fgsm``: FGSM (one step of ε) vs PGD-10 — one step beating ten is a red flag;
* ``eps_sweep``: PGD-10 accuracy as ε grows (×½ … ×16, capped at 1) must fall towards 0;
* ``noise``: uniform noise in the ε-box (10 draws, one forward) must not beat PGD-10;
* ``square_only``: images only Square breaks (b of the paired rule), counted.

Comparisons are paired and count an image as robust only if it is also right clean; "A beats
B" means A leaves fewer images robust with the exact McNemar p < 0.05 (scipy). Fig. 1's
landscape is in the evaluation record already.

Like `evaluate`, the checklist runs under the evaluation numerics (`numerics.evaluation()`:
fp32, TF32 off unless the settings' ``tf32`` asks, as its record's attacks ran; deterministic
cuDNN; autocast off) and in batches of the settings'
`batch_size` (`evalbatch`), a CUDA out-of-memory error becoming one line that names
``--eval-batch``: unbatched, PGD-100x5 on 1,000 CIFAR images was one batch of 5,000 (about
23 GB; 94 GB at TinyImageNet's 64x64). The PGD items draw their random starts once for the
whole set and slice them per batch, so their results do not depend on the batch;
pyautoattack's APGD (``margin_loss``) draws per batch, as AutoAttack does, and the settings'
key holds the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from trades_repro import numerics, store
from trades_repro.attacks import pgd
from trades_repro.evalbatch import out_of_memory_hint
from trades_repro.preflight import capture_checks
from trades_repro.records import ChecklistRow, CheckpointEval, EvalSettings
from trades_repro.verdict import discordant, mcnemar_exact

ALPHA = 0.05  # McNemar level for "one attack beats the other"
EPS_FACTORS = (0.5, 1, 2, 4, 8, 16)  # the sweep, in multiples of the threat model's ε
SWEEP_LIMIT = 0.10  # accuracy left at the largest ε that still counts as "towards 0"
SWEEP_SLACK = 0.02  # a rise in accuracy with ε above this is non-monotone (noise at n ~ 100)
RESTARTS, LONG_STEPS, NOISE_DRAWS = 5, 100, 10


def run_checklist(model: nn.Module, x: Tensor, y: Tensor, s: EvalSettings,
                  record: CheckpointEval | None = None, folder: Path | None = None,
                  report: Callable[[str], None] = lambda line: None) -> list[ChecklistRow]:
    """Every item on `x` ``[N, ...]``, `y` ``[N]`` under settings `s`; see the module doc."""
    model.float().eval()
    x, y = x.to(s.device), y.to(s.device)
    with (numerics.evaluation(tf32=s.tf32),
          torch.autocast(torch.device(s.device).type, enabled=False),
          out_of_memory_hint(s.batch_size)):
        return _items(model, x, y, s, record, folder, report)


def _items(model: nn.Module, x: Tensor, y: Tensor, s: EvalSettings,
           record: CheckpointEval | None, folder: Path | None,
           report: Callable[[str], None]) -> list[ChecklistRow]:
    clean = _predicted(model, x, s) == y
    base = _robust(model, _pgd(model, x, y, s, s.eps, s.steps), y, clean, s)
    items = [lambda: _restarts(model, x, y, s, clean, base),
             lambda: _margin_loss(model, x, y, s, clean),
             lambda: _fgsm(model, x, y, s, clean, base),
             lambda: _sweep(model, x, y, s, clean, folder, record, base),
             lambda: _noise(model, x, y, s, clean, base),
             lambda: _square_only(record)]
    rows = []
    for item in items:
        started = time.perf_counter()
        row = item()
        row.seconds = round(time.perf_counter() - started, 3)
        report(f"checklist {row.item}: {row.status} ({row.detail}; {row.seconds:.1f} s)")
        rows.append(row)
    return rows


def _pgd(model: nn.Module, x: Tensor, y: Tensor, s: EvalSettings, eps: float, steps: int,
         step_size: float | None = None, random_start: bool | None = None,
         noise: Tensor | None = None) -> Tensor:
    """PGD on `x` in batches of `s.batch_size`, its random starts drawn for all of `x` at
    once (as one call of `pgd` would draw them) and sliced: the batch changes no result.
    `noise` (shaped like `x`) gives the starts' U[0, 1) draws instead. Unless told, PGD-10's
    own: the settings' random start, and their α (scaled by eps/ε at another radius), so
    that at ε this is the record's PGD-10."""
    if random_start is None:
        random_start = s.random_start
    if step_size is not None:
        alpha = step_size
    else:  # ε·(α/ε) would differ from α in the last bit
        alpha = s.step_size if eps == s.eps else eps * s.step_size / s.eps
    if random_start and noise is None:
        noise = _starts(x.shape, s, x.dtype)
    elif not random_start:
        noise = None
    out = []
    for start in range(0, len(y), s.batch_size):
        part = slice(start, start + s.batch_size)
        out.append(pgd(model, x[part], y[part], eps=eps, step_size=alpha, steps=steps,
                       random_start=random_start,
                       noise=None if noise is None else noise[part]))
    return torch.cat(out)


def _predicted(model: nn.Module, x: Tensor, s: EvalSettings) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(part).argmax(1) for part in x.split(s.batch_size)])


def _robust(model: nn.Module, x_adv: Tensor, y: Tensor, clean: Tensor,
            s: EvalSettings) -> Tensor:
    return clean & (_predicted(model, x_adv, s) == y)


def _compare(item: str, stronger: str, weak: Tensor, strong: Tensor) -> ChecklistRow:
    """Paired: does `strong` leave significantly fewer images robust than `weak`?"""
    bits = ["".join("1" if v else "0" for v in t.tolist()) for t in (weak, strong)]
    b, c = discordant(*bits)  # b: robust to the weak attack only
    p = mcnemar_exact(b, c)
    beats = b > c and p < ALPHA
    numbers = {"weak_accuracy": weak.float().mean().item(),
               "strong_accuracy": strong.float().mean().item(), "b": b, "c": c, "p": p}
    status = "warn" if beats else "pass"
    verb = "beats" if beats else "does not beat"
    return ChecklistRow(item=item, status=status, numbers=numbers, seconds=0.0,
                        detail=f"{stronger} {verb} the other: {numbers['strong_accuracy']:.3f} vs "
                               f"{numbers['weak_accuracy']:.3f} (b={b}, c={c}, p={p:.2g})")


def _starts(shape: tuple[int, ...], s: EvalSettings, dtype: torch.dtype) -> Tensor:
    """PGD's random-start draws for a set of `shape`, from the settings' seed."""
    generator = torch.Generator(device=s.device).manual_seed(s.seed)
    return torch.rand(shape, generator=generator, dtype=dtype, device=s.device)


def _restarts(model, x, y, s, clean, base) -> ChecklistRow:
    """PGD-100 × 5 restarts; robust only if every restart fails. The starts are drawn for
    the 5N images of `x` repeated, at once, as one 5N batch would draw them; restart r
    attacks (in batches) only the images still robust, right clean and unbroken by the
    restarts before it: the others' flag is 0 whatever it would find."""
    n = len(y)
    noise = _starts((RESTARTS * n, *x.shape[1:]), s, x.dtype)
    robust = clean.clone()
    for restart in range(RESTARTS):
        todo = robust.nonzero().squeeze(1)
        if not len(todo):
            break
        x_adv = _pgd(model, x[todo], y[todo], s, s.eps, LONG_STEPS, step_size=s.eps / 40,
                     random_start=True,  # restarts: random by definition
                     noise=noise[restart * n + todo])  # 100 steps of ε/40: 2.5 box widths
        robust[todo] = _predicted(model, x_adv, s) == y[todo]
    return _compare("pgd100x5", "PGD-100x5", base, robust)


def _margin_loss(model, x, y, s, clean) -> ChecklistRow:
    from pyautoattack.autopgd_base import APGDAttack

    results = {}
    for loss in ("ce", "dlr"):
        attack = APGDAttack(model, n_iter=100, eps=s.eps, seed=s.seed, loss=loss,
                            device=s.device)
        with capture_checks(f"apgd-{loss}"):  # its zero-gradient warnings: recorded elsewhere
            x_adv = torch.cat([attack.perturb(xb, yb) for xb, yb in
                               zip(x.split(s.batch_size), y.split(s.batch_size), strict=True)])
        results[loss] = _robust(model, x_adv, y, clean, s)
    return _compare("margin_loss", "APGD-DLR (margin)", results["ce"], results["dlr"])


def _fgsm(model, x, y, s, clean, base) -> ChecklistRow:
    fgsm = _robust(model, _pgd(model, x, y, s, s.eps, 1, step_size=s.eps, random_start=False),
                   y, clean, s)
    return _compare("fgsm", "FGSM", base, fgsm)


def _noise(model, x, y, s, clean, base) -> ChecklistRow:
    generator = torch.Generator(device=s.device).manual_seed(s.seed)
    reps = (NOISE_DRAWS,) + (1,) * (x.dim() - 1)
    noise = (torch.rand(x.repeat(reps).shape, generator=generator, device=s.device) * 2 - 1)
    hits = _robust(model, (x.repeat(reps) + s.eps * noise).clamp(0, 1), y.repeat(NOISE_DRAWS),
                   clean.repeat(NOISE_DRAWS), s)
    return _compare("noise", "uniform noise", base, hits.view(NOISE_DRAWS, -1).all(0))


def _sweep(model, x, y, s, clean, folder, record, base) -> ChecklistRow:
    """PGD-10 at each radius, on the images right clean only (the others count 0 anyway),
    with the starts the whole set would draw; at ε itself, `base` is that very PGD-10."""
    radii = sorted({min(1.0, f * s.eps) for f in EPS_FACTORS})
    todo = clean.nonzero().squeeze(1)
    noise = _starts(x.shape, s, x.dtype)[todo]

    def robust(r: float) -> Tensor:
        if r == s.eps:
            return base
        hits = torch.zeros_like(clean)
        if not len(todo):
            return hits
        x_adv = _pgd(model, x[todo], y[todo], s, r, s.steps, noise=noise)
        hits[todo] = _predicted(model, x_adv, s) == y[todo]
        return hits

    counts = [int(robust(r).sum()) for r in radii]
    n = len(clean)
    accs = [k / n for k in counts]
    # judged on exact fractions: 5 of 50 is the 10 % limit, not float32's 0.10000000149
    rise = max((b - a for a, b in zip(counts, counts[1:], strict=False)), default=0)
    calm = Fraction(rise, n) <= Fraction(str(SWEEP_SLACK))
    ok = Fraction(counts[-1], n) <= Fraction(str(SWEEP_LIMIT)) and calm
    detail = (f"PGD-10 accuracy {accs[0]:.3f} at eps {radii[0]:.3g} -> {accs[-1]:.3f} at "
              f"{radii[-1]:.3g}" + ("" if calm else f"; rises by {rise / n:.3f}"))
    if folder is not None:
        stem = f"checklist_eps_{record.key[:8] if record else 'sweep'}"
        store.atomic_write_bytes(folder / f"{stem}.png", _sweep_png(radii, accs, s.eps))
        detail += f"; plot {stem}.png"
    return ChecklistRow(item="eps_sweep", status="pass" if ok else "warn", seconds=0.0,
                        numbers={"eps": radii, "accuracy": accs}, detail=detail)


def _square_only(record: CheckpointEval | None) -> ChecklistRow:
    pgd10 = record and record.attacks.get("pgd10")
    square = record and record.attacks.get("square")
    if not pgd10 or not square:
        return ChecklistRow(item="square_only", status="n/a", numbers={}, seconds=0.0,
                            detail="not counted: PGD-10 and Square were not both run")
    b, c = discordant(pgd10.robust, square.robust, record.clean and record.clean.robust)
    p = mcnemar_exact(b, c)
    status = "warn" if b > c and p < ALPHA else "pass"
    return ChecklistRow(item="square_only", status=status, seconds=0.0,
                        numbers={"b": b, "c": c, "n": pgd10.n_examples, "p": p},
                        detail=f"{b} images only Square breaks, {c} only PGD-10 (p={p:.2g})")


def _sweep_png(radii: list[float], accs: list[float], eps: float) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(np.array(radii), np.array(accs), marker="o")
    ax.axvline(eps, color="grey", linestyle=":")
    ax.set(xscale="log", xlabel="eps (L-inf)", ylabel="PGD-10 robust accuracy", ylim=(0, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()
