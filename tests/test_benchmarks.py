"""Smoke tests of benchmarks/: tiny sizes, correctness and records only, no timings."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

from trades_repro import store
from trades_repro.spec import parse_spec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared `common` module


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load("bench_train_paths")
monitor = _load("bench_monitor")
common = _load("common")

TINY = {
    "name": "bench_tiny",
    "device": "cpu",
    "model": {"arch": "small_cnn", "width": 8},
    "method": {"beta": 3, "attack": {"eps": "16/255", "step_size": "4/255", "steps": 2}},
}


def _tiny_workload(steps: int = 2):
    generator = torch.Generator().manual_seed(0)
    drawn = [(torch.rand(8, 1, 8, 8, generator=generator).round(),  # saturated: 0 or 1
              torch.randint(0, 3, (8,), generator=generator)) for _ in range(steps)]
    return bench.Workload("tiny", parse_spec(TINY), drawn, (1, 8, 8), 3)


def test_exact_path_and_official_agree_on_the_first_step_and_knobs_run():
    res = bench.benchmark(_tiny_workload(), rounds=1, warmup=1, knobs=["channels_last"])
    official = res.first_loss["official"]
    # Same x_adv (bit for bit, also at saturated pixels) and the clean train-mode logits
    # reused instead of recomputed: float32 summation order only (~1e-7 relative).
    assert res.x_adv_equal
    assert res.first_loss["exact"] == pytest.approx(official, rel=1e-6)
    assert res.first_loss["channels_last"] == pytest.approx(official, rel=1e-4)
    assert set(res.ips) == {"official", "exact", "channels_last"}
    assert res.ratio["official"] == [1.0] and res.vs_exact["exact"] == [1.0]


def test_quick_arguments_and_unknown_knobs():
    args = bench.parse_args(["--quick"])
    assert args.knobs == ["channels_last"] and args.resnet_batch == 4
    with pytest.raises(SystemExit):
        bench.parse_args(["--knobs", "warp_drive"])


def test_monitor_shares_are_fractions_of_the_epoch():
    times = {"train": [8.0, 9.0], "monitored": [2.0, 1.0], "pgd10_only": [1.5, 0.5]}
    share = monitor.shares(times)
    assert share["monitor_share"] == pytest.approx([0.2, 0.1])
    assert share["fosc_sgcs_share"] == pytest.approx([0.05, 0.05])


def test_records_carry_device_versions_flags_and_figures(tmp_path):
    record = common.provenance(torch.device("cpu"), {"quick": True})
    path = common.write_record("unit", {**record, "figures": {"x": 1}}, out_dir=tmp_path)
    saved = json.loads(path.read_text())
    assert path.name.startswith("unit-cpu-")
    for key in ("device", "device_description", "torch", "git_sha", "flags", "figures",
                "load_average_end", "command", "cpu_capability", "cpu_flags"):
        assert key in saved, key
    # the vector units decide CPU figures (bf16 ran at 0.25x fp32 on one 'AMD EPYC', 1.03x
    # on another): the record names torch's dispatch level and the units present
    assert saved["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(saved["cpu_flags"]) <= set(store.CPU_FEATURES)
    assert common.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}


gate = _load("bench_gate")
FP32 = {"clean": 0.70, "pgd10": 0.40, "seconds": 1.0, "epochs": []}


def _run(clean: float, pgd10: float) -> dict:
    return {"clean": clean, "pgd10": pgd10, "seconds": 1.0, "epochs": []}


def test_gate_passes_a_knob_within_tolerance_and_fails_one_beyond():
    figures = {gate.FP32: FP32, gate.SEED1: _run(0.66, 0.45),
               "bf16": _run(0.73, 0.37), "all": _run(0.70, 0.33)}
    verdicts = gate.judge(figures, ["bf16", "all"], tolerance=0.06)
    assert verdicts["bf16"]["passed"] and not verdicts["all"]["passed"]
    assert verdicts["all"]["delta_pgd10"] == pytest.approx(0.07)
    assert verdicts[gate.SEED1]["delta_clean"] == pytest.approx(0.04)
    assert gate.exit_status(figures, verdicts, ["bf16", "all"]) == 1
    assert gate.exit_status(figures, verdicts, ["bf16"]) == 0
    at_edge = {gate.FP32: _run(0.5, 0.25), "tf32": _run(0.75, 0.5)}  # exact in binary
    assert gate.judge(at_edge, ["tf32"], 0.25)["tf32"]["passed"]  # at the tolerance: passes
    assert not gate.judge(at_edge, ["tf32"], 0.125)["tf32"]["passed"]


def test_gate_fails_a_knob_whose_run_failed_or_never_ran():
    figures = {gate.FP32: FP32, "compile": {"error": "RuntimeError: boom"}}
    verdicts = gate.judge(figures, ["compile", "bf16"], tolerance=0.06)
    assert verdicts["compile"] == {"passed": False, "error": "RuntimeError: boom"}
    assert verdicts["bf16"] == {"passed": False, "error": "not run"}
    assert gate.exit_status(figures, verdicts, ["compile"]) == 1


@pytest.mark.parametrize("fp32", [
    {"clean": 1.0, "pgd10": 0.02},   # ceiling and chance: agreement proves nothing
    {"clean": 0.12, "pgd10": 0.01},  # still at chance
    {"error": "NonFiniteLoss"},      # no baseline at all
])
def test_gate_is_inconclusive_without_an_informative_fp32(fp32):
    figures = {gate.FP32: fp32, "bf16": _run(0.5, 0.5)}
    verdicts = gate.judge(figures, ["bf16"], 0.06) if "error" not in fp32 else {}
    assert gate.exit_status(figures, verdicts, ["bf16"]) == 3
    assert gate.exit_status({}, {}, ["bf16"]) == 3


def test_one_informative_fp32_figure_is_enough():
    """fp32 is informative when one of its figures is off chance and below the ceiling (its
    PGD-10 at chance, its clean accuracy not): the gate then judges, it is not inconclusive."""
    fp32 = {"clean": 0.80, "pgd10": 0.05, "seconds": 1.0, "epochs": []}
    figures = {gate.FP32: fp32, "bf16": dict(fp32)}
    assert gate.exit_status(figures, gate.judge(figures, ["bf16"], 0.06), ["bf16"]) == 0


@pytest.mark.parametrize("workload", ["fashion", "cifar"])
@pytest.mark.parametrize("quick", [True, False])
def test_gate_runs_differ_only_in_the_knob_or_the_seed(workload, quick):
    specs = gate.gate_specs(workload, "cpu", ["bf16", "all"], epochs=3, quick=quick)
    assert list(specs) == [gate.FP32, gate.SEED1, "bf16", "all"]
    base = specs[gate.FP32].model_dump(mode="json")
    assert specs[gate.FP32].performance.precision == "fp32"
    seed1 = specs[gate.SEED1].model_dump(mode="json")
    assert seed1.pop("seed") == 1 and {**base, "seed": None} == {**seed1, "seed": None}
    for knob in ("bf16", "all"):
        raw = specs[knob].model_dump(mode="json")
        assert raw.pop("performance") != base["performance"]
        assert raw == {k: v for k, v in base.items() if k != "performance"}
    assert specs["all"].performance.compile and specs["bf16"].performance.precision == "bf16"
    assert (specs[gate.FP32].model.arch == "resnet18") is not quick


def test_gate_keeps_the_runs_it_finished_and_goes_on_past_a_failed_knob(tmp_path,
                                                                        monkeypatch):
    trained = []

    def fake(spec, runs):
        trained.append(spec.performance.channels_last)
        if spec.performance.channels_last:
            raise RuntimeError("compile exploded")
        return _run(0.7, 0.4)

    monkeypatch.setattr(gate, "figures_of", fake)
    saved = []
    specs = gate.gate_specs("cifar", "cpu", ["channels_last", "bf16"], 2, quick=True)
    figures = gate.run_all(specs, tmp_path, lambda f: saved.append(dict(f)))
    assert trained == [False, False, True, False]
    assert figures["channels_last"]["error"] == "RuntimeError: compile exploded"
    assert "RuntimeError" in figures["channels_last"]["traceback"]
    assert [len(s) for s in saved] == [1, 2, 3, 4]  # saved after every run


def test_gate_stops_when_fp32_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(gate, "figures_of", lambda spec, runs: 1 / 0)
    specs = gate.gate_specs("cifar", "cpu", ["bf16"], 2, quick=True)
    figures = gate.run_all(specs, tmp_path, lambda f: None)
    assert list(figures) == [gate.FP32] and "ZeroDivisionError" in figures[gate.FP32]["error"]


def test_gate_main_writes_its_record_and_exit_status(tmp_path, monkeypatch):
    runs = iter([FP32, _run(0.66, 0.42), _run(0.69, 0.41)])
    monkeypatch.setattr(gate, "figures_of", lambda spec, runs_dir: next(runs))
    monkeypatch.setattr(gate, "probe", lambda name, spec: [2.3, 2.2])
    status = gate.main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)])
    assert status == 0
    (path,) = tmp_path.glob("gate-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["exit_status"] == 0 and record["verdicts"]["channels_last"]["passed"]
    assert set(record["specs"]) == {gate.FP32, gate.SEED1, "channels_last"}
    assert record["flags"]["workload"] == "fashion"
    assert record["fp32_first_losses"] == [2.3, 2.2]  # fp32's first steps, probed first


@pytest.mark.parametrize("argv", [["--knobs", "warp"], ["--epochs", "1"], ["--epochs", "0"],
                                  ["--tolerance", "0"], ["--workload", "imagenet"]])
def test_gate_refuses_bad_arguments(argv):
    with pytest.raises(SystemExit) as err:
        gate.parse_args(["--device", "cpu", *argv])
    assert err.value.code == 2


def test_gate_refuses_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as err:
        gate.parse_args(["--device", "cuda"])
    assert err.value.code == 2


concurrency = _load("bench_concurrency")


def test_concurrency_workloads_and_levels():
    args = concurrency.parse(["--per-gpu", "4,2", "--quick", "--out-dir", "x"])
    assert args.levels == [1, 2, 4] and args.model == "digits" and args.epochs == 1
    resnet = concurrency.spec_for("resnet18", "cpu", 3)
    assert (resnet.seed, resnet.model.arch, resnet.data.dataset) == (3, "resnet18", "synthetic")
    assert resnet.optim.lr == 0.01 and not resnet.data.augment  # lr 0.1 diverges on this set
    digits = concurrency.spec_for("digits", "cpu", 1)
    assert digits.data.train_subset == 1024 and digits.seed == 1


@pytest.mark.parametrize("levels", ["1,two", "0,2", ""])
def test_concurrency_refuses_bad_levels(levels):
    with pytest.raises(SystemExit) as err:
        concurrency.parse(["--per-gpu", levels])
    assert err.value.code == 2


pack = _load("gpu_pack")


@pytest.mark.parametrize("gz", [True, False])
def test_gpu_pack_keeps_the_head_of_each_file_readable_by_the_real_loader(tmp_path, gz):
    from test_data import _write_fashion

    from trades_repro.data import load_splits
    from trades_repro.spec import DataSpec

    arrays = _write_fashion(tmp_path / "src", gz, n_train=9, n_test=5)
    written = pack.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                         "--train", "7", "--test", "3"])
    assert written == 0
    splits = load_splits(DataSpec(dataset="fashion_mnist", root=str(tmp_path / "out"),
                                  validation="test"), 0)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"][:7].astype("uint8"))
    assert torch.equal(splits.train.images[:, 0], expected)
    assert splits.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"][:3].tolist()
    # asking for more than there is keeps them all
    assert pack.idx_head(pack.idx_head(b"\0\0\x08\x01\0\0\0\x02ab", 5), 1) == \
        b"\0\0\x08\x01\0\0\0\x01a"


@pytest.mark.parametrize("raw", [b"", b"\0\0\x09\x01\0\0\0\x01a", b"\0\0\x08\x01\0\0\0\x03ab"])
def test_gpu_pack_refuses_what_is_not_a_whole_idx_file(raw):
    with pytest.raises(ValueError):
        pack.idx_head(raw, 1)


def test_gpu_pack_says_in_one_line_when_the_data_is_missing(tmp_path, capsys):
    assert pack.main(["--source", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train-images-idx3-ubyte[.gz] not in" in err


autoattack = _load("bench_autoattack")


def test_autoattack_attacks_the_gates_fp32_model_when_they_share_a_runs_folder(tmp_path):
    gate_fp32 = gate.gate_specs("fashion", "cpu", [], epochs=3, quick=False,
                                root=tmp_path)[gate.FP32]
    attacked = autoattack.workload_spec("fashion", "cpu", autoattack.DEFAULT_EPOCHS["fashion"])
    assert attacked.digest() == gate_fp32.digest()  # trained once, found by the second
    assert attacked.model.arch == "resnet18" and attacked.data.train_subset == 4096
    digits = autoattack.workload_spec("digits", "cpu", 7)
    assert digits.optim.epochs == 7 and digits.model.arch == "small_cnn"


@pytest.mark.parametrize("steps", [["bogus"], ["smoke+bogus"], ["gate", "smoke+train_path"]])
def test_gpu_session_refuses_an_unknown_step_before_running_any(tmp_path, steps):
    import subprocess

    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_session.sh"), *steps],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert done.returncode == 2 and "unknown step" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_gpu_session_refuses_more_steps_than_the_device_returns_files_for(tmp_path):
    steps = ["smoke", "gate", "concurrency", "autoattack", "autoattack_tf32", "train_paths"]
    assert _session(tmp_path, {"PLAN": "1"}, *steps).returncode == 0  # 6 logs + 2: 8 files
    done = _session(tmp_path, {"PLAN": "1"}, *steps, "smoke")
    assert done.returncode == 2 and "at most 6 steps" in done.stderr
    assert not (tmp_path / "out").exists()


def test_concurrency_saves_after_every_level_and_figures_what_finished(tmp_path,
                                                                      monkeypatch):
    speeds = {1: 100.0, 2: 150.0, 4: 160.0}
    monkeypatch.setattr(concurrency, "level", lambda c, args: {
        "aggregate": speeds[c], "per_run": speeds[c] / c})
    concurrency.main(["--per-gpu", "2,4", "--repeats", "1", "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("concurrency-cpu-*.json")
    figures = json.loads(path.read_text())["figures"]
    assert {c: f["speedup_over_1"] for c, f in figures.items()} == {
        "1": 1.0, "2": 1.5, "4": 1.6}
    saved = []
    concurrency.measure([1, 2], concurrency.parse(["--repeats", "2"]),
                        lambda r: saved.append({c: len(v["aggregate"]) for c, v in r.items()}))
    assert saved == [{1: 1, 2: 0}, {1: 1, 2: 1}, {1: 1, 2: 2}, {1: 2, 2: 2}]
    # a time-out after level 1 still leaves level 1's figures
    partial = concurrency.figures_of({1: {"aggregate": [100.0], "per_run": [100.0]},
                                      2: {"aggregate": [], "per_run": []}})
    assert list(partial) == ["1"] and partial["1"]["speedup_over_1"] == 1.0


def test_autoattack_record_holds_every_batch_size_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(autoattack, "workload", lambda spec, n, device, runs_dir=None: (
        None, None, None, 0.1))
    rates = {4: 1.0, 16: 4.0, 250: 2.0}
    asked = []
    monkeypatch.setattr(autoattack, "throughput",
                        lambda net, x, y, b, attack, device, eps, tf32=False: asked.append(
                            (b, tf32)) or {"images_per_s": rates[b], "seconds": 16 / rates[b],
                                           "robust_acc": 0.5})
    writes = []
    real = autoattack.write_record
    monkeypatch.setattr(autoattack, "write_record", lambda *a, **k: writes.append(1) or
                        real(*a, **k))
    record = autoattack.main(["--quick", "--attacks", "standard", "--tf32", "--out-dir",
                              str(tmp_path)])
    (path,) = tmp_path.glob("autoattack-cpu-*.json")
    saved = json.loads(path.read_text())
    assert asked == [(250, True), (16, True), (4, True)]  # largest first: a box keeps it
    assert saved["flags"]["tf32"] is True and saved["attack_flags"]["tf32_matmul"] is True
    assert set(saved["figures"]["standard"]) == {"4", "16", "250"}
    assert saved["fastest_standard_batch"] == 16 == record["fastest_standard_batch"]
    assert saved["seconds_per_10000"]["standard"] == pytest.approx(2500.0)
    assert len(writes) == 1 + 3 + 1  # at start, after each batch size, at the end


def test_autoattack_keeps_each_cascade_stage_and_echoes_it(capsys):
    logger = logging.getLogger(autoattack.AUTOATTACK_LOGGER)
    level = logger.level
    # a debug line while debug is off caches "off" in the logger: setting `.level` directly
    # kept that cache, and the stages were lost whenever pyautoattack had logged before
    logger.debug("robust accuracy after NOTHING: 0.00% (total time 0.0 s)")
    with autoattack._stages() as stages:
        logger.debug("using standard version including apgd-ce, square.")
        logger.debug("robust accuracy after APGD-CE: 54.40% (total time 12.5 s)")
        logger.debug("apgd-t - 1/1 - 3 out of 136 successfully perturbed")
        logger.debug("robust accuracy after SQUARE: 52.00% (total time 75.7 s)")
    assert stages == [{"attack": "apgd-ce", "robust_acc": pytest.approx(0.544),
                       "cumulative_s": 12.5},
                      {"attack": "square", "robust_acc": pytest.approx(0.52),
                       "cumulative_s": 75.7}]
    err = capsys.readouterr().err
    assert "after APGD-CE: 54.40%" in err and "successfully perturbed" not in err
    assert logger.level == level and not any(isinstance(h, autoattack._StageHandler)
                                             for h in logger.handlers)



aacost = _load("bench_aa_cost")


def test_pass_counter_tells_input_only_backwards_from_weight_backwards():
    torch.manual_seed(0)
    counter = aacost.PassCounter(torch.nn.Sequential(torch.nn.Flatten(),
                                                     torch.nn.Linear(16, 10)))
    x = torch.rand(5, 1, 4, 4, requires_grad=True)
    with torch.no_grad():
        counter(x)  # a no-grad forward (Square): no backward to count
    torch.autograd.grad(counter(x).sum(), [x])  # APGD: the input's gradient only
    counter(x).sum().backward()  # FAB: every leaf's gradient
    with aacost.frozen_weights(counter):
        counter(x[:3]).sum().backward()  # FAB on frozen weights
    assert counter.snapshot() == {"forward": 18, "backward": 13, "weight_backward": 5}
    assert aacost.forward_equivalents(counter.snapshot()) == 36


def test_aa_cost_splits_the_passes_at_pyautoattacks_lines_and_reads_gpu_rates(tmp_path):
    logger = logging.getLogger(aacost.AUTOATTACK_LOGGER)
    counts = {"forward": 0}
    stages: list[dict] = []
    handler = aacost._CountingStages(stages, lambda: dict(counts))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        counts["forward"] = 10
        logger.debug("initial accuracy: 80.00%")
        counts.update(forward=410, backward=400)
        logger.debug("robust accuracy after APGD-CE: 50.00% (total time 2.0 s)")
        counts["forward"] = 5410
        logger.debug("robust accuracy after SQUARE: 40.00% (total time 7.0 s)")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    rows = aacost._per_stage(stages, 10, seconds=7.5)
    assert [(r["attack"], r["entering"], r["robust_after"], r["forward_equivalents"])
            for r in rows] == [("clean", 10, 8, 10), ("apgd-ce", 8, 5, 800),
                               ("square", 5, 4, 5000)]
    assert rows[2]["per_entering_image"] == 1000 and rows[1]["share"] == 800 / 5810
    assert [r["seconds"] for r in rows] == pytest.approx([0.5, 2.0, 5.0])

    def record(name, workloads):
        (tmp_path / name).write_text(json.dumps({"device_name": "GPU X",
                                                 "workloads": workloads}))

    speed = {"median": 100.0}
    record("train_paths-cuda-20260101T000000Z.json",
           [{"batch": 256, "images_per_s": {"exact": speed, "tf32": {"median": 300.0}}}])
    record("train_paths-cuda-20260202T000000Z.json",  # newer: its fp32 wins, no tf32 in it
           [{"batch": 256, "images_per_s": {"exact": {"median": 200.0}}},
            {"batch": 32, "images_per_s": {"tf32": {"median": 1.0}}}])
    record("train_paths-cpu-20270101T000000Z.json",
           [{"batch": 256, "images_per_s": {"exact": {"median": 1.0}}}])
    rates = aacost.gpu_rates(tmp_path)
    assert {p: (r["forward_equivalents_per_s"], r["record"][17:25])
            for p, r in rates.items()} == {"fp32": (200.0 * 27, "20260202"),
                                           "tf32": (300.0 * 27, "20260101")}
    guess = aacost.estimate(10_000.0, 0.2, rates, flops_per_pass=1e9, peak_tflops=50.0)
    assert guess["forward_equivalents_floor"] == 2e7
    assert guess["seconds"] == {"fp32": pytest.approx(2e7 / 5400),
                                "tf32": pytest.approx(2e7 / 8100)}
    assert guess["fp32_seconds_at_peak"] == pytest.approx(2e7 * 1e9 / 50e12)
    assert guess["training_fp32_share_of_peak"] == {"fp32": pytest.approx(5400 * 1e9 / 50e12)}
    # the paper's CIFAR-100 ResNet-18: about 1.1 GFLOP per forward (0.56 G multiply-adds)
    assert aacost.cifar100_forward_flops() == pytest.approx(1.11e9, rel=0.01)
    assert aacost.gpu_rates(tmp_path / "none") == {}



@pytest.mark.parametrize("bad", [["--n", "0"], ["--batch-size", "-1"], ["--rounds", "0"],
                                 ["--robust", "0"], ["--robust", "1.5"],
                                 ["--peak-tflops", "0"], ["--robust", "half"]])
def test_aa_cost_refuses_nonsense_options_in_one_line(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        aacost.parse_args(bad)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert bad[0] in err and "Traceback" not in err

@pytest.mark.slow
def test_aa_cost_quick_counts_standard_passes_and_finds_frozen_weights_identical(tmp_path):
    """The whole script at --quick (a digits model trained for it, ~25 s): a robust image
    costs the standard cascade's full course, whatever the model."""
    record = aacost.main(["--quick", "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("aa_cost-cpu-*.json")
    assert json.loads(path.read_text())["gpu_estimate_10000"] == record["gpu_estimate_10000"]
    robust = record["robust_images"]
    assert robust["still_robust"] >= robust["n"] // 2
    per_stage = {s["attack"]: s for s in robust["stages"]}
    # APGD 100 iterations (forward + input gradient), 9 targets for APGD-T and FAB-T,
    # Square 5,000 queries: one forward each (plus its initial one)
    assert per_stage["apgd-ce"]["per_entering_image"] == pytest.approx(200, abs=10)
    assert per_stage["apgd-t"]["per_entering_image"] == pytest.approx(1800, rel=0.1)
    assert per_stage["square"]["per_entering_image"] == pytest.approx(5000, abs=10)
    assert all(s.get("weight_backward", 0) == 0 for s in robust["stages"])  # frozen
    assert record["frozen_vs_plain"]["x_adv_equal"]
    assert record["fab_t_resnet18_frozen_vs_plain"]["x_adv_equal"]

def test_an_unexpected_error_in_the_gate_is_exit_4_not_a_failed_knob(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr(gate, "figures_of", lambda spec, runs_dir: FP32)
    monkeypatch.setattr(gate, "probe", lambda name, spec: [2.3, 2.2])
    monkeypatch.setattr(gate, "judge", lambda *a: 1 / 0)  # a bug after the runs
    status = common.exit_code(gate.main, ["--device", "cpu", "--quick", "--out-dir",
                                          str(tmp_path)])
    assert status == 4 and "ZeroDivisionError" in capsys.readouterr().err
    assert common.exit_code(lambda argv: 3) == 3  # a script's own status passes through


def test_a_script_that_returns_its_record_exits_0():
    assert common.exit_code(lambda argv: {"figures": {}}) == 0
    assert common.exit_code(lambda argv: None) == 0


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")
                                          if p.name != "common.py"))
def test_every_script_exits_through_exit_code(script):
    """`sys.exit(main())` of a record is exit 1 and a bare `main()` crash is exit 1 too, the
    gate's "a knob failed": each script's entry point must map a crash to 4 (exit_code)."""
    import ast

    tree = ast.parse((BENCHMARKS / script).read_text())
    (guard,) = [node for node in tree.body if isinstance(node, ast.If)
                and "__main__" in ast.unparse(node.test)]
    assert "sys.exit(exit_code(main))" in ast.unparse(guard)


def test_a_benchmark_that_crashes_exits_4(tmp_path):
    import subprocess

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # a data folder under a file: generating it fails (OSError)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_tinyimagenet.py"),
                           "--folder", str(blocker / "tiny"), "--classes", "1",
                           "--per-class", "1", "--val", "1", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 4, done.stderr[-2000:]
    assert "our own failure" in done.stderr


# ------------------------------------------------------- what a lent GPU will run, checked here

precheck = _load("gpu_precheck")


@pytest.mark.parametrize("losses", [[2.5, 3.8, 10.7, 15.1, float("nan")], [2.5, 2.4, 5.1],
                                    [2.5, float("inf")], [float("nan")]])
def test_a_nan_or_exploding_first_loss_is_diverged_in_one_line(losses):
    with pytest.raises(common.Diverged) as err:
        common.check_stable("fashion fp32", losses)
    assert "\n" not in str(err.value) and "fashion fp32" in str(err.value)
    common.check_stable("stable", [2.51, 2.27, 2.25, 2.12, 2.04])
    common.check_stable("at the limit", [2.0, 4.0])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(precheck.WORKLOADS))
