"""Datasets as in-memory tensors: read once, split once, batched and augmented with tensor ops.

`load_splits` returns train/val/test `ImageSet`s. Image datasets stay uint8 (0..255) until a
batch is drawn; `batches` converts to float32 in [0, 1] on the target device (models see raw
pixels, as official TRADES; normalisation, if any, is the model's first layer).

Where each dataset comes from (``data.root`` unset means the default shown):

* ``cifar10`` / ``cifar100``: torchvision's readers of the python-pickle release in
  ``data/cifar-10-batches-py/`` / ``data/cifar-100-python/``; ``data.download`` fetches them.
* ``tinyimagenet``: ``data/tiny-imagenet-200/`` unzipped from the cs231n archive (MD5-checked
  download); its labelled ``val/`` is our test split. Decoded once into a checksummed uint8
  cache beside the images: see `trades_repro.tinyimagenet`.
* ``digits``: scikit-learn's 1,797 8x8 digits, which have no test split: a permutation with the
  fixed ``DIGITS_SPLIT_SEED`` holds out 297 test images (the same for every run seed).
* ``fashion_mnist``: the original IDX files (``.gz`` or unpacked) either in torchvision's
  layout ``<root>/FashionMNIST/raw/`` or flat in ``<root>/``. Unset root: Debian's
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``), then
  ``data/``; ``data.download`` falls back to torchvision's download.
* ``synthetic``: one fixed random prototype per class plus Gaussian noise, generated with the
  fixed seed ``SYNTHETIC_SEED`` (the same data for every run seed).
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST

from trades_repro.spec import DataSpec

DEFAULT_ROOT = Path("data")  # torchvision's habit; used when data.root is unset
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt: dataset-fashion-mnist
DIGITS_TEST_SIZE = 297  # 1,797 digits = 1,500 train + 297 test
DIGITS_SPLIT_SEED = 0  # fixed, not the run seed: the digits test set never changes
SYNTHETIC_SEED = 0  # fixed, not the run seed: every run sees the same synthetic data
SYNTHETIC_NOISE = 0.1  # pixel noise std; prototypes differ by ~0.25/pixel, so classes separate
SYNTHETIC_CHUNK = 1 << 20  # values per in-place step of synthetic generation: 4 MiB

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FASHION_HELP = (
    "install it with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_FASHION_MNIST}) or let torchvision download it into data.root (a spec's "
    "data.download: true; `--download` for diagnose and demo)"
)


class DataError(Exception):
    """A dataset that cannot be used; one line naming the file/folder, spec field and a fix."""


class ImageSet(NamedTuple):
    images: Tensor  # [N, C, H, W]; uint8 0..255 for image datasets, float32 in [0, 1] otherwise
    labels: Tensor  # int64 [N]


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    val_source: Literal["holdout", "test"]  # "test": val *is* the test set (no holdout)
    shape: tuple[int, int, int]  # (C, H, W)


def load_splits(spec: DataSpec, seed: int, *, train: bool = True) -> Splits:
    """Read `spec.dataset`, carve the validation set and the training subset with `seed`.

    Holdout: a `randperm` from `torch.Generator().manual_seed(seed)` puts `val_size` training
    images in `val`; then `train_subset` (if set) keeps a seeded subset of what is left.
    ``train=False`` (evaluation) reads only the test split: `train`, and a holdout `val`, are
    then empty sets of the right shape (TinyImageNet skips decoding its 100,000 images).
    """
    if not train:
        return _test_only(spec)
    images, test, num_classes = _LOADERS[spec.dataset](spec)
    generator = torch.Generator().manual_seed(seed)
    val = test
    if spec.validation == "holdout":
        images, val = _holdout(images, spec.val_size, generator, spec.dataset)
    if spec.train_subset is not None:
        images = _subset(images, spec.train_subset, generator, spec.dataset)
    shape = tuple(images.images.shape[1:])
    return Splits(images, val, test, num_classes, spec.validation, shape)  # type: ignore[arg-type]


def _test_only(spec: DataSpec) -> Splits:
    if spec.dataset == "tinyimagenet":  # the one reader where skipping train saves minutes
        _, test, num_classes = _load_tinyimagenet(spec, need_train=False)
    else:
        _, test, num_classes = _LOADERS[spec.dataset](spec)
    empty = _empty(test)
    val = test if spec.validation == "test" else empty
    shape = tuple(test.images.shape[1:])
    return Splits(empty, val, test, num_classes, spec.validation, shape)  # type: ignore[arg-type]


def _empty(data: ImageSet) -> ImageSet:
    return ImageSet(data.images[:0], data.labels[:0])


def _holdout(
    data: ImageSet, val_size: int, generator: torch.Generator, name: str
) -> tuple[ImageSet, ImageSet]:
    n = len(data.labels)
    if val_size >= n:
        raise DataError(
            f"data.val_size: {val_size} held-out images leave no training images ({name} has "
            f"{n}); lower data.val_size or set data.validation: test"
        )
    perm = torch.randperm(n, generator=generator)
    return _take(data, perm[val_size:]), _take(data, perm[:val_size])


def _subset(data: ImageSet, size: int, generator: torch.Generator, name: str) -> ImageSet:
    n = len(data.labels)
    if size > n:
        raise DataError(
            f"data.train_subset: {size} images requested but only {n} {name} training images "
            "are available (after any holdout); lower data.train_subset"
        )
    return _take(data, torch.randperm(n, generator=generator)[:size])


def _take(data: ImageSet, index: Tensor) -> ImageSet:
    index = index.sort().values  # keep file order: a split is a set, not an ordering
    return ImageSet(data.images[index], data.labels[index])


def to_float(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 in [0, 1]; floating input is returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.is_floating_point():
        return images.float()
    raise TypeError(f"to_float: expected uint8 or floating images, got {images.dtype}")


def augment_batch(x: Tensor, *, padding: int, generator: torch.Generator) -> Tensor:
    """App. B augmentation: zero-pad, random crop back to HxW, random horizontal flip.

    Each image gets its own crop offsets (uniform in 0..2*padding per axis) and its own flip
    (probability 1/2), all drawn from the CPU `generator`, so the result is deterministic given
    its state. One gather does the whole batch on x's device; `padding=0` only flips.

    x: [B, C, H, W] (any dtype) -> same shape and dtype. Example:
    >>> augment_batch(torch.rand(8, 3, 32, 32), padding=4, generator=torch.Generator()).shape
    torch.Size([8, 3, 32, 32])
    """
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)  # [B, H]: source rows in the padded image
    cols = dx[:, None] + torch.arange(w)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # mirror = read the crop backwards
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    padded = F.pad(x, (padding, padding, padding, padding))  # zeros, as torchvision RandomCrop
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def batches(
    data: ImageSet,
    batch_size: int,
    *,
    generator: torch.Generator | None,
    shuffle: bool,
    augment: bool,
    padding: int,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of (float32 [0, 1] images, int64 labels) batches on `device`.

    The order is `torch.randperm(n, generator=generator)` when `shuffle` (drawn now, at the
    call); the last partial batch is kept (DataLoader's drop_last=False). Shuffling and
    augmenting need an explicit generator so that runs are reproducible.
    """
    if (shuffle or augment) and generator is None:
        raise ValueError("batches: shuffle/augment need an explicit torch.Generator")
    n = len(data.labels)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return _batch_iter(data, order, batch_size, generator if augment else None, padding, device)


