"""The claims files: the paper's cells all present, the schema strict, bad input one line."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from claimsutil import arm, claim, claims_folder
from factories import assert_one_line_error
from scipy import stats as sps
from typer.testing import CliRunner

from trades_repro import judges
from trades_repro.claimkinds import TIERS
from trades_repro.claims import ClaimsError, load_catalogue
from trades_repro.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "PAPER.md"
runner = CliRunner()
# Cells of each paper table (rows × columns, counted by hand from the paper): Table 1 2×7;
# Table 2 two 3×3 halves; Table 3 3×4; Table 4 3×3; Table 5 3×5; Table 6 3×4; Table 7 2×5.
PAPER_CELLS = {"table_1": 14, "table_2": 18, "table_3": 12, "table_4": 9, "table_5": 15,
               "table_6": 12, "table_7": 10}
CELL_KINDS = ("table_cell", "instability_rate")
EVENT_ARTEFACTS = ("figure_2", "figure_3", "figure_4", "figure_5", "figure_6", "figure_7",
                   "section_5_3")


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue(ROOT / "claims")


@pytest.mark.parametrize(("artefact", "cells"), PAPER_CELLS.items())
def test_every_cell_of_every_table_has_one_claim(catalogue, artefact, cells):
    mine = [e.claim for e in catalogue.entries
            if e.artefact == artefact and e.claim.kind in CELL_KINDS]
    wheres = Counter(c.source.where for c in mine)
    assert len(mine) == cells, f"{artefact}: {len(mine)} cell claims, the paper has {cells}"
    assert max(wheres.values()) == 1, f"{artefact}: a cell claimed twice: {wheres}"


def test_trends_and_events_are_claimed(catalogue):
    kinds = Counter(e.claim.kind for e in catalogue.entries)
    assert kinds["trend"] >= 4
    assert {a for a in EVENT_ARTEFACTS} <= {e.artefact for e in catalogue.entries
                                           if e.claim.kind == "event"}
    assert kinds["property"] >= 3 and kinds["healing"] >= 1


def test_paper_claims_are_full_tier_and_ours_are_marked(catalogue):
    for entry in catalogue.entries:
        tiers = catalogue.tiers_of(entry)
        assert tiers, entry.id
        if entry.claim.values_from == "paper" and entry.claim.kind != "property":
            assert "full" in tiers and "instant" not in tiers, entry.id
        if "instant" in tiers and entry.claim.kind != "property":
            assert entry.claim.values_from == "ours", entry.id


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+|\d+", text)]


def test_verbatim_text_carries_the_typed_numbers(catalogue):
    """The numbers were typed twice (verbatim and expected): a typo in one shows here."""
    for entry in catalogue.entries:
        c = entry.claim
        if c.values_from != "paper" or c.kind not in CELL_KINDS:
            continue
        said = _numbers(c.verbatim)
        if c.kind == "instability_rate":
            assert said == [c.expected.k, c.expected.n], entry.id
        else:
            typed = [c.expected.mean] + ([c.expected.sd] if c.expected.sd is not None else [])
            assert said == pytest.approx(typed), entry.id


def _counted_trends(catalogue):
    return [e for e in catalogue.entries
            if e.claim.kind == "trend" and e.claim.expected and e.claim.values_from == "paper"]


def test_a_trends_verbatim_counts_are_its_expected_counts_in_arm_order(catalogue):
    for entry in _counted_trends(catalogue):
        typed = [x for rate in entry.claim.expected for x in (rate.k, rate.n)]
        assert _numbers(entry.claim.verbatim) == typed, entry.id


def _mantel_p(counts):
    """One-sided p of Mantel's M = √(N − 1)·r for a rise (Agresti §3.4.6), from the units."""
    x = np.concatenate([np.full(n, g + 1.0) for g, (_, n) in enumerate(counts)])
    y = np.concatenate([np.r_[np.ones(k), np.zeros(n - k)] for k, n in counts])
    if y.min() == y.max():
        return 1.0  # one outcome only: no trend to see
    return float(sps.norm.sf(np.sqrt(len(x) - 1) * np.corrcoef(x, y)[0, 1]))


