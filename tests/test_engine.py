"""The training engine: variants, healing, checkpoint policies, App. G metrics, fast paths."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from factories import digits
from hypothesis import given
from hypothesis import strategies as st

from trades_repro import engine, steps, store
from trades_repro import train as trainlib
from trades_repro.awp import TradesAWP
from trades_repro.engine import lr_at
from trades_repro.policies import PolicyState, select_checkpoints, update_policies
from trades_repro.spec import OptimSpec, SpecError, parse_spec


def run(raw: dict, tmp_path: Path) -> store.RunResult:
    return trainlib.train(parse_spec(raw), tmp_path, progress=False)


# ------------------------------------------------------------------ variants


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"method": {"name": "trades_pgd_inner"}},
        {"optim": {"schedule": "multistep", "milestones": [1]}},
    ],
    ids=["trades", "pgd_inner", "multistep"],
)
def test_each_variant_trains_two_epochs_with_full_records(tmp_path, extra):
    result = run(digits(**extra), tmp_path)
    assert [r.epoch for r in result.records] == [1, 2]
    for r in result.records:
        assert 0 <= r.val_pgd10_acc <= r.val_clean_acc <= 1
        assert r.val_fosc is not None and r.val_sgcs is not None and r.fosc_ok is not None
        assert r.train_gap == pytest.approx(r.train_clean_acc - r.train_adv_acc)
    expected_lrs = [0.1, 0.1 * 0.1] if "optim" in extra else [0.1, 0.1]
    assert [r.lr for r in result.records] == pytest.approx(expected_lrs)


def test_pgd_inner_variant_calls_pgd_not_tpgd(monkeypatch, tmp_path):
    called = {"pgd": 0, "tpgd": 0}
    for name in called:
        real = getattr(steps, name)
        monkeypatch.setattr(steps, name, lambda *a, _r=real, _n=name, **k: (
            called.__setitem__(_n, called[_n] + 1), _r(*a, **k))[1])
    run(digits(method={"name": "trades_pgd_inner"}, optim={"epochs": 1}), tmp_path)
    assert called == {"pgd": 10, "tpgd": 0}


def test_awp_variant_perturbs_after_warmup_and_restores(monkeypatch, tmp_path):
    log = []
    for method in ("compute", "perturb", "restore"):
        real = getattr(TradesAWP, method)
        monkeypatch.setattr(TradesAWP, method, lambda self, *a, _r=real, _m=method: (
            log.append(_m), _r(self, *a))[1])
    result = run(digits(method={"name": "trades_awp", "awp": {"warmup": 2}}), tmp_path)
    assert log == ["compute", "perturb", "restore"] * 10  # epoch 2 only: 10 batches
    assert len(result.records) == 2


def test_lr_schedules():
    constant = OptimSpec()
    multistep = OptimSpec(schedule="multistep")
    assert {lr_at(constant, e) for e in range(1, 201)} == {0.1}
    assert [lr_at(multistep, e) for e in (1, 100, 101, 150, 151, 200)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_validation_set_choice_is_recorded(tmp_path):
    held = run(digits(optim={"epochs": 1}), tmp_path / "a").records[0]
    test = run(digits(optim={"epochs": 1}, data={"validation": "test"}), tmp_path / "b")
    assert held.val_source == "holdout" and test.records[0].val_source == "test"


# ------------------------------------------------------------------ healing (Algorithm 1)


def test_healing_noises_exactly_the_next_ten_batches(monkeypatch, tmp_path):
    seen = []  # per training step: was the input off the digits' 1/16 grey-level grid?
    real_step = trainlib.train_step

    def spy(model, optimizer, x, y, *args):
        seen.append(bool(((x * 16) - (x * 16).round()).abs().max() > 1e-4))
        return real_step(model, optimizer, x, y, *args)

    monkeypatch.setattr(trainlib, "train_step", spy)
    raw = digits(data={"train_subset": 960}, monitor={"batch_metrics": True},
                 healing={"enabled": True, "fosc_threshold": 0.0, "noise_batches": 10})
    result = run(raw, tmp_path)  # 15 batches per epoch
    first, second = result.records
    assert first.noised_batches == [] and second.noised_batches == list(range(10))
    assert seen == [False] * 15 + [True] * 10 + [False] * 5
    event = first.healing_event
    assert event is not None and event.epoch == 1 and event.fosc == first.val_fosc
    assert event.threshold == 0.0 and event.noise_batches == 10
    lines = (result.run_dir / store.BATCHES_FILE).read_text().splitlines()
    assert [json.loads(line)["noised"] for line in lines] == seen


def test_no_healing_below_threshold(tmp_path):
    raw = digits(healing={"enabled": True, "fosc_threshold": 1e9})
    records = run(raw, tmp_path).records
    assert all(r.healing_event is None and r.noised_batches == [] for r in records)


# ------------------------------------------------------------------ checkpoint policies


def _series(accs, foscs):
    return [{"epoch": i + 1, "val_pgd10_acc": a, "val_fosc": f}
            for i, (a, f) in enumerate(zip(accs, foscs, strict=True))]


def test_policies_on_a_crafted_series():
    series = _series([0.30, 0.50, 0.60, 0.55, 0.60], [0.01, 0.02, 0.20, 0.03, 0.01])
    # best_pgd10: epochs 3 and 5 tie, the earlier wins; epoch 3 fails the FOSC check
    assert select_checkpoints(series, threshold=0.05) == {
        "best_pgd10": 3, "best_pgd10_fosc_ok": 5}
    assert select_checkpoints(series[:4], threshold=0.05)["best_pgd10_fosc_ok"] == 4
    assert select_checkpoints(series, threshold=1.0) == {
        "best_pgd10": 3, "best_pgd10_fosc_ok": 3}
    assert select_checkpoints(series, threshold=0.0)["best_pgd10_fosc_ok"] is None
    no_fosc = _series([0.3, 0.4], [None, None])
    assert select_checkpoints(no_fosc, 0.05) == {"best_pgd10": 2, "best_pgd10_fosc_ok": None}


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=30),
       st.floats(0, 1))
def test_policies_pick_the_first_maximum_among_eligible_epochs(pairs, threshold):
    chosen = select_checkpoints(_series(*zip(*pairs, strict=True)), threshold)
    accs = [a for a, _ in pairs]
    assert chosen["best_pgd10"] == accs.index(max(accs)) + 1
    ok = [(a, i + 1) for i, (a, f) in enumerate(pairs) if f <= threshold]
    expected = min((i for a, i in ok if a == max(a for a, _ in ok)), default=None)
    assert chosen["best_pgd10_fosc_ok"] == expected


@pytest.mark.parametrize(("fosc", "ok"), [(0.0499, True), (0.05, True), (0.0501, False)])
def test_fosc_ok_is_at_most_the_threshold(fosc, ok):
    """The FOSC-aware policy keeps epochs with FOSC <= threshold: at the threshold is ok."""
    fields = update_policies(PolicyState(), 1, {"val_pgd10_acc": 0.3, "val_fosc": fosc}, 0.05)
    assert fields["fosc_ok"] is ok and fields["best_pgd10_fosc_ok"] is ok


def test_run_writes_both_policy_checkpoints_and_an_index(tmp_path):
    result = run(digits(optim={"epochs": 3}, healing={"fosc_threshold": 1e9}), tmp_path)
    index = store.read_json(result.run_dir / store.CHECKPOINTS_FILE)
    assert index["last"] == {"epoch": 3, "file": store.LAST_FILE}
    assert index["best_pgd10"]["file"] == store.BEST_FILE
    assert index["best_pgd10_fosc_ok"] == index["best_pgd10"]  # every epoch eligible
    assert not (result.run_dir / store.BEST_FOSC_OK_FILE).exists()  # no duplicate kept


def test_policies_that_differ_keep_two_files(tmp_path):
    result = run(digits(optim={"epochs": 1}, healing={"fosc_threshold": 0.0}), tmp_path)
    index = store.read_json(result.run_dir / store.CHECKPOINTS_FILE)
    assert index["best_pgd10"]["epoch"] == 1
    assert index["best_pgd10_fosc_ok"] == {"epoch": None, "file": None}


# ------------------------------------------------------------------ App. G metrics


def test_batch_metrics_are_consistent(tmp_path):
    monitored = run(digits(monitor={"batch_metrics": True}), tmp_path)
    lines = [json.loads(x) for x in
             (monitored.run_dir / store.BATCHES_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 21))
    for r in lines:
        assert r["w_grad_norm"] <= r["ce_norm"] + r["kl_norm"] + 1e-6  # triangle inequality
        assert -1 <= r["grad_cosine_similarity"] <= 1
    for record in monitored.records:
        assert record.w_grad_norm == pytest.approx(
            sum(r["w_grad_norm"] for r in lines if r["epoch"] == record.epoch) / 10)


def test_monitoring_a_step_does_not_change_it():
    """Same weights, buffers and optimiser state after a step with and without App. G."""
    spec = parse_spec(digits())
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    states = []
    for monitored in (False, True):
        torch.manual_seed(0)
        model = engine.build_model(spec.model, in_channels=1, num_classes=10, image_size=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step_spec = parse_spec(digits(monitor={"batch_metrics": monitored}))
        out = steps.train_step(model, opt, x, y, step_spec, torch.Generator().manual_seed(1))
        assert (out.batch_metrics is not None) == monitored
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key  # bit for bit, not just close


def test_a_monitored_run_is_the_unmonitored_run_bit_for_bit(tmp_path):
    # App. G's gradients once came from summing CE's and β·KL's separately: float noise that
    # two epochs turned into a different run (train loss 1.689 vs 1.679 on Fashion-MNIST)
    runs = [trainlib.train(parse_spec(digits(optim={"epochs": 2},
                                             monitor={"batch_metrics": on})),
                           tmp_path / str(on), progress=False).records for on in (False, True)]
    app_g = set(trainlib.APP_G_KEYS)
    plain, monitored = ([r.model_dump(exclude=app_g) for r in rs] for rs in runs)
    assert plain == monitored
    assert all(r.w_grad_norm is not None for r in runs[1])


def test_after_step_gradient_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    spec = parse_spec(digits())
    model = engine.build_model(spec.model, in_channels=1, num_classes=10, image_size=8)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps._full_grad_after_step(model, x, x.clone(), y, spec)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ fast paths


def _three_forward_reference(model, x, x_adv, y):
    """Official TRADES' outer loss: clean, adversarial, clean again, all in train mode."""
    model.train()
    ce = torch.nn.functional.cross_entropy(model(x), y)
    logits_adv = model(x_adv)
    _, kl = steps.trades_terms(model(x), logits_adv, y)
    return ce + 3 * kl


