"""CI's mutation gate: the core math and the validation monitor, against a recorded kill rate.

    python tests/mutation_gate.py            # run, compare with docs/mutation_quick.json
    python tests/mutation_gate.py --record   # run and write the baseline (after killing
                                             # or explaining survivors, docs/testing.md)

Runs mutmut on a copy of the working tree (tracked and untracked, not ignored files) with the
quick subset below, so `mutants/` never lands in the checkout. Exit 1 when any module's kill
rate falls below its recorded rate (a test stopped catching something, or new code arrived
without tests), 0 otherwise. A timeout counts as killed: the mutant made the tests hang or
crawl, which the suite noticed.

Not collected by pytest (no `test_` prefix): `nox -s mutation_quick` runs it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trades_repro import store

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "docs" / "mutation_quick.json"

MODULES = ["trades_repro/metrics.py", "trades_repro/losses.py", "trades_repro/policies.py",
           "trades_repro/train.py"]
TESTS = ["tests/test_metrics.py", "tests/test_losses.py", "tests/test_validation_pinned.py",
         "tests/test_engine.py::test_policies_on_a_crafted_series",
         "tests/test_engine.py::test_policies_pick_the_first_maximum_among_eligible_epochs",
         "tests/test_engine.py::test_fosc_ok_is_at_most_the_threshold"]
# Of train.py only the validation monitor and Algorithm 1's trigger: the loop's mutants need
# end-to-end training tests, minutes each (the full run, `nox -s mutation`, has them).
MUTANTS = ["trades_repro.metrics.*", "trades_repro.losses.*", "trades_repro.policies.*",
           "trades_repro.train.x_validate__mutmut_*", "trades_repro.train.x__validate_batch__*",
           "trades_repro.train.x__healing_trigger__*"]

DETECTED = {1, 3, 24, -24, 36, 37, 152, 255, -9, -11}  # killed, timeout, type check, crash
OWN_FAILURE = 4  # the project's exit code for "our own failure": never 0 or 1


class GateError(RuntimeError):
    """The gate could not measure (mutmut did not run, config missing): exit 4, not 1."""


def main(argv: list[str] | None = None) -> int:
    try:
        return _gate(_parse(argv))
    except GateError as err:
        print(f"mutation gate: {err}", file=sys.stderr)
        return OWN_FAILURE


def _gate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutation-gate-") as tmp:
        copy = Path(tmp) / "proj"
        _copy_tree(ROOT, copy)
        _configure(copy / "pyproject.toml")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(["mutmut", "run", "--max-children", str(args.children), *MUTANTS],
                       cwd=copy, env=env, check=False, stdout=subprocess.DEVNULL)
        # mutmut's exit status does not say whether mutants survived: the meta files do
        rates = _rates(copy)
    minutes = (time.monotonic() - started) / 60
    _print(rates, minutes)
    if args.record:
        record = {"modules": rates, "minutes": round(minutes, 1)}
        store.atomic_write_bytes(BASELINE, (json.dumps(record, indent=2) + "\n").encode())
        print(f"recorded {BASELINE.relative_to(ROOT)}")
        return 0
    return _compare(rates, json.loads(BASELINE.read_text())["modules"])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the baseline")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1,
                        help="mutants tested side by side (default: one per CPU)")
    return parser.parse_args(argv)


def _copy_tree(root: Path, target: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=root, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = root / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _configure(pyproject: Path) -> None:
    """The quick subset in place of the full run's `only_mutate` and test selection."""
    text = pyproject.read_text()
    for key, value in (("only_mutate", MODULES), ("pytest_add_cli_args_test_selection", TESTS)):
        text, found = re.subn(rf"^{key} = \[.*?\]$", f"{key} = {json.dumps(value)}", text,
                              count=1, flags=re.M | re.S)
        if not found:
            raise GateError(f"no {key} in [tool.mutmut] of {pyproject.name}")
    pyproject.write_text(text)


def _rates(copy: Path) -> dict[str, dict[str, int]]:
    """Per module, of the mutants the gate selects: how many were detected, of how many."""
    rates = {}
    for module in MODULES:
        meta = copy / "mutants" / f"{module}.meta"
        if not meta.is_file():
            raise GateError(f"mutmut wrote no results for {module} (did it run?)")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        chosen = {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in MUTANTS)}
        if any(code is None for code in chosen.values()):
            raise GateError(f"mutmut left mutants of {module} unchecked")
        rates[module] = {"mutants": len(chosen),
                         "killed": sum(code in DETECTED for code in chosen.values()),
                         "survived": sorted(k for k, v in chosen.items() if v not in DETECTED)}
    return rates


def _print(rates: dict, minutes: float) -> None:
    print(f"mutation gate ({minutes:.1f} min):")
    for module, r in rates.items():
        print(f"  {module}: {r['killed']}/{r['mutants']} killed ({_rate(r):.1%})")
        for name in r["survived"]:
            print(f"    survived: {name}  (mutmut show {name})")


def _rate(record: dict) -> float:
    return record["killed"] / record["mutants"] if record["mutants"] else 1.0


def _compare(rates: dict, baseline: dict) -> int:
    worse = [f"{m}: {_rate(r):.1%} < recorded {_rate(baseline[m]):.1%}"
             for m, r in rates.items() if m in baseline and _rate(r) < _rate(baseline[m])]
    missing = [m for m in baseline if not rates.get(m, {}).get("mutants")]
    for line in worse + [f"{m}: no mutants tested" for m in missing]:
        print(f"mutation gate FAILED: {line}", file=sys.stderr)
    return 1 if worse or missing else 0


if __name__ == "__main__":
    sys.exit(main())
