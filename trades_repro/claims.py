"""The paper's claims as data: read once, validated, resolved to the runs they need.

`claims/arms.yaml` names every experimental *arm* (one configuration, a spec per tier and a
seed count); each `claims/<artefact>.yaml` lists the claims of one paper artefact (a table,
a figure, a section). A claim has a stable id, its source, the paper's numbers verbatim, the
arm(s) it needs, a test with its parameters and a one-sentence rationale, and the masking
rule version it depends on; `claimkinds.py` holds the schema of each kind, this module the
`Catalogue` of a claims folder, and `verify.py` judges them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from trades_repro import yamlio
from trades_repro.claimkinds import TIERS, Arm, Claim, Healing
from trades_repro.errors import BadInput
from trades_repro.spec import ExperimentSpec, SpecError, validation_message
from trades_repro.sweep import Sweep

ARMS_FILE = "arms.yaml"


class ClaimsError(BadInput):
    """A claims or arms file that cannot be used; one line naming the file and claim id."""


_CLAIM = TypeAdapter(Claim)
_ARMS = TypeAdapter(dict[str, Arm])


class ClaimsFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    artefact: str
    title: str
    claims: list[dict[str, Any]] = Field(min_length=1)  # validated one by one (ids in errors)


@dataclass(frozen=True)
class Entry:
    """A validated claim with the file it came from."""

    claim: Any  # one of the Claim kinds
    file: Path

    @property
    def id(self) -> str:
        return self.claim.id

    @property
    def artefact(self) -> str:
        return self.claim.source.artefact


@dataclass(frozen=True)
class Catalogue:
    """Every claim of a claims folder, with the arms they resolve to."""

    folder: Path
    arms: dict[str, Arm]
    entries: tuple[Entry, ...]
    titles: dict[str, str]  # artefact -> title

    def select(self, patterns: list[str] | None = None, tier: str | None = None) -> list[Entry]:
        """Claims whose id matches any glob pattern (``all`` or none: every claim), and that
        the tier can run."""
        from fnmatch import fnmatchcase

        chosen = [e for e in self.entries if not patterns or "all" in patterns
                  or any(fnmatchcase(e.id, p) for p in patterns)]
        if tier is not None:
            chosen = [e for e in chosen if tier in self.tiers_of(e)]
        return chosen

    def tiers_of(self, entry: Entry) -> tuple[str, ...]:
        """Tiers in which every arm of the claim has a spec (a property claim: all)."""
        names = entry.claim.arm_names()
        return tuple(t for t in TIERS if all(t in self.arms[a].tiers for a in names))

    def specs(self, arm: str, tier: str) -> list[ExperimentSpec]:
        """The arm's specs at `tier`, one per seed (cached)."""
        return list(_expand(self.folder, arm, self.arms[arm].tiers[tier]))

    @cached_property
    def by_id(self) -> dict[str, Entry]:
        return {e.id: e for e in self.entries}


