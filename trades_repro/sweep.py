"""Sweeps: one base spec, `set` overrides, a `grid` of dotted fields and `seeds`, expanded to
specs (`Sweep.expand`, `load_sweep`). Split from `spec.py`, which it builds on: every
expanded spec is validated as a spec file is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from trades_repro import yamlio
from trades_repro.errors import BadInput
from trades_repro.spec import (
    ExperimentSpec,
    Seed,
    SpecError,
    parse_spec,
    read_spec_mapping,
    read_yaml,
    validation_message,
)

# A sweep's or arm's seeds and runs: our sweeps and arms have at most 10 seeds and 36 runs.
# `seeds: 100000000` ran past two minutes expanding specs before anything was said.
MAX_SEEDS = 1000
MAX_RUNS = 10_000


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``dotted = "a.b"``, creating mappings on the way."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"field '{dotted}': '{part}' is not a section")
        node = child
    node[leaf] = value


class Sweep(BaseModel):
    """A grid of experiments as data: a base spec, fixed overrides, a grid and seeds.

    ``base`` is a spec YAML path, relative to the file that names it. ``set`` applies dotted
    overrides (``method.beta: 1``) to every spec; ``grid`` expands the Cartesian product of
    its dotted fields' values (β × batch size × LR × dataset …); ``seeds`` is a count
    (seeds 0..n−1) or an explicit list. Every expanded spec is validated like a spec file.
    Only ``seeds`` sets the seed, a grid axis lists distinct values, and ``set`` and ``grid``
    name distinct fields: each run is listed once, under the values it trains with.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    base: str
    set: dict[str, Any] = {}
    grid: dict[str, Annotated[tuple[Any, ...], Field(min_length=1)]] = {}
    seeds: (Annotated[int, Strict(), Field(gt=0, le=MAX_SEEDS)]
            | Annotated[tuple[Seed, ...], Field(min_length=1, max_length=MAX_SEEDS)]) = 1
    note: str | None = None  # what this sweep shortens or changes, and why

    @field_validator("set")
    @classmethod
    def _no_seed_in_set(cls, fields: dict[str, Any]) -> dict[str, Any]:
        if "seed" in fields:  # `seeds` overrode it without a word
            raise ValueError("'seed' is set by 'seeds' (a count or a list of seeds)")
        return fields

    @field_validator("grid")
    @classmethod
    def _distinct_axes(cls, grid: dict[str, tuple[Any, ...]],
                       info: ValidationInfo) -> dict[str, tuple[Any, ...]]:
        if "seed" in grid:  # `seeds` overrode every cell's seed without a word
            raise ValueError("'seed' is set by 'seeds' (a count or a list of seeds), not "
                             "by a grid axis")
        for field in grid.keys() & info.data.get("set", {}).keys():
            raise ValueError(f"'{field}' is in both 'set' and 'grid'")
        _bounded_runs(grid, 1)
        for field, values in grid.items():
            if (twice := _repeated(values)) is not None:  # 1 and 1.0 too: one run
                raise ValueError(f"axis '{field}' lists {twice!r} twice")
        return grid

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: int | tuple[int, ...], info: ValidationInfo) -> Any:
        if not isinstance(seeds, int) and len(set(seeds)) < len(seeds):
            raise ValueError("a seed is listed twice")
        _bounded_runs(info.data.get("grid", {}), seeds if isinstance(seeds, int) else len(seeds))
        return seeds

    def seed_list(self) -> tuple[int, ...]:
        return tuple(range(self.seeds)) if isinstance(self.seeds, int) else self.seeds

    def cells(self) -> list[dict[str, Any]]:
        """The grid's points as {dotted field: value}, in row-major order of `grid`."""
        import itertools

        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True))
                for values in itertools.product(*(self.grid[k] for k in keys))]

    def expand(self, relative_to: Path) -> list[ExperimentSpec]:
        """Every (grid cell × seed) as a validated spec; `base` is read relative to the folder
        `relative_to`."""
        base_path = (relative_to / self.base).resolve()
        raw_base = _read_raw(base_path)
        specs, seen = [], {}
        for cell in self.cells():
            for seed in self.seed_list():
                raw = json.loads(json.dumps(raw_base))  # each spec its own copy
                for dotted, value in {**self.set, **cell, "seed": seed}.items():
                    set_dotted(raw, dotted, value)
                where = ", ".join(f"{k}={v}" for k, v in {**cell, "seed": seed}.items())
                specs.append(parse_spec(raw, source=f"{base_path} ({where})"))
                first = seen.setdefault(specs[-1].model_dump_json(), where)
                if first != where:  # e.g. beta 1 and "1/1": one run listed twice
                    raise SpecError(f"{base_path} ({where}): the same spec as ({first})")
        return specs


def _bounded_runs(grid: dict[str, tuple[Any, ...]], seeds: int) -> dict[str, tuple[Any, ...]]:
    runs = seeds
    for values in grid.values():
        runs *= len(values)
    if runs > MAX_RUNS:
        raise ValueError(f"{runs} runs (grid cells x seeds); at most {MAX_RUNS} per sweep")
    return grid


def _repeated(values: tuple[Any, ...]) -> Any:
    """The first value equal to an earlier one (lists and mappings compared by ==), or None."""
    hashed: set[Any] = set()
    unhashable: list[Any] = []
    for value in values:
        try:
            if value in hashed:
                return value
            hashed.add(value)
        except TypeError:
            if value in unhashable:
                return value
            unhashable.append(value)
    return None


def _read_raw(path: Path) -> dict[str, Any]:
    """The base spec as plain data (validated once per file version; claims expand hundreds
    of sweeps over a handful of bases, and pure-Python YAML parsing is slow)."""
    stat = path.stat() if path.is_file() else None
    key = (str(path), stat and (stat.st_mtime_ns, stat.st_size))
    if key not in _RAW_BASES:
        raw = read_spec_mapping(path)
        parse_spec(raw, source=str(path))  # validates the base itself, with its own messages
        _RAW_BASES[key] = raw
    return json.loads(json.dumps(_RAW_BASES[key]))  # a fresh copy for every expansion


_RAW_BASES: dict[tuple[str, Any], dict[str, Any]] = {}


def load_sweep(path: str | Path) -> tuple[Sweep, list[ExperimentSpec]]:
    """Read a sweep YAML (a mapping with ``base``) and expand it; errors name the file."""
    path = Path(path)
    raw = read_yaml(path) if path.is_file() else None
    if not isinstance(raw, dict) or "base" not in raw:
        raise SpecError(f"{path}: not a sweep file (a YAML mapping with 'base')")
    try:
        sweep = Sweep.model_validate(raw)
    except ValidationError as err:
        raise SpecError(validation_message(err, str(path))) from None
    return sweep, sweep.expand(path.parent)


def is_sweep_file(path: str | Path) -> bool:
    """Whether the file reads as a sweep; an unreadable one is left to `load_spec` to report."""
    try:
        raw = yamlio.read(path)
    except BadInput:
        return False
    return isinstance(raw, dict) and "base" in raw
