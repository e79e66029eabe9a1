#!/usr/bin/env bash
# A real single-node SLURM (Debian's slurm-wlm + munge) for development and CI, as root.
#   scripts/slurm-local.sh start    install if missing, write the config, start, wait until idle
#   scripts/slurm-local.sh stop     stop only the daemons this script started (by their pid files)
#   scripts/slurm-local.sh status   say whether the daemons run and what sinfo reports
#   scripts/slurm-local.sh install  only install slurm-wlm and munge when missing
# Idempotent: start on a running cluster only checks it. The config comes from slurm/slurm.conf.in
# and is written only where no slurm.conf exists or where this script wrote the one there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
conf=/etc/slurm/slurm.conf
run=/run/notata-slurm
state=/var/lib/notata-slurm
host=$(hostname -s)
marker="# written by notata scripts/slurm-local.sh"

die() { echo "slurm-local: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing and installing them needs root"
    echo "slurm-local: installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
}

changed=0

write_config() {
  if [ -f "$conf" ] && ! head -n 1 "$conf" | grep -qF "$marker"; then
    die "$conf exists and was not written by this script; refusing to replace it"
  fi
  mkdir -p /etc/slurm "$run" "$state/ctld" "$state/d"
  sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@RUN@|$run|g" \
    "$root/slurm/slurm.conf.in" > "$conf.tmp"
  if [ -f "$conf" ] && ! cmp -s "$conf.tmp" "$conf"; then changed=1; fi
  mv "$conf.tmp" "$conf"
  # cgroup.conf is read even with proctrack/linuxproc in some builds; keep it harmless
  [ -f /etc/slurm/cgroup.conf ] || echo "CgroupPlugin=autodetect" > /etc/slurm/cgroup.conf
}

start() {
  [ "$(id -u)" = 0 ] || die "starting the test cluster needs root"
  install
  write_config
  # A running cluster started from an older template: restart it on the new one (some
  # settings, the credential lifetime among them, are read only at start).
  if [ "$changed" = 1 ]; then stop; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    (command -v mungekey >/dev/null && mungekey --create --keyfile=/etc/munge/munge.key) \
      || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chmod 0400 /etc/munge/munge.key
  alive "$run/munged.pid" || munged --force --pid-file="$run/munged.pid"
  alive "$run/slurmctld.pid" || slurmctld
  alive "$run/slurmd.pid" || slurmd
  for _ in $(seq 1 60); do
    st=$(sinfo -h -n "$host" -o %t 2>/dev/null | head -n 1 || true)
    case "$st" in
      idle|mix|alloc) echo "slurm-local: node $host is $st"; return 0 ;;
      down*|drain*|drng*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  status
  die "the node did not become idle in 60 s; see $state/slurmctld.log and $state/slurmd.log"
}

stop() {
  for d in slurmd slurmctld munged; do
    if alive "$run/$d.pid"; then
      pid=$(cat "$run/$d.pid")
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "slurm-local: stopped $d ($pid)"
    fi
  done
}

status() {
  for d in munged slurmctld slurmd; do
    if alive "$run/$d.pid"; then echo "$d: running ($(cat "$run/$d.pid"))"; else echo "$d: not running"; fi
  done
  sinfo 2>&1 || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  install) install ;;
  *) echo "usage: $0 start|stop|status|install" >&2; exit 2 ;;
esac
