"""From samples to what a reader sees: statistics, rich tables, JSON and CSV.

Every benchmark keeps its raw samples (one record per run) and writes them
whole, so a number in a table can always be traced back to the runs behind it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@dataclass(frozen=True)
class Stats:
    n: int
    median: float
    p90: float
    min: float
    max: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> Stats:
    v = list(values)
    return Stats(n=len(v), median=percentile(v, 50), p90=percentile(v, 90), min=min(v), max=max(v))


def summarize_metrics(records: Iterable[Mapping[str, float | None]], order: Sequence[str]) -> dict[str, Stats]:
    """Stats per metric over records (metric -> value); a metric absent or None
    in a record is left out of that metric's sample, and metrics no record has
    are left out."""
    samples: dict[str, list[float]] = {k: [] for k in order}
    for rec in records:
        for k in order:
            value = rec.get(k)
            if value is not None:
                samples[k].append(value)
    return {k: summarize(v) for k, v in samples.items() if v}


def stats_table(title: str, groups: Mapping[str, Mapping[str, Stats]], *, scale: float = 1e3,
                unit: str = "ms", group_header: str = "configuration", metric_header: str = "phase") -> Table:
    """One row per (group, metric), a section per group: median, p90, min, max, n."""
    table = Table(title=title)
    table.add_column(group_header)
    table.add_column(metric_header)
    for col in ("median", "p90", "min", "max"):
        table.add_column(f"{col} {unit}", justify="right")
    table.add_column("n", justify="right")
    for group, metrics in groups.items():
        for i, (metric, s) in enumerate(metrics.items()):
            cells = [f"{x * scale:.1f}" for x in (s.median, s.p90, s.min, s.max)]
            table.add_row(group if i == 0 else "", metric, *cells, str(s.n), end_section=i == len(metrics) - 1)
    return table


def compare(samples: Mapping[str, Mapping[str, Sequence[float]]], metrics: Sequence[str],
            ratios: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Sides side by side (microvm and QEMU, or variants of one loop): from
    samples (side -> metric -> values) the JSON-ready record of an A/B run:
    runs per side, the samples, their summary and, per pair (a, b) in ratios,
    the ratio of medians a / b per metric (None where a side lacks it; no
    entry for a pair with a side that has no samples at all)."""
    summary = {side: {m: summarize(per[m]) for m in metrics if per.get(m)} for side, per in samples.items()}

    def ratio(a: str, b: str, m: str) -> float | None:
        if m not in summary.get(a, {}) or m not in summary.get(b, {}) or not summary[b][m].median:
            return None
        return summary[a][m].median / summary[b][m].median

    return {"runs": {side: max((st.n for st in per.values()), default=0) for side, per in summary.items()},
            "samples": {side: dict(per) for side, per in samples.items()}, "summary": summary,
            "ratio": {f"{a} / {b}": {m: ratio(a, b, m) for m in metrics} for a, b in ratios
                      if a in summary and b in summary}}


def compare_table(title: str, metrics: Mapping[str, tuple[str, str]], result: Mapping[str, Any]) -> Table:
    """compare()'s result as a table: a row per metric (name -> (label,
    unit)) with each side's median (min-max) and the ratios of medians."""
    from microvm.lane import in_lane

    summary: Mapping[str, Mapping[str, Stats]] = result["summary"]
    runs = ", ".join(f"{n} {side}" for side, n in result["runs"].items())
    table = rows_table(f"{title}: median (min-max) of {runs} runs, {'lane' if in_lane() else 'host'}",
                       ["metric", "unit", *summary, *result["ratio"]], [])
    for m, (label, unit) in metrics.items():
        cells = [f"{_number(st.median)} ({_number(st.min)}-{_number(st.max)})" if (st := per.get(m)) else "-"
                 for per in summary.values()]
        ratios = [f"{r:.2f}" if (r := per_metric[m]) is not None else "-" for per_metric in result["ratio"].values()]
        table.add_row(label, unit, *cells, *ratios)
    return table


def rows_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A plain table; the first column left-aligned, numbers right-aligned."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(c) for c in row))
    return table


def _number(x: float) -> str:
    """Four significant digits, but no exponent for thousands (IOPS, ns, trans/s)."""
    return f"{x:.0f}" if 1e3 <= abs(x) < 1e9 else f"{x:.4g}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return "-" if value is None else str(value)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Stats):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """One row per record; the columns are every key seen, in first-seen order."""
    columns: dict[str, None] = {}
    for rec in records:
        columns.update(dict.fromkeys(rec))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(records)
    return path


def console() -> Console:
    """stdout; wide enough for the tables even where it is no terminal (a log, the lane)."""
    from microvm.lane import in_lane

    out = Console()  # the lane's serial console is a terminal of unknown size: rich assumes 80 columns
    return out if out.is_terminal and not in_lane() else Console(width=max(out.width, 140), height=50)


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Any]:
    """A progress bar on stderr; yields advance(text=None). Where stderr is no
    terminal (a log, the lane's serial console) each step is a line instead,
    so a long run still shows signs of life."""
    err = Console(stderr=True)
    if not err.is_interactive:
        done = 0

        def log(text: str | None = None) -> None:
            nonlocal done
            done += 1
            err.print(f"{description}: {done}/{total}" + (f" {text}" if text else ""), highlight=False, soft_wrap=True)

        yield log
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[text]}"), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(description, total=total, text="")

        def advance(text: str | None = None) -> None:
            bar.update(task, advance=1, text=text or "")

        yield advance
