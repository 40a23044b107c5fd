#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the workflow's SLURM profile.
#
#   tests/slurm/cluster.sh install   apt-get the Debian packages (slurmctld, slurmd, slurm-client, munge)
#   tests/slurm/cluster.sh start     write the config, start munged, slurmctld and slurmd, wait for an idle node
#   tests/slurm/cluster.sh stop      cancel the cluster's jobs and stop only the daemons this script started
#   tests/slurm/cluster.sh status    sinfo of the running cluster
#
# Runs as root without systemd (containers, CI). Every step is idempotent. Everything the cluster writes lives in
# $SLURM_TEST_ROOT (default /var/tmp/wlseg-slurm); the config is $SLURM_TEST_ROOT/etc/slurm.conf, so clients need
# SLURM_CONF pointing there; while the cluster runs, /etc/slurm/slurm.conf is a symlink to it (created only where no
# config exists, removed on stop), so a real cluster's config is never touched.
# Settings (environment): SLURM_TEST_ROOT, SLURM_TEST_PARTITION (default wlsegtest), SLURM_TEST_CTLD_PORT (6817),
# SLURM_TEST_SLURMD_PORT (6818).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${SLURM_TEST_ROOT:-/var/tmp/wlseg-slurm}"
PARTITION="${SLURM_TEST_PARTITION:-wlsegtest}"
CTLD_PORT="${SLURM_TEST_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_TEST_SLURMD_PORT:-6818}"
export SLURM_CONF="$ROOT/etc/slurm.conf"
MUNGE_SOCKET_DIR=/run/munge
DEFAULT_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "[slurm-test] $*" >&2; }

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null
}

do_install() {
    if installed; then
        log "packages already installed"
        return
    fi
    [[ $EUID -eq 0 ]] || { log "installing packages needs root"; exit 2; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

# Alive check for a daemon recorded in a pid file.
running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running (not ours; left alone on stop)"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 "$MUNGE_SOCKET_DIR"
    runuser -u munge -- /usr/sbin/munged
    cp "$MUNGE_SOCKET_DIR/munged.pid" "$ROOT/run/munged.started"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not come up"
    exit 1
}

render_config() {
    local hardware
    hardware="$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')"
    install -d "$ROOT"/{etc,state,spool,run,log}
    sed -e "s|@ROOT@|$ROOT|g" -e "s|@HARDWARE@|$hardware|g" -e "s|@PARTITION@|$PARTITION|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        "$HERE/slurm.conf.in" >"$ROOT/etc/slurm.conf.tmp"
    mv "$ROOT/etc/slurm.conf.tmp" "$ROOT/etc/slurm.conf"
    cp "$HERE/gres.conf.in" "$ROOT/etc/gres.conf"
    # Clients inside jobs (the srun of Snakemake's job step) run with a scrubbed SLURM_* environment and look in
    # the default place, so the default place must lead here; a real config there is never replaced.
    if [[ -e "$DEFAULT_CONF" && "$(readlink "$DEFAULT_CONF")" != "$SLURM_CONF" ]]; then
        log "$DEFAULT_CONF exists and is not this test cluster's; refusing to replace it"
        exit 2
    fi
    install -d "$(dirname "$DEFAULT_CONF")"
    ln -sfn "$SLURM_CONF" "$DEFAULT_CONF"
}

wait_idle() {
    local state
    for _ in $(seq 120); do
        state="$(sinfo --noheader --partition "$PARTITION" --format %T 2>/dev/null || true)"
        if [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]; then
            log "node is $state"
            return
        fi
        sleep 0.5
    done
    log "node never became idle (state: ${state:-none}); see $ROOT/log/"
    exit 1
}

do_start() {
    [[ $EUID -eq 0 ]] || { log "starting the daemons needs root"; exit 2; }
    installed || { log "SLURM is not installed; run '$0 install' first"; exit 2; }
    install -d "$ROOT/run"
    if running "$ROOT/run/slurmctld.pid" && running "$ROOT/run/slurmd.pid"; then
        log "already running"
        wait_idle
        echo "SLURM_CONF=$SLURM_CONF"
        return
    fi
    render_config
    start_munge
    running "$ROOT/run/slurmctld.pid" || slurmctld
    running "$ROOT/run/slurmd.pid" || slurmd -N localhost
    wait_idle
    echo "SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {
    local pidfile="$1" pid
    running "$pidfile" || { rm -f "$pidfile"; return; }
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

do_stop() {
    if running "$ROOT/run/slurmctld.pid"; then
        scancel --partition "$PARTITION" 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z "$(squeue --noheader --partition "$PARTITION" --states RUNNING,COMPLETING 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
    stop_pidfile "$ROOT/run/slurmd.pid"
    stop_pidfile "$ROOT/run/slurmctld.pid"
    [[ -f "$ROOT/run/munged.started" ]] && stop_pidfile "$ROOT/run/munged.started"
    [[ "$(readlink "$DEFAULT_CONF" 2>/dev/null)" == "$SLURM_CONF" ]] && rm -f "$DEFAULT_CONF"
    log "stopped"
}

case "${1:-}" in
    install) do_install ;;
    start) do_start ;;
    stop) do_stop ;;
    status) sinfo ;;
    *)
        echo "usage: $0 install|start|stop|status" >&2
        exit 2
        ;;
esac
