"""nox runs exactly what CI runs.

`tests` uses the project's own environment (python=False): torch is several GB and is
installed once by `.ci/run` / the README, never a second time into a nox virtualenv.
Only `lint` is isolated, because ruff is small and self-contained.
"""

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.error_on_external_run = False


def _workers() -> list[str]:
    """pytest-xdist over the cores this process may use, at most 4: each test runs on one
    thread (tests/conftest.py), so 2 cores run the suite in about 60 % of the time; file by
    file, so a module's trained fixture is built once. `nox -- -n 0` runs it serially."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return ["-n", str(max(1, min(cores or 1, 4))), "--dist", "loadfile"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The whole suite (unit, property and marked end-to-end tests)."""
    session.run("python", "-m", "pytest", "-m", "not gpu", *_workers(),
                *(session.posargs or ["-q"]))


@nox.session(python=False, name="fast")
def fast(session: nox.Session) -> None:
    """Everything except end-to-end tests marked slow, for quick local loops."""
    session.run("python", "-m", "pytest", "-q", "-m", "not slow and not gpu", *_workers(),
                *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "trades_repro", "tests", "noxfile.py", "benchmarks")


@nox.session(python=False)
def gpu(session: nox.Session) -> None:
    """The GPU smoke test (tests marked gpu; never in CI): train with every knob, SIGKILL,
    resume, evaluate, diagnose; its record goes to benchmarks/results/ with the device named.
    On a lent GPU, `benchmarks/gpu_session.sh` runs it first of its time-boxed steps; here,
    `DRY=1 bash benchmarks/gpu_session.sh` rehearses them after CPU pre-checks of the real
    specs (benchmarks/gpu_precheck.py)."""
    session.run("python", "-m", "pytest", "-m", "gpu", "-v", "-s", *session.posargs)


@nox.session(python=False)
def mutation(session: nox.Session) -> None:
    """Mutation testing of every core module, per group against the tests that own it, vs the
    kill rates in docs/mutation_full.json (tests/mutation_gate.py --full; docs/testing.md).
    `-- --group NAME --keep DIR` runs one group and keeps its mutants for `mutmut show`."""
    session.run("python", "-m", "pip", "install", "--quiet", "-e", ".[mutation]")
    session.run("python", "tests/mutation_gate.py", "--full", *session.posargs)


@nox.session(python=False)
def mutation_quick(session: nox.Session) -> None:
    """CI's gate: the core math and validation monitor's mutants, against the recorded kill
    rate in docs/mutation_quick.json (tests/mutation_gate.py; `-- --record` rewrites it)."""
    session.run("python", "-m", "pip", "install", "--quiet", "-e", ".[mutation]")
    session.run("python", "tests/mutation_gate.py", *session.posargs)


BENCHMARKS = ("bench_train_paths.py", "bench_monitor.py", "bench_autoattack.py",
              "bench_aa_cost.py")


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """Every benchmark: ratio tables printed, JSON records under benchmarks/results/.

    `nox -s bench -- --quick` is the CPU smoke run (< 5 minutes); other arguments are
    passed to every script (e.g. `--threads 2`).
    """
    for script in BENCHMARKS:
        session.run("python", f"benchmarks/{script}", *session.posargs)
