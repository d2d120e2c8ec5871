#!/usr/bin/env bash
# A real local cim cluster from plain processes: etcd, redis-server, two connection servers
# (server-a, server-b) and one route (route-a), all on 127.0.0.1.
#
#   deploy/cluster.sh start         build (release) and start everything, wait until healthy
#   deploy/cluster.sh stop          stop cim processes (SIGTERM, then SIGKILL), then redis, etcd
#   deploy/cluster.sh status        which processes live (exit 0: all, 3: none, 1: some)
#   deploy/cluster.sh logs [NAME]   last lines of every log, or follow the log of NAME
#                                   (etcd, redis, server-a, server-b, route-a)
#   deploy/cluster.sh --help        this text
#
# Build: `start` runs deploy/build.sh (the same release build as ./start.sh; nothing is
# rebuilt when the binaries are current). Prebuilt binaries: CIM_SKIP_BUILD=1 and CIM_BIN_DIR.
# One process died (status exits 1 and names it): `start` refuses while others run, so
# `deploy/cluster.sh stop && deploy/cluster.sh start` (accounts and inboxes survive in
# Redis's AOF; clients reconnect by themselves).
#
# Files: run folder ./run/cluster of the repository (CIM_RUN_DIR overrides), holding NAME.log,
# NAME.pid, and the data of etcd (etcd/) and redis (redis/, or redis-1/... of a Redis Cluster;
# AOF on: accounts survive a restart).
#
# Environment (defaults in brackets):
#   CIM_ETCD_PORT [2379]  CIM_ETCD_PEER_PORT [2380]  CIM_REDIS_PORT [6379]
#   CIM_REDIS_MASTERS [1] 1: one redis-server; 3 or more: a Redis Cluster of that many
#                         masters (redis-1..N on CIM_REDIS_PORT and the ports after it,
#                         cluster bus on port + 10000, joined by `redis-cli --cluster create`),
#                         which the cim processes reach as redis+cluster://…
#   CIM_SRV_A_TCP [9000]  CIM_SRV_A_WS [9001]  CIM_SRV_A_INTERNAL [9100]
#   CIM_SRV_B_TCP [9010]  CIM_SRV_B_WS [9011]  CIM_SRV_B_INTERNAL [9110]
#   CIM_RT_HTTP [8080]    CIM_RT_INTERNAL [8081]
#   CIM_WORKER_THREADS [1] tokio worker threads of every cim-server / cim-route
#                         (--worker-threads). This cluster runs 3 cim processes plus Redis and
#                         etcd on one machine: one worker each keeps the sum near the cores
#                         (tokio's default, one per core in every process, spends the CPU on
#                         thread wake-ups and context switches); 0 = one per core
#   CIM_SRV_ARGS, CIM_RT_ARGS   extra flags for every cim-server / cim-route (word-split)
#   CIM_CLUSTER_SECRET    cluster secret of every cim process, passed through the environment
#                         (CIM_SERVER_CLUSTER_SECRET / CIM_ROUTE_CLUSTER_SECRET), not a flag;
#                         unset: the binaries' development default
#   (CIM_SERVER_* and CIM_ROUTE_* variables are the binaries' own configuration: they pass
#   through to every cim-server / cim-route.)
#   CIM_SKIP_BUILD=1      use the binaries in CIM_BIN_DIR [target/release] as they are
#   CIM_START_TIMEOUT [60] seconds to wait for a healthy cluster; CIM_STOP_TIMEOUT [15] seconds
#                          a process gets after SIGTERM before SIGKILL
#   RUST_LOG               log filter of the cim processes [info]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=${CIM_RUN_DIR:-$repo/run/cluster}
bin_dir=${CIM_BIN_DIR:-$repo/target/release}
host=127.0.0.1

etcd_port=${CIM_ETCD_PORT:-2379}
etcd_peer_port=${CIM_ETCD_PEER_PORT:-2380}
redis_port=${CIM_REDIS_PORT:-6379}
a_tcp=${CIM_SRV_A_TCP:-9000}
a_ws=${CIM_SRV_A_WS:-9001}
a_internal=${CIM_SRV_A_INTERNAL:-9100}
b_tcp=${CIM_SRV_B_TCP:-9010}
b_ws=${CIM_SRV_B_WS:-9011}
b_internal=${CIM_SRV_B_INTERNAL:-9110}
route_http=${CIM_RT_HTTP:-8080}
route_internal=${CIM_RT_INTERNAL:-8081}
start_timeout=${CIM_START_TIMEOUT:-60}
stop_timeout=${CIM_STOP_TIMEOUT:-15}
worker_threads=${CIM_WORKER_THREADS:-1}

