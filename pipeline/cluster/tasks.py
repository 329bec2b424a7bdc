"""Ray tasks: starting or joining Ray, and mapping a function over items as tasks.

`init_ray` starts a quiet local Ray instance, or joins a cluster when
`runtime.ray_address` or RAY_ADDRESS names one (and prints which one, with its
nodes, CPUs and GPUs). Workers get the tracking URI,
the workdir and the project on PYTHONPATH through the runtime env, so they can
import stages/, ion/ and proposals/ (on a cluster the project must be at the
same path on every node, or installed there).

`ray_map` runs `fn(item)` as Ray tasks with progress lines (pipeline/execution/progress.py), results in item order
(or handed to a callback as they finish, when they are too big to keep).

Placement: a map that may use GPUs runs on one actor per GPU (Ray's own
accounting gives each its GPU through CUDA_VISIBLE_DEVICES), so a worker
loads its model once per stage and keeps it (stages/helpers/worker_cache.py); a Ray
task asking for a GPU would be given `max_calls=1` by Ray and start a fresh
process, CUDA and model load for every shard. Every other task gets
CUDA_VISIBLE_DEVICES="" explicitly: Ray >= 2.5x no longer sets it for tasks
that hold no GPU, and they would otherwise see, and use, every GPU of the
node outside Ray's accounting. `runtime.device: cpu` also hides the GPUs from
every worker of the run (Ray Train's included) and gives a local instance none.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import ray

from ion.errors import UserError
from pipeline import PROJECT_ROOT
from pipeline.execution.progress import Progress
from pipeline.tracking.uri import TRACKING_URI_ENV, WORKDIR_ENV, tracking_uri_for
from stages.contract import RuntimeConfig

# Ray >= 2.5x turns token authentication on for every new local instance and
# warns about it on each start ("Token authentication is enabled for this Ray
# cluster. Set RAY_AUTH_MODE=disabled to opt out."). Token auth is what we want
# (the token lands in ~/.ray/auth_token), so the start-up notice is dropped;
# RAY_AUTH_MODE set by the user is respected by Ray as before.
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_WAIT_BATCH = 64
_ITEM_REPR = 200
_REASON_CHARS = 300  # of Ray's own start-up error, in the one-line message
HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": ""}  # what a worker that holds no GPU sees
_CALLS_PER_ACTOR = 2  # queued on each GPU actor: the next item is there when one finishes
OnResult = Callable[[int, Any], Any]  # (item index, the task's result) -> what the map keeps


class MapItemError(RuntimeError):
    """A task of `ray_map` failed; `__cause__` is the task's own exception."""

    def __init__(self, desc: str, index: int, item: Any, cause: BaseException) -> None:
        super().__init__(f"{desc}: item {index} ({_short_repr(item)}) failed: {type(cause).__name__}: {cause}")
        self.index = index
        self.item = item


def _short_repr(item: Any) -> str:
    text = repr(item)
    return text if len(text) <= _ITEM_REPR else text[: _ITEM_REPR - 3] + "..."


def worker_env(runtime: RuntimeConfig, tracking_uri: str) -> dict[str, str]:
    """Environment variables every Ray worker gets (no GPU visible with runtime.device cpu)."""
    paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), WORKDIR_ENV: str(runtime.workdir),
           TRACKING_URI_ENV: tracking_uri}
    return {**env, **HIDE_GPUS} if runtime.device == "cpu" else env


def local_resources(runtime: RuntimeConfig) -> dict[str, Any]:
    """ray.init's resources for a local instance: runtime.num_workers CPUs; every GPU
    Ray detects on the machine (None: Ray counts them), none with runtime.device cpu.
    GPU actors take at most one of those CPUs each, less when there are more GPUs
    than CPUs (`_gpu_actor_cpus`), so every GPU is used whatever num_workers says."""
    return {"num_cpus": runtime.num_workers, "num_gpus": 0 if runtime.device == "cpu" else None}


