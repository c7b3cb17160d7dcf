"""How judgements reach people and machines: rich tables, a Markdown report with FOSC
plots, and JUnit XML for CI dashboards."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trades_repro import store
from trades_repro.verify import Judgement

STYLE = {"held": "green", "failed": "bold red", "undetermined": "yellow",
         "incomplete": "cyan", "not run": "dim"}


def by_artefact(judgements: Iterable[Judgement]) -> dict[str, list[Judgement]]:
    groups: dict[str, list[Judgement]] = {}
    for judgement in judgements:
        groups.setdefault(judgement.artefact, []).append(judgement)
    return groups


def summary(judgements: list[Judgement]) -> str:
    counts = Counter(j.status for j in judgements)
    parts = [f"{counts[s]} {s}" for s in STYLE if counts[s]]
    return f"{len(judgements)} claims: " + ", ".join(parts)


def print_tables(console: Console, judgements: list[Judgement],
                 titles: dict[str, str]) -> None:
    """One rich table per paper artefact: claim, paper, ours, test, p, verdict."""
    for artefact, group in by_artefact(judgements).items():
        table = Table(title=titles.get(artefact, artefact), title_justify="left")
        for column in ("claim", "paper", "ours", "test", "p / stat", "verdict"):
            table.add_column(column, overflow="fold")
        for j in group:
            verdict = j.status + (" (partial)" if j.partial else "")
            cells = (j.id, j.paper, j.ours, j.test or j.detail, _numbers(j))  # data: escaped
            table.add_row(*map(escape, cells), f"[{STYLE[j.status]}]{verdict}[/]")
        console.print(table)
    console.print(summary(judgements), highlight=False)


def _numbers(j: Judgement) -> str:
    if j.p_value is not None:
        return f"p = {j.p_value:.3g}"
    if j.statistic is not None:
        return f"{j.statistic:+.4f}" if j.kind == "table_cell" else f"{j.statistic:.3g}"
    return ""


def write_markdown(path: Path, judgements: list[Judgement], titles: dict[str, str],
                   *, tier: str, runs_dir: Path) -> None:
    """The verification report; event claims with evidence get a FOSC-vs-epoch PNG beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Verification report ({tier} tier)", "",
             f"Evidence: `{runs_dir}`. {summary(judgements)}.", ""]
    for artefact, group in by_artefact(judgements).items():
        lines += [f"## {titles.get(artefact, artefact)}", "",
                  "| claim | paper | ours | test | p / stat | verdict |",
                  "|---|---|---|---|---|---|"]
        lines += [_md_row(j) for j in group]
        lines.append("")
        for j in group:
            if j.status in ("failed", "undetermined", "incomplete") or j.partial:
                lines.append(f"- `{j.id}`: {_md(j.detail)}")
            if j.series:
                image = plot_fosc(path.parent / f"{path.stem}_{j.id}.png", j)
                lines += ["", f"![FOSC per epoch, {j.id}]({image.name})", ""]
            if j.steps:
                image = plot_steps(path.parent / f"{path.stem}_{j.id}_steps.png", j)
                lines += [f"![App. G per step at the first FOSC rise, {j.id}]({image.name})",
                          ""]
        lines.append("")
    store.atomic_write_bytes(path, "\n".join(lines).encode())


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_row(j: Judgement) -> str:
    verdict = j.status + (" (partial)" if j.partial else "")
    cells = (f"`{j.id}`", j.paper, j.ours, j.test or j.detail, _numbers(j), f"**{verdict}**")
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def plot_fosc(path: Path, judgement: Judgement) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, values in judgement.series.items():
        ax.plot(range(1, len(values) + 1), values, label=label, linewidth=1)
    if judgement.line is not None:
        ax.axhline(judgement.line[1], color="grey", linestyle="--", linewidth=1,
                   label=judgement.line[0])
    ax.set(xlabel="epoch", ylabel="validation FOSC", title=judgement.id)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="upper left")
    if judgement.sgcs:  # Fig. 2's view: SGCS on its own axis, dashed, same colours
        right = ax.twinx()
        for line, (label, values) in zip(ax.get_lines(), judgement.sgcs.items(), strict=False):
            right.plot(range(1, len(values) + 1), values, linestyle="--", linewidth=1,
                       color=line.get_color(), label=f"{label} SGCS")
        right.set_ylabel("validation SGCS (dashed)")
    return _save(fig, path)


STEP_PLOT_RUNS = 4  # rows of the Fig. 4 plot: the first runs judged


def plot_steps(path: Path, judgement: Judgement) -> Path:
    """Fig. 4's view: per run, App. G's three norms and the gradient cosine over the steps
    of the epoch it was judged at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(judgement.steps.items())[:STEP_PLOT_RUNS]
    fig, axes = plt.subplots(len(traces), 2, figsize=(9, 2.4 * len(traces)), squeeze=False)
    for (label, series), (norms, cosine) in zip(traces, axes, strict=True):
        for key, name in (("w_grad_norm", "W_grad_norm"), ("kl_norm", "KL_norm"),
                          ("ce_norm", "CE_norm")):
            norms.plot(series[key], label=name, linewidth=1)
        cosine.plot(series["grad_cosine_similarity"], color="black", linewidth=1)
        norms.set(title=label, xlabel="step in the epoch", ylabel="gradient norm")
        cosine.set(title=label, xlabel="step in the epoch", ylabel="grad cosine similarity")
        norms.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    store.atomic_write_bytes(path, png.getvalue())  # never a torn image beside the report
    return path


def write_junit(path: Path, judgements: list[Judgement], *, tier: str) -> None:
    """JUnit XML: failed → <failure>, not run / incomplete / undetermined → <skipped>."""
    counts = Counter(j.status for j in judgements)
    suite = ET.Element("testsuite", name=f"trades-repro claims ({tier})",
                       tests=str(len(judgements)), failures=str(counts["failed"]),
                       skipped=str(len(judgements) - counts["held"] - counts["failed"]))
    for j in judgements:
        case = ET.SubElement(suite, "testcase", classname=f"claims.{j.artefact}", name=j.id)
        if j.status == "failed":
            ET.SubElement(case, "failure", message=j.message())
        elif j.status != "held":
            ET.SubElement(case, "skipped", message=j.message())
    ET.indent(suite)
    store.atomic_write_bytes(path, ET.tostring(suite, encoding="utf-8", xml_declaration=True))
