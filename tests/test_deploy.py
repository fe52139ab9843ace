"""deploy/: the Dockerfiles pass hadolint, the Kubernetes manifests pass kubernetes-validate (offline, strict),
and both agree with the server they deploy: ports, health service names, variables, metric names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusiond.envflags import variable_for
from diffusiond.server.app import LIVENESS_SERVICE
from diffusiond.server.interceptor import SERVICE_NAME
from diffusiond.server.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise to work on
BIN = Path(sys.executable).parent
# Variables that are not flags: the tokens themselves (server/auth.py) and the cache directory.
NOT_FLAGS = {"DIFFUSIOND_AUTH_TOKENS", "DIFFUSIOND_CACHE"}


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for p in manifests() for d in yaml.safe_load_all(p.read_text())}


def serve_variables() -> set[str]:
    from diffusiond.cli import build_parser

    serve = build_parser("serve")._subparsers._group_actions[0].choices["serve"]
    return {variable_for(next(o for o in a.option_strings if o.startswith("--")))
            for a in serve._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile):
    proc = subprocess.run([str(BIN / "hadolint"), "--no-color", str(DEPLOY / dockerfile)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_are_multi_stage_non_root_with_a_healthcheck(dockerfile):
    text = (DEPLOY / dockerfile).read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2 and "COPY --from=build" in text
    assert re.search(r"^USER 10001", text, re.M) and re.search(r"^HEALTHCHECK .*\n.*/readyz", text, re.M)
    for name in re.findall(r"\b(DIFFUSIOND_[A-Z_]+)=", text):
        assert name in serve_variables() | NOT_FLAGS, f"{dockerfile} sets {name}, which no serve flag reads"


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    proc = subprocess.run([str(BIN / "hadolint"), str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_manifests_pass_kubernetes_validate_offline():
    proc = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *map(str, manifests())],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == sum(1 for _ in documents()), proc.stdout


def test_kubernetes_validate_can_fail(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "pdb.yaml").read_text().replace("maxUnavailable: 1", "maxUnavailable: 1\n  maxUnavaliable: 1"))
    proc = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [p.name for p in manifests()]


def test_probes_tell_loading_from_broken():
    pod = documents()["Deployment/diffusiond"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    startup, ready, live = (container[f"{k}Probe"]["grpc"] for k in ("startup", "readiness", "liveness"))
    assert {startup["port"], ready["port"], live["port"]} == {grpc_port}
    assert startup["service"] == ready["service"] == SERVICE_NAME  # NOT_SERVING while loading and draining
    assert live["service"] == LIVENESS_SERVICE  # SERVING while loading and draining
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 300
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = float(env["DIFFUSIOND_GRACE_PERIOD"])
    assert pod["terminationGracePeriodSeconds"] > grace + 5  # the drain and the preStop pause fit
    for name in env:
        assert name in serve_variables() | NOT_FLAGS, f"the Deployment sets {name}, which no serve flag reads"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False and pod["securityContext"]["runAsNonRoot"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_services_pdb_and_autoscaler_point_at_the_pods():
    docs = documents()
    labels = docs["Deployment/diffusiond"]["spec"]["template"]["metadata"]["labels"]
    for name in ("Service/diffusiond", "Service/diffusiond-headless"):
        assert docs[name]["spec"]["selector"].items() <= labels.items()
    assert docs["Service/diffusiond-headless"]["spec"]["clusterIP"] == "None"
    assert docs["PodDisruptionBudget/diffusiond"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = docs["HorizontalPodAutoscaler/diffusiond"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "diffusiond"
    exported = {m.name for m in ServerMetrics().registry.collect()}
    for metric in hpa["metrics"]:
        assert metric["pods"]["metric"]["name"] in exported
    rules = yaml.safe_load(docs["ConfigMap/diffusiond-prometheus-adapter-rules"]["data"]["config.yaml"])["rules"]
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        assert series in exported or series.startswith("diffusiond_gpu_"), series  # GPU series need NVML
