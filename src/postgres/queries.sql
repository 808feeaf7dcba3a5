-- Every statement the Postgres store runs, by name (src/postgres/queries.hpp).
-- Embedded into the library at build time, like the migrations.
--
-- The schema is written `eoq`, the default, so any statement pastes into psql
-- or EXPLAIN as it stands. The store puts the configured schema's quoted name
-- in place of every `eoq.` (also inside string literals: 'eoq.task_ids'), so
-- write `eoq.` for nothing but the schema.
--
-- A statement runs from its `-- name:` line to the next one; full-line
-- comments are dropped before it is sent. What each statement's result must
-- look like (names and types, by position) is declared beside its decoder in
-- postgres_store.cpp, and postgres_test prepares every statement here against
-- a real server to check the two agree.
--
-- `-- plan: generic` under a name marks a statement whose plan must not depend
-- on its parameters (it reaches rows by id or key, or walks the claim index):
-- outside a transaction the store's own connections run it on a generic plan,
-- planned again only when its tables' statistics or definitions change, with
-- sequential and bitmap scans and JIT off (pg::Connection::plan_for says why).
--
-- Times arrive as microseconds since the Unix epoch and durations as
-- milliseconds, both bigint: ('epoch'::timestamptz + $n::bigint * interval
-- '1 microsecond') and ($n::bigint * interval '1 millisecond').
--
-- A task leaves the live table (tasks) for the append-only one (finished) in
-- the statement that settles it: `gone` deletes it and `fin` inserts it, every
-- column in table order, four lines for four lines; a column given an
-- expression says which with AS.


-- name: submit
-- plan: generic
-- A key is taken by inserting it; ON CONFLICT DO NOTHING makes the unique
-- constraint the judge of a race, and a concurrent submitter of the same key
-- waits for ours to commit or roll back. No key row, no task row.
WITH k AS (
  INSERT INTO eoq.keys (queue, tenant, key, task_id)
  SELECT $1, coalesce($4, ''), $3, nextval('eoq.task_ids') WHERE $3::text IS NOT NULL
  ON CONFLICT DO NOTHING RETURNING task_id),
ids AS (SELECT task_id AS id FROM k UNION ALL SELECT nextval('eoq.task_ids') WHERE $3::text IS NULL),
ins AS (
  INSERT INTO eoq.tasks (id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
                         max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
                         partition_key, timeout_ms)
  SELECT id, $1, $2, $3, $4, $5::json, 'pending', $6,
         coalesce(('epoch'::timestamptz + $7::bigint * interval '1 microsecond'), now()),
         ('epoch'::timestamptz + $8::bigint * interval '1 microsecond'),
         $9, $10, $11, $12, $13, $15, $16
  FROM ids
  RETURNING id, run_at, created_at, version)
SELECT id, run_at, created_at, version, pg_notify($14, $1) FROM ins;


-- name: submit_flow
-- submit_batch for tasks that name parents, in the caller's transaction after
-- lock_parents and parent_states: the host decided each task's fate, and this
-- puts it where it belongs ($15 status: pending into tasks; waiting into
-- waiting with $16 how many parents have not ended and $17 whether it runs
-- whatever they did; cancelled into finished, $18 saying why) and writes its
-- edges ($19 the child's position, $20 the parent, $21 whether that parent's
-- end is already counted). A task whose key was taken gets no edges. $22
-- partitions, $23 timeouts in ms.
WITH src AS MATERIALIZED (
  SELECT nextval('eoq.task_ids') AS id, s.*
  FROM (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
                             $7::bigint[], $8::bigint[], $9::int[], $10::text[], $11::bigint[],
                             $12::bigint[], $13::float8[], $15::text[], $16::int[], $17::boolean[], $18::text[],
                             $22::text[], $23::bigint[])
          WITH ORDINALITY AS u(queue, type, key, tenant, payload, priority, run_at, deadline, max_attempts,
                               backoff, initial_ms, max_ms, jitter, status, parents_left, run_anyway, why,
                               partition_key, timeout_ms, ord)) s),
k AS (
  INSERT INTO eoq.keys (queue, tenant, key, task_id)
  SELECT queue, coalesce(tenant, ''), key, id FROM src WHERE key IS NOT NULL ORDER BY ord
  ON CONFLICT DO NOTHING RETURNING task_id),
new AS MATERIALIZED (SELECT * FROM src WHERE key IS NULL OR id IN (SELECT task_id FROM k)),
p AS (
  INSERT INTO eoq.tasks (id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
                         max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
                         partition_key, timeout_ms)
  SELECT id, queue, type, key, tenant, payload::json, 'pending', priority,
         coalesce(('epoch'::timestamptz + new.run_at::bigint * interval '1 microsecond'), now()),
         ('epoch'::timestamptz + new.deadline::bigint * interval '1 microsecond'),
         max_attempts, backoff, initial_ms, max_ms, jitter, partition_key, timeout_ms
  FROM new WHERE status = 'pending'
  RETURNING id, run_at, created_at, version),
w AS (
  INSERT INTO eoq.waiting (id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
                           max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
                           parents_left, run_anyway, partition_key, timeout_ms)
  SELECT id, queue, type, key, tenant, payload::json, 'waiting', priority,
         coalesce(('epoch'::timestamptz + new.run_at::bigint * interval '1 microsecond'), now()),
         ('epoch'::timestamptz + new.deadline::bigint * interval '1 microsecond'),
         max_attempts, backoff, initial_ms, max_ms, jitter, parents_left, run_anyway, partition_key, timeout_ms
  FROM new WHERE status = 'waiting'
  RETURNING id, run_at, created_at, version),
c AS (
  INSERT INTO eoq.finished (id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
                            max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
                            last_error, finished_at, partition_key, timeout_ms)
  SELECT id, queue, type, key, tenant, payload::json, 'cancelled', priority,
         coalesce(('epoch'::timestamptz + new.run_at::bigint * interval '1 microsecond'), now()),
         ('epoch'::timestamptz + new.deadline::bigint * interval '1 microsecond'),
         max_attempts, backoff, initial_ms, max_ms, jitter, why, now(), partition_key, timeout_ms
  FROM new WHERE status = 'cancelled'
  RETURNING id, run_at, created_at, version),
e AS (
  INSERT INTO eoq.edges (parent_id, child_id, done)
  SELECT u.parent_id, new.id, u.done
  FROM unnest($19::bigint[], $20::bigint[], $21::boolean[]) AS u(child_ord, parent_id, done)
  JOIN new ON new.ord = u.child_ord),
ins AS (SELECT * FROM p UNION ALL SELECT * FROM w UNION ALL SELECT * FROM c)
SELECT src.ord, ins.id, ins.run_at, ins.created_at, ins.version,
       (SELECT count(pg_notify($14, q.queue)) FROM (SELECT DISTINCT queue FROM new WHERE status = 'pending') q)
FROM ins JOIN src USING (id);


-- name: lock_parents
-- plan: generic
-- A submit naming parents first locks those that have not ended (KEY SHARE:
-- claims skip them for that moment, heartbeats and progress do not wait), so
-- none can end before the submit commits unless its settlement sees the new
-- edges (release_children, migration 0003). $1 the parents' ids.
WITH a AS (SELECT id FROM eoq.tasks WHERE id = ANY($1::bigint[]) FOR KEY SHARE),
b AS (SELECT id FROM eoq.waiting WHERE id = ANY($1::bigint[]) FOR KEY SHARE)
SELECT id FROM a UNION ALL SELECT id FROM b;


-- name: parent_states
-- plan: generic
-- Where each parent stands, read after lock_parents in a snapshot of its own.
SELECT id, status, tenant FROM eoq.tasks WHERE id = ANY($1::bigint[])
UNION ALL SELECT id, status, tenant FROM eoq.waiting WHERE id = ANY($1::bigint[])
UNION ALL SELECT id, status, tenant FROM eoq.finished WHERE id = ANY($1::bigint[]);


-- name: relatives
-- plan: generic
-- A task's parents (kind 0) and children (kind 1), wherever each stands.
SELECT e.kind, t.id, t.type, t.status, t.result FROM (
  SELECT 0 AS kind, parent_id AS id FROM eoq.edges WHERE child_id = $1
  UNION ALL SELECT 1, child_id FROM eoq.edges WHERE parent_id = $1) e
CROSS JOIN LATERAL (
  SELECT id, type, status, result::text FROM eoq.tasks WHERE id = e.id
  UNION ALL SELECT id, type, status, result::text FROM eoq.waiting WHERE id = e.id
  UNION ALL SELECT id, type, status, result::text FROM eoq.finished WHERE id = e.id) t
ORDER BY 1, 2;


