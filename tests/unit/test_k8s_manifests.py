"""deploy/k8s: every overlay renders with kustomize into objects valid against Kubernetes' schemas,
and what an operator would trip over holds: each EPD command line parses with EPD's own parsers,
every $(VAR) it uses is defined, probes and ports are the ones the command serves, pods outlive
their drain, selectors select, and every Secret, ConfigMap and volume referenced is there."""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from k8s_support import K8S, Rendered, container_env, expand, referenced, render

from epd.engine.engine_args import engine_flags
from epd.node.runtime import NodeArgs
from kv_transfer.auth import ClusterSecret
from router.main import build_parser
from router.metrics import RouterMetrics
from router.node_stats import gauges

K8S_VERSION = "1.30"          # the oldest Kubernetes the manifests are written for
NODE_ROLES = ("encoder", "prefill", "decode")
FIELD_VALUES = {"status.podIP": "10.1.2.3"}   # the downward API, as a pod would see it
# each overlay, and one with the external-Redis component added: {variant: components}
VARIANTS = {f"overlays/{p.name}": () for p in sorted((K8S / "overlays").iterdir())} | {
    "overlays/cpu-demo+external-redis": ("components/external-redis",)}

pytestmark = pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not on PATH (it renders the overlays)")


@dataclass(frozen=True, eq=False)   # hashed by identity: parse() caches per container
class EpdContainer:
    """One container running `epd ...`, its environment resolved and its command line expanded."""
    rendered: Rendered
    deployment: dict[str, Any]
    spec: dict[str, Any]           # the pod spec
    container: dict[str, Any]
    env: dict[str, str]
    argv: list[str]                # command + args, $(VAR) expanded
    init: bool
    workdir: Path                  # where the cluster secret's file is copied to

    @property
    def where(self) -> str:
        return f"{self.rendered.name}: {self.deployment['metadata']['name']}/{self.container['name']}"

    @property
    def role(self) -> str:
        return self.argv[1]


@pytest.fixture(scope="module", params=list(VARIANTS))
def rendered(request, tmp_path_factory) -> Rendered:
    variant = request.param
    return render(variant, variant.split("+")[0], VARIANTS[variant], str(tmp_path_factory.getbasetemp()))


def epd_containers(r: Rendered, workdir: Path) -> list[EpdContainer]:
    out = []
    for d in r.of("Deployment"):
        spec = d["spec"]["template"]["spec"]
        for init, c in [(True, c) for c in spec.get("initContainers", [])] + [(False, c) for c in spec["containers"]]:
            if c["image"].rsplit("/", 1)[-1].split(":")[0] != "epd":
                continue
            where = f"{r.name}: {d['metadata']['name']}/{c['name']}"
            env = container_env(r, c, where, FIELD_VALUES)
            argv = [expand(a, env, where) for a in c.get("command", []) + c.get("args", [])]
            out.append(EpdContainer(r, d, spec, c, env, argv, init, workdir))
    assert out, f"{r.name}: no container runs the epd image"
    return out


@functools.cache
def parse(c: EpdContainer) -> argparse.Namespace | NodeArgs:
    """The container's command line through the parser its process uses, in the container's env (a
    refused one exits, as the process would, with argparse's message on stderr)."""
    assert c.argv[0] == "epd", f"{c.where}: runs {c.argv[:1]}, not epd"
    with mock.patch.dict(os.environ, c.env, clear=True):
        if c.role in NODE_ROLES:   # the whole of a node's start-up checks: Redis URL, cluster secret
            argv = [f"--cluster-secret-file={secret_copy(c)}" if a.startswith("--cluster-secret-file")
                    else a for a in c.argv[2:]]
            return NodeArgs.from_cli(c.role, argv)
        if c.role == "router":   # its cluster secret is read once it starts its backend
            ClusterSecret.load(str(secret_copy(c)))
            return build_parser().parse_args(c.argv[2:])
        assert c.role == "tiny-model", f"{c.where}: unknown epd command {c.role!r}"
        with mock.patch("epd.models.tiny_model.write_tiny_model", side_effect=lambda *a: a[1]) as write:
            from epd.cli import main
            assert main(c.argv[1:]) == 0
        return argparse.Namespace(arch=write.call_args.args[0], out_dir=write.call_args.args[1])


