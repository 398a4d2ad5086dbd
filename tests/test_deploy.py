"""deploy/: the Dockerfile, compose file and Kubernetes manifests agree with each other
and with ``xmsearch serve`` (ports, exit timeout, shared memory), and the probes and
autoscalers point where Triton answers.  Parsing only: no Docker or cluster needed.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import yaml

from xmsearch.export.tensorrt import TRITON_IMAGE, TRITON_IMAGE_TAG, TRITON_RELEASES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"

try:  # the ports `xmsearch serve` uses by default: production must expose the same
    from xmsearch.server import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT
except ImportError:  # pragma: no cover - Triton's own defaults until the module exists
    DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT = 8001, 8000, 8002
try:
    from xmsearch.server import DEFAULT_EXIT_TIMEOUT_S, DEFAULT_SHM_BYTES, DEFAULT_SHM_GROWTH_BYTES
except ImportError:  # pragma: no cover
    DEFAULT_EXIT_TIMEOUT_S, DEFAULT_SHM_BYTES, DEFAULT_SHM_GROWTH_BYTES = 30, None, None

PORTS = {"grpc": DEFAULT_GRPC_PORT, "http": DEFAULT_HTTP_PORT, "metrics": DEFAULT_METRICS_PORT}
# Triton 2.51.0 is the server the CPU tests run (bundled in nvidia-pytriton 0.7.0).
TEST_SERVER_VERSION = "2.51.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@functools.lru_cache(maxsize=1)
def _all_manifests() -> tuple[tuple[Path, dict], ...]:
    # Parsed once per session; tests only read the result.
    return tuple((p, d) for p in sorted(K8S.rglob("*.yaml")) for d in _docs(p))


def _one(kind: str) -> dict:
    found = [d for _, d in _all_manifests() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under {K8S}, found {len(found)}"
    return found[0]


def _flags(args: list[str]) -> dict[str, list[str]]:
    """tritonserver flags -> values (``--a=b`` and ``--a b`` forms; repeated flags kept)."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, value = arg.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = arg, args[i + 1]
                i += 1
            else:
                key, value = arg, ""
            out.setdefault(key, []).append(value)
        i += 1
    return out


def _dockerfile() -> str:
    # Join continuation lines so that JSON-form instructions parse as one line.
    return re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())


def _dockerfile_cmd() -> list[str]:
    (line,) = [ln for ln in _dockerfile().splitlines() if ln.startswith("CMD ")]
    return json.loads(line[len("CMD "):])


def _triton_container() -> dict:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    (c,) = [c for c in containers if c["name"] == "triton"]
    return c


def _port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return p


