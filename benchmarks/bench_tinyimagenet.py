"""TinyImageNet loading: decoding every JPEG vs reading the checksummed uint8 cache.

    python benchmarks/bench_tinyimagenet.py --folder /tmp/tiny-bench [--classes 200]
        [--per-class 500] [--val 10000] [--workers 2] [--rounds 2]

Generates (once; kept for later runs) a folder in the real layout, ``tiny-imagenet-200/``
with ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and ``val/images`` +
``val_annotations.txt``, of 64x64 JPEGs (smooth random colour fields plus pixel noise, about
the entropy of real photos at that size; quality 75, PIL's default). Then times, per round,
`tinyimagenet.load` with the cache removed (decode both splits with `--workers` threads and
write the cache) and again with the cache present (read + SHA-256 check), and the test split
alone from the cache (what `evaluate`/`diagnose` read).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import exit_code, header, provenance, summary, write_record
from PIL import Image
from rich.console import Console

from trades_repro import tinyimagenet


def generate(root: Path, classes: int, per_class: int, n_val: int, workers: int) -> Path:
    folder = root / tinyimagenet.FOLDER
    if (folder / "wnids.txt").is_file():
        return folder
    wnids = [f"n{i:08d}" for i in range(classes)]
    jobs = [(folder / "train" / w / "images" / f"{w}_{j}.JPEG", n_val + i * per_class + j)
            for i, w in enumerate(wnids) for j in range(per_class)]
    rows = [f"val_{j}.JPEG\t{wnids[j % classes]}\t0\t0\t63\t63" for j in range(n_val)]
    jobs += [(folder / "val" / "images" / f"val_{j}.JPEG", j) for j in range(n_val)]
    for path, _ in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=512))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")  # last: marks it complete
    return folder


def _write_jpeg(job: tuple[Path, int]) -> None:
    path, seed = job
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (64, 64), Image.BILINEAR)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (64, 64, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=75)


def measure(root: Path, workers: int, rounds: int) -> dict[str, list[float]]:
    cache = root / tinyimagenet.FOLDER / tinyimagenet.CACHE_DIR
    times: dict[str, list[float]] = {"decode_s": [], "cached_s": [], "cached_test_only_s": []}
    for _ in range(rounds):
        shutil.rmtree(cache, ignore_errors=True)
        times["decode_s"].append(_timed(lambda: tinyimagenet.load(root, False, workers=workers)))
        times["cached_s"].append(_timed(lambda: tinyimagenet.load(root, False, workers=workers)))
        times["cached_test_only_s"].append(_timed(
            lambda: tinyimagenet.load(root, False, need_train=False, workers=workers)))
    return times


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--val", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    console = Console()
    started = time.perf_counter()
    generate(args.folder, args.classes, args.per_class, args.val, args.workers)
    record = provenance(torch.device("cpu"), {"workers": args.workers})
    header(console, record)
    times = measure(args.folder, args.workers, args.rounds)
    n = args.classes * args.per_class + args.val
    record.update(name="tinyimagenet_load", images=n, generate_s=round(
        time.perf_counter() - started, 1), **{k: summary(v) for k, v in times.items()})
    for key in times:
        console.print(f"{key}: median {record[key]['median']:.2f} s over {args.rounds} rounds "
                      f"({n} images)")
    path = write_record("tinyimagenet", record, *([args.out] if args.out else []))
    console.print(f"record: {path}")
    return record


if __name__ == "__main__":
    sys.exit(exit_code(main))