def _batch_iter(
    data: ImageSet,
    order: Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    padding: int,
    device: torch.device | str,
) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size].to(data.images.device)
        x = to_float(data.images[index].to(device))  # move uint8 (4x fewer bytes), then convert
        if generator is not None:
            x = augment_batch(x, padding=padding, generator=generator)
        yield x, data.labels[index].to(device)


# ---------------------------------------------------------------------------- dataset readers


def _root(spec: DataSpec) -> Path:
    return Path(spec.root) if spec.root is not None else DEFAULT_ROOT


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _load_cifar(spec: DataSpec) -> tuple[ImageSet, ImageSet, int]:
    cls, title, num_classes = {
        "cifar10": (CIFAR10, "CIFAR-10", 10),
        "cifar100": (CIFAR100, "CIFAR-100", 100),
    }[spec.dataset]
    root = _root(spec)
    folder = root / cls.base_folder
    if spec.download:
        # torchvision skips the download when the files are already there and intact
        _fetch(lambda: cls(str(root), train=False, download=True), title, root)
    elif not folder.is_dir():
        raise DataError(
            f"data.root: {title} not found in '{root}' (expected {folder}/); "
            "place the files there, or let torchvision download them (a spec's data.download: "
            "true; `diagnose --download`)"
        )
    try:
        sets = [cls(str(root), train=train) for train in (True, False)]
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(
            f"data.root: {title} in '{folder}' cannot be used ({_first_line(err)}); "
            "replace the files, or delete the folder and download again (a spec's "
            "data.download: true; `diagnose --download`)"
        ) from None
    train, test = (_from_hwc(s.data, s.targets) for s in sets)
    return train, test, num_classes


