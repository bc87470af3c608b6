"""The Kubernetes manifests (deploy/k8s, a kustomization) validated against the Kubernetes schemas with
``kubernetes-validate`` (offline, strict: unknown fields fail), plus the wiring a schema cannot see: selectors match
pod labels, probes and Services name real container ports, secrets are mounted, the node's memory limit covers its
memory tier, the controller runs replicated over Redis and its readiness probe asks for the serving replica, and
each pod mounts the MAC keys of its role only: nodes the master keyring, the engine example its tenant's derived
keys, the controller none (docs/security.md, "Per-tenant keys")."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kdn.config import TierSpec
from kdn.controller.servicer import HEALTH_SERVICE
from kdn.node.health import HEALTH_SERVICE as NODE_HEALTH_SERVICE

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
ENGINE = K8S / "examples" / "engine.yaml"
MAC_ENV = ("KDN_SECURITY__MAC_KEYS_FILE", "KDN_CLIENT__SECURITY__MAC_KEYS_FILE", "KDN_MAC_KEYS_FILE", "KDN_MAC_KEY")
VERSION = "1.32.0"


def _docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for name in listed for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _ports(container: dict) -> set:
    ports = container.get("ports", [])
    return {p["containerPort"] for p in ports} | {p["name"] for p in ports if "name" in p}


def _limit_bytes(value: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, mult in units.items():
        if value.endswith(suffix):
            return int(float(value[:-2]) * mult)
    return int(value)


def test_manifests_pass_the_kubernetes_schemas():
    docs = _docs()
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com")]
    assert {d["kind"] for d in core} >= {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget"}
    for doc in core:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_broken_manifest_fails_validation():
    doc = _by_kind(_docs(), "Deployment")["kdn-controller"]
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grcp"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_wiring_between_objects():
    docs = _docs()
    services = _by_kind(docs, "Service")
    workloads = {**_by_kind(docs, "Deployment"), **_by_kind(docs, "StatefulSet")}
    for name, workload in workloads.items():
        pod = workload["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        volumes |= {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        for container in pod["spec"]["containers"]:
            ports = _ports(container)
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (name, mount)
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, (name, probe)
                spec = container[probe]
                port = (spec.get("grpc") or spec.get("tcpSocket") or {}).get("port")
                assert port is None or port in ports, (name, probe, port)
            assert {"requests", "limits"} <= set(container["resources"]), name
    for name, service in services.items():
        targets = [w for w in workloads.values()
                   if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"service {name} selects no pods"
        for port in service["spec"]["ports"]:
            assert any(port.get("targetPort", port["port"]) in _ports(c)
                       for w in targets for c in w["spec"]["template"]["spec"]["containers"]), (name, port)
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    wanted = set(monitor["spec"]["selector"]["matchExpressions"][0]["values"])
    assert wanted == {s["metadata"]["labels"]["app"] for s in services.values()} - {"kdn-controller-redis"}
    for service in services.values():
        if service["metadata"]["labels"]["app"] in wanted:
            assert "metrics" in {p["name"] for p in service["spec"]["ports"]}


def test_controller_replicas_and_node_sizing():
    docs = _docs()
    controller = _by_kind(docs, "Deployment")["kdn-controller"]
    assert controller["spec"]["replicas"] >= 2
    c = controller["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    redis_host = env["KDN_CONTROLLER__REDIS"].split("//")[1].split(":")[0]
    assert redis_host in _by_kind(docs, "Service")
    assert c["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert "controller.health_port=7079" in c["args"]
    assert {"KDN_AUTH__TOKENS_FILE", "KDN_TLS__CERT", "KDN_TLS__KEY", "KDN_TLS__CA"} <= set(env)
    node = _by_kind(docs, "StatefulSet")["kdn-node"]
    n = node["spec"]["template"]["spec"]["containers"][0]
    tiers_arg = next(a for a in n["args"] if a.startswith("node.tiers="))
    tiers = [TierSpec.parse(t) for t in yaml.safe_load(tiers_arg.split("=", 1)[1])]
    memory = sum(t.config.capacity for t in tiers if t.kind == "memory")
    disk = sum(t.config.capacity for t in tiers if t.kind == "disk")
    limit = _limit_bytes(n["resources"]["limits"]["memory"])
    assert memory < limit <= memory + (2 << 30)  # the tier fits, with bounded headroom
    claim = node["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert disk <= _limit_bytes(claim)
    assert {"KDN_NODE__TOKEN_FILE", "KDN_TLS__CERT"} <= {e["name"] for e in n["env"]}
    # the node's probes ask its plaintext health port: liveness "", readiness the data service (tiers + registered)
    assert "node.health_port=7079" in n["args"]
    assert n["readinessProbe"]["grpc"] == {"port": 7079, "service": NODE_HEALTH_SERVICE}
    assert n["livenessProbe"]["grpc"] == {"port": 7079, "service": ""}


def test_kustomize_renders_the_same_objects():
    """``kubectl kustomize`` (when kubectl is installed) renders exactly the listed objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # the schema tests above cover the files; rendering needs kubectl's built-in kustomize
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    rendered = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d}
    assert rendered == {(d["kind"], d["metadata"]["name"]) for d in _docs()}


