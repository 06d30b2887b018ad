#!/bin/bash
# A/B: BPF ns/event, daemon CPU per event and churn, previous build vs this build,
# alternating rounds (each daemon with a JSON log, default settings).
set -u
# Usage: ab.sh OLD_TCPSTATE NEW_TCPSTATE (as root; needs bpftool and python3).
OLD=${1:?old tcpstate binary}; NEW=${2:?new tcpstate binary}
sysctl -qw kernel.bpf_stats_enabled=1
ip netns add abns 2>/dev/null; ip -n abns link set lo up
cat > /tmp/churn.py <<'P'
import socket,time,sys,threading
end=time.time()+float(sys.argv[1]); n=[0]
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); l.bind(('127.0.0.1',7777)); l.listen(4096)
def srv():
    while True:
        try: s,_=l.accept(); s.close()
        except Exception: return
threading.Thread(target=srv,daemon=True).start()
while time.time()<end:
    c=socket.create_connection(('127.0.0.1',7777)); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\0\0\0\0\0\0\0'); c.close(); n[0]+=1
print(n[0])
P
for round in $(seq 1 ${ROUNDS:-3}); do for which in OLD NEW; do
  bin=${!which}
  $bin run --quiet --log-file /tmp/ab-$which.jsonl >/dev/null 2>&1 & pid=$!
  sleep 2
  id=$(bpftool prog show --json | python3 -c "import json,sys; print([p['id'] for p in json.load(sys.stdin) if p.get('name','').startswith('inet_sock_set_s')][-1])")
  b=$(bpftool prog show id $id --json | python3 -c "import json,sys; p=json.load(sys.stdin); print(p.get('run_time_ns',0), p.get('run_cnt',0))")
  t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  n=$(ip netns exec abns python3 /tmp/churn.py 5)
  a=$(bpftool prog show id $id --json | python3 -c "import json,sys; p=json.load(sys.stdin); print(p.get('run_time_ns',0), p.get('run_cnt',0))")
  t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  kill $pid; wait $pid 2>/dev/null
  set -- $b $a
  ev=$(( $4 - $2 + 1 ))
  # Daemon CPU: clock ticks (USER_HZ) over the events, in ns.
  echo "$which round $round conns=$n events=$(( $4 - $2 )) bpf_ns/event=$(( ($3 - $1) / ev )) daemon_ns/event=$(( (t1 - t0) * 1000000000 / $(getconf CLK_TCK) / ev ))"
done; done
ip netns del abns; sysctl -qw kernel.bpf_stats_enabled=0; rm -f /tmp/ab-*.jsonl
