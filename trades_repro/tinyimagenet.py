"""TinyImageNet-200 at scale: decode the 110,000 JPEGs once, in parallel, into a uint8 cache.

Layout (the cs231n archive): ``tiny-imagenet-200/wnids.txt``, ``train/<wnid>/images/*.JPEG``
(500 per class), ``val/images/*.JPEG`` with ``val/val_annotations.txt``; its labelled ``val/``
is our test split. Classes are in sorted-wnid order, as ``ImageFolder`` numbers them. Image
extensions are matched case-insensitively (``.JPEG``, ``.jpeg``, ``.jpg``), in ``train/`` and
for the names ``val_annotations.txt`` gives: copies made on other systems rename the files.

Cache: ``tiny-imagenet-200/.trades_repro_cache/<split>.npy`` (uint8 ``[N, 3, 64, 64]``) with
a JSON sidecar holding the SHA-256 of the array and a key of the source (every file's path,
size, mtime and label). A changed source, or an array whose checksum fails, is decoded
again; a read-only data folder is decoded every time. `train`, `evaluate` and `diagnose`
share it; the latter two read only the split they score (``need_train=False``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trades_repro.data import DataError, ImageSet

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"  # the official archive
ARCHIVE = "tiny-imagenet-200.zip"
ARCHIVE_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"  # 248,100,043 bytes; torchvision-era md5
SIZE = 64  # App. B: 64x64 images
SUFFIXES = {".jpeg", ".jpg"}
CACHE_DIR = ".trades_repro_cache"
CACHE_VERSION = 1  # bump when the array layout or the key changes
CHUNK = 256  # images per decode task: big enough to amortise scheduling, small to balance


def load(root: Path, download: bool, *, need_train: bool = True,
         workers: int | None = None) -> tuple[ImageSet | None, ImageSet, int]:
    """(train or None, test, number of classes) from ``root/tiny-imagenet-200``."""
    folder = root / FOLDER
    if not (folder / "wnids.txt").is_file() and download:
        fetch(root)
    if not (folder / "wnids.txt").is_file():
        raise DataError(f"data.root: TinyImageNet-200 not found in '{root}' (expected "
                        f"{folder}/wnids.txt); unzip {URL} there, or let us download it (a "
                        "spec's data.download: true; `diagnose --download`)")
    wnids = sorted((folder / "wnids.txt").read_text().split())  # ImageFolder's class order
    classes = {wnid: i for i, wnid in enumerate(wnids)}
    train = None
    if need_train:
        files = [(p, i) for wnid, i in classes.items() for p in train_files(folder, wnid)]
        train = cached_split(folder, "train", files, workers)
    test = cached_split(folder, "val", val_files(folder, classes), workers)
    return train, test, len(wnids)


def train_files(folder: Path, wnid: str) -> list[str]:
    """The class's image paths, sorted; plain strings, as 100,000 `Path` objects cost seconds."""
    images = folder / "train" / wnid / "images"
    try:
        names = sorted(n for n in os.listdir(images) if os.path.splitext(n)[1].lower() in SUFFIXES)
    except OSError:
        names = []
    files = [os.path.join(images, name) for name in names]
    if not files:
        raise DataError(f"data.root: no training images in '{images}' (TinyImageNet-200 "
                        f"incomplete); unzip {URL} again")
    return files


def val_files(folder: Path, classes: dict[str, int]) -> list[tuple[str, int]]:
    """val/val_annotations.txt: tab-separated `filename wnid x y w h` per line."""
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"data.root: '{annotations}' not found; unzip {URL} again")
    images = os.path.join(folder, "val", "images")
    on_disk = _names_by_case(images)
    files = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in classes:
            raise DataError(f"data.root: '{annotations}' line {number}: unknown or missing wnid")
        name = on_disk.get(fields[0]) or on_disk.get(_fold(fields[0]), fields[0])
        files.append((os.path.join(images, name), classes[fields[1]]))
    return files


def _names_by_case(images: str) -> dict[str, str]:
    """val/images' files by their own and their `_fold`ed name, listed once: a copy that
    renamed the JPEGs (``val_0.JPEG`` -> ``val_0.jpeg``) kept the annotations' old names. A
    name found neither way stays as written, and `source_key` reports it missing."""
    try:
        names = sorted(os.listdir(images))
    except OSError:
        return {}
    return {_fold(name): name for name in names} | {name: name for name in names}


def _fold(name: str) -> str:
    """The name with case and the JPEG suffix spellings (``.JPEG``, ``.jpeg``, ``.jpg``) folded."""
    stem, suffix = os.path.splitext(name.lower())
    return stem + (".jpeg" if suffix in SUFFIXES else suffix)


