"""claims.py: the schema's rules, its defaults, loading and its one-line errors (issue 21,
mutation).

Every error is matched as a whole line, so a changed word in a message shows; every default
a verdict depends on (α, the interval's confidence, the window, the tiers) is pinned against
the number the docs and claims files state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from claimsutil import RATIONALE, SPEC_DIR, arm, claim, claims_folder
from pydantic import ValidationError

from trades_repro.claimkinds import (
    ID_PATTERN,
    MIN_EVENT_RUNS,
    TIERS,
    Arm,
    FisherExactTest,
    FoscSpike,
    GapDrop,
    HealingTest,
    RateAtLeast,
    RateAtMost,
    TrendTest,
    WelchTest,
)
from trades_repro.claims import ARMS_FILE, ClaimsError, load_catalogue

ROOT = Path(__file__).resolve().parents[1]
V1 = "pgd10_minus_square_v1"
RATE = {"expected": {"k": 1, "n": 2}, "test": {"name": "fisher_exact"}}
CELL = {"metric": "clean", "expected": {"mean": 0.5}, "test": {"name": "tolerance", "abs": 0.1}}


def _load(tmp_path, claims, arms=None):
    return load_catalogue(
        claims_folder(tmp_path, arms or {"a": arm(seeds=2), "b": arm(seeds=2)}, claims)
    )


def _error(tmp_path, claims, arms=None) -> str:
    with pytest.raises(ClaimsError) as err:
        _load(tmp_path, claims, arms)
    return str(err.value)


def _where(tmp_path, claim_id="table_9.x") -> str:
    return f"{tmp_path / 'claims' / 'table_9.yaml'}: claim '{claim_id}'"


# ------------------------------------------------------------------------------ defaults


def test_the_verdicts_defaults_are_the_documented_ones():
    """α = 0.05 everywhere (docs/claims.md); an event's share needs 3 judged runs; no fixed
    run may stay flagged;
    Fig. 3's gap is compared with the 5 epochs before the spike; FOSC spikes are measured
    against regular runs; claims judge the paper's `best_pgd10` checkpoint (App. B)."""
    assert WelchTest(name="welch").alpha == 0.05
    assert TrendTest(name="fisher").alpha == 0.05
    assert FisherExactTest(name="fisher_exact").alpha == 0.05
    assert MIN_EVENT_RUNS == 3
    assert RateAtLeast(name="rate_at_least", min_rate=0.5).min_runs == 3
    assert RateAtMost(name="rate_at_most", max_rate=0.5).min_runs == 3
    assert HealingTest(name="healing", clean_tolerance=0.02).max_fixed_flagged == 0
    assert GapDrop(name="gap_drop_at_spike", min_drop=0.1).window == 5
    assert GapDrop(name="gap_drop_at_spike", min_drop=0.1).fosc_threshold is None
    spike = FoscSpike(name="fosc_spike", ratio=3, pgd10_max_change=0.02)
    assert (spike.reference_arm, spike.reference_subset) == (None, "regular")
    assert Arm(label="x", tiers={"full": {"base": "b.yaml"}}).policy == "best_pgd10"
    assert TIERS == ("instant", "cpu", "reduced", "full") and ARMS_FILE == "arms.yaml"


