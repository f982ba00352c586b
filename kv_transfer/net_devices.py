"""Which network devices UCX may use in a process told to bind one address (a node's --host).

ucxx cannot bind its listener to an address: `ApplicationContext.create_listener` takes a port
only, and its C++ `Listener` resolves `getaddrinfo(NULL, port, AI_PASSIVE)`, the wildcard (ucxx
0.52 as installed, and upstream: rapidsai/ucxx#299; the C++ `ListenerBuilder::host` of #703 has no
Python binding). No UCX variable moves that socket either. What a node can narrow is UCX's
transports: over TCP, UCX opens one more listening socket per network interface it uses (its
wire-up, on a random port). `narrowed_options` gives UCX_NET_DEVICES the interface that carries
the bind address (plus the host's RDMA ports, which open no IP socket), so with --host 127.0.0.1
the listener's port is the one UCX socket reachable from another machine, and it reads nothing
from a peer that does not prove the cluster secret (`kv_transfer.auth`). An operator's own
UCX_NET_DEVICES wins.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct

log = logging.getLogger("kv_transfer.transport")
WILDCARDS = frozenset({"", "*", "0.0.0.0", "::"})
_SIOCGIFADDR = 0x8915


def narrowed_options(bind: str | None, options: dict[str, str]) -> dict[str, str]:
    """`options` (UCX config without the UCX_ prefix), with NET_DEVICES narrowed to the devices
    for `bind` when it is one address, and neither `options` nor the environment names devices."""
    if bind is None or bind in WILDCARDS or "NET_DEVICES" in options or "UCX_NET_DEVICES" in os.environ:
        return options
    devices = net_devices(bind)
    if not devices:
        log.warning("no network interface carries %s: UCX keeps every interface", bind)
        return options
    return {**options, "NET_DEVICES": ",".join(devices)}


def net_devices(bind: str) -> list[str]:
    """UCX device names for a process bound to `bind` (an address or a host name): the interface
    carrying it, then (bound to a routable address) every RDMA port; [] when none carries it."""
    try:
        address = ipaddress.ip_address(socket.getaddrinfo(bind, None)[0][4][0].split("%")[0])
    except (OSError, ValueError):
        return []
    if address.is_loopback:
        return ["lo"]
    interface = _interface_of(address)
    return [interface, *_rdma_ports()] if interface else []


def _interface_of(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if address.version == 6:
        try:
            with open("/proc/net/if_inet6") as f:   # hex address, index, prefix, scope, flags, name
                rows = [line.split() for line in f]
        except OSError:
            return None
        return next((row[5] for row in rows if len(row) == 6 and row[0] == address.exploded.replace(":", "")),
                    None)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:   # struct ifreq: 16 bytes of name, then a sockaddr_in (its address at bytes 4..8)
                reply = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:   # no IPv4 address
                continue
            if reply[20:24] == address.packed:
                return name
    return None


def _rdma_ports(root: str = "/sys/class/infiniband") -> list[str]:
    """UCX names of the host's RDMA ports ("mlx5_0:1"): they carry no IP listener of UCX's."""
    try:
        return [f"{dev}:{port}" for dev in sorted(os.listdir(root))
                for port in sorted(os.listdir(os.path.join(root, dev, "ports")))]
    except OSError:
        return []
