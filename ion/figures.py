"""Writing matplotlib figures as PNG files the way every stage's plots/ needs them."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ion.atomic import atomic_path


def save_png(figure: Figure, path: Path, *, dpi: int = 100) -> Path:
    """Write `figure` to `path` as PNG atomically (ion/atomic.py), so a
    killed stage never leaves a half-written plot that looks finished."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
