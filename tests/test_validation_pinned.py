"""The per-epoch validation monitor and Algorithm 1's trigger, pinned against the paper.

Every claim and every checkpoint choice reads `metrics.jsonl`'s validation series, so these
tests recompute them independently (plain loops, float64, the formulas of Eqs. 2-3 as the
paper writes them) instead of calling the code's own metric helpers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from factories import digits
from torch import nn

from trades_repro import data as datalib
from trades_repro import train as trainlib
from trades_repro.attacks import eval_mode
from trades_repro.engine import RunState
from trades_repro.spec import parse_spec

EPOCH = 3


def _spec(**validation):
    raw = digits(validation={"eps": 0.3, "step_size": 0.1, "steps": 5, **validation})
    return parse_spec({**raw, "seed": 3})  # not 0: the start's draw depends on seed × a prime


def _net() -> nn.Module:
    """BatchNorm and dropout: a net whose outputs depend on its mode and buffers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Dropout(0.3), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    with torch.no_grad():  # non-trivial running statistics, as after some training
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(17)
    return net


def _val(n: int = 24, labels_from: nn.Module | None = None) -> datalib.ImageSet:
    """Random images; random labels, or `labels_from`'s own predictions (all clean-correct,
    so a weak attack leaves some of them robust)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    if labels_from is None:
        return datalib.ImageSet(x, torch.randint(0, 10, (n,), generator=gen))
    with torch.no_grad(), eval_mode(labels_from):
        return datalib.ImageSet(x, labels_from(x).argmax(1))


def _validate(net, val, spec, batch_size=7):
    return trainlib.validate(net, val, spec, torch.device("cpu"), EPOCH, batch_size=batch_size)


# ------------------------------------------------------------------ leaves the model alone


@pytest.mark.parametrize("modes", ["train", "eval", "mixed"])
def test_validation_leaves_parameters_buffers_grads_and_modes_exactly_as_found(modes):
    net = _net()
    net.train(modes != "eval")
    if modes == "mixed":  # e.g. a frozen BatchNorm inside a training model
        net[1].eval()
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mode_before = [m.training for m in net.modules()]

    _validate(net, _val(), _spec())

    after = net.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # bit for bit, buffers included
    assert [m.training for m in net.modules()] == mode_before
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())


# ------------------------------------------------------------------ FOSC and SGCS, by hand


def _independent_pgd(net, x, y, *, eps, alpha, steps, start):
    """PGD on summed CE, one example at a time, in float64: the iterates and k+1 gradients."""
    net64 = _eval_copy(net)
    x, cur = x.double(), start.double()
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    grads = []
    for _ in range(steps + 1):
        cur = cur.detach().requires_grad_(True)
        loss = F.cross_entropy(net64(cur), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, cur)
        grads.append(g)
        if len(grads) <= steps:
            cur = torch.minimum(torch.maximum(cur + alpha * g.sign(), lo), hi)
    return cur.detach(), grads


def _eval_copy(net):
    clone = copy.deepcopy(net).double()
    clone.eval()
    return clone


def _fosc_by_hand(x_k, x, g_k, eps) -> list[float]:
    """Eq. 2: max over the ε-box of <x + δ - x^k, ∇ℓ(x^k)>, solved coordinate by coordinate."""
    out = []
    for xk_i, x_i, g_i in zip(x_k, x, g_k, strict=True):
        total = 0.0
        for xk, x0, g in zip(xk_i.flatten().tolist(), x_i.flatten().tolist(),
                             g_i.flatten().tolist(), strict=True):
            best_delta = eps if g > 0 else -eps  # the inner max picks δ = ε·sign(g)
            total += (x0 + best_delta - xk) * g
        out.append(total)
    return out


def _sgcs_by_hand(step_grads) -> list[float]:
    """Eq. 3 for one attack: mean cosine of sign vectors over ordered pairs i != j of the k
    steps' gradients; a zero sign vector has cosine 0 with everything."""
    k, batch = len(step_grads), step_grads[0].shape[0]
    out = []
    for b in range(batch):
        signs = [g[b].flatten().sign() for g in step_grads]
        total = 0.0
        for i in range(k):
            for j in range(k):
                if i == j:
                    continue
                ni, nj = signs[i].norm().item(), signs[j].norm().item()
                total += 0.0 if ni == 0 or nj == 0 else (signs[i] @ signs[j]).item() / (ni * nj)
        out.append(total / (k * (k - 1)))
    return out


