"""scripts/deploy.sh with DRY_RUN=1: prints the right commands and manifests, and touches nothing.

gcloud and kubectl are replaced by shims that record any call and fail; only `kubectl kustomize`
(offline rendering) passes through to the real kubectl.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, vm

SCRIPT = REPO_ROOT / "scripts" / "deploy.sh"
INPUTS = {
    "PROJECT_ID": "acme-rt-1",
    "REGION": "europe-west4",
    "CLUSTER": "rt-cluster",
    "DOMAIN": "rt.acme.dev",
    "NAMESPACE": "rt-stg",
    "TAG": "0123abc",
}
IMAGE = "europe-west4-docker.pkg.dev/acme-rt-1/pubsock/pubsock:0123abc"
API_GSA = "pubsock-api@acme-rt-1.iam.gserviceaccount.com"
SOCKET_GSA = "pubsock-socket@acme-rt-1.iam.gserviceaccount.com"
BEGIN, END = "# BEGIN rendered manifests", "# END rendered manifests"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    shim_calls: list[str]

    @property
    def commands(self) -> list[list[str]]:
        """The commands the `run` helper printed, split back into argv lists."""
        return [shlex.split(line[2:]) for line in self.stdout.splitlines() if line.startswith("+ ")]

    def find(self, *words: str) -> list[list[str]]:
        """Printed commands that contain every one of `words` as an argument."""
        return [argv for argv in self.commands if all(w in argv for w in words)]

    @property
    def manifests(self) -> list[dict]:
        text = self.stdout.split(BEGIN, 1)[1].split("\n", 1)[1].split(END, 1)[0]
        return vm.parse(text)


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory) -> Path:
    real_kubectl = shutil.which("kubectl")
    if real_kubectl is None:
        pytest.skip("kubectl not on PATH: deploy.sh renders with kubectl kustomize")
    if shutil.which("bash") is None:
        pytest.skip("bash not found")
    bin_dir = tmp_path_factory.mktemp("fakebin")
    shim = (
        "#!/bin/sh\n"
        'echo "{name} $*" >> "$SHIM_LOG"\n'
        'echo "shim: {name} must not run" >&2\n'
        "exit 97\n"
    )
    for name in ("gcloud", "docker", "gsutil"):
        (bin_dir / name).write_text(shim.format(name=name))
    (bin_dir / "kubectl").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = kustomize ]; then exec {shlex.quote(real_kubectl)} "$@"; fi\n'
        + shim.format(name="kubectl").split("\n", 1)[1]
    )
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir


def deploy(fake_bin: Path, tmp_path: Path, **overrides: str | None) -> Run:
    log = tmp_path / "shim.log"
    log.touch()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in INPUTS and k not in {"DRY_RUN", "TOPIC", "AR_REPO", "CLUSTER_LOCATION"}
    }
    env.update(INPUTS, DRY_RUN="1", SHIM_LOG=str(log))
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["KUBECONFIG"] = str(tmp_path / "kubeconfig")  # would show any kubeconfig write
    env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud")
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, log.read_text().splitlines())


def snapshot() -> dict[str, tuple[int, int]]:
    """Files under k8s/ and scripts/ with size and mtime: the dry run must not change them."""
    out = {}
    for top in ("k8s", "scripts"):
        for path in sorted((REPO_ROOT / top).rglob("*")):
            if path.is_file():
                st = path.stat()
                out[str(path.relative_to(REPO_ROOT))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def dry_run(fake_bin, tmp_path_factory) -> Run:
    before = snapshot()
    tmp = tmp_path_factory.mktemp("dryrun")
    run = deploy(fake_bin, tmp)
    assert snapshot() == before, "the dry run changed files in the work tree"
    assert not (tmp / "kubeconfig").exists() and not (tmp / "gcloud").exists()
    return run


def test_dry_run_succeeds_without_touching_anything(dry_run):
    """Exit 0, and neither gcloud nor kubectl (other than kustomize) was invoked."""
    assert dry_run.returncode == 0, dry_run.stderr
    assert dry_run.shim_calls == []


def test_every_gcloud_command_names_the_project(dry_run):
    gcloud = [argv for argv in dry_run.commands if argv[0] == "gcloud"]
    assert len(gcloud) >= 15
    for argv in gcloud:
        assert "--project=acme-rt-1" in argv, argv


def test_apis_registry_and_image(dry_run):
    """APIs enabled, the Artifact Registry repo created, the image built with the TAG."""
    (enable,) = dry_run.find("gcloud", "services", "enable")
    for api in ("container", "artifactregistry", "cloudbuild", "pubsub", "iam", "compute"):
        assert f"{api}.googleapis.com" in enable
    assert dry_run.find(
        "artifacts", "repositories", "create", "pubsock", "--repository-format=docker"
    )
    (build,) = dry_run.find("gcloud", "builds", "submit")
    assert f"--tag={IMAGE}" in build
    assert "--region=europe-west4" in build
    assert build[-1] == "."


def test_topic_with_retention(dry_run):
    """The topic is created with 1 h retention, which covers the socket's HISTORY_AGE_S."""
    (create,) = dry_run.find("gcloud", "pubsub", "topics", "create", "pubsock-messages")
    retention = next(a for a in create if a.startswith("--message-retention-duration="))
    assert retention == "--message-retention-duration=1h"
    socket = vm.one(dry_run.manifests, "Deployment", "socket")
    history_age_s = float(vm.settings(dry_run.manifests, socket)["HISTORY_AGE_S"])
    assert history_age_s <= 3600, "warm start cannot reach further back than the topic retains"


