"""Writing matplotlib figures as PNG files the way every stage's plots/ needs them."""
from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure


def save_png(figure: Figure, path: Path, *, dpi: int = 100) -> Path:
    """Write `figure` to `path` as PNG atomically (tmp file, then rename), so a
    killed stage never leaves a half-written plot that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path