def test_every_gpu_workload_takes_its_first_steps_finite_and_not_exploding(name, request):
    """The session's own specs (ResNet-18 and all), five steps at batch 32 on a CPU, as
    `gpu_precheck.py` runs them: the gate's fashion ResNet-18 at the spec's lr 0.1 was NaN
    by step 5 (and 2.7x its first loss at step 2), which cost a GPU session its gate and its
    AutoAttack figure."""
    root = request.getfixturevalue("debian_fashion_mnist") if "fashion" in name else None
    spec = precheck.WORKLOADS[name](root)
    assert spec.model.arch == "resnet18" and spec.device == "cpu"
    figures = precheck.stable(name, spec, steps=5, batch=32)  # Diverged otherwise
    assert len(figures["losses"]) == 5


def test_the_gpu_workloads_are_the_specs_the_session_trains(tmp_path):
    gate_fp32 = gate.gate_specs("fashion", "cpu", [], 3, quick=False, root=tmp_path)[gate.FP32]
    assert precheck.WORKLOADS["gate_fashion_fp32"](tmp_path).digest() == gate_fp32.digest()
    assert precheck.WORKLOADS["concurrency_resnet18"](None).digest() == \
        concurrency.spec_for("resnet18", "cpu", 0).digest()
    smoke = precheck.WORKLOADS["smoke"](None)
    assert smoke.performance.compile and smoke.evaluation.square_queries <= 1000
    assert gate_fp32.optim.lr == 0.01  # lr 0.1 diverges on this set (see common.fashion_resnet)


