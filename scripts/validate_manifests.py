"""Validate pubsock's rendered Kubernetes manifests offline: JSON Schemas, then invariants.

Usage:
    python scripts/validate_manifests.py                      # renders k8s/overlays/gke (+ base)
    kubectl kustomize k8s/overlays/gke | python scripts/validate_manifests.py -

The schemas live in `k8s/schemas/` (README there: source and version of each); they only
check shapes. The invariants below check what a schema cannot: values the GKE controllers
accept but reject later as events, cross-object references (annotations naming objects, selectors
matching pods) and the timing arithmetic that keeps a rollout from dropping websockets. tests/k8s
runs the same functions, and mutates manifests to prove each check can fail.

Every check returns a list of problems (strings); an empty list means the manifests hold.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = REPO_ROOT / "k8s"
SCHEMA_DIR = K8S_DIR / "schemas"
BASE_DIR = K8S_DIR / "base"
GKE_DIR = K8S_DIR / "overlays" / "gke"
PARAMS = "params.env"
PARAMS_EXAMPLE = "params.env.example"

# What the services and the contract fix.
CONTAINER_PORTS = {"api": 8080, "socket": 8081}
SECRET_NAME = "pubsock-secrets"
SECRET_KEYS = {"api": {"API_KEYS", "TOKEN_SECRET"}, "socket": {"TOKEN_SECRET"}}
SECRET_ENV = {"API_KEYS", "TOKEN_SECRET"}
COMMON_ENV = {
    "BROKER",
    "GOOGLE_CLOUD_PROJECT",
    "PUBSUB_TOPIC",
    "ALLOWED_ORIGINS",
    "LOG_LEVEL",
    "HOST",
    "PORT",
    "HTTP_KEEPALIVE_S",
    "DRAIN_DELAY_S",
    "SHUTDOWN_CLEANUP_S",
}
REQUIRED_ENV = {
    "api": COMMON_ENV
    | {"PUBLISH_TIMEOUT_S", "MAX_MESSAGE_BYTES", "MAX_REQUEST_BYTES", "MAX_BATCH"},
    "socket": COMMON_ENV
    | {
        "DRAIN_CLOSE_WINDOW_S",
        "MAX_CONNECTION_AGE_S",
        "HISTORY_SIZE",
        "HISTORY_AGE_S",
        "HISTORY_MAX_CHANNELS",
        "SEND_BUFFER_MAX_BYTES",
        "PING_INTERVAL_S",
        "PRESENCE_TTL_S",
        "METRICS_NAMESPACES",
    },
}
GFE_KEEPALIVE_S = 600  # GFE -> backend keepalive; the app's must be longer
MAX_CONNECTION_AGE_JITTER = 0.10  # the socket closes at MAX_CONNECTION_AGE_S * (1 +- 10 %)
AFFINITY_TYPES = {
    "NONE",
    "CLIENT_IP",
    "GENERATED_COOKIE",
}  # ingress-gce backendconfig/validation.go
AFFINITY_COOKIE_TTL_MAX_S = 86400
GFE_SOURCE_RANGES = {"35.191.0.0/16", "130.211.0.0/22"}
GMP_NAMESPACE = "gmp-system"
# Request path -> Service the Ingress must route it to.
ROUTES = {
    "/v1": "api",
    "/v1/channels/room:1/messages": "api",
    "/v1/messages": "api",
    "/v1/tokens": "api",
    "/ws": "socket",
    "/socket.io/": "socket",
    "/": "socket",
    "/index.html": "socket",
    "/pubsock.js": "socket",
    "/v1x": "socket",
}
CLUSTER_SCOPED = {"Namespace"}

Obj = dict[str, Any]


# --------------------------------------------------------------------------- rendering


class RenderError(RuntimeError):
    pass


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(directory: Path, *, use_example_params: bool = False) -> list[Obj]:
    """`kubectl kustomize DIR` as a list of objects.

    An overlay without its git-ignored params.env (a clean clone) renders from a scratch copy of
    k8s/ with params.env.example in its place; so does any overlay when use_example_params is set.
    The work tree is never written.
    """
    binary = kubectl()
    if binary is None:
        raise RenderError("kubectl not found on PATH (it embeds kustomize)")
    directory = directory.resolve()
    example = directory / PARAMS_EXAMPLE
    needs_copy = example.exists() and (use_example_params or not (directory / PARAMS).exists())
    if not needs_copy:
        return _kustomize(binary, directory)
    with tempfile.TemporaryDirectory(prefix="pubsock-k8s-") as tmp:
        scratch = Path(tmp) / "k8s"
        shutil.copytree(K8S_DIR, scratch)
        target = scratch / directory.relative_to(K8S_DIR)
        shutil.copyfile(example, target / PARAMS)
        return _kustomize(binary, target)


def _kustomize(binary: str, directory: Path) -> list[Obj]:
    proc = subprocess.run(
        [binary, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed:\n{proc.stderr.strip()}")
    return parse(proc.stdout)


def parse(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


# --------------------------------------------------------------------------- schemas


class SchemaMissing(RuntimeError):
    """The schema folder or its index is not there: validation cannot run (a failure, never a
    skip: a checkout without schemas must not pass while checking less)."""


@cache
def _index(root: Path) -> dict[str, str]:
    path = root / "index.json"
    if not path.is_file():
        raise SchemaMissing(f"no schema index at {path}")
    return json.loads(path.read_text())


def require_schemas(root: Path = SCHEMA_DIR) -> Path:
    """`root`, once its index and every file the index names are there; else SchemaMissing."""
    missing = sorted(name for name in _index(root).values() if not (root / name).is_file())
    if missing:
        raise SchemaMissing(f"schemas missing from {root}: {', '.join(missing)}")
    return root


@cache
def _validator(path: Path) -> Any:
    import jsonschema  # only the schema step needs it

    return jsonschema.Draft202012Validator(json.loads(path.read_text()))


def schema_problems(objs: Iterable[Obj], root: Path | None = None) -> list[str]:
    """Validate each object against the schema index.json names for its apiVersion/kind.

    An apiVersion/kind missing from the index fails (a typo must never be skipped), and so does
    a schema file the index names but the folder lacks."""
    root = root or SCHEMA_DIR
    index = _index(root)
    problems = []
    for obj in objs:
        key = f"{obj.get('apiVersion')}/{obj.get('kind')}"
        where = f"{key} {obj.get('metadata', {}).get('name')}"
        if key not in index:
            problems.append(f"NO SCHEMA  {where}")
            continue
        if not (root / index[key]).is_file():
            problems.append(f"NO SCHEMA  {where}: {root / index[key]} is missing")
            continue
        validator = _validator(root / index[key])
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = "/".join(map(str, err.absolute_path))
            problems.append(f"INVALID    {where} at /{path}: {err.message}")
    return problems


# --------------------------------------------------------------------------- helpers


def find(objs: Iterable[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o
        for o in objs
        if o.get("kind") == kind and (name is None or o.get("metadata", {}).get("name") == name)
    ]


def one(objs: Iterable[Obj], kind: str, name: str) -> Obj | None:
    found = find(objs, kind, name)
    return found[0] if len(found) == 1 else None


def meta(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def annotations(obj: Obj) -> Mapping[str, str]:
    return meta(obj).get("annotations") or {}


def pod_labels(deploy: Obj) -> Mapping[str, str]:
    return ((deploy.get("spec") or {}).get("template") or {}).get("metadata", {}).get(
        "labels"
    ) or {}


def pod_spec(deploy: Obj) -> Obj:
    return ((deploy.get("spec") or {}).get("template") or {}).get("spec") or {}


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) against labels; empty matches none."""
    if not selector:
        return False
    match_labels = selector.get("matchLabels") or {}
    exprs = selector.get("matchExpressions") or []
    if not match_labels and not exprs:
        return False
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in exprs:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def container(deploy: Obj) -> Obj:
    containers = pod_spec(deploy).get("containers") or [{}]
    return containers[0]


