"""ember.yaml: every documented key is read; unknown keys and wrong types name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.controller.config import ServeConfig, load_config
from ember.controller.types import DeploymentSpec
from ember.errors import ConfigError

FULL = """
host: 127.0.0.1
port: 9000
address: auto
api_keys: [k1, k2]
admin_key: adm
state_dir: /tmp/st
cache_dir: /tmp/ca
reconcile_interval_s: 0.25
demo: false
ray: {num_cpus: 3, instance_cpus: 2, labels: {zone: a, spot: true}}
api: {completion_default_max_tokens: 8}
deployments:
  - {name: m, source: /models/m, max_instances: 2}
"""


def test_full_file_is_read(tmp_path: Path) -> None:
    p = tmp_path / "ember.yaml"
    p.write_text(FULL)
    c = load_config(p)
    assert (c.host, c.port, c.address) == ("127.0.0.1", 9000, "auto")
    assert c.api_keys == ("k1", "k2") and c.admin_key == "adm"
    assert c.db_path == Path("/tmp/st/ember.db") and c.cache_dir == "/tmp/ca"
    assert c.reconcile_interval_s == 0.25 and c.demo is False
    assert c.ray.num_cpus == 3 and c.ray.instance_cpus == 2.0
    assert c.ray.labels == (("spot", "True"), ("zone", "a"))
    assert c.api == (("completion_default_max_tokens", 8),)
    assert c.deployments == (DeploymentSpec("m", "/models/m", max_instances=2),)


def test_no_file_gives_defaults() -> None:
    assert load_config(None) == ServeConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot: 1", "prot: unknown key"),
        ("port: '80'", "port: expected int"),
        ("ray: {cpus: 1}", "ray.cpus: unknown key"),
        ("deployments: [{name: m}]", r"deployments\[0\]\.source: missing"),
        ("deployments: [{name: m, source: /a}, {name: m, source: /b}]", "appears twice"),
        ("port: 0", "port: 0 must be in"),
        ("[1, 2]", "top level must be a mapping"),
        ("port: [", "not valid YAML"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "ember.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_cache_dir_follows_ember_cache_dir_like_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ember serve` and `LLM(...)` share one cache root: $EMBER_CACHE_DIR when set."""
    from ember.cluster.cluster import ClusterConfig
    from ember.engine.checkpoint import cache_dir

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    assert ServeConfig().cache_dir == ClusterConfig().cache_dir == str(tmp_path)
    assert cache_dir() == tmp_path / "checkpoints"
    assert load_config(None).cache_dir == str(tmp_path)
    monkeypatch.delenv("EMBER_CACHE_DIR")
    assert ServeConfig().cache_dir == ClusterConfig().cache_dir == "~/.cache/ember"
