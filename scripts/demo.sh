#!/usr/bin/env bash
# The main job: run the examples on the embedded default (SQLite + the
# in-process backend); no servers needed.
#
#     bash scripts/demo.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh

ensure_venv all

for example in cache_aside read_through write_through; do
    printf '\n==> python examples/%s.py\n' "$example" >&2
    python "examples/$example.py"
done
