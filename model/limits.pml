/* A partition's concurrency limit (migration 0010: limit_lock, limit_busy,
 * holds; queries.sql: claim_limited), checked by spin.
 *
 * Two workers, two tasks of one partition, a limit of 1. Leases expire at any
 * time while their task runs (time passing: lease_expires_at <= now()), a
 * worker may crash at any step (its lease is forgotten, an open settlement
 * rolls back), and every operation of a lease is fenced as in the store
 * (version = token and status = 'running'). What Postgres does is modelled
 * as it behaves under READ COMMITTED:
 *   - claim_limited takes the queue's advisory lock (limit_busy), then counts
 *     in a snapshot taken after it: it deletes the holds whose task no longer
 *     runs under a live lease and counts the rest; then, in the same
 *     statement, it leases a candidate (pending, or running under a lease that
 *     ran out) if the count leaves room, inserts its hold, and commits,
 *     releasing the lock. Between the count and the lease others may commit
 *     (a completion, a heartbeat, an expiry): the count is not atomic with the
 *     lease, only with the lock;
 *   - a completion is the handler transaction's fenced DELETE, which locks the
 *     row until COMMIT (a claim's FOR UPDATE SKIP LOCKED passes such a row
 *     over), then the COMMIT; the count sees only what committed;
 *   - a heartbeat (fenced, no look at the expiry) makes the lease live again,
 *     even after it ran out, if no claim took the task meanwhile.
 *
 * Property (assertion CHECK, after every step): at most LIMIT tasks of the
 * partition hold a live lease. A lease lives from its claim until its
 * settlement commits, its task is reclaimed, or it first runs out: the store's
 * contract, under which a slot held by a dead or stalled worker comes back
 * when its lease expires, by database time (ghost `lapsed`).
 *
 * Runs (check.sh):
 *   REVIVAL_COUNTS                 the property with a revived lease counted as live again: a
 *                                  counterexample, kept as the record of a known gap: a
 *                                  heartbeat after the expiry revives a lease whose place a
 *                                  claim has given away (its hold is gone), and both run
 * Mutants (each must be caught, by CHECK in the step named):
 *   MUTANT_FREE_BEFORE_COMMIT      the count takes a task whose completion is under way (row
 *                                  locked, not committed) as ended: a slot freed before its
 *                                  lease ends (@claim)
 *   MUTANT_COUNT_BEFORE_LOCK       the count is taken before the queue's lock (@claim)
 */

#ifndef LIMIT
#define LIMIT 1
#endif
#define NW 2
#define NT 2

#define PENDING 0
#define RUNNING 1
#define DONE    2
#define NONE    255

/* ------------------------------------------------------------- database */
byte status[NT];
bit  expired[NT];   /* lease_expires_at <= now() */
bit  locked[NT];    /* row locked by a completion not yet committed */
bit  hold[NT];      /* a row in eoq.holds */
byte qlock = 0;     /* the queue's advisory lock: 0 free, else worker + 1 */

/* ------------------------------------------------------------ the workers */
/* A worker's lease: its task (NONE: none) and whether a newer claim of that
 * task has fenced it off. Versions only grow, so every older token behaves
 * alike: one bit is enough. */
byte wt[NW];
bit  wstale[NW];
bit  wsettling[NW];  /* its completion's DELETE ran, COMMIT next */

/* ------------------------------------------------------- ghost variables */
bit lapsed[NT];      /* the current lease of t has run out at least once: it ended then */

#ifdef REVIVAL_COUNTS
#define LIVE(t) (status[t] == RUNNING && !expired[t])
#else
#define LIVE(t) (status[t] == RUNNING && !expired[t] && !lapsed[t])
#endif
#define CHECK assert(LIVE(0) + LIVE(1) <= LIMIT)

/* The lease of worker w still matches the row. */
#define FRESH(w) (!wstale[w] && status[wt[w]] == RUNNING)

/* What limit_busy deletes: a hold whose task no longer runs under a live lease
 * (lease_expires_at > now()), as the snapshot shows it. */
