#!/usr/bin/env bash
# eoq and its peers side by side, in one run, on one throwaway PostgreSQL 15 that this script starts and
# stops itself (initdb defaults except max_connections=200; fsync and synchronous_commit on).
# Two groups of steps:
#   main:    pgbench row-work ceilings (before and after everything else), graphile-worker 0.18 (defaults
#            and tuned), pg-boss 12 (tuned), eoq (WorkerOptions defaults and tuned), the libpq idle-latency
#            floor, and the libpq bulk-submit floor, alternated with eoq's keyed bulk submit.
#   effects: "handlers that write", each task's handler inserting one row: the pgbench ceiling of that
#            transaction (BEGIN; INSERT; UPDATE; COMMIT) with 8 and with 4 clients (before and after the
#            drains), graphile-worker and pg-boss draining jobs whose handler inserts, and eoq's no-op,
#            per-task and batch drains (bench/bench_effects), each with ctx.exec and with ctx.send.
# Prints a markdown table of every figure and a table of the ratios the project tracks. See README.md here.
#
# Usage: bench/peers/side-by-side.sh [BUILD_DIR=build/release]
#   BUILD_DIR holds the eoq build (its bench/throughput for main, bench/bench_effects for effects);
#   relative paths are tried from the current directory, then from the repository root.
# Env: STEPS (all) which groups run: all, main or effects (STEPS=effects takes about a minute);
#      N (50000) tasks per system in main; FX_N (20000) tasks per effect drain; SECS (10) per timed pgbench
#      run; LAT (1000) idle-latency samples of eoq and of the latency floor; SAMPLES (50) idle-latency
#      samples of the node peers; BULK_ROUNDS (6) alternated pairs of eoq's keyed bulk submit and the bulk
#      floor; STEP_TIMEOUT (1200 s) per step; PG_BIN (/usr/lib/postgresql/15/bin); PGPORT (55432, first
#      port tried); EOQ_PEERS_NODE_DIR (${TMPDIR:-/tmp}/eoq-bench-peers-node) where the npm packages go.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
[[ -d $PG_BIN ]] && export PATH="$PG_BIN:$PATH"  # its psql and pgbench, not another version's

die() { echo "side-by-side: $*" >&2; exit 1; }

# --- the steps (run as `side-by-side.sh --step-... URL ...` under a timeout; each prints TSV rows:
#     system, config, drain/s, single submit/s, bulk submit/s, idle p50 ms, p99 or p90 ms, max ms) ---

# Row-work ceiling of a claim+complete queue with no queue logic: pgbench -M prepared -c 8 -j 2.
#   single: per task, one single-row UPDATE commit (claim) and one (complete), SECS seconds
#   batch:  the same with 100 rows per statement by id range, so 2 commits per 100 tasks, SECS seconds
#   skip:   queue-shaped batch-100: claim with a FOR UPDATE SKIP LOCKED CTE, complete with id = ANY(...);
#           drains a 1M-row table (a fixed amount of work)
step_pgbench() {
  local d=$1 url=$2 secs=$3 rows=1000000
  psql -qX -v ON_ERROR_STOP=1 "$url" >/dev/null <<SQL
SET client_min_messages = warning;
DROP TABLE IF EXISTS ceiling, q;
CREATE TABLE ceiling (id bigint PRIMARY KEY, status int NOT NULL DEFAULT 0, v bigint NOT NULL DEFAULT 0,
  payload jsonb NOT NULL DEFAULT '{}', lease_until timestamptz);
INSERT INTO ceiling (id) SELECT g FROM generate_series(1, $rows) g;
CREATE TABLE q (LIKE ceiling INCLUDING ALL);
INSERT INTO q (id) SELECT g FROM generate_series(1, $rows) g;
CREATE INDEX q_pending ON q (id) WHERE status = 0;
VACUUM ANALYZE ceiling, q;
SQL
  cat >"$d/single.sql" <<SQL
\set id random(1, $rows)
UPDATE ceiling SET status = 1, v = v + 1, lease_until = now() + interval '30 s' WHERE id = :id;
UPDATE ceiling SET status = 2, v = v + 1, lease_until = NULL WHERE id = :id;
SQL
  cat >"$d/batch.sql" <<SQL
\set s random(0, $rows / 100 - 1)
UPDATE ceiling SET status = 1, v = v + 1, lease_until = now() + interval '30 s' WHERE id BETWEEN :s * 100 + 1 AND :s * 100 + 100;
UPDATE ceiling SET status = 2, v = v + 1, lease_until = NULL WHERE id BETWEEN :s * 100 + 1 AND :s * 100 + 100;
SQL
  cat >"$d/skip.sql" <<'SQL'
WITH c AS (SELECT id FROM q WHERE status = 0 ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED),
     u AS (UPDATE q SET status = 1, v = v + 1, lease_until = now() + interval '30 s' FROM c WHERE q.id = c.id RETURNING q.id)
SELECT array_agg(id) AS ids FROM u \gset
UPDATE q SET status = 2, v = v + 1, lease_until = NULL WHERE id = ANY(:ids::bigint[]);
SQL
  tps() {
    psql -qX -v ON_ERROR_STOP=1 -c CHECKPOINT "$url" >/dev/null
    pgbench -n -M prepared -c 8 -j 2 "$@" "$url" >"$d/pgbench.out" 2>&1 || { cat "$d/pgbench.out" >&2; return 1; }
    sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$d/pgbench.out" | grep . || { cat "$d/pgbench.out" >&2; return 1; }
  }
  local single batch skip drained
  single=$(tps -T "$secs" -f "$d/single.sql")
  batch=$(tps -T "$secs" -f "$d/batch.sql")
  skip=$(tps -t $((rows / 100 / 8)) -f "$d/skip.sql")
  drained=$(psql -qXAt -c "SELECT count(*) FROM q WHERE status = 2" "$url")
  awk -v s="$single" -v b="$batch" -v k="$skip" -v done="$drained" -v txns=$((rows / 100)) 'BEGIN {
    printf "pgbench ceiling\tsingle-row, 2 commits per task (%.0f commits/s)\t%.0f\n", 2 * s, s
    printf "pgbench ceiling\tbatch-100 by id range, 2 commits per 100 tasks\t%.0f\n", 100 * b
    printf "pgbench ceiling\tbatch-100 SKIP LOCKED claim + ANY() complete, drains 1M rows\t%.0f\n", done * k / txns }'
}

