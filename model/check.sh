#!/bin/sh
# Model-checks model/eoq.pml with spin: the safety properties and liveness of
# the protocol as implemented, then every mutant, which must be caught.
#
#   model/check.sh [work-dir]        (default: a fresh directory under ${TMPDIR:-/tmp})
#
# Environment: SPIN (default spin), CC (default cc), EOQ_MODEL_ONLY=name to run
# one run only (e.g. safety, liveness, no_version_guard).
# Prints one verdict line per run and exits non-zero on any unexpected result:
# a property violated by the real model, a mutant that is not caught, or a
# search that was not exhaustive.
set -u

MODEL_DIR=$(cd "$(dirname "$0")" && pwd)
MODEL=$MODEL_DIR/eoq.pml
SPIN=${SPIN:-spin}
CC=${CC:-cc}
ONLY=${EOQ_MODEL_ONLY:-}
if [ $# -ge 1 ]; then
  WORK=$1
  mkdir -p "$WORK" || exit 2
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/eoq-model.XXXXXX") || exit 2
fi

command -v "$SPIN" >/dev/null 2>&1 || { echo "check.sh: $SPIN not found (Debian package: spin)"; exit 2; }
command -v "$CC" >/dev/null 2>&1 || { echo "check.sh: C compiler $CC not found"; exit 2; }

# Exhaustive search: every state stored whole (no bitstate, no hash
# compaction), a depth bound far above the model's depth (about 700 steps).
# The safety run needs about 0.9 GB.
SAFETY_CC="-DSAFETY -DNOCLAIM"
SAFETY_RUN="-m2000000"
LIVE_CC="-DNFAIR=4"
LIVE_RUN="-m2000000 -a -f"

failures=0
runs=0

# run NAME KIND EXPECT PATTERN SPIN-DEFINES...
#   KIND: safety | safety_bfs (breadth-first: shortest counterexample) | liveness.
#   EXPECT: pass | fail.
#   PATTERN: for fail, text the error report must contain (grep -F).
run() {
  name=$1 kind=$2 expect=$3 pattern=$4
  shift 4
  [ -n "$ONLY" ] && [ "$ONLY" != "$name" ] && return 0
  runs=$((runs + 1))
  dir=$WORK/$name
  rm -rf "$dir"
  mkdir -p "$dir"
  case $kind in
    safety) ccflags=$SAFETY_CC panflags=$SAFETY_RUN ;;
    safety_bfs) ccflags="$SAFETY_CC -DBFS" panflags=$SAFETY_RUN ;;
    *) ccflags=$LIVE_CC panflags=$LIVE_RUN ;;
  esac
  defs="$*"
  cp "$MODEL" "$dir/eoq.pml" || exit 2
  start=$(date +%s)
  if ! (cd "$dir" && "$SPIN" $defs -a eoq.pml >spin.log 2>&1); then
    echo "FAIL $name: spin -a failed (see $dir/spin.log)"
    failures=$((failures + 1))
    return
  fi
  # shellcheck disable=SC2086
  if ! (cd "$dir" && "$CC" -O2 -w $ccflags -o pan pan.c >cc.log 2>&1); then
    echo "FAIL $name: compiling pan failed (see $dir/cc.log)"
    failures=$((failures + 1))
    return
  fi
  # shellcheck disable=SC2086
  (cd "$dir" && ./pan $panflags >pan.out 2>&1)
  end=$(date +%s)
  out=$dir/pan.out
  errors=$(sed -n 's/.*errors: \([0-9][0-9]*\).*/\1/p' "$out" | tail -n 1)
  states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' "$out" | tail -n 1)
  secs=$(sed -n 's/^pan: elapsed time \([0-9.e+]*\) seconds.*/\1/p' "$out" | tail -n 1)
  what="$kind, $defs"
  stats="${states:-?} states, ${errors:-?} errors, ${secs:-?} s search, $((end - start)) s total"
  if [ -z "$errors" ]; then
    echo "FAIL $name ($what): pan did not finish (see $out)"
    failures=$((failures + 1))
    return
  fi
  if [ "$expect" = pass ]; then
    if [ "$errors" != 0 ]; then
      (cd "$dir" && "$SPIN" $defs -t -p -g eoq.pml >trail.txt 2>&1)
      echo "FAIL $name ($what): property violated: $(grep -m1 -E 'assertion violated|acceptance cycle|invalid end state' "$out") -- trail in $dir/trail.txt"
      failures=$((failures + 1))
    elif grep -q -E 'max search depth too small|out of memory|Search not completed' "$out"; then
      echo "FAIL $name ($what): search not exhaustive (see $out)"
      failures=$((failures + 1))
    else
      echo "PASS $name ($what): $stats"
    fi
  else
    if [ "$errors" = 0 ]; then
      echo "FAIL $name ($what): mutant NOT caught, $stats"
      failures=$((failures + 1))
    elif ! grep -q -F "$pattern" "$out"; then
      echo "FAIL $name ($what): caught, but not by '$pattern': $(grep -m1 -E 'assertion violated|acceptance cycle|invalid end state' "$out")"
      failures=$((failures + 1))
    else
      (cd "$dir" && "$SPIN" $defs -t -p -g eoq.pml >trail.txt 2>&1)
      echo "PASS $name ($what): caught: $(grep -m1 -F "$pattern" "$out" | sed 's/^pan:[0-9]*: *//') -- $stats"
    fi
  fi
}

# The protocol as implemented: 3 workers, 2 tasks, max_attempts 3. Safety
# runs with deadlines (a superset: a deadline may also never pass); liveness
# without, since a passing deadline would end every task by itself.
run safety   safety   pass "" -DNW=3 -DNT=2 -DMAXATT=3 -DDEADLINES
run liveness liveness pass "" -DNW=3 -DNT=2 -DMAXATT=3 -DLIVENESS

# Mutants: each must produce a counterexample of the property it breaks.
run no_version_guard       safety   fail "cur_lease["             -DMUTANT_NO_VERSION_GUARD
run separate_effect_commit safety   fail "effects["               -DMUTANT_SEPARATE_EFFECT_COMMIT
run separate_effect_double safety   fail "effects[wt[me]]<=1"     -DMUTANT_SEPARATE_EFFECT_COMMIT -DAT_MOST_ONCE_ONLY
run reclaim_ignores_limit  safety   fail "attempts<=3"            -DMUTANT_RECLAIM_IGNORES_LIMIT
run cancel_any_status      safety   fail "final["                 -DMUTANT_CANCEL_ANY_STATUS
run submit_check_insert    safety_bfs fail "created["               -DMUTANT_SUBMIT_CHECK_THEN_INSERT
run no_reclaim             liveness fail "acceptance cycle"       -DMUTANT_NO_RECLAIM -DLIVENESS

if [ "$runs" = 0 ]; then
  echo "model check: no run named '$ONLY'"
  exit 2
fi
if [ "$failures" != 0 ]; then
  echo "model check: $failures of $runs runs FAILED (work dir $WORK)"
  exit 1
fi
echo "model check: all $runs runs as expected (work dir $WORK)"
exit 0
