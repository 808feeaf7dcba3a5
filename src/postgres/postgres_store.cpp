// The Postgres store: every SQL statement eoq runs lives in this file (and the
// migrations). Each state change is one statement, fenced in SQL.
#include <eoq/postgres_store.hpp>

#include "common/validate.hpp"
#include "postgres/connection.hpp"
#include "postgres/migrations.hpp"

#include <fmt/format.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <random>
#include <tuple>
#include <unordered_map>

namespace eoq {

using pg::Connection;
using pg::Param;
using pg::Result;
using pg::Statement;

namespace {

// The columns of both task tables, in table order; decode_task reads them by position.
const char* const kColumns[] = {
    "id", "queue", "type", "key", "tenant", "payload", "status", "priority", "run_at", "deadline",
    "attempts", "max_attempts", "backoff", "backoff_initial_ms", "backoff_max_ms", "backoff_jitter",
    "version", "lease_owner", "lease_expires_at", "started_at", "cancel_requested", "progress", "stage",
    "checkpoint_stage", "checkpoint", "result", "last_error", "created_at", "updated_at", "finished_at"};
constexpr int kColumnCount = static_cast<int>(std::size(kColumns));

std::string column_list(std::string_view prefix = "") {
  std::string out;
  for (int i = 0; i < kColumnCount; ++i) {
    if (i) out += ", ";
    out += prefix;
    out += kColumns[i];
  }
  return out;
}

// Every column in table order, copied from the source row unless `set` gives
// an expression for it.
std::string select_from(std::string_view source, const std::map<std::string, std::string>& set) {
  std::string exprs;
  for (int i = 0; i < kColumnCount; ++i) {
    if (i) exprs += ", ";
    auto it = set.find(kColumns[i]);
    exprs += it != set.end() ? it->second : fmt::format("{}.{}", source, kColumns[i]);
  }
  return exprs;
}

// "INSERT INTO finished (...) SELECT ... FROM <source>".
std::string finish_insert(const std::map<std::string, std::string>& set, std::string_view source) {
  return fmt::format("INSERT INTO @s@.finished ({}) SELECT {} FROM {}", column_list(), select_from(source, set),
                     source);
}

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
  return s;
}

Task decode_task(const Result& r, int row, int off = 0) {
  Task t;
  auto c = [&](int i) { return off + i; };
  t.id = r.i64(row, c(0));
  t.queue = r.text(row, c(1));
  t.type = r.text(row, c(2));
  t.key = r.opt_text(row, c(3));
  t.tenant = r.opt_text(row, c(4));
  t.payload = r.text(row, c(5));
  t.status = parse_status(r.text(row, c(6)));
  t.priority = r.i32(row, c(7));
  t.run_at = r.time(row, c(8));
  t.deadline = r.opt_time(row, c(9));
  t.attempts = r.i32(row, c(10));
  t.retry.max_attempts = r.i32(row, c(11));
  t.retry.backoff = r.text(row, c(12)) == "fixed" ? Backoff::fixed : Backoff::exponential;
  t.retry.initial_delay = Millis(r.i64(row, c(13)));
  t.retry.max_delay = Millis(r.i64(row, c(14)));
  t.retry.jitter = r.f64(row, c(15));
  t.version = r.i64(row, c(16));
  t.lease_owner = r.opt_text(row, c(17));
  t.lease_expires_at = r.opt_time(row, c(18));
  t.started_at = r.opt_time(row, c(19));
  t.cancel_requested = r.boolean(row, c(20));
  t.progress = r.i32(row, c(21));
  t.stage = r.text(row, c(22));
  t.checkpoint_stage = r.opt_text(row, c(23));
  t.checkpoint = r.opt_text(row, c(24));
  t.result = r.opt_text(row, c(25));
  t.last_error = r.opt_text(row, c(26));
  t.created_at = r.time(row, c(27));
  t.updated_at = r.time(row, c(28));
  t.finished_at = r.opt_time(row, c(29));
  return t;
}

void validate_schema(const std::string& s) {
  bool ok = !s.empty() && s.size() <= 48 && ((s[0] >= 'a' && s[0] <= 'z') || s[0] == '_');
  for (char ch : s) ok = ok && ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_');
  if (!ok)
    throw InvalidArgument("schema", fmt::format("'{}' must match [a-z_][a-z0-9_]* and be at most 48 characters", s));
}

#define TS(p) "('epoch'::timestamptz + " p "::bigint * interval '1 microsecond')"
#define MS(p) "(" p "::bigint * interval '1 millisecond')"

// The SQL of one schema. Built once per store; @s@ is the quoted schema name.
struct Sql {
  Statement submit, submit_batch, submit_staged, submit_staged_unkeyed, by_keys, claim, claim_one, complete, fail, release, expire_lease, cancel_lease,
      heartbeat, progress, checkpoint, cancel, retry, get, list, list_desc, stats, history, prune, prunable, expire,
      reap, settled, clock;

  explicit Sql(const std::string& quoted_schema) {
    const std::string cols = column_list(), tcols = column_list("t.");
    // $2 of get, cancel and retry: the scope's tenant, or NULL for every tenant.
    const char* in_scope = "($2::text IS NULL OR tenant = $2)";
    auto S = [&](const char* name, const std::string& text) {
      return Statement{name, replace_all(text, "@s@", quoted_schema)};
    };
    const char* insert_cols =
        "id, queue, type, key, tenant, payload, status, priority, run_at, deadline, max_attempts, backoff, "
        "backoff_initial_ms, backoff_max_ms, backoff_jitter";

    // A key is taken by inserting it; ON CONFLICT DO NOTHING makes the unique
    // constraint the judge of a race, and a concurrent submitter of the same key
    // waits for ours to commit or roll back. No key row, no task row.
    submit = S("eoq_submit", fmt::format(R"(
WITH k AS (
  INSERT INTO @s@.keys (queue, tenant, key, task_id)
  SELECT $1, coalesce($4, ''), $3, nextval('@s@.task_ids') WHERE $3::text IS NOT NULL
  ON CONFLICT DO NOTHING RETURNING task_id),
ids AS (SELECT task_id AS id FROM k UNION ALL SELECT nextval('@s@.task_ids') WHERE $3::text IS NULL),
ins AS (
  INSERT INTO @s@.tasks ({})
  SELECT id, $1, $2, $3, $4, $5::json, 'pending', $6, coalesce({}, now()), {}, $9, $10, $11, $12, $13 FROM ids
  RETURNING id, run_at, created_at, version)
SELECT id, run_at, created_at, version, pg_notify($14, $1) FROM ins)",
                                         insert_cols, TS("$7"), TS("$8")));