-- name: submit_batch
-- plan: generic
-- The batch arrives as parallel arrays: one statement, one round trip.
-- Each row draws its id in `src`; the answer is read from `src` too (ord, id
-- and the values the insert wrote: run_at, created_at = now(), version 1), so
-- no join of the inserted rows back to their input and no sort but the keys'.
-- A key goes to the first row that names it (ORDER BY ord); a row whose key
-- was taken is left out of the answer.
WITH src AS MATERIALIZED (
  SELECT nextval('eoq.task_ids') AS id, u.*
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
              $7::bigint[], $8::bigint[], $9::int[], $10::text[], $11::bigint[],
              $12::bigint[], $13::float8[], $15::text[], $16::bigint[])
       WITH ORDINALITY AS u(queue, type, key, tenant, payload, priority, run_at, deadline, max_attempts,
                            backoff, initial_ms, max_ms, jitter, partition_key, timeout_ms, ord)),
k AS (
  INSERT INTO eoq.keys (queue, tenant, key, task_id)
  SELECT queue, coalesce(tenant, ''), key, id FROM src WHERE key IS NOT NULL ORDER BY ord
  ON CONFLICT DO NOTHING RETURNING task_id),
won AS MATERIALIZED (
  SELECT id, queue, type, key, tenant, payload, priority,
         coalesce(('epoch'::timestamptz + run_at::bigint * interval '1 microsecond'), now()) AS run_at,
         ('epoch'::timestamptz + deadline::bigint * interval '1 microsecond') AS deadline,
         max_attempts, backoff, initial_ms, max_ms, jitter, partition_key, timeout_ms, ord
  FROM src WHERE key IS NULL OR id IN (SELECT task_id FROM k)),
ins AS (
  INSERT INTO eoq.tasks (id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
                         max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
                         version, created_at, updated_at, partition_key, timeout_ms)
  SELECT id, queue, type, key, tenant, payload::json, 'pending', priority, run_at, deadline,
         max_attempts, backoff, initial_ms, max_ms, jitter, 1, now(), now(), partition_key, timeout_ms
  FROM won)
SELECT ord, id, run_at, now() AS created_at, 1::bigint AS version,
       (SELECT count(pg_notify($14, q.queue)) FROM (SELECT DISTINCT queue FROM src) q)
FROM won;


-- name: create_stage
-- A large batch that repeats a key, or meets a taken one (see reserve_ids), is
-- COPYed into this stage in its transaction: parsing thirteen
-- arrays of ten thousand elements cost the server more than COPY's text
-- format does. Each row draws its task id as it arrives; then the columns of
-- submit_batch's arrays, then the position.
-- Emptied at COMMIT, so it holds no rows between transactions (nothing for a
-- transaction-pooling proxy to lose), and created once per session: creating
-- and dropping it with each batch cost a millisecond and left dead rows in
-- the catalogs for every batch. Its name carries the schema and a hash of this
-- definition (pg::query puts them in for eoq_stage): its ids come from that
-- schema's sequence, and a transaction-pooling proxy may hand this session to
-- another schema's store, or to a process of another eoq version.
-- Sent as one simple query: the SET keeps "already exists, skipping" notices
-- off the client's stderr, for this transaction only. The answer says whether
-- the id default still draws from this schema's sequence: dropping the schema
-- with CASCADE (to start it afresh, say) takes the default off every
-- session's stage, and renaming it away and migrating again leaves the stage
-- drawing from the old sequence. The store then runs drop_stage and this again.
SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS eoq_stage (id bigint DEFAULT nextval('eoq.task_ids'), queue text, type text,
                                           key text, tenant text, payload text, priority int, run_at bigint,
                                           deadline bigint, max_attempts int, backoff text, initial_ms bigint,
                                           max_ms bigint, jitter float8, partition_key text, timeout_ms bigint,
                                           ord bigint) ON COMMIT DELETE ROWS;
SELECT EXISTS (SELECT FROM pg_catalog.pg_attrdef a
               JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::regclass AND d.objid = a.oid
               WHERE a.adrelid = 'pg_temp.eoq_stage'::regclass AND d.refobjid = 'eoq.task_ids'::regclass)
       AS draws_from_this_schema;


-- name: drop_stage
DROP TABLE pg_temp.eoq_stage;


-- name: copy_stage
COPY pg_temp.eoq_stage (queue, type, key, tenant, payload, priority, run_at, deadline, max_attempts, backoff,
                        initial_ms, max_ms, jitter, partition_key, timeout_ms, ord) FROM STDIN;


-- name: copy_stage_narrow
-- A batch whose tasks differ only in key and payload (as most large batches
-- do): the other columns stay NULL in the stage and the staged statements take
-- them once, as $2-$12. COPY's parsing of eleven columns per row that said
-- the same thing ten thousand times cost a third of its time.
COPY pg_temp.eoq_stage (key, payload, ord) FROM STDIN;


-- name: stage_rows
-- The stage's rows, for submit_staged (as `@stage_rows@`). $2-$12
-- are the columns copy_stage_narrow leaves out (queue, type, tenant,
-- priority, run_at, deadline, max_attempts, backoff, initial_ms, max_ms,
-- jitter), and $14-$15 (partition_key, timeout_ms), all NULL after copy_stage.
-- A stage column is NULL either way when its value is: then so is the parameter.
SELECT id, coalesce(queue, $2) AS queue, coalesce(type, $3) AS type, key, coalesce(tenant, $4) AS tenant,
       payload, coalesce(priority, $5::int) AS priority, coalesce(run_at, $6::bigint) AS run_at,
       coalesce(deadline, $7::bigint) AS deadline, coalesce(max_attempts, $8::int) AS max_attempts,
       coalesce(backoff, $9) AS backoff, coalesce(initial_ms, $10::bigint) AS initial_ms,
       coalesce(max_ms, $11::bigint) AS max_ms, coalesce(jitter, $12::float8) AS jitter,
       coalesce(partition_key, $14) AS partition_key, coalesce(timeout_ms, $15::bigint) AS timeout_ms, ord
FROM pg_temp.eoq_stage


-- name: submit_staged
-- submit_batch, reading the stage (whose rows carry their ids). $1 the
-- notification channel, $2-$12 as stage_rows', $13 the batch's queues, each
-- once (the client knows them: a DISTINCT over the stage cost two percent).
WITH src AS MATERIALIZED (@stage_rows@),
k AS (
  INSERT INTO eoq.keys (queue, tenant, key, task_id)
  SELECT queue, coalesce(tenant, ''), key, id FROM src WHERE key IS NOT NULL ORDER BY ord
  ON CONFLICT DO NOTHING RETURNING task_id),
won AS MATERIALIZED (
  SELECT id, queue, type, key, tenant, payload, priority,
         coalesce(('epoch'::timestamptz + run_at::bigint * interval '1 microsecond'), now()) AS run_at,
         ('epoch'::timestamptz + deadline::bigint * interval '1 microsecond') AS deadline,
         max_attempts, backoff, initial_ms, max_ms, jitter, partition_key, timeout_ms, ord
  FROM src WHERE key IS NULL OR id IN (SELECT task_id FROM k)),
ins AS (
  INSERT INTO eoq.tasks (id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
                         max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
                         version, created_at, updated_at, partition_key, timeout_ms)
  SELECT id, queue, type, key, tenant, payload::json, 'pending', priority, run_at, deadline,
         max_attempts, backoff, initial_ms, max_ms, jitter, 1, now(), now(), partition_key, timeout_ms
  FROM won)
SELECT ord, id, run_at, now() AS created_at, 1::bigint AS version,
       (SELECT count(pg_notify($1, q)) FROM unnest($13::text[]) AS q)
FROM won;


-- name: reserve_ids
-- A large batch whose keys are all new (as most are) goes into the tables by
-- two binary COPYs, copy_keys and copy_tasks, with no stage between: COPY
-- writes rows a page at a time where INSERT ... SELECT writes them one by one,
-- and reads binary fields without parsing text. This draws the batch's $1 ids
-- first, since the keys name their tasks: `first_id` when they run on with no
-- gap (checked here, not assumed), else all of them in `ids` (the store sorts
-- them, so ids still increase in input order); and the time the tasks are
-- created (version 1, run_at as given or that time). It also queues the
-- batch's notifications ($2 the channel, $3 its queues, each once), which go
-- out at COMMIT. One pass, no CTE: materializing the ids to answer them in
-- order cost a third of the statement.
SELECT CASE WHEN max(id) - min(id) = count(*) - 1 THEN min(id) END AS first_id,
       CASE WHEN max(id) - min(id) <> count(*) - 1 THEN array_agg(id) END AS ids,
       now() AS created_at, (SELECT count(pg_notify($2, q)) FROM unnest($3::text[]) AS q)
FROM (SELECT nextval('eoq.task_ids') AS id FROM generate_series(1, $1::int)) AS s;


-- name: copy_keys
-- The keys of a batch whose ids reserve_ids drew, tenant '' for none. A key
-- already taken, or taken by a concurrent submit meanwhile, fails it with a
-- unique violation (it waits for the other transaction first): the store then
-- rolls back to a savepoint and runs submit_staged, whose ON CONFLICT sorts
-- the new keys from the taken ones. A plain insert is half the cost of that
-- speculative one.
COPY eoq.keys (key, queue, tenant, task_id) FROM STDIN (FORMAT binary);