def test_claim_defaults_are_papers_numbers_one_arm_increasing(tmp_path):
    cell = claim("table_9.c", "table_cell", arm="a", **CELL)
    trend = claim("table_9.t", "trend", arms=["a", "b"], test={"name": "fisher"})
    catalogue = _load(tmp_path, [cell, trend])
    c, t = (catalogue.by_id[i].claim for i in ("table_9.c", "table_9.t"))
    assert (c.values_from, c.subset, c.seeds_flagged_in, c.rule) == ("paper", "all", None, None)
    assert (t.measure, t.direction, t.expected) == ("flagged", "increasing", None)


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (WelchTest, {"name": "welch", "alpha": 0.5}),
        (WelchTest, {"name": "welch", "alpha": 0}),
        (FisherExactTest, {"name": "fisher_exact", "alpha": 0.5}),
        (FisherExactTest, {"name": "fisher_exact", "alpha": 0}),
        (FisherExactTest, {"name": "fisher_exact", "confidence": 0.95}),  # the old rule's
        (RateAtLeast, {"name": "rate_at_least", "min_rate": 0.5, "min_runs": 0}),
        (RateAtMost, {"name": "rate_at_most", "max_rate": 0.5, "min_runs": 0}),
        (FoscSpike, {"name": "fosc_spike", "ratio": 1, "pgd10_max_change": 0.02}),
        (GapDrop, {"name": "gap_drop_at_spike", "min_drop": 0.1, "window": 0}),
    ],
)
def test_parameters_outside_their_meaningful_range_are_refused(model, fields):
    with pytest.raises(ValidationError):
        model(**fields)


def test_ids_are_artefact_dot_name():
    import re

    assert re.match(ID_PATTERN, "table_2.lr0p1.beta3_bs256")
    assert not re.match(ID_PATTERN, "table_2") and not re.match(ID_PATTERN, "Table_2.a")


# ---------------------------------------------------------------------------- validators


def _field_error(tmp_path, kind, message, claim_id="table_9.x", **fields):
    text = _error(tmp_path, [claim(claim_id, kind, **fields)])
    assert text == f"{_where(tmp_path, claim_id)}: field '{kind}': Value error, {message}"


def test_a_rate_may_be_n_of_n_but_not_more(tmp_path):
    _load(
        tmp_path / "ok",
        [
            claim(
                "table_9.x",
                "instability_rate",
                arm="a",
                expected={"k": 2, "n": 2},
                test=RATE["test"],
            )
        ],
    )
    text = _error(
        tmp_path,
        [
            claim(
                "table_9.x",
                "instability_rate",
                arm="a",
                expected={"k": 3, "n": 2},
                test=RATE["test"],
            )
        ],
    )
    assert text == (
        f"{_where(tmp_path)}: field 'instability_rate.expected': Value error, k = 3 exceeds n = 2"
    )


def test_an_arm_is_one_configuration(tmp_path):
    grid = {
        "a": {
            "label": "x",
            "tiers": {
                "cpu": {"base": str(SPEC_DIR / "digits.yaml"), "grid": {"method.beta": [1, 2]}}
            },
        }
    }
    text = _error(tmp_path, [claim("table_9.x", "instability_rate", arm="a", **RATE)], grid)
    assert text == (
        f"{tmp_path / 'claims' / ARMS_FILE}: arms: field 'a': Value error, "
        "tier 'cpu': an arm is one configuration (no grid)"
    )


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("instability_rate", {"arm": "a", **RATE}),
        ("table_cell", {"arm": "a", "subset": "flagged", **CELL}),
        ("table_cell", {"arm": "a", "seeds_flagged_in": "b", **CELL}),
        ("trend", {"arms": ["a", "b"], "test": {"name": "fisher"}}),
        (
            "event",
            {
                "arms": ["a"],
                "subset": "regular",
                "test": {"name": "rate_at_least", "min_rate": 1},
                "event": {"name": "self_healing", "within": 1},
            },
        ),
        (
            "event",
            {
                "arms": ["a"],
                "test": {"name": "rate_at_least", "min_rate": 1},
                "event": {"name": "fosc_spike", "ratio": 2, "pgd10_max_change": 0.1},
            },
        ),
        (
            "healing",
            {
                "arms": {"baseline": "a", "fixed": "b"},
                "test": {"name": "healing", "clean_tolerance": 0.02},
            },
        ),
    ],
)
def test_claims_that_count_flagged_runs_must_name_a_rule(tmp_path, kind, fields):
    _load(tmp_path / "ok", [claim("table_9.x", kind, rule=V1, **fields)])
    bad = {k: v for k, v in claim("table_9.x", kind, **fields).items() if k != "rule"}
    text = _error(tmp_path, [bad])
    assert text == (
        f"{_where(tmp_path)}: field '{kind}': Value error, this claim counts "
        "flagged runs: name its masking 'rule'"
    )


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("table_cell", {"arm": "a", **CELL}),
        ("trend", {"arms": ["a", "b"], "measure": "clean", "test": {"name": "welch_one_sided"}}),
        (
            "event",
            {
                "arms": ["a"],
                "test": {"name": "rate_at_least", "min_rate": 1},
                "event": {"name": "self_healing", "within": 1},
            },
        ),
        ("property", {"test": {"name": "pytest", "node": "tests/test_metrics.py::test_sgcs"}}),
    ],
)
def test_claims_that_count_no_flagged_runs_need_no_rule(tmp_path, kind, fields):
    bare = {k: v for k, v in claim("table_9.x", kind, **fields).items() if k != "rule"}
    (entry,) = _load(tmp_path, [bare]).entries
    assert entry.claim.rule is None and not entry.claim.needs_rule()


