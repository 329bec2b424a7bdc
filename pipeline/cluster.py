"""Ray adapter: the only module that imports ray.

`init_ray` starts a quiet local Ray instance, or joins a cluster when
`runtime.ray_address` or RAY_ADDRESS names one (and prints which one, with its
nodes, CPUs and GPUs). Workers get the tracking URI,
the workdir and the project on PYTHONPATH through the runtime env, so they can
import stages/, ion/ and proposals/ (on a cluster the project must be at the
same path on every node, or installed there).

`ray_map` runs `fn(item)` as Ray tasks with progress lines (pipeline/progress.py), results in item order.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import ray

from ion.errors import UserError
from pipeline.progress import Progress
from pipeline.runtime import TRACKING_URI_ENV, WORKDIR_ENV, RuntimeConfig, tracking_uri_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Ray >= 2.5x turns token authentication on for every new local instance and
# warns about it on each start ("Token authentication is enabled for this Ray
# cluster. Set RAY_AUTH_MODE=disabled to opt out."). Token auth is what we want
# (the token lands in ~/.ray/auth_token), so the start-up notice is dropped;
# RAY_AUTH_MODE set by the user is respected by Ray as before.
_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_WAIT_BATCH = 64
_ITEM_REPR = 200


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
    """Environment variables every Ray worker gets."""
    paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), WORKDIR_ENV: str(runtime.workdir),
            TRACKING_URI_ENV: tracking_uri}


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
        with _own_sigterm_handler():
            ray.init(num_cpus=runtime.num_workers, include_dashboard=False, **common)
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
    ours (pipeline/stopping.py: runs marked KILLED, Ray shut down, exit 143)."""
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


def ray_map(fn: Callable[[Any], Any], items: Iterable[Any], desc: str, gpu: bool = False) -> list:
    """`[fn(item) for item in items]` as Ray tasks, in item order, with a progress bar.

    `fn` must be a module-level function (workers import it by name). With `gpu`,
    each task asks for one GPU only if the cluster has one. The first failing task
    cancels the rest and raises: a `UserError` stays a `UserError` (the item added
    to its message), anything else becomes `MapItemError` naming the item.
    """
    items = list(items)
    if not items:
        return []
    remote = ray.remote(num_gpus=1)(fn) if gpu and cluster_gpus() >= 1 else ray.remote(fn)
    refs = [remote.remote(item) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(items)
    pending = list(refs)
    with Progress(desc, total=len(items), unit="items") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=min(len(pending), _WAIT_BATCH), timeout=0.5)
            for ref in done:
                i = index[ref]
                try:
                    results[i] = ray.get(ref)
                except Exception as err:  # noqa: BLE001 (re-raised below, with the item)
                    for other in pending:
                        ray.cancel(other)
                    raise _item_error(desc, i, items[i], err) from _cause(err)
                bar.update(1)
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
            gpu: bool = False) -> list:
        init_ray(self.runtime, tracking_uri=self.tracking_uri)
        return ray_map(fn, items, desc, gpu=gpu)

    def close(self) -> None:
        """Shut Ray down if it came up during this invocation (here or in a stage's Ray Train run)."""
        if not self._was_running and ray.is_initialized():
            shutdown_ray()
