"""Data loading, splits, augmentation and batching.

Every reader is tested on tiny files written in the dataset's real on-disk format (CIFAR python
pickles, TinyImageNet JPEG folders, Fashion-MNIST IDX in both layouts and encodings). Tests on
the real Debian Fashion-MNIST files skip when they are absent, and fail instead when `CI` is set.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest
from torchvision.datasets import CIFAR10, CIFAR100

from trades_repro import data
from trades_repro.data import DataError, ImageSet
from trades_repro.models import dataset_stats
from trades_repro.spec import DataSpec, SyntheticSpec

# ------------------------------------------------------------------------------------ helpers


def _rows(images: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
    """Sorted (image bytes, label) rows: compares sets of examples regardless of order."""
    return sorted((img.numpy().tobytes(), int(y)) for img, y in zip(images, labels, strict=True))


def _digits(seed: int = 0, **fields) -> data.Splits:
    fields.setdefault("validation", "holdout")  # these tests are about the holdout split
    return data.load_splits(DataSpec(dataset="digits", **fields), seed=seed)


# --------------------------------------------------------------------------------------- CIFAR

_CIFAR = {  # class, label key, meta key, number of classes
    "cifar10": (CIFAR10, "labels", "label_names", 10),
    "cifar100": (CIFAR100, "fine_labels", "fine_label_names", 100),
}


def _write_cifar(root: Path, name: str, monkeypatch, per_file: int = 3):
    """Tiny CIFAR release in torchvision's layout; returns (train, test) expected tensors."""
    cls, label_key, meta_key, k = _CIFAR[name]
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for file, _ in cls.train_list + cls.test_list:
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)  # R, G, B 32x32 planes
        labels = rng.integers(0, k, per_file).tolist()
        # The real files are Python 2 pickles whose keys are py2 `str`; torchvision unpickles
        # with encoding="latin1", which turns them into str, so str keys are the same on read.
        entry = {"batch_label": file, "data": pixels, label_key: labels, "filenames": []}
        (folder / file).write_bytes(pickle.dumps(entry, protocol=2))
        written[file] = (torch.from_numpy(pixels).view(-1, 3, 32, 32), torch.tensor(labels))
    meta = {meta_key: [f"class{i}" for i in range(k)]}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta, protocol=2))
    _accept_tiny_files(monkeypatch, cls, folder)
    return [
        tuple(torch.cat(parts) for parts in zip(*(written[f] for f, _ in files), strict=True))
        for files in (cls.train_list, cls.test_list)
    ]


def _accept_tiny_files(monkeypatch, cls, folder: Path) -> None:
    # torchvision checks each file's md5 against the real release (`_check_integrity` and
    # `_load_meta`). Instead of switching that check off, we point the class's md5 table at
    # our tiny files: torchvision's own integrity code still runs, so corruption is caught.
    def md5(file: str) -> str:
        return hashlib.md5((folder / file).read_bytes()).hexdigest()

    for table in ("train_list", "test_list"):
        monkeypatch.setattr(cls, table, [[f, md5(f)] for f, _ in getattr(cls, table)])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_real_pickle_format(tmp_path, monkeypatch, name):
    train, test = _write_cifar(tmp_path, name, monkeypatch)
    splits = data.load_splits(DataSpec(dataset=name, root=str(tmp_path), validation="test"), 0)
    assert splits.shape == (3, 32, 32) and splits.num_classes == _CIFAR[name][3]
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert torch.equal(splits.train.images, train[0]) and torch.equal(splits.train.labels, train[1])
    assert torch.equal(splits.test.images, test[0]) and torch.equal(splits.test.labels, test[1])
    assert splits.val is splits.test and splits.val_source == "test"


def test_cifar_missing_names_root_and_download(tmp_path):
    with pytest.raises(DataError, match=r"data\.root: CIFAR-100 not found .*cifar-100-python"):
        data.load_splits(DataSpec(dataset="cifar100", root=str(tmp_path)), 0)


