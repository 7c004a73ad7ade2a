#!/usr/bin/env bash
# Lint the GitHub workflows offline: zizmor's security audits (any finding above informational fails)
# and GitHub's workflow schema (it ships inside check-jsonschema). Both come pinned from the dev extra
# (make setup); .ci/run and .github/workflows/pipeline.yml run this.
#   bash scripts/lint-workflows.sh [DIR]     # DIR defaults to .github/workflows
set -euo pipefail
dir=${1:-.github/workflows}
PATH="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin:$PATH"
shopt -s nullglob
files=("$dir"/*.yml "$dir"/*.yaml)
[ ${#files[@]} -gt 0 ] || { echo "lint-workflows: no workflow in $dir" >&2; exit 1; }
zizmor --offline --min-severity low "${files[@]}"
check-jsonschema --builtin-schema vendor.github-workflows "${files[@]}"
