#!/usr/bin/env bash
# The main job: `cachekit bench` on the embedded default (a temporary SQLite
# file + the in-process backend; no servers needed), after the examples.
# Prints the results table and writes bench.png.
#
#     bash scripts/demo.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh

ensure_venv all

for example in cache_aside read_through write_through sqlalchemy_repository bulk_delete; do
    printf '\n==> python examples/%s.py\n' "$example" >&2
    python "examples/$example.py"
done

printf '\n==> cachekit bench --plot bench.png\n' >&2
cachekit bench --plot bench.png
