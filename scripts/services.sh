# shellcheck shell=bash
# Make the test/benchmark servers answer on loopback, starting them if needed.
#
# Source it and call the functions (each returns non-zero if the server
# cannot be made to answer within ~10 s):
#
#     source scripts/services.sh
#     ensure_redis       # 127.0.0.1:6379
#     ensure_postgres    # 127.0.0.1:5432
#     ensure_memcached   # 127.0.0.1:11211 (installed with apt-get if missing)
#     ensure_services    # all three; under CI=true a failure is fatal,
#                        # otherwise a warning (the tests that need it skip)
#
# or run it directly: `bash scripts/services.sh [redis|postgres|memcached]...`
# (no arguments = all three).  Only ever talks to 127.0.0.1.

SVC_HOST=127.0.0.1
REDIS_PORT=6379
POSTGRES_PORT=5432
MEMCACHED_PORT=11211
MEMCACHED_PIDFILE="/tmp/cachekit-memcached-$MEMCACHED_PORT.pid"
# Without --pidfile a daemonized redis-server writes /var/run/redis.pid.
REDIS_PIDFILE="/tmp/cachekit-redis-$REDIS_PORT.pid"
SVC_WAIT_SECONDS="${SVC_WAIT_SECONDS:-10}"

_svc_log() { printf '==> %s\n' "$*" >&2; }
_svc_warn() { printf 'WARNING: %s\n' "$*" >&2; }
_svc_is_ci() { [[ "${CI:-}" == true || "${CI:-}" == 1 ]]; }

# --- readiness probes (protocol-level, 2 s timeout each) -------------------

redis_ready() {
    timeout 2 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r line <&3
        [[ $line == "+PONG"* ]]' "$SVC_HOST" "$REDIS_PORT" 2>/dev/null
}

memcached_ready() {
    timeout 2 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "version\r\n" >&3
        IFS= read -r line <&3
        [[ $line == "VERSION "* ]]' "$SVC_HOST" "$MEMCACHED_PORT" 2>/dev/null
}

postgres_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$SVC_HOST" -p "$POSTGRES_PORT" -t 2 >/dev/null 2>&1
    else
        timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$SVC_HOST" "$POSTGRES_PORT" 2>/dev/null
    fi
}

