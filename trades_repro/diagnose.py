"""Where evaluations start: a run folder's selected checkpoints, or any checkpoint file.

`evaluate_run` evaluates `runs/<digest>/`'s checkpoint(s) (both selection policies when they
differ) as the run's spec says and keeps `eval.json` beside them, rewritten after every
attack so that a killed evaluation resumes. `diagnose` does the same for a checkpoint trained
anywhere, given the dataset and the network (one of ours, or a ``module:function`` factory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch import Tensor, nn

import trades_repro
from trades_repro import store
from trades_repro.checkpoints import (
    build_arch,
    call_factory,
    factory_source,
    file_sha256,
    load_factory,
    load_state_dict,
    load_weights,
)
from trades_repro.data import Splits, load_splits, to_float
from trades_repro.errors import NeedsGPU
from trades_repro.evalbatch import eval_batch_size
from trades_repro.evalfile import (  # noqa: F401 - read_eval/write_eval: callers import here
    locked,
    read_eval,
    records_for,
    write_eval,
)
from trades_repro.evaluate import (
    ALL_ATTACKS,
    ATTACK_PRESETS,
    PAPER_COLUMNS,
    AttackResult,
    CheckpointEval,
    EvalFile,
    EvalSettings,
    EvaluationError,
    evaluate_model,
    settings_key,
)
from trades_repro.preflight import fingerprint
from trades_repro.records import STANDARD_SQUARE_QUERIES
from trades_repro.spec import ExperimentSpec, parse_spec
from trades_repro.verdict import attack_label, square_queries

Report = Callable[[str], None]
# Policy -> file, as the training engine writes them (checkpoints.json overrides when present).
POLICY_FILES = {"best_pgd10": store.BEST_FILE, "best_pgd10_fosc_ok": store.BEST_FOSC_OK_FILE}


@dataclass(frozen=True)
class DiagnoseDefault:
    n_examples: int | None  # None: the whole test set
    attacks: tuple[str, ...]


# What `diagnose` runs when not told (timings: 1 thread on a shared 2-core VM, measured).
DIAGNOSE_DEFAULTS = {
    # 100 of the 297 test digits: the full table in ~1.5-2 min (spec/digits.yaml's model)
    "digits": DiagnoseDefault(100, ALL_ATTACKS),
    "synthetic": DiagnoseDefault(100, ALL_ATTACKS),
    # 28x28 on CPU: Square alone took 2.5 min (width 16, 34% robust) to 8 min (width 32, 50%
    # robust) per 500 images, and the other four attacks cost ~3x Square on digits; so the
    # default is the verdict's two attacks. `--attacks all` gives Table 1's columns.
    "fashion_mnist": DiagnoseDefault(500, ATTACK_PRESETS["square-only"]),
    "cifar10": DiagnoseDefault(1000, ALL_ATTACKS),  # GPU territory
    "cifar100": DiagnoseDefault(1000, ALL_ATTACKS),
    "tinyimagenet": DiagnoseDefault(1000, ALL_ATTACKS),
}


def parse_attacks(names: Iterable[str]) -> tuple[str, ...]:
    """Attack names or presets (``all``, ``square-only``), comma-separated or repeated."""
    chosen: set[str] = set()
    for name in (part.strip() for item in names for part in item.split(",")):
        if name in ATTACK_PRESETS:
            chosen.update(ATTACK_PRESETS[name])
        elif name in ALL_ATTACKS:
            chosen.add(name)
        elif name:
            known = ", ".join((*ALL_ATTACKS, *ATTACK_PRESETS))
            raise EvaluationError(f"--attacks: unknown attack {name!r}; known: {known}")
    if not chosen:
        raise EvaluationError("--attacks: no attack given")
    return tuple(a for a in ALL_ATTACKS if a in chosen)


def parse_eps(text: str) -> float:
    """ε as a number or fraction ("8/255"), in (0, 1] (pixel units of [0, 1] images)."""
    try:
        eps = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise EvaluationError(f"--eps {text!r}: not a number or fraction like 8/255") from None
    if not 0 < eps <= 1:
        raise EvaluationError(f"--eps {text}: out of range, must be in (0, 1] (pixel units)")
    return eps


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise NeedsGPU("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {name!r}: expected auto, cpu or cuda")
    return name


def evaluate_run(run_dir: Path, *, attacks: tuple[str, ...] | None = None,
                 n_examples: int | None = None, device: str | None = None,
                 seed: int | None = None, save_adversarial: bool = False,
                 policies: Iterable[str] | None = None, eval_batch: int | None = None,
                 square_queries: int | None = None, tf32: bool = False,
                 report: Report = lambda line: None) -> list[CheckpointEval]:
    """Evaluate the run's selected checkpoint(s) into ``run_dir/eval.json`` (resumable).

    `policies` limits it to those checkpoint policies' files (None: every policy's). Returns
    this evaluation's records, one per distinct policy checkpoint; records of other settings
    already in the file are kept. `tf32` runs the attacks with TF32 kernels: a record of its
    own, never the run's own evaluation (`evalfile.made_with`).
    """
    spec = _run_spec(run_dir, attacks, n_examples, seed, eval_batch, square_queries)
    _require_finished(run_dir)
    splits = load_splits(spec.data, spec.seed, train=False)  # only the split it scores
    settings = _settings(spec, splits, resolve_device(device or spec.device),
                         spec.model.model_dump_json(), tf32)
    x, y = _examples(splits, settings.n_examples)
    path = run_dir / store.EVAL_FILE
    done = []
    with locked(path):
        evals = read_eval(path) or EvalFile(source=str(run_dir))
        for file, chosen_by in run_checkpoints(run_dir):
            if policies is not None and not set(policies) & set(chosen_by):
                continue
            report(f"{file} ({', '.join(chosen_by)})")
            net = build_arch(spec.model, spec.data.dataset, splits.shape, splits.num_classes)
            net = _load(net, run_dir / file, spec.model.arch, settings.device)
            done.append(_evaluate(net, x, y, settings, spec.evaluation.attacks,
                                  (file, file_sha256(run_dir / file), chosen_by), evals, path,
                                  run_dir, save_adversarial, report))
    return done


def _require_finished(run_dir: Path) -> None:
    """A run's eval.json speaks for its finished policy checkpoints: run-claim and verify
    take any record of a policy as that policy's result. A record made mid-training, of a
    best checkpoint that later training replaced, would stand for the finished run."""
    provenance = run_dir / store.PROVENANCE_FILE
    status = (store.read_json(provenance).get("status", "unknown") if provenance.is_file()
              else "never started")
    if status == "finished":  # as store.is_finished, without reading the file twice
        return
    raise EvaluationError(
        f"{run_dir}: the run has not finished ({status}), so its checkpoints may still change; "
        "finish it with `trades-repro train`, or score a file as it is now with "
        "`trades-repro diagnose FILE --out ANOTHER_FOLDER`")


def run_records(run_dir: Path, *, complete: bool = False) -> list[CheckpointEval]:
    """Every evaluation record in ``run_dir/eval.json`` (only finished ones with `complete`);
    several per checkpoint file when it was evaluated with different settings."""
    records = records_for(read_eval(run_dir / store.EVAL_FILE))
    return [r for r in records if r.complete or not complete]


def diagnose(checkpoint: Path, *, dataset: str, arch: str | None = None,
             factory: str | None = None, width: int = 32, normalize: bool = False,
             eps: float = 8 / 255, n_examples: int | None = None,
             attacks: tuple[str, ...] | None = None, device: str = "auto",
             data_root: str | None = None, square_queries: int = 5000, seed: int = 0,
             out: Path | None = None, save_adversarial: bool = False,
             checklist: bool = False, eval_batch: int | None = None, download: bool = False,
             tf32: bool = False, report: Report = lambda line: None) -> CheckpointEval:
    """Evaluate any classifier checkpoint on `dataset`'s test set; see `DIAGNOSE_DEFAULTS`.

    PGD-10 uses α = ε/4 (the paper's 2/255 over 8/255). With `out`, `eval.json`, the
    landscape files and (with `save_adversarial`) each attack's adversarial examples are
    written there and a stopped diagnosis resumes; without, nothing is written. With
    `checklist`, the masking checklist runs afterwards on the same examples. `tf32` runs the
    attacks (and the checklist) with TF32 kernels, under a key of its own.
    """
    if (arch is None) == (factory is None):
        raise EvaluationError("give exactly one of --model ARCH or --factory module:function")
    if n_examples is not None and n_examples < 1:
        raise EvaluationError(f"--n-examples {n_examples}: must be at least 1")
    if save_adversarial and out is None:
        raise EvaluationError("--save-adversarial needs --out (the folder to save them in)")
    default = DIAGNOSE_DEFAULTS.get(dataset, DiagnoseDefault(None, ALL_ATTACKS))
    spec = _diagnose_spec(dataset, data_root, arch or "small_cnn", width, normalize, eps,
                          n_examples or default.n_examples, attacks or default.attacks,
                          square_queries, seed, eval_batch, download)
    tensors = load_state_dict(checkpoint)  # a bad file fails before the data is read
    splits = load_splits(spec.data, spec.seed, train=False)  # only the split it scores
    described = f"factory {factory}" if factory else spec.model.model_dump_json()
    settings = _settings(spec, splits, resolve_device(device), described, tf32)
    x, y = _examples(splits, settings.n_examples)
    if factory is not None:
        net, settings = _factory_net(factory, tensors, checkpoint, settings, x, y)
    else:
        net = build_arch(spec.model, dataset, splits.shape, splits.num_classes)
        net = _load_tensors(net, tensors, checkpoint, arch, settings.device)
    identity = (checkpoint.name, file_sha256(checkpoint), [])
    if out is None:
        return _evaluate(net, x, y, settings, spec.evaluation.attacks, identity,
                         EvalFile(source=str(checkpoint)), None, None, False, report, checklist)
    path = out / store.EVAL_FILE
    with locked(path):
        evals = read_eval(path) or EvalFile(source=str(checkpoint))
        return _evaluate(net, x, y, settings, spec.evaluation.attacks, identity, evals, path,
                         out, save_adversarial, report, checklist)


def _factory_net(factory: str, tensors: dict[str, Tensor], checkpoint: Path,
                 settings: EvalSettings, x: Tensor, y: Tensor
                 ) -> tuple[nn.Module, EvalSettings]:
    """The factory's network with the weights, and `settings` keyed by its fingerprint: the
    name "module:function" stays when its code changes, and an edited model must not resume
    the old one's record. (Our architectures change only with trades_repro's version.)"""
    build = load_factory(factory)
    net = _load_tensors(call_factory(build, factory), tensors, checkpoint, factory,
                        settings.device)
    digest = fingerprint(net, x, y, settings.n_classes, device=settings.device,
                         source=factory_source(build))
    return net, settings.model_copy(update={"model_fingerprint": digest})


def _evaluate(net: nn.Module, x: Tensor, y: Tensor, settings: EvalSettings,
              attacks: tuple[str, ...], identity: tuple[str, str, list[str]], evals: EvalFile,
              path: Path | None, folder: Path | None, save_adversarial: bool,
              report: Report, checklist: bool = False) -> CheckpointEval:
    """One record, resumed from `evals` when its key is there, saved to `path` as it grows;
    with `checklist`, the masking checklist appended (once: it resumes too)."""

    def save(record: CheckpointEval) -> None:
        evals.checkpoints[record.key] = record
        if path is not None:
            write_eval(path, evals, settings.device)

    previous = evals.checkpoints.get(settings_key(identity[1], settings))
    record = evaluate_model(net, x, y, settings, attacks, identity=identity, previous=previous,
                            save=save, landscape_dir=folder,
                            adversarial_dir=folder if save_adversarial else None, report=report)
    if checklist and not record.checklist:
        from trades_repro.checklist import run_checklist

        record.checklist = run_checklist(net, x, y, settings, record, folder, report)
        save(record)
    return record


def table_rows(record: CheckpointEval) -> list[tuple[str, str, str]]:
    """(metric, value, note) rows of `diagnose`'s table, in Table 1's column order."""
    rows = []
    for name in ("clean", *ALL_ATTACKS):
        result = record.clean if name == "clean" else record.attacks.get(name)
        label = name if name in ("clean", "autoattack") else f"{name} ({PAPER_COLUMNS[name]})"
        value = f"{result.accuracy:.4f}" if result else "not run"
        rows.append((label, value, _note(result)))
    pgd10 = record.attacks.get("pgd10")
    flagged = {f.check for f in record.flags}
    rows += [
        ("worst case over attacks", _fmt(record.worst_case_accuracy), "per example"),
        ("FOSC (mean, PGD-10)", _fmt(pgd10 and pgd10.fosc_mean), "Eq. 2; lower converges"),
        ("SGCS (mean, PGD-10)", _fmt(pgd10 and pgd10.sgcs_mean), "Eq. 3; lower masks more"),
        ("landscape roughness", _fmt(record.landscape and record.landscape.roughness),
         "Fig. 1; <=1 smooth, >>1 jagged"),
        ("AutoAttack checks", ", ".join(sorted(flagged - {"adversarial_check"})) or "none",
         "pyautoattack checks.py, run once per model"),
        ("adversarial re-check", _recheck_summary(record), "|delta| <= eps, [0, 1], predictions"),
    ]
    return rows


def _note(result: AttackResult | None) -> str:
    """Time, and the settings that differ from AutoAttack's standard ones."""
    if result is None:
        return ""
    note = f"{result.seconds:.1f} s"
    queries = square_queries(result)  # Square's own, or the one inside AutoAttack's cascade
    if queries is not None:
        note += f", {queries} queries" + ("" if queries == STANDARD_SQUARE_QUERIES
                                          else " (non-standard)")
    if result.params.get("version", "standard") != "standard":
        note += f", version {result.params['version']}"
    return note


