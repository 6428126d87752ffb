"""Each check can fail: a manifest with one mistake injected is caught, with a clear message.

Without these, a check that silently passes everything (a wrong key, a selector matching nothing)
would look the same as a correct one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from .conftest import vm

Objs = list[dict]


def obj(objs: Objs, kind: str, name: str) -> dict:
    found = vm.one(objs, kind, name)
    assert found is not None, f"{kind}/{name} not rendered"
    return found


def bc(objs: Objs, name: str) -> dict:
    return obj(objs, "BackendConfig", name)["spec"]


def ctr(objs: Objs, name: str) -> dict:
    return vm.container(obj(objs, "Deployment", name))


def pod(objs: Objs, name: str) -> dict:
    return vm.pod_spec(obj(objs, "Deployment", name))


def cfg(objs: Objs, name: str) -> dict:
    ref = ctr(objs, name)["envFrom"][0]["configMapRef"]["name"]
    return obj(objs, "ConfigMap", ref)["data"]


def ing(objs: Objs) -> dict:
    return obj(objs, "Ingress", "pubsock")


def env(objs: Objs, name: str, var: str) -> dict:
    return next(e for e in ctr(objs, name)["env"] if e["name"] == var)


def set_ann(objs: Objs, kind: str, name: str, key: str, value: str) -> None:
    obj(objs, kind, name)["metadata"]["annotations"][key] = value


def paths(objs: Objs) -> list[dict]:
    return ing(objs)["spec"]["rules"][0]["http"]["paths"]


# (id, mutation, a substring one of the reported problems must contain)
MUTATIONS: list[tuple[str, Callable[[Objs], object], str]] = [
    # BackendConfig socket
    (
        "socket affinity NONE",
        lambda o: bc(o, "socket")["sessionAffinity"].update(affinityType="NONE"),
        "affinityType must be GENERATED_COOKIE",
    ),
    (
        "affinity type typo",
        lambda o: bc(o, "socket")["sessionAffinity"].update(affinityType="GENERATED_COOKIES"),
        "not in ['CLIENT_IP', 'GENERATED_COOKIE', 'NONE']",
    ),
    (
        "cookie ttl above 1 day",
        lambda o: bc(o, "socket")["sessionAffinity"].update(affinityCookieTtlSec=90000),
        "affinityCookieTtlSec must be an integer in 0..86400",
    ),
    (
        "cookie ttl field typo (schema)",
        lambda o: bc(o, "socket")["sessionAffinity"].update(
            affinityCookieTTLSec=bc(o, "socket")["sessionAffinity"].pop("affinityCookieTtlSec")
        ),
        "INVALID    cloud.google.com/v1/BackendConfig socket at /spec/sessionAffinity",
    ),
    (
        "socket timeout 3600 < 3300 x 1.1",
        lambda o: bc(o, "socket").update(timeoutSec=3600),
        "timeoutSec 3600 must exceed MAX_CONNECTION_AGE_S 3300",
    ),
    (
        "socket timeout removed (30 s default)",
        lambda o: bc(o, "socket").pop("timeoutSec"),
        "timeoutSec must be set",
    ),
    (
        "timeout as a string (schema)",
        lambda o: bc(o, "socket").update(timeoutSec="3700"),
        "INVALID    cloud.google.com/v1/BackendConfig socket at /spec/timeoutSec",
    ),
    (
        "max connection age raised past the LB timeout",
        lambda o: cfg(o, "socket").update(MAX_CONNECTION_AGE_S="3400"),
        "must exceed MAX_CONNECTION_AGE_S 3400",
    ),
    (
        "draining longer than the grace period",
        lambda o: bc(o, "socket")["connectionDraining"].update(drainingTimeoutSec=80),
        "drainingTimeoutSec 80 must be > 0 and < terminationGracePeriodSeconds 75",
    ),
    (
        "close window outlasts the LB drain",
        lambda o: cfg(o, "socket").update(DRAIN_CLOSE_WINDOW_S="40"),
        "drainingTimeoutSec 30 < preStop + DRAIN_DELAY_S + DRAIN_CLOSE_WINDOW_S = 55",
    ),
    (
        "health check on the api port",
        lambda o: bc(o, "socket")["healthCheck"].update(port=8080),
        "healthCheck.port 8080 != container port 8081",
    ),
    (
        "health check on /healthz",
        lambda o: bc(o, "socket")["healthCheck"].update(requestPath="/healthz"),
        "healthCheck must be type HTTP on /readyz",
    ),
    (
        "health check timeout above interval",
        lambda o: bc(o, "socket")["healthCheck"].update(timeoutSec=10),
        "healthCheck needs checkIntervalSec and timeoutSec <= it",
    ),
    # BackendConfig api
    (
        "api cookie affinity",
        lambda o: bc(o, "api")["sessionAffinity"].update(affinityType="GENERATED_COOKIE"),
        "the api must not use GENERATED_COOKIE",
    ),
    (
        "api timeout below the publish timeout",
        lambda o: bc(o, "api").update(timeoutSec=5),
        "timeoutSec 5 must exceed PUBLISH_TIMEOUT_S 10",
    ),
    # Service annotations
    (
        "neg annotation not JSON",
        lambda o: set_ann(o, "Service", "socket", "cloud.google.com/neg", "{ingress: true}"),
        "annotation cloud.google.com/neg is not JSON",
    ),
    (
        "neg annotation false",
        lambda o: set_ann(o, "Service", "api", "cloud.google.com/neg", '{"ingress": false}'),
        'cloud.google.com/neg must be {"ingress": true}',
    ),
    (
        "backend-config names a missing BackendConfig",
        lambda o: set_ann(
            o, "Service", "socket", "cloud.google.com/backend-config", '{"default": "sockets"}'
        ),
        "backend-config names missing BackendConfig 'sockets'",
    ),
    (
        "backend-config names a missing port",
        lambda o: set_ann(
            o,
            "Service",
            "socket",
            "cloud.google.com/backend-config",
            json.dumps({"ports": {"ws": "socket"}}),
        ),
        "backend-config port 'ws' is not a port of the Service",
    ),
    (
        "backend-config annotation removed",
        lambda o: obj(o, "Service", "api")["metadata"]["annotations"].pop(
            "cloud.google.com/backend-config"
        ),
        "annotation cloud.google.com/backend-config missing",
    ),
    # Ingress
    (
        "ingressClassName added",
        lambda o: ing(o)["spec"].update(ingressClassName="gce"),
        "spec.ingressClassName must be absent",
    ),
    (
        "class annotation removed",
        lambda o: ing(o)["metadata"]["annotations"].pop("kubernetes.io/ingress.class"),
        "annotation kubernetes.io/ingress.class must be gce",
    ),
    (
        "ingressClassName typo (schema)",
        lambda o: ing(o)["spec"].update(ingresClassName="gce"),
        "INVALID    networking.k8s.io/v1/Ingress pubsock at /spec",
    ),
    (
        "allow-http false",
        lambda o: set_ann(o, "Ingress", "pubsock", "kubernetes.io/ingress.allow-http", "false"),
        "allow-http false would drop the HTTP->HTTPS redirect",
    ),
    (
        "/ws routed to the api",
        lambda o: next(p for p in paths(o) if p["path"] == "/ws")["backend"]["service"].update(
            name="api"
        ),
        "/ws routes to api, want socket",
    ),
    (
        "/socket.io routed to the api",
        lambda o: next(p for p in paths(o) if p["path"] == "/socket.io")["backend"][
            "service"
        ].update(name="api"),
        "/socket.io/ routes to api, want socket",
    ),
    (
        "/v1 as ImplementationSpecific matches /v1 only",
        lambda o: next(p for p in paths(o) if p["path"] == "/v1").update(
            pathType="ImplementationSpecific"
        ),
        "/v1/messages routes to socket, want api",
    ),
    (
        "wildcard in a Prefix path",
        lambda o: next(p for p in paths(o) if p["path"] == "/v1").update(path="/v1/*"),
        "path /v1/* contains '*'",
    ),
    (
        "route to a missing Service",
        lambda o: paths(o)[-1]["backend"]["service"].update(name="web"),
        "routes to missing Service web",
    ),
    (
        "FrontendConfig annotation names nothing",
        lambda o: set_ann(
            o, "Ingress", "pubsock", "networking.gke.io/v1beta1.FrontendConfig", "pubsock-fc"
        ),
        "FrontendConfig annotation names no rendered FrontendConfig",
    ),
    (
        "redirect with 301",
        lambda o: obj(o, "FrontendConfig", "pubsock")["spec"]["redirectToHttps"].update(
            responseCodeName="MOVED_PERMANENTLY_DEFAULT"
        ),
        "redirectToHttps must be enabled with PERMANENT_REDIRECT (308)",
    ),
    (
        "ssl policy removed",
        lambda o: obj(o, "FrontendConfig", "pubsock")["spec"].pop("sslPolicy"),
        "sslPolicy missing",
    ),
    (
        "certificate for another domain",
        lambda o: obj(o, "ManagedCertificate", "pubsock")["spec"].update(
            domains=["www.example.com"]
        ),
        "ManagedCertificate domains ['www.example.com'] != Ingress hosts",
    ),
    (
        "certificate with upper case (schema)",
        lambda o: obj(o, "ManagedCertificate", "pubsock")["spec"].update(
            domains=["PubSock.example.com"]
        ),
        "INVALID    networking.gke.io/v1/ManagedCertificate pubsock at /spec/domains/0",
    ),
    (
        "apiVersion typo",
        lambda o: obj(o, "FrontendConfig", "pubsock").update(apiVersion="networking.gke.io/v1beta"),
        "NO SCHEMA  networking.gke.io/v1beta/FrontendConfig pubsock",
    ),
    # Deployments: probes, security, drain, rollout
    (
        "readiness probe typo (schema)",
        lambda o: ctr(o, "socket").update(readinesProbe=ctr(o, "socket").pop("readinessProbe")),
        "INVALID    apps/v1/Deployment socket at /spec/template/spec/containers/0",
    ),
    (
        "readiness on /healthz",
        lambda o: ctr(o, "socket")["readinessProbe"]["httpGet"].update(path="/healthz"),
        "readinessProbe must be httpGet /readyz on port http",
    ),
    (
        "liveness on /readyz",
        lambda o: ctr(o, "api")["livenessProbe"]["httpGet"].update(path="/readyz"),
        "livenessProbe must be httpGet /healthz on port http",
    ),
    (
        "readiness with a custom header",
        lambda o: ctr(o, "socket")["readinessProbe"]["httpGet"].update(
            httpHeaders=[{"name": "X-Probe", "value": "1"}]
        ),
        "readinessProbe must be a plain httpGet",
    ),
    (
        "writable root filesystem",
        lambda o: ctr(o, "socket")["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem must be true",
    ),
    (
        "capabilities kept",
        lambda o: ctr(o, "api")["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        "capabilities must drop ALL",
    ),
    (
        "privilege escalation",
        lambda o: ctr(o, "api")["securityContext"].update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation must be false",
    ),
    (
        "runs as root",
        lambda o: (
            pod(o, "socket")["securityContext"].update(runAsNonRoot=False, runAsUser=0),
            ctr(o, "socket")["securityContext"].pop("runAsNonRoot"),
        ),
        "runAsNonRoot must be true",
    ),
    (
        "seccomp unconfined",
        lambda o: ctr(o, "socket")["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "seccompProfile must be RuntimeDefault",
    ),
    (
        "no /tmp emptyDir",
        lambda o: ctr(o, "api").pop("volumeMounts"),
        "an emptyDir must be mounted at /tmp",
    ),
    (
        "no memory limit",
        lambda o: ctr(o, "socket")["resources"]["limits"].pop("memory"),
        "resources.limits.memory missing",
    ),
    (
        "grace period too short",
        lambda o: pod(o, "socket").update(terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds 30 must exceed the drain budget 40 s",
    ),
    (
        "api grace period too short",
        lambda o: pod(o, "api").update(terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds 30 must exceed the drain budget 35 s",
    ),
    (
        "preStop as exec sleep",
        lambda o: ctr(o, "socket")["lifecycle"].update(
            preStop={"exec": {"command": ["sleep", "15"]}}
        ),
        "preStop must be the native sleep action",
    ),
    (
        "in-app delay on top of preStop",
        lambda o: cfg(o, "socket").update(DRAIN_DELAY_S="5"),
        "DRAIN_DELAY_S=5 on top of the preStop sleep",
    ),
    (
        "rolling update drops capacity",
        lambda o: obj(o, "Deployment", "socket")["spec"]["strategy"]["rollingUpdate"].update(
            maxUnavailable=1
        ),
        "strategy must be RollingUpdate maxSurge 1 maxUnavailable 0",
    ),
    (
        "replicas pinned",
        lambda o: obj(o, "Deployment", "api")["spec"].update(replicas=3),
        "replicas must be left to the HorizontalPodAutoscaler",
    ),
    (
        "no zone spread",
        lambda o: pod(o, "socket").pop("topologySpreadConstraints"),
        "topologySpreadConstraint on topology.kubernetes.io/zone",
    ),
    (
        "service links on",
        lambda o: pod(o, "api").pop("enableServiceLinks"),
        "enableServiceLinks must be false",
    ),
    (
        "container port renumbered",
        lambda o: ctr(o, "socket")["ports"][0].update(containerPort=8080),
        "container port named http must be 8081",
    ),
    (
        "PORT setting disagrees with the container port",
        lambda o: cfg(o, "api").update(PORT="8000"),
        "PORT setting '8000' != container port 8080",
    ),
    (
        "short keepalive races the GFE",
        lambda o: cfg(o, "api").update(HTTP_KEEPALIVE_S="5"),
        "HTTP_KEEPALIVE_S=5 must exceed the GFE's 600 s",
    ),
    (
        "setting missing",
        lambda o: cfg(o, "socket").pop("HISTORY_AGE_S"),
        "settings ConfigMap lacks ['HISTORY_AGE_S']",
    ),
    (
        "secret in a ConfigMap",
        lambda o: cfg(o, "api").update(API_KEYS="k1"),
        "secret settings ['API_KEYS'] in a ConfigMap",
    ),
    (
        "optional secret",
        lambda o: env(o, "socket", "TOKEN_SECRET")["valueFrom"]["secretKeyRef"].update(
            optional=True
        ),
        "env TOKEN_SECRET must come from secretKeyRef pubsock-secrets/TOKEN_SECRET",
    ),
    (
        "Secret rendered",
        lambda o: o.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "pubsock-secrets", "namespace": "pubsock"},
                "stringData": {"TOKEN_SECRET": "x"},
            }
        ),
        "Secret pubsock-secrets rendered",
    ),
    (
        "POD_NAME not from the downward API",
        lambda o: env(o, "socket", "POD_NAME").update(value="socket-0", valueFrom=None),
        "env POD_NAME must come from the downward API",
    ),
    (
        "wrong entrypoint",
        lambda o: ctr(o, "socket").update(command=["python", "-m", "services.api"]),
        "command must end with services.socket",
    ),
    (
        "service targets a raw port",
        lambda o: obj(o, "Service", "socket")["spec"]["ports"][0].update(targetPort=9000),
        "targetPort 9000 is not http",
    ),
    # Scaling
    (
        "socket scales down fast",
        lambda o: obj(o, "HorizontalPodAutoscaler", "socket")["spec"]["behavior"][
            "scaleDown"
        ].update(stabilizationWindowSeconds=60),
        "stabilizationWindowSeconds must be >= 600",
    ),
    (
        "socket scales down 5 at a time",
        lambda o: obj(o, "HorizontalPodAutoscaler", "socket")["spec"]["behavior"]["scaleDown"][
            "policies"
        ][0].update(value=5),
        "HPA socket scaleDown must remove at most 1 pod per 120 s",
    ),
    (
        "HPA utilization as a string (schema)",
        lambda o: obj(o, "HorizontalPodAutoscaler", "api")["spec"]["metrics"][0]["resource"][
            "target"
        ].update(averageUtilization="60"),
        "INVALID    autoscaling/v2/HorizontalPodAutoscaler api at /spec/metrics/0",
    ),
    (
        "PDB minAvailable",
        lambda o: obj(o, "PodDisruptionBudget", "socket")["spec"].update(
            minAvailable=2, maxUnavailable=None
        ),
        "PDB socket must be maxUnavailable: 1",
    ),
    (
        "PDB selects nothing",
        lambda o: obj(o, "PodDisruptionBudget", "api")["spec"]["selector"].update(
            matchLabels={"app.kubernetes.io/name": "apis"}
        ),
        "PDB api selector does not match the api pods",
    ),
    # Identity, network policy, metrics
    (
        "GSA of another project",
        lambda o: set_ann(
            o,
            "ServiceAccount",
            "socket",
            "iam.gke.io/gcp-service-account",
            "pubsock-socket@other.iam.gserviceaccount.com",
        ),
        "ServiceAccount socket: iam.gke.io/gcp-service-account",
    ),
    (
        "health-check range missing",
        lambda o: obj(o, "NetworkPolicy", "pubsock-ingress")["spec"]["ingress"][0]["from"].pop(1),
        "NetworkPolicy must admit ['130.211.0.0/22', '35.191.0.0/16']",
    ),
    (
        "network policy restricts egress",
        lambda o: obj(o, "NetworkPolicy", "pubsock-ingress")["spec"].update(
            policyTypes=["Ingress", "Egress"]
        ),
        "policyTypes must be [Ingress] only",
    ),
    (
        "network policy without gmp-system",
        lambda o: obj(o, "NetworkPolicy", "pubsock-ingress")["spec"]["ingress"][0]["from"].pop(2),
        "must admit namespace gmp-system",
    ),
    (
        "PodMonitoring selects nothing",
        lambda o: obj(o, "PodMonitoring", "socket")["spec"]["selector"].update(
            matchLabels={"app": "socket"}
        ),
        "expected one PodMonitoring selecting the socket pods, got 0",
    ),
    (
        "PodMonitoring interval typo (schema)",
        lambda o: obj(o, "PodMonitoring", "api")["spec"]["endpoints"][0].update(
            intervall=obj(o, "PodMonitoring", "api")["spec"]["endpoints"][0].pop("interval")
        ),
        "INVALID    monitoring.googleapis.com/v1/PodMonitoring api at /spec/endpoints/0",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [(m, e) for _, m, e in MUTATIONS], ids=[i for i, _, _ in MUTATIONS]
)
def test_mutation_is_caught(gke_objs, schema_root, mutate, expected):
    """The injected mistake makes the schema or invariant checks report it."""

    def check() -> list[str]:
        return vm.schema_problems(gke_objs, schema_root) + vm.check_all(gke_objs)

    assert check() == []
    mutate(gke_objs)
    problems = check()
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem reported"


def test_every_mutation_has_a_distinct_id():
    ids = [i for i, _, _ in MUTATIONS]
    assert len(ids) == len(set(ids))