    // The batch arrives as parallel arrays (one statement, one round trip), or
    // for large batches COPYed into a stage table in the same transaction:
    // parsing thirteen arrays of ten thousand elements cost the server more
    // than COPY's text format does.
    auto batch_sql = [&](const char* name, const char* source, const char* channel) {
      return S(name, fmt::format(R"(
WITH src AS MATERIALIZED (SELECT nextval('@s@.task_ids') AS id, s.* FROM {} s),
k AS (
  INSERT INTO @s@.keys (queue, tenant, key, task_id)
  SELECT queue, coalesce(tenant, ''), key, id FROM src WHERE key IS NOT NULL ORDER BY ord
  ON CONFLICT DO NOTHING RETURNING task_id),
ins AS (
  INSERT INTO @s@.tasks ({})
  SELECT id, queue, type, key, tenant, payload::json, 'pending', priority, coalesce({}, now()), {},
         max_attempts, backoff, initial_ms, max_ms, jitter
  FROM src WHERE key IS NULL OR id IN (SELECT task_id FROM k)
  RETURNING id, run_at, created_at, version)
SELECT src.ord, ins.id, ins.run_at, ins.created_at, ins.version,
       (SELECT count(pg_notify({}, q.queue)) FROM (SELECT DISTINCT queue FROM src) q)
FROM ins JOIN src USING (id))",
                                 source, insert_cols, TS("src.run_at"), TS("src.deadline"), channel));
    };
    submit_batch = batch_sql("eoq_submit_batch", R"((SELECT * FROM unnest($1::text[], $2::text[], $3::text[],
  $4::text[], $5::text[], $6::int[], $7::bigint[], $8::bigint[], $9::int[], $10::text[], $11::bigint[], $12::bigint[],
  $13::float8[]) WITH ORDINALITY AS u(queue, type, key, tenant, payload, priority, run_at, deadline, max_attempts,
                                      backoff, initial_ms, max_ms, jitter, ord)))", "$14");
    submit_staged = batch_sql("eoq_submit_staged", "(SELECT * FROM pg_temp.eoq_stage ORDER BY ord)", "$1");
    // A staged batch without keys inserts every row, with ids drawn in the
    // batch's order: sorting by id gives the results in input order, without
    // the key step and the join back to the stage.
    submit_staged_unkeyed = S("eoq_submit_staged_unkeyed", fmt::format(R"(
WITH ins AS (
  INSERT INTO @s@.tasks ({})
  SELECT nextval('@s@.task_ids'), queue, type, NULL, tenant, payload::json, 'pending', priority,
         coalesce({}, now()), {}, max_attempts, backoff, initial_ms, max_ms, jitter
  FROM (SELECT * FROM pg_temp.eoq_stage ORDER BY ord) src
  RETURNING id, run_at, created_at, version)
SELECT row_number() OVER (ORDER BY id), id, run_at, created_at, version,
       (SELECT count(pg_notify($1, q.queue)) FROM (SELECT DISTINCT queue FROM pg_temp.eoq_stage) q)
FROM ins)",
                                                               insert_cols, TS("src.run_at"), TS("src.deadline")));

    by_keys = S("eoq_by_keys", fmt::format(R"(
SELECT q.ord, t.* FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS q(queue, tenant, key, ord)
JOIN @s@.keys k ON k.queue = q.queue AND k.tenant = coalesce(q.tenant, '') AND k.key = q.key
CROSS JOIN LATERAL (SELECT {0} FROM @s@.tasks WHERE id = k.task_id
                    UNION ALL SELECT {0} FROM @s@.finished WHERE id = k.task_id) t)",
                                           cols));

    // One statement: pick candidates in claim order through the claim index
    // (so the scan stops after `limit` rows), settle the ones that may not run
    // (deadline passed, lost lease with no attempts left or a cancel request),
    // record lost attempts, and lease the rest. The leases come back unordered
    // (claim() sorts them): a final ORDER BY cost a tenth of the statement.
    // Each candidate's fate (`final`, NULL: lease it) is decided once, in
    // `cand`: an anti-join of `upd` against `ends` cost a quarter. Rows are
    // found again by `id = ANY(ARRAY(...))`, never by a join alone: on a table
    // of tens of thousands of rows the planner priced a join's thousand index
    // probes above a sequential scan, and scanned the whole table per batch.
    const char* cand_cols =
        "t.id, t.status, t.attempts, t.version, t.lease_owner, t.started_at, t.lease_expires_at, t.priority, "
        "t.run_at, CASE WHEN t.deadline <= now() THEN 'expired' "
        "WHEN t.status = 'running' AND t.cancel_requested THEN 'cancelled' "
        "WHEN t.status = 'running' AND t.attempts >= t.max_attempts THEN 'failed' END AS final";
    const char* cand_where = "t.run_at <= now() AND (t.status = 'pending' OR t.lease_expires_at <= now())";
    auto claim_sql = [&](const char* name, const std::string& cand) {
      return S(name, fmt::format(R"(
WITH cand AS ({0}),
ends AS (SELECT id, final FROM cand WHERE final IS NOT NULL),
lost AS (
  INSERT INTO @s@.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, lease_expires_at, 'lease_expired', 'lease expired'
  FROM cand WHERE status = 'running'),
gone AS (DELETE FROM @s@.tasks t USING ends e WHERE t.id = ANY(ARRAY(SELECT id FROM ends)) AND t.id = e.id
         RETURNING t.*, e.final),
fin AS ({1}),
upd AS (
  UPDATE @s@.tasks t SET status = 'running', attempts = t.attempts + 1, version = t.version + 1,
         lease_owner = $3, lease_expires_at = now() + {2}, started_at = now(), updated_at = now(),
         progress = 0, stage = ''
  WHERE t.id = ANY(ARRAY(SELECT id FROM cand WHERE final IS NULL))
  RETURNING t.*)
SELECT {3} FROM upd t)",
                                 cand,
                                 finish_insert({{"status", "gone.final"},
                                                {"version", "gone.version + 1"},
                                                {"lease_expires_at", "NULL"},
                                                {"last_error",
                                                 "CASE gone.final WHEN 'expired' THEN 'deadline passed' "
                                                 "WHEN 'failed' THEN 'lease expired' ELSE gone.last_error END"},
                                                {"updated_at", "now()"},
                                                {"finished_at", "now()"}},
                                               "gone"),
                                 MS("$4"), tcols));
    };
    // One queue (the common case) walks the claim index directly; several
    // queues walk it once per queue and merge, since one scan cannot return
    // (queue, priority, ...) entries in (priority, ...) order.
    claim_one = claim_sql("eoq_claim_one", fmt::format(R"(
  SELECT {} FROM @s@.tasks t WHERE t.queue = $1 AND {}
  ORDER BY t.priority, t.run_at, t.id LIMIT $2 FOR UPDATE SKIP LOCKED)",
                                                        cand_cols, cand_where));
    claim = claim_sql("eoq_claim", fmt::format(R"(
  SELECT c.* FROM unnest($1::text[]) AS q(name) CROSS JOIN LATERAL (
    SELECT {} FROM @s@.tasks t WHERE t.queue = q.name AND {}
    ORDER BY t.priority, t.run_at, t.id LIMIT $2 FOR UPDATE SKIP LOCKED) c
  ORDER BY c.priority, c.run_at, c.id LIMIT $2)",
                                                    cand_cols, cand_where));

    // The rows are found through the primary key by `id = ANY(ARRAY(...))` and
    // fenced by a hashed (id, version) lookup, never by a join with the input:
    // on a table of tens of thousands of rows the planner priced a join's
    // thousand index probes above a sequential scan and read the whole table
    // per batch (`id = ANY($1)` likewise, knowing the array's length). Each
    // settled row meets its lease's result afterwards (by id and version, so a
    // stale lease of the same task in the batch lends it nothing), once even
    // when the lease came twice.
    complete = S("eoq_complete", fmt::format(R"(
WITH f AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS f(id, v, result)),
gone AS (
  DELETE FROM @s@.tasks t
  WHERE t.id = ANY(ARRAY(SELECT id FROM f)) AND t.status = 'running'
    AND ((t.id, t.version) IN (SELECT id, v FROM f) OR t.id IS NULL)
  RETURNING t.*),
fin AS (INSERT INTO @s@.finished ({}) SELECT {} FROM (
          SELECT gone.*, r.result AS new_result
          FROM gone JOIN (SELECT DISTINCT ON (id, v) id, v, result FROM f) r ON r.id = gone.id AND r.v = gone.version) g
        RETURNING id, version)
SELECT id, version - 1 FROM fin)",
                                             column_list(),
                                             select_from("g", {{"status", "'succeeded'"},
                                                               {"version", "g.version + 1"},
                                                               {"lease_expires_at", "NULL"},
                                                               {"result", "g.new_result::json"},
                                                               {"progress", "100"},
                                                               {"updated_at", "now()"},
                                                               {"finished_at", "now()"}})));

    fail = S("eoq_fail", fmt::format(R"(
WITH t AS (
  SELECT id, attempts, version, lease_owner, started_at,
         CASE WHEN cancel_requested THEN 'cancelled'
              WHEN $4::boolean OR attempts >= max_attempts THEN 'failed' ELSE 'retry' END AS outcome
  FROM @s@.tasks WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO @s@.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), outcome, $3 FROM t),
gone AS (DELETE FROM @s@.tasks x USING t WHERE x.id = t.id AND t.outcome <> 'retry' RETURNING x.*, t.outcome),
fin AS ({}),
up AS (
  UPDATE @s@.tasks x SET status = 'pending', version = x.version + 1, run_at = now() + {}, last_error = $3,
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  FROM t WHERE x.id = t.id AND t.outcome = 'retry'
  RETURNING x.run_at)
SELECT t.outcome, (SELECT run_at FROM up) FROM t)",
                                     finish_insert({{"status", "gone.outcome"},
                                                    {"version", "gone.version + 1"},
                                                    {"lease_expires_at", "NULL"},
                                                    {"last_error", "$3"},
                                                    {"updated_at", "now()"},
                                                    {"finished_at", "now()"}},
                                                   "gone"),
                                     MS("$5")));

    // A running task ended cancelled (released with a cancel request, or
    // stopped by its handler): the row as it leaves the live table.
    const std::map<std::string, std::string> cancelled_under_lease{{"status", "'cancelled'"},
                                                                   {"version", "gone.version + 1"},
                                                                   {"lease_expires_at", "NULL"},
                                                                   {"updated_at", "now()"},
                                                                   {"finished_at", "now()"}};
    release = S("eoq_release", fmt::format(R"(
WITH t AS (SELECT id, cancel_requested, attempts, version, lease_owner, started_at FROM @s@.tasks
           WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO @s@.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), 'cancelled', NULL FROM t WHERE cancel_requested),
gone AS (DELETE FROM @s@.tasks x USING t WHERE x.id = t.id AND t.cancel_requested RETURNING x.*),
fin AS ({}),
up AS (
  UPDATE @s@.tasks x SET status = 'pending', version = x.version + 1, attempts = x.attempts - 1, run_at = now(),
         lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  FROM t WHERE x.id = t.id AND NOT t.cancel_requested RETURNING x.id)
SELECT t.id, (SELECT pg_notify($3, queue) FROM @s@.tasks WHERE id = $1) FROM t)",
                                           finish_insert(cancelled_under_lease, "gone")));

    // The deadline is judged by now() here, not by the worker that asks: the
    // answer is the same whatever its clock says.
    expire_lease = S("eoq_expire_lease", fmt::format(R"(
WITH t AS (SELECT id, attempts, version, lease_owner, started_at, coalesce(deadline <= now(), false) AS overdue
           FROM @s@.tasks WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO @s@.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), 'expired', 'deadline passed before the task started'
  FROM t WHERE overdue),
gone AS (DELETE FROM @s@.tasks x USING t WHERE x.id = t.id AND t.overdue RETURNING x.*),
fin AS ({})
SELECT overdue FROM t)",
                                                     finish_insert({{"status", "'expired'"},
                                                                    {"version", "gone.version + 1"},
                                                                    {"lease_expires_at", "NULL"},
                                                                    {"last_error", "'deadline passed'"},
                                                                    {"updated_at", "now()"},
                                                                    {"finished_at", "now()"}},
                                                                   "gone")));

    cancel_lease = S("eoq_cancel_lease", fmt::format(R"(
WITH t AS (SELECT id, attempts, version, lease_owner, started_at FROM @s@.tasks
           WHERE id = $1 AND version = $2 AND status = 'running' FOR UPDATE),
h AS (
  INSERT INTO @s@.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, now(), 'cancelled', $3 FROM t),
gone AS (DELETE FROM @s@.tasks x USING t WHERE x.id = t.id RETURNING x.*),
fin AS ({} RETURNING id)
SELECT id FROM fin)",
                                                     finish_insert(cancelled_under_lease, "gone")));

    heartbeat = S("eoq_heartbeat", "UPDATE @s@.tasks SET lease_expires_at = now() + " MS("$3") R"(
WHERE id = $1 AND version = $2 AND status = 'running' RETURNING lease_expires_at, cancel_requested)");
    progress = S("eoq_progress", R"(UPDATE @s@.tasks SET progress = $3, stage = $4, updated_at = now()
WHERE id = $1 AND version = $2 AND status = 'running' RETURNING id)");
    checkpoint = S("eoq_checkpoint", R"(
UPDATE @s@.tasks SET checkpoint_stage = $3, checkpoint = $4::json, updated_at = now()
WHERE id = $1 AND version = $2 AND status = 'running' RETURNING id)");

    cancel = S("eoq_cancel", fmt::format(R"(
WITH gone AS (DELETE FROM @s@.tasks WHERE id = $1 AND status = 'pending' AND {1} RETURNING *),
fin AS ({0} RETURNING id),
req AS (UPDATE @s@.tasks SET cancel_requested = true, updated_at = now()
        WHERE id = $1 AND status = 'running' AND {1} RETURNING id)
SELECT (SELECT count(*) FROM fin), (SELECT count(*) FROM req),
       (SELECT count(*) FROM @s@.finished WHERE id = $1 AND {1}),
       (SELECT count(*) FROM @s@.tasks WHERE id = $1 AND {1}))",
                                         finish_insert({{"status", "'cancelled'"},
                                                        {"version", "gone.version + 1"},
                                                        {"updated_at", "now()"},
                                                        {"finished_at", "now()"}},
                                                       "gone"),
                                         in_scope));

    // A task settled other than in success goes back to the live table as it
    // was, pending now, with one attempt more than it has used if it has none
    // left; its history rows stay. A deadline that has passed is dropped, or the
    // task would only expire again.
    retry = S("eoq_retry", fmt::format(R"(
WITH gone AS (DELETE FROM @s@.finished WHERE id = $1 AND status IN ('failed', 'cancelled', 'expired') AND {0}
              RETURNING *),
back AS (INSERT INTO @s@.tasks ({1}) SELECT {2} FROM gone RETURNING queue)
SELECT (SELECT count(pg_notify($3, queue)) FROM back),
       (SELECT count(*) FROM @s@.finished WHERE id = $1 AND {0}),
       (SELECT count(*) FROM @s@.tasks WHERE id = $1 AND {0}))",
                                       in_scope, cols,
                                       select_from("gone", {{"status", "'pending'"},
                                                            {"run_at", "now()"},
                                                            {"deadline", "CASE WHEN gone.deadline > now() "
                                                                         "THEN gone.deadline END"},
                                                            {"max_attempts", "greatest(gone.max_attempts, "
                                                                             "gone.attempts + 1)"},
                                                            {"version", "gone.version + 1"},
                                                            {"lease_owner", "NULL"},
                                                            {"lease_expires_at", "NULL"},
                                                            {"started_at", "NULL"},
                                                            {"cancel_requested", "false"},
                                                            {"progress", "0"},
                                                            {"stage", "''"},
                                                            {"result", "NULL"},
                                                            {"updated_at", "now()"},
                                                            {"finished_at", "NULL"}})));

    get = S("eoq_get", fmt::format("SELECT {0} FROM @s@.tasks WHERE id = $1 AND {1} UNION ALL "
                                   "SELECT {0} FROM @s@.finished WHERE id = $1 AND {1}",
                                   cols, in_scope));

    // A status filter names one table only; the other side is cut by a
    // parameter-only condition the executor evaluates once.
    const char* filter =
        "($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR status = $2) AND "
        "($3::text IS NULL OR type = $3) AND ($4::text IS NULL OR tenant = $4)";
    // Two statements rather than a parameterised ORDER BY, so each keeps a
    // plan that walks the primary key in its own direction.
    auto list_sql = [&](const char* name, const char* after, const char* order) {
      return S(name, fmt::format(R"(
SELECT * FROM (
  (SELECT {0} FROM @s@.tasks WHERE ($2::text IS NULL OR $2::text IN ('pending', 'running')) AND {1} AND {2}
   ORDER BY id {3} LIMIT $6)
  UNION ALL
  (SELECT {0} FROM @s@.finished WHERE ($2::text IS NULL OR $2::text NOT IN ('pending', 'running')) AND {1} AND {2}
   ORDER BY id {3} LIMIT $6)) x
ORDER BY id {3} LIMIT $6)",
                                 cols, filter, after, order));
    };
    list = list_sql("eoq_list", "id > $5", "ASC");
    list_desc = list_sql("eoq_list_desc", "id < $5", "DESC");

    stats = S("eoq_stats", R"(
SELECT queue, status, count(*)::bigint,
       (extract(epoch FROM now() - min(run_at) FILTER (WHERE status = 'pending' AND run_at <= now())) * 1000)::bigint,
       0::bigint
FROM @s@.tasks WHERE $1::text IS NULL OR tenant = $1 GROUP BY queue, status
UNION ALL
SELECT queue, status, count(*)::bigint, NULL::bigint,
       count(*) FILTER (WHERE finished_at > now() - interval '1 minute')
FROM @s@.finished WHERE $1::text IS NULL OR tenant = $1 GROUP BY queue, status)");

    history = S("eoq_history", R"(
SELECT attempt, owner, started_at, finished_at, outcome, error FROM @s@.attempts WHERE task_id = $1
UNION ALL
SELECT attempts, lease_owner, started_at, NULL::timestamptz, 'running', NULL FROM @s@.tasks
WHERE id = $1 AND status = 'running'
UNION ALL
SELECT attempts, lease_owner, started_at, finished_at, 'succeeded', NULL FROM @s@.finished
WHERE id = $1 AND status = 'succeeded'
ORDER BY 1)");

    prune = S("eoq_prune", R"(
WITH v AS (SELECT id, queue, tenant, key FROM @s@.finished WHERE finished_at < now() - )" MS("$1") R"(
           LIMIT $2 FOR UPDATE SKIP LOCKED),
dk AS (DELETE FROM @s@.keys k USING v
       WHERE k.queue = v.queue AND k.tenant = coalesce(v.tenant, '') AND k.key = v.key AND k.task_id = v.id),
da AS (DELETE FROM @s@.attempts a USING v WHERE a.task_id = v.id),
df AS (DELETE FROM @s@.finished f USING v WHERE f.id = v.id RETURNING 1)
SELECT count(*) FROM df)");

    prunable = S("eoq_prunable", "SELECT count(*) FROM @s@.finished WHERE finished_at < now() - " MS("$1"));

    expire = S("eoq_expire", fmt::format(R"(
WITH v AS (SELECT id FROM @s@.tasks WHERE status = 'pending' AND deadline <= now() LIMIT $1 FOR UPDATE SKIP LOCKED),
gone AS (DELETE FROM @s@.tasks t USING v WHERE t.id = v.id RETURNING t.*),
fin AS ({} RETURNING 1)
SELECT count(*) FROM fin)",
                                         finish_insert({{"status", "'expired'"},
                                                        {"version", "gone.version + 1"},
                                                        {"last_error", "'deadline passed'"},
                                                        {"updated_at", "now()"},
                                                        {"finished_at", "now()"}},
                                                       "gone")));

    reap = S("eoq_reap", fmt::format(R"(
WITH v AS (
  SELECT id, attempts, version, lease_owner, started_at, lease_expires_at, cancel_requested FROM @s@.tasks
  WHERE status = 'running' AND lease_expires_at <= now() AND (attempts >= max_attempts OR cancel_requested)
  LIMIT $1 FOR UPDATE SKIP LOCKED),
h AS (
  INSERT INTO @s@.attempts (task_id, attempt, version, owner, started_at, finished_at, outcome, error)
  SELECT id, attempts, version, lease_owner, started_at, lease_expires_at, 'lease_expired', 'lease expired' FROM v),
gone AS (DELETE FROM @s@.tasks t USING v WHERE t.id = v.id RETURNING t.*),
fin AS ({} RETURNING 1)
SELECT count(*) FROM fin)",
                                     finish_insert({{"status", "CASE WHEN gone.cancel_requested THEN 'cancelled' "
                                                               "ELSE 'failed' END"},
                                                    {"version", "gone.version + 1"},
                                                    {"lease_expires_at", "NULL"},
                                                    {"last_error", "CASE WHEN gone.cancel_requested THEN "
                                                                   "gone.last_error ELSE 'lease expired' END"},
                                                    {"updated_at", "now()"},
                                                    {"finished_at", "now()"}},
                                                   "gone")));

    clock = S("eoq_now", "SELECT now()");

    // After a lost connection: did my settlement commit? The settled row (or
    // the attempt row of a failure) carries the version the lease saw.
    settled = S("eoq_settled", R"(
SELECT status FROM @s@.finished WHERE id = $1 AND version = $2 + 1
UNION ALL
SELECT outcome FROM @s@.attempts WHERE task_id = $1 AND version = $2 AND outcome <> 'lease_expired')");
  }
};

