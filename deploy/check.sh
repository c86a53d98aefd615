#!/usr/bin/env bash
# Offline checks of the deployment files (no Docker engine, no cluster, no
# registry):
#   1. tests/deploy.rs: the ConfigMap's tokenrelay.toml through tokenrelay's
#      own config parser (and `check-config`), and the manifests, Dockerfile
#      and .dockerignore against the parsed config and each other;
#   2. kubernetes-validate (PyPI; ships the Kubernetes JSON schemas, runs
#      offline): every manifest against the API schema, strictly (unknown
#      fields are errors). The Kustomization is not a Kubernetes API object
#      and has no schema there;
#   3. when kubectl is present, `kubectl kustomize` renders the directory
#      (client side only).
#
#   deploy/check.sh          # from anywhere; exits non-zero on any failure
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The version the schemas are taken from; the native sidecar
# (initContainers[].restartPolicy) needs 1.29 or later.
K8S_VERSION="${K8S_VERSION:-1.33.0}"

cargo test --locked --test deploy

if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "kubernetes-validate missing; installing it" >&2
    python3 -m pip install --quiet 'kubernetes-validate==1.37.0' >&2
fi
manifests=()
for f in deploy/kubernetes/*.yaml; do
    [[ "$(basename "$f")" == kustomization.yaml ]] || manifests+=("$f")
done
kubernetes-validate --strict -k "$K8S_VERSION" "${manifests[@]}"

if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize deploy/kubernetes >/dev/null
    echo "kubectl kustomize renders deploy/kubernetes"
fi
