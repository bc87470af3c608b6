"""The deploy files hand each process only the secrets of its role (docs/security.md, "Per-tenant keys"): nodes the
master MAC keyring, engines their tenant's derived keys (never the master), the controller no MAC key (it never
touches object bytes: checked on the import graph); the files come from the documented ``kdnctl gen-secrets``
command and stay out of the image. The compose settings run as real processes with the generated files and a
store + retrieve with MACs on works end to end (deploy/k8s is checked in tests/test_k8s.py)."""

from __future__ import annotations

import fnmatch
import shlex
from pathlib import Path

import grimp
import pytest
import torch
import yaml

from kdn.client import KDNClient
from kdn.config import SecurityConfig, TLSConfig, load_config
from kdn.format.layout import KVLayout
from kdn.format.mac import Keyring, load_keyring
from tests.cluster import Cluster, start_kdn

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
MAC_ENV = ("KDN_SECURITY__MAC_KEYS_FILE", "KDN_CLIENT__SECURITY__MAC_KEYS_FILE", "KDN_MAC_KEYS_FILE", "KDN_MAC_KEY")
CHUNK = 16
LAYOUT = KVLayout("kdn-test/deploy", num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _role(service: dict) -> str:
    command = service.get("command") or []
    return command[0] if command else "other"


def _secret_files(compose: dict, env: dict, mounted: list[str]) -> dict[str, str]:
    """Env var -> the gen-secrets file name behind it, for every env var pointing at a mounted secret."""
    out = {}
    for name, value in env.items():
        if isinstance(value, str) and value.startswith("/run/secrets/"):
            secret = value.removeprefix("/run/secrets/")
            assert secret in mounted, (name, value, "not mounted")
            out[name] = Path(compose["secrets"][secret]["file"]).name
    return out


def documented_gen_secrets(text: str) -> list[str]:
    """The arguments of the first ``kdnctl gen-secrets`` command in the comments of ``text`` (continued lines)."""
    lines = [line.lstrip("# ").rstrip() for line in text.splitlines() if line.startswith("#")]
    for i, line in enumerate(lines):
        if "kdnctl gen-secrets" in line:
            command = line[line.index("kdnctl gen-secrets"):]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i]
            return shlex.split(command)[2:]
    raise AssertionError("no documented kdnctl gen-secrets command")


def _gen_secrets(args: list[str], out: Path) -> Path:
    pytest.importorskip("cryptography")
    from kdn.cli.ctl import main as kdnctl

    assert kdnctl(["gen-secrets", str(out), *args[1:]]) == 0
    return out


def test_compose_mounts_mac_keys_by_role():
    compose = _compose()
    roles: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        files = _secret_files(compose, env, service.get("secrets", []))
        mounted = {Path(compose["secrets"][s]["file"]).name for s in service.get("secrets", [])}
        role = _role(service)
        roles.setdefault(role, []).append(name)
        if role in ("node", "serve"):  # verifies every tenant's puts: the master keyring, mounted
            assert files.get("KDN_SECURITY__MAC_KEYS_FILE") == "mac.keys", name
        else:  # controller, redis: no MAC key of any kind
            assert not set(env) & set(MAC_ENV), name
            assert not {f for f in mounted if f == "mac.keys" or f.endswith(".mac")}, name
        assert not any(f.endswith(".mac") for f in mounted), (name, "a tenant key on a server")
    assert len(roles["node"]) >= 2 and roles["controller"] == ["controller"]
    engine = compose["x-engine"]
    files = _secret_files(compose, engine["environment"], engine["secrets"])
    tenant = engine["environment"]["KDN_CLIENT__TENANT"]
    assert files["KDN_CLIENT__SECURITY__MAC_KEYS_FILE"] == f"tenant-{tenant}.mac"
    assert files["KDN_CLIENT__TOKEN_FILE"] == f"tenant-{tenant}.token"
    mounted = {Path(compose["secrets"][s]["file"]).name for s in engine["secrets"]}
    assert mounted == {f"tenant-{tenant}.mac", f"tenant-{tenant}.token", "ca.crt"}  # no master, server key or token


def test_compose_secrets_come_from_the_documented_command(tmp_path):
    args = documented_gen_secrets(COMPOSE.read_text())
    out = _gen_secrets(args, tmp_path / "secrets")
    compose = _compose()
    for secret in compose["secrets"].values():
        assert (out / Path(secret["file"]).name).is_file(), secret  # every mounted file is one it writes
    assert Keyring.from_file(out / "mac.keys").holds_master
    tenant = compose["x-engine"]["environment"]["KDN_CLIENT__TENANT"]
    engine_ring = Keyring.from_file(out / f"tenant-{tenant}.mac")
    assert not engine_ring.holds_master and engine_ring.tenants == (tenant,)


