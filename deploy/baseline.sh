#!/usr/bin/env bash
# The performance baseline of cim, in about ten minutes on 2 cores: measures the machine's
# floor first (cim-floor, no cim code), then starts a local cluster with deploy/cluster.sh in
# its own run folder and on its own ports (a development cluster on the standard ports can
# keep running), runs the cim-bench scenarios one after the other, writes every result as
# JSON plus a markdown summary (cim / floor ratios first), prints the summary, and stops
# everything it started, also on failure or ctrl-c.
#
#   deploy/baseline.sh              build (release), then run the baseline
#   BASELINE_100K=1 deploy/baseline.sh
#                                   the 100k-connection mode instead: 6 servers, 6 bench
#                                   processes of ~16,700 idle TCP connections each
#
# Steps (sizes in brackets, each overridable by the variable named):
#   floor         before the cluster starts: `cim-floor all` (bench/floor), this machine's floor
#                 with no cim code (a loopback broadcast, a one-hop epoll relay, HSET + HDEL on
#                 an AOF Redis of its own); its broadcast and relay take the sizes of the fanout
#                 and p2p steps below (connections, messages, pairs, rates, duration), so the
#                 summary's ratio table compares like with like; BASELINE_FLOOR_ARGS adds
#                 cim-floor flags of its own (e.g. "--redis-messages 1000000", see
#                 cim-floor all --help). BASELINE_FLOOR=0 skips it (the ratio table then
#                 shows no floor figures)
#   connect-tcp   [19000] BASELINE_TCP_CONNECTIONS idle TCP connections from 2 bench processes
#                 in parallel (disjoint users and source IPs), held [20s] BASELINE_HOLD
#   connect-ws    [10000] BASELINE_WS_CONNECTIONS the same over WebSocket
#   p2p-unloaded  1 pair at [200] BASELINE_P2P_UNLOADED_RATE msg/s: latency without load
#   p2p-rate      [200] BASELINE_P2P_PAIRS pairs at [10000] BASELINE_P2P_RATE msg/s in total
#   p2p-flat      [1000] BASELINE_P2P_FLAT_PAIRS pairs sending flat out (window 32)
#                 (each p2p step sends for [10s] BASELINE_P2P_DURATION)
#   fanout        [10000] BASELINE_FANOUT_RECEIVERS receivers in one process, [10]
#                 BASELINE_FANOUT_COUNT group messages [1s] BASELINE_FANOUT_INTERVAL apart
#   fanout-500    [500] BASELINE_GROUP_ONLINE receivers of [20] group messages 200 ms apart:
#                 the broadcast a stored group's send → last receipt compares with
#   group-rate    a stored group of [1000] BASELINE_GROUP_MEMBERS members, the online ones
#                 connected, [20] BASELINE_GROUP_RATE msg/s for [200] BASELINE_GROUP_COUNT
#                 messages; then [100] BASELINE_GROUP_CATCH_UP offline members catch up
#   group-rate-2x the same with twice the members (at most the route's groups.max_members,
#                 2,000 by default): Redis CPU per message must not grow with them
#   group-flat    the first group's sizes flat out (window 32), [1000]
#                 BASELINE_GROUP_FLAT_COUNT messages, then the catch-up on all of them
# Each step starts only once the servers report no open connection, so none sees the
# previous step's clients. Server memory per connection is measured here too, from the
# servers' resident memory before a connect step and while its connections are all open
# (the bench processes' own figures overlap when two of them connect at once).
# 100k mode: [100000] BASELINE_100K_CONNECTIONS over [6] BASELINE_100K_PROCESSES processes,
# opened at [1000] BASELINE_100K_RATE per second per process (at 5,000 each, 2 cores fall
# behind and logins time out), held [30s] BASELINE_100K_HOLD, on [6] BASELINE_100K_SERVERS
# servers (2 to 8: cluster.sh's two and server-c… started here with its flags). Six, not
# five: a server holds its share plus a few hundred files, and 100,000 / 5 does not fit under
# a 20,000-file hard limit; with fewer servers the open-file limit is raised, which needs the
# right to (root with CAP_SYS_RESOURCE). Then fanout-100k: [5] BASELINE_100K_FANOUT_COUNT
# group messages [3s] BASELINE_100K_FANOUT_INTERVAL apart to as many receivers, over the same
# processes: the first sends and holds its share, the others are `--receive-only`; their
# reports (send and last-receipt times per message) merge into one time to the last receipt.
#
# Results in ./run/baseline/results/ (results-100k/ in 100k mode; BASELINE_RUN_DIR sets the
# run folder), replaced at each run: STEP.json (one cim-bench report; STEP-N.json for each
# process of a parallel step; floor.json the `cim-floor all --json` report), STEP.log /
# STEP-N.log (its progress lines), memory-STEP.json, baseline.json (everything, with the
# machine and commit), summary.md: first the ratio table (each row of issue 22's target table
# that this run measures: the cim figure, the floor's, cim / floor and the target; the stored
# group's rows compare with cim's own figures instead: twice the members, and fanout-500),
# then the floor's own figures, then one table per kind of step. The cluster's logs are in the
# run folder. The 100k mode has no floor step and no ratio table.
#
# Redis: BASELINE_REDIS_MASTERS [1] runs the cluster on one redis-server (1) or on a Redis
# Cluster of that many masters (3 or more; cluster.sh's CIM_REDIS_MASTERS). Redis's CPU is
# summed over every node (cim-bench --redis-pid per node), and each step records each node's
# `INFO commandstats` (calls, usec) before and after, in redis-STEP.json; the summary shows
# each node's share of the Redis time of the private-message steps (how evenly the shards split).
#
# Environment: BASELINE_SKIP_BUILD=1 uses target/release as it is; BASELINE_CONNECT_RATE
# [5000] new connections per second per bench process; the ports are cluster.sh's CIM_*
# variables, defaulting here to etcd 23790/23800, redis 16390, route 18080/18081, servers
# 19000/19001/19100, 19010/19011/19110; the 100k mode's further servers take the next tens
# (server-c 19020/19021/19120, server-d 19030/…); CIM_CLUSTER_SECRET reaches the cluster
# (cim-bench needs none: it logs its users in through the route's business API, with an API
# key made up per run, BASELINE_API_KEY to choose it); CIM_WORKER_THREADS [1] is the tokio worker count of every cim-server and
# cim-route (cluster.sh's, and the 100k mode's further servers): all of them, Redis, etcd and
# the bench share the machine, so one worker each by default; 0 = one per core. (Each bench
# process runs on one worker too: cim-bench's own default.)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=${BASELINE_RUN_DIR:-$repo/run/baseline}
mode_100k=${BASELINE_100K:-0}
# The 100k mode keeps its own results, so that it does not wipe the baseline's.
if [[ $mode_100k == 1 ]]; then
    results=$run_dir/results-100k