def secret_copy(c: EpdContainer) -> Path:
    """The file --cluster-secret-file names, as the pod would see it (from its Secret volume), copied."""
    path = next(a.split("=", 1)[1] for a in c.argv if a.startswith("--cluster-secret-file="))
    mount = next((m for m in c.container.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/")), None)
    assert mount is not None, f"{c.where}: --cluster-secret-file {path} is on no volume of the container"
    volume = next(v for v in c.spec["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume, f"{c.where}: {path} is on volume {volume['name']}, not a Secret's"
    copy = c.workdir / re.sub(r"\W", "_", c.where)
    key = os.path.relpath(path, mount["mountPath"])
    copy.write_text(str(referenced(c.rendered, "Secret", volume["secret"]["secretName"], key, c.where)))
    return copy


def flag(c: EpdContainer, name: str) -> str | None:
    """The last value the command line gives `name` (as --name=V or --name V), else None."""
    values = [v for a, v in zip(c.argv, c.argv[1:] + [""], strict=True) if a == name]
    return ([*values, *(a.split("=", 1)[1] for a in c.argv if a.startswith(name + "="))] or [None])[-1]


def served_ports(c: EpdContainer, parsed: Any) -> dict[str, int]:
    """What the command line makes the process listen on: {purpose: port}."""
    return {"http": parsed.port} if c.role == "router" else {"control": parsed.port, "http": parsed.http_port}


def port_number(c: EpdContainer, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c.container.get("ports", []) if "name" in p}
    assert port in named, f"{c.where}: port {port!r} is named by no containerPort ({named})"
    return named[port]


@pytest.fixture
def containers(rendered, tmp_path) -> list[EpdContainer]:
    return epd_containers(rendered, tmp_path)


def test_every_rendered_object_is_valid_kubernetes(rendered):
    kinds = {o["kind"] for o in rendered.objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "Secret", "ConfigMap"} <= kinds
    for obj in rendered.objects:
        try:   # strict: a misspelt field (readinessProbes, maxSurg) is an error, not ignored
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{rendered.name}: {obj['kind']} {obj['metadata']['name']}: {e.message} at {e.path}")


def test_every_pool_and_the_router_run_from_one_image(rendered, containers):
    roles = {c.role for c in containers if not c.init}
    assert roles == {*NODE_ROLES, "router"}, f"{rendered.name}: pods run {sorted(roles)}"
    images = {c.container["image"] for c in containers}
    assert len(images) == 1, f"{rendered.name}: the router and the nodes must speak one protocol: {images}"
    assert ":" in images.pop().rsplit("/", 1)[-1], f"{rendered.name}: an untagged image is :latest, never re-pulled"


def test_command_lines_parse_with_epd_parsers(containers):
    for c in containers:
        parsed = parse(c)
        if c.role in (*NODE_ROLES, "router"):   # SIGTERM's default drain, 30 s, is the default grace too
            assert flag(c, "--drain-timeout") is not None, f"{c.where}: --drain-timeout left to its default"
        if c.role in NODE_ROLES:
            assert parsed.host == "0.0.0.0", f"{c.where}: binds {parsed.host}: unreachable from other pods"
            assert flag(c, "--advertise-host") == FIELD_VALUES["status.podIP"], f"{c.where}: not the pod's IP"
            assert parsed.redis_url, f"{c.where}: no Redis URL"
        elif c.role == "router":
            assert parsed.backend == "disagg" and parsed.redis_url and parsed.host == "0.0.0.0", c.where
            engine, _ = engine_flags(c.argv[2:])   # a router over pools refuses the nodes' engine flags
            assert not [f for f in engine if f.startswith("--") and f != "--max-model-len"], f"{c.where}: {engine}"


def test_the_model_each_process_loads_is_on_its_volumes(containers):
    writers = {id(c.spec): parse(c).out_dir for c in containers if c.init and c.role == "tiny-model"}
    for c in (c for c in containers if not c.init):
        model = flag(c, "--model")
        mounts = [m["mountPath"] for m in c.container.get("volumeMounts", [])]
        assert model and any(model.startswith(m + "/") for m in mounts), f"{c.where}: --model {model} not mounted"
        if id(c.spec) in writers:
            assert model == writers[id(c.spec)], f"{c.where}: loads {model}, the init container writes elsewhere"


def test_probes_ask_the_port_the_command_serves_for_health(containers):
    for c in (c for c in containers if not c.init):
        ports = served_ports(c, parse(c))
        probes = {k: c.container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c.container}
        assert {"readinessProbe", "livenessProbe"} <= probes.keys(), f"{c.where}: probes {sorted(probes)}"
        for kind, probe in probes.items():
            check = probe.get("httpGet") or probe.get("tcpSocket")
            assert check is not None, f"{c.where}: {kind} is neither httpGet nor tcpSocket"
            assert port_number(c, check["port"]) == ports["http"], f"{c.where}: {kind} on a port {c.role} leaves"
            assert "httpGet" not in probe or check["path"] == "/health", f"{c.where}: {kind} asks {check['path']}"
        assert "httpGet" in probes["readinessProbe"], f"{c.where}: readiness must ask /health"


def test_declared_ports_are_the_ones_the_command_serves(containers):
    for c in (c for c in containers if not c.init):
        served = served_ports(c, parse(c))
        assert all(served.values()), f"{c.where}: a port of 0 is picked at random: {served}"
        declared = {p["containerPort"] for p in c.container.get("ports", [])}
        assert declared == set(served.values()), f"{c.where}: declares {declared}, serves {served}"
        scrape = c.deployment["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/port")
        assert scrape in (None, str(served["http"])), f"{c.where}: /metrics scraped on {scrape}"


def test_pods_outlive_their_drain(containers):
    for c in (c for c in containers if not c.init):
        drain = float(flag(c, "--drain-timeout") or 30.0)   # 30: both parsers' default
        stop = c.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_stop = float(stop[1]) if stop[:1] == ["sleep"] else 0.0
        grace = c.spec.get("terminationGracePeriodSeconds", 30)
        assert grace > pre_stop + drain, f"{c.where}: killed after {grace}s, drains {pre_stop}+{drain}s"


def pods_selected(r: Rendered, selector: dict[str, str]) -> list[str]:
    return [d["metadata"]["name"] for d in r.of("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]


def test_services_and_disruption_budgets_select_one_deployment_each(rendered):
    for d in rendered.of("Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for svc in rendered.of("Service"):
        name = svc["metadata"]["name"]
        [target] = pods_selected(rendered, svc["spec"]["selector"]) or [f"{name} selects nothing"]
        pod = rendered.get("Deployment", target)["spec"]["template"]["spec"]
        ports = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])} | \
            {p["name"] for c in pod["containers"] for p in c.get("ports", []) if "name" in p}
        assert all(p["targetPort"] in ports for p in svc["spec"]["ports"]), f"{name}: a targetPort {target} lacks"
    budgets = {}
    for pdb in rendered.of("PodDisruptionBudget"):
        [target] = pods_selected(rendered, pdb["spec"]["selector"]["matchLabels"]) or ["nothing"]
        budgets[target] = pdb["metadata"]["name"]
    pools = {f"epd-{role}" for role in (*NODE_ROLES, "router")}
    assert pools <= budgets.keys(), f"{rendered.name}: no disruption budget for {sorted(pools - budgets.keys())}"


def test_every_referenced_secret_configmap_and_claim_is_rendered(rendered):
    for d in rendered.of("Deployment"):
        spec, where = d["spec"]["template"]["spec"], d["metadata"]["name"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            container_env(rendered, c, where, FIELD_VALUES)   # every envFrom / valueFrom, key included
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, f"{where}: mounts a volume it lacks"
        for v in spec.get("volumes", []):
            if "secret" in v:
                referenced(rendered, "Secret", v["secret"]["secretName"], None, where)
            if "configMap" in v:
                referenced(rendered, "ConfigMap", v["configMap"]["name"], None, where)
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert rendered.get("PersistentVolumeClaim", claim), f"{rendered.name}: {where} mounts claim {claim}"
    for hpa in rendered.of("HorizontalPodAutoscaler"):
        assert rendered.get("Deployment", hpa["spec"]["scaleTargetRef"]["name"]), hpa["metadata"]["name"]


def test_the_redis_url_reaches_the_redis_that_is_deployed(rendered, containers):
    urls = {c.env["EPD_REDIS_URL"] for c in containers if not c.init}
    assert len(urls) == 1, f"{rendered.name}: the router and the nodes must share one Redis: {urls}"
    url = urlsplit(urls.pop())
    assert url.scheme in ("redis", "rediss"), url.scheme
    redis = rendered.get("Deployment", "epd-redis")
    if redis is None:   # an external Redis: nothing of ours to match
        assert "external-redis" in rendered.name, f"{rendered.name}: no Redis deployed and none given"
        return
    svc = rendered.get("Service", url.hostname)
    assert svc is not None, f"{rendered.name}: the Redis URL names {url.hostname}, which is no Service"
    assert url.port in {p["port"] for p in svc["spec"]["ports"]}
    env = container_env(rendered, redis["spec"]["template"]["spec"]["containers"][0], "epd-redis", FIELD_VALUES)
    assert url.password == env["REDIS_PASSWORD"], f"{rendered.name}: the URL's password is not Redis's"


def gpus(c: EpdContainer) -> int:
    return int(c.container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_gpus_are_asked_for_where_the_nodes_run_on_cuda(rendered, containers):
    expected = "cuda" if rendered.name.startswith("overlays/gpu-") else "cpu"
    for c in containers:
        device = parse(c).engine["device"] if not c.init and c.role in NODE_ROLES else None
        assert device in (None, expected), f"{c.where}: --device {device} in {rendered.name}"
        ranks = parse(c).engine["tensor_parallel_size"] if device == "cuda" else 0   # a process per GPU
        assert gpus(c) == ranks, f"{c.where}: --device {device}, {ranks} processes, {gpus(c)} GPU(s)"


def test_shared_gpu_memory_shares_fit_the_card_during_a_rollout(rendered, containers):
    shares = {c.where: parse(c).engine["gpu_memory_utilization"] for c in containers if gpus(c)}
    if not any(shares.values()):   # whole GPUs per pod (or none): nothing shares a card
        return
    assert all(shares.values()), f"{rendered.name}: a pod on the shared GPU takes its default share: {shares}"
    total = 0.0
    for c in (c for c in containers if gpus(c)):
        spec = c.deployment["spec"]
        replicas, strategy = spec.get("replicas", 1), spec.get("strategy", {})
        surge = 0 if strategy.get("type") == "Recreate" else strategy.get("rollingUpdate", {}).get("maxSurge", "25%")
        surge = math.ceil(replicas * int(surge[:-1]) / 100) if isinstance(surge, str) else surge
        total += (replicas + surge) * shares[c.where]
    assert total < 0.9, f"{rendered.name}: {total:.2f} of the card is promised (surge pods included)"


def router_series() -> dict[str, set[str]]:
    """The series the router's /metrics serves, with their `pool` values."""
    series: dict[str, set[str]] = {}
    for line in RouterMetrics("m").render(gauges({})).splitlines():
        if m := re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", line):
            series.setdefault(m.group(1), set()).update(re.findall(r'pool="(\w+)"', m.group(2) or ""))
    return series


def adapter_values(overlay: Path) -> Path:
    """The overlay's prometheus-adapter rules: its own, or those of the overlay it builds on."""
    own = overlay / "prometheus-adapter-values.yaml"
    if own.is_file():
        return own
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    for resource in kustomization.get("resources", []):
        if resource.startswith("../") and (overlay / resource / "kustomization.yaml").is_file():
            found = adapter_values((overlay / resource).resolve())
            if found.is_file():
                return found
    return own


def test_autoscalers_read_series_the_router_serves(rendered):
    hpas = rendered.of("HorizontalPodAutoscaler")
    adapter = adapter_values(K8S / rendered.name.split("+")[0])
    assert bool(hpas) == adapter.is_file(), f"{rendered.name}: HPAs {len(hpas)}, adapter rules {adapter.is_file()}"
    if not hpas:
        return
    served = router_series()
    external = {}
    for rule in yaml.safe_load(adapter.read_text())["rules"]["external"]:
        series = re.match(r"[\w:]+", rule["seriesQuery"]).group(0)
        assert series in served, f"the adapter reads {series}, which the router does not serve"
        as_name = rule["name"]["as"].replace("${1}", r"\g<1>")
        external[re.sub(rule["name"]["matches"], as_name, series)] = series
    for hpa in hpas:
        target = rendered.get("Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], f"{hpa['metadata']['name']}: kubectl apply would undo its scaling"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in (m["external"]["metric"] for m in hpa["spec"]["metrics"]):
            assert metric["name"] in external, f"{hpa['metadata']['name']}: no adapter rule makes {metric['name']}"
            pool = metric.get("selector", {}).get("matchLabels", {}).get("pool")
            assert pool in served[external[metric["name"]]] | {None}, f"the router has no pool {pool!r}"
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in hpas}
    assert {f"epd-{r}" for r in NODE_ROLES} <= scaled, f"{rendered.name}: pools without an autoscaler"
