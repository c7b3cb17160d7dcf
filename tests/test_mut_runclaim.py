"""runclaim.py: which runs a set of claims needs, what is left of each, its cost, and how
failures and property tests are reported (issue 21, mutation).

Nothing trains here: run folders are fabricated (claimsutil), executors are a recorder, and
the property tests run in a subprocess on a three-test file written by the test. Expected
plans, hours and outcomes are written from the inputs by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from claimsutil import arm, claim, claims_folder, write_run

from trades_repro import runclaim as rc
from trades_repro import runlock
from trades_repro.claims import load_catalogue
from trades_repro.errors import BadInput, Inconclusive
from trades_repro.executors import FAILED_FILE, JOB_FILE, Outcome

RATE = {"expected": {"k": 1, "n": 2}, "test": {"name": "fisher_exact"}}


def _catalogue(tmp_path: Path, arms: dict, claims: list[dict]):
    return load_catalogue(claims_folder(tmp_path, arms, claims))


def test_run_claims_constants_are_the_documented_ones():
    assert rc.GPU_TIERS == ("reduced", "full")
    assert rc.PROPERTY_TIMEOUT_S == 1800
    assert rc.DEVICE_KINDS == ("cpu", "h100")
    assert rc.COSTS_FILE == Path(rc.__file__).resolve().parents[1] / "spec" / "costs.yaml"


# ------------------------------------------------------------------------------------ plan


def test_a_plan_lists_each_spec_once_with_its_arms_and_policies(tmp_path):
    """Arms a and b are the same configuration (one run per seed, two arms); c differs.
    b judges its `best_pgd10_fosc_ok` checkpoint."""
    arms = {
        "a": arm(seeds=2),
        "b": {**arm(seeds=2), "policy": "best_pgd10_fosc_ok"},
        "c": arm(seeds=1, **{"method.beta": 5}),
    }
    claims = [
        claim("table_9.x", "instability_rate", arm="a", **RATE),
        claim("table_9.y", "trend", arms=["b", "c"], test={"name": "fisher"}),
        claim("table_9.z", "instability_rate", arm="a", **RATE),
    ]
    catalogue = _catalogue(tmp_path, arms, claims)
    runs = rc.plan(catalogue, list(catalogue.entries), "full", tmp_path / "runs")
    a = catalogue.specs("a", "full")
    (c,) = catalogue.specs("c", "full")
    assert [(r.digest, r.arms, r.policies, r.state) for r in runs] == [
        (a[0].digest(), ("a", "b"), ("best_pgd10", "best_pgd10_fosc_ok"), "train"),
        (a[1].digest(), ("a", "b"), ("best_pgd10", "best_pgd10_fosc_ok"), "train"),
        (c.digest(), ("c",), ("best_pgd10",), "train"),
    ]
    only_b = rc.plan(catalogue, [catalogue.by_id["table_9.y"]], "full", tmp_path / "runs")
    assert [(r.arms, r.policies) for r in only_b][0] == (("b",), ("best_pgd10_fosc_ok",))
    assert rc.PlannedRun(c, ("c",), "train").policies == ("best_pgd10",)


THREE = {"evaluation.attacks": ["pgd10", "square", "autoattack"]}  # what write_run records


def _one(tmp_path):
    catalogue = _catalogue(
        tmp_path,
        {"a": arm(seeds=1, **THREE)},
        [claim("table_9.x", "instability_rate", arm="a", **RATE)],
    )
    (spec,) = catalogue.specs("a", "full")
    return catalogue, spec, tmp_path / "runs"


def _state(catalogue, runs):
    (run,) = rc.plan(catalogue, list(catalogue.entries), "full", runs)
    return run.state


def test_a_runs_state_is_train_resume_failed_evaluate_or_done(tmp_path):
    catalogue, spec, runs = _one(tmp_path)
    folder = runs / spec.digest()
    assert _state(catalogue, runs) == "train"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"")
    assert _state(catalogue, runs) == "resume"
    (folder / FAILED_FILE).write_text(json.dumps({"error": "diverged"}))
    assert _state(catalogue, runs) == "failed"
    write_run(runs, spec, drop=("square",))  # finished, Square missing: still failed.json
    assert _state(catalogue, runs) == "failed"
    (folder / FAILED_FILE).unlink()
    assert _state(catalogue, runs) == "evaluate"
    write_run(runs, spec)
    (folder / FAILED_FILE).write_text(json.dumps({"error": "old"}))
    assert _state(catalogue, runs) == "done"  # finished and evaluated beats an old failure


def test_evaluated_needs_every_policy_every_attack_and_the_specs_settings(tmp_path):
    _, spec, runs = _one(tmp_path)
    folder = write_run(runs, spec)
    both = ("best_pgd10", "best_pgd10_fosc_ok")
    assert rc.is_evaluated(folder, spec, ("best_pgd10",))
    assert not rc.is_evaluated(folder, spec, both)
    write_run(runs, spec, folder="fosc", policy="best_pgd10_fosc_ok")
    evals = json.loads((folder / "eval.json").read_text())
    other = json.loads((runs / "fosc" / "eval.json").read_text())["checkpoints"]
    evals["checkpoints"].update({k + "2": v | {"key": k + "2"} for k, v in other.items()})
    (folder / "eval.json").write_text(json.dumps(evals))
    assert rc.is_evaluated(folder, spec, both)
    more = spec.model_copy(
        update={
            "evaluation": spec.evaluation.model_copy(
                update={"attacks": ("pgd10", "square", "autoattack", "apgd-ce")}
            )
        }
    )
    assert not rc.is_evaluated(folder, more, ("best_pgd10",))
    budget = spec.model_copy(
        update={"evaluation": spec.evaluation.model_copy(update={"square_queries": 1000})}
    )
    assert not rc.is_evaluated(folder, budget, ("best_pgd10",))
    (folder / "eval.json").unlink()
    assert not rc.is_evaluated(folder, spec, ("best_pgd10",))
    assert rc.is_evaluated(folder, spec, ())  # nothing asked: nothing missing


# ------------------------------------------------------------------------------------ cost


def _planned(tmp_path, states, epochs=10):
    catalogue = _catalogue(
        tmp_path,
        {"a": arm(seeds=len(states), **{"optim.epochs": epochs})},
        [claim("table_9.x", "instability_rate", arm="a", **RATE)],
    )
    return [
        rc.PlannedRun(s, ("a",), state)
        for s, state in zip(catalogue.specs("a", "full"), states, strict=True)
    ]


def _cost(device="cpu", epoch_seconds=36.0, eval_seconds=360.0, arch="small_cnn"):
    return rc.Cost(
        arch=arch,
        dataset="digits",
        device=device,
        epoch_seconds=epoch_seconds,
        eval_seconds=eval_seconds,
        source="test",
    )


def test_hours_count_epochs_and_evaluation_of_what_is_not_done(tmp_path):
    runs = _planned(tmp_path, ["train", "resume", "evaluate", "done", "failed"])
    hours, missing = rc.estimate_hours(runs, "cpu", [_cost()])
    # train, resume, failed: 10 × 36 s + 360 s each; evaluate: 360 s; done: nothing
    assert hours == pytest.approx((3 * (10 * 36 + 360) + 360) / 3600)
    assert missing == []


def test_app_g_monitoring_is_priced_per_training_epoch(tmp_path):
    plain, evaluate = _planned(tmp_path, ["train", "evaluate"])
    monitor = plain.spec.monitor.model_copy(update={"batch_metrics": True})
    monitored = [rc.PlannedRun(r.spec.model_copy(update={"monitor": monitor}), r.arms, r.state)
                 for r in (plain, evaluate)]
    hours, _ = rc.estimate_hours(monitored, "cpu", [_cost()])
    # 10 epochs × 36 s × 1.25 + 360 s; evaluating it costs what any evaluation does
    assert hours == pytest.approx((10 * 36 * 1.25 + 360 + 360) / 3600)
    assert rc.APP_G_COST == 1.25


def test_hours_name_what_the_cost_table_lacks(tmp_path):
    runs = _planned(tmp_path, ["train", "done"])
    costs = [_cost(device="h100"), _cost(arch="resnet18")]
    assert rc.estimate_hours(runs, "cpu", costs) == (0.0, ["small_cnn on digits (cpu)"])
    assert rc.estimate_hours(runs[1:], "cpu", costs) == (0.0, [])  # done: not looked up


def test_a_run_without_a_cost_entry_does_not_stop_the_sum(tmp_path):
    missing, known = _planned(tmp_path, ["train", "train"])
    cnn = known.spec.model.model_copy(update={"arch": "resnet18"})
    known = rc.PlannedRun(known.spec.model_copy(update={"model": cnn}), ("a",), "train")
    hours, absent = rc.estimate_hours([missing, known], "cpu", [_cost(arch="resnet18")])
    assert (hours, absent) == (pytest.approx((10 * 36 + 360) / 3600), ["small_cnn on digits (cpu)"])


def test_the_shipped_cost_table_is_read(tmp_path):
    table = yaml.safe_load(rc.COSTS_FILE.read_text())["costs"]
    costs = rc.load_costs()
    assert [(c.arch, c.dataset, c.device, c.epoch_seconds, c.eval_seconds) for c in costs] == [
        (c["arch"], c["dataset"], c["device"], c["epoch_seconds"], c["eval_seconds"]) for c in table
    ]
    path = tmp_path / "costs.yaml"
    path.write_text(yaml.safe_dump({"costs": [_cost().model_dump()]}))
    assert rc.load_costs(path) == [_cost()]
    runs = _planned(tmp_path / "p", ["train"])
    digits = next(c for c in table if (c["arch"], c["device"]) == ("small_cnn", "cpu"))
    assert rc.estimate_hours(runs, "cpu")[0] == pytest.approx(
        (10 * digits["epoch_seconds"] + digits["eval_seconds"]) / 3600
    )


def test_by_arm_groups_runs_under_their_first_arm(tmp_path):
    runs = _planned(tmp_path, ["train", "done", "evaluate"])
    shared = rc.PlannedRun(runs[0].spec.model_copy(update={"seed": 7}), ("b", "a"), "train")
    table = yaml.safe_load(rc.COSTS_FILE.read_text())["costs"]
    digits = next(c for c in table if (c["arch"], c["device"]) == ("small_cnn", "cpu"))
    one = 10 * digits["epoch_seconds"] + digits["eval_seconds"]
    rows = rc.by_arm([*runs, shared], "cpu")
    assert [(arm_, n, pending) for arm_, n, pending, _ in rows] == [("a", 3, 2), ("b", 1, 1)]
    assert [hours for *_, hours in rows] == [
        pytest.approx((one + digits["eval_seconds"]) / 3600),
        pytest.approx(one / 3600),
    ]


# ---------------------------------------------------------------------------------- device


@pytest.mark.parametrize("tier", ["reduced", "full"])
def test_gpu_tiers_refuse_to_crawl_on_a_cpu(monkeypatch, tier):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(Inconclusive) as err:
        rc.require_device(tier)
    assert str(err.value) == (
        f"tier '{tier}' needs a CUDA GPU and none is visible; use "
        "--dry-run to see the plan, or --tier instant on a CPU"
    )
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    rc.require_device(tier)


@pytest.mark.parametrize("tier", ["instant", "cpu"])
def test_cpu_tiers_run_without_a_gpu(monkeypatch, tier):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rc.require_device(tier)


# --------------------------------------------------------------------------------- execute


class Recorder:
    """An executor that runs nothing and answers each job with a given status."""

    def __init__(self, statuses: dict[str, tuple[str, str]]):
        self.statuses, self.jobs = statuses, []

    def run(self, work, report):
        self.jobs = work
        return [Outcome(job.digest, *self.statuses.get(job.digest, ("done", ""))) for job in work]


def _execute(tmp_path, states, statuses=None, retry=False):
    runs = _planned(tmp_path, states)
    for run in runs:
        if run.state == "failed":
            folder = tmp_path / "runs" / run.digest
            folder.mkdir(parents=True, exist_ok=True)
            (folder / FAILED_FILE).write_text(json.dumps({"error": "diverged"}))
    said, executor = [], Recorder({runs[i].digest: s for i, s in (statuses or {}).items()})
    retry_kw = {"retry_failed": True} if retry else {}  # the default must be not to retry
    failures = rc.execute(
        runs, tmp_path / "runs", report=said.append, progress=False, executor=executor, **retry_kw
    )
    return runs, executor.jobs, [(r.digest, m) for r, m in failures], said


def test_execute_hands_over_what_is_not_done_and_reports_earlier_failures(tmp_path):
    runs, jobs, failures, said = _execute(tmp_path, ["train", "done", "failed", "evaluate"])
    assert [j.digest for j in jobs] == [runs[0].digest, runs[3].digest]
    job = jobs[0]
    assert (job.spec, job.runs_dir, job.policies, job.label) == (
        runs[0].spec.model_dump(mode="json"),
        str(tmp_path / "runs"),
        ("best_pgd10",),
        "a, seed 0: train",
    )
    message = "failed earlier: diverged (--retry-failed retries it)"
    assert failures == [(runs[2].digest, message)]
    assert said == [f"{runs[2].digest} (a, seed 2: failed): {message}"]


def test_a_shared_runs_label_names_all_its_arms(tmp_path):
    (run,) = _planned(tmp_path, ["resume"])
    executor = Recorder({})
    shared = rc.PlannedRun(run.spec, ("a", "b"), "resume")
    rc.execute([shared], tmp_path / "runs", report=print, progress=False, executor=executor)
    assert executor.jobs[0].label == "a, b, seed 0: resume"


def test_execute_retries_failed_runs_when_asked(tmp_path):
    runs, jobs, failures, said = _execute(tmp_path, ["failed"], retry=True)
    assert [j.digest for j in jobs] == [runs[0].digest] and jobs[0].label == "a, seed 0: failed"
    assert failures == [] and said == []


def test_execute_collects_failed_and_lost_runs_and_reports_failed_and_busy(tmp_path):
    statuses = {
        0: ("failed", "nan loss"),
        1: ("lost", "gone"),
        2: ("busy", "locked"),
        3: ("done", ""),
    }
    runs, _, failures, said = _execute(tmp_path, ["train"] * 4, statuses)
    assert failures == [(runs[0].digest, "nan loss"), (runs[1].digest, "gone")]
    assert said == [f"  {runs[0].digest} failed: nan loss", f"  {runs[2].digest} busy: locked"]


def test_execute_raises_once_every_run_has_ended_when_one_crashed(tmp_path):
    statuses = {0: ("failed", "nan"), 1: ("crashed", "KeyError: x"), 2: ("crashed", "second")}
    runs = _planned(tmp_path, ["train"] * 3)
    executor = Recorder({runs[i].digest: s for i, s in statuses.items()})
    with pytest.raises(RuntimeError) as err:
        rc.execute(
            runs, tmp_path / "runs", report=lambda line: None, progress=False, executor=executor
        )
    assert str(err.value) == f"2 run(s) crashed; first: {runs[1].digest}: KeyError: x"
    assert len(executor.jobs) == 3


def test_execute_defaults_to_inline(tmp_path, monkeypatch):
    seen = {}

    class FakeInline:
        def __init__(self, progress):
            seen["progress"] = progress

        def run(self, work, report):
            seen["work"] = [job.digest for job in work]
            return []

    monkeypatch.setattr(rc, "Inline", FakeInline)
    runs = _planned(tmp_path, ["train"])
    assert rc.execute(runs, tmp_path / "runs", report=print, progress=True) == []
    assert seen == {"progress": True, "work": [runs[0].digest]}


# ------------------------------------------------------------------------------ properties


PROPERTY_TESTS = """
import pytest

