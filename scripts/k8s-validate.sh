#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/k8s/*.yaml, offline:
# - every built-in resource against the Kubernetes JSON schemas bundled in the PyPI package
#   kubernetes-validate, strictly (unknown fields are errors), for the oldest and the newest
#   Kubernetes minor version we support;
# - custom resources (the PodMonitor) against the CRD schemas vendored in deploy/k8s/schemas/,
#   also strictly; a kind with no schema at all is an error, never skipped;
# - the rules an SRE asked for: image pinned to the workspace version (never `latest`), the
#   restricted Pod Security profile on every pod and container, startup/liveness/readiness
#   probes with a startup window of minutes, a PodDisruptionBudget per Deployment, a Job that
#   runs `npsflow topics create`, a PodMonitor or ServiceMonitor;
# - the ConfigMap's configuration with `npsflow config check`, if a binary is built
#   (scripts/prometheus.sh runs this script right after building one).
# Installs kubernetes-validate into a venv under ~/.cache/npsflow the first time (PyPI);
# afterwards it takes a second or two.
#   scripts/k8s-validate.sh [FILE.yaml...]     (default: deploy/k8s/*.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."

kv_version=1.37.0
# Oldest and newest Kubernetes versions the manifests must be valid for.
k8s_versions=(1.29.0 1.37.0)
tools="${NPSFLOW_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/npsflow}"
venv="$tools/kubernetes-validate-$kv_version"
python="$venv/bin/python"

if ! "$python" -c 'import kubernetes_validate, jsonschema, yaml' >/dev/null 2>&1; then
  echo "installing kubernetes-validate $kv_version into $venv"
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$kv_version"
fi

workspace_version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"

if [ $# -eq 0 ]; then set -- deploy/k8s/*.yaml; fi
"$python" - "$workspace_version" "${k8s_versions[*]}" "$@" <<'EOF'
import json
import os
import sys

import jsonschema
import yaml
import kubernetes_validate.utils as kv

version, k8s_versions, files = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
problems = []
resources = []  # (file, resource)
for path in files:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc:
                resources.append((path, doc))


def name(r):
    return f"{r.get('kind')}/{r.get('metadata', {}).get('name')}"


# Vendored schemas of custom resources: (apiVersion, kind) -> file.
CRDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "deploy/k8s/schemas/monitoring.coreos.com_v1_podmonitor.json",
}


def strict(schema):
    """Rejects properties a schema does not declare, as the API server's strict field
    validation does (unless the schema keeps unknown fields)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


# 1. Schemas.
for path, r in resources:
    key = (r.get("apiVersion"), r.get("kind"))
    if key in CRDS:
        with open(CRDS[key]) as f:
            schema = strict(json.load(f))
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(r), key=lambda e: list(e.path))
        for e in errors:
            where = ".".join(str(p) for p in e.path)
            problems.append(f"{path}: {name(r)}: {where}: {e.message}")
        if not r.get("metadata", {}).get("name"):
            problems.append(f"{path}: {name(r)}: no metadata.name")
        continue
    for v in k8s_versions:
        try:
            kv.validate(r, v, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            problems.append(f"{path}: {name(r)} (Kubernetes {v}): {where}: {e.message}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
            problems.append(f"{path}: {name(r)}: no schema ({e.message}); vendor one in deploy/k8s/schemas/")

# 2. What an SRE needs from them.
def pod_templates():
    for path, r in resources:
        if r.get("kind") in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield path, r, r["spec"]["template"]


RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
for path, r, template in pod_templates():
    spec = template["spec"]
    psc = spec.get("securityContext", {})
    for k, want in RESTRICTED_POD.items():
        if psc.get(k) != want:
            problems.append(f"{path}: {name(r)}: pod securityContext.{k} must be {want}")
    for k in ("runAsUser", "runAsGroup"):
        if not isinstance(psc.get(k), int) or psc[k] == 0:
            problems.append(f"{path}: {name(r)}: pod securityContext.{k} must be a non-root id")
    for c in spec.get("initContainers", []) + spec["containers"]:
        where = f"{path}: {name(r)}: container {c['name']}"
        image = c.get("image", "")
        if image != f"npsflow:{version}" and not image.endswith(f"/npsflow:{version}"):
            problems.append(f"{where}: image {image!r} is not pinned to the workspace version npsflow:{version}")
        csc = c.get("securityContext", {})
        for k, want in RESTRICTED_CONTAINER.items():
            if csc.get(k) != want:
                problems.append(f"{where}: securityContext.{k} must be {want}")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: securityContext.capabilities.drop must include ALL")
        if csc.get("capabilities", {}).get("add"):
            problems.append(f"{where}: adds capabilities")
        if r["kind"] == "Deployment":
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe not in c:
                    problems.append(f"{where}: no {probe}")
            sp = c.get("startupProbe", {})
            window = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
            if sp and window < 120:
                problems.append(f"{where}: startupProbe allows only {window} s before liveness applies")
            if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                problems.append(f"{where}: readinessProbe must be /readyz")
            if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                problems.append(f"{where}: livenessProbe must be /healthz")

def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

pdbs = [r for _, r in resources if r.get("kind") == "PodDisruptionBudget"]
for path, r in resources:
    if r.get("kind") == "Deployment":
        labels = r["spec"]["template"]["metadata"].get("labels", {})
        if not any(selects(p["spec"]["selector"], labels) for p in pdbs):
            problems.append(f"{path}: {name(r)}: no PodDisruptionBudget selects its pods")
jobs = [r for _, r in resources if r.get("kind") == "Job"]
if not any(
    c.get("args", [])[-2:] == ["topics", "create"]
    for j in jobs
    for c in j["spec"]["template"]["spec"]["containers"]
):
    problems.append("no Job runs `npsflow topics create`")
if not any(r.get("kind") in ("PodMonitor", "ServiceMonitor") for _, r in resources):
    problems.append("no PodMonitor or ServiceMonitor")

for p in problems:
    print("ERROR " + p)
kinds = sorted({r["kind"] for _, r in resources})
print(
    f"{len(resources)} resources in {len(files)} files ({', '.join(kinds)}): "
    + ("FAILED" if problems else f"valid (strict) against the Kubernetes {' and '.join(k8s_versions)} schemas and the vendored CRD schemas; policy checks passed")
)
sys.exit(1 if problems else 0)
EOF

# The ConfigMap's configuration, with $NPSFLOW_BIN or else the newest npsflow binary built.
bin="${NPSFLOW_BIN:-}"
if [ -z "$bin" ]; then
  for b in target/debug/npsflow target/release/npsflow; do
    if [ -x "$b" ] && { [ -z "$bin" ] || [ "$b" -nt "$bin" ]; }; then bin="$b"; fi
  done
fi
if [ -n "$bin" ]; then
  toml="$(mktemp)"
  trap 'rm -f "$toml"' EXIT
  "$python" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open("deploy/k8s/config.yaml")) if d and d["kind"] == "ConfigMap"]
sys.stdout.write(docs[0]["data"]["npsflow.toml"])' >"$toml"
  if ! out="$("$bin" --config "$toml" config check 2>&1)"; then
    echo "$out" >&2
    echo "ERROR deploy/k8s/config.yaml: the configuration is not valid ($bin config check)" >&2
    exit 1
  fi
  echo "config.yaml's configuration: valid ($bin config check)"
else
  echo "config.yaml's configuration: not checked (no npsflow binary built)"
fi
