#!/usr/bin/env bash
# Deploy pubsock to an existing GKE cluster: `make deploy` runs this with its inputs in the environment.
#
# Required: PROJECT_ID REGION CLUSTER DOMAIN
# Optional: NAMESPACE=pubsock TAG=$(git rev-parse --short HEAD) AR_REPO=pubsock TOPIC=pubsock-messages
#           CLUSTER_LOCATION=$REGION (a zone for a zonal cluster) ALLOWED_ORIGINS=https://$DOMAIN
#           SKIP_BUILD=1 (reuse an image already pushed with TAG)
#           DRY_RUN=1: print every mutating command instead of running it, skip the describe probes
#           (everything counts as missing), render the manifests to stdout; touches nothing.
#
# Steps: enable APIs; Artifact Registry repo; Cloud Build the image; topic with 1 h retention; GSAs,
# custom role, Pub/Sub IAM and Workload Identity bindings; static IP; SSL policy; cluster credentials;
# namespace and Secret; params.env; kubectl apply -k; rollout status; print the IP and DNS record.
# Idempotent: every create sits behind a describe probe, every binding is an add (a no-op when present).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OVERLAY_REL=k8s/overlays/gke

die() {
  printf 'deploy: error: %s\n' "$*" >&2
  exit 2
}
note() { printf '==> %s\n' "$*" >&2; }

DRY_RUN=${DRY_RUN:-0}
case "$DRY_RUN" in 0 | 1) ;; *) die "DRY_RUN must be 0 or 1 (got '$DRY_RUN')" ;; esac

missing=()
for var in PROJECT_ID REGION CLUSTER DOMAIN; do
  [[ -n "${!var:-}" ]] || missing+=("$var")
