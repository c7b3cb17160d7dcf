"""Experiment specs: everything a run does, written down as validated, frozen data.

A spec is parsed once, at the boundary (`load_spec`), and every error names the file and the
field. Defaults are the paper's protocol (App. B, §3.1) unless a comment says otherwise, so
`ExperimentSpec()` *is* the paper's default CIFAR-100 run.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from trades_repro import yamlio
from trades_repro.errors import BadInput

SPEC_VERSION = 1  # bump when a field's meaning changes; it is part of the digest


class SpecError(BadInput):
    """A spec file that cannot be used; the message is one line naming file and field."""


def _parse_fraction(value: Any) -> Any:
    """Accept "8/255" (parsed exactly with `Fraction`, then rounded once to float); refuse a
    boolean (``lr: true`` was read as 1.0)."""
    if isinstance(value, bool):
        raise ValueError(f"a boolean is not a number: {value!r}")
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError) as err:
            raise ValueError(f"not a number or fraction: {value!r}") from err
        except OverflowError:  # YAML 1.1 reads `1e400` as a string: Fraction parses it
            raise ValueError(f"too large for a float: {value!r}") from None
    return value


# Every float field: fractions accepted, booleans and (by `allow_inf_nan=False`) inf/nan not.
Number = Annotated[float, BeforeValidator(_parse_fraction)]
Radius = Annotated[float, BeforeValidator(_parse_fraction), Field(ge=0, le=1)]
# Every int field is strict: a YAML `true` is not 1 (`epochs: true` trained one epoch)
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
# torch's CPU generator (a Mersenne Twister) keeps 32 bits of its seed: seed 2**32 trained
# seed 0's weights bit for bit under another digest. Our specs and arms use seeds 0..9.
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]
# Upper bounds where a larger value can only be a typo (they add no field: digests stay).
# A training or evaluation batch: the largest training set we read is TinyImageNet's 100,000
# images; the paper's largest batch is 512 (Table 2).
BatchSize = Annotated[int, Strict(), Field(gt=0, le=2**16)]
# Attack steps: the paper runs 10 (TPGD-10, PGD-10); 10,000 is 1,000 times that.
Steps = Annotated[int, Strict(), Field(gt=0, le=10_000)]
# A learning rate: the paper's is 0.1 (§3.1) and our sweeps go no higher. 1e12 is how the
# tests force a non-finite loss (a failed run, exit 1); 1e308 crashed instead (exit 4).
LearningRate = Annotated[float, BeforeValidator(_parse_fraction), Field(gt=0, le=1e12)]
# Image counts (dataset sizes, subsets, evaluation examples): TinyImageNet's training set,
# the largest we read, has 100,000 images; 10**7 is a hundred times that.
ImageCount = Annotated[int, Strict(), Field(gt=0, le=10**7)]
# models.SmallCNN's smallest input (two stride-2 convs leave a 2x2 map); here so that a spec
# asking for less fails at validation, not when the run builds its network (models imports it)
SMALL_CNN_MIN_SIZE = 8
MAX_SQUARE_QUERIES = 10**6  # the evaluation's Square budget (study probe checks it too)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, allow_inf_nan=False)


DatasetName = Literal["cifar10", "cifar100", "tinyimagenet", "digits", "fashion_mnist", "synthetic"]


class SyntheticSpec(_Frozen):
    """Shape of the synthetic dataset (class-dependent Gaussian blobs in image shape)."""

    # held in memory as float32, train and test: 9.2 GiB at the bounds (2 x 100,000 x 3x64x64
    # x 4 bytes), generated in place (data.py); the defaults: 512 + 256 images of 1x8x8
    n_train: Annotated[int, Strict(), Field(gt=0, le=100_000)] = 512  # TinyImageNet's size
    n_test: Annotated[int, Strict(), Field(gt=0, le=100_000)] = 256
    num_classes: Annotated[int, Strict(), Field(ge=2, le=1000)] = 4  # ImageNet's 1,000 at most
    channels: Annotated[int, Strict(), Field(gt=0, le=3)] = 1  # grey or RGB, as real images
    image_size: Annotated[int, Strict(), Field(gt=0, le=64)] = 8  # TinyImageNet's 64x64 at most


class DataSpec(_Frozen):
    dataset: DatasetName = "cifar100"  # §3.1: CIFAR-100 is the paper's default
    root: str | None = None  # None: the dataset's conventional place (see data.py)
    download: bool = False  # never reach the network unless the user says so
    # Fig. 4's "50,000/256 = 195 steps" per epoch: the paper trained on every training image
    # and so validated on the test set; "holdout" carves `val_size` images out of train instead
    validation: Literal["holdout", "test"] = "test"
    val_size: ImageCount = 1000  # held-out images carved from train by the run's seed
    train_subset: ImageCount | None = None  # CPU tiers train on a seeded subset
    augment: bool = True  # App. B: random crop with padding + horizontal flip
    # App. B: 4-pixel padding; 64 pixels pads TinyImageNet's 64x64 images to three times their
    # size, and more can only be a typo
    crop_padding: Annotated[int, Strict(), Field(ge=0, le=64)] = 4
    synthetic: SyntheticSpec = SyntheticSpec()


class ModelSpec(_Frozen):
    # App. B: all experiments ResNet-18; wrn-34-10 is official TRADES' CIFAR-10 model
    arch: Literal["resnet18", "small_cnn", "wrn-34-10"] = "resnet18"
    # small_cnn channel width; ignored by resnet18. Our specs use 32; 1024 (about 38M weights)
    # is wider than WRN-34-10's widest stage (640): `width: 100000000` asked for 7e17 bytes
    width: Annotated[int, Strict(), Field(gt=0, le=1024)] = 32
    normalize: bool = False  # official TRADES feeds raw [0, 1] pixels; True normalises inside


class InnerAttackSpec(_Frozen):
    """TRADES' inner maximisation (TPGD, Eq. 1)."""

    eps: Radius = 8 / 255  # App. B: ε = 8/255 (official TRADES code uses 0.031)
    step_size: Radius = 2 / 255  # App. B: α = 2/255 (official TRADES code uses 0.007)
    steps: Steps = 10  # App. B: 10-step TPGD
    init_std: Annotated[Number, Field(ge=0)] = 0.001  # official TRADES: x + 0.001·N(0, I)
    # Official TRADES takes the first gradient at the unprojected x + σ·N(0, I); True projects
    # the start onto the box ∩ [0, 1] first (a different attack at saturated pixels).
    init_projected: bool = False


