"""Pack the real data a lent GPU machine needs: the head of Fashion-MNIST, in its IDX format.

    python benchmarks/gpu_pack.py [--source DIR] [--out .gpu/fashion-mnist]
        [--train 5000] [--test 1000]

The GPU machine has no internet and no datasets, and what travels to it is capped (64 MiB
with the wheels), so the whole of Fashion-MNIST (30 MB) cannot go. `bench_gate.py` trains on
4,096 images and validates on 500 held out of the training file, so the first 5,000
training images (and 1,000 test images) suffice. The files keep the original names and
format (gzipped IDX, only the first dimension shortened), so `data.root` reads them through
the real loader. `benchmarks/gpu_session.sh` passes them with `--data-root`.
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
from math import prod
from pathlib import Path

from common import exit_code

from trades_repro import store
from trades_repro.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES


def idx_head(raw: bytes, n: int) -> bytes:
    """The first `n` records of an IDX file (magic, big-endian dims, unsigned bytes)."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    item = prod(dims[1:])
    if len(raw) != header + dims[0] * item:
        raise ValueError(f"IDX file of {len(raw)} bytes does not match its dims {dims}")
    n = min(n, dims[0])
    return raw[:4] + struct.pack(f">{ndim}I", n, *dims[1:]) + raw[header:header + n * item]


def pack(source: Path, out: Path, n_train: int, n_test: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem in FASHION_MNIST_FILES:
        plain, zipped = source / stem, source / f"{stem}.gz"
        if plain.is_file():
            raw = plain.read_bytes()
        elif zipped.is_file():
            raw = gzip.decompress(zipped.read_bytes())
        else:
            raise FileNotFoundError(f"{stem}[.gz] not in {source}")
        head = idx_head(raw, n_train if stem.startswith("train") else n_test)
        target = out / f"{stem}.gz"
        store.atomic_write_bytes(target, gzip.compress(head, mtime=0))  # no half file
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--out", type=Path, default=Path(".gpu/fashion-mnist"))
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        parser.error("--train and --test must be positive")
    try:
        written = pack(args.source, args.out, args.train, args.test)
    except (OSError, ValueError) as err:
        print(f"gpu_pack: {err}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files, {size / 2**20:.1f} MiB, to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main))