etcd_url=http://$host:$etcd_port
redis_masters=${CIM_REDIS_MASTERS:-1}
[[ $redis_masters =~ ^[0-9]+$ ]] && { ((redis_masters == 1)) || ((redis_masters >= 3)); } ||
    { echo "cluster: CIM_REDIS_MASTERS must be 1 or at least 3, not $redis_masters" >&2; exit 2; }
redis_names=(redis)
redis_ports=("$redis_port")
redis_url=redis://$host:$redis_port/0
if ((redis_masters > 1)); then
    redis_names=() redis_ports=() seeds=()
    for ((i = 0; i < redis_masters; i++)); do
        redis_names+=("redis-$((i + 1))")
        redis_ports+=("$((redis_port + i))")
        seeds+=("$host:$((redis_port + i))")
    done
    redis_url=redis+cluster://$(IFS=,; echo "${seeds[*]}")
fi
route_url=http://$host:$route_http

# Start order; stop goes the other way round.
names=(etcd "${redis_names[@]}" server-a server-b route-a)
cim_names=(server-a server-b route-a)

log() {
    echo "cluster: $*" >&2
}

die() {
    log "$*"
    exit 1
}

pid_file() {
    echo "$run_dir/$1.pid"
}

log_file() {
    echo "$run_dir/$1.log"
}

# Whether process PID runs (exists and is not a zombie waiting for a parent to reap it).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != [ZX] ]]
}

# Whether process PID is NAME's (and not a recycled pid), by its command line. Redis rewrites
# its process title to `redis-server HOST:PORT`.
is_process_of() {
    local name=$1 pid=$2 cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    case $name in
        etcd) [[ $cmdline == *"--data-dir $run_dir/etcd"* ]] ;;
        redis*) [[ $cmdline == redis-server* || $cmdline == *"--dir $run_dir/$name"* ]] ;;
        *) [[ $cmdline == *"--name $name "* ]] ;;
    esac
}

# The pid of NAME if that process is alive, else nothing (and status 1).
live_pid() {
    local file pid
    file=$(pid_file "$1")
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    running "$pid" || return 1
    is_process_of "$1" "$pid" || return 1
    echo "$pid"
}