def test_passes():
    pass

def test_fails():
    assert False

@pytest.mark.skip(reason="no")
def test_skipped():
    pass

@pytest.mark.parametrize("x", [1, 2])
def test_half(x):
    assert x == 1

@pytest.fixture
def broken():
    raise RuntimeError("fixture")

def test_errors(broken):
    pass
"""


def _property(claim_id: str, node: str) -> dict:
    return claim(claim_id, "property", test={"name": "pytest", "node": node})


def _properties_root(tmp_path):
    root = tmp_path / "root"
    (root / "tests" / "sub").mkdir(parents=True)
    (root / "tests" / "sub" / "test_props.py").write_text(PROPERTY_TESTS)
    return root


def test_property_claims_record_their_pytest_outcome(tmp_path, monkeypatch):
    monkeypatch.setattr(rc.store, "git_state", lambda: {"git_sha": "abc", "git_dirty": False})
    root = _properties_root(tmp_path)
    node = "tests/sub/test_props.py::"
    names = {
        "passes": "passed",
        "fails": "failed",
        "skipped": "skipped",
        "half": "failed",
        "errors": "failed",
    }
    claims = [_property(f"table_9.{n}", node + f"test_{n}") for n in names]
    catalogue = _catalogue(tmp_path, {"a": arm()}, claims)
    said = []
    rc.run_properties(list(catalogue.entries), tmp_path / "runs", said.append, root=root)
    assert said[0] == "property tests: 5 pytest node(s), alongside the runs"
    assert sorted(said[1:]) == sorted(f"  table_9.{n}: {o}" for n, o in names.items())
    for name, outcome in names.items():
        record = json.loads(
            (tmp_path / "runs" / "_properties" / f"table_9.{name}.json").read_text()
        )
        assert {k: record[k] for k in ("claim", "node", "outcome", "git_sha", "git_dirty")} == {
            "claim": f"table_9.{name}",
            "node": node + f"test_{name}",
            "outcome": outcome,
            "git_sha": "abc",
            "git_dirty": False,
        }
        assert record["seconds"] > 0 and record["finished"]
    log = (tmp_path / "runs" / "_properties" / "pytest.log").read_text()
    assert "RuntimeError: fixture" in log and "2 failed, 2 passed, 1 skipped, 1 error" in log


def test_property_records_take_the_childs_seconds_and_default_to_not_collected(
    tmp_path, monkeypatch
):
    class Silent:  # a pytest whose report names none of the nodes
        def __init__(self, nodes, root, log):
            self.seconds = 3.5

        def outcomes(self):
            return {}

    monkeypatch.setattr(rc, "PytestChild", Silent)
    node = "tests/test_metrics.py::test_sgcs"
    catalogue = _catalogue(tmp_path, {"a": arm()}, [_property("table_9.p", node)])
    rc.run_properties(list(catalogue.entries), tmp_path / "runs", lambda line: None)
    record = json.loads((tmp_path / "runs" / "_properties" / "table_9.p.json").read_text())
    assert (record["outcome"], record["seconds"]) == ("not collected", 3.5)


class FakePopen:
    """subprocess.Popen as PytestChild uses it: records its call, writes no report."""

    calls: list = []

    def __init__(self, args, **kwargs):
        FakePopen.calls.append((args, kwargs))
        FakePopen.last, self.killed = self, False

    def wait(self, timeout=None):
        if self.returncode is None and not self.killed:
            raise subprocess.TimeoutExpired("pytest", timeout)
        return self.returncode

    def kill(self):
        self.killed = True


def _fake_popen(monkeypatch, returncode):
    FakePopen.calls = []
    monkeypatch.setattr(FakePopen, "returncode", returncode, raising=False)
    monkeypatch.setattr(rc.subprocess, "Popen", FakePopen)


def test_without_property_claims_no_pytest_runs(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pytest started")

    monkeypatch.setattr(rc.subprocess, "Popen", refuse)
    catalogue = _catalogue(
        tmp_path, {"a": arm()}, [claim("table_9.x", "instability_rate", arm="a", **RATE)]
    )
    said = []
    rc.run_properties(list(catalogue.entries), tmp_path / "runs", said.append)
    assert said == [] and not (tmp_path / "runs").exists()


def test_a_property_node_outside_the_checkout_is_bad_input(tmp_path):
    catalogue = _catalogue(
        tmp_path, {"a": arm()}, [_property("table_9.x", "tests/test_gone.py::test_x")]
    )
    with pytest.raises(BadInput) as err:
        rc.run_properties(list(catalogue.entries), tmp_path / "runs", print, root=tmp_path)
    assert str(err.value) == (
        f"tests/test_gone.py::test_x: no such test file under {tmp_path} "
        "(property tests need the source checkout)"
    )


def test_property_tests_that_time_out_or_leave_no_report(tmp_path, monkeypatch):
    nodes = ["tests/a.py::test_x", "tests/a.py::test_y"]
    clock = iter([100.0, 160.0, 160.5])  # started at 100 s; collected 60 s later
    monkeypatch.setattr(rc, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    _fake_popen(monkeypatch, None)  # never ends
    child = rc.PytestChild(nodes, tmp_path, tmp_path / "pytest.log")
    assert child.outcomes() == {n: "timed out" for n in nodes}
    assert child._proc.killed and child.seconds == 60.5
    args, kwargs = FakePopen.calls[0]
    assert args[1:6] == ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
    assert args[6].startswith("--junitxml=") and args[7:] == nodes
    env = kwargs.pop("env")
    assert kwargs["stdout"].name == str(tmp_path / "pytest.log")
    assert kwargs.keys() == {"cwd", "stdout", "stderr"} and kwargs["cwd"] == tmp_path
    assert kwargs["stderr"] == subprocess.STDOUT and env["PATH"] == os.environ["PATH"]
    monkeypatch.setattr(rc, "time",
                        SimpleNamespace(perf_counter=iter([1.0, 3.25, 3.25]).__next__))
    _fake_popen(monkeypatch, 3)  # pytest crashed: no junit written
    crashed = rc.PytestChild(nodes, tmp_path, tmp_path / "pytest.log")
    assert crashed.outcomes() == {n: "error (pytest exit 3)" for n in nodes}
    assert crashed.seconds == 2.2  # rounded to 0.1 s


def test_the_timeout_counts_from_the_start_of_the_property_tests(tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(rc, "time",
                        SimpleNamespace(perf_counter=iter([10.0, 1010.0, 1010.0]).__next__))
    _fake_popen(monkeypatch, None)
    monkeypatch.setattr(FakePopen, "wait", lambda self, timeout=None: waits.append(timeout) or 0)
    rc.PytestChild(["tests/a.py::test_x"], tmp_path, tmp_path / "log").outcomes()
    assert waits == [800.0]  # 1800 s in all, 1000 s of them spent training alongside
    waits.clear()
    monkeypatch.setattr(rc, "time",
                        SimpleNamespace(perf_counter=iter([0.0, 5000.0, 5000.0]).__next__))
    rc.PytestChild(["tests/a.py::test_x"], tmp_path, tmp_path / "log").outcomes()
    assert waits == [0.0]  # past it: not a second more


def test_property_tests_run_in_their_own_pytest_session(tmp_path, monkeypatch):
    """Under a pytest-xdist worker the child inherited PYTEST_XDIST_WORKER, and a plugin of
    the child (pytest-benchmark) then stopped it before any report: 'not collected'."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/x.py::test_y (call)")
    monkeypatch.setenv("PYTEST_VERSION", "9.0")
    monkeypatch.setenv("PYTEST_ADDOPTS", "-x")  # the user's own options stay
    _fake_popen(monkeypatch, 0)
    rc.PytestChild(["tests/a.py::test_x"], tmp_path, tmp_path / "log").stop()
    env = FakePopen.calls[0][1]["env"]
    assert sorted(k for k in env if k.startswith("PYTEST_")) == ["PYTEST_ADDOPTS"]


