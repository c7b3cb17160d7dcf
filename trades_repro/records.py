"""The evaluation record: what `eval.json` holds, validated (pydantic, ``extra="forbid"``).

One `CheckpointEval` per (checkpoint file hash, evaluation key); `EvalFile` keeps every such
record, so evaluations with different settings coexist instead of replacing each other.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from trades_repro.landscape import LandscapeResult
from trades_repro.spec import AttackName, LandscapeSpec

ALL_ATTACKS: tuple[str, ...] = get_args(AttackName)
PAPER_COLUMNS = {"clean": "Clean", "pgd10": "PGD-10", "apgd-ce": "APGD-CE",
                 "apgd-t": "APGD-DLR", "fab-t": "FAB", "square": "Square",
                 "autoattack": "AutoAttack"}
STANDARD_SQUARE_QUERIES = 5000  # AutoAttack's standard version
Outcome = Literal["flagged", "clear", "inconclusive", "no_verdict"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Flag(_Model):
    attack: str  # "preflight" for the checks run once per model
    check: str  # short code of the pyautoattack check (see evaluate._CHECK_CODES), or "other"
    message: str


class AttackResult(_Model):
    name: str
    paper_column: str
    accuracy: float
    n_robust: int
    n_examples: int
    robust: str = Field(pattern="^[01]*$")  # per example: '1' = still correct after attack
    seconds: float
    params: dict[str, float | int | str | bool] = {}
    flags: list[Flag] = []
    fosc_mean: float | None = None  # pgd10 only: mean per-example FOSC / SGCS
    sgcs_mean: float | None = None


class AdversarialCheck(_Model):
    """The attack's adversarial examples re-checked without the attack's own code."""

    max_linf: float  # max over examples of ‖x_adv − x‖∞
    in_box: bool  # every pixel in [0, 1]
    finite: bool
    disagreements: int  # examples whose recomputed prediction contradicts the robust flag
    ok: bool
    file: str | None = None  # the saved .safetensors (x_adv, y), beside eval.json


class Preflight(_Model):
    """Checks before any attack: the model fits the data and returns deterministic logits."""

    n_classes: int
    batch: int  # images in the pre-flight batch
    clean_correct: int  # on that batch
    randomized: bool  # two forwards of the same batch differed
    checks: list[Flag] = []  # pyautoattack's checks.py, run once per model
    seconds: float = 0.0


class ChecklistRow(_Model):
    """One item of the masking checklist (`checklist`): pass / warn, its numbers, its cost."""

    item: str
    status: Literal["pass", "warn", "n/a"]  # n/a: the attacks it needs were not run
    numbers: dict[str, float | int | list[float]]
    detail: str
    seconds: float


class Verdict(_Model):
    rule: str
    version: int
    attack: str  # the attack PGD-10 is compared with
    threshold: float
    pgd10: float | None  # accuracies; None when that attack was not run
    other: float | None
    margin: float | None  # pgd10 − other (fraction of examples)
    flagged: bool | None  # None: the rule could not be applied (v2: or it is inconclusive)
    # paired rules (version >= 2) only:
    outcome: Outcome | None = None
    n: int | None = None
    b: int | None = None  # robust (and clean-correct) to PGD-10 only
    c: int | None = None  # robust (and clean-correct) to the other attack only
    p_value: float | None = None  # exact McNemar (two-sided binomial test on b of b + c)
    ci_low: float | None = None
    ci_high: float | None = None
    interval: str | None = None  # how the interval was computed
    note: str | None = None  # why an otherwise decided outcome is inconclusive


class EvalSettings(_Model):
    """Everything that changes an attack's numbers: part of the resume key.

    The fields after ``landscape`` default to None only so that records written before they
    existed still read; every new record fills them. ``tf32`` defaults to False, the pinned
    fp32 every record was made with before it existed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    split: Literal["test"] = "test"
    n_examples: int  # the first n test images, in file order
    eps: float
    step_size: float  # PGD-10's α
    steps: int
    random_start: bool
    batch_size: int
    seed: int
    square_queries: int
    device: str
    landscape: LandscapeSpec
    model: str | None = None  # our architecture and width, or the factory module:function
    n_classes: int | None = None
    versions: dict[str, str] | None = None  # torch, pyautoattack, trades_repro
    # diagnose --factory: `preflight.fingerprint` of the built model (factory file, repr,
    # logits, input gradient), since "factory mod:fn" stays the same when its code changes
    model_fingerprint: str | None = None
    # `--tf32`: TF32 matmuls and cuDNN convolutions during the attacks (Ampere+ GPUs), for
    # speed; another rounding, so another record, never a run's own (`evalfile.made_with`)
    tf32: bool = False


class CheckpointEval(_Model):
    checkpoint: str
    sha256: str
    policies: list[str] = []  # checkpoint-selection policies that chose this file
    key: str  # sha256(file hash, settings): partial results are reused only on a match
    settings: EvalSettings
    requested: list[str]
    preflight: Preflight | None = None
    clean: AttackResult | None = None
    attacks: dict[str, AttackResult] = {}
    adversarial: dict[str, AdversarialCheck] = {}  # per attack, when examples were kept
    worst_case_accuracy: float | None = None  # robust to every attack run (per example)
    verdicts: list[Verdict] = []
    flags: list[Flag] = []  # every check that fired: pre-flight, attacks, re-checks
    landscape: LandscapeResult | None = None
    checklist: list[ChecklistRow] = []  # `diagnose --checklist`; does not change the verdict
    complete: bool = False
    seconds: float = 0.0
    backend: dict[str, bool] | None = None  # the numerics flags it ran under (numerics.py)


class EvalFile(_Model):
    """`eval.json`: one record per (checkpoint file hash, evaluation key), plus provenance.

    Version 2 keys ``checkpoints`` by the record's ``key``; version 1 keyed it by file name
    (one record per name) and is re-keyed on reading, losing nothing.
    """

    schema_version: Literal[1, 2] = 2
    source: str  # the run folder or the checkpoint path
    checkpoints: dict[str, CheckpointEval] = {}  # by CheckpointEval.key
    provenance: dict[str, Any] = {}  # versions, device, git state, pyautoattack, time


def settings_key(sha256: str, settings: EvalSettings) -> str:
    # An unset fingerprint and the pinned fp32 (tf32 False) are left out, so records without
    # them (runs, our architectures, every record written before they existed) keep their
    # keys and still resume.
    unset = {name for name, default in (("model_fingerprint", None), ("tf32", False))
             if getattr(settings, name) is default}
    text = settings.model_dump_json(exclude=unset)
    return hashlib.sha256(f"{sha256}|{text}".encode()).hexdigest()[:16]