def test_cifar_download_failure_is_one_line(tmp_path, monkeypatch):
    def offline(self) -> None:  # no network in tests: fail the way urllib does
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(CIFAR10, "download", offline)
    spec = DataSpec(dataset="cifar10", root=str(tmp_path), download=True)
    with pytest.raises(DataError, match=r"^data\.download: fetching CIFAR-10 into .* failed"):
        data.load_splits(spec, 0)


def test_cifar_corrupt_file_is_a_data_error(tmp_path, monkeypatch):
    _write_cifar(tmp_path, "cifar10", monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"data\.root: CIFAR-10 in .* cannot be used"):
        data.load_splits(DataSpec(dataset="cifar10", root=str(tmp_path)), 0)


# -------------------------------------------------------------------------------- TinyImageNet


def _jpeg(path: Path, colour, mode: str = "RGB", size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(path, quality=95)


def _write_tiny(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("n02\nn01\n")  # unsorted on purpose: labels follow sort
    _jpeg(folder / "train/n01/images/n01_0.JPEG", (200, 10, 10))
    _jpeg(folder / "train/n01/images/n01_1.JPEG", 128, mode="L")  # greyscale JPEG
    _jpeg(folder / "train/n02/images/n02_0.JPEG", (10, 200, 10))
    _jpeg(folder / "val/images/val_0.JPEG", (10, 10, 200))
    _jpeg(folder / "val/images/val_1.JPEG", (90, 90, 90))
    rows = ["val_0.JPEG\tn02\t0\t0\t63\t63", "val_1.JPEG\tn01\t1\t2\t30\t40"]
    (folder / "val/val_annotations.txt").write_text("\n".join(rows) + "\n")
    return folder


def test_tinyimagenet_reads_folder_layout(tmp_path):
    _write_tiny(tmp_path)
    spec = DataSpec(dataset="tinyimagenet", root=str(tmp_path), validation="test")
    splits = data.load_splits(spec, 0)
    assert splits.shape == (3, 64, 64) and splits.num_classes == 2
    assert splits.train.images.dtype == torch.uint8
    assert splits.train.labels.tolist() == [0, 0, 1] and splits.test.labels.tolist() == [1, 0]
    means = splits.train.images.float().mean(dim=(2, 3))
    expected = torch.tensor([[200, 10, 10], [128, 128, 128], [10, 200, 10]]).float()
    assert torch.allclose(means, expected, atol=3)  # JPEG is lossy; flat colours survive
    assert torch.allclose(
        splits.test.images.float().mean(dim=(2, 3))[0], torch.tensor([10.0, 10, 200]), atol=3
    )


def test_tinyimagenet_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"data\.root: TinyImageNet-200 not found"):
        data.load_splits(DataSpec(dataset="tinyimagenet", root=str(tmp_path)), 0)
    folder = _write_tiny(tmp_path)
    _jpeg(folder / "val/images/val_1.JPEG", (90, 90, 90), size=32)
    with pytest.raises(DataError, match=r"val_1\.JPEG' is \(3, 32, 32\), expected 3x64x64"):
        data.load_splits(DataSpec(dataset="tinyimagenet", root=str(tmp_path)), 0)
    (folder / "val/val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"line 1: unknown or missing wnid"):
        data.load_splits(DataSpec(dataset="tinyimagenet", root=str(tmp_path)), 0)


# ------------------------------------------------------------------------------- Fashion-MNIST


def _idx(array: np.ndarray) -> bytes:
    magic = 0x800 + array.ndim  # 0x08: unsigned byte, then the number of dimensions
    header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape))
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> dict:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        raw = _idx(array)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("layout", ["FashionMNIST/raw", "."])
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_in_both_layouts_and_encodings(tmp_path, layout, gz):
    arrays = _write_fashion(tmp_path / layout, gz)
    spec = DataSpec(dataset="fashion_mnist", root=str(tmp_path), validation="test")
    splits = data.load_splits(spec, 0)
    assert splits.shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)).unsqueeze(1)
    assert torch.equal(splits.train.images, expected)
    assert splits.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_truncated_file_names_file_and_fixes(tmp_path, gz):
    _write_fashion(tmp_path, gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError) as info:
        data.load_splits(DataSpec(dataset="fashion_mnist", root=str(tmp_path)), 0)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download: true" in message


