"""diagnose.py's decisions, fast enough to mutate: option checks, defaults, what reaches the
evaluation, where files go, and the table a reader sees.

`evaluate_model` is replaced by a recorder (it returns an empty record under the key the real
one would use), so nothing here attacks; the synthetic dataset (4 classes, 8x8, 256 test
images) is generated in milliseconds. Expected values are written out by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import trades_repro
import trades_repro.diagnose as dg
from trades_repro import evaluate as ev
from trades_repro import store
from trades_repro import verdict as vd
from trades_repro.checkpoints import CheckpointError, build_arch
from trades_repro.data import to_float
from trades_repro.errors import NeedsGPU
from trades_repro.landscape import LandscapeResult
from trades_repro.records import AdversarialCheck, AttackResult, ChecklistRow, Flag, Preflight
from trades_repro.spec import ExperimentSpec, LandscapeSpec, ModelSpec, SpecError

ALL_SIX = ("pgd10", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack")
SYNTHETIC_TEST = 256  # SyntheticSpec().n_test


def _net(width: int = 8, seed: int = 0, normalize: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = ModelSpec(arch="small_cnn", width=width, normalize=normalize)
    return build_arch(spec, "synthetic", (1, 8, 8), 4)


def _checkpoint(
    folder: Path,
    name: str = "net.safetensors",
    width: int = 8,
    seed: int = 0,
    normalize: bool = False,
) -> Path:
    path = folder / name
    net = _net(width, seed, normalize)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


class Evaluations:
    """`evaluate_model` replaced: records each call, saves like the real one, returns a record
    under the real key (so a second call finds it as `previous`)."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        monkeypatch.setattr(dg, "evaluate_model", self)

    def __call__(self, net, x, y, settings, attacks, *, identity, previous, save, **kwargs):
        self.calls.append(
            {
                "net": net,
                "x": x,
                "y": y,
                "settings": settings,
                "attacks": attacks,
                "identity": identity,
                "previous": previous,
                **kwargs,
            }
        )
        name, sha, policies = identity
        record = previous or ev.CheckpointEval(
            checkpoint=name,
            sha256=sha,
            policies=policies,
            key=ev.settings_key(sha, settings),
            settings=settings,
            requested=list(attacks),
        )
        record.verdicts = vd.verdicts_of(record)  # as the real one's refresh: readers recompute
        save(record)
        return record


@pytest.fixture
def evaluations(monkeypatch) -> Evaluations:
    return Evaluations(monkeypatch)


@pytest.fixture
def reads(monkeypatch) -> list[dict]:
    """Every `load_splits` call: evaluation must read the test split only, where told."""
    calls: list[dict] = []
    real = dg.load_splits

    def spy(data, seed, *, train=True):
        calls.append({"data": data, "seed": seed, "train": train})
        return real(data, seed, train=train)

    monkeypatch.setattr(dg, "load_splits", spy)
    return calls


def _same_weights(net: torch.nn.Module, expected: torch.nn.Module) -> bool:
    got = net.state_dict()
    return all(torch.equal(got[k], v) for k, v in expected.state_dict().items())


def _test_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = dg.load_splits(ExperimentSpec(data={"dataset": "synthetic"}).data, 0, train=False).test
    return to_float(test.images[:n]), test.labels[:n]


def _diagnose(path: Path, **options) -> ev.CheckpointEval:
    options.setdefault("arch", None if "factory" in options else "small_cnn")
    return dg.diagnose(
        path, dataset="synthetic", width=options.pop("width", 8), device="cpu", **options
    )


# ------------------------------------------------------------------------ parsing options


