/*
 * eoq.pml -- a Promela model of eoq's task protocol as implemented in
 * src/postgres/postgres_store.cpp (the Sql struct and PgLeaseTransaction).
 * model/README.md maps every step below to the SQL statement it stands for.
 *
 * One atomic step = one SQL statement in its own transaction (or, for a
 * handler, its writes + eoq_complete + COMMIT, which commit as one). Every
 * statement locks the task rows it changes (FOR UPDATE [SKIP LOCKED], UPDATE,
 * DELETE) and READ COMMITTED re-checks its WHERE clause against the newest
 * row version, so on one task row statements take effect one after another:
 * atomic steps over shared variables are exactly that.
 *
 * Mutants (check.sh asserts that each one yields a counterexample):
 *   MUTANT_NO_VERSION_GUARD          eoq_complete without "version = $2"
 *   MUTANT_HEARTBEAT_NO_VERSION_GUARD  eoq_heartbeat without "version = $2"
 *   MUTANT_FAIL_NO_VERSION_GUARD     eoq_fail without "version = $2"
 *   MUTANT_RELEASE_NO_VERSION_GUARD  eoq_release without "version = $2"
 *   MUTANT_SEPARATE_EFFECT_COMMIT    the handler's writes commit on their own, then eoq_complete
 *   MUTANT_RECLAIM_IGNORES_LIMIT     eoq_claim re-leases a lost lease even with no attempts left
 *   MUTANT_CANCEL_ANY_STATUS         eoq_cancel settles every row that is not running
 *   MUTANT_SUBMIT_CHECK_THEN_INSERT  submit looks the key up, then inserts (two statements)
 *   MUTANT_NO_RECLAIM                eoq_claim takes pending rows only (liveness)
 *
 * Sizes (spin -DNAME=value): NW workers, NT tasks (2 or 3), MAXATT = max_attempts,
 * HB fenced heartbeats per lease, RELEASES releases in all. -DDEADLINES gives
 * every task a deadline that may pass at any time.
 */

#ifndef NW
#define NW 3
#endif
#ifndef NT
#define NT 2
#endif
#ifndef MAXATT
#define MAXATT 3
#endif
#ifndef HB
#define HB 1
#endif
#ifndef RELEASES
#define RELEASES 1
#endif

/* task status; NONE = no row yet (not submitted) */
#define NONE      0
#define PENDING   1
#define RUNNING   2
#define SUCCEEDED 3
#define FAILED    4
#define CANCELLED 5
#define EXPIRED   6
#define terminal(s) ((s) >= SUCCEEDED)

/* ------------------------------------------------------------- database */

typedef Row {
  byte status;
  byte version;        /* the fencing token */
  byte attempts;
  bit  cancel_req;     /* cancel_requested */
  bit  lease_expired;  /* lease_expires_at <= now() */
  bit  overdue;        /* deadline <= now() */
};
Row  row[NT];
bit  key_taken[NT];    /* eoq.keys: task t is submitted under key t */
byte effects[NT];      /* rows the handlers wrote to their effects table for task t */

/* ------------------------------------------------------------ the clients */
/*
 * The lease each worker holds, by worker slot 1..NW (token 0 = none). Worker
 * processes keep no state of their own, only these slots, so that:
 * - a step that hands out a new lease (or settles the task) can mark every
 *   older lease of that task STALE: the version only grows, so no older token
 *   can ever match again and all of them behave alike. A stale worker still
 *   tries every operation; the mutants show when one gets through.
 * - the slots can be kept sorted (NORMALIZE): workers are interchangeable, so
 *   states that differ only in which worker holds what are one state.
 */
#define STALE 255
byte wt[NW + 1];       /* task */
byte wv[NW + 1];       /* token = the row's version right after the claim */
byte whb[NW + 1];      /* heartbeats left in this lease */
byte wph[NW + 1];      /* 0 working; 1 COMMIT's reply lost, will ask eoq_settled;
                          2 (MUTANT_SEPARATE_EFFECT_COMMIT) effect committed, completion next */
byte i_, j_, x_;         /* scratch, always 0 between steps (not hidden: BFS runs refuse hidden variables) */