def test_a_paper_claim_needs_its_verbatim_numbers_and_ours_does_not(tmp_path):
    bare = {
        k: v
        for k, v in claim("table_9.x", "table_cell", arm="a", **CELL).items()
        if k != "verbatim"
    }
    _load(tmp_path / "ok", [{**bare, "values_from": "ours"}])
    text = _error(tmp_path, [bare])
    assert text == (
        f"{_where(tmp_path)}: field 'table_cell': Value error, a paper claim "
        "needs 'verbatim': the number(s) as printed"
    )


@pytest.mark.parametrize("missing", ["sd", "n"])
def test_a_welch_cell_needs_the_papers_sd_and_n(tmp_path, missing):
    expected = {k: v for k, v in {"mean": 0.5, "sd": 0.1, "n": 5}.items() if k != missing}
    _load(
        tmp_path / "ok",
        [
            claim(
                "table_9.x",
                "table_cell",
                arm="a",
                metric="clean",
                expected={"mean": 0.5, "sd": 0.1, "n": 5},
                test={"name": "welch"},
            )
        ],
    )
    _field_error(
        tmp_path,
        "table_cell",
        "a Welch test needs the paper's sd and n in 'expected'",
        arm="a",
        metric="clean",
        expected=expected,
        test={"name": "welch"},
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"arms": ["a", "b", "c"], "test": {"name": "fisher"}},
            "test 'fisher' compares exactly two arms",
        ),
        (
            {"arms": ["a", "b", "c"], "measure": "clean", "test": {"name": "welch_one_sided"}},
            "test 'welch_one_sided' compares exactly two arms",
        ),
        (
            {"arms": ["a", "b"], "test": {"name": "welch_one_sided"}},
            "flagged counts take fisher/linear_by_linear; metrics welch_one_sided",
        ),
        (
            {"arms": ["a", "b"], "measure": "clean", "test": {"name": "fisher"}},
            "flagged counts take fisher/linear_by_linear; metrics welch_one_sided",
        ),
        (
            {"arms": ["a", "b"], "test": {"name": "fisher"}, "expected": [{"k": 1, "n": 2}]},
            "'expected' needs one k/n per arm",
        ),
    ],
)
def test_a_trend_test_fits_its_arms_and_measure(tmp_path, fields, message):
    arms = {name: arm(seeds=2) for name in "abc"}
    bad = claim("table_9.x", "trend", **fields)
    text = _error(tmp_path, [bad], arms)
    assert text == f"{_where(tmp_path)}: field 'trend': Value error, {message}"


