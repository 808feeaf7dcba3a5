-- Finished totals that cost the same at any history size. stats() used to
-- count the whole finished table on every call (0.5 s at 1.4M rows), and the
-- dashboard and every /metrics scrape call it.
--
-- Every statement that moves rows into or out of `finished` appends one row
-- per (queue, tenant, status, time bucket) here, in its own transaction, by
-- the triggers below: the totals commit or roll back with the rows. Appends,
-- not updates of a counter row, so completions never wait on each other's
-- counter (a hot row would serialise every commit behind its lock), and
-- triggers, not the statements, so no path that writes `finished` (eleven
-- today) can forget. The maintenance sums the appended rows now and then
-- (compact_totals in queries.sql), so the table stays a few hundred rows per
-- queue and status whatever the history.
--
--   added:   rows that arrived in `finished`, by the bucket of finished_at.
--            sum(added) only grows: the Prometheus counters.
--   removed: rows deleted from `finished` (retention, retry, delete), in the
--            '-infinity' bucket. sum(added) - sum(removed) = rows stored.
-- Buckets: 10 s for the last minutes, whole minutes for the last two hours
-- (the dashboard's charts), then '-infinity'.
CREATE TABLE @schema@.totals (
  queue   text NOT NULL,
  tenant  text,
  status  text NOT NULL,
  bucket  timestamptz NOT NULL,
  added   bigint NOT NULL,
  removed bigint NOT NULL
);

CREATE FUNCTION @schema@.totals_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO @schema@.totals (queue, tenant, status, bucket, added, removed)
  SELECT queue, tenant, status, date_bin('10 seconds', finished_at, timestamptz 'epoch'), count(*), 0
  FROM added_rows GROUP BY 1, 2, 3, 4;
  RETURN NULL;
END
$$;

CREATE FUNCTION @schema@.totals_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO @schema@.totals (queue, tenant, status, bucket, added, removed)
  SELECT queue, tenant, status, timestamptz '-infinity', 0, count(*)
  FROM removed_rows GROUP BY 1, 2, 3;
  RETURN NULL;
END
$$;

-- A TRUNCATE of the history starts the totals again.
CREATE FUNCTION @schema@.totals_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM @schema@.totals;
  RETURN NULL;
END
$$;

CREATE TRIGGER totals_added AFTER INSERT ON @schema@.finished
  REFERENCING NEW TABLE AS added_rows FOR EACH STATEMENT EXECUTE FUNCTION @schema@.totals_added();
CREATE TRIGGER totals_removed AFTER DELETE ON @schema@.finished
  REFERENCING OLD TABLE AS removed_rows FOR EACH STATEMENT EXECUTE FUNCTION @schema@.totals_removed();
CREATE TRIGGER totals_truncated AFTER TRUNCATE ON @schema@.finished
  FOR EACH STATEMENT EXECUTE FUNCTION @schema@.totals_truncated();

-- The history already kept: under the trigger's lock (CREATE TRIGGER holds
-- off writers of `finished` until this transaction commits), so no row is
-- counted twice or missed.
INSERT INTO @schema@.totals (queue, tenant, status, bucket, added, removed)
SELECT queue, tenant, status,
       CASE WHEN finished_at < now() - interval '2 hours' THEN timestamptz '-infinity'
            ELSE date_bin('10 seconds', finished_at, timestamptz 'epoch') END,
       count(*), 0
FROM @schema@.finished GROUP BY 1, 2, 3, 4;