def test_attacks_parse_presets_names_commas_and_repeats_in_table_order():
    assert dg.parse_attacks(["square-only, apgd-t", " ", "fab-t,"]) == (
        "pgd10",
        "apgd-t",
        "fab-t",
        "square",
    )
    assert dg.parse_attacks(["all"]) == ALL_SIX
    assert dg.parse_attacks(["autoattack", "pgd10", "pgd10"]) == ("pgd10", "autoattack")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ["pgd20"],
            "--attacks: unknown attack 'pgd20'; known: pgd10, apgd-ce, apgd-t, fab-t, "
            "square, autoattack, all, square-only",
        ),
        (
            ["square, pgd"],
            "--attacks: unknown attack 'pgd'; known: pgd10, apgd-ce, apgd-t, fab-t, "
            "square, autoattack, all, square-only",
        ),
        ([""], "--attacks: no attack given"),
        ([" , "], "--attacks: no attack given"),
        ([], "--attacks: no attack given"),
    ],
)
def test_bad_attack_lists_are_named(names, message):
    with pytest.raises(ev.EvaluationError) as caught:
        dg.parse_attacks(names)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "eps"), [("8/255", 8 / 255), ("  0.5 ", 0.5), ("1", 1.0), ("1/1", 1.0), ("3e-2", 0.03)]
)
def test_eps_parses_fractions_exactly(text, eps):
    assert dg.parse_eps(text) == eps


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("eight", "--eps 'eight': not a number or fraction like 8/255"),
        ("8/0", "--eps '8/0': not a number or fraction like 8/255"),
        ("0", "--eps 0: out of range, must be in (0, 1] (pixel units)"),
        ("1.0000001", "--eps 1.0000001: out of range, must be in (0, 1] (pixel units)"),
        ("-1/255", "--eps -1/255: out of range, must be in (0, 1] (pixel units)"),
    ],
)
def test_bad_eps_is_named(text, message):
    with pytest.raises(ev.EvaluationError) as caught:
        dg.parse_eps(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("name", "cuda", "device"),
    [
        ("auto", False, "cpu"),
        ("auto", True, "cuda"),
        ("cpu", True, "cpu"),
        ("cpu", False, "cpu"),
        ("cuda", True, "cuda"),
    ],
)
def test_devices_resolve(monkeypatch, name, cuda, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert dg.resolve_device(name) == device


def test_cuda_without_a_gpu_needs_one_rather_than_being_bad_input(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NeedsGPU, match=r"^--device cuda: no CUDA device is available$"):
        dg.resolve_device("cuda")


@pytest.mark.parametrize(
    ("name", "cuda", "message"),
    [
        ("gpu", False, "--device 'gpu': expected auto, cpu or cuda"),
        ("gpu", True, "--device 'gpu': expected auto, cpu or cuda"),
    ],
)
def test_unusable_devices_are_refused(monkeypatch, name, cuda, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(ev.EvaluationError) as caught:
        dg.resolve_device(name)
    assert str(caught.value) == message


# ---------------------------------------------------------------------------- diagnose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": None}, "give exactly one of --model ARCH or --factory module:function"),
        (
            {"factory": "m:f", "arch": "small_cnn"},
            "give exactly one of --model ARCH or --factory module:function",
        ),
        ({"n_examples": 0}, "--n-examples 0: must be at least 1"),
        ({"n_examples": -3}, "--n-examples -3: must be at least 1"),
        ({"save_adversarial": True}, "--save-adversarial needs --out (the folder to save them in)"),
        ({"n_examples": 257}, "--n-examples 257: the synthetic test set has only 256 images"),
    ],
)
def test_diagnose_refuses_bad_options_in_one_line(tmp_path, evaluations, options, message):
    with pytest.raises(ev.EvaluationError) as caught:
        _diagnose(_checkpoint(tmp_path), **options)
    assert str(caught.value) == message and evaluations.calls == []


def test_one_example_is_enough(tmp_path, evaluations):
    _diagnose(_checkpoint(tmp_path), n_examples=1)
    assert evaluations.calls[0]["settings"].n_examples == 1
    run = _run_folder(tmp_path / "run")
    dg.evaluate_run(run, n_examples=1, square_queries=1)
    assert evaluations.calls[1]["settings"].n_examples == 1
    assert evaluations.calls[1]["settings"].square_queries == 1


def test_diagnose_reads_only_the_test_split_from_the_given_root(tmp_path, evaluations, reads):
    _diagnose(_checkpoint(tmp_path), data_root=str(tmp_path / "data"), seed=3)
    (read,) = reads
    assert read["train"] is False and read["data"].root == str(tmp_path / "data")
    assert read["data"].validation == "test"
    assert read["data"].download is False  # a missing dataset is an error naming --download


def test_diagnose_download_lets_torchvision_fetch_the_dataset(tmp_path, evaluations, reads):
    _diagnose(_checkpoint(tmp_path), download=True)
    assert reads[0]["data"].download is True


def test_bad_diagnose_options_are_named_as_such(tmp_path, evaluations):
    with pytest.raises(SpecError) as caught:
        _diagnose(_checkpoint(tmp_path), arch="vgg16")
    assert str(caught.value).startswith("diagnose options: field 'model.arch': ")


def test_a_normalizing_model_gets_the_datasets_statistics(tmp_path, evaluations):
    _diagnose(_checkpoint(tmp_path, normalize=True), normalize=True)
    assert _same_weights(evaluations.calls[0]["net"], _net(normalize=True))
    run = _run_folder(tmp_path / "run", normalize=True)
    dg.evaluate_run(run, n_examples=2)
    assert _same_weights(evaluations.calls[1]["net"], _net(normalize=True))


def test_weights_that_do_not_fit_name_the_file_and_the_architecture(tmp_path, evaluations):
    path = _checkpoint(tmp_path, width=16)
    with pytest.raises(CheckpointError, match=rf"^{path}: does not match architecture small_cnn "):
        _diagnose(path)
    run = _run_folder(tmp_path / "run")
    _checkpoint(run, store.BEST_FILE, width=16)
    with pytest.raises(
        CheckpointError,
        match=rf"^{run / store.BEST_FILE}: does not match "
        r"architecture small_cnn ",
    ):
        dg.evaluate_run(run)


def test_a_bad_checkpoint_fails_before_the_data_is_read(tmp_path, evaluations, monkeypatch):
    (tmp_path / "notes.txt").write_text("hello")
    monkeypatch.setattr(dg, "load_splits", lambda *a, **k: pytest.fail("data read first"))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        _diagnose(tmp_path / "notes.txt")


