"""Heartbeats: one small thread per watched node pings it over an authenticated
connection every `interval_s`; no answer for `lost_after_s` and the node is "lost".
Used by every node for its peers and by the coordinator for the nodes it runs on."""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from mlxdist.cluster.client import NodeClient

OnChange = Callable[[str, str], None]  # (node_id, "ok" | "lost")


class _Watch:
    def __init__(self, node_id: str, addresses: Sequence[str], port: int) -> None:
        self.node_id = node_id
        self.addresses = tuple(addresses)
        self.port = port
        self.state = "unknown"
        self.since = time.monotonic()
        self.last_ok = time.monotonic()
        self.rtt_ms: float | None = None
        self.address: str | None = None
        self.stop = threading.Event()


class Monitor:
    def __init__(self, secret: bytes, cluster: str, interval_s: float = 1.0,
                 lost_after_s: float = 3.0, on_change: OnChange | None = None) -> None:
        self.secret, self.cluster = secret, cluster
        self.interval_s, self.lost_after_s = interval_s, lost_after_s
        self.on_change = on_change
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()

    def watch(self, node_id: str, addresses: Sequence[str], port: int) -> None:
        with self._lock:
            w = self._watches.get(node_id)
            if w is not None:
                w.addresses, w.port = tuple(addresses), port
                return
            w = self._watches[node_id] = _Watch(node_id, addresses, port)
        threading.Thread(target=self._run, args=(w,), name=f"heartbeat-{node_id}",
                         daemon=True).start()

    def unwatch(self, node_id: str) -> None:
        with self._lock:
            w = self._watches.pop(node_id, None)
        if w:
            w.stop.set()

    def state(self, node_id: str) -> str:
        with self._lock:
            w = self._watches.get(node_id)
            return w.state if w else "unknown"

    def snapshot(self) -> dict[str, dict]:
        now = time.monotonic()
        with self._lock:
            return {nid: {"health": w.state, "last_ok_s": round(now - w.last_ok, 2),
                          "rtt_ms": w.rtt_ms, "address": w.address}
                    for nid, w in self._watches.items()}

    def close(self) -> None:
        with self._lock:
            watches = list(self._watches.values())
            self._watches.clear()
        for w in watches:
            w.stop.set()

    def _set(self, w: _Watch, state: str) -> None:
        if w.state == state:
            return
        w.state, w.since = state, time.monotonic()
        if self.on_change:
            try:
                self.on_change(w.node_id, state)
            except Exception:  # a listener's bug must not stop the heartbeats
                pass

    def _connect(self, w: _Watch) -> NodeClient | None:
        timeout = max(0.2, min(1.0, self.lost_after_s / 3))
        for address in w.addresses:
            try:
                client = NodeClient(address, w.port, self.secret, self.cluster, timeout=timeout)
                w.address = address
                return client
            except Exception:
                continue
        return None

    def _run(self, w: _Watch) -> None:
        client: NodeClient | None = None
        try:
            while not w.stop.is_set():
                t0 = time.monotonic()
                try:
                    client = client or self._connect(w)
                    if client is not None:
                        client.settimeout(max(0.2, min(1.0, self.lost_after_s / 3)))
                        client.ping()
                        w.last_ok = time.monotonic()
                        w.rtt_ms = round((w.last_ok - t0) * 1000, 2)
                        self._set(w, "ok")
                except Exception:
                    if client is not None:
                        client.close()
                    client = None
                if time.monotonic() - w.last_ok > self.lost_after_s:
                    self._set(w, "lost")
                w.stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))
        finally:
            if client is not None:
                client.close()
