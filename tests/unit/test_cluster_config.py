"""`[cluster]` settings and the README's compose example (issue 15)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mta import config
from mta.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("data", "message"), [
    ({"database": "mysql://db/mta"}, "cluster.database: must be empty or a postgresql:// URL"),
    ({"node_name": "two words"}, "cluster.node_name: 'two words' is not a node name"),
    ({"heartbeat_interval": "10ms"}, "cluster.heartbeat_interval: must be at least 100ms"),
])
def test_clu_5_bad_cluster_settings_are_one_line_naming_the_key(data: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict({"cluster": data}, "c.toml")
    assert str(info.value).startswith(f"c.toml: {message}") and "\n" not in str(info.value)


def test_clu_1_sqlite_stays_the_default() -> None:
    cfg = config.from_dict({}, "c.toml")
    assert cfg.cluster.database == "" and cfg.cluster.heartbeat_interval == 5.0


def test_clu_7_readme_compose_example_runs_two_distinct_nodes_on_one_database() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running several relays"):]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.S)
    assert block is not None
    compose = yaml.safe_load(block.group(1))
    relays = {name: s for name, s in compose["services"].items() if s.get("image") == "mta"}
    assert len(relays) == 2 and "db" in compose["services"]
    spools = {s["volumes"][0] for s in relays.values()}
    assert len(spools) == 2 and all(v.endswith(":/var/spool/mta") for v in spools)  # one spool each
    names, databases = set(), set()
    for service in relays.values():
        env = {k: str(v) for k, v in service["environment"].items()}
        cfg = config.load(ROOT / "deploy/container/config.toml", env)
        names.add(cfg.cluster.node_name)
        databases.add(cfg.cluster.database)
    assert len(names) == 2 and len(databases) == 1 and databases.pop().startswith("postgresql://")
