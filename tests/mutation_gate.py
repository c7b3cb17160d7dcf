"""Mutation testing, run per group of modules against the tests that own them.

    python tests/mutation_gate.py                  # CI's gate (the quick subset) vs
                                                   # docs/mutation_quick.json
    python tests/mutation_gate.py --full           # every core module vs docs/mutation_full.json
    python tests/mutation_gate.py --full --group evaluate --keep /tmp/mut
                                                   # one group; /tmp/mut/evaluate keeps mutants/
                                                   # for `mutmut show <name>` there
    ... --record                                   # write the baseline (after killing or
                                                   # explaining survivors, docs/testing.md)

Each group runs mutmut in its own copy of the working tree (tracked and untracked, not ignored
files) with its own `only_mutate` and test selection, so `mutants/` never lands in the
checkout and a module's mutants never run the slow end-to-end tests another module needs
(mutmut runs, per mutant, the selected tests that cover the mutated function, and knows
only one selection per run). Exit 1 when any module's kill rate falls below its recorded
rate (a test stopped catching something, or new code arrived without tests), 0 otherwise,
4 when it could not measure. A timeout counts as killed: the mutant made the tests hang or
crawl, which the suite noticed.

Not collected by pytest (no `test_` prefix): `nox -s mutation` and `nox -s mutation_quick`
run it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trades_repro import store

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

DETECTED = {1, 3, 24, -24, 36, 37, 152, 255, -9, -11}  # killed, timeout, type check, crash
OWN_FAILURE = 4  # the project's exit code for "our own failure": never 0 or 1


@dataclass(frozen=True)
class Group:
    """One mutmut run: the mutants of `modules` (those matching `mutants`, or all of them)
    against the `tests` that own them."""

    name: str
    modules: tuple[str, ...]
    tests: tuple[str, ...]
    mutants: tuple[str, ...] = ()


def _src(*names: str) -> tuple[str, ...]:
    return tuple(f"trades_repro/{name}.py" for name in names)


def _nodes(path: str, *names: str) -> tuple[str, ...]:
    return tuple(f"tests/{path}::{name}" for name in names)


# test_eval_tf32.py but its check of the committed evidence, which mutmut's copy lacks
TF32_TESTS = _nodes("test_eval_tf32.py",
                    "test_tf32_false_keeps_the_key_of_settings_written_without_the_field",
                    "test_tf32_true_gives_another_key",
                    "test_evaluate_model_sets_tf32_inside_only_when_asked_and_restores",
                    "test_the_checklist_follows_the_settings_tf32",
                    "test_made_with_refuses_a_tf32_record",
                    "test_verify_takes_the_fp32_record_even_where_the_tf32_one_has_more",
                    "test_evaluate_tf32_writes_a_record_of_its_own_that_run_claim_ignores",
                    "test_diagnose_tf32_and_without_make_two_records",
                    "test_the_library_entry_points_default_to_the_pinned_fp32")
POLICY_TESTS = _nodes("test_engine.py", "test_policies_on_a_crafted_series",
                      "test_policies_pick_the_first_maximum_among_eligible_epochs",
                      "test_fosc_ok_is_at_most_the_threshold")
MATH_TESTS = ("tests/test_metrics.py", "tests/test_losses.py", *POLICY_TESTS)

# CI's gate: the core math, and of train.py only the validation monitor and Algorithm 1's
# trigger (the loop's mutants need end-to-end training tests, minutes each).
QUICK = (
    Group("quick", _src("metrics", "losses", "policies", "train"),
          (*MATH_TESTS, "tests/test_validation_pinned.py"),
          ("trades_repro.metrics.*", "trades_repro.losses.*", "trades_repro.policies.*",
           "trades_repro.train.x_validate__mutmut_*", "trades_repro.train.x__validate_batch__*",
           "trades_repro.train.x__healing_trigger__*")),
)

# cli.py: the helpers that hold its decisions. Typer commands are decorated, so mutmut never
# mutates them; their options are pinned in tests/test_defaults_pinned.py instead.
CLI_HELPERS = (*(f"trades_repro.cli.x__{name}__*" for name in (
    "fail", "traceback_log", "set_threads", "progress", "print_record", "exit_if_failed",
    "folder_option", "file_option", "blocked", "readers_gone", "stop_quietly", "reflowed",
    "exit_on_verdicts")),
    *(f"trades_repro.cli_claims.x__{name}__*" for name in ("tier", "exit_for")))

# AutoAttack runs on frozen weights (attacks.frozen_weights, used by evaluate's runners)
FROZEN_AA_TEST = _nodes("test_evaluate.py",
                        "test_autoattack_runs_on_frozen_weights_with_the_unfrozen_results")
# real pyautoattack's progress lines reach the reporter (the fakes of test_mut_evaluate log none)
AA_PROGRESS_TEST = _nodes("test_evaluate.py",
                          "test_autoattack_reports_each_batch_and_each_cascade_stage_as_progress")

FULL = (
    Group("core_math", _src("metrics", "losses", "policies"), MATH_TESTS),
    Group("attacks", _src("attacks"), ("tests/test_attacks.py", "tests/test_mut_attacks.py",
                                       *FROZEN_AA_TEST)),
    Group("steps", _src("steps"), (
        "tests/test_mut_steps.py",
        *_nodes("test_engine.py", "test_monitoring_a_step_does_not_change_it",
                "test_after_step_gradient_leaves_batchnorm_statistics_alone",
                "test_two_forwards_give_official_loss_gradient_and_batchnorm_buffers",
                "test_clean_stats_repeat_refuses_cumulative_batchnorm_and_a_missing_clean_forward",
                "test_init_projected_reaches_tpgd",
                "test_train_step_returns_device_tensors_and_the_engine_uses_foreach_sgd"))),
    Group("awp", _src("awp"), ("tests/test_awp.py", "tests/test_mut_awp.py")),
    Group("train", _src("train"), (
        "tests/test_validation_pinned.py", "tests/test_mut_train.py",
        *_nodes("test_train.py", "test_same_seed_gives_bit_identical_metrics",
                "test_monitor_off_records_none"),
        *_nodes("test_engine.py", "test_each_variant_trains_two_epochs_with_full_records",
                "test_lr_schedules"))),
    Group("evaluate", _src("evaluate"), (
        "tests/test_mut_evaluate.py", "tests/test_verdict.py", "tests/test_defaults_pinned.py",
        *TF32_TESTS, *FROZEN_AA_TEST, *AA_PROGRESS_TEST)),
    Group("verdict", _src("verdict"), (
        "tests/test_verdict.py", "tests/test_mut_evaluate.py",
        *_nodes("test_evaluate.py", "test_primary_rule_flags_a_gap_of_eight_points_or_more",
                "test_rules_live_in_one_table_and_name_their_attack",
                "test_verdict_line_says_what_happened"))),
    Group("diagnose", _src("diagnose"), (
        "tests/test_mut_diagnose.py", "tests/test_defaults_pinned.py", "tests/test_exit_codes.py",
        "tests/test_corrupt_files.py", "tests/test_diagnose_inputs.py", *TF32_TESTS)),
    Group("spec", _src("spec", "sweep"), (
        "tests/test_spec.py", "tests/test_sweep.py", "tests/test_cli.py",
        "tests/test_defaults_pinned.py", "tests/test_input_validation.py")),
    Group("yamlio", _src("yamlio"), ("tests/test_yamlio.py", "tests/test_input_validation.py")),
    Group("cli", _src("cli", "cli_claims"), (
        "tests/test_mut_diagnose.py", "tests/test_defaults_pinned.py", "tests/test_cli.py",
        "tests/test_exit_codes.py"), CLI_HELPERS),
    # The claims and verification code: what decides whether a paper claim held.
    Group("judges", _src("judges"), ("tests/test_mut_judges.py", "tests/test_verify.py",
                                     "tests/test_stats_audit.py")),
    Group("verify", _src("verify"), (
        "tests/test_mut_verify.py", "tests/test_verify.py", "tests/test_corrupt_evidence.py")),
    Group("claims", _src("claims", "claimkinds"), (
        "tests/test_mut_claims.py", "tests/test_claims.py", "tests/test_verify.py")),
    Group("runclaim", _src("runclaim"), (
        "tests/test_mut_runclaim.py", "tests/test_verify.py", "tests/test_claims.py",
        "tests/test_needs_gpu.py",
        # the running/queued states (not the files' process-spawning tests: under mutmut
        # they leave the mutants unchecked)
        *_nodes("test_scaleout_audit.py", "test_a_run_another_launch_holds_is_running_not_to_train",
                "test_a_slurm_relaunch_submits_only_what_is_neither_held_nor_queued",
                "test_waiting_for_slurm_needs_no_gpu_on_the_login_node",
                "test_a_launch_whose_runs_are_all_held_says_so_and_starts_nothing",
                "test_a_file_where_a_run_folder_belongs_is_named_not_a_crash"),
        *_nodes("test_executors.py", "test_a_run_held_elsewhere_is_left_to_its_holder"),
        *_nodes("test_run_claim.py", "test_an_unexpected_error_in_a_run_exits_4_not_1"))),
    # The gradient-masking checklist (`diagnose --checklist`), but its slow CLI test
    Group("checklist", _src("checklist"), (
        "tests/test_mut_checklist.py",
        *_nodes("test_checklist.py",
                "test_the_checklist_runs_in_evaluation_batches_under_the_evaluation_numerics",
                "test_the_checklist_running_out_of_gpu_memory_names_the_eval_batch_option",
                "test_a_regular_model_passes_every_item_it_can_check",
                "test_saturated_logits_fail_the_margin_loss_and_eps_sweep_items",
                "test_every_attack_item_of_the_checklist_attacks",
                "test_restarts_and_the_sweep_attack_only_images_that_can_still_count"),
        *_nodes("test_eval_tf32.py", "test_the_checklist_follows_the_settings_tf32"))),
    Group("landscape", _src("landscape"), ("tests/test_landscape.py",
                                           "tests/test_mut_landscape.py")),
    Group("preflight", _src("preflight"), (
        "tests/test_preflight.py", "tests/test_mut_preflight.py", "tests/test_diagnose_inputs.py",
        *AA_PROGRESS_TEST)),
)

SUITES = {"quick": (QUICK, DOCS / "mutation_quick.json"),
          "full": (FULL, DOCS / "mutation_full.json")}


class GateError(RuntimeError):
    """The gate could not measure (mutmut did not run, config missing): exit 4, not 1."""


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)  # bad input: argparse's one line, exit 2
    try:
        return _gate(args)
    except GateError as err:
        print(f"mutation gate: {err}", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - never 0 or 1 for a run we could not finish
        print(f"mutation gate: {type(err).__name__}: {err}", file=sys.stderr)
    return OWN_FAILURE


def _gate(args: argparse.Namespace) -> int:
    groups, baseline = SUITES["full" if args.full else "quick"]
    if args.group:
        groups = tuple(g for g in groups if g.name in args.group)
    if not args.record and not baseline.is_file():
        raise GateError(f"no recorded kill rates in {baseline.name}: run it with --record first")
    started = time.monotonic()
    rates, minutes = {}, {}
    with tempfile.TemporaryDirectory(prefix="mutation-gate-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        for group in groups:
            group_started = time.monotonic()
            print(f"{group.name}: mutating {', '.join(group.modules)} ...", flush=True)
            rates |= _run(group, work / group.name, args.children)
            minutes[group.name] = round((time.monotonic() - group_started) / 60, 1)
    total = (time.monotonic() - started) / 60
    _print(rates, minutes, total)
    if args.record:
        _record(baseline, rates, minutes, total, partial=bool(args.group))
        return 0
    return _compare(rates, json.loads(baseline.read_text())["modules"], partial=bool(args.group))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="every core module (default: CI's quick subset)")
    parser.add_argument("--group", action="append", default=[], choices=[g.name for g in FULL],
                        help="with --full, only this group (repeatable)")
    parser.add_argument("--keep", metavar="DIR",
                        help="run in DIR/<group> and keep it (mutmut show/browse there)")
    parser.add_argument("--record", action="store_true", help="write the baseline")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1,
                        help="mutants tested side by side (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.children < 1:
        parser.error(f"--children {args.children}: must be at least 1")
    if args.group and not args.full:
        parser.error("--group picks groups of the full run: add --full")
    return args


def _run(group: Group, copy: Path, children: int) -> dict[str, dict]:
    shutil.rmtree(copy, ignore_errors=True)  # mutmut reuses stale results in a kept folder
    _copy_tree(ROOT, copy)
    _configure(copy / "pyproject.toml", group)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["mutmut", "run", "--max-children", str(children), *group.mutants],
                   cwd=copy, env=env, check=False, stdout=subprocess.DEVNULL)
    # mutmut's exit status does not say whether mutants survived: the meta files do
    return _rates(copy, group)


def _copy_tree(root: Path, target: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=root, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = root / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _configure(pyproject: Path, group: Group) -> None:
    """The group's modules and tests in place of pyproject's `only_mutate` and selection."""
    text = pyproject.read_text()
    for key, value in (("only_mutate", group.modules),
                       ("pytest_add_cli_args_test_selection", group.tests)):
        text, found = re.subn(rf"^{key} = \[.*?\]$", f"{key} = {json.dumps(list(value))}",
                              text, count=1, flags=re.M | re.S)
        if not found:
            raise GateError(f"no {key} in [tool.mutmut] of {pyproject.name}")
    pyproject.write_text(text)


def _rates(copy: Path, group: Group) -> dict[str, dict]:
    """Per module, of the mutants the group selects: how many were detected, of how many."""
    rates = {}
    for module in group.modules:
        meta = copy / "mutants" / f"{module}.meta"
        if not meta.is_file():
            raise GateError(f"mutmut wrote no results for {module} (did it run?)")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        chosen = {k: v for k, v in codes.items()
                  if not group.mutants or any(fnmatch.fnmatch(k, p) for p in group.mutants)}
        if any(code is None for code in chosen.values()):
            raise GateError(f"mutmut left mutants of {module} unchecked")
        rates[module] = {"mutants": len(chosen),
                         "killed": sum(code in DETECTED for code in chosen.values()),
                         "survived": sorted(k for k, v in chosen.items() if v not in DETECTED)}
    return rates


def _print(rates: dict, minutes: dict, total: float) -> None:
    print(f"mutation gate ({total:.1f} min; per group: "
          + ", ".join(f"{name} {m} min" for name, m in minutes.items()) + "):")
    for module, r in rates.items():
        print(f"  {module}: {r['killed']}/{r['mutants']} killed ({_rate(r):.1%})")
        for name in r["survived"]:
            print(f"    survived: {name}  (mutmut show {name})")


def _rate(record: dict) -> float:
    return record["killed"] / record["mutants"] if record["mutants"] else 1.0


def _record(baseline: Path, rates: dict, minutes: dict, total: float, partial: bool) -> None:
    """Write the baseline; a run of some groups updates only their modules and times."""
    record = {"modules": {}, "group_minutes": {}}
    if partial and baseline.is_file():
        record |= json.loads(baseline.read_text())
    record["modules"] = record.get("modules", {}) | rates
    record["group_minutes"] = record.get("group_minutes", {}) | minutes
    record["minutes"] = round(sum(record["group_minutes"].values()) if partial else total, 1)
    store.atomic_write_bytes(baseline, (json.dumps(record, indent=2) + "\n").encode())
    print(f"recorded {baseline.relative_to(ROOT)}")


def _compare(rates: dict, baseline: dict, partial: bool = False) -> int:
    """1 when a module's kill rate fell below the recorded one, or a recorded module was not
    tested (a run of some groups, `partial`, answers only for the modules it ran)."""
    worse = [f"{m}: {_rate(r):.1%} < recorded {_rate(baseline[m]):.1%}"
             for m, r in rates.items() if m in baseline and _rate(r) < _rate(baseline[m])]
    missing = [m for m in baseline
               if not rates.get(m, {}).get("mutants") and (m in rates or not partial)]
    for line in worse + [f"{m}: no mutants tested" for m in missing]:
        print(f"mutation gate FAILED: {line}", file=sys.stderr)
    return 1 if worse or missing else 0


if __name__ == "__main__":
    sys.exit(main())