# eoq through the project's own harness, its ceiling phases cut short (the ceilings here come from pgbench)
# and its growth phase off. Reads the harness's table rows by their labels.
step_eoq() {
  local url=$1 bin=$2 n=$3 lat=$4 mode=$5 config out
  local args=(--tasks "$n" --latency-tasks "$lat" --ceiling-seconds 1 --growth 0 --bulk-batch 10000)
  if [[ $mode == defaults ]]; then
    config="WorkerOptions defaults (queues aside)"; args+=(--defaults)
  else
    config="8 threads, claim batch 1000, adaptive look-ahead"; args+=(--concurrency 8 --claim-batch 1000)
  fi
  out=$(EOQ_BENCH_DATABASE_URL=$url "$bin" "${args[@]}" 2>&1) || { echo "$out" >&2; return 1; }
  numbers() {  # the numbers in the value column of the row whose label starts with $1, one a line
    local v
    v=$(awk -F'|' -v l="$1" 'index($2, " " l) == 1 { print $3; exit }' <<<"$out" | grep -oE '[0-9]+([.][0-9]+)?') ||
      { echo "no figure in a row \"$1\" of bench/throughput's output:" >&2; echo "$out" >&2; return 1; }
    echo "$v"
  }
  local drain single bulk lat
  drain=$(numbers 'eoq drain, empty history' | head -1)
  single=$(numbers 'eoq submit, one at a time' | head -1)
  bulk=$(numbers 'eoq submit_batch' | head -1)
  mapfile -t lat < <(numbers 'idle submit-to-start')  # p50 / p99 / p99.9 / max
  ((${#lat[@]} == 4)) || { echo "cannot read p50 / p99 / p99.9 / max from bench/throughput:" >&2; echo "$out" >&2; return 1; }
  printf 'eoq\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$config" "$drain" "$single" "$bulk" "${lat[0]}" "${lat[1]}" "${lat[3]}"
}

# Keyed bulk submit and the bulk floor, alternated ROUNDS times (floor first in odd rounds, eoq first in
# even ones), each on fresh tables and after a CHECKPOINT (the floor checkpoints before each of its ways).
# One pass of either takes about half a second, and this machine's speed drifts by a third within
# minutes: a ratio of two figures taken a minute apart measured the drift as much as eoq. What ran just
# before matters too (eight pairs on one server, 2026-11-30: the floor read 114k on average after an eoq
# pass and 98k after one of its own), so an even number of rounds lets each follow each equally often.
step_bulk_pairs() {
  local url=$1 bin=$2 floor=$3 n=$4 rounds=$5 r out eoq copy nokeys
  drop_schemas() {
    psql -qX -v ON_ERROR_STOP=1 "$url" >/dev/null <<'SQL'
SET client_min_messages = warning;
DO $$ DECLARE s text; BEGIN
  FOR s IN SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench\_tp\_%' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s);
  END LOOP;
END $$;
CHECKPOINT;
SQL
  }
  run_floor() {
    out=$("$floor" "$url" "$n" 10000) || return 1
    copy=$(awk -F'\t' 'index($2, "COPY") && index($2, "with keys") { print $5 }' <<<"$out")
    nokeys=$(awk -F'\t' 'index($2, "COPY") && index($2, "no keys") { print $5 }' <<<"$out")
  }
  run_eoq() {
    drop_schemas || return 1
    out=$(EOQ_BENCH_DATABASE_URL=$url "$bin" --bulk-only --tasks "$n" --bulk-batch 10000 2>&1) ||
      { echo "$out" >&2; return 1; }
    eoq=$(awk -F'|' 'index($2, " eoq submit_batch") == 1 { print $3 }' <<<"$out" | grep -oE '^ *[0-9]+' | xargs)
  }
  for ((r = 1; r <= rounds; r++)); do
    if ((r % 2)); then run_floor && run_eoq; else run_eoq && run_floor; fi || return 1
    [[ -n $eoq && -n $copy && -n $nokeys ]] ||
      { echo "bulk pair $r: a figure is missing; the last output read:" >&2; echo "$out" >&2; return 1; }
    printf 'bulk pair %d\teoq submit_batch, keyed, batch of 10000\t-\t-\t%s\n' "$r" "$eoq"
    printf 'bulk pair %d\tfloor: COPY to stage + INSERT...SELECT, with keys table\t-\t-\t%s\n' "$r" "$copy"
    printf 'bulk pair %d\tfloor: COPY to stage + INSERT...SELECT, no keys\t-\t-\t%s\n' "$r" "$nokeys"
  done
  drop_schemas
}

# A node peer: its driver, copied next to the installed packages so that its imports resolve.
step_node() {
  local dir=$1 script=$2; shift 2
  cd "$dir" && exec node "$script" "$@"
}

# The physical ceiling of "a handler writes one row": pgbench -M prepared -j 2 running only the least
# transaction such a task needs, with no queue logic: BEGIN; INSERT the effect; UPDATE the task row;
# COMMIT (/work/shared/peers/effect-ceiling.sh), SECS seconds, once per client count given, each on fresh
# tables (200,000 task rows) after VACUUM ANALYZE and a CHECKPOINT. A transaction is a task, so tps is
# tasks/s.
step_effect_ceiling() {
  local d=$1 url=$2 secs=$3 rows=200000 c tps; shift 3
  cat >"$d/effect.sql" <<SQL
\set id random(1, $rows)
BEGIN;
INSERT INTO fx_effects (task_id, who) VALUES (:id, 'x');
UPDATE fx_tasks SET status = 'succeeded', version = version + 1 WHERE id = :id;
COMMIT;
SQL
  for c in "$@"; do
    psql -qX -v ON_ERROR_STOP=1 "$url" >/dev/null <<SQL
SET client_min_messages = warning;
DROP TABLE IF EXISTS fx_tasks, fx_effects;
CREATE TABLE fx_tasks (id bigint PRIMARY KEY, status text NOT NULL, version int NOT NULL, payload jsonb);
INSERT INTO fx_tasks SELECT g, 'running', 0, '{}' FROM generate_series(1, $rows) g;
CREATE TABLE fx_effects (task_id bigint NOT NULL, who text NOT NULL);
VACUUM ANALYZE fx_tasks, fx_effects;
CHECKPOINT;
SQL
    pgbench -n -M prepared -c "$c" -j 2 -T "$secs" -f "$d/effect.sql" "$url" >"$d/pgbench.out" 2>&1 ||
      { cat "$d/pgbench.out" >&2; return 1; }
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$d/pgbench.out" | grep .) || { cat "$d/pgbench.out" >&2; return 1; }
    printf 'pgbench effect ceiling\tBEGIN; INSERT effect; UPDATE task; COMMIT, %d clients\t%.0f\n' "$c" "$tps"
  done
  psql -qX -c "DROP TABLE fx_tasks, fx_effects" "$url" >/dev/null
}

# eoq's drains of tasks whose handler writes, one mode per call of bench/bench_effects (so each drains on a
# freshly migrated schema): noop, per-task (WorkerOptions{}; the handler's ctx.exec(INSERT) commits with
# the task's completion) or batch (the same with HandlerOptions{.batch = 100}: one commit per batch).
# bench_effects checks each drain itself (every task succeeded once, one effect row each).
step_eoq_effects() {
  local url=$1 bin=$2 n=$3 mode=$4 label config out v send=()
  case $mode in
    noop) label='eoq no-op handler' config='no-op handler, WorkerOptions{}' ;;
    per-task) label='eoq per-task' config='effects: ctx.exec(INSERT), committed with the completion, WorkerOptions{}' ;;
    batch) label='eoq HandlerOptions' config='effects: ctx.exec(INSERT), HandlerOptions{.batch = 100}: one commit per batch, WorkerOptions{}' ;;
    per-task-send) label='eoq per-task' mode=per-task send=(--send)
      config='effects: ctx.send(INSERT) (not waited for: one round trip with the COMMIT), WorkerOptions{}' ;;
    batch-send) label='eoq HandlerOptions' mode=batch send=(--send)
      config='effects: ctx.send(INSERT), HandlerOptions{.batch = 100}: a batch in one round trip, WorkerOptions{}' ;;
    *) echo "step_eoq_effects: unknown mode $mode" >&2; return 1 ;;
  esac
  out=$(EOQ_BENCH_DATABASE_URL=$url "$bin" --tasks "$n" --modes "$mode" --batch 100 "${send[@]}" 2>&1) || { echo "$out" >&2; return 1; }
  v=$(awk -F'|' -v l="$label" 'index($2, " " l) == 1 { print $3; exit }' <<<"$out" | grep -oE '[0-9]+([.][0-9]+)?' | head -1) ||
    { echo "no figure in a row \"$label\" of bench_effects' output:" >&2; echo "$out" >&2; return 1; }
  printf 'eoq\t%s\t%s\n' "$config" "$v"
}

