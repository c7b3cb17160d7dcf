"""Fabricated evidence for the judging tests: claims folders and run folders written by hand.

A run folder here has exactly what `verify` reads: `spec.json` (its digest is what counts),
`provenance.json` with a status, `metrics.jsonl` and an `eval.json` whose attack results are
chosen to make the masking rule fire or not.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from trades_repro.spec import ExperimentSpec

SPEC_DIR = Path(__file__).resolve().parents[1] / "spec"
N_EXAMPLES = 100
RATIONALE = "A rationale long enough to be a real sentence for the tests."


def claims_folder(root: Path, arms: dict, claims: list[dict], artefact: str = "table_9") -> Path:
    """A claims folder with `arms.yaml` (bases relative to the repository's spec/) and one
    claims file `artefact.yaml`."""
    folder = root / "claims"
    folder.mkdir(parents=True, exist_ok=True)
    for arm in arms.values():
        for tier in arm["tiers"].values():
            tier.setdefault("base", str(SPEC_DIR / "digits.yaml"))
    (folder / "arms.yaml").write_text(yaml.safe_dump({"arms": arms}, allow_unicode=True))
    (folder / f"{artefact}.yaml").write_text(yaml.safe_dump(
        {"artefact": artefact, "title": f"{artefact} (fabricated)", "claims": claims},
        allow_unicode=True))
    return folder


def arm(seeds: int = 10, **overrides) -> dict:
    return {"label": "fabricated arm", "tiers": {"full": {"set": overrides, "seeds": seeds}}}


def claim(claim_id: str, kind: str, **fields) -> dict:
    base = {"id": claim_id, "kind": kind, "source": {"artefact": claim_id.split(".")[0],
            "where": "cell"}, "statement": "fabricated", "verbatim": "x",
            "rationale": RATIONALE}
    if kind in ("instability_rate", "trend", "healing", "event"):
        base["rule"] = "pgd10_minus_square_v1"
    return {**base, **fields}


def own_count(claim_id: str, arm_name: str, k: int, n: int) -> dict:
    """A rate claim bounding our own count exactly (count_at_most k; values_from: ours): for
    tests of how evidence is found, where a rate test on one or two runs decides nothing."""
    base = claim(claim_id, "instability_rate", arm=arm_name, values_from="ours",
                 expected={"k": k, "n": n}, test={"name": "count_at_most", "k": k})
    base.pop("verbatim")
    return base


def write_run(runs: Path, spec: ExperimentSpec, *, pgd10: float = 0.40, square: float = 0.38,
              clean: float = 0.90, fosc: list[float] | None = None,
              gap: list[float] | None = None, folder: str | None = None,
              status: str = "finished", policy: str = "best_pgd10",
              drop: tuple[str, ...] = (), roughness: float | None = None,
              radius: float | None = None, batches: dict[int, dict] | None = None,
              attacks: dict[str, float] | None = None,
              sgcs: list[float] | None = None) -> Path:
    """One run's evidence; flagged by rule v1 iff pgd10 − square ≥ 0.08. `roughness` adds a
    landscape (over `radius`, default the spec's own); `batches` maps an epoch to App. G
    series (w_grad_norm, kl_norm, ce_norm, grad_cosine_similarity) for batches.jsonl;
    `attacks` adds more attacks' accuracies (AutoAttack's breakdown); `sgcs` is the SGCS per
    epoch (default 0.5 throughout)."""
    run = runs / (folder or spec.digest())
    run.mkdir(parents=True, exist_ok=True)
    (run / "spec.json").write_text(spec.model_dump_json())
    (run / "provenance.json").write_text(json.dumps({"status": status}))
    fosc = fosc or [0.01] * 5
    gap = gap or [0.3] * len(fosc)
    sgcs = sgcs or [0.5] * len(fosc)
    lines = [_epoch(i + 1, f, g, c)
             for i, (f, g, c) in enumerate(zip(fosc, gap, sgcs, strict=True))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    record = {"checkpoint": "best.safetensors", "sha256": "0" * 64, "policies": [policy],
              "key": "k" + spec.digest(), "settings": _settings(), "requested": ["pgd10",
              "square", "autoattack"], "clean": _attack("clean", clean),
              "attacks": {"pgd10": _attack("pgd10", pgd10),
                          "square": _attack("square", square),
                          "autoattack": _attack("autoattack", min(pgd10, square) - 0.01)},
              "complete": True}
    record["attacks"].update({k: _attack(k, v) for k, v in (attacks or {}).items()})
    record["attacks"] = {k: v for k, v in record["attacks"].items() if k not in drop}
    if roughness is not None:
        record["landscape"] = {"radius": spec.landscape().radius if radius is None else radius,
                               "steps": 21, "n_images": 1, "roughness": roughness,
                               "loss_min": 0.0, "loss_max": 1.0}
    if batches is not None:
        (run / "batches.jsonl").write_text("".join(
            json.dumps(line) + "\n" for epoch, series in batches.items()
            for line in _steps(epoch, series)))
    evals = {"source": str(run), "checkpoints": {record["key"]: record}}
    (run / "eval.json").write_text(json.dumps(evals))
    return run


def add_probe(run: Path, square_queries: int, square: float, *, extra: tuple[str, ...] = ()
              ) -> dict:
    """Add a record of the run's checkpoint made with another Square budget (its Square at
    `square`, plus copies of PGD-10 named `extra`); returns the run's own record."""
    evals = json.loads((run / "eval.json").read_text())
    (own,) = evals["checkpoints"].values()
    probe = json.loads(json.dumps(own))
    probe["key"], probe["settings"]["square_queries"] = f"probe{square_queries}", square_queries
    probe["attacks"]["square"] = _attack("square", square)
    for name in extra:
        probe["attacks"][name] = dict(probe["attacks"]["pgd10"], name=name)
    evals["checkpoints"][probe["key"]] = probe
    (run / "eval.json").write_text(json.dumps(evals))
    return own


def _steps(epoch: int, series: dict) -> list[dict]:
    n = len(series["w_grad_norm"])
    return [{"epoch": epoch, "step": i + 1, "loss": 1.0, "noised": False,
             **{key: float(values[i]) for key, values in series.items()}} for i in range(n)]


def _attack(name: str, accuracy: float) -> dict:
    k = round(accuracy * N_EXAMPLES)
    return {"name": name, "paper_column": name, "accuracy": k / N_EXAMPLES, "n_robust": k,
            "n_examples": N_EXAMPLES, "robust": "1" * k + "0" * (N_EXAMPLES - k), "seconds": 0}


def _settings() -> dict:
    return {"dataset": "digits", "n_examples": N_EXAMPLES, "eps": 0.1, "step_size": 0.025,
            "steps": 10, "random_start": True, "batch_size": 500, "seed": 0,
            "square_queries": 5000, "device": "cpu", "landscape": {}}


def _epoch(epoch: int, fosc: float, gap: float, sgcs: float) -> dict:
    return {"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_clean_acc": 0.5 + gap,
            "train_adv_acc": 0.5, "train_gap": gap, "val_source": "test",
            "val_clean_acc": 0.9, "val_pgd10_acc": 0.4, "val_fosc": fosc, "val_sgcs": sgcs,
            "fosc_ok": fosc <= 0.05, "best_pgd10": epoch == 1, "best_pgd10_fosc_ok": epoch == 1}
