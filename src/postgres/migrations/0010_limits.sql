-- Concurrency and rate limits per queue and per partition of a queue.
--
-- A task names its partition (a tenant, a customer id; '' for none) and may
-- name a timeout for each attempt. Both columns carry a constant default or
-- none, so adding them rewrites no table.
ALTER TABLE @schema@.tasks ADD COLUMN partition_key text NOT NULL DEFAULT '', ADD COLUMN timeout_ms bigint;
ALTER TABLE @schema@.waiting ADD COLUMN partition_key text NOT NULL DEFAULT '', ADD COLUMN timeout_ms bigint;
ALTER TABLE @schema@.finished ADD COLUMN partition_key text NOT NULL DEFAULT '', ADD COLUMN timeout_ms bigint;

-- A queue's limits; no row, no limit. NULL in a column: that limit is off.
CREATE TABLE @schema@.limits (
  queue                    text PRIMARY KEY,
  concurrency              integer CHECK (concurrency >= 0),
  partition_concurrency    integer CHECK (partition_concurrency >= 0),
  rate                     integer CHECK (rate >= 0),
  rate_period_ms           bigint CHECK (rate_period_ms > 0),
  partition_rate           integer CHECK (partition_rate >= 0),
  partition_rate_period_ms bigint CHECK (partition_rate_period_ms > 0),
  updated_at               timestamptz NOT NULL DEFAULT now(),
  CHECK ((rate IS NULL) = (rate_period_ms IS NULL)),
  CHECK ((partition_rate IS NULL) = (partition_rate_period_ms IS NULL))
);

-- The tasks of limited queues that a claim started: one row per task, kept
-- while the task runs under a live lease. A row whose task has ended, been
-- given back or lost its lease is dead; the next claim of its queue deletes
-- it. Nothing else writes here, so the statements that settle tasks (and the
-- queues without limits) pay nothing for limits.
-- No index but the key: the table holds about what runs, every claim of a
-- limited queue reads it whole, and an index on the queue cost each start a
-- tenth of its time.
CREATE TABLE @schema@.holds (
  task_id       bigint PRIMARY KEY,
  queue         text NOT NULL,
  partition_key text NOT NULL
) WITH (fillfactor = 50);

-- Starts of tasks in rate-limited queues, kept for the longest rate period.
CREATE TABLE @schema@.starts (
  queue         text NOT NULL,
  partition_key text NOT NULL,
  at            timestamptz NOT NULL
);
CREATE INDEX starts_queue ON @schema@.starts (queue, at);

-- The claims of one limited queue run one at a time: each takes this lock,
-- then counts (in a snapshot taken after the lock, so it sees every claim
-- committed before it) what runs and what started. The lock is the
-- transaction's, so it goes with the claim's commit.
CREATE FUNCTION @schema@.limit_lock(q text) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
  SELECT hashtextextended('@schema@.limits:' || q, 0)
$$;