-- name: copy_tasks
-- The tasks of that batch (after copy_keys, when any has a key); the other
-- columns take their defaults: version 1, created and updated now(). Binary
-- fields must match the column types exactly (the store writes them).
COPY eoq.tasks (id, queue, type, key, tenant, payload, status, priority, run_at, deadline, max_attempts, backoff,
                backoff_initial_ms, backoff_max_ms, backoff_jitter, partition_key, timeout_ms) FROM STDIN (FORMAT binary);


-- name: by_keys
-- plan: generic
-- The tasks holding keys ($1 queues, $2 tenants, $3 keys), live, waiting or finished,
-- each with its position in the input.
SELECT q.ord, t.*
FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS q(queue, tenant, key, ord)
JOIN eoq.keys k ON k.queue = q.queue AND k.tenant = coalesce(q.tenant, '') AND k.key = q.key
CROSS JOIN LATERAL (
  SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
         attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
         version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
         checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
  FROM eoq.tasks WHERE id = k.task_id
  UNION ALL
  SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
         attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
         version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
         checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
  FROM eoq.waiting WHERE id = k.task_id
  UNION ALL
  SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
         attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
         version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
         checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
  FROM eoq.finished WHERE id = k.task_id) t;


-- name: claim_fate
-- A candidate's columns for the claim (as `@claim_fate@`), its fate decided
-- once: `final`, NULL to lease it (an anti-join of the leases against the ones
-- to settle cost a quarter of the statement).
t.id, t.status, t.attempts, t.version, t.lease_owner, t.started_at, t.lease_expires_at, t.priority, t.run_at,
CASE WHEN t.deadline <= now() THEN 'expired'
     WHEN t.status = 'running' AND t.cancel_requested THEN 'cancelled'
     WHEN t.status = 'running' AND t.attempts >= t.max_attempts THEN 'failed' END AS final


-- name: claim_ready
-- Which of a queue's tasks a claim may take (as `@claim_ready@`): due, and
-- pending or with a lease run out. $5-$7 (priority, run_at in microseconds,
-- id), all NULL for none: only tasks after this one in claim order
-- (ClaimRequest::after). The index is entered there, past the tasks the
-- worker holds and the dead entries of the tasks it finished (until VACUUM
-- removes them, every claim walked those, a tenth of the statement in a long
-- drain).
t.run_at <= now() AND (t.status = 'pending' OR t.lease_expires_at <= now())
AND (t.priority, t.run_at, t.id) > (coalesce($5::int, (-2147483648)::int),
                                    coalesce('epoch'::timestamptz + $6::bigint * interval '1 microsecond', '-infinity'),
                                    coalesce($7::bigint, 0))


-- name: claim_cand_one
-- The candidates of a claim on one queue (as `@claim_cand_one@`), in claim
-- order through the claim index, so the scan stops after `limit` rows.
-- $1 queue, $2 limit. A paused queue (migration 0009) has no candidates: the
-- probe names only parameters, so it runs once, before the scan. Nor has a
-- queue with limits (migration 0010): claim_limited claims those.
cand AS (
  SELECT @claim_fate@
  FROM eoq.tasks t
  WHERE t.queue = $1 AND @claim_ready@ AND NOT EXISTS (SELECT 1 FROM eoq.paused_queues p WHERE p.queue = $1)
    AND (SELECT eoq.unlimited($1))
  ORDER BY t.priority, t.run_at, t.id LIMIT $2 FOR UPDATE SKIP LOCKED)


-- name: claim_cand
-- claim_cand_one over several queues ($1 an array): the claim index is walked
-- once per queue and the candidates merged, since one scan cannot return
-- (queue, priority, ...) entries in (priority, ...) order.
cand AS (
  SELECT c.* FROM unnest($1::text[]) AS q(name) CROSS JOIN LATERAL (
    SELECT @claim_fate@
    FROM eoq.tasks t
    WHERE t.queue = q.name AND @claim_ready@
      AND NOT EXISTS (SELECT 1 FROM eoq.paused_queues p WHERE p.queue = q.name) AND (SELECT eoq.unlimited(q.name))
    ORDER BY t.priority, t.run_at, t.id LIMIT $2 FOR UPDATE SKIP LOCKED) c
  ORDER BY c.priority, c.run_at, c.id LIMIT $2)


-- name: claim_set
-- The lease a claim writes (as `@claim_set@`); $3 owner, $4 lease in ms.
SET status = 'running', attempts = t.attempts + 1, version = t.version + 1, lease_owner = $3,
    lease_expires_at = now() + ($4::bigint * interval '1 millisecond'), started_at = now(), updated_at = now(),
    progress = 0, stage = ''


-- name: claim_pending_lease
-- What claim_pending_one and claim_pending do after `cand`: the common case,
-- which the store tries first. When every candidate is a pending task to
-- lease, lease them all, by their id range or ids as claim_lease does; with
-- one to settle among them (a deadline passed, a lease run out), lease none
-- and answer `settle` true in a row of NULLs, and the store runs claim_one or
-- claim, which settle it. No candidates: a row of NULLs, `settle` false.
-- The settling parts cost even when they settle nothing (three more tables
-- opened for writing, and the trigger on `finished` fires for an empty
-- insert): 0.07-0.17 ms of an idle worker's one-task claim of 0.2-0.35 ms.
settle AS (SELECT coalesce(bool_or(final IS NOT NULL OR status = 'running'), false) AS settle FROM cand),
span AS (SELECT min(id) AS lo, max(id) AS hi, count(*) AS n FROM cand WHERE NOT (SELECT settle FROM settle)),
upd_near AS (
  UPDATE eoq.tasks t @claim_set@
  WHERE t.id BETWEEN (SELECT lo FROM span WHERE hi - lo < 4 * n) AND (SELECT hi FROM span)
    AND (t.id IN (SELECT id FROM cand) OR t.id IS NULL)
  RETURNING t.*),
upd_apart AS (
  UPDATE eoq.tasks t @claim_set@
  WHERE t.id = ANY(ARRAY(SELECT id FROM cand WHERE (SELECT hi - lo >= 4 * n FROM span)))
  RETURNING t.*)
SELECT t.id, t.queue, t.type, t.key, t.tenant, t.payload, t.status, t.priority, t.run_at, t.deadline,
       t.attempts, t.max_attempts, t.backoff, t.backoff_initial_ms, t.backoff_max_ms, t.backoff_jitter,
       t.version, t.lease_owner, t.lease_expires_at, t.started_at, t.cancel_requested, t.progress, t.stage,
       t.checkpoint_stage, t.checkpoint, t.result, t.last_error, t.created_at, t.updated_at, t.finished_at, t.partition_key, t.timeout_ms,
       s.settle
FROM settle s LEFT JOIN (SELECT * FROM upd_near UNION ALL SELECT * FROM upd_apart) t ON true


-- name: claim_lease
-- What claim_one and claim do after `cand`: settle the candidates that may
-- not run, record lost attempts, lease the rest by their id range or ids, and
-- answer the leases.
ends AS (SELECT id, final FROM cand WHERE final IS NOT NULL),
span AS (SELECT min(id) AS lo, max(id) AS hi, count(*) AS n FROM cand WHERE final IS NULL),
lost AS (
  INSERT INTO eoq.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, lease_expires_at, 'lease_expired', 'lease expired'
  FROM cand WHERE status = 'running'),
gone AS (
  DELETE FROM eoq.tasks t USING ends e WHERE t.id = ANY(ARRAY(SELECT id FROM ends)) AND t.id = e.id
  RETURNING t.*, e.final),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, final AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result,
    CASE final WHEN 'expired' THEN 'deadline passed' WHEN 'failed' THEN 'lease expired'
               ELSE last_error END AS last_error,
    created_at, now() AS updated_at, now() AS finished_at, partition_key, timeout_ms
  FROM gone),
upd_near AS (
  UPDATE eoq.tasks t @claim_set@
  WHERE t.id BETWEEN (SELECT lo FROM span WHERE hi - lo < 4 * n) AND (SELECT hi FROM span)
    AND (t.id IN (SELECT id FROM cand WHERE final IS NULL) OR t.id IS NULL)
  RETURNING t.*),
upd_apart AS (
  UPDATE eoq.tasks t @claim_set@
  WHERE t.id = ANY(ARRAY(SELECT id FROM cand WHERE final IS NULL AND (SELECT hi - lo >= 4 * n FROM span)))
  RETURNING t.*)
SELECT t.id, t.queue, t.type, t.key, t.tenant, t.payload, t.status, t.priority, t.run_at, t.deadline,
       t.attempts, t.max_attempts, t.backoff, t.backoff_initial_ms, t.backoff_max_ms, t.backoff_jitter,
       t.version, t.lease_owner, t.lease_expires_at, t.started_at, t.cancel_requested, t.progress, t.stage,
       t.checkpoint_stage, t.checkpoint, t.result, t.last_error, t.created_at, t.updated_at, t.finished_at, t.partition_key, t.timeout_ms
FROM (SELECT * FROM upd_near UNION ALL SELECT * FROM upd_apart) t


