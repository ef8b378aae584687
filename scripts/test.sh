#!/usr/bin/env bash
# The full check, exactly as CI runs it (`.ci/run` calls this):
#
#     bash scripts/test.sh [pytest args...]
#
# 1. creates .venv (python3 -m venv) if missing and installs -e '.[all]' plus
#    the "dev" dependency group (skipped when pyproject.toml is unchanged);
# 2. makes Redis, PostgreSQL and memcached answer on 127.0.0.1 (starting them,
#    and apt-installing memcached, if needed). Under CI=true a server that
#    cannot be made to answer fails the run; otherwise it is a warning and
#    the tests that need it skip;
# 3. runs the gate, stopping at the first failure:
#    ruff format --check . / ruff check . / mypy / python -m pytest "$@"
#    (pytest exit code 5, "no tests collected", is a failure too).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh
source scripts/services.sh

ensure_venv all dev
ensure_services redis postgres memcached

step() {
    printf '\n==> %s\n' "$*" >&2
    "$@"
}

step ruff format --check .
step ruff check .
step mypy
step python -m pytest "$@"