def container_port(deploy: Obj, name: str = "http") -> int | None:
    for port in container(deploy).get("ports") or []:
        if port.get("name") == name:
            return port.get("containerPort")
    return None


def settings(objs: list[Obj], deploy: Obj) -> dict[str, str]:
    """The ConfigMap data a Deployment's container gets through envFrom (all refs merged)."""
    data: dict[str, str] = {}
    for source in container(deploy).get("envFrom") or []:
        ref = (source.get("configMapRef") or {}).get("name")
        cm = one(objs, "ConfigMap", ref) if ref else None
        if cm is not None:
            data.update(cm.get("data") or {})
    return data


def number(data: Mapping[str, str], key: str, default: float | None = None) -> float | None:
    value = data.get(key)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def prestop_sleep_s(deploy: Obj) -> int:
    pre_stop = (container(deploy).get("lifecycle") or {}).get("preStop") or {}
    return int((pre_stop.get("sleep") or {}).get("seconds") or 0)


def drain_budget_s(objs: list[Obj], deploy: Obj) -> float:
    """Seconds from the start of termination to exit, at worst: preStop sleep + in-app delay +
    close window (socket) or in-flight publishes (api) + cleanup. The grace period must exceed
    it."""
    cfg = settings(objs, deploy)
    name = meta(deploy).get("name")
    budget = float(prestop_sleep_s(deploy))
    budget += number(cfg, "DRAIN_DELAY_S", 0.0) or 0.0
    budget += number(cfg, "DRAIN_CLOSE_WINDOW_S", 0.0) or 0.0
    if name == "api":
        budget += number(cfg, "PUBLISH_TIMEOUT_S", 0.0) or 0.0
    budget += number(cfg, "SHUTDOWN_CLEANUP_S", 0.0) or 0.0
    return budget