def _recheck_summary(record: CheckpointEval) -> str:
    failed = [name for name, c in record.adversarial.items() if not c.ok]
    if not record.adversarial:
        return "n/a"
    return f"failed: {', '.join(failed)}" if failed else f"ok ({len(record.adversarial)} attacks)"


def settings_line(record: CheckpointEval) -> str:
    """The settings a reader needs beside the table, non-standard ones named as such."""
    s = record.settings
    square = attack_label(record.attacks.get("square"), "square")
    if "square" not in record.attacks:
        square = f"Square {s.square_queries} queries" + (
            "" if s.square_queries == STANDARD_SQUARE_QUERIES else " (non-standard)")
    notes = [f"n={s.n_examples}", f"eps={s.eps:.4g}", f"seed {s.seed}", square,
             f"PGD-{s.steps} step {s.step_size:.4g}", f"device {s.device}"]
    if s.tf32:
        notes.append("TF32 attacks (not the pinned fp32)")
    if record.preflight and record.preflight.randomized:
        notes.append("randomized model: AutoAttack's 'rand' version")
    return "settings: " + ", ".join(notes)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_checkpoints(run_dir: Path) -> list[tuple[str, list[str]]]:
    """(file, policies) for each distinct checkpoint file a policy selected."""
    index_path = run_dir / store.CHECKPOINTS_FILE
    index = store.read_json(index_path) if index_path.exists() else {}
    chosen: dict[str, list[str]] = {}
    for policy, default_file in POLICY_FILES.items():
        entry = index.get(policy) or {}
        file = entry.get("file") if index else default_file
        if file and (run_dir / file).is_file():
            chosen.setdefault(file, []).append(policy)
    if not chosen:
        raise EvaluationError(f"{run_dir}: no checkpoint to evaluate (expected {store.BEST_FILE})")
    return list(chosen.items())