#define WKEY(w) (wt[w] * 4096 + wv[w] * 16 + whb[w] * 4 + wph[w])
#define WSWAP(a, b) \
  x_ = wt[a]; wt[a] = wt[b]; wt[b] = x_; \
  x_ = wv[a]; wv[a] = wv[b]; wv[b] = x_; \
  x_ = whb[a]; whb[a] = whb[b]; whb[b] = x_; \
  x_ = wph[a]; wph[a] = wph[b]; wph[b] = x_
#define NORMALIZE \
  i_ = 1; \
  do \
  :: i_ >= NW -> break \
  :: else -> \
       j_ = 1; \
       do \
       :: j_ > NW - i_ -> break \
       :: else -> \
            if \
            :: WKEY(j_) > WKEY(j_ + 1) -> WSWAP(j_, j_ + 1) \
            :: else -> skip \
            fi; \
            j_++ \
       od; \
       i_++ \
  od; \
  i_ = 0; j_ = 0; x_ = 0

/* ------------------------------------------------------- ghost variables */
/* Only assertions read these; no protocol step does. */
byte cur_lease[NT];    /* token of the one valid lease of t, 0 = none: set by the
                          claim that grants it, cleared by whatever ends it */
byte effect_by[NT];    /* token of the lease whose transaction wrote the effect */
byte told_done[NT];    /* clients told "your completion of t is committed" */
byte created[NT];      /* task rows created under key t */
byte final[NT];        /* status when t first became terminal, 0 = not yet */
byte final_v[NT];      /* version then */
byte releases = RELEASES;
bit  cancel_used[NT];  /* one cancel(id) call per task */
byte w_;
byte submitted;        /* submitters finished */

/* Checked after every step that writes row t. */
#define CHECK(t) \
  if \
  :: final[t] == 0 && terminal(row[t].status) -> final[t] = row[t].status; final_v[t] = row[t].version \
  :: else -> assert(final[t] == 0 || (row[t].status == final[t] && row[t].version == final_v[t])) \
  fi; \
  assert(row[t].attempts <= MAXATT); \
  assert(effects[t] <= 1); \
  EFFECT_IFF_SUCCEEDED(t)
/* -DAT_MOST_ONCE_ONLY checks "at most once" alone (to see the double-effect
   counterexample of MUTANT_SEPARATE_EFFECT_COMMIT rather than the orphan one). */
#ifdef AT_MOST_ONCE_ONLY
#define EFFECT_IFF_SUCCEEDED(t) skip
#else
#define EFFECT_IFF_SUCCEEDED(t) assert(!terminal(row[t].status) || effects[t] == (row[t].status == SUCCEEDED))
#endif

/* A write made under the lease with token v must come from the task's one valid lease. */
#define FRESH(t, v) assert(cur_lease[t] == v)

/* Every lease operation's fence: WHERE id = $1 AND version = $2 AND status = 'running' */
#define FENCE(t, v) (row[t].version == v && row[t].status == RUNNING)
#ifdef MUTANT_NO_VERSION_GUARD
#define COMPLETE_FENCE(t, v) (row[t].status == RUNNING)
#else
#define COMPLETE_FENCE(t, v) FENCE(t, v)
#endif
#ifdef MUTANT_HEARTBEAT_NO_VERSION_GUARD
#define HEARTBEAT_FENCE(t, v) (row[t].status == RUNNING)
#else
#define HEARTBEAT_FENCE(t, v) FENCE(t, v)
#endif
#ifdef MUTANT_FAIL_NO_VERSION_GUARD
#define FAIL_FENCE(t, v) (row[t].status == RUNNING)
#else
#define FAIL_FENCE(t, v) FENCE(t, v)
#endif
#ifdef MUTANT_RELEASE_NO_VERSION_GUARD
#define RELEASE_FENCE(t, v) (row[t].status == RUNNING)
#else
#define RELEASE_FENCE(t, v) FENCE(t, v)
#endif
/* The "@step" comments on the lines that assert FRESH name the step for
   check.sh, which pins each fence mutant to the line its counterexample
   violates (spin -t reports "eoq.pml:<line>, Error: assertion violated"). */