def test_every_counted_trend_holds_on_the_papers_own_counts(catalogue):
    """A trend the paper's counts cannot support would fail on an exact reproduction. The
    linear-by-linear p is checked against Mantel's M computed here: the judge's ran on a
    table with 0.5 added to every empty cell, and every paper row has one."""
    for entry in _counted_trends(catalogue):
        c = entry.claim
        counts = [(rate.k, rate.n) for rate in c.expected]
        p = judges._rate_trend(c.test.name, counts, c.direction).p_value
        if c.test.name == "linear_by_linear":
            rising = counts if c.direction == "increasing" else counts[::-1]
            assert p == pytest.approx(_mantel_p(rising), rel=1e-9), entry.id
        assert (p < c.test.alpha) == (c.direction == "increasing"), entry.id


@pytest.mark.parametrize(("claim_id", "p"), [("table_2.trend.larger_lr_beta6", 0.19),
                                             ("table_2.trend.smaller_batch_beta6", 0.11)])
def test_the_flat_rows_rationale_quotes_the_rise_they_cannot_show(catalogue, claim_id, p):
    """&flat says why these rows claim only `not_decreasing`: the rise's p on the paper's
    counts, quoted to two digits (it said p ≥ 0.33, the zero-shifted table's)."""
    c = catalogue.by_id[claim_id].claim
    counts = [(rate.k, rate.n) for rate in c.expected]
    rise = judges._rate_trend(c.test.name, counts, "increasing").p_value
    assert rise == pytest.approx(p, abs=0.005)
    assert f"{p:.2f}" in c.rationale and "p ≥" not in c.rationale


@pytest.mark.parametrize(("claim_id", "ours", "paper", "quoted"), [
    ("table_2.lr0p1.beta1_bs128", (5, 10), (10, 10), "p = 0.033"),
    ("table_2.lr0p1.beta1_bs128", (6, 10), (10, 10), "6/10: p = 0.087"),
    ("table_4.beta3.tiny_imagenet", (0, 3), (3, 3), "0/3 against 3/3: p = 0.1"),
    ("table_5.beta1.prob", (0, 3), (3, 3), "0/3 against 3/3: p = 0.1"),
    ("small_scale.fashion.risky_cell_flagged", (0, 5), (4, 5), "fails at 0/5 (p = 0.048)"),
    ("instant.digits.not_flagged", (2, 2), (0, 2), "Fisher p = 0.33"),
])
def test_the_rate_rationales_quote_their_tests_own_p(catalogue, claim_id, ours, paper, quoted):
    """The boundaries the fisher_exact rationales state, from scipy on the same counts."""
    (k, n), (kk, nn) = ours, paper
    p = sps.fisher_exact([[k, n - k], [kk, nn - kk]]).pvalue
    assert f"p = {p:.2g}" in quoted
    assert quoted in catalogue.by_id[claim_id].claim.rationale


def _plain(text: str) -> str:
    """Markup-free text: the paper's tables mix HTML bold, Markdown bold and LaTeX."""
    for markup, plain in (("<b>", ""), ("</b>", ""), ("**", ""), ("$", ""), ("\\textbf{", ""),
                          ("}", ""), ("\\pm", "±")):
        text = text.replace(markup, plain)
    return " ".join(text.split())


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper's text lives outside the repo")
def test_verbatim_text_is_in_the_paper(catalogue):
    paper = _plain(PAPER.read_text())
    for entry in catalogue.entries:
        # a trend's verbatim lists several cells' counts, not one contiguous phrase
        if entry.claim.values_from == "paper" and entry.claim.kind != "trend":
            assert _plain(entry.claim.verbatim) in paper, entry.id


def test_every_arm_resolves_in_each_tier_it_names(catalogue):
    for name, arm_ in catalogue.arms.items():
        for tier in arm_.tiers:
            assert tier in TIERS
            specs = catalogue.specs(name, tier)
            assert len({s.digest() for s in specs}) == len(specs), name


def test_full_tier_follows_the_papers_protocol(catalogue):
    spec = catalogue.specs("c100_beta3_bs256_lr0p1", "full")[0]
    assert (spec.data.dataset, spec.model.arch, spec.optim.epochs) == ("cifar100", "resnet18", 200)
    assert spec.data.validation == "test"  # Fig. 4: 50,000/256 = 195 steps per epoch
    assert spec.evaluation.n_examples is None  # all 10,000 test images
    assert {"autoattack", "square"} <= set(spec.evaluation.attacks)
    assert spec.evaluation.square_queries == 5000
    assert len(catalogue.specs("c100_beta3_bs256_lr0p1", "full")) == 10