def test_fashion_mnist_bad_magic_and_count_mismatch(tmp_path):
    _write_fashion(tmp_path, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(3)))  # 3 labels for 4 images
    with pytest.raises(DataError, match=r"do not match \(\(4, 28, 28\) images, 3 labels\)"):
        data.load_splits(DataSpec(dataset="fashion_mnist", root=str(tmp_path)), 0)
    labels.write_bytes(_idx(np.zeros((4, 28, 28))))  # an image file where labels belong
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte' is not an IDX1 ubyte file"):
        data.load_splits(DataSpec(dataset="fashion_mnist", root=str(tmp_path)), 0)


def test_fashion_mnist_default_search_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    spec = DataSpec(dataset="fashion_mnist", val_size=1)
    with pytest.raises(DataError, match=r"not found \(looked in .*debian.*apt-get install"):
        data.load_splits(spec, 0)
    _write_fashion(tmp_path / "data/FashionMNIST/raw", gz=True, n_test=2)  # an old download
    assert len(data.load_splits(spec, 0).test.labels) == 2
    _write_fashion(tmp_path / "debian", gz=True, n_test=3)  # the Debian package comes first
    assert len(data.load_splits(spec, 0).test.labels) == 3


def test_real_debian_fashion_mnist(debian_fashion_mnist):
    splits = data.load_splits(DataSpec(dataset="fashion_mnist", validation="test"), 0)
    assert (len(splits.train.labels), len(splits.test.labels)) == (60_000, 10_000)
    assert splits.shape == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert torch.bincount(splits.train.labels).tolist() == [6000] * 10  # balanced classes
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    mean, std = dataset_stats("fashion_mnist")  # the Normalize constants fit the real data
    pixels = data.to_float(splits.train.images)
    assert pixels.mean().item() == pytest.approx(mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(std[0], abs=1e-3)


# ---------------------------------------------------------------------- digits, splits, synthetic


def test_digits_fixed_split_and_range():
    splits = _digits(validation="test")
    assert (len(splits.train.labels), len(splits.test.labels)) == (1500, 297)
    assert splits.shape == (1, 8, 8) and splits.num_classes == 10
    assert splits.train.images.dtype == torch.float32
    assert splits.train.images.min() >= 0 and splits.train.images.max() == 1
    other = _digits(validation="test", seed=7)
    assert torch.equal(splits.test.images, other.test.images)  # the test set never moves
    assert torch.equal(splits.train.images, other.train.images)


def test_holdout_partitions_the_training_set():
    full = _digits(validation="test").train
    splits = _digits(val_size=200)
    assert splits.val_source == "holdout"
    assert (len(splits.train.labels), len(splits.val.labels)) == (1300, 200)
    joined = [torch.cat(pair) for pair in zip(splits.train, splits.val, strict=True)]
    assert _rows(*joined) == _rows(*full)  # disjoint and covering: a partition
    assert not torch.equal(splits.val.images, _digits(val_size=200, seed=1).val.images)
    assert torch.equal(splits.val.images, _digits(val_size=200).val.images)


def test_train_subset_is_seeded_and_drawn_from_the_rest():
    splits = _digits(val_size=200, train_subset=100)
    assert len(splits.train.labels) == 100 and len(splits.val.labels) == 200
    rest = set(_rows(*_digits(val_size=200).train))
    assert set(_rows(*splits.train)) <= rest
    assert torch.equal(splits.train.images, _digits(val_size=200, train_subset=100).train.images)
    other = _digits(val_size=200, train_subset=100, seed=1).train.images
    assert not torch.equal(splits.train.images, other)
    assert len(_digits(validation="test", train_subset=1500).train.labels) == 1500


def test_oversize_val_and_subset_are_data_errors():
    with pytest.raises(DataError, match=r"^data\.val_size: 1500 held-out images"):
        _digits(val_size=1500)
    with pytest.raises(DataError, match=r"^data\.train_subset: 1301 images requested"):
        _digits(val_size=200, train_subset=1301)


def test_synthetic_is_fixed_and_separable():
    spec = DataSpec(dataset="synthetic", val_size=100, synthetic=SyntheticSpec(channels=3))
    splits = data.load_splits(spec, seed=0)
    assert splits.shape == (3, 8, 8) and splits.num_classes == 4
    assert splits.train.images.dtype == torch.float32
    assert 0 <= splits.train.images.min() and splits.train.images.max() <= 1
    assert torch.equal(splits.test.images, data.load_splits(spec, seed=5).test.images)
    # Learnable: even nearest-class-mean on the training set separates the test classes.
    means = torch.stack([splits.train.images[splits.train.labels == k].mean(0) for k in range(4)])
    distance = torch.cdist(splits.test.images.flatten(1), means.flatten(1))
    assert (distance.argmin(1) == splits.test.labels).float().mean() > 0.9


# Synthetic data generated by the three-array code before 2026-11-28 (prototypes[labels] + noise),
# by capability of torch's CPU kernels: its randn rounds differently in its scalar and vector
# paths. A change here changes every synthetic run's data, hence its results.
SYNTHETIC_SHA256 = {
    "DEFAULT": "e8a35fd49cf20f7fc3a22e1e230dcc98fe7aebdc03615edc6377f755f38a5535",
    "AVX2": "f6823e9e930ef2282d76f8df72cf40670d58c6fb458db93e91dc2828dd744b41",
    "AVX512": "f6823e9e930ef2282d76f8df72cf40670d58c6fb458db93e91dc2828dd744b41",
}
_ODD_SYNTHETIC = DataSpec(dataset="synthetic", synthetic=SyntheticSpec(
    n_train=37, n_test=21, num_classes=3, channels=3, image_size=9))  # no size a power of 2


def _synthetic_sha256(spec: DataSpec) -> str:
    train, test, _ = data._load_synthetic(spec)
    digest = hashlib.sha256()
    for tensor in (train.images, train.labels, test.images, test.labels):
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _three_arrays(prototypes, n, generator) -> ImageSet:
    """The generation before it went in place: three full float32 arrays at its peak."""
    labels = (torch.arange(n) % len(prototypes))[torch.randperm(n, generator=generator)]
    noise = data.SYNTHETIC_NOISE * torch.randn(n, *prototypes.shape[1:], generator=generator)
    return ImageSet((prototypes[labels] + noise).clamp_(0, 1), labels)


@pytest.mark.parametrize("chunk", [data.SYNTHETIC_CHUNK, 5 * 3 * 9 * 9, 1])  # 5 rows, 1 row
def test_synthetic_in_place_equals_the_three_array_generation(monkeypatch, chunk):
    monkeypatch.setattr(data, "SYNTHETIC_CHUNK", chunk)
    in_place = _synthetic_sha256(_ODD_SYNTHETIC)
    monkeypatch.setattr(data, "_synthetic_set", _three_arrays)
    assert in_place == _synthetic_sha256(_ODD_SYNTHETIC)


_PEAK_SCRIPT = """
import torch
from trades_repro import data
from trades_repro.spec import DataSpec, SyntheticSpec

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith(field))

torch.set_num_threads(1)
spec = DataSpec(dataset="synthetic", synthetic=SyntheticSpec(
    n_train=2000, n_test=2000, num_classes=10, channels=3, image_size=64))
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # Linux: the peak (VmHWM) starts again from here
before = kib("VmRSS")
train, test, _ = data._load_synthetic(spec)
print((kib("VmHWM") - before) * 1024 / (train.images.nbytes + test.images.nbytes))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="the peak is measured with Linux's /proc/self/clear_refs")
def test_synthetic_generation_peaks_near_the_data_it_holds():
    """Three full arrays per split peaked at twice the data held (9.2 GiB at the spec's
    bounds); in place, the peak is the data plus a 4 MiB chunk and what the allocator keeps
    (about 1.1 times it here): 1.5 leaves room for the allocator, and is far from 2."""
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True,
                         check=True)
    assert float(run.stdout) < 1.5


def test_synthetic_data_is_pinned(monkeypatch):
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in SYNTHETIC_SHA256:
        pytest.skip(f"no pinned synthetic data for CPU capability {capability}")
    monkeypatch.setattr(data, "SYNTHETIC_CHUNK", 5 * 3 * 9 * 9)  # several chunks
    assert _synthetic_sha256(_ODD_SYNTHETIC) == SYNTHETIC_SHA256[capability]


# ----------------------------------------------------------------------- augmentation, batching


def _reference_crops(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every allowed output for one image: each crop of the zero-padded image, and its mirror."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    crops = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            crops += [crop, crop.flip(-1)]
    return crops


def test_augment_batch_is_per_image_crop_and_flip():
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = data.augment_batch(x, padding=2, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    choices = set()
    for image, result in zip(x, out, strict=True):  # slow reference: search all crops of this image
        matches = [
            i for i, crop in enumerate(_reference_crops(image, 2)) if torch.equal(crop, result)
        ]
        assert len(matches) == 1
        choices.add(matches[0])
    assert len(choices) > 10  # per-image parameters, not one crop for the whole batch


def test_augment_batch_padding_zero_only_flips_with_probability_half():
    x = torch.rand(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = data.augment_batch(x, padding=0, generator=torch.Generator().manual_seed(2))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert binomtest(int(mirrored.sum()), len(x), 0.5).pvalue > 1e-3


def test_augment_batch_is_deterministic_and_keeps_uint8():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    first = data.augment_batch(x, padding=4, generator=torch.Generator().manual_seed(3))
    again = data.augment_batch(x, padding=4, generator=torch.Generator().manual_seed(3))
    other = data.augment_batch(x, padding=4, generator=torch.Generator().manual_seed(4))
    assert first.dtype == torch.uint8 and torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_batch_on_cuda_matches_cpu():
    x = torch.rand(16, 3, 8, 8)
    cpu = data.augment_batch(x, padding=4, generator=torch.Generator().manual_seed(5))
    gpu = data.augment_batch(x.cuda(), padding=4, generator=torch.Generator().manual_seed(5))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


def _numbered(n: int) -> ImageSet:
    """Image i is filled with the value i, so batches can be checked against labels."""
    return ImageSet(
        torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4), torch.arange(n)
    )


def test_batches_cover_each_example_once_and_keep_the_last_batch():
    generator = torch.Generator().manual_seed(0)
    got = list(
        data.batches(_numbered(10), 4, generator=generator, shuffle=True, augment=False, padding=0)
    )
    assert [len(y) for _, y in got] == [4, 4, 2]
    labels = torch.cat([y for _, y in got])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
    for x, y in got:
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x[:, 0, 0, 0], y.float() / 255)  # images travel with their labels


def test_batches_in_order_and_augmentation_needs_a_generator():
    got = data.batches(_numbered(5), 2, generator=None, shuffle=False, augment=False, padding=0)
    assert torch.cat([y for _, y in got]).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        data.batches(_numbered(5), 2, generator=None, shuffle=True, augment=True, padding=4)


def test_to_float_scales_uint8_and_passes_floats():
    assert data.to_float(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist() == pytest.approx(
        [0, 0.2, 1]
    )
    floats = torch.rand(3, dtype=torch.float64)
    assert data.to_float(floats).dtype == torch.float32
    assert torch.equal(data.to_float(floats), floats.float())


def test_a_root_without_fashion_mnist_points_to_debians_copy(tmp_path, monkeypatch):
    """With data.root set, Debian's folder is not searched; the message said to install
    the package even where it was installed."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    spec = DataSpec(dataset="fashion_mnist", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install") as absent:
        data.load_splits(spec, 0)
    assert "unset data.root" not in str(absent.value)
    _write_fashion(tmp_path / "debian", gz=True, n_test=3)
    with pytest.raises(DataError) as there:
        data.load_splits(spec, 0)
    message = str(there.value)
    assert "\n" not in message and "nowhere" in message
    assert f"Debian's package has it in {tmp_path / 'debian'}: unset data.root" in message
