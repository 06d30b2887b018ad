#!/bin/bash
# Run inside the guest by systemd itself (kernel command line
# systemd.run=/root/check.sh), as root, after the boot reached its default target.
# It drives packaging/tcpstate.service, installed unmodified, through systemctl and writes
# one line per check to /root/results.txt and the console:
#   @@check NAME pass|FAIL EVIDENCE
# `cargo xtask vmtest-systemd` reads them back from the guest's root on the host.
set -u
RESULTS=/root/results.txt
LOG=/var/log/tcpstate/transitions.jsonl
: >"$RESULTS"
exec >/dev/console 2>&1 </dev/null

say() { echo "@@check $*" | tee -a "$RESULTS"; }
check() { # NAME OK(0/1) EVIDENCE...
    local name=$1 ok=$2
    shift 2
    if [ "$ok" = 0 ]; then say "$name pass $*"; else say "$name FAIL $*"; fi
}
prop() { systemctl show -p "$2" --value "$1"; }
# Count the log's records matching a Python expression over `r` (one JSON record).
records() {
    python3 - "$1" "$LOG" <<'EOF'
import json, sys
expr, path = sys.argv[1], sys.argv[2]
n = 0
try:
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if eval(expr, {"r": r}):
            n += 1
            last = line.strip()
except FileNotFoundError:
    pass
print(n)
if n:
    print(last, file=sys.stderr)
EOF
}
# wait_for SECONDS EXPR: until the log holds a record matching EXPR; prints the last one.
wait_for() {
    local i n
    for ((i = 0; i < $1 * 2; i++)); do
        n=$(records "$2" 2>/tmp/last)
        if [ "${n:-0}" -gt 0 ]; then
            cat /tmp/last
            return 0
        fi
        sleep 0.5
    done
    return 1
}

echo "@@vmtest-systemd guest up: $(uname -r), $(systemctl --version | head -1), $(nproc) cpus"
say_env() { echo "@@info $*" | tee -a "$RESULTS"; }
say_env "kernel $(uname -r); $(systemctl --version | head -1); system state $(systemctl is-system-running)"
modprobe inet_diag; modprobe tcp_diag

# 0. systemd's own lint of the unit as shipped.
# --man=no: the guest has no man-db to resolve Documentation=man:tcpstate(1) with.
v=$(systemd-analyze verify --man=no /etc/systemd/system/tcpstate.service 2>&1)
check unit_verify $([ -z "$v" ] && echo 0 || echo 1) "systemd-analyze verify --man=no: ${v:-no warnings}"

# 1. Type=notify: start returns once the daemon said READY=1, which it sends after the
# `started` record is written. So the record must be in the log the moment start returns.
t0=$(date +%s%N)
systemctl start tcpstate.service
rc=$?
t1=$(date +%s%N)
state="$(prop tcpstate ActiveState)/$(prop tcpstate SubState)"
started_now=$(records 'r["type"] == "started"' 2>/dev/null)
PID=$(prop tcpstate MainPID)
check ready $([ $rc = 0 ] && [ "$state" = active/running ] && [ "${started_now:-0}" -ge 1 ] && [ "$(prop tcpstate Type)" = notify ] && echo 0 || echo 1) \
    "systemctl start rc=$rc after $(((t1 - t0) / 1000000)) ms; Type=$(prop tcpstate Type); state $state; MainPID $PID; started records in the log when start returned: ${started_now:-0}"
if [ $rc != 0 ]; then
    systemctl status --no-pager tcpstate | tail -20
    journalctl -u tcpstate --no-pager | tail -30
fi

# 2. LimitNOFILE=65536 reaches the process (soft raised to the hard one by the daemon too).
lim=$(grep 'Max open files' /proc/"$PID"/limits 2>/dev/null | tr -s ' ' | sed 's/ *$//')
check limit_nofile $([ "$lim" = "Max open files 65536 65536 files" ] && echo 0 || echo 1) "/proc/$PID/limits: ${lim:-unreadable}"

# 3. The hardening leaves it able to load and attach the program: the `started` record
# lists the features it probed, and the process holds the BPF capabilities.
feat=$(python3 -c '
import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l)
    if r.get("type")=="started":
        print(" ".join(f["name"]+"="+("on" if f["on"] else "off") for f in r.get("features",[])))
        break