def test_trends_that_fit(tmp_path):
    arms = {name: arm(seeds=2) for name in "abc"}
    ok = [
        claim(
            "table_9.l",
            "trend",
            arms=["a", "b", "c"],
            test={"name": "linear_by_linear"},
            expected=[{"k": 0, "n": 2}] * 3,
        ),
        claim("table_9.l2", "trend", arms=["a", "b"], test={"name": "linear_by_linear"}),
        claim(
            "table_9.f",
            "trend",
            arms=["a", "b"],
            test={"name": "fisher"},
            expected=[{"k": 0, "n": 2}] * 2,
        ),
    ]
    assert len(_load(tmp_path, ok, arms).entries) == 3


# -------------------------------------------------------------------------- arms of claims


def test_each_kind_names_its_arms(tmp_path):
    arms = {name: arm(seeds=2) for name in ("a", "b", "r")}
    spike = {"name": "fosc_spike", "ratio": 2, "pgd10_max_change": 0.1}
    rate_at = {"name": "rate_at_least", "min_rate": 1}
    claims = [
        claim("table_9.cell", "table_cell", arm="a", **CELL),
        claim("table_9.fixed", "table_cell", arm="b", seeds_flagged_in="a", rule=V1, **CELL),
        claim("table_9.rate", "instability_rate", arm="b", **RATE),
        claim("table_9.trend", "trend", arms=["b", "a"], test={"name": "fisher"}),
        claim("table_9.own", "event", arms=["a", "b"], event=spike, test=rate_at),
        claim(
            "table_9.ref", "event", arms=["a"], event={**spike, "reference_arm": "r"}, test=rate_at
        ),
        claim(
            "table_9.same",
            "event",
            arms=["a", "r"],
            event={**spike, "reference_arm": "r"},
            test=rate_at,
        ),
        claim(
            "table_9.heal",
            "healing",
            arms={"baseline": "b", "fixed": "a"},
            test={"name": "healing", "clean_tolerance": 0.02},
        ),
        claim(
            "table_9.prop",
            "property",
            test={"name": "pytest", "node": "tests/test_metrics.py::test_sgcs"},
        ),
    ]
    catalogue = _load(tmp_path, claims, arms)
    assert {e.id: e.claim.arm_names() for e in catalogue.entries} == {
        "table_9.cell": ("a",),
        "table_9.fixed": ("b", "a"),
        "table_9.rate": ("b",),
        "table_9.trend": ("b", "a"),
        "table_9.own": ("a", "b"),
        "table_9.ref": ("a", "r"),
        "table_9.same": ("a", "r"),
        "table_9.heal": ("b", "a"),
        "table_9.prop": (),
    }
    assert [e.claim.needs_rule() for e in catalogue.entries] == [
        False,
        True,
        True,
        True,
        True,
        True,
        True,
        True,
        False,
    ]


# --------------------------------------------------------------------------- the catalogue


def _tiers_folder(tmp_path):
    base = str(SPEC_DIR / "digits.yaml")
    arms = {
        "both": {
            "label": "x",
            "tiers": {"instant": {"base": base, "seeds": 1}, "full": {"base": base, "seeds": 3}},
        },
        "full_only": {"label": "y", "tiers": {"full": {"base": base, "set": {"method.beta": 2}}}},
    }
    claims = [
        claim("table_9.one", "instability_rate", arm="both", **RATE),
        claim("table_9.two", "trend", arms=["both", "full_only"], test={"name": "fisher"}),
        claim(
            "table_9.prop", "property", test={"name": "pytest", "node": "tests/test_metrics.py::t"}
        ),
    ]
    return load_catalogue(claims_folder(tmp_path, arms, claims))


def test_a_claim_runs_at_the_tiers_all_its_arms_have(tmp_path):
    catalogue = _tiers_folder(tmp_path)
    assert [catalogue.tiers_of(e) for e in catalogue.entries] == [
        ("instant", "full"),
        ("full",),
        TIERS,
    ]
    assert [s.seed for s in catalogue.specs("both", "full")] == [0, 1, 2]
    assert [s.seed for s in catalogue.specs("both", "instant")] == [0]
    assert catalogue.specs("full_only", "full")[0].method.beta == 2


