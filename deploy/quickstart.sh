#!/usr/bin/env bash
# skymesh quickstart: a three-cluster mesh on one machine, built out of
# network namespaces (SPEC §9), with the real coordinator, skyctl and meshd.
#
#   deploy/quickstart.sh up                     build, create, start, show
#   deploy/quickstart.sh status                 show what runs and what the mesh answers
#   deploy/quickstart.sh exec CLUSTER -- CMD... run CMD on an app host (c1, c2-app2, gw3, wan)
#   deploy/quickstart.sh skyctl ARGS...         skyctl against the demo coordinator
#   deploy/quickstart.sh stop-app|start-app HOST       kill / restart one demo replica (c2-app1)
#   deploy/quickstart.sh stop-gateway|start-gateway C  kill / restart one cluster's meshd (c3)
#   deploy/quickstart.sh down                   remove everything `up` made
#
# Runs as root (it creates network namespaces). Everything it makes is named
# `skydemo…` (namespaces skydemo-*, TUN interfaces skydemo1..3, WireGuard API
# sockets /var/run/wireguard/skydemo*.sock, /etc/netns/skydemo-*) or lives in
# its state directory (/var/lib/skymesh-demo); `down` removes exactly those,
# also after a failed or partial `up`. Nothing is routed from the machine's
# own namespace into the demo: all traffic stays between the namespaces.
#
# `up` when the demo already runs says so and shows its status again; when
# only leftovers of an earlier run exist (a failed `up`, a reboot), it tears
# them down first and builds the demo afresh.
#
# Environment:
#   SKYMESH_BIN_DIR=DIR      use the binaries in DIR (relative paths are taken
#                            from the repository root) instead of target/release
#   SKYMESH_SKIP_BUILD=1     do not run cargo; the binaries must already exist
#   SKYMESH_DEMO_STATE_DIR   state directory (default /var/lib/skymesh-demo)
#
# Layout (SPEC §9):
#   skydemo-wan        bridge br0 198.51.100.1/24; the coordinator on :7400
#   skydemo-gw<i>      wan0 198.51.100.(10+i)/24, LAN bridge lan0 10.i.0.1/16,
#                      meshd (TUN skydemo<i>, DNS 10.i.0.1:53, metrics 127.0.0.1:9108)
#   skydemo-c<i>-app<k> eth0 10.i.0.(10+k)/16, default via 10.i.0.1, demo
#                      replica web-c<i>-<k> on :8080, resolv.conf → 10.i.0.1
set -euo pipefail

PREFIX=skydemo
CLUSTERS=(1 2 3)
APPS=(1 2)
WAN_NS="$PREFIX-wan"
COORD_IP=198.51.100.1
COORD_PORT=7400
COORD_URL="https://$COORD_IP:$COORD_PORT"
APP_PORT=8080
SVC=web
SVC_NAME="$SVC.default.svc"
REQUESTS=12
WG_SOCK_DIR=/var/run/wireguard
NETNS_ETC=/etc/netns
STATE=${SKYMESH_DEMO_STATE_DIR:-/var/lib/skymesh-demo}
MARKER="$STATE/.skymesh-demo"

SELF="$0"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------- output

if [ -t 1 ]; then
  B=$'\e[1m' G=$'\e[32m' Y=$'\e[33m' R=$'\e[31m' N=$'\e[0m'
else
  B='' G='' Y='' R='' N=''
fi
phase() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
info() { printf '    %s\n' "$*"; }
ok() { printf '    %sok%s %s\n' "$G" "$N" "$*"; }
warn() { printf '    %swarning:%s %s\n' "$Y" "$N" "$*" >&2; }
die() {
  printf '%serror:%s %s\n' "$R" "$N" "$*" >&2
  exit 1
}

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- names

gw_ns() { echo "$PREFIX-gw$1"; }
app_ns() { echo "$PREFIX-c$1-app$2"; }
iface() { echo "$PREFIX$1"; }
gw_wan_ip() { echo "198.51.100.$((10 + $1))"; }
gw_lan_ip() { echo "10.$1.0.1"; }
app_ip() { echo "10.$1.0.$((10 + $2))"; }
job_name() { echo "$SVC-c$1-$2"; }