def test_gate_stops_in_one_line_when_fp32_diverges_in_its_first_steps(tmp_path, monkeypatch,
                                                                      capsys):
    def diverged(name, spec):
        raise gate.Diverged(f"{name}: the training loss diverged in its first 5 steps")

    trained = []
    monkeypatch.setattr(gate, "probe", diverged)
    monkeypatch.setattr(gate, "figures_of", lambda spec, runs: trained.append(spec) or FP32)
    status = common.exit_code(gate.main, ["--device", "cpu", "--quick", "--out-dir",
                                          str(tmp_path)])
    assert status == 3 and not trained  # no run trained: seconds, not the time box
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "diverged in its first 5 steps" in err
    (path,) = tmp_path.glob("gate-cpu-*.json")
    assert "diverged" in json.loads(path.read_text())


def test_the_gate_probes_its_fp32_run_through_the_engine(monkeypatch):
    """`probe` takes the spec's first steps (`first_losses`), then judges them."""
    monkeypatch.setattr(sys.modules["common"], "first_losses",
                        lambda spec, steps: [2.5, float("nan")])
    with pytest.raises(sys.modules["common"].Diverged):
        gate.probe("fp32", gate.gate_specs("cifar", "cpu", [], 2, quick=True)[gate.FP32])


def test_first_losses_are_the_steps_train_takes(tmp_path):
    from factories import digits

    from trades_repro.train import train

    raw = digits(data={"train_subset": 128}, optim={"epochs": 1, "batch_size": 64},
                 monitor={"batch_metrics": True})
    spec = parse_spec(raw)
    losses = common.first_losses(spec, 2)
    run = train(spec, tmp_path, progress=False).run_dir
    logged = [json.loads(line)["loss"]
              for line in (run / store.BATCHES_FILE).read_text().splitlines()]
    assert losses == pytest.approx(logged, rel=1e-6) and len(losses) == 2
    assert len(common.first_losses(spec, 1, batch_size=32)) == 1


