"""deploy/k8s as the cluster would see it: an overlay rendered with `kubectl kustomize`, and what one
of its containers runs (its environment from ConfigMaps, Secrets and the downward API; its command
line after Kubernetes' $(VAR) expansion). Shared by the manifests' unit test and the multi-host
test that runs them."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


@dataclass(frozen=True)
class Rendered:
    name: str
    objects: tuple[dict[str, Any], ...]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.of(kind) if o["metadata"]["name"] == name), None)


def render(name: str, overlay: str, components: tuple[str, ...] = (), workdir: str | None = None) -> Rendered:
    """`kubectl kustomize` of deploy/k8s/`overlay`, with `components` (paths under deploy/k8s) added as
    an operator's own overlay would add them (written under `workdir`)."""
    target = K8S / overlay
    if components:
        assert workdir is not None, "an overlay with components is written to a workdir"
        target = Path(workdir) / name.replace("/", "_")
        target.mkdir(exist_ok=True)
        rel = os.path.relpath(K8S, target)
        (target / "kustomization.yaml").write_text(yaml.safe_dump(
            {"resources": [f"{rel}/{overlay}"], "components": [f"{rel}/{c}" for c in components]}))
    out = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"kubectl kustomize {name} failed:\n{out.stderr}"
    return Rendered(name, tuple(o for o in yaml.safe_load_all(out.stdout) if o))


def data_of(obj: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's keys and (decoded) values."""
    data = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()} if obj["kind"] == "Secret" \
        else dict(obj.get("data", {}))
    return data | obj.get("stringData", {})


def referenced(r: Rendered, kind: str, name: str, key: str | None, where: str) -> str | dict[str, str]:
    obj = r.get(kind, name)
    assert obj is not None, f"{r.name}: {where} uses {kind} {name!r}, which is not rendered"
    if key is None:
        return data_of(obj)
    assert key in data_of(obj), f"{r.name}: {where} uses key {key!r} of {kind} {name}, which has {sorted(data_of(obj))}"
    return data_of(obj)[key]


def container_env(r: Rendered, c: dict[str, Any], where: str, fields: dict[str, str]) -> dict[str, str]:
    """The environment Kubernetes gives container `c`; `fields` are the downward API's values
    ({"status.podIP": "10.1.2.3"}), as its pod would see them."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
        env |= referenced(r, kind, ref["name"], None, where)
    for e in c.get("env", []):
        source = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = expand(e["value"], env, where)
        elif "fieldRef" in source:
            env[e["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            kind, ref = ("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source \
                else ("Secret", source["secretKeyRef"])
            env[e["name"]] = referenced(r, kind, ref["name"], ref["key"], where)
    return env


def expand(text: str, env: dict[str, str], where: str) -> str:
    """Kubernetes' $(VAR) expansion; an undefined VAR fails here (Kubernetes passes the text on as is)."""
    missing = [m for m in re.findall(r"\$\((\w+)\)", text) if m not in env]
    assert not missing, f"{where}: $({missing[0]}) is used but not defined in the container's env"
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)