def _run_spec(run_dir: Path, attacks: tuple[str, ...] | None, n_examples: int | None,
              seed: int | None, eval_batch: int | None = None,
              square_queries: int | None = None) -> ExperimentSpec:
    path = run_dir / store.SPEC_FILE
    if not path.is_file():
        raise EvaluationError(f"{run_dir}: not a run folder (no {store.SPEC_FILE})")
    for flag, value in (("--n-examples", n_examples), ("--square-queries", square_queries)):
        if value is not None and value < 1:
            raise EvaluationError(f"{flag} {value}: must be at least 1")
    raw = store.read_json(path)
    evaluation = dict(raw.get("evaluation", {}))
    evaluation.update({k: v for k, v in (("attacks", attacks), ("n_examples", n_examples),
                                         ("seed", seed), ("batch_size", eval_batch),
                                         ("square_queries", square_queries))
                       if v is not None})
    return parse_spec({**raw, "evaluation": evaluation}, source=str(path))


def _diagnose_spec(dataset: str, root: str | None, arch: str, width: int, normalize: bool,
                   eps: float, n_examples: int | None, attacks: tuple[str, ...],
                   square_queries: int, seed: int, eval_batch: int | None,
                   download: bool) -> ExperimentSpec:
    return parse_spec({
        "data": {"dataset": dataset, "root": root, "validation": "test", "download": download},
        "model": {"arch": arch, "width": width, "normalize": normalize},
        "validation": {"eps": eps, "step_size": eps / 4},  # App. B's α/ε = (2/255)/(8/255)
        "evaluation": {"n_examples": n_examples, "attacks": list(attacks), "seed": seed,
                       "square_queries": square_queries, "landscape": {"radius": eps},
                       "batch_size": eval_batch},
        "seed": seed,
    }, source="diagnose options")