def service_for(objs: list[Obj], deploy: Obj) -> list[Obj]:
    labels = pod_labels(deploy)
    return [
        s
        for s in find(objs, "Service")
        if (s.get("spec") or {}).get("selector")
        and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
    ]


# --------------------------------------------------------------------------- workload invariants


def check_workloads(objs: list[Obj]) -> list[str]:
    """Invariants of the base (and so of every overlay): pods, probes, security, drain, scaling."""
    problems: list[str] = []
    p = problems.append

    names = [(o.get("kind"), meta(o).get("name")) for o in objs]
    for dup in {n for n in names if names.count(n) > 1}:
        p(f"duplicate object {dup[0]}/{dup[1]}")
    for obj in objs:
        if not meta(obj).get("name"):
            p(f"{obj.get('kind')} without metadata.name")
        if obj.get("kind") == "Secret":
            p(f"Secret {meta(obj).get('name')} rendered: secrets are created by make deploy only")
    namespaces = {meta(o).get("name") for o in find(objs, "Namespace")}
    if len(namespaces) != 1:
        p(f"expected exactly one Namespace, got {sorted(map(str, namespaces))}")
    for obj in objs:
        if obj.get("kind") in CLUSTER_SCOPED:
            continue
        if meta(obj).get("namespace") not in namespaces:
            p(f"{obj.get('kind')}/{meta(obj).get('name')} not in the rendered Namespace")

    for name, port in CONTAINER_PORTS.items():
        deploy = one(objs, "Deployment", name)
        if deploy is None:
            p(f"Deployment {name} missing")
            continue
        problems.extend(_check_deployment(objs, deploy, name, port))

    images = {container(d).get("image") for d in find(objs, "Deployment")}
    if len(images) != 1:
        p(f"api and socket must run the same image, got {sorted(map(str, images))}")

    problems.extend(_check_autoscaling(objs))
    return problems