#ifdef MUTANT_FREE_BEFORE_COMMIT
#define DEAD(t) (hold[t] && !(status[t] == RUNNING && !expired[t] && !locked[t]))
#else
#define DEAD(t) (hold[t] && !(status[t] == RUNNING && !expired[t]))
#endif
#define COUNT(n) \
  atomic { \
    if :: DEAD(0) -> hold[0] = 0 :: else -> skip fi; \
    if :: DEAD(1) -> hold[1] = 0 :: else -> skip fi; \
    n = hold[0] + hold[1] \
  }

/* A task claim_limited may lease: pending, or running under a lease that ran
 * out, and not locked by a completion (SKIP LOCKED). */
#define CAND(t) (!locked[t] && (status[t] == PENDING || (status[t] == RUNNING && expired[t])))

proctype Worker(byte me) {
  byte n;
  byte t;
end_idle:
  do
  :: /* claim: limit_busy's lock and count, then the lease, its hold, COMMIT */
     wt[me] == NONE ->
#ifdef MUTANT_COUNT_BEFORE_LOCK
     COUNT(n);
     atomic { qlock == 0 -> qlock = me + 1 };
#else
     atomic { qlock == 0 -> qlock = me + 1 };
     COUNT(n);
#endif
     atomic {
       if
       :: n < LIMIT && CAND(0) -> t = 0
       :: n < LIMIT && CAND(1) -> t = 1
       :: else -> t = NONE
       fi;
       if
       :: t != NONE ->
          status[t] = RUNNING;
          expired[t] = 0;
          lapsed[t] = 0;
          hold[t] = 1;
          /* the version moves on: the other worker's lease of t is fenced off */
          if :: wt[1 - me] == t -> wstale[1 - me] = 1 :: else -> skip fi;
          wt[me] = t;
          wstale[me] = 0
       :: else -> skip
       fi;
       qlock = 0;
       n = 0;
       t = 0;
       CHECK /* @claim */
     }
  :: /* heartbeat: fenced; lease_expires_at = now() + lease, whether it had run out or not */
     wt[me] != NONE && !wsettling[me] ->
     atomic {
       if
       :: FRESH(me) && !locked[wt[me]] -> expired[wt[me]] = 0
       :: else -> skip
       fi;
       CHECK /* @heartbeat */
     }
  :: /* settle: the completion's fenced DELETE, the row locked until COMMIT; stale: LeaseLost */
     wt[me] != NONE && !wsettling[me] ->
     atomic {
       if
       :: FRESH(me) && !locked[wt[me]] -> locked[wt[me]] = 1; wsettling[me] = 1
       :: else -> wt[me] = NONE; wstale[me] = 0
       fi;
       CHECK
     }
  :: /* commit */
     wsettling[me] ->
     atomic {
       status[wt[me]] = DONE;
       locked[wt[me]] = 0;
       wsettling[me] = 0;
       wt[me] = NONE;
       wstale[me] = 0;
       CHECK
     }
  :: /* release: fenced, the task pending again */
     wt[me] != NONE && !wsettling[me] ->
     atomic {
       if
       :: FRESH(me) && !locked[wt[me]] -> status[wt[me]] = PENDING
       :: else -> skip
       fi;
       wt[me] = NONE;
       wstale[me] = 0;
       CHECK
     }
  :: /* crash: the lease is forgotten, an open settlement rolls back */
     wt[me] != NONE ->
     atomic {
       if
       :: wsettling[me] -> locked[wt[me]] = 0; wsettling[me] = 0
       :: else -> skip
       fi;
       wt[me] = NONE;
       wstale[me] = 0;
       CHECK
     }
  od
}

/* Time passing: a running task's lease runs out (at any moment: a heartbeat
 * that comes late is the same as none). */
proctype Env() {
end_idle:
  do
  :: /* expire */ atomic { status[0] == RUNNING && !expired[0] -> expired[0] = 1; lapsed[0] = 1; CHECK }
  :: /* expire */ atomic { status[1] == RUNNING && !expired[1] -> expired[1] = 1; lapsed[1] = 1; CHECK }
  od
}

init {
  atomic {
    wt[0] = NONE;
    wt[1] = NONE;
    run Worker(0);
    run Worker(1);
    run Env()
  }
}
