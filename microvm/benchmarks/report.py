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


def rows_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A plain table; the first column left-aligned, numbers right-aligned."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(c) for c in row))
    return table


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
            err.print(f"{description}: {done}/{total}" + (f" {text}" if text else ""), highlight=False)

        yield log
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[text]}"), TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(description, total=total, text="")

        def advance(text: str | None = None) -> None:
            bar.update(task, advance=1, text=text or "")

        yield advance