def test_property_tests_run_while_the_block_trains_and_stop_if_it_fails(tmp_path,
                                                                         monkeypatch):
    node = "tests/test_metrics.py::test_sgcs"
    catalogue = _catalogue(tmp_path, {"a": arm()}, [_property("table_9.p", node)])
    _fake_popen(monkeypatch, None)
    said = []
    with pytest.raises(KeyboardInterrupt):
        with rc.properties_alongside(list(catalogue.entries), tmp_path / "runs", said.append):
            assert len(FakePopen.calls) == 1  # started before the runs train
            raise KeyboardInterrupt
    assert said == ["property tests: 1 pytest node(s), alongside the runs"]
    assert FakePopen.last.killed
    assert not (tmp_path / "runs" / "_properties" / "table_9.p.json").exists()
    assert (tmp_path / "runs" / "_properties" / "pytest.log").is_file()


@pytest.mark.parametrize(
    ("results", "outcome"),
    [
        ([("tests.sub.test_p", "test_x", "passed")], "passed"),
        (
            [
                ("tests.sub.test_p", "test_x[1]", "passed"),
                ("tests.sub.test_p", "test_x[2]", "skipped"),
            ],
            "skipped",
        ),
        (
            [
                ("tests.sub.test_p", "test_x[1]", "skipped"),
                ("tests.sub.test_p", "test_x[2]", "failed"),
            ],
            "failed",
        ),
        ([("tests.sub.test_p", "test_xy", "failed")], "not collected"),
        ([("tests.sub.test_q", "test_x", "failed")], "not collected"),
        ([], "not collected"),
    ],
)
def test_a_nodes_outcome_is_its_worst_case(results, outcome):
    assert rc._node_outcome("tests/sub/test_p.py::test_x", results) == outcome