# _svc_wait NAME PROBE: poll PROBE until it succeeds or SVC_WAIT_SECONDS pass.
_svc_wait() {
    local name="$1" probe="$2" deadline=$((SECONDS + SVC_WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        "$probe" && return 0
        sleep 0.5
    done
    "$probe" && return 0
    _svc_warn "$name did not answer on $SVC_HOST within ${SVC_WAIT_SECONDS} s"
    return 1
}

# Run a command, showing its output only if it fails.
_svc_run() {
    local out rc=0
    out="$("$@" 2>&1 </dev/null)" || rc=$?
    if [[ $rc -ne 0 ]]; then
        _svc_warn "command failed (exit $rc): $*"
        [[ -n "$out" ]] && printf '%s\n' "$out" >&2
    fi
    return "$rc"
}

# --- ensure_* ----------------------------------------------------------------

ensure_redis() {
    if redis_ready; then
        _svc_log "redis: answering on $SVC_HOST:$REDIS_PORT"
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        _svc_warn "redis: not answering on $SVC_HOST:$REDIS_PORT and redis-server is not installed"
        return 1
    fi
    local dir=/var/lib/redis logdir=/var/log/redis
    mkdir -p "$dir" "$logdir" 2>/dev/null || true
    if [[ ! -w "$dir" || ! -w "$logdir" ]]; then
        dir="${TMPDIR:-/tmp}/cachekit-redis"
        logdir="$dir"
        mkdir -p "$dir"
    fi
    _svc_log "redis: starting redis-server on $SVC_HOST:$REDIS_PORT (pidfile $REDIS_PIDFILE)"
    _svc_run redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir "$dir" --logfile "$logdir/ci.log" \
        --pidfile "$REDIS_PIDFILE" || return 1
    _svc_wait redis redis_ready || {
        _svc_warn "redis: see $logdir/ci.log"
        return 1
    }
    _svc_log "redis: answering on $SVC_HOST:$REDIS_PORT"
}

ensure_postgres() {
    if postgres_ready; then
        _svc_log "postgres: answering on $SVC_HOST:$POSTGRES_PORT"
        return 0
    fi
    local versions=()
    if command -v pg_ctlcluster >/dev/null 2>&1 && [[ -d /etc/postgresql ]]; then
        mapfile -t versions < <(ls /etc/postgresql 2>/dev/null | sort -V)
    fi
    if [[ ${#versions[@]} -eq 0 ]]; then
        _svc_warn "postgres: not answering on $SVC_HOST:$POSTGRES_PORT and no cluster found (pg_ctlcluster, /etc/postgresql)"
        return 1
    fi
    local v
    for v in "${versions[@]}"; do
        [[ -d "/etc/postgresql/$v/main" ]] || continue
        _svc_log "postgres: starting cluster $v/main"
        local out rc=0
        out="$(pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>&1 </dev/null)" || rc=$?
        # Exit status 2 means "already running"; readiness is judged by the probe.
        if [[ $rc -ne 0 ]]; then
            _svc_warn "postgres: pg_ctlcluster $v main start exited $rc"
            [[ -n "$out" ]] && printf '%s\n' "$out" >&2
        fi
    done
    _svc_wait postgres postgres_ready || return 1
    _svc_log "postgres: answering on $SVC_HOST:$POSTGRES_PORT"
}

ensure_memcached() {
    if memcached_ready; then
        _svc_log "memcached: answering on $SVC_HOST:$MEMCACHED_PORT"
        return 0
    fi
    if ! command -v memcached >/dev/null 2>&1; then
        if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
            _svc_warn "memcached: not installed, and cannot apt-get install it here (needs root + apt-get)"
            return 1
        fi
        _svc_log "memcached: installing with apt-get"
        _svc_run apt-get update -q || return 1
        _svc_run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q memcached || return 1
        if ! command -v memcached >/dev/null 2>&1; then
            _svc_warn "memcached: apt-get install succeeded but memcached is not on PATH"
            return 1
        fi
        # The package may have started its own daemon on 127.0.0.1:11211.
        if memcached_ready; then
            _svc_log "memcached: answering on $SVC_HOST:$MEMCACHED_PORT"
            return 0
        fi
    fi
    local user=()
    [[ $EUID -eq 0 ]] && user=(-u root)
    _svc_log "memcached: starting on $SVC_HOST:$MEMCACHED_PORT (pidfile $MEMCACHED_PIDFILE)"
    _svc_run memcached -d "${user[@]}" -l "$SVC_HOST" -p "$MEMCACHED_PORT" -m 64 \
        -P "$MEMCACHED_PIDFILE" || return 1
    _svc_wait memcached memcached_ready || return 1
    _svc_log "memcached: answering on $SVC_HOST:$MEMCACHED_PORT"
}

# ensure_services [redis|postgres|memcached]...  (default: all three)
# Under CI=true a server that cannot be made to answer is fatal (exit 1);
# otherwise it is a warning and the tests that need it will skip.
ensure_services() {
    local names=("$@") name failed=()
    [[ ${#names[@]} -eq 0 ]] && names=(redis postgres memcached)
    for name in "${names[@]}"; do
        case "$name" in
            redis | postgres | memcached) "ensure_$name" || failed+=("$name") ;;
            *)
                printf 'ERROR: unknown service %q (expected redis, postgres, memcached)\n' "$name" >&2
                return 2
                ;;
        esac
    done
    [[ ${#failed[@]} -eq 0 ]] && return 0
    if _svc_is_ci; then
        printf 'ERROR: CI=true and these servers are not answering on %s: %s\n' \
            "$SVC_HOST" "${failed[*]}" >&2
        exit 1
    fi
    _svc_warn "not answering: ${failed[*]} -- the tests that need them will be skipped"
    return 0
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    ensure_services "$@"
fi
