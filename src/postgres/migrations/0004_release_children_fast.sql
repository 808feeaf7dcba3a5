-- release_children returns at once while no edge waits for its parent's end:
-- the open edges get a partial index, which that check reads. The price is
-- paid by workflows: `done` now sits in an index predicate, so marking an edge
-- done is no longer a HOT update; and while any edge is open anywhere, every
-- settling statement runs the full function, as before this migration.
CREATE INDEX edges_open ON @schema@.edges (parent_id) WHERE NOT done;

-- As in 0003, with that check first.
CREATE OR REPLACE FUNCTION @schema@.release_children() RETURNS trigger LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  touched bigint[];
  notified bigint;
BEGIN
  -- Most tasks have no children. This probe of the partial index is planned
  -- once per session; the statements below read the transition table, so
  -- they were planned afresh at every settling statement (claims too, which
  -- settle nothing), and cost a task queue without workflows a sixth of each
  -- completion. Its snapshot is fresh, taken after the settling statement
  -- waited for every submit naming these parents (0003 explains how), so it
  -- sees every edge the statement below would.
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

  -- A parent ended other than succeeded: the child ends cancelled, and its own
  -- waiting children follow (this insert fires the trigger again).
  WITH gone AS (
    DELETE FROM @schema@.waiting x
    WHERE x.id = ANY(touched) AND NOT x.run_anyway AND x.last_error IS NOT NULL
    RETURNING x.*)
  INSERT INTO @schema@.finished (id, queue, type, key, tenant, payload, status, priority, run_at, deadline, attempts,
                                max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version,
                                lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
                                checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at)
  SELECT id, queue, type, key, tenant, payload, 'cancelled', priority, run_at, deadline, attempts, max_attempts,
         backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version + 1, lease_owner, NULL, started_at,
         cancel_requested, progress, stage, checkpoint_stage, checkpoint, result, last_error, created_at, now(), now()
  FROM gone;

  WITH gone AS (
    DELETE FROM @schema@.waiting x
    WHERE x.id = ANY(touched) AND x.parents_left <= 0
    RETURNING x.*),
  back AS (
    INSERT INTO @schema@.tasks (id, queue, type, key, tenant, payload, status, priority, run_at, deadline, attempts,
                                max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version,
                                lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
                                checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at)
    SELECT id, queue, type, key, tenant, payload, 'pending', priority, run_at, deadline, attempts, max_attempts,
           backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version, lease_owner, lease_expires_at,
           started_at, cancel_requested, progress, stage, checkpoint_stage, checkpoint, result, last_error,
           created_at, now(), finished_at
    FROM gone
    RETURNING queue)
  SELECT count(pg_notify('eoq_' || TG_TABLE_SCHEMA, q.queue)) INTO notified FROM (SELECT DISTINCT queue FROM back) q;
  RETURN NULL;
END
$$;