def test_diagnose_passes_its_defaults_and_writes_nothing(tmp_path, evaluations, monkeypatch):
    import trades_repro.checklist as checklist

    monkeypatch.setattr(checklist, "run_checklist", lambda *a: pytest.fail("not asked for"))
    path = _checkpoint(tmp_path)
    before = sorted(tmp_path.iterdir())
    record = _diagnose(path)
    (call,) = evaluations.calls
    s = call["settings"]
    assert (s.dataset, s.n_examples, len(call["y"]), call["attacks"]) == (
        "synthetic",
        100,
        100,
        ALL_SIX,
    )  # synthetic's default
    assert (s.eps, s.step_size, s.steps, s.random_start) == (8 / 255, 2 / 255, 10, True)
    assert (s.square_queries, s.seed, s.batch_size, s.device) == (5000, 0, 500, "cpu")
    assert s.landscape == LandscapeSpec(radius=8 / 255)
    assert json.loads(s.model) == {"arch": "small_cnn", "width": 8, "normalize": False}
    assert (s.n_classes, s.versions) == (4, dg.versions())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert call["identity"] == ("net.safetensors", sha, []) and call["previous"] is None
    assert call["landscape_dir"] is None and call["adversarial_dir"] is None
    assert call["x"].shape == (100, 1, 8, 8) and call["x"].dtype == torch.float32
    assert torch.equal(
        call["y"],
        dg.load_splits(
            ExperimentSpec(data={"dataset": "synthetic"}).data, 0, train=False
        ).test.labels[:100],
    )
    assert sorted(tmp_path.iterdir()) == before  # without --out nothing is written
    assert record.sha256 == sha


def test_diagnose_options_reach_the_evaluation(tmp_path, evaluations):
    _diagnose(
        _checkpoint(tmp_path, width=16),
        width=16,
        eps=0.25,
        n_examples=7,
        attacks=("square", "pgd10"),
        square_queries=300,
        seed=3,
        eval_batch=2,
        normalize=False,
    )
    s = evaluations.calls[0]["settings"]
    assert (s.eps, s.step_size, s.landscape.radius) == (0.25, 0.0625, 0.25)  # α = ε/4
    assert (s.n_examples, s.square_queries, s.seed, s.batch_size) == (7, 300, 3, 2)
    assert evaluations.calls[0]["attacks"] == ("square", "pgd10")  # evaluate_model orders
    assert json.loads(s.model)["width"] == 16


def test_the_weights_loaded_are_the_checkpoints(tmp_path, evaluations):
    path = _checkpoint(tmp_path)
    _diagnose(path)
    net = evaluations.calls[0]["net"]
    expected = _net(8).state_dict()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
    assert next(net.parameters()).device.type == "cpu"