# A strong attack (ε 0.3, 5 steps) and a weak one (ε 0.05, 2 steps): in the weak one the
# random start still shows at the end, and some images stay robust in every batch of 7.
ATTACKS = {"strong": {}, "weak": {"eps": 0.05, "step_size": 0.025, "steps": 2}}


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("attack", ATTACKS)
def test_recorded_fosc_and_sgcs_equal_eqs_2_and_3_at_the_final_iterate(random_start, attack):
    spec = _spec(random_start=random_start, **ATTACKS[attack])
    net = _net()
    net.eval()
    val = _val(labels_from=net)
    got = _validate(net, val, spec)

    x, y = val.images, val.labels
    eps, alpha, steps = spec.validation.eps, spec.validation.step_size, spec.validation.steps
    start = x.clone()
    if random_start:  # the documented draw: U[0, 1) for the whole set from (seed, epoch)
        gen = torch.Generator().manual_seed(spec.seed * 100_003 + EPOCH)
        u = torch.rand(x.shape, generator=gen)
        start = (x + eps * (2 * u - 1)).clamp(min=0, max=1)
        start = torch.minimum(torch.maximum(start, x - eps), x + eps)
    x_k, grads = _independent_pgd(net, x, y, eps=eps, alpha=alpha, steps=steps, start=start)
    assert len(grads) == steps + 1

    fosc = _fosc_by_hand(x_k, x.double(), grads[-1], eps)  # the gradient AT x^k
    sgcs = _sgcs_by_hand(grads[:-1])  # the k gradients whose signs made the steps
    assert got["val_fosc"] == pytest.approx(sum(fosc) / len(fosc), rel=1e-4, abs=1e-6)
    assert got["val_sgcs"] == pytest.approx(sum(sgcs) / len(sgcs), abs=1e-5)

    with torch.no_grad():
        net64 = _eval_copy(net)
        clean = (net64(x.double()).argmax(1) == y).double().mean().item()
        robust = (net64(x_k).argmax(1) == y).double().mean().item()
    assert got["val_clean_acc"] == pytest.approx(clean)
    assert got["val_pgd10_acc"] == pytest.approx(robust)
    if attack == "weak":  # so the robust count is summed over batches, not the last one's
        assert 0 < robust < clean


def test_the_weak_attacks_random_start_changes_the_result():
    """So the test above would notice another draw than (seed, epoch)'s."""
    spec, val = _spec(**ATTACKS["weak"]), _val(labels_from=_net())
    starts = [_validate(_net(), val, spec)]
    spec = spec.model_copy(update={"seed": spec.seed + 1})
    starts.append(_validate(_net(), val, spec))
    assert starts[0]["val_fosc"] != pytest.approx(starts[1]["val_fosc"], rel=1e-3)


@pytest.mark.parametrize(("fosc", "sgcs"), [(True, False), (False, True), (False, False)])
def test_each_monitor_is_recorded_alone(fosc, sgcs):
    spec = _spec()
    spec = spec.model_copy(update={"monitor": spec.monitor.model_copy(
        update={"fosc": fosc, "sgcs": sgcs})})
    both = _validate(_net(), _val(), _spec())
    got = _validate(_net(), _val(), spec)
    assert got["val_fosc"] == (both["val_fosc"] if fosc else None)
    assert got["val_sgcs"] == (both["val_sgcs"] if sgcs else None)
    assert got["val_pgd10_acc"] == both["val_pgd10_acc"]