def _from_hwc(data: object, targets: list[int]) -> ImageSet:
    """torchvision's numpy [N, H, W, C] uint8 -> our [N, C, H, W] tensor, without PIL."""
    images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()  # type: ignore[arg-type]
    return ImageSet(images, torch.tensor(targets, dtype=torch.int64))


def _load_tinyimagenet(spec: DataSpec, need_train: bool = True
                       ) -> tuple[ImageSet, ImageSet, int]:
    from trades_repro import tinyimagenet  # it imports this module's DataError and ImageSet

    train, test, num_classes = tinyimagenet.load(_root(spec), spec.download,
                                                 need_train=need_train)
    return train if train is not None else _empty(test), test, num_classes


def _fetch(download: Callable[[], object], title: str, root: Path) -> None:
    """Run a torchvision download; a network or archive failure becomes a one-line DataError."""
    try:
        download()
    except (RuntimeError, OSError) as err:
        raise DataError(
            f"data.download: fetching {title} into '{root}' failed ({_first_line(err)}); "
            "place the files there by hand (see trades_repro/data.py for the layout)"
        ) from None


def _load_fashion_mnist(spec: DataSpec) -> tuple[ImageSet, ImageSet, int]:
    folder = find_fashion_mnist(spec)
    paths = [_idx_path(folder, stem) or folder / stem for stem in FASHION_MNIST_FILES]
    train = _idx_set(_read_idx(paths[0], ndim=3), _read_idx(paths[1], ndim=1), paths[:2])
    test = _idx_set(_read_idx(paths[2], ndim=3), _read_idx(paths[3], ndim=1), paths[2:])
    return train, test, 10


def _fashion_candidates(spec: DataSpec) -> list[Path]:
    if spec.root is not None:
        return [Path(spec.root) / "FashionMNIST" / "raw", Path(spec.root)]
    return [DEBIAN_FASHION_MNIST, DEFAULT_ROOT / "FashionMNIST" / "raw", DEFAULT_ROOT]


def find_fashion_mnist(spec: DataSpec) -> Path:
    """The folder holding the four IDX files; downloads them when `spec.download` and none is
    found; raises `DataError` (one line saying how to get them) otherwise."""
    candidates = _fashion_candidates(spec)
    for folder in candidates:
        if _has_fashion_mnist(folder):
            return folder
    if spec.download:
        _fetch(lambda: FashionMNIST(str(_root(spec)), download=True), "Fashion-MNIST", _root(spec))
        return _root(spec) / "FashionMNIST" / "raw"
    looked = ", ".join(f"'{folder}'" for folder in candidates)
    problem = f"not found (looked in {looked} for {FASHION_MNIST_FILES[0]}[.gz] etc.)"
    if spec.root is not None and _has_fashion_mnist(DEBIAN_FASHION_MNIST):
        raise DataError(f"data.root: Fashion-MNIST {problem}; Debian's package has it in "
                        f"{DEBIAN_FASHION_MNIST}: unset data.root (diagnose: leave out "
                        "--data-root) to read it there")
    raise _fashion_error(problem)