def test_a_factory_builds_the_network_and_is_named(tmp_path, evaluations, monkeypatch):
    (tmp_path / "diag_nets.py").write_text(
        "from torch import nn\n\ndef flat():\n    return nn.Sequential(nn.Flatten(), "
        "nn.Linear(64, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(1)
    layer = torch.nn.Linear(64, 4)
    save_file(
        {"1.weight": layer.weight.detach(), "1.bias": layer.bias.detach()},
        tmp_path / "flat.safetensors",
    )
    _diagnose(tmp_path / "flat.safetensors", factory="diag_nets:flat")
    call = evaluations.calls[0]
    assert call["settings"].model == "factory diag_nets:flat"
    assert torch.equal(call["net"][1].weight, layer.weight)


def test_factory_failures_name_the_factory(tmp_path, evaluations, monkeypatch):
    (tmp_path / "diag_bad.py").write_text(
        "from torch import nn\n\ndef broken():\n    raise RuntimeError('needs a GPU')\n\n"
        "def wide():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        _diagnose(path, factory="diag_bad:broken")
    assert str(caught.value) == (
        "--factory 'diag_bad:broken' raised RuntimeError: needs a GPU "
        "(it must build the network with no arguments)"
    )
    with pytest.raises(
        CheckpointError,
        match=rf"^{path}: does not match architecture "
        r"diag_bad:wide ",
    ):
        _diagnose(path, factory="diag_bad:wide")


def test_a_factory_or_its_module_calling_sys_exit_is_its_failure(tmp_path, evaluations,
                                                                  monkeypatch):
    # diagnose exited 0 ("not overestimated") when the user's factory called sys.exit(0)
    (tmp_path / "diag_quits.py").write_text("import sys\n\ndef quits():\n    sys.exit(0)\n")
    (tmp_path / "diag_quits_on_import.py").write_text("raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"^--factory 'diag_quits:quits' raised "
                       r"SystemExit: 0 \(it must build"):
        _diagnose(path, factory="diag_quits:quits")
    with pytest.raises(CheckpointError, match=r"importing 'diag_quits_on_import' raised "
                       "SystemExit"):
        _diagnose(path, factory="diag_quits_on_import:f")


def test_out_holds_eval_json_and_resumes(tmp_path, evaluations):
    path, out = _checkpoint(tmp_path), tmp_path / "out"
    first = _diagnose(path, out=out, n_examples=5)
    evals = dg.read_eval(out / store.EVAL_FILE)
    assert list(evals.checkpoints) == [first.key] and evals.source == str(path)
    assert evaluations.calls[0]["landscape_dir"] == out
    assert evaluations.calls[0]["adversarial_dir"] is None
    _diagnose(path, out=out, n_examples=5, save_adversarial=True)
    assert evaluations.calls[1]["previous"] == first  # same key: resumed
    assert evaluations.calls[1]["adversarial_dir"] == out
    _diagnose(path, out=out, n_examples=6)
    assert evaluations.calls[2]["previous"] is None
    assert len(dg.read_eval(out / store.EVAL_FILE).checkpoints) == 2


def test_the_checklist_runs_once_and_is_saved(tmp_path, evaluations, monkeypatch):
    import trades_repro.checklist as checklist

    runs: list[dict] = []

    def fake(net, x, y, settings, record, folder, report):
        runs.append(
            {
                "n": len(y),
                "folder": folder,
                "record": record.key,
                "net": net,
                "x": x.shape,
                "settings": settings,
                "report": report,
            }
        )
        return [ChecklistRow(item="fgsm", status="pass", numbers={}, detail="", seconds=0.0)]

    monkeypatch.setattr(checklist, "run_checklist", fake)
    path, out = _checkpoint(tmp_path), tmp_path / "out"

    def report(line: str) -> None:
        pass

    record = _diagnose(path, out=out, n_examples=5, checklist=True, report=report)
    assert [r.item for r in record.checklist] == ["fgsm"] and runs[0]["folder"] == out
    call = evaluations.calls[0]
    assert runs[0]["net"] is call["net"] and runs[0]["x"] == (5, 1, 8, 8)
    assert runs[0]["settings"] == call["settings"] and runs[0]["report"] is report
    assert call["report"] is report
    assert runs[0]["n"] == 5 and runs[0]["record"] == record.key
    saved = dg.read_eval(out / store.EVAL_FILE).checkpoints[record.key]
    assert [r.item for r in saved.checklist] == ["fgsm"]
    _diagnose(path, out=out, n_examples=5, checklist=True)
    assert len(runs) == 1  # resumed with its checklist: not run again
    _diagnose(path, n_examples=5)
    assert len(runs) == 1  # not asked
    _diagnose(path, n_examples=5, checklist=True)
    assert len(runs) == 2 and runs[1]["folder"] is None


# ------------------------------------------------------------------------- evaluate_run()


def _run_folder(folder: Path, normalize: bool = False, **evaluation) -> Path:
    spec = ExperimentSpec(
        data={"dataset": "synthetic"},
        device="cpu",
        seed=2,
        model={"arch": "small_cnn", "width": 8, "normalize": normalize},
        evaluation=evaluation,
    )
    folder.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(folder / store.SPEC_FILE, spec.model_dump(mode="json"))
    store.atomic_write_json(folder / store.PROVENANCE_FILE, {"status": "finished"})
    _checkpoint(folder, store.BEST_FILE, normalize=normalize)
    return folder


def test_evaluate_run_reads_only_the_test_split(tmp_path, evaluations, reads):
    dg.evaluate_run(_run_folder(tmp_path), n_examples=2)
    (read,) = reads
    assert read["train"] is False and read["data"].dataset == "synthetic"


def test_one_checkpoint_chosen_by_both_policies_is_evaluated_once(tmp_path, evaluations):
    run = _run_folder(tmp_path)
    store.atomic_write_json(
        run / store.CHECKPOINTS_FILE,
        {"best_pgd10": {"file": store.BEST_FILE}, "best_pgd10_fosc_ok": {"file": store.BEST_FILE}},
    )
    lines: list[str] = []
    dg.evaluate_run(run, n_examples=2, report=lines.append)
    assert lines == ["best.safetensors (best_pgd10, best_pgd10_fosc_ok)"]
    assert evaluations.calls[0]["identity"][2] == ["best_pgd10", "best_pgd10_fosc_ok"]


def test_an_old_spec_without_evaluation_is_evaluated_at_the_defaults(tmp_path, evaluations):
    run = _run_folder(tmp_path)
    raw = json.loads((run / store.SPEC_FILE).read_text())
    del raw["evaluation"]
    store.atomic_write_json(run / store.SPEC_FILE, raw)
    dg.evaluate_run(run, n_examples=2)
    s = evaluations.calls[0]["settings"]
    assert (s.square_queries, s.seed, evaluations.calls[0]["attacks"]) == (5000, 0, ALL_SIX)


@pytest.mark.parametrize(("landscape", "radius"), [({}, 0.2), ({"radius": 0.05}, 0.05)])
def test_the_landscape_spans_the_runs_threat_model(tmp_path, evaluations, landscape, radius):
    # a run at ε = 0.2 once got a surface of ±8/255 from `evaluate` (±0.2 from `diagnose`):
    # unset, the radius is the validation ε the attacks use; set, it is kept
    run = _run_folder(tmp_path, n_examples=2, landscape=landscape)
    raw = json.loads((run / store.SPEC_FILE).read_text())
    raw["validation"].update(eps=0.2, step_size=0.05)
    store.atomic_write_json(run / store.SPEC_FILE, raw)
    dg.evaluate_run(run)
    s = evaluations.calls[0]["settings"]
    assert (s.eps, s.landscape.radius, s.landscape.steps) == (0.2, radius, 21)


def test_a_broken_run_spec_is_named(tmp_path, evaluations):
    run = _run_folder(tmp_path)
    raw = json.loads((run / store.SPEC_FILE).read_text())
    raw["optim"]["epochs"] = 0
    store.atomic_write_json(run / store.SPEC_FILE, raw)
    with pytest.raises(SpecError) as caught:
        dg.evaluate_run(run)
    assert str(caught.value).startswith(f"{run / store.SPEC_FILE}: field 'optim.epochs': ")


def test_a_run_is_evaluated_as_its_spec_says(tmp_path, evaluations):
    run = _run_folder(
        tmp_path, n_examples=9, attacks=["square", "pgd10"], seed=4, square_queries=77
    )
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)

    (record,) = dg.evaluate_run(run, report=report)
    (call,) = evaluations.calls
    assert call["report"] is report and _same_weights(call["net"], _net())
    assert json.loads(call["settings"].model) == {
        "arch": "small_cnn",
        "width": 8,
        "normalize": False,
    }
    x, y = _test_split(9)
    assert torch.allclose(call["x"], x) and torch.equal(call["y"], y)
    s = call["settings"]
    assert (s.n_examples, s.seed, s.square_queries, s.device, s.batch_size) == (
        9,
        4,
        77,
        "cpu",
        500,
    )
    assert call["attacks"] == ("square", "pgd10") and len(call["y"]) == 9
    sha = hashlib.sha256((run / store.BEST_FILE).read_bytes()).hexdigest()
    assert call["identity"] == (store.BEST_FILE, sha, ["best_pgd10"])
    assert call["landscape_dir"] == run and call["adversarial_dir"] is None
    assert lines == ["best.safetensors (best_pgd10)"]
    assert dg.read_eval(run / store.EVAL_FILE).checkpoints == {record.key: record}
    assert dg.read_eval(run / store.EVAL_FILE).source == str(run)


def test_evaluate_run_overrides_the_spec_only_where_told(tmp_path, evaluations):
    run = _run_folder(tmp_path, n_examples=9, seed=4)
    dg.evaluate_run(
        run,
        attacks=("pgd10",),
        n_examples=3,
        seed=1,
        eval_batch=2,
        device="cpu",
        save_adversarial=True,
        square_queries=300,
    )
    call = evaluations.calls[0]
    s = call["settings"]
    assert (s.n_examples, s.seed, s.batch_size, call["attacks"]) == (3, 1, 2, ("pgd10",))
    assert s.square_queries == 300
    assert call["adversarial_dir"] == run
    spec = json.loads((run / store.SPEC_FILE).read_text())
    assert spec["evaluation"]["n_examples"] == 9  # the run's spec itself is not rewritten


def test_every_distinct_policy_checkpoint_is_evaluated_unless_filtered(tmp_path, evaluations):
    run = _run_folder(tmp_path)
    _checkpoint(run, store.BEST_FOSC_OK_FILE, seed=1)
    records = dg.evaluate_run(run, n_examples=2)
    assert [r.checkpoint for r in records] == [store.BEST_FILE, store.BEST_FOSC_OK_FILE]
    assert [c["identity"][2] for c in evaluations.calls] == [["best_pgd10"], ["best_pgd10_fosc_ok"]]
    only = dg.evaluate_run(run, n_examples=2, policies=["best_pgd10_fosc_ok"])
    assert [r.checkpoint for r in only] == [store.BEST_FOSC_OK_FILE]
    assert dg.evaluate_run(run, n_examples=2, policies=[]) == []


def test_records_of_other_settings_stay_in_eval_json(tmp_path, evaluations):
    run = _run_folder(tmp_path)
    first = dg.evaluate_run(run, n_examples=2)[0]
    second = dg.evaluate_run(run, n_examples=3)[0]
    kept = dg.read_eval(run / store.EVAL_FILE).checkpoints
    assert set(kept) == {first.key, second.key}
    again = dg.evaluate_run(run, n_examples=2)[0]
    assert evaluations.calls[-1]["previous"] == first and again == first
    finished = first.model_copy(update={"complete": True})
    evals = dg.read_eval(run / store.EVAL_FILE)
    evals.checkpoints[first.key] = finished
    dg.write_eval(run / store.EVAL_FILE, evals, "cpu")
    assert dg.run_records(run, complete=True) == [finished]
    assert len(dg.run_records(run)) == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("nothing", "{run}: not a run folder (no spec.json)"),
        ("zero", "--n-examples 0: must be at least 1"),
        ("no_queries", "--square-queries 0: must be at least 1"),
        ("no_checkpoint", "{run}: no checkpoint to evaluate (expected best.safetensors)"),
    ],
)
def test_evaluate_run_refuses_what_is_not_a_run(tmp_path, evaluations, make, message):
    run = tmp_path if make == "nothing" else _run_folder(tmp_path)
    if make == "no_checkpoint":
        (run / store.BEST_FILE).unlink()
    with pytest.raises(ev.EvaluationError) as caught:
        dg.evaluate_run(
            run,
            n_examples=0 if make == "zero" else None,
            square_queries=0 if make == "no_queries" else None,
        )
    assert str(caught.value) == message.format(run=run)


