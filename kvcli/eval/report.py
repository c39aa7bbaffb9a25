"""What a sweep's rows say: aggregates, tables, and the files written beside results.jsonl.

    results.csv    every run, one line each (the attention error as its mean over layers)
    summary.json   the aggregates, for pipelines
    summary.md     the tables in Markdown, ready for a report
    plot.png       task score and top-1 agreement vs kept ratio per method;
                   question-aware solid, agnostic dashed, the full cache as a grey line

Each file is written under a temporary name and renamed, so no reader sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from kvcli.store.kvcfile import atomic_write
from kvcli.compress.methods import METHODS

GROUP = ("method", "ratio", "mode")
RATIO_ONE = "ratio 1 keeps the whole document: it is the full cache, the first row"
MEASURES = ("score", "agrees", "top1", "kl", "attention_error_mean", "kept_fraction")
# What identifies one run of a sweep (kvcli.eval.sweep writes rows with these fields).
KEY = ("task", "length", "method", "ratio", "mode", "seed", "sample")
CSV_FIELDS = [*KEY, "model", *MEASURES, "compressed", "document_tokens", "max_new_tokens", "seconds",
              "answer", "reference_answer", "expected", "fingerprint", "dtype"]


def _order(entry: dict) -> tuple:
    """Full cache first, then methods in registry order, larger ratios first, aware first."""
    method = entry["method"]
    return (METHODS.index(method) if method in METHODS else len(METHODS), -float(entry["ratio"]), entry["mode"] != "aware")


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


# Bootstrap resamples for the 95% intervals: 1000 keeps the interval ends stable to about a
# percent for the few hundred runs of a cell, in well under a second per table.
RESAMPLES = 1000
INTERVAL_MEASURES = ("score", "agrees", "top1")
SAMPLE = ("task", "length", "seed", "sample")


def bootstrap(pairs: list[tuple[float, float]], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile interval of sum(a) / sum(b) over (a, b) pairs resampled together.

    b = 1 gives the interval of a mean; b = the full cache's score on the same sample gives
    the interval of the score as a share of the full cache's (paired: one sample's two runs
    are drawn together)."""
    if not pairs:
        return None
    rng = random.Random(seed)
    n, stats = len(pairs), []
    for _ in range(resamples):
        drawn = [pairs[rng.randrange(n)] for _ in range(n)]
        total = sum(b for _, b in drawn)
        if total:
            stats.append(sum(a for a, _ in drawn) / total)
    if not stats:
        return None
    stats.sort()
    return stats[int(0.025 * (len(stats) - 1))], stats[int(0.975 * (len(stats) - 1))]


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (method, ratio, mode): runs, the mean of every measure, 95% bootstrap
    intervals (`<measure>_ci`) and the score as a share of the full cache's on the same samples."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP), []).append(row)
    full = {tuple(r[k] for k in SAMPLE): float(r["score"]) for r in rows if r["method"] == "full"}
    entries = []
    for key, members in groups.items():
        entry = {**dict(zip(GROUP, key)), "runs": len(members)}
        entry.update({m: _mean([r.get(m) for r in members]) for m in MEASURES})
        for m in INTERVAL_MEASURES:
            entry[f"{m}_ci"] = bootstrap([(float(r[m]), 1.0) for r in members if r.get(m) is not None])
        paired = [(float(r["score"]), full[s]) for r in members if (s := tuple(r[k] for k in SAMPLE)) in full]
        total = sum(b for _, b in paired)
        entry["of_full"] = sum(a for a, _ in paired) / total if total else None
        entry["of_full_ci"] = bootstrap(paired)
        entries.append(entry)
    return sorted(entries, key=_order)


def score_by(rows: list[dict], column: str) -> tuple[list, list[dict]]:
    """Mean score per (method, ratio, mode) and value of `column` (task or length)."""
    values = list(dict.fromkeys(row[column] for row in rows))
    groups: dict[tuple, dict] = {}
    for row in rows:
        entry = groups.setdefault(tuple(row[k] for k in GROUP), {**{k: row[k] for k in GROUP}, "scores": {}})
        entry["scores"].setdefault(str(row[column]), []).append(row["score"])
    entries = [{**e, "scores": {k: _mean(v) for k, v in e["scores"].items()}} for e in groups.values()]
    return values, sorted(entries, key=_order)


def summary(rows: list[dict]) -> dict:
    tasks, by_task = score_by(rows, "task")
    lengths, by_length = score_by(rows, "length")
    return {"runs": len(rows), "overall": aggregate(rows), "tasks": tasks, "by_task": by_task, "lengths": lengths, "by_length": by_length}


# ---- tables ---------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def _pct_ci(value: float | None, ci: tuple[float, float] | None) -> str:
    if value is None:
        return "-"
    return _pct(value) if ci is None else f"{100 * value:.0f} [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _shown(entries: list[dict]) -> list[dict]:
    """Rows worth a line: a method at ratio 1 keeps the whole document, so it is the full
    cache's row again (the files and the plot keep them)."""
    return [e for e in entries if e["method"] == "full" or float(e["ratio"]) < 1]


