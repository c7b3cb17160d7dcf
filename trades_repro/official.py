"""Official checkpoints' parameter names, mapped onto our architectures (docs/checkpoints.md).

Two released code bases train the models people diagnose:

* official TRADES (Zhang et al. 2019, ``models/wideresnet.py``): WideResNet-34-10 for CIFAR-10.
  Our `WideResNet` keeps its names, so the table is the identity, except ``sub_block1.*``:
  the official class builds a fourth stage it never calls in ``forward``; its weights are in
  every checkpoint and are dropped here (they cannot change the network's output).
  AT-AWP (Wu et al. 2020, ``AT_AWP/wideresnet.py``) saves the same names, but its network
  was trained on ``(x - mean) / std`` computed outside it: load it with ``--normalize``,
  which puts our `Normalize` layer in front (`checkpoints.load_weights`).
* TRADES-AWP (Wu et al. 2020, ``trades_AWP/models/resnet.py``): the kuangliu-style CIFAR
  ResNet-18 (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.shortcut.0``, ``linear``),
  the same network as our `ResNet18` under other names.

`to_ours` renames a state dict by the table of the target architecture; keys no rule matches
are kept as they are, so that strict loading still reports them. Our own names match no rule
(tests/test_official.py checks it), so our state dicts pass through unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rule:
    """One row of a name-mapping table: an official key pattern and our key (None: drop)."""

    official: str  # regex over the whole key; named groups feed `ours`
    ours: str | None  # str.format template over the groups; `block` is computed for ResNets
    shown: tuple[str, str]  # (official, ours) as docs/checkpoints.md writes them
    why: str = ""


_BN = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"
_PARAM = r"(?P<p>weight|bias)"

# TRADES-AWP's ResNet-18 -> our ResNet18 (stem / blocks.<k>.body / shortcut / fc)
AWP_RESNET18 = (
    Rule(r"conv1\.weight", "stem.0.weight", ("conv1.weight", "stem.0.weight")),
    Rule(rf"bn1\.{_BN}", "stem.1.{p}", ("bn1.*", "stem.1.*")),
    Rule(r"layer(?P<stage>[1-4])\.(?P<i>[01])\.conv1\.weight", "blocks.{block}.body.0.weight",
         ("layer<s>.<i>.conv1.weight", "blocks.<2(s−1)+i>.body.0.weight")),
    Rule(rf"layer(?P<stage>[1-4])\.(?P<i>[01])\.bn1\.{_BN}", "blocks.{block}.body.1.{p}",
         ("layer<s>.<i>.bn1.*", "blocks.<2(s−1)+i>.body.1.*")),
    Rule(r"layer(?P<stage>[1-4])\.(?P<i>[01])\.conv2\.weight", "blocks.{block}.body.3.weight",
         ("layer<s>.<i>.conv2.weight", "blocks.<2(s−1)+i>.body.3.weight")),
    Rule(rf"layer(?P<stage>[1-4])\.(?P<i>[01])\.bn2\.{_BN}", "blocks.{block}.body.4.{p}",
         ("layer<s>.<i>.bn2.*", "blocks.<2(s−1)+i>.body.4.*")),
    Rule(r"layer(?P<stage>[1-4])\.(?P<i>[01])\.shortcut\.(?P<j>[01])\.(?P<p>.+)",
         "blocks.{block}.shortcut.{j}.{p}",
         ("layer<s>.<i>.shortcut.<j>.*", "blocks.<2(s−1)+i>.shortcut.<j>.*")),
    Rule(rf"linear\.{_PARAM}", "fc.{p}", ("linear.*", "fc.*")),
)

# Official TRADES' WideResNet -> our WideResNet: the same names, minus the unused stage
TRADES_WRN = (
    Rule(r"sub_block1\..+", None, ("sub_block1.*", "(dropped)"),
         why="built in __init__ but never called in forward"),
)

TABLES: dict[str, tuple[Rule, ...]] = {"resnet18": AWP_RESNET18, "wrn-34-10": TRADES_WRN}


def to_ours(tensors: dict[str, Tensor], arch: str, own: dict[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` renamed into `arch`'s names when they are in an official naming.

    `own` is the target network's state dict. Our own names match no rule, so a state dict
    of ours passes through unchanged. BatchNorm's ``num_batches_tracked`` (absent from
    checkpoints saved before PyTorch 0.4.1, and unused in eval mode) is filled with 0.
    """
    rules = TABLES.get(arch, ())
    if not rules:
        return tensors
    renamed: dict[str, Tensor] = {}
    for key, value in tensors.items():
        new = rename(key, rules)
        if new is not None:
            renamed[new] = value
    for key in own:
        if key.endswith("num_batches_tracked") and key not in renamed:
            renamed[key] = torch.zeros((), dtype=torch.long)
    return renamed


def rename(key: str, rules: tuple[Rule, ...]) -> str | None:
    """Our name for an official `key` (None: dropped); a key no rule matches is kept."""
    for rule in rules:
        match = re.fullmatch(rule.official, key)
        if match is None:
            continue
        if rule.ours is None:
            return None
        groups = match.groupdict()
        if "stage" in groups:  # our ResNet18 numbers its 8 blocks in one Sequential
            groups["block"] = str(2 * (int(groups["stage"]) - 1) + int(groups["i"]))
        return rule.ours.format(**groups)
    return key
