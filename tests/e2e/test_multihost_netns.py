"""The cpu-demo overlay's pods as processes on separate hosts, without a cluster.

Every Deployment of `kubectl kustomize deploy/k8s/overlays/cpu-demo` (Redis, the router, the
encoder, prefill and decode pools) runs its containers' command lines and environments, as
rendered, in a Linux network namespace of its own: one "host" each, with its own address on a
bridge (tests/netns_support.py). No process is told another's address: the router and the nodes
get the Redis Service's name, and reach each other only at the addresses the registry publishes.
A chat completion with an image, sent from the test's namespace to the router's address, must
equal transformers' greedy answer on the same checkpoint; the manifests' probes must answer on the
manifests' ports, and the registry must publish each node at its own host's address.

What the test stands in for, as a cluster would provide it, and nothing else:
- the pod IP (the downward API's `status.podIP`: POD_IP, the nodes' --advertise-host) is its
  namespace's address, 10.231.X.N;
- cluster DNS: each Service's name (epd-redis, epd-router) resolves in every namespace to the
  address of the pod it selects (/etc/netns/NS/hosts, which `ip netns exec` puts on /etc/hosts);
- volumes: each is one directory of the test's, shared by the pods that mount it: a Secret's
  keys as files (the cluster secret keeps the manifests' placeholder value), the emptyDir `model`
  that the init containers fill (`epd tiny-model`, seeded: every pod's would write the same
  checkpoint, so that command runs once), the emptyDir `cache` (HOME). Nothing is mounted: a
  mount path on a command line or in the environment is rewritten to its directory;
- images: the epd image's `epd` is this checkout (`python -m epd.cli`, this interpreter), the
  redis image's entrypoint is `redis-server` from PATH, and each process's environment is the
  test's own with the container's on top;
- the processes run as the test's user (root), not the pods' runAsUser, without resource limits.
Probes are the manifests' own (httpGet, tcpSocket, exec inside the pod's namespace), asked from
the test's namespace as a kubelet would ask them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import redis
from k8s_support import Rendered, container_env, expand, referenced, render
from netns_support import Host, HostNetwork, NetnsUnavailable
from openai_support import IDS, assert_matches, data_uri, image_part, reference
from prometheus_client.parser import text_string_to_metric_families
from support import noise_image, png_bytes

from kv_transfer.auth import ClusterSecret
from kv_transfer.registry import NodeInfo, NodeRegistry

OVERLAY = "overlays/cpu-demo"
NODE_ROLES = ("encoder", "prefill", "decode")
ENTRYPOINTS = {"epd": [sys.executable, "-m", "epd.cli"]}   # an image's command -> what runs it here
IMAGE_COMMANDS = {"redis": ["redis-server"]}   # the command of an image whose container gives only args
START_TIMEOUT_S = 120.0
MAX_TOKENS = 8

pytestmark = pytest.mark.skipif(not (shutil.which("kubectl") and shutil.which("redis-server")),
                                reason="kubectl (renders the overlay) or redis-server (the redis image) is not on PATH")


@dataclass
class Proc:
    """One container of a pod, as the process that runs it on the pod's host."""
    where: str                       # Deployment/container
    host: Host
    container: dict[str, Any]
    argv: list[str]
    env: dict[str, str]              # the container's (mount paths rewritten)
    log: Path
    popen: subprocess.Popen | None = None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.where} ({' '.join(self.argv)}):\n" + "\n".join(text.splitlines()[-lines:])

    def port(self, port: int | str) -> int:
        """A probe's port: a number, or a containerPort's name."""
        named = {p["name"]: p["containerPort"] for p in self.container.get("ports", []) if "name" in p}
        return port if isinstance(port, int) else named[port]


@dataclass
class Pod:
    deployment: dict[str, Any]
    host: Host
    init: list[Proc]
    main: Proc

    @property
    def component(self) -> str:
        return self.deployment["metadata"]["labels"]["app.kubernetes.io/component"]

    @property
    def annotations(self) -> dict[str, str]:
        return self.deployment["spec"]["template"]["metadata"].get("annotations", {})


@dataclass
class Volumes:
    """Each volume name is one directory under `root`, the same for every pod that mounts it."""
    rendered: Rendered
    root: Path
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def of(self, spec: dict[str, Any], where: str) -> dict[str, Path]:
        out = {}
        for v in spec.get("volumes", []):
            name, source = v["name"], {k: s for k, s in v.items() if k != "name"}
            assert self.sources.setdefault(name, source) == source, f"{where}: volume {name} differs between pods"
            out[name] = self.root / name
            out[name].mkdir(parents=True, exist_ok=True)
            if "secret" in v:
                for key, value in referenced(self.rendered, "Secret", v["secret"]["secretName"], None, where).items():
                    (out[name] / key).write_text(value)
                    (out[name] / key).chmod(v["secret"].get("defaultMode", 0o644))
            else:
                assert "emptyDir" in v, f"{where}: volume {name} is neither a Secret nor an emptyDir: {source}"
        return out