done
if ((${#missing[@]})); then
  die "missing required input(s): ${missing[*]}
  usage: make deploy PROJECT_ID=my-project REGION=europe-west1 CLUSTER=my-cluster DOMAIN=ws.example.com \\
           [NAMESPACE=pubsock] [TAG=<git short sha>] [AR_REPO=pubsock] [TOPIC=pubsock-messages] [DRY_RUN=1]"
fi

NAMESPACE=${NAMESPACE:-pubsock}
AR_REPO=${AR_REPO:-pubsock}
TOPIC=${TOPIC:-pubsock-messages}
CLUSTER_LOCATION=${CLUSTER_LOCATION:-$REGION}
ALLOWED_ORIGINS=${ALLOWED_ORIGINS:-https://$DOMAIN}
SKIP_BUILD=${SKIP_BUILD:-0}
if [[ -z "${TAG:-}" ]]; then
  TAG=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null) ||
    die "TAG is empty and 'git rev-parse --short HEAD' failed (no commit yet?): pass TAG=..."
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain 2>/dev/null)" ]]; then
    note "warning: the work tree has uncommitted changes; image tag $TAG will not name them (pass a unique TAG)"
  fi
fi

# Inputs end up in gcloud arguments, IAM member strings and YAML: accept only plain tokens.
check() { [[ "$2" =~ $3 ]] || die "$1='$2' is not valid ($4)"; }
check PROJECT_ID "$PROJECT_ID" '^[a-z][a-z0-9-]{4,28}[a-z0-9]$' 'a GCP project id'
check REGION "$REGION" '^[a-z]+-[a-z]+[0-9]+$' 'a region such as europe-west1'
check CLUSTER_LOCATION "$CLUSTER_LOCATION" '^[a-z]+-[a-z]+[0-9]+(-[a-z])?$' 'a region or zone'
check CLUSTER "$CLUSTER" '^[a-z]([-a-z0-9]*[a-z0-9])?$' 'a GKE cluster name'
check DOMAIN "$DOMAIN" '^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]{2,63}$' 'a lower-case DNS name, no wildcard, no trailing dot'
check NAMESPACE "$NAMESPACE" '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$' 'a Kubernetes namespace name'
check TAG "$TAG" '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$' 'a Docker tag'
check AR_REPO "$AR_REPO" '^[a-z]([-a-z0-9]*[a-z0-9])?$' 'an Artifact Registry repository id'
check TOPIC "$TOPIC" '^[A-Za-z][A-Za-z0-9._~+%-]{2,254}$' 'a Pub/Sub topic id'
check ALLOWED_ORIGINS "$ALLOWED_ORIGINS" '^[^[:space:]]+$' 'comma-separated origins, no spaces'

IMAGE="$REGION-docker.pkg.dev/$PROJECT_ID/$AR_REPO/pubsock:$TAG"
API_GSA="pubsock-api@$PROJECT_ID.iam.gserviceaccount.com"
SOCKET_GSA="pubsock-socket@$PROJECT_ID.iam.gserviceaccount.com"
WI_POOL="$PROJECT_ID.svc.id.goog"
CUSTOM_ROLE=pubsockSubscriptionOwner
CUSTOM_ROLE_PERMISSIONS=pubsub.subscriptions.create,pubsub.subscriptions.delete,pubsub.subscriptions.get,pubsub.subscriptions.consume
STATIC_IP=pubsock-ip
SSL_POLICY=pubsock-tls
SECRET=pubsock-secrets
# Optional Secret Manager secrets holding the values of the Kubernetes Secret's two keys.
SM_API_KEYS=${SM_API_KEYS:-pubsock-api-keys}
SM_TOKEN_SECRET=${SM_TOKEN_SECRET:-pubsock-token-secret}

# run: every mutating command goes through here. DRY_RUN=1 prints it (shell-quoted, one line, prefix
# "+ ") and does not execute it.
run() {
  local quoted
  quoted=$(printf '%q ' "$@")
  printf '+ %s\n' "${quoted% }"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}

# exists: a read-only describe probe. Skipped under DRY_RUN=1 (everything counts as missing).
exists() {
  [[ "$DRY_RUN" == 1 ]] && return 1
  "$@" >/dev/null 2>&1
}

gc=(--project="$PROJECT_ID" --quiet)

note "project=$PROJECT_ID region=$REGION cluster=$CLUSTER ($CLUSTER_LOCATION) domain=$DOMAIN namespace=$NAMESPACE"
note "image=$IMAGE topic=$TOPIC dry_run=$DRY_RUN"

# 1. APIs and the image registry.
note "APIs"
run gcloud services enable container.googleapis.com artifactregistry.googleapis.com \
  cloudbuild.googleapis.com pubsub.googleapis.com iam.googleapis.com compute.googleapis.com "${gc[@]}"

note "Artifact Registry repository $AR_REPO"
exists gcloud artifacts repositories describe "$AR_REPO" --location="$REGION" "${gc[@]}" ||
  run gcloud artifacts repositories create "$AR_REPO" --repository-format=docker \
    --location="$REGION" --description="pubsock images" "${gc[@]}"

# 2. One image, two entrypoints. Upload filter: .gcloudignore; build context filter: .dockerignore.
if [[ "$SKIP_BUILD" == 1 ]]; then
  note "SKIP_BUILD=1: using $IMAGE as pushed"
else
  note "Cloud Build $IMAGE"
  (cd "$REPO_ROOT" && run gcloud builds submit --region="$REGION" --tag="$IMAGE" "${gc[@]}" .)
fi

# 3. The topic. Retention lets a new socket pod warm-start its history (seek back HISTORY_AGE_S=3600).
note "Pub/Sub topic $TOPIC"
if exists gcloud pubsub topics describe "$TOPIC" "${gc[@]}"; then
  run gcloud pubsub topics update "$TOPIC" --message-retention-duration=1h "${gc[@]}"
else
  run gcloud pubsub topics create "$TOPIC" --message-retention-duration=1h "${gc[@]}"
fi

# 4. Google service accounts, the custom role, IAM.
note "service accounts"
for gsa in pubsock-api pubsock-socket; do
  exists gcloud iam service-accounts describe "$gsa@$PROJECT_ID.iam.gserviceaccount.com" "${gc[@]}" ||
    run gcloud iam service-accounts create "$gsa" --display-name="$gsa (GKE Workload Identity)" "${gc[@]}"
done

# Creating a subscription needs pubsub.subscriptions.create on the project (plus
# pubsub.topics.attachSubscription on the topic, which roles/pubsub.subscriber grants); each pod
# deletes its own subscription on shutdown and pulls/acks/seeks it (consume).
note "custom role $CUSTOM_ROLE"
if exists gcloud iam roles describe "$CUSTOM_ROLE" "${gc[@]}"; then
  run gcloud iam roles update "$CUSTOM_ROLE" --permissions="$CUSTOM_ROLE_PERMISSIONS" "${gc[@]}"
else
  run gcloud iam roles create "$CUSTOM_ROLE" --title="pubsock subscription owner" \
    --description="Create, get, consume and delete the per-pod Pub/Sub subscriptions of pubsock" \
    --permissions="$CUSTOM_ROLE_PERMISSIONS" --stage=GA "${gc[@]}"
fi

note "IAM bindings"
# api: publish, and read the topic (its broker probe calls GetTopic: pubsub.topics.get).
run gcloud pubsub topics add-iam-policy-binding "$TOPIC" \
  --member="serviceAccount:$API_GSA" --role=roles/pubsub.publisher "${gc[@]}"
run gcloud pubsub topics add-iam-policy-binding "$TOPIC" \
  --member="serviceAccount:$API_GSA" --role=roles/pubsub.viewer "${gc[@]}"
# socket: subscribe (incl. attachSubscription) and publish (presence announcements) on the topic,
# subscription lifecycle at project level (subscriptions are project resources created at start).
run gcloud pubsub topics add-iam-policy-binding "$TOPIC" \
  --member="serviceAccount:$SOCKET_GSA" --role=roles/pubsub.subscriber "${gc[@]}"
run gcloud pubsub topics add-iam-policy-binding "$TOPIC" \
  --member="serviceAccount:$SOCKET_GSA" --role=roles/pubsub.publisher "${gc[@]}"
# socket: read the topic's retention before seeking a new subscription back (pubsub.topics.get).
run gcloud pubsub topics add-iam-policy-binding "$TOPIC" \
  --member="serviceAccount:$SOCKET_GSA" --role=roles/pubsub.viewer "${gc[@]}"
run gcloud projects add-iam-policy-binding "$PROJECT_ID" \
  --member="serviceAccount:$SOCKET_GSA" --role="projects/$PROJECT_ID/roles/$CUSTOM_ROLE" \
  --condition=None "${gc[@]}"

# Workload Identity: KSA NAMESPACE/api acts as pubsock-api, NAMESPACE/socket as pubsock-socket.
note "Workload Identity bindings"
run gcloud iam service-accounts add-iam-policy-binding "$API_GSA" \
  --role=roles/iam.workloadIdentityUser --member="serviceAccount:${WI_POOL}[$NAMESPACE/api]" "${gc[@]}"
run gcloud iam service-accounts add-iam-policy-binding "$SOCKET_GSA" \
  --role=roles/iam.workloadIdentityUser --member="serviceAccount:${WI_POOL}[$NAMESPACE/socket]" "${gc[@]}"

# 5. Load balancer prerequisites: global static IP (Ingress annotation) and SSL policy (FrontendConfig).
note "static IP $STATIC_IP and SSL policy $SSL_POLICY"
exists gcloud compute addresses describe "$STATIC_IP" --global "${gc[@]}" ||
  run gcloud compute addresses create "$STATIC_IP" --global "${gc[@]}"
exists gcloud compute ssl-policies describe "$SSL_POLICY" --global "${gc[@]}" ||
  run gcloud compute ssl-policies create "$SSL_POLICY" --profile=MODERN --min-tls-version=1.2 \
    --global "${gc[@]}"

note "cluster credentials"
run gcloud container clusters get-credentials "$CLUSTER" --location="$CLUSTER_LOCATION" "${gc[@]}"

if [[ "$DRY_RUN" != 1 ]]; then
  for crd in backendconfigs.cloud.google.com frontendconfigs.networking.gke.io \
    managedcertificates.networking.gke.io podmonitorings.monitoring.googleapis.com; do
    kubectl get crd "$crd" >/dev/null 2>&1 ||
      die "CRD $crd is missing in cluster $CLUSTER (HTTP load balancing add-on / managed Prometheus enabled?)"
  done
fi

# 6. Namespace and Secret (never rendered by kustomize, never committed). Values come from Secret
# Manager ($SM_API_KEYS, $SM_TOKEN_SECRET) when those secrets exist, otherwise they are generated.
note "namespace $NAMESPACE and Secret $SECRET"
exists kubectl get namespace "$NAMESPACE" ||
  run kubectl create namespace "$NAMESPACE"
if exists kubectl -n "$NAMESPACE" get secret "$SECRET"; then
  note "Secret $SECRET exists: kept (delete it to regenerate)"
else
  secret_file='<0600 temp file with API_KEYS and TOKEN_SECRET>'
  if [[ "$DRY_RUN" != 1 ]]; then
    secret_file=$(mktemp)
    trap 'rm -f "$secret_file"' EXIT
    chmod 600 "$secret_file"
    random_token() { head -c 32 /dev/urandom | base64 | tr -d '\n/+='; }
    if api_keys=$(gcloud secrets versions access latest --secret="$SM_API_KEYS" "${gc[@]}" 2>/dev/null); then
      note "API_KEYS from Secret Manager $SM_API_KEYS"
    else
      api_keys=$(random_token)
      note "API_KEYS generated; read it with: kubectl -n $NAMESPACE get secret $SECRET -o jsonpath='{.data.API_KEYS}' | base64 -d"
    fi
    if token_secret=$(gcloud secrets versions access latest --secret="$SM_TOKEN_SECRET" "${gc[@]}" 2>/dev/null); then
      note "TOKEN_SECRET from Secret Manager $SM_TOKEN_SECRET"
    else
      token_secret=$(random_token)
      note "TOKEN_SECRET generated"
    fi
    printf 'API_KEYS=%s\nTOKEN_SECRET=%s\n' "$api_keys" "$token_secret" >"$secret_file"
    unset api_keys token_secret
  fi
  # The values travel in a 0600 temp file, never on a command line or in this script's output.
  run kubectl -n "$NAMESPACE" create secret generic "$SECRET" --from-env-file="$secret_file"
  if [[ "$DRY_RUN" != 1 ]]; then rm -f "$secret_file"; fi
fi

# 7. Inputs for the overlay (configMapGenerator + replacements), then apply.
write_params() {
  cat >"$1" <<EOF
# Written by scripts/deploy.sh; not committed. See params.env.example.
NAMESPACE=$NAMESPACE
PROJECT_ID=$PROJECT_ID
REGION=$REGION
PUBSUB_API_ENDPOINT=$REGION-pubsub.googleapis.com:443
DOMAIN=$DOMAIN
ALLOWED_ORIGINS=$ALLOWED_ORIGINS
TOPIC=$TOPIC
IMAGE=$IMAGE
API_GSA=$API_GSA
SOCKET_GSA=$SOCKET_GSA
EOF
}

if [[ "$DRY_RUN" == 1 ]]; then
  # Render from a scratch copy so the dry run leaves the work tree untouched.
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  cp -R "$REPO_ROOT/k8s" "$scratch/k8s"
  write_params "$scratch/$OVERLAY_REL/params.env"
  run kubectl apply -k "$OVERLAY_REL"
  echo "# BEGIN rendered manifests: kubectl kustomize $OVERLAY_REL"
  kubectl kustomize "$scratch/$OVERLAY_REL"
  echo "# END rendered manifests"
else
  write_params "$REPO_ROOT/$OVERLAY_REL/params.env"
  note "wrote $OVERLAY_REL/params.env"
  (cd "$REPO_ROOT" && run kubectl apply -k "$OVERLAY_REL")
fi

# 8. Wait. The NEG readiness gate holds each new pod until the load balancer's health check passes.
note "rollout"
run kubectl -n "$NAMESPACE" rollout status deploy/api --timeout=15m
run kubectl -n "$NAMESPACE" rollout status deploy/socket --timeout=15m

ip="<the address of $STATIC_IP>"
if [[ "$DRY_RUN" != 1 ]]; then
  ip=$(gcloud compute addresses describe "$STATIC_IP" --global --format='value(address)' "${gc[@]}")
fi
cat <<EOF
# Load balancer IP: $ip
# Create this DNS record (the managed certificate provisions only once it resolves):
#   $DOMAIN. 300 IN A $ip
# Then watch: kubectl -n $NAMESPACE get managedcertificate pubsock -w   (Active can take tens of minutes)
#             kubectl -n $NAMESPACE describe ingress pubsock
# Check:      curl -sI https://$DOMAIN/ | grep -i set-cookie     (expect GCLB=...)
EOF