@pytest.mark.parametrize(
    ("patterns", "tier", "ids"),
    [
        (None, None, ["table_9.one", "table_9.two", "table_9.prop"]),
        (["all"], "instant", ["table_9.one", "table_9.prop"]),
        (["table_9.t*"], None, ["table_9.two"]),
        (["table_9.t*", "table_9.one"], "full", ["table_9.one", "table_9.two"]),
        (["table_9.t*"], "instant", []),
        (["TABLE_9.*"], None, []),  # ids are case-sensitive
        ([], "instant", ["table_9.one", "table_9.prop"]),
    ],
)
def test_select_matches_globs_and_filters_by_tier(tmp_path, patterns, tier, ids):
    catalogue = _tiers_folder(tmp_path)
    assert [e.id for e in catalogue.select(patterns, tier)] == ids


def test_the_catalogue_reads_every_claims_file_in_name_order(tmp_path):
    folder = claims_folder(
        tmp_path, {"a": arm(seeds=2)}, [claim("table_9.x", "instability_rate", arm="a", **RATE)]
    )
    (folder / "figure_9.yaml").write_text(
        yaml.safe_dump(
            {
                "artefact": "figure_9",
                "title": "Fig. 9",
                "claims": [claim("figure_9.y", "instability_rate", arm="a", **RATE)],
            }
        )
    )
    catalogue = load_catalogue(folder)
    assert [(e.id, e.file.name, e.artefact) for e in catalogue.entries] == [
        ("figure_9.y", "figure_9.yaml", "figure_9"),
        ("table_9.x", "table_9.yaml", "table_9"),
    ]
    assert catalogue.titles == {"figure_9": "Fig. 9", "table_9": "table_9 (fabricated)"}
    assert set(catalogue.by_id) == {"figure_9.y", "table_9.x"}
    assert catalogue.folder == folder and set(catalogue.arms) == {"a"}


def test_specs_resolve_relative_to_each_claims_folder(tmp_path):
    """The same arm text in two folders is two arms when its relative base differs."""
    specs = []
    for beta, name in ((1, "one"), (5, "two")):
        folder = claims_folder(
            tmp_path / name,
            {},
            [
                claim(
                    "table_9.x",
                    "property",
                    test={"name": "pytest", "node": "tests/test_metrics.py::t"},
                )
            ],
        )
        base = yaml.safe_load((SPEC_DIR / "digits.yaml").read_text())
        base["method"]["beta"] = beta
        (folder.parent / "base.yaml").write_text(yaml.safe_dump(base))
        (folder / ARMS_FILE).write_text(
            yaml.safe_dump(
                {"arms": {"a": {"label": "x", "tiers": {"full": {"base": "../base.yaml"}}}}}
            )
        )
        specs.append(load_catalogue(folder).specs("a", "full")[0])
    assert [s.method.beta for s in specs] == [1, 5]


# ------------------------------------------------------------------------ load-time errors


def test_a_missing_folder_or_arms_file_is_one_line(tmp_path):
    with pytest.raises(ClaimsError) as err:
        load_catalogue(tmp_path / "nowhere")
    assert str(err.value) == (f"{tmp_path / 'nowhere'}: claims folder not found (the "
                              "repository's claims/: run from the repository root, or pass "
                              "it with --claims-dir)")
    folder = tmp_path / "claims"
    folder.mkdir()
    expected = f"{folder / ARMS_FILE}: needs a mapping 'arms' of arm name -> arm"
    for text in (None, "arms: [a, b]\n", "- a\n"):
        if text is not None:
            (folder / ARMS_FILE).write_text(text)
        with pytest.raises(ClaimsError) as err:
            load_catalogue(folder)
        assert str(err.value) == expected