/* eoq_claim's candidates: status = 'pending' OR lease_expires_at <= now() */
#ifdef MUTANT_NO_RECLAIM
#define CAND(t) (row[t].status == PENDING)
#else
#define CAND(t) (row[t].status == PENDING || (row[t].status == RUNNING && row[t].lease_expired))
#endif
#if NT == 2
#define ANY_CAND (CAND(0) || CAND(1))
#elif NT == 3
#define ANY_CAND (CAND(0) || CAND(1) || CAND(2))
#else
#error "NT must be 2 or 3"
#endif

/*
 * Leases of t held by workers other than `self` are older than the row's
 * version now. With -DLIVENESS a stale lease also loses its remaining
 * heartbeats: the safety run shows a stale heartbeat changes nothing, so the
 * liveness run may skip trying it (this halves that run's state space).
 */
#ifdef LIVENESS
#define STALE_HB(w) whb[w] = 0
#else
#define STALE_HB(w) skip
#endif
#define STALE_OTHERS(t, self) \
  w_ = 1; \
  do \
  :: w_ > NW -> break \
  :: else -> \
       if \
       :: w_ != self && wv[w_] != 0 && wt[w_] == t -> wv[w_] = STALE; STALE_HB(w_) \
       :: else -> skip \
       fi; \
       w_++ \
  od; \
  w_ = 0

/* The row moves to eoq.finished: status, version + 1, lease_expires_at NULL. */
#define SETTLE(t, st, self) \
  row[t].status = st; row[t].version++; row[t].lease_expired = 0; cur_lease[t] = 0; \
  STALE_OTHERS(t, self)

/* ------------------------------------------------------------ submitters */
/* Two clients submit the same two keys concurrently (idempotent submit). */
active [2] proctype Submitter() {
  byte k;
#ifdef MUTANT_SUBMIT_CHECK_THEN_INSERT
  bit seen;
#endif
  for (k : 0 .. NT - 1) {
#ifdef MUTANT_SUBMIT_CHECK_THEN_INSERT
    seen = key_taken[k];  /* SELECT task_id FROM keys ..., then INSERT if absent */
#define KEY_FREE (!seen)
#else
#define KEY_FREE (!key_taken[k])
#endif
    /* eoq_submit: INSERT INTO keys ... ON CONFLICT DO NOTHING, and the task row with it */
    d_step {
      if
      :: KEY_FREE ->
           key_taken[k] = 1; created[k]++;
           row[k].status = PENDING; row[k].version = 1; row[k].attempts = 0
      :: else -> skip  /* duplicate: eoq_by_keys returns the existing task */
      fi;
      assert(created[k] == 1)
    }
#ifdef MUTANT_SUBMIT_CHECK_THEN_INSERT
    ; seen = 0
#endif
  };
  submitted++
}

/* --------------------------------------------------------------- workers */
/*
 * A worker claims one task, then heartbeats, completes it (the handler's
 * writes and the fenced completion in one transaction), fails or releases it,
 * or drops it at any point. Dropping stands for SIGKILL and a restart with no
 * memory, a handler transaction ended by idle_in_transaction_session_timeout,
 * a backend kill or a Postgres restart, and a worker giving up after LeaseLost.
 * A zombie is a worker that is not scheduled for a while: Promela may delay
 * any process between any two steps, and the lease may expire meanwhile (Env).
 */
#define T   wt[me]
#define V   wv[me]
#define HBL whb[me]
#define PH  wph[me]
#define FORGET T = 0; V = 0; HBL = 0; PH = 0
#define TELL_DONE(t) told_done[t]++; assert(told_done[t] == 1 && effect_by[t] == V)

/* The liveness run leaves out lost replies: they only change what a client
   is told (checked by the safety run), never a row. */
#ifdef LIVENESS
#define REPLY_LOST FORGET
#else
#define REPLY_LOST PH = 1
#endif

