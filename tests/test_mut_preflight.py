"""Pre-flight checks (preflight.py), pinned where mutation testing found tests/test_preflight.py
and tests/test_diagnose_inputs.py silent (tests/mutation_gate.py, group `preflight`)."""

from __future__ import annotations

import hashlib
import re
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from _evalutil import digits_test, prototype_linear
from torch import nn

from trades_repro import preflight as pf
from trades_repro.checkpoints import CheckpointError
from trades_repro.preflight import PreflightError, preflight
from trades_repro.records import Flag


class _Out(nn.Module):
    """prototype_linear's logits passed through `then`."""

    def __init__(self, then) -> None:
        super().__init__()
        self.net, self.then = prototype_linear(), then

    def forward(self, x):
        return self.then(self.net(x))


def _refused(model: nn.Module, n_classes: int | None = 10) -> str:
    x, y = digits_test(50)
    with pytest.raises(PreflightError) as caught:
        preflight(model, x, y, n_classes, device="cpu")
    return str(caught.value)


def test_chance_is_a_one_sided_binomial_test_against_one_in_k():
    """Clean accuracy must beat 1/K with the one-sided binomial p < 0.05: 10/50 at K = 10
    passes (p = 0.025), 9/50 does not (p = 0.058); 5/5 at K = 2 passes (p = 1/32, where the
    two-sided p is 1/16); 1/1 at K = 20 has p = 0.05 exactly, not below it."""
    pf._check_chance(10, 50, 10)
    pf._check_chance(5, 5, 2)
    with pytest.raises(PreflightError) as caught:
        pf._check_chance(9, 50, 10)
    assert str(caught.value) == ("clean accuracy 9/50 is not above chance (1/10; binomial "
                                 "p = 0.058): wrong dataset, preprocessing or weights?")
    with pytest.raises(PreflightError) as caught:
        pf._check_chance(1, 1, 20)
    assert str(caught.value) == (
        "--n-examples 1 is too few for the pre-flight check that clean accuracy is above "
        "chance (1/20): even 1/1 correct is not significant at 0.05; use at least 2")


def test_too_few_is_said_only_below_the_least_decidable_count():
    """At exactly the least decidable count (2 images at K = 10) a failure is the model's,
    not the sample size's; with one class nothing is decidable and the failure is chance."""
    with pytest.raises(PreflightError, match=re.escape("clean accuracy 1/2 is not above")):
        pf._check_chance(1, 2, 10)
    with pytest.raises(PreflightError, match=re.escape("clean accuracy 0/1 is not above")):
        pf._check_chance(0, 1, 100)  # 1/1 would pass at K = 100: one image is decidable
    with pytest.raises(PreflightError, match=re.escape("5/5 is not above chance (1/1;")):
        pf._check_chance(5, 5, 1)


def test_the_least_decidable_count_is_the_fewest_images_all_correct_beating_chance():
    """n/n correct has one-sided p = K⁻ⁿ: K = 2 needs 5 (1/32), K = 10 needs 2, K = 20 needs
    2 (1/20 is not below 0.05), K = 100 needs 1; one class never decides (None)."""
    assert {k: pf._least_decidable(k) for k in (1, 2, 10, 20, 100)} == {
        1: None, 2: 5, 10: 2, 20: 2, 100: 1}


def test_probabilities_are_refused_up_to_rounding_and_only_probabilities():
    """Rows non-negative (zeros included) summing to 1 within 1e-4 are probabilities;
    non-negative scores summing to 1.5 are logits."""
    message = ("the model outputs probabilities (rows non-negative, summing to 1), not logits: "
               "remove its final softmax and return the scores before it")
    assert _refused(_Out(lambda z: z.softmax(1))) == message
    assert _refused(_Out(lambda z: F.one_hot(z.argmax(1), 10).float())) == message
    assert _refused(_Out(lambda z: z.softmax(1) * (1 + 5e-5))) == message
    x, y = digits_test(50)
    result = preflight(_Out(lambda z: z.softmax(1) * 1.5), x, y, 10, device="cpu")
    assert result.clean_correct > 40


def test_shape_and_value_refusals_say_what_is_wrong():
    assert _refused(_Out(lambda z: z[:, :3])) == ("the model outputs 3 classes; the dataset "
                                                 "has 10")
    assert _refused(_Out(lambda z: z * float("inf"))) == (
        "the model returns non-finite outputs (NaN or inf) on clean images")
    x, y = digits_test(50)
    assert preflight(prototype_linear(), x, y, None, device="cpu").n_classes == 10


class _Raises(nn.Module):
    def __init__(self, error: BaseException, after: int = 0) -> None:
        super().__init__()
        self.net, self.error, self.calls, self.after = prototype_linear(), error, 0, after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise self.error
        return self.net(x)


def test_a_failing_forward_names_the_image_shape_and_the_errors_first_line():
    head = "the model fails on this dataset's images (shape [1, 8, 8], pixels in [0, 1]): "
    assert _refused(_Raises(RuntimeError("boom\nsecond line"))) == head + "RuntimeError: boom"
    assert _refused(_Raises(ValueError())) == head + "ValueError: ValueError"  # no message


def _exits(model: nn.Module, call=None) -> str:
    x, y = digits_test(50)
    with pytest.raises(CheckpointError) as caught:
        (call or (lambda: preflight(model, x, y, 10, device="cpu", attacks=("pgd10",))))()
    return str(caught.value)