port_in_use() {
    (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null
}

# Whether every Redis answers PING (port: the first argument, else each of redis_ports).
redis_answers() {
    local reply= port
    for port in "${@:-${redis_ports[@]}}"; do
        (
            exec 3<>"/dev/tcp/$host/$port" || exit 1
            printf 'PING\r\n' >&3
            IFS= read -r -t 2 reply <&3 || exit 1
            [[ $reply == +PONG* ]]
        ) 2>/dev/null || return 1
    done
}

# Whether every node of the Redis Cluster says cluster_state:ok.
redis_cluster_ok() {
    local port
    for port in "${redis_ports[@]}"; do
        redis-cli -h "$host" -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' ||
            return 1
    done
}

etcd_answers() {
    curl -fsS --max-time 2 "$etcd_url/health" 2>/dev/null | grep -q '"health":"true"'
}

# The number of live servers the route reports on /healthz (nothing if it does not answer).
route_servers() {
    local body
    body=$(curl -fsS --max-time 2 "$route_url/healthz" 2>/dev/null) || return 1
    [[ $body =~ \"servers\"[[:space:]]*:[[:space:]]*([0-9]+) ]] || return 1
    echo "${BASH_REMATCH[1]}"
}

# Starts NAME in its own session (immune to the terminal's signals), logging to NAME.log.
launch() {
    local name=$1
    shift
    log "starting $name: $*"
    {
        echo "=== $(date -u +%FT%TZ) starting: $*"
    } >>"$(log_file "$name")"
    setsid "$@" >>"$(log_file "$name")" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$(pid_file "$name")"
    disown "$pid"
    # Until the child has exec'd its program, /proc/PID/cmdline is still this script's, and
    # live_pid would take the starting process for a dead one ("NAME exited" with an empty
    # log, then a stop of what was started). Wait for the exec, or for the child's end.
    local deadline=$((SECONDS + 10))
    until is_process_of "$name" "$pid" || ! running "$pid"; do
        if ((SECONDS >= deadline)); then
            log "$name (pid $pid) did not start its program within 10s"
            return 1
        fi
        sleep 0.05
    done
}

# Waits until CHECK succeeds, failing when NAME's process dies or after TIMEOUT seconds.
# Waits up to TIMEOUT seconds until CHECK (a command and its arguments) succeeds, while the
# process NAME lives.
wait_for() {
    local name=$1 timeout=$2
    local deadline=$((SECONDS + timeout))
    until "${@:3}"; do
        if ! live_pid "$name" >/dev/null; then
            log "$name exited; last lines of $(log_file "$name"):"
            tail -n 30 "$(log_file "$name")" >&2 || true
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "$name not ready after ${timeout}s; last lines of $(log_file "$name"):"
            tail -n 30 "$(log_file "$name")" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

# SIGTERM to every given name, wait up to stop_timeout for all, then SIGKILL the rest.
terminate() {
    local name pid
    local -a pids=() left=()
    for name in "$@"; do
        if pid=$(live_pid "$name"); then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$(pid_file "$name")"
    done
    [[ ${#pids[@]} -gt 0 ]] || return 0
    local deadline=$((SECONDS + stop_timeout))
    while :; do
        left=()
        for pid in "${pids[@]}"; do
            if running "$pid"; then
                left+=("$pid")
            fi
        done
        [[ ${#left[@]} -gt 0 ]] || return 0
        if ((SECONDS >= deadline)); then
            log "still running after ${stop_timeout}s, killing: ${left[*]}"
            kill -KILL "${left[@]}" 2>/dev/null || true
            return 0
        fi
        sleep 0.2
    done
}

stop_all() {
    # cim processes first (the route, then the servers drain), then the backends they use.
    terminate route-a
    terminate server-a server-b
    terminate "${redis_names[@]}"
    terminate etcd
    log "stopped"
}

cmd_start() {
    local name pid port running=()
    mkdir -p "$run_dir"
    for name in "${names[@]}"; do
        if pid=$(live_pid "$name"); then
            running+=("$name (pid $pid)")
        fi
    done
    if [[ ${#running[@]} -gt 0 ]]; then
        die "already running: ${running[*]}; run '$0 stop' first"
    fi
    for name in "${names[@]}"; do
        rm -f "$(pid_file "$name")"
    done

    "$repo/deploy/install-deps.sh" curl=curl setsid=util-linux redis-cli=redis-tools

    for port in "$etcd_port" "$etcd_peer_port" "${redis_ports[@]}" "$a_tcp" "$a_ws" "$a_internal" \
        "$b_tcp" "$b_ws" "$b_internal" "$route_http" "$route_internal"; do
        if port_in_use "$port"; then
            die "port $port on $host is in use (a system redis-server or etcd service?); stop it or choose other ports with the CIM_*_PORT variables"
        fi
    done

    # The build ./start.sh uses too (one feature resolution: neither rebuilds the other's);
    # a no-op when the binaries are current, skipped with CIM_SKIP_BUILD=1.
    "$repo/deploy/build.sh"
    for name in cim-server cim-route; do
        [[ -x $bin_dir/$name ]] || die "$bin_dir/$name is missing (build failed?)"
    done

    # From here on, a failure stops whatever was started.
    trap 'log "start failed, stopping what was started"; stop_all' ERR
    set -E

    mkdir -p "$run_dir/etcd"
    chmod 700 "$run_dir/etcd"
    launch etcd etcd --name cim --data-dir "$run_dir/etcd" \
        --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
        --listen-peer-urls "http://$host:$etcd_peer_port" \
        --initial-advertise-peer-urls "http://$host:$etcd_peer_port" \
        --initial-cluster "cim=http://$host:$etcd_peer_port" \
        --logger zap --log-level warn
    local i cluster_args=()
    if ((redis_masters > 1)); then
        cluster_args=(--cluster-enabled yes --cluster-config-file nodes.conf
            --cluster-node-timeout 5000)
    fi
    for i in "${!redis_names[@]}"; do
        mkdir -p "$run_dir/${redis_names[$i]}"
        launch "${redis_names[$i]}" redis-server --port "${redis_ports[$i]}" --bind "$host" \
            --dir "$run_dir/${redis_names[$i]}" --daemonize no --save "" --appendonly yes \
            --logfile "" "${cluster_args[@]+"${cluster_args[@]}"}"
    done
    wait_for etcd 20 etcd_answers
    for i in "${!redis_names[@]}"; do
        wait_for "${redis_names[$i]}" 20 redis_answers "${redis_ports[$i]}"
    done
    if ((redis_masters > 1)); then
        # A fresh run folder: create the cluster (and remember it). A restarted one keeps
        # nodes.conf and forms the same cluster again by itself, after a moment.
        if [[ ! -f $run_dir/redis-cluster.created ]]; then
            local nodes=()
            for i in "${!redis_ports[@]}"; do nodes+=("$host:${redis_ports[$i]}"); done
            redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
                >"$run_dir/redis-cluster-create.log" 2>&1 ||
                die "redis-cli --cluster create failed; see $run_dir/redis-cluster-create.log"
            touch "$run_dir/redis-cluster.created"
        fi
        wait_for "${redis_names[0]}" 30 redis_cluster_ok
    fi

    local -a server_args route_args
    read -r -a server_args <<<"${CIM_SRV_ARGS:-}"
    read -r -a route_args <<<"${CIM_RT_ARGS:-}"
    export RUST_LOG=${RUST_LOG:-info}
    # Plain text in the log files (tracing-subscriber honours NO_COLOR).
    export NO_COLOR=1
    if [[ -n ${CIM_CLUSTER_SECRET:-} ]]; then
        export CIM_SERVER_CLUSTER_SECRET=$CIM_CLUSTER_SECRET
        export CIM_ROUTE_CLUSTER_SECRET=$CIM_CLUSTER_SECRET
    fi
    launch server-a "$bin_dir/cim-server" --name server-a \
        --tcp-listen "$host:$a_tcp" --ws-listen "$host:$a_ws" \
        --internal-listen "$host:$a_internal" \
        --redis-url "$redis_url" --etcd "$etcd_url" --worker-threads "$worker_threads" \
        "${server_args[@]}"
    launch server-b "$bin_dir/cim-server" --name server-b \
        --tcp-listen "$host:$b_tcp" --ws-listen "$host:$b_ws" \
        --internal-listen "$host:$b_internal" \
        --redis-url "$redis_url" --etcd "$etcd_url" --worker-threads "$worker_threads" \
        "${server_args[@]}"
    launch route-a "$bin_dir/cim-route" --name route-a \
        --http-listen "$host:$route_http" --internal-listen "$host:$route_internal" \
        --redis-url "$redis_url" --etcd "$etcd_url" --worker-threads "$worker_threads" \
        "${route_args[@]}"

    log "waiting for $route_url/healthz to report 2 servers (up to ${start_timeout}s)"
    local deadline=$((SECONDS + start_timeout)) servers=
    while :; do
        for name in "${cim_names[@]}"; do
            if ! live_pid "$name" >/dev/null; then
                log "$name exited; last lines of $(log_file "$name"):"
                tail -n 30 "$(log_file "$name")" >&2 || true
                false
            fi
        done
        servers=$(route_servers) || servers=
        if [[ -n $servers ]] && ((servers >= 2)); then
            break
        fi
        if ((SECONDS >= deadline)); then
            log "not healthy after ${start_timeout}s (route reports servers=${servers:-none}); logs in $run_dir"
            false
        fi
        sleep 0.5
    done
    trap - ERR

    cat <<EOF
cim cluster is up ($servers servers):
  route HTTP API   $route_url  (health: $route_url/healthz)
  server-a         tcp $host:$a_tcp   ws://$host:$a_ws/ws   internal $host:$a_internal
  server-b         tcp $host:$b_tcp   ws://$host:$b_ws/ws   internal $host:$b_internal
  route internal   $host:$route_internal
  etcd             $etcd_url
  redis            $redis_url (pids: $(for n in "${redis_names[@]}"; do printf '%s ' "$(live_pid "$n")"; done))
logs and pids in $run_dir  ($0 logs [NAME])
stop with: $0 stop
EOF
}

cmd_stop() {
    local name any=false
    for name in "${names[@]}"; do
        if live_pid "$name" >/dev/null; then
            any=true
        fi
    done
    if [[ $any == false ]]; then
        for name in "${names[@]}"; do
            rm -f "$(pid_file "$name")"
        done
        log "not running"
        return 0
    fi
    stop_all
}

cmd_status() {
    local name pid file up=0
    for name in "${names[@]}"; do
        file=$(pid_file "$name")
        if pid=$(live_pid "$name"); then
            printf '%-9s running (pid %s)\n' "$name" "$pid"
            up=$((up + 1))
        elif [[ -f $file ]]; then
            printf '%-9s dead (stale pid file %s)\n' "$name" "$file"
        else
            printf '%-9s stopped\n' "$name"
        fi
    done
    if live_pid route-a >/dev/null; then
        local servers
        servers=$(route_servers) || servers="no answer"
        printf 'route %s/healthz: servers=%s\n' "$route_url" "$servers"
    fi
    if ((up == ${#names[@]})); then
        return 0
    elif ((up == 0)); then
        return 3
    fi
    return 1
}

cmd_logs() {
    local name file
    if [[ $# -gt 0 ]]; then
        file=$(log_file "$1")
        [[ -f $file ]] || die "no log $file (names: ${names[*]})"
        exec tail -n 100 -F "$file"
    fi
    for name in "${names[@]}"; do
        file=$(log_file "$name")
        if [[ -f $file ]]; then
            echo "==> $file <=="
            tail -n "${CIM_LOG_LINES:-40}" "$file"
            echo
        fi
    done
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    logs)
        shift
        cmd_logs "$@"
        ;;
    -h | --help | help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        ;;
    *) usage ;;
esac