def test_run_checkpoints_read_the_policy_index(tmp_path):
    _checkpoint(tmp_path, store.BEST_FILE)
    _checkpoint(tmp_path, "epoch7.safetensors")
    assert dg.run_checkpoints(tmp_path) == [(store.BEST_FILE, ["best_pgd10"])]
    store.atomic_write_json(
        tmp_path / store.CHECKPOINTS_FILE,
        {"best_pgd10": {"file": "epoch7.safetensors"}, "best_pgd10_fosc_ok": None},
    )
    assert dg.run_checkpoints(tmp_path) == [("epoch7.safetensors", ["best_pgd10"])]
    store.atomic_write_json(
        tmp_path / store.CHECKPOINTS_FILE,
        {
            "best_pgd10": {"file": "gone.safetensors"},
            "best_pgd10_fosc_ok": {"file": store.BEST_FILE},
        },
    )
    assert dg.run_checkpoints(tmp_path) == [(store.BEST_FILE, ["best_pgd10_fosc_ok"])]


# ------------------------------------------------------------------------ what is printed


def _attack(name: str, robust: str, seconds: float = 1.25, **params) -> AttackResult:
    hits = robust.count("1")
    return AttackResult(
        name=name,
        paper_column=ev.PAPER_COLUMNS[name],
        accuracy=hits / len(robust),
        n_robust=hits,
        n_examples=len(robust),
        robust=robust,
        seconds=seconds,
        params=params,
    )