proctype Worker(byte me) {
  byte fin;
  bit  perm;

end_idle:
  do
  :: /* eoq_claim, limit 1: pending, or running with an expired lease */
     atomic {
       V == 0 && ANY_CAND ->
       if
       :: CAND(0) -> T = 0
       :: CAND(1) -> T = 1
#if NT == 3
       :: CAND(2) -> T = 2
#endif
       fi;
       if
       :: row[T].overdue -> fin = EXPIRED
       :: !row[T].overdue && row[T].status == RUNNING && row[T].cancel_req -> fin = CANCELLED
#ifndef MUTANT_RECLAIM_IGNORES_LIMIT
       :: !row[T].overdue && row[T].status == RUNNING && !row[T].cancel_req && row[T].attempts >= MAXATT ->
            fin = FAILED
#endif
       :: else -> fin = 0
       fi;
       if
       :: fin != 0 ->          /* ends: settled here, not handed out */
            SETTLE(T, fin, 0); CHECK(T); fin = 0; FORGET
       :: else ->              /* upd: leased */
            row[T].status = RUNNING; row[T].attempts++; row[T].version++; row[T].lease_expired = 0;
            cur_lease[T] = row[T].version;
            STALE_OTHERS(T, me);
            CHECK(T);
            V = row[T].version; HBL = HB
       fi;
       NORMALIZE
     }

  :: /* eoq_heartbeat */
     atomic {
       V != 0 && PH == 0 && HBL > 0 -> HBL--;
       if
       :: HEARTBEAT_FENCE(T, V) -> FRESH(T, V); row[T].lease_expired = 0; CHECK(T)  /* @heartbeat */
       :: else -> FORGET   /* LeaseLost */
       fi;
       NORMALIZE
     }

#ifdef MUTANT_SEPARATE_EFFECT_COMMIT
  :: /* the handler's writes commit on their own ... */
     atomic {
       V != 0 && PH == 0 -> effects[T]++; effect_by[T] = V; CHECK(T); PH = 2; NORMALIZE
     }
#define COMPLETE_PHASE 2
#else
#define COMPLETE_PHASE 0
#endif

  :: /* PgLeaseTransaction::complete: the handler's SQL + eoq_complete + COMMIT, one commit */
     atomic {
       V != 0 && PH == COMPLETE_PHASE ->
       if
       :: COMPLETE_FENCE(T, V) ->
            FRESH(T, V); SETTLE(T, SUCCEEDED, me);  /* @complete */
#ifndef MUTANT_SEPARATE_EFFECT_COMMIT
            effects[T]++; effect_by[T] = V;
#endif
            CHECK(T);
            if
            :: TELL_DONE(T); FORGET   /* the reply arrives */
            :: REPLY_LOST             /* the connection drops during COMMIT */
            fi
       :: else ->   /* LeaseLost: ROLLBACK, the handler's writes are gone */
            if
            :: FORGET
            :: REPLY_LOST
            fi
       fi;
       NORMALIZE
     }

  :: /* eoq_settled after a dropped COMMIT: a finished row with version = token + 1, succeeded? */
     atomic {
       PH == 1 ->
       if
       :: row[T].status == SUCCEEDED && row[T].version == V + 1 -> TELL_DONE(T)
       :: else -> skip
       fi;
       FORGET;
       NORMALIZE
     }

  :: /* eoq_fail (a failing handler's writes are rolled back first) */
     atomic {
       V != 0 && PH == 0 ->
       if
       :: perm = 1
       :: perm = 0
       fi;
       if
       :: FAIL_FENCE(T, V) ->
            FRESH(T, V);  /* @fail */
            if
            :: row[T].cancel_req -> SETTLE(T, CANCELLED, me)
            :: !row[T].cancel_req && (perm || row[T].attempts >= MAXATT) -> SETTLE(T, FAILED, me)
            :: else ->      /* retry: pending again, lease cleared */
                 row[T].status = PENDING; row[T].version++; row[T].lease_expired = 0; cur_lease[T] = 0
            fi;
            CHECK(T)
       :: else -> skip      /* LeaseLost */
       fi;
       perm = 0; FORGET;
       NORMALIZE
     }

  :: /* eoq_release (a worker shutting down; RELEASES of them succeed in all) */
     atomic {
       V != 0 && PH == 0 && releases > 0 ->
       if
       :: RELEASE_FENCE(T, V) ->
            releases--;
            FRESH(T, V);  /* @release */
            if
            :: row[T].cancel_req -> SETTLE(T, CANCELLED, me)
            :: else ->
                 row[T].status = PENDING; row[T].version++; row[T].attempts--; row[T].lease_expired = 0;
                 cur_lease[T] = 0
            fi;
            CHECK(T)
       :: else -> skip      /* LeaseLost */
       fi;
       FORGET;
       NORMALIZE
     }

  :: /* crash (restarts with no memory), transaction killed, or gives up */
     atomic { V != 0 -> FORGET; NORMALIZE }
  od
}