def test_unreadable_and_malformed_yaml_is_one_line(tmp_path):
    folder = _one_claim_folder(tmp_path)
    (folder / "table_9.yaml").write_text("claims: [\n")  # an unclosed flow sequence
    with pytest.raises(ClaimsError) as err:
        load_catalogue(folder)
    assert str(err.value) == f"{folder / 'table_9.yaml'}: malformed YAML: while parsing a flow node"
    (folder / "table_9.yaml").unlink()
    (folder / "table_9.yaml").mkdir()
    with pytest.raises(ClaimsError) as err:
        load_catalogue(folder)
    assert str(err.value) == f"{folder / 'table_9.yaml'}: a directory, not a YAML file"


def test_claims_load_without_libyaml(tmp_path, monkeypatch):
    """libyaml's CSafeLoader only makes reading faster; without it PyYAML's SafeLoader
    reads the same claims."""
    folder = _one_claim_folder(tmp_path)
    with_libyaml = load_catalogue(folder)
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    assert load_catalogue(folder) == with_libyaml


def test_the_default_claims_folder_is_claims_under_the_working_directory(monkeypatch):
    monkeypatch.chdir(ROOT)
    default = load_catalogue()
    assert default.folder.resolve() == ROOT / "claims"
    assert [e.id for e in default.entries] == [
        e.id for e in load_catalogue(ROOT / "claims").entries
    ]


def _one_claim_folder(tmp_path):
    return claims_folder(
        tmp_path, {"a": arm()}, [claim("table_9.x", "instability_rate", arm="a", **RATE)]
    )


def test_a_claims_file_is_named_for_its_artefact(tmp_path):
    folder = claims_folder(
        tmp_path, {"a": arm()}, [claim("table_9.x", "instability_rate", arm="a", **RATE)]
    )
    (folder / "table_9.yaml").rename(folder / "table_8.yaml")
    with pytest.raises(ClaimsError) as err:
        load_catalogue(folder)
    assert str(err.value) == (
        f"{folder / 'table_8.yaml'}: artefact 'table_9' must match the file name"
    )
    (folder / "table_8.yaml").write_text(
        yaml.safe_dump({"artefact": "table_8", "title": "t", "claims": []})
    )
    with pytest.raises(ClaimsError) as err:
        load_catalogue(folder)
    assert str(err.value).startswith(f"{folder / 'table_8.yaml'}: field 'claims': ")


def test_a_claim_of_another_artefact_is_refused_by_name(tmp_path):
    c = claim("table_8.x", "instability_rate", arm="a", **RATE)
    text = _error(tmp_path, [c])
    assert text == f"{_where(tmp_path, 'table_8.x')}: source.artefact must be 'table_9'"


def test_a_claim_without_an_id_is_named_by_its_position(tmp_path):
    good = claim("table_9.x", "instability_rate", arm="a", **RATE)
    bad = {k: v for k, v in good.items() if k != "id"}
    text = _error(tmp_path, [good, bad])
    assert text.startswith(f"{tmp_path / 'claims' / 'table_9.yaml'}: claim '#2': field ")


def test_an_unknown_rule_lists_the_known_ones(tmp_path):
    c = claim("table_9.x", "instability_rate", arm="a", rule="pgd10_minus_square_v9", **RATE)
    assert _error(tmp_path, [c]) == (
        f"{_where(tmp_path)}: unknown masking rule 'pgd10_minus_square_v9'; known: "
        "pgd10_minus_square_v1, pgd10_minus_autoattack_v1, pgd10_minus_square_v2, "
        "pgd10_minus_autoattack_v2"
    )