def test_autoattack_stops_in_one_line_when_its_workload_diverges(tmp_path, monkeypatch,
                                                                 capsys):
    def diverged(name, spec):
        raise autoattack.Diverged(f"{name}: the training loss diverged")

    monkeypatch.setattr(autoattack, "probe", diverged)
    monkeypatch.setattr(autoattack, "train", lambda *a, **k: 1 / 0)  # never reached
    status = common.exit_code(autoattack.main, ["--quick", "--runs-dir", str(tmp_path),
                                                "--out-dir", str(tmp_path)])
    assert status == 3 and capsys.readouterr().err.count("\n") == 1


def test_autoattack_is_timed_under_the_evaluation_numerics(monkeypatch):
    """As `evaluate` runs it: TF32 off and deterministic cuDNN (torch's default is TF32
    cuDNN on, which on a GPU would time other kernels than an evaluation uses)."""
    import pyautoattack

    from trades_repro import numerics

    seen = []

    class Fake:
        def __init__(self, model, **kwargs):
            self.attacks_to_run = []

        def run_standard_evaluation(self, x, y, batch_size):
            seen.append(numerics.current())
            return x, y

    monkeypatch.setattr(pyautoattack, "AutoAttack", Fake)
    with numerics.pinned(tf32=True, deterministic=False):  # what torch would leave on
        autoattack.throughput(None, torch.zeros(2, 1), torch.zeros(2), 2, "standard", "cpu",
                              0.1)
    assert seen == [{"tf32_matmul": False, "tf32_cudnn": False, "cudnn_deterministic": True,
                     "cudnn_benchmark": False}]


