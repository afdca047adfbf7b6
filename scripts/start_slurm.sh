#!/usr/bin/env bash
# Start a one-machine Slurm cluster (munge, slurmctld, slurmd; partition "debug") on this host, so the
# sbatch scripts in slurm/ can be tested for real. Idempotent: a cluster already up is left running.
# Needs root; installs Debian's slurm-wlm and munge with apt-get when they are missing.
# Exit status 77 means "cannot run here" (not root, no apt-get, or someone else's slurm.conf):
# tests/test_slurm.py skips on it.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by distsparse scripts/start_slurm.sh"
say() { echo "start_slurm: $*" >&2; }

[[ $(id -u) == 0 ]] || { say "needs root"; exit 77; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { say "slurm-wlm/munge missing and no apt-get"; exit 77; }
    say "installing slurm-wlm and munge (about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: Slurm's authentication; one key, one daemon.
[[ -s /etc/munge/munge.key ]] || runuser -u munge -- /usr/sbin/mungekey --create
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
fi

# slurm.conf for this host, its node line as slurmd itself measures it (CPUs, memory).
node=$(slurmd -C | head -1)
host=$(hostname)
conf="$MARK
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"

changed=0
if [[ ! -e $CONF ]] || [[ $(cat "$CONF") != "$conf" ]]; then
    if [[ -e $CONF ]] && [[ $(head -1 "$CONF") != "$MARK" ]]; then
        say "$CONF was not written by this script; not touching another cluster's configuration"
        exit 77
    fi
    mkdir -p /etc/slurm
    printf '%s\n' "$conf" >"$CONF"
    changed=1
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if alive /run/slurmctld.pid; then
    ((changed)) && scontrol reconfigure
else
    /usr/sbin/slurmctld
fi
alive /run/slurmd.pid || /usr/sbin/slurmd

# Wait until the node takes jobs; a node left down or drained by an earlier run is resumed.
for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    case $state in
        idle | mix | alloc | comp) say "up: node $host is $state"; exit 0 ;;
        down* | drain* | drng*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
say "node $host did not become ready (state: ${state:-unknown}); see /var/log/slurm/"
exit 1
