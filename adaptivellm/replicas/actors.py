"""The Ray side of scale-out: one actor per replica, each owning a full `adaptivellm serve`.

Ray does the distributed work: placement (`num_cpus`/`num_gpus` per actor, a STRICT_PACK
placement group for a replica with more than one GPU), cluster membership (`--ray-address`, or
a local instance), and restarts (`max_restarts`): when a replica's server exits, its actor
exits too, and Ray starts it again; the router sees the new endpoint and routes to it once its
`/health` answers.

An actor starts its server through `adaptivellm.replicas.reaper` in a process group of its own,
tied to the actor by `PR_SET_PDEATHSIG`, so no engine process outlives its replica. Each server
gets its own port, its own Prometheus multi-process directory (the variables are not passed
on) and, on CPU, its own cores (`VLLM_CPU_OMP_THREADS_BIND`, unless the operator set it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("adaptivellm.replicas")

#: Environment a replica must not inherit from the process that started Ray.
SCRUBBED_ENV = ("PROMETHEUS_MULTIPROC_DIR", "ADAPTIVELLM_PROMETHEUS_DIR")


def cpu_bind(index: int, cpus: int, available: Sequence[int]) -> str:
    """The cores of replica `index` when each replica has `cpus` of the node's `available` cores
    (VLLM_CPU_OMP_THREADS_BIND syntax, e.g. "2,3"): consecutive blocks, wrapping around when
    there are more replicas than blocks."""
    if not available:
        return "auto"
    width = max(1, min(int(cpus), len(available)))
    blocks = max(1, len(available) // width)
    start = (index % blocks) * width
    return ",".join(str(c) for c in available[start : start + width])


@dataclass
class ReplicaSpec:
    """How to start one replica's server."""

    index: int
    argv: list[str]
    cpus: float = 1.0
    gpus: float = 0.0
    host: str = "127.0.0.1"
    log_dir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    bind_cpus: bool = True


class ReplicaActor:
    """A Ray actor (see module docstring). Made remote in RayReplicas.start."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.stopping = False
        self.started = time.time()
        self.port = _free_port(spec.host)
        log_dir = Path(spec.log_dir or tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"replica-{spec.index}-{os.getpid()}.log"
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        env.update(spec.env)
        if spec.gpus == 0 and spec.bind_cpus and "VLLM_CPU_OMP_THREADS_BIND" not in spec.env:
            cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(spec.index, int(spec.cpus), cores)
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        command = [
            sys.executable, "-m", "adaptivellm.replicas.reaper", "--",
            sys.executable, "-m", "adaptivellm.cli", "serve", *spec.argv,
            "--host", spec.host, "--port", str(self.port),
        ]  # fmt: skip
        from adaptivellm.replicas.reaper import die_with_parent

        # PDEATHSIG fires when the forking *thread* exits: only tie it to the main thread.
        on_main = threading.current_thread() is threading.main_thread()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent if on_main else None,
            )
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """The server exited on its own (engine death, crash): end this actor so that Ray
        restarts the replica."""
        code = self.proc.wait()
        if not self.stopping:
            sys.stderr.write(f"replica {self.spec.index}: server exited with {code}\n")
            sys.stderr.flush()
            os._exit(1)

    def endpoint(self) -> dict[str, Any]:
        """Where this incarnation serves, and its processes."""
        host = self.spec.host
        if host == "0.0.0.0":  # on a cluster: the address other nodes reach this one at
            import ray

            host = ray.util.get_node_ip_address()
        return {
            "index": self.spec.index,
            "url": f"http://{host}:{self.port}",
            "actor_pid": os.getpid(),
            "server_pid": self.proc.pid,
            "started": self.started,
            "log": str(self.log_path),
            "node": socket.gethostname(),
        }

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> int | None:
        """Stop the server gracefully (SIGINT to its group), SIGKILL after `grace` seconds."""
        self.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return self.proc.returncode


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class RayOptions:
    """Ray placement and lifecycle options of the replicas."""

    address: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    max_restarts: int = 20
    namespace: str = "adaptivellm"


class RayReplicas:
    """The replicas' actors: started on a Ray cluster (joined or local), asked for their
    current endpoint, stopped at the end. Used by the router (proxy.Backends)."""

    def __init__(self, specs: list[ReplicaSpec], options: RayOptions) -> None:
        self.specs = specs
        self.options = options
        self.handles: list[Any] = []
        self.groups: list[Any] = []
        self.local = options.address is None
        self._started_ray = False

    def __len__(self) -> int:
        return len(self.specs)

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            if self.local:
                total_cpus = max(1, round(self.options.cpus * len(self.specs)))
                kwargs: dict[str, Any] = {"num_cpus": total_cpus}
                if self.options.gpus:
                    kwargs["num_gpus"] = round(self.options.gpus * len(self.specs))
                ray.init(
                    include_dashboard=False,
                    namespace=self.options.namespace,
                    log_to_driver=False,
                    object_store_memory=80 << 20,
                    **kwargs,
                )
            else:
                ray.init(address=self.options.address, namespace=self.options.namespace)
            self._started_ray = True
        remote = ray.remote(ReplicaActor)
        for spec in self.specs:
            if not self.local and spec.host == "127.0.0.1":
                spec.host = "0.0.0.0"
            options: dict[str, Any] = {
                "num_cpus": self.options.cpus,
                "num_gpus": self.options.gpus,
                "max_restarts": self.options.max_restarts,
                "max_task_retries": 0,
                "name": f"adaptivellm-replica-{spec.index}-{os.getpid()}",
            }
            if self.options.gpus > 1:
                from ray.util.placement_group import placement_group
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                group = placement_group(
                    [{"CPU": self.options.cpus, "GPU": self.options.gpus}], strategy="STRICT_PACK"
                )
                self.groups.append(group)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group)
            self.handles.append(remote.options(**options).remote(spec))

    async def endpoint(self, index: int, timeout: float = 5.0) -> dict[str, Any] | None:
        """The replica's current endpoint (None while Ray (re)starts it)."""
        import asyncio

        try:
            info = await asyncio.wait_for(
                asyncio.wrap_future(self.handles[index].endpoint.remote().future()), timeout
            )
        except Exception:
            return None
        return dict(info)

    def stop(self, grace: float = 20.0) -> None:
        import ray

        refs = [h.stop.remote(grace) for h in self.handles]
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=grace + 10)
        for h in self.handles:
            with contextlib.suppress(Exception):
                ray.kill(h, no_restart=True)
        if self.groups:
            from ray.util.placement_group import remove_placement_group

            for g in self.groups:
                with contextlib.suppress(Exception):
                    remove_placement_group(g)
        if self._started_ray:
            ray.shutdown()