def on_host(text: str, mounts: dict[str, Path]) -> str:
    """`text` with each mount path at the start of a path in it replaced by its volume's directory."""
    for mount in sorted(mounts, key=len, reverse=True):
        text = re.sub(rf"(?<![\w./-]){re.escape(mount)}(?=/|$)", str(mounts[mount]), text)
    return text


def process_of(r: Rendered, where: str, c: dict[str, Any], host: Host, volumes: dict[str, Path],
               workdir: Path) -> Proc:
    env = container_env(r, c, where, {"status.podIP": host.ip})
    image = c["image"].rsplit("/", 1)[-1].split(":")[0]
    argv = [expand(a, env, where) for a in (c.get("command") or IMAGE_COMMANDS[image]) + c.get("args", [])]
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
    argv = ENTRYPOINTS.get(argv[0], argv[:1]) + [on_host(a, mounts) for a in argv[1:]]
    env = {k: on_host(v, mounts) for k, v in env.items()}
    return Proc(where, host, c, argv, env, workdir / f"{c['name']}.log")


def pods_of(r: Rendered, network: HostNetwork, root: Path) -> dict[str, Pod]:
    """Every Deployment's pod (one replica), by Deployment name, on the host of that name."""
    volumes, pods = Volumes(r, root / "volumes"), {}
    for d in r.of("Deployment"):
        name, spec = d["metadata"]["name"], d["spec"]["template"]["spec"]
        assert len(spec["containers"]) == 1, f"{name}: {len(spec['containers'])} containers"
        workdir = root / name
        workdir.mkdir()
        mounted = volumes.of(spec, name)
        procs = [process_of(r, f"{name}/{c['name']}", c, network.hosts[name], mounted, workdir)
                 for c in spec.get("initContainers", []) + spec["containers"]]
        pods[name] = Pod(d, network.hosts[name], procs[:-1], procs[-1])
    return pods


def probe_ok(proc: Proc, probe: dict[str, Any]) -> bool:
    """One probe as the kubelet asks it (exec runs inside the pod's network namespace)."""
    timeout = probe.get("timeoutSeconds", 1)
    if "exec" in probe:
        out = subprocess.run(["ip", "netns", "exec", proc.host.netns, *probe["exec"]["command"]],
                             env=os.environ | proc.env, capture_output=True, timeout=timeout + 5)
        return out.returncode == 0
    check = probe.get("httpGet") or probe["tcpSocket"]
    port = proc.port(check["port"])
    try:
        if "httpGet" in probe:
            return 200 <= httpx.get(f"http://{proc.host.ip}:{port}{check['path']}", timeout=timeout).status_code < 400
        socket.create_connection((proc.host.ip, port), timeout=timeout).close()
        return True
    except (httpx.HTTPError, OSError):
        return False


def start(network: HostNetwork, proc: Proc) -> None:
    proc.popen = network.start(proc.host, proc.argv, os.environ | proc.env, proc.log, proc.log.parent)


def run_init_containers(network: HostNetwork, pods: dict[str, Pod]) -> None:
    """Each distinct init command once (pods share their volumes), all at once; each must exit 0."""
    unique = list({tuple(p.argv): p for pod in pods.values() for p in pod.init}.values())
    for proc in unique:
        start(network, proc)
    for proc in unique:
        assert proc.popen.wait(START_TIMEOUT_S) == 0, f"init container failed:\n{proc.tail()}"


def wait_ready(pods: dict[str, Pod]) -> None:
    """Until every pod's startup probe (else its readiness probe) passes."""
    pending = dict(pods)
    deadline = time.monotonic() + START_TIMEOUT_S
    while pending:
        for name, pod in list(pending.items()):
            assert pod.main.popen.poll() is None, f"{name} exited with {pod.main.popen.returncode}:\n{pod.main.tail()}"
            if probe_ok(pod.main, pod.main.container.get("startupProbe") or pod.main.container["readinessProbe"]):
                del pending[name]
        if pending and time.monotonic() > deadline:
            logs = "\n".join(p.main.tail() for p in pending.values())
            pytest.fail(f"not ready after {START_TIMEOUT_S}s: {sorted(pending)}\n{logs}")
        time.sleep(0.25)


