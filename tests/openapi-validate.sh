#!/usr/bin/env bash
# Validates cloud-sync/openapi.yaml with a standard OpenAPI validator (openapi-spec-validator,
# pinned), installed into a private venv under the cargo target directory. The route tests
# (cloud-sync/tests/openapi.rs) check the server's answers against the same file.
set -euo pipefail
cd "$(dirname "$0")/.."

VALIDATOR_VERSION=0.7.2
target=${CARGO_TARGET_DIR:-target}
venv="$target/openapi-venv"
if ! "$venv/bin/openapi-spec-validator" --help >/dev/null 2>&1 ||
  ! "$venv/bin/python" -m pip show openapi-spec-validator 2>/dev/null | grep -qx "Version: $VALIDATOR_VERSION"; then
  # Debian's python3 has venv (ensurepip) in a package of its own.
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
  fi
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openapi-spec-validator==$VALIDATOR_VERSION"
fi
"$venv/bin/openapi-spec-validator" cloud-sync/openapi.yaml