-- name: claim_pending_one
-- plan: generic
-- A claim on one queue, tried first (claim_pending_lease says when it leases).
-- The leases come back unordered (claim() sorts them): a final ORDER BY cost a
-- tenth of the statement. The rows to lease are found again as `complete`
-- finds its rows (`upd_near` by the range of their ids, `upd_apart` by the ids
-- when the range is sparse, never by a join): the range took 6-8% off the
-- statement.
-- $1 queue, $2 limit, $3 owner, $4 lease in ms, $5-$7 ClaimRequest::after.
WITH @claim_cand_one@,
@claim_pending_lease@;


-- name: claim_pending
-- plan: generic
-- claim_pending_one over several queues ($1 an array).
WITH @claim_cand@,
@claim_pending_lease@;


-- name: claim_one
-- plan: generic
-- One statement: pick candidates, settle the ones that may not run (deadline
-- passed, lost lease with no attempts left or a cancel request), record lost
-- attempts, and lease the rest. Run after claim_pending_one found one to
-- settle among its candidates. Parameters as claim_pending_one's.
WITH @claim_cand_one@,
@claim_lease@;


-- name: claim
-- plan: generic
-- claim_one over several queues ($1 an array).
WITH @claim_cand@,
@claim_lease@;


-- name: claim_limited_cand
-- `cand` of claim_one for a queue with limits (migration 0010), parameters as
-- claim_one's (as `@claim_limited_cand@`). The
-- claims of the queue run one at a time (limit_busy's lock), and each counts
-- what runs and what started after the lock, so that no limit is exceeded:
-- `room`, how many the queue may start now. Without limits per partition the
-- claim is claim_one's, at most `room` tasks (`direct`). With them, `full_`
-- holds the partitions at a limit, whose tasks the scan passes over (so they
-- hold back no other partition), and each partition gets at most its room
-- left, by rank in claim order; the scan reads up to four times the claim's
-- limit and locks nothing (claims of the queue wait for one another, and other
-- claims leave it alone): only the tasks picked are locked, and checked again
-- as they are (SKIP LOCKED, and a task that stopped being claimable meanwhile
-- drops out); locking every row scanned cost a third of the drain. Partitions
-- are grouped and matched under COLLATE "C" (bytes; equality is the same under
-- any deterministic collation): sorting them by the database's collation cost
-- a fifth of the claim (29-31 against 23 us per task, 10,000 partitions).
lim AS MATERIALIZED (SELECT * FROM eoq.limits WHERE queue = $1),
busy AS MATERIALIZED (SELECT * FROM eoq.limit_busy($1, $2::bigint)),
room AS MATERIALIZED (
  SELECT greatest(0, least($2::bigint,
                           (SELECT concurrency FROM lim) - (SELECT coalesce(sum(running), 0) FROM busy),
                           (SELECT rate FROM lim) - (SELECT coalesce(sum(started_q), 0) FROM busy))) AS n,
         EXISTS (SELECT 1 FROM lim WHERE partition_concurrency IS NOT NULL OR partition_rate IS NOT NULL)
           AS per_partition),
direct AS (
  SELECT @claim_fate@, t.partition_key
  FROM eoq.tasks t
  WHERE NOT (SELECT per_partition FROM room)
    AND t.queue = $1 AND @claim_ready@ AND NOT EXISTS (SELECT 1 FROM eoq.paused_queues p WHERE p.queue = $1)
  ORDER BY t.priority, t.run_at, t.id LIMIT (SELECT n FROM room) FOR UPDATE SKIP LOCKED),
full_ AS (
  SELECT b.partition_key FROM busy b, lim l
  WHERE b.running >= l.partition_concurrency OR b.started_p >= l.partition_rate),
scan AS (
  SELECT @claim_fate@, t.partition_key
  FROM eoq.tasks t
  WHERE (SELECT per_partition FROM room)
    AND t.queue = $1 AND @claim_ready@ AND NOT EXISTS (SELECT 1 FROM eoq.paused_queues p WHERE p.queue = $1)
    AND t.partition_key NOT IN (SELECT partition_key FROM full_)
  ORDER BY t.priority, t.run_at, t.id
  LIMIT 4 * $2::bigint),
ranked AS (
  SELECT s.*, row_number() OVER (PARTITION BY s.partition_key COLLATE "C" ORDER BY s.priority, s.run_at, s.id) AS rank,
         coalesce(b.running, 0) AS running, coalesce(b.started_p, 0) AS started_p
  FROM scan s LEFT JOIN busy b ON b.partition_key COLLATE "C" = s.partition_key COLLATE "C"),
picked AS MATERIALIZED (
  SELECT r.* FROM ranked r
  WHERE r.rank + r.running <= coalesce((SELECT partition_concurrency FROM lim), 2147483647)
    AND r.rank + r.started_p <= coalesce((SELECT partition_rate FROM lim), 2147483647)
  ORDER BY r.priority, r.run_at, r.id LIMIT (SELECT n FROM room)),
locked AS (
  SELECT t.id FROM eoq.tasks t
  WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) AND t.queue = $1
    AND t.run_at <= now() AND (t.status = 'pending' OR t.lease_expires_at <= now())
  FOR UPDATE SKIP LOCKED),
cand AS (
  SELECT * FROM direct
  UNION ALL
  SELECT p.id, p.status, p.attempts, p.version, p.lease_owner, p.started_at, p.lease_expires_at, p.priority,
         p.run_at, p.final, p.partition_key
  FROM picked p WHERE p.id IN (SELECT id FROM locked))


-- name: claim_limited_record
-- What a limited claim records of the tasks it leases (as
-- `@claim_limited_record@`, after a `leasing` of their ids and partitions):
-- one grant (migration 0012) and, with a rate limit, a start each.
held AS (
  INSERT INTO eoq.grants (queue, at, lo, hi, ids, n)
  SELECT $1, now(), min(id), max(id), CASE WHEN max(id) - min(id) >= 4 * count(*) THEN array_agg(id) END, count(*)
  FROM leasing HAVING count(*) > 0),
started AS (
  INSERT INTO eoq.starts (queue, partition_key, at)
  SELECT $1, partition_key, now() FROM leasing
  WHERE EXISTS (SELECT 1 FROM lim WHERE rate IS NOT NULL OR partition_rate IS NOT NULL))


