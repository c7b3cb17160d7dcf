"""Final evaluation of a checkpoint (Sec. 3.2, Table 1) and the gradient-masking verdict.

Every attack is L∞ at the run's ε on the first `n_examples` test images, with the model in
eval mode and fp32 (TF32 kernels only with `EvalSettings.tf32`, a record of its own that
claims never use). Attack names → the paper's Table 1 column they fill:

* ``pgd10`` → PGD-10: our `attacks.pgd` (α, steps, random start from `spec.validation`),
  with per-example FOSC (Eq. 2) and SGCS (Eq. 3); the attack that selects checkpoints.
* ``apgd-ce`` → APGD-CE: AutoAttack's APGD on cross-entropy, alone on all examples.
* ``apgd-t`` → APGD-DLR: AutoAttack's *targeted* APGD on the DLR loss (9 targets), alone.
* ``fab-t`` → FAB: AutoAttack's targeted FAB (9 targets), alone.
* ``square`` → Square: AutoAttack's black-box Square, alone, ``square_queries`` queries.
* ``autoattack`` → AutoAttack: pyautoattack's ``standard`` cascade of the four above.

Why APGD-DLR → ``apgd-t`` and FAB → ``fab-t``: §3.2 names AutoAttack's attacks as the
AutoAttack paper does, but the released AutoAttack's ``standard`` version, whose result is
the paper's "AutoAttack" column, runs the targeted variants, not untargeted APGD-DLR or FAB.
The per-attack columns are read as those same four components, each run on every example
instead of only on what the cascade's earlier attacks left standing.

AutoAttack comes from ``pyautoattack`` with ``device=`` and ``eps=`` passed explicitly, its
standard settings, and its own sanity checks (``checks.py``) recorded as `Flag`s; nothing of
it is re-implemented here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trades_repro import numerics
from trades_repro.attacks import frozen_weights, pgd
from trades_repro.errors import BadInput
from trades_repro.evalbatch import out_of_memory_hint
from trades_repro.landscape import landscape_result
from trades_repro.metrics import attack_sgcs, correct, fosc
from trades_repro.preflight import (  # noqa: F401 - re-exported for the tests and callers
    AUTOATTACK_LOGGER,
    autoattack_progress,
    capture_checks,
    preflight,
    unique,
)
from trades_repro.records import (  # noqa: F401 - re-exported: evaluate is the public face
    ALL_ATTACKS,
    PAPER_COLUMNS,
    AdversarialCheck,
    AttackResult,
    CheckpointEval,
    EvalFile,
    EvalSettings,
    Flag,
    Verdict,
    settings_key,
)
from trades_repro.verdict import (  # noqa: F401 - re-exported
    DIAGNOSE_RULE,
    PRIMARY_RULE,
    VERDICT_RULES,
    VerdictRule,
    apply_rule,
    verdict_line,
    verdicts_of,
)

# "square-only": the two numbers Table 2's rule needs; the cheap check (no white-box AutoAttack)
ATTACK_PRESETS: dict[str, tuple[str, ...]] = {"all": ALL_ATTACKS,
                                              "square-only": ("pgd10", "square")}
# Execution order: the primary verdict's two attacks first, so a stopped run has it early.
RUN_ORDER = ("pgd10", "square", "apgd-ce", "apgd-t", "fab-t", "autoattack")
LINF_SLACK = 1e-6  # float32 rounding of x + δ, then clamping: ‖δ‖∞ may exceed ε by ~1 ulp
_autoattack_checks = capture_checks  # the name the tests know


class EvaluationError(BadInput):
    """An evaluation that cannot run as asked; one line naming the problem."""


# ------------------------------------------------------------------------------ running


def evaluate_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    settings: EvalSettings,
    attacks: tuple[str, ...],
    *,
    identity: tuple[str, str, list[str]],
    previous: CheckpointEval | None = None,
    save: Callable[[CheckpointEval], None] = lambda record: None,
    landscape_dir: Path | None = None,
    adversarial_dir: Path | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> CheckpointEval:
    """Pre-flight, then every attack in `attacks` not already in `previous` (same key).

    `x` ``[N, ...]`` in [0, 1] and `y` ``[N]`` are the evaluated examples (on the CPU);
    `identity` is (checkpoint name, file SHA-256, policies). The model is put in eval mode
    and fp32, and runs under `numerics.evaluation` (TF32 only with `settings.tf32`). Each
    attack's adversarial examples are re-checked independently (and saved to
    `adversarial_dir` when given). `save` gets the record after each finished step, so a
    killed evaluation resumes at attack granularity. (pyautoattack's own ``state_path``
    resume is not used: in 0.2.0 a restored state leaves ``y_adv`` unbound.)
    """
    name, sha, policies = identity
    key = settings_key(sha, settings)
    if previous is not None and previous.key == key:
        record = previous.model_copy(deep=True)
    else:
        record = CheckpointEval(checkpoint=name, sha256=sha, key=key, settings=settings,
                                requested=[])
    record.policies = policies
    record.requested = [a for a in ALL_ATTACKS if a in {*record.requested, *attacks}]
    model.float().eval()
    started, spent = time.perf_counter(), record.seconds

    def commit() -> None:
        _refresh(record)
        record.seconds = round(spent + time.perf_counter() - started, 3)
        save(record)

    with (numerics.evaluation(tf32=settings.tf32) as flags,
          out_of_memory_hint(settings.batch_size)):
        record.backend = flags
        _run_steps(model, x, y, settings, attacks, record, commit, report,
                   landscape_dir, adversarial_dir)
    commit()
    return record


def _run_steps(model: nn.Module, x: Tensor, y: Tensor, settings: EvalSettings,
               attacks: tuple[str, ...], record: CheckpointEval, commit: Callable[[], None],
               report: Callable[[str], None], landscape_dir: Path | None,
               adversarial_dir: Path | None) -> None:
    if record.preflight is None:
        record.preflight = preflight(model, x, y, settings.n_classes, device=settings.device,
                                     attacks=tuple(attacks))
        report(_preflight_line(record))
        commit()
    randomized = record.preflight.randomized
    steps = [("clean", lambda: record.clean is None, _clean)]
    steps += [(a, lambda a=a: a not in record.attacks, RUNNERS[a])
              for a in RUN_ORDER if a in attacks]
    stem = f"{Path(record.checkpoint).stem}_{record.key[:8]}"  # unique per (file, settings)
    examples: dict[str, Tensor] = {}  # this process's adversarial examples, per attack
    for step, todo, runner in steps:
        if not todo():
            continue
        if step == "autoattack" and composable(record, examples, randomized):
            result, x_adv = compose_cascade(record, examples, x)
        else:
            if step != "clean":  # an attack can take most of an hour on a GPU: say it began
                report(f"{step}: attacking {len(y)} images ...")
            with autoattack_progress(step, report):
                result, x_adv = runner(model, x, y, settings, randomized)
        if step != "clean":
            examples[step] = x_adv
            record.adversarial[step] = recheck(
                model, x, y, x_adv, result, settings, randomized,
                adversarial_dir and adversarial_dir / f"adv_{stem}_{step}.safetensors")
        _store(record, result)
        report(f"{step}: {result.accuracy:.4f} ({result.seconds:.1f} s)")
        commit()
    if record.landscape is None:
        record.landscape = landscape_result(model, x, y, settings.landscape, seed=settings.seed,
                                            device=settings.device, checkpoint=stem,
                                            folder=landscape_dir)
        report(f"landscape roughness: {record.landscape.roughness:.3f}")


# AutoAttack standard's cascade order; each runs on what the earlier ones left standing.
CASCADE = ("apgd-ce", "apgd-t", "fab-t", "square")


def composable(record: CheckpointEval, examples: dict[str, Tensor], randomized: bool) -> bool:
    """The cascade need not run: each of its attacks already ran alone on every example,
    in this process (their examples are at hand), at standard settings (not 'rand')."""
    return not randomized and all(a in record.attacks and a in examples for a in CASCADE)


def compose_cascade(record: CheckpointEval, examples: dict[str, Tensor],
                    x: Tensor) -> tuple[AttackResult, Tensor]:
    """AutoAttack's result from its four attacks run alone on every example.

    An example survives the cascade iff it survives each attack (the cascade only ever
    attacks survivors, and each attack alone saw every example), so the robust flags are
    the AND of the four; its adversarial example is the first breaking attack's, in cascade
    order. Each attack having seen every example makes this at least as strong as the
    cascade, never weaker; `params.composed_from` says it was composed, and its seconds are
    the four attacks' (composing takes none), what running the cascade would have cost at most.
    """
    runs = [record.attacks[a] for a in CASCADE]
    robust = torch.tensor([all(r.robust[i] == "1" for r in runs)
                           for i in range(runs[0].n_examples)], dtype=torch.bool)
    x_adv = x.detach().float().cpu().clone()
    for name, run in zip(reversed(CASCADE), reversed(runs), strict=True):  # first one wins
        broken = torch.tensor([c == "0" for c in run.robust], dtype=torch.bool)
        x_adv[broken] = examples[name].detach().float().cpu()[broken]
    params = {f"{a}.{k}": v for a, r in zip(CASCADE, runs, strict=True)
              for k, v in r.params.items()}
    params.update(version="standard", composed_from=",".join(CASCADE))
    flags = unique([f for r in runs for f in r.flags])
    result = _result("autoattack", robust, time.perf_counter(), flags=flags, params=params)
    return result.model_copy(update={"seconds": round(sum(r.seconds for r in runs), 3)}), x_adv


def _preflight_line(record: CheckpointEval) -> str:
    p = record.preflight
    line = (f"pre-flight: {p.n_classes} classes, logits, {p.clean_correct}/{p.batch} correct; "
            f"AutoAttack checks: {', '.join(sorted({f.check for f in p.checks})) or 'none'}")
    if p.randomized:
        line += ("; the model is randomized (two forwards of one batch differ): AutoAttack "
                 "runs its 'rand' version (EOT)")
    return line


def _store(record: CheckpointEval, result: AttackResult) -> None:
    if result.name == "clean":
        record.clean = result
    else:
        record.attacks[result.name] = result


def _refresh(record: CheckpointEval) -> None:
    """Recompute everything derived from the attack results (also for partial records)."""
    checks = record.preflight.checks if record.preflight else []
    record.flags = unique([*checks, *(f for r in record.attacks.values() for f in r.flags),
                           *_recheck_flags(record)])
    record.verdicts = verdicts_of(record)
    runs = list(record.attacks.values())
    if runs:
        both = [all(r.robust[i] == "1" for r in runs) for i in range(runs[0].n_examples)]
        record.worst_case_accuracy = sum(both) / len(both)
    record.complete = set(record.requested) <= set(record.attacks) and record.landscape is not None


def _recheck_flags(record: CheckpointEval) -> list[Flag]:
    return [Flag(attack=name, check="adversarial_check",
                 message=f"re-check failed: max |delta| {c.max_linf:.6g} (eps "
                         f"{record.settings.eps:.6g}), in [0, 1]: {c.in_box}, finite: {c.finite}, "
                         f"{c.disagreements} predictions disagree with the attack")
            for name, c in record.adversarial.items() if not c.ok]


def recheck(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, result: AttackResult,
            s: EvalSettings, randomized: bool, path: Path | None) -> AdversarialCheck:
    """Re-check an attack's examples without its code: ‖δ‖∞ ≤ ε + 1e-6, inside [0, 1],
    finite, and the prediction recomputed here matches every per-example robust flag
    (a randomized model may disagree). With `path`, save ``x_adv`` and ``y`` there."""
    x_adv = x_adv.detach().float().cpu()
    delta = (x_adv - x).flatten(1).abs().amax(1) if len(x) else torch.zeros(0)
    with torch.no_grad():
        hits = torch.cat([correct(model(xb), yb).cpu()
                          for xb, yb in _batches(x_adv, y, s.batch_size, s.device)])
    flags = torch.tensor([c == "1" for c in result.robust], dtype=torch.bool)
    finite, in_box = bool(torch.isfinite(x_adv).all()), bool(((x_adv >= 0) & (x_adv <= 1)).all())
    max_linf = float(delta.max()) if len(delta) else 0.0
    disagreements = int((hits != flags).sum())
    file = None
    if path is not None:
        from trades_repro.store import atomic_save_safetensors

        atomic_save_safetensors(path, {"x_adv": x_adv.contiguous(), "y": y.contiguous()})
        file = path.name
    ok = finite and in_box and max_linf <= s.eps + LINF_SLACK and (randomized or not disagreements)
    return AdversarialCheck(max_linf=max_linf, in_box=in_box, finite=finite,
                            disagreements=disagreements, ok=ok, file=file)


def _batches(x: Tensor, y: Tensor, size: int, device: str) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(y), size):
        yield x[start:start + size].to(device), y[start:start + size].to(device)


def _result(name: str, robust: Tensor, started: float, **fields: Any) -> AttackResult:
    robust = robust.bool().cpu()
    return AttackResult(
        name=name, paper_column=PAPER_COLUMNS[name], accuracy=robust.float().mean().item(),
        n_robust=int(robust.sum()), n_examples=len(robust),
        robust="".join("1" if r else "0" for r in robust.tolist()),
        seconds=round(time.perf_counter() - started, 3), **fields)


def _clean(model: nn.Module, x: Tensor, y: Tensor, s: EvalSettings,
           randomized: bool = False) -> tuple[AttackResult, Tensor]:
    started = time.perf_counter()
    with torch.no_grad():
        hits = [correct(model(xb), yb) for xb, yb in _batches(x, y, s.batch_size, s.device)]
    return _result("clean", torch.cat(hits), started), x


def _pgd10(model: nn.Module, x: Tensor, y: Tensor, s: EvalSettings,
           randomized: bool = False) -> tuple[AttackResult, Tensor]:
    """PGD-10 with the gradient trace, for per-example FOSC (Eq. 2) and SGCS (Eq. 3).

    Robust = correct on the adversarial example, as official TRADES counts it (an image
    misclassified clean may count); the paired v2 rules AND it with clean correctness.
    """
    started = time.perf_counter()
    generator = torch.Generator(device=s.device).manual_seed(s.seed)
    # one draw for all examples: the result does not depend on the batch size
    noise = torch.rand(x.shape, generator=generator, device=s.device)
    hits, foscs, sgcss, advs = [], [], [], []
    for start, (xb, yb) in zip(range(0, len(y), s.batch_size),
                               _batches(x, y, s.batch_size, s.device), strict=True):
        x_adv, trace = pgd(model, xb, yb, eps=s.eps, step_size=s.step_size, steps=s.steps,
                           random_start=s.random_start, record=True,
                           noise=noise[start:start + len(yb)])
        with torch.no_grad():
            hits.append(correct(model(x_adv), yb))
        foscs.append(fosc(x_adv, xb, trace[-1], s.eps))
        sgcss.append(attack_sgcs(trace))  # Eq. 3: the k step gradients
        advs.append(x_adv.detach().cpu())
    params = {"step_size": s.step_size, "steps": s.steps, "random_start": s.random_start}
    return _result("pgd10", torch.cat(hits), started, params=params,
                   fosc_mean=torch.cat(foscs).mean().item(),
                   sgcs_mean=torch.cat(sgcss).mean().item()), torch.cat(advs)


Runner = Callable[[nn.Module, Tensor, Tensor, EvalSettings, bool], tuple[AttackResult, Tensor]]


def _autoattack(name: str) -> Runner:
    def run(model: nn.Module, x: Tensor, y: Tensor, s: EvalSettings,
            randomized: bool = False) -> tuple[AttackResult, Tensor]:
        from pyautoattack import AutoAttack  # lazy: only evaluation needs it

        started = time.perf_counter()
        # A randomized model gets AutoAttack's 'rand' version (APGD with EOT over 20 draws)
        # for its cascade and APGD-CE; the other single attacks keep standard settings.
        version = "rand" if randomized and name in ("autoattack", "apgd-ce") else "standard"
        adversary = AutoAttack(model, device=s.device, eps=s.eps, seed=s.seed, version=version)
        adversary.verbose = True  # its debug lines: progress (`autoattack_progress`)
        adversary.square.n_queries = s.square_queries  # standard sets 5000; the spec decides
        _fit_targets(adversary, name, model, x[:1].to(s.device))
        if name != "autoattack":
            adversary.attacks_to_run = [name]  # as its run_standard_evaluation_individual
        # frozen: FAB's backward() would also compute (and keep) every weight's gradient
        with (capture_checks(name) as flags, torch.autocast(s.device, enabled=False),
              frozen_weights(model)):
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=s.batch_size)
        params = {**_aa_params(adversary, name), "version": version}
        return _result(name, y_adv.cpu() == y.cpu(), started, flags=unique(flags),
                       params=params), x_adv

    return run


def _fit_targets(adversary: Any, name: str, model: nn.Module, x: Tensor) -> None:
    """Standard's 9 target classes assume ≥ 10 classes; with K < 10 use all K − 1 others."""
    with torch.no_grad():
        classes = model(x).shape[1]
    if classes < 4 and name in ("apgd-t", "autoattack"):  # targeted DLR reads the 4th logit
        raise EvaluationError(f"{name}: the targeted DLR loss needs >= 4 classes, not {classes}")
    adversary.apgd_targeted.n_target_classes = min(9, classes - 1)
    adversary.fab.n_target_classes = min(9, classes - 1)


def _aa_params(adversary: Any, name: str) -> dict[str, Any]:
    """The settings pyautoattack actually used, for provenance."""
    apgd, apgd_t, fab, square = (adversary.apgd, adversary.apgd_targeted, adversary.fab,
                                 adversary.square)
    params = {
        "apgd-ce": {"iterations": apgd.n_iter, "restarts": apgd.n_restarts,
                    "eot": apgd.eot_iter},
        "apgd-t": {"iterations": apgd_t.n_iter, "target_classes": apgd_t.n_target_classes},
        "fab-t": {"iterations": fab.n_iter, "target_classes": fab.n_target_classes},
        "square": {"queries": square.n_queries, "p_init": square.p_init},
    }
    if name == "autoattack":
        return {f"{a}.{k}": v for a, p in params.items() for k, v in p.items()}
    return params[name]


RUNNERS: dict[str, Runner] = {name: _pgd10 if name == "pgd10" else _autoattack(name)
                              for name in ALL_ATTACKS}
