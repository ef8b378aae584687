"""The ``--plot`` PNG: hit ratio against cache size, and latency cached against uncached.

matplotlib is optional (the ``bench`` extra) and imported only here, only when asked.
The figure is drawn without pyplot, so no GUI backend or global state is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachekit.bench.config import BenchError
from cachekit.bench.report import Result
from cachekit.exceptions import missing_dependency

__all__ = ["check_plot_path", "require_matplotlib", "write_plot"]


def require_matplotlib() -> None:
    """Fail before the run, not after it, when ``--plot`` cannot be honoured.

    Raises:
        MissingDependencyError: naming the ``bench`` extra.
    """
    try:
        import matplotlib  # noqa: F401, PLC0415 - optional (the bench extra)
    except ImportError as exc:
        raise missing_dependency("matplotlib", "bench") from exc


def check_plot_path(path: Path) -> None:
    """Fail before the run, not after it, when matplotlib cannot write ``path``'s format.

    Raises:
        MissingDependencyError: matplotlib is not installed (naming the ``bench`` extra).
        BenchError: the extension names no format matplotlib writes.
    """
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415 - optional

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().removeprefix(".")
    if suffix not in formats:
        # Without an extension, savefig would write PATH.png: not the file asked for.
        why = f"matplotlib cannot write .{suffix} files" if suffix else "it has no extension"
        raise BenchError(
            f"cannot write the plot to {path}: {why}; supported formats: "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )


def write_plot(path: Path, title: str, results: Sequence[Result]) -> None:
    """Hit ratio against cache size per strategy (and eviction policy) with the
    optimum, and latency cached against uncached, side by side in one PNG."""
    require_matplotlib()
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional (the bench extra)

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    hits, latency = figure.subplots(1, 2)
    _plot_hits(hits, results)
    _plot_latency(latency, results)
    figure.suptitle(title)
    try:
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise BenchError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _series(result: Result, policies: bool) -> str:
    """A run's legend entry: the strategy, and the policy when several are compared."""
    return f"{result.strategy}, {result.eviction}" if policies else result.strategy


def _plot_hits(ax: Any, results: Sequence[Result]) -> None:
    """One solid line per strategy (and eviction policy, when several ran), and its
    optimum dashed in the same colour (series with the same optimum, such as one
    strategy's policies, share one dashed line)."""
    policies = any(r.compared for r in results)
    optima: dict[tuple[tuple[float, float], ...], tuple[list[str], str]] = {}
    for series in dict.fromkeys(_series(r, policies) for r in results):
        runs = [r for r in results if _series(r, policies) == series]
        xs = [r.cache_size * 100 for r in runs]
        (line,) = ax.plot(xs, [r.replay.hit_ratio * 100 for r in runs], marker="o", label=series)
        curve = tuple((x, r.optimal_hit_ratio * 100) for x, r in zip(xs, runs, strict=True))
        strategies = optima.setdefault(curve, ([], line.get_color()))[0]
        if runs[0].strategy not in strategies:
            strategies.append(runs[0].strategy)
    for curve, (strategies, color) in optima.items():
        label = f"optimum (Belady), {' & '.join(strategies)}"
        ax.plot(*zip(*curve, strict=True), linestyle="--", color=color, label=label)
    sizes = sorted({r.cache_size * 100 for r in results})
    if sizes[-1] >= 10 * sizes[0]:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(sizes, [f"{size:g}%" for size in sizes])
    ax.set_xlabel("cache size (share of rows)")
    ax.set_ylabel("hit ratio (%)")
    ax.set_ylim(0, 100)
    ax.set_title("hit ratio against cache size")
    ax.legend(fontsize=8)


def _plot_latency(ax: Any, results: Sequence[Result]) -> None:
    policies = any(r.compared for r in results)
    labels = [f"{_series(r, policies)}\n{r.size_cell}" for r in results]
    positions = range(len(results))
    width = 0.4
    ax.bar(
        [p - width / 2 for p in positions],
        [r.replay.percentile(0.5) for r in results],
        width,
        label="p50 cached",
    )
    ax.bar(
        [p + width / 2 for p in positions],
        [r.replay.percentile(0.99) for r in results],
        width,
        label="p99 cached",
    )
    base = results[0].uncached
    ax.axhline(base.percentile(0.5), color="black", linestyle="--", label="p50 uncached")
    ax.axhline(base.percentile(0.99), color="black", linestyle=":", label="p99 uncached")
    ax.set_xticks(list(positions), labels, fontsize=7, rotation=90)
    ax.set_yscale("log")
    ax.set_ylabel("latency per request (ms)")
    ax.set_title("latency, cached against uncached")
    ax.legend(fontsize=8)
