# shellcheck shell=bash
# Shared virtualenv setup for scripts/test.sh and scripts/demo.sh.
# Source it from the repository root, then call:
#
#     ensure_venv all          # python3 -m venv .venv + pip install -e '.[all]'
#     ensure_venv all dev      # ... plus the [dependency-groups] "dev" group
#
# The install is skipped when nothing changed: a stamp file inside the venv
# records a hash of pyproject.toml (plus the Python version and the venv path)
# for each extra/group that was installed.  Set CACHEKIT_REINSTALL=1 to force
# a reinstall.  On return, the venv's bin/ is first on PATH and VIRTUAL_ENV is
# exported, so `python`, `pytest`, `ruff`, `mypy` all come from the venv.

VENV_DIR="${VENV_DIR:-$PWD/.venv}"
VENV_PY="$VENV_DIR/bin/python"
# Bump when the install logic below changes, to invalidate existing stamps.
_CACHEKIT_STAMP_VERSION=2

_venv_log() { printf '==> %s\n' "$*" >&2; }
_venv_die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# Run a command quietly; on failure print its captured output and return its status.
_venv_quiet() {
    local log rc=0
    log="$(mktemp "${TMPDIR:-/tmp}/cachekit-pip.XXXXXX")"
    "$@" >"$log" 2>&1 </dev/null || rc=$?
    if [[ $rc -ne 0 ]]; then
        printf 'ERROR: command failed (exit %d): %s\n' "$rc" "$*" >&2
        cat "$log" >&2
    fi
    rm -f "$log"
    return "$rc"
}

_venv_create() {
    local base="${PYTHON:-python3}"
    command -v "$base" >/dev/null 2>&1 || _venv_die "'$base' not found; install Python >= 3.11"
    "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        _venv_die "'$base' is $("$base" -V 2>&1); cachekit needs Python >= 3.11 (set PYTHON=...)"
    if [[ -e "$VENV_DIR" ]]; then
        _venv_log "recreating broken virtualenv at $VENV_DIR"
        _venv_quiet "$base" -m venv --clear "$VENV_DIR" || _venv_die "could not recreate $VENV_DIR"
    else
        _venv_log "creating virtualenv at $VENV_DIR"
        _venv_quiet "$base" -m venv "$VENV_DIR" || _venv_die "could not create $VENV_DIR"
    fi
}

# Print the requirements of a [dependency-groups] group, one per line
# (fallback for pip < 25.1, which has no `pip install --group`).
_venv_group_requirements() {
    "$VENV_PY" - "$1" <<'PY'
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    groups = tomllib.load(f).get("dependency-groups", {})


def expand(name, seen=()):
    if name not in groups:
        sys.exit(f"dependency group {name!r} not found in pyproject.toml")
    if name in seen:
        sys.exit(f"dependency group {name!r} includes itself")
    for item in groups[name]:
        if isinstance(item, str):
            yield item
        else:
            yield from expand(item["include-group"], (*seen, name))


for req in expand(sys.argv[1]):
    print(req)
PY
}

# ensure_venv EXTRAS [GROUP...]
ensure_venv() {
    local extras="$1"
    shift
    local groups=("$@")

    [[ -f pyproject.toml ]] || _venv_die "run from the repository root (no pyproject.toml in $PWD)"
    if ! "$VENV_PY" -c 'import sys' >/dev/null 2>&1; then
        _venv_create
    fi

    export VIRTUAL_ENV="$VENV_DIR"
    export PATH="$VENV_DIR/bin:$PATH"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    unset PYTHONHOME

    local key
    key="$(
        {
            echo "stamp-v$_CACHEKIT_STAMP_VERSION"
            echo "$VENV_DIR"
            "$VENV_PY" -VV
            cat pyproject.toml
        } | sha256sum | cut -d' ' -f1
    )"

    # One stamp per component, so `ensure_venv all` is satisfied by an earlier
    # `ensure_venv all dev`.
    local stamp_dir="$VENV_DIR/.cachekit-stamps"
    local components=("extra-$extras") c g missing=0
    for g in "${groups[@]}"; do components+=("group-$g"); done
    for c in "${components[@]}"; do
        [[ "$(cat "$stamp_dir/$c" 2>/dev/null)" == "$key" ]] || missing=1
    done
    if [[ $missing -eq 0 && "${CACHEKIT_REINSTALL:-0}" != 1 ]]; then
        _venv_log "dependencies up to date (.venv; CACHEKIT_REINSTALL=1 to force)"
        return 0
    fi

    local t0=$SECONDS
    _venv_log "installing .[$extras]${groups[*]:+ + group(s) ${groups[*]}} into .venv (quiet; errors are shown)"
    _venv_quiet "$VENV_PY" -m pip install -q --upgrade pip ||
        _venv_log "warning: could not upgrade pip; continuing with $("$VENV_PY" -m pip --version)"

    # compat mode: a plain path in a .pth file, which mypy and IDEs follow; setuptools'
    # default editable finder is an import hook that type checkers cannot see.
    local args=(-e ".[$extras]" --config-settings editable_mode=compat) req_file=""
    if [[ ${#groups[@]} -gt 0 ]]; then
        if "$VENV_PY" -m pip install --help 2>/dev/null | grep -q -- '--group'; then
            for g in "${groups[@]}"; do args+=(--group "$g"); done
        else
            _venv_log "pip $("$VENV_PY" -m pip --version | cut -d' ' -f2) has no --group; reading groups from pyproject.toml"
            req_file="$(mktemp "${TMPDIR:-/tmp}/cachekit-groups.XXXXXX")"
            for g in "${groups[@]}"; do
                _venv_group_requirements "$g" >>"$req_file" || {
                    rm -f "$req_file"
                    _venv_die "could not read dependency group '$g'"
                }
            done
            args+=(-r "$req_file")
        fi
    fi

    local rc=0
    _venv_quiet "$VENV_PY" -m pip install -q "${args[@]}" || rc=$?
    [[ -n "$req_file" ]] && rm -f "$req_file"
    [[ $rc -eq 0 ]] || _venv_die "pip install failed (see output above)"

    mkdir -p "$stamp_dir"
    for c in "${components[@]}"; do printf '%s\n' "$key" >"$stamp_dir/$c"; done
    _venv_log "install done in $((SECONDS - t0)) s"
}
