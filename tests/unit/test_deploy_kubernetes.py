"""deploy/kubernetes/: valid YAML and consistent with the image and the configuration (issue 19)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mta import config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
CONTAINER_CONFIG = ROOT / "deploy" / "container" / "config.toml"


def documents() -> list[dict[str, Any]]:
    docs = [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d
        assert d["metadata"]["name"]
    return docs


def one(kind: str) -> dict[str, Any]:
    [found] = [d for d in documents() if d["kind"] == kind]
    return found


def test_ctr_7_k8s_manifests_parse() -> None:
    assert MANIFESTS
    kinds = sorted(d["kind"] for d in documents())
    assert kinds == ["NetworkPolicy", "Service", "Service", "StatefulSet"]


def test_ctr_3_7_k8s_smtp_reachable_only_from_labelled_client_pods() -> None:
    """MTA_RELAY_NETWORKS names the pod network; the NetworkPolicy keeps other pods off the SMTP port."""
    sts = one("StatefulSet")
    policy = one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    smtp_rules = [r for r in policy["spec"]["ingress"] if {"port": "smtp"} in r.get("ports", [])]
    assert smtp_rules and all(r.get("from") for r in smtp_rules)
    for rule in smtp_rules:
        for peer in rule["from"]:
            assert peer["podSelector"]["matchLabels"] == {"mta-client": "true"}


def test_ctr_7_k8s_statefulset_has_one_spool_volume_per_pod_and_probes() -> None:
    sts = one("StatefulSet")
    spec = sts["spec"]
    [claim] = spec["volumeClaimTemplates"]
    pod = spec["template"]["spec"]
    [ctr] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in ctr["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/spool/mta"  # the image's VOLUME and queue.path
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The serviceName is a headless Service selecting these pods.
    [headless] = [d for d in documents() if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert headless["metadata"]["name"] == spec["serviceName"]
    assert headless["spec"]["selector"] == spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    # Probes: liveness on /healthz, readiness on /readyz, on a port the container declares.
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    probe_port = ports[ctr["readinessProbe"]["httpGet"]["port"]]
    assert ports[ctr["livenessProbe"]["httpGet"]["port"]] == probe_port
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == probe_port
    assert annotations["prometheus.io/path"] == "/metrics"
    # Runs as the image's user (Dockerfile: useradd --uid 10025).
    assert pod["securityContext"]["runAsUser"] == 10025
    assert "--uid 10025" in (ROOT / "Dockerfile").read_text()
    # No Service makes the relay reachable from outside the cluster.
    for svc in (d for d in documents() if d["kind"] == "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_ctr_7_k8s_ports_and_environment_match_the_image_config() -> None:
    sts = one("StatefulSet")
    [ctr] = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    assert set(env) <= set(config.ENV_KEYS)
    # The pod runs the image's own config with these variables: valid, and its ports are the
    # ones the probes, the annotation and the Services use.
    cfg = config.load(CONTAINER_CONFIG, env)
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert cfg.submission.listen == (f"0.0.0.0:{ports['smtp']}",)
    assert cfg.http.listen == f"0.0.0.0:{ports['http']}"
    assert ctr["readinessProbe"]["httpGet"]["port"] == "http"