def _prestop_sleep(container: dict) -> int:
    pre = container["lifecycle"]["preStop"]
    if "sleep" in pre:  # Kubernetes >= 1.30 native sleep action
        return int(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


# --------------------------------------------------------------------------- YAML


def test_every_manifest_is_valid_yaml_with_kind_and_name():
    manifests = _all_manifests()
    assert {d["kind"] for _, d in manifests} >= {
        "Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap",
        "ScaledObject", "ServiceMonitor"}
    for path, doc in manifests:
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc["metadata"].get("name"), path


def test_base_manifests_apply_namespace_first():
    # `kubectl apply -f deploy/k8s/` applies files in name order, without recursing.
    base = sorted(p.name for p in K8S.glob("*.yaml"))
    assert _docs(K8S / base[0])[0]["kind"] == "Namespace"
    kinds = {d["kind"] for name in base for d in _docs(K8S / name)}
    assert kinds == {"Namespace", "Deployment", "Service"}


# --------------------------------------------------------------------------- Deployment


def test_deployment_requests_one_gpu():
    assert _triton_container()["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_probes_point_at_triton_health_on_the_http_port():
    c = _triton_container()
    for probe, path in [("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                        ("startupProbe", "/v2/health/ready")]:
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port_number(c, get["port"]) == DEFAULT_HTTP_PORT, probe


def test_startup_probe_is_generous():
    s = _triton_container()["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 300


def test_container_ports_and_flags_match_xmsearch_serve():
    c = _triton_container()
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == PORTS
    flags = _flags(c["args"])
    assert flags["--grpc-port"] == [str(DEFAULT_GRPC_PORT)]
    assert flags["--http-port"] == [str(DEFAULT_HTTP_PORT)]
    assert flags["--metrics-port"] == [str(DEFAULT_METRICS_PORT)]
    assert flags["--exit-timeout-secs"] == [str(DEFAULT_EXIT_TIMEOUT_S)]
    assert flags["--model-repository"] == ["/models"]


def test_deployment_runs_the_same_command_as_the_image():
    c = _triton_container()
    assert [*c["command"], *c["args"]] == _dockerfile_cmd()


def test_python_backend_shm_matches_xmsearch_serve():
    if DEFAULT_SHM_BYTES is None:
        pytest.skip("xmsearch.server has no shm defaults to compare with")
    backend = _flags(_dockerfile_cmd()[1:])["--backend-config"]
    assert f"python,shm-default-byte-size={DEFAULT_SHM_BYTES}" in backend
    assert f"python,shm-growth-byte-size={DEFAULT_SHM_GROWTH_BYTES}" in backend


def test_grace_period_covers_prestop_drain_and_exit_timeout():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    c = _triton_container()
    exit_timeout = int(_flags(c["args"])["--exit-timeout-secs"][0])
    sleep = _prestop_sleep(c)
    assert sleep >= 5, "preStop must give endpoint removal time to propagate"
    assert pod["terminationGracePeriodSeconds"] > sleep + exit_timeout


def test_dev_shm_is_memory_backed():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in _triton_container()["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


# --------------------------------------------------------------------------- Service


def test_service_exposes_grpc_http_metrics_of_the_pods():
    svc, dep = _one("Service"), _one("Deployment")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == PORTS
    c = _triton_container()
    for p in svc["spec"]["ports"]:
        assert _port_number(c, p["targetPort"]) == PORTS[p["name"]]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --------------------------------------------------------------------------- autoscaling


def test_hpa_scales_the_deployment_on_the_adapter_metric():
    hpa, dep, cm = _one("HorizontalPodAutoscaler"), _one("Deployment"), _one("ConfigMap")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["metadata"]["namespace"] == dep["metadata"]["namespace"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]

    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    query = rule["metricsQuery"]
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_keda_alternative_targets_the_deployment_with_a_prometheus_trigger():
    so, dep = _one("ScaledObject"), _one("Deployment")
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
    assert float(trigger["metadata"]["threshold"]) > 0


def test_servicemonitor_scrapes_the_metrics_port():
    sm, svc = _one("ServiceMonitor"), _one("Service")
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


# --------------------------------------------------------------------------- compose


def test_compose_reserves_a_gpu_and_publishes_the_ports():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    (svc,) = compose["services"].values()
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    published = {tuple(int(x) for x in p.split(":")) for p in svc["ports"]}
    assert published == {(p, p) for p in PORTS.values()}
    assert any(v.split(":")[1] == "/models" for v in svc["volumes"])
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()


def test_compose_healthcheck_and_stop_grace():
    (svc,) = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"].values()
    assert f"127.0.0.1:{DEFAULT_HTTP_PORT}/v2/health/ready" in " ".join(svc["healthcheck"]["test"])
    exit_timeout = int(_flags(_dockerfile_cmd()[1:])["--exit-timeout-secs"][0])
    grace = int(re.fullmatch(r"(\d+)s", svc["stop_grace_period"]).group(1))
    assert grace > exit_timeout


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_from_tag_is_the_tested_server_version():
    froms = re.findall(r"^FROM\s+(\S+)", _dockerfile(), flags=re.M)
    assert froms[0] == TRITON_IMAGE
    tag = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", froms[0]).group(1)
    assert tag == TRITON_IMAGE_TAG
    assert TRITON_RELEASES[tag].server == TEST_SERVER_VERSION
    assert TEST_SERVER_VERSION in (DEPLOY / "Dockerfile").read_text()
    assert TEST_SERVER_VERSION in (DEPLOY / "README.md").read_text()


def test_dockerfile_command_and_ports():
    cmd = _dockerfile_cmd()
    assert cmd[0] == "tritonserver"
    flags = _flags(cmd[1:])
    assert flags["--model-repository"] == ["/models"]
    assert flags["--exit-timeout-secs"] == [str(DEFAULT_EXIT_TIMEOUT_S)]
    assert {k: int(v[0]) for k, v in flags.items() if k.endswith("-port")} == {
        "--grpc-port": DEFAULT_GRPC_PORT, "--http-port": DEFAULT_HTTP_PORT,
        "--metrics-port": DEFAULT_METRICS_PORT}
    exposed = {int(p) for p in re.search(r"^EXPOSE\s+(.+)$", _dockerfile(), re.M).group(1).split()}
    assert exposed == set(PORTS.values())


def test_dockerfile_installs_the_package_and_pinned_requirements():
    text = _dockerfile()
    assert "COPY deploy/requirements-triton.txt" in text
    assert re.search(r"pip install --no-deps /opt/xmsearch/src", text)
    assert "COPY model_repository/ /models/" in text  # the baked target
    reqs = [ln for ln in (DEPLOY / "requirements-triton.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert reqs and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", r) for r in reqs)
    # Every COPY source of the image exists in the repository.
    root = DEPLOY.parent
    for src in re.findall(r"^COPY\s+(?!--)(.+)\s+\S+$", text, flags=re.M):
        for s in src.split():
            if s != "model_repository/":  # a build output of `xmsearch export`
                assert (root / s).exists(), s