def _record(**fields) -> ev.CheckpointEval:
    settings = ev.EvalSettings(
        dataset="digits",
        n_examples=4,
        eps=0.1,
        step_size=0.025,
        steps=10,
        random_start=True,
        batch_size=4,
        seed=3,
        square_queries=fields.pop("queries", 5000),
        device="cpu",
        landscape=LandscapeSpec(),
    )
    return ev.CheckpointEval(
        checkpoint="m", sha256="a" * 64, key="k", settings=settings, requested=[], **fields
    )


def test_table_rows_in_full():
    pgd = _attack("pgd10", "1100", 2.0).model_copy(
        update={"fosc_mean": 0.01234, "sgcs_mean": 0.56789}
    )
    record = _record(
        clean=_attack("clean", "1110", 0.5),
        attacks={"pgd10": pgd, "square": _attack("square", "1000", 61.04, queries=300)},
        worst_case_accuracy=0.25,
        flags=[
            Flag(attack="preflight", check="zero_gradients", message="z"),
            Flag(attack="square", check="adversarial_check", message="a"),
            Flag(attack="preflight", check="dynamic", message="d"),
        ],
        adversarial={
            "pgd10": AdversarialCheck(
                max_linf=0.1, in_box=True, finite=True, disagreements=0, ok=True
            )
        },
        landscape=LandscapeResult(
            radius=0.1, steps=3, n_images=1, roughness=1.5, loss_min=0, loss_max=1
        ),
    )
    assert dg.table_rows(record) == [
        ("clean", "0.7500", "0.5 s"),
        ("pgd10 (PGD-10)", "0.5000", "2.0 s"),
        ("apgd-ce (APGD-CE)", "not run", ""),
        ("apgd-t (APGD-DLR)", "not run", ""),
        ("fab-t (FAB)", "not run", ""),
        ("square (Square)", "0.2500", "61.0 s, 300 queries (non-standard)"),
        ("autoattack", "not run", ""),
        ("worst case over attacks", "0.2500", "per example"),
        ("FOSC (mean, PGD-10)", "0.0123", "Eq. 2; lower converges"),
        ("SGCS (mean, PGD-10)", "0.5679", "Eq. 3; lower masks more"),
        ("landscape roughness", "1.5000", "Fig. 1; <=1 smooth, >>1 jagged"),
        (
            "AutoAttack checks",
            "dynamic, zero_gradients",
            "pyautoattack checks.py, run once per model",
        ),
        ("adversarial re-check", "ok (1 attacks)", "|delta| <= eps, [0, 1], predictions"),
    ]


def test_table_rows_of_an_empty_record():
    rows = dict((metric, (value, note)) for metric, value, note in dg.table_rows(_record()))
    assert rows["worst case over attacks"] == ("n/a", "per example")
    assert rows["FOSC (mean, PGD-10)"][0] == rows["SGCS (mean, PGD-10)"][0] == "n/a"
    assert rows["landscape roughness"][0] == "n/a"
    assert rows["AutoAttack checks"][0] == "none"
    assert rows["adversarial re-check"][0] == "n/a"


def test_notes_name_non_standard_settings():
    assert dg._note(None) == ""
    assert dg._note(_attack("square", "1", 3.0, queries=5000)) == "3.0 s, 5000 queries"
    assert dg._note(_attack("apgd-ce", "1", 3.0, version="rand")) == "3.0 s, version rand"
    assert dg._note(_attack("apgd-ce", "1", 3.0, version="standard")) == "3.0 s"
    cascade = _attack("autoattack", "1", 9.0, **{"square.queries": 200, "version": "standard"})
    assert dg._note(cascade) == "9.0 s, 200 queries (non-standard)"  # its Square's budget
    failed = AdversarialCheck(max_linf=1, in_box=False, finite=True, disagreements=0, ok=False)
    fine = failed.model_copy(update={"ok": True})
    assert dg._recheck_summary(_record(adversarial={"a": failed, "b": fine, "c": failed})) == (
        "failed: a, c"
    )


def test_settings_line_in_full():
    assert dg.settings_line(_record()) == (
        "settings: n=4, eps=0.1, seed 3, Square 5000 queries, PGD-10 step 0.025, device cpu"
    )
    reduced = _record(queries=300)
    assert dg.settings_line(reduced) == (
        "settings: n=4, eps=0.1, seed 3, Square 300 queries (non-standard), PGD-10 step 0.025, "
        "device cpu"
    )
    ran = _record(attacks={"square": _attack("square", "1", queries=300)})
    assert "Square (300 queries, reduced from AutoAttack's 5000), PGD-10" in dg.settings_line(ran)
    ran.preflight = Preflight(n_classes=10, batch=4, clean_correct=4, randomized=True)
    assert dg.settings_line(ran).endswith(
        ", device cpu, randomized model: AutoAttack's 'rand' version"
    )


def test_versions_are_the_installed_libraries():
    import pyautoattack

    assert dg.versions() == {
        "torch": torch.__version__,
        "pyautoattack": pyautoattack.__version__,
        "trades_repro": trades_repro.__version__,
    }


# --------------------------------------------------------- the CLI's own decisions (cli.py)