def test_two_forwards_give_official_loss_gradient_and_batchnorm_buffers():
    torch.manual_seed(0)
    spec = parse_spec(digits())
    base = engine.build_model(spec.model, in_channels=1, num_classes=10, image_size=8).double()
    x, y = torch.rand(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    ours, official = copy.deepcopy(base), copy.deepcopy(base)
    out = steps.outer_terms(ours, x, x_adv, y)
    loss = out.ce + 3 * out.kl
    grads = torch.autograd.grad(loss, list(ours.parameters()))
    out.bn_repeat.apply()  # after backward: autograd saved the running statistics
    ref = _three_forward_reference(official, x, x_adv, y)
    ref_grads = torch.autograd.grad(ref, list(official.parameters()))
    assert torch.allclose(loss, ref, rtol=0, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12)
               for a, b in zip(grads, ref_grads, strict=True))
    theirs = official.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, theirs[key], rtol=0, atol=1e-12), key
    assert theirs["features.1.num_batches_tracked"] == 3


def test_clean_stats_repeat_refuses_cumulative_batchnorm_and_a_missing_clean_forward():
    with pytest.raises(ValueError, match="momentum=None"):
        steps.CleanStatsRepeat(torch.nn.BatchNorm1d(3, momentum=None).train())
    with pytest.raises(RuntimeError, match="clean_done"):
        steps.CleanStatsRepeat(torch.nn.BatchNorm1d(3).train()).apply()


