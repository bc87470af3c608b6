"""``kdnctl gen-secrets DIR``: the tokens and TLS files of a deployment (docs/security.md, "Roles and tokens").

Writes, each readable by its owner only:

- ``admin.token``: the operators' and the controller's token (``auth.admin_token_file``, ``client.token_file``
  of ``kdnctl``);
- ``node-<name>.token`` per node: the node's own token (``node.token_file``), bound to that node id;
- ``tenant-<name>.token`` per tenant: engines' tokens (``client.token_file``);
- ``tokens.yaml``: the token map every server loads (``auth.tokens_file``), holding only SHA-256 digests
  (``sha256:<hex>: role``), so no host learns a token from it;
- ``mac.keys``: the master MAC keyring (``security.mac_keys_file`` of nodes and operators), and
  ``tenant-<name>.mac`` per tenant: that tenant's derived MAC keys only (``security.mac_keys_file`` of its engines),
  so an engine can sign and verify its own tenant's objects and no other's;
- with ``cryptography`` installed (else the equivalent ``openssl`` commands are printed): ``ca.crt``/``ca.key``
  (a self-signed CA; keep ``ca.key`` offline) and ``kdn.crt``/``kdn.key`` for servers and clients, valid for the
  given host names (server and client auth, so the same pair serves mutual TLS).

Existing files are never overwritten (``--force`` to replace them). Secrets are never printed.

``kdnctl derive-key --tenant T --out FILE`` writes one tenant's MAC keys file from the master keyring later (a new
tenant, or after adding a key id to rotate).
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

__all__ = ["add_secrets_parser", "generate", "derive_key_file"]

DEFAULT_HOSTS = ["localhost", "127.0.0.1", "controller", "node-1", "node-2"]


def add_secrets_parser(sub) -> None:
    """Add ``gen-secrets`` to ``kdnctl``'s subcommands (it needs no controller)."""
    p = sub.add_parser("gen-secrets", help="write tokens (hashed token map) and a self-signed CA + certificate")
    p.add_argument("dir", help="output directory (created, mode 0700)")
    p.add_argument("--tenants", default="default", help="comma-separated tenant names (default: default)")
    p.add_argument("--nodes", default="node-1,node-2", help="comma-separated node ids (default: node-1,node-2)")
    p.add_argument("--hosts", default=",".join(DEFAULT_HOSTS),
                   help="comma-separated DNS names / IPs for the certificate (default: %(default)s)")
    p.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    p.add_argument("--no-tls", action="store_true", help="tokens only")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_gen_secrets, standalone=True)
    p = sub.add_parser("derive-key", help="write one tenant's MAC keys file (derived from the master keyring) for "
                       "its engines")
    p.add_argument("--tenant", required=True, help="the tenant whose keys to derive")
    p.add_argument("--out", "-o", required=True, help="file to write (mode 0600)")
    p.add_argument("--keys", dest="keys_file",
                   help="master keys file (default: $KDN_MAC_KEYS_FILE or security.mac_keys_file of --config)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_derive_key, standalone=True)


def _write(path: Path, data: str | bytes, force: bool) -> None:
    from kdn.errors import ConfigError

    if path.exists() and not force:
        raise ConfigError(f"{path} exists (use --force to replace it)")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    os.chmod(path, 0o600)


def _names(text: str, what: str) -> list[str]:
    from kdn.format.keys import validate_name

    names = [n.strip() for n in text.split(",") if n.strip()]
    return [validate_name(what, n) if what == "tenant" else n for n in names]


def generate(out: str | os.PathLike, *, tenants: list[str], nodes: list[str], hosts: list[str] | None = None,
             tls: bool = True, days: int = 365, force: bool = False) -> dict[str, str]:
    """Write the files; returns ``{what: path}`` (no secret values)."""
    from kdn.wire.auth import ADMIN, NODE, token_digest

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: dict[str, str] = {}
    roles: dict[str, str] = {}
    entries = [("admin", ADMIN)] + [(f"node-{n}" if not n.startswith("node-") else n, f"{NODE}:{n}") for n in nodes]
    entries += [(f"tenant-{t}", t) for t in tenants]
    for name, role in entries:
        token = secrets.token_urlsafe(32)
        _write(root / f"{name}.token", token + "\n", force)
        written[name] = str(root / f"{name}.token")
        roles[token_digest(token)] = role
    lines = ["# KDN token map (auth.tokens_file): SHA-256 digests of tokens -> role. Safe to mount on every host."]
    lines += [f"'{digest}': '{role}'" for digest, role in roles.items()]
    _write(root / "tokens.yaml", "\n".join(lines) + "\n", force)
    written["tokens"] = str(root / "tokens.yaml")
    written.update(_mac_files(root, tenants, force))
    if tls:
        written.update(_tls(root, hosts or DEFAULT_HOSTS, days, force))
    return written


def _mac_files(root: Path, tenants: list[str], force: bool) -> dict[str, str]:
    """``mac.keys`` (a fresh master secret) and each tenant's derived ``tenant-<name>.mac``."""
    import datetime

    from kdn.format.mac import Keyring

    key_id = "k" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m")  # noqa: UP017
    secret = secrets.token_hex(32)
    master = Keyring({key_id: secret})
    _write(root / "mac.keys", "# KDN master MAC keys (security.mac_keys_file of nodes and operators only).\n"
           f"{key_id}: {secret}\n", force)
    written = {"mac": str(root / "mac.keys")}
    for tenant in tenants:
        path = root / f"tenant-{tenant}.mac"
        _write(path, master.tenant_file(tenant), force)
        written[f"mac-{tenant}"] = str(path)
    return written


def derive_key_file(out: str | os.PathLike, tenant: str, keys_file: str = "", config_path: str | None = None,
                    force: bool = False) -> str:
    """Write ``tenant``'s MAC keys file derived from the master keyring (``keys_file``, else the configured one)."""
    from kdn.config import SecurityConfig, load_config
    from kdn.errors import ConfigError
    from kdn.format.keys import validate_name
    from kdn.format.mac import load_keyring

    validate_name("tenant", tenant)
    security = load_config(config_path).security
    if keys_file:
        security = SecurityConfig(mac_keys_file=keys_file, mac_active_key=security.mac_active_key)
    keyring = load_keyring(security, environ={} if keys_file else None)
    if keyring is None:
        raise ConfigError("no MAC keys configured: give --keys FILE (the master keyring), $KDN_MAC_KEYS_FILE or "
                          "security.mac_keys_file")
    text = keyring.tenant_file(tenant)
    _write(Path(out), text, force)
    return str(out)


def cmd_derive_key(args: argparse.Namespace) -> int:
    path = derive_key_file(args.out, args.tenant, args.keys_file or "", args.config, args.force)
    print(f"wrote the MAC keys of tenant {args.tenant} to {path}; set security.mac_keys_file={path} for its engines "
          "(never the master keyring)")
    return 0


def _tls(root: Path, hosts: list[str], days: int, force: bool) -> dict[str, str]:
    from kdn.wire.certs import make_pki

    files = make_pki(hosts, days)
    names = {"ca": "ca.crt", "ca_key": "ca.key", "cert": "kdn.crt", "key": "kdn.key"}
    for what, data in files.items():
        _write(root / names[what], data, force)
    # certificates are public; servers in containers may run as another user than the one generating them
    os.chmod(root / "ca.crt", 0o644)
    os.chmod(root / "kdn.crt", 0o644)
    return {what: str(root / name) for what, name in names.items()}


OPENSSL_HINT = """cryptography is not installed; make the TLS files with openssl instead:
  cd {dir}
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days {days} -subj /CN=kdn-ca \\
      -keyout ca.key -out ca.crt
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=kdn -keyout kdn.key -out kdn.csr
  openssl x509 -req -in kdn.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days {days} -out kdn.crt \\
      -extfile <(printf 'subjectAltName={san}\\nextendedKeyUsage=serverAuth,clientAuth')
  chmod 600 ca.key kdn.key"""


def cmd_gen_secrets(args: argparse.Namespace) -> int:
    tls = not args.no_tls
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if tls:
        try:
            import cryptography  # noqa: F401
        except ModuleNotFoundError:
            tls = False
            san = ",".join(("IP:" if h.replace(".", "").isdigit() or ":" in h else "DNS:") + h for h in hosts)
            print(OPENSSL_HINT.format(dir=args.dir, days=args.days, san=san))
    written = generate(args.dir, tenants=_names(args.tenants, "tenant"), nodes=_names(args.nodes, "node"),
                       hosts=hosts, tls=tls, days=args.days, force=args.force)
    for what, path in written.items():
        print(f"{what:14} {path}")
    print("Mount the directory read-only; servers: auth.tokens_file=tokens.yaml, the controller also "
          "auth.admin_token_file=admin.token; nodes and operators security.mac_keys_file=mac.keys, each tenant's "
          "engines security.mac_keys_file=tenant-<name>.mac; see docs/security.md.")
    return 0