def init_ray(runtime: RuntimeConfig, *, tracking_uri: str | None = None) -> bool:
    """Start or join Ray unless this process already did; True when this call did it.

    Workers get `tracking_uri` (default: the one for `runtime.workdir`), the workdir
    and the project on PYTHONPATH. Joining a cluster prints `ray: joined the cluster
    at ...`; an address that cannot be joined is a UserError naming its source.
    """
    if ray.is_initialized():
        return False
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS") or None
    env = worker_env(runtime, tracking_uri or tracking_uri_for(runtime.workdir))
    common = dict(runtime_env={"env_vars": env},
                  logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger(_TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
    if address is None:
        try:
            with _own_sigterm_handler():
                ray.init(**local_resources(runtime), include_dashboard=False, **common)
        except Exception as err:  # noqa: BLE001 - any start-up fault of Ray's own processes
            ray.shutdown()  # whatever part of the instance did start
            raise _start_error(err) from None
        return True
    source = "runtime.ray_address" if runtime.ray_address else "RAY_ADDRESS"
    check_reachable(address, source=source)
    try:
        with _own_sigterm_handler():
            ray.init(address=address, **common)
    except ConnectionError as err:
        raise _join_error(address, source, err) from None
    # Say which cluster the run went to: a wrong RAY_ADDRESS left in the shell
    # would otherwise run everything somewhere unexpected without a word.
    print(f"ray: joined the cluster at {address} ({source}): {cluster_summary()}", flush=True)
    problem = tracking_problem(env[TRACKING_URI_ENV], sum(1 for node in ray.nodes() if node.get("Alive")))
    if problem:
        ray.shutdown()
        raise UserError(problem)
    return True


def tracking_problem(tracking_uri: str, nodes: int) -> str | None:
    """Why `tracking_uri` cannot serve a cluster of `nodes` nodes, or None.

    A sqlite store is written by the driver and by the training workers' rank 0,
    which may run on another node: SQLite's locking does not hold over NFS and
    other shared file systems, so a cluster needs a tracking server."""
    if nodes <= 1 or not tracking_uri.startswith("sqlite:"):
        return None
    return (f"{TRACKING_URI_ENV}={tracking_uri}: a sqlite store cannot be shared by the {nodes} nodes of the Ray "
            "cluster (SQLite is unsafe on shared storage); start `mlflow server --backend-store-uri "
            "sqlite:///<path on one machine> --host 0.0.0.0 --port 5000` on one machine and set "
            f"{TRACKING_URI_ENV}=http://<that machine>:5000")


@contextlib.contextmanager
def _own_sigterm_handler() -> Iterator[None]:
    """ray.init replaces the driver's SIGTERM handler with a bare sys.exit; keep
    ours (pipeline/execution/stopping.py: runs marked KILLED, Ray shut down, exit 143)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def cluster_summary() -> str:
    """`N node(s), C CPUs, G GPUs` of the cluster Ray is connected to."""
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return (f"{nodes} node{'s' if nodes != 1 else ''}, {resources.get('CPU', 0.0):g} CPUs, "
            f"{resources.get('GPU', 0.0):g} GPUs")


def _start_error(err: Exception) -> UserError:
    """A UserError for a local Ray instance that did not start: its temp folder
    (sockets, logs, the object spill area) is the usual cause: missing, not a
    folder, unwritable or full; on a loaded machine its processes may also not
    answer in time."""
    temp = ray_temp_dir()
    try:
        usage = shutil.disk_usage(os.path.dirname(temp))
        free = f"{usage.free / 2**20:.0f} MiB free"
    except OSError as stat_err:
        free = f"unusable: {stat_err.strerror or stat_err}"
    reason = " ".join(f"{type(err).__name__}: {err}".split())
    if len(reason) > _REASON_CHARS:
        reason = reason[: _REASON_CHARS - 3] + "..."
    return UserError(f"Ray: the local Ray instance did not start ({reason}); its temp folder is {temp} ({free}): "
                     f"free space there or set RAY_TMPDIR to a writable folder with free space, check that the "
                     f"machine is not out of memory or processes, and run the same command again")


def ray_temp_dir() -> str:
    """Where a local Ray instance keeps its session files: ray/ in Ray's own choice
    of temp folder (RAY_TMPDIR, else TMPDIR, else /tmp)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray")


def _join_error(address: str, source: str, err: ConnectionError) -> UserError:
    """A UserError for a ray.init that reached the address but could not join.

    Ray gives up after ~20 s of retries with a bare "Failed to connect"; the usual
    cause on Ray >= 2.5x is token authentication: `ray start` turns it on when
    ~/.ray/auth_token exists, and a driver sends its token to an explicit address
    only with RAY_AUTH_MODE=token.
    """
    chain = f"{err} {err.__cause__ or ''}"
    if "InvalidAuthToken" in chain or "AuthenticationError" in chain:
        if os.environ.get(_AUTH_MODE_ENV, "").lower() == "token":
            return UserError(f"{source}={address}: the Ray cluster rejected this machine's authentication token; "
                             f"use the cluster's token (in ~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)")
        return UserError(f"{source}={address}: the Ray cluster uses token authentication; set "
                         f"{_AUTH_MODE_ENV}=token (with the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN "
                         f"or RAY_AUTH_TOKEN_PATH) or start the cluster with {_AUTH_MODE_ENV}=disabled")
    return UserError(f"{source}={address}: something listens there but Ray cannot join it as a cluster ({err}); "
                     f"give the address `ray start --head` printed (<head-ip>:<port>) or ray://<head-ip>:10001")


def check_reachable(address: str, *, source: str, timeout_s: float = 5.0) -> None:
    """UserError unless something listens at a `host:port` / `ray://host:port` address.

    Ray itself retries a dead address for many minutes before it gives up; a plain
    TCP connect answers in seconds. `auto` and other forms without a port are left to Ray.
    """
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(f"{source}={address}: cannot reach the Ray cluster ({err.strerror or err}); start it "
                        f"(ray start --head) or unset {source} to run on a local Ray instance") from None


def shutdown_ray() -> None:
    ray.shutdown()


def cluster_gpus() -> float:
    """GPUs in the cluster Ray is connected to (0 on a CPU-only cluster)."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def visible_gpus(runtime: RuntimeConfig) -> tuple[float, str]:
    """(GPUs, where) that a run of `runtime` would get, without running anything: the Ray
    instance this process is connected to, the cluster runtime.ray_address / RAY_ADDRESS
    names (joined), or this machine's (what a local Ray instance would declare)."""
    if ray.is_initialized():
        return cluster_gpus(), f"the Ray cluster ({cluster_summary()})"
    if runtime.ray_address or os.environ.get("RAY_ADDRESS"):
        init_ray(runtime)
        return cluster_gpus(), f"the Ray cluster ({cluster_summary()})"
    import torch

    return float(torch.cuda.device_count()), "this machine (a local Ray instance)"


def ray_map(fn: Callable[[Any], Any], items: Iterable[Any], desc: str, gpu: bool = False,
            on_result: OnResult | None = None) -> list:
    """`[fn(item) for item in items]` as Ray tasks, in item order, with a progress bar.

    `fn` must be a module-level function (workers import it by name). With `gpu`
    and GPUs in the cluster, the items go to one actor per GPU (at most one per
    item), each holding its GPU until the map ends; otherwise they are tasks that
    see no GPU (module docstring). The first failing item stops the rest and
    raises: a `UserError` stays a `UserError` (the item added to its message),
    anything else becomes `MapItemError` naming the item.

    `on_result(index, result)`, when given, runs here as each task finishes (in the
    order they finish, not item order) and its return value takes the result's place
    in the list: the map keeps no reference to a result once it has been handed
    over (nor Ray's object), so a map whose results are large (a chunk of JPEGs)
    holds only what the caller keeps, whatever the number of items.
    """
    items = list(items)
    if not items:
        return []
    gpus = int(cluster_gpus()) if gpu else 0
    if gpus >= 1:
        return _actor_map(fn, items, desc, actors=min(gpus, len(items)), on_result=on_result)
    remote = ray.remote(fn).options(runtime_env={"env_vars": dict(HIDE_GPUS)})
    pending = [remote.remote(item) for item in items]
    index = {ref: i for i, ref in enumerate(pending)}
    results: list[Any] = [None] * len(items)
    try:
        with Progress(desc, total=len(items), unit="items") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=min(len(pending), _WAIT_BATCH), timeout=0.5)
                while done:
                    ref = done.pop()
                    i = index.pop(ref)  # the last reference to the task's object goes with `ref`
                    results[i] = _take(desc, i, items[i], ref, on_result)
                    del ref
                    bar.update(1)
    except BaseException:
        for other in pending:
            ray.cancel(other)
        raise
    return results


def _take(desc: str, i: int, item: Any, ref: Any, on_result: OnResult | None) -> Any:
    """Item `i`'s result, or what `on_result` makes of it (the result itself dies with this frame)."""
    try:
        result = ray.get(ref)
    except Exception as err:  # noqa: BLE001 (re-raised with the item)
        raise _item_error(desc, i, item, err) from _cause(err)
    return result if on_result is None else on_result(i, result)


class _GpuWorker:
    """A Ray actor holding one GPU for the length of a map: `fn` runs in this one
    process for every item it gets, so what `fn` caches (the model) is loaded once."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self._fn = fn

    def call(self, item: Any) -> Any:
        return self._fn(item)


def _gpu_actor_cpus(actors: int) -> float:
    """One CPU per GPU actor (it decodes images and feeds its GPU), shared when the
    cluster has fewer CPUs than actors, so that no GPU waits for a CPU."""
    return min(1.0, float(ray.cluster_resources().get("CPU", 1.0)) / actors)


def _actor_map(fn: Callable[[Any], Any], items: list, desc: str, *, actors: int,
               on_result: OnResult | None) -> list:
    """`ray_map` on `actors` GPU actors, each given the next item as it finishes one."""
    worker = ray.remote(_GpuWorker).options(num_gpus=1, num_cpus=_gpu_actor_cpus(actors))
    pool = [worker.remote(fn) for _ in range(actors)]
    results: list[Any] = [None] * len(items)
    running: dict[Any, tuple[int, Any]] = {}  # ref -> (item index, actor)
    upcoming = iter(range(len(items)))

    def submit(actor: Any) -> None:
        i = next(upcoming, None)
        if i is not None:
            running[actor.call.remote(items[i])] = (i, actor)

    try:
        for actor in pool:
            for _ in range(_CALLS_PER_ACTOR):
                submit(actor)
        with Progress(desc, total=len(items), unit="items") as bar:
            while running:
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                while done:
                    ref = done.pop()
                    i, actor = running.pop(ref)
                    results[i] = _take(desc, i, items[i], ref, on_result)
                    del ref
                    bar.update(1)
                    submit(actor)
    finally:
        for actor in pool:  # frees the GPUs (and their memory) for the next stage
            ray.kill(actor)
    return results


def _cause(err: BaseException) -> BaseException:
    """The task's own exception inside Ray's wrapper."""
    return getattr(err, "cause", None) or err


def _item_error(desc: str, index: int, item: Any, err: BaseException) -> Exception:
    cause = _cause(err)
    if isinstance(cause, UserError):
        return UserError(f"{cause} (in {desc}, item {index}: {_short_repr(item)})")
    return MapItemError(desc, index, item, cause)


class Cluster:
    """The Ray of one invocation: started on the first map (cached runs never start it) and shut
    down at the end if it was not running before (a Ray set up by the caller stays up)."""

    def __init__(self, runtime: RuntimeConfig, *, tracking_uri: str | None) -> None:
        self.runtime = runtime
        self.tracking_uri = tracking_uri
        self._was_running = ray.is_initialized()

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any] | Iterable[Any], desc: str,
            gpu: bool = False, on_result: OnResult | None = None) -> list:
        """`ray_map`; `gpu` (the items may use a GPU) counts only where runtime.device is not cpu."""
        init_ray(self.runtime, tracking_uri=self.tracking_uri)
        return ray_map(fn, items, desc, gpu=gpu and self.runtime.device != "cpu", on_result=on_result)

    def close(self) -> None:
        """Shut Ray down if it came up during this invocation (here or in a stage's Ray Train run)."""
        if not self._was_running and ray.is_initialized():
            shutdown_ray()