def test_a_concurrency_worker_trains_under_the_runs_training_numerics(tmp_path, monkeypatch,
                                                                      capsys):
    """As `train` does: the spec's flags (fp32: TF32 off), not torch's defaults (TF32 cuDNN
    on), which made a GPU figure one of TF32 training while run-claim trains in fp32."""
    import trades_repro.train as training
    from trades_repro import numerics

    seen = []
    monkeypatch.setattr(training, "run_epoch", lambda session, epoch: seen.append(
        numerics.current()))
    (tmp_path / "go").touch()
    with numerics.pinned(tf32=True, deterministic=False):  # torch's default TF32 cuDNN
        concurrency.worker(concurrency.parse(["--worker", "--barrier", str(tmp_path),
                                              "--epochs", "2"]))
    assert seen == [{"tf32_matmul": False, "tf32_cudnn": False, "cudnn_deterministic": False,
                     "cudnn_benchmark": False}] * 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["images"] == 2 * 1024


def test_train_paths_saves_a_partial_record_after_every_stage(tmp_path, monkeypatch):
    """A call stopped by its time box (here: an error in the x_adv check) keeps each path's
    first step (loss and seconds: a compiled path's compile) in a record marked partial."""
    def stopped(w, model):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "x_adv_equal", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--workloads", "digits", "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("train_paths-cpu-*.json")
    saved = json.loads(path.read_text())
    (partial,) = saved["workloads"]
    assert saved["partial"] and partial["partial"] and partial["stage"] == "first step"
    assert set(partial["first_step_s"]) == {"official", "exact", "channels_last"}
    assert all(s > 0 for s in partial["first_step_s"].values())