-- name: claim_limited_pending
-- plan: generic
-- claim_pending_one for a queue with limits: tried first, as the store tries
-- claim_pending_one, since the settling parts of claim_lease cost every claim
-- (a tenth of a limited claim's statement) and settle nothing in most.
WITH @claim_limited_cand@,
leasing AS (
  SELECT id, partition_key FROM cand
  WHERE final IS NULL AND NOT EXISTS (SELECT 1 FROM cand WHERE final IS NOT NULL OR status = 'running')),
@claim_limited_record@,
@claim_pending_lease@;


-- name: claim_limited
-- plan: generic
-- claim_one for a queue with limits: run after claim_limited_pending found a
-- task to settle among its candidates.
WITH @claim_limited_cand@,
leasing AS (SELECT id, partition_key FROM cand WHERE final IS NULL),
@claim_limited_record@,
@claim_lease@;


-- name: rate_room
-- plan: generic
-- After a claim_limited that the limits held back: how many ms until the
-- earliest start in a rate window of queue $1 leaves it, when a claim may
-- start another; 0 when the windows emptied since the claim looked (a claim
-- at the edge of a window); NULL without a rate limit.
SELECT CASE WHEN l.rate IS NOT NULL OR l.partition_rate IS NOT NULL THEN
  coalesce(ceil(extract(epoch FROM least(
             (SELECT min(s.at) + l.rate_period_ms * interval '1 millisecond' FROM eoq.starts s
              WHERE s.queue = $1 AND s.at > now() - l.rate_period_ms * interval '1 millisecond'),
             (SELECT min(s.at) + l.partition_rate_period_ms * interval '1 millisecond' FROM eoq.starts s
              WHERE s.queue = $1 AND s.at > now() - l.partition_rate_period_ms * interval '1 millisecond'))
           - now()) * 1000)::bigint, 0) END AS wait_ms
FROM eoq.limits l WHERE l.queue = $1;


-- name: limits_lock
-- The lock of a queue's limited claims (limit_busy), for set_limits and
-- clear_limits; it also waits for the claims that found the queue without
-- limits (eoq.unlimited) to commit.
SELECT pg_advisory_xact_lock(eoq.limit_lock($1));


-- name: set_limits
-- After limits_lock, in its transaction: the row, and grants for the tasks of
-- the queue running now (under a lease that has not run out; one grant per
-- start time, as a claim's) in place of the queue's grants, so that the
-- limits count tasks that started before they existed, and each task once. $1 queue, $2
-- concurrency, $3 partition_concurrency, $4 rate, $5 its period in ms, $6
-- partition_rate, $7 its period (NULL: that limit off).
WITH up AS (
  INSERT INTO eoq.limits AS l (queue, concurrency, partition_concurrency, rate, rate_period_ms, partition_rate,
                               partition_rate_period_ms)
  VALUES ($1, $2, $3, $4, $5, $6, $7)
  ON CONFLICT (queue) DO UPDATE
  SET concurrency = EXCLUDED.concurrency, partition_concurrency = EXCLUDED.partition_concurrency,
      rate = EXCLUDED.rate, rate_period_ms = EXCLUDED.rate_period_ms, partition_rate = EXCLUDED.partition_rate,
      partition_rate_period_ms = EXCLUDED.partition_rate_period_ms, updated_at = now()
  RETURNING 1),
old AS (DELETE FROM eoq.grants WHERE queue = $1),
g AS (
  INSERT INTO eoq.grants (queue, at, lo, hi, ids, n)
  SELECT $1, started_at, min(id), max(id), array_agg(id), count(*) FROM eoq.tasks
  WHERE queue = $1 AND status = 'running' AND lease_expires_at > now()
  GROUP BY started_at)
SELECT count(*) FROM up;


-- name: clear_limits
-- After limits_lock: the queue has no limits from this commit on.
WITH l AS (DELETE FROM eoq.limits WHERE queue = $1 RETURNING 1),
g AS (DELETE FROM eoq.grants WHERE queue = $1),
s AS (DELETE FROM eoq.starts WHERE queue = $1)
SELECT count(*) FROM l;


-- name: limits
SELECT queue, concurrency, partition_concurrency, rate, rate_period_ms, partition_rate, partition_rate_period_ms
FROM eoq.limits ORDER BY queue;


-- name: complete
-- plan: generic
-- $1 ids, $2 lease versions, $3 results (arrays, one entry per lease), or
-- $3 NULL when every result is JSON null, as a handler leaves it unless it
-- sets one: the one-time filters on $3 then skip the meeting of rows and
-- results (two sorts and a merge join, an eighth of the statement).
-- The rows are found through the primary key and fenced by a hashed (id,
-- version) lookup, never by a join with the input: on a table of tens of
-- thousands of rows the planner priced a join's thousand index probes above a
-- sequential scan and read the whole table per batch (`id = ANY($1)` likewise,
-- knowing the array's length). A batch's ids are mostly neighbours (tasks are
-- claimed in order), so when they span less than four ids apiece `gone_near`
-- reads the primary key once over their range and the fence drops the
-- strangers in it; otherwise `gone_apart` finds them by `id = ANY(ARRAY(...))`,
-- which on Postgres 15 descends the index once per id (a tenth of the
-- statement). The other one reads nothing: an empty range, an empty array.
-- (One DELETE with an OR of both would need a bitmap scan, which the store's
-- generic plans leave off.) Each settled row
-- meets its lease's result afterwards (by id and version, so a stale lease of
-- the same task in the batch lends it nothing), once even when the lease came
-- twice. Answers the (id, lease version) of each task settled.
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS f(id, v)),
span AS (SELECT min(id) AS lo, max(id) AS hi, count(*) AS n FROM f),
gone_near AS (
  DELETE FROM eoq.tasks t
  WHERE t.id BETWEEN (SELECT lo FROM span WHERE hi - lo < 4 * n) AND (SELECT hi FROM span)
    AND t.status = 'running' AND ((t.id, t.version) IN (SELECT id, v FROM f) OR t.id IS NULL)
  RETURNING t.*),
gone_apart AS (
  DELETE FROM eoq.tasks t
  WHERE t.id = ANY(ARRAY(SELECT id FROM f WHERE (SELECT hi - lo >= 4 * n FROM span)))
    AND t.status = 'running' AND ((t.id, t.version) IN (SELECT id, v FROM f) OR t.id IS NULL)
  RETURNING t.*),
gone AS (SELECT * FROM gone_near UNION ALL SELECT * FROM gone_apart),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'succeeded' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested,
    100 AS progress, stage,
    checkpoint_stage, checkpoint, new_result::json AS result, last_error, created_at, now() AS updated_at,
    now() AS finished_at, partition_key, timeout_ms
  FROM (SELECT gone.*, 'null' AS new_result FROM gone WHERE $3::text[] IS NULL
        UNION ALL
        SELECT gone.*, r.result FROM gone
        JOIN (SELECT DISTINCT ON (id, v) id, v, result FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS r(id, v, result)) r
          ON r.id = gone.id AND r.v = gone.version
        WHERE $3::text[] IS NOT NULL) g
  RETURNING id, version)
SELECT id, version - 1 AS version FROM fin;


-- name: complete_one
-- plan: generic
-- One lease's completion inside its handler's transaction, sent in one
-- pipeline with the COMMIT after it, so the client never sees the answer
-- before the COMMIT runs: a lease no longer held must abort the transaction
-- itself, or the COMMIT would keep the handler's writes without the
-- completion. No row settled calls lease_lost (migration 0007), which raises
-- SQLSTATE EQ001. The batched `complete` cost a one-task transaction 0.12 ms
-- of the server's time on its arrays, spans and unions; this costs a tenth
-- of that. $1 id, $2 lease version, $3 the result (JSON text).
WITH gone AS (
  DELETE FROM eoq.tasks t WHERE t.id = $1 AND t.version = $2 AND t.status = 'running'
  RETURNING t.*),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'succeeded' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested,
    100 AS progress, stage,
    checkpoint_stage, checkpoint, $3::json AS result, last_error, created_at, now() AS updated_at,
    now() AS finished_at, partition_key, timeout_ms
  FROM gone
  RETURNING id)
SELECT CASE WHEN count(*) = 1 THEN $1::bigint ELSE eoq.lease_lost($1, $2) END AS id FROM fin;


-- name: fail
-- plan: generic
-- $1 id, $2 lease version, $3 error, $4 permanent, $5 retry delay in ms.
-- Answers the outcome ('retry', 'failed' or 'cancelled') and, for a retry,
-- when the task runs again; no row: the lease is gone.
WITH t AS (
  SELECT id, attempts, version, lease_owner, started_at,
         CASE WHEN cancel_requested THEN 'cancelled'
              WHEN $4::boolean OR attempts >= max_attempts THEN 'failed' ELSE 'retry' END AS outcome
  FROM eoq.tasks WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO eoq.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), outcome, $3 FROM t),
gone AS (DELETE FROM eoq.tasks x USING t WHERE x.id = t.id AND t.outcome <> 'retry' RETURNING x.*, t.outcome),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, outcome AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, $3 AS last_error, created_at, now() AS updated_at, now() AS finished_at, partition_key, timeout_ms
  FROM gone),
up AS (
  UPDATE eoq.tasks x
  SET status = 'pending', version = x.version + 1, run_at = now() + ($5::bigint * interval '1 millisecond'),
      last_error = $3, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  FROM t WHERE x.id = t.id AND t.outcome = 'retry'
  RETURNING x.run_at)
SELECT t.outcome, (SELECT run_at FROM up) AS run_at FROM t;


-- name: release
-- plan: generic
-- Gives a running task back unrun ($1 id, $2 lease version, $3 channel): the
-- attempt does not count. A task with a cancel request ends cancelled instead.
WITH t AS (
  SELECT id, cancel_requested, attempts, version, lease_owner, started_at FROM eoq.tasks
  WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO eoq.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), 'cancelled', NULL FROM t WHERE cancel_requested),
gone AS (DELETE FROM eoq.tasks x USING t WHERE x.id = t.id AND t.cancel_requested RETURNING x.*),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'cancelled' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, now() AS updated_at, now() AS finished_at, partition_key, timeout_ms
  FROM gone),
up AS (
  UPDATE eoq.tasks x
  SET status = 'pending', version = x.version + 1, attempts = x.attempts - 1, run_at = now(),
      lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  FROM t WHERE x.id = t.id AND NOT t.cancel_requested RETURNING x.id)
SELECT t.id, (SELECT pg_notify($3, queue) FROM eoq.tasks WHERE id = $1) FROM t;


-- name: release_batch
-- plan: generic
-- release for many leases in one statement ($1 ids, $2 lease versions, $3
-- channel), each fenced by its (id, version); answers the pairs given back.
-- Rows are found and fenced as in complete, and locked in id order.
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS f(id, v)),
t AS (
  SELECT id, queue, cancel_requested, attempts, version, lease_owner, started_at FROM eoq.tasks
  WHERE id = ANY(ARRAY(SELECT id FROM f)) AND status = 'running'
    AND ((id, version) IN (SELECT id, v FROM f) OR id IS NULL)
  ORDER BY id FOR UPDATE),
h AS (
  INSERT INTO eoq.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), 'cancelled', NULL FROM t WHERE cancel_requested),
gone AS (
  DELETE FROM eoq.tasks x WHERE x.id = ANY(ARRAY(SELECT id FROM t WHERE cancel_requested)) RETURNING x.*),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'cancelled' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, now() AS updated_at, now() AS finished_at, partition_key, timeout_ms
  FROM gone),
up AS (
  UPDATE eoq.tasks x
  SET status = 'pending', version = x.version + 1, attempts = x.attempts - 1, run_at = now(),
      lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  WHERE x.id = ANY(ARRAY(SELECT id FROM t WHERE NOT cancel_requested)) RETURNING x.id)
SELECT id, version, (SELECT count(pg_notify($3, q.queue)) FROM (SELECT DISTINCT queue FROM t) q) FROM t;


