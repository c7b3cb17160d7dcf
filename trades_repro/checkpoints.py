"""Load any classifier checkpoint without running its code: safetensors or a torch state dict.

A checkpoint is read as tensors only: safetensors files by their header, everything else with
``torch.load(weights_only=True)``, which refuses pickled code. The network comes from our
own architectures (`models.build_model`) or from a user factory named ``module:function``
(a zero-argument callable returning an ``nn.Module``, importable from ``PYTHONPATH``); the
weights must then fit it exactly (strict loading). Every problem is a `CheckpointError` with
one line naming the file and what is wrong.

The network must take raw pixels in [0, 1], NCHW, and return logits ``[B, K]``; any
normalisation belongs inside it (as our `Normalize` layer), so ε is in pixel units. A file
saved without that layer (a network trained on normalised inputs, e.g. AT-AWP's WRN-34-10)
loads into the network behind it: `--normalize` then supplies mean and std.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from trades_repro.errors import BadInput
from trades_repro.models import Normalize, build_model, dataset_stats
from trades_repro.official import to_ours
from trades_repro.spec import ModelSpec

SAFETENSORS_SUFFIX = ".safetensors"
# Containers people save around a state dict: {"state_dict": ...} (Lightning, many repos),
# {"model": ...} (our last.pt, timm), {"net": ...}; DataParallel prefixes keys with "module.".
_NESTED_KEYS = ("state_dict", "model", "net", "model_state_dict")
_PARALLEL_PREFIX = "module."


class CheckpointError(BadInput):
    """A checkpoint, factory or architecture that cannot be used; one line naming the file."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes: the identity of a checkpoint in `eval.json`."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, on the CPU, with common wrappers removed.

    Safetensors files are read by `safetensors`; any other file must be a
    ``torch.save``-d dict of tensors (possibly nested under one of ``state_dict``, ``model``,
    ``net``, ``model_state_dict``), read with ``weights_only=True``. A ``module.`` prefix on
    every key (``nn.DataParallel``) is stripped.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file (a run folder's "
                              "weights are its best.safetensors or last.pt)")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    raw = _read_safetensors(path) if _is_safetensors(path) else _read_torch(path)
    tensors = _unwrap(raw, path)
    if all(key.startswith(_PARALLEL_PREFIX) for key in tensors):
        tensors = {key[len(_PARALLEL_PREFIX):]: value for key, value in tensors.items()}
    return tensors


def _is_safetensors(path: Path) -> bool:
    """Suffix, or the format's header: 8-byte little-endian length, then a JSON '{'."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first(err)})") from None


def _check_zip(path: Path) -> None:
    """A torch zip checkpoint's member CRCs: torch's reader skips them, so a bit flipped in a
    download or copy would load silently as other weights. Costs one more read of the file."""
    if not zipfile.is_zipfile(path):
        return  # the legacy (pre-1.6) format, or not a checkpoint: torch.load says which
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError,
            zlib.error) as err:
        raise CheckpointError(f"{path}: a damaged zip archive ({_first(err)}); download it "
                              "again") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt (CRC mismatch in {bad}); download it again")


def _read_torch(path: Path) -> Any:
    _check_zip(path)
    not_checkpoint = CheckpointError(
        f"{path}: not a checkpoint (neither safetensors nor a torch.save file)")
    try:
        with warnings.catch_warnings():
            # a raw pickle.dump (protocol > 2) makes torch warn before it fails or loads:
            # two stray lines before ours; only that warning, and only around this load
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # torch's words for a refused class
            raise not_checkpoint from None
        raise CheckpointError(
            f"{path}: holds pickled objects other than tensors; refusing to unpickle code "
            "(save a plain state dict or safetensors)"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError):
        raise not_checkpoint from None


def _unwrap(raw: Any, path: Path) -> dict[str, Tensor]:
    tensors = _find_tensors(raw, depth=2)
    if tensors is None:
        raise CheckpointError(
            f"{path}: no state dict inside (expected a mapping of names to tensors, possibly "
            f"under one of {', '.join(_NESTED_KEYS)})"
        )
    return tensors


def _find_tensors(raw: Any, depth: int) -> dict[str, Tensor] | None:
    """The first tensor dict under `_NESTED_KEYS`, at most `depth` levels down. Every key is
    tried: {"net": "small_cnn", "model_state_dict": {...}} names the architecture in "net"."""
    if _is_tensor_dict(raw):
        return dict(raw)
    if depth == 0 or not isinstance(raw, Mapping):
        return None
    found = (_find_tensors(raw.get(key), depth - 1) for key in _NESTED_KEYS)
    return next((tensors for tensors in found if tensors is not None), None)


def _is_tensor_dict(raw: Any) -> bool:
    return (isinstance(raw, Mapping) and len(raw) > 0 and
            all(isinstance(k, str) and isinstance(v, Tensor) for k, v in raw.items()))


def build_arch(spec: ModelSpec, dataset: str, shape: tuple[int, ...], num_classes: int
               ) -> nn.Module:
    """One of our architectures for `dataset`'s image shape (C, H, W), as training builds it."""
    mean, std = dataset_stats(dataset) if spec.normalize else (None, None)
    return build_model(spec, in_channels=shape[0], num_classes=num_classes,
                       image_size=shape[1], mean=mean, std=std)


