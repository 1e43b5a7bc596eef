"""The deployment files (Dockerfile.cuda, configs/) against the server they deploy.

Probe paths are requested from an app built over the fake engine, container args are parsed
by the real CLI parser, and every metric that an alert, the KEDA trigger or the dashboard
queries must appear in a real /metrics scrape. Kubernetes schema validation is in
tests/test_deploy_schema.py.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient

from server.cli import build_parser
from server.frontend.app import build_app
from server.frontend.gpu_stats import GPUStats
from server.frontend.metrics import Metrics
from tests.fake_engine import FakeEngineClient
from tests.test_metrics_series import FakeNVML

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# configs/conveyor.yaml is the server's own config file, not a deployment manifest.
DEPLOY_DIRS = ("k8s", "kserve", "keda", "prometheus")
COMPLIANCE_LABELS = ("app-type", "model.version", "training.data.source", "compliance.level")
COMPLIANCE_ENV = ("BUSINESS_PURPOSE", "COST_CENTER")
GPU = "nvidia.com/gpu"
PORT = 8080
# A Kubernetes label value: at most 63 characters, alphanumeric at both ends.
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
METRIC = re.compile(r"\bconveyor:[A-Za-z0-9_:]+")


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document under the deployment directories, with its file."""
    out = []
    for d in DEPLOY_DIRS:
        for path in sorted((CONFIGS / d).glob("*.yaml")):
            out.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in manifests() if d["kind"] == kind]


def workloads() -> Iterator[tuple[str, list[dict[str, str]], dict[str, Any]]]:
    """(file name, label sets the compliance policy checks, pod spec) per GPU workload."""
    for path, doc in manifests():
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]
            yield path.name, [doc["metadata"]["labels"], pod["metadata"]["labels"]], pod["spec"]
        elif doc["kind"] == "InferenceService":
            pred = doc["spec"]["predictor"]
            yield path.name, [doc["metadata"]["labels"], pred["labels"]], pred


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, _, spec in workloads():
        for c in spec["containers"]:
            yield name, spec, c


def parse_serve(args: list[str]) -> Any:
    """`conveyor serve ARGS` through the real parser.

    --shutdown-timeout is added to the CLI by a separate change; while the parser does not
    know it yet, it is the only unknown argument allowed and must be an integer.
    """
    ns, unknown = build_parser().parse_known_args(["serve", *args])
    if unknown:
        flag, value = unknown
        assert flag == "--shutdown-timeout", unknown
        ns.shutdown_timeout = int(value)
    return ns


def scraped_metric_names() -> set[str]:
    """Series names of a real /metrics scrape, after one completed request, with every
    optional series on (--cost-per-hour, a GPU)."""
    engine = FakeEngineClient()
    nvml = FakeNVML([(40, 1 << 30, 80 << 30)])
    metrics = Metrics("conveyor-model", cost_per_hour=2.0, gpu_stats=GPUStats(lambda: nvml))
    client = TestClient(build_app(engine, engine.tokenizer, "conveyor-model", None, metrics))
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    text = client.get("/metrics").text
    return {re.split(r"[{ ]", line, maxsplit=1)[0]
            for line in text.splitlines() if line and not line.startswith("#")}


# ---- files parse ---------------------------------------------------------------------------

def test_every_config_file_parses_and_kinds_are_as_expected():
    for path in CONFIGS.rglob("*.yaml"):
        list(yaml.safe_load_all(path.read_text()))
    for path in CONFIGS.rglob("*.json"):
        json.loads(path.read_text())
    kinds = Counter(d["kind"] for _, d in manifests())
    assert kinds == Counter({"Deployment": 1, "Service": 1, "PersistentVolumeClaim": 1,
                             "InferenceService": 2, "ScaledObject": 1, "PrometheusRule": 1,
                             "ServiceMonitor": 1})


# ---- probes, ports, args -------------------------------------------------------------------

def container_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's port (number or port name) as the container port number."""
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return match


