"""Hosts without a cluster: one Linux network namespace per host, joined by a bridge, for tests that
run processes as if on separate machines (root only).

Layout, for hosts h0..hN on the subnet 10.231.X.0/24 (X one that no route of this machine uses):

    namespace TAG-switch   bridge br0, a port pI per host and one, `root`, for the test itself
    namespace TAG-hI       lo up, eth0 = 10.231.X.(I+2), /etc/hosts from /etc/netns/TAG-hI/hosts
    root namespace         veth TAG = 10.231.X.1 (the test process reaches every host from here)

Lifecycle: `HostNetwork(names).create()` builds it (raises `NetnsUnavailable` when it cannot: not
root, no `ip`, no namespaces); `resolve({name: ip})` gives every host the same /etc/hosts entries
(what a cluster's DNS would answer); `start(host, argv, env, log, cwd)` runs a process in a host
(`ip netns exec`, in a session of its own, killed when the test process dies); `stop(procs)` ends
some of them (SIGTERM, then SIGKILL); `destroy()` stops the rest, then removes the namespaces, links
and files it made, and may be called at any point, even after a failed `create()`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deploy.procs import die_with_parent

NETNS_ETC = Path("/etc/netns")   # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
SUBNETS = ipaddress.ip_network("10.231.0.0/16")


class NetnsUnavailable(RuntimeError):
    """This machine cannot give a test network namespaces (the reason is the message)."""


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    ip: str


def ip_cmd(*args: str) -> None:
    """`ip ARGS`; a failure raises NetnsUnavailable with ip's own message."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.231.0.0/16 that no address or route of this machine falls in."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    used = {ipaddress.ip_address(a) for a in re.findall(r"\b10\.231\.\d+\.\d+", routes + addrs)}
    nets = list(SUBNETS.subnets(new_prefix=24))
    start = random.randrange(len(nets))   # two test processes at once are unlikely to pick the same one
    for net in nets[start:] + nets[:start]:
        if not any(a in net for a in used):
            return net
    raise NetnsUnavailable("every /24 of 10.231.0.0/16 is in use on this machine")


@dataclass
class HostNetwork:
    names: list[str]
    tag: str = field(default_factory=lambda: f"epd{uuid.uuid4().hex[:8]}")   # also the root's veth (<= 15 chars)
    hosts: dict[str, Host] = field(default_factory=dict)
    gateway: str = ""                                                # the test process's address
    procs: list[subprocess.Popen] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)                   # namespaces to delete
    _made_etc: bool = False                                          # whether it made /etc/netns

    def create(self) -> HostNetwork:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("`ip` (iproute2) is not on PATH")
        net = free_subnet()
        addresses = list(net.hosts())
        switch = self._netns("switch")
        ip_cmd("-n", switch, "link", "add", "br0", "type", "bridge")
        ip_cmd("-n", switch, "link", "set", "br0", "up")
        self.gateway = str(addresses[0])
        ip_cmd("link", "add", self.tag, "type", "veth", "peer", "name", "root", "netns", switch)
        self._plug(switch, "root")
        ip_cmd("addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.tag)
        ip_cmd("link", "set", self.tag, "up")
        for i, name in enumerate(self.names):
            host = Host(name, self._netns(f"h{i}"), str(addresses[i + 1]))
            ip_cmd("link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", f"p{i}",
                   "netns", switch)
            self._plug(switch, f"p{i}")
            ip_cmd("-n", host.netns, "addr", "add", f"{host.ip}/{net.prefixlen}", "dev", "eth0")
            for link in ("lo", "eth0"):
                ip_cmd("-n", host.netns, "link", "set", link, "up")
            self.hosts[name] = host
        ip_cmd("netns", "exec", switch, "true")   # a process can enter one (it needs mount rights too)
        return self

    def _netns(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        ip_cmd("netns", "add", name)
        self._made.append(name)
        return name

    @staticmethod
    def _plug(switch: str, port: str) -> None:
        ip_cmd("-n", switch, "link", "set", port, "master", "br0")
        ip_cmd("-n", switch, "link", "set", port, "up")

    def resolve(self, names: dict[str, str]) -> None:
        """Every host resolves each of `names` to its address (and localhost to loopback)."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 *(f"{ip} {name}" for name, ip in names.items())]
        self._made_etc = self._made_etc or not NETNS_ETC.exists()
        for host in self.hosts.values():
            (NETNS_ETC / host.netns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.netns / "hosts").write_text("\n".join(lines) + "\n")

    def start(self, host: Host, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen] | None = None, grace_s: float = 15.0) -> None:
        """SIGTERM `procs` (default: every process started here) at once; SIGKILL (its whole session)
        what is left of them after grace_s."""
        procs = self.procs if procs is None else procs
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def destroy(self) -> None:
        self.stop()
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
            shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
        # its peer went with the switch's namespace, but that is torn down asynchronously
        subprocess.run(["ip", "link", "delete", self.tag], capture_output=True)
        self._made.clear()
        if self._made_etc and NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):
            NETNS_ETC.rmdir()