def test_pubsub_roles(dry_run):
    """api: publisher + viewer (its probe's GetTopic) on the topic. socket: subscriber +
    publisher + viewer (the topic's retention) on the topic, custom role."""
    topic_binding = ("gcloud", "pubsub", "topics", "add-iam-policy-binding", "pubsock-messages")
    api = dry_run.find(*topic_binding, f"--member=serviceAccount:{API_GSA}")
    assert sorted(a for argv in api for a in argv if a.startswith("--role=")) == [
        "--role=roles/pubsub.publisher",
        "--role=roles/pubsub.viewer",
    ]
    socket = dry_run.find(*topic_binding, f"--member=serviceAccount:{SOCKET_GSA}")
    assert sorted(a for argv in socket for a in argv if a.startswith("--role=")) == [
        "--role=roles/pubsub.publisher",
        "--role=roles/pubsub.subscriber",
        "--role=roles/pubsub.viewer",
    ]
    (role,) = dry_run.find("gcloud", "iam", "roles", "create", "pubsockSubscriptionOwner")
    perms = next(a for a in role if a.startswith("--permissions=")).split("=", 1)[1]
    assert set(perms.split(",")) == {
        "pubsub.subscriptions.create",
        "pubsub.subscriptions.delete",
        "pubsub.subscriptions.get",
        "pubsub.subscriptions.consume",
    }
    (project,) = dry_run.find("gcloud", "projects", "add-iam-policy-binding", "acme-rt-1")
    assert f"--member=serviceAccount:{SOCKET_GSA}" in project
    assert "--role=projects/acme-rt-1/roles/pubsockSubscriptionOwner" in project
    assert "--condition=None" in project
    # Nothing broader than needed.
    assert not [a for argv in dry_run.commands for a in argv if "pubsub.editor" in a]


def test_service_accounts_and_workload_identity(dry_run):
    """Both GSAs created; each KSA in NAMESPACE may act as its GSA, and nothing else."""
    assert dry_run.find("iam", "service-accounts", "create", "pubsock-api")
    assert dry_run.find("iam", "service-accounts", "create", "pubsock-socket")
    wi = dry_run.find("--role=roles/iam.workloadIdentityUser")
    pairs = {(argv[4], next(a for a in argv if a.startswith("--member="))) for argv in wi}
    assert pairs == {
        (API_GSA, "--member=serviceAccount:acme-rt-1.svc.id.goog[rt-stg/api]"),
        (SOCKET_GSA, "--member=serviceAccount:acme-rt-1.svc.id.goog[rt-stg/socket]"),
    }


def test_load_balancer_prerequisites_match_manifests(dry_run):
    """The static IP and SSL policy the script creates are the ones the manifests name."""
    objs = dry_run.manifests
    ingress = vm.one(objs, "Ingress", "pubsock")
    ip_name = ingress["metadata"]["annotations"]["kubernetes.io/ingress.global-static-ip-name"]
    assert dry_run.find("compute", "addresses", "create", ip_name, "--global")
    policy = vm.one(objs, "FrontendConfig", "pubsock")["spec"]["sslPolicy"]
    (ssl,) = dry_run.find("compute", "ssl-policies", "create", policy)
    assert "--profile=MODERN" in ssl and "--min-tls-version=1.2" in ssl
    (creds,) = dry_run.find("container", "clusters", "get-credentials", "rt-cluster")
    assert "--location=europe-west4" in creds