class AWPSpec(_Frozen):
    """Adversarial weight perturbation on the TRADES loss (App. H; Wu et al. 2020's recipe)."""

    gamma: Annotated[Number, Field(ge=0)] = 0.005  # App. B: AWP radius 0.005
    # TRADES-AWP recipe: the proxy's plain SGD uses the training lr (0.1); the per-layer
    # normalisation cancels it up to float rounding (AT-AWP uses 0.01).
    proxy_lr: LearningRate = 0.1
    warmup: NonNegativeInt = 10  # TRADES-AWP recipe: AWP from epoch 10 (1-based) on


class MethodSpec(_Frozen):
    # trades: TPGD inner max (Eq. 1); trades_pgd_inner: PGD-10 on CE as inner max with the
    # TRADES outer loss (App. F, "Modified"); trades_awp: TRADES + AWP (App. H)
    name: Literal["trades", "trades_pgd_inner", "trades_awp"] = "trades"
    # §3.1: β = 3; Table 2's largest is 6, and 1000 already makes the KL term all of the loss
    beta: Annotated[Number, Field(gt=0, le=1000)] = 3.0
    attack: InnerAttackSpec = InnerAttackSpec()
    awp: AWPSpec = AWPSpec()


class OptimSpec(_Frozen):
    lr: LearningRate = 0.1  # §3.1: constant 0.1, no schedule (isolates it)
    momentum: Annotated[Number, Field(ge=0, lt=1)] = 0.9  # App. B: Nesterov momentum 0.9
    nesterov: bool = True  # App. B
    weight_decay: Annotated[Number, Field(ge=0)] = 5e-4  # App. B: 0.0005
    batch_size: BatchSize = 256  # §3.1: 256
    # App. B: 200 for CIFAR-10/100 (100 for TinyImageNet); 10,000 is 50 times the paper's
    epochs: Annotated[int, Strict(), Field(gt=0, le=10_000)] = 200
    schedule: Literal["constant", "multistep"] = "constant"  # §3.1: constant isolates instability
    milestones: tuple[PositiveInt, ...] = (100, 150)  # App. D: LR × 0.1 at epochs 100 and 150
    lr_decay: Annotated[Number, Field(gt=0, le=1)] = 0.1  # App. D: γ = 0.1

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimSpec:
        # torch's SGD refuses it only when the run builds its optimiser (a crash, exit 4)
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov: true needs optim.momentum > 0 (Nesterov's "
                             "look-ahead is along the momentum); set nesterov: false for "
                             "plain SGD")
        return self


