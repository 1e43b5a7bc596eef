"""configs/ against Kubernetes schemas, offline: core kinds (Deployment, Service, ...)
through the schemas kubernetes-validate ships, for a pinned version; the custom resources
(KServe, KEDA, Prometheus operator), which it cannot know, by their essential structure,
with the pod and autoscaler specs embedded in them validated as core objects."""

from __future__ import annotations

import json
import re
from typing import Any

import kubernetes_validate
import pytest

from tests.test_deploy_configs import manifests, of_kind

# The cluster version the manifests target. kubernetes-validate ships the schemas (its
# "-local" copies, references resolved), so validation never touches the network.
K8S_VERSION = "1.30.0"
CORE_KINDS = ("Deployment", "Service", "PersistentVolumeClaim")
# Custom resources: the schema validator knows none of them, so their structure is checked
# below by hand, against these apiVersions.
CRD_VERSIONS = {"InferenceService": "serving.kserve.io/v1beta1",
                "ScaledObject": "keda.sh/v1alpha1",
                "PrometheusRule": "monitoring.coreos.com/v1",
                "ServiceMonitor": "monitoring.coreos.com/v1"}
# KServe's ComponentExtensionSpec: predictor keys that are not PodSpec fields.
KSERVE_COMPONENT_KEYS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric",
                         "scaleMetricType", "containerConcurrency", "timeout",
                         "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                         "deploymentStrategy", "autoScaling"}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def validate_core(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_kind_is_either_schema_validated_or_a_known_crd():
    kinds = {d["kind"] for _, d in manifests()}
    assert kinds == set(CORE_KINDS) | set(CRD_VERSIONS)


def test_core_manifests_match_the_kubernetes_schema():
    core = [(p, d) for p, d in manifests() if d["kind"] in CORE_KINDS]
    assert sorted(d["kind"] for _, d in core) == sorted(CORE_KINDS)
    for path, doc in core:
        validate_core(doc)  # raises ValidationError naming the bad field
        assert DNS_1123.match(doc["metadata"]["name"]), path


def test_the_schema_check_catches_a_bad_manifest():
    """The validator really runs (not a silent pass): typos and wrong types fail."""
    ((_, dep),) = of_kind("Deployment")
    typo = json.loads(json.dumps(dep))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    wrong_type = json.loads(json.dumps(dep))
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_core(bad)


def test_kserve_predictors_are_valid_pod_specs():
    """A predictor is a PodSpec plus KServe's component fields: the PodSpec part is
    validated as a Pod, so container probes, resources and env get the core schema."""
    for path, isvc in of_kind("InferenceService"):
        pred = isvc["spec"]["predictor"]
        pod_spec = {k: v for k, v in pred.items() if k not in KSERVE_COMPONENT_KEYS}
        validate_core({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": isvc["metadata"]["name"],
                                    "labels": pred["labels"]},
                       "spec": pod_spec})
        assert 1 <= pred["minReplicas"] <= pred["maxReplicas"], path
        assert 0 <= pred.get("canaryTrafficPercent", 100) <= 100, path


def test_crds_have_their_essential_structure():
    for path, doc in manifests():
        kind = doc["kind"]
        if kind in CORE_KINDS:
            continue
        assert doc["apiVersion"] == CRD_VERSIONS[kind], path
        assert DNS_1123.match(doc["metadata"]["name"]), path
        spec = doc["spec"]
        if kind == "ScaledObject":
            ref = spec["scaleTargetRef"]
            assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
            assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
            for t in spec["triggers"]:
                assert t["type"] == "prometheus"
                assert {"serverAddress", "query", "threshold"} <= set(t["metadata"])
                # KEDA reads trigger metadata as strings.
                assert all(isinstance(v, str) for v in t["metadata"].values()), t
            # The HPA behavior KEDA passes through is a core autoscaling/v2 object.
            validate_core({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                           "metadata": {"name": doc["metadata"]["name"]},
                           "spec": {"scaleTargetRef": {k: ref[k] for k in
                                                       ("apiVersion", "kind", "name")},
                                    "maxReplicas": spec["maxReplicaCount"],
                                    **spec["advanced"]["horizontalPodAutoscalerConfig"]}})
        elif kind == "PrometheusRule":
            for group in spec["groups"]:
                assert group["name"] and group["rules"]
                for rule in group["rules"]:
                    assert ("alert" in rule) != ("record" in rule), rule
                    assert isinstance(rule["expr"], str) and rule["expr"].strip()
                    assert set(rule) <= {"alert", "record", "expr", "for", "labels",
                                         "annotations", "keep_firing_for"}, rule
        elif kind == "ServiceMonitor":
            ((_, svc),) = of_kind("Service")
            assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            svc_ports = {p.get("name") for p in svc["spec"]["ports"]}
            for ep in spec["endpoints"]:
                assert ep["port"] in svc_ports and ep["path"] == "/metrics"
        elif kind == "InferenceService":
            assert spec["predictor"]["containers"], path
