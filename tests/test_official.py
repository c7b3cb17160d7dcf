"""Official checkpoints load strictly: state dicts with official TRADES' WideResNet names and
TRADES-AWP's ResNet-18 names (written out here from the originals' module structure, with
random values) go through the mapping table of docs/checkpoints.md into our networks."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from factories import assert_one_line_error
from typer.testing import CliRunner

from trades_repro.checkpoints import CheckpointError, build_arch, load_state_dict, load_weights
from trades_repro.cli import app
from trades_repro.models import WideResNet, dataset_stats
from trades_repro.official import TABLES, to_ours
from trades_repro.spec import ModelSpec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"
WRN_34_10_PARAMS = 46_160_474  # official TRADES' model without its unused sub_block1


def _bn(keys: dict, name: str, c: int) -> None:
    for p in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{p}"] = (c,)
    keys[f"{name}.num_batches_tracked"] = ()


def official_wrn_shapes(depth: int, widen: int, classes: int = 10) -> dict[str, tuple]:
    """yaodongyu/TRADES models/wideresnet.py: conv1, block1, sub_block1 (built, never
    called), block2, block3 (NetworkBlock.layer of BasicBlocks), bn1, fc."""
    n, w = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
    keys: dict[str, tuple] = {"conv1.weight": (w[0], 3, 3, 3)}
    for stage, c_in, c_out in (("block1", w[0], w[1]), ("sub_block1", w[0], w[1]),
                               ("block2", w[1], w[2]), ("block3", w[2], w[3])):
        for i in range(n):
            c, prefix = c_in if i == 0 else c_out, f"{stage}.layer.{i}"
            _bn(keys, f"{prefix}.bn1", c)
            keys[f"{prefix}.conv1.weight"] = (c_out, c, 3, 3)
            _bn(keys, f"{prefix}.bn2", c_out)
            keys[f"{prefix}.conv2.weight"] = (c_out, c_out, 3, 3)
            if c != c_out:
                keys[f"{prefix}.convShortcut.weight"] = (c_out, c, 1, 1)
    _bn(keys, "bn1", w[3])
    keys.update({"fc.weight": (classes, w[3]), "fc.bias": (classes,)})
    return keys


def official_awp_resnet18_shapes(channels: int = 3, classes: int = 10) -> dict[str, tuple]:
    """csdongxian/AWP trades_AWP/models/resnet.py: conv1, bn1, layer1-4 of two BasicBlocks
    (conv1, bn1, conv2, bn2, shortcut = Sequential(conv, bn) when shape changes), linear."""
    keys: dict[str, tuple] = {"conv1.weight": (64, channels, 3, 3)}
    _bn(keys, "bn1", 64)
    c_in = 64
    for stage, c_out in enumerate((64, 128, 256, 512), start=1):
        for i in range(2):
            prefix = f"layer{stage}.{i}"
            keys[f"{prefix}.conv1.weight"] = (c_out, c_in, 3, 3)
            _bn(keys, f"{prefix}.bn1", c_out)
            keys[f"{prefix}.conv2.weight"] = (c_out, c_out, 3, 3)
            _bn(keys, f"{prefix}.bn2", c_out)
            if i == 0 and stage > 1:
                keys[f"{prefix}.shortcut.0.weight"] = (c_out, c_in, 1, 1)
                _bn(keys, f"{prefix}.shortcut.1", c_out)
            c_in = c_out
    keys.update({"linear.weight": (classes, 512), "linear.bias": (classes,)})
    return keys


def _random(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randint(0, 9, s, generator=gen) if k.endswith("num_batches_tracked")
                else torch.rand(s, generator=gen)) for k, s in shapes.items()}


def test_official_trades_wrn_34_10_loads_strictly():
    tensors = _random(official_wrn_shapes(34, 10))
    net = build_arch(ModelSpec(arch="wrn-34-10"), "cifar10", (3, 32, 32), 10)
    assert sum(p.numel() for p in net.parameters()) == WRN_34_10_PARAMS
    load_weights(net, tensors, Path("model_cifar_wrn.pt"), "wrn-34-10")
    state = net.state_dict()
    assert not any(k.startswith("sub_block1") for k in state)
    assert all(torch.equal(state[k], v) for k, v in tensors.items() if k in state)
    assert len(state) == len([k for k in tensors if not k.startswith("sub_block1")])


def test_small_wrn_takes_official_names_and_runs():
    tensors = _random(official_wrn_shapes(10, 2))
    net = load_weights(WideResNet(10, 2), tensors, Path("wrn.pt"), "wrn-34-10")
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_awp_resnet18_from_a_data_parallel_file_loads_strictly(tmp_path):
    tensors = _random(official_awp_resnet18_shapes())
    path = tmp_path / "ours-model-epoch200.pt"
    torch.save({f"module.{k}": v for k, v in tensors.items()}, path)  # AWP saves DataParallel
    net = build_arch(ModelSpec(arch="resnet18"), "cifar10", (3, 32, 32), 10)
    load_weights(net, load_state_dict(path), path, "resnet18")
    state = net.state_dict()
    assert torch.equal(state["fc.weight"], tensors["linear.weight"])
    assert torch.equal(state["blocks.7.body.4.running_var"], tensors["layer4.1.bn2.running_var"])
    assert torch.equal(state["blocks.2.shortcut.1.bias"], tensors["layer2.0.shortcut.1.bias"])


def test_checkpoints_without_num_batches_tracked_still_load():
    """Saved before PyTorch 0.4.1: no num_batches_tracked (unused in eval mode)."""
    shapes = official_awp_resnet18_shapes()
    tensors = {k: v for k, v in _random(shapes).items() if "num_batches" not in k}
    net = build_arch(ModelSpec(arch="resnet18"), "cifar10", (3, 32, 32), 10)
    load_weights(net, tensors, Path("old.pt"), "resnet18")


def test_a_missing_official_key_is_named():
    tensors = _random(official_wrn_shapes(34, 10))
    del tensors["block3.layer.4.conv2.weight"]
    net = build_arch(ModelSpec(arch="wrn-34-10"), "cifar10", (3, 32, 32), 10)
    with pytest.raises(CheckpointError, match=r"missing: block3\.layer\.4\.conv2\.weight"):
        load_weights(net, tensors, Path("x.pt"), "wrn-34-10")


def test_diagnose_names_the_keys_of_a_mismatching_official_checkpoint(tmp_path):
    tensors = _random(official_awp_resnet18_shapes(channels=1))  # digits: 1 channel
    del tensors["linear.bias"]
    path = tmp_path / "awp.pt"
    torch.save(tensors, path)
    result = CliRunner().invoke(app, ["diagnose", str(path), "--dataset", "digits",
                                      "--model", "resnet18"])
    assert_one_line_error(result, "does not match architecture resnet18", "missing: fc.bias")


def test_every_mapping_rule_is_in_the_docs_table():
    text = DOCS.read_text()
    for arch, rules in TABLES.items():
        assert f"`{arch}`" in text
        for rule in rules:
            official, ours = rule.shown
            assert f"| `{official}` | `{ours}` |" in text, (official, ours)


@pytest.mark.parametrize("arch", ["resnet18", "wrn-34-10"])
def test_our_own_names_match_no_rule(arch):
    net = WideResNet(10, 1) if arch == "wrn-34-10" else build_arch(
        ModelSpec(arch=arch), "cifar10", (3, 32, 32), 10)
    state = net.state_dict()
    assert to_ours(state, arch, state) == state


def test_diagnose_accepts_wrn_34_10_and_loads_strictly(tmp_path):
    path = tmp_path / "model_cifar_wrn.pt"
    torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3)}, path)  # a truncated checkpoint
    result = CliRunner().invoke(app, ["diagnose", str(path), "--dataset", "digits",
                                      "--model", "wrn-34-10"])
    assert_one_line_error(result, "does not match architecture wrn-34-10",
                          "missing: block1.layer.0.bn1.weight")


# ------------------------------------------- AT-AWP: official names, normalised outside the net


def _trained_like_wrn() -> tuple[WideResNet, dict[str, torch.Tensor]]:
    """A WRN-34-10 with random BatchNorm statistics, and its state dict in official TRADES'
    names (AT-AWP's file: with the unused `sub_block1` official TRADES also saves)."""
    torch.manual_seed(0)
    bare = WideResNet(34, 10).eval()
    for module in bare.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    extra = {k: v for k, v in _random(official_wrn_shapes(34, 10)).items()
             if k.startswith("sub_block1")}
    return bare, {**bare.state_dict(), **extra}


def test_an_official_named_wrn_loads_behind_normalize_with_our_stats():
    """AT-AWP runs model(normalize(x)): --normalize must load the file into the network
    behind our Normalize layer, with mean and std from dataset_stats."""
    bare, tensors = _trained_like_wrn()
    net = build_arch(ModelSpec(arch="wrn-34-10", normalize=True), "cifar10", (3, 32, 32), 10)
    load_weights(net, tensors, Path("at_awp_wrn.pt"), "wrn-34-10")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in dataset_stats("cifar10"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        # the same float32 operations in the same order: equal up to rounding at most
        torch.testing.assert_close(net(x), bare((x - mean) / std))
    assert torch.equal(net.state_dict()["0.std"], std)


def test_a_file_of_our_own_normalising_model_still_loads_whole():
    spec = ModelSpec(arch="small_cnn", width=4, normalize=True)
    saved = build_arch(spec, "cifar10", (3, 32, 32), 10).state_dict()
    saved["0.mean"] = torch.full_like(saved["0.mean"], 0.25)  # the file's own, kept
    net = load_weights(build_arch(spec, "cifar10", (3, 32, 32), 10), saved, Path("ours.pt"),
                       "small_cnn")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())


def test_a_truncated_bare_file_under_normalize_names_the_bare_keys():
    net = build_arch(ModelSpec(arch="wrn-34-10", normalize=True), "cifar10", (3, 32, 32), 10)
    with pytest.raises(CheckpointError, match=r"missing: block1\.layer\.0\.bn1\.weight"):
        load_weights(net, {"conv1.weight": torch.zeros(16, 3, 3, 3)}, Path("x.pt"),
                     "wrn-34-10")


# -------------------------------------------------------------- zip CRCs of torch checkpoints


def test_a_bit_flipped_torch_checkpoint_is_refused_naming_the_member(tmp_path):
    """torch's zip reader skips CRC32s: a flipped byte loaded as another weight."""
    path = tmp_path / "model.pt"
    torch.save({"a": torch.arange(16.0)}, path)
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    raw = bytearray(path.read_bytes())
    header = member.header_offset  # local header: 30 bytes, then its name and extra field
    name_length = int.from_bytes(raw[header + 26:header + 28], "little")
    extra_length = int.from_bytes(raw[header + 28:header + 30], "little")
    raw[header + 30 + name_length + extra_length + 1] ^= 0x40  # inside the tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError,
                       match=rf"CRC mismatch in {member.filename}\); download it again$"):
        load_state_dict(path)


def test_an_intact_torch_checkpoint_still_loads(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"a": torch.arange(16.0)}}, path)
    assert torch.equal(load_state_dict(path)["a"], torch.arange(16.0))