def test_secrets_stay_out_of_the_image(tmp_path):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    sources = [w for line in dockerfile.splitlines() if line.split()[:1] in (["COPY"], ["ADD"])
               for w in line.split()[1:-1]]
    assert sources and not any(s.startswith(("deploy", ".", "/")) or "secret" in s for s in sources), sources
    patterns = [p.strip() for p in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            if any(fnmatch.fnmatch("/".join(parts[i:]), bare) or fnmatch.fnmatch(parts[i], bare)
                   for i in range(len(parts))):
                return True
        return False

    out = _gen_secrets(documented_gen_secrets(COMPOSE.read_text()), tmp_path / "x")
    for written in out.iterdir():  # even outside deploy/secrets, none of them is sent to the builder
        assert ignored(f"deploy/secrets/{written.name}") and ignored(f"somewhere/{written.name}"), written.name
    assert ignored("deploy/secrets") and not ignored("kdn/format/mac.py") and not ignored("pyproject.toml")
    assert "KDN_SECURITY__MAC_KEYS_FILE" in dockerfile  # the image's notes name the node's keyring setting


def test_controller_never_handles_object_bytes():
    """Why the controller gets no MAC key: nothing it imports can parse, sign or verify an object."""
    graph = grimp.build_graph("kdn", cache_dir=None)
    for module in ("kdn.format.mac", "kdn.format.chunk"):
        assert not graph.chain_exists(importer="kdn.controller", imported=module, as_packages=True), module
        assert graph.chain_exists(importer="kdn.node", imported=module, as_packages=True), module  # the probe works


def _example(name: str, secrets: Path) -> str:
    text = (DEPLOY / name).read_text().replace("/etc/kdn/secrets", str(secrets))
    path = secrets.parent / name
    path.write_text(text)
    return str(path)


def test_example_configs_load_the_right_keyrings(tmp_path):
    args = documented_gen_secrets((DEPLOY / "kdn.example.yaml").read_text())
    assert "--tenants" in args and "--nodes" in args
    secrets = _gen_secrets(args, tmp_path / "secrets")
    node = load_config(_example("kdn.example.yaml", secrets), environ={})
    ring = load_keyring(node.security, environ={})
    assert ring is not None and ring.holds_master and node.security.mac_keys_file.endswith("/mac.keys")
    assert node.node.token and node.auth.tokens  # the node's own files load too
    engine = load_config(_example("engine.example.yaml", secrets), environ={})
    client = engine.client
    ring = load_keyring(client.security, environ={})
    assert ring is not None and not ring.holds_master and ring.tenants == (client.tenant,)
    assert Path(client.token_file).name == f"tenant-{client.tenant}.token" and client.tls.ca
    text = (DEPLOY / "engine.example.yaml").read_text()
    assert "admin.token" not in text and "node-" not in text and "kdn.key" not in text


def test_compose_settings_store_and_retrieve_with_macs(tmp_path):
    """The compose services' commands and environment, as real processes on this host with the files of the
    documented gen-secrets command (secrets at their mount paths' files, ports free, node names on 127.0.0.1,
    small tiers instead of the Redis one); an engine with x-engine's settings stores and retrieves its KV."""
    compose = _compose()
    secrets = _gen_secrets(documented_gen_secrets(COMPOSE.read_text()), tmp_path / "secrets")

    def env_of(service: dict) -> dict[str, str]:
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        for name, value in env.items():
            if value.startswith("/run/secrets/"):
                env[name] = str(secrets / Path(compose["secrets"][value.removeprefix("/run/secrets/")]["file"]).name)
        return {**{k: "" for k in MAC_ENV}, **env}

    tls = TLSConfig(cert=str(secrets / "kdn.crt"), key=str(secrets / "kdn.key"), ca=str(secrets / "ca.crt"))
    ctl_service = compose["services"]["controller"]
    c = Cluster(tmp_path, admin_token=(secrets / "admin.token").read_text().strip(), tls=tls)
    try:
        c.controller = start_kdn([*ctl_service["command"], "--port", "0", "--metrics-port", "-1",
                                  "--data-dir", str(tmp_path / "controller")], tmp_path / "controller.log",
                                 env_of(ctl_service))
        address = "127.0.0.1:" + c.address.rsplit(":", 1)[1]
        c.controller.ready["controller"] = address
        service = compose["services"]["node-1"]
        command = [address if a == "controller:7070" else a for a in service["command"]]
        command = [("node.advertise_host=127.0.0.1" if a.startswith("node.advertise_host=") else
                    "node.tiers=[{kind: memory, capacity: 64MiB}, {kind: disk, capacity: 64MiB}]"
                    if a.startswith("node.tiers=") else a) for a in command]
        c.nodes.append(start_kdn([*command, "--port", "0", "--bulk-port", "0", "--metrics-port", "-1",
                                  "--data-dir", str(tmp_path / "node-1")], tmp_path / "node-1.log",
                                 env_of(service)))
        c.wait_nodes(1)
        engine_env = env_of(compose["x-engine"])
        engine_env["KDN_CLIENT__CONTROLLER"] = address
        config = load_config(environ=engine_env).client
        prompt = list(range(2 * CHUNK))
        kv = torch.randn(LAYOUT.shape(len(prompt))).to(torch.bfloat16)
        with KDNClient(LAYOUT, config, chunk_size=CHUNK) as engine:
            assert engine.keyring is not None and not engine.keyring.holds_master
            assert engine.store(prompt, kv).result(30).stored == 2
            got = engine.retrieve(prompt)
            assert got.num_tokens == len(prompt) and torch.equal(got.kv, kv)
        # the node really checks MACs with its mounted keyring: the same tenant's unsigned objects are refused
        config = load_config(environ=engine_env).client
        config.security = SecurityConfig()
        other = [p + 1000 for p in prompt]
        with KDNClient(LAYOUT, config, chunk_size=CHUNK) as unsigned:
            assert unsigned.keyring is None
            assert unsigned.store(other, kv).result(30).stored == 0
            assert unsigned.retrieve(other).num_tokens == 0
    finally:
        c.close()
    for log in ("controller.log", "node-1.log"):
        text = (tmp_path / log).read_text()
        assert "INSECURE" not in text and "Traceback" not in text, log
        for secret_file in ("admin.token", "node-1.token", "tenant-default.token"):
            assert (secrets / secret_file).read_text().strip() not in text