# ------------------------------------------------------------------------------------ cache


def cached_split(folder: Path, name: str, files: list[tuple[str, int]],
                 workers: int | None = None) -> ImageSet:
    """The split's images from the cache when it is current, else decoded (and cached)."""
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    key = source_key(folder, files)
    cache = folder / CACHE_DIR
    images = read_cache(cache, name, key)
    if images is None:
        images = decode(files, workers)
        write_cache(cache, name, key, images)
    return ImageSet(torch.from_numpy(images), labels)


def source_key(folder: Path, files: list[tuple[str, int]]) -> str:
    """SHA-256 over each file's relative path, size, mtime and label: a changed, added,
    removed or relabelled image changes it; reading the bytes would cost a decode's I/O."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    skip = len(str(folder)) + 1
    for name, label in files:
        try:
            stat = os.stat(name)
        except OSError:
            raise DataError(f"data.root: '{name}' not found; unzip {URL} again") from None
        digest.update(f"{name[skip:]}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def read_cache(cache: Path, name: str, key: str) -> np.ndarray | None:
    """The cached array if its sidecar names this source and its checksum holds."""
    try:
        meta = json.loads((cache / f"{name}.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("source") != key:
            return None
        images = np.load(cache / f"{name}.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # EOFError: an empty .npy (a torn write)
        return None
    if _sha256(images) != meta.get("sha256"):
        return None  # torn or altered: decode again
    return images


def write_cache(cache: Path, name: str, key: str, images: np.ndarray) -> None:
    """Array first, then its sidecar, each by temp file + rename; best effort (a read-only
    data folder just means decoding every time)."""
    meta = {"version": CACHE_VERSION, "source": key, "sha256": _sha256(images),
            "shape": list(images.shape), "dtype": str(images.dtype)}
    try:
        cache.mkdir(exist_ok=True)
        _atomic(cache / f"{name}.npy", lambda handle: np.save(handle, images))
        _atomic(cache / f"{name}.json", lambda handle: handle.write(json.dumps(meta).encode()))
    except OSError:
        pass


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # data on disk before the rename names it (no 0-byte file)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared data folder's cache
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(images: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(images)).cast("B")).hexdigest()


# ----------------------------------------------------------------------------------- decode


def decode(files: list[tuple[str, int]], workers: int | None = None) -> np.ndarray:
    """Decode every JPEG into one uint8 [N, 3, 64, 64] array with a pool of threads.

    Threads, not processes: Pillow releases the GIL while it decodes, and threads write
    straight into the shared array (processes would pickle 1.2 GB back).
    """
    images = np.empty((len(files), 3, SIZE, SIZE), dtype=np.uint8)
    starts = range(0, len(files), CHUNK)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(lambda s: _decode_chunk(files, images, s), starts):
            pass  # map re-raises the first worker's DataError here
    return images


def _decode_chunk(files: list[tuple[str, int]], out: np.ndarray, start: int) -> None:
    for i in range(start, min(start + CHUNK, len(files))):
        out[i] = _decode_one(files[i][0])


def _decode_one(path: str) -> np.ndarray:
    try:  # PIL, as ImageFolder (torchvision.io decoding is deprecated since 0.29)
        with Image.open(path) as jpeg:
            image = np.asarray(jpeg.convert("RGB")).transpose(2, 0, 1)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"data.root: cannot decode '{path}' ({first})") from None
    if image.shape != (3, SIZE, SIZE):
        raise DataError(f"data.root: '{path}' is {tuple(image.shape)}, expected 3x64x64")
    return image


# --------------------------------------------------------------------------------- download


def fetch(root: Path) -> None:
    """Download the official archive (or use one the user placed in `root`), check its MD5,
    unpack it. A downloaded archive is deleted after unpacking; the user's own is kept."""
    from torchvision.datasets.utils import check_integrity, download_url, extract_archive

    archive, own = root / ARCHIVE, (root / ARCHIVE).is_file()
    try:
        if not own:
            download_url(URL, str(root), filename=ARCHIVE, md5=ARCHIVE_MD5)
        if not check_integrity(str(archive), ARCHIVE_MD5):
            raise DataError(f"data.download: '{archive}' fails its MD5 check (expected "
                            f"{ARCHIVE_MD5}); delete it and download again")
        extract_archive(str(archive), str(root))
    except (RuntimeError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"data.download: fetching TinyImageNet into '{root}' failed ({first}); "
                        f"place the unzipped {URL} there by hand") from None
    finally:
        if not own:
            archive.unlink(missing_ok=True)