@pytest.mark.parametrize(
    ("threads", "device", "cuda", "set_to"),
    [
        (3, "cuda", True, [3]),
        (0, None, False, [1]),
        (-2, "cpu", False, [1]),
        (None, "cpu", True, [1]),
        (None, None, False, [1]),
        (None, "auto", False, [1]),
        (None, "cuda", False, []),
        (None, None, True, []),
        (None, "auto", True, []),
    ],
)
def test_one_cpu_thread_unless_told_or_on_a_gpu(monkeypatch, threads, device, cuda, set_to):
    from trades_repro import cli

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cli._set_threads(threads, device)
    assert calls == set_to


def test_progress_lines_go_to_stderr_unless_quiet(capsys, monkeypatch):
    from trades_repro import cli

    monkeypatch.setenv("FORCE_COLOR", "1")  # a colour terminal: still no highlighting
    cli._progress(True)("hidden [bold]line[/bold]")
    cli._progress(False)("shown 0.5000 [1, 2]")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "shown 0.5000 [1, 2]\n"


def test_fail_prints_one_error_line_and_carries_the_code(capsys):
    from trades_repro import cli

    exit_ = cli._fail("bad thing", 2)
    assert exit_.exit_code == 2 and capsys.readouterr().err == "error: bad thing\n"


def test_a_crash_log_holds_the_command_and_traceback(monkeypatch):
    from trades_repro import cli

    monkeypatch.setattr("sys.argv", ["trades-repro", "diagnose", "w.pt"])
    try:
        raise KeyError("deep")
    except KeyError:
        log = cli._traceback_log("diagnose")
    try:
        assert log.name.startswith("trades-repro-diagnose-") and log.suffix == ".log"
        lines = log.read_text().splitlines()
        assert lines[0] == "trades-repro diagnose diagnose w.pt"
        assert lines[1].startswith("Traceback") and lines[-1] == "KeyError: 'deep'"
    finally:
        log.unlink()


def test_tiers_are_checked_by_name():
    from trades_repro import cli_claims
    from trades_repro.claims import ClaimsError

    assert [cli_claims._tier(t) for t in ("instant", "cpu", "reduced", "full")] == [
        "instant",
        "cpu",
        "reduced",
        "full",
    ]
    with pytest.raises(ClaimsError) as caught:
        cli_claims._tier("huge")
    assert str(caught.value) == "--tier: unknown tier 'huge'; known: instant, cpu, reduced, full"


def _judged(*statuses: str):
    from types import SimpleNamespace

    return [SimpleNamespace(id=f"c{i}", status=s) for i, s in enumerate(statuses)]


def test_verify_exit_codes_follow_the_worst_judgement(capsys):
    import typer

    from trades_repro import cli, cli_claims
    from trades_repro.errors import Inconclusive

    assert cli_claims._exit_for(_judged("held", "held")) is None
    for judged, failed in (
        (_judged("held", "failed", "undetermined"), False),
        (_judged("held"), True),
    ):
        with pytest.raises(typer.Exit) as caught:
            cli_claims._exit_for(judged, run_failed=failed)
        assert caught.value.exit_code == 1
    with pytest.raises(Inconclusive) as caught:
        cli_claims._exit_for(_judged("held", *["undetermined"] * 6))
    assert str(caught.value) == "6 claim(s) undetermined: c1, c2, c3, c4, c5"
    # no evidence at all is 'cannot decide'; partial evidence is judged on what there is
    for nothing in (_judged("not run", "not run"), _judged("incomplete", "not run")):
        with pytest.raises(Inconclusive) as caught:
            cli_claims._exit_for(nothing)
        assert str(caught.value) == ("no evidence: none of the 2 claim(s) could be judged "
                                     "(not run or incomplete); run-claim trains what they need")
    assert cli_claims._exit_for(_judged("held", "not run")) is None  # not run: not judged
    with pytest.raises(Inconclusive) as caught:  # found but not decided: --allow-partial
        cli_claims._exit_for(_judged("held", "not run", "incomplete"))
    assert str(caught.value) == ("1 claim(s) incomplete (seeds missing; --allow-partial "
                                 "judges them): c2")
    with pytest.raises(Inconclusive) as caught:  # the first five named
        cli_claims._exit_for(_judged("held", *["incomplete"] * 6))
    assert str(caught.value) == ("6 claim(s) incomplete (seeds missing; --allow-partial "
                                 "judges them): c1, c2, c3, c4, c5")
    with pytest.raises(Inconclusive) as caught:  # no claim at this tier: nothing judged
        cli_claims._exit_for([])
    assert str(caught.value) == "no claim was selected at this tier: nothing judged"
    # runs another launch trains: wait for them (3), naming at most three holders
    from types import SimpleNamespace

    held = [SimpleNamespace(elsewhere=f"vm pid {p}") for p in (11, 12, 13, 14)]
    with pytest.raises(Inconclusive) as caught:
        cli_claims._exit_for(_judged("held", "not run"), elsewhere=held)
    assert str(caught.value) == ("4 run(s) are being trained by another launch (vm pid 11; "
                                 "vm pid 12; vm pid 13; …); follow them with "
                                 "`trades-repro status`")
    with pytest.raises(Inconclusive) as caught:
        cli_claims._exit_for(_judged("not run"), elsewhere=held[:1])
    assert "(vm pid 11); follow" in str(caught.value)
    assert cli_claims._exit_for(_judged("held"), elsewhere=held) is None  # all held already
    with pytest.raises(typer.Exit):  # a failed claim outranks waiting
        cli_claims._exit_for(_judged("failed", "not run"), elsewhere=held)
    cli._exit_if_failed([])
    with pytest.raises(typer.Exit) as caught:
        cli._exit_if_failed(["abc failed: boom", "def failed: bang"])
    assert caught.value.exit_code == 1
    assert capsys.readouterr().err == "run abc failed: boom\nrun def failed: bang\n"