def test_probes_hit_real_routes_on_the_serving_port():
    engine = FakeEngineClient()
    client = TestClient(build_app(engine, engine.tokenizer, "conveyor-model", None))
    probes = []
    for name, _, c in containers():
        args = parse_serve(c["args"])
        assert (args.port, args.host, args.model, args.device) == \
            (PORT, "0.0.0.0", "/mnt/models", "cuda"), name
        assert [p["containerPort"] for p in c["ports"]] == [PORT], name
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind not in c:
                continue
            get = c[kind]["httpGet"]
            assert container_port(c, get["port"]) == args.port, (name, kind)
            assert client.get(get["path"]).status_code == 200, (name, kind, get["path"])
            probes.append((name, kind, get["path"]))
    assert probes == [
        ("deployment.yaml", "startupProbe", "/v2/health/ready"),
        ("deployment.yaml", "readinessProbe", "/v2/health/ready"),
        ("deployment.yaml", "livenessProbe", "/v2/health/live"),
        ("inferenceservice-canary.yaml", "readinessProbe", "/v2/health/ready"),
        ("inferenceservice-canary.yaml", "livenessProbe", "/v2/health/live"),
        ("inferenceservice.yaml", "startupProbe", "/v2/health/ready"),
        ("inferenceservice.yaml", "readinessProbe", "/v2/health/ready"),
        ("inferenceservice.yaml", "livenessProbe", "/v2/health/live"),
    ]


def test_readiness_probe_fails_while_the_engine_is_not_ready():
    engine = FakeEngineClient(ready=False)
    client = TestClient(build_app(engine, engine.tokenizer, "m", None))
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/v2/health/live").status_code == 200


def test_grace_period_covers_the_drain():
    graces = {}
    for name, spec, c in containers():
        args = parse_serve(c["args"])
        assert args.shutdown_timeout == 30, name
        if "terminationGracePeriodSeconds" in spec:
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {})
            sleep = int(pre_stop["command"][1]) if pre_stop else 0
            grace = spec["terminationGracePeriodSeconds"]
            assert grace > args.shutdown_timeout + sleep, name
            graces[name] = grace
    # The canary runs under Knative, which sets the grace period from the revision timeout.
    assert graces == {"deployment.yaml": 45, "inferenceservice.yaml": 45}


