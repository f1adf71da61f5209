"""Ray (`pip install 'qkiln[ray]'`) for the work that needs no other work's result: a session (a local instance
bound to 127.0.0.1, or an existing cluster by address), calls submitted as Ray tasks, and the RTN tensors of a
conversion quantized as tasks while the writer packs them in its own order.

Retrying a task whose worker died (a process killed, a node lost) is Ray's: every task is submitted with
`max_retries`. An exception raised by qkiln inside a task is not retried (the same inputs raise it again) and
reaches the caller as itself, so the CLI maps it to its exit code as if the work had run here. Tasks are
deterministic (same inputs, same bytes), so a retried task gives what the first attempt would have.

Workers read the checkpoint (and calibration text) themselves from their paths: on a local instance every
worker sees the driver's files; a cluster needs them at the same paths on every node (a shared filesystem).
Results come back through Ray's object store (the NumPy arrays of a `QuantizedTensor` without a copy).
Ray is imported only here and only when asked for, so qkiln imports and works without it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qkiln.errors import QkilnError, UserError
from qkiln.formats.hf import Checkpoint
from qkiln.pipeline.stream import RTNStream, Weight

INSTALL = "pip install 'qkiln[ray]'"
LOOPBACK = "127.0.0.1"
# Ray's own switch for a single-machine instance: every Ray process binds the loopback address instead of the
# machine's network address (Ray reads it when it is imported).
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CONNECT_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where the tasks run. address None: a new local instance on 127.0.0.1 with `num_cpus` (None: every
    core) and an object store of `object_store_bytes` (None: Ray's default); else a running cluster
    ("HOST:PORT", "auto", or "ray://HOST:PORT" with Ray Client). `max_retries`: attempts after a worker dies."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_bytes: int | None = None
    max_retries: int = 3


class RayTaskLost(QkilnError):
    """Ray could not finish a task within its retries (workers or nodes kept dying)."""


def import_ray(*, local: bool = False) -> Any:
    """The `ray` module, or a UserError saying how to install it. `local`: a local instance will be started,
    whose processes bind the loopback address only if Ray's single-node switch is set before Ray is imported."""
    if local and "ray" not in sys.modules:
        os.environ[SINGLE_NODE_ENV] = "0"
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address nothing listens at (ray.init would retry it for minutes)."""
    if address == "auto":
        return  # Ray finds the cluster itself (RAY_ADDRESS, or the one started on this machine)
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray-address {address}: expected HOST:PORT (the head node's GCS address, e.g. "
                        "10.0.0.5:6379), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e}); start one "
                        "(`ray start --head`) or pass its head node's address") from None


def check_ray(options: RayOptions) -> Any:
    """Before any work: the cluster's address answers and Ray is installed (UserError otherwise); the module."""
    if options.address is not None:
        _check_reachable(options.address)
    return import_ray(local=options.address is None)


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Ray started (local) or connected to (cluster) for the duration of the block, then shut down or
    disconnected. Refuses a local instance that would listen beyond 127.0.0.1."""
    local = options.address is None
    ray = check_ray(options)
    try:
        if local:
            info = ray.init(address="local", num_cpus=options.num_cpus, object_store_memory=options.object_store_bytes,
                            include_dashboard=False, logging_level=logging.WARNING)
        else:
            info = ray.init(address=options.address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError) as e:
        where = "a local Ray instance" if local else f"--ray-address {options.address}"
        raise UserError(f"{where}: {e}") from None
    try:
        node_ip = info.address_info["node_ip_address"] if local else None
        if local and node_ip != LOOPBACK:
            raise QkilnError(f"the local Ray instance listens on {node_ip}, not {LOOPBACK} (Ray was imported before "
                             f"qkiln started it); set {SINGLE_NODE_ENV}=0 before importing ray, or pass a cluster's address")
        yield
    finally:
        ray.shutdown()


@functools.cache
def _remote(fn: Callable[..., Any], max_retries: int) -> Any:
    ray = import_ray()
    # retry_exceptions=False: a task's own exception is deterministic; only a lost worker is worth a retry
    return ray.remote(max_retries=max_retries, retry_exceptions=False)(fn)


def submit(options: RayOptions, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` as a Ray task (fn a module-level function the workers import); its ObjectRef."""
    return _remote(fn, options.max_retries).remote(*args)


def fetch(refs: Any) -> Any:
    """ray.get, with a qkiln error raised in a task re-raised as itself and Ray's own failures (after its
    retries) as RayTaskLost."""
    ray = import_ray()
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, QkilnError):
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RayTaskLost(f"Ray could not finish a task within its retries: {type(e).__name__}: {first}") from None


def fetch_each(refs: Sequence[Any], done: Callable[[int], None] | None = None) -> list[Any]:
    """Every ref's value, in order; each fetched as it finishes (the first failure raises at once), calling
    `done(k)` when k have."""
    ray = import_ray()
    values: dict[Any, Any] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        values[ready[0]] = fetch(ready[0])
        if done:
            done(len(values))
    return [values[r] for r in refs]


def rtn_tensor(model: str, name: str, scheme: str) -> Weight:
    """One tensor of the checkpoint at `model`, RTN-quantized on `scheme`: a task's work, read by the worker."""
    return RTNStream(Checkpoint.open(model), {name: scheme}).get(name)


class RayRTNStream(RTNStream):
    """An RTNStream whose quantized tensors are Ray tasks (float ones are read here: nothing to compute).

    Tasks are submitted ahead in the checkpoint's order — layer by layer, as every writer reads — keeping at
    most `window` unread results (twice the cluster's CPUs by default), and handed out in whatever order the
    writer asks: a tensor asked for before its turn is submitted at once. Same tensors, same bytes as
    RTNStream; memory: the window's results."""

    def __init__(self, source: Any, schemes: Mapping[str, str], progress: Callable[[str], None] | None = None, *,
                 options: RayOptions, window: int | None = None):
        super().__init__(source, schemes, progress)
        ray = import_ray()
        self.options = options
        self.model = str(Path(source.path).resolve())
        self.window = window or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._ahead = collections.deque(n for n in self.names if n in schemes)  # to submit next, in order
        self._refs: dict[str, Any] = {}  # submitted, not yet read
        self._submitted: set[str] = set()

    def _submit(self, name: str) -> None:
        self._refs[name] = submit(self.options, rtn_tensor, self.model, name, self.schemes[name])
        self._submitted.add(name)

    def get(self, name: str) -> Weight:
        if name not in self.schemes:
            return super().get(name)
        if name not in self._submitted:
            self._submit(name)
        while self._ahead and len(self._refs) < self.window:
            ahead = self._ahead.popleft()
            if ahead not in self._submitted:
                self._submit(ahead)
        if self.progress:
            self.progress(f"rtn {name} (Ray task)")
        return fetch(self._refs.pop(name))
