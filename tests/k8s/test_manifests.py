"""The rendered manifests (base and GKE overlay) match the schemas and hold the invariants."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, vm


def get(objs: list[dict], kind: str, name: str) -> dict:
    obj = vm.one(objs, kind, name)
    assert obj is not None, f"{kind}/{name} not rendered"
    return obj


def test_base_matches_schemas(base_objs, schema_root):
    """Every object of k8s/base validates against its schema (unknown kinds fail)."""
    assert vm.schema_problems(base_objs, schema_root) == []


def test_gke_overlay_matches_schemas(gke_objs, schema_root):
    """Every object of k8s/overlays/gke validates against its schema (unknown kinds fail)."""
    assert vm.schema_problems(gke_objs, schema_root) == []


def test_base_invariants(base_objs):
    """The base alone holds the workload invariants (probes, security, drain, scaling)."""
    assert vm.check_workloads(base_objs) == []


def test_gke_invariants(gke_objs):
    """The GKE overlay holds every invariant (workloads plus LB, TLS, identity, policy, metrics)."""
    assert vm.check_all(gke_objs) == []


def test_gke_kinds(gke_objs):
    """The overlay renders exactly the kinds the schemas cover, and never a Secret."""
    kinds = sorted({o["kind"] for o in gke_objs})
    assert kinds == [
        "BackendConfig",
        "ConfigMap",
        "Deployment",
        "FrontendConfig",
        "HorizontalPodAutoscaler",
        "Ingress",
        "ManagedCertificate",
        "Namespace",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PodMonitoring",
        "Service",
        "ServiceAccount",
    ]
    config_maps = {o["metadata"]["name"].rsplit("-", 1)[0] for o in vm.find(gke_objs, "ConfigMap")}
    assert config_maps == {"api-settings", "socket-settings"}, "deploy-params must stay local"


def test_socket_backend_numbers(gke_objs):
    """Socket LB: cookie affinity, timeout past the max connection age, drain inside the grace."""
    bc = get(gke_objs, "BackendConfig", "socket")["spec"]
    deploy = get(gke_objs, "Deployment", "socket")
    cfg = vm.settings(gke_objs, deploy)
    grace = vm.pod_spec(deploy)["terminationGracePeriodSeconds"]
    assert bc["sessionAffinity"]["affinityType"] == "GENERATED_COOKIE"
    assert 0 < bc["sessionAffinity"]["affinityCookieTtlSec"] <= 86400
    assert bc["timeoutSec"] > float(cfg["MAX_CONNECTION_AGE_S"]) * 1.1
    # An SSE stream that carries nothing gets a comment this often: inside the 60 s idle
    # timeouts of proxies on the way, and the GFE's.
    assert 0 < float(cfg["SSE_KEEPALIVE_S"]) <= 30
    assert bc["connectionDraining"]["drainingTimeoutSec"] < grace
    budget = (
        vm.prestop_sleep_s(deploy)
        + float(cfg["DRAIN_DELAY_S"])
        + float(cfg["DRAIN_CLOSE_WINDOW_S"])
        + float(cfg["SHUTDOWN_CLEANUP_S"])
    )
    assert grace > budget
    assert bc["healthCheck"] == {
        "type": "HTTP",
        "requestPath": "/readyz",
        "port": vm.container_port(deploy),
        "checkIntervalSec": 5,
        "timeoutSec": 3,
        "healthyThreshold": 1,
        "unhealthyThreshold": 2,
    }
    assert vm.container_port(deploy) == 8081
    assert float(cfg["HTTP_KEEPALIVE_S"]) > 600
    assert float(cfg["DRAIN_DELAY_S"]) == 0


def test_api_backend(gke_objs):
    """Api LB: no affinity, a request timeout, health check on the api port."""
    bc = get(gke_objs, "BackendConfig", "api")["spec"]
    deploy = get(gke_objs, "Deployment", "api")
    assert bc["sessionAffinity"]["affinityType"] != "GENERATED_COOKIE"
    assert bc["healthCheck"]["port"] == vm.container_port(deploy) == 8080
    assert bc["healthCheck"]["requestPath"] == "/readyz"
    assert float(vm.settings(gke_objs, deploy)["HTTP_KEEPALIVE_S"]) > 600


def test_service_annotations_are_json(gke_objs):
    """NEG and backend-config annotations parse as JSON and name rendered BackendConfigs."""
    for name in ("api", "socket"):
        ann = get(gke_objs, "Service", name)["metadata"]["annotations"]
        assert json.loads(ann["cloud.google.com/neg"]) == {"ingress": True}
        ref = json.loads(ann["cloud.google.com/backend-config"])
        assert ref == {"default": name}
        get(gke_objs, "BackendConfig", name)


def test_ingress_class_and_routes(gke_objs):
    """The class is the gce annotation (no ingressClassName); /v1 -> api, /ws, /sse and / ->
    socket."""
    ing = get(gke_objs, "Ingress", "pubsock")
    ann = ing["metadata"]["annotations"]
    assert ann["kubernetes.io/ingress.class"] == "gce"
    assert "ingressClassName" not in ing["spec"]
    assert ann["kubernetes.io/ingress.global-static-ip-name"] == "pubsock-ip"
    host = ing["spec"]["rules"][0]["host"]
    assert vm.gce_route(ing, host, "/v1/channels/room:1/messages") == "api"
    assert vm.gce_route(ing, host, "/v1") == "api"
    assert vm.gce_route(ing, host, "/ws") == "socket"
    assert vm.gce_route(ing, host, "/socket.io/") == "socket"
    assert vm.gce_route(ing, host, "/sse") == "socket"
    assert vm.gce_route(ing, host, "/sse/presence") == "socket"
    assert vm.gce_route(ing, host, "/") == "socket"
    assert vm.gce_route(ing, host, "/pubsock.js") == "socket"
    assert vm.gce_route(ing, host, "/v1beta") == "socket"  # Prefix matches whole path segments


def test_gce_path_translation():
    """Prefix paths become the URL-map pair `/x` + `/x/*` (`/` becomes `/*`), as in ingress-gce."""
    assert vm.gce_paths("/v1", "Prefix") == ["/v1", "/v1/*"]
    assert vm.gce_paths("/v1/", "Prefix") == ["/v1", "/v1/*"]
    assert vm.gce_paths("/", "Prefix") == ["/*"]
    assert vm.gce_paths("/v1", "ImplementationSpecific") == ["/v1"]


def test_tls(gke_objs):
    """308 redirect, SSL policy, and a ManagedCertificate for exactly the Ingress host."""
    ing = get(gke_objs, "Ingress", "pubsock")
    ann = ing["metadata"]["annotations"]
    fc = get(gke_objs, "FrontendConfig", ann["networking.gke.io/v1beta1.FrontendConfig"])["spec"]
    assert fc["redirectToHttps"] == {"enabled": True, "responseCodeName": "PERMANENT_REDIRECT"}
    assert fc["sslPolicy"] == "pubsock-tls"
    cert = get(gke_objs, "ManagedCertificate", ann["networking.gke.io/managed-certificates"])
    assert cert["spec"]["domains"] == [r["host"] for r in ing["spec"]["rules"]]


def test_pod_monitoring_selects_pods(gke_objs):
    """Each PodMonitoring selects its Deployment's pods and scrapes port http /metrics every 30s."""
    for name in ("api", "socket"):
        pm = get(gke_objs, "PodMonitoring", name)["spec"]
        deploy = get(gke_objs, "Deployment", name)
        assert vm.selector_matches(pm["selector"], vm.pod_labels(deploy))
        assert pm["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]


def test_example_params_fill_every_placeholder(gke_objs):
    """The example params reach image, host, domain, GSA emails, project and namespace."""
    params = dict(
        line.split("=", 1)
        for line in (vm.GKE_DIR / vm.PARAMS_EXAMPLE).read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in ("api", "socket"):
        deploy = get(gke_objs, "Deployment", name)
        assert vm.container(deploy)["image"] == params["IMAGE"]
        assert vm.settings(gke_objs, deploy)["GOOGLE_CLOUD_PROJECT"] == params["PROJECT_ID"]
    ann = get(gke_objs, "ServiceAccount", "socket")["metadata"]["annotations"]
    assert ann["iam.gke.io/gcp-service-account"] == params["SOCKET_GSA"]
    assert get(gke_objs, "Ingress", "pubsock")["spec"]["rules"][0]["host"] == params["DOMAIN"]


def test_custom_params_replace_everything(kubectl, tmp_path: Path):
    """With other inputs, no example value survives anywhere, and the namespace moves too."""
    scratch = tmp_path / "k8s"
    shutil.copytree(vm.K8S_DIR, scratch, ignore=shutil.ignore_patterns("params.env"))
    overlay = scratch / "overlays" / "gke"
    (overlay / "params.env").write_text(
        "NAMESPACE=rt-stg\nPROJECT_ID=acme-rt-1\nREGION=us-east4\nDOMAIN=rt.acme.dev\n"
        "PUBSUB_API_ENDPOINT=us-east4-pubsub.googleapis.com:443\n"
        "ALLOWED_ORIGINS=https://rt.acme.dev,https://app.acme.dev\nTOPIC=rt-msgs\n"
        "IMAGE=us-east4-docker.pkg.dev/acme-rt-1/pubsock/pubsock:0123abc\n"
        "API_GSA=pubsock-api@acme-rt-1.iam.gserviceaccount.com\n"
        "SOCKET_GSA=pubsock-socket@acme-rt-1.iam.gserviceaccount.com\n"
    )
    proc = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=True
    )
    assert "example" not in proc.stdout
    objs = vm.parse(proc.stdout)
    assert vm.check_all(objs) == []
    assert {o["metadata"].get("namespace") for o in objs} == {None, "rt-stg"}
    assert get(objs, "Namespace", "rt-stg")
    cfg = vm.settings(objs, get(objs, "Deployment", "socket"))
    assert cfg["PUBSUB_TOPIC"] == "rt-msgs"
    assert cfg["PUBSUB_API_ENDPOINT"] == "us-east4-pubsub.googleapis.com:443"  # regional
    api_cfg = vm.settings(objs, get(objs, "Deployment", "api"))
    assert api_cfg["PUBSUB_API_ENDPOINT"] == "us-east4-pubsub.googleapis.com:443"
    assert cfg["ALLOWED_ORIGINS"] == "https://rt.acme.dev,https://app.acme.dev"
    cert = get(objs, "ManagedCertificate", "pubsock")
    assert cert["spec"]["domains"] == ["rt.acme.dev"]


def test_render_leaves_work_tree_alone(kubectl):
    """Rendering a clean clone (no params.env) uses a scratch copy, never writes k8s/."""
    had_params = (vm.GKE_DIR / vm.PARAMS).exists()
    vm.render(vm.GKE_DIR, use_example_params=True)
    assert (vm.GKE_DIR / vm.PARAMS).exists() == had_params


def test_params_env_is_git_ignored():
    """params.env (written by make deploy) is ignored by git; the example is not."""
    git = shutil.which("git")
    if git is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git work tree")

    def ignored(rel: str) -> bool:
        proc = subprocess.run([git, "-C", str(REPO_ROOT), "check-ignore", "-q", rel], check=False)
        return proc.returncode == 0

    assert ignored("k8s/overlays/gke/params.env")
    assert not ignored("k8s/overlays/gke/params.env.example")