def test_service_targets_the_container_port():
    ((_, svc),) = of_kind("Service")
    ((_, dep),) = of_kind("Deployment")
    (port,) = svc["spec"]["ports"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert (port["port"], container_port(c, port["targetPort"])) == (PORT, PORT)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


# ---- compliance policy ---------------------------------------------------------------------

def test_compliance_labels_on_every_workload_and_pod():
    seen = []
    for name, label_sets, _ in workloads():
        for labels in label_sets:
            assert all(k in labels for k in COMPLIANCE_LABELS), (name, labels)
            assert labels["app-type"] == "ml-model"
            assert labels["compliance.level"] in ("restricted", "baseline")
            assert all(LABEL_VALUE.match(str(v)) for v in labels.values()), labels
        seen.append((name, label_sets[0]["model.version"]))
    assert seen == [("deployment.yaml", "v1.0.0"), ("inferenceservice-canary.yaml", "v1.1.0"),
                    ("inferenceservice.yaml", "v1.0.0")]


def test_every_gpu_container_has_one_gpu_and_the_policy_env():
    names = []
    for name, _, c in containers():
        res = c["resources"]
        assert (res["limits"][GPU], res["requests"][GPU]) == (1, 1), name
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert all(env.get(k) for k in COMPLIANCE_ENV), (name, env)
        names.append((name, c["name"]))
    assert names == [("deployment.yaml", "conveyor"),
                     ("inferenceservice-canary.yaml", "kserve-container"),
                     ("inferenceservice.yaml", "kserve-container")]


def test_kserve_containers_download_the_model_to_mnt_models():
    uris = []
    for path, isvc in of_kind("InferenceService"):
        (c,) = isvc["spec"]["predictor"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        uris.append((path.name, env["STORAGE_URI"]))
    assert uris == [("inferenceservice-canary.yaml", "s3://models/conveyor-model/v1.1.0"),
                    ("inferenceservice.yaml", "s3://models/conveyor-model/v1.0.0")]
    ((_, canary),) = [(p, d) for p, d in of_kind("InferenceService") if "canary" in p.name]
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10


# ---- metrics -------------------------------------------------------------------------------

def alert_exprs() -> dict[str, str]:
    ((_, rule),) = of_kind("PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def dashboard_exprs() -> list[str]:
    dash = json.loads((CONFIGS / "grafana" / "conveyor-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def keda_queries() -> list[str]:
    ((_, so),) = of_kind("ScaledObject")
    return [t["metadata"]["query"] for t in so["spec"]["triggers"]]


def test_alerts_cover_the_operational_failure_modes():
    names = {m for e in alert_exprs().values() for m in METRIC.findall(e)}
    assert sorted(alert_exprs()) == [
        "ConveyorHighErrorRate", "ConveyorKVCacheNearFull", "ConveyorLowUtilization",
        "ConveyorPreemptionStorm", "ConveyorQueueBacklog", "ConveyorTTFTSLOBreach"]
    assert names == {"conveyor:num_requests_running", "conveyor:num_requests_waiting",
                     "conveyor:time_to_first_token_seconds_bucket",
                     "conveyor:http_requests_total", "conveyor:kv_cache_usage_perc",
                     "conveyor:num_preemptions_total"}
    assert "histogram_quantile(0.95" in alert_exprs()["ConveyorTTFTSLOBreach"]
    assert 'status=~"5.."' in alert_exprs()["ConveyorHighErrorRate"]


def test_keda_scales_the_deployment_on_the_queue():
    ((_, so),) = of_kind("ScaledObject")
    ((_, dep),) = of_kind("Deployment")
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert [METRIC.findall(q) for q in keda_queries()] == [["conveyor:num_requests_waiting"]]


def test_every_queried_metric_is_exported():
    exported = scraped_metric_names()
    queried = {m for q in [*alert_exprs().values(), *keda_queries(), *dashboard_exprs()]
               for m in METRIC.findall(q)}
    assert len(queried) == 22
    assert queried - exported == set()


def test_dashboard_panels_use_the_timing_gpu_and_cost_series():
    dash = json.loads((CONFIGS / "grafana" / "conveyor-dashboard.json").read_text())
    by_title = {p["title"]: {m for t in p["targets"] for m in METRIC.findall(t["expr"])}
                for p in dash["panels"]}
    assert by_title["Request time split (p95)"] == {
        f"conveyor:request_{h}_time_seconds_bucket" for h in ("queue", "prefill", "decode")}
    assert by_title["GPU utilization and memory"] == {
        "conveyor:gpu_utilization_perc", "conveyor:gpu_memory_used_bytes",
        "conveyor:gpu_memory_total_bytes"}
    assert by_title["Cost per unit (USD)"] == {
        "conveyor:cost_usd_total", "conveyor:generation_tokens_total",
        "conveyor:cost_per_1k_output_tokens_usd", "conveyor:cost_per_10k_requests_usd"}
    assert by_title["Cost rate (USD/hour)"] == {"conveyor:cost_usd_total"}
    ids = [p["id"] for p in dash["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    # No two panels overlap on the 24-column grid.
    cells = Counter((p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in dash["panels"]
                    for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"]))
    assert max(cells.values()) == 1 and max(x for x, _ in cells) < 24


# ---- Dockerfile ----------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in (ROOT / "Dockerfile.cuda").read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        buf += s
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def last(instr: str) -> str:
    return [rest for i, rest in dockerfile() if i == instr][-1]


def test_dockerfile_runs_as_non_root_on_8080_with_the_serve_entrypoint():
    assert last("USER") == "10001"
    ((_, dep),) = of_kind("Deployment")
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    assert last("EXPOSE") == "8080"
    assert json.loads(last("ENTRYPOINT")) == ["conveyor", "serve"]
    args = parse_serve(json.loads(last("CMD")))
    assert (args.model, args.host, args.port, args.device) == \
        ("/mnt/models", "0.0.0.0", 8080, "cuda")
    health = last("HEALTHCHECK")
    assert "http://127.0.0.1:8080/health" in health
    assert [i for i, _ in dockerfile() if i == "FROM"] == ["FROM", "FROM"]
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu22\.04$",
                     (ROOT / "Dockerfile.cuda").read_text(), re.M)


def test_dockerfile_pins_torch_from_the_cuda_index_and_every_dependency():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    (torch_pin,) = [d for d in deps if d.startswith("torch==")]
    args = dict(rest.split("=", 1) for i, rest in dockerfile() if i == "ARG" and "=" in rest)
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:12.8.")
    pins = {}
    for line in (CONFIGS / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    unpinned = []
    for dep in deps:
        name = re.split(r"[<>=!;\[ ]", dep, maxsplit=1)[0].lower()
        if "==" not in dep and name not in pins:
            unpinned.append(name)
    assert unpinned == []
    runs = [shlex.split(rest) for i, rest in dockerfile() if i == "RUN"]
    assert any("--constraint" in r and "." in r for r in runs)


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    lines = set((ROOT / ".dockerignore").read_text().splitlines())
    assert {".git", ".venv", "**/__pycache__", "bench/results", ".pytest_cache",
            ".ruff_cache", "*.egg-info", "build"} <= lines