case ${1:-} in
  --step-pgbench) shift; step_pgbench "$@"; exit ;;
  --step-effect-ceiling) shift; step_effect_ceiling "$@"; exit ;;
  --step-eoq-effects) shift; step_eoq_effects "$@"; exit ;;
  --step-eoq) shift; step_eoq "$@"; exit ;;
  --step-bulk-pairs) shift; step_bulk_pairs "$@"; exit ;;
  --step-node) shift; step_node "$@"; exit ;;
  -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --*) die "unknown option $1 (see --help)" ;;
esac

# --- what this needs ---------------------------------------------------------------------------------------

N=${N:-50000} SECS=${SECS:-10} LAT=${LAT:-1000} SAMPLES=${SAMPLES:-50} STEP_TIMEOUT=${STEP_TIMEOUT:-1200}
BULK_ROUNDS=${BULK_ROUNDS:-6} FX_N=${FX_N:-20000} STEPS=${STEPS:-all}
for v in N SECS LAT SAMPLES STEP_TIMEOUT BULK_ROUNDS FX_N; do [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer"; done
case $STEPS in
  all) run_main=1 run_fx=1 ;;
  main) run_main=1 run_fx=0 ;;
  effects) run_main=0 run_fx=1 ;;
  *) die "STEPS must be all, main or effects, not $STEPS" ;;
