#!/usr/bin/env bash
# A real multi-node SLURM on one machine (Debian's slurm-wlm + munge), as root, beside the
# single-node one of slurm-local.sh: its own config (/etc/slurm-multi/slurm.conf: point
# SLURM_CONF at it), state, ports, and one slurmd per node, each in its own UTS and PID
# namespace (its own hostname n1, n2...; every process SLURM starts for the node lives in
# that namespace). All daemons talk over 127.0.0.1.
#   scripts/slurm-cluster.sh start [--nodes N]   install if missing, configure, start, wait until idle
#   scripts/slurm-cluster.sh stop                stop only the daemons this script started
#   scripts/slurm-cluster.sh status              the daemons and what sinfo reports
#   scripts/slurm-cluster.sh kill-node NAME      SIGKILL the node's namespace init: the node
#                                                and everything on it die at once, no handler runs
#   scripts/slurm-cluster.sh freeze-node NAME    SIGSTOP every process of the node (a partition:
#                                                alive, unreachable, still holding its locks)
#   scripts/slurm-cluster.sh thaw-node NAME      SIGCONT them
#   scripts/slurm-cluster.sh revive-node NAME    start the node's slurmd again and resume it
# Idempotent; the config comes from slurm/slurm-cluster.conf.in. munged is shared with
# slurm-local.sh (started here if it is not running).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
etc=/etc/slurm-multi
conf=$etc/slurm.conf
run=/run/notata-slurm-multi
state=/var/lib/notata-slurm-multi
host=$(hostname -s)
nodes_file=$run/nodes
export SLURM_CONF=$conf

die() { echo "slurm-cluster: $*" >&2; exit 1; }
# A pid file's process is alive and is still the one it names (a pid is reused after a
# node was killed): its command line must contain $2.
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null \
          && grep -qa -- "$2" "/proc/$(cat "$1")/cmdline" 2>/dev/null; }
node_names() { cat "$nodes_file" 2>/dev/null || true; }

write_config() {
  local n=$1 lines="" i
  for i in $(seq 1 "$n"); do
    lines+="NodeName=n$i NodeHostname=n$i NodeAddr=127.0.0.1 Port=$((7820 + i)) CPUs=4 RealMemory=4000 State=UNKNOWN"$'\n'
  done
  mkdir -p "$etc" "$run" "$state/ctld"
  sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@RUN@|$run|g" \
    "$root/slurm/slurm-cluster.conf.in" | awk -v nodes="$lines" '{ if ($0 == "@NODES@") printf "%s", nodes; else print }' \
    > "$conf.tmp"
  changed=0
  if [ -f "$conf" ] && ! cmp -s "$conf.tmp" "$conf"; then changed=1; fi
  mv "$conf.tmp" "$conf"
  [ -f "$etc/cgroup.conf" ] || echo "CgroupPlugin=autodetect" > "$etc/cgroup.conf"
  seq 1 "$n" | sed 's/^/n/' > "$nodes_file"
}

# The node's slurmd, in new UTS and PID namespaces: the namespace's init is a shell that
# names the host and then becomes slurmd (-D: stays in the foreground, so it stays pid 1).
start_node() {
  local name=$1
  alive "$run/init-$name.pid" slurmd && return 0
  mkdir -p "$state/d-$name"
  setsid unshare --uts --pid --fork --mount-proc \
    sh -c "hostname $name && exec slurmd -D -N $name -f $conf" \
    >>"$state/slurmd-$name.out" 2>&1 < /dev/null &
  local unshare_pid=$!
  # the namespace's init is unshare's child: record it (killing it kills the whole node)
  for _ in $(seq 1 50); do
    init=$(pgrep -P "$unshare_pid" | head -n 1 || true)
    [ -n "$init" ] && break
    sleep 0.1
  done
  [ -n "$init" ] || die "the slurmd of $name did not start; see $state/slurmd-$name.out"
  echo "$init" > "$run/init-$name.pid"
  echo "$unshare_pid" > "$run/unshare-$name.pid"
}

