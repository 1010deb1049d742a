"""The boot benchmark as a picture (matplotlib, Agg: no display needed).

Left: one stacked bar per configuration, the median time spent in each phase
(from the previous phase mark to this one). Right: the distribution of the
total boot time (start to the first command done), a box per configuration
with every run drawn on top as a point.

matplotlib is not a dependency of the runtime: it comes with the `bench`
extra (pip install 'microvm[bench]'). Without it, a command that would plot
fails with one MicroVMError naming the extra, before any benchmark runs.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from microvm.benchmarks.boot import TOTAL, VMM_PHASES, phase_increments
from microvm.benchmarks.report import Stats
from microvm.errors import MicroVMError

NO_MATPLOTLIB = "plotting needs matplotlib: pip install 'microvm[bench]'"


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display needed); a MicroVMError
    naming the extra to install when matplotlib is missing. Called first by a
    command that will plot, so it fails before the benchmark, not after it."""
    try:
        import matplotlib
    except ImportError as e:
        raise MicroVMError(NO_MATPLOTLIB) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def boot_figure(path: Path, summary: Mapping[str, Mapping[str, Stats]],
                runs: Sequence[Mapping[str, Any]], title: str = "microvm boot") -> Path:
    plt = pyplot()
    labels = list(summary)
    height = 3.0 + 0.45 * len(labels)
    fig, (bars, dist) = plt.subplots(1, 2, figsize=(14, height), sharey=True,
                                     gridspec_kw={"width_ratios": [3, 2]})
    colors = dict(zip(VMM_PHASES, plt.get_cmap("tab10")(range(len(VMM_PHASES))), strict=True))
    drawn: set[str] = set()
    for y, label in enumerate(labels):
        left = 0.0
        for phase, seconds in phase_increments(dict(summary[label])):
            bars.barh(y, seconds * 1e3, left=left, color=colors[phase],
                      label=phase if phase not in drawn else None)
            drawn.add(phase)
            left += seconds * 1e3
    bars.set_yticks(range(len(labels)), labels)
    bars.invert_yaxis()
    bars.set_xlabel("median ms since start, by phase")
    # Each segment is named by the mark it ends at.
    bars.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / height - 0.12), ncol=4, fontsize="small",
                title="phase (segment ends at this mark)", title_fontsize="small")
    bars.set_title("where the boot goes")

    totals = [[r[TOTAL] * 1e3 for r in runs if r["configuration"] == label and r.get(TOTAL) is not None]
              for label in labels]
    positions = [y for y, t in enumerate(totals) if t]
    dist.boxplot([t for t in totals if t], positions=positions, orientation="horizontal", widths=0.6,
                 showfliers=False, manage_ticks=False)
    jitter = random.Random(0)  # the same picture for the same data
    for y, t in enumerate(totals):
        dist.scatter(t, [y + jitter.uniform(-0.15, 0.15) for _ in t], s=10, alpha=0.6, color="black", zorder=3)
    dist.set_xlabel(f"ms from start to {TOTAL}, every run")
    dist.set_title("total boot time")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