#undef TS
#undef MS

// One random source for backoff jitter, shared by every store in the process.
double unit_random() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng);
}

Param str(std::string_view s) { return std::string(s); }
Param num(std::int64_t v) { return std::to_string(v); }
Param opt(const std::optional<std::string>& s) { return s; }
Param opt_time(const std::optional<TimePoint>& t) {
  if (!t) return std::nullopt;
  return pg::time_param(*t);
}

std::vector<Param> submit_params(const NewTask& t, const std::string& channel) {
  return {str(t.queue),
          str(t.type),
          opt(t.key),
          opt(t.tenant),
          str(t.payload),
          num(t.priority),
          opt_time(t.run_at),
          opt_time(t.deadline),
          num(t.retry.max_attempts),
          str(t.retry.backoff == Backoff::fixed ? "fixed" : "exponential"),
          num(t.retry.initial_delay.count()),
          num(t.retry.max_delay.count()),
          fmt::format("{}", t.retry.jitter),
          channel};
}

// Batches from this size on go through COPY (submit_batch).
constexpr std::size_t kStageFrom = 1000;

// The stage a large batch is COPYed into: the columns of submit_params, then
// its position. Dropped at COMMIT, so it holds no state between transactions
// (nothing for a transaction-pooling proxy to lose).
constexpr const char* kCreateStage =
    "CREATE TEMP TABLE eoq_stage (queue text, type text, key text, tenant text, payload text, priority int, "
    "run_at bigint, deadline bigint, max_attempts int, backoff text, initial_ms bigint, max_ms bigint, "
    "jitter float8, ord bigint) ON COMMIT DROP";