def load_catalogue(folder: str | Path = "claims") -> Catalogue:
    """Read `arms.yaml` and every other `*.yaml` in `folder`; any problem raises
    `ClaimsError` with the file and claim id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClaimsError(f"{folder}: claims folder not found (the repository's claims/: run "
                          "from the repository root, or pass it with --claims-dir)")
    arms = _load_arms(folder / ARMS_FILE)
    entries: list[Entry] = []
    titles: dict[str, str] = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name == ARMS_FILE:
            continue
        claims_file = _load_file(path)
        titles[claims_file.artefact] = claims_file.title
        entries.extend(_load_claims(path, claims_file, arms, folder))
    _check_unique(entries)
    return Catalogue(folder, arms, tuple(entries), titles)


def _read_yaml(path: Path) -> Any:
    try:
        return yamlio.load(yamlio.read_text(path), fast=True)
    except yamlio.YAMLFileError as err:  # unreadable or not UTF-8
        raise ClaimsError(str(err)) from None
    except yaml.YAMLError as err:
        raise ClaimsError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None


def _load_arms(path: Path) -> dict[str, Arm]:
    raw = _read_yaml(path) if path.is_file() else None
    if not isinstance(raw, dict) or not isinstance(raw.get("arms"), dict):
        raise ClaimsError(f"{path}: needs a mapping 'arms' of arm name -> arm")
    try:
        return _ARMS.validate_python(raw["arms"])
    except ValidationError as err:
        raise ClaimsError(validation_message(err, f"{path}: arms")) from None


def _load_file(path: Path) -> ClaimsFile:
    raw = _read_yaml(path)
    try:
        claims_file = ClaimsFile.model_validate(raw)
    except ValidationError as err:
        raise ClaimsError(validation_message(err, str(path))) from None
    if claims_file.artefact != path.stem:
        raise ClaimsError(f"{path}: artefact '{claims_file.artefact}' must match the file name")
    return claims_file


def _load_claims(path: Path, claims_file: ClaimsFile, arms: dict[str, Arm],
                 folder: Path) -> list[Entry]:
    entries = []
    for index, raw in enumerate(claims_file.claims):
        name = raw.get("id", f"#{index + 1}") if isinstance(raw, dict) else f"#{index + 1}"
        where = f"{path}: claim '{name}'"
        try:
            claim = _CLAIM.validate_python(raw)
        except ValidationError as err:
            raise ClaimsError(validation_message(err, where)) from None
        if claim.source.artefact != claims_file.artefact:
            raise ClaimsError(f"{where}: source.artefact must be '{claims_file.artefact}'")
        _check_rule(claim, where)
        _check_arms(claim, arms, folder, where)
        entries.append(Entry(claim, path))
    return entries


def _check_rule(claim: Any, where: str) -> None:
    from trades_repro.verdict import VERDICT_RULES  # the named, versioned masking rules

    known = [rule.name for rule in VERDICT_RULES]
    if claim.rule is not None and claim.rule not in known:
        raise ClaimsError(f"{where}: unknown masking rule '{claim.rule}'; known: "
                          f"{', '.join(known)}")


def _check_arms(claim: Any, arms: dict[str, Arm], folder: Path, where: str) -> None:
    for name in claim.arm_names():
        if name not in arms:
            raise ClaimsError(f"{where}: unknown arm '{name}' (not in {folder / ARMS_FILE})")
        for tier, sweep in arms[name].tiers.items():
            try:
                _expand(folder, name, sweep)
            except SpecError as err:
                raise ClaimsError(f"{where}: arm '{name}' (tier {tier}) does not resolve to "
                                  f"a spec: {err}") from None
    if claim.kind == "healing":
        _check_same_seeds(claim, arms, where)


def _check_same_seeds(claim: Healing, arms: dict[str, Arm], where: str) -> None:
    base, fixed = arms[claim.arms.baseline], arms[claim.arms.fixed]
    for tier in set(base.tiers) & set(fixed.tiers):
        if base.tiers[tier].seed_list() != fixed.tiers[tier].seed_list():
            raise ClaimsError(f"{where}: tier {tier}: baseline and fixed arms need the same seeds")


_EXPANDED: dict[tuple[Path, str, str], tuple[ExperimentSpec, ...]] = {}


def _expand(folder: Path, name: str, sweep: Sweep) -> tuple[ExperimentSpec, ...]:
    key = (folder.resolve(), name, sweep.model_dump_json())
    if key not in _EXPANDED:
        _EXPANDED[key] = tuple(sweep.expand(folder))
    return _EXPANDED[key]


def _check_unique(entries: list[Entry]) -> None:
    seen: dict[str, Path] = {}
    for entry in entries:
        if entry.id in seen:
            raise ClaimsError(f"{entry.file}: claim '{entry.id}': duplicate id (also in "
                              f"{seen[entry.id]})")
        seen[entry.id] = entry.file
