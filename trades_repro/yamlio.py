"""YAML for specs, sweeps, claims and configs: safe, and a key given twice is an error.

PyYAML keeps the last of two equal keys in one mapping without a word, so a spec with two
``optim:`` blocks trained with the second alone, and a claim with two ``expected:`` was
judged on one of them. :func:`load` refuses that with the line of both keys. Merge keys
(``<<``) keep their meaning: an explicit key may override a merged one.

:func:`read` reads a file and parses it: a missing, unreadable, non-UTF-8 or malformed file
raises `YAMLFileError`, one line naming the file (bad input, exit 2), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from trades_repro.errors import BadInput

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeys:
    """A SafeConstructor mixin: every mapping's explicit keys must be distinct."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeConstructor reports it itself
                break
            if first is not key_node.start_mark:
                raise ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {first.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)  # type: ignore[misc]


class StrictLoader(_UniqueKeys, yaml.SafeLoader):
    """PyYAML's safe loader with distinct keys in every mapping."""


class FastStrictLoader(_UniqueKeys, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The same on libyaml's parser where installed: about 10x faster, terser messages."""


def load(text: str, *, fast: bool = False) -> Any:
    """Parse one YAML document safely; a repeated key raises `yaml.YAMLError` with its mark.

    ``fast`` parses with libyaml (the claims: a hundred lines of flow mappings per file);
    the default keeps PyYAML's own error messages, which name what was expected.
    """
    loader = FastStrictLoader if fast else StrictLoader
    return yaml.load(text, Loader=loader)  # noqa: S506 - both are safe loaders


class YAMLFileError(BadInput):
    """A YAML file that cannot be read or parsed; the message is one line naming the file."""


def read_text(path: str | Path) -> str:
    """The file's text, decoded as UTF-8 (YAML's encoding, whatever the locale says).

    A missing file, a folder, an unreadable file or bytes that are not UTF-8 raise
    `YAMLFileError` naming the file: `Path.read_text` raised UnicodeDecodeError, a crash.
    """
    path = Path(path)
    if path.is_dir():
        raise YAMLFileError(f"{path}: a directory, not a YAML file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise YAMLFileError(f"{path}: file not found") from None
    except OSError as err:
        raise YAMLFileError(f"{path}: cannot read: {err.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YAMLFileError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                            f"{err.start}); YAML files must be UTF-8") from None


def read(path: str | Path, *, fast: bool = False) -> Any:
    """`read_text` and `load` in one: any problem raises `YAMLFileError` naming the file, e.g.
    ``f.yaml: malformed YAML (line 3, column 1): expected ',' or '}', but got …``."""
    text = read_text(path)
    try:
        return load(text, fast=fast)
    except yaml.YAMLError as err:
        raise YAMLFileError(f"{path}: {describe(err)}") from None


def describe(err: yaml.YAMLError) -> str:
    """One line for a parse error: "malformed YAML (line L, column C): problem"."""
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = str(getattr(err, "problem", None) or err).splitlines()[0]
    return f"malformed YAML{where}: {problem}"