def load_factory(target: str) -> Callable[[], nn.Module]:
    """Import ``module:function`` (e.g. ``mypkg.nets:small_cnn``) without calling it."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(f"--factory {target!r}: expected the form module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(f"--factory {target!r}: cannot import {module_name!r} "
                              f"({_first(err)}); is it on PYTHONPATH?") from None
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's module failed
        raise CheckpointError(f"--factory {target!r}: importing {module_name!r} raised "
                              f"{type(err).__name__}: {_first(err)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CheckpointError(f"--factory {target!r}: {module_name} has no callable {attr!r}")
    return factory


def call_factory(factory: Callable[[], nn.Module], target: str) -> nn.Module:
    """Call the user's factory; an exception there is the input failing (exit 2), named."""
    try:
        net = factory()
    except (Exception, SystemExit) as err:  # noqa: BLE001 - user code: theirs to fix
        # SystemExit too: a factory calling sys.exit(0) must not pass for "not overestimated"
        raise CheckpointError(f"--factory {target!r} raised {type(err).__name__}: "
                              f"{_first(err)} (it must build the network with no "
                              "arguments)") from None
    if not isinstance(net, nn.Module):
        raise CheckpointError(f"--factory {target!r} returned {type(net).__name__}, "
                              "not a torch.nn.Module")
    return net


def factory_source(factory: Callable[[], nn.Module]) -> bytes:
    """The bytes of the file defining `factory` (b"" when it has none, e.g. a builtin): part
    of the resume key, since an edited factory under the same name is another model."""
    try:
        file = inspect.getsourcefile(factory)
        return Path(file).read_bytes() if file else b""
    except (TypeError, OSError):  # a builtin or partial; or the file is gone since the import
        return b""


def load_weights(net: nn.Module, tensors: dict[str, Tensor], path: Path, arch: str) -> nn.Module:
    """Strictly load `tensors` into `net`; any mismatch names the first offending keys.

    Official checkpoints' names (TRADES' WideResNet, TRADES-AWP's ResNet-18) are first
    renamed into ours by `official.to_ours`'s table; then every key must match exactly. When
    `net` is our `Normalize` wrapper and the file has none of its keys (``0.*``, ``1.*``),
    the file is the bare network: it loads into ``net[1]``, and mean/std stay `net`'s own.
    """
    target = _load_target(net, tensors)
    own = target.state_dict()
    tensors = to_ours(tensors, arch, own)
    problems = _mismatches(own, tensors)
    if problems:
        raise CheckpointError(f"{path}: does not match architecture {arch} ({'; '.join(problems)})")
    target.load_state_dict(tensors, strict=True)
    return net.float().eval()


def _load_target(net: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """`net`, or the network inside our Normalize wrapper for a file saved without it: models
    trained on normalised inputs normalise outside the network (AT-AWP: model(normalize(X)))."""
    wrapped = isinstance(net, nn.Sequential) and len(net) == 2 and isinstance(net[0], Normalize)
    if wrapped and not any(key.startswith(("0.", "1.")) for key in tensors):
        return net[1]
    return net


def _mismatches(own: dict[str, Tensor], tensors: dict[str, Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped keys, the first three of each kind."""
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    return [f"{label}: {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected),
                                 ("shape (file vs model)", shapes)) if items]


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