class ValidationAttackSpec(_Frozen):
    """PGD-10 on cross-entropy, run on the validation set after every epoch (App. B)."""

    eps: Radius = 8 / 255  # App. B: same ε as training
    step_size: Radius = 2 / 255  # App. B: α = 2/255
    steps: Steps = 10  # PGD-10
    random_start: bool = True  # Madry et al.: uniform start in the ε-box


class MonitorSpec(_Frozen):
    fosc: bool = True  # Eq. 2 on the validation PGD-10 examples (Fig. 2)
    sgcs: bool = True  # Eq. 3 on the same attack traces (Fig. 2)
    batch_metrics: bool = False  # App. G per step into batches.jsonl: two extra backward passes


class HealingSpec(_Frozen):
    """Algorithm 1: Gaussian noise on the next batches after validation FOSC > threshold."""

    enabled: bool = False  # the paper's TRADES baseline does not heal
    # The paper gives no number. Figs. 2 and 6 plot FOSC × 10 on the accuracy axis, where
    # regular runs stay well under unstable spikes; FOSC = ε‖∇‖₁ − ⟨x^k − x, ∇⟩ grows with
    # input dimension and ε, so the threshold is per dataset: calibrate it on a regular run
    # (e.g. a few times its median FOSC). 0.05 is a CIFAR-scale starting point, and also the
    # threshold of the `best_pgd10_fosc_ok` checkpoint policy.
    fosc_threshold: Annotated[Number, Field(ge=0)] = 0.05
    noise_batches: NonNegativeInt = 10  # Alg. 1 line 21: the next 10 batches
    # Alg. 1 line 8 writes N(0, 0.1); read as a standard deviation (the torch.randn scale).
    # If the authors meant variance, set 0.316 (= √0.1).
    noise_std: Annotated[Number, Field(ge=0)] = 0.1