// One value in COPY's text format.
void copy_field(std::string& out, const Param& v) {
  if (!v) {
    out += "\\N";
    return;
  }
  for (char ch : *v) {
    switch (ch) {
      case '\\': out += "\\\\"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      default: out += ch;
    }
  }
}

Task task_from_new(const NewTask& n, const Result& r, int row, int off) {
  Task t;
  t.id = r.i64(row, off);
  t.run_at = r.time(row, off + 1);
  t.created_at = t.updated_at = r.time(row, off + 2);
  t.version = r.i64(row, off + 3);
  t.queue = n.queue;
  t.type = n.type;
  t.payload = n.payload;
  t.key = n.key;
  t.tenant = n.tenant;
  t.priority = n.priority;
  t.deadline = n.deadline;
  t.retry = n.retry;
  return t;
}

std::string quote_ident(const std::string& s) { return "\"" + s + "\""; }

}  // namespace

struct PostgresStore::Impl {
  PostgresOptions options;
  std::string quoted;
  std::string channel;
  Sql sql;
  pg::Pool pool;     // short statements
  pg::Pool tx_pool;  // handler transactions, held for a handler's whole run

  // LISTEN connection: one thread polls it; others wait on listen_cv.
  std::mutex listen_m;
  std::condition_variable listen_cv;
  bool listener_busy = false;
  std::uint64_t wake_gen = 0;
  std::unique_ptr<Connection> listener;
  // Steady-clock ticks of the last statistics check (see refresh_stats); 0: never.
  std::atomic<std::chrono::steady_clock::rep> stats_refreshed{0};
  int wake_fd = -1;

  explicit Impl(PostgresOptions o)
      : options(std::move(o)),
        quoted(quote_ident(options.schema)),
        channel("eoq_" + options.schema),
        sql(quoted),
        pool(options.conninfo, "eoq", options.pool_size),
        tx_pool(options.conninfo, "eoq-handler", options.pool_size) {
    wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd < 0) throw Error("eventfd failed");
  }
  ~Impl() {
    if (wake_fd >= 0) close(wake_fd);
  }

  template <class F>
  auto retry(F&& f, bool* retried = nullptr) {
    return pg::with_retry(pool, options.transient_retries, std::forward<F>(f), retried);
  }

  std::vector<std::optional<Task>> lookup_keys(const std::vector<Param>& queues, const std::vector<Param>& tenants,
                                               const std::vector<Param>& keys) {
    auto r = retry([&](Connection& c) {
      return c.exec(sql.by_keys, {pg::text_array(queues), pg::text_array(tenants), pg::text_array(keys)});
    });
    std::vector<std::optional<Task>> out(queues.size());
    for (int i = 0; i < r.rows(); ++i) out[static_cast<std::size_t>(r.i64(i, 0) - 1)] = decode_task(r, i, 1);
    return out;
  }

  // Whether the settlement of (id, token) is on record; used after a retry,
  // when our first try may have committed before the connection dropped.
  std::optional<std::string> settled(TaskId id, std::int64_t token) {
    auto r = retry([&](Connection& c) { return c.exec(sql.settled, {num(id), num(token)}); });
    if (r.rows() == 0) return std::nullopt;
    return r.text(0, 0);
  }

  // Statistics that miss a burst make the planner guess that a claim matches a
  // few dozen rows; it then fetches the whole queue through a bitmap scan and
  // sorts it, for every claim, until autovacuum's ANALYZE (up to a minute
  // later, and only after a tenth of the table changed) replans. Measured: the
  // first drain after a bulk submit into a new schema ran at 0.6 of the second,
  // and a drain of a queue that was empty when the table was last analyzed ran
  // at 0.03. So a large batch that is a tenth of the table or more (or lands in
  // a table never analyzed) analyzes it, at most every few seconds per store.
  void refresh_stats(std::size_t batch_rows) noexcept {
    const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
    auto last = stats_refreshed.load();
    const auto gap = std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::seconds(5)).count();
    if (last != 0 && now - last < gap) return;
    if (!stats_refreshed.compare_exchange_strong(last, now)) return;
    try {
      auto c = pool.acquire();
      auto r = c->exec_params(fmt::format("SELECT c.reltuples, s.last_analyze IS NULL AND s.last_autoanalyze IS NULL "
                                          "FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid "
                                          "WHERE c.oid = '{}.tasks'::regclass",
                                          quoted),
                              {}, false, "refresh_stats");
      if (r.rows() != 1) return;
      const double tuples = std::max(0.0, std::stod(r.text(0, 0)));
      if (r.text(0, 1) == "t" || static_cast<double>(batch_rows) * 10 >= tuples)
        c->command(fmt::format("ANALYZE {}.tasks", quoted).c_str());
    } catch (const std::exception&) {
      // Only an optimisation: autovacuum gets there too.
    }
  }

  void check_payload(const NewTask& t, std::size_t i, bool batch) const {
    try {
      detail::validate_new_task(t, options.max_payload_bytes, detail::now());
    } catch (const InvalidArgument& e) {
      if (!batch) throw;
      throw InvalidArgument(fmt::format("tasks[{}].{}", i, e.field()), e.rule());
    }
  }
};

namespace {
PostgresOptions with_conninfo(std::string conninfo) {
  PostgresOptions o;
  o.conninfo = std::move(conninfo);
  return o;
}
}  // namespace