def test_shared_arms_resolve_to_the_same_runs(catalogue):
    left = {s.digest() for s in catalogue.specs("c100_beta3_bs128_lr0p1", "full")}
    ids = [e.id for e in catalogue.entries if e.claim.kind == "instability_rate"
           and e.claim.arm == "c100_beta3_bs128_lr0p1"]
    assert len(ids) == 2 and len(left) == 10  # Table 2's two halves share one column


GOOD = claim("table_9.a", "instability_rate", arm="a", expected={"k": 1, "n": 2},
             test={"name": "fisher_exact"})


@pytest.mark.parametrize(("change", "needle"), [
    ({"kind": "histogram"}, "kind"),
    ({"rationale": None}, "rationale"),
    ({"kind": "table_cell", "metric": "clean", "expected": {"mean": 0.5},
      "test": {"name": "tolerance"}}, "test.tolerance.abs"),
    ({"arm": "nowhere"}, "unknown arm 'nowhere'"),
    ({"rule": "pgd10_minus_square_v9"}, "unknown masking rule"),
])
def test_bad_claims_exit_2_naming_file_and_claim(tmp_path, change, needle):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [bad])
    result = runner.invoke(app, ["verify", "--claims-dir", str(folder)])
    assert_one_line_error(result, "table_9.yaml", "table_9.a", needle)


SPLIT = claim("table_9.s", "trend", arms=["a", "a"], subsets=["regular", "flagged"],
              measure="roughness", test={"name": "welch_one_sided"})


@pytest.mark.parametrize(("change", "needle"), [
    ({"subsets": ["regular"]}, "one subset per arm"),
    ({"subsets": ["flagged", "flagged"]}, "the same arm and subset twice"),
    ({"subsets": None}, "the same arm and subset twice"),  # an arm against itself
    ({"measure": "flagged", "test": {"name": "fisher"}}, "drop 'subsets'"),
    ({"subsets": ["regular", "most"]}, "subsets.1"),
])
def test_bad_subset_trends_exit_2_naming_file_and_claim(tmp_path, change, needle):
    assert "table_9.s" in load_catalogue(claims_folder(tmp_path / "ok", {"a": arm(seeds=2)},
                                                       [SPLIT])).by_id
    bad = {k: v for k, v in {**SPLIT, **change}.items() if v is not None}
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [bad])
    result = runner.invoke(app, ["claims", "list", "--claims-dir", str(folder)])
    assert_one_line_error(result, "table_9.yaml", "table_9.s", needle)


def test_a_split_trend_names_its_rule_and_a_whole_arm_trend_need_not(tmp_path):
    unnamed = {k: v for k, v in SPLIT.items() if k != "rule"}
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [unnamed])
    assert_one_line_error(runner.invoke(app, ["claims", "list", "--claims-dir", str(folder)]),
                          "table_9.s", "name its masking 'rule'")
    whole = {**unnamed, "arms": ["a", "b"], "subsets": ["all", "all"]}
    arms = {"a": arm(seeds=2), "b": arm(seeds=2, **{"method.beta": 2})}
    claim_ = load_catalogue(claims_folder(tmp_path / "whole", arms, [whole])).by_id["table_9.s"]
    assert not claim_.claim.needs_rule() and claim_.claim.rule is None


COUPLING = claim("table_9.e", "event", arms=["a"], event={
    "name": "batch_gradient_coupling", "relation": "kl_with_w", "min_rho": 0.3},
    test={"name": "rate_at_least", "min_rate": 0.5})


@pytest.mark.parametrize(("event", "needle"), [
    ({"relation": "sideways"}, "relation"),
    ({"min_rho": 1.5}, "min_rho"),
    ({"min_rho": 0}, "min_rho"),
    ({"fosc_threshold": -1}, "fosc_threshold"),
    ({"name": "healing_signature", "within": 0, "near_zero": 0.25, "relation": None,
      "min_rho": None}, "within"),
    ({"name": "healing_signature", "within": 5, "near_zero": 1.5, "relation": None,
      "min_rho": None}, "near_zero"),
])
def test_nonsense_fig_4_and_5_event_fields_exit_2_naming_file_and_claim(tmp_path, event,
                                                                        needle):
    merged = {k: v for k, v in {**COUPLING["event"], **event}.items() if v is not None}
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [{**COUPLING, "event": merged}])
    result = runner.invoke(app, ["claims", "list", "--claims-dir", str(folder)])
    assert_one_line_error(result, "table_9.yaml", "table_9.e", needle)