esac

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (Debian: apt-get install $2)"); }
need node nodejs
need npm npm
need psql postgresql-client-15
need pgbench postgresql-15
((run_main)) && need gcc gcc  # the floor programs
need timeout coreutils
need flock util-linux
for b in initdb pg_ctl postgres; do
  [[ -x $PG_BIN/$b ]] || missing+=("$PG_BIN/$b (Debian: apt-get install postgresql-15, or set PG_BIN)")
done
pq_include=$(pg_config --includedir 2>/dev/null || echo /usr/include/postgresql)
((run_main)) && [[ ! -f $pq_include/libpq-fe.h ]] && missing+=("libpq-fe.h (Debian: apt-get install libpq-dev)")
if ((${#missing[@]})); then
  printf 'side-by-side: missing:\n' >&2; printf '  %s\n' "${missing[@]}" >&2; exit 2
fi

build_arg=${1:-build/release}
if [[ -d $build_arg ]]; then build=$(cd "$build_arg" && pwd)
elif [[ -d $repo/$build_arg ]]; then build=$(cd "$repo/$build_arg" && pwd)
else die "no build directory $build_arg; build eoq first, e.g. scripts/test (it builds build/release)"; fi
throughput=$build/bench/throughput effects=$build/bench/bench_effects
if ((run_main)); then
  [[ -x $throughput ]] || die "no $throughput: build eoq first, e.g. scripts/test (it builds build/release)"
  "$throughput" --help 2>/dev/null | grep -q -- --defaults ||
    die "$throughput has no --defaults option; rebuild it from this checkout"
fi
if ((run_fx)); then
  [[ -x $effects ]] ||
    die "no $effects: build it first, e.g. cmake --build $build --target bench_effects (or STEPS=main)"
  "$effects" --help 2>/dev/null | grep -q -- --modes ||
    die "$effects has no --modes option; rebuild it from this checkout"
fi

# --- scratch space and the throwaway server ----------------------------------------------------------------

if ((EUID == 0)); then
  id postgres >/dev/null 2>&1 || die "running as root needs a postgres user (Debian's postgresql-15 creates it)"
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi
self=("$BASH" "$here/$(basename "${BASH_SOURCE[0]}")")
work=$(mktemp -d "${TMPDIR:-/tmp}/eoq-side-by-side.XXXXXX")
pgroot=$work/pg pgdata=$work/pg/data pglog=$work/pg/log
step_pid=  # the process group of the step under way

cleanup() {
  local rc=$?
  [[ -n $step_pid ]] && kill -TERM -- "-$step_pid" 2>/dev/null
  if [[ -f $pgdata/postmaster.pid ]]; then
    if ! as_pg "$PG_BIN/pg_ctl" -D "$pgdata" -m fast -w -t 60 stop >/dev/null 2>&1; then
      local pid
      pid=$(head -1 "$pgdata/postmaster.pid" 2>/dev/null || true)
      if [[ $pid =~ ^[0-9]+$ ]]; then kill -QUIT "$pid" 2>/dev/null || true; fi
    fi
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
chmod 755 "$work"  # the postgres user must reach its data directory inside
mkdir -p "$pgroot"
((EUID == 0)) && chown postgres "$pgroot"

as_pg "$PG_BIN/initdb" -D "$pgdata" -A trust -U postgres >"$work/initdb.log" 2>&1 ||
  { cat "$work/initdb.log" >&2; die "initdb failed"; }
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=${PGPORT:-55432} url=
for ((try = 0; try < 50; try++, port++)); do
  port_in_use "$port" && continue
  if as_pg "$PG_BIN/pg_ctl" -D "$pgdata" -l "$pglog" -w -t 120 start -o "-p $port -k $pgroot \
      -c listen_addresses=127.0.0.1 -c max_connections=200 -c synchronous_commit=on" >/dev/null 2>&1; then
    url="postgresql://postgres@127.0.0.1:$port/postgres"
    break
  fi
  grep -qi 'could not bind\|address already in use\|could not create any TCP/IP sockets' "$pglog" 2>/dev/null ||
    { cat "$pglog" >&2; die "the PostgreSQL server did not start"; }
done
[[ -n $url ]] || { cat "$pglog" >&2; die "no free port from ${PGPORT:-55432} on"; }

# Between steps: drop everything the last one made (schemas and tables), then checkpoint, so that no step
# pays for another's leftovers (autovacuum, dirty buffers).
reset_db() {
  psql -qX -v ON_ERROR_STOP=1 "$url" >/dev/null <<'SQL'
SET client_min_messages = warning;
DO $$ DECLARE s text; BEGIN
  FOR s IN SELECT nspname FROM pg_namespace
           WHERE nspname NOT IN ('public', 'information_schema') AND nspname NOT LIKE 'pg\_%' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', s);
  END LOOP;
END $$;
DROP SCHEMA public CASCADE;
CREATE SCHEMA public;
CHECKPOINT;
SQL
}

# --- the node peers' packages, installed outside the repository, only when missing ------------------------

node_dir=${EOQ_PEERS_NODE_DIR:-${TMPDIR:-/tmp}/eoq-bench-peers-node}
mkdir -p "$node_dir"
pinned_installed() {
  node -e 'const d = process.argv[1], want = require(d + "/package.json").dependencies;
    for (const [p, v] of Object.entries(want))
      if (require(d + "/node_modules/" + p + "/package.json").version !== v) process.exit(1);' "$node_dir" 2>/dev/null
}
(
  flock 9
  if ! cmp -s "$here/package.json" "$node_dir/package.json" || ! pinned_installed; then
    echo "side-by-side: npm install graphile-worker, pg-boss, pg (bench/peers/package.json) into $node_dir" >&2
    cp "$here/package.json" "$here/package-lock.json" "$node_dir/"
    (cd "$node_dir" && npm install --no-audit --no-fund) >"$node_dir/npm.log" 2>&1 ||
      { cat "$node_dir/npm.log" >&2; die "npm install failed in $node_dir"; }
    pinned_installed || die "npm install in $node_dir did not install the pinned versions"
  fi
  cp "$here/graphile.mjs" "$here/pgboss.mjs" "$here/graphile_effects.mjs" "$here/pgboss_effects.mjs" "$node_dir/"
) 9>"$node_dir.lock"

# --- the floor programs ------------------------------------------------------------------------------

if ((run_main)); then
  gcc -O2 -Wall -o "$work/bulk_floor" "$here/bulk_floor.c" -I"$pq_include" -lpq >"$work/gcc.log" 2>&1 ||
    { cat "$work/gcc.log" >&2; die "building bench/peers/bulk_floor.c failed"; }
  gcc -O2 -Wall -pthread -o "$work/latency_floor" "$here/latency_floor.c" -I"$pq_include" -lpq >"$work/gcc.log" 2>&1 ||
    { cat "$work/gcc.log" >&2; die "building bench/peers/latency_floor.c failed"; }
fi

# --- the run ---------------------------------------------------------------------------------------------

rows=$work/rows.tsv
: >"$rows"
# step KEY TITLE COMMAND...: runs one step under the timeout; its rows go to $rows as KEY:1, KEY:2, ...
step() {
  local key=$1 title=$2 t0=$SECONDS rc=0; shift 2
  echo "side-by-side: $title ..." >&2
  # In the background and waited for, so that an interrupt reaches the trap at once; timeout makes the
  # step its own process group, which the trap (or timeout itself) ends as a whole.
  timeout -k 10 "$STEP_TIMEOUT" "$@" >"$work/step.out" 2>"$work/step.err" </dev/null &
  step_pid=$!
  wait "$step_pid" || rc=$?
  step_pid=
  if ((rc != 0)) || [[ ! -s $work/step.out ]]; then
    ((rc == 124)) && echo "side-by-side: $title: timed out after $STEP_TIMEOUT s" >&2
    echo "side-by-side: step \"$title\" failed (exit $rc); its output:" >&2
    cat "$work/step.out" "$work/step.err" >&2
    exit 1
  fi
  awk -v k="$key" '{ print k ":" NR "\t" $0 }' "$work/step.out" >>"$rows"
  echo "side-by-side: $title: done in $((SECONDS - t0)) s" >&2
  reset_db
}

ver() { node -p "require('$node_dir/node_modules/$1/package.json').version"; }
commit=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)
bins=()
((run_main)) && bins+=("$throughput")
((run_fx)) && bins+=("$effects")
echo "eoq side-by-side (STEPS=$STEPS), $(date -u '+%F %H:%M UTC'): eoq $commit (${bins[*]})"
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem/ {print $2}') GiB," \
  "$(. /etc/os-release && echo "$PRETTY_NAME")"
echo "versions: $(postgres --version), node $(node --version), graphile-worker $(ver graphile-worker)," \
  "pg-boss $(ver pg-boss), pg $(ver pg)"
echo "server: initdb defaults except max_connections=200 (fsync on, synchronous_commit on), 127.0.0.1:$port;" \
  "$( ((run_main)) && echo "N=$N no-op tasks per system; ")$( ((run_fx)) && echo "FX_N=$FX_N tasks per effect drain; ")pgbench -M prepared -j 2 -T $SECS"
echo

reset_db
if ((run_main)); then
  step pgb_before "pgbench ceilings (before)" "${self[@]}" --step-pgbench "$work" "$url" "$SECS"
  step gw_defaults "graphile-worker, defaults" "${self[@]}" --step-node "$node_dir" graphile.mjs "$url" "$N" 8 -1 "$SAMPLES"
  step gw_tuned "graphile-worker, tuned" "${self[@]}" --step-node "$node_dir" graphile.mjs "$url" "$N" 8 500 "$SAMPLES"
  step boss_tuned "pg-boss, tuned" "${self[@]}" --step-node "$node_dir" pgboss.mjs "$url" "$N" 500 8 1 "$SAMPLES"
  step eoq_defaults "eoq, WorkerOptions defaults" "${self[@]}" --step-eoq "$url" "$throughput" "$N" "$LAT" defaults
  step eoq_tuned "eoq, tuned" "${self[@]}" --step-eoq "$url" "$throughput" "$N" "$LAT" tuned
  # The idle latency a libpq submitter and listener reach with no queue logic: the machine's own pace for
  # the latency targets, which are in milliseconds, not ratios.
  step latency_floor "latency floor" "$work/latency_floor" "$url" "$LAT"
  step bulk_pairs "keyed bulk submit and the bulk floor, alternated" \
    "${self[@]}" --step-bulk-pairs "$url" "$throughput" "$work/bulk_floor" "$N" "$BULK_ROUNDS"
  step pgb_after "pgbench ceilings (after)" "${self[@]}" --step-pgbench "$work" "$url" "$SECS"
fi

# "Handlers that write": every task's handler inserts one row keyed by its task. The ceiling runs with 8
# clients (the peers' concurrency) and 4 (WorkerOptions{}.concurrency), before and after the drains.
if ((run_fx)); then
  step fx_ceiling_before "effect ceilings (before)" "${self[@]}" --step-effect-ceiling "$work" "$url" "$SECS" 8 4
  step fx_gw "graphile-worker, handlers that write" \
    "${self[@]}" --step-node "$node_dir" graphile_effects.mjs "$url" "$FX_N" 8 500
  step fx_boss "pg-boss, handlers that write" "${self[@]}" --step-node "$node_dir" pgboss_effects.mjs "$url" "$FX_N" 500 8 1
  step fx_eoq_noop "eoq, no-op drain (bench_effects)" "${self[@]}" --step-eoq-effects "$url" "$effects" "$FX_N" noop
  step fx_eoq_one "eoq, handlers that write, per task" "${self[@]}" --step-eoq-effects "$url" "$effects" "$FX_N" per-task
  step fx_eoq_batch "eoq, handlers that write, batch of 100" "${self[@]}" --step-eoq-effects "$url" "$effects" "$FX_N" batch
  step fx_eoq_one_send "eoq, handlers that write through ctx.send, per task" "${self[@]}" --step-eoq-effects "$url" "$effects" "$FX_N" per-task-send
  step fx_eoq_batch_send "eoq, handlers that write through ctx.send, batch of 100" "${self[@]}" --step-eoq-effects "$url" "$effects" "$FX_N" batch-send
  step fx_ceiling_after "effect ceilings (after)" "${self[@]}" --step-effect-ceiling "$work" "$url" "$SECS" 8 4
fi

# --- the tables ------------------------------------------------------------------------------------------

if ((run_main)); then
  echo "| system | config | drain tasks/s | single submit/s | bulk submit/s | idle start p50 ms | p99 (eoq) / p90 (peers) ms | max ms |"
  echo "|---|---|--:|--:|--:|--:|--:|--:|"
  awk -F'\t' '$1 !~ /^fx_/ { sys = $2; if ($1 ~ /_before:/) sys = sys " (before)"; if ($1 ~ /_after:/) sys = sys " (after)"
    printf "| %s | %s |", sys, $3
    for (i = 4; i <= 9; i++) printf " %s |", (i > NF || $i == "" ? "-" : $i); print "" }' "$rows"
  echo
fi
if ((run_fx)); then
  echo "| system (handlers that write one row, $FX_N tasks) | config | drain tasks/s (ceiling: tps) |"
  echo "|---|---|--:|"
  awk -F'\t' '$1 ~ /^fx_/ { sys = $2; if ($1 ~ /_before:/) sys = sys " (before)"; if ($1 ~ /_after:/) sys = sys " (after)"
    printf "| %s | %s | %s |\n", sys, $3, ($4 == "" ? "-" : $4) }' "$rows"
  echo
fi
awk -F'\t' -v rounds="$BULK_ROUNDS" -v main="$run_main" -v fx="$run_fx" '
  { v[$1 "/drain"] = $4; v[$1 "/bulk"] = $6; v[$1 "/p50"] = $7; v[$1 "/p99"] = $8 }
  function need(k) { if (!(k in v) || v[k] == "" || v[k] == "-" || v[k] + 0 <= 0) {
      print "side-by-side: no figure " k " for the ratios" > "/dev/stderr"; bad = 1; return 1 } return v[k] }
  function median(a,   i, j, t, b) {
    for (i = 1; i <= rounds; i++) b[i] = a[i]
    for (i = 2; i <= rounds; i++) for (j = i; j > 1 && b[j - 1] > b[j]; j--) { t = b[j]; b[j] = b[j - 1]; b[j - 1] = t }
    return rounds % 2 ? b[(rounds + 1) / 2] : (b[rounds / 2] + b[rounds / 2 + 1]) / 2 }
  function list(a,   i, s) { for (i = 1; i <= rounds; i++) s = s (i > 1 ? ", " : "") sprintf("%.2f", a[i]); return s }
  function row(name, r, target, how) {
    printf "| %s | %.2f | %s %.1f | %s |\n", name, r, how, target, ((how == "<=" ? r <= target : r >= target) ? "met" : "not met") }
  function ref(name, r) { printf "| %s | %.2f | | |\n", name, r }
  END {
    if (main) {
      gw = need("gw_tuned:1/drain"); ed = need("eoq_defaults:1/drain"); et = need("eoq_tuned:1/drain")
      cb = need("pgb_before:2/drain"); ca = need("pgb_after:2/drain")
      # Each pair of bulk runs gives a ratio; the median of them is the figure (see step_bulk_pairs).
      for (r = 1; r <= rounds; r++) {
        e = need("bulk_pairs:" (3 * r - 2) "/bulk"); k = need("bulk_pairs:" (3 * r - 1) "/bulk")
        nk = need("bulk_pairs:" (3 * r) "/bulk")
        rk[r] = e / k; rn[r] = e / nk
      }
      lp50 = need("eoq_defaults:1/p50"); lp99 = need("eoq_defaults:1/p99")
      fp50 = need("latency_floor:1/p50"); fp99 = need("latency_floor:1/p99")
    }
    if (fx) {
      # fx_ceiling_*:1 ran 8 clients, :2 ran 4 (WorkerOptions{}.concurrency).
      f4b = need("fx_ceiling_before:2/drain"); f4a = need("fx_ceiling_after:2/drain")
      fgw = need("fx_gw:1/drain"); fboss = need("fx_boss:1/drain")
      fnoop = need("fx_eoq_noop:1/drain"); fone = need("fx_eoq_one:1/drain"); fbatch = need("fx_eoq_batch:1/drain")
      fones = need("fx_eoq_one_send:1/drain"); fbatchs = need("fx_eoq_batch_send:1/drain")
    }
    if (bad) exit 1
    print "| ratio, same run | value | target (issue 13) | |"
    print "|---|--:|--:|---|"
    if (main) {
      ceil = (cb + ca) / 2
      row("eoq defaults drain / graphile-worker tuned drain", ed / gw, 1.0, ">=")
      row("eoq tuned drain / graphile-worker tuned drain", et / gw, 2.0, ">=")
      row(sprintf("eoq tuned drain / pgbench id-range batch-100 ceiling (mean of %.0f and %.0f)", cb, ca), et / ceil, 0.5, ">=")
      # On two cores the defaults (4 handler threads) often outrun 8: the best configuration is whichever drained faster.
      best = (ed > et ? ed : et); which = (ed > et ? "defaults" : "tuned")
      row(sprintf("eoq best drain (%s) / graphile-worker tuned drain", which), best / gw, 2.0, ">=")
      row(sprintf("eoq best drain (%s) / pgbench id-range batch-100 ceiling", which), best / ceil, 0.5, ">=")
      row(sprintf("eoq submit_batch, keyed tasks / COPY floor with keys (median of %d alternated pairs: %s)", rounds, list(rk)), median(rk), 0.9, ">=")
      ref("eoq submit_batch, keyed tasks / COPY floor without keys (no keys table: an upper bound; median of the pairs)", median(rn))
      row(sprintf("eoq defaults, idle submit-to-start p50, ms (the latency floor: %.2f)", fp50), lp50, 1.5, "<=")
      row(sprintf("eoq defaults, idle submit-to-start p99, ms (the latency floor: %.2f)", fp99), lp99, 5.0, "<=")
      ref("eoq defaults, idle submit-to-start p50 / the latency floor'"'"'s p50", lp50 / fp50)
    }
    if (fx) {
      f4 = (f4b + f4a) / 2
      # Targets of issue 30 (the target column names issue 13, for the rows above).
      row("handlers that write (issue 30): eoq per-task drain, ctx.exec / graphile-worker effect drain", fone / fgw, 1.0, ">=")
      row(sprintf("handlers that write (issue 30): eoq per-task drain, ctx.exec / pgbench effect ceiling, 4 clients (mean of %.0f and %.0f)", f4b, f4a), fone / f4, 0.8, ">=")
      row("handlers that write (issue 30): eoq batch-100 drain, ctx.exec / eoq no-op drain", fbatch / fnoop, 0.5, ">=")
      ref("handlers that write: eoq per-task drain, ctx.exec / pg-boss effect drain", fone / fboss)
      ref("handlers that write: eoq per-task drain, ctx.send / graphile-worker effect drain", fones / fgw)
      ref("handlers that write: eoq per-task drain, ctx.send / pgbench effect ceiling, 4 clients", fones / f4)
      ref("handlers that write: eoq batch-100 drain, ctx.exec / pgbench effect ceiling, 4 clients", fbatch / f4)
      ref("handlers that write: eoq batch-100 drain, ctx.send / eoq no-op drain", fbatchs / fnoop)
    }
  }' "$rows"
