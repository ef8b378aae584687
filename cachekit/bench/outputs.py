"""Where a run's results go (``--json``, ``--plot``), checked writable before it starts."""

from __future__ import annotations

import os
from pathlib import Path

from cachekit.bench.config import BenchError
from cachekit.bench.plot import check_plot_path

__all__ = ["check_outputs"]


def check_outputs(json_path: Path | None, plot_path: Path | None) -> None:
    """Fail before a long run, not after it, when its output cannot be written.

    Raises:
        BenchError: a path is a directory, or in a missing or read-only one, both
            options name the same file, or the plot's format is not one matplotlib
            writes.
        MissingDependencyError: ``--plot`` without matplotlib (naming the extra).
    """
    paths = [path for path in (json_path, plot_path) if path is not None]
    for path in paths:
        _check_writable(path)
    if len(paths) == 2 and paths[0].resolve() == paths[1].resolve():
        raise BenchError(f"--json and --plot both name {paths[0]}: one would overwrite the other")
    if plot_path is not None:
        check_plot_path(plot_path)


def _check_writable(path: Path) -> None:
    if not path.parent.is_dir():
        raise BenchError(f"cannot write {path}: {path.parent} is not a directory")
    if path.is_dir():
        raise BenchError(f"cannot write {path}: it is a directory")
    # An existing file must be writable itself; a new one needs a writable directory.
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise BenchError(f"cannot write {path}: permission denied on {target}")