@pytest.mark.parametrize(("event", "test", "needle"), [
    ({"name": "square_lowest", "margin": -0.1}, None, "margin"),
    ({"name": "sgcs_falls_with_fosc", "within_epochs": -1}, None, "within_epochs"),
    ({"name": "gap_negative_after_spike", "fosc_threshold": -1}, None, "fosc_threshold"),
    ({"name": "spike_duration_at_least", "min_epochs": 1}, None, "min_epochs"),
    ({"name": "spike_duration_at_least", "min_epochs": 3, "max_epochs": 1}, None,
     "max_epochs"),
    (None, {"name": "rate_at_most", "max_rate": 1}, "max_rate"),
    (None, {"name": "rate_at_most", "min_rate": 0.5}, "max_rate"),
])
def test_nonsense_new_event_fields_exit_2_naming_file_and_claim(tmp_path, event, test, needle):
    bad = {**COUPLING, "event": event or COUPLING["event"], "test": test or COUPLING["test"]}
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [bad])
    result = runner.invoke(app, ["claims", "list", "--claims-dir", str(folder)])
    assert_one_line_error(result, "table_9.yaml", "table_9.e", needle)


def test_duplicate_ids_and_unresolvable_arms_exit_2(tmp_path):
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [GOOD, GOOD])
    assert_one_line_error(runner.invoke(app, ["claims", "list", "--claims-dir", str(folder)]),
                          "table_9.a", "duplicate id")
    broken = {"a": {"label": "x", "tiers": {"full": {"base": str(tmp_path / "gone.yaml")}}}}
    folder = claims_folder(tmp_path / "b", broken, [GOOD])
    assert_one_line_error(runner.invoke(app, ["verify", "--claims-dir", str(folder)]),
                          "table_9.a", "does not resolve to a spec", "gone.yaml")
    bad_set = {"a": arm(seeds=1, **{"method.colour": "red"})}
    folder = claims_folder(tmp_path / "c", bad_set, [GOOD])
    assert_one_line_error(runner.invoke(app, ["verify", "--claims-dir", str(folder)]),
                          "table_9.a", "method.colour")


def test_verify_on_empty_evidence_reports_not_run_and_exits_3(tmp_path):
    """No evidence is 'cannot decide' (3), not 'every claim held' (0); a --runs-dir that
    does not exist is a typo (2), not an empty folder."""
    report, junit = tmp_path / "report.md", tmp_path / "junit.xml"
    missing = runner.invoke(app, ["verify", "--runs-dir", str(tmp_path / "emtpy")])
    assert_one_line_error(missing, f"--runs-dir {tmp_path / 'emtpy'}: no such folder")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["verify", "--runs-dir", str(tmp_path / "empty"), "--report",
                                 str(report), "--junit", str(junit)])
    assert result.exit_code == 3, result.output
    assert "no evidence: none of the" in result.output
    n = len(load_catalogue(ROOT / "claims").select(None, "full"))
    assert f"{n} claims: {n} not run" in result.stdout
    assert "held" not in report.read_text().split("\n", 3)[2]
    assert junit.read_text().count("<skipped") == n


def test_unknown_tier_and_unmatched_pattern_are_bad_input(tmp_path):
    assert_one_line_error(runner.invoke(app, ["verify", "--tier", "huge"]), "--tier", "huge")
    assert_one_line_error(runner.invoke(app, ["verify", "table_99.*"]),
                          "no claim matches 'table_99.*' in claims")
    assert_one_line_error(runner.invoke(app, ["verify", ""]), "no claim matches '' in claims")
    for command in (["verify"], ["run-claim", "--dry-run"], ["claims", "list"], ["status"]):
        # a typo beside a pattern that matches is named, not silently dropped
        result = runner.invoke(app, [*command, "table_1.*", "tabel_2.*", "all"])
        assert_one_line_error(result, "no claim matches 'tabel_2.*' in claims")
    assert_one_line_error(runner.invoke(app, ["run-claim", "table_2.*", "--tier", "instant"]),
                          "has the 'instant' tier (theirs: reduced, full;")
    assert_one_line_error(runner.invoke(app, ["run-claim", "table_2.*", "--tier", "full",
                                              "--dry-run", "--device-kind", "tpu"]),
                          "--device-kind", "tpu")
    assert_one_line_error(runner.invoke(app, ["claims", "list", "--claims-dir", "/nowhere"]),
                          "/nowhere", "claims folder not found")