def test_validation_attacks_in_batches_of_the_size_asked(monkeypatch):
    sizes = []
    real = trainlib._validate_batch
    monkeypatch.setattr(trainlib, "_validate_batch", lambda model, x, *rest: (
        sizes.append(len(x)), real(model, x, *rest))[1])
    _validate(_net(), _val(), _spec(), batch_size=5)
    assert sizes == [5, 5, 5, 5, 4]


def test_running_out_of_gpu_memory_names_a_smaller_eval_batch(monkeypatch):
    from trades_repro.errors import BadInput

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainlib, "_validate_batch", oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(BadInput, match=r"evaluation batch 6: pass --eval-batch 3 "):
        _validate(_net(), _val(), _spec(), batch_size=6)


def test_the_wrong_trace_would_be_visible():
    """The two neighbours of the right choice differ here, so the test above can tell them
    apart: FOSC at x^(k-1) and SGCS including the gradient at x^k give other numbers."""
    spec = _spec(random_start=False)
    net, val = _net(), _val()
    x, y = val.images, val.labels
    eps, alpha, steps = spec.validation.eps, spec.validation.step_size, spec.validation.steps
    x_k, grads = _independent_pgd(net, x, y, eps=eps, alpha=alpha, steps=steps, start=x)
    right = sum(_fosc_by_hand(x_k, x.double(), grads[-1], eps))
    wrong = sum(_fosc_by_hand(x_k, x.double(), grads[-2], eps))
    assert not math.isclose(right, wrong, rel_tol=1e-3)
    assert not math.isclose(sum(_sgcs_by_hand(grads[:-1])), sum(_sgcs_by_hand(grads)),
                            rel_tol=1e-3)


def test_validation_does_not_depend_on_its_batch_size():
    spec, val = _spec(), _val()
    results = [_validate(_net(), val, spec, batch_size=size) for size in (5, 24)]
    # exactly, on a net whose kernels round each example alike at both batches: the sums are
    # taken once over all examples, so no batch regroups them (summed per batch they differ)
    assert results[0] == results[1]


# ------------------------------------------------------------------ Algorithm 1's trigger


def _healing_spec(threshold: float, enabled: bool = True):
    return parse_spec(digits(healing={"enabled": enabled, "fosc_threshold": threshold,
                                      "noise_batches": 10}))


@pytest.mark.parametrize(("fosc", "fires"), [
    (math.nextafter(0.05, 0.0), False),   # below
    (0.05, False),                        # at: line 20 is FOSC > FOSC_thresh, strictly
    (math.nextafter(0.05, 1.0), True),    # above
    (3.0, True),
])
def test_algorithm_1_fires_strictly_above_the_threshold(fosc, fires):
    state = RunState(noise_left=0)
    event = trainlib._healing_trigger(state, EPOCH, fosc, _healing_spec(0.05))
    assert (event is not None) is fires
    assert state.noise_left == (10 if fires else 0)  # line 21: add_noise_batches <- 10
    if fires:
        assert (event.epoch, event.fosc, event.threshold, event.noise_batches) == (
            EPOCH, fosc, 0.05, 10)


def test_algorithm_1_resets_the_counter_to_ten_rather_than_adding():
    state = RunState(noise_left=4)  # still noising from the previous trigger
    trainlib._healing_trigger(state, EPOCH, 1.0, _healing_spec(0.05))
    assert state.noise_left == 10


@pytest.mark.parametrize(("enabled", "fosc"), [(False, 9.0), (True, None)])
def test_no_trigger_without_healing_or_without_a_fosc(enabled, fosc):
    state = RunState(noise_left=0)
    assert trainlib._healing_trigger(state, EPOCH, fosc, _healing_spec(0.05, enabled)) is None
    assert state.noise_left == 0