PostgresStore::PostgresStore(std::string conninfo) : PostgresStore(with_conninfo(std::move(conninfo))) {}

PostgresStore::PostgresStore(PostgresOptions options) {
  validate_schema(options.schema);
  if (options.conninfo.empty()) {
    const char* env = std::getenv("EOQ_DATABASE_URL");
    if (!env || !*env)
      throw InvalidArgument("conninfo", "is empty and EOQ_DATABASE_URL is not set");
    options.conninfo = env;
  }
  if (options.pool_size < 1) throw InvalidArgument("pool_size", "must be at least 1");
  if (options.transient_retries < 0) throw InvalidArgument("transient_retries", "must not be negative");
  if (options.prune_batch < 1) throw InvalidArgument("prune_batch", "must be at least 1");
  detail::validate_positive("prune_budget", options.prune_budget);
  detail::validate_positive("handler_idle_timeout", options.handler_idle_timeout);
  if (options.retention && options.retention->count() < 0) throw InvalidArgument("retention", "must not be negative");
  {
    // Parse the connection string now so a malformed one fails here, not later.
    char* err = nullptr;
    PQconninfoOption* opts = PQconninfoParse(options.conninfo.c_str(), &err);
    if (!opts) {
      std::string why = err ? err : "cannot be parsed";
      if (err) PQfreemem(err);
      while (!why.empty() && why.back() == '\n') why.pop_back();
      throw InvalidArgument("conninfo", why);
    }
    PQconninfoFree(opts);
  }
  impl_ = std::make_unique<Impl>(std::move(options));
}

PostgresStore::~PostgresStore() = default;

const PostgresOptions& PostgresStore::options() const noexcept { return impl_->options; }

void PostgresStore::migrate() {
  auto& I = *impl_;
  I.retry([&](Connection& c) {
    c.command("BEGIN");
    try {
      // Serialises concurrent migrate() calls for this schema across processes.
      c.exec_params("SELECT pg_advisory_xact_lock(hashtextextended('eoq.migrate.' || $1, 0))",
                    {I.options.schema}, false, "migrate lock");
      c.command(fmt::format("SET LOCAL client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS {0}; "
                            "CREATE TABLE IF NOT EXISTS {0}.migrations (name text PRIMARY KEY, "
                            "applied_at timestamptz NOT NULL DEFAULT now())",
                            I.quoted)
                    .c_str());
      auto done = c.exec_params(fmt::format("SELECT name FROM {}.migrations", I.quoted), {}, false, "migrate");
      std::vector<std::string> applied;
      for (int i = 0; i < done.rows(); ++i) applied.push_back(done.text(i, 0));
      for (std::size_t m = 0; m < detail::kMigrationCount; ++m) {
        const auto& mig = detail::kMigrations[m];
        if (std::find(applied.begin(), applied.end(), mig.name) != applied.end()) continue;
        c.command(replace_all(mig.sql, "@schema@", I.quoted).c_str());
        c.exec_params(fmt::format("INSERT INTO {}.migrations (name) VALUES ($1)", I.quoted), {std::string(mig.name)},
                      false, "migrate");
      }
      c.command("COMMIT");
    } catch (...) {
      if (c.ok()) Result(PQexec(c.get(), "ROLLBACK"));
      throw;
    }
    return 0;
  });
}

SubmitResult PostgresStore::submit(const NewTask& task) {
  auto& I = *impl_;
  I.check_payload(task, 0, false);
  auto params = submit_params(task, I.channel);
  // Without a key a repeat after a lost connection could create a second task,
  // so only keyed submits are retried.
  int retries = task.key ? I.options.transient_retries : 0;
  for (int round = 0;; ++round) {
    Result r;
    try {
      r = pg::with_retry(I.pool, retries, [&](Connection& c) { return c.exec(I.sql.submit, params); });
    } catch (const TransientError& e) {
      if (task.key) throw;
      throw CommitInDoubt(std::string(e.what()) +
                              "; the task may or may not have been created (give it a key to make retries safe)",
                          e.sqlstate(), e.statement());
    }
    if (r.rows() == 1) return {task_from_new(task, r, 0, 0), false};
    auto existing = I.lookup_keys({task.queue}, {task.tenant}, {task.key});
    if (existing[0]) {
      const Task& h = *existing[0];
      detail::check_key_reuse(task, std::nullopt, h.type, h.payload, fmt::format("task {}", h.id), h.id);
      return {std::move(*existing[0]), true};
    }
    // The key's task was pruned between the two statements: try again.
    if (round > 10) throw Error("submit: key kept vanishing under retention; giving up");
  }
}

namespace {
// One statement on a host's connection, inside whatever transaction it has
// open; binary results, as on the store's own connections.
Result exec_on(pg_conn* connection, const std::string& text, const std::vector<Param>& ps, const char* label) {
  std::vector<const char*> values(ps.size());
  for (std::size_t i = 0; i < ps.size(); ++i) values[i] = ps[i] ? ps[i]->c_str() : nullptr;
  Result r(PQexecParams(connection, text.c_str(), static_cast<int>(ps.size()), nullptr, values.data(), nullptr,
                        nullptr, 1));
  auto st = PQresultStatus(r.get());
  if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) pg::throw_error(connection, r.get(), label);
  return r;
}

// The answer of the cancel statement, or empty when the task changed state
// under it (claimed or settled meanwhile) and the statement must run again.
std::optional<CancelOutcome> decode_cancel(const Result& r) {
  if (r.i64(0, 0) > 0) return CancelOutcome::cancelled;
  if (r.i64(0, 1) > 0) return CancelOutcome::cancel_requested;
  if (r.i64(0, 2) > 0) return CancelOutcome::already_finished;
  if (r.i64(0, 3) == 0) return CancelOutcome::not_found;
  return std::nullopt;
}
}  // namespace

SubmitResult PostgresStore::submit_on(pg_conn* connection, const NewTask& task, std::string_view schema,
                                      std::size_t max_payload_bytes) {
  if (!connection) throw InvalidArgument("connection", "must not be null");
  std::string s(schema);
  validate_schema(s);
  detail::validate_new_task(task, max_payload_bytes, detail::now());
  Sql sql(quote_ident(s));
  auto params = submit_params(task, "eoq_" + s);
  auto run = [&](const std::string& text, const std::vector<Param>& ps) {
    return exec_on(connection, text, ps, "submit_on");
  };
  auto r = run(sql.submit.sql, params);
  if (r.rows() == 1) return {task_from_new(task, r, 0, 0), false};
  auto e = run(sql.by_keys.sql,
               {pg::text_array({task.queue}), pg::text_array({task.tenant}), pg::text_array({task.key})});
  if (e.rows() == 1) {
    auto holder = decode_task(e, 0, 1);
    detail::check_key_reuse(task, std::nullopt, holder.type, holder.payload, fmt::format("task {}", holder.id),
                            holder.id);
    return {std::move(holder), true};
  }
  throw Error("submit_on: the key is taken but its task was not found");
}

CancelOutcome PostgresStore::cancel_on(pg_conn* connection, TaskId id, const Scope& scope, std::string_view schema) {
  if (!connection) throw InvalidArgument("connection", "must not be null");
  std::string s(schema);
  validate_schema(s);
  detail::validate_scope(scope);
  Sql sql(quote_ident(s));
  // Each statement of a READ COMMITTED transaction sees the rows committed
  // before it, so running the statement again sees the new state.
  for (int round = 0; round < 20; ++round) {
    auto r = exec_on(connection, sql.cancel.sql, {num(id), scope.tenant}, "cancel_on");
    if (auto out = decode_cancel(r)) return *out;
  }
  throw TransientError(fmt::format("cancel_on: task {} kept changing state", id), "40001", "cancel_on");
}

