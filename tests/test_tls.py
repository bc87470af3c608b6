"""TLS on the planes: a real controller and node serving gRPC over TLS (and mutual TLS), clients that must trust
the CA, plaintext peers refused. Certificates are made here with ``cryptography`` (a CA, a server certificate for
127.0.0.1/localhost, a client certificate)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdn.client import KDNClient
from kdn.config import TLSConfig, load_config
from kdn.errors import ConfigError
from kdn.format.layout import KVLayout
from tests.cluster import REPO, Cluster

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

CHUNK = 16
LAYOUT = KVLayout("kdn-test/tls", num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")


def _write(path: Path, cert, key) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def _cert(name: str, issuer_cert, issuer_key, *, ca: bool = False, server: bool = False):
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:  # nodes also call the controller: their certificate serves both ends (as with mTLS meshes)
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """Paths of a CA, a server (127.0.0.1) and a client certificate, plus a second, unrelated CA."""
    root = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _cert("kdn-test-ca", None, None, ca=True)
    server_cert, server_key = _cert("kdn-server", ca_cert, ca_key, server=True)
    client_cert, client_key = _cert("kdn-client", ca_cert, ca_key)
    other_cert, other_key = _cert("other-ca", None, None, ca=True)
    out = {}
    out["ca"], _ = _write(root / "ca", ca_cert, ca_key)
    out["server_cert"], out["server_key"] = _write(root / "server", server_cert, server_key)
    out["client_cert"], out["client_key"] = _write(root / "client", client_cert, client_key)
    out["other_ca"], _ = _write(root / "other", other_cert, other_key)
    return out


def _tls_cluster(tmp_path: Path, pki: dict[str, str], client_auth: bool) -> Cluster:
    common = ["--set", f"tls.cert={pki['server_cert']}", "--set", f"tls.key={pki['server_key']}",
              "--set", f"tls.ca={pki['ca']}", "--set", f"tls.client_auth={str(client_auth).lower()}"]
    c = Cluster(tmp_path, common=common,
                tls=TLSConfig(ca=pki["ca"], cert=pki["server_cert"], key=pki["server_key"]))
    c.start_controller()
    c.start_node("node-a")
    c.wait_nodes(1)
    return c


def _kv(n: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(n), generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)


@pytest.mark.parametrize("client_auth", [False, True], ids=["tls", "mtls"])
def test_round_trip_over_tls_and_untrusted_peers_refused(tmp_path, pki, client_auth):
    c = _tls_cluster(tmp_path, pki, client_auth)
    try:
        prompt = list(range(3 * CHUNK))
        kv = _kv(len(prompt))
        tls = TLSConfig(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])
        with KDNClient(LAYOUT, controller=c.address, chunk_size=CHUNK, tls=tls) as client:
            assert client.store(prompt, kv).result(30).stored == 3
            hit = client.retrieve(prompt)
            assert hit.num_tokens == len(prompt) and torch.equal(hit.kv, kv)
        # The bulk channel speaks TLS too: a client without shared memory reads over it, not over gRPC.
        with KDNClient(LAYOUT, controller=c.address, chunk_size=CHUNK, tls=tls, shared_memory=False) as client:
            hit = client.retrieve(prompt)
            assert hit.num_tokens == len(prompt) and torch.equal(hit.kv, kv)
            bulk = [n for n in client._node_clients.values() if n.bulk_address]
            assert bulk and all(n._bulk is not None and n._bulk_down_until == 0.0 for n in bulk)
        # A client that trusts another CA, or speaks plaintext, gets nothing (and no data leaves in clear).
        for bad in (TLSConfig(ca=pki["other_ca"]), TLSConfig()):
            with KDNClient(LAYOUT, controller=c.address, chunk_size=CHUNK, tls=bad, timeout_s=3) as client:
                assert client.lookup(prompt).hit_tokens == 0
        if client_auth:  # right CA but no client certificate
            with KDNClient(LAYOUT, controller=c.address, chunk_size=CHUNK, tls=TLSConfig(ca=pki["ca"]),
                           timeout_s=3) as client:
                assert client.lookup(prompt).hit_tokens == 0
        # kdnctl takes TLS from the same config (file or environment).
        env_run = subprocess.run([sys.executable, "-m", "kdn.cli.ctl", "--controller", c.address, "nodes"],
                                 capture_output=True, text=True, cwd=REPO,
                                 env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "KDN_TLS__CA": pki["ca"],
                                      "KDN_TLS__CERT": pki["client_cert"], "KDN_TLS__KEY": pki["client_key"]})
        assert env_run.returncode == 0, env_run.stderr
        assert "node-a" in env_run.stdout
    finally:
        c.close()


def test_tls_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cert and key"):
        load_config(overrides={"tls.cert": str(tmp_path / "x.crt")}, environ={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(overrides={"tls.ca": str(tmp_path / "missing.pem")}, environ={})
    with pytest.raises(ConfigError, match="client_auth"):
        load_config(overrides={"tls.client_auth": "true"}, environ={})
    cfg = load_config(overrides={"tls.ca": __file__}, environ={})
    assert cfg.client.tls.ca == __file__  # the client section inherits the top-level tls section