def _secret_sources() -> dict[str, dict[str, str]]:
    """Secret -> {key: gen-secrets file name}, from the ``kubectl create secret generic`` commands in kdn.yaml."""
    lines = [line.lstrip("# ").rstrip() for line in (K8S / "kdn.yaml").read_text().splitlines()
             if line.startswith("#")]
    text = " ".join(line[:-1] if line.endswith("\\") else line + " ;" for line in lines)
    out: dict[str, dict[str, str]] = {}
    for command in text.split(";"):
        if command.strip().startswith("kubectl create secret generic "):
            words = shlex.split(command)
            files = [w.removeprefix("--from-file=") for w in words[5:] if w.startswith("--from-file=")]
            out[words[4]] = {key: Path(source).name for key, source in (f.split("=", 1) for f in files)}
    return out


def _mounted_files(pod: dict, container: dict) -> dict[str, tuple[str, str]]:
    """Path in the container -> (secret, key) of every file mounted from a Secret."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    sources = _secret_sources()
    out = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")  # else a claim template (node data) or another kind
        if secret is None:
            continue
        name = secret["secretName"]
        assert name in sources, f"secret {name} has no creation command in kdn.yaml"
        items = secret.get("items") or [{"key": k, "path": k} for k in sources[name]]
        for item in items:
            assert item["key"] in sources[name], (name, item)
            out[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (name, item["key"])
    return out


def _mac_files(pod: dict, container: dict) -> tuple[dict[str, str], set[str]]:
    """The MAC settings' env vars -> gen-secrets file behind them, and every gen-secrets file mounted."""
    sources = _secret_sources()
    files = {path: sources[secret][key] for path, (secret, key) in _mounted_files(pod, container).items()}
    env = {e["name"]: e.get("value", "") for e in container.get("env", []) if e["name"] in MAC_ENV}
    for name, value in env.items():
        assert value in files, (name, value, "not a mounted secret file")
    return {name: files[value] for name, value in env.items()}, set(files.values())


def test_mac_keys_are_mounted_by_role():
    docs = _docs()
    node = _by_kind(docs, "StatefulSet")["kdn-node"]["spec"]["template"]["spec"]
    env, mounted = _mac_files(node, node["containers"][0])
    assert env == {"KDN_SECURITY__MAC_KEYS_FILE": "mac.keys"}  # nodes verify every tenant's puts
    assert not any(f.endswith(".mac") for f in mounted)
    controller = _by_kind(docs, "Deployment")["kdn-controller"]["spec"]["template"]["spec"]
    env, mounted = _mac_files(controller, controller["containers"][0])
    assert env == {} and not any(f == "mac.keys" or f.endswith(".mac") for f in mounted)  # never touches bytes
    for doc in docs:  # nothing else in the cluster mounts the master keyring
        if doc["kind"] in ("Deployment", "StatefulSet") and doc["metadata"]["name"] != "kdn-node":
            pod = doc["spec"]["template"]["spec"]
            assert all("mac.keys" not in _mac_files(pod, c)[1] for c in pod["containers"]), doc["metadata"]["name"]


def test_engine_example_gets_only_its_tenants_files():
    engine = yaml.safe_load(ENGINE.read_text())
    kubernetes_validate.validate(engine, VERSION, strict=True)
    pod = engine["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env, mounted = _mac_files(pod, container)
    tenant = next(e["value"] for e in container["env"] if e["name"] == "KDN_CLIENT__TENANT")
    assert env == {"KDN_CLIENT__SECURITY__MAC_KEYS_FILE": f"tenant-{tenant}.mac"}
    assert mounted == {f"tenant-{tenant}.mac", f"tenant-{tenant}.token", "ca.crt"}  # no master, server key, tokens
    values = {e["name"]: e.get("value", "") for e in container["env"]}
    assert Path(values["KDN_CLIENT__TOKEN_FILE"]).name == f"tenant-{tenant}.token"
    assert "kdn-controller" in values["KDN_CLIENT__CONTROLLER"]