def test_sys_exit_is_named_with_the_step_it_ended():
    """The forward, AutoAttack's checks (from the third forward on) and the fingerprint's
    gradient each say where the model called sys.exit."""
    tail = ": it must return logits, not end the process"
    assert _exits(_Raises(SystemExit(3))) == f"the model raised SystemExit (3) in its forward{tail}"
    assert _exits(_Raises(SystemExit(4), after=2)) == (
        f"the model raised SystemExit (4) in the pre-flight checks{tail}")

    class ExitInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, grad):
            sys.exit(5)

    model = _Out(lambda z: ExitInBackward.apply(z))
    x, y = digits_test(50)
    message = _exits(model, lambda: pf.fingerprint(model, x, y, 10, device="cpu"))
    assert message == f"the model raised SystemExit (5) in its gradient{tail}"


class _Everything(nn.Module):
    """Fires each of AutoAttack's checks: random (randomized), softmax rows (probability
    output), an autograd call in its forward (dynamic), blind to its input (zero gradient)."""

    def forward(self, x):
        with torch.enable_grad():
            z = torch.zeros(1, requires_grad=True)
            torch.autograd.grad((2 * z).sum(), z)
        return (torch.rand(len(x), 3) + 0 * x.flatten(1).sum(1, keepdim=True)).softmax(1)


def test_autoattacks_checks_become_preflight_flags_in_the_order_they_ran():
    """Every check warns through the logger that is captured as it happens, so the flags
    come in checks.py's order (a check left to `warnings.warn` would be collected after
    the others), each as attack "preflight"; 3 classes cannot run APGD-T."""
    x = torch.rand(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    flags = pf.autoattack_checks(_Everything(), x, y, 3, ("apgd-t",))
    assert [f.check for f in flags] == ["randomized", "probability_output", "dynamic",
                                        "zero_gradients", "n_classes"]
    assert {f.attack for f in flags} == {"preflight"}
    assert flags[-1].message == ("with only 3 classes it is not possible to use the targeted "
                                 "DLR loss!")


def test_the_targeted_attacks_get_at_most_k_minus_1_targets():
    """APGD-T and FAB-T are given min(9, K − 1) target classes, so AutoAttack's class-count
    check never fires for them (it would with K + 1 at K = 4)."""
    x, y = digits_test(50)
    for k in (4, 10):
        assert pf.autoattack_checks(prototype_linear(), x, y, k,
                                    ("fab-t", "apgd-t", "autoattack")) == []


def test_flags_of_unknown_checks_and_nonfinite_gradients():
    assert pf.flag("apgd-ce", "something new") == Flag(attack="apgd-ce", check="other",
                                                       message="something new")
    (flag,) = pf._nonfinite(torch.tensor([float("nan"), 1.0, float("inf")]))
    assert flag == Flag(attack="preflight", check="nonfinite_gradients",
                        message="2 of 3 input-gradient entries are non-finite (NaN or inf): "
                        "gradient attacks and FOSC are unreliable on this model")


def test_rng_devices_name_the_cuda_device_forked():
    assert pf._rng_devices("cpu") == [] and pf._rng_devices("cuda:1") == [1]


class _Noisy(nn.Module):
    """Draws from torch's global RNG; its repr holds an object address."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.tag = prototype_linear(), object()

    def extra_repr(self) -> str:
        return repr(self.tag)

    def forward(self, x):
        return self.net(x) + 1e-3 * torch.rand(len(x), 10)


def test_the_fingerprint_hashes_source_repr_logits_and_sum_gradient_under_seed_0():
    """The documented digest, written out: sha256 of the source, the repr without object
    addresses, then the logits and the input gradient of the summed CE, torch seeded with 0.
    No source means b""; the dataset's class count is checked, or the logits' own taken."""
    x, y = digits_test(50)
    model = _Noisy()
    digest = hashlib.sha256(b"factory.py")
    digest.update(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(model)).encode())
    assert " at 0x" in repr(model)
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model(x)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    digest.update(logits.numpy().tobytes())
    digest.update(grad.numpy().tobytes())
    assert pf.fingerprint(model, x, y, 10, device="cpu", source=b"factory.py") == \
        digest.hexdigest()
    assert pf.fingerprint(model, x, y, 10, device="cpu") == \
        pf.fingerprint(model, x, y, None, device="cpu", source=b"")
    with pytest.raises(PreflightError, match="outputs 10 classes; the dataset has 3"):
        pf.fingerprint(model, x, y, 3, device="cpu")


class _Jitter(nn.Module):
    """prototype_linear × `scale`, plus fresh noise: relative (× 1 + rel·u) and absolute
    (+ abs·u), u ~ U[-1, 1] from its own generator."""

    def __init__(self, scale: float = 1.0, rel: float = 0.0, abs_: float = 0.0) -> None:
        super().__init__()
        self.net, self.scale, self.rel, self.abs = prototype_linear(), scale, rel, abs_
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        z = self.net(x) * self.scale
        u = torch.rand(z.shape, generator=self.generator) * 2 - 1
        v = torch.rand(z.shape, generator=self.generator) * 2 - 1
        return z * (1 + self.rel * u) + self.abs * v


def test_randomized_means_two_forwards_differ_beyond_rtol_1e_4_and_atol_1e_6():
    x, y = digits_test(50)
    assert not preflight(_Jitter(rel=5e-5), x, y, 10, device="cpu").randomized
    assert preflight(_Jitter(rel=5e-4), x, y, 10, device="cpu").randomized
    assert not preflight(_Jitter(scale=1e-5, abs_=4e-7), x, y, 10, device="cpu").randomized
    assert preflight(_Jitter(scale=1e-5, abs_=4e-6), x, y, 10, device="cpu").randomized


def test_the_preflight_records_its_own_cost_in_seconds():
    x, y = digits_test(50)
    started = time.perf_counter()
    result = preflight(prototype_linear(), x, y, 10, device="cpu")
    wall = time.perf_counter() - started
    assert 0 < result.seconds <= wall and result.seconds == round(result.seconds, 3)
    assert result.seconds != int(result.seconds)