all_ns() {
  local i k
  echo "$WAN_NS"
  for i in "${CLUSTERS[@]}"; do
    gw_ns "$i"
    for k in "${APPS[@]}"; do app_ns "$i" "$k"; done
  done
}

# Namespaces named skydemo-* that exist now (ours, also from older runs).
existing_ns() {
  local f
  for f in /run/netns/"$PREFIX"-*; do
    [ -e "$f" ] && basename "$f"
  done
  return 0
}

# ---------------------------------------------------------------- binaries

bin_dir() {
  if [ -f "$STATE/bin-dir" ]; then
    cat "$STATE/bin-dir"
    return
  fi
  local d=${SKYMESH_BIN_DIR:-target/release}
  case "$d" in
    /*) echo "$d" ;;
    *) echo "$REPO/$d" ;;
  esac
}

BINARIES=(coordinator meshd skyctl skymesh-demo-app)

check_binaries() {
  local d b
  d=$(bin_dir)
  for b in "${BINARIES[@]}"; do
    [ -x "$d/$b" ] || die "$d/$b not found; build with 'cargo build --release --workspace --bins' (or unset SKYMESH_SKIP_BUILD)"
  done
}

build() {
  if [ "${SKYMESH_SKIP_BUILD:-0}" = 1 ]; then
    phase "Using the binaries in $(bin_dir) (SKYMESH_SKIP_BUILD=1)"
    check_binaries
    return
  fi
  phase "Building the binaries (cargo build --release --workspace --bins)"
  command -v cargo >/dev/null ||
    die "cargo not found in PATH (under sudo, try: sudo env PATH=\"\$PATH\" $SELF up); or build elsewhere and set SKYMESH_BIN_DIR + SKYMESH_SKIP_BUILD=1"
  if [ -n "${SKYMESH_BIN_DIR:-}" ]; then
    warn "SKYMESH_BIN_DIR is set but the build writes target/release; set SKYMESH_SKIP_BUILD=1 to use prebuilt binaries"
  fi
  (cd "$REPO" && cargo build --release --workspace --bins) ||
    die "the build failed (see cargo's messages above)"
  check_binaries
  ok "binaries in $(bin_dir)"
}

sky() {
  ip netns exec "$WAN_NS" "$(bin_dir)/skyctl" --coordinator "$COORD_URL" \
    --token-file "$STATE/coordinator/admin.token" "$@"
}

# ---------------------------------------------------------------- prerequisites

prereqs() {
  phase "Checking prerequisites"
  [ "$(id -u)" -eq 0 ] || die "run as root: the demo creates network namespaces (sudo $SELF up)"
  [ -c /dev/net/tun ] || die "/dev/net/tun is missing: meshd needs TUN devices (modprobe tun; in a container, pass --device /dev/net/tun)"
  local -A pkg_of=([ip]=iproute2 [wg]=wireguard-tools [dig]=bind9-dnsutils
    [ping]=iputils-ping [curl]=curl [setsid]=util-linux [flock]=util-linux
    [protoc]=protobuf-compiler)
  local missing=() c
  for c in ip wg dig ping curl setsid flock protoc; do
    command -v "$c" >/dev/null 2>&1 || missing+=("${pkg_of[$c]}")
  done
  # The etcd client's generated code needs protoc's well-known types.
  [ -f /usr/include/google/protobuf/timestamp.proto ] || missing+=(libprotobuf-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    info "installing missing Debian packages: ${missing[*]}"
    command -v apt-get >/dev/null 2>&1 ||
      die "missing ${missing[*]} and no apt-get here: install them with your package manager"
    if ! DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
      ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
      die "could not install ${missing[*]} with apt-get; install them yourself (apt-get install ${missing[*]}) and run again"
    fi
  fi
  ip netns list >/dev/null 2>&1 || die "'ip netns' does not work here (is this iproute2 too old, or /run/netns not writable?)"
  ok "root, /dev/net/tun, ip, wg, dig, ping, curl, protoc"
}

# ---------------------------------------------------------------- processes

# Starts CMD... in namespace NS as a daemon (own session, stdin closed,
# output to $STATE/logs/NAME.log) and records "PID STARTTIME" in
# $STATE/pids/NAME.pid, so `down` never signals a recycled pid.
start_in_ns() {
  local ns=$1 name=$2
  shift 2
  mkdir -p "$STATE/logs" "$STATE/pids"
  # fd 9 is the up/down lock: daemons must not inherit it.
  setsid ip netns exec "$ns" "$@" </dev/null >>"$STATE/logs/$name.log" 2>&1 9<&- &
  local pid=$!
  echo "$pid $(proc_start "$pid")" >"$STATE/pids/$name.pid"
}

# Field 22 of /proc/PID/stat (start time in clock ticks), empty if gone.
proc_start() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

# The pid recorded for NAME if that very process still runs.
live_pid() {
  local f="$STATE/pids/$1.pid" pid start
  [ -f "$f" ] || return 1
  read -r pid start <"$f" || return 1
  [ -n "$pid" ] && [ -n "$start" ] || return 1
  [ "$(proc_start "$pid")" = "$start" ] || return 1
  echo "$pid"
}

stop_named() {
  local name=$1 pid
  pid=$(live_pid "$name") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    live_pid "$name" >/dev/null || break
    sleep 0.1
  done
  if pid=$(live_pid "$name"); then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$STATE/pids/$name.pid"
}

log_tail() {
  local f="$STATE/logs/$1.log"
  [ -f "$f" ] && tail -n "${2:-20}" "$f" | sed 's/^/      | /' >&2
  return 0
}

# wait_for SECONDS CMD...: polls CMD every 0.25 s.
wait_for() {
  local secs=$1 end
  shift
  end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.25
  done
}

# wait_proc NAME SECONDS CMD...: like wait_for, but gives up at once when
# the process recorded as NAME has exited.
wait_proc() {
  local name=$1 secs=$2 end
  shift 2
  end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    live_pid "$name" >/dev/null || return 1
    [ $SECONDS -lt $end ] || return 1
    sleep 0.25
  done
}

# ---------------------------------------------------------------- up

create_topology() {
  phase "Creating the namespaces (WAN, 3 gateways, 6 app hosts)"
  local i k ns gw
  # /etc/netns may not exist yet: remember whether we made it, so that
  # `down` removes it again (and only then).
  if [ ! -d "$NETNS_ETC" ]; then
    mkdir -p "$NETNS_ETC"
    : >"$STATE/made-etc-netns"
  fi
  ns=$WAN_NS
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add br0 type bridge
  ip -n "$ns" addr add "$COORD_IP/24" dev br0
  ip -n "$ns" link set br0 up
  ok "$ns: br0 $COORD_IP/24"
  for i in "${CLUSTERS[@]}"; do
    gw=$(gw_ns "$i")
    ip netns add "$gw"
    ip -n "$gw" link set lo up
    # veth pairs are made inside a demo namespace with the peer moved
    # straight into another one: nothing ever appears in the root namespace.
    ip -n "$gw" link add wan0 type veth peer name "gw$i" netns "$WAN_NS"
    ip -n "$WAN_NS" link set "gw$i" master br0 up
    ip -n "$gw" addr add "$(gw_wan_ip "$i")/24" dev wan0
    ip -n "$gw" link set wan0 up
    ip -n "$gw" link add lan0 type bridge
    ip -n "$gw" addr add "$(gw_lan_ip "$i")/16" dev lan0
    ip -n "$gw" link set lan0 up
    ip netns exec "$gw" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
    ok "$gw: wan0 $(gw_wan_ip "$i")/24, lan0 $(gw_lan_ip "$i")/16"
    for k in "${APPS[@]}"; do
      ns=$(app_ns "$i" "$k")
      ip netns add "$ns"
      ip -n "$ns" link set lo up
      ip -n "$ns" link add eth0 type veth peer name "app$k" netns "$gw"
      ip -n "$gw" link set "app$k" master lan0 up
      ip -n "$ns" addr add "$(app_ip "$i" "$k")/16" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" route add default via "$(gw_lan_ip "$i")"
      # `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over
      # /etc/resolv.conf: the app host resolves through its gateway.
      mkdir -p "$NETNS_ETC/$ns"
      printf 'nameserver %s\noptions timeout:1 attempts:2\n' "$(gw_lan_ip "$i")" >"$NETNS_ETC/$ns/resolv.conf"
      ok "$ns: eth0 $(app_ip "$i" "$k")/16, resolver $(gw_lan_ip "$i")"
    done
  done
}

start_coordinator() {
  phase "Starting the coordinator in $WAN_NS on $COORD_IP:$COORD_PORT (embedded store in $STATE/coordinator)"
  mkdir -p "$STATE/coordinator"
  chmod 0700 "$STATE/coordinator"
  rm -f "$STATE/coordinator/listen.addr"
  start_in_ns "$WAN_NS" coordinator env RUST_LOG=info "$(bin_dir)/coordinator" \
    --listen "$COORD_IP:$COORD_PORT" --data-dir "$STATE/coordinator"
  if ! wait_proc coordinator 20 test -s "$STATE/coordinator/listen.addr"; then
    log_tail coordinator
    die "the coordinator did not start within 20 s (log: $STATE/logs/coordinator.log)"
  fi
  ok "coordinator listening on $(cat "$STATE/coordinator/listen.addr"), admin token in $STATE/coordinator/admin.token"
}

write_jobs() {
  local i=$1 k f="$STATE/jobs-c$1.toml"
  {
    echo "# Demo replicas of cluster c$i, registered by its meshd (--jobs)."
    for k in "${APPS[@]}"; do
      printf '\n[[job]]\nname = "%s"\nip = "%s"\nlabels = { app = "%s" }\nports = ["http:%s/TCP"]\n' \
        "$(job_name "$i" "$k")" "$(app_ip "$i" "$k")" "$SVC" "$APP_PORT"
    done
  } >"$f"
}

start_meshd() {
  local i=$1 token=${2:-}
  local envs=(RUST_LOG=info)
  [ -n "$token" ] && envs+=("MESHD_JOIN_TOKEN=$token")
  start_in_ns "$(gw_ns "$i")" "meshd-c$i" env "${envs[@]}" "$(bin_dir)/meshd" \
    --coordinator "$COORD_URL" --cluster "c$i" \
    --endpoint "$(gw_wan_ip "$i"):51820" \
    --state-dir "$STATE/meshd-c$i" --interface "$(iface "$i")" \
    --dns-listen "$(gw_lan_ip "$i"):53" --metrics-listen 127.0.0.1:9108 \
    --jobs "$STATE/jobs-c$i.toml"
}

join_gateways() {
  phase "Creating clusters c1..c3 with skyctl and joining one meshd per gateway"
  local i out token
  for i in "${CLUSTERS[@]}"; do
    out=$(sky create cluster "c$i" --workload-cidr "10.$i.0.0/16" 2>&1) ||
      die "skyctl create cluster c$i failed: $out"
    token=$(grep -o 'skyjoin_[A-Za-z0-9_.:-]*' <<<"$out" | head -n1) ||
      die "no join token in skyctl's output: $out"
    write_jobs "$i"
    start_meshd "$i" "$token"
    ok "c$i: workload 10.$i.0.0/16, meshd in $(gw_ns "$i") (interface $(iface "$i"), jobs $STATE/jobs-c$i.toml)"
  done
  for i in "${CLUSTERS[@]}"; do
    if ! wait_proc "meshd-c$i" 20 ip -n "$(gw_ns "$i")" link show "$(iface "$i")"; then
      log_tail "meshd-c$i"
      die "meshd of c$i exited or did not bring up $(iface "$i") within 20 s (log: $STATE/logs/meshd-c$i.log)"
    fi
  done
  ok "TUN interfaces up"
}

handshakes_complete() {
  local i=$1 n
  n=$(ip netns exec "$(gw_ns "$i")" wg show "$(iface "$i")" latest-handshakes 2>/dev/null |
    awk '$2 > 0' | wc -l)
  [ "$n" -eq $((${#CLUSTERS[@]} - 1)) ]
}

wait_tunnels() {
  phase "Waiting for WireGuard handshakes between every pair of gateways"
  local i
  for i in "${CLUSTERS[@]}"; do
    if wait_for 30 handshakes_complete "$i"; then
      ok "c$i: handshakes with both peers"
    else
      warn "c$i: not every peer has a handshake after 30 s (ip netns exec $(gw_ns "$i") wg show $(iface "$i"))"
      log_tail "meshd-c$i" 10
    fi
  done
}

app_answers() { ip netns exec "$1" curl -s --max-time 1 "http://127.0.0.1:$APP_PORT/"; }

start_apps() {
  phase "Starting the demo replicas (skymesh-demo-app on :$APP_PORT)"
  local i k ns
  for i in "${CLUSTERS[@]}"; do
    for k in "${APPS[@]}"; do
      start_app "$i" "$k"
    done
  done
  for i in "${CLUSTERS[@]}"; do
    for k in "${APPS[@]}"; do
      ns=$(app_ns "$i" "$k")
      if ! wait_proc "app-c$i-$k" 10 app_answers "$ns"; then
        log_tail "app-c$i-$k"
        die "demo replica $(job_name "$i" "$k") in $ns does not answer (log: $STATE/logs/app-c$i-$k.log)"
      fi
      ok "$(job_name "$i" "$k") in c$i at $(app_ip "$i" "$k"):$APP_PORT"
    done
  done
}

start_app() {
  local i=$1 k=$2
  start_in_ns "$(app_ns "$i" "$k")" "app-c$i-$k" "$(bin_dir)/skymesh-demo-app" \
    --name "$(job_name "$i" "$k")" --cluster "c$i" --listen "0.0.0.0:$APP_PORT"
}

ready_endpoints() {
  local i line
  line=$(sky get endpoints "$SVC" 2>/dev/null | sed -n 2p)
  for i in "${CLUSTERS[@]}"; do
    grep -q "c$i: ${#APPS[@]}" <<<"$line" || return 1
  done
}

create_service() {
  phase "Creating the service: skyctl create service $SVC -s app=$SVC -p 80:$APP_PORT"
  local out
  out=$(sky create service "$SVC" -s "app=$SVC" -p "80:$APP_PORT" 2>&1) ||
    die "skyctl create service failed: $out"
  ok "$out"
  if wait_for 30 ready_endpoints; then
    ok "endpoints: every replica in every cluster is ready"
  else
    warn "not every replica is ready after 30 s: $(sky get endpoints "$SVC" 2>&1 | sed -n 2p)"
  fi
}

do_up() {
  prereqs
  exec 9<"${BASH_SOURCE[0]}"
  flock -w 300 9 || die "another quickstart.sh up/down is running"
  if demo_running; then
    phase "The demo already runs (state in $STATE); showing its status again"
    info "(to rebuild it from scratch: $SELF down && $SELF up)"
    show
    return
  fi
  if leftovers; then
    phase "Found leftovers of an earlier run; removing them first"
    teardown
  fi
  build
  mkdir -p "$STATE"
  chmod 0700 "$STATE"
  : >"$MARKER"
  bin_dir >"$STATE/bin-dir.tmp"
  mv "$STATE/bin-dir.tmp" "$STATE/bin-dir"
  trap up_failed EXIT
  create_topology
  start_coordinator
  join_gateways
  start_apps
  wait_tunnels
  create_service
  trap - EXIT
  show
}

up_failed() {
  local rc=$?
  [ "$rc" -eq 0 ] && return
  printf '\n%serror:%s up failed; the logs are in %s/logs. Clean up with: %s down\n' \
    "$R" "$N" "$STATE" "$SELF" >&2
}

# ---------------------------------------------------------------- show

demo_running() {
  local ns name
  [ -f "$MARKER" ] || return 1
  for ns in $(all_ns); do [ -e "/run/netns/$ns" ] || return 1; done
  # A stopped replica or gateway (stop-app, stop-gateway) is part of the
  # demo, not a reason to rebuild it.
  live_pid coordinator >/dev/null
}

leftovers() {
  [ -n "$(existing_ns)" ] && return 0
  [ -e "$STATE" ] && return 0
  compgen -G "$NETNS_ETC/$PREFIX-*" >/dev/null && return 0
  compgen -G "$WG_SOCK_DIR/$PREFIX*.sock" >/dev/null && return 0
  return 1
}

vip() { sky get service "$SVC" 2>/dev/null | awk 'NR == 2 { print $3 }'; }

# One app host's view: DNS, then REQUESTS connections tallied per replica.
show_cluster() {
  local i=$1 ns target res out answered=0 failed=0 n
  ns=$(app_ns "$i" 1)
  printf '\n  %s[c%s]%s from %s (%s)\n' "$B" "$i" "$N" "$ns" "$(app_ip "$i" 1)"
  res=$(ip netns exec "$ns" dig +short +time=1 +tries=2 "$SVC_NAME" A 2>&1 |
    grep -E '^[0-9]+(\.[0-9]+){3}$' | head -n1 || true)
  if [ -n "$res" ]; then
    echo "  [c$i] dig +short $SVC_NAME -> $res"
    target=$SVC_NAME
  else
    echo "  [c$i] dig +short $SVC_NAME -> FAILED (no answer from $(gw_lan_ip "$i"):53; the embedded DNS (SPEC §6) may not be in this meshd build)"
    target=$(vip || true)
    [ -n "$target" ] || {
      echo "  [c$i] no VIP known either; skipping requests"
      return
    }
    echo "  [c$i] using the VIP $target instead"
  fi
  out=$(mktemp)
  for n in $(seq "$REQUESTS"); do
    if ip netns exec "$ns" curl -4 -s --connect-timeout 2 --max-time 3 "http://$target/" >>"$out"; then
      answered=$((answered + 1))
    else
      failed=$((failed + 1))
      if [ "$answered" -eq 0 ] && [ "$failed" -ge 2 ]; then
        echo "  [c$i] $n x curl -s http://$target/ -> no answer twice in a row; giving up (service VIP load balancing (SPEC §5) may not be in this meshd build)"
        rm -f "$out"
        return
      fi
    fi
  done
  echo "  [c$i] $REQUESTS x curl -s http://$target/ -> $answered answered, $failed failed; per replica:"
  sort "$out" | uniq -c | sed 's/^/      /'
  rm -f "$out"
}

show() {
  phase "What the mesh answers (from one app host per cluster)"
  local i
  for i in "${CLUSTERS[@]}"; do show_cluster "$i"; done
  phase "skyctl get service"
  sky get service || true
  phase "skyctl get endpoints"
  sky get endpoints || true
  phase "skyctl get tunnels"
  sky get tunnels || true
  next_steps
}

next_steps() {
  local token_file="$STATE/coordinator/admin.token"
  cat <<EOF

${B}==> Try next${N}
  # requests and names, from an app host of any cluster (c1, c2, c3; or c2-app2, gw1, wan)
  $SELF exec c1 -- curl -s http://$SVC_NAME/
  $SELF exec c2 -- dig $SVC_NAME
  $SELF exec c3 -- ping -c 2 $(vip || true)
  for n in \$(seq 12); do $SELF exec c1 -- curl -s http://$SVC_NAME/; done | sort | uniq -c

  # skyctl (the shortcut, then the full command)
  $SELF skyctl get endpoints $SVC -o wide
  ip netns exec $WAN_NS $(bin_dir)/skyctl --coordinator $COORD_URL --token-file $token_file get tunnels
  $SELF skyctl get clusters

  # WireGuard and metrics of cluster c1's gateway
  ip netns exec $(gw_ns 1) wg show $(iface 1)
  ip netns exec $(gw_ns 1) curl -s http://127.0.0.1:9108/metrics | grep '^skymesh_'

  # failover: kill one replica, then a whole cluster's gateway, and watch
  $SELF stop-app c2-app1        # replica $(job_name 2 1) stops; it leaves the endpoints within ~3 s
  $SELF skyctl get endpoints $SVC --watch     # (Ctrl-C to stop)
  $SELF stop-gateway c3         # cluster c3's meshd dies; its replicas leave the other gateways' tables
  for n in \$(seq 12); do $SELF exec c1 -- curl -s --max-time 2 http://$SVC_NAME/; done | sort | uniq -c
  $SELF start-app c2-app1 && $SELF start-gateway c3

  # logs and teardown
  ls $STATE/logs/
  $SELF down
EOF
}

do_status() {
  [ "$(id -u)" -eq 0 ] || die "run as root"
  if ! [ -f "$MARKER" ]; then
    echo "The demo is not running (no $STATE). Start it with: $SELF up"
    if leftovers; then echo "Leftovers exist: $SELF down removes them."; fi
    exit 3
  fi
  phase "Processes"
  local name pid bad=0
  for name in coordinator meshd-c1 meshd-c2 meshd-c3 app-c1-1 app-c1-2 app-c2-1 app-c2-2 app-c3-1 app-c3-2; do
    if pid=$(live_pid "$name"); then
      ok "$name (pid $pid)"
    else
      warn "$name is not running (log: $STATE/logs/$name.log)"
      bad=1
    fi
  done
  if ! live_pid coordinator >/dev/null; then
    die "the coordinator is down: nothing more to show ($SELF down && $SELF up rebuilds the demo)"
  fi
  show
  return $bad
}

# ---------------------------------------------------------------- exec & co

# c1 → app host 1 of c1; c2-app2; gw3 / c3-gw; wan.
resolve_host() {
  case "$1" in
    wan) echo "$WAN_NS" ;;
    c[0-9]) app_ns "${1#c}" 1 ;;
    c[0-9]-app[0-9]) echo "$PREFIX-$1" ;;
    gw[0-9]) echo "$PREFIX-$1" ;;
    c[0-9]-gw) gw_ns "${1:1:1}" ;;
    "$PREFIX"-*) echo "$1" ;;
    *) return 1 ;;
  esac
}

do_exec() {
  [ $# -ge 1 ] || die "usage: $SELF exec CLUSTER|HOST -- CMD..."
  local ns
  ns=$(resolve_host "$1") || die "unknown host '$1' (c1, c2, c3, c1-app2, gw1, wan)"
  shift
  [ "${1:-}" = "--" ] && shift
  [ $# -ge 1 ] || die "usage: $SELF exec CLUSTER -- CMD..."
  [ -e "/run/netns/$ns" ] || die "$ns does not exist; is the demo up? ($SELF up)"
  exec ip netns exec "$ns" "$@"
}

do_skyctl() {
  [ -f "$MARKER" ] || die "the demo is not running ($SELF up)"
  exec ip netns exec "$WAN_NS" "$(bin_dir)/skyctl" --coordinator "$COORD_URL" \
    --token-file "$STATE/coordinator/admin.token" "$@"
}

parse_app() {
  [[ "${1:-}" =~ ^c([1-3])-app([1-2])$ ]] || die "expected an app host like c2-app1 (c1..c3, app1..app2)"
  echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
}

parse_cluster() {
  [[ "${1:-}" =~ ^(c|gw)([1-3])$ ]] || die "expected a cluster like c3"
  echo "${BASH_REMATCH[2]}"
}

do_stop_app() {
  local i k
  read -r i k < <(parse_app "${1:-}")
  [ -f "$MARKER" ] || die "the demo is not running"
  stop_named "app-c$i-$k"
  echo "stopped replica $(job_name "$i" "$k") in c$i ($(app_ns "$i" "$k")); its meshd marks it not ready after 2 failed checks (~2 s)"
}

do_start_app() {
  local i k
  read -r i k < <(parse_app "${1:-}")
  [ -f "$MARKER" ] || die "the demo is not running"
  live_pid "app-c$i-$k" >/dev/null && die "$(job_name "$i" "$k") already runs"
  start_app "$i" "$k"
  wait_proc "app-c$i-$k" 10 app_answers "$(app_ns "$i" "$k")" || die "$(job_name "$i" "$k") did not start (log: $STATE/logs/app-c$i-$k.log)"
  echo "started replica $(job_name "$i" "$k") in c$i"
}

do_stop_gateway() {
  local i
  i=$(parse_cluster "${1:-}")
  [ -f "$MARKER" ] || die "the demo is not running"
  stop_named "meshd-c$i"
  rm -f "$WG_SOCK_DIR/$(iface "$i").sock"
  echo "stopped meshd of c$i; the other gateways drop its replicas after 3 missed probes (~3 s)"
}

do_start_gateway() {
  local i
  i=$(parse_cluster "${1:-}")
  [ -f "$MARKER" ] || die "the demo is not running"
  live_pid "meshd-c$i" >/dev/null && die "meshd of c$i already runs"
  start_meshd "$i" # the key and credential are in its state dir: no token needed
  wait_proc "meshd-c$i" 20 ip -n "$(gw_ns "$i")" link show "$(iface "$i")" ||
    die "meshd of c$i did not come back (log: $STATE/logs/meshd-c$i.log)"
  echo "started meshd of c$i"
}

# ---------------------------------------------------------------- down

teardown() {
  local ns pids name f
  # 1. Every process inside a skydemo namespace (ours by name), TERM then KILL.
  for ns in $(existing_ns); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      kill -TERM $pids 2>/dev/null || true
    fi
  done
  for _ in $(seq 50); do
    pids=""
    for ns in $(existing_ns); do pids+=" $(ip netns pids "$ns" 2>/dev/null || true)"; done
    [ -z "${pids// /}" ] && break
    sleep 0.1
  done
  for ns in $(existing_ns); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
    fi
  done
  # 2. Recorded processes that are somehow outside (e.g. their namespace
  #    was deleted by hand): only if pid and start time still match.
  if [ -d "$STATE/pids" ]; then
    for f in "$STATE"/pids/*.pid; do
      [ -e "$f" ] || continue
      name=$(basename "$f" .pid)
      stop_named "$name"
    done
  fi
  # 3. Namespaces (their veths, bridges and TUN interfaces go with them).
  for ns in $(existing_ns); do
    for _ in $(seq 20); do
      ip netns del "$ns" 2>/dev/null && break
      [ -e "/run/netns/$ns" ] || break
      sleep 0.25
    done
    [ -e "/run/netns/$ns" ] && warn "could not delete namespace $ns"
  done
  # 4. Per-namespace /etc files, WireGuard API sockets, any stray skydemo
  #    link in the root namespace (there should never be one).
  for f in "$NETNS_ETC"/"$PREFIX"-*; do
    [ -e "$f" ] && rm -rf -- "$f"
  done
  if [ -f "$STATE/made-etc-netns" ]; then
    rmdir "$NETNS_ETC" 2>/dev/null || true
  fi
  for f in "$WG_SOCK_DIR"/"$PREFIX"*.sock; do
    [ -e "$f" ] && rm -f -- "$f"
  done
  for name in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep "^$PREFIX" || true); do
    ip link del "$name" 2>/dev/null || true
  done
  # 5. The state directory, only if it is ours.
  if [ -e "$STATE" ]; then
    if [ -f "$MARKER" ]; then
      rm -rf -- "$STATE"
    else
      warn "$STATE exists but has no $MARKER: not removing it"
    fi
  fi
  return 0
}

do_down() {
  [ "$(id -u)" -eq 0 ] || die "run as root"
  exec 9<"${BASH_SOURCE[0]}"
  flock -w 300 9 || die "another quickstart.sh up/down is running"
  phase "Tearing down the demo (skydemo-* namespaces, processes, /etc/netns/skydemo-*, sockets, $STATE)"
  teardown
  local left
  left=$(existing_ns)
  [ -z "$left" ] || die "namespaces left: $left"
  ok "nothing of the demo is left"
}

# ---------------------------------------------------------------- main

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up) do_up ;;
  down) do_down ;;
  status) do_status ;;
  exec) do_exec "$@" ;;
  skyctl) do_skyctl "$@" ;;
  stop-app) do_stop_app "$@" ;;
  start-app) do_start_app "$@" ;;
  stop-gateway) do_stop_gateway "$@" ;;
  start-gateway) do_start_gateway "$@" ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