def _check_deployment(objs: list[Obj], deploy: Obj, name: str, port: int) -> list[str]:
    problems: list[str] = []

    def p(msg: str) -> None:
        problems.append(f"Deployment {name}: {msg}")

    spec = deploy.get("spec") or {}
    pod = pod_spec(deploy)
    c = container(deploy)
    labels = pod_labels(deploy)
    cfg = settings(objs, deploy)

    if len(pod.get("containers") or []) != 1:
        p("expected exactly one container")
    if not selector_matches(spec.get("selector"), labels):
        p("selector does not match the pod template labels")
    command = c.get("command") or []
    if command[-1:] != [f"services.{name}"]:
        p(f"command must end with services.{name} (python -m services.{name}), got {command}")

    # Ports and settings.
    if container_port(deploy) != port:
        p(f"container port named http must be {port}, got {container_port(deploy)}")
    if not cfg:
        p("no settings ConfigMap through envFrom")
    missing = REQUIRED_ENV[name] - cfg.keys()
    if missing:
        p(f"settings ConfigMap lacks {sorted(missing)}")
    if cfg.get("PORT") != str(port):
        p(f"PORT setting {cfg.get('PORT')!r} != container port {port}")
    if cfg.get("HOST") != "0.0.0.0":
        p(f"HOST must be 0.0.0.0, got {cfg.get('HOST')!r}")
    if cfg.get("BROKER") != "pubsub":
        p(f"BROKER must be pubsub, got {cfg.get('BROKER')!r}")
    keepalive = number(cfg, "HTTP_KEEPALIVE_S")
    if keepalive is None or keepalive <= GFE_KEEPALIVE_S:
        p(
            f"HTTP_KEEPALIVE_S={cfg.get('HTTP_KEEPALIVE_S')}"
            f" must exceed the GFE's {GFE_KEEPALIVE_S} s keepalive"
        )
    leaked = SECRET_ENV & cfg.keys()
    if leaked:
        p(f"secret settings {sorted(leaked)} in a ConfigMap")

    # Secrets: from the Secret only, required.
    env = {e.get("name"): e for e in c.get("env") or []}
    for key in SECRET_KEYS[name]:
        ref = ((env.get(key) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if (
            ref.get("name") != SECRET_NAME
            or ref.get("key") != key
            or ref.get("optional") is not False
        ):
            p(f"env {key} must come from secretKeyRef {SECRET_NAME}/{key} with optional: false")
    for key in SECRET_ENV & env.keys():
        if "value" in env[key]:
            p(f"env {key} has a literal value")
    if name == "socket":
        field = ((env.get("POD_NAME") or {}).get("valueFrom") or {}).get("fieldRef") or {}
        if field.get("fieldPath") != "metadata.name":
            p("env POD_NAME must come from the downward API (fieldRef metadata.name)")
    if pod.get("enableServiceLinks") is not False:
        p("enableServiceLinks must be false (Service env vars such as API_PORT would leak in)")

    # Probes: plain httpGet on the named port (the GKE controller copies only those).
    for probe_name, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = (c.get(probe_name) or {}).get("httpGet") or {}
        if get.get("path") != path or get.get("port") not in ("http", port):
            p(f"{probe_name} must be httpGet {path} on port http, got {get or None}")
        if get.get("host") or any(h.get("name") != "Host" for h in get.get("httpHeaders") or []):
            p(f"{probe_name} must be a plain httpGet (no host, no headers but Host)")

    # Security.
    pod_sc = pod.get("securityContext") or {}
    c_sc = c.get("securityContext") or {}
    if not (pod_sc.get("runAsNonRoot") or c_sc.get("runAsNonRoot")):
        p("runAsNonRoot must be true")
    if (pod_sc.get("runAsUser") or c_sc.get("runAsUser") or 0) == 0:
        p("runAsUser must be set and non-zero")
    seccomp = (c_sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        p(f"seccompProfile must be RuntimeDefault, got {seccomp}")
    if c_sc.get("allowPrivilegeEscalation") is not False:
        p("allowPrivilegeEscalation must be false")
    if c_sc.get("privileged"):
        p("must not be privileged")
    if c_sc.get("readOnlyRootFilesystem") is not True:
        p("readOnlyRootFilesystem must be true")
    caps = c_sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []) or caps.get("add"):
        p("capabilities must drop ALL and add none")
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    tmp = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/tmp"]
    if not tmp or "emptyDir" not in (volumes.get(tmp[0].get("name")) or {}):
        p("an emptyDir must be mounted at /tmp (the root filesystem is read-only)")
    resources = c.get("resources") or {}
    for kind in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in (resources.get(kind) or {}):
                p(f"resources.{kind}.{res} missing")

    # Drain: preStop sleep, grace period arithmetic.
    pre_stop = (c.get("lifecycle") or {}).get("preStop") or {}
    if set(pre_stop) != {"sleep"} or prestop_sleep_s(deploy) < 5:
        p(f"preStop must be the native sleep action (>= 5 s), got {pre_stop or None}")
    delay = number(cfg, "DRAIN_DELAY_S", 0.0)
    if prestop_sleep_s(deploy) and delay:
        p(f"DRAIN_DELAY_S={delay:g} on top of the preStop sleep: use one of them, not both")
    grace = pod.get("terminationGracePeriodSeconds")
    budget = drain_budget_s(objs, deploy)
    if not isinstance(grace, int) or grace <= budget:
        p(f"terminationGracePeriodSeconds {grace} must exceed the drain budget {budget:g} s")

    # Rollout and placement.
    strategy = spec.get("strategy") or {}
    rolling = strategy.get("rollingUpdate") or {}
    if strategy.get("type") != "RollingUpdate" or rolling != {"maxSurge": 1, "maxUnavailable": 0}:
        p(f"strategy must be RollingUpdate maxSurge 1 maxUnavailable 0, got {strategy}")
    if "replicas" in spec:
        p("replicas must be left to the HorizontalPodAutoscaler")
    zone = [
        t
        for t in pod.get("topologySpreadConstraints") or []
        if t.get("topologyKey") == "topology.kubernetes.io/zone"
    ]
    if not zone or not selector_matches(zone[0].get("labelSelector"), labels):
        p("needs a topologySpreadConstraint on topology.kubernetes.io/zone selecting its pods")

    sa = pod.get("serviceAccountName")
    if sa != name or one(objs, "ServiceAccount", name) is None:
        p(f"serviceAccountName must be the rendered ServiceAccount {name}, got {sa}")

    services = service_for(objs, deploy)
    if len(services) != 1:
        p(f"expected one Service selecting its pods, got {len(services)}")
    for svc in services:
        for sp in (svc.get("spec") or {}).get("ports") or []:
            if sp.get("targetPort") not in ("http", port):
                p(f"Service {meta(svc).get('name')} targetPort {sp.get('targetPort')} is not http")
    return problems


def _check_autoscaling(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    p = problems.append
    for name in CONTAINER_PORTS:
        deploy = one(objs, "Deployment", name)
        labels = pod_labels(deploy) if deploy else {}
        hpa = one(objs, "HorizontalPodAutoscaler", name)
        if hpa is None:
            p(f"HorizontalPodAutoscaler {name} missing")
        else:
            spec = hpa.get("spec") or {}
            ref = spec.get("scaleTargetRef") or {}
            if ref.get("kind") != "Deployment" or ref.get("name") != name:
                p(f"HPA {name} must target Deployment {name}, got {ref}")
            if (spec.get("minReplicas") or 1) < 2:
                p(f"HPA {name} minReplicas must be >= 2 (one pod can be drained at a time)")
            cpu = [
                m
                for m in spec.get("metrics") or []
                if m.get("type") == "Resource" and (m.get("resource") or {}).get("name") == "cpu"
            ]
            if not cpu:
                p(f"HPA {name} must scale on CPU")
            if name == "socket":
                down = (spec.get("behavior") or {}).get("scaleDown") or {}
                if (down.get("stabilizationWindowSeconds") or 0) < 600:
                    p("HPA socket scaleDown.stabilizationWindowSeconds must be >= 600")
                policies = down.get("policies") or []
                if not policies or any(
                    pol.get("type") != "Pods"
                    or pol.get("value", 99) > 1
                    or pol.get("periodSeconds", 0) < 120
                    for pol in policies
                ):
                    p("HPA socket scaleDown must remove at most 1 pod per 120 s")
        pdb = one(objs, "PodDisruptionBudget", name)
        if pdb is None:
            p(f"PodDisruptionBudget {name} missing")
        else:
            spec = pdb.get("spec") or {}
            if spec.get("maxUnavailable") != 1 or "minAvailable" in spec:
                p(f"PDB {name} must be maxUnavailable: 1")
            if not selector_matches(spec.get("selector"), labels):
                p(f"PDB {name} selector does not match the {name} pods")
    return problems


# --------------------------------------------------------------------------- GKE invariants


def gce_paths(path: str, path_type: str) -> list[str]:
    """Ingress path -> GCE URL-map paths, as ingress-gce's translator does."""
    if path_type == "Prefix":
        if path == "/":
            return ["/*"]
        base = path.rstrip("/")
        return [base, base + "/*"]
    return [path]  # Exact and ImplementationSpecific: verbatim


def gce_route(ingress: Obj, host: str, request_path: str) -> str | None:
    """The Service a GCE URL map sends HOST+PATH to: exact paths, then the longest `/x/*` prefix."""
    candidates: list[tuple[int, str]] = []
    for rule in (ingress.get("spec") or {}).get("rules") or []:
        if rule.get("host") not in (host, None):
            continue
        for item in (rule.get("http") or {}).get("paths") or []:
            service = (((item.get("backend") or {}).get("service")) or {}).get("name")
            for gpath in gce_paths(item.get("path") or "/", item.get("pathType") or ""):
                if gpath.endswith("/*"):
                    prefix = gpath[:-1]
                    if request_path.startswith(prefix):
                        candidates.append((len(prefix), service))
                elif gpath == request_path:
                    candidates.append((10_000, service))
    if not candidates:
        default = ((ingress.get("spec") or {}).get("defaultBackend") or {}).get("service") or {}
        return default.get("name")
    return max(candidates, key=lambda c: c[0])[1]


def parse_json_annotation(obj: Obj, key: str) -> tuple[Any, str | None]:
    raw = annotations(obj).get(key)
    if raw is None:
        return None, f"annotation {key} missing"
    try:
        return json.loads(raw), None
    except (TypeError, ValueError) as err:
        return None, f"annotation {key} is not JSON ({err}): {raw!r}"


def check_gke(objs: list[Obj]) -> list[str]:
    """Invariants of the GKE overlay: NEG Services, BackendConfigs, Ingress, TLS, IAM, policy,
    metrics."""
    problems: list[str] = []
    p = problems.append
    backend_configs = {meta(b).get("name"): b for b in find(objs, "BackendConfig")}

    # Services -> BackendConfigs, and the numbers each BackendConfig must respect.
    for name, port in CONTAINER_PORTS.items():
        deploy = one(objs, "Deployment", name)
        svc = one(objs, "Service", name)
        if deploy is None or svc is None:
            p(f"Deployment/Service {name} missing")
            continue
        where = f"Service {name}"
        neg, err = parse_json_annotation(svc, "cloud.google.com/neg")
        if err:
            p(f"{where}: {err}")
        elif not isinstance(neg, dict) or neg.get("ingress") is not True:
            p(f'{where}: cloud.google.com/neg must be {{"ingress": true}}, got {neg}')
        ref, err = parse_json_annotation(svc, "cloud.google.com/backend-config")
        if err:
            p(f"{where}: {err}")
            continue
        port_names = {sp.get("name") for sp in svc["spec"].get("ports") or []}
        port_numbers = {str(sp.get("port")) for sp in svc["spec"].get("ports") or []}
        named: set[str] = set()
        if isinstance(ref, dict) and isinstance(ref.get("default"), str):
            named.add(ref["default"])
        if isinstance(ref, dict) and isinstance(ref.get("ports"), dict):
            for key, value in ref["ports"].items():
                if key not in port_names | port_numbers:
                    p(f"{where}: backend-config port {key!r} is not a port of the Service")
                named.add(value)
        if not named or not isinstance(ref, dict) or set(ref) - {"default", "ports"}:
            p(f'{where}: backend-config must be {{"default": ...}} or {{"ports": ...}}, got {ref}')
        for bc_name in named:
            bc = backend_configs.get(bc_name)
            if bc is None:
                p(f"{where}: backend-config names missing BackendConfig {bc_name!r}")
                continue
            problems.extend(_check_backend_config(objs, bc, deploy, name, port))

    for bc in backend_configs.values():
        affinity = ((bc.get("spec") or {}).get("sessionAffinity") or {}).get("affinityType")
        if affinity is not None and affinity not in AFFINITY_TYPES:
            p(
                f"BackendConfig {meta(bc).get('name')}: affinityType {affinity!r}"
                f" not in {sorted(AFFINITY_TYPES)}"
            )

    problems.extend(_check_ingress(objs))
    problems.extend(_check_identity(objs))
    problems.extend(_check_network_policy(objs))
    problems.extend(_check_pod_monitoring(objs))
    return problems


def _check_backend_config(objs: list[Obj], bc: Obj, deploy: Obj, name: str, port: int) -> list[str]:
    problems: list[str] = []

    def p(msg: str) -> None:
        problems.append(f"BackendConfig {meta(bc).get('name')} (for {name}): {msg}")

    spec = bc.get("spec") or {}
    cfg = settings(objs, deploy)
    grace = pod_spec(deploy).get("terminationGracePeriodSeconds") or 0
    timeout = spec.get("timeoutSec")
    affinity = spec.get("sessionAffinity") or {}
    draining = (spec.get("connectionDraining") or {}).get("drainingTimeoutSec")
    health = spec.get("healthCheck") or {}

    if not isinstance(timeout, int):
        p("timeoutSec must be set (the default 30 s would cut every websocket after 30 s)")
        timeout = 0
    if name == "socket":
        if affinity.get("affinityType") != "GENERATED_COOKIE":
            p(f"affinityType must be GENERATED_COOKIE, got {affinity.get('affinityType')}")
        ttl = affinity.get("affinityCookieTtlSec")
        if not isinstance(ttl, int) or not 0 <= ttl <= AFFINITY_COOKIE_TTL_MAX_S:
            p(
                f"affinityCookieTtlSec must be an integer in 0..{AFFINITY_COOKIE_TTL_MAX_S},"
                f" got {ttl}"
            )
        age = number(cfg, "MAX_CONNECTION_AGE_S")
        if age is None or timeout <= age * (1 + MAX_CONNECTION_AGE_JITTER):
            p(
                f"timeoutSec {timeout} must exceed MAX_CONNECTION_AGE_S"
                f" {cfg.get('MAX_CONNECTION_AGE_S')}"
                f" x {1 + MAX_CONNECTION_AGE_JITTER:g} (jitter): the LB would cut before the 1012"
            )
        close_by = (
            prestop_sleep_s(deploy)
            + (number(cfg, "DRAIN_DELAY_S", 0.0) or 0.0)
            + (number(cfg, "DRAIN_CLOSE_WINDOW_S", 0.0) or 0.0)
        )
        if isinstance(draining, int) and draining < close_by:
            p(
                f"drainingTimeoutSec {draining} < preStop + DRAIN_DELAY_S + DRAIN_CLOSE_WINDOW_S"
                f" = {close_by:g}: the LB would cut sockets before their 1012"
            )
    else:
        if affinity.get("affinityType") == "GENERATED_COOKIE":
            p("the api must not use GENERATED_COOKIE (one GCLB cookie per host, socket's)")
        publish = number(cfg, "PUBLISH_TIMEOUT_S", 0.0) or 0.0
        if timeout <= publish:
            p(f"timeoutSec {timeout} must exceed PUBLISH_TIMEOUT_S {publish:g}")
    if not isinstance(draining, int) or not 0 < draining < grace:
        p(f"drainingTimeoutSec {draining} must be > 0 and < terminationGracePeriodSeconds {grace}")
    if health.get("type") != "HTTP" or health.get("requestPath") != "/readyz":
        p(f"healthCheck must be type HTTP on /readyz, got {health or None}")
    if health.get("port") != port:
        p(f"healthCheck.port {health.get('port')} != container port {port}")
    interval, hc_timeout = health.get("checkIntervalSec"), health.get("timeoutSec")
    if not isinstance(interval, int) or not isinstance(hc_timeout, int) or hc_timeout > interval:
        p(f"healthCheck needs checkIntervalSec and timeoutSec <= it, got {interval}/{hc_timeout}")
    return problems


def _check_ingress(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    p = problems.append
    ingresses = find(objs, "Ingress")
    if len(ingresses) != 1:
        return [f"expected one Ingress, got {len(ingresses)}"]
    ing = ingresses[0]
    spec = ing.get("spec") or {}
    ann = annotations(ing)
    where = f"Ingress {meta(ing).get('name')}"
    if ann.get("kubernetes.io/ingress.class") != "gce":
        p(f"{where}: annotation kubernetes.io/ingress.class must be gce")
    if "ingressClassName" in spec:
        p(
            f"{where}: spec.ingressClassName must be absent"
            " (GCE ignores it; with the annotation too, the API server rejects the Ingress)"
        )
    if not ann.get("kubernetes.io/ingress.global-static-ip-name"):
        p(f"{where}: annotation kubernetes.io/ingress.global-static-ip-name missing")
    if str(ann.get("kubernetes.io/ingress.allow-http", "true")).lower() == "false":
        p(f"{where}: allow-http false would drop the HTTP->HTTPS redirect")

    fc_name = ann.get("networking.gke.io/v1beta1.FrontendConfig")
    fc = one(objs, "FrontendConfig", fc_name) if fc_name else None
    if fc is None:
        p(f"{where}: FrontendConfig annotation names no rendered FrontendConfig ({fc_name!r})")
    else:
        fspec = fc.get("spec") or {}
        redirect = fspec.get("redirectToHttps") or {}
        if (
            redirect.get("enabled") is not True
            or redirect.get("responseCodeName") != "PERMANENT_REDIRECT"
        ):
            p(
                f"FrontendConfig {fc_name}: redirectToHttps must be enabled"
                " with PERMANENT_REDIRECT (308)"
            )
        if not fspec.get("sslPolicy"):
            p(f"FrontendConfig {fc_name}: sslPolicy missing")

    hosts = [r.get("host") for r in spec.get("rules") or []]
    if not hosts or not all(hosts):
        p(f"{where}: every rule needs a host")
    cert_names = [
        n.strip()
        for n in (ann.get("networking.gke.io/managed-certificates") or "").split(",")
        if n.strip()
    ]
    if not cert_names:
        p(f"{where}: annotation networking.gke.io/managed-certificates missing")
    domains: list[str] = []
    for cert_name in cert_names:
        cert = one(objs, "ManagedCertificate", cert_name)
        if cert is None:
            p(f"{where}: managed-certificates names missing ManagedCertificate {cert_name!r}")
        else:
            domains += (cert.get("spec") or {}).get("domains") or []
    if cert_names and sorted(set(domains)) != sorted(set(filter(None, hosts))):
        p(
            f"ManagedCertificate domains {sorted(domains)}"
            f" != Ingress hosts {sorted(map(str, hosts))}"
        )

    services = {meta(s).get("name"): s for s in find(objs, "Service")}
    for rule in spec.get("rules") or []:
        for item in (rule.get("http") or {}).get("paths") or []:
            path, path_type = item.get("path"), item.get("pathType")
            if path_type not in ("Prefix", "Exact"):
                p(
                    f"{where}: path {path} uses pathType {path_type};"
                    " use Prefix or Exact (explicit GCE semantics)"
                )
            if "*" in (path or ""):
                p(f"{where}: path {path} contains '*' (invalid with Prefix/Exact)")
            backend = (item.get("backend") or {}).get("service") or {}
            svc = services.get(backend.get("name"))
            if svc is None:
                p(f"{where}: path {path} routes to missing Service {backend.get('name')}")
                continue
            bport = backend.get("port") or {}
            ports = svc["spec"].get("ports") or []
            if not any(
                sp.get("name") == bport.get("name") or sp.get("port") == bport.get("number")
                for sp in ports
            ):
                p(f"{where}: path {path} names port {bport} not on Service {backend.get('name')}")
    for host in filter(None, hosts):
        for request_path, want in ROUTES.items():
            got = gce_route(ing, host, request_path)
            if got != want:
                p(f"{where}: {host}{request_path} routes to {got}, want {want}")
    return problems


def _check_identity(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    for name in CONTAINER_PORTS:
        sa = one(objs, "ServiceAccount", name)
        deploy = one(objs, "Deployment", name)
        if sa is None or deploy is None:
            problems.append(f"ServiceAccount {name} missing")
            continue
        email = annotations(sa).get("iam.gke.io/gcp-service-account", "")
        project = settings(objs, deploy).get("GOOGLE_CLOUD_PROJECT")
        want = f"pubsock-{name}@{project}.iam.gserviceaccount.com"
        if email != want:
            problems.append(
                f"ServiceAccount {name}: iam.gke.io/gcp-service-account {email!r} != {want!r}"
            )
    return problems


def _check_network_policy(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    p = problems.append
    policies = find(objs, "NetworkPolicy")
    if not policies:
        return ["NetworkPolicy missing"]
    for name, port in CONTAINER_PORTS.items():
        deploy = one(objs, "Deployment", name)
        labels = pod_labels(deploy) if deploy else {}
        mine = [np for np in policies if selector_matches(np["spec"].get("podSelector"), labels)]
        if not mine:
            p(f"no NetworkPolicy selects the {name} pods")
            continue
        cidrs: set[str] = set()
        gmp = False
        for np in mine:
            spec = np.get("spec") or {}
            if spec.get("policyTypes") != ["Ingress"]:
                p(
                    f"NetworkPolicy {meta(np).get('name')}: policyTypes must be [Ingress] only"
                    " (egress reaches Pub/Sub, DNS and the metadata server)"
                )
            for rule in spec.get("ingress") or []:
                ports = {pp.get("port") for pp in rule.get("ports") or []}
                if ports and port not in ports and "http" not in ports:
                    continue
                for peer in rule.get("from") or []:
                    if "ipBlock" in peer:
                        cidrs.add(peer["ipBlock"].get("cidr"))
                    ns_sel = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
                    if ns_sel.get("kubernetes.io/metadata.name") == GMP_NAMESPACE:
                        gmp = True
        if not cidrs >= GFE_SOURCE_RANGES:
            p(
                f"NetworkPolicy must admit {sorted(GFE_SOURCE_RANGES)} to {name}:{port},"
                f" got {sorted(cidrs)}"
            )
        if not gmp:
            p(f"NetworkPolicy must admit namespace {GMP_NAMESPACE} to {name}:{port} (metrics)")
    return problems


def _check_pod_monitoring(objs: list[Obj]) -> list[str]:
    problems: list[str] = []
    monitors = find(objs, "PodMonitoring")
    for name in CONTAINER_PORTS:
        deploy = one(objs, "Deployment", name)
        if deploy is None:
            continue
        labels = pod_labels(deploy)
        port_names = {pp.get("name") for pp in container(deploy).get("ports") or []}
        mine = [
            m for m in monitors if selector_matches((m.get("spec") or {}).get("selector"), labels)
        ]
        if len(mine) != 1:
            problems.append(
                f"expected one PodMonitoring selecting the {name} pods, got {len(mine)}"
            )
            continue
        endpoints = (mine[0].get("spec") or {}).get("endpoints") or []
        ok = [
            e
            for e in endpoints
            if e.get("port") in port_names
            and e.get("path", "/metrics") == "/metrics"
            and e.get("interval") == "30s"
        ]
        if not ok:
            problems.append(
                f"PodMonitoring for {name} must scrape port http /metrics every 30s,"
                f" got {endpoints}"
            )
    return problems


def check_all(objs: list[Obj], *, gke: bool = True) -> list[str]:
    return check_workloads(objs) + (check_gke(objs) if gke else [])


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", help="'-' to read rendered YAML from stdin")
    parser.add_argument(
        "--schemas", type=Path, default=SCHEMA_DIR, help="the schema folder (default: k8s/schemas)"
    )
    parser.add_argument(
        "--base-only", action="store_true", help="stdin holds the base, not the GKE overlay"
    )
    args = parser.parse_args(argv)
    try:
        root = require_schemas(args.schemas)
    except SchemaMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.source == "-":
        sets = {"stdin": (parse(sys.stdin.read()), not args.base_only)}
    else:
        sets = {"k8s/base": (render(BASE_DIR), False), "k8s/overlays/gke": (render(GKE_DIR), True)}
    failures = 0
    for label, (objs, gke) in sets.items():
        problems = schema_problems(objs, root) + check_all(objs, gke=gke)
        for problem in problems:
            print(f"{label}: {problem}")
        failures += len(problems)
        print(f"{label}: {len(objs)} objects, {len(problems)} problems", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