def tables(summary_: dict, style: box.Box = box.HEAVY_HEAD) -> list[Table]:
    """The overall table, then the score per task, then per length (when several)."""
    overall = Table(title="Score and fidelity to the full cache (means; %; [95% bootstrap interval])", caption=RATIO_ONE, box=style)
    for name, justify in [("method", "left"), ("ratio", "right"), ("mode", "left"), ("runs", "right"), ("score %", "right"),
                          ("% of full", "right"), ("same answer %", "right"), ("top-1 %", "right"), ("KL", "right"),
                          ("attn err", "right"), ("kept %", "right")]:
        overall.add_column(name, justify=justify)
    for e in _shown(summary_["overall"]):
        overall.add_row(e["method"], f"{e['ratio']:g}", e["mode"], str(e["runs"]), _pct_ci(e["score"], e.get("score_ci")),
                        _pct_ci(e.get("of_full"), e.get("of_full_ci")), _pct_ci(e["agrees"], e.get("agrees_ci")),
                        _pct_ci(e["top1"], e.get("top1_ci")), _num(e["kl"]), _num(e["attention_error_mean"]), _pct(e["kept_fraction"]))
    out = [overall, _score_table("Score % per task", summary_["tasks"], summary_["by_task"], style)]
    if len(summary_["lengths"]) > 1:
        out.append(_score_table("Score % per length (tokens)", summary_["lengths"], summary_["by_length"], style))
    return out


def _score_table(title: str, columns: list, entries: list[dict], style: box.Box) -> Table:
    table = Table(title=title, caption=RATIO_ONE, box=style)
    table.add_column("method")
    table.add_column("ratio", justify="right")
    table.add_column("mode")
    for column in columns:
        table.add_column(str(column), justify="right")
    for e in _shown(entries):
        table.add_row(e["method"], f"{e['ratio']:g}", e["mode"], *(_pct(e["scores"].get(str(c))) for c in columns))
    return table


def markdown(summary_: dict) -> str:
    """The tables as Markdown, each under its title in bold."""
    parts = []
    for table in tables(summary_, style=box.MARKDOWN):
        title, table.title, table.caption = table.title, None, None  # a Markdown table has neither
        console = Console(file=io.StringIO(), width=240, color_system=None)
        console.print(table)
        text = "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()).strip()
        parts.append(f"**{title}**\n\n{text}\n")
    return "\n".join(parts) + f"\n_{RATIO_ONE[0].upper() + RATIO_ONE[1:]}._\n"


# ---- files ----------------------------------------------------------------------------


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "expected": " | ".join(row.get("expected", []))})
    return out.getvalue()


def plot_png(summary_: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to bytes
    import matplotlib.pyplot as plt

    overall = summary_["overall"]
    full = next((e for e in overall if e["method"] == "full"), None)
    methods = list(dict.fromkeys(e["method"] for e in overall if e["method"] != "full"))
    colors = plt.get_cmap("tab10")
    figure, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for panel, (measure, label) in zip(axes, [("score", "task score (%)"), ("top1", "top-1 agreement with full cache (%)")]):
        for i, method in enumerate(methods):
            for mode, style in (("aware", "-"), ("agnostic", "--")):
                points = sorted((e["ratio"], e[measure]) for e in overall if e["method"] == method and e["mode"] == mode and e[measure] is not None)
                if points:
                    x, y = zip(*points)
                    panel.plot(x, [100 * v for v in y], style, marker="o", color=colors(i % 10), label=f"{method} ({mode})")
        if full is not None and full[measure] is not None:
            panel.axhline(100 * full[measure], color="grey", linestyle=":", label="full cache")
        panel.set_xscale("log")
        ratios = sorted({e["ratio"] for e in overall})
        panel.set_xticks(ratios, [f"{r:g}" for r in ratios])
        panel.minorticks_off()
        panel.set_xlabel("kept ratio of the document")
        panel.set_ylabel(label)
        panel.set_ylim(-3, 103)
        panel.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    rows = -(-len(labels) // 4)
    figure.tight_layout(rect=(0, 0.05 * rows, 1, 1))
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110)
    plt.close(figure)
    return out.getvalue()


def write_reports(directory: Path, rows: list[dict], title: str) -> dict:
    """Write results.csv, summary.json, summary.md and plot.png; returns the summary and their paths."""
    summary_ = summary(rows)
    files = {name: directory / name for name in ("results.csv", "summary.json", "summary.md", "plot.png")}
    atomic_write(files["results.csv"], csv_text(rows).encode())
    atomic_write(files["summary.json"], json.dumps(summary_, indent=1).encode())
    atomic_write(files["summary.md"], markdown(summary_).encode())
    atomic_write(files["plot.png"], plot_png(summary_, title))
    return {**summary_, "files": {name: str(path) for name, path in files.items()}}
