"""`mlxdist node`: the daemon on each Mac. It listens on the control plane (only
authenticated peers get anything but a refusal), holds shards, starts workers on order,
advertises itself over mDNS and keeps a live table of its peers."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from mlxdist import PROTOCOL_VERSION, __version__
from mlxdist.cluster.auth import Handshakes, NonceLog, server_handshake
from mlxdist.cluster.interfaces import Interface
from mlxdist.cluster.machine import Hardware, probe_hardware
from mlxdist.cluster.shards import ShardError, ShardStore, check_files, check_name
from mlxdist.cluster.workers import LaunchError, Workers, parse_launch
from mlxdist.framing import Channel, ProtocolError, Refused

log = logging.getLogger("mlxdist.node")
HANDSHAKE_DEADLINE_S = 5.0  # from accept to the end of the handshake, however it trickles
HANDSHAKES_PER_PEER = 16  # connections in the handshake from one address at once
MAX_HANDSHAKES = 64  # ... and from all addresses
MAX_SESSIONS = 64  # authenticated sessions at once
IDLE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class NodeConfig:
    name: str
    cluster: str
    data_dir: Path
    secret: bytes
    port: int = 52415
    bind: str = "0.0.0.0"
    interfaces: tuple[Interface, ...] = ()
    mdns: bool = True
    mdns_addresses: tuple[str, ...] = ()  # empty: all interfaces (never used in tests)
    heartbeat_s: float = 1.0
    lost_after_s: float = 3.0
    handshake_s: float = HANDSHAKE_DEADLINE_S


def node_id_for(data_dir: Path) -> str:
    """A stable id per data dir, so a restarted node is recognised as the same one."""
    path = Path(data_dir) / "node_id"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    nid = uuid.uuid4().hex[:16]
    path.write_text(nid + "\n")
    return nid


class Node:
    def __init__(self, config: NodeConfig, hardware: Hardware | None = None) -> None:
        self.config = config
        self.node_id = node_id_for(config.data_dir)
        self.hardware = hardware or probe_hardware(config.data_dir)
        self.store = ShardStore(config.data_dir)
        self.workers = Workers(config.data_dir / "jobs")
        self.nonces = NonceLog()
        self.started = time.time()
        self._stop = threading.Event()
        self._stopped = False
        self._left: dict[str, str] = {}  # node id -> name of peers that said goodbye
        self.handshakes = Handshakes(HANDSHAKES_PER_PEER, MAX_HANDSHAKES)
        self._sessions = threading.BoundedSemaphore(MAX_SESSIONS)
        self._server: socket.socket | None = None
        self.discovery = None  # mlxdist.cluster.discovery.Discovery when mDNS is on
        self.health = None  # mlxdist.cluster.health.Monitor watching peers
        self.handlers: dict[str, Callable[[dict], dict]] = {
            "ping": self._ping, "status": self._status, "shard_state": self._shard_state,
            "shard_chunk": self._shard_chunk, "shard_commit": self._shard_commit,
            "shard_pull": self._shard_pull, "launch": self._launch,
            "job_status": self._job_status, "stop_job": self._stop_job,
            "free_ports": self._free_ports,
        }

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._server = socket.create_server((self.config.bind, self.config.port),
                                            backlog=128, reuse_port=False)
        self._server.settimeout(0.5)
        threading.Thread(target=self._accept_loop, name="node-accept", daemon=True).start()
        if self.config.mdns:
            from mlxdist.cluster.discovery import Discovery
            from mlxdist.cluster.health import Monitor
            self.health = Monitor(self.config.secret, self.config.cluster,
                                  interval_s=self.config.heartbeat_s,
                                  lost_after_s=self.config.lost_after_s)
            self.discovery = Discovery(self.config.cluster, self.config.mdns_addresses,
                                       on_peer=self._on_peer)
            self.discovery.start(self.advert())

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.getsockname()[1]

    def request_stop(self) -> None:
        """Safe from a signal handler: `wait` returns, the caller then calls `stop`."""
        self._stop.set()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._server:  # first: a coordinator probing now must see this node gone
            self._server.close()
        if self.discovery:
            self.discovery.close()
        if self.health:
            self.health.close()
        self.workers.stop()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    def _on_peer(self, peer: Any, present: bool) -> None:
        if peer.node_id == self.node_id or self.health is None:
            return
        # a peer that says goodbye over mDNS has left; a silent one is left to the
        # heartbeats, which mark it lost within lost_after_s
        if present:
            self._left.pop(peer.node_id, None)
            self.health.watch(peer.node_id, peer.addresses, peer.port)
            log.info("peer %s (%s) at %s", peer.name, peer.node_id, ",".join(peer.addresses))
        else:
            self._left[peer.node_id] = peer.name
            self.health.unwatch(peer.node_id)
            log.info("peer %s (%s) left", peer.name, peer.node_id)

    # -- what we tell others ----------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "name": self.config.name,
                "cluster": self.config.cluster, "version": __version__,
                "protocol": PROTOCOL_VERSION, "port": self.port,
                **asdict(self.hardware),
                "interfaces": [asdict(i) for i in self.config.interfaces],
                "uptime_s": round(time.time() - self.started, 1)}

    def advert(self) -> dict[str, Any]:
        return {**self.describe(), "shards": self.store.inventory()}

    def refresh_advert(self) -> None:
        if self.discovery:
            self.discovery.update(self.advert())

    # -- connections --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                sock, peer = self._server.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            # each connection its own thread, so a stalled one blocks nothing else; the
            # unauthenticated ones are capped (per address and in all) and have a deadline
            self.handshakes.admit(sock, peer[0])
            threading.Thread(target=self._serve_connection, args=(sock,), daemon=True).start()

    def _serve_connection(self, sock: socket.socket) -> None:
        chan = Channel(sock, is_client=False)
        session = False
        try:
            chan.deadline = time.monotonic() + self.config.handshake_s
            server_handshake(chan, self.config.secret, self.config.cluster, self.nonces)
            chan.deadline = None
            self.handshakes.done(sock)
            session = self._sessions.acquire(blocking=False)
            if not session:
                log.warning("%d sessions open already: closing a new one", MAX_SESSIONS)
                return
            sock.settimeout(IDLE_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stop.is_set():
                message = chan.recv()
                chan.send(self._dispatch(message))
        except ProtocolError as e:
            log.debug("protocol error: %s", e)
            self._refuse(chan, str(e)[:200])
        except TimeoutError:
            if not chan.authenticated:
                log.debug("handshake not finished within %s s", self.config.handshake_s)
                self._refuse(chan, f"handshake not finished within {self.config.handshake_s:g} s")
        except (Refused, ConnectionError, OSError) as e:
            log.debug("connection ended: %s", e)
        finally:
            self.handshakes.done(sock)
            chan.close()
            if session:
                self._sessions.release()

    @staticmethod
    def _refuse(chan: Channel, reason: str) -> None:
        """Say why before closing; only before authentication (after it, a frame needs
        the session's tag and the peer is trusted to read the log)."""
        if chan.authenticated:
            return
        try:
            chan.sock.settimeout(1.0)
            chan.send({"t": "refused", "reason": reason})
        except OSError:
            pass

    def _dispatch(self, message: dict) -> dict:
        handler = self.handlers.get(message["t"])
        if handler is None:
            return {"t": "error", "reason": f"unknown message type {message['t']!r}"}
        try:
            return handler(message)
        except (ShardError, LaunchError) as e:
            return {"t": "error", "reason": str(e)}
        except (KeyError, TypeError, ValueError) as e:
            return {"t": "error", "reason": f"bad {message['t']} message: {e}"}
        except OSError as e:
            return {"t": "error", "reason": f"{type(e).__name__}: {e}"}

    # -- handlers -----------------------------------------------------------------------
    def _ping(self, m: dict) -> dict:
        return {"t": "pong", "node_id": self.node_id, "time": time.time()}

    def _status(self, m: dict) -> dict:
        peers = self.health.snapshot() if self.health else {}
        known = self.discovery.peers() if self.discovery else {}
        return {"t": "status", "node": self.describe(), "shards": self.store.inventory(),
                "peers": [{"node_id": nid, "name": getattr(known.get(nid), "name", ""),
                           **h} for nid, h in sorted(peers.items())]
                + [{"node_id": nid, "name": name, "health": "left"}
                   for nid, name in sorted(self._left.items()) if nid not in peers],
                "workers": self.workers.summary()}

    def _shard_state(self, m: dict) -> dict:
        model, stage = check_name(m["model"], m["stage"])
        return {"t": "shard_state", **self.store.state(model, stage, check_files(m["files"]))}

    def _shard_chunk(self, m: dict) -> dict:
        model, stage = check_name(m["model"], m["stage"])
        if not isinstance(m["data"], bytes) or not isinstance(m["file"], str):
            raise ShardError("bad chunk")
        return {"t": "ok", "offset": self.store.write_chunk(model, stage, m["file"],
                                                            m["offset"], m["data"])}

    def _shard_commit(self, m: dict) -> dict:
        model, stage = check_name(m["model"], m["stage"])
        reply = {"t": "ok", **self.store.commit(model, stage)}
        self.refresh_advert()
        return reply

    def _shard_pull(self, m: dict) -> dict:
        model, stage = check_name(m["model"], m["stage"])
        path = m["path"]
        if not isinstance(path, str) or not path or "\0" in path:
            raise ShardError(f"bad path {path!r}")
        reply = {"t": "ok", **self.store.pull(model, stage, path, check_files(m["files"]))}
        self.refresh_advert()
        return reply

    def _launch(self, m: dict) -> dict:
        if self._stop.is_set():
            raise LaunchError("this node is stopping")
        spec = parse_launch(m)
        stage_dir = self.store.stage_dir(spec.model, spec.stage)
        if stage_dir is None:
            raise LaunchError(f"this node holds no verified {spec.model} stage {spec.stage}")
        return {"t": "launched", "job": spec.job, "rank": spec.worker.rank,
                "pid": self.workers.start(spec, stage_dir)}

    def _free_ports(self, m: dict) -> dict:
        """Ports free on this node right now, for the workers' ring listeners (the
        coordinator cannot know which ports a remote host has in use)."""
        count = m["count"]
        if not isinstance(count, int) or not 1 <= count <= 16:
            raise ShardError("bad port count")
        socks = [socket.create_server((self.config.bind, 0)) for _ in range(count)]
        ports = [s.getsockname()[1] for s in socks]
        for s in socks:
            s.close()
        return {"t": "ports", "ports": ports}

    def _job_status(self, m: dict) -> dict:
        return {"t": "job", "ranks": self.workers.status(str(m["job"]))}

    def _stop_job(self, m: dict) -> dict:
        return {"t": "ok", "stopped": self.workers.stop(str(m["job"]))}
