/* Release of a dependent task (migration 0003: release_children; postgres_store.cpp:
 * submit_in with eoq_lock_parents and eoq_parent_states), checked by spin.
 *
 * Two parents, each settled once by its own settler (succeeded or failed,
 * chosen freely), and one submit of a child naming both, racing them at any
 * step. What Postgres does for us is modelled as it behaves under READ
 * COMMITTED:
 *   - a settling statement takes the parent's row lock (DELETE) and holds it to
 *     COMMIT; the submit's KEY SHARE lock on a live parent conflicts with it;
 *     whoever comes second waits for the other's COMMIT;
 *   - the trigger function is VOLATILE: each of its statements sees what was
 *     committed when it starts (here: the edge, once the submit committed);
 *   - the decrement of the child's counter is an UPDATE of the child's row:
 *     concurrent settlers serialise on that row lock, held to COMMIT, and the
 *     second one reads the first one's committed counter (EvalPlanQual).
 * Properties (assertions):
 *   released:  the child is released at most once, and only when both parents
 *              succeeded (it has no run-anyway option here);
 *   no_stuck:  once everyone is done, a child whose parents both ended is not
 *              left waiting (released if both succeeded, cancelled otherwise).
 * Mutants (each must be caught, by the named assertion):
 *   MUTANT_RELEASE_ON_FIRST_PARENT  release when any parent's end is counted
 *   MUTANT_SUBMIT_NO_LOCK           the submit reads the parents without locking them
 */

#define LIVE 0
#define OK 1
#define BAD 2

byte parent[2];          /* committed state of each parent */
byte lock_owner[2];      /* row lock: 0 free, 1 settler, 2 submit (KEY SHARE) */
bool edge[2];            /* committed edges (parent -> child) */
bool edge_done[2];       /* committed: that parent's end was counted */
byte child = 0;          /* 0 not submitted, 1 waiting, 2 released, 3 cancelled */
byte left = 0;           /* committed counter of parents not yet ended */
byte child_lock = 0;     /* 0 free, else settler i+1 */
byte releases = 0;
byte done = 0;

proctype Settler(byte i) {
  byte outcome;
  byte myleft;
  if
  :: outcome = OK
  :: outcome = BAD
  fi;
  /* eoq_complete / eoq_fail: the DELETE takes the row lock, waiting for a submit holding KEY SHARE */
  atomic { lock_owner[i] == 0 -> lock_owner[i] = 1 };
  /* release_children, statement 1 (a fresh snapshot): the edge, if its submit committed */
  if
  :: atomic { edge[i] && !edge_done[i] && child == 1 } ->
     /* UPDATE waiting: waits for the child's row lock, then reads the latest
        committed row; a row deleted meanwhile (released or cancelled) is skipped */
     atomic { child_lock == 0 -> child_lock = i + 1 };
     if
     :: child == 1 ->
        myleft = left - 1;
        /* statements 2 and 3: cancel, or release what has no parent left */
        if
        :: outcome == BAD -> child = 3
#ifdef MUTANT_RELEASE_ON_FIRST_PARENT
        :: outcome == OK ->
#else
        :: outcome == OK && myleft == 0 ->
#endif
           releases++;
           child = 2;
           /* released: once, and only after both parents succeeded */
           assert(releases == 1 && parent[1 - i] == OK)
        :: else -> skip
        fi
     :: else -> myleft = left
     fi;
     /* COMMIT */
     atomic { left = myleft; edge_done[i] = true; parent[i] = outcome; child_lock = 0; lock_owner[i] = 0 }
  :: else ->
     atomic { parent[i] = outcome; lock_owner[i] = 0 }
  fi;
  done++
}

proctype Submitter() {
  byte i;
  byte n = 0;
  bool bad = false;
  /* eoq_lock_parents: KEY SHARE on each live parent, waiting for a settling one */
#ifndef MUTANT_SUBMIT_NO_LOCK
  for (i : 0 .. 1) {
    atomic { lock_owner[i] == 0 -> if :: parent[i] == LIVE -> lock_owner[i] = 2 :: else -> skip fi }
  }
#endif
  /* eoq_parent_states, a new snapshot: what has committed */
  for (i : 0 .. 1) {
    if
    :: parent[i] == LIVE -> n++
    :: parent[i] == BAD -> bad = true
    :: else -> skip
    fi
  }
  /* insert the child and its edges, COMMIT, locks go */
  atomic {
    for (i : 0 .. 1) {
      edge[i] = true;
      edge_done[i] = parent[i] != LIVE;
      if :: lock_owner[i] == 2 -> lock_owner[i] = 0 :: else -> skip fi
    }
    if
    :: bad -> child = 3
    :: !bad && n == 0 -> child = 2; releases++
    :: else -> child = 1; left = n
    fi
  };
  done++
}

init {
  atomic {
    run Settler(0);
    run Settler(1);
    run Submitter()
  };
  done == 3;
  /* no_stuck: every parent ended, so the child is settled one way or the other */
  assert(child != 1);
  assert(child == 3 || (parent[0] == OK && parent[1] == OK));
  assert(releases <= 1)
}