class PerformanceSpec(_Frozen):
    """How fast, not what: precision and kernels (still in the digest: they change numbers).

    Every setting trains official TRADES' step (see `trades_repro.steps`); the knobs only
    change rounding. The retired `fidelity` flag is refused with a one-line error: the
    default path now *is* the official loop, pass for pass in its results.
    """

    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast for training fwd/bwd only
    tf32: bool = False  # TF32 matmul/cuDNN on Ampere+; attacks and FOSC stay fp32 by default
    channels_last: bool = False  # NHWC memory format for convolutions on GPU
    compile: bool = False  # torch.compile the model (first epoch pays compilation)
    # cuDNN autotuning: faster convolutions, but the chosen kernels (and so the last bits of
    # every result) may change from run to run; official TRADES leaves it off.
    cudnn_benchmark: bool = False

    @model_validator(mode="before")
    @classmethod
    def _retired_fields(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "fidelity" in raw:
            raise ValueError("'fidelity' was retired: the default training step is official "
                             "TRADES exactly (same iterates, loss, gradients and BatchNorm "
                             "statistics); delete the field")
        return raw


AttackName = Literal["pgd10", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack"]


class LandscapeSpec(_Frozen):
    """Fig. 1's loss surface z = loss(x + a·r1 + b·r2) on a (steps × steps) grid."""

    # a, b ∈ [-radius, radius]; None: the validation ε (the threat model PGD-10 and AutoAttack
    # use), resolved when a checkpoint is evaluated, so the surface spans the attacks' ball
    radius: Radius | None = None
    steps: Annotated[int, Strict(), Field(ge=3, le=201)] = 21  # grid points per axis
    n_images: ImageCount = 1  # surfaces are averaged over this many test images


class EvalSpec(_Frozen):
    """Final evaluation of a checkpoint on the test set (not part of the run's digest)."""

    n_examples: ImageCount | None = None  # None: the whole test set
    # None: from the image size and free memory (trades_repro.evalbatch); 500 on a CPU
    batch_size: BatchSize | None = None
    attacks: tuple[AttackName, ...] = (
        "pgd10", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack"
    )  # Table 1's columns
    # AutoAttack's standard Square budget; MAX_SQUARE_QUERIES is 200 times it (a typo beyond)
    square_queries: Annotated[int, Strict(), Field(gt=0, le=MAX_SQUARE_QUERIES)] = 5000
    seed: Seed = 0  # AutoAttack's and PGD's random starts
    landscape: LandscapeSpec = LandscapeSpec()


# Outside the run's identity: how a run is evaluated (left out of the hash), and where its
# data lives (hashed at the defaults, so moving the data keeps the digest and specs that
# never set these fields keep the digest they had before the rule). Everything else can
# change the numbers a run writes. docs/architecture.md has the table.
DIGEST_EXCLUDES = frozenset({"evaluation"})
DIGEST_LOCATION_FIELDS = ("root", "download")  # of `data`


class ExperimentSpec(_Frozen):
    spec_version: Literal[1] = SPEC_VERSION
    name: str = "cifar100_default"
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    method: MethodSpec = MethodSpec()
    optim: OptimSpec = OptimSpec()
    validation: ValidationAttackSpec = ValidationAttackSpec()
    monitor: MonitorSpec = MonitorSpec()
    healing: HealingSpec = HealingSpec()
    performance: PerformanceSpec = PerformanceSpec()
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    evaluation: EvalSpec = EvalSpec()

    @model_validator(mode="after")
    def _healing_needs_fosc(self) -> ExperimentSpec:
        # Algorithm 1 heals when validation FOSC passes the threshold: without FOSC it never
        # would, and the run would pass for a healed one
        if self.healing.enabled and not self.monitor.fosc:
            raise ValueError("healing.enabled: true needs monitor.fosc: true (Algorithm 1 is "
                             "triggered by validation FOSC)")
        return self

    @model_validator(mode="after")
    def _small_cnn_fits_synthetic(self) -> ExperimentSpec:
        # only synthetic images can be smaller (digits are 8x8); SmallCNN would refuse them
        # when the run builds it, an unexpected failure (exit 4) instead of bad input
        size = self.data.synthetic.image_size
        if (self.model.arch == "small_cnn" and self.data.dataset == "synthetic"
                and size < SMALL_CNN_MIN_SIZE):
            raise ValueError(f"model.arch: small_cnn needs data.synthetic.image_size >= "
                             f"{SMALL_CNN_MIN_SIZE} (two stride-2 convs), got {size}")
        return self

    def digest(self) -> str:
        """Stable 16-hex hash of the resolved spec: field order and YAML layout don't matter.

        The digest covers what changes a run's results, not where its files live:
        `evaluation` is left out (evaluating a run differently is not a different run), and so
        are `data.root` and `data.download` (moving the data to node-local scratch is the same
        run; provenance.json records where it was read): they are hashed at their defaults.
        """
        training = self.model_dump(mode="json", exclude=set(DIGEST_EXCLUDES))
        training["data"].update({name: DataSpec.model_fields[name].default
                                 for name in DIGEST_LOCATION_FIELDS})
        canonical = json.dumps(training, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def landscape(self) -> LandscapeSpec:
        """The evaluation's landscape with its radius resolved: unset, the validation ε."""
        landscape = self.evaluation.landscape
        if landscape.radius is not None:
            return landscape
        return landscape.model_copy(update={"radius": self.validation.eps})


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate a YAML spec; any problem raises `SpecError` naming file and field."""
    return parse_spec(read_spec_mapping(Path(path)), source=str(path))


def read_spec_mapping(path: Path) -> dict[str, Any]:
    """A spec file's mapping, unvalidated; a file that is not one raises `SpecError`."""
    if path.is_dir():
        raise SpecError(f"{path}: a directory, not a spec file")
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping, got {type(raw).__name__}")
    if "base" in raw:  # no spec field is called `base`: pydantic said "Extra inputs ..."
        raise SpecError(f"{path}: a sweep file (it has 'base'), not a spec: run its specs with "
                        "`trades-repro study sweep`, or list them with `trades-repro spec show`")
    return raw


def read_yaml(path: Path) -> Any:
    """`yamlio.read`, its one-line errors (unreadable, not UTF-8, malformed) as `SpecError`."""
    try:
        return yamlio.read(path)
    except yamlio.YAMLFileError as err:
        raise SpecError(str(err)) from None


def parse_spec(raw: dict[str, Any], source: str = "<spec>") -> ExperimentSpec:
    """Validate a mapping as an `ExperimentSpec`, turning pydantic errors into `SpecError`."""
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(validation_message(err, source)) from None


def validation_message(err: ValidationError, source: str) -> str:
    """One line naming the source and the first bad field, e.g. "f.yaml: field 'a.b': …"; a
    check across sections (the spec's own validator) names its fields in its message."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "<root>"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if not first["loc"] and first["type"] == "value_error":
        return f"{source}: {first['ctx']['error']}{more}"  # a validator's ValueError, as raised
    return f"{source}: field '{field}': {first['msg']}{more}"
