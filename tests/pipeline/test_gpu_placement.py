"""Placement of per-image work on a cluster with GPUs, tested with logical GPUs
(ray.init(num_gpus=2) on a CPU machine): a map that may use GPUs runs one
worker per GPU that loads its model once; every other task, and every task of
a `runtime.device: cpu` run, sees no GPU."""
from __future__ import annotations

import gc
import time
import weakref
from collections import Counter

import pytest
import ray

from pipeline.cluster.tasks import Cluster, MapItemError, _gpu_actor_cpus, local_resources, ray_map, worker_env
from pipeline.execution.run_context import RunContext
from stages.contract import RuntimeConfig
from tests.pipeline import fake_stages, gpu_probe

TRACKING_URI = "sqlite:////tmp/ion-test-tracking.db"  # only passed to workers, never opened


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """A local Ray instance with two logical GPUs and two CPUs."""
    workdir = tmp_path_factory.mktemp("gpu-work")
    runtime = RuntimeConfig(workdir=str(workdir), num_workers=2)
    assert not ray.is_initialized()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env(runtime, TRACKING_URI)})
    yield runtime
    ray.shutdown()


class NoRun:
    def log_metrics(self, metrics, step=None):
        pass


def test_a_cpu_map_sees_no_gpu(gpu_cluster):
    seen = ray_map(gpu_probe.placement, ["model-a"] * 3, desc="cpu tasks")
    for task in seen:
        assert task["visible"] == "" and task["gpu_ids"] == [] and task["gpus_held"] == 0.0
        assert task["device"] == "cpu"


def test_a_gpu_map_holds_one_gpu_per_worker_and_loads_the_model_once_each(gpu_cluster):
    seen = ray_map(gpu_probe.placement, ["model-b"] * 8, desc="gpu tasks", gpu=True)
    for task in seen:
        assert task["gpus_held"] == 1.0 and task["gpu_ids"] == [task["visible"]]
        assert task["device"] == "cuda"
    workers = {task["pid"]: task["visible"] for task in seen}
    assert sorted(workers.values()) == ["0", "1"]  # both GPUs, one worker each
    loads = Counter(task["pid"] for task in seen if task["loaded"])
    assert loads == Counter({pid: 1 for pid in workers})  # 2 loads for 8 items, not 8
    assert _gpus_freed()  # the workers are gone at the map's end: the next stage gets the GPUs


def test_a_gpu_map_hands_each_result_over_and_keeps_none(gpu_cluster):
    """on_result on the GPU actors' path: each result gone by the time the next is handed over."""
    handed: list[weakref.ref] = []

    def consume(index, result):
        gc.collect()
        assert [ref() for ref in handed] == [None] * len(handed)
        handed.append(weakref.ref(result))
        return result.index

    assert ray_map(fake_stages.payload, range(6), desc="gpu payloads", gpu=True, on_result=consume) == list(range(6))
    assert len(handed) == 6
    assert _gpus_freed()


def _gpus_freed() -> bool:
    """Ray returns a killed actor's GPU asynchronously: wait for it (up to a minute)."""
    for _ in range(600):
        if ray.available_resources().get("GPU", 0.0) == 2.0:
            return True
        time.sleep(0.1)
    return False


def test_gpu_workers_share_the_cpus_when_there_are_more_gpus(gpu_cluster):
    # A local instance has runtime.num_workers CPUs: 2 here, against 2 or 4 GPU workers.
    assert _gpu_actor_cpus(2) == 1.0 and _gpu_actor_cpus(4) == 0.5


def test_a_failing_item_on_the_gpu_workers_names_the_item(gpu_cluster):
    with pytest.raises(MapItemError) as err:
        ray_map(gpu_probe.fail_on_three, range(6), desc="checking", gpu=True)
    assert str(err.value) == "checking: item 3 (3) failed: ValueError: bad item 3"


def test_device_cpu_keeps_gpu_maps_off_the_gpus(gpu_cluster, tmp_path):
    cpu_run = RuntimeConfig(workdir=str(tmp_path), device="cpu")
    for mapper in (Cluster(cpu_run, tracking_uri=TRACKING_URI),  # predict's path
                   RunContext(workdir=tmp_path, runtime=cpu_run, run=NoRun(),
                              mapper=Cluster(gpu_cluster, tracking_uri=TRACKING_URI))):  # a stage's
        (task,) = mapper.map(gpu_probe.placement, ["model-d"], desc="device cpu", gpu=True)
        assert task["visible"] == "" and task["gpus_held"] == 0.0 and task["device"] == "cpu"
    auto = Cluster(RuntimeConfig(workdir=str(tmp_path), device="auto"), tracking_uri=TRACKING_URI)
    (task,) = auto.map(gpu_probe.placement, ["model-e"], desc="device auto", gpu=True)  # one item: one worker
    assert task["gpus_held"] == 1.0 and task["device"] == "cuda" and task["loaded"] == 1


def test_a_device_cpu_run_gives_its_workers_and_its_local_ray_no_gpu(tmp_path):
    cpu_run = RuntimeConfig(workdir=str(tmp_path), device="cpu", num_workers=3)
    assert worker_env(cpu_run, TRACKING_URI)["CUDA_VISIBLE_DEVICES"] == ""
    assert local_resources(cpu_run) == {"num_cpus": 3, "num_gpus": 0}
    auto = RuntimeConfig(workdir=str(tmp_path), device="auto", num_workers=3)
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(auto, TRACKING_URI)
    assert local_resources(auto) == {"num_cpus": 3, "num_gpus": None}  # Ray counts the machine's GPUs


def test_predict_asks_its_cluster_for_gpus(tmp_path):
    from pipeline.commands.predict import _stream
    from pipeline.commands.predict_images import predict_task

    class Recording:
        calls = []

        def map(self, fn, items, desc, gpu=False):
            self.calls.append((fn, list(items), gpu))
            return [[] for _ in items]

    image = tmp_path / "a.jpg"
    image.write_bytes(b"not decoded here")
    cluster = Recording()
    out = tmp_path / "out"
    assert _stream([(image, "a")], "the predictor", 0.5, cluster, out, chunk=8) == (0, [])
    [(fn, tasks, gpu)] = cluster.calls
    assert (fn, gpu) == (predict_task, True)  # Cluster.map applies runtime.device
    assert [t.images[0][1:] for t in tasks] == [(str(image), b"not decoded here")]  # bytes travel with the task
