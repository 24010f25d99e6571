"""mDNS: advertise this node as `_mlxdist._tcp.local.` and keep a table of the peers of
the same cluster. The TXT record is small (each entry <= 255 bytes); the full shard list
and live health come over the control plane."""

from __future__ import annotations

import queue
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from mlxdist.cluster.interfaces import Interface

SERVICE_TYPE = "_mlxdist._tcp.local."
MAX_INTERFACES = 8
SHARDS_TXT_BYTES = 200


@dataclass(frozen=True)
class Peer:
    node_id: str
    name: str
    cluster: str
    version: str
    protocol: int
    chip: str
    memory_total: int
    memory_available: int
    gpu_cores: int
    bandwidth_gbs: float
    port: int
    addresses: tuple[str, ...]  # from the mDNS address records
    interfaces: tuple[Interface, ...]
    shards: tuple[str, ...]  # "model/stage@digest8", maybe truncated
    shard_count: int


def encode_txt(advert: dict[str, Any]) -> dict[str, str]:
    txt = {"id": advert["node_id"], "name": advert["name"][:63], "v": advert["version"],
           "proto": str(advert["protocol"]), "cluster": advert["cluster"][:63],
           "chip": advert["chip"][:63], "mem": str(advert["memory_total"]),
           "avail": str(advert["memory_available"]), "gpu": str(advert["gpu_cores"]),
           "bw": str(advert["bandwidth_gbs"])}
    for i, iface in enumerate(advert["interfaces"][:MAX_INTERFACES]):
        addrs = ",".join(iface["addresses"])[:200]
        txt[f"if{i}"] = f"{iface['name'][:15]}|{int(iface['thunderbolt'])}|{addrs}"
    shards = [f"{s['model']}/{s['stage']}@{s['digest'][:8]}" for s in advert["shards"]]
    kept: list[str] = []
    for s in shards:  # keep whole entries only, within the budget
        if len(",".join(kept + [s])) > SHARDS_TXT_BYTES:
            break
        kept.append(s)
    txt["sh"], txt["shn"] = ",".join(kept), str(len(shards))
    return txt


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text or default)
    except ValueError:
        return default


def decode_txt(props: dict[str, str], addresses: Sequence[str], port: int) -> Peer | None:
    if not props.get("id"):
        return None
    interfaces = []
    for i in range(MAX_INTERFACES):
        parts = props.get(f"if{i}", "").split("|")
        if len(parts) == 3:
            interfaces.append(Interface(parts[0], tuple(a for a in parts[2].split(",") if a),
                                        parts[1] == "1"))
    try:
        bw = float(props.get("bw") or 0)
    except ValueError:
        bw = 0.0
    return Peer(props["id"], props.get("name", ""), props.get("cluster", ""),
                props.get("v", ""), _int(props.get("proto")), props.get("chip", ""),
                _int(props.get("mem")), _int(props.get("avail")), _int(props.get("gpu")), bw,
                port, tuple(addresses), tuple(interfaces),
                tuple(s for s in props.get("sh", "").split(",") if s), _int(props.get("shn")))


def _instance_name(advert: dict[str, Any]) -> str:
    label = re.sub(r"[^A-Za-z0-9-]", "-", advert["name"])[:40] or "node"
    return f"{label}-{advert['node_id'][:8]}.{SERVICE_TYPE}"


class Discovery:
    """Advertise (optional) and browse. `on_peer(peer, present)` is called from our own
    thread when a peer of our cluster appears, changes or says goodbye."""

    def __init__(self, cluster: str, mdns_addresses: Sequence[str] = (),
                 on_peer: Callable[[Peer, bool], None] | None = None) -> None:
        self.cluster = cluster
        interfaces: Any = list(mdns_addresses) if mdns_addresses else None
        kwargs = {"interfaces": interfaces} if interfaces else {}
        self.zc = Zeroconf(ip_version=IPVersion.V4Only, **kwargs)
        self.on_peer = on_peer
        self._peers: dict[str, Peer] = {}
        self._names: dict[str, str] = {}  # service name -> node id
        self._lock = threading.Lock()
        self._events: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=1024)
        self._info: ServiceInfo | None = None
        self._browser: ServiceBrowser | None = None
        self._worker = threading.Thread(target=self._resolve_loop, daemon=True)

    def _service_info(self, advert: dict[str, Any]) -> ServiceInfo:
        addrs = [a.split("/")[0] for i in advert["interfaces"] for a in i["addresses"]]
        return ServiceInfo(SERVICE_TYPE, _instance_name(advert),
                           addresses=[socket.inet_aton(a) for a in addrs], port=advert["port"],
                           properties=encode_txt(advert),
                           server=f"mlxdist-{advert['node_id']}.local.")

    def start(self, advert: dict[str, Any] | None = None) -> None:
        self._worker.start()
        if advert is not None:
            self._info = self._service_info(advert)
            self.zc.register_service(self._info, allow_name_change=True)
        self._browser = ServiceBrowser(self.zc, SERVICE_TYPE, listener=_Listener(self))

    def update(self, advert: dict[str, Any]) -> None:
        if self._info is None:
            return
        info = self._service_info(advert)
        info.name = self._info.name  # keep the registered (maybe renamed) instance
        self._info = info
        self.zc.update_service(info)

    def peers(self) -> dict[str, Peer]:
        with self._lock:
            return dict(self._peers)

    def close(self) -> None:
        self._events.put(None)
        try:
            if self._browser:
                self._browser.cancel()
            if self._info:
                self.zc.unregister_service(self._info)
        finally:
            self.zc.close()

    def _queue(self, kind: str, name: str) -> None:
        try:
            self._events.put_nowait((kind, name))
        except queue.Full:
            pass  # a flood of announcements: drop, the next one will do

    def _resolve_loop(self) -> None:
        while (event := self._events.get()) is not None:
            kind, name = event
            if kind == "remove":
                with self._lock:
                    nid = self._names.pop(name, None)
                    peer = self._peers.pop(nid, None) if nid else None
                if peer and self.on_peer:
                    self.on_peer(peer, False)
                continue
            try:
                info = self.zc.get_service_info(SERVICE_TYPE, name, timeout=2000)
            except Exception:
                info = None
            if info is None:
                continue
            props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                     for k, v in info.properties.items()}
            peer = decode_txt(props, info.parsed_addresses(IPVersion.V4Only), info.port or 0)
            if peer is None or peer.cluster != self.cluster:
                continue
            with self._lock:
                self._names[name] = peer.node_id
                self._peers[peer.node_id] = peer
            if self.on_peer:
                self.on_peer(peer, True)


class _Listener(ServiceListener):
    def __init__(self, discovery: Discovery) -> None:
        self.d = discovery

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.d._queue("add", name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.d._queue("update", name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.d._queue("remove", name)
