"""What every benchmark shares: its header, its JSON record, and the median of ratios.

A record (`benchmarks/results/<name>-<device>-<UTC time>.json`) holds the command, the
device, versions, git state, backend flags, the load on the cores, and the figures: a figure
without the machine it ran on is not a figure.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from trades_repro import store

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({os.cpu_count()} cores)"


def load_average() -> list[float]:
    """Other processes on the cores distort absolute numbers; ratios in one process less so."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def provenance(device: torch.device, flags: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": f"python {shlex.join(sys.argv)}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_description": device_name(device),
        "load_average_start": load_average(),
        "flags": flags,
        **store.environment(device),
        **store.git_state(),
    }


def header(console: Console, record: dict[str, Any]) -> None:
    console.print(f"command: {record['command']}")
    console.print(f"device: {record['device_description']}; torch {record['torch']} "
                  f"({record['torch_threads']} threads); load average "
                  f"{record['load_average_start']}; git {str(record['git_sha'])[:8]}"
                  f"{' (dirty)' if record['git_dirty'] else ''}")


def write_record(name: str, record: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """Write `record` (with its end load average) as JSON; returns the path."""
    record = {**record, "load_average_end": load_average()}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{record['device'].split(':')[0]}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def summary(values: list[float]) -> dict[str, float]:
    """Median and range of per-round figures (the median is what tables show)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