def test_train_paths_record_times_each_paths_first_step(tmp_path):
    record = bench.main(["--quick", "--workloads", "digits", "--rounds", "1", "--out-dir",
                         str(tmp_path)])
    (path,) = tmp_path.glob("train_paths-cpu-*.json")
    saved = json.loads(path.read_text())
    assert not saved["partial"] and saved["workloads"] == json.loads(json.dumps(
        record["workloads"]))
    (figures,) = saved["workloads"]
    assert set(figures["first_step_s"]) == set(figures["warmup_s"]) == {
        "official", "exact", "channels_last"}


def _session(tmp_path, env: dict, *steps: str):
    import subprocess

    return subprocess.run(["bash", str(BENCHMARKS / "gpu_session.sh"), *steps],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), **env})


def test_gpu_session_plans_one_device_call(tmp_path):
    """15 minutes of device time hold one call (<= 600 s, after a ~90 s start): every step
    and its kill grace within 540 s, what issue 17 still lacks (AutoAttack at GPU scale,
    fp32 then TF32) first, then the smoke test; on the CPU the rehearsal runs the pre-checks
    before the small versions."""
    plan = _session(tmp_path, {"PLAN": "1"}).stdout.splitlines()
    steps = [line.split()[0] for line in plan[:-1]]
    assert steps == ["autoattack", "autoattack_tf32", "smoke"]
    assert plan[-1] == "grace 5 per step; session 540 s"
    dry = _session(tmp_path, {"PLAN": "1", "DRY": "1"}).stdout.splitlines()
    assert dry[0].startswith("precheck ") and len(dry) == len(plan) + 1
    assert not (tmp_path / "out").exists()


