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
from pydantic import ValidationError
from torch import Tensor, nn

from trades_repro import store
from trades_repro.checkpoints import (
    build_arch,
    call_factory,
    file_sha256,
    load_factory,
    load_state_dict,
    load_weights,
)
from trades_repro.data import Splits, load_splits, to_float
from trades_repro.evaluate import (
    ALL_ATTACKS,
    ATTACK_PRESETS,
    PAPER_COLUMNS,
    CheckpointEval,
    EvalFile,
    EvalSettings,
    EvaluationError,
    evaluate_model,
)
from trades_repro.spec import ExperimentSpec, parse_spec

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
        raise EvaluationError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {name!r}: expected auto, cpu or cuda")
    return name


def evaluate_run(run_dir: Path, *, attacks: tuple[str, ...] | None = None,
                 n_examples: int | None = None, device: str | None = None,
                 report: Report = lambda line: None) -> EvalFile:
    """Evaluate the run's selected checkpoint(s) into ``run_dir/eval.json`` (resumable)."""
    spec = _run_spec(run_dir, attacks, n_examples)
    splits = load_splits(spec.data, spec.seed)
    settings = _settings(spec, splits, resolve_device(device or spec.device))
    x, y = _examples(splits, settings.n_examples)
    path = run_dir / store.EVAL_FILE
    evals = read_eval(path) or EvalFile(source=str(run_dir))
    for file, policies in run_checkpoints(run_dir):
        report(f"{file} ({', '.join(policies)})")
        net = build_arch(spec.model, spec.data.dataset, splits.shape, splits.num_classes)
        net = _load(net, run_dir / file, spec.model.arch, settings.device)

        def save(record: CheckpointEval, file: str = file) -> None:
            evals.checkpoints[file] = record
            write_eval(path, evals, settings.device)

        evaluate_model(net, x, y, settings, spec.evaluation.attacks,
                       identity=(file, file_sha256(run_dir / file), policies),
                       previous=evals.checkpoints.get(file), save=save,
                       landscape_dir=run_dir, report=report)
    return evals


def diagnose(checkpoint: Path, *, dataset: str, arch: str | None = None,
             factory: str | None = None, width: int = 32, normalize: bool = False,
             eps: float = 8 / 255, n_examples: int | None = None,
             attacks: tuple[str, ...] | None = None, device: str = "auto",
             data_root: str | None = None, square_queries: int = 5000, seed: int = 0,
             out: Path | None = None, report: Report = lambda line: None) -> CheckpointEval:
    """Evaluate any classifier checkpoint on `dataset`'s test set; see `DIAGNOSE_DEFAULTS`.

    PGD-10 uses α = ε/4 (the paper's 2/255 over 8/255). With `out`, `eval.json` and the
    landscape files are written there and a stopped diagnosis resumes; without, nothing is
    written.
    """
    if (arch is None) == (factory is None):
        raise EvaluationError("give exactly one of --model ARCH or --factory module:function")
    default = DIAGNOSE_DEFAULTS.get(dataset, DiagnoseDefault(None, ALL_ATTACKS))
    spec = _diagnose_spec(dataset, data_root, arch or "small_cnn", width, normalize, eps,
                          n_examples or default.n_examples, attacks or default.attacks,
                          square_queries, seed)
    tensors = load_state_dict(checkpoint)  # a bad file fails before the data is read
    splits = load_splits(spec.data, spec.seed)
    settings = _settings(spec, splits, resolve_device(device))
    if factory is not None:
        net = call_factory(load_factory(factory), factory)
    else:
        net = build_arch(spec.model, dataset, splits.shape, splits.num_classes)
    net = _load_tensors(net, tensors, checkpoint, factory or arch, settings.device)
    x, y = _examples(splits, settings.n_examples)
    path = out / store.EVAL_FILE if out is not None else None
    evals = (read_eval(path) if path else None) or EvalFile(source=str(checkpoint))
    name = checkpoint.name

    def save(record: CheckpointEval) -> None:
        evals.checkpoints[name] = record
        if path is not None:
            write_eval(path, evals, settings.device)

    return evaluate_model(net, x, y, settings, spec.evaluation.attacks,
                          identity=(name, file_sha256(checkpoint), []),
                          previous=evals.checkpoints.get(name), save=save,
                          landscape_dir=out, report=report)