def test_secret_created_without_printing_values(dry_run):
    """The Secret is created by kubectl from a temp file: no value on a command line or output."""
    (secret,) = dry_run.find("kubectl", "create", "secret", "generic", "pubsock-secrets")
    assert secret[:3] == ["kubectl", "-n", "rt-stg"]
    assert any(a.startswith("--from-env-file=") for a in secret)
    assert not [a for argv in dry_run.commands for a in argv if "--from-literal" in a]
    assert not re.search(r"(API_KEYS|TOKEN_SECRET)=", dry_run.stdout)
    assert not vm.find(dry_run.manifests, "Secret")


def test_apply_and_rollouts(dry_run):
    """apply -k on the overlay after the secret, then one rollout status per Deployment, 15 min."""
    commands = dry_run.commands
    apply = commands.index(["kubectl", "apply", "-k", "k8s/overlays/gke"])
    secret = next(i for i, a in enumerate(commands) if "secret" in a)
    assert secret < apply
    for name in ("api", "socket"):
        argv = ["kubectl", "-n", "rt-stg", "rollout", "status", f"deploy/{name}", "--timeout=15m"]
        assert commands.index(argv) > apply
    assert "rt.acme.dev. 300 IN A" in dry_run.stdout


def test_rendered_manifests_carry_the_inputs(dry_run, schema_root):
    """The printed manifests are valid, hold every invariant and carry image, host, GSAs, ns."""
    objs = dry_run.manifests
    assert vm.schema_problems(objs, schema_root) == []
    assert vm.check_all(objs) == []
    for name in ("api", "socket"):
        deploy = vm.one(objs, "Deployment", name)
        assert vm.container(deploy)["image"] == IMAGE
        assert vm.settings(objs, deploy)["GOOGLE_CLOUD_PROJECT"] == "acme-rt-1"
        assert vm.settings(objs, deploy)["ALLOWED_ORIGINS"] == "https://rt.acme.dev"
    assert {o["metadata"].get("namespace") for o in objs} == {None, "rt-stg"}
    assert vm.one(objs, "Ingress", "pubsock")["spec"]["rules"][0]["host"] == "rt.acme.dev"
    assert vm.one(objs, "ManagedCertificate", "pubsock")["spec"]["domains"] == ["rt.acme.dev"]
    sa = vm.one(objs, "ServiceAccount", "socket")
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == SOCKET_GSA
    assert "example" not in dry_run.stdout.split(BEGIN, 1)[1]


@pytest.mark.parametrize("missing", ["PROJECT_ID", "REGION", "CLUSTER", "DOMAIN"])
def test_missing_input_fails_clearly(fake_bin, tmp_path, missing):
    """A missing required input stops the script before any command, naming the variable."""
    run = deploy(fake_bin, tmp_path, **{missing: None})
    assert run.returncode != 0
    assert "missing required input" in run.stderr and missing in run.stderr
    assert run.commands == [] and run.shim_calls == []


@pytest.mark.parametrize(
    ("key", "value"),
    [("DOMAIN", "Rt.Acme.dev"), ("NAMESPACE", "rt_stg"), ("TAG", "a b"), ("DRY_RUN", "yes")],
)
def test_bad_input_fails_clearly(fake_bin, tmp_path, key, value):
    """An input that would corrupt a command or a manifest is refused up front."""
    run = deploy(fake_bin, tmp_path, **{key: value})
    assert run.returncode != 0
    assert key in run.stderr
    assert run.commands == [] and run.shim_calls == []


def test_both_services_use_the_regional_pubsub_endpoint(dry_run):
    """Pub/Sub keeps ordering for publishers in one region: make deploy points both services at
    its REGION's endpoint."""
    for name in ("api", "socket"):
        deployment = vm.one(dry_run.manifests, "Deployment", name)
        endpoint = vm.settings(dry_run.manifests, deployment)["PUBSUB_API_ENDPOINT"]
        assert endpoint == "europe-west4-pubsub.googleapis.com:443"