def test_a_node_inside_a_class_is_reported_not_collected_never_a_crash():
    """The schema's pattern accepts `file.py::Class::test`; run-claim matches module-level
    functions only, so such a claim reads 'not collected' (see test_claims' check)."""
    results = [("tests.sub.test_p.TestX", "test_y", "passed")]
    assert rc._node_outcome("tests/sub/test_p.py::TestX::test_y", results) == "not collected"


# ------------------------------------------------------------------- running and queued
# A run another launch has: a live holder of its lock (`running`), or the SLURM job its
# job.json names still alive per one squeue call (`queued`). squeue is a fake script on the
# PATH that logs each call's arguments and answers from a table the test writes.

SQUEUE = """log="$(dirname "$0")/squeue.log"; table="$(dirname "$0")/states"
echo "$*" >> "$log"
ids=$(echo "$*" | sed -n 's/.*-j \\([^ ]*\\).*/\\1/p' | tr , ' ')
for id in $ids; do
  state=$(sed -n "s/^$id //p" "$table")
  case "$*" in *"%i %T"*) [ -n "$state" ] && echo "$id $state" ;; *) echo "$state" ;; esac
done
exit 0"""


def _squeue(tmp_path: Path, monkeypatch, states: dict[str, str]) -> Path:
    """A fake squeue knowing `states` (job -> SLURM state); returns the log of its calls."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    (folder / "squeue").write_text(f"#!/bin/sh\n{SQUEUE}\n")
    (folder / "squeue").chmod(0o755)
    (folder / "states").write_text("".join(f"{j} {s}\n" for j, s in states.items()))
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder / "squeue.log"


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _hold(run_dir: Path, **fields) -> runlock.Holder:
    """A lock as another launch leaves it: by default this live process (this host, this pid)
    as SLURM job 7_0, under another token."""
    fields = {"token": "theirs", "job_id": "7_0", "scheduler": "slurm", **fields}
    holder = dataclasses.replace(runlock.Holder.me(), **fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps(dataclasses.asdict(holder)))
    return holder


def _submitted(run_dir: Path, job_id, executor: str = "slurm") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JOB_FILE).write_text(json.dumps({"executor": executor, "job_id": job_id}))


def _specs(tmp_path: Path, seeds: int):
    catalogue = _catalogue(
        tmp_path,
        {"a": arm(seeds=seeds, **THREE)},
        [claim("table_9.x", "instability_rate", arm="a", **RATE)],
    )
    return catalogue, catalogue.specs("a", "full"), tmp_path / "runs"


def test_a_plan_names_who_has_each_run_from_one_squeue_call(tmp_path, monkeypatch):
    """Held here (the pid says it: squeue not asked), held on another host by a live SLURM
    job, held by a gone one, queued, ended, and a local job (a pid: not asked)."""
    log = _squeue(tmp_path, monkeypatch,
                  {"77": "PENDING", "78": "COMPLETED", "80_1": "RUNNING", "81_0": "FAILED"})
    catalogue, specs, runs = _specs(tmp_path, 6)
    here = _hold(runs / specs[0].digest())
    _submitted(runs / specs[1].digest(), 77)
    _submitted(runs / specs[2].digest(), 78)
    _submitted(runs / specs[3].digest(), 79, executor="local")
    _hold(runs / specs[4].digest(), host="node-b", pid=5984, pid_start=None, job_id="80_1")
    _hold(runs / specs[5].digest(), host="node-c", pid=5985, pid_start=None, job_id="81_0")
    planned = rc.plan(catalogue, list(catalogue.entries), "full", runs)
    assert [(r.digest, r.state, r.elsewhere) for r in planned] == [
        (specs[0].digest(), "running", f"{socket.gethostname()} pid {here.pid}, job 7_0"),
        (specs[1].digest(), "queued", "SLURM job 77 (PENDING)"),
        (specs[2].digest(), "train", ""),
        (specs[3].digest(), "train", ""),
        (specs[4].digest(), "running", "node-b pid 5984, job 80_1"),
        (specs[5].digest(), "train", ""),
    ]
    assert _calls(log) == ["-h -r -j 77,78,80_1,81_0 -o %i %T"]


def test_without_a_lock_or_job_the_plan_asks_squeue_nothing(tmp_path, monkeypatch):
    log = _squeue(tmp_path, monkeypatch, {})
    catalogue, specs, runs = _specs(tmp_path, 2)
    (runs / specs[0].digest()).mkdir(parents=True)
    planned = rc.plan(catalogue, list(catalogue.entries), "full", runs)
    assert [(r.state, r.elsewhere) for r in planned] == [("train", ""), ("train", "")]
    assert _calls(log) == []
    assert rc._slurm_jobs([runs / specs[0].digest(), runs / specs[1].digest()]) is None


@pytest.mark.parametrize("state", sorted(runlock.SLURM_ALIVE))
def test_a_run_is_queued_while_its_slurm_job_is_alive(tmp_path, monkeypatch, state):
    log = _squeue(tmp_path, monkeypatch, {})  # asked itself, squeue would say the job is gone
    _, (spec,), runs = _specs(tmp_path, 1)
    _submitted(runs / spec.digest(), "77_3")
    slurm = {"77_3": state}
    assert rc.assess(spec, runs, ("best_pgd10",), slurm) == ("queued", f"SLURM job 77_3 ({state})")
    assert rc.run_state(spec, runs, ("best_pgd10",), slurm) == "queued"
    assert rc.elsewhere(runs / spec.digest(), slurm) == ("queued", f"SLURM job 77_3 ({state})")
    assert _calls(log) == []
    assert rc.run_state(spec, runs, ("best_pgd10",)) == "train"  # its own squeue: gone
    assert _calls(log) == ["-h -j 77_3 -o %T"]


@pytest.mark.parametrize("state", ["", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"])
def test_a_run_whose_slurm_job_ended_is_not_queued(tmp_path, monkeypatch, state):
    _squeue(tmp_path, monkeypatch, {"77": "PENDING"})
    _, (spec,), runs = _specs(tmp_path, 1)
    _submitted(runs / spec.digest(), 77)
    assert rc.assess(spec, runs, ("best_pgd10",), {"77": state}) == ("train", "")
    assert rc.elsewhere(runs / spec.digest(), {"77": state}) is None


def test_a_live_holder_is_read_against_the_given_squeue_states(tmp_path, monkeypatch):
    log = _squeue(tmp_path, monkeypatch, {"80_1": "RUNNING"})
    _, (spec,), runs = _specs(tmp_path, 1)
    _hold(runs / spec.digest(), host="node-b", pid=5984, pid_start=None, job_id="80_1")
    assert rc.assess(spec, runs, ("best_pgd10",), {"80_1": ""}) == ("train", "")
    assert rc.run_state(spec, runs, ("best_pgd10",), {"80_1": ""}) == "train"
    assert _calls(log) == []
    assert rc.assess(spec, runs, ("best_pgd10",)) == ("running", "node-b pid 5984, job 80_1")


def test_a_runs_own_states_name_no_one(tmp_path, monkeypatch):
    _squeue(tmp_path, monkeypatch, {})
    _, (spec,), runs = _specs(tmp_path, 1)
    folder, policies = runs / spec.digest(), ("best_pgd10",)
    assert rc.assess(spec, runs, policies) == ("train", "")
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"")
    assert rc.assess(spec, runs, policies) == ("resume", "")
    (folder / FAILED_FILE).write_text(json.dumps({"error": "diverged"}))
    assert rc.assess(spec, runs, policies) == ("failed", "")
    _hold(folder)
    assert rc.assess(spec, runs, policies)[0] == "running"  # a failed run retried elsewhere
    (folder / runlock.LOCK_FILE).unlink()
    write_run(runs, spec, drop=("square",))
    (folder / FAILED_FILE).unlink()
    assert rc.assess(spec, runs, policies) == ("evaluate", "")
    write_run(runs, spec)
    _hold(folder)
    assert rc.assess(spec, runs, policies) == ("done", "")  # done beats a holder


def test_only_a_slurm_job_json_names_a_job_to_ask_about(tmp_path):
    folder = tmp_path / "run"
    assert rc._slurm_job(folder) is None
    folder.mkdir()
    assert rc._slurm_job(folder) is None
    _submitted(folder, 123, executor="local")
    assert rc._slurm_job(folder) is None
    _submitted(folder, 77)
    assert rc._slurm_job(folder) == "77"
    _submitted(folder, "77_2")
    assert rc._slurm_job(folder) == "77_2"


def test_taken_elsewhere_rereads_the_open_runs_with_one_squeue(tmp_path, monkeypatch):
    log = _squeue(tmp_path, monkeypatch, {"76": "PENDING", "77": "RUNNING"})
    _, specs, runs = _specs(tmp_path, 4)
    planned = [rc.PlannedRun(s, ("a",), st)
               for s, st in zip(specs, ["done", "train", "resume", "train"], strict=True)]
    _submitted(runs / specs[0].digest(), 76)  # done: not asked about, not reported
    here = _hold(runs / specs[1].digest())
    _submitted(runs / specs[2].digest(), 77)
    (runs / specs[3].digest()).mkdir(parents=True)
    assert rc.taken_elsewhere(planned, runs) == [
        dataclasses.replace(planned[1], state="running",
                            elsewhere=f"{socket.gethostname()} pid {here.pid}, job 7_0"),
        dataclasses.replace(planned[2], state="queued", elsewhere="SLURM job 77 (RUNNING)"),
    ]
    assert _calls(log) == ["-h -r -j 77 -o %i %T"]


def test_what_is_elsewhere_is_counted_in_words(tmp_path):
    spec = _specs(tmp_path, 1)[1][0]

    def runs(*states):
        return [rc.PlannedRun(spec, ("a",), s) for s in states]

    assert rc.describe_elsewhere(runs("train", "done")) == ""
    assert rc.describe_elsewhere(runs("running", "train")) == "1 being trained"
    assert rc.describe_elsewhere(runs("queued", "done", "queued")) == "2 queued in SLURM"
    assert rc.describe_elsewhere(runs("queued", "running", "failed", "queued", "running",
                                      "running")) == "3 being trained, 2 queued in SLURM"


def test_execute_leaves_running_and_queued_runs_to_their_launch(tmp_path):
    runs = _planned(tmp_path, ["running", "train", "queued"])
    runs[0] = dataclasses.replace(runs[0], elsewhere="node-b pid 12, job 7_0")
    runs[2] = dataclasses.replace(runs[2], elsewhere="SLURM job 77 (PENDING)")
    said, executor = [], Recorder({})
    failures = rc.execute(runs, tmp_path / "runs", report=said.append, progress=False,
                          executor=executor)
    assert failures == [] and [j.digest for j in executor.jobs] == [runs[1].digest]
    assert said == [
        f"{runs[0].digest} (a, seed 0: running): being trained by node-b pid 12, job 7_0; "
        "left to it",
        f"{runs[2].digest} (a, seed 2: queued): queued as SLURM job 77 (PENDING); left to it",
    ]


def test_a_holder_off_slurm_on_another_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    log = _squeue(tmp_path, monkeypatch, {})
    _, (spec,), runs = _specs(tmp_path, 1)
    folder = runs / spec.digest()
    _hold(folder, host="node-b", pid=5984, pid_start=None, job_id=None, scheduler=None)
    assert rc.assess(spec, runs, ("best_pgd10",), {}) == ("running", "node-b pid 5984")
    old = folder / runlock.LOCK_FILE
    past = old.stat().st_mtime - runlock.STALE_AFTER_S - 60
    os.utime(old, (past, past))
    assert rc.assess(spec, runs, ("best_pgd10",), {}) == ("train", "")
    assert _calls(log) == []


def test_run_state_reads_a_finished_run_at_the_policies_given(tmp_path, monkeypatch):
    _squeue(tmp_path, monkeypatch, {})
    _, (spec,), runs = _specs(tmp_path, 1)
    write_run(runs, spec)
    assert rc.run_state(spec, runs, ("best_pgd10",)) == "done"
    assert rc.run_state(spec, runs, ("best_pgd10",), {"77": "PENDING"}) == "done"
    assert rc.run_state(spec, runs, ("best_pgd10_fosc_ok",), {"77": "PENDING"}) == "evaluate"


def test_a_file_where_the_run_folder_belongs_is_named_in_full(tmp_path):
    _, (spec,), runs = _specs(tmp_path, 1)
    runs.mkdir()
    (runs / spec.digest()).write_text("")
    with pytest.raises(BadInput) as err:
        rc.assess(spec, runs, ("best_pgd10",))
    assert str(err.value) == (
        f"{runs / spec.digest()} is a file, not a run folder: move it out of the runs folder"
    )