def test_the_printed_record_leads_with_the_diagnose_verdict():
    from rich.console import Console

    from trades_repro import cli

    attacks = {
        "pgd10": _attack("pgd10", "1" * 30 + "0" * 70),
        "square": _attack("square", "0" * 100, queries=300),
    }
    record = _record(attacks=attacks)
    record.verdicts = [ev.apply_rule(rule, attacks) for rule in ev.VERDICT_RULES]
    record.checklist = [
        ChecklistRow(item="fgsm", status="warn", numbers={}, detail="FGSM beats", seconds=1.25)
    ]
    console = Console(record=True, width=300)
    cli._print_record(console, "net on digits", record)
    text = console.export_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "net on digits"
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
    assert ["square (Square)", "0.0000", "1.2 s, 300 queries (non-standard)"] in cells
    assert cells.index(["pgd10 (PGD-10)", "0.3000", "1.2 s"]) == 1 and len(cells) == 14
    assert dg.settings_line(record) in lines
    assert "masking checklist" in lines and cells[-1] == ["fgsm", "warn", "FGSM beats", "1.2 s"]
    verdicts = [line for line in lines if line.startswith(("verdict: ", "also: "))]
    assert [v.split(": ", 1)[0] for v in verdicts] == ["verdict", "also", "also", "also"]
    assert verdicts[0].endswith("(rule pgd10_minus_square_v2)")
    assert verdicts[1] == (
        "also: robustness overestimated: PGD-10 exceeds Square (300 queries, "
        "reduced from AutoAttack's 5000) by 30.0 points "
        "(rule pgd10_minus_square_v1)"
    )
    assert [v.rsplit("(rule ", 1)[1] for v in verdicts[2:]] == [
        "pgd10_minus_autoattack_v1)",
        "pgd10_minus_autoattack_v2)",
    ]
    assert text.splitlines()[0].startswith("net on digits")  # titles flush left
    assert [line for line in text.splitlines() if "masking checklist" in line][0].startswith(
        "masking checklist"
    )
    headers = [[c.strip() for c in line.split("┃")[1:-1]] for line in lines if "┃" in line]
    assert headers == [["metric", "value", "note"], ["item", "status", "detail", "cost"]]
    plain = Console(record=True, width=300)
    cli._print_record(plain, "t", _record())
    assert "masking checklist" not in plain.export_text()


def test_sentences_are_printed_whole_and_unhighlighted():
    """On a narrow colour terminal the settings and verdict lines stay one plain line each."""
    from rich.console import Console

    from trades_repro import cli

    record = _outcome_record(30, 0)
    narrow = Console(record=True, width=60, force_terminal=True, color_system="truecolor")
    cli._print_record(narrow, "net", record)
    styled = narrow.export_text(styles=True).splitlines()
    assert dg.settings_line(record) in styled
    v2, v1 = record.verdicts[2], record.verdicts[0]
    assert "verdict: " + vd.verdict_line(v2, record.attacks["square"]) in styled
    assert "also: " + vd.verdict_line(v1, record.attacks["square"]) in styled


def _outcome_record(b: int, c: int) -> ev.CheckpointEval:
    """PGD-10 robust on b images Square breaks, Square on c images PGD-10 breaks, of 100."""
    pgd = "1" * b + "0" * c + "1" * 20 + "0" * (80 - b - c)
    square = "0" * b + "1" * c + "1" * 20 + "0" * (80 - b - c)
    attacks = {"pgd10": _attack("pgd10", pgd), "square": _attack("square", square)}
    record = _record(attacks=attacks)
    record.verdicts = [ev.apply_rule(rule, attacks) for rule in ev.VERDICT_RULES]
    return record


@pytest.mark.parametrize(
    ("b", "c", "code", "stderr"),
    [
        (30, 0, 1, ""),  # v2 flagged
        (0, 0, 0, ""),  # v2 clear
        (8, 0, 3, "error: inconclusive: PGD-10 exceeds Square by 8.0 points; 95% CI"),
        (None, None, 3, "error: inconclusive: no verdict: PGD-10 and Square are both needed"),
    ],
)
def test_diagnose_exits_by_the_paired_square_rule(tmp_path, monkeypatch, b, c, code, stderr):
    from typer.testing import CliRunner

    from trades_repro.cli import app

    record = _outcome_record(b, c) if b is not None else _record()
    if b is None:
        record.verdicts = [ev.apply_rule(rule, {}) for rule in ev.VERDICT_RULES]
    assert b != 8 or record.verdicts[0].flagged  # v1 flags what v2 leaves inconclusive
    monkeypatch.setattr(dg, "diagnose", lambda *a, **k: record)
    result = CliRunner().invoke(
        app,
        [
            "diagnose",
            str(tmp_path / "w.pt"),
            "--dataset",
            "digits",
            "--model",
            "small_cnn",
            "--json",
        ],
    )
    assert result.exit_code == code, result.output
    assert result.stderr.startswith(stderr) and len(result.stderr.splitlines()) <= 1
    assert json.loads(result.stdout) == json.loads(record.model_dump_json())