def test_run_claim_dry_run_lists_table_2s_150_runs_with_gpu_hours():
    result = runner.invoke(app, ["run-claim", "table_2.*", "--tier", "full", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "150 runs" in result.stdout and "150 to train" in result.stdout
    assert re.search(r"estimated GPU time \(h100, spec/costs.yaml\): [\d.]+ h", result.stdout)


def test_run_claim_refuses_a_gpu_tier_without_a_gpu(monkeypatch, tmp_path):
    """Were the refusal to fail, the full tier's CIFAR runs must neither start (train would
    raise, exit 4) nor write into the checkout's own runs/ folder."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("trades_repro.train.train", lambda *a, **k: pytest.fail("trained"))
    result = runner.invoke(app, ["run-claim", "table_2.lr0p1.beta3_bs256", "--tier", "full",
                                 "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 3
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_every_property_claim_names_an_existing_test(catalogue):
    """A renamed test would otherwise turn its claim into 'not collected' at run time."""
    for entry in catalogue.entries:
        if entry.claim.kind == "property":
            path, name = entry.claim.test.node.split("::")
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), entry.id


def test_run_claim_dry_run_estimates_short_cpu_work_in_minutes(tmp_path):
    result = runner.invoke(app, ["run-claim", "instant.*", "--tier", "instant", "--dry-run",
                                 "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert re.search(r"estimated CPU time \(cpu, spec/costs.yaml\): \d+ min", result.stdout)
    assert not (tmp_path / "_properties").exists()  # a dry run runs nothing


def test_a_non_finite_expected_value_is_refused_with_the_file(tmp_path):
    """`expected: {mean: .nan}` loaded, and every comparison with NaN is False."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    folder = tmp_path / "claims"
    shutil.copytree(repo / "claims", folder)
    shutil.copytree(repo / "spec", tmp_path / "spec")  # the arms' specs, as in the repository
    path = folder / "table_3.yaml"
    path.write_text(path.read_text().replace("expected: {mean: 0.5342,",
                                             "expected: {mean: .nan,", 1))
    with pytest.raises(ClaimsError, match=r"table_3.yaml.*finite"):
        load_catalogue(folder)


def test_every_tier_evaluates_the_attacks_its_claims_read(catalogue):
    """An arm that does not run an attack a claim reads leaves that claim 'not run' forever."""
    for entry in catalogue.entries:
        reads = judges.needs_of(entry.claim) - {"clean", "landscape"}
        for tier in catalogue.tiers_of(entry):
            for arm_name in entry.claim.arm_names():
                for spec in catalogue.specs(arm_name, tier):
                    missing = reads - set(spec.evaluation.attacks)
                    assert not missing, f"{entry.id} at {tier}: {arm_name} lacks {missing}"


def test_a_claims_file_that_is_not_utf8_exits_2_naming_it(tmp_path):
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [GOOD])
    (folder / "table_8.yaml").write_bytes(b"\xff\xfe claims")
    result = runner.invoke(app, ["claims", "list", "--claims-dir", str(folder)])
    assert_one_line_error(result, "table_8.yaml: not UTF-8 text")


def test_every_claims_file_has_its_test_module():
    """STYLE 5: one test module per claims file, so `pytest tests/claims` judges every claim."""
    files = {p.stem for p in (ROOT / "claims").glob("*.yaml")} - {"arms"}
    modules = {p.stem.removeprefix("test_") for p in (ROOT / "tests" / "claims").glob("test_*.py")}
    assert files == modules


@pytest.mark.parametrize(("fields", "needle"), [
    ({"kind": "property", "test": {"name": "pytest", "node": "tests/test_metrics.py::test_x",
                                   "shows": "proof"}}, "shows"),
    ({"kind": "instability_rate", "arm": "a", "rule": "pgd10_minus_square_v1",
      "values_from": "ours", "verbatim": None, "expected": {"k": 0, "n": 2},
      "test": {"name": "count_at_most", "k": -1}}, "k"),
])
def test_this_sessions_claim_fields_refuse_nonsense_in_one_line(tmp_path, fields, needle):
    bad = {k: v for k, v in {**claim("table_9.n", "property"), **fields}.items()
           if v is not None}
    folder = claims_folder(tmp_path, {"a": arm(seeds=2)}, [bad])
    result = runner.invoke(app, ["claims", "list", "--claims-dir", str(folder)])
    assert_one_line_error(result, "table_9.yaml", "table_9.n", needle)
