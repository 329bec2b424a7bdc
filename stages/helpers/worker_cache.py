"""One value per worker process, rebuilt only when its key changes.

Ray reuses worker processes across tasks: a trained model, or a split's
candidates and ground truth, is loaded by the first task a worker runs and
kept for the next ones with the same key, instead of once per task. Only the
latest key is kept, so a worker never holds two models at once.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")

_SLOTS: dict[str, tuple[Hashable, Any]] = {}


def cached(slot: str, key: Hashable, build: Callable[[], T]) -> T:
    """`build()`'s value for `key`, built once per process; a new key in the same
    `slot` drops the old value first (to free its memory before building)."""
    held = _SLOTS.get(slot)
    if held is not None and held[0] == key:
        return held[1]
    _SLOTS.pop(slot, None)
    value = build()
    _SLOTS[slot] = (key, value)
    return value
