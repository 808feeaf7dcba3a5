-- Live tasks only (pending and running). JSON columns are `json`, not `jsonb`:
-- the queue never looks inside them, and `json` hands back the caller's exact
-- text and skips the binary conversion on every insert.
-- No index mentions status, version or
-- the lease, so claims, heartbeats and progress updates stay HOT; fillfactor 50
-- leaves room on each page for the new row versions a claim batch writes.
CREATE SEQUENCE @schema@.task_ids;

CREATE TABLE @schema@.tasks (
  id                 bigint PRIMARY KEY,
  queue              text NOT NULL,
  type               text NOT NULL,
  key                text,
  tenant             text,
  payload            json NOT NULL,
  status             text NOT NULL,
  priority           integer NOT NULL,
  run_at             timestamptz NOT NULL,
  deadline           timestamptz,
  attempts           integer NOT NULL DEFAULT 0,
  max_attempts       integer NOT NULL,
  backoff            text NOT NULL,
  backoff_initial_ms bigint NOT NULL,
  backoff_max_ms     bigint NOT NULL,
  backoff_jitter     double precision NOT NULL,
  version            bigint NOT NULL DEFAULT 1,
  lease_owner        text,
  lease_expires_at   timestamptz,
  started_at         timestamptz,
  cancel_requested   boolean NOT NULL DEFAULT false,
  progress           integer NOT NULL DEFAULT 0,
  stage              text NOT NULL DEFAULT '',
  checkpoint_stage   text,
  checkpoint         json,
  result             json,
  last_error         text,
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now(),
  finished_at        timestamptz,
  CONSTRAINT tasks_live_status CHECK (status IN ('pending', 'running'))
) WITH (fillfactor = 50);

CREATE INDEX tasks_claim ON @schema@.tasks (queue, priority, run_at, id);

-- Finished tasks, append-only: a task moves here in the statement that settles
-- it, so the live table never carries history.
CREATE TABLE @schema@.finished (
  LIKE @schema@.tasks INCLUDING DEFAULTS,
  PRIMARY KEY (id),
  CONSTRAINT finished_status CHECK (status IN ('succeeded', 'failed', 'cancelled', 'expired'))
);
ALTER TABLE @schema@.finished ALTER COLUMN finished_at SET NOT NULL;
-- Rows arrive in finishing order, so a BRIN index serves retention at almost
-- no cost per insert.
CREATE INDEX finished_retention ON @schema@.finished USING brin (finished_at);

-- Idempotency keys, insert-only: a key stays taken after its task finishes,
-- until retention deletes both. The unique constraint is what decides a race.
CREATE TABLE @schema@.keys (
  queue   text NOT NULL,
  key     text NOT NULL,
  task_id bigint NOT NULL,
  PRIMARY KEY (queue, key)
);

-- Attempts that ended other than in success (a success is read from the
-- finished row itself, which saves an insert per task on the hot path).
CREATE TABLE @schema@.attempts (
  task_id     bigint NOT NULL,
  attempt     integer NOT NULL,
  version     bigint NOT NULL,
  owner       text,
  started_at  timestamptz,
  finished_at timestamptz NOT NULL,
  outcome     text NOT NULL,
  error       text,
  PRIMARY KEY (task_id, attempt)
);