std::vector<SubmitResult> PostgresStore::submit_batch(std::span<const NewTask> tasks) {
  auto& I = *impl_;
  if (tasks.size() > 100000) throw InvalidArgument("tasks", "at most 100000 tasks per batch");
  if (tasks.empty()) return {};
  bool all_keyed = true, any_keyed = false;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    I.check_payload(tasks[i], i, true);
    all_keyed = all_keyed && tasks[i].key.has_value();
    any_keyed = any_keyed || tasks[i].key.has_value();
  }
  detail::check_batch_keys(tasks);
  const bool staged = tasks.size() >= kStageFrom;
  std::vector<Param> params;
  std::string rows;  // staged: the batch in COPY's text format
  if (staged) {
    rows.reserve(tasks.size() * 160);
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      auto p = submit_params(tasks[i], "");
      for (std::size_t k = 0; k < 13; ++k) {
        copy_field(rows, p[k]);
        rows += '\t';
      }
      rows += std::to_string(i + 1);
      rows += '\n';
    }
    params.push_back(I.channel);
  } else {
    std::vector<std::vector<Param>> cols(13);
    for (auto& c : cols) c.reserve(tasks.size());
    for (const auto& t : tasks) {
      auto p = submit_params(t, "");
      for (std::size_t k = 0; k < 13; ++k) cols[k].push_back(std::move(p[k]));
    }
    for (auto& c : cols) params.push_back(pg::text_array(c));
    params.push_back(I.channel);
  }
  const bool strict = std::any_of(tasks.begin(), tasks.end(),
                                  [](const NewTask& t) { return t.key && t.key_reuse == KeyReuse::strict; });
  std::vector<std::optional<SubmitResult>> out;
  std::vector<std::size_t> missing;          // tasks whose key was taken
  std::vector<std::optional<Task>> holders;  // the tasks holding those keys (empty: pruned meanwhile)
  // With a strict key the batch runs in a transaction that ends in ROLLBACK when
  // a taken key's holder differs, so a conflict writes nothing; a staged batch
  // needs one for its stage. Otherwise the insert commits on its own.
  const bool in_tx = strict || staged;
  auto attempt = [&](Connection& c) {
    out.assign(tasks.size(), std::nullopt);
    missing.clear();
    holders.clear();
    if (in_tx) c.command("BEGIN");
    try {
      Result r;
      if (staged) {
        c.command(kCreateStage);
        c.copy_in("COPY pg_temp.eoq_stage FROM STDIN", rows);
        r = c.exec(any_keyed ? I.sql.submit_staged : I.sql.submit_staged_unkeyed, params);
      } else {
        r = c.exec(I.sql.submit_batch, params);
      }
      for (int i = 0; i < r.rows(); ++i) {
        auto ord = static_cast<std::size_t>(r.i64(i, 0) - 1);
        out[ord] = SubmitResult{task_from_new(tasks[ord], r, i, 1), false};
      }
      std::vector<Param> dq, dt, dk;
      for (std::size_t i = 0; i < tasks.size(); ++i)
        if (!out[i]) {
          missing.push_back(i);
          dq.push_back(tasks[i].queue);
          dt.push_back(tasks[i].tenant);
          dk.push_back(tasks[i].key);
        }
      if (!missing.empty()) {
        holders.resize(missing.size());
        auto f = c.exec(I.sql.by_keys, {pg::text_array(dq), pg::text_array(dt), pg::text_array(dk)});
        for (int i = 0; i < f.rows(); ++i) holders[static_cast<std::size_t>(f.i64(i, 0) - 1)] = decode_task(f, i, 1);
      }
      if (strict)
        for (std::size_t j = 0; j < missing.size(); ++j)
          if (const auto& h = holders[j])
            detail::check_key_reuse(tasks[missing[j]], missing[j], h->type, h->payload, fmt::format("task {}", h->id),
                                    h->id);
      if (in_tx) c.command("COMMIT");
    } catch (...) {
      if (in_tx && c.ok()) Result(PQexec(c.get(), "ROLLBACK"));
      throw;
    }
    return 0;
  };
  try {
    pg::with_retry(I.pool, all_keyed ? I.options.transient_retries : 0, attempt);
  } catch (const TransientError& e) {
    if (all_keyed) throw;
    throw CommitInDoubt(std::string(e.what()) +
                            "; the batch may or may not have been created (give every task a key to make retries safe)",
                        e.sqlstate(), e.statement());
  }
  for (std::size_t j = 0; j < missing.size(); ++j) {
    if (!holders[j]) {
      // Pruned in between: submit that one again on its own.
      out[missing[j]] = submit(tasks[missing[j]]);
      continue;
    }
    out[missing[j]] = SubmitResult{std::move(*holders[j]), true};
  }
  if (staged) I.refresh_stats(tasks.size());
  std::vector<SubmitResult> result;
  result.reserve(tasks.size());
  for (auto& o : out) result.push_back(std::move(*o));
  return result;
}

std::vector<Lease> PostgresStore::claim(const ClaimRequest& request) {
  auto& I = *impl_;
  detail::validate_claim(request);
  std::vector<Param> queues(request.queues.begin(), request.queues.end());
  // A repeat after a lost connection is safe: leases granted by a try whose
  // answer never arrived simply expire and the tasks are claimed again.
  const bool one = queues.size() == 1;
  auto r = I.retry([&](Connection& c) {
    return c.exec(one ? I.sql.claim_one : I.sql.claim, {one ? queues[0] : pg::text_array(queues),
                                                         num(request.limit), request.owner,
                                                         num(request.lease.count())});
  });
  std::vector<Lease> leases;
  leases.reserve(static_cast<std::size_t>(r.rows()));
  for (int i = 0; i < r.rows(); ++i) {
    Lease l;
    l.task = decode_task(r, i);
    l.owner = request.owner;
    l.token = l.task.version;
    l.expires_at = l.task.lease_expires_at.value_or(TimePoint{});
    l.claimed_at = l.task.started_at.value_or(TimePoint{});  // now() of the claim
    leases.push_back(std::move(l));
  }
  std::sort(leases.begin(), leases.end(), [](const Lease& a, const Lease& b) {
    return std::tie(a.task.priority, a.task.run_at, a.task.id) < std::tie(b.task.priority, b.task.run_at, b.task.id);
  });
  return leases;
}

std::vector<bool> PostgresStore::complete_batch(std::span<const Completion> completions) {
  auto& I = *impl_;
  std::vector<Param> ids, versions, results;
  for (std::size_t i = 0; i < completions.size(); ++i) {
    if (!completions[i].lease) throw InvalidArgument(fmt::format("completions[{}].lease", i), "must not be null");
    detail::validate_json(completions.size() == 1 ? "result" : fmt::format("completions[{}].result", i),
                          completions[i].result, I.options.max_payload_bytes);
    ids.push_back(num(completions[i].lease->id()));
    versions.push_back(num(completions[i].lease->token));
    results.push_back(completions[i].result);
  }
  if (completions.empty()) return {};
  bool retried = false;
  auto r = I.retry(
      [&](Connection& c) {
        return c.exec(I.sql.complete, {pg::text_array(ids), pg::text_array(versions), pg::text_array(results)});
      },
      &retried);
  std::map<std::pair<TaskId, std::int64_t>, bool> done;  // (id, token) settled now
  for (int i = 0; i < r.rows(); ++i) done[{r.i64(i, 0), r.i64(i, 1)}] = true;
  std::vector<bool> out(completions.size());
  for (std::size_t i = 0; i < completions.size(); ++i) {
    const auto& l = *completions[i].lease;
    // The same lease twice in one batch settles once: only the first says so.
    auto it = done.find({l.id(), l.token});
    out[i] = it != done.end() && std::exchange(it->second, false);
    if (!out[i] && retried) out[i] = I.settled(l.id(), l.token) == std::optional<std::string>("succeeded");
  }
  return out;
}

void PostgresStore::complete(const Lease& lease, std::string_view result_json) {
  Completion c{&lease, std::string(result_json)};
  if (!complete_batch(std::span<const Completion>(&c, 1))[0])
    throw LeaseLost(lease.id(), lease.token, "the task is no longer running under this lease");
}

namespace {
FailOutcome decode_fail(const Result& r) {
  auto outcome = r.text(0, 0);
  if (outcome == "retry") return {TaskStatus::pending, r.opt_time(0, 1)};
  return {outcome == "cancelled" ? TaskStatus::cancelled : TaskStatus::failed, std::nullopt};
}
std::vector<Param> fail_params(const Lease& lease, const Failure& f) {
  auto delay = lease.task.retry.delay_after(lease.task.attempts, unit_random());
  return {num(lease.id()), num(lease.token), f.error, f.permanent ? "true" : "false", num(delay.count())};
}
}  // namespace

FailOutcome PostgresStore::fail(const Lease& lease, const Failure& failure) {
  auto& I = *impl_;
  bool retried = false;
  auto params = fail_params(lease, failure);
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.fail, params); }, &retried);
  if (r.rows() == 1) return decode_fail(r);
  if (retried) {
    if (auto s = I.settled(lease.id(), lease.token)) {
      if (*s == "retry") {
        auto t = get(lease.id());
        return {TaskStatus::pending, t ? std::optional(t->run_at) : std::nullopt};
      }
      if (*s == "failed" || *s == "cancelled") return {parse_status(*s), std::nullopt};
    }
  }
  throw LeaseLost(lease.id(), lease.token, "the task is no longer running under this lease");
}

HeartbeatResult PostgresStore::heartbeat(const Lease& lease, Millis extension) {
  auto& I = *impl_;
  detail::validate_positive("extension", extension);
  auto r = I.retry([&](Connection& c) {
    return c.exec(I.sql.heartbeat, {num(lease.id()), num(lease.token), num(extension.count())});
  });
  if (r.rows() != 1) throw LeaseLost(lease.id(), lease.token, "heartbeat found the task no longer under this lease");
  return {r.time(0, 0), r.boolean(0, 1)};
}

