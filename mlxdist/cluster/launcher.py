"""`ClusterLauncher`: the runtime's Launcher (mlxdist/runtime/launcher.py) over the
cluster's control plane. The runtime's engine asks it for ring addresses, hands it one
WorkerSpec per rank, and polls and terminates the workers; each spec goes, as the blob the
worker reads on its stdin, to the node that holds the rank's stage, which checks it and
starts `python -m mlxdist.runtime.worker` itself. No ssh, no command line on the wire.

    launcher = ClusterLauncher([Placement(view0, "model", 0), ...], cluster, secret)
    engine = open_engine(OUT, EngineConfig(), ranks=3, launcher=launcher)
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from mlxdist.cluster.client import NodeClient
from mlxdist.cluster.nodes import NodeView
from mlxdist.cluster.ring import RingMember, hostfile_for
from mlxdist.runtime.launcher import WorkerSpec


@dataclass(frozen=True)
class Placement:
    """Rank r runs on `node`, from the stage (`model`, `stage`) the node holds."""
    node: NodeView
    model: str
    stage: int


def local_address_towards(host: str) -> str:
    """Our address on the route to `host` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


class ClusterLauncher:
    def __init__(self, placements: Sequence[Placement], cluster: str, secret: bytes,
                 control_host: str | None = None, timeout: float = 10.0) -> None:
        self.placements = list(placements)
        self.cluster, self.secret, self.timeout = cluster, secret, timeout
        self.control_host = control_host or local_address_towards(self.placements[0].node.host)
        self.job = secrets.token_hex(8)
        self._clients: dict[str, NodeClient] = {}
        self._codes: dict[int, int | None] = {}
        self._tails: dict[int, str] = {}
        self._lock = threading.Lock()
        self.terminated = False  # the runtime calls terminate() before it reports a failure

    def _client(self, v: NodeView) -> NodeClient:
        c = self._clients.get(v.node_id)
        if c is None:
            c = self._clients[v.node_id] = NodeClient(v.host, v.port, self.secret, self.cluster,
                                                      timeout=self.timeout)
        return c

    # -- the runtime's Launcher protocol ------------------------------------------------
    def ring_addresses(self, ranks: int) -> list[list[str]]:
        assert ranks == len(self.placements), "one placement per rank"
        nodes = [p.node for p in self.placements]
        with self._lock:
            free = {v.node_id: self._client(v).free_ports(
                sum(1 for w in nodes if w.node_id == v.node_id)) for v in nodes}
        ports = [free[v.node_id].pop(0) for v in nodes]
        members = [RingMember(v.node_id, v.interfaces, fallback=v.host) for v in nodes]
        return hostfile_for(members, ports)

    def hosts(self, ranks: int) -> list[str]:
        return [p.node.name for p in self.placements[:ranks]]

    def hostfile_path(self) -> str:
        return "(written by each node in its data dir)"

    def launch(self, specs: Sequence[WorkerSpec], hostfile: list[list[str]]) -> None:
        """Each spec, as the blob its worker reads, to the node holding its stage."""
        with self._lock:
            for spec in specs:
                p = self.placements[spec.rank]
                self._client(p.node).launch(self.job, p.model, p.stage, hostfile, spec.to_msgpack())
                self._codes[spec.rank] = None

    def poll(self) -> dict[int, int | None]:
        """Exit codes by rank (None: running or unknown). Never raises: a node that does
        not answer within a second keeps its last known codes; its loss is seen by the
        runtime's heartbeats and by the cluster's."""
        with self._lock:
            for v in {p.node.node_id: p.node for p in self.placements}.values():
                c = self._clients.get(v.node_id)
                if c is None:
                    continue
                try:
                    c.settimeout(1.0)
                    for r in c.job_status(self.job):
                        self._codes[r["rank"]] = r["returncode"]
                        self._tails[r["rank"]] = r["log_tail"]
                except Exception:
                    c.close()
                    del self._clients[v.node_id]
            return dict(self._codes)

    def log_tail(self, rank: int, lines: int = 5) -> str:
        return "\n".join(self._tails.get(rank, "").strip().splitlines()[-lines:])

    def terminate(self) -> None:
        """Stop the job on every node at once; an unreachable node costs at most a second
        (its workers lose their ring neighbours and their engine connection anyway)."""
        with self._lock:
            clients, self._clients = self._clients, {}
            self.terminated = True
        nodes = {p.node.node_id: p.node for p in self.placements}

        def stop(v: NodeView) -> None:
            c = clients.get(v.node_id)
            try:
                if c is None:
                    c = NodeClient(v.host, v.port, self.secret, self.cluster, timeout=1.0)
                c.settimeout(1.0)
                c.ping()  # a silent node (cable cut) is given up on here, after 1 s
                c.settimeout(10.0)  # a live one may take its SIGTERM grace to answer
                c.stop_job(self.job)
            except Exception:
                pass
            finally:
                if c is not None:
                    c.close()

        threads = [threading.Thread(target=stop, args=(v,), daemon=True) for v in nodes.values()]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 12.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