def table_rows(record: CheckpointEval) -> list[tuple[str, str, str]]:
    """(metric, value, note) rows of `diagnose`'s table, in Table 1's column order."""
    rows = []
    for name in ("clean", *ALL_ATTACKS):
        result = record.clean if name == "clean" else record.attacks.get(name)
        label = name if name in ("clean", "autoattack") else f"{name} ({PAPER_COLUMNS[name]})"
        value = f"{result.accuracy:.4f}" if result else "not run"
        rows.append((label, value, f"{result.seconds:.1f} s" if result else ""))
    pgd10 = record.attacks.get("pgd10")
    rows += [
        ("worst case over attacks", _fmt(record.worst_case_accuracy), "per example"),
        ("FOSC (mean, PGD-10)", _fmt(pgd10 and pgd10.fosc_mean), "Eq. 2; lower converges"),
        ("SGCS (mean, PGD-10)", _fmt(pgd10 and pgd10.sgcs_mean), "Eq. 3; lower masks more"),
        ("landscape roughness", _fmt(record.landscape and record.landscape.roughness),
         "Fig. 1; <=1 smooth, >>1 jagged"),
        ("AutoAttack checks", ", ".join(sorted({f.check for f in record.flags})) or "none",
         "pyautoattack checks.py"),
    ]
    return rows


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


def read_eval(path: Path) -> EvalFile | None:
    if not path.exists():
        return None
    try:
        return EvalFile.model_validate_json(path.read_text())
    except ValidationError as err:
        raise EvaluationError(f"{path}: not a valid eval file ({err.errors()[0]['msg']}); "
                              "delete it to start over") from None


def write_eval(path: Path, evals: EvalFile, device: str) -> None:
    from pyautoattack import __version__ as autoattack_version

    evals.provenance = {**store.environment(torch.device(device)), **store.git_state(),
                        "pyautoattack": autoattack_version, "updated": store.now_iso()}
    text = evals.model_dump_json(indent=2)
    EvalFile.model_validate_json(text)  # what we write must read back (fields set in place)
    store.atomic_write_bytes(path, (text + "\n").encode())


def _run_spec(run_dir: Path, attacks: tuple[str, ...] | None,
              n_examples: int | None) -> ExperimentSpec:
    path = run_dir / store.SPEC_FILE
    if not path.is_file():
        raise EvaluationError(f"{run_dir}: not a run folder (no {store.SPEC_FILE})")
    raw = store.read_json(path)
    evaluation = dict(raw.get("evaluation", {}))
    evaluation.update({k: v for k, v in (("attacks", attacks), ("n_examples", n_examples))
                       if v is not None})
    return parse_spec({**raw, "evaluation": evaluation}, source=str(path))


def _diagnose_spec(dataset: str, root: str | None, arch: str, width: int, normalize: bool,
                   eps: float, n_examples: int | None, attacks: tuple[str, ...],
                   square_queries: int, seed: int) -> ExperimentSpec:
    return parse_spec({
        "data": {"dataset": dataset, "root": root, "validation": "test"},
        "model": {"arch": arch, "width": width, "normalize": normalize},
        "validation": {"eps": eps, "step_size": eps / 4},  # App. B's α/ε = (2/255)/(8/255)
        "evaluation": {"n_examples": n_examples, "attacks": list(attacks), "seed": seed,
                       "square_queries": square_queries, "landscape": {"radius": eps}},
        "seed": seed,
    }, source="diagnose options")


def _settings(spec: ExperimentSpec, splits: Splits, device: str) -> EvalSettings:
    available = len(splits.test.labels)
    n = spec.evaluation.n_examples or available
    if n > available:
        raise EvaluationError(f"--n-examples {n}: the {spec.data.dataset} test set has only "
                              f"{available} images")
    v, e = spec.validation, spec.evaluation
    return EvalSettings(dataset=spec.data.dataset, n_examples=n, eps=v.eps,
                        step_size=v.step_size, steps=v.steps, random_start=v.random_start,
                        batch_size=e.batch_size, seed=e.seed, square_queries=e.square_queries,
                        device=device, landscape=e.landscape)


def _examples(splits: Splits, n: int) -> tuple[Tensor, Tensor]:
    return to_float(splits.test.images[:n]), splits.test.labels[:n]


def _load(net: nn.Module, path: Path, arch: str, device: str) -> nn.Module:
    return _load_tensors(net, load_state_dict(path), path, arch, device)


def _load_tensors(net: nn.Module, tensors: dict[str, Tensor], path: Path, arch: str,
                  device: str) -> nn.Module:
    return load_weights(net, tensors, path, arch).to(device)
