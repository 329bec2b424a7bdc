"""Training checkpoints: every RNG of the process, atomic torch.save, and the
files of one training run (last.pt rolling, phase<i>_<name>.pt kept)."""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ion.atomic import atomic_path, fsync_dir, temporary_name
from ion.errors import UserError

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class CheckpointEvent:
    """Why a checkpoint is written: after `iteration` updates; `phase_end` when
    phase `phase_index` just finished (the file to keep as phase<i>_<name>.pt)."""

    iteration: int
    phase_index: int
    phase_name: str
    phase_end: bool



def capture_rng_state() -> dict[str, Any]:
    """Every RNG the process uses: python, numpy (global), torch CPU, CUDA (all devices)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, [int(k) for k in key], int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples getstate gave (a round trip may give lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def write_checkpoint(state: dict[str, Any], path: Path) -> Path:
    """torch.save `state` to `path` atomically (ion/atomic.py)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `write_checkpoint`, tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (check the path, e.g. a train.phases[i].init_from)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unpickling failure means an unreadable file)
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err}); "
                        "point to a checkpoints/*.pt or final.pt written by the train stage") from None


class CheckpointFiles:
    """Checkpoints in one directory: last.pt (rolling, every N iterations and at
    phase ends) and phase<i>_<name>.pt (kept, one per finished phase)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.directory / "last.pt"

    def phase_path(self, phase_index: int, phase_name: str) -> Path:
        return self.directory / f"phase{phase_index}_{phase_name}.pt"

    def latest(self) -> Optional[dict[str, Any]]:
        """The state in last.pt, or None when there is none yet."""
        return load_checkpoint(self.last) if self.last.is_file() else None

    def __call__(self, state: dict[str, Any], event: CheckpointEvent) -> str:
        if not event.phase_end:
            return str(write_checkpoint(state, self.last))
        kept = write_checkpoint(state, self.phase_path(event.phase_index, event.phase_name))
        # last.pt becomes a second name of the phase file: renaming over last.pt
        # later leaves the phase file's data alone.
        tmp = temporary_name(self.last)
        try:
            os.link(kept, tmp)
        except OSError:
            shutil.copyfile(kept, tmp)
        os.replace(tmp, self.last)
        fsync_dir(self.directory)
        return str(kept)