@dataclass
class Cluster:
    rendered: Rendered
    pods: dict[str, Pod]
    addresses: dict[str, str]        # what cluster DNS would answer: {Service name: pod IP}

    def pod(self, component: str) -> Pod:
        return next(p for p in self.pods.values() if p.component == component)

    def service(self, name: str) -> tuple[str, int]:
        """Where a Service sends its first port: the selected pod's address and target port."""
        svc = self.rendered.get("Service", name)
        pod = self.pod(svc["spec"]["selector"]["app.kubernetes.io/component"])
        return pod.host.ip, pod.main.port(svc["spec"]["ports"][0]["targetPort"])

    def registered(self) -> dict[str, list[NodeInfo]]:
        """The registry's signed entries, by role, from the Redis URL the pods get (its host name
        resolved as the cluster's DNS would)."""
        url = urlsplit(self.pod("encoder").main.env["EPD_REDIS_URL"])
        client = redis.Redis(host=self.addresses[url.hostname], port=url.port, password=url.password,
                             db=int(url.path.lstrip("/") or 0), decode_responses=True)
        secret = ClusterSecret.load(next(a.split("=", 1)[1] for a in self.pod("encoder").main.argv
                                         if a.startswith("--cluster-secret-file=")))
        try:
            return {role: NodeRegistry(client, secret).list_nodes(role) for role in NODE_ROLES}
        finally:
            client.close()


def service_addresses(r: Rendered, network: HostNetwork) -> dict[str, str]:
    by_component = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["metadata"]["name"]
                    for d in r.of("Deployment")}
    return {s["metadata"]["name"]: network.hosts[by_component[s["spec"]["selector"]["app.kubernetes.io/component"]]].ip
            for s in r.of("Service")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("multihost")
    rendered = render(OVERLAY, OVERLAY)
    network = HostNetwork([d["metadata"]["name"] for d in rendered.of("Deployment")])
    pods: dict[str, Pod] = {}
    try:
        try:
            network.create()
        except NetnsUnavailable as e:
            pytest.skip(f"no network namespaces here: {e}")
        addresses = service_addresses(rendered, network)
        network.resolve(addresses)
        pods = pods_of(rendered, network, root)
        run_init_containers(network, pods)
        for pod in pods.values():
            start(network, pod.main)
        wait_ready(pods)
        yield Cluster(rendered, pods, addresses)
    finally:   # Redis last: the nodes leave the registry as they drain
        network.stop([p.main.popen for p in pods.values() if p.main.popen and p.component != "redis"])
        network.destroy()


def test_chat_with_an_image_through_the_router_equals_transformers(cluster):
    ip, port = cluster.service("epd-router")
    router = cluster.pod("router").main
    client = openai.OpenAI(base_url=f"http://{ip}:{port}/v1", api_key="none", max_retries=0, timeout=60)
    image = png_bytes(noise_image(96, 64, seed=7))
    content = [{"type": "text", "text": "What is in this picture?"}, image_part(data_uri(image))]
    resp = client.chat.completions.create(model=router.env["EPD_SERVED_MODEL_NAME"], max_tokens=MAX_TOKENS,
                                          messages=[{"role": "user", "content": content}], temperature=0, **IDS)
    prompt_ids, expected = reference(router.env["EPD_MODEL"], content, [image], MAX_TOKENS)
    assert_matches(resp, prompt_ids, expected, MAX_TOKENS)


def test_every_probe_answers_on_the_manifests_ports(cluster):
    for pod in cluster.pods.values():
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in pod.main.container:
                assert probe_ok(pod.main, pod.main.container[kind]), f"{pod.main.where}: {kind} fails at {pod.host.ip}"


def test_the_registry_publishes_each_node_at_its_own_hosts_address(cluster):
    registered = cluster.registered()
    for role in NODE_ROLES:
        pod = cluster.pod(role)
        assert len(registered[role]) == 1, f"{role}: {registered[role]}"
        info = registered[role][0]
        assert info.zmq == f"{pod.host.ip}:{pod.main.port('control')}", f"{role}: {info}"
        assert info.http == f"{pod.host.ip}:{pod.main.port('http')}", f"{role}: {info}"
        assert info.ucx.rpartition(":")[0] == pod.host.ip, f"{role}: {info}"


def scrape(pod: Pod) -> list[tuple[str, dict[str, str], float]]:
    """What a Prometheus that scrapes annotated pods reads from `pod`: (name, labels, value)."""
    notes = pod.annotations
    assert notes.get("prometheus.io/scrape") == "true", f"{pod.main.where}: not scraped"
    url = f"http://{pod.host.ip}:{notes['prometheus.io/port']}{notes['prometheus.io/path']}"
    resp = httpx.get(url, timeout=5)
    assert resp.status_code == 200, f"{url}: {resp.status_code}"
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(resp.text) for s in f.samples]


def test_metrics_answer_where_the_pods_annotations_say(cluster):
    registered = cluster.registered()
    for role in NODE_ROLES:   # a node's series name the node registered at that address
        nodes = {labels.get("node") for _, labels, _ in scrape(cluster.pod(role)) if labels.get("role") == role}
        assert nodes == {registered[role][0].node_id}, f"{role}: series of {nodes}"
    sizes = {labels["pool"]: v for name, labels, v in scrape(cluster.pod("router")) if name == "epd:pool_size"}
    assert {role: sizes.get(role) for role in NODE_ROLES} == dict.fromkeys(NODE_ROLES, 1.0), f"pools: {sizes}"