wait_idle() {
  local want=$1
  for _ in $(seq 1 90); do
    local up
    up=$(sinfo -h -N -o "%N %t" 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)$/' | wc -l || true)
    [ "$up" -ge "$want" ] && { sinfo -N; return 0; }
    for name in $(node_names); do
      st=$(sinfo -h -n "$name" -o %t 2>/dev/null | head -n 1 || true)
      case "$st" in down*|drain*) scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true ;; esac
    done
    sleep 1
  done
  status
  die "the nodes did not become idle in 90 s; see $state/slurmctld.log and $state/slurmd-*.log"
}

start() {
  [ "$(id -u)" = 0 ] || die "starting the test cluster needs root"
  local n=3
  [ "${1:-}" = "--nodes" ] && n=${2:?--nodes N}
  command -v slurmctld >/dev/null || "$root/scripts/slurm-local.sh" install
  write_config "$n"
  if [ "$changed" = 1 ]; then stop; fi
  if ! [ -S /run/munge/munge.socket.2 ] || ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    munged --force --pid-file="$run/munged.pid"
  fi
  alive "$run/slurmctld.pid" slurmctld || slurmctld -f "$conf"
  for name in $(node_names); do
    # a node left frozen (a test stopped midway) is thawed; a dead one started again
    if alive "$run/init-$name.pid" slurmd; then kill -CONT $(node_pids "$name") 2>/dev/null || true; fi
    start_node "$name"
  done
  wait_idle "$n"
}

stop() {
  for name in $(node_names); do
    if alive "$run/init-$name.pid" slurmd; then
      kill -CONT $(node_pids "$name") 2>/dev/null || true
      kill "$(cat "$run/init-$name.pid")" 2>/dev/null || true
    fi
    rm -f "$run/init-$name.pid" "$run/unshare-$name.pid"
  done
  for d in slurmctld munged; do
    if alive "$run/$d.pid" "$d"; then
      pid=$(cat "$run/$d.pid"); kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "slurm-cluster: stopped $d ($pid)"
    fi
  done
}

status() {
  alive "$run/slurmctld.pid" slurmctld && echo "slurmctld: running ($(cat "$run/slurmctld.pid"))" || echo "slurmctld: not running"
  for name in $(node_names); do
    alive "$run/init-$name.pid" slurmd && echo "$name: slurmd running (namespace init $(cat "$run/init-$name.pid"))" \
      || echo "$name: not running"
  done
  sinfo -N 2>&1 || true
}

# Every process of a node: its namespace's init and all that descends from it.
node_pids() {
  local init
  init=$(cat "$run/init-$1.pid" 2>/dev/null) || die "no node $1"
  local all="$init" frontier="$init" next
  while [ -n "$frontier" ]; do
    next=$(for p in $frontier; do pgrep -P "$p" || true; done)
    all="$all $next"; frontier=$next
  done
  echo $all
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  kill-node) alive "$run/init-${2:?NAME}.pid" slurmd || die "node $2 is not running"
             kill -KILL "$(cat "$run/init-$2.pid")"
             rm -f "$run/init-$2.pid" "$run/unshare-$2.pid"
             echo "slurm-cluster: killed node $2" ;;
  freeze-node) alive "$run/init-${2:?NAME}.pid" slurmd || die "node $2 is not running"
               kill -STOP $(node_pids "$2"); echo "slurm-cluster: froze node $2" ;;
  thaw-node) alive "$run/init-${2:?NAME}.pid" slurmd || die "node $2 is not running"
             kill -CONT $(node_pids "$2"); echo "slurm-cluster: thawed node $2" ;;
  revive-node) if alive "$run/init-${2:?NAME}.pid" slurmd; then kill -CONT $(node_pids "$2"); fi
               start_node "$2"; scontrol update nodename="$2" state=resume >/dev/null 2>&1 || true
               echo "slurm-cluster: revived node $2" ;;
  *) echo "usage: $0 start [--nodes N]|stop|status|kill-node NAME|freeze-node NAME|thaw-node NAME|revive-node NAME" >&2; exit 2 ;;
esac