void PostgresStore::release(const Lease& lease) {
  auto& I = *impl_;
  bool retried = false;
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.release, {num(lease.id()), num(lease.token), I.channel}); },
                   &retried);
  // After a retry the first try may have applied; the version moved on either way.
  if (r.rows() != 1 && !retried)
    throw LeaseLost(lease.id(), lease.token, "release found the task no longer under this lease");
}

bool PostgresStore::expire_if_overdue(const Lease& lease) {
  auto& I = *impl_;
  bool retried = false;
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.expire_lease, {num(lease.id()), num(lease.token)}); },
                   &retried);
  if (r.rows() == 1) return r.boolean(0, 0);
  // After a retry our first try may have expired it: then the task is on record
  // as expired by this lease.
  if (retried && I.settled(lease.id(), lease.token) == std::optional<std::string>("expired")) return true;
  throw LeaseLost(lease.id(), lease.token, "the task is no longer running under this lease");
}

void PostgresStore::cancel_running(const Lease& lease, std::string_view reason) {
  auto& I = *impl_;
  bool retried = false;
  Param why = reason.empty() ? Param() : Param(std::string(reason));
  auto r = I.retry(
      [&](Connection& c) { return c.exec(I.sql.cancel_lease, {num(lease.id()), num(lease.token), why}); }, &retried);
  if (r.rows() == 1) return;
  if (retried && I.settled(lease.id(), lease.token) == std::optional<std::string>("cancelled")) return;
  throw LeaseLost(lease.id(), lease.token, "the task is no longer running under this lease");
}

void PostgresStore::progress(const Lease& lease, int percent, std::string_view stage) {
  auto& I = *impl_;
  detail::validate_progress(percent, stage);
  auto r = I.retry([&](Connection& c) {
    return c.exec(I.sql.progress, {num(lease.id()), num(lease.token), num(percent), std::string(stage)});
  });
  if (r.rows() != 1) throw LeaseLost(lease.id(), lease.token, "progress found the task no longer under this lease");
}

void PostgresStore::checkpoint(const Lease& lease, std::string_view stage, std::string_view state_json) {
  auto& I = *impl_;
  detail::validate_progress(0, stage);
  detail::validate_json("checkpoint", state_json, I.options.max_payload_bytes);
  auto r = I.retry([&](Connection& c) {
    return c.exec(I.sql.checkpoint,
                  {num(lease.id()), num(lease.token), std::string(stage), std::string(state_json)});
  });
  if (r.rows() != 1)
    throw LeaseLost(lease.id(), lease.token, "checkpoint found the task no longer under this lease");
}

namespace {

// A handler's transaction: its own SQL and the task's settlement commit
// together. The server ends it if it sits idle longer than the configured
// timeout, so a frozen worker cannot keep its row locks.
class PgLeaseTransaction final : public LeaseTransaction {
 public:
  PgLeaseTransaction(PostgresStore::Impl& store, const Lease& lease, pg::Pool::Lease conn)
      : store_(store), lease_(lease), conn_(std::move(conn)) {
    start();
  }
  ~PgLeaseTransaction() override {
    if (open_) {
      Result r(PQexec(conn_->get(), "ROLLBACK"));
      if (PQresultStatus(r.get()) != PGRES_COMMAND_OK) conn_.discard();
    }
  }

  Rows exec(std::string_view sql, const Params& params) override {
    require_open();
    Result r;
    try {
      std::vector<Param> texts;
      texts.reserve(params.size());
      for (const auto& p : params) texts.push_back(p.text());
      r = conn_->exec_params(sql, texts, false, "handler SQL");
    } catch (...) {
      abandon();
      throw;
    }
    Rows out;
    out.affected = r.affected();
    for (int c = 0; c < r.columns(); ++c) out.columns.emplace_back(PQfname(r.get(), c));
    out.rows.resize(static_cast<std::size_t>(r.rows()));
    for (int i = 0; i < r.rows(); ++i) {
      auto& row = out.rows[static_cast<std::size_t>(i)];
      row.reserve(static_cast<std::size_t>(r.columns()));
      for (int c = 0; c < r.columns(); ++c) row.push_back(r.opt_text(i, c));
    }
    return out;
  }

  void complete(std::string_view result_json) override {
    require_open();
    detail::validate_json("result", result_json, store_.options.max_payload_bytes);
    Result r = run(store_.sql.complete, {pg::text_array({num(lease_.id())}), pg::text_array({num(lease_.token)}),
                                        pg::text_array({std::string(result_json)})});
    if (r.rows() != 1) lost("the task is no longer running under this lease");
    commit("succeeded");
  }

  FailOutcome fail(const Failure& failure) override {
    require_open();
    Result r = run(store_.sql.fail, fail_params(lease_, failure));
    if (r.rows() != 1) lost("the task is no longer running under this lease");
    auto outcome = decode_fail(r);
    commit(nullptr);
    return outcome;
  }

  void checkpoint(std::string_view stage, std::string_view state_json) override {
    require_open();
    detail::validate_progress(0, stage);
    detail::validate_json("checkpoint", state_json, store_.options.max_payload_bytes);
    Result r = run(store_.sql.checkpoint,
                   {num(lease_.id()), num(lease_.token), std::string(stage), std::string(state_json)});
    if (r.rows() != 1) lost("checkpoint found the task no longer under this lease");
    commit(nullptr);
    start();
  }

  bool open() const noexcept override { return open_; }

 private:
  void start() {
    conn_->command("BEGIN");
    auto ms = store_.options.handler_idle_timeout.count();
    conn_->command(fmt::format("SET LOCAL idle_in_transaction_session_timeout = {}", ms).c_str());
    open_ = true;
  }
  void require_open() const {
    if (!open_) throw UsageError("this lease transaction is already settled or broken");
  }
  Result run(const Statement& st, const std::vector<Param>& params) {
    try {
      return conn_->exec(st, params);
    } catch (...) {
      abandon();
      throw;
    }
  }
  // Rolls back (or drops the connection) so nothing of this transaction commits.
  void abandon() noexcept {
    if (!open_) return;
    open_ = false;
    if (conn_->ok()) {
      Result r(PQexec(conn_->get(), "ROLLBACK"));
      if (PQresultStatus(r.get()) == PGRES_COMMAND_OK) return;
    }
    conn_.discard();
  }
  [[noreturn]] void lost(const char* why) {
    abandon();
    throw LeaseLost(lease_.id(), lease_.token, why);
  }
  // COMMIT; when the connection drops during it, ask the server (on another
  // connection) whether the settlement is on record before answering.
  void commit(const char* expect) {
    open_ = false;
    try {
      conn_->command("COMMIT");
    } catch (const TransientError& e) {
      conn_.discard();
      std::optional<std::string> s;
      try {
        s = store_.settled(lease_.id(), lease_.token);
      } catch (const Error&) {
        throw CommitInDoubt(std::string(e.what()) + "; the outcome of the commit is unknown", e.sqlstate(),
                            "COMMIT");
      }
      if (s && (!expect || *s == expect)) return;
      throw;
    }
  }

  PostgresStore::Impl& store_;
  Lease lease_;
  pg::Pool::Lease conn_;
  bool open_ = false;
};

}  // namespace

std::unique_ptr<LeaseTransaction> PostgresStore::begin(const Lease& lease) {
  auto& I = *impl_;
  for (int attempt = 0;; ++attempt) {
    try {
      return std::make_unique<PgLeaseTransaction>(I, lease, I.tx_pool.acquire());
    } catch (const TransientError&) {
      if (attempt >= I.options.transient_retries) throw;
      pg::sleep_backoff(attempt);
    }
  }
}

CancelOutcome PostgresStore::cancel(TaskId id, const Scope& scope) {
  auto& I = *impl_;
  detail::validate_scope(scope);
  for (int round = 0; round < 20; ++round) {
    auto r = I.retry([&](Connection& c) { return c.exec(I.sql.cancel, {num(id), scope.tenant}); });
    if (auto out = decode_cancel(r)) return *out;
    // The task changed state under us (claimed or settled meanwhile): look again.
  }
  throw TransientError(fmt::format("cancel: task {} kept changing state", id), "40001", "eoq_cancel");
}

RetryOutcome PostgresStore::retry(TaskId id, const Scope& scope) {
  auto& I = *impl_;
  detail::validate_scope(scope);
  // Safe to repeat: a second run finds the task live and answers not_retryable,
  // which after a lost reply is checked below.
  bool retried = false;
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.retry, {num(id), scope.tenant, I.channel}); },
                   &retried);
  if (r.i64(0, 0) > 0) return RetryOutcome::retried;
  if (r.i64(0, 1) > 0) return RetryOutcome::not_retryable;
  if (r.i64(0, 2) > 0) return retried ? RetryOutcome::retried : RetryOutcome::not_retryable;
  return RetryOutcome::not_found;
}