' "$LOG" 2>&1)
caps=$(grep CapEff /proc/"$PID"/status 2>/dev/null | awk '{print $2}')
check ebpf_loaded $([ "${started_now:-0}" -ge 1 ] && echo 0 || echo 1) "started record features: ${feat:-none}; CapEff $caps; NoNewPrivs $(grep NoNewPrivs /proc/"$PID"/status | awk '{print $2}'); ProtectSystem=$(prop tcpstate ProtectSystem)"

# 4. Real transitions: a loopback connection made here is traced into the log.
python3 - <<'EOF'
import socket, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 47001)); srv.listen(8)
c = socket.create_connection(("127.0.0.1", 47001))
a, _ = srv.accept()
c.sendall(b"x"); a.recv(1)
c.close(); time.sleep(0.2); a.close(); srv.close()
EOF
want='r["type"]=="transition" and 47001 in (r["sport"], r["dport"])'
if ev=$(wait_for 20 "$want and r[\"new\"]==\"TIME_WAIT\""); then
    n=$(records "$want" 2>/dev/null)
    seq=$(python3 -c '
import json,sys
print(", ".join("%s:%d %s->%s" % ("c" if r["dport"]==47001 else "s", r["sport"] if r["dport"]==47001 else r["dport"], r["old"], r["new"]) for r in map(json.loads, open(sys.argv[1])) if r.get("type")=="transition" and 47001 in (r["sport"], r["dport"])))' "$LOG")
    check transitions 0 "$n transitions of the loopback connection to :47001: $seq"
else
    check transitions 1 "no TIME_WAIT transition for :47001 within 20 s; log has $(wc -l <"$LOG") lines; last: $(tail -2 "$LOG")"
fi

# 5. Reading /proc of other units' processes: a CLOSE_WAIT socket held by a process of a
# transient service (python3) is reported past its 60 s threshold with owner_source fd and
# that process's pid. A second holder runs with PrivateNetwork=yes: its socket is in another
# network namespace, so the anomaly's vitals (sock_diag) need setns() into it, which
# RestrictNamespaces=net and CAP_SYS_ADMIN must allow.
HOLDER='
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(8)
held = []
while True:
    a, _ = srv.accept(); held.append(a)
'
systemd-run --unit=sdtest-holder.service --quiet python3 -c "$HOLDER" 47002
systemd-run --unit=sdtest-netns-holder.service -p PrivateNetwork=yes --quiet python3 -c "$HOLDER" 47004
HPID=$(prop sdtest-holder MainPID)
NPID=$(prop sdtest-netns-holder MainPID)
for i in $(seq 1 40); do ss -Hltn 'sport = :47002' | grep -q . && break; sleep 0.5; done
for i in $(seq 1 40); do nsenter -t "$NPID" -n ss -Hltn 'sport = :47004' | grep -q . && break; sleep 0.5; done
CONNECT='import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1]))).close()'
python3 -c "$CONNECT" 47002
nsenter -t "$NPID" -n python3 -c "$CONNECT" 47004
SUMMARY='
import json,sys
r=json.loads(sys.stdin.read())
print(r.get("pid"), r.get("comm"), r.get("owner_source"), r.get("unit"), r.get("netns"), "yes" if r.get("vitals") else "no", round(r["age_ms"]/1000))'
for what in "47002 $HPID sdtest-holder owner_other_unit" "47004 $NPID sdtest-netns-holder owner_other_netns"; do
    set -- $what
    port=$1 pid=$2 unit=$3 name=$4
    if ev=$(wait_for 150 "r[\"type\"]==\"anomaly\" and r[\"state\"]==\"CLOSE_WAIT\" and r[\"sport\"]==$port"); then
        set -- $(echo "$ev" | python3 -c "$SUMMARY")
        ok=$([ "$1" = "$pid" ] && [ "$3" = fd ] && [ "$6" = yes ] && echo 0 || echo 1)
        [ "$unit" = sdtest-netns-holder ] && [ "$5" = "$(stat -L -c %i /proc/1/ns/net)" ] && ok=1
        check "$name" "$ok" "$unit.service MainPID $pid: CLOSE_WAIT anomaly after $7 s names pid $1 comm $2 owner_source $3 unit $4 netns $5 (host's $(stat -L -c %i /proc/1/ns/net)) vitals $6"
    else
        check "$name" 1 "no CLOSE_WAIT anomaly for :$port within 150 s (holder pid $pid)"
    fi
done
# The daemon's own clients against the unit's endpoints: `tcpstate status` (the
# --metrics-addr) and `tcpstate kill --dry-run` (asks /run/tcpstate/control.sock for ages).
st=$(tcpstate status 2>&1); strc=$?
kl=$(tcpstate kill --state close_wait --older-than 1s --port 47002 --dry-run 2>&1); klrc=$?
check clients $([ $strc = 0 ] && [ $klrc = 0 ] && echo 0 || echo 1) "tcpstate status rc=$strc: $(echo "$st" | head -3 | tr '\n' '|' | cut -c1-200); tcpstate kill --dry-run rc=$klrc: $(echo "$kl" | tr '\n' '|' | cut -c1-250)"
systemctl stop sdtest-holder.service sdtest-netns-holder.service

# 6. journald holds what the daemon itself writes: SIGUSR1 makes it print its summary on
# stderr, which the journal must show under the unit with the daemon's pid.
before=$(journalctl -u tcpstate _PID="$PID" -o cat --no-pager | wc -l)
systemctl kill -s SIGUSR1 --kill-whom=main tcpstate.service
for i in $(seq 1 20); do
    after=$(journalctl -u tcpstate _PID="$PID" -o cat --no-pager | wc -l)
    [ "$after" -gt "$before" ] && break
    sleep 0.5
done
jl=$(journalctl -u tcpstate _PID="$PID" -o cat --no-pager | tail -3 | tr '\n' '|' | cut -c1-300)
check journald $([ "$after" -gt "$before" ] && echo 0 || echo 1) "journalctl -u tcpstate _PID=$PID: $before -> $after lines after SIGUSR1; last: $jl"

# 7. systemctl reload: SIGHUP, the same process stays up and reopens its log. The log is
# moved away first; after the reload the daemon writes to a new file at the path.
mv "$LOG" "$LOG.moved"
systemctl reload tcpstate.service
rc=$?
python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",47003)); s.listen(); c=socket.create_connection(("127.0.0.1",47003)); a,_=s.accept(); c.close(); a.close()'
sleep 1
ev=$(wait_for 20 'r["type"]=="transition" and 47003 in (r["sport"], r["dport"])')
got=$?
PID2=$(prop tcpstate MainPID)
state="$(prop tcpstate ActiveState)/$(prop tcpstate SubState)"
check reload $([ $rc = 0 ] && [ "$PID2" = "$PID" ] && [ "$state" = active/running ] && [ $got = 0 ] && echo 0 || echo 1) \
    "systemctl reload rc=$rc; MainPID $PID -> $PID2; state $state; new log file: $([ -f "$LOG" ] && echo "$(wc -l <"$LOG") lines" || echo missing), next connection's record in it: $([ $got = 0 ] && echo yes || echo no)"

# 7b. packaging/logrotate.conf as installed: a forced rotation renames the log and its
# postrotate signals the unit; the same process goes on writing at the path.
logrotate -f /etc/logrotate.d/tcpstate
rc=$?
python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",47005)); s.listen(); c=socket.create_connection(("127.0.0.1",47005)); a,_=s.accept(); c.close(); a.close()'
ev=$(wait_for 20 'r["type"]=="transition" and 47005 in (r["sport"], r["dport"])')
got=$?
PID3=$(prop tcpstate MainPID)
check logrotate $([ $rc = 0 ] && [ "$PID3" = "$PID" ] && [ $got = 0 ] && [ -f "$LOG.1" ] && echo 0 || echo 1) \
    "logrotate -f rc=$rc; rotated: $(cd /var/log/tcpstate && ls | tr '\n' ' '); MainPID $PID -> $PID3; next connection's record in the new file: $([ $got = 0 ] && echo yes || echo no)"

# 8. kill -9: Restart=on-failure brings it back (RestartSec=2s), as a new process that
# writes a new `started` record.
starts=$(records 'r["type"]=="started"' 2>/dev/null)
kill -9 "$PID"
for i in $(seq 1 120); do
    NEW=$(prop tcpstate MainPID)
    [ "$NEW" != 0 ] && [ "$NEW" != "$PID" ] && [ "$(prop tcpstate ActiveState)" = active ] && break
    sleep 0.5
done
NEW=$(prop tcpstate MainPID)
starts2=$(records 'r["type"]=="started"' 2>/dev/null)
check restart_after_kill9 $([ "$NEW" != 0 ] && [ "$NEW" != "$PID" ] && [ "$(prop tcpstate ActiveState)" = active ] && [ "$starts2" -gt "$starts" ] && echo 0 || echo 1) \
    "kill -9 $PID: MainPID now $NEW, state $(prop tcpstate ActiveState)/$(prop tcpstate SubState), NRestarts $(prop tcpstate NRestarts), started records $starts -> $starts2"

# 9. systemctl stop: SIGTERM, a clean exit, and a `stopped` record as the log's last line.
systemctl stop tcpstate.service
rc=$?
last=$(tail -1 "$LOG" | cut -c1-300)
res=$(prop tcpstate Result)
code="$(prop tcpstate ExecMainCode)/$(prop tcpstate ExecMainStatus)"
check stop $([ $rc = 0 ] && [ "$res" = success ] && [[ "$last" == *'"type":"stopped"'* ]] && echo 0 || echo 1) \
    "systemctl stop rc=$rc; Result=$res; ExecMain code/status $code; last log line: $last"

# 10. Failures that a restart cannot cure. A drop-in (in /run, removed after) replaces
# ExecStart; the rest of the unit is as shipped.
dropin=/run/systemd/system/tcpstate.service.d
mkdir -p "$dropin"
bad_start() { # ExecStart...
    printf '[Service]\nExecStart=\nExecStart=%s\n' "$*" >"$dropin/vmtest.conf"
    systemctl daemon-reload
    systemctl reset-failed tcpstate.service 2>/dev/null
    systemctl start tcpstate.service 2>/dev/null
}
# 10a. A usage error (exit 2: a mistyped flag in an edited ExecStart) is not retried.
bad_start /usr/local/bin/tcpstate run --no-such-flag
sleep 8
check usage_error_not_restarted $([ "$(prop tcpstate NRestarts)" = 0 ] && [ "$(prop tcpstate ActiveState)" = failed ] && echo 0 || echo 1) \
    "ExecStart with an unknown flag: exit $(prop tcpstate ExecMainStatus), state $(prop tcpstate ActiveState)/$(prop tcpstate SubState), NRestarts $(prop tcpstate NRestarts) after 8 s; journal: $(journalctl -u tcpstate -o cat --no-pager | grep 'tcpstate: error' | tail -1 | cut -c1-150)"
# 10b. A daemon that fails at every start (here: its log under the read-only /usr) gives up
# after a few tries instead of restarting every RestartSec forever.
bad_start /usr/local/bin/tcpstate run --quiet --log-file /usr/lib/tcpstate-vmtest/t.jsonl
# Given up = ActiveState failed (while a restart is pending it is activating/auto-restart),
# and still so, with no more restarts, after more than RestartSec.
for i in $(seq 1 90); do
    [ "$(prop tcpstate ActiveState)" = failed ] && break
    sleep 1
done
n1=$(prop tcpstate NRestarts)
sleep 5
n2=$(prop tcpstate NRestarts)
gaveup=$(journalctl -u tcpstate -o cat --no-pager | grep -c 'Start request repeated too quickly')
check start_failures_give_up $([ "$(prop tcpstate ActiveState)" = failed ] && [ "$n1" = "$n2" ] && [ "$gaveup" -ge 1 ] && echo 0 || echo 1) \
    "ExecStart failing at each start: after ${i} s state $(prop tcpstate ActiveState)/$(prop tcpstate SubState), NRestarts $n1 (5 s later: $n2), 'Start request repeated too quickly' in the journal: $gaveup, StartLimitBurst $(prop tcpstate StartLimitBurst) per $(prop tcpstate StartLimitIntervalUSec); daemon said: $(journalctl -u tcpstate -o cat --no-pager | grep 'tcpstate: error' | tail -1 | cut -c1-150)"
systemctl stop tcpstate.service 2>/dev/null
rm -rf "$dropin"
systemctl daemon-reload
systemctl reset-failed tcpstate.service 2>/dev/null

echo "@@vmtest-systemd journal of tcpstate.service:"
journalctl -u tcpstate --no-pager -o short-monotonic | tail -40
echo "@@vmtest-systemd done"
sync
exit 0