else
    results=$run_dir/results
fi
bin_dir=$repo/target/release
host=127.0.0.1

# cluster.sh reads these; defaults off the standard ports so both clusters can coexist.
export CIM_RUN_DIR=$run_dir
export CIM_BIN_DIR=$bin_dir
export CIM_ETCD_PORT=${CIM_ETCD_PORT:-23790}
export CIM_ETCD_PEER_PORT=${CIM_ETCD_PEER_PORT:-23800}
export CIM_REDIS_PORT=${CIM_REDIS_PORT:-16390}
export CIM_SRV_A_TCP=${CIM_SRV_A_TCP:-19000}
export CIM_SRV_A_WS=${CIM_SRV_A_WS:-19001}
export CIM_SRV_A_INTERNAL=${CIM_SRV_A_INTERNAL:-19100}
export CIM_SRV_B_TCP=${CIM_SRV_B_TCP:-19010}
export CIM_SRV_B_WS=${CIM_SRV_B_WS:-19011}
export CIM_SRV_B_INTERNAL=${CIM_SRV_B_INTERNAL:-19110}
export CIM_RT_HTTP=${CIM_RT_HTTP:-18080}
export CIM_RT_INTERNAL=${CIM_RT_INTERNAL:-18081}

export CIM_REDIS_MASTERS=${BASELINE_REDIS_MASTERS:-${CIM_REDIS_MASTERS:-1}}

etcd_url=http://$host:$CIM_ETCD_PORT
redis_url=redis://$host:$CIM_REDIS_PORT/0
redis_ports=("$CIM_REDIS_PORT")
if ((CIM_REDIS_MASTERS > 1)); then
    redis_ports=()
    for ((i = 0; i < CIM_REDIS_MASTERS; i++)); do redis_ports+=("$((CIM_REDIS_PORT + i))"); done
    redis_url=redis+cluster://$(printf "$host:%s," "${redis_ports[@]}" | sed 's/,$//')
fi
route_url=http://$host:$CIM_RT_HTTP

hold=${BASELINE_HOLD:-20s}
connect_rate=${BASELINE_CONNECT_RATE:-5000}
tcp_connections=${BASELINE_TCP_CONNECTIONS:-19000}
ws_connections=${BASELINE_WS_CONNECTIONS:-10000}
p2p_duration=${BASELINE_P2P_DURATION:-10s}
p2p_unloaded_rate=${BASELINE_P2P_UNLOADED_RATE:-200}
p2p_pairs=${BASELINE_P2P_PAIRS:-200}
p2p_rate=${BASELINE_P2P_RATE:-10000}
p2p_flat_pairs=${BASELINE_P2P_FLAT_PAIRS:-1000}
fanout_receivers=${BASELINE_FANOUT_RECEIVERS:-10000}
fanout_count=${BASELINE_FANOUT_COUNT:-10}
fanout_interval=${BASELINE_FANOUT_INTERVAL:-1s}
group_members=${BASELINE_GROUP_MEMBERS:-1000}
group_online=${BASELINE_GROUP_ONLINE:-500}
group_rate=${BASELINE_GROUP_RATE:-20}
group_count=${BASELINE_GROUP_COUNT:-200}
group_flat_count=${BASELINE_GROUP_FLAT_COUNT:-1000}
group_catch_up=${BASELINE_GROUP_CATCH_UP:-100}
big_connections=${BASELINE_100K_CONNECTIONS:-100000}
big_processes=${BASELINE_100K_PROCESSES:-6}
big_hold=${BASELINE_100K_HOLD:-30s}
big_servers=${BASELINE_100K_SERVERS:-6}
big_rate=${BASELINE_100K_RATE:-1000}
big_fanout_count=${BASELINE_100K_FANOUT_COUNT:-5}
big_fanout_interval=${BASELINE_100K_FANOUT_INTERVAL:-3s}

# Source addresses for the bench processes: all of 127.0.0.0/8 is loopback on Linux, and each
# address has its own ephemeral ports, so parallel processes get disjoint slices of these.
source_first=2
source_last=40

# Names of the servers beyond cluster.sh's two, in 100k mode.
extra_names=(server-c server-d server-e server-f server-g server-h)

bench=$bin_dir/cim-bench
floor=$bin_dir/cim-floor
run_floor=${BASELINE_FLOOR:-1}
read -r -a floor_args <<<"${BASELINE_FLOOR_ARGS:-}"
bench_global=(--route "$route_url" --etcd "$etcd_url" --json)

# cim-bench logs its users in through the route's business API: a key for this run, given to
# the route through cluster.sh (CIM_ROUTE_* variables pass through) and to cim-bench through
# its environment (CIM_API_KEY), never on a command line.
bench_api_key=${BASELINE_API_KEY:-baseline-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}
export CIM_ROUTE_API_KEYS="[\"$bench_api_key\"]"
export CIM_API_KEY=$bench_api_key

# Every server's internal address and pid file, filled once the cluster runs.
server_internal=()
server_pid_files=()
# Bench processes and extra servers started here, by pid, for the cleanup.
bench_pids=()
extra_pids=()
failed_steps=()
# Set once this run may have started cluster processes in the run folder: only then does the
# cleanup stop them (a cluster found running there belongs to someone else).
cluster_owned=false
started_at=$(date -u +%FT%TZ)
started_secs=$SECONDS

log() {
    echo "baseline: $*" >&2
}

die() {
    log "$*"
    exit 1
}