def test_gpu_session_attacks_one_model_in_fp32_then_tf32(tmp_path):
    stub = tmp_path / "py"
    stub.write_text("#!/bin/bash\necho \"ran $*\"\n")
    stub.chmod(0o755)
    done = _session(tmp_path, {"PY": str(stub)}, "autoattack", "autoattack_tf32")
    assert done.returncode == 0, done.stderr
    fp32, tf32 = ((tmp_path / "out" / f"{s}.log").read_text().split()
                  for s in ("autoattack", "autoattack_tf32"))
    for args in (fp32, tf32):
        assert " ".join(args[args.index("--n"):][:4]) == "--n 500 --batch-sizes 500"
    assert "--tf32" in tf32 and "--tf32" not in fp32
    runs = {args[args.index("--runs-dir") + 1] for args in (fp32, tf32)}
    assert len(runs) == 1  # the second finds the first's model trained


def test_gpu_session_boxes_each_step_and_goes_on_past_a_failure_or_a_time_out(tmp_path):
    """A failed smoke and a hanging gate end their own steps only; what the smoke left
    unused goes to the gate; each step's log is under $OUT as it runs, and the archive
    holds them all."""
    import tarfile

    stub = tmp_path / "py"
    stub.write_text("#!/bin/bash\ncase \"$*\" in\n  *test_gpu*) echo failing; exit 1 ;;\n"
                    "  *bench_gate*) echo hanging; sleep 60 ;;\n  *) echo \"ran $*\" ;;\nesac\n")
    stub.chmod(0o755)
    boxes = {f"{s}_S": "1" for s in ("SMOKE", "GATE", "CONCURRENCY", "AUTOATTACK",
                                      "TRAIN_PATHS")}
    done = _session(tmp_path, {"PY": str(stub), **boxes}, "smoke", "gate", "concurrency",
                    "autoattack", "train_paths")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    summary = (out / "gpu_session.txt").read_text()
    assert "smoke: exit 1" in summary and "gate: exit 124" in summary
    for later in ("concurrency", "autoattack", "train_paths"):
        assert f"{later}: exit 0" in summary
        assert "bench_" in (out / f"{later}.log").read_text()
    # the gate's box: its own 1 s + the smoke's unused second and grace (5 s), less the
    # second the smoke may have taken
    (after, box), = re.findall(r"gate: exit 124 after (\d+) s \(box (\d+) s\)", summary)
    assert int(box) >= 6 and abs(int(after) - int(box)) <= 1
    assert f"stopped by its {box} s time box" in (out / "gate.log").read_text()
    with tarfile.open(out / "gpu_session.tgz") as archive:
        names = {n.lstrip("./") for n in archive.getnames()}
    assert {"smoke.log", "gate.log", "train_paths.log", "gpu_session.txt"} <= names
    assert len(list(out.iterdir())) <= 8  # the device returns at most eight files
