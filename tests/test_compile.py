"""`performance.compile` without a recompile storm.

Dynamo guards on shapes, strides, the module's mode and grad mode; each new combination is a
recompile, and past `recompile_limit` (8) a frame silently falls back to eager. The engine
feeds the model a full training batch, a short last batch, validation batches of another size
and a short last validation batch, in train mode, in eval mode with gradients (the attacks)
and without (clean forwards), all in channels_last. The engine marks every input's batch
dimension dynamic (`engine.DynamicBatch`), so one graph per mode covers every batch size; in
dynamo's automatic mode alone each mode compiled twice (static, then symbolic once the short
last batch came), 6 graphs for ResNet-18 on the GPU smoke test's shapes.

The test compiles with dynamo's ``eager`` backend: the same tracing, guards and recompiles,
without inductor's minutes of CPU code generation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from factories import digits
from torch import nn
from torch._dynamo.utils import counters

from trades_repro import engine
from trades_repro.models import build_model
from trades_repro.spec import ModelSpec, parse_spec
from trades_repro.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_precheck  # noqa: E402
from common import EVERY_KNOB  # noqa: E402  (the GPU smoke test's set)


@pytest.fixture
def eager_compile(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()



@pytest.mark.slow
@pytest.mark.parametrize("knobs", [{"compile": True, "channels_last": True}, EVERY_KNOB],
                         ids=["compile", "every_knob"])
def test_compiled_training_compiles_once_per_mode_whatever_the_batch(eager_compile, tmp_path,
                                                                     caplog, knobs):
    # 600 images at batch 64: 9 full batches and one of 24; 300 validation images at
    # --eval-batch 128: two of 128 and one of 44; all in channels_last
    raw = digits(data={"train_subset": 600}, optim={"epochs": 2}, performance=knobs)
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        train(parse_spec(raw), tmp_path, progress=False, eval_batch=128)
    graphs = eager_compile["stats"]["unique_graphs"]
    # train; eval with grad (TPGD); eval without (TPGD's clean forward): one each, the batch
    # symbolic from the first call (6 without DynamicBatch: each mode once more when the
    # batch first changed). Validation runs the eager module, under evaluation numerics:
    # compiled, its TF32-off and autocast-off state would add graphs of its own (8 measured
    # with every knob, dynamo's limit, past which a frame silently falls back to eager).
    assert graphs == 3, dict(eager_compile["stats"])
    assert not [r for r in caplog.records if "hit config" in r.getMessage()]


@pytest.mark.slow
def test_the_gpu_smoke_compiles_one_graph_per_mode_on_its_own_shapes():
    """The smoke test's spec (ResNet-18, every knob, 3-channel 32x32, batch 64 and a short
    last batch of 32) as `gpu_precheck.py` trains it, on dynamo's eager backend: 3 graphs (6
    before DynamicBatch, which on an H200 meant six cold inductor compiles inside the
    smoke's time box)."""
    assert gpu_precheck.compiled_graphs(gpu_precheck.smoke_graphs()) == gpu_precheck.GRAPHS


def test_the_compiled_model_gives_the_plain_ones_outputs_and_the_plain_path_is_untouched(
        eager_compile):
    spec = parse_spec(digits(performance={"compile": True}))
    torch.manual_seed(0)
    net = build_model(ModelSpec(arch="small_cnn", width=4), in_channels=1, num_classes=10,
                      image_size=8).eval()
    model = engine.compiled(net, spec)
    assert isinstance(model, engine.DynamicBatch)
    for batch in (5, 3, 1):  # a batch of one may specialise, without an error
        x = torch.rand(batch, 1, 8, 8)
        assert torch.equal(model(x), net(x))
    assert eager_compile["stats"]["unique_graphs"] <= 2  # symbolic batch, then maybe size 1
    plain = parse_spec(digits())
    assert engine.compiled(net, plain) is net


def test_an_attack_takes_no_weight_gradients_and_gives_the_eager_x_adv():
    """A compiled backward computes the gradient of every input that requires one, weights
    included: attacks switch the parameters' off (and back on after, also on an error), so
    an attack step under compile does an input gradient's work only, with the same x_adv."""
    from trades_repro.attacks import pgd, tpgd

    torch.manual_seed(0)
    net = build_model(ModelSpec(arch="small_cnn", width=4), in_channels=1, num_classes=10,
                      image_size=8)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    seen = []
    hook = net.register_forward_pre_hook(
        lambda module, args: seen.append(any(p.requires_grad for p in module.parameters())))
    eager = tpgd(net, x, eps=0.1, step_size=0.025, steps=3,
                 generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert seen and not any(seen)
    assert all(p.requires_grad for p in net.parameters())
    torch._dynamo.reset()
    try:
        model = engine.DynamicBatch(torch.compile(net, backend="aot_eager"))
        compiled = tpgd(model, x, eps=0.1, step_size=0.025, steps=3,
                        generator=torch.Generator().manual_seed(0))
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            raise RuntimeError("boom")

    broken = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        pgd(broken, x, y, eps=0.1, step_size=0.025, steps=1, random_start=False)
    assert broken.w.requires_grad
