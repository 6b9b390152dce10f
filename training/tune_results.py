"""The outcome of a search: one row per trial, ranked, as tune_results.csv, a plot and the CLI's table."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from training.plots import load_metrics

FINISHED, STOPPED, FAILED = "finished", "stopped early", "failed"
EVALUATION = "evaluation"  # the ordinal of a trial's evaluation, in its Tune reports: ASHA's time attribute


@dataclass
class TrialRow:
    """One trial of the search, as tune_results.csv and the ranked table show it."""

    trial_id: str
    status: str
    params: dict
    final: float | None = None
    best: float | None = None
    iterations: int = 0
    steps: int = 0
    wall_time_s: float = 0.0
    error: str = ""
    curve: list = field(default_factory=list)  # (step, metric) at each evaluation


def format_params(params: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


def error_line(error) -> str:
    """The message of a trial's error: its last ``SomeError: message`` line (Ray wraps it in tracebacks)."""
    matches = re.findall(r"^\s*[\w.]*(?:Error|Exception)(?:\([\w.]+\))?: (.+)$", str(error), re.M)
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return matches[-1].strip() if matches else (lines[-1] if lines else "unknown error")


def collect_trials(results, metric: str, mode: str) -> list[TrialRow]:
    """Rows of tune_results.csv from Tune's ResultGrid and each trial's metrics.jsonl."""
    rows = []
    for res in results:
        trial_id = Path(res.path).name.removeprefix("trial_")
        last = res.metrics or {}
        if res.error is not None:
            status = FAILED
        else:
            status = FINISHED if last.get("final") else STOPPED
        curve = [(r["step"], r[metric]) for r in load_metrics(Path(res.path) / "metrics.jsonl") if metric in r]
        values = [v for _, v in curve if isinstance(v, (int, float)) and not math.isnan(v)]
        best = (min if mode == "min" else max)(values) if values else None
        rows.append(TrialRow(
            trial_id, status, dict(res.config or {}), final=last.get(metric), best=best,
            iterations=int(last.get(EVALUATION, 0)), steps=int(last.get("step", 0)),
            wall_time_s=round(float(last.get("time_total_s", 0.0)), 1),
            error=error_line(res.error) if res.error is not None else "", curve=curve))
    return rank_trials(rows, mode)


def rank_trials(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Finished trials first (the exported model is a finished trial's final weights), then stopped, then
    failed; within each by the final metric."""
    order = {FINISHED: 0, STOPPED: 1, FAILED: 2}
    sign = 1 if mode == "min" else -1

    def key(r: TrialRow):
        value = r.final if isinstance(r.final, (int, float)) and not math.isnan(r.final) else None
        return order[r.status], value is None, sign * value if value is not None else 0

    return sorted(rows, key=key)


def write_results_csv(rows: list[TrialRow], path: Path, metric: str) -> None:
    params = list(dict.fromkeys(k for r in rows for k in r.params))
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "trial_id", "status", *params, f"final_{metric}", f"best_{metric}", "iterations",
                      "steps", "wall_time_s", "error"])
        for rank, r in enumerate(rows, 1):
            out.writerow([rank, r.trial_id, r.status, *(r.params.get(k, "") for k in params),
                          "" if r.final is None else r.final, "" if r.best is None else r.best,
                          r.iterations, r.steps, r.wall_time_s, r.error])


def write_tune_plot(rows: list[TrialRow], out_dir: Path, metric: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {FINISHED: "-", STOPPED: "--", FAILED: ":"}
    for r in rows:
        if r.curve:
            ax.plot([s for s, _ in r.curve], [v for _, v in r.curve], styles[r.status], marker="o",
                    label=f"{r.trial_id} ({r.status})")
    ax.set_xlabel("optimizer step"), ax.set_ylabel(metric), ax.grid(alpha=0.3)
    ax.set_title(f"{metric} per trial (dashed: stopped early, dotted: failed)")
    if ax.lines:
        ax.legend(fontsize=7)
    path = out_dir / f"tune_{metric}.png"
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)
    return path


def format_ranked_table(rows: list[TrialRow], metric: str) -> str:
    params = list(dict.fromkeys(k for r in rows for k in r.params))
    short = [p.rsplit(".", 1)[-1] for p in params]
    head = ["rank", "trial", "status", *short, f"final {metric}", "best", "evals", "steps", "time"]
    cells = []
    for rank, r in enumerate(rows, 1):
        num = lambda v: "" if not isinstance(v, (int, float)) else f"{v:.4f}"  # noqa: E731
        vals = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r.params.get(p, "") for p in params)]
        cells.append([str(rank), r.trial_id, r.status, *vals, num(r.final), num(r.best), str(r.iterations),
                      str(r.steps), f"{r.wall_time_s:.0f}s"])
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *cells]]
    lines += [f"  {r.trial_id}: {r.error}" for r in rows if r.error]
    return "\n".join(lines)