def _settings(spec: ExperimentSpec, splits: Splits, device: str, model: str,
              tf32: bool) -> EvalSettings:
    available = len(splits.test.labels)
    n = spec.evaluation.n_examples or available
    if n > available:
        raise EvaluationError(f"--n-examples {n}: the {spec.data.dataset} test set has only "
                              f"{available} images")
    v, e = spec.validation, spec.evaluation
    return EvalSettings(dataset=spec.data.dataset, n_examples=n, eps=v.eps,
                        step_size=v.step_size, steps=v.steps, random_start=v.random_start,
                        batch_size=eval_batch_size(splits.shape, device, e.batch_size),
                        seed=e.seed, square_queries=e.square_queries,
                        device=device, landscape=spec.landscape(), model=model,
                        n_classes=splits.num_classes, versions=versions(), tf32=tf32)


def versions() -> dict[str, str]:
    """The library versions that can change an attack's numbers: part of the resume key."""
    from pyautoattack import __version__ as autoattack_version

    return {"torch": torch.__version__, "pyautoattack": autoattack_version,
            "trades_repro": trades_repro.__version__}


def _examples(splits: Splits, n: int) -> tuple[Tensor, Tensor]:
    return to_float(splits.test.images[:n]), splits.test.labels[:n]


def _load(net: nn.Module, path: Path, arch: str, device: str) -> nn.Module:
    return _load_tensors(net, load_state_dict(path), path, arch, device)


def _load_tensors(net: nn.Module, tensors: dict[str, Tensor], path: Path, arch: str,
                  device: str) -> nn.Module:
    return load_weights(net, tensors, path, arch).to(device)