def test_unknown_or_broken_arms_are_refused_by_name(tmp_path):
    c = claim("table_9.x", "trend", arms=["a", "nowhere"], test={"name": "fisher"})
    assert _error(tmp_path, [c]) == (
        f"{_where(tmp_path)}: unknown arm 'nowhere' (not in {tmp_path / 'claims' / ARMS_FILE})"
    )
    broken = {
        "a": arm(seeds=1),
        "b": {
            "label": "x",
            "tiers": {
                "cpu": {"base": str(SPEC_DIR / "digits.yaml")},
                "full": {"base": str(tmp_path / "gone.yaml")},
            },
        },
    }
    c = claim("table_9.x", "trend", arms=["a", "b"], test={"name": "fisher"})
    text = _error(tmp_path / "b", [c], broken)
    assert text.startswith(
        f"{_where(tmp_path / 'b')}: arm 'b' (tier full) does not resolve to a spec: "
    )
    assert "gone.yaml" in text


def test_healing_arms_need_the_same_seeds_in_every_shared_tier(tmp_path):
    base = str(SPEC_DIR / "digits.yaml")
    arms = {
        "a": {
            "label": "x",
            "tiers": {"full": {"base": base, "seeds": 2}, "cpu": {"base": base, "seeds": [3, 4]}},
        },
        "b": {
            "label": "y",
            "tiers": {
                "full": {"base": base, "seeds": [0, 1], "set": {"healing.enabled": True}},
                "instant": {"base": base, "seeds": 1},
            },
        },
    }
    heal = claim(
        "table_9.x",
        "healing",
        arms={"baseline": "a", "fixed": "b"},
        test={"name": "healing", "clean_tolerance": 0.02},
    )
    assert len(_load(tmp_path / "ok", [heal], arms).entries) == 1  # only 'full' is shared
    arms["b"]["tiers"]["cpu"] = {"base": base, "seeds": [3, 5]}
    assert _error(tmp_path, [heal], arms) == (
        f"{_where(tmp_path)}: tier cpu: baseline and fixed arms need the same seeds"
    )


def test_a_duplicate_id_names_both_files(tmp_path):
    folder = claims_folder(
        tmp_path, {"a": arm(seeds=2)}, [claim("table_9.x", "instability_rate", arm="a", **RATE)]
    )
    (folder / "table_8.yaml").write_text(
        yaml.safe_dump(
            {
                "artefact": "table_8",
                "title": "t",
                "claims": [
                    {
                        **claim("table_9.x", "instability_rate", arm="a", **RATE),
                        "source": {"artefact": "table_8", "where": "w"},
                    }
                ],
            }
        )
    )
    with pytest.raises(ClaimsError) as err:
        load_catalogue(folder)
    assert str(err.value) == (
        f"{folder / 'table_9.yaml'}: claim 'table_9.x': duplicate id "
        f"(also in {folder / 'table_8.yaml'})"
    )


def test_rationale_is_a_sentence(tmp_path):
    short = claim("table_9.x", "instability_rate", arm="a", **RATE) | {"rationale": "short"}
    assert "rationale" in _error(tmp_path, [short])
    assert len(RATIONALE) >= 20


@pytest.mark.parametrize(
    "node", ["tests/test_metrics.py::TestSgcs::test_it", "tests/test_metrics.py::test_sgcs[1]"]
)
def test_a_property_node_run_claim_could_never_match_is_refused_at_load(tmp_path, node):
    """run-claim matches module-level test functions only: a class member or a parametrized
    id would read "not collected" on every run, so the claim is bad input from the start."""
    prop = claim("table_9.x", "property", test={"name": "pytest", "node": node})
    assert _error(tmp_path, [prop]) == (
        f"{_where(tmp_path)}: field 'property.test.node': String should match pattern "
        r"'^tests/[\w/]+\.py::\w+$'"
    )


def test_event_rates_hold_at_their_bounds_inclusive():
    at_least, at_most = RateAtLeast(name="rate_at_least", min_rate=0.5), \
        RateAtMost(name="rate_at_most", max_rate=0.5)
    assert at_least.holds(0.5) and not at_least.holds(0.49)
    assert at_most.holds(0.5) and not at_most.holds(0.51)
    assert (at_least.describe(), at_most.describe()) == ("≥ 0.5", "≤ 0.5")