-- name: expire_lease
-- plan: generic
-- Ends a just-claimed task expired if its deadline has passed ($1 id, $2
-- lease version). The deadline is judged by now() here, not by the worker
-- that asks: the answer is the same whatever its clock says.
WITH t AS (
  SELECT id, attempts, version, lease_owner, started_at, coalesce(deadline <= now(), false) AS overdue
  FROM eoq.tasks WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO eoq.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), 'expired', 'deadline passed before the task started'
  FROM t WHERE overdue),
gone AS (DELETE FROM eoq.tasks x USING t WHERE x.id = t.id AND t.overdue RETURNING x.*),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'expired' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, 'deadline passed' AS last_error, created_at, now() AS updated_at,
    now() AS finished_at, partition_key, timeout_ms
  FROM gone)
SELECT overdue FROM t;


-- name: cancel_lease
-- plan: generic
-- A running task stopped by its handler ends cancelled ($1 id, $2 lease
-- version, $3 reason).
WITH t AS (
  SELECT id, attempts, version, lease_owner, started_at FROM eoq.tasks
  WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO eoq.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), 'cancelled', $3 FROM t),
gone AS (DELETE FROM eoq.tasks x USING t WHERE x.id = t.id RETURNING x.*),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'cancelled' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, now() AS updated_at, now() AS finished_at, partition_key, timeout_ms
  FROM gone
  RETURNING id)
SELECT id FROM fin;


-- name: snooze
-- plan: generic
-- A running task put off by its holder ($1 id, $2 lease version, $3 delay in
-- ms, $4 channel): pending again at now() + $3, the attempt recorded as
-- 'snoozed' but taken back (attempts - 1, as in release), so the next claim
-- starts the same attempt number again. A task with a cancel request ends
-- cancelled instead, as release ends it. Answers the outcome ('snoozed' or
-- 'cancelled') and the new run_at; no row: the lease is gone. Only a task due
-- at once is worth a notification.
WITH t AS (
  SELECT id, cancel_requested, attempts, version, lease_owner, started_at FROM eoq.tasks
  WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO eoq.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(),
         CASE WHEN cancel_requested THEN 'cancelled' ELSE 'snoozed' END, NULL FROM t),
gone AS (DELETE FROM eoq.tasks x USING t WHERE x.id = t.id AND t.cancel_requested RETURNING x.*),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'cancelled' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, now() AS updated_at, now() AS finished_at, partition_key, timeout_ms
  FROM gone),
up AS (
  UPDATE eoq.tasks x
  SET status = 'pending', version = x.version + 1, attempts = x.attempts - 1,
      run_at = now() + ($3::bigint * interval '1 millisecond'),
      lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  FROM t WHERE x.id = t.id AND NOT t.cancel_requested
  RETURNING x.run_at, x.queue)
SELECT CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'snoozed' END AS outcome,
       (SELECT run_at FROM up) AS run_at,
       (SELECT pg_notify($4, queue) FROM up WHERE $3::bigint = 0) AS notified
FROM t;


-- name: heartbeat
-- plan: generic
-- $1 id, $2 lease version, $3 extension in ms. A lease that ran out is
-- extended too, unless its queue has limits: a claim may have counted its
-- place free and given it to another task (migration 0010).
UPDATE eoq.tasks t SET lease_expires_at = now() + ($3::bigint * interval '1 millisecond')
WHERE id = $1 AND version = $2 AND status = 'running'
  AND (lease_expires_at > now() OR NOT EXISTS (SELECT 1 FROM eoq.limits l WHERE l.queue = t.queue))
RETURNING lease_expires_at, cancel_requested;


-- name: progress
-- plan: generic
UPDATE eoq.tasks SET progress = $3, stage = $4, updated_at = now()
WHERE id = $1 AND version = $2 AND status = 'running'
RETURNING id;


-- name: checkpoint
-- plan: generic
UPDATE eoq.tasks SET checkpoint_stage = $3, checkpoint = $4::json, updated_at = now()
WHERE id = $1 AND version = $2 AND status = 'running'
RETURNING id;


-- name: cancel
-- plan: generic
-- $1 id, $2 the scope's tenant (NULL: every tenant), $3 whether a running
-- task gets a cancel request (remove runs this with false). A pending task ends
-- cancelled; a running one gets a cancel request its worker sees at the next
-- heartbeat. The counts say which happened, or whether the task is finished or
-- unknown; all zero but `live`: it changed state under us (claimed or settled
-- meanwhile), so the caller locks it (lock_task) and runs this again. A
-- waiting task is cancelled like a pending one; its own waiting children
-- follow it (release_children).
WITH gp AS (
  DELETE FROM eoq.tasks WHERE id = $1 AND status = 'pending' AND ($2::text IS NULL OR tenant = $2)
  RETURNING *),
gw AS (
  DELETE FROM eoq.waiting WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
  RETURNING id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
            attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
            version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
            checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms),
gone AS (SELECT * FROM gp UNION ALL SELECT * FROM gw),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'cancelled' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, now() AS updated_at, now() AS finished_at, partition_key, timeout_ms
  FROM gone
  RETURNING id),
req AS (
  UPDATE eoq.tasks SET cancel_requested = true, updated_at = now()
  WHERE id = $1 AND status = 'running' AND ($2::text IS NULL OR tenant = $2) AND $3::boolean
  RETURNING id)
SELECT (SELECT count(*) FROM fin) AS cancelled,
       (SELECT count(*) FROM req) AS requested,
       (SELECT count(*) FROM eoq.finished WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)) AS finished,
       (SELECT count(*) FROM eoq.tasks WHERE id = $1 AND ($2::text IS NULL OR tenant = $2))
         + (SELECT count(*) FROM eoq.waiting WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)) AS live;


-- name: lock_task
-- plan: generic
-- Holds the task's live row until the transaction ends, so cancel, run next,
-- sees it in a state that cannot change under it (claims skip locked rows;
-- settling waits).
SELECT id FROM eoq.tasks WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) FOR UPDATE;


-- name: remove_finished
-- plan: generic
-- $1 id, $2 the scope's tenant. remove's last step, after `cancel` (without a
-- cancel request) has ended a pending or waiting task. A finished task goes with its key, attempts and
-- the edges to its parents, as prune takes them. `running`: it is running, so
-- nothing was deleted; `moved`: it is pending or waiting, having moved under
-- the `cancel` before (a waiting task released meanwhile): run remove again.
WITH v AS (
  SELECT id, queue, tenant, key FROM eoq.finished WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) FOR UPDATE),
dk AS (DELETE FROM eoq.keys k USING v
       WHERE k.queue = v.queue AND k.tenant = coalesce(v.tenant, '') AND k.key = v.key AND k.task_id = v.id),
da AS (DELETE FROM eoq.attempts a USING v WHERE a.task_id = v.id),
de AS (DELETE FROM eoq.edges e USING v WHERE e.child_id = v.id),
df AS (DELETE FROM eoq.finished f USING v WHERE f.id = v.id RETURNING 1)
SELECT (SELECT count(*) FROM df) AS removed,
       (SELECT count(*) FROM eoq.tasks WHERE id = $1 AND status = 'running' AND ($2::text IS NULL OR tenant = $2))
         AS running,
       (SELECT count(*) FROM eoq.tasks WHERE id = $1 AND status = 'pending' AND ($2::text IS NULL OR tenant = $2))
         + (SELECT count(*) FROM eoq.waiting WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)) AS moved;


-- name: retry
-- plan: generic
-- $1 id, $2 the scope's tenant (NULL: every tenant), $3 channel.
-- A task settled other than in success goes back to the live table as it was,
-- pending now, with one attempt more than it has used if it has none left; its
-- history rows stay. A deadline that has passed is dropped, or the task would
-- only expire again.
WITH gone AS (
  DELETE FROM eoq.finished
  WHERE id = $1 AND status IN ('failed', 'cancelled', 'expired') AND ($2::text IS NULL OR tenant = $2)
  RETURNING *),
back AS (
  INSERT INTO eoq.tasks (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'pending' AS status, priority, now() AS run_at,
    CASE WHEN deadline > now() THEN deadline END AS deadline,
    attempts, greatest(max_attempts, attempts + 1) AS max_attempts, backoff, backoff_initial_ms, backoff_max_ms,
    backoff_jitter,
    version + 1 AS version, NULL AS lease_owner, NULL AS lease_expires_at, NULL AS started_at,
    false AS cancel_requested, 0 AS progress, '' AS stage,
    checkpoint_stage, checkpoint, NULL AS result, last_error, created_at, now() AS updated_at,
    NULL AS finished_at, partition_key, timeout_ms
  FROM gone
  RETURNING queue)
SELECT (SELECT count(pg_notify($3, queue)) FROM back) AS retried,
       (SELECT count(*) FROM eoq.finished WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)) AS finished,
       (SELECT count(*) FROM eoq.tasks WHERE id = $1 AND ($2::text IS NULL OR tenant = $2))
         + (SELECT count(*) FROM eoq.waiting WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)) AS live;


