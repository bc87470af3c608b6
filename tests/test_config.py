"""Configuration: defaults < YAML < environment < flags, typed validation, sizes."""

from __future__ import annotations

import pytest

from kdn.config import load_config, parse_size
from kdn.errors import ConfigError


def test_sizes():
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("10GB") == 10**10
    assert parse_size(1234) == 1234
    assert parse_size("1.5KiB") == 1536
    for bad in ["lots", "-1", "5 parsecs", True]:
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_defaults_are_the_embedded_setup():
    cfg = load_config(environ={})
    assert [t.kind for t in cfg.node.tiers] == ["memory", "disk"]
    assert cfg.node.controller == f"127.0.0.1:{cfg.controller.port}"
    assert cfg.client.chunk_size == 256 and cfg.client.codec == "raw"


def test_precedence_yaml_env_flags(tmp_path):
    path = tmp_path / "kdn.yaml"
    path.write_text("node:\n  port: 1000\n  bulk_port: 1001\n  tiers:\n    - {kind: memory, capacity: 2GiB}\n"
                    "client:\n  tenant: from-yaml\n  chunk_size: 128\n")
    env = {"KDN_NODE__PORT": "2000", "KDN_CLIENT__TENANT": "from-env"}
    cfg = load_config(path, environ=env, overrides={"node.port": 3000})
    assert cfg.node.port == 3000  # flag beats env beats yaml
    assert cfg.client.tenant == "from-env"  # env beats yaml
    assert cfg.node.bulk_port == 1001 and cfg.client.chunk_size == 128  # yaml beats defaults
    assert cfg.node.tiers[0].config.capacity == 2 << 30
    assert load_config(environ={"KDN_CONFIG": str(path)}).node.port == 1000


def test_tiers_from_env_and_flags():
    cfg = load_config(environ={"KDN_NODE__TIERS": "[{kind: memory, capacity: 1MiB}, {kind: disk, path: /tmp/x}]"})
    assert [t.kind for t in cfg.node.tiers] == ["memory", "disk"]
    assert cfg.node.tiers[1].config.path == "/tmp/x"


@pytest.mark.parametrize("overrides, match", [
    ({"node.port": "seven"}, "integer"),
    ({"node.nonsense": 1}, "unknown field"),
    ({"node.tiers": "[{kind: tape}]"}, "unknown tier kind"),
    ({"node.tiers": "[{kind: memory, speed: 9}]"}, "unknown field"),
    ({"client.store_partial": "maybe"}, "boolean"),
])
def test_bad_values_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(environ={}, overrides=overrides)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, environ={})