/* ----------------------------------------------------------- environment */
/* Time passing and maintain(), in any order. */
#ifdef MUTANT_CANCEL_ANY_STATUS
#define CANCEL_SETTLES(t) (row[t].status != RUNNING && row[t].status != NONE)
#else
#define CANCEL_SETTLES(t) (row[t].status == PENDING)
#endif

#define ENV_TASK(t) \
  :: atomic {  /* time passes: now() >= lease_expires_at */ \
       row[t].status == RUNNING && !row[t].lease_expired -> row[t].lease_expired = 1 } \
  :: atomic {  /* maintain(): eoq_reap */ \
       row[t].status == RUNNING && row[t].lease_expired && (row[t].attempts >= MAXATT || row[t].cancel_req) -> \
       if \
       :: row[t].cancel_req -> SETTLE(t, CANCELLED, 0) \
       :: else -> SETTLE(t, FAILED, 0) \
       fi; \
       CHECK(t) }

/* eoq_cancel */
#define CANCEL(t) \
  :: atomic { \
       !cancel_used[t] -> cancel_used[t] = 1; \
       if \
       :: CANCEL_SETTLES(t) -> SETTLE(t, CANCELLED, 0); CHECK(t) \
       :: !CANCEL_SETTLES(t) && row[t].status == RUNNING -> row[t].cancel_req = 1; CHECK(t) \
       :: else -> skip   /* not_found or already_finished */ \
       fi }

#ifdef DEADLINES
#define DEADLINE_TASK(t) \
  :: atomic {  /* time passes: now() >= deadline */ \
       (row[t].status == PENDING || row[t].status == RUNNING) && !row[t].overdue -> row[t].overdue = 1 } \
  :: atomic {  /* maintain(): eoq_expire */ \
       row[t].status == PENDING && row[t].overdue -> SETTLE(t, EXPIRED, 0); CHECK(t) }
#else
#define DEADLINE_TASK(t)
#endif

proctype Env() {
end_env:
  do
  ENV_TASK(0)
  ENV_TASK(1)
  DEADLINE_TASK(0)
  DEADLINE_TASK(1)
#if NT == 3
  ENV_TASK(2)
  DEADLINE_TASK(2)
#endif
  od
}

/*
 * A client that may cancel each task once, at any time. In the liveness run
 * it may also stop calling cancel at all (break): weak fairness must not force
 * a cancel, which would end every otherwise stuck task and hide liveness bugs.
 * (In safety runs that choice is redundant: any process may simply never run.)
 */
proctype Canceller() {
end_cancel:
  do
  CANCEL(0)
  CANCEL(1)
#if NT == 3
  CANCEL(2)
#endif
#ifdef LIVENESS
  :: break
#endif
  od
}

/*
 * Workers and the environment start once both submitters are done. A submit
 * of a key that exists is a pure read (ON CONFLICT DO NOTHING, then
 * eoq_by_keys), and a row that does not exist yet is one that no claim has
 * chosen yet; so running the submits first loses no behaviour of the rows
 * and saves states.
 */
init {
  byte i;
  submitted == 2;
  atomic {
    run Env();
    run Canceller();
    for (i : 1 .. NW) {
      run Worker(i)
    }
    i = 0
  }
}

/* Liveness: under weak fairness every task ends terminal. */
#if NT == 2
ltl live { <> (terminal(row[0].status) && terminal(row[1].status)) }
#else
ltl live { <> (terminal(row[0].status) && terminal(row[1].status) && terminal(row[2].status)) }
#endif