def test_the_retired_fidelity_flag_is_one_clear_error():
    with pytest.raises(SpecError, match="performance.*'fidelity' was retired"):
        parse_spec(digits(performance={"fidelity": True}))


def test_init_projected_reaches_tpgd(monkeypatch):
    calls = []
    monkeypatch.setattr(steps, "tpgd", lambda *a, **k: calls.append(k) or a[1])
    for projected in (False, True):
        spec = parse_spec(digits(method={"attack": {"init_projected": projected}}))
        steps.inner_max(None, torch.zeros(1), torch.zeros(1), spec, None)
    assert [c["project_start"] for c in calls] == [False, True]


@pytest.mark.parametrize(
    "performance",
    [{"precision": "bf16"}, {"channels_last": True}, {"cudnn_benchmark": True}, {"tf32": True}],
    ids=["bf16", "channels_last", "cudnn_benchmark", "tf32"],
)
def test_performance_paths_run_on_cpu(tmp_path, performance):
    result = run(digits(optim={"epochs": 1}, performance=performance), tmp_path)
    assert result.records[0].val_clean_acc > 0.2  # learned something in one epoch


def test_compile_path_wraps_the_model_and_saves_plain_weights(monkeypatch, tmp_path):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(kw) or net)
    result = run(digits(optim={"epochs": 1}, performance={"compile": True}), tmp_path)
    assert compiled == [{"dynamic": None}]  # automatic: only a dimension that changes
    saved = torch.load(result.run_dir / store.LAST_FILE, weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in saved["model"])


def test_train_step_returns_device_tensors_and_the_engine_uses_foreach_sgd():
    """No host sync per step: the loop sums these on the device and reads them per epoch."""
    spec = parse_spec(digits())
    torch.manual_seed(0)
    model = engine.build_model(spec.model, in_channels=1, num_classes=10, image_size=8)
    optimizer = engine.build_optimizer(model, spec.optim, torch.device("cpu"))
    assert optimizer.defaults["foreach"] is True
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    out = steps.train_step(model, optimizer, x, y, spec, torch.Generator().manual_seed(1))
    for value in (out.loss, out.clean_correct, out.adv_correct):
        assert isinstance(value, torch.Tensor) and value.dim() == 0
    assert not out.loss.requires_grad and out.batch_metrics is None
