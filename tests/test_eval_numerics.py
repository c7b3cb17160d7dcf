"""Evaluation that gives the same numbers everywhere, as fast as it can.

Pinned backend numerics (issue: the first GPU run), batch-size invariance of PGD-10 (so the
batch may follow the free memory), the out-of-memory hint, and the AutoAttack cascade composed
from attacks already run alone instead of run again.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_evaluate import _data, _Linear, _settings

from trades_repro import evalbatch, numerics
from trades_repro import evaluate as ev
from trades_repro import train as trainlib
from trades_repro.data import ImageSet
from trades_repro.errors import BadInput
from trades_repro.spec import parse_spec

FLAGS = ("tf32_matmul", "tf32_cudnn", "cudnn_deterministic", "cudnn_benchmark")


@pytest.fixture
def odd_flags():
    """Start from the opposite of what evaluation wants, and put PyTorch's back after."""
    before = numerics.current()
    odd = {"tf32_matmul": True, "tf32_cudnn": True, "cudnn_deterministic": False,
           "cudnn_benchmark": True}
    numerics._apply(odd)
    yield odd
    numerics._apply(before)


def test_pinned_sets_on_entry_and_restores_on_exit_even_on_error(odd_flags):
    with numerics.evaluation() as inside:
        assert numerics.current() == inside == {"tf32_matmul": False, "tf32_cudnn": False,
                                                "cudnn_deterministic": True,
                                                "cudnn_benchmark": False}
    assert numerics.current() == odd_flags
    with pytest.raises(RuntimeError), numerics.evaluation():
        raise RuntimeError("boom")
    assert numerics.current() == odd_flags


def test_evaluate_model_runs_every_attack_under_evaluation_flags(odd_flags, monkeypatch):
    seen: dict[str, dict] = {}
    real = dict(ev.RUNNERS)

    def spy(name):
        def run(*args):
            seen[name] = numerics.current()
            return real[name](*args)
        return run

    monkeypatch.setattr(ev, "RUNNERS", {n: spy(n) for n in real})
    x, y = _data()
    record = ev.evaluate_model(_Linear(), x, y, _settings(), ("pgd10", "square"),
                               identity=("m", "a" * 64, []))
    with numerics.evaluation() as wanted:
        pass
    assert seen and all(flags == wanted for flags in seen.values())
    assert record.backend == wanted
    assert numerics.current() == odd_flags


def _val_spec(**monitor):
    return parse_spec({"data": {"dataset": "synthetic"}, "model": {"arch": "small_cnn",
                       "width": 4}, "validation": {"eps": 0.1, "step_size": 0.025},
                       "monitor": {"fosc": True, "sgcs": True, **monitor}})