-- name: get
-- plan: generic
-- $1 id, $2 the scope's tenant (NULL: every tenant).
SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
       attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
       version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
       checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
FROM eoq.tasks WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
UNION ALL
SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
       attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
       version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
       checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
FROM eoq.waiting WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
UNION ALL
SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
       attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
       version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
       checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
FROM eoq.finished WHERE id = $1 AND ($2::text IS NULL OR tenant = $2);


-- name: list
-- $1 queue, $2 status, $3 type, $4 tenant (each NULL: any), $5 the last id of
-- the previous page, $6 the page size; the search, each NULL for any: $7 key,
-- $8 key prefix, $9 type prefix, $10 a JSON value the payload contains
-- (jsonb_contains: jsonb's containment operator), $11 text in last_error (any case). A status filter names one table only;
-- the other side is cut by a parameter-only condition the executor evaluates
-- once. Oldest first; list_desc is the same newest first: two statements
-- rather than a parameterised ORDER BY, so each keeps a plan that walks the
-- primary key in its own direction.
SELECT * FROM (
  (SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
          attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
          version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
          checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
   FROM eoq.tasks
   WHERE ($2::text IS NULL OR $2::text IN ('pending', 'running'))
     AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2)
     AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
     AND ($7::text IS NULL OR key = $7) AND ($8::text IS NULL OR starts_with(key, $8))
     AND ($9::text IS NULL OR starts_with(type, $9))
     AND ($10::jsonb IS NULL OR jsonb_contains(payload::jsonb, $10::jsonb))
     AND ($11::text IS NULL OR strpos(lower(last_error), lower($11)) > 0) AND id > $5
   ORDER BY id ASC LIMIT $6)
  UNION ALL
  (SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
          attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
          version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
          checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
   FROM eoq.waiting
   WHERE ($2::text IS NULL OR $2::text = 'waiting')
     AND ($1::text IS NULL OR queue = $1)
     AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
     AND ($7::text IS NULL OR key = $7) AND ($8::text IS NULL OR starts_with(key, $8))
     AND ($9::text IS NULL OR starts_with(type, $9))
     AND ($10::jsonb IS NULL OR jsonb_contains(payload::jsonb, $10::jsonb))
     AND ($11::text IS NULL OR strpos(lower(last_error), lower($11)) > 0) AND id > $5
   ORDER BY id ASC LIMIT $6)
  UNION ALL
  (SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
          attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
          version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
          checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
   FROM eoq.finished
   WHERE ($2::text IS NULL OR $2::text NOT IN ('pending', 'running', 'waiting'))
     AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2)
     AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
     AND ($7::text IS NULL OR key = $7) AND ($8::text IS NULL OR starts_with(key, $8))
     AND ($9::text IS NULL OR starts_with(type, $9))
     AND ($10::jsonb IS NULL OR jsonb_contains(payload::jsonb, $10::jsonb))
     AND ($11::text IS NULL OR strpos(lower(last_error), lower($11)) > 0) AND id > $5
   ORDER BY id ASC LIMIT $6)) x
ORDER BY id ASC LIMIT $6;


-- name: list_desc
SELECT * FROM (
  (SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
          attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
          version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
          checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
   FROM eoq.tasks
   WHERE ($2::text IS NULL OR $2::text IN ('pending', 'running'))
     AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2)
     AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
     AND ($7::text IS NULL OR key = $7) AND ($8::text IS NULL OR starts_with(key, $8))
     AND ($9::text IS NULL OR starts_with(type, $9))
     AND ($10::jsonb IS NULL OR jsonb_contains(payload::jsonb, $10::jsonb))
     AND ($11::text IS NULL OR strpos(lower(last_error), lower($11)) > 0) AND id < $5
   ORDER BY id DESC LIMIT $6)
  UNION ALL
  (SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
          attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
          version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
          checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
   FROM eoq.waiting
   WHERE ($2::text IS NULL OR $2::text = 'waiting')
     AND ($1::text IS NULL OR queue = $1)
     AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
     AND ($7::text IS NULL OR key = $7) AND ($8::text IS NULL OR starts_with(key, $8))
     AND ($9::text IS NULL OR starts_with(type, $9))
     AND ($10::jsonb IS NULL OR jsonb_contains(payload::jsonb, $10::jsonb))
     AND ($11::text IS NULL OR strpos(lower(last_error), lower($11)) > 0) AND id < $5
   ORDER BY id DESC LIMIT $6)
  UNION ALL
  (SELECT id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
          attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
          version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
          checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms
   FROM eoq.finished
   WHERE ($2::text IS NULL OR $2::text NOT IN ('pending', 'running', 'waiting'))
     AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2)
     AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
     AND ($7::text IS NULL OR key = $7) AND ($8::text IS NULL OR starts_with(key, $8))
     AND ($9::text IS NULL OR starts_with(type, $9))
     AND ($10::jsonb IS NULL OR jsonb_contains(payload::jsonb, $10::jsonb))
     AND ($11::text IS NULL OR strpos(lower(last_error), lower($11)) > 0) AND id < $5
   ORDER BY id DESC LIMIT $6)) x
ORDER BY id DESC LIMIT $6;


-- name: list_count
-- list's filters ($1 queue, $2 status, $3 type, $4 tenant; $6.. the search as
-- list's $7..), counted up to $5 rows per table (the caller's count_up_to + 1):
-- a large table costs a bounded count, and more than count_up_to in all means
-- "at least". The three tables, as list reads them.
SELECT (SELECT count(*) FROM (
          SELECT 1 FROM eoq.tasks
          WHERE ($2::text IS NULL OR $2::text IN ('pending', 'running'))
            AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2)
            AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
            AND ($6::text IS NULL OR key = $6) AND ($7::text IS NULL OR starts_with(key, $7))
            AND ($8::text IS NULL OR starts_with(type, $8))
            AND ($9::jsonb IS NULL OR jsonb_contains(payload::jsonb, $9::jsonb))
            AND ($10::text IS NULL OR strpos(lower(last_error), lower($10)) > 0)
          LIMIT $5) a)
     + (SELECT count(*) FROM (
          SELECT 1 FROM eoq.waiting
          WHERE ($2::text IS NULL OR $2::text = 'waiting')
            AND ($1::text IS NULL OR queue = $1) 
            AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
            AND ($6::text IS NULL OR key = $6) AND ($7::text IS NULL OR starts_with(key, $7))
            AND ($8::text IS NULL OR starts_with(type, $8))
            AND ($9::jsonb IS NULL OR jsonb_contains(payload::jsonb, $9::jsonb))
            AND ($10::text IS NULL OR strpos(lower(last_error), lower($10)) > 0)
          LIMIT $5) w)
     + (SELECT count(*) FROM (
          SELECT 1 FROM eoq.finished
          WHERE ($2::text IS NULL OR $2::text NOT IN ('pending', 'running', 'waiting'))
            AND ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2)
            AND ($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)
            AND ($6::text IS NULL OR key = $6) AND ($7::text IS NULL OR starts_with(key, $7))
            AND ($8::text IS NULL OR starts_with(type, $8))
            AND ($9::jsonb IS NULL OR jsonb_contains(payload::jsonb, $9::jsonb))
            AND ($10::text IS NULL OR strpos(lower(last_error), lower($10)) > 0)
          LIMIT $5) b) AS count;


-- name: count_estimate
-- Both task tables' rows as the planner would estimate them: its tuple density
-- (reltuples / relpages) times the pages there are now. NULL while either
-- table was never vacuumed or analyzed (reltuples -1): nothing to go on.
SELECT CASE WHEN bool_or(c.reltuples < 0) THEN NULL
            ELSE sum(CASE WHEN c.relpages > 0
                          THEN c.reltuples / c.relpages
                               * (pg_relation_size(c.oid) / current_setting('block_size')::bigint)
                          ELSE c.reltuples END)::bigint END AS estimate
FROM pg_class c WHERE c.oid IN ('eoq.tasks'::regclass, 'eoq.finished'::regclass);


-- name: stats
-- $1 the scope's tenant (NULL: every tenant). Live states are counted (the
-- live tables hold no history); finished ones are summed from eoq.totals
-- (migration 0008), whose size does not grow with the history. Columns:
-- count (rows now), oldest_pending_ms, last_minute (finished in the 10 s
-- buckets of the last minute), total (ever finished; never lowered).
SELECT queue, status, count(*)::bigint AS count,
       (extract(epoch FROM now() - min(run_at) FILTER (WHERE status = 'pending' AND run_at <= now())) * 1000)::bigint
         AS oldest_pending_ms,
       0::bigint AS last_minute, 0::bigint AS total
FROM eoq.tasks WHERE $1::text IS NULL OR tenant = $1 GROUP BY queue, status
UNION ALL
SELECT queue, status, count(*)::bigint, NULL::bigint, 0::bigint, 0::bigint
FROM eoq.waiting WHERE $1::text IS NULL OR tenant = $1 GROUP BY queue, status
UNION ALL
SELECT queue, status, (sum(added) - sum(removed))::bigint, NULL::bigint,
       coalesce(sum(added) FILTER (WHERE bucket > now() - interval '1 minute'), 0)::bigint, sum(added)::bigint
