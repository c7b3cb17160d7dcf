"""verify.py: finding evidence, counting seeds, reading a run's numbers, the one-line message
(issue 21, mutation).

Runs are fabricated (claimsutil); each expected value is written here from the numbers the
run was given (PGD-10 0.40, Square 0.38, AutoAttack 0.37, clean 0.90 unless set), not read
back through verify's own helpers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from claimsutil import arm, claim, claims_folder, own_count, write_run

from trades_repro import store
from trades_repro.claims import load_catalogue
from trades_repro.evalfile import EvalFileError
from trades_repro.verify import (
    Context,
    Evidence,
    Judgement,
    RunEvidence,
    format_expected,
    judge,
    judge_all,
    judged,
    needed,
    policy_record,
    subset,
)

V1 = "pgd10_minus_square_v1"
V2 = "pgd10_minus_square_v2"


def _catalogue(tmp_path: Path, arms: dict, claims: list[dict]):
    return load_catalogue(claims_folder(tmp_path, arms, claims))


def _one_run(tmp_path: Path, **run_kw) -> RunEvidence:
    """The evidence of one fabricated run of a one-seed arm."""
    c = claim(
        "table_9.rate",
        "instability_rate",
        arm="a",
        expected={"k": 1, "n": 1},
        test={"name": "fisher_exact"},
    )
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=1)}, [c])
    (spec,) = catalogue.specs("a", "full")
    write_run(tmp_path / "runs", spec, **run_kw)
    return Evidence(tmp_path / "runs").run(spec, "best_pgd10")


def _edit_eval(run: Path, edit) -> None:
    path = run / "eval.json"
    evals = json.loads(path.read_text())
    for record in evals["checkpoints"].values():
        edit(record)
    path.write_text(json.dumps(evals))


# ------------------------------------------------------------------------------ message


def _judgement(**fields) -> Judgement:
    base = {
        "id": "table_9.x",
        "artefact": "table_9",
        "kind": "table_cell",
        "tier": "full",
        "status": "failed",
        "paper": "0.5000",
        "ours": "0.6000",
        "test": "a test",
    }
    return Judgement(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (
            {
                "statistic": 1.234567,
                "p_value": 0.0123456,
                "interval": (0.12345, 0.56789),
                "detail": "why",
            },
            "table_9.x: failed: paper 0.5000, ours 0.6000; a test (statistic 1.235, p = 0.0123, "
            "interval [0.123, 0.568]). why",
        ),
        (
            {"statistic": -0.5},
            "table_9.x: failed: paper 0.5000, ours 0.6000; a test (statistic -0.5).",
        ),
        ({"p_value": 0.5}, "table_9.x: failed: paper 0.5000, ours 0.6000; a test (p = 0.5)."),
        (
            {"interval": (0.0, 1.0)},
            "table_9.x: failed: paper 0.5000, ours 0.6000; a test (interval [0.000, 1.000]).",
        ),
        ({"status": "held"}, "table_9.x: held: paper 0.5000, ours 0.6000; a test."),
        (
            {"status": "undetermined", "detail": "d"},
            "table_9.x: undetermined: paper 0.5000, ours 0.6000; a test. d",
        ),
        (
            {"status": "not run", "detail": "0 of 3 runs finished", "p_value": 0.1},
            "table_9.x: not run: 0 of 3 runs finished (paper 0.5000)",
        ),
        (
            {"status": "incomplete", "detail": "incomplete (1 of 3 seeds)"},
            "table_9.x: incomplete: incomplete (1 of 3 seeds) (paper 0.5000)",
        ),
    ],
)
def test_a_judgement_message_is_one_line_with_its_numbers(fields, text):
    assert _judgement(**fields).message() == text


# -------------------------------------------------------------------------- RunEvidence


def test_a_runs_metrics_are_its_attacks_and_the_two_gaps(tmp_path):
    run = _one_run(tmp_path, pgd10=0.40, square=0.38, clean=0.90)  # AutoAttack 0.37
    assert run.metric("clean") == 0.90
    assert run.metric("pgd10") == 0.40
    assert run.metric("square") == 0.38
    assert run.metric("autoattack") == 0.37
    assert run.metric("gap") == pytest.approx(0.40 - 0.37)
    assert run.metric("square_gap") == pytest.approx(0.40 - 0.38)
    assert run.metric("apgd-ce") is None  # not evaluated
    assert run.label == f"seed 0 ({run.digest[:8]})" and run.digest == run.spec.digest()


def test_a_gap_without_one_of_its_attacks_is_none(tmp_path):
    run = _one_run(tmp_path, drop=("autoattack",))
    assert run.metric("gap") is None and run.metric("square_gap") == pytest.approx(0.02)
    run = _one_run(tmp_path / "b", drop=("pgd10",))
    assert run.metric("gap") is None and run.metric("square_gap") is None


def test_a_run_without_a_clean_result_or_evaluation_has_no_metrics(tmp_path):
    run = _one_run(tmp_path)
    _edit_eval(run.folder, lambda r: r.update(clean=None))
    again = Evidence(tmp_path / "runs").run(run.spec, "best_pgd10")
    assert again.metric("clean") is None and again.metric("pgd10") == 0.40
    assert not again.has(frozenset({"clean"})) and again.has(frozenset({"pgd10", "square"}))
    (run.folder / "eval.json").unlink()
    bare = Evidence(tmp_path / "runs").run(run.spec, "best_pgd10")
    assert bare.evaluation is None
    assert bare.metric("clean") is None and bare.metric("gap") is None
    assert bare.flagged(V1) is None
    assert bare.has(frozenset()) and not bare.has(frozenset({"pgd10"}))


def test_has_asks_for_every_result_named(tmp_path):
    run = _one_run(tmp_path)
    assert run.has(frozenset({"clean", "pgd10", "square", "autoattack"}))
    assert not run.has(frozenset({"clean", "apgd-ce"}))


@pytest.mark.parametrize(
    ("square", "v1", "v2"),
    [
        (0.38, False, False),
        (0.32, True, None),  # margin exactly 0.08: v1 flags it; v2's interval straddles 0.08
        (0.33, False, None),  # 0.07: v1 clear; v2 undecided
        (0.20, True, True),
    ],
)
def test_flagged_applies_the_named_rule_to_the_runs_results(tmp_path, square, v1, v2):
    run = _one_run(tmp_path, square=square)
    assert (run.flagged(V1), run.flagged(V2)) == (v1, v2)


def test_the_paired_rule_reads_the_runs_clean_results_and_fired_checks(tmp_path):
    """Rule v2 counts only clean-correct examples and lets a fired masking check turn
    'clear' into undecided: both must reach it from eval.json."""
    # PGD-10 0.40, Square 0.20: robust to PGD-10 only on examples 20-39; clean-correct are
    # only 0-19 at clean 0.20, so no discordant pair: clear, not flagged
    assert _one_run(tmp_path / "clean", square=0.20, clean=0.20).flagged(V2) is False
    run = _one_run(tmp_path / "checks", square=0.38)  # margin 0.02: clear
    assert run.flagged(V2) is False
    flag = {"attack": "preflight", "check": "zero_gradients", "message": "3 points"}
    _edit_eval(run.folder, lambda r: r.update(flags=[flag]))
    assert Evidence(tmp_path / "checks" / "runs").run(run.spec, "best_pgd10").flagged(V2) is None


def test_fosc_is_the_validation_series_or_none(tmp_path):
    run = _one_run(tmp_path, fosc=[0.01, 0.02, 0.03])
    assert run.fosc() == [0.01, 0.02, 0.03]
    lines = (run.folder / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[1]) | {"val_fosc": None}
    (run.folder / "metrics.jsonl").write_text(
        "\n".join([lines[0], json.dumps(record), lines[2]]) + "\n"
    )
    assert Evidence(tmp_path / "runs").run(run.spec, "best_pgd10").fosc() is None
    (run.folder / "metrics.jsonl").write_text("")
    assert Evidence(tmp_path / "runs").run(run.spec, "best_pgd10").fosc() is None


# ----------------------------------------------------------------------------- Evidence


def test_the_first_finished_folder_of_a_spec_wins_and_unfinished_ones_are_skipped(tmp_path):
    run = _one_run(tmp_path)
    spec, runs = run.spec, tmp_path / "runs"
    write_run(runs, spec, folder="00_copy", square=0.20)  # sorts before the digest folder
    write_run(runs, spec, folder="b_unfinished", status="running")
    torn = write_run(runs, spec.model_copy(update={"seed": 5}), folder="0_torn")
    (torn / "spec.json").write_text('{"name": ')
    with pytest.raises(store.CorruptFile, match="0_torn/spec.json: not valid JSON"):
        Evidence(runs).index()  # a torn spec is named, never skipped
    shutil.rmtree(torn)
    evidence = Evidence(runs)
    assert evidence.index() == {spec.digest(): runs / "00_copy"}
    assert evidence.index() is evidence.index()  # read once
    found = evidence.run(spec, "best_pgd10")
    assert (found.folder.name, found.metric("square")) == ("00_copy", 0.20)
    assert len(found.records) == 5
    assert evidence.run(spec.model_copy(update={"seed": 5}), "best_pgd10") is None


def test_an_older_spec_version_is_not_evidence(tmp_path):
    run = _one_run(tmp_path)
    raw = json.loads((run.folder / "spec.json").read_text())
    raw["spec_version"] = 0
    (run.folder / "spec.json").write_text(json.dumps(raw))
    assert Evidence(tmp_path / "runs").index() == {}


def test_policy_record_is_the_policys_own_with_the_most_attacks(tmp_path):
    run = _one_run(tmp_path)
    evaluation = run.spec.evaluation
    assert policy_record(run.folder, "best_pgd10_fosc_ok", evaluation) is None
    own = policy_record(run.folder, "best_pgd10", evaluation)
    assert set(own.attacks) == {"pgd10", "square", "autoattack"}
    evals = json.loads((run.folder / "eval.json").read_text())
    fewer = json.loads(json.dumps(own.model_dump(mode="json")))
    fewer["key"], fewer["attacks"] = "fewer", {"pgd10": fewer["attacks"]["pgd10"]}
    evals["checkpoints"] = {"fewer": fewer, **evals["checkpoints"]}
    (run.folder / "eval.json").write_text(json.dumps(evals))
    assert policy_record(run.folder, "best_pgd10", evaluation).key == own.key
    (run.folder / "eval.json").write_text("{not json")
    with pytest.raises(EvalFileError, match="eval.json: not a valid eval file"):
        policy_record(run.folder, "best_pgd10", evaluation)  # named, never skipped
    (run.folder / "eval.json").unlink()
    assert policy_record(run.folder, "best_pgd10", evaluation) is None


def test_a_property_outcome_is_read_from_runs_properties(tmp_path):
    folder = tmp_path / "runs" / "_properties"
    folder.mkdir(parents=True)
    (folder / "table_9.p.json").write_text('{"outcome": "passed"}')
    evidence = Evidence(tmp_path / "runs")
    assert evidence.property_outcome("table_9.p") == {"outcome": "passed"}
    assert evidence.property_outcome("table_9.q") is None


# ------------------------------------------------------------------------------ judging


def _rate_catalogue(tmp_path, seeds=3, **arm_fields):
    c = own_count("table_9.rate", "a", 1, seeds)  # at most 1 flagged: the reading is tested
    arms = {"a": {**arm(seeds=seeds), **arm_fields}}
    return _catalogue(tmp_path, arms, [c])


def _ctx(tmp_path, catalogue, tier="full", partial=False):
    return Context(catalogue, Evidence(tmp_path / "runs"), tier, partial)


def test_missing_seeds_are_not_run_then_incomplete_then_judged(tmp_path):
    catalogue = _rate_catalogue(tmp_path)
    entry = catalogue.by_id["table_9.rate"]
    got = judge(entry, _ctx(tmp_path, catalogue)).model_dump()
    assert (got["status"], got["n_required"], got["n_found"], got["detail"]) == (
        "not run",
        3,
        0,
        "0 of 3 runs finished",
    )
    write_run(tmp_path / "runs", catalogue.specs("a", "full")[0])
    got = judge(entry, _ctx(tmp_path, catalogue)).model_dump()
    assert (got["status"], got["n_required"], got["n_found"], got["detail"]) == (
        "incomplete",
        3,
        1,
        "incomplete (1 of 3 seeds)",
    )
    assert got["paper"] == "1/3 (ours)" and not got["partial"]
    for spec in catalogue.specs("a", "full")[1:]:
        write_run(tmp_path / "runs", spec)
    got = judge(entry, _ctx(tmp_path, catalogue))
    assert (got.status, got.ours) == ("held", "0/3")  # judged: 0 of 3 flagged, at most 1


def test_runs_without_the_needed_attacks_are_counted_across_arms(tmp_path):
    c = claim("table_9.trend", "trend", arms=["a", "b"], rule=V1, test={"name": "fisher"})
    arms = {"a": arm(seeds=2), "b": arm(seeds=2, **{"method.beta": 6})}
    catalogue = _catalogue(tmp_path, arms, [c])
    for name in ("a", "b"):
        for spec in catalogue.specs(name, "full"):
            write_run(tmp_path / "runs", spec, drop=("square",))  # the rule's attack missing
    got = judge(catalogue.by_id["table_9.trend"], _ctx(tmp_path, catalogue))
    assert (got.status, got.detail) == (
        "not run", "0 of 4 runs finished with pgd10, square evaluated (4 finished without)")
    write_run(tmp_path / "runs", catalogue.specs("b", "full")[0])  # one complete run
    got = judge(catalogue.by_id["table_9.trend"], _ctx(tmp_path, catalogue))
    assert (got.status, got.detail) == (
        "incomplete", "incomplete (1 of 4 seeds) with pgd10, square evaluated (3 finished "
        "without)")


def test_sgcs_is_the_validation_series_or_none(tmp_path):
    run = _one_run(tmp_path, fosc=[0.01] * 3, sgcs=[0.6, 0.5, 0.4])
    assert run.sgcs() == [0.6, 0.5, 0.4] and run.fosc() == [0.01] * 3
    lines = (run.folder / "metrics.jsonl").read_text().splitlines()
    (run.folder / "metrics.jsonl").write_text("".join(
        json.dumps(json.loads(x) | {"val_sgcs": None}) + "\n" for x in lines))
    assert Evidence(tmp_path / "runs").run(run.spec, "best_pgd10").sgcs() is None


def test_a_claim_without_the_tier_is_not_run_there(tmp_path):
    catalogue = _rate_catalogue(tmp_path)
    got = judge(catalogue.by_id["table_9.rate"], _ctx(tmp_path, catalogue, tier="cpu"))
    assert (got.status, got.tier, got.detail, got.n_required) == (
        "not run",
        "cpu",
        "no 'cpu' tier for this claim",
        0,
    )


def test_an_arms_checkpoint_policy_picks_its_record(tmp_path):
    catalogue = _rate_catalogue(tmp_path, seeds=1, policy="best_pgd10_fosc_ok")
    (spec,) = catalogue.specs("a", "full")
    write_run(tmp_path / "runs", spec)  # evaluated for best_pgd10 only
    entry = catalogue.by_id["table_9.rate"]
    assert judge(entry, _ctx(tmp_path, catalogue)).status == "not run"
    write_run(tmp_path / "runs", spec, policy="best_pgd10_fosc_ok")
    got = judge(entry, _ctx(tmp_path, catalogue))
    assert (got.status, got.ours) == ("held", "0/1")  # judged: 0 of 1 flagged, at most 1


def test_an_arm_named_twice_counts_its_seeds_once(tmp_path):
    c = claim(
        "table_9.cell",
        "table_cell",
        arm="a",
        seeds_flagged_in="a",
        rule=V1,
        metric="clean",
        expected={"mean": 0.9},
        test={"name": "tolerance", "abs": 0.1},
    )
    catalogue = _catalogue(tmp_path, {"a": arm(seeds=2)}, [c])
    write_run(tmp_path / "runs", catalogue.specs("a", "full")[0])
    got = judge(catalogue.by_id["table_9.cell"], _ctx(tmp_path, catalogue))
    assert (got.status, got.detail) == ("incomplete", "incomplete (1 of 2 seeds)")


def test_judge_all_keeps_the_order_and_judged_takes_a_paper_override(tmp_path):
    catalogue = _rate_catalogue(tmp_path)
    prop = claim(
        "table_9.prop",
        "property",
        test={"name": "pytest", "node": "tests/test_metrics.py::test_sgcs"},
    )
    catalogue = _catalogue(
        tmp_path / "two",
        {"a": arm(seeds=1)},
        [
            prop,
            claim(
                "table_9.rate",
                "instability_rate",
                arm="a",
                expected={"k": 1, "n": 1},
                test={"name": "fisher_exact"},
            ),
        ],
    )
    ctx = _ctx(tmp_path / "two", catalogue)
    assert [j.id for j in judge_all(list(catalogue.entries), ctx)] == [
        "table_9.prop",
        "table_9.rate",
    ]
    entry = catalogue.by_id["table_9.rate"]
    assert judged(entry, ctx, "held", paper="as printed").paper == "as printed"
    assert judged(entry, ctx, "held").paper == "1/1"


# ------------------------------------------------------------------------- needs, subset


def _claim_of(tmp_path, c):
    return _catalogue(tmp_path, {"a": arm(seeds=1), "b": arm(seeds=1)}, [c]).entries[0].claim


@pytest.mark.parametrize(
    ("fields", "metrics", "needs"),
    [
        ({"metric": "clean"}, ("clean",), {"clean"}),
        ({"metric": "gap"}, ("gap",), {"pgd10", "autoattack"}),
        ({"metric": "square_gap"}, ("square_gap",), {"pgd10", "square"}),
        ({"metric": "fab-t"}, ("fab-t",), {"fab-t"}),
        ({"metric": "roughness"}, ("roughness",), {"landscape"}),  # Fig. 1: eval.json's
        (
            {"metric": "clean", "subset": "flagged", "rule": "pgd10_minus_autoattack_v1"},
            ("clean",),
            {"clean", "pgd10", "autoattack"},
        ),
        ({"metric": "clean", "subset": "regular", "rule": V2}, (), {"pgd10", "square"}),
    ],
)
def test_a_claim_needs_its_metrics_attacks_and_its_rules_two(tmp_path, fields, metrics, needs):
    c = claim(
        "table_9.cell",
        "table_cell",
        arm="a",
        expected={"mean": 0.5},
        test={"name": "tolerance", "abs": 0.1},
        **fields,
    )
    assert needed(_claim_of(tmp_path, c), metrics) == frozenset(needs)


def test_subsets_split_runs_by_the_rule_and_drop_undecided_ones(tmp_path):
    runs = [
        _one_run(tmp_path / name, square=square)
        for name, square in (("f", 0.20), ("u", 0.32), ("r", 0.38))
    ]
    flagged, undecided, regular = runs
    assert subset(runs, "all", None) == runs
    assert subset(runs, "flagged", V2) == [flagged]
    assert subset(runs, "regular", V2) == [regular]
    assert undecided.flagged(V2) is None
    assert subset(runs, "flagged", V1) == [flagged, undecided]  # v1: 0.08 is flagged


# --------------------------------------------------------------------- format_expected


@pytest.mark.parametrize(
    ("kind", "fields", "paper"),
    [
        (
            "table_cell",
            {
                "arm": "a",
                "metric": "clean",
                "expected": {"mean": 0.9, "sd": 0.01, "n": 5},
                "test": {"name": "welch"},
            },
            "0.9000 ± 0.0100 (n = 5)",
        ),
        (
            "table_cell",
            {
                "arm": "a",
                "metric": "clean",
                "expected": {"mean": 0.25},
                "test": {"name": "tolerance", "abs": 0.1},
            },
            "0.2500",
        ),
        (
            "instability_rate",
            {"arm": "a", "expected": {"k": 7, "n": 10}, "test": {"name": "fisher_exact"}},
            "7/10",
        ),
        (
            "trend",
            {
                "arms": ["a", "b"],
                "expected": [{"k": 1, "n": 10}, {"k": 5, "n": 10}],
                "test": {"name": "fisher"},
            },
            "1/10, 5/10 (increasing)",
        ),
        (
            "trend",
            {"arms": ["a", "b"], "direction": "not_decreasing", "test": {"name": "fisher"}},
            "not_decreasing",
        ),
        (
            "event",
            {
                "arms": ["a"],
                "event": {"name": "self_healing", "within": 2},
                "test": {"name": "rate_at_least", "min_rate": 0.75},
            },
            "rate ≥ 0.75",
        ),
        (
            "healing",
            {
                "arms": {"baseline": "a", "fixed": "b"},
                "test": {"name": "healing", "clean_tolerance": 0.02},
            },
            "fixed not flagged, clean as regular",
        ),
        (
            "property",
            {"test": {"name": "pytest", "node": "tests/test_metrics.py::test_sgcs"}},
            "holds",
        ),
    ],
)
@pytest.mark.parametrize("values_from", ["paper", "ours"])
def test_the_papers_value_as_printed_in_reports(tmp_path, kind, fields, paper, values_from):
    c = claim("table_9.x", kind, values_from=values_from, **fields)
    mark = " (ours)" if values_from == "ours" else ""
    assert format_expected(_claim_of(tmp_path, c)) == paper + mark


# ---------------------------------------------------------------- Fig. 1's landscape score


@pytest.mark.parametrize(("radius", "roughness"), [
    (None, 0.7),  # the spec's own radius: digits' ε 0.1
    (0.1 + 1e-13, 0.7),  # equal up to rounding
    (0.1 + 1e-9, None),
    (8 / 255, None),  # drawn before the radius followed ε
])
def test_roughness_is_read_only_over_the_arms_radius(tmp_path, radius, roughness):
    run = _one_run(tmp_path, roughness=0.7, radius=radius)
    assert run.spec.landscape().radius == 0.1
    assert run.metric("roughness") == roughness
    assert run.has(frozenset({"landscape", "pgd10"})) is (roughness is not None)
    assert run.has_landscape() is (roughness is not None)


def test_a_run_without_an_evaluation_has_no_landscape(tmp_path):
    run = _one_run(tmp_path, roughness=0.7)
    bare = RunEvidence(run.digest, run.folder, run.spec, run.records, None)
    assert bare.has_landscape() is False and bare.metric("roughness") is None
    assert _one_run(tmp_path / "none").has_landscape() is False  # evaluated, no landscape


def test_step_records_are_read_per_epoch_from_the_runs_folder(tmp_path):
    series = {"w_grad_norm": [1.0, 2.0], "kl_norm": [1.0, 1.0], "ce_norm": [1.0, 1.0],
              "grad_cosine_similarity": [0.5, 0.5]}
    run = _one_run(tmp_path, batches={1: series, 2: {**series, "w_grad_norm": [3.0, 4.0]}})
    assert [b.w_grad_norm for b in run.batches(2)] == [3.0, 4.0]
    assert [b.step for b in run.batches(1)] == [1, 2] and run.batches(3) == []


@pytest.mark.parametrize("old_first", [True, False])
def test_of_two_records_the_one_over_the_arms_radius_is_the_runs(tmp_path, old_first):
    run = _one_run(tmp_path, roughness=0.7)
    evals = json.loads((run.folder / "eval.json").read_text())
    (new,) = evals["checkpoints"].values()
    old = json.loads(json.dumps(new))
    old["key"], old["landscape"]["radius"] = "old", 8 / 255
    pair = [("old", old), (new["key"], new)]
    evals["checkpoints"] = dict(pair if old_first else pair[::-1])
    (run.folder / "eval.json").write_text(json.dumps(evals))
    assert policy_record(run.folder, "best_pgd10", run.spec.evaluation, 0.1).key == new["key"]
    assert policy_record(run.folder, "best_pgd10", run.spec.evaluation, 8 / 255).key == "old"
    again = Evidence(tmp_path / "runs").run(run.spec, "best_pgd10")
    assert again.evaluation.key == new["key"] and again.metric("roughness") == 0.7


def test_step_records_are_parsed_once_per_run(tmp_path, monkeypatch):
    from trades_repro import store

    series = {"w_grad_norm": [1.0, 2.0], "kl_norm": [1.0, 1.0], "ce_norm": [1.0, 1.0],
              "grad_cosine_similarity": [0.5, 0.5]}
    run = _one_run(tmp_path, batches={1: series, 2: series})
    reads = []
    real = store.read_batches
    monkeypatch.setattr(store, "read_batches", lambda folder: reads.append(folder) or real(folder))
    assert len(run.batches(1)) == len(run.batches(2)) == 2 and run.batches(5) == []
    assert reads == [run.folder]
