#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the `slurm` tests (tests/test_slurm.py).
#
#   scripts/slurm-cluster.sh start   # write the config, start munged, slurmctld, slurmd; wait for an idle node
#   scripts/slurm-cluster.sh stop    # stop the daemons this script started
#   scripts/slurm-cluster.sh status  # sinfo
#
# Needs Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge) and root: the
# daemons run as root, jobs as the submitting user. No systemd: the daemons are started
# directly and stopped by their pid files. Both verbs can be run again safely.
#
# The config goes to /etc/slurm (SLURM_CONF_DIR), where Debian's sinfo, sbatch and
# scontrol look for it, so submitit finds the cluster without any setting. State, logs
# and pid files go to SLURM_STATE_DIR.
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
STATE=${SLURM_STATE_DIR:-/var/tmp/poisonbench-slurm}
CLUSTER=poisonbench
WAIT_S=${SLURM_WAIT_S:-60}

die() { echo "slurm-cluster: $*" >&2; exit 1; }

need() {
    [ "$(id -u)" = 0 ] || die "run as root (the daemons need it)"
    for bin in munged slurmctld slurmd sinfo scontrol; do
        command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] \
            || die "$bin not found: apt-get install -y slurm-wlm munge"
    done
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # All memory but 512 MiB, so slurmd's own check (RealMemory <= what it finds) passes.
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 512 ))
    mkdir -p "$CONF_DIR" "$STATE"/{ctld,d,log}
    # proctrack/linuxproc and task/none: no cgroup hierarchy is needed (containers, CI).
    cat > "$CONF_DIR/slurm.conf.tmp" <<EOF
# Written by poisonbench's scripts/slurm-cluster.sh: a single node on localhost.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=300
# submitit ignores SIGTERM, so a requeued or cancelled task runs on until SIGKILL: soon.
KillWait=5
MpiDefault=none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF_DIR/slurm.conf.tmp" "$CONF_DIR/slurm.conf"
    cat > "$CONF_DIR/cgroup.conf" <<EOF
# Written by poisonbench's scripts/slurm-cluster.sh: no cgroup plugin is in use.
CgroupAutomount=no
EOF
}

start_munge() {
    if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    mkdir -p "$STATE" && touch "$STATE/munged.ours"  # stop stops only a munged started here
    for _ in $(seq 50); do
        munge -n </dev/null >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }

start() {
    need
    start_munge
    if ! alive "$STATE/slurmctld.pid" || ! alive "$STATE/slurmd.pid"; then
        write_config
    fi
    alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld
    alive "$STATE/slurmd.pid" || /usr/sbin/slurmd
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        case "$state" in
            idle|mixed|allocated) echo "slurm-cluster: node $(hostname -s) is $state"; return ;;
            down*|drain*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "the node is not idle after ${WAIT_S}s (state: ${state:-unknown}); see $STATE/log/"
}

stop_daemon() {
    local pidfile=$1
    alive "$pidfile" || return 0
    local pid
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    stop_daemon "$STATE/slurmd.pid"
    stop_daemon "$STATE/slurmctld.pid"
    if [ -f "$STATE/munged.ours" ]; then
        stop_daemon /run/munge/munged.pid
        rm -f "$STATE/munged.ours"
    fi
    echo "slurm-cluster: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
