#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for the tests (Debian's slurm-wlm and munge, as root):
#   scripts/slurm-local.sh start   # writes $EMT_SLURM_DIR/slurm.conf, starts munged, slurmctld and slurmd, waits
#                                  # until the node is idle; prints "export SLURM_CONF=..." for the caller
#   scripts/slurm-local.sh stop    # stops exactly the daemons it started (their pid files)
# Fails loudly (exit 1, with the daemons' logs) if the cluster does not come up within 60 s.
set -euo pipefail
DIR="${EMT_SLURM_DIR:-/tmp/emt-slurm}"
CONF="$DIR/slurm.conf"
cmd="${1:?usage: slurm-local.sh start|stop}"

stop() {
  for p in slurmd slurmctld munged; do
    if [ -f "$DIR/$p.pid" ]; then
      pid=$(cat "$DIR/$p.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$DIR/$p.pid"
    fi
  done
}

if [ "$cmd" = stop ]; then
  stop
  echo "[slurm-local] stopped"
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: slurm-local.sh start|stop" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "[slurm-local] must run as root (slurmd launches jobs)" >&2; exit 1; }
for b in munged slurmctld slurmd sinfo sbatch; do
  command -v "$b" >/dev/null || { echo "[slurm-local] $b not found: apt-get install slurm-wlm munge" >&2; exit 1; }
done
stop
rm -rf "$DIR/state" "$DIR/spool"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
chown munge:munge "$DIR/munge"
chmod 0700 "$DIR/munge"
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
NODE="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
cat > "$CONF" <<EOF
ClusterName=emtlocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPort=${EMT_SLURMCTLD_PORT:-6817}
SlurmdPort=${EMT_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
KillWait=10
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
export SLURM_CONF="$CONF"
runuser -u munge -- /usr/sbin/munged --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" --force
sleep 0.5
cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
# The Slurm daemons and clients find this munged through its socket.
ln -sf "$DIR/munge/munge.socket" "$DIR/munge.socket.2"
mkdir -p /run/munge
ln -sf "$DIR/munge/munge.socket" /run/munge/munge.socket.2
slurmctld -f "$CONF"
slurmd -f "$CONF"
for _ in $(seq 120); do
  if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "[slurm-local] node $NODE up ($CPUS CPUs); export SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 0.5
done
echo "[slurm-local] the cluster did not come up within 60 s" >&2
sinfo 2>&1 >&2 || true
tail -20 "$DIR/slurmctld.log" "$DIR/slurmd.log" "$DIR/munge/munged.log" >&2 || true
stop
exit 1
