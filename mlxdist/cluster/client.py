"""The coordinator's side of the control plane: an authenticated connection to one node,
and what it asks of it (status, heartbeats, shard delivery, launching workers)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mlxdist.cluster.auth import client_handshake
from mlxdist.cluster.shards import FileDigest, files_wire, stage_sources
from mlxdist.framing import Channel

CHUNK = 1 << 20


class RemoteError(Exception):
    """The node answered with an error."""


@dataclass(frozen=True)
class Delivery:
    model: str
    stage: int
    bytes_sent: int
    skipped: bool  # the node already held a verified copy


class NodeClient:
    """One authenticated connection. Thread-safe: requests are serialized."""

    def __init__(self, host: str, port: int, secret: bytes, cluster: str,
                 timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._chan = Channel(sock, is_client=True)
        self._lock = threading.Lock()
        try:
            client_handshake(self._chan, secret, cluster)
        except BaseException:
            self._chan.close()
            raise

    def __enter__(self) -> "NodeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._chan.close()

    def settimeout(self, seconds: float) -> None:
        self._chan.sock.settimeout(seconds)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._chan.send(message)
            reply = self._chan.recv()
        if reply["t"] == "error":
            raise RemoteError(str(reply.get("reason", "error")))
        return reply

    def ping(self) -> dict:
        return self.request({"t": "ping"})

    def status(self) -> dict:
        return self.request({"t": "status"})

    def deliver_stage(self, stage_dir: Path, model: str, stage: int,
                      shared_path: str | None = None,
                      progress: Callable[[int], None] | None = None) -> Delivery:
        """Give the node `stage_dir` as its `model`/`stage`: nothing if it holds a verified
        copy, else the missing bytes from where it left off (or, with `shared_path`, the
        node copies from that path, as it sees it, e.g. an NFS mount)."""
        from mlxdist.cluster.shards import cached_sha256

        sources = stage_sources(Path(stage_dir))
        files = {n: FileDigest(p.stat().st_size, cached_sha256(p)) for n, p in sources.items()}
        wire_files = files_wire(files)
        if shared_path is not None:
            reply = self.request({"t": "shard_pull", "model": model, "stage": stage,
                                  "path": shared_path, "files": wire_files})
            return Delivery(model, stage, 0, reply.get("copied", 0) == 0)
        state = self.request({"t": "shard_state", "model": model, "stage": stage,
                              "files": wire_files})
        if state["complete"]:
            return Delivery(model, stage, 0, True)
        sent = 0
        for name, offset in sorted(state["offsets"].items()):
            size = files[name].size
            with open(sources[name], "rb") as f:
                f.seek(offset)
                while offset < size:
                    data = f.read(min(CHUNK, size - offset))
                    reply = self.request({"t": "shard_chunk", "model": model, "stage": stage,
                                          "file": name, "offset": offset, "data": data})
                    offset = reply["offset"]
                    sent += len(data)
                    if progress:
                        progress(len(data))
        self.request({"t": "shard_commit", "model": model, "stage": stage})
        return Delivery(model, stage, sent, False)

    def launch(self, job: str, model: str, stage: int, hostfile: Sequence[Sequence[str]],
               spec: bytes) -> int:
        """Ask the node to start `python -m mlxdist.runtime.worker` on the stage it holds,
        `spec` (a WorkerSpec's msgpack blob) on its stdin; see workers.parse_launch for the
        checks."""
        reply = self.request({"t": "launch", "job": job, "model": model, "stage": stage,
                              "hostfile": [list(h) for h in hostfile], "spec": spec})
        return int(reply["pid"])

    def free_ports(self, count: int) -> list[int]:
        return [int(p) for p in self.request({"t": "free_ports", "count": count})["ports"]]

    def job_status(self, job: str) -> list[dict]:
        return self.request({"t": "job_status", "job": job})["ranks"]

    def stop_job(self, job: str) -> int:
        return int(self.request({"t": "stop_job", "job": job})["stopped"])
