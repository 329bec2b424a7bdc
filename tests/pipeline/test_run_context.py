"""RunContext.map: runtime.device decides whether per-item tasks may ask Ray for a GPU."""
from __future__ import annotations

import pytest

from pipeline.execution.run_context import RunContext
from stages.contract import RuntimeConfig


class RecordingMapper:
    def __init__(self):
        self.calls = []

    def map(self, fn, items, desc, gpu=False, on_result=None):
        self.calls.append(gpu)
        return [fn(item) for item in items]


class NoRun:
    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass


@pytest.mark.parametrize("device, asked, passed", [
    ("cpu", True, False),   # device cpu: no GPU task even where the stage would take one
    ("auto", True, True),
    ("cuda", True, True),
    ("cuda", False, False),  # a CPU-only map stays on CPUs whatever the device
])
def test_map_asks_for_a_gpu_only_when_the_device_allows(tmp_path, device, asked, passed):
    mapper = RecordingMapper()
    ctx = RunContext(workdir=tmp_path, runtime=RuntimeConfig(workdir=str(tmp_path), device=device),
                     run=NoRun(), mapper=mapper)
    assert ctx.map(lambda x: x * 2, [1, 2, 3], desc="double", gpu=asked) == [2, 4, 6]
    assert mapper.calls == [passed]
