#!/usr/bin/env bash
# A one-machine SLURM cluster on loopback, for moedit's launch tests and CI.
#
#   bash launch/local_cluster.sh start|stop|status
#
# start  installs Debian's slurmctld, slurmd, slurm-client and munge when missing,
#        writes slurm.conf for a single node "localhost" with partition "debug",
#        starts munged, slurmctld and slurmd (no systemd needed) and waits until
#        the node accepts jobs. Restarting is safe: it stops what it started first.
# stop   stops the daemons this script started (found through its pid files).
# status prints the state of each daemon and `sinfo`; exit code 0 when the node is up.
#
# Must run as root. Settings (environment):
#   MOEDIT_SLURM_DIR   state, spool, logs and pid files   (default /tmp/moedit-slurm)
#   MOEDIT_SLURM_CPUS  CPUs the node advertises            (default: max(real CPUs, 4))
#                      Advertising more than exist lets a 2-core machine run a
#                      3-task job array side by side; the tasks then share the cores.
set -euo pipefail

action=${1:-}
state_dir=${MOEDIT_SLURM_DIR:-/tmp/moedit-slurm}
conf_dir=/etc/slurm
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

say() { echo "local_cluster: $*" >&2; }

# Retry an apt command while another process holds the dpkg/apt lock (other
# installs may run at the same time); any other failure is reported at once.
apt_retry() {
  local attempt output
  for attempt in $(seq 1 60); do
    if output=$("$@" 2>&1); then return 0; fi
    if ! grep -qi "lock" <<<"$output"; then
      echo "$output" >&2
      return 1
    fi
    say "package manager busy, retrying in 5 s ($attempt/60)"
    sleep 5
  done
  echo "$output" >&2
  return 1
}

install_packages() {
  local need=0 bin
  for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do
    [ -x "$bin" ] || need=1
  done
  [ "$need" = 1 ] || return 0
  say "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  # The package scripts try to start services through invoke-rc.d; without an init
  # system that fails harmlessly, and this script starts the daemons itself.
  apt_retry apt-get update -qq
  apt_retry apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge
}

# Kill the daemon whose pid is in file $1, but only if its command name is $2
# (a stale pid file must not make us kill an unrelated process).
stop_daemon() {
  local pid_file=$1 name=$2 pid
  [ -f "$pid_file" ] || return 0
  pid=$(cat "$pid_file" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    say "stopped $name (pid $pid)"
  fi
  rm -f "$pid_file"
}

do_stop() {
  stop_daemon "$state_dir/slurmd.pid" slurmd
  stop_daemon "$state_dir/slurmctld.pid" slurmctld
  stop_daemon "$state_dir/munged.pid" munged
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge "$state_dir"
  chmod 0700 /etc/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  chmod 0711 /var/lib/munge
  if munge_works; then
    say "munged already running (not started here); using it"
    return 0
  fi
  runuser -u munge -- munged --pid-file="$state_dir/munged.pid"
  for _ in $(seq 1 50); do munge_works && return 0; sleep 0.1; done
  say "munged did not come up"
  return 1
}

write_conf() {
  local real_cpus cpus memory
  real_cpus=$(nproc)
  cpus=${MOEDIT_SLURM_CPUS:-$(( real_cpus > 4 ? real_cpus : 4 ))}
  memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
  mkdir -p "$conf_dir"
  cat >"$conf_dir/slurm.conf" <<EOF
# Written by moedit launch/local_cluster.sh: one node on loopback, no cgroups,
# no accounting database (finished jobs are visible to scontrol for MinJobAge s).
ClusterName=moedit-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs become eligible again after the credential lifetime (default 120 s).
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Start the next job as soon as resources free up (defaults add seconds of delay).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
# Reject jobs that can never run instead of leaving them pending forever.
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
StateSaveLocation=$state_dir/state
SlurmdSpoolDir=$state_dir/spool
SlurmctldPidFile=$state_dir/slurmctld.pid
SlurmdPidFile=$state_dir/slurmd.pid
SlurmctldLogFile=$state_dir/log/slurmctld.log
SlurmdLogFile=$state_dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# The node may advertise more CPUs than it has (see MOEDIT_SLURM_CPUS).
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }

do_start() {
  [ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
  install_packages
  do_stop
  mkdir -p "$state_dir"/state "$state_dir"/spool "$state_dir"/log
  rm -rf "${state_dir:?}"/state/* "${state_dir:?}"/spool/*
  start_munge
  write_conf
  slurmctld
  for _ in $(seq 1 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  slurmd -N localhost
  local state=""
  for _ in $(seq 1 150); do
    state=$(node_state)
    case "$state" in
      idle* | mixed* | alloc*) say "ready (node $state, logs in $state_dir/log)"; return 0 ;;
      down* | drain*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  say "node not ready (state '$state'); see $state_dir/log"
  exit 1
}

do_status() {
  local daemon pid_file up=0
  for daemon in munged slurmctld slurmd; do
    pid_file=$state_dir/$daemon.pid
    if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
      echo "$daemon: running (pid $(cat "$pid_file"))"
    else
      echo "$daemon: not running"
    fi
  done
  case "$(node_state)" in idle* | mixed* | alloc*) up=1 ;; esac
  sinfo 2>/dev/null || true
  [ "$up" = 1 ]
}

case "$action" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
