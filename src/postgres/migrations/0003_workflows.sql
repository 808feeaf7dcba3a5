-- Workflows: tasks that wait for others (their parents).
--
-- A task with a parent that has not ended waits in its own table, out of the
-- live one, so the claim index and the HOT updates of claims and heartbeats
-- never meet it. It moves into `tasks` (pending) when its last parent succeeds,
-- or into `finished` (cancelled) when one ends otherwise, unless it runs
-- whatever its parents did.
CREATE TABLE @schema@.waiting (
  LIKE @schema@.tasks INCLUDING DEFAULTS,
  PRIMARY KEY (id),
  parents_left   integer NOT NULL,
  run_anyway     boolean NOT NULL,
  CONSTRAINT waiting_status CHECK (status = 'waiting')
);

-- One row per (parent, child), kept until retention deletes the child. `done`:
-- the parent's end was counted, so a parent retried after it failed is never
-- counted twice.
CREATE TABLE @schema@.edges (
  parent_id bigint NOT NULL,
  child_id  bigint NOT NULL,
  done      boolean NOT NULL,
  PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX edges_child ON @schema@.edges (child_id);

-- Every task that ends arrives in `finished`, whichever statement settled it,
-- so releasing its children is a trigger on that insert: it runs in the
-- settling transaction, and no settling statement needs to know about it.
--
-- The function is VOLATILE, so each of its statements takes a fresh snapshot:
-- a submit that named this parent and committed while the settling statement
-- waited for the parent's row (the submit holds a KEY SHARE lock on it until
-- it commits) is seen here. Concurrent parents of one child serialise on the
-- child's waiting row, so exactly one of them sees parents_left reach zero.
CREATE FUNCTION @schema@.release_children() RETURNS trigger LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  touched bigint[];
  notified bigint;
BEGIN
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

CREATE TRIGGER finished_release_children AFTER INSERT ON @schema@.finished
  REFERENCING NEW TABLE AS fin FOR EACH STATEMENT EXECUTE FUNCTION @schema@.release_children();