def test_validation_is_batch_invariant_and_pinned(odd_flags):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)).train()
    x = torch.rand(23, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    val = ImageSet((x * 255).round().to(torch.uint8), torch.arange(23) % 4)
    seen = []
    net.register_forward_hook(lambda *_: seen.append(numerics.current()))
    spec, cpu = _val_spec(), torch.device("cpu")
    whole = trainlib.validate(net, val, spec, cpu, epoch=3, batch_size=512)
    pieces = trainlib.validate(net, val, spec, cpu, epoch=3, batch_size=5)
    assert whole["val_pgd10_acc"] == pieces["val_pgd10_acc"]
    # not exactly: the matrix product rounds a row differently at another batch (6e-8 here)
    assert whole["val_fosc"] == pytest.approx(pieces["val_fosc"], rel=1e-6)
    assert whole["val_sgcs"] == pytest.approx(pieces["val_sgcs"], rel=1e-6)
    assert net.training and numerics.current() == odd_flags
    assert all(f["cudnn_deterministic"] and not f["tf32_cudnn"] for f in seen)


def test_pgd10_does_not_depend_on_the_evaluation_batch():
    x, y = _data()
    one, adv_one = ev.RUNNERS["pgd10"](_Linear(), x, y, _settings(batch_size=12), False)
    many, adv_many = ev.RUNNERS["pgd10"](_Linear(), x, y, _settings(batch_size=5), False)
    assert one.robust == many.robust
    assert torch.allclose(adv_one, adv_many, atol=1e-6)


@given(free=st.integers(0, 2**40), size=st.sampled_from([8, 28, 32, 64, 224]))
def test_fitting_batch_is_a_bounded_power_of_two_that_fits(free, size):
    batch = evalbatch.fitting_batch(free, (3, size, size))
    assert evalbatch.MIN_BATCH <= batch <= evalbatch.MAX_BATCH
    assert batch & (batch - 1) == 0
    if batch > evalbatch.MIN_BATCH:  # above the floor the estimate fits in the budget
        assert batch * evalbatch.BYTES_PER_PIXEL * size * size <= free * evalbatch.MEMORY_SHARE
    assert evalbatch.fitting_batch(free * 2, (3, size, size)) >= batch


def test_eval_batch_size_choices():
    assert evalbatch.eval_batch_size((1, 8, 8), "cpu") == evalbatch.CPU_BATCH
    assert evalbatch.eval_batch_size((3, 64, 64), "cpu", requested=7) == 7
    with pytest.raises(BadInput, match="--eval-batch 0"):
        evalbatch.eval_batch_size((3, 64, 64), "cpu", requested=0)
    # 80 GiB free, TinyImageNet: the measured 9 GiB at 512 allows 2048 in half of it
    assert evalbatch.fitting_batch(80 * 2**30, (3, 64, 64)) == 2048
    assert evalbatch.fitting_batch(12 * 2**30, (3, 64, 64)) == 256  # a 12 GB card


def test_validation_batch_on_a_cpu_is_its_own_and_requests_still_win(monkeypatch):
    assert evalbatch.validation_batch_size((1, 28, 28), "cpu") == evalbatch.CPU_VALIDATION_BATCH
    assert evalbatch.CPU_VALIDATION_BATCH != evalbatch.CPU_BATCH  # evaluation keys keep 500
    assert evalbatch.validation_batch_size((1, 28, 28), "cpu", requested=9) == 9
    with pytest.raises(BadInput, match="--eval-batch 0"):
        evalbatch.validation_batch_size((1, 28, 28), "cpu", requested=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (12 * 2**30, 16 * 2**30))
    assert evalbatch.validation_batch_size((3, 64, 64), "cuda") == 256  # as evaluation


def test_validation_runs_at_the_cpu_validation_batch(monkeypatch):
    sizes = []
    real = trainlib.datalib.batches
    monkeypatch.setattr(trainlib.datalib, "batches",
                        lambda data, size, **kw: sizes.append(size) or real(data, size, **kw))
    val = ImageSet(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.arange(3) % 4)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    trainlib.validate(net, val, _val_spec(), torch.device("cpu"), epoch=1)
    assert sizes == [evalbatch.CPU_VALIDATION_BATCH]


def test_out_of_memory_becomes_one_line_naming_the_option():
    with pytest.raises(BadInput, match=r"evaluation batch 512: pass --eval-batch 256"):
        with evalbatch.out_of_memory_hint(512):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")


def _spied_runners(monkeypatch) -> tuple[list[str], dict]:
    calls: list[str] = []
    real = dict(ev.RUNNERS)

    def spy(name):
        def run(*args):
            calls.append(name)
            return real[name](*args)
        return run

    monkeypatch.setattr(ev, "RUNNERS", {n: spy(n) for n in real})
    return calls, real


def test_cascade_is_composed_from_attacks_already_run_alone(monkeypatch):
    calls, real = _spied_runners(monkeypatch)
    x, y = _data()
    record = ev.evaluate_model(_Linear(), x, y, _settings(), ev.ALL_ATTACKS,
                               identity=("m", "a" * 64, []))
    assert "autoattack" not in calls and record.complete
    composed = record.attacks["autoattack"]
    parts = [record.attacks[a] for a in ev.CASCADE]
    assert composed.robust == "".join("1" if all(p.robust[i] == "1" for p in parts) else "0"
                                      for i in range(12))
    assert composed.params["composed_from"] == ",".join(ev.CASCADE)
    assert record.adversarial["autoattack"].ok  # its examples re-checked like any attack's
    cascade, _ = real["autoattack"](_Linear(), x, y, _settings(), False)
    assert composed.accuracy <= cascade.accuracy  # each attack saw every example


def test_cascade_runs_when_its_attacks_did_not_all_run_here(monkeypatch):
    calls, _ = _spied_runners(monkeypatch)
    x, y = _data()
    ev.evaluate_model(_Linear(), x, y, _settings(), ("pgd10", "apgd-ce", "autoattack"),
                      identity=("m", "a" * 64, []))
    assert calls == ["pgd10", "apgd-ce", "autoattack"]
    record = ev.CheckpointEval(checkpoint="m", sha256="a" * 64, key="k", settings=_settings(),
                               requested=[])
    examples = dict.fromkeys(ev.CASCADE, x)
    record.attacks.update({a: ev.AttackResult(name=a, paper_column=ev.PAPER_COLUMNS[a],
                                              accuracy=1.0, n_robust=12, n_examples=12,
                                              robust="1" * 12, seconds=0.0)
                           for a in ev.CASCADE})
    assert ev.composable(record, examples, randomized=False)
    assert not ev.composable(record, examples, randomized=True)  # 'rand' needs its own EOT
    assert not ev.composable(record, {a: x for a in ev.CASCADE[:3]}, randomized=False)