std::optional<Task> PostgresStore::get(TaskId id, const Scope& scope) {
  auto& I = *impl_;
  detail::validate_scope(scope);
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.get, {num(id), scope.tenant}); });
  if (r.rows() == 0) return std::nullopt;
  return decode_task(r, 0);
}

std::optional<Task> PostgresStore::find(std::string_view queue, std::string_view key, const Scope& scope) {
  detail::validate_queue("queue", queue);
  detail::validate_scope(scope);
  return impl_->lookup_keys({std::string(queue)}, {scope.tenant}, {std::string(key)})[0];
}

TaskPage PostgresStore::list(const ListQuery& q, const Scope& scope) {
  auto& I = *impl_;
  if (q.limit < 1 || q.limit > 1000) throw InvalidArgument("limit", "must be between 1 and 1000");
  if (q.queue) detail::validate_queue("queue", *q.queue);
  detail::validate_scope(scope);
  if (scope.tenant && q.tenant && *scope.tenant != *q.tenant) return {};
  Param tenant = scope.tenant ? scope.tenant : q.tenant;
  Param status = q.status ? Param(std::string(to_string(*q.status))) : std::nullopt;
  auto r = I.retry([&](Connection& c) {
    if (q.newest_first)
      return c.exec(I.sql.list_desc, {q.queue, status, q.type, tenant,
                                      num(q.after.value_or(std::numeric_limits<TaskId>::max())), num(q.limit + 1)});
    return c.exec(I.sql.list, {q.queue, status, q.type, tenant, num(q.after.value_or(0)), num(q.limit + 1)});
  });
  TaskPage page;
  for (int i = 0; i < r.rows(); ++i) page.tasks.push_back(decode_task(r, i));
  // The statement reads one row past the page to say whether another follows.
  if (static_cast<int>(page.tasks.size()) > q.limit) {
    page.tasks.pop_back();
    page.next_after = page.tasks.back().id;
  }
  return page;
}

std::vector<QueueStats> PostgresStore::stats(const Scope& scope) {
  auto& I = *impl_;
  detail::validate_scope(scope);
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.stats, {scope.tenant}); });
  std::map<std::string, QueueStats> by_queue;
  for (int i = 0; i < r.rows(); ++i) {
    auto& s = by_queue[r.text(i, 0)];
    s.queue = r.text(i, 0);
    auto n = r.i64(i, 2);
    switch (parse_status(r.text(i, 1))) {
      case TaskStatus::pending: s.pending += n; break;
      case TaskStatus::running: s.running += n; break;
      case TaskStatus::succeeded: s.succeeded += n; s.succeeded_last_minute += r.i64(i, 4); break;
      case TaskStatus::failed: s.failed += n; s.failed_last_minute += r.i64(i, 4); break;
      case TaskStatus::cancelled: s.cancelled += n; break;
      case TaskStatus::expired: s.expired += n; break;
    }
    if (!r.null(i, 3)) s.oldest_pending_age = Millis(std::max<std::int64_t>(0, r.i64(i, 3)));
  }
  std::vector<QueueStats> out;
  for (auto& [_, s] : by_queue) out.push_back(std::move(s));
  return out;
}

std::vector<Attempt> PostgresStore::history(TaskId id, const Scope& scope) {
  auto& I = *impl_;
  // A task's tenant never changes, so checking it first is as good as joining.
  if (scope.tenant && !get(id, scope)) return {};
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.history, {num(id)}); });
  std::vector<Attempt> out;
  for (int i = 0; i < r.rows(); ++i) {
    Attempt a;
    a.number = r.i32(i, 0);
    a.owner = r.opt_text(i, 1).value_or("");
    a.started_at = r.opt_time(i, 2).value_or(TimePoint{});
    a.finished_at = r.opt_time(i, 3);
    a.outcome = r.text(i, 4);
    a.error = r.opt_text(i, 5);
    out.push_back(std::move(a));
  }
  return out;
}

std::int64_t PostgresStore::prune(Millis older_than, int batch_size) {
  auto& I = *impl_;
  detail::validate_prune(older_than, batch_size);
  std::int64_t total = 0;
  for (;;) {
    auto r = I.retry([&](Connection& c) { return c.exec(I.sql.prune, {num(older_than.count()), num(batch_size)}); });
    auto n = r.i64(0, 0);
    total += n;
    if (n < batch_size) return total;
  }
}

std::int64_t PostgresStore::prunable(Millis older_than) {
  auto& I = *impl_;
  detail::validate_prune(older_than, 1);
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.prunable, {num(older_than.count())}); });
  return r.i64(0, 0);
}

MaintenanceReport PostgresStore::maintain() {
  auto& I = *impl_;
  MaintenanceReport rep;
  const int batch = I.options.prune_batch;
  auto drain = [&](const Statement& st) {
    std::int64_t total = 0;
    for (;;) {
      auto r = I.retry([&](Connection& c) { return c.exec(st, {num(batch)}); });
      total += r.i64(0, 0);
      if (r.i64(0, 0) < batch) return total;
    }
  };
  rep.expired = drain(I.sql.expire);
  rep.reaped = drain(I.sql.reap);
  if (I.options.retention) {
    // Pruning a backlog of a million rows deletes as much as a drain of a
    // million tasks writes: in slices of prune_budget, with the worker's pause
    // between them, it never takes the database from the running tasks.
    const auto until = std::chrono::steady_clock::now() + I.options.prune_budget;
    const auto older = std::to_string(I.options.retention->count());
    for (;;) {
      auto r = I.retry([&](Connection& c) { return c.exec(I.sql.prune, {older, num(batch)}); });
      rep.pruned += r.i64(0, 0);
      if (r.i64(0, 0) < batch) break;
      if (std::chrono::steady_clock::now() >= until) {
        rep.more = true;
        break;
      }
    }
  }
  return rep;
}

void PostgresStore::wait_for_tasks(const std::vector<std::string>& queues, Millis timeout) {
  auto& I = *impl_;
  using SteadyClock = std::chrono::steady_clock;
  auto deadline = SteadyClock::now() + timeout;
  std::unique_lock lk(I.listen_m);
  auto gen = I.wake_gen;
  if (I.listener_busy) {
    // Another thread is polling the LISTEN connection; it tells us what it hears.
    I.listen_cv.wait_until(lk, deadline, [&] { return I.wake_gen != gen; });
    return;
  }
  I.listener_busy = true;
  lk.unlock();
  bool heard = false;
  try {
    if (!I.listener || !I.listener->ok()) {
      I.listener.reset();
      auto c = std::make_unique<Connection>(I.options.conninfo, "eoq-listen");
      c->command(fmt::format("LISTEN {}", quote_ident(I.channel)).c_str());
      I.listener = std::move(c);
    }
    PGconn* c = I.listener->get();
    while (!heard) {
      PQconsumeInput(c);
      while (PGnotify* n = PQnotifies(c)) {
        std::string_view q(n->extra);
        if (queues.empty() || std::find(queues.begin(), queues.end(), q) != queues.end()) heard = true;
        PQfreemem(n);
      }
      if (heard) break;
      auto left = std::chrono::duration_cast<Millis>(deadline - SteadyClock::now()).count();
      if (left <= 0) break;
      pollfd fds[2] = {{PQsocket(c), POLLIN, 0}, {I.wake_fd, POLLIN, 0}};
      int rc = ::poll(fds, 2, static_cast<int>(std::min<std::int64_t>(left, 1000000)));
      if (rc < 0 && errno != EINTR) break;
      if (fds[1].revents & POLLIN) {
        std::uint64_t v;
        [[maybe_unused]] auto got = ::read(I.wake_fd, &v, sizeof v);
        heard = true;
      }
      if (fds[0].revents & (POLLERR | POLLHUP)) {
        I.listener.reset();
        break;
      }
      if (PQconsumeInput(c) == 0) {
        // The LISTEN connection broke (server restart): reconnect on the next wait.
        I.listener.reset();
        break;
      }
    }
  } catch (const Error&) {
    // Cannot listen now (server down): sleep a little so callers fall back to polling.
    lk.lock();
    I.listener_busy = false;
    I.listen_cv.wait_until(lk, std::min(deadline, SteadyClock::now() + Millis(200)),
                           [&] { return I.wake_gen != gen; });
    I.listen_cv.notify_all();
    return;
  }
  lk.lock();
  I.listener_busy = false;
  if (heard) ++I.wake_gen;
  I.listen_cv.notify_all();
}

TimePoint PostgresStore::now() {
  auto& I = *impl_;
  auto r = I.retry([&](Connection& c) { return c.exec(I.sql.clock, {}); });
  return r.time(0, 0);
}

void PostgresStore::wake() {
  auto& I = *impl_;
  {
    std::lock_guard lk(I.listen_m);
    ++I.wake_gen;
  }
  I.listen_cv.notify_all();
  std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(I.wake_fd, &one, sizeof one);
}

}  // namespace eoq
