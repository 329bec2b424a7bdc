"""The Ray adapter: one local Ray instance for the whole module (starting one takes seconds)."""
from __future__ import annotations

import gc
import json
import socket
import weakref
from pathlib import Path

import pytest

from ion.errors import UserError
from pipeline.cluster.tasks import (
    Cluster,
    MapItemError,
    check_reachable,
    cluster_gpus,
    init_ray,
    ray_map,
    shutdown_ray,
    tracking_problem,
)
from pipeline.graph import build_graph, select_stages
from pipeline.runner import run_stages
from pipeline.tracking.client import Tracker, tracking_uri_for
from stages.contract import RuntimeConfig
from tests.pipeline import fake_stages

PROJECT = Path(__file__).resolve().parents[2]
TRACKING_URI = "sqlite:////tmp/ion-test-tracking.db"  # only passed to workers, never opened


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ray-work")
    runtime = RuntimeConfig(workdir=str(workdir), num_workers=2)
    assert init_ray(runtime, tracking_uri=TRACKING_URI) is True
    yield runtime
    shutdown_ray()


def test_results_keep_item_order(ray_instance):
    assert ray_map(fake_stages.square, range(12), desc="squares") == [x * x for x in range(12)]
    assert ray_map(fake_stages.square, [], desc="nothing") == []


def test_results_handed_to_on_result_are_not_kept(ray_instance):
    """A map that consumes its results as they come holds none of them: each one handed over is gone
    by the time the next arrives, so the driver's memory does not grow with the number of items."""
    handed: list[weakref.ref] = []

    def consume(index, result):
        gc.collect()
        assert [ref() for ref in handed] == [None] * len(handed)
        assert result.index == index and len(result.data) == 256 * 1024
        handed.append(weakref.ref(result))
        return -index

    assert ray_map(fake_stages.payload, range(12), desc="payloads", on_result=consume) == [-i for i in range(12)]
    gc.collect()
    assert len(handed) == 12 and all(ref() is None for ref in handed)


def test_a_failing_item_raises_with_the_item(ray_instance):
    with pytest.raises(MapItemError) as err:
        ray_map(fake_stages.fail_on_three, range(6), desc="checking")
    assert str(err.value) == "checking: item 3 (3) failed: ValueError: bad item 3"
    assert err.value.index == 3 and err.value.item == 3
    assert isinstance(err.value.__cause__, ValueError)


def test_a_user_error_stays_a_user_error(ray_instance):
    with pytest.raises(UserError) as err:
        ray_map(fake_stages.user_error_on_two, range(4), desc="decoding")
    assert str(err.value) == ("images/2.jpg: cannot decode the image (remove it from the split) "
                              "(in decoding, item 2: 2)")


def test_workers_get_tracking_uri_workdir_and_project(ray_instance):
    names = ["MLFLOW_TRACKING_URI", "ION_WORKDIR", "PYTHONPATH"]
    uri, workdir, pythonpath = ray_map(fake_stages.env_of, names, desc="env")
    assert uri == TRACKING_URI and workdir == ray_instance.workdir
    assert pythonpath.split(":")[0] == str(PROJECT)


def test_gpu_request_on_a_cpu_cluster_asks_for_none(ray_instance):
    assert cluster_gpus() == 0.0
    assert ray_map(fake_stages.square, [2, 3], desc="gpu?", gpu=True) == [4, 9]


def test_init_is_once_per_process(ray_instance):
    assert init_ray(ray_instance) is False


def test_stage_maps_through_the_context_and_leaves_an_outer_ray_running(ray_instance, workdir):
    cfg = fake_stages.config(workdir)
    graph = build_graph(fake_stages.map_modules())
    tracker = Tracker(tracking_uri=tracking_uri_for(workdir), experiment=cfg.name, workdir=workdir)
    report = run_stages(cfg, stages=graph, selected=select_stages(graph, "all"), tracker=tracker)
    assert report.outcomes[0].metrics == {"sum": 55.0}
    assert json.loads((report.outcomes[0].path / "squares.json").read_text()) == [0, 1, 4, 9, 16, 25]
    mapper = Cluster(ray_instance, tracking_uri=None)
    assert mapper.map(fake_stages.square, [5], desc="again") == [25]
    mapper.close()  # it did not start Ray, so Ray stays up for the caller
    assert ray_map(fake_stages.square, [4], desc="still up") == [16]


def test_an_unreachable_cluster_address_is_a_user_error():
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(UserError) as err:
            check_reachable(f"ray://127.0.0.1:{port}", source="RAY_ADDRESS")
    assert str(err.value).startswith(f"RAY_ADDRESS=ray://127.0.0.1:{port}: cannot reach the Ray cluster (")
    assert str(err.value).endswith("start it (ray start --head) or unset RAY_ADDRESS to run on a local Ray instance")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", source="RAY_ADDRESS")
    check_reachable("auto", source="RAY_ADDRESS")  # no port: Ray resolves it


def test_a_sqlite_store_is_refused_for_a_cluster_of_several_nodes_only():
    """What init_ray checks once it has joined a cluster (the multi-node cluster
    itself is not started here: a second Ray node costs more than the suite allows)."""
    uri = "sqlite:////shared/work/mlflow.db"
    assert tracking_problem(uri, nodes=1) is None
    assert tracking_problem("http://10.0.0.1:5000", nodes=4) is None
    assert tracking_problem(uri, nodes=3) == (
        f"MLFLOW_TRACKING_URI={uri}: a sqlite store cannot be shared by the 3 nodes of the Ray cluster (SQLite is "
        "unsafe on shared storage); start `mlflow server --backend-store-uri sqlite:///<path on one machine> "
        "--host 0.0.0.0 --port 5000` on one machine and set MLFLOW_TRACKING_URI=http://<that machine>:5000")
