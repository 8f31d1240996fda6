#!/usr/bin/env bash
# A real single-node Slurm cluster (munge + slurmctld + slurmd on localhost) with all its state under one folder,
# for the `slurm`-marked tests and for trying cluster/submit.sh by hand. Needs root and the Debian packages
# (.ci/install-slurm.sh); no systemd, no cgroups.
#
#   tests/slurm_cluster.sh start DIR   start the daemons; print the slurm.conf path (DIR/env holds SLURM_CONF=…)
#   tests/slurm_cluster.sh stop DIR    cancel the cluster's jobs and stop the daemons by their pid files
#
# Then:  export SLURM_CONF=DIR/slurm.conf; sbatch …; squeue; scontrol show job -o ID
# Ports: SLURM_TEST_PORT (slurmctld; slurmd uses the next one), default: two free ports.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
CONF=$DIR/slurm.conf

log() { echo "slurm_cluster: $*" >&2; }

free_port_pair() {
    # Two consecutive free TCP ports (slurmctld, slurmd): ask the kernel for one, check the next.
    python3 - <<'EOF'
import socket
for _ in range(100):
    with socket.socket() as a:
        a.bind(("127.0.0.1", 0))
        port = a.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        print(port)
        break
EOF
}

stop_daemons() {
    # SIGTERM to every daemon named by the pid files, wait up to 10 s for all of them, then SIGKILL the rest.
    local pidfile pids=() pid _
    for pidfile in "$@"; do
        [ -s "$pidfile" ] && pids+=("$(cat "$pidfile")")
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && break
            pid=
        done
        [ -z "$pid" ] && break
        sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
    rm -f "$@"
}

start() {
    for cmd in munged mungekey slurmctld slurmd sinfo; do
        command -v "$cmd" >/dev/null || { log "$cmd not found: run .ci/install-slurm.sh"; exit 1; }
    done
    if [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        log "already running in $DIR"
        echo "$CONF"
        return
    fi
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 0700 "$DIR/munge/" "$DIR/state"
    # munged refuses a key others can read, and a socket in a folder that not everyone can reach (pytest's temp
    # folders are 0700): the socket gets its own folder under /tmp, removed by `stop`.
    [ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 0600 "$DIR/munge/munge.key"
    local socket_dir
    socket_dir=$(mktemp -d /tmp/alexnet-pipe-munge.XXXXXX)
    chmod 0755 "$socket_dir"
    echo "$socket_dir" >"$DIR/munge-socket-dir"
    local socket=$socket_dir/munge.socket
    munged --key-file="$DIR/munge/munge.key" --socket="$socket" --pid-file="$DIR/munged.pid" \
        --seed-file="$DIR/munge/munged.seed" --log-file="$DIR/log/munged.log"

    local port=${SLURM_TEST_PORT:-$(free_port_pair)}
    local node
    node=$(slurmd -C | sed -n 's/^NodeName=[^ ]* /NodeName=localhost /p')
    cat >"$CONF" <<EOF
# written by tests/slurm_cluster.sh: a throwaway single-node cluster under $DIR
ClusterName=alexnet-pipe-test
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MailProg=/bin/true
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=600
KillWait=5
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    echo "export SLURM_CONF=$CONF" >"$DIR/env"
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF"
    slurmd -f "$CONF" -N localhost

    local _ state=
    for _ in $(seq 300); do
        state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
        case $state in
            idle | mixed | allocated) echo "$CONF"; return ;;
            down* | drain*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
        esac
        sleep 0.1
    done
    log "the node did not become idle (state: ${state:-none}); logs in $DIR/log"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

stop() {
    if [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        # Jobs outlive slurmd (slurmstepd is its own process): cancel them while the controller still runs.
        SLURM_CONF=$CONF scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        local _
        for _ in $(seq 50); do
            [ -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    stop_daemons "$DIR/slurmd.pid" "$DIR/slurmctld.pid"
    stop_daemons "$DIR/munged.pid" # last: the others talk through it until they are gone
    if [ -s "$DIR/munge-socket-dir" ]; then
        rm -rf "$(cat "$DIR/munge-socket-dir")"
        rm -f "$DIR/munge-socket-dir"
    fi
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
