"""TinyImageNet at scale: parallel decode, the checksummed cache, test-only reads, extension
case, and the MD5-checked download; on tiny folders in the real layout."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trades_repro import data, tinyimagenet
from trades_repro.data import DataError
from trades_repro.spec import DataSpec


def _jpeg(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path, quality=95)


def _write(root: Path, suffix: str = ".JPEG", per_class: int = 3) -> Path:
    folder = root / tinyimagenet.FOLDER
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("n02\nn01\n")
    for c, wnid in enumerate(("n01", "n02")):
        for j in range(per_class):
            _jpeg(folder / f"train/{wnid}/images/{wnid}_{j}{suffix}", (40 * j, 100 * c, 50))
    rows = []
    for j in range(4):
        _jpeg(folder / f"val/images/val_{j}{suffix}", (60 * j, 20, 200))
        rows.append(f"val_{j}{suffix}\tn0{1 + j % 2}\t0\t0\t63\t63")
    (folder / "val/val_annotations.txt").write_text("\n".join(rows) + "\n")
    return folder


def _spec(root: Path) -> DataSpec:
    return DataSpec(dataset="tinyimagenet", root=str(root), validation="test")


def _no_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache is current")

    monkeypatch.setattr(tinyimagenet, "decode", refuse)


@pytest.mark.parametrize("suffix", [".JPEG", ".jpeg", ".jpg"])
def test_extensions_match_in_any_case(tmp_path, suffix):
    _write(tmp_path, suffix)
    splits = data.load_splits(_spec(tmp_path), 0)
    assert len(splits.train.labels) == 6 and len(splits.test.labels) == 4


def test_parallel_decode_equals_serial(tmp_path):
    folder = _write(tmp_path, per_class=40)  # 80 images: several chunks
    files = [(p, 0) for p in sorted(folder.glob("train/*/images/*"))]
    monkey_chunk = tinyimagenet.CHUNK
    try:
        tinyimagenet.CHUNK = 7
        assert np.array_equal(tinyimagenet.decode(files, 1), tinyimagenet.decode(files, 3))
    finally:
        tinyimagenet.CHUNK = monkey_chunk


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    _write(tmp_path)
    first = data.load_splits(_spec(tmp_path), 0)
    _no_decoding(monkeypatch)
    second = data.load_splits(_spec(tmp_path), 0)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    meta = (tmp_path / tinyimagenet.FOLDER / tinyimagenet.CACHE_DIR / "train.json").read_text()
    assert hashlib.sha256(first.train.images.numpy().tobytes()).hexdigest() in meta


def test_a_changed_source_image_is_decoded_again(tmp_path):
    folder = _write(tmp_path)
    data.load_splits(_spec(tmp_path), 0)
    path = folder / "train/n02/images/n02_0.JPEG"
    _jpeg(path, (250, 250, 250))
    os.utime(path, ns=(1, 1))  # a new size and mtime: the source key changes
    splits = data.load_splits(_spec(tmp_path), 0)
    assert splits.train.images[3].float().mean() > 240


def test_a_corrupt_cache_fails_its_checksum_and_is_rebuilt(tmp_path):
    _write(tmp_path)
    good = data.load_splits(_spec(tmp_path), 0).train.images.clone()
    cached = tmp_path / tinyimagenet.FOLDER / tinyimagenet.CACHE_DIR / "train.npy"
    raw = bytearray(cached.read_bytes())
    raw[-1] ^= 0xFF
    cached.write_bytes(bytes(raw))
    assert torch.equal(data.load_splits(_spec(tmp_path), 0).train.images, good)
    assert cached.read_bytes()[-1] == raw[-1] ^ 0xFF  # rewritten with the good array


def test_an_empty_cache_file_is_decoded_again(tmp_path):
    """A 0-byte .npy (a torn write behind a good sidecar) made np.load raise EOFError."""
    _write(tmp_path)
    good = data.load_splits(_spec(tmp_path), 0).test.images.clone()
    cached = tmp_path / tinyimagenet.FOLDER / tinyimagenet.CACHE_DIR / "val.npy"
    cached.write_bytes(b"")
    assert torch.equal(data.load_splits(_spec(tmp_path), 0).test.images, good)
    assert cached.stat().st_size > 0  # rewritten


def test_cache_files_are_on_disk_before_they_are_renamed(tmp_path, monkeypatch):
    synced, renamed = [], []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(len(renamed)))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(b), real_replace(a, b)))
    _write(tmp_path)
    data.load_splits(_spec(tmp_path), 0)
    assert len(renamed) == 4  # train and val: array and sidecar each
    assert synced == [0, 1, 2, 3]  # each file synced before its own rename


def test_val_names_resolve_when_files_were_renamed_but_annotations_not(tmp_path):
    """A copy that renamed val_0.JPEG to val_0.jpeg leaves val_annotations.txt as it was."""
    folder = _write(tmp_path, ".JPEG")
    expected = data.load_splits(_spec(tmp_path), 0).test.images.clone()
    for path in (folder / "val/images").iterdir():
        path.rename(path.with_suffix(".jpeg"))
    assert "val_0.JPEG" in (folder / "val/val_annotations.txt").read_text()
    assert torch.equal(data.load_splits(_spec(tmp_path), 0).test.images, expected)


def test_a_val_image_missing_under_any_case_is_still_named(tmp_path):
    folder = _write(tmp_path)
    (folder / "val/images/val_2.JPEG").unlink()
    with pytest.raises(DataError, match=r"val_2\.JPEG' not found"):
        data.load_splits(_spec(tmp_path), 0)


def test_a_read_only_data_folder_still_loads(tmp_path, monkeypatch):
    _write(tmp_path)

    def read_only(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tinyimagenet, "_atomic", read_only)
    assert len(data.load_splits(_spec(tmp_path), 0).train.labels) == 6


def test_evaluation_reads_only_the_test_split(tmp_path, monkeypatch):
    _write(tmp_path)

    def no_train(*args):
        raise AssertionError("listed training images")

    monkeypatch.setattr(tinyimagenet, "train_files", no_train)
    splits = data.load_splits(_spec(tmp_path), 0, train=False)
    assert len(splits.train.labels) == 0 and splits.shape == (3, 64, 64)
    assert len(splits.test.labels) == 4 and splits.val is splits.test
    assert not (tmp_path / tinyimagenet.FOLDER / tinyimagenet.CACHE_DIR / "train.npy").exists()


def _zip_of(tmp_path: Path) -> Path:
    source = _write(tmp_path / "src")
    archive = tmp_path / tinyimagenet.ARCHIVE
    with zipfile.ZipFile(archive, "w") as handle:
        for path in source.rglob("*"):
            handle.write(path, path.relative_to(source.parent))
    return archive


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_is_md5_checked_then_deleted(tmp_path, monkeypatch):
    archive = _zip_of(tmp_path)
    monkeypatch.setattr(tinyimagenet, "ARCHIVE_MD5", _md5(archive))
    root = tmp_path / "root"

    def fake_download(url, folder, filename, md5):
        assert url == tinyimagenet.URL and md5 == tinyimagenet.ARCHIVE_MD5
        (Path(folder) / filename).parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / filename).write_bytes(archive.read_bytes())

    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_download)
    spec = DataSpec(dataset="tinyimagenet", root=str(root), download=True, validation="test")
    assert len(data.load_splits(spec, 0).test.labels) == 4
    assert not (root / tinyimagenet.ARCHIVE).exists()  # not kept unless the user's own


def test_a_users_archive_is_checked_and_kept(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    archive = _zip_of(tmp_path)
    (root / tinyimagenet.ARCHIVE).write_bytes(archive.read_bytes())
    spec = DataSpec(dataset="tinyimagenet", root=str(root), download=True)
    with pytest.raises(DataError, match=r"fails its MD5 check \(expected 90528d7c"):
        data.load_splits(spec, 0)
    monkeypatch.setattr(tinyimagenet, "ARCHIVE_MD5", _md5(archive))
    data.load_splits(spec.model_copy(update={"validation": "test"}), 0)
    assert (root / tinyimagenet.ARCHIVE).is_file()


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    spec = DataSpec(dataset="tinyimagenet", root=str(tmp_path), download=True)
    with pytest.raises(DataError) as info:
        data.load_splits(spec, 0)
    assert "\n" not in str(info.value) and "place the unzipped" in str(info.value)


def test_benchmark_generates_the_real_layout_and_records_both_times(tmp_path):
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # the script imports its shared `common` module
    spec = importlib.util.spec_from_file_location("bench_tinyimagenet",
                                                  folder / "bench_tinyimagenet.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its process pool pickles functions by module name
    spec.loader.exec_module(bench)
    record = bench.main(["--folder", str(tmp_path / "data"), "--classes", "2", "--per-class",
                         "3", "--val", "4", "--rounds", "1", "--out", str(tmp_path / "out")])
    assert record["images"] == 10 and record["decode_s"]["median"] > 0
    assert {"cached_s", "cached_test_only_s"} <= record.keys()
    splits = data.load_splits(_spec(tmp_path / "data"), 0)  # the loader reads what it wrote
    assert splits.num_classes == 2 and len(splits.train.labels) == 6