-- Per partition: tasks running under a live lease, and starts within the
-- queue's rate period (started_q) and the partition rate's (started_p).
-- VOLATILE, so its statements read a snapshot taken after the lock.
CREATE FUNCTION @schema@.limit_busy(q text)
RETURNS TABLE (partition_key text, running bigint, started_q bigint, started_p bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  l @schema@.limits%ROWTYPE;
BEGIN
  PERFORM pg_advisory_xact_lock(@schema@.limit_lock(q));
  SELECT * INTO l FROM @schema@.limits WHERE queue = q;
  DELETE FROM @schema@.holds h
  WHERE h.queue = q AND NOT EXISTS (
    SELECT 1 FROM @schema@.tasks t WHERE t.id = h.task_id AND t.status = 'running' AND t.lease_expires_at > now());
  DELETE FROM @schema@.starts s
  WHERE s.queue = q
    AND s.at <= now() - greatest(coalesce(l.rate_period_ms, 0), coalesce(l.partition_rate_period_ms, 0))
                        * interval '1 millisecond';
  RETURN QUERY
  SELECT x.partition_key, sum(x.r)::bigint, sum(x.sq)::bigint, sum(x.sp)::bigint FROM (
    SELECT h.partition_key, 1 AS r, 0 AS sq, 0 AS sp FROM @schema@.holds h WHERE h.queue = q
    UNION ALL
    SELECT s.partition_key, 0,
           (s.at > now() - l.rate_period_ms * interval '1 millisecond')::int,
           (s.at > now() - l.partition_rate_period_ms * interval '1 millisecond')::int
    FROM @schema@.starts s WHERE s.queue = q) x
  GROUP BY x.partition_key;
END
$$;

-- Claims on queues without limits ask this first, once per queue: true when
-- the queue has no limits. The shared lock makes limits() wait for the claims
-- that passed here before it, so that it counts the tasks they started; a
-- claim that comes after it sees its row (the function's snapshot is taken
-- after the lock).
CREATE FUNCTION @schema@.unlimited(q text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM pg_advisory_xact_lock_shared(@schema@.limit_lock(q));
  RETURN NOT EXISTS (SELECT 1 FROM @schema@.limits WHERE queue = q);
END
$$;

-- As in 0004, carrying the two new columns where a waiting task moves.
CREATE OR REPLACE FUNCTION @schema@.release_children() RETURNS trigger LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  touched bigint[];
  notified bigint;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM @schema@.edges WHERE NOT done) THEN
    RETURN NULL;
  END IF;
  WITH d AS (
    UPDATE @schema@.edges e SET done = true
    FROM fin WHERE e.parent_id = fin.id AND NOT e.done
    RETURNING e.child_id, fin.id AS parent_id, fin.status),
  per_child AS (
    SELECT child_id, count(*)::int AS n,
           min(format('parent %s ended %s', parent_id, status)) FILTER (WHERE status <> 'succeeded') AS why
    FROM d GROUP BY child_id),
  w AS (
    UPDATE @schema@.waiting x
    SET parents_left = x.parents_left - p.n,
        last_error = CASE WHEN p.why IS NOT NULL AND NOT x.run_anyway THEN coalesce(x.last_error, p.why)
                          ELSE x.last_error END
    FROM per_child p WHERE x.id = p.child_id
    RETURNING x.id)
  SELECT array_agg(id) INTO touched FROM w;
  IF touched IS NULL THEN
    RETURN NULL;
  END IF;

  WITH gone AS (
    DELETE FROM @schema@.waiting x
    WHERE x.id = ANY(touched) AND NOT x.run_anyway AND x.last_error IS NOT NULL
    RETURNING x.*)
  INSERT INTO @schema@.finished (id, queue, type, key, tenant, payload, status, priority, run_at, deadline, attempts,
                                max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version,
                                lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
                                checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at,
                                partition_key, timeout_ms)
  SELECT id, queue, type, key, tenant, payload, 'cancelled', priority, run_at, deadline, attempts, max_attempts,
         backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version + 1, lease_owner, NULL, started_at,
         cancel_requested, progress, stage, checkpoint_stage, checkpoint, result, last_error, created_at, now(), now(),
         partition_key, timeout_ms
  FROM gone;

  WITH gone AS (
    DELETE FROM @schema@.waiting x
    WHERE x.id = ANY(touched) AND x.parents_left <= 0
    RETURNING x.*),
  back AS (
    INSERT INTO @schema@.tasks (id, queue, type, key, tenant, payload, status, priority, run_at, deadline, attempts,
                                max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version,
                                lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
                                checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at,
                                partition_key, timeout_ms)
    SELECT id, queue, type, key, tenant, payload, 'pending', priority, run_at, deadline, attempts, max_attempts,
           backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version, lease_owner, lease_expires_at,
           started_at, cancel_requested, progress, stage, checkpoint_stage, checkpoint, result, last_error,
           created_at, now(), finished_at, partition_key, timeout_ms
    FROM gone
    RETURNING queue)
  SELECT count(pg_notify('eoq_' || TG_TABLE_SCHEMA, q.queue)) INTO notified FROM (SELECT DISTINCT queue FROM back) q;
  RETURN NULL;
END
$$;