# Whether process PID runs (exists and is not a zombie).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != [ZX] ]]
}

# SIGTERM to the given pids, SIGKILL to whatever still runs after TIMEOUT seconds.
stop_pids() {
    local timeout=$1 pid
    shift
    local -a left=()
    for pid in "$@"; do
        if running "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            left+=("$pid")
        fi
    done
    local deadline=$((SECONDS + timeout))
    while [[ ${#left[@]} -gt 0 ]]; do
        local -a still=()
        for pid in "${left[@]}"; do
            if running "$pid"; then
                still+=("$pid")
            fi
        done
        left=("${still[@]+"${still[@]}"}")
        [[ ${#left[@]} -gt 0 ]] || break
        if ((SECONDS >= deadline)); then
            kill -KILL "${left[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    local pid
    for pid in "${bench_pids[@]+"${bench_pids[@]}"}"; do
        if running "$pid"; then
            log "stopping bench process $pid"
            stop_pids 10 "$pid"
        fi
    done
    if [[ ${#extra_pids[@]} -gt 0 ]]; then
        log "stopping the extra servers"
        stop_pids 15 "${extra_pids[@]}"
        rm -f "$run_dir"/server-[c-h].pid
    fi
    if [[ $cluster_owned == true ]]; then
        "$repo/deploy/cluster.sh" stop
    fi
    if ((status != 0)); then
        log "failed (status $status); logs in $run_dir and $results"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Resident memory of every server process, in bytes.
servers_rss() {
    local file pid kib total=0
    for file in "${server_pid_files[@]}"; do
        pid=$(<"$file")
        kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || kib=0
        total=$((total + ${kib:-0} * 1024))
    done
    echo "$total"
}

# Open connections over every server (their /healthz); fails when a server does not answer.
servers_connections() {
    local addr body total=0
    for addr in "${server_internal[@]}"; do
        body=$(curl -fsS --max-time 2 "http://$addr/healthz") || return 1
        total=$((total + $(jq -r '.connections // 0' <<<"$body")))
    done
    echo "$total"
}

# Waits until the servers hold no connection (the previous step's clients are gone).
wait_idle() {
    local deadline=$((SECONDS + 60)) n=
    while :; do
        n=$(servers_connections) || n=
        [[ $n != 0 ]] || return 0
        if ((SECONDS >= deadline)); then
            die "servers still report ${n:-no answer} connections after 60s"
        fi
        sleep 0.5
    done
}

# `start-end` of slice I (0-based) of N of the source addresses.
source_slice() {
    local i=$1 n=$2 count=$((source_last - source_first + 1))
    local from=$((source_first + i * count / n)) to=$((source_first + (i + 1) * count / n - 1))
    echo "127.0.0.$from-127.0.0.$to"
}

# Seconds in a duration such as 20s, 1500ms or 2m (rounded up), for deadlines.
secs_of() {
    local d=$1
    case $d in
        *ms) echo $(((${d%ms} + 999) / 1000)) ;;
        *s) echo "${d%s}" | awk '{ printf "%d\n", $1 + 0.999 }' ;;
        *m) echo $((${d%m} * 60)) ;;
        *) echo "$d" | awk '{ printf "%d\n", $1 + 0.999 }' ;;
    esac
}

# Starts one cim-bench in the background, its report to NAME.json and its progress to
# NAME.log, stopped by `timeout` after LIMIT seconds so a hung run cannot hang the baseline.
# Sets `launched` to its pid.
launch_bench() {
    local name=$1 limit=$2
    shift 2
    # Redis's CPU time is read from /proc by pid (each node's), which changes when the
    # cluster restarts.
    local -a redis_pid=()
    local file
    for file in "$run_dir"/redis.pid "$run_dir"/redis-[0-9]*.pid; do
        if [[ -s $file ]]; then
            redis_pid+=(--redis-pid "$(<"$file")")
        fi
    done
    log "  $name: cim-bench $*"
    timeout --kill-after=10 "$limit" "$bench" "${bench_global[@]}" \
        "${redis_pid[@]+"${redis_pid[@]}"}" "$@" \
        >"$results/$name.json" 2>"$results/$name.log" </dev/null &
    launched=$!
    bench_pids+=("$launched")
}

# Waits for the given bench pids; the names of those that failed go to failed_steps.
wait_benches() {
    local i pid status
    local -a names=()
    read -r -a names <<<"$1"
    shift
    i=0
    for pid in "$@"; do
        status=0
        wait "$pid" || status=$?
        if ((status != 0)); then
            log "  ${names[$i]} failed (status $status); last lines of $results/${names[$i]}.log:"
            tail -n 5 "$results/${names[$i]}.log" >&2 || true
            failed_steps+=("${names[$i]}")
            rm -f "$results/${names[$i]}.json"
        fi
        i=$((i + 1))
    done
}

# Like wait_benches, for processes that only work together (fanout-100k's sender and its
# receive-only processes): they are waited for as they end, and the first that fails stops
# the others. Otherwise a sender whose receivers are gone waits out its whole start wait.
wait_benches_together() {
    local -a names=() pids=("${@:2}") left=()
    local -A name_of=()
    local i pid status other name
    read -r -a names <<<"$1"
    for i in "${!pids[@]}"; do
        name_of[${pids[$i]}]=${names[$i]}
    done
    left=("${pids[@]}")
    local stopping=
    while ((${#left[@]} > 0)); do
        status=0
        pid=
        wait -n -p pid "${left[@]}" 2>/dev/null || status=$?
        if [[ -z ${pid:-} ]]; then
            # `wait -n` knows only running jobs: one that ended meanwhile (already reaped by
            # bash) is "no such job". Find it (it is gone for `kill -0`); `wait PID` still
            # has its status.
            for other in "${left[@]}"; do
                if ! kill -0 "$other" 2>/dev/null; then
                    pid=$other
                    status=0
                    wait "$pid" || status=$?
                    break
                fi
            done
            [[ -n $pid ]] || { sleep 0.1; continue; }
        fi
        local -a still=()
        for other in "${left[@]}"; do
            [[ $other == "$pid" ]] || still+=("$other")
        done
        left=("${still[@]}")
        ((status != 0)) || continue
        name=${name_of[$pid]}
        log "  $name failed (status $status); last lines of $results/$name.log:"
        tail -n 5 "$results/$name.log" >&2 || true
        failed_steps+=("$name")
        rm -f "$results/$name.json"
        if [[ -z $stopping && ${#left[@]} -gt 0 ]]; then
            stopping=1
            log "  stopping the other ${#left[@]} processes of this step: they cannot finish without it"
            kill "${left[@]}" 2>/dev/null || true
        fi
    done
}

# connect STEP TRANSPORT TOTAL PROCESSES USER_OFFSET HOLD RATE: TOTAL idle connections from
# PROCESSES bench processes in parallel (RATE new ones per second each), and the servers'
# memory per connection meanwhile.
connect_step() {
    local step=$1 transport=$2 total=$3 procs=$4 offset=$5 hold_for=$6 rate=$7
    local per=$(((total + procs - 1) / procs)) i n name limit
    local -a pids=() names=()
    wait_idle
    log "$step: $total $transport connections from $procs processes, held $hold_for"
    local rss_before
    rss_before=$(servers_rss)
    # Connecting is paced by --rate in each process; allow it twice over, plus the hold.
    limit=$((per * 2 / rate + $(secs_of "$hold_for") + 120))
    for ((i = 0; i < procs; i++)); do
        n=$((total / procs + (i < total % procs ? 1 : 0)))
        name=$step-$i
        launch_bench "$name" "$limit" connect --connections "$n" --transport "$transport" \
            --hold "$hold_for" --rate "$rate" --source-ips "$(source_slice "$i" "$procs")" \
            --user-offset $((offset + i * per))
        pids+=("$launched")
        names+=("$name")
    done

    # Memory while every connection is open: wait until the servers count them all, or the
    # count stops growing for 3 s (some failed), then read both at once.
    local conns=0 last=-1 stable=0 deadline=$((SECONDS + limit))
    while ((SECONDS < deadline)); do
        conns=$(servers_connections) || conns=0
        if ((conns >= total)); then
            break
        fi
        if ((conns > 0 && conns == last)); then
            stable=$((stable + 1))
            ((stable < 6)) || break
        else
            stable=0
        fi
        last=$conns
        local alive=false pid
        for pid in "${pids[@]}"; do
            if running "$pid"; then
                alive=true
            fi
        done
        [[ $alive == true ]] || break
        sleep 0.5
    done
    sleep 1
    local rss_during
    conns=$(servers_connections) || conns=0
    rss_during=$(servers_rss)
    jq -n --arg step "$step" --arg transport "$transport" --argjson connections "$conns" \
        --argjson before "$rss_before" --argjson during "$rss_during" '{
            step: $step, transport: $transport, connections: $connections,
            servers_rss_before_bytes: $before, servers_rss_during_bytes: $during,
            bytes_per_connection: (if $connections > 0
                then (($during - $before) / $connections | floor) else null end)
        }' >"$results/memory-$step.json"
    log "  $conns connections open, servers' memory $((rss_before / 1048576)) → $((rss_during / 1048576)) MiB"
    wait_benches "${names[*]}" "${pids[@]}"
}

# fanout-100k: group messages to TOTAL receivers held by PROCESSES bench processes: the
# first sends (and waits until the others' receivers are online), the rest --receive-only.
fanout_big_step() {
    local total=$1 procs=$2 offset=$3
    local per=$(((total + procs - 1) / procs)) i n name limit
    local -a pids=() names=() common=()
    wait_idle
    log "fanout-100k: $big_fanout_count group messages to $total receivers in $procs processes"
    common=(--count "$big_fanout_count" --interval "$big_fanout_interval" --start-wait 300s)
    # Connecting (unpaced, bounded concurrency) within the start wait, then the schedule.
    limit=$((300 + $(secs_of "$big_fanout_interval") * big_fanout_count + 120))
    for ((i = 0; i < procs; i++)); do
        n=$((total / procs + (i < total % procs ? 1 : 0)))
        name=fanout-100k-$i
        if ((i == 0)); then
            # Users offset (the sender) and offset+1… (its receivers).
            launch_bench "$name" "$limit" fanout --receivers "$n" --others $((total - n)) \
                "${common[@]}" --source-ips "$(source_slice "$i" "$procs")" \
                --user-offset "$offset"
        else
            launch_bench "$name" "$limit" fanout --receive-only --receivers "$n" \
                "${common[@]}" --source-ips "$(source_slice "$i" "$procs")" \
                --user-offset $((offset + 1 + i * per))
        fi
        pids+=("$launched")
        names+=("$name")
    done
    wait_benches_together "${names[*]}" "${pids[@]}"
}

# Each Redis node's command statistics, as a JSON array of {port, calls, usec} (the sums
# over its commands in INFO commandstats).
redis_stats() {
    local port
    for port in "${redis_ports[@]}"; do
        redis-cli -h "$host" -p "$port" info commandstats 2>/dev/null | tr -d '\r' | awk -F'[=,:]' -v port="$port" '
            /^cmdstat_/ { calls += $3; usec += $5 }
            END { printf "{\"port\": %d, \"calls\": %d, \"usec\": %d}\n", port, calls, usec }'
    done | jq -s .
}

# bench_step NAME LIMIT ARGS…: one bench process, waited for; each Redis node's command
# statistics over the step go to redis-NAME.json.
bench_step() {
    local name=$1 limit=$2 before
    shift 2
    wait_idle
    log "$name"
    before=$(redis_stats)
    launch_bench "$name" "$limit" "$@"
    wait_benches "$name" "$launched"
    jq -n --argjson before "$before" --argjson after "$(redis_stats)" '
        [range($after | length) as $i | {port: $after[$i].port,
            calls: ($after[$i].calls - $before[$i].calls),
            usec: ($after[$i].usec - $before[$i].usec)}]' >"$results/redis-$name.json"
}

# floor: `cim-floor all` with the sizes of the fanout and p2p steps, before the cluster starts
# (nothing of this run competes with it for the cores); its report to floor.json, its
# progress to floor.log. Bounded: three relay scenarios of the p2p duration, the broadcast
# and Redis (~10 s), with room to spare.
floor_step() {
    local d pid
    d=$(secs_of "$p2p_duration")
    log "floor: cim-floor all (this machine's floor: no cim code, no cluster yet)"
    timeout --kill-after=10 $((3 * d + 300)) "$floor" all --json \
        --connections "$fanout_receivers" --messages "$fanout_count" \
        --duration "$p2p_duration" --unloaded-rate "$p2p_unloaded_rate" \
        --pairs "$p2p_pairs" --rate "$p2p_rate" --flat-pairs "$p2p_flat_pairs" \
        "${floor_args[@]+"${floor_args[@]}"}" >"$results/floor.json" 2>"$results/floor.log" </dev/null &
    pid=$!
    bench_pids+=("$pid")
    wait_benches floor "$pid"
}

# One row per private-message step: each Redis node's share of the step's Redis time.
redis_split_row() {
    local step=$1
    jq -r --arg step "$step" "$jq_lib"'
        (map(.usec) | add) as $total | (map(.calls) | add) as $calls
        | [$step, (length), $calls, ($total / 1000 | f(0)),
           (map(if $total > 0 then (.usec * 100 / $total | f(1)) + " %" else "-" end) | join(" / "))]
        | row' "$results/redis-$step.json" 2>/dev/null ||
        echo "| $step | - | - | - | - |"
}

# Issue 22's target table, as far as a normal run measures it: per row the cim figure, the
# floor's (for the stored group: the cim figure it is compared with), cim / floor and the
# target. Every report is read if present; a failed or skipped step leaves "-" in its cells.
ratio_table() {
    local name
    local -a files=()
    for name in floor fanout fanout-500 p2p-unloaded p2p-rate p2p-flat group-rate \
        group-rate-2x memory-connect-tcp memory-connect-ws; do
        if [[ -s $results/$name.json ]]; then
            files+=("$results/$name.json")
        fi
    done
    echo "| measure (issue 22) | cim | floor (group rows: base) | cim / floor | target |"
    echo "| --- | ---: | ---: | ---: | --- |"
    jq -nr "$jq_lib"'
        def cell(d): if type == "number" then f(d) elif . == null then "-" else . end;
        def kib: if . == null then "-" else . / 1024 | f(2) end;
        def ms: if . == null then null else . / 1000 end;
        (reduce inputs as $r ({}; . + {(input_filename | split("/") | last | rtrimstr(".json")): $r}))
        | .floor as $fl | .fanout as $fo | .["p2p-unloaded"] as $u | .["p2p-rate"] as $rt
        | .["p2p-flat"] as $fx | .["group-rate"] as $g | .["group-rate-2x"] as $g2
        | [
            {m: "broadcast to \($fo.receivers // "-") online: server CPU µs / delivery (floor: the writer)",
             cim: $fo.server_cpu_us_per_delivery, floor: $fl.broadcast.writer_cpu_us_per_delivery,
             d: 2, target: "≤ 1.1× floor"},
            {m: "broadcast to \($fo.receivers // "-") online: send → last receipt, median ms",
             cim: $fo.time_to_last_median_ms, floor: $fl.broadcast.time_to_last_median_ms,
             d: 1, target: "≤ 1.1× floor"},
            {m: "idle memory per TCP / WebSocket connection, KiB",
             cim: "\(.["memory-connect-tcp"].bytes_per_connection | kib) / \(.["memory-connect-ws"].bytes_per_connection | kib)",
             floor: null, d: 2, target: "≤ 1.0 / ≤ 2.0 KiB"},
            {m: "\($rt.pairs // "-") pairs at \($rt.target_rate // "-" | cell(0)) msg/s: CPU µs / msg (cim: cluster incl. Redis; floor: the relay)",
             cim: $rt.cpu_us_per_message, floor: $fl.relay.rate.relay_cpu_us_per_message,
             d: 1, target: "≤ 3× floor"},
            {m: "same load, one-way p50 ms", cim: $rt.latency.p50_ms,
             floor: ($fl.relay.rate.latency_us.p50 | ms), d: 3, target: "≤ 4× floor"},
            {m: "same load, one-way p99 ms", cim: $rt.latency.p99_ms,
             floor: ($fl.relay.rate.latency_us.p99 | ms), d: 3, target: "≤ 3× floor"},
            {m: "unloaded, 1 pair at \($u.target_rate // "-" | cell(0)) msg/s: one-way p50 ms",
             cim: $u.latency.p50_ms, floor: ($fl.relay.unloaded.latency_us.p50 | ms),
             d: 3, target: "≤ 3.5× floor"},
            {m: "unloaded: one-way p99 ms", cim: $u.latency.p99_ms,
             floor: ($fl.relay.unloaded.latency_us.p99 | ms), d: 3, target: "≤ 2× floor"},
            {m: "flat out, \($fx.pairs // "-") pairs, stored + acked (cim lost: \($fx.lost // "-")): msg/s",
             cim: $fx.throughput_per_sec, floor: $fl.relay.flat.throughput_per_sec,
             d: 0, target: "≥ 150,000 msg/s, 0 lost"},
            {m: "flat out: CPU µs / msg (cim: cluster incl. Redis; floor: the relay)",
             cim: $fx.cpu_us_per_message, floor: $fl.relay.flat.relay_cpu_us_per_message,
             d: 1, target: "≤ 9 µs"},
            {m: "Redis CPU µs per stored + acked private message (p2p-flat; floor: HSET + HDEL)",
             cim: (if $fx.cpu.redis_ms != null and ($fx.delivered // 0) > 0
                   then $fx.cpu.redis_ms * 1000 / $fx.delivered else null end),
             floor: $fl.redis.total.cpu_us_per_message, d: 2, target: "≤ 1.5× floor"},
            {m: "stored group, Redis CPU µs / msg: \($g2.members // "-") members (base: \($g.members // "-"))",
             cim: $g2.redis_us_per_message, floor: $g.redis_us_per_message,
             d: 1, target: "≈ 1× (independent of member count)"},
            {m: "stored group of \($g.members // "-"), \($g.online // "-") online: send → last receipt, median ms (base: fanout-500)",
             cim: $g.time_to_last_median_ms, floor: .["fanout-500"].time_to_last_median_ms,
             d: 1, target: "≤ 1.2× base"}
          ][]
        | . as $x
        | [$x.m, ($x.cim | cell($x.d)), ($x.floor | cell($x.d)),
           (if ($x.cim | type) == "number" and ($x.floor | type) == "number" and $x.floor != 0
            then "\($x.cim / $x.floor | f(2))×" else "-" end),
           $x.target]
        | row' "${files[@]+"${files[@]}"}" </dev/null
}

# The floor's own figures (floor.json), one row per scenario.
floor_table() {
    echo "| floor (cim-floor) | size | delivered / sent | msg/s | one-way p50 / p99 µs | CPU µs / msg |"
    echo "| --- | --- | ---: | ---: | ---: | --- |"
    jq -r "$jq_lib"'
        (.broadcast as $b
         | ["broadcast", "\($b.connections) connections × \($b.messages)",
            "\($b.deliveries) / \($b.expected_deliveries)", "-",
            "send → last receipt \($b.time_to_last_median_ms | f(1)) / max \($b.time_to_last_max_ms | f(1)) ms",
            "writer \($b.writer_cpu_us_per_delivery | f(2)) per delivery (clients \($b.clients_cpu_us_per_delivery | f(2)))"]
         | row),
        (.relay | to_entries[] | .key as $k | .value
         | ["relay \($k)", "\(.pairs) pair\(if .pairs == 1 then "" else "s" end), \(if .target_rate then "\(.target_rate | f(0)) msg/s" else "window \(.window)" end)",
            "\(.delivered) / \(.sent)", (.throughput_per_sec | f(0)),
            "\(.latency_us.p50 | f(0)) / \(.latency_us.p99 | f(0))",
            "relay \(.relay_cpu_us_per_message | f(2)), all \(.all_cpu_us_per_message | f(2))"]
         | row),
        (.redis as $r
         | ["redis \($r.redis_version)", "\($r.messages) messages, \($r.keys) keys, pipeline \($r.pipeline)",
            "-", ($r.total.messages_per_sec | f(0)), "-",
            "HSET \($r.hset.cpu_us_per_message | f(2)) + HDEL \($r.hdel.cpu_us_per_message | f(2)) = \($r.total.cpu_us_per_message | f(2)) (Redis)"]
         | row)' "$results/floor.json" 2>/dev/null ||
        echo "| floor | $(if [[ $run_floor == 0 ]]; then echo "skipped (BASELINE_FLOOR=0)"; else echo "failed: see floor.log"; fi) | | | | |"
}

# Starts servers 3..TOTAL of the 100k mode with cluster.sh's flags, and waits until the
# route counts them all.
start_extra_servers() {
    local total=$1 k name tcp ws internal
    local -a server_args=()
    read -r -a server_args <<<"${CIM_SRV_ARGS:-}"
    if [[ -n ${CIM_CLUSTER_SECRET:-} ]]; then
        export CIM_SERVER_CLUSTER_SECRET=$CIM_CLUSTER_SECRET
    fi
    for ((k = 2; k < total; k++)); do
        name=${extra_names[k - 2]}
        tcp=$((CIM_SRV_A_TCP + 10 * k))
        ws=$((CIM_SRV_A_WS + 10 * k))
        internal=$((CIM_SRV_A_INTERNAL + 10 * k))
        log "starting $name"
        echo "=== $(date -u +%FT%TZ) starting $name" >>"$run_dir/$name.log"
        RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 setsid "$bin_dir/cim-server" --name "$name" \
            --tcp-listen "$host:$tcp" --ws-listen "$host:$ws" --internal-listen "$host:$internal" \
            --redis-url "$redis_url" --etcd "$etcd_url" \
            --worker-threads "${CIM_WORKER_THREADS:-1}" "${server_args[@]}" \
            >>"$run_dir/$name.log" 2>&1 </dev/null &
        extra_pids+=("$!")
        echo "$!" >"$run_dir/$name.pid"
        server_internal+=("$host:$internal")
        server_pid_files+=("$run_dir/$name.pid")
    done
    local deadline=$((SECONDS + 60)) servers=
    while :; do
        servers=$(curl -fsS --max-time 2 "$route_url/healthz" | jq -r '.servers // 0') || servers=0
        ((servers < total)) || break
        ((SECONDS < deadline)) || die "the route sees $servers servers, not $total, after 60s"
        sleep 0.5
    done
}

# The benches measure the cluster flat out: a bench sender sends far more than a person, so
# the servers' per-connection send limit (send_rate_per_sec, 50/s by default) is off here.
export CIM_SERVER_SEND_RATE_PER_SEC=0

# Stops and starts the cluster (Redis and etcd keep their data in the run folder).
restart_cluster() {
    log "restarting the cluster"
    "$repo/deploy/cluster.sh" stop
    CIM_SKIP_BUILD=1 "$repo/deploy/cluster.sh" start >>"$results/cluster-start.txt"
}

# Raises this shell's open-file limit (inherited by the cluster and the benches) to NEED.
raise_fd_limit() {
    local need=$1
    if (($(ulimit -Hn) < need)); then
        ulimit -Hn "$need" 2>/dev/null ||
            die "the servers need $need open files, the hard limit is $(ulimit -Hn): run as root or raise it"
    fi
    ulimit -Sn "$(ulimit -Hn)"
}

# jq helpers of the summary: `f(d)` a number with d decimals or "-", `row` a table row.
jq_lib='
    def f(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
    def row: "| " + (map(tostring) | join(" | ")) + " |";
'

# One row per connect step; its processes ran in parallel, so counts and rates add up and
# the latency columns show the slowest process.
connect_row() {
    local step=$1
    jq -rs --slurpfile mem "$results/memory-$step.json" --arg step "$step" "$jq_lib"'
        ($mem[0].bytes_per_connection) as $b
        | ["\($step) (\(length) proc.)",
           "\(map(.connected) | add) / \(map(.requested) | add)",
           (map(.failed) | add), (map(.dropped) | add),
           (map(.connect_rate_per_sec // 0) | add | f(0)),
           "\(map(.connect_latency.p50_ms) | max | f(1)) / \(map(.connect_latency.p99_ms) | max | f(1))",
           "\(if $b == null then "-" else "\($b / 1024 | f(2)) KiB" end) (\($mem[0].connections) conn.)"]
        | row' "$results/$step"-[0-9]*.json 2>/dev/null ||
        echo "| $step | failed: see $step-*.log | | | | | |"
}

p2p_row() {
    local step=$1
    jq -r --arg step "$step" "$jq_lib"'
        ["\($step) (\(.pairs) pair\(if .pairs == 1 then "" else "s" end))",
         "\(.mode)\(if .target_rate then " \(.target_rate | f(0))/s" else "" end)",
         .sent, .delivered, .lost, (.throughput_per_sec | f(0)),
         "\(.latency.p50_ms | f(2)) / \(.latency.p99_ms | f(2)) / \(.latency.p999_ms | f(2)) / \(.latency.max_ms | f(1))",
         (.cpu_us_per_message | f(1))]
        | row' "$results/$step.json" 2>/dev/null ||
        echo "| $step | failed: see $step.log | | | | | | |"
}

fanout_row() {
    local step=${1:-fanout}
    jq -r --arg step "$step" "$jq_lib"'
        ["\($step) (\(.messages) messages)", .receivers,
         "\(.deliveries) / \(.expected_deliveries)", .missing,
         "\(.time_to_last_median_ms | f(1)) / \(.time_to_last_max_ms | f(1))",
         (.deliveries_per_sec | f(0)),
         "\(.cpu_us_per_delivery | f(2)) (\(.server_cpu_us_per_delivery | f(2)))"]
        | row' "$results/$step.json" 2>/dev/null ||
        echo "| $step | failed: see $step.log | | | | | |"
}

group_row() {
    local step=$1
    jq -r --arg step "$step" "$jq_lib"'
        ["\($step) (\(.messages) messages)", "\(.members) / \(.online)",
         "\(.load)\(if .target_rate then " \(.target_rate | f(0))/s" else "" end)",
         "\(.deliveries) / \(.expected_deliveries)", "\(.missing) / \(.repeated)",
         "\(.time_to_last_median_ms | f(1)) / \(.time_to_last_max_ms | f(1))",
         (.messages_per_sec | f(0)),
         "\(.cpu_us_per_message | f(0)) (\(.redis_us_per_message | f(1)))",
         "\(.catch_up.complete) / \(.catch_up.members) × \(.catch_up.messages_each): \(.catch_up.time_median_ms | f(1)) / \(.catch_up.time_max_ms | f(1)) ms, \(.catch_up.cpu_us_per_message | f(1)) µs (\(.catch_up.redis_us_per_message | f(1)))"]
        | row' "$results/$step.json" 2>/dev/null ||
        echo "| $step | failed: see $step.log | | | | | | | |"
}

# The fanout-100k processes as one row: a message's time to the last receipt is its latest
# receipt in any process; CPU from the sending process (its span covers every delivery).
fanout_big_row() {
    jq -rs "$jq_lib"'
        def median: sort | if length == 0 then null
            elif length % 2 == 1 then .[length / 2 | floor]
            else (.[length / 2 - 1] + .[length / 2]) / 2 end;
        (map(select(.role == "send")) | first) as $s
        | (map(.receivers) | add) as $receivers
        | (map(.deliveries) | add) as $deliveries
        | ($s.sent * $receivers) as $expected
        | ([.[].per_message[]] | group_by(.number)
            | map({sent: (map(.sent_unix_ns) | max), last: (map(.last_unix_ns) | max)})
            | map(select(.last > 0) | (.last - .sent) / 1e6)) as $t
        | ["fanout-100k (\($s.messages) messages, \(length) proc.)", $receivers,
           "\($deliveries) / \($expected)", ($expected - $deliveries),
           "\($t | median | f(1)) / \($t | max | f(1))",
           (if ($t | add // 0) > 0 then $deliveries / (($t | add) / 1000) else null end | f(0)),
           "\(if $deliveries > 0 then $s.cpu.total_ms * 1000 / $deliveries else null end | f(2)) (\(if $deliveries > 0 then $s.cpu.servers_ms * 1000 / $deliveries else null end | f(2)))"]
        | row' "$results"/fanout-100k-[0-9]*.json 2>/dev/null ||
        echo "| fanout-100k | failed: see fanout-100k-*.log | | | | | |"
}

# Writes summary.md and baseline.json from the step results, and prints the summary.
summary() {
    local out=$results/summary.md step commit cpu dirty=
    commit=$(git -C "$repo" rev-parse HEAD 2>/dev/null) || commit=unknown
    git -C "$repo" diff --quiet HEAD 2>/dev/null || dirty=" (with local changes)"
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    {
        echo "# cim baseline, $started_at"
        echo
        echo "$(nproc) cores ($cpu), Linux $(uname -r), commit ${commit:0:12}$dirty;" \
            "took $((SECONDS - started_secs)) s."
        echo
        if [[ $mode_100k == 1 ]]; then
            echo "| connections | open | failed | dropped | connect rate /s | connect p50 / p99 ms | server memory / connection |"
            echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            connect_row connect-100k
            echo
            echo "| group fan-out | receivers | deliveries / expected | missing | send → last receipt, median / max ms | deliveries/s | CPU µs / delivery (servers') |"
            echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            fanout_big_row
        else
            ratio_table
            echo
            floor_table
            echo
            echo "| connections | open | failed | dropped | connect rate /s | connect p50 / p99 ms | server memory / connection |"
            echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            connect_row connect-tcp
            connect_row connect-ws
            echo
            echo "| private messages | mode | sent | delivered | lost | msg/s | p50 / p99 / p99.9 / max ms | CPU µs / msg |"
            echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            for step in p2p-unloaded p2p-rate p2p-flat; do
                p2p_row "$step"
            done
            echo
            echo "| group fan-out | receivers | deliveries / expected | missing | send → last receipt, median / max ms | deliveries/s | CPU µs / delivery (servers') |"
            echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            fanout_row
            fanout_row fanout-500
            echo
            echo "| stored group | members / online | load | deliveries / expected | missing / repeated | send → last online receipt, median / max ms | msg/s | CPU µs / msg (Redis) | catch-up: members × messages, median / max, CPU µs / msg (Redis) |"
            echo "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"
            for step in group-rate group-rate-2x group-flat; do
                group_row "$step"
            done
            echo
            echo "Redis: $redis_url"
            echo
            echo "| Redis per step | nodes | commands | command time ms | share of each node |"
            echo "| --- | ---: | ---: | ---: | --- |"
            for step in p2p-unloaded p2p-rate p2p-flat fanout group-rate group-rate-2x group-flat; do
                redis_split_row "$step"
            done
        fi
        if [[ ${#failed_steps[@]} -gt 0 ]]; then
            echo
            echo "Failed: ${failed_steps[*]} (see their .log files)."
        fi
    } >"$out"

    # Everything in one file for tools: every report and memory reading under its file name.
    local -a parts=()
    local file
    for file in "$results"/*.json; do
        [[ ${file##*/} == baseline.json ]] || parts+=("$file")
    done
    jq -n --arg started "$started_at" --argjson secs $((SECONDS - started_secs)) \
        --arg commit "$commit" --argjson cores "$(nproc)" --arg kernel "$(uname -r)" \
        --arg failed "${failed_steps[*]+"${failed_steps[*]}"}" '{
            started: $started, duration_secs: $secs, commit: $commit, cores: $cores,
            kernel: $kernel, failed: ($failed | split(" ") | map(select(. != ""))),
            results: (reduce inputs as $r ({};
                . + {(input_filename | split("/") | last | rtrimstr(".json")): $r}))
        }' "${parts[@]+"${parts[@]}"}" >"$results/baseline.json" </dev/null
    cat "$out"
}

main() {
    "$repo/deploy/install-deps.sh" curl=curl jq=jq setsid=util-linux timeout=coreutils \
        redis-cli=redis-tools

    if [[ ${BASELINE_SKIP_BUILD:-} != 1 ]]; then
        log "building: cargo build --release (cim-server, cim-route, cim-bench, cim-floor)"
        (cd "$repo" && cargo build --release -p cim-server -p cim-route -p cim-bench \
            -p cim-floor --bin cim-server --bin cim-route --bin cim-bench --bin cim-floor)
    fi
    [[ -x $bench ]] || die "$bench is missing (build failed?)"
    if [[ $mode_100k != 1 && $run_floor != 0 ]]; then
        [[ -x $floor ]] || die "$floor is missing (build failed?)"
    fi

    if [[ $mode_100k == 1 ]]; then
        ((big_servers >= 2 && big_servers <= 8)) || die "BASELINE_100K_SERVERS must be 2 to 8"
        # A server's share, plus its listeners, Redis, etcd and internal HTTP connections.
        raise_fd_limit $((big_connections / big_servers + 1024))
    else
        raise_fd_limit 20000
    fi

    rm -rf "$results"
    mkdir -p "$results"
    local status=0
    "$repo/deploy/cluster.sh" status >/dev/null 2>&1 || status=$?
    ((status == 3)) || die "a cluster already runs in $run_dir: stop it with CIM_RUN_DIR=$run_dir deploy/cluster.sh stop"
    if [[ $mode_100k != 1 && $run_floor != 0 ]]; then
        floor_step
    fi
    cluster_owned=true
    CIM_SKIP_BUILD=1 "$repo/deploy/cluster.sh" start >"$results/cluster-start.txt"
    server_internal=("$host:$CIM_SRV_A_INTERNAL" "$host:$CIM_SRV_B_INTERNAL")
    server_pid_files=("$run_dir/server-a.pid" "$run_dir/server-b.pid")

    if [[ $mode_100k == 1 ]]; then
        start_extra_servers "$big_servers"
        connect_step connect-100k tcp "$big_connections" "$big_processes" 1000000 "$big_hold" \
            "$big_rate"
        fanout_big_step "$big_connections" "$big_processes" 1200000
    else
        connect_step connect-tcp tcp "$tcp_connections" 2 0 "$hold" "$connect_rate"
        # Fresh servers for the WebSocket figure: memory the TCP step freed stays with the
        # allocator, and reusing it would make WebSocket connections look free.
        restart_cluster
        connect_step connect-ws ws "$ws_connections" 2 100000 "$hold" "$connect_rate"
        local d
        d=$(secs_of "$p2p_duration")
        bench_step p2p-unloaded $((d + 120)) p2p --pairs 1 --rate "$p2p_unloaded_rate" \
            --duration "$p2p_duration" --user-offset 200000
        bench_step p2p-rate $((d + 120)) p2p --pairs "$p2p_pairs" --rate "$p2p_rate" \
            --duration "$p2p_duration" --user-offset 210000
        bench_step p2p-flat $((d + 120)) p2p --pairs "$p2p_flat_pairs" --flat-out \
            --duration "$p2p_duration" --user-offset 220000
        bench_step fanout \
            $(($(secs_of "$fanout_interval") * fanout_count + fanout_receivers / connect_rate + 120)) \
            fanout --receivers "$fanout_receivers" --interval "$fanout_interval" \
            --count "$fanout_count" --user-offset 300000
        bench_step fanout-500 $((group_online / connect_rate + 120)) \
            fanout --receivers "$group_online" --interval 200ms --count 20 --user-offset 320000
        local g=(--online "$group_online" --catch-up "$group_catch_up")
        bench_step group-rate $((group_count / group_rate + 180)) \
            group --members "$group_members" "${g[@]}" --rate "$group_rate" \
            --count "$group_count" --user-offset 400000
        bench_step group-rate-2x $((group_count / group_rate + 180)) \
            group --members $((2 * group_members)) "${g[@]}" --rate "$group_rate" \
            --count "$group_count" --user-offset 410000
        bench_step group-flat 300 \
            group --members "$group_members" "${g[@]}" --flat-out \
            --count "$group_flat_count" --user-offset 420000
    fi
    wait_idle
    summary
    log "done in $((SECONDS - started_secs)) s; results in $results"
    if [[ ${#failed_steps[@]} -gt 0 ]]; then
        die "failed steps: ${failed_steps[*]}"
    fi
}

main "$@"
