"""The Kubernetes manifests in docker/k8s validate against the API schemas and fit together.

Built-in kinds are checked offline with kubernetes-validate's bundled schemas; the ServiceMonitor is a CRD, so it is
checked by hand: its apiVersion and kind, and that it selects the Service's labels and port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.server_harness import REPO
from worker.registry import load_registry

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (in [dev])")

K8S = REPO / "docker" / "k8s"
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests promise to work on
NOT_BUILT_IN = {"ServiceMonitor", "Kustomization"}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in docker/k8s, found {len(found)}"
    return found[0]


@pytest.mark.parametrize(("name", "doc"), [m for m in manifests() if m[1]["kind"] not in NOT_BUILT_IN])
def test_manifest_validates(name: str, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {doc['kind']}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_validation_catches_a_mistake() -> None:
    deployment = by_kind("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "one"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = by_kind("Kustomization")
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_every_kind_is_there() -> None:
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds


def test_service_monitor_selects_the_service() -> None:
    monitor, service = by_kind("ServiceMonitor"), by_kind("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert [endpoint["path"] for endpoint in monitor["spec"]["endpoints"]] == ["/metrics"]
    assert all(endpoint["port"] in ports for endpoint in monitor["spec"]["endpoints"])


def test_service_selects_the_pods() -> None:
    service, deployment = by_kind("Service"), by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_deployment_probes_cache_and_registry() -> None:
    deployment, config_map = by_kind("Deployment"), by_kind("ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts["/home/tokenmill/.cache/tokenmill"] in volumes
    assert volumes[mounts["/etc/tokenmill"]]["configMap"]["name"] == config_map["metadata"]["name"]
    args = container["args"]
    assert args[args.index("--models") + 1] == "/etc/tokenmill/models.yaml"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_config_map_holds_a_valid_registry(tmp_path: Path) -> None:
    registry = tmp_path / "models.yaml"
    registry.write_text(by_kind("ConfigMap")["data"]["models.yaml"])
    assert [entry.name for entry in load_registry(registry).models]


def test_autoscaler_scales_the_deployment_on_queue_depth() -> None:
    autoscaler, deployment = by_kind("HorizontalPodAutoscaler"), by_kind("Deployment")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "tokenmill_num_requests_waiting"