def _has_fashion_mnist(folder: Path) -> bool:
    return all(_idx_path(folder, stem) is not None for stem in FASHION_MNIST_FILES)


def _fashion_error(problem: str) -> DataError:
    return DataError(f"data.root: Fashion-MNIST {problem}; {_FASHION_HELP}")


def _idx_path(folder: Path, stem: str) -> Path | None:
    """The unpacked file if present (faster), else the .gz, else None."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _read_idx(path: Path, ndim: int) -> Tensor:
    """Read an IDX file of unsigned bytes: big-endian magic 0x0000080<ndim>, dims, then data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise _fashion_error(f"file '{path}' cannot be read ({_first_line(err)})") from None
    header = 4 * (ndim + 1)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != 0x800 + ndim:  # 0x08: ubyte
        raise _fashion_error(f"file '{path}' is not an IDX{ndim} ubyte file (bad magic number)")
    dims = [int.from_bytes(raw[4 * k : 4 * k + 4], "big") for k in range(1, ndim + 1)]
    if len(raw) - header != math.prod(dims):
        found = f"header says {dims} = {math.prod(dims)} bytes, found {len(raw) - header}"
        raise _fashion_error(f"file '{path}' is truncated or corrupt ({found})")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(*dims)


def _idx_set(images: Tensor, labels: Tensor, paths: list[Path]) -> ImageSet:
    if images.shape[1:] != (28, 28) or len(images) != len(labels):  # Fashion-MNIST: 28x28
        shapes = f"{tuple(images.shape)} images, {len(labels)} labels"
        raise _fashion_error(f"files '{paths[0]}' and '{paths[1]}' do not match ({shapes})")
    if len(labels) and int(labels.max()) >= 10:  # Fashion-MNIST has 10 classes
        raise _fashion_error(f"file '{paths[1]}' has labels >= 10")
    return ImageSet(images.unsqueeze(1).contiguous(), labels.long())


def _load_digits(spec: DataSpec) -> tuple[ImageSet, ImageSet, int]:
    from sklearn.datasets import load_digits  # lazy: importing scikit-learn takes ~1 s

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16).unsqueeze(1)  # pixels are 0..16
    data = ImageSet(images, torch.from_numpy(bunch.target).long())
    fixed = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perm = torch.randperm(len(data.labels), generator=fixed)
    return _take(data, perm[DIGITS_TEST_SIZE:]), _take(data, perm[:DIGITS_TEST_SIZE]), 10


def _load_synthetic(spec: DataSpec) -> tuple[ImageSet, ImageSet, int]:
    config = spec.synthetic
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    shape = (config.channels, config.image_size, config.image_size)
    prototypes = 0.2 + 0.6 * torch.rand(config.num_classes, *shape, generator=generator)
    train = _synthetic_set(prototypes, config.n_train, generator)
    return train, _synthetic_set(prototypes, config.n_test, generator), config.num_classes


def _synthetic_set(prototypes: Tensor, n: int, generator: torch.Generator) -> ImageSet:
    """Balanced labels in random order; image = its class prototype + N(0, SYNTHETIC_NOISE²).

    Built in place in the noise array, prototypes added a chunk of rows at a time, so the
    peak is one split plus a chunk; the values are bit-identical to ``(prototypes[labels] +
    SYNTHETIC_NOISE * noise).clamp(0, 1)`` (float addition commutes), keeping runs' results.
    """
    labels = (torch.arange(n) % len(prototypes))[torch.randperm(n, generator=generator)]
    images = torch.randn(n, *prototypes.shape[1:], generator=generator).mul_(SYNTHETIC_NOISE)
    rows = max(1, SYNTHETIC_CHUNK // prototypes[0].numel())
    for start in range(0, n, rows):
        images[start : start + rows].add_(prototypes[labels[start : start + rows]])
    return ImageSet(images.clamp_(0, 1), labels)


_LOADERS: dict[str, Callable[[DataSpec], tuple[ImageSet, ImageSet, int]]] = {
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "tinyimagenet": _load_tinyimagenet,
    "digits": _load_digits,
    "fashion_mnist": _load_fashion_mnist,
    "synthetic": _load_synthetic,
}
