"""`performance.compile` without a recompile storm.

Dynamo guards on shapes, strides, the module's mode and grad mode; each new combination is a
recompile, and past `recompile_limit` (8) a frame silently falls back to eager. The engine
feeds the model a full training batch, a short last batch, validation batches of another size
and a short last validation batch, in train mode, in eval mode with gradients (the attacks)
and without (clean forwards), all in channels_last. In dynamo's automatic dynamic mode the
batch dimension becomes symbolic once it changes, so a few graphs cover every batch size.

The test compiles with dynamo's ``eager`` backend: the same tracing, guards and recompiles,
without inductor's minutes of CPU code generation.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from factories import digits
from torch._dynamo.utils import counters

from trades_repro.spec import parse_spec
from trades_repro.train import train


@pytest.fixture
def eager_compile(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


EVERY_KNOB = {"compile": True, "channels_last": True, "tf32": True, "precision": "bf16",
              "cudnn_benchmark": True}  # the GPU smoke test's set


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
    # train; eval with grad (TPGD); eval without (TPGD's clean forward): at most two each (a
    # first static shape, then the batch made symbolic). Validation runs the eager module,
    # under evaluation numerics: compiled, its TF32-off and autocast-off state would add
    # graphs of its own (8 measured with every knob, dynamo's limit, past which a frame
    # silently falls back to eager).
    assert 0 < graphs <= 6, dict(eager_compile["stats"])
    assert not [r for r in caplog.records if "hit config" in r.getMessage()]