FROM eoq.totals WHERE $1::text IS NULL OR tenant = $1 GROUP BY queue, status
UNION ALL
SELECT queue, 'paused', 0::bigint, NULL::bigint, 0::bigint, 0::bigint FROM eoq.paused_queues;


-- name: pause
-- $1 queue. Claims take none of its tasks from this commit on.
INSERT INTO eoq.paused_queues (queue) VALUES ($1) ON CONFLICT (queue) DO NOTHING;


-- name: resume
-- $1 queue, $2 channel: the workers waiting on it wake up at once.
WITH gone AS (DELETE FROM eoq.paused_queues WHERE queue = $1 RETURNING queue)
SELECT count(pg_notify($2, queue)) AS resumed FROM gone;


-- name: paused_queues
SELECT queue FROM eoq.paused_queues ORDER BY queue;


-- name: throughput
-- Tasks finished per minute over the last $2 minutes, by queue and outcome,
-- from the same buckets as stats: what the dashboard's charts draw when a
-- page opens. $1 the scope's tenant (NULL: every tenant).
SELECT queue, status, date_trunc('minute', bucket) AS minute, sum(added)::bigint AS finished
FROM eoq.totals
WHERE ($1::text IS NULL OR tenant = $1) AND bucket >= date_trunc('minute', now()) - ($2::int * interval '1 minute')
  AND added > 0
GROUP BY 1, 2, 3 ORDER BY 3, 1, 2;


-- name: compact_totals
-- Sums the rows that the triggers of migration 0008 appended: one row per
-- (queue, tenant, status, bucket), 10 s buckets for five minutes, minutes for
-- two hours, one '-infinity' bucket before. Safe beside itself: a second
-- compaction waits on the rows the first deletes and skips them, so nothing
-- is summed twice.
WITH gone AS (DELETE FROM eoq.totals RETURNING *)
INSERT INTO eoq.totals (queue, tenant, status, bucket, added, removed)
SELECT queue, tenant, status,
       CASE WHEN bucket < now() - interval '2 hours' THEN timestamptz '-infinity'
            WHEN bucket < now() - interval '5 minutes' THEN date_trunc('minute', bucket)
            ELSE bucket END,
       sum(added), sum(removed)
FROM gone GROUP BY 1, 2, 3, 4;


-- name: history
-- A task's attempts: those that ended other than in success from the attempts
-- table, the running or succeeded one from the task's own row. A snoozed
-- attempt shares its number with the attempt after it: the lease's version
-- orders them.
SELECT attempt, owner, started_at, finished_at, outcome, error, version FROM eoq.attempts WHERE task_id = $1
UNION ALL
SELECT attempts, lease_owner, started_at, NULL::timestamptz, 'running', NULL, version FROM eoq.tasks
WHERE id = $1 AND status = 'running'
UNION ALL
SELECT attempts, lease_owner, started_at, finished_at, 'succeeded', NULL, version FROM eoq.finished
WHERE id = $1 AND status = 'succeeded'
ORDER BY 1, 7;


-- name: settled
-- plan: generic
-- After a lost connection: did my settlement commit? The settled row (or the
-- attempt row of a failure) carries the version the lease saw ($2).
SELECT status FROM eoq.finished WHERE id = $1 AND version = $2 + 1
UNION ALL
SELECT outcome FROM eoq.attempts WHERE task_id = $1 AND version = $2 AND outcome <> 'lease_expired';


-- name: now
-- plan: generic
SELECT now();


-- name: expire
-- Pending tasks whose deadline passed end expired, $1 at a time.
WITH v AS (SELECT id FROM eoq.tasks WHERE status = 'pending' AND deadline <= now() LIMIT $1 FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM eoq.tasks t USING v WHERE t.id = v.id RETURNING t.*),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload, 'expired' AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, 'deadline passed' AS last_error, created_at, now() AS updated_at,
    now() AS finished_at, partition_key, timeout_ms
  FROM gone
  RETURNING 1)
SELECT count(*) FROM fin;


-- name: reap
-- Running tasks whose lease ran out and that may not run again (no attempts
-- left, or a cancel request) end failed or cancelled, $1 at a time. The rest
-- are claimed again by claim, which settles these too; reaping serves queues
-- no worker claims from.
WITH v AS (
  SELECT id, attempts, version, lease_owner, started_at, lease_expires_at, cancel_requested FROM eoq.tasks
  WHERE status = 'running' AND lease_expires_at <= now() AND (attempts >= max_attempts OR cancel_requested)
  LIMIT $1 FOR UPDATE SKIP LOCKED),
h AS (
  INSERT INTO eoq.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, lease_expires_at, 'lease_expired', 'lease expired' FROM v),
gone AS (DELETE FROM eoq.tasks t USING v WHERE t.id = v.id RETURNING t.*),
fin AS (
  INSERT INTO eoq.finished (
    id, queue, type, key, tenant, payload, status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version, lease_owner, lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result, last_error, created_at, updated_at, finished_at, partition_key, timeout_ms)
  SELECT
    id, queue, type, key, tenant, payload,
    CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END AS status, priority, run_at, deadline,
    attempts, max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter,
    version + 1 AS version, lease_owner, NULL AS lease_expires_at, started_at, cancel_requested, progress, stage,
    checkpoint_stage, checkpoint, result,
    CASE WHEN cancel_requested THEN last_error ELSE 'lease expired' END AS last_error,
    created_at, now() AS updated_at, now() AS finished_at, partition_key, timeout_ms
  FROM gone
  RETURNING 1)
SELECT count(*) FROM fin;


-- name: prune
-- Finished tasks older than $1 ms go, with their key, attempts and the edges
-- to their parents, $2 at a time.
WITH v AS (
  SELECT id, queue, tenant, key FROM eoq.finished
  WHERE finished_at < now() - ($1::bigint * interval '1 millisecond')
  LIMIT $2 FOR UPDATE SKIP LOCKED),
dk AS (DELETE FROM eoq.keys k USING v
       WHERE k.queue = v.queue AND k.tenant = coalesce(v.tenant, '') AND k.key = v.key AND k.task_id = v.id),
da AS (DELETE FROM eoq.attempts a USING v WHERE a.task_id = v.id),
de AS (DELETE FROM eoq.edges e USING v WHERE e.child_id = v.id),
df AS (DELETE FROM eoq.finished f USING v WHERE f.id = v.id RETURNING 1)
SELECT count(*) FROM df;


-- name: prunable
SELECT count(*) FROM eoq.finished WHERE finished_at < now() - ($1::bigint * interval '1 millisecond');


-- name: table_stats
-- How many rows the planner believes the live table holds, and whether it was
-- never analyzed (see refresh_stats in postgres_store.cpp). The statistics
-- functions, not the pg_stat_user_tables view: preparing and running this on
-- a new connection took 0.4 ms, the view 3.5 ms (psql, one server).
SELECT c.reltuples::float8 AS reltuples,
       pg_stat_get_last_analyze_time(c.oid) IS NULL AND pg_stat_get_last_autoanalyze_time(c.oid) IS NULL
         AS never_analyzed
FROM pg_class c
WHERE c.oid = 'eoq.tasks'::regclass;


-- name: analyze
-- Only the columns the claim's plan depends on: a third of the whole table's
-- cost, and paid by the submit_batch that asks for it.
ANALYZE eoq.tasks (queue, status, priority, run_at, lease_expires_at, deadline);


-- name: migrate_lock
-- Serialises concurrent migrate() calls for one schema across processes; $1
-- is 'eoq.migrate.' and the schema's name, bound rather than written here.
SELECT pg_advisory_xact_lock(hashtextextended($1, 0));


-- name: migrations_table
-- breaks_older: the migration breaks programs built before it (its SQL holds
-- the line `-- eoq:breaks-older-workers`, docs/upgrading.md); added to a table
-- of an older eoq by migrations_breaks_column.
CREATE TABLE IF NOT EXISTS eoq.migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now(),
                                           breaks_older boolean NOT NULL DEFAULT false);


-- name: migrations_breaks_column
-- Run only when migrations_has_breaks finds the column missing: ALTER TABLE
-- takes ACCESS EXCLUSIVE on the table even when the column is there.
ALTER TABLE eoq.migrations ADD COLUMN IF NOT EXISTS breaks_older boolean NOT NULL DEFAULT false;


-- name: migrations_has_breaks
SELECT count(*) AS count FROM pg_attribute
WHERE attrelid = 'eoq.migrations'::regclass AND attname = 'breaks_older' AND NOT attisdropped;


-- name: migrations_applied
-- Through to_jsonb so that it reads a table without breaks_older too (one
-- left by an eoq before it, read by claim()'s schema check).
SELECT m.name, coalesce((to_jsonb(m) ->> 'breaks_older')::boolean, false) AS breaks_older FROM eoq.migrations m;


-- name: migration_applied
INSERT INTO eoq.migrations (name, breaks_older) VALUES ($1, $2);
