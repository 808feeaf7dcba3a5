-- A limited claim records what it started as one row (a grant), not one hold
-- per task. Per task, the holds of 0010 cost each start an insert, and each
-- claim a probe of every task still held before it could count: a claim of a
-- queue with a limit that did not bind ran at 0.4 of the same claim without.
--
-- A grant's tasks are those of its queue that its claim leased: their
-- started_at is the claim's now(), and their ids lie in lo..hi (a claim's
-- tasks mostly have neighbouring ids, so their index entries are read as one
-- range), or in `ids` when they are spread wider (NULL otherwise). No test of
-- the queue: each claim is a statement of its own, so only a claim that began
-- in the same microsecond could share its start time (and would count a task
-- twice, which starts fewer, never more); with one, a generic plan read every
-- task of the queue by tasks_claim instead of the grant's range. One of them
-- still counts while it runs under that lease (status running, the same
-- started_at, a lease that has not run out); a task leased again started at
-- another time, so its old grant stops counting it. A grant none of whose
-- tasks counts is dead, and the queue's next claim deletes it.
CREATE TABLE @schema@.grants (
  queue text NOT NULL,
  at    timestamptz NOT NULL,
  lo    bigint NOT NULL,
  hi    bigint NOT NULL,
  ids   bigint[],
  n     integer NOT NULL  -- at least how many of its tasks it still counts
);
CREATE INDEX grants_queue ON @schema@.grants (queue);

-- The holds of tasks running now become grants, one per start time; under
-- each limited queue's lock, so that no claim of the old form is half way.
SELECT pg_advisory_xact_lock(@schema@.limit_lock(queue)) FROM @schema@.limits ORDER BY queue;
INSERT INTO @schema@.grants (queue, at, lo, hi, ids, n)
SELECT t.queue, t.started_at, min(t.id), max(t.id), array_agg(t.id), count(*)
FROM @schema@.holds h JOIN @schema@.tasks t ON t.id = h.task_id
WHERE t.status = 'running' AND t.lease_expires_at > now()
GROUP BY t.queue, t.started_at;
DROP TABLE @schema@.holds;

-- As 0010's limit_busy(q), counting grants instead of holds, and only as far
-- as it must. A grant's n is how many of its tasks counted when it was last
-- counted (or made), and none can count again once it stopped, so the sum of
-- n over the queue's grants bounds what runs from above. Without limits per
-- partition that bound stands for the count (one partition, ''), made exact
-- only as far as the claim needs: the oldest grants (whose tasks have most
-- likely ended) are counted one by one until the bound leaves room for the
-- `want` tasks asked for; past eight of them, one pass counts every grant.
-- With limits per partition every claim counts every grant in one pass. A
-- count sets each grant's n and deletes the grants that count none.
DROP FUNCTION @schema@.limit_busy(text);
CREATE FUNCTION @schema@.limit_busy(q text, want bigint)
RETURNS TABLE (partition_key text, running bigint, started_q bigint, started_p bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  l @schema@.limits%ROWTYPE;
  gr record;
  bound bigint;
  live bigint;
  counted integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(@schema@.limit_lock(q));
  SELECT * INTO l FROM @schema@.limits WHERE queue = q;
  DELETE FROM @schema@.starts s
  WHERE s.queue = q
    AND s.at <= now() - greatest(coalesce(l.rate_period_ms, 0), coalesce(l.partition_rate_period_ms, 0))
                        * interval '1 millisecond';
  IF l.concurrency IS NULL AND l.partition_concurrency IS NULL THEN
    -- Rates alone: nothing counts what runs, so no grant is kept (set_limits
    -- makes them afresh when a concurrency limit comes).
    DELETE FROM @schema@.grants x WHERE x.queue = q;
    RETURN QUERY
    SELECT s.partition_key, 0::bigint,
           count(*) FILTER (WHERE s.at > now() - l.rate_period_ms * interval '1 millisecond'),
           count(*) FILTER (WHERE s.at > now() - l.partition_rate_period_ms * interval '1 millisecond')
    FROM @schema@.starts s WHERE s.queue = q GROUP BY s.partition_key;
    RETURN;
  END IF;
  IF l.partition_concurrency IS NULL AND l.partition_rate IS NULL THEN
    SELECT coalesce(sum(x.n), 0) INTO bound FROM @schema@.grants x WHERE x.queue = q;
    FOR gr IN SELECT x.ctid AS grant_row, x.* FROM @schema@.grants x WHERE x.queue = q ORDER BY x.at LOOP
      EXIT WHEN bound + want <= l.concurrency OR counted = 8;
      SELECT count(*) INTO live FROM (
        SELECT 1 FROM @schema@.tasks t
        WHERE gr.ids IS NULL AND t.id BETWEEN gr.lo AND gr.hi AND t.started_at = gr.at
          AND t.status = 'running' AND t.lease_expires_at > now()
        UNION ALL
        SELECT 1 FROM @schema@.tasks t
        WHERE t.id = ANY(gr.ids) AND t.started_at = gr.at
          AND t.status = 'running' AND t.lease_expires_at > now()) y;
      IF live = 0 THEN
        DELETE FROM @schema@.grants x WHERE x.ctid = gr.grant_row;
      ELSIF live <> gr.n THEN
        UPDATE @schema@.grants x SET n = live WHERE x.ctid = gr.grant_row;
      END IF;
      bound := bound - gr.n + live;
      counted := counted + 1;
    END LOOP;
    IF counted < 8 OR bound + want <= l.concurrency THEN
      RETURN QUERY
      SELECT ''::text, bound, count(*) FILTER (WHERE s.at > now() - l.rate_period_ms * interval '1 millisecond'),
             0::bigint
      FROM @schema@.starts s WHERE s.queue = q;
      RETURN;
    END IF;
  END IF;
  RETURN QUERY
  WITH c AS MATERIALIZED (
    SELECT g.ctid AS grant_row, x.partition_key
    FROM @schema@.grants g LEFT JOIN LATERAL (
      SELECT t.partition_key FROM @schema@.tasks t
      WHERE g.ids IS NULL AND t.id BETWEEN g.lo AND g.hi AND t.started_at = g.at
        AND t.status = 'running' AND t.lease_expires_at > now()
      UNION ALL
      SELECT t.partition_key FROM @schema@.tasks t
      WHERE t.id = ANY(g.ids) AND t.started_at = g.at
        AND t.status = 'running' AND t.lease_expires_at > now()) x ON true
    WHERE g.queue = q),
  per_grant AS (SELECT c.grant_row, count(c.partition_key) AS n FROM c GROUP BY c.grant_row),
  dead AS (
    DELETE FROM @schema@.grants g
    WHERE g.ctid = ANY(ARRAY(SELECT p.grant_row FROM per_grant p WHERE p.n = 0))),
  recounted AS (
    UPDATE @schema@.grants g SET n = p.n
    FROM per_grant p WHERE g.ctid = p.grant_row AND p.n > 0 AND g.n <> p.n)
  SELECT x.partition_key, sum(x.r)::bigint, sum(x.sq)::bigint, sum(x.sp)::bigint FROM (
    SELECT c.partition_key, 1 AS r, 0 AS sq, 0 AS sp FROM c WHERE c.partition_key IS NOT NULL
    UNION ALL
    SELECT s.partition_key, 0,
           (s.at > now() - l.rate_period_ms * interval '1 millisecond')::int,
           (s.at > now() - l.partition_rate_period_ms * interval '1 millisecond')::int
    FROM @schema@.starts s WHERE s.queue = q) x
  GROUP BY x.partition_key;
END
$$;
