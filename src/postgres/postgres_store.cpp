// The Postgres store: its statements are the named queries of queries.sql
// (and the schema the migrations). Each state change is one statement, fenced
// in SQL; a method here binds parameters, runs one statement, maps a missing
// row to the error it means, and decodes.
#include <eoq/postgres_store.hpp>

#include "common/validate.hpp"
#include "postgres/connection.hpp"
#include "postgres/migrations.hpp"
#include "postgres/queries.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <tuple>
#include <unordered_map>

namespace eoq {

using pg::Column;
using pg::Connection;
using pg::Param;
using pg::Result;
using pg::Statement;

namespace {

// pg_type oids of the columns the decoders read in binary.
constexpr unsigned kBool = 16, kInt8 = 20, kInt4 = 23, kText = 25, kJson = 114, kFloat8 = 701, kTimestamptz = 1184,
                   kInt8Array = 1016;

// A task row as claim, get, list and by_keys return it: both task tables'
// columns in table order. decode_task reads them by position.
const std::vector<Column> kTaskColumns = {
    {"id", kInt8},           {"queue", kText},           {"type", kText},
    {"key", kText},          {"tenant", kText},          {"payload", kJson},
    {"status", kText},       {"priority", kInt4},        {"run_at", kTimestamptz},
    {"deadline", kTimestamptz}, {"attempts", kInt4},     {"max_attempts", kInt4},
    {"backoff", kText},      {"backoff_initial_ms", kInt8}, {"backoff_max_ms", kInt8},
    {"backoff_jitter", kFloat8}, {"version", kInt8},     {"lease_owner", kText},
    {"lease_expires_at", kTimestamptz}, {"started_at", kTimestamptz}, {"cancel_requested", kBool},
    {"progress", kInt4},     {"stage", kText},           {"checkpoint_stage", kText},
    {"checkpoint", kJson},   {"result", kJson},          {"last_error", kText},
    {"created_at", kTimestamptz}, {"updated_at", kTimestamptz}, {"finished_at", kTimestamptz},
    {"partition_key", kText}, {"timeout_ms", kInt8}};

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
  if (auto p = r.text(row, c(30)); !p.empty()) t.partition = std::move(p);
  if (!r.null(row, c(31))) t.timeout = Millis(r.i64(row, c(31)));
  return t;
}

// A row of claim_pending: the task, then what the statement says beside it.
std::vector<Column> task_then(std::initializer_list<Column> more) {
  std::vector<Column> cols = kTaskColumns;
  cols.insert(cols.end(), more);
  return cols;
}

// A row of by_keys: its position in the input, then the task.
std::vector<Column> ordinal_then_task() {
  std::vector<Column> cols{{"ord", kInt8}};
  cols.insert(cols.end(), kTaskColumns.begin(), kTaskColumns.end());
  return cols;
}

void validate_schema(const std::string& s) {
  bool ok = !s.empty() && s.size() <= 48 && ((s[0] >= 'a' && s[0] <= 'z') || s[0] == '_');
  for (char ch : s) ok = ok && ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_');
  if (!ok)
    throw InvalidArgument("schema", fmt::format("'{}' must match [a-z_][a-z0-9_]* and be at most 48 characters", s));
}

std::string quote_ident(const std::string& s) { return "\"" + s + "\""; }

// The statements of one schema, the schema put in once per store.
struct Statements {
  explicit Statements(const std::string& quoted_schema) : schema(quoted_schema) {}
  Statement q(const char* name) const { return pg::query(name, schema); }

  std::string schema;
  Statement submit = q("submit"), submit_batch = q("submit_batch"), create_stage = q("create_stage"),
            drop_stage = q("drop_stage"), copy_stage = q("copy_stage"), copy_stage_narrow = q("copy_stage_narrow"),
            submit_staged = q("submit_staged"),
            reserve_ids = q("reserve_ids"), copy_keys = q("copy_keys"), copy_tasks = q("copy_tasks"),
            by_keys = q("by_keys");
  Statement claim_pending_one = q("claim_pending_one"), claim_pending = q("claim_pending"),
            claim_one = q("claim_one"), claim = q("claim"), complete = q("complete"), complete_one = q("complete_one"),
            fail = q("fail"),
            release = q("release"), release_batch = q("release_batch"), expire_lease = q("expire_lease"),
            cancel_lease = q("cancel_lease"), snooze = q("snooze"), heartbeat = q("heartbeat"), remove_finished = q("remove_finished"), progress = q("progress"), checkpoint = q("checkpoint");
  Statement cancel = q("cancel"), lock_task = q("lock_task"), retry = q("retry"), get = q("get"),
            list = q("list"), list_desc = q("list_desc"), list_count = q("list_count"),
            count_estimate = q("count_estimate"), stats = q("stats"), throughput = q("throughput"),
            history = q("history"),
            settled = q("settled"), now = q("now");
  Statement expire = q("expire"), reap = q("reap"), prune = q("prune"), prunable = q("prunable"),
            table_stats = q("table_stats"), analyze = q("analyze"), compact_totals = q("compact_totals");
  Statement pause = q("pause"), resume = q("resume"), paused_queues = q("paused_queues");
  Statement claim_limited = q("claim_limited"), claim_limited_pending = q("claim_limited_pending"),
            limits_lock = q("limits_lock"), set_limits = q("set_limits"),
            clear_limits = q("clear_limits"), limits = q("limits"), rate_room = q("rate_room");
  Statement submit_flow = q("submit_flow"), lock_parents = q("lock_parents"), parent_states = q("parent_states"),
            relatives = q("relatives");
  Statement migrate_lock = q("migrate_lock"), migrations_table = q("migrations_table"),
            migrations_applied = q("migrations_applied"), migration_applied = q("migration_applied"),
            migrations_breaks_column = q("migrations_breaks_column"),
            migrations_has_breaks = q("migrations_has_breaks");
};

}  // namespace

namespace pg {
const std::vector<ResultShape>& result_shapes() {
  // The first columns of submit's answer, decoded by task_from_new; batches put the input position first.
  const std::vector<Column> inserted = {
      {"id", kInt8}, {"run_at", kTimestamptz}, {"created_at", kTimestamptz}, {"version", kInt8}};
  auto after_ord = [&](std::vector<Column> tail) {
    std::vector<Column> cols{{"ord", kInt8}};
    cols.insert(cols.end(), inserted.begin(), inserted.end());
    cols.insert(cols.end(), tail.begin(), tail.end());
    return cols;
  };
  auto with = [&](std::vector<Column> tail) {
    auto cols = inserted;
    cols.insert(cols.end(), tail.begin(), tail.end());
    return cols;
  };
  const std::vector<Column> count = {{"count", kInt8}};
  static const std::vector<ResultShape> shapes = {
      {"submit", with({{"pg_notify", 0}})},
      {"submit_flow", after_ord({{"count", 0}})},
      {"lock_parents", std::vector<Column>{{"id", 0}}},
      {"parent_states", std::vector<Column>{{"id", kInt8}, {"status", kText}, {"tenant", kText}}},
      {"relatives", std::vector<Column>{{"kind", kInt4}, {"id", kInt8}, {"type", kText}, {"status", kText},
                                        {"result", kText}}},
      {"submit_batch", after_ord({{"count", 0}})},
      {"create_stage", std::nullopt},
      {"drop_stage", std::nullopt},
      {"copy_stage", std::nullopt},
      {"copy_stage_narrow", std::nullopt},
      {"stage_rows", std::nullopt},  // a part of submit_staged
      {"submit_staged", after_ord({{"count", 0}})},
      {"reserve_ids", std::vector<Column>{{"first_id", kInt8}, {"ids", kInt8Array},
                                          {"created_at", kTimestamptz}, {"count", 0}}},
      {"copy_keys", std::nullopt},
      {"copy_tasks", std::nullopt},
      {"by_keys", ordinal_then_task()},
      {"claim_fate", std::nullopt},  // parts of the four claims below
      {"claim_ready", std::nullopt},
      {"claim_cand_one", std::nullopt},
      {"claim_cand", std::nullopt},
      {"claim_set", std::nullopt},
      {"claim_pending_lease", std::nullopt},
      {"claim_lease", std::nullopt},
      {"claim_pending_one", task_then({{"settle", kBool}})},
      {"claim_pending", task_then({{"settle", kBool}})},
      {"claim_one", kTaskColumns},
      {"claim", kTaskColumns},
      {"claim_limited_cand", std::nullopt},  // parts of the two limited claims
      {"claim_limited_record", std::nullopt},
      {"claim_limited_pending", task_then({{"settle", kBool}})},
      {"claim_limited", kTaskColumns},
      {"limits_lock", std::vector<Column>{{"pg_advisory_xact_lock", 0}}},
      {"set_limits", count},
      {"clear_limits", count},
      {"rate_room", std::vector<Column>{{"wait_ms", kInt8}}},
      {"limits", std::vector<Column>{{"queue", kText}, {"concurrency", kInt4}, {"partition_concurrency", kInt4},
                                     {"rate", kInt4}, {"rate_period_ms", kInt8}, {"partition_rate", kInt4},
                                     {"partition_rate_period_ms", kInt8}}},
      {"complete", std::vector<Column>{{"id", kInt8}, {"version", kInt8}}},
      {"complete_one", std::vector<Column>{{"id", kInt8}}},
      {"fail", std::vector<Column>{{"outcome", kText}, {"run_at", kTimestamptz}}},
      {"release", std::vector<Column>{{"id", 0}, {"pg_notify", 0}}},
      {"release_batch", std::vector<Column>{{"id", kInt8}, {"version", kInt8}, {"count", 0}}},
      {"expire_lease", std::vector<Column>{{"overdue", kBool}}},
      {"cancel_lease", std::vector<Column>{{"id", 0}}},
      {"snooze", std::vector<Column>{{"outcome", kText}, {"run_at", kTimestamptz}, {"notified", 0}}},
      {"heartbeat", std::vector<Column>{{"lease_expires_at", kTimestamptz}, {"cancel_requested", kBool}}},
      {"progress", std::vector<Column>{{"id", 0}}},
      {"checkpoint", std::vector<Column>{{"id", 0}}},
      {"cancel", std::vector<Column>{{"cancelled", kInt8}, {"requested", kInt8}, {"finished", kInt8},
                                     {"live", kInt8}}},
      {"lock_task", std::vector<Column>{{"id", 0}}},
      {"remove_finished", std::vector<Column>{{"removed", kInt8}, {"running", kInt8}, {"moved", kInt8}}},
      {"retry", std::vector<Column>{{"retried", kInt8}, {"finished", kInt8}, {"live", kInt8}}},
      {"get", kTaskColumns},
      {"list", kTaskColumns},
      {"list_desc", kTaskColumns},
      {"list_count", count},
      {"count_estimate", std::vector<Column>{{"estimate", kInt8}}},
      {"stats", std::vector<Column>{{"queue", kText}, {"status", kText}, {"count", kInt8},
                                    {"oldest_pending_ms", kInt8}, {"last_minute", kInt8}, {"total", kInt8}}},
      {"throughput", std::vector<Column>{{"queue", kText}, {"status", kText}, {"minute", kTimestamptz},
                                         {"finished", kInt8}}},
      {"history", std::vector<Column>{{"attempt", kInt4}, {"owner", kText}, {"started_at", kTimestamptz},
                                      {"finished_at", kTimestamptz}, {"outcome", kText}, {"error", kText},
                                      {"version", 0}}},
      {"settled", std::vector<Column>{{"status", kText}}},
      {"now", std::vector<Column>{{"now", kTimestamptz}}},
      {"expire", count},
      {"reap", count},
      {"prune", count},
      {"prunable", count},
      {"table_stats", std::vector<Column>{{"reltuples", kFloat8}, {"never_analyzed", kBool}}},
      {"analyze", std::nullopt},
      {"compact_totals", std::nullopt},
      {"pause", std::nullopt},
      {"resume", std::vector<Column>{{"resumed", kInt8}}},
      {"paused_queues", std::vector<Column>{{"queue", kText}}},
      {"migrate_lock", std::vector<Column>{{"pg_advisory_xact_lock", 0}}},
      {"migrations_table", std::nullopt},
      {"migrations_breaks_column", std::nullopt},
      {"migrations_has_breaks", std::vector<Column>{{"count", kInt8}}},
      {"migrations_applied", std::vector<Column>{{"name", kText}, {"breaks_older", kBool}}},
      {"migration_applied", std::vector<Column>{}},
  };
  return shapes;
}
}  // namespace pg

namespace {

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
          channel,
          str(t.partition.value_or("")),
          t.timeout ? num(t.timeout->count()) : Param{}};
}

// submit_params' columns that submit_batch and submit_flow send as arrays:
// all but the channel.
constexpr std::size_t kSubmitColumns[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15};
constexpr std::size_t kSubmitArrays = std::size(kSubmitColumns);

// Batches from this size on go through COPY (submit_batch).
constexpr std::size_t kStageFrom = 1000;

// One text value in COPY's text format.
void copy_text(std::string& out, std::string_view v) {
  // A plain loop: find_first_of calls memchr over the set once per byte.
  auto plain = [](char c) { return c != '\\' && c != '\t' && c != '\n' && c != '\r'; };
  for (;;) {
    std::size_t special = 0;
    while (special < v.size() && plain(v[special])) ++special;
    out.append(v.substr(0, special));
    if (special == v.size()) return;
    switch (v[special]) {
      case '\\': out += "\\\\"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      default: out += "\\r";
    }
    v.remove_prefix(special + 1);
  }
}

void copy_nullable(std::string& out, const std::optional<std::string>& v) {
  if (v) copy_text(out, *v);
  else out += "\\N";
}

void copy_int(std::string& out, long long v) {
  const fmt::format_int f(v);
  out.append(f.data(), f.size());
}

void copy_time(std::string& out, const std::optional<TimePoint>& t) {
  if (t) copy_int(out, t->time_since_epoch().count());
  else out += "\\N";
}

// A task as a row of the stage (create_stage's columns), written straight into
// the COPY text: the same values as submit_params, without a string apiece.
// `narrow`: only copy_stage_narrow's columns.
void copy_row(std::string& out, const NewTask& t, std::size_t ord, bool narrow) {
  if (narrow) {
    copy_nullable(out, t.key);
    out += '\t';
    copy_text(out, t.payload);
    out += '\t';
    copy_int(out, static_cast<long long>(ord));
    out += '\n';
    return;
  }
  copy_text(out, t.queue);
  out += '\t';
  copy_text(out, t.type);
  out += '\t';
  copy_nullable(out, t.key);
  out += '\t';
  copy_nullable(out, t.tenant);
  out += '\t';
  copy_text(out, t.payload);
  out += '\t';
  copy_int(out, t.priority);
  out += '\t';
  copy_time(out, t.run_at);
  out += '\t';
  copy_time(out, t.deadline);
  out += '\t';
  copy_int(out, t.retry.max_attempts);
  out += t.retry.backoff == Backoff::fixed ? "\tfixed\t" : "\texponential\t";
  copy_int(out, t.retry.initial_delay.count());
  out += '\t';
  copy_int(out, t.retry.max_delay.count());
  fmt::format_to(std::back_inserter(out), "\t{}\t", t.retry.jitter);
  if (t.partition) copy_text(out, *t.partition);
  out += '\t';
  if (t.timeout) copy_int(out, t.timeout->count());
  else out += "\\N";
  out += '\t';
  copy_int(out, static_cast<long long>(ord));
  out += '\n';
}

// A key as a row of copy_keys, in COPY's binary format: the tenant '' for none.
void key_row(std::string& out, const NewTask& t, std::int64_t id) {
  using pg::BinaryCopy;
  BinaryCopy::row(out, 4);
  BinaryCopy::text(out, *t.key);
  BinaryCopy::text(out, t.queue);
  BinaryCopy::text(out, t.tenant ? std::string_view(*t.tenant) : std::string_view());
  BinaryCopy::i64(out, id);
}

// A task as a row of copy_tasks, in COPY's binary format, in its columns' order.
void task_row(std::string& out, const NewTask& t, std::int64_t id, TimePoint run_at) {
  using pg::BinaryCopy;
  BinaryCopy::row(out, 17);
  BinaryCopy::i64(out, id);
  BinaryCopy::text(out, t.queue);
  BinaryCopy::text(out, t.type);
  BinaryCopy::opt_text(out, t.key);
  BinaryCopy::opt_text(out, t.tenant);
  BinaryCopy::text(out, t.payload);
  BinaryCopy::text(out, "pending");
  BinaryCopy::i32(out, t.priority);
  BinaryCopy::time(out, run_at);
  BinaryCopy::time(out, t.deadline);
  BinaryCopy::i32(out, t.retry.max_attempts);
  BinaryCopy::text(out, t.retry.backoff == Backoff::fixed ? "fixed" : "exponential");
  BinaryCopy::i64(out, t.retry.initial_delay.count());
  BinaryCopy::i64(out, t.retry.max_delay.count());
  BinaryCopy::f64(out, t.retry.jitter);
  BinaryCopy::text(out, t.partition ? std::string_view(*t.partition) : std::string_view());
  if (t.timeout) BinaryCopy::i64(out, t.timeout->count());
  else BinaryCopy::null(out);
}

// Rows per COPY slice: the server reads one while the next is made.
constexpr std::size_t kCopyRows = 512;

// A binary COPY of n inputs: row(i, slice) appends input i's row (or none),
// about `row_bytes` long.
void copy_binary(Connection& c, const Statement& copy, std::size_t n, std::size_t row_bytes,
                 const std::function<void(std::size_t, std::string&)>& row) {
  std::size_t next = 0;
  c.copy_in(copy.sql.c_str(), [&](std::string& slice) {
    if (next == 0) {
      slice.reserve(kCopyRows * row_bytes);
      pg::BinaryCopy::header(slice);
    }
    for (auto end = std::min(n, next + kCopyRows); next < end; ++next) row(next, slice);
    if (next < n) return true;
    pg::BinaryCopy::trailer(slice);
    return false;
  });
}

Task task_from_new(const NewTask& n, std::int64_t id, TimePoint run_at, TimePoint created_at, std::int64_t version) {
  Task t;
  t.id = id;
  t.run_at = run_at;
  t.created_at = t.updated_at = created_at;
  t.version = version;
  t.queue = n.queue;
  t.type = n.type;
  t.payload = n.payload;
  t.key = n.key;
  t.tenant = n.tenant;
  t.priority = n.priority;
  t.deadline = n.deadline;
  t.retry = n.retry;
  t.partition = n.partition;
  t.timeout = n.timeout;
  return t;
}

Task task_from_new(const NewTask& n, const Result& r, int row, int off) {
  return task_from_new(n, r.i64(row, off), r.time(row, off + 1), r.time(row, off + 2), r.i64(row, off + 3));
}

// The (id, lease version) pairs a settling statement answered. The same lease
// twice in one batch is settled once, and only its first asking says so.
// Sorted, not a tree: a node allocation per task of a batch of a thousand.
class Answered {
 public:
  enum class Ask { absent, first, again };
  explicit Answered(const Result& r) {
    rows_.reserve(static_cast<std::size_t>(r.rows()));
    for (int i = 0; i < r.rows(); ++i) rows_.emplace_back(r.i64(i, 0), r.i64(i, 1), false);
    std::sort(rows_.begin(), rows_.end());
  }
  Ask ask(TaskId id, std::int64_t version) {
    auto it = std::lower_bound(rows_.begin(), rows_.end(), std::make_tuple(id, version, false));
    if (it == rows_.end() || std::get<0>(*it) != id || std::get<1>(*it) != version) return Ask::absent;
    return std::exchange(std::get<2>(*it), true) ? Ask::again : Ask::first;
  }

 private:
  std::vector<std::tuple<TaskId, std::int64_t, bool>> rows_;  // bool: asked already
};

// The migrations name the schema @schema@.
std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
  return s;
}

bool has_parents(const NewTask& t) { return !t.parents.empty() || !t.parent_keys.empty(); }

// Submits tasks that may name parents on `c`, inside a transaction the caller
// opened and ends (the store's own, or a handler's). A task with a parent that
// has not ended waits for it; one whose parent already failed is born
// cancelled. The parents in the store are locked first (lock_parents), so none
// ends unseen before this commits; a parent named by a key that an earlier
// task of the batch takes is that task. One statement per wave: the tasks
// whose parents in the batch were placed by earlier waves (a batch without
// such parents is one wave).
std::vector<SubmitResult> submit_flow(Connection& c, const Statements& sql, std::span<const NewTask> tasks,
                                      bool is_batch, const std::string& channel) {
  const std::size_t n = tasks.size();
  auto field = [&](std::size_t i, const std::string& f) { return is_batch ? fmt::format("tasks[{}].{}", i, f) : f; };
  // Each task's parents once, with the field that named it first (for errors).
  struct Named {
    TaskId id = 0;            // in the store
    std::size_t in_batch = 0;  // else: 1 + the position of the batch's task that takes its key
    std::string field;
  };
  std::vector<std::vector<Named>> named(n);
  std::set<std::tuple<std::size_t, TaskId, std::size_t>> seen_parent;  // (task, id, in_batch)
  auto add = [&](std::size_t i, Named p) {
    if (seen_parent.emplace(i, p.id, p.in_batch).second) named[i].push_back(std::move(p));
  };
  std::vector<Param> kq, kt, kk;
  std::vector<std::pair<std::size_t, std::size_t>> key_at;  // (task, index in its parent_keys)
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = 0; j < tasks[i].parents.size(); ++j)
      add(i, {tasks[i].parents[j], 0, field(i, fmt::format("parents[{}]", j))});
    for (std::size_t j = 0; j < tasks[i].parent_keys.size(); ++j) {
      kq.push_back(tasks[i].queue);
      kt.push_back(tasks[i].tenant);
      kk.push_back(tasks[i].parent_keys[j]);
      key_at.emplace_back(i, j);
    }
  }
  if (!kk.empty()) {
    auto r = c.exec(sql.by_keys, {pg::text_array(kq), pg::text_array(kt), pg::text_array(kk)});
    std::vector<TaskId> found(kk.size(), 0);
    for (int i = 0; i < r.rows(); ++i) found[static_cast<std::size_t>(r.i64(i, 0) - 1)] = r.i64(i, 1);
    std::map<std::tuple<std::string, std::string, std::string>, std::size_t> first_holder;
    for (std::size_t i = 0; i < n; ++i)
      if (tasks[i].key) first_holder.emplace(std::make_tuple(tasks[i].queue, tasks[i].tenant.value_or(""), *tasks[i].key), i);
    for (std::size_t x = 0; x < kk.size(); ++x) {
      auto [i, j] = key_at[x];
      const auto& t = tasks[i];
      auto f = field(i, fmt::format("parent_keys[{}]", j));
      if (found[x]) {
        add(i, {found[x], 0, f});
        continue;
      }
      auto h = first_holder.find(std::make_tuple(t.queue, t.tenant.value_or(""), t.parent_keys[j]));
      if (h == first_holder.end() || h->second >= i)
        throw InvalidArgument(f, fmt::format("no task holds the key '{}' in queue '{}'", t.parent_keys[j], t.queue));
      add(i, {0, h->second + 1, f});
    }
  }

  struct State {
    TaskStatus status;
    std::optional<std::string> tenant;
  };
  std::unordered_map<TaskId, State> state;
  std::vector<Param> ids;
  {
    std::unordered_map<TaskId, bool> seen;
    for (const auto& v : named)
      for (const auto& p : v)
        if (p.id && seen.emplace(p.id, true).second) ids.push_back(num(p.id));
  }
  if (!ids.empty()) {
    const auto arr = pg::text_array(ids);
    // A parent can move between tables while we look (released from waiting,
    // retried out of finished): look until every parent that has not ended is
    // one we hold locked.
    for (int round = 0;; ++round) {
      auto locked = c.exec(sql.lock_parents, {arr});
      auto r = c.exec(sql.parent_states, {arr});
      state.clear();
      int live = 0;
      for (int i = 0; i < r.rows(); ++i) {
        auto s = parse_status(r.text(i, 1));
        state[r.i64(i, 0)] = {s, r.opt_text(i, 2)};
        live += is_terminal(s) ? 0 : 1;
      }
      if (live <= locked.rows()) break;
      if (round > 20) throw TransientError("submit: the parents kept changing state", "40001", "eoq_lock_parents");
    }
  }
  // Parents share their child's tenant; one of another is as good as absent.
  for (std::size_t i = 0; i < n; ++i)
    for (const auto& p : named[i]) {
      if (!p.id) continue;
      auto it = state.find(p.id);
      if (it == state.end() || it->second.tenant != tasks[i].tenant)
        throw InvalidArgument(p.field, fmt::format("task {} does not exist", p.id));
    }

  std::vector<std::optional<SubmitResult>> out(n);
  for (std::size_t placed = 0; placed < n;) {
    std::vector<std::size_t> wave;
    for (std::size_t i = 0; i < n; ++i)
      if (!out[i] && std::all_of(named[i].begin(), named[i].end(),
                                 [&](const Named& p) { return !p.in_batch || out[p.in_batch - 1]; }))
        wave.push_back(i);
    std::vector<std::vector<Param>> cols(kSubmitArrays);
    std::vector<Param> status, left, anyway, why, e_child, e_parent, e_done;
    std::vector<std::optional<std::string>> whys;
    std::vector<TaskStatus> statuses;
    for (std::size_t k = 0; k < wave.size(); ++k) {
      const auto& t = tasks[wave[k]];
      auto sp = submit_params(t, "");
      for (std::size_t col = 0; col < kSubmitArrays; ++col) cols[col].push_back(std::move(sp[kSubmitColumns[col]]));
      int waiting_for = 0;
      std::optional<std::string> reason;
      for (const auto& p : named[wave[k]]) {
        TaskId pid = p.id;
        TaskStatus s{};
        if (p.in_batch) {
          const auto& r = *out[p.in_batch - 1];
          // Its key was taken after by_keys looked: by a task we hold no lock
          // on. Rare (a concurrent submit of the same key); run it again.
          if (r.duplicate) throw TransientError("submit: a parent's key was taken meanwhile", "40001", "eoq_submit_flow");
          pid = r.task.id;
          s = r.task.status;
        } else {
          s = state.at(p.id).status;
        }
        const bool done = is_terminal(s);
        if (!done) ++waiting_for;
        else if (s != TaskStatus::succeeded && !reason && t.on_parent_failure == ParentFailure::cancel)
          reason = fmt::format("parent {} ended {}", pid, to_string(s));
        e_child.push_back(num(static_cast<std::int64_t>(k + 1)));
        e_parent.push_back(num(pid));
        e_done.push_back(done ? "t" : "f");
      }
      const TaskStatus st = reason ? TaskStatus::cancelled : waiting_for > 0 ? TaskStatus::waiting : TaskStatus::pending;
      statuses.push_back(st);
      whys.push_back(reason);
      status.push_back(std::string(to_string(st)));
      left.push_back(num(waiting_for));
      anyway.push_back(t.on_parent_failure == ParentFailure::run ? "t" : "f");
      why.push_back(reason);
    }
    std::vector<Param> params;
    for (std::size_t col = 0; col < 13; ++col) params.push_back(pg::text_array(cols[col]));
    params.push_back(channel);
    for (auto* a : {&status, &left, &anyway, &why, &e_child, &e_parent, &e_done}) params.push_back(pg::text_array(*a));
    for (std::size_t col = 13; col < kSubmitArrays; ++col) params.push_back(pg::text_array(cols[col]));
    auto r = c.exec(sql.submit_flow, params);
    for (int row = 0; row < r.rows(); ++row) {
      auto k = static_cast<std::size_t>(r.i64(row, 0) - 1);
      auto task = task_from_new(tasks[wave[k]], r, row, 1);
      task.status = statuses[k];
      task.last_error = whys[k];
      if (task.status == TaskStatus::cancelled) task.finished_at = task.created_at;
      out[wave[k]] = SubmitResult{std::move(task), false};
    }
    std::vector<Param> dq, dt, dk;
    std::vector<std::size_t> taken;
    for (auto i : wave)
      if (!out[i]) {
        taken.push_back(i);
        dq.push_back(tasks[i].queue);
        dt.push_back(tasks[i].tenant);
        dk.push_back(tasks[i].key);
      }
    if (!taken.empty()) {
      auto e = c.exec(sql.by_keys, {pg::text_array(dq), pg::text_array(dt), pg::text_array(dk)});
      for (int row = 0; row < e.rows(); ++row) {
        auto i = taken[static_cast<std::size_t>(e.i64(row, 0) - 1)];
        auto holder = decode_task(e, row, 1);
        detail::check_key_reuse(tasks[i], is_batch ? std::optional(i) : std::nullopt, holder.type, holder.payload,
                                fmt::format("task {}", holder.id), holder.id);
        out[i] = SubmitResult{std::move(holder), true};
      }
      for (auto i : taken)
        if (!out[i]) throw TransientError("submit: the key's task was deleted meanwhile", "40001", "eoq_submit_flow");
    }
    placed += wave.size();
  }
  std::vector<SubmitResult> result;
  result.reserve(n);
  for (auto& o : out) result.push_back(std::move(*o));
  return result;
}

// f() between BEGIN and COMMIT; a throw rolls back (or leaves a broken
// connection to its pool, which drops it).
template <class F>
auto in_transaction(Connection& c, F&& f) {
  c.begin();
  try {
    auto out = f();
    c.command("COMMIT");
    return out;
  } catch (...) {
    if (c.ok()) Result(PQexec(c.get(), "ROLLBACK"));
    throw;
  }
}

[[noreturn]] void lease_lost(const Lease& lease, std::string_view verb) {
  throw LeaseLost(lease.id(), lease.token, fmt::format("{} found the task no longer running under this lease", verb));
}

}  // namespace

namespace detail {
std::vector<Migration> test_migrations;
}  // namespace detail

namespace {
// The migrations this build knows, in order: the embedded ones, then a test's.
std::vector<const detail::Migration*> known_migrations() {
  std::vector<const detail::Migration*> out;
  for (std::size_t m = 0; m < detail::kMigrationCount; ++m) out.push_back(&detail::kMigrations[m]);
  for (const auto& m : detail::test_migrations) out.push_back(&m);
  return out;
}

bool breaks_older(const detail::Migration& m) { return std::strstr(m.sql, detail::kBreaksOlderMarker) != nullptr; }

struct AppliedMigration {
  std::string name;
  bool breaks_older;
};

std::vector<AppliedMigration> decode_applied(const Result& r) {
  std::vector<AppliedMigration> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back({r.text(i, 0), r.boolean(i, 1)});
  return out;
}

// The applied migrations this build does not know and which break older
// programs, by name; empty when this build may work on the schema.
std::vector<std::string> breaking_unknown(const std::vector<AppliedMigration>& applied,
                                          const std::vector<const detail::Migration*>& known) {
  std::vector<std::string> out;
  for (const auto& a : applied)
    if (a.breaks_older && std::none_of(known.begin(), known.end(), [&](auto* m) { return a.name == m->name; }))
      out.push_back(a.name);
  std::sort(out.begin(), out.end());
  return out;
}

std::string too_new_message(const std::string& schema, const std::vector<std::string>& names,
                            const std::vector<const detail::Migration*>& known, std::string_view what) {
  return fmt::format("schema \"{}\" has migration {}, which this eoq (built up to {}) does not know and which "
                     "programs built before it must not run against: {}; upgrade this program (docs/upgrading.md)",
                     schema, fmt::join(names, ", "), known.empty() ? "none" : known.back()->name, what);
}
}  // namespace

struct PostgresStore::Impl {
  PostgresOptions options;
  std::string quoted;
  std::string channel;
  Statements sql;
  pg::Pool pool;     // short statements
  pg::Pool tx_pool;  // handler transactions, held for a handler's whole run
  std::optional<pg::Pool> read_pool;  // read_conninfo: get, list, stats, history

  // LISTEN connection: one thread polls it; others wait on listen_cv.
  std::mutex listen_m;
  std::condition_variable listen_cv;
  bool listener_busy = false;
  std::uint64_t wake_gen = 0;   // wake() calls and notifications heard
  std::uint64_t wake_seen = 0;  // wake_gen as of the last wait that returned
  std::unique_ptr<Connection> listener;
  // Steady-clock ticks of the last statistics check (see refresh_stats); 0: never.
  std::atomic<std::chrono::steady_clock::rep> stats_refreshed{0};
  std::atomic<std::chrono::steady_clock::rep> totals_compacted{0};  // see compact_totals
  std::atomic<std::chrono::steady_clock::rep> schema_checked{0};    // see check_schema
  // The queues with limits, as last read (at most once a second): claims on
  // them go through claim_limited. Stale is safe: claims on other queues find
  // a queue with limits empty (eoq.unlimited), so a queue limited meanwhile
  // waits for the next read, and one whose limits went is claimed by
  // claim_limited as if unlimited until then.
  std::mutex limited_m;
  std::vector<std::string> limited;
  std::chrono::steady_clock::time_point limited_read{};
  // When a start leaves a full rate window (steady clock ticks; 0: none
  // known): wait_for_tasks ends then, since no notification says so.
  std::atomic<std::chrono::steady_clock::rep> rate_room_at{0};
  // A claim of a queue with limits was held back: the next settlement made
  // through this store may free a place, and wakes its waiting claimer (no
  // notification says so; a place freed by another process is seen at the
  // next poll).
  std::atomic<bool> held_back{false};
  void freed() {
    if (held_back.load(std::memory_order_relaxed) && held_back.exchange(false)) wake();
  }
  void wake() {
    {
      std::lock_guard lk(listen_m);
      ++wake_gen;
    }
    listen_cv.notify_all();
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd, &one, sizeof one);
  }
  int wake_fd = -1;
  // The statistics refresh under way, if any. Last, so that it is joined
  // before the pools it borrows from go.
  std::atomic<bool> refreshing{false};
  std::mutex refresher_m;
  std::jthread refresher;

  explicit Impl(PostgresOptions o)
      : options(std::move(o)),
        quoted(quote_ident(options.schema)),
        channel("eoq_" + options.schema),
        sql(quoted),
        pool(options.conninfo, "eoq", options.pool_size, !options.transaction_pooling, true),
        tx_pool(options.conninfo, "eoq-handler", options.pool_size, !options.transaction_pooling) {
    // A standby's own pooler may pool by transaction too: no named statements there either.
    if (!options.read_conninfo.empty())
      read_pool.emplace(options.read_conninfo, "eoq-read", options.pool_size, !options.transaction_pooling);
    wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd < 0) throw Error("eventfd failed");
  }
  ~Impl() {
    if (wake_fd >= 0) close(wake_fd);
  }

  std::vector<std::string> limited_queues() {
    const auto now = std::chrono::steady_clock::now();
    {
      std::lock_guard lock(limited_m);
      if (limited_read != std::chrono::steady_clock::time_point{} && now - limited_read < std::chrono::seconds(1))
        return limited;
    }
    auto r = run(sql.limits, {});
    std::vector<std::string> names;
    for (int i = 0; i < r.rows(); ++i) names.push_back(r.text(i, 0));
    std::lock_guard lock(limited_m);
    limited = names;
    limited_read = now;
    return names;
  }

  // One statement on a pooled connection, retried on transient errors.
  // `retried` is set when a retry happened: the first try may have applied.
  Result run(const Statement& st, const std::vector<Param>& params, bool* retried = nullptr) {
    return pg::with_retry(
        pool, options.transient_retries, [&](Connection& c) { return c.exec(st, params); }, retried);
  }
  // A statement that handles at most its last parameter's rows and answers
  // how many, run until a batch comes back short (or `until` passes).
  detail::Batches in_batches(const Statement& st, int size, std::optional<Param> first = std::nullopt,
                             std::optional<std::chrono::steady_clock::time_point> until = std::nullopt) {
    return detail::in_batches(
        size,
        [&](int n) {
          std::vector<Param> params;
          if (first) params.push_back(*first);
          params.push_back(num(n));
          return run(st, params).i64(0, 0);
        },
        until);
  }
  // Several statements on one connection (a transaction), retried as a whole.
  template <class F>
  auto run_on_connection(F&& f, bool* retried = nullptr) {
    return pg::with_retry(pool, options.transient_retries, std::forward<F>(f), retried);
  }
  // run() for the reads that may be stale: on read_conninfo when there is one.
  Result read(const Statement& st, const std::vector<Param>& params) {
    return pg::with_retry(read_pool ? *read_pool : pool, options.transient_retries,
                          [&](Connection& c) { return c.exec(st, params); });
  }
  // Where LISTEN runs; empty: nowhere (behind a transaction pooler), poll.
  const std::string& listen_conninfo() const {
    static const std::string none;
    if (!options.listen_conninfo.empty()) return options.listen_conninfo;
    return options.transaction_pooling ? none : options.conninfo;
  }

  std::vector<std::optional<Task>> lookup_keys(const std::vector<Param>& queues, const std::vector<Param>& tenants,
                                               const std::vector<Param>& keys) {
    auto r = run(sql.by_keys, {pg::text_array(queues), pg::text_array(tenants), pg::text_array(keys)});
    std::vector<std::optional<Task>> out(queues.size());
    for (int i = 0; i < r.rows(); ++i) out[static_cast<std::size_t>(r.i64(i, 0) - 1)] = decode_task(r, i, 1);
    return out;
  }

  // Whether the settlement of (id, token) is on record; used after a retry,
  // when our first try may have committed before the connection dropped.
  std::optional<std::string> settled(TaskId id, std::int64_t token) {
    auto r = run(sql.settled, {num(id), num(token)});
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
  // On a thread of its own, after the batch has committed: the caller's
  // submit_batch does not wait for it (an ANALYZE of 10,000 rows took 8 ms, a
  // tenth of the batch before it, and more on a larger table). Claims made
  // meanwhile plan on the old statistics; the ANALYZE invalidates their plans.
  // On a spare connection: the one that just submitted is the next batch's (so
  // a store that submits from one thread holds two connections, not one).
  // The store's destructor waits for a refresh under way.
  void refresh_stats(std::size_t batch_rows) noexcept {
    if (refreshing) return;  // one at a time; the next large batch asks again
    if (!due(stats_refreshed, std::chrono::seconds(5))) return;
    if (refreshing.exchange(true)) return;
    // The thread clears `refreshing` before it ends, which can be before its
    // std::jthread is even assigned: the mutex keeps the next caller's join
    // off the assignment.
    std::lock_guard lock(refresher_m);
    try {
      if (refresher.joinable()) refresher.join();
      refresher = std::jthread([this, batch_rows] {
        // Twice at most: the spare is the connection idle the longest, the
        // one a server's idle_session_timeout or a NAT has most likely
        // closed (a broken connection is dropped when it goes back).
        for (int attempt = 0; attempt < 2; ++attempt) {
          try {
            auto c = pool.acquire_spare();
            auto r = c->exec(sql.table_stats, {});
            const double tuples = r.rows() == 1 ? std::max(0.0, r.f64(0, 0)) : 0.0;
            if (r.rows() == 1 && (r.boolean(0, 1) || static_cast<double>(batch_rows) * 10 >= tuples))
              c->command(sql.analyze.sql.c_str());
            break;
          } catch (...) {
            // Only an optimisation: autovacuum gets there too.
          }
        }
        refreshing = false;
      });
    } catch (...) {
      refreshing = false;  // no thread to be had: autovacuum gets there too
    }
  }

  // Sums eoq.totals (see compact_totals in queries.sql) at most every few
  // seconds per store: each worker's maintenance asks, and a drain appends a
  // row per completing statement, some thousands between two compactions.
  void compact_totals() {
    if (due(totals_compacted, std::chrono::seconds(5))) run(sql.compact_totals, {});
  }

  // Whether `gap` has passed since `last` (steady-clock ticks; 0: never), and
  // if so `last` is now: of the threads that ask at once, one is told yes.
  static bool due(std::atomic<std::chrono::steady_clock::rep>& last, std::chrono::seconds gap) {
    const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
    auto seen = last.load();
    if (seen != 0 && now - seen < std::chrono::duration_cast<std::chrono::steady_clock::duration>(gap).count())
      return false;
    return last.compare_exchange_strong(seen, now);
  }

  // Before the first claim and then at most every 30 s: the schema holds no
  // migration this build does not know and which breaks older programs
  // (docs/upgrading.md). Otherwise SchemaTooNew naming it, before anything is
  // claimed. A failure to read is left to the claim itself to report.
  void check_schema() {
    if (!due(schema_checked, std::chrono::seconds(30))) return;
    std::vector<std::string> breaking;
    const auto known = known_migrations();
    try {
      breaking = breaking_unknown(decode_applied(run(sql.migrations_applied, {})), known);
    } catch (const DatabaseError&) {
      schema_checked = 0;
      return;
    }
    if (breaking.empty()) return;
    schema_checked = 0;
    throw SchemaTooNew(too_new_message(options.schema, breaking, known, "claim() claimed nothing"));
  }

  // `now`: one reading of the clock for a whole batch (`perf` of a loop of
  // large batches put 3% of its client samples in reading it per task).
  void check_payload(const NewTask& t, std::size_t i, bool batch, TimePoint now = detail::now()) const {
    try {
      detail::validate_new_task(t, options.max_payload_bytes, now);
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
  detail::validate_positive("migration_lock_timeout", options.migration_lock_timeout);
  if (options.migration_lock_retries < 0) throw InvalidArgument("migration_lock_retries", "must not be negative");
  detail::validate_positive("prune_budget", options.prune_budget);
  detail::validate_positive("handler_idle_timeout", options.handler_idle_timeout);
  if (options.retention && options.retention->count() < 0) throw InvalidArgument("retention", "must not be negative");
  // Parse the connection strings now so a malformed one fails here, not later.
  for (auto [field, text] : {std::pair<const char*, const std::string*>{"conninfo", &options.conninfo},
                             {"listen_conninfo", &options.listen_conninfo},
                             {"read_conninfo", &options.read_conninfo}})
    if (!text->empty()) pg::check_conninfo(*text, field);
  impl_ = std::make_unique<Impl>(std::move(options));
}

PostgresStore::~PostgresStore() = default;

const PostgresOptions& PostgresStore::options() const noexcept { return impl_->options; }

std::vector<std::string> PostgresStore::migrate() {
  auto& impl = *impl_;
  // Unnamed statements: the schema may not exist yet when a connection
  // would otherwise prepare them.
  auto exec = [&](Connection& c, const Statement& st, const std::vector<Param>& params) {
    return c.exec_params(st.sql, params, true, st.name);
  };
  const auto known = known_migrations();
  const std::string lock_key = "eoq.migrate." + impl.options.schema;
  // The schema and the migrations table, then what is applied. Every step
  // takes the advisory lock that serialises migrate() calls for the schema
  // (transaction-scoped, which a transaction-pooling proxy keeps).
  auto applied = impl.run_on_connection([&](Connection& c) {
    return in_transaction(c, [&] {
      exec(c, impl.sql.migrate_lock, {lock_key});
      // CREATE SCHEMA names the schema itself, not an object in it, so it is
      // the one statement not in queries.sql.
      c.command(fmt::format("SET LOCAL client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS {}", impl.quoted)
                    .c_str());
      c.command(impl.sql.migrations_table.sql.c_str());
      if (exec(c, impl.sql.migrations_has_breaks, {}).i64(0, 0) == 0)
        c.command(impl.sql.migrations_breaks_column.sql.c_str());
      return decode_applied(exec(c, impl.sql.migrations_applied, {}));
    });
  });
  auto is_applied = [](const std::vector<AppliedMigration>& in, std::string_view name) {
    return std::any_of(in.begin(), in.end(), [&](const auto& a) { return a.name == name; });
  };
  // A schema ahead of this build: nothing to apply, and nothing is downgraded.
  std::vector<std::string> unknown;
  for (const auto& a : applied)
    if (std::none_of(known.begin(), known.end(), [&](auto* m) { return a.name == m->name; })) unknown.push_back(a.name);
  if (!unknown.empty()) {
    auto breaking = breaking_unknown(applied, known);
    if (!breaking.empty())
      throw SchemaTooNew(too_new_message(impl.options.schema, breaking, known, "migrate() applied nothing"));
    for (auto* m : known)
      if (!is_applied(applied, m->name))
        throw Error(fmt::format("migrate: schema \"{}\" has migrations this eoq does not know ({}) but not {}, "
                                "which it does: applied nothing",
                                impl.options.schema, fmt::join(unknown, ", "), m->name));
    return {};
  }

  std::vector<std::string> now_applied;
  const auto timeout_ms = impl.options.migration_lock_timeout.count();
  std::minstd_rand jitter(std::random_device{}());
  for (auto* mig : known) {
    if (is_applied(applied, mig->name)) continue;
    for (int attempt = 0;; ++attempt) {
      try {
        // The migration and its row commit together, or neither does.
        const bool ran = impl.run_on_connection([&](Connection& c) {
          return in_transaction(c, [&] {
            // Waiting for another migrate() is not bounded: it may be running
            // a long migration. Only the migration's own lock waits are.
            exec(c, impl.sql.migrate_lock, {lock_key});
            if (is_applied(decode_applied(exec(c, impl.sql.migrations_applied, {})), mig->name)) return false;
            c.command(fmt::format("SET LOCAL lock_timeout = {}", timeout_ms).c_str());
            c.command(replace_all(mig->sql, "@schema@", impl.quoted).c_str());
            exec(c, impl.sql.migration_applied, {std::string(mig->name), breaks_older(*mig) ? "true" : "false"});
            return true;
          });
        });
        if (ran) now_applied.emplace_back(mig->name);
        break;
      } catch (const DatabaseError& e) {
        if (e.transient()) throw;
        if (e.sqlstate() != "55P03")
          throw DatabaseError(fmt::format("migrate: migration {} failed and was rolled back ({} applied before it "
                                          "in this call): {}",
                                          mig->name, now_applied.size(), e.what()),
                              e.sqlstate(), mig->name);
        if (attempt >= impl.options.migration_lock_retries)
          throw DatabaseError(
              fmt::format("migrate: migration {} could not take its locks within lock_timeout {} ms in {} tries "
                          "(something holds a lock it needs, e.g. a long transaction on its tables); nothing of it "
                          "was applied ({} applied before it in this call); run migrate() again later: {}",
                          mig->name, timeout_ms, attempt + 1, now_applied.size(), e.what()),
              e.sqlstate(), mig->name);
        const auto cap = std::min<std::int64_t>(1000, std::int64_t{50} << std::min(attempt, 5));
        std::uniform_int_distribution<std::int64_t> pick(cap / 2, cap);
        std::this_thread::sleep_for(std::chrono::milliseconds(pick(jitter)));
      }
    }
  }
  return now_applied;
}

namespace {
// Tasks with parents are submitted in a transaction of their own: their
// parents are locked and read before they are inserted.
std::vector<SubmitResult> submit_with_parents(PostgresStore::Impl& impl, std::span<const NewTask> tasks, bool is_batch) {
  const bool all_keyed = std::all_of(tasks.begin(), tasks.end(), [](const NewTask& t) { return t.key.has_value(); });
  try {
    return pg::with_retry(impl.pool, all_keyed ? impl.options.transient_retries : 0, [&](Connection& c) {
      return in_transaction(c, [&] { return submit_flow(c, impl.sql, tasks, is_batch, impl.channel); });
    });
  } catch (const TransientError& e) {
    if (all_keyed) throw;
    throw CommitInDoubt(std::string(e.what()) +
                            "; the tasks may or may not have been created (give every task a key to make retries safe)",
                        e.sqlstate(), e.statement());
  }
}

}  // namespace

SubmitResult PostgresStore::submit(const NewTask& task) {
  auto& impl = *impl_;
  impl.check_payload(task, 0, false);
  if (has_parents(task)) return submit_with_parents(impl, std::span<const NewTask>(&task, 1), false)[0];
  auto params = submit_params(task, impl.channel);
  // Without a key a repeat after a lost connection could create a second task,
  // so only keyed submits are retried.
  int retries = task.key ? impl.options.transient_retries : 0;
  for (int round = 0;; ++round) {
    Result r;
    try {
      r = pg::with_retry(impl.pool, retries, [&](Connection& c) { return c.exec(impl.sql.submit, params); });
    } catch (const TransientError& e) {
      if (task.key) throw;
      throw CommitInDoubt(std::string(e.what()) +
                              "; the task may or may not have been created (give it a key to make retries safe)",
                          e.sqlstate(), e.statement());
    }
    if (r.rows() == 1) return {task_from_new(task, r, 0, 0), false};
    auto existing = impl.lookup_keys({task.queue}, {task.tenant}, {task.key});
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
Result exec_on(pg_conn* connection, const Statement& st, const std::vector<Param>& ps) {
  std::vector<const char*> values(ps.size());
  for (std::size_t i = 0; i < ps.size(); ++i) values[i] = ps[i] ? ps[i]->c_str() : nullptr;
  Result r(PQexecParams(connection, st.sql.c_str(), static_cast<int>(ps.size()), nullptr, values.data(), nullptr,
                        nullptr, 1));
  auto status = PQresultStatus(r.get());
  if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK) pg::throw_error(connection, r.get(), st.name);
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
  if (has_parents(task))
    throw InvalidArgument("parents", "submit_on does not take parents: use submit, submit_batch or ctx.submit");
  const auto quoted = quote_ident(s);
  auto r = exec_on(connection, pg::query("submit", quoted), submit_params(task, "eoq_" + s));
  if (r.rows() == 1) return {task_from_new(task, r, 0, 0), false};
  auto e = exec_on(connection, pg::query("by_keys", quoted),
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
  const auto quoted = quote_ident(s);
  const auto cancel = pg::query("cancel", quoted), lock = pg::query("lock_task", quoted);
  const std::vector<Param> params{num(id), scope.tenant}, request{num(id), scope.tenant, std::string("true")};
  // As cancel(): when the task changed under the statement, lock its row and
  // run it again. In the host's transaction the lock holds until that ends (in
  // autocommit it ends at once and the next round looks again); each statement
  // of a READ COMMITTED transaction sees the rows committed before it.
  for (;;) {
    if (auto out = decode_cancel(exec_on(connection, cancel, request))) return *out;
    exec_on(connection, lock, params);
  }
}

std::vector<SubmitResult> PostgresStore::submit_batch(std::span<const NewTask> tasks) {
  auto& impl = *impl_;
  detail::validate_batch_size(tasks.size());
  if (tasks.empty()) return {};
  bool all_keyed = true, any_keyed = false;
  const TimePoint checked_at = detail::now();
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    impl.check_payload(tasks[i], i, true, checked_at);
    all_keyed = all_keyed && tasks[i].key.has_value();
    any_keyed = any_keyed || tasks[i].key.has_value();
  }
  const bool repeats_a_key = detail::check_batch_keys(tasks);
  if (std::any_of(tasks.begin(), tasks.end(), has_parents)) return submit_with_parents(impl, tasks, true);
  const bool staged = tasks.size() >= kStageFrom;
  std::vector<Param> params;
  bool narrow = false;  // the tasks differ in key and payload only: copy_stage_narrow
  std::size_t queues_param = 0;  // staged: where params holds the batch's queues
  if (staged) {
    params.push_back(impl.channel);
    const NewTask& first = tasks.front();
    narrow = std::all_of(tasks.begin() + 1, tasks.end(), [&](const NewTask& t) {
      return t.queue == first.queue && t.type == first.type && t.tenant == first.tenant &&
             t.priority == first.priority && t.run_at == first.run_at && t.deadline == first.deadline &&
             t.retry == first.retry && t.partition == first.partition && t.timeout == first.timeout;
    });
    // The columns copy_stage_narrow leaves out, in submit_params' order without key and payload.
    auto p = submit_params(first, "");
    for (std::size_t k : {0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12}) params.push_back(narrow ? std::move(p[k]) : Param{});
    // The batch's queues, each once, for the notifications.
    std::vector<std::string_view> queues{first.queue};
    if (!narrow) {
      for (const auto& t : tasks) queues.push_back(t.queue);
      std::sort(queues.begin(), queues.end());
      queues.erase(std::unique(queues.begin(), queues.end()), queues.end());
    }
    params.push_back(pg::text_array(std::vector<Param>(queues.begin(), queues.end())));
    queues_param = params.size() - 1;
    for (std::size_t k : {14, 15}) params.push_back(narrow ? std::move(p[k]) : Param{});
  } else {
    std::vector<std::vector<Param>> cols(kSubmitArrays);
    for (auto& c : cols) c.reserve(tasks.size());
    for (const auto& t : tasks) {
      auto p = submit_params(t, "");
      for (std::size_t k = 0; k < kSubmitArrays; ++k) cols[k].push_back(std::move(p[kSubmitColumns[k]]));
    }
    for (std::size_t k = 0; k < 13; ++k) params.push_back(pg::text_array(cols[k]));
    params.push_back(impl.channel);
    for (std::size_t k = 13; k < kSubmitArrays; ++k) params.push_back(pg::text_array(cols[k]));
  }
  const bool strict = std::any_of(tasks.begin(), tasks.end(),
                                  [](const NewTask& t) { return t.key && t.key_reuse == KeyReuse::strict; });
  // Built in place (a second vector of 10,000 tasks cost page faults), and
  // while the server works where it can: filling 10,000 empty results before
  // the first statement was a millisecond of every large batch.
  std::vector<SubmitResult> out;
  std::vector<char> have;          // out[i] is set
  std::vector<std::size_t> missing;          // tasks whose key was taken
  std::vector<std::optional<Task>> holders;  // the tasks holding those keys (empty: pruned meanwhile)
  // With a strict key the batch runs in a transaction that ends in ROLLBACK when
  // a taken key's holder differs, so a conflict writes nothing; a large batch
  // needs one for its COPYs (and its stage). Otherwise the insert commits on its own.
  const bool in_tx = strict || staged;
  auto attempt = [&](Connection& c) {
    out.clear();
    have.assign(tasks.size(), 0);
    missing.clear();
    holders.clear();
    if (in_tx) c.begin();
    try {
      Result r;
      if (staged) {
        // New keys, most likely: the keys and tasks go straight in by COPY
        // (reserve_ids says why), and through the stage with ON CONFLICT only
        // when a key turns out to be taken (its unique violation undone by the
        // savepoint) or the batch repeats one.
        bool direct = !repeats_a_key;
        if (direct) {
          // Before reserve_ids when a key may turn out taken: the notifications
          // it queues go with the rollback, and the fallback notifies only the
          // queues it creates tasks in.
          if (any_keyed) c.command("SAVEPOINT eoq_fresh_keys");
          auto ids_r = c.exec(impl.sql.reserve_ids, {num(static_cast<std::int64_t>(tasks.size())), impl.channel,
                                                     params[queues_param]});
          std::optional<std::int64_t> first_id;
          std::vector<std::int64_t> ids;
          if (!ids_r.null(0, 0)) first_id = ids_r.i64(0, 0);
          else if (!ids_r.null(0, 1)) {
            ids = ids_r.i64_array(0, 1);
            std::sort(ids.begin(), ids.end());
          }
          if (!first_id && ids.size() != tasks.size())
            throw Error(fmt::format("eoq internal: reserve_ids answered {} ids for {} tasks", ids.size(), tasks.size()));
          const TimePoint created = ids_r.time(0, 2);
          auto id_of = [&](std::size_t i) { return first_id ? *first_id + static_cast<std::int64_t>(i) : ids[i]; };
          if (any_keyed) {
            try {
              copy_binary(c, impl.sql.copy_keys, tasks.size(), 64, [&](std::size_t i, std::string& slice) {
                if (tasks[i].key) key_row(slice, tasks[i], id_of(i));
              });
            } catch (const DatabaseError& e) {
              if (e.sqlstate() != "23505" || !c.ok()) throw;
              c.command("ROLLBACK TO SAVEPOINT eoq_fresh_keys");
              direct = false;
            }
          }
          if (direct) {
            // The answer's tasks are made as their rows go out, while the
            // server writes the rows before them.
            out.clear();
            out.reserve(tasks.size());
            copy_binary(c, impl.sql.copy_tasks, tasks.size(), 256, [&](std::size_t i, std::string& slice) {
              const NewTask& t = tasks[i];
              const std::int64_t id = id_of(i);
              const TimePoint run_at = t.run_at.value_or(created);
              task_row(slice, t, id, run_at);
              out.push_back({task_from_new(t, id, run_at, created, 1), false});
            });
            have.assign(tasks.size(), 1);
          }
        }
        if (!direct) {
          auto made = c.command(impl.sql.create_stage.sql.c_str());
          if (made.rows() != 1 || made.text(0, 0) != "t") {
            c.command(impl.sql.drop_stage.sql.c_str());
            c.command(impl.sql.create_stage.sql.c_str());
          }
          std::size_t next = 0;
          c.copy_in((narrow ? impl.sql.copy_stage_narrow : impl.sql.copy_stage).sql.c_str(), [&](std::string& slice) {
            slice.reserve(kCopyRows * 160);
            for (auto end = std::min(tasks.size(), next + kCopyRows); next < end; ++next)
              copy_row(slice, tasks[next], next + 1, narrow);
            return next < tasks.size();
          });
          r = c.exec(impl.sql.submit_staged, params);
        }
      } else {
        r = c.exec(impl.sql.submit_batch, params);
      }
      if (out.size() != tasks.size()) out.resize(tasks.size());
      for (int i = 0; i < r.rows(); ++i) {
        auto ord = static_cast<std::size_t>(r.i64(i, 0) - 1);
        out[ord].task = task_from_new(tasks[ord], r, i, 1);
        have[ord] = 1;
      }
      std::vector<Param> dq, dt, dk;
      for (std::size_t i = 0; i < tasks.size(); ++i)
        if (!have[i]) {
          missing.push_back(i);
          dq.push_back(tasks[i].queue);
          dt.push_back(tasks[i].tenant);
          dk.push_back(tasks[i].key);
        }
      if (!missing.empty()) {
        holders.resize(missing.size());
        auto f = c.exec(impl.sql.by_keys, {pg::text_array(dq), pg::text_array(dt), pg::text_array(dk)});
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
    pg::with_retry(impl.pool, all_keyed ? impl.options.transient_retries : 0, attempt);
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
  if (staged) impl.refresh_stats(tasks.size());
  return out;
}

std::vector<Lease> PostgresStore::claim(const ClaimRequest& request) {
  auto& impl = *impl_;
  detail::validate_claim(request);
  impl.check_schema();
  // Queues with limits are claimed one by one, after the others.
  const auto limited = impl.limited_queues();
  std::vector<Param> queues, limited_asked;
  for (const auto& q : request.queues)
    (std::find(limited.begin(), limited.end(), q) != limited.end() ? limited_asked : queues).push_back(q);
  const auto& after = request.after;
  auto params_for = [&](Param queue, int limit) {
    return std::vector<Param>{std::move(queue), num(limit), request.owner, num(request.lease.count()),
                              after ? num(after->priority) : Param{},
                              after ? pg::time_param(after->run_at) : Param{}, after ? num(after->id) : Param{}};
  };
  std::vector<Lease> leases;
  auto take = [&](const Result& r) {
    for (int i = 0; i < r.rows(); ++i) {
      Lease l;
      l.task = decode_task(r, i);
      l.owner = request.owner;
      l.token = l.task.version;
      l.expires_at = l.task.lease_expires_at.value_or(TimePoint{});
      l.claimed_at = l.task.started_at.value_or(TimePoint{});  // now() of the claim
      leases.push_back(std::move(l));
    }
  };
  // A repeat after a lost connection is safe: leases granted by a try whose
  // answer never arrived simply expire and the tasks are claimed again.
  // Queues with limits first, one by one (their limits bound what they
  // take), then the others with what is left: the other way round, a deep
  // queue without limits would leave them nothing.
  for (auto& q : limited_asked) {
    const int left = request.limit - static_cast<int>(leases.size());
    if (left <= 0) break;
    const auto had = leases.size();
    // As for the others below: the statement that settles only when one is due.
    auto params = params_for(q, left);
    auto r = impl.run(impl.sql.claim_limited_pending, params);
    if (r.rows() == 1 && r.null(0, 0)) {
      if (r.boolean(0, static_cast<int>(kTaskColumns.size()))) take(impl.run(impl.sql.claim_limited, params));
    } else {
      take(r);
    }
    if (static_cast<int>(leases.size() - had) == left) continue;
    impl.held_back = true;
    // Held back, perhaps by a rate: the claimer waits until a start leaves its window.
    auto room = impl.run(impl.sql.rate_room, {std::move(q)});
    if (room.rows() == 1 && !room.null(0, 0)) {
      const auto at = (std::chrono::steady_clock::now() + Millis(std::max<std::int64_t>(0, room.i64(0, 0))))
                          .time_since_epoch()
                          .count();
      auto cur = impl.rate_room_at.load();
      while ((cur == 0 || at < cur) && !impl.rate_room_at.compare_exchange_weak(cur, at)) {
      }
    }
  }
  const int rest = request.limit - static_cast<int>(leases.size());
  if (!queues.empty() && rest > 0) {
    const bool one = queues.size() == 1;
    const auto params = params_for(one ? queues[0] : pg::text_array(queues), rest);
    // Most claims find only pending tasks to lease: claim_pending does that
    // alone. When it found one to settle among them, it leased nothing, and
    // the statement that settles runs in its place.
    auto r = impl.run(one ? impl.sql.claim_pending_one : impl.sql.claim_pending, params);
    if (r.rows() == 1 && r.null(0, 0)) {
      if (r.boolean(0, static_cast<int>(kTaskColumns.size())))
        take(impl.run(one ? impl.sql.claim_one : impl.sql.claim, params));
    } else {
      take(r);
    }
  }
  std::sort(leases.begin(), leases.end(), [](const Lease& a, const Lease& b) {
    return std::tie(a.task.priority, a.task.run_at, a.task.id) < std::tie(b.task.priority, b.task.run_at, b.task.id);
  });
  return leases;
}

std::vector<bool> PostgresStore::complete_batch(std::span<const Completion> completions) {
  auto& impl = *impl_;
  std::vector<Param> ids, versions, results;
  bool all_null = true;  // then results go as NULL, and the statement skips them
  detail::validate_completions(completions, impl.options.max_payload_bytes);
  for (std::size_t i = 0; i < completions.size(); ++i) {
    ids.push_back(num(completions[i].lease->id()));
    versions.push_back(num(completions[i].lease->token));
    results.push_back(completions[i].result);
    all_null = all_null && completions[i].result == "null";
  }
  if (completions.empty()) return {};
  bool retried = false;
  auto r = impl.run(impl.sql.complete,
                    {pg::text_array(ids), pg::text_array(versions), all_null ? Param{} : pg::text_array(results)},
                    &retried);
  impl.freed();
  Answered done(r);  // settled now
  std::vector<bool> out(completions.size());
  for (std::size_t i = 0; i < completions.size(); ++i) {
    const auto& l = *completions[i].lease;
    out[i] = done.ask(l.id(), l.token) == Answered::Ask::first;
    if (!out[i] && retried) out[i] = impl.settled(l.id(), l.token) == std::optional<std::string>("succeeded");
  }
  return out;
}

void PostgresStore::complete(const Lease& lease, std::string_view result_json) {
  Completion c{&lease, std::string(result_json)};
  if (!complete_batch(std::span<const Completion>(&c, 1))[0]) lease_lost(lease, "complete");
}

namespace {
FailOutcome decode_fail(const Result& r) {
  auto outcome = r.text(0, 0);
  if (outcome == "retry") return {TaskStatus::pending, r.opt_time(0, 1)};
  return {outcome == "cancelled" ? TaskStatus::cancelled : TaskStatus::failed, std::nullopt};
}
std::vector<Param> fail_params(const Lease& lease, const Failure& f) {
  auto delay = lease.task.retry.delay_after(lease.task.attempts, detail::unit_random());
  return {num(lease.id()), num(lease.token), f.error, f.permanent ? "true" : "false", num(delay.count())};
}
}  // namespace

FailOutcome PostgresStore::fail(const Lease& lease, const Failure& failure) {
  auto& impl = *impl_;
  bool retried = false;
  auto r = impl.run(impl.sql.fail, fail_params(lease, failure), &retried);
  impl.freed();
  if (r.rows() == 1) return decode_fail(r);
  if (retried) {
    if (auto s = impl.settled(lease.id(), lease.token)) {
      if (*s == "retry") {
        auto t = get(lease.id());
        return {TaskStatus::pending, t ? std::optional(t->run_at) : std::nullopt};
      }
      if (*s == "failed" || *s == "cancelled") return {parse_status(*s), std::nullopt};
    }
  }
  lease_lost(lease, "fail");
}

HeartbeatResult PostgresStore::heartbeat(const Lease& lease, Millis extension) {
  auto& impl = *impl_;
  detail::validate_positive("extension", extension);
  auto r = impl.run(impl.sql.heartbeat, {num(lease.id()), num(lease.token), num(extension.count())});
  if (r.rows() != 1) lease_lost(lease, "heartbeat");
  return {r.time(0, 0), r.boolean(0, 1)};
}

void PostgresStore::release(const Lease& lease) {
  auto& impl = *impl_;
  bool retried = false;
  auto r = impl.run(impl.sql.release, {num(lease.id()), num(lease.token), impl.channel}, &retried);
  // After a retry the first try may have applied; the version moved on either way.
  if (r.rows() != 1 && !retried) lease_lost(lease, "release");
}

std::vector<bool> PostgresStore::release_batch(std::span<const Lease> leases) {
  auto& impl = *impl_;
  if (leases.empty()) return {};
  std::vector<Param> ids, versions;
  for (const auto& l : leases) {
    ids.push_back(num(l.id()));
    versions.push_back(num(l.token));
  }
  bool retried = false;
  auto r = impl.run(impl.sql.release_batch, {pg::text_array(ids), pg::text_array(versions), impl.channel}, &retried);
  Answered given(r);  // given back now
  std::vector<bool> out(leases.size());
  for (std::size_t i = 0; i < leases.size(); ++i) {
    const auto ask = given.ask(leases[i].id(), leases[i].token);
    out[i] = ask == Answered::Ask::first;
    // As in release(): after a retry the first try may have applied.
    if (ask == Answered::Ask::absent && retried) out[i] = true;
  }
  return out;
}

bool PostgresStore::expire_if_overdue(const Lease& lease) {
  auto& impl = *impl_;
  bool retried = false;
  auto r = impl.run(impl.sql.expire_lease, {num(lease.id()), num(lease.token)}, &retried);
  if (r.rows() == 1) return r.boolean(0, 0);
  // After a retry our first try may have expired it: then the task is on record
  // as expired by this lease.
  if (retried && impl.settled(lease.id(), lease.token) == std::optional<std::string>("expired")) return true;
  lease_lost(lease, "expire_if_overdue");
}

void PostgresStore::cancel_running(const Lease& lease, std::string_view reason) {
  auto& impl = *impl_;
  bool retried = false;
  Param why = reason.empty() ? Param() : Param(std::string(reason));
  auto r = impl.run(impl.sql.cancel_lease, {num(lease.id()), num(lease.token), why}, &retried);
  if (r.rows() == 1) return;
  if (retried && impl.settled(lease.id(), lease.token) == std::optional<std::string>("cancelled")) return;
  lease_lost(lease, "cancel_running");
}

FailOutcome PostgresStore::snooze(const Lease& lease, Millis delay) {
  auto& impl = *impl_;
  detail::validate_snooze_delay(delay);
  bool retried = false;
  auto r = impl.run(impl.sql.snooze, {num(lease.id()), num(lease.token), num(delay.count()), impl.channel}, &retried);
  if (r.rows() == 1) {
    if (r.text(0, 0) == "cancelled") return {TaskStatus::cancelled, std::nullopt};
    return {TaskStatus::pending, r.opt_time(0, 1)};
  }
  // After a retry our first try may have applied: its history row says so.
  if (retried) {
    auto s = impl.settled(lease.id(), lease.token);
    if (s == std::optional<std::string>("cancelled")) return {TaskStatus::cancelled, std::nullopt};
    if (s == std::optional<std::string>("snoozed")) {
      auto t = get(lease.id());
      return {TaskStatus::pending, t ? std::optional(t->run_at) : std::nullopt};
    }
  }
  lease_lost(lease, "snooze");
}

void PostgresStore::progress(const Lease& lease, int percent, std::string_view stage) {
  auto& impl = *impl_;
  detail::validate_progress(percent, stage);
  auto r = impl.run(impl.sql.progress, {num(lease.id()), num(lease.token), num(percent), std::string(stage)});
  if (r.rows() != 1) lease_lost(lease, "progress");
}

void PostgresStore::checkpoint(const Lease& lease, std::string_view stage, std::string_view state_json) {
  auto& impl = *impl_;
  detail::validate_progress(0, stage);
  detail::validate_json("checkpoint", state_json, impl.options.max_payload_bytes);
  auto r =
      impl.run(impl.sql.checkpoint, {num(lease.id()), num(lease.token), std::string(stage), std::string(state_json)});
  if (r.rows() != 1) lease_lost(lease, "checkpoint");
}

namespace {

// A handler's transaction: its own SQL and the task's settlement commit
// together. The server ends it if it sits idle longer than the configured
// timeout, so a frozen worker cannot keep its row locks.
//
// Round trips: BEGIN and its SET LOCALs wait to go out in one pipeline with
// the handler's first statement, and a completion goes out in one pipeline
// with its COMMIT, so a handler that runs one statement costs two round trips,
// not five (docs/performance.md, "Tasks whose handler writes"). The
// handler's statements are prepared once per connection (Connection::pipeline).
class PgLeaseTransaction final : public LeaseTransaction {
 public:
  PgLeaseTransaction(PostgresStore::Impl& store, const Lease& lease, pg::Pool::Borrowed conn,
                     const TransactionOptions& options)
      : store_(store),
        lease_(lease),
        conn_(std::move(conn)),
        idle_timeout_(fmt::format("SET LOCAL idle_in_transaction_session_timeout = {}",
                                  store.options.handler_idle_timeout.count())),
        synchronous_(options.synchronous_commit) {
    watch_connection();
    start();
  }
  ~PgLeaseTransaction() override {
    abandon();
    // A cancel request may reach the server after the transaction ended and
    // hit whatever the connection's next borrower runs: it goes, not back to the pool.
    if (interrupted_) conn_.discard();
  }

  // From another thread, while the handler may be waiting in a statement: a
  // cancel request for that statement (PQcancel, the one libpq call made for
  // use from another thread), so a handler stuck in SQL returns and its
  // locks go with its transaction; every later call throws LeaseLost.
  void interrupt() noexcept override {
    interrupted_ = true;
    std::lock_guard lk(cancel_mu_);
    if (!cancel_) return;
    char why[256];
    PQcancel(cancel_.get(), why, sizeof why);  // a failure leaves the statement to run out; nothing commits either way
  }

  Rows exec(std::string_view sql, const Params& params) override {
    require_open();
    Result r;
    try {
      std::vector<Param> texts;
      texts.reserve(params.size());
      for (const auto& p : params) texts.push_back(p.text());
      std::vector<pg::Step> steps = prefix();
      steps.push_back({nullptr, sql, &texts, false, true, "handler SQL"});
      r = std::move(first_or_next(steps).back());
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

  void send(std::string_view sql, const Params& params) override {
    require_open();
    Sent q{std::string(sql), {}};
    q.params.reserve(params.size());
    for (const auto& p : params) q.params.push_back(p.text());
    queued_.push_back(std::move(q));
    // A handler that sends without end is not held in memory: a full queue goes out on its own.
    if (queued_.size() >= kQueuedMax) ensure_begun();
  }

  SubmitResult submit(const NewTask& task) override { return submit_batch(std::span<const NewTask>(&task, 1), false)[0]; }
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks) override { return submit_batch(tasks, true); }

  // The completion and the COMMIT in one pipeline: complete_one raises
  // (SQLSTATE EQ001) when the lease is stale, which aborts the transaction,
  // so the COMMIT behind it cannot keep the handler's writes.
  void complete(std::string_view result_json) override {
    require_open();
    detail::validate_json("result", result_json, store_.options.max_payload_bytes);
    std::vector<Param> params{num(lease_.id()), num(lease_.token), std::string(result_json)};
    std::vector<pg::Step> steps = prefix();
    steps.push_back({&store_.sql.complete_one, {}, &params, true, false, "complete"});
    steps.push_back({nullptr, "COMMIT", nullptr, true, false, "COMMIT"});
    open_ = false;
    try {
      conn_->pipeline(steps);
      pipelined();
    } catch (const TransientError& e) {
      // The pipeline may have reached the server whole: the commit is in doubt.
      in_doubt(e, lease_, "succeeded");
    } catch (const DatabaseError& e) {
      open_ = true;
      abandon();
      if (e.sqlstate() == kLeaseLostState && e.statement() == "complete") lease_lost(lease_, "complete");
      throw;
    } catch (...) {
      open_ = true;
      abandon();
      throw;
    }
  }

  // The batched `complete` in this transaction, checked before the COMMIT:
  // every lease must have settled, or nothing does.
  void complete_all(std::span<const Completion> completions) override {
    require_open();
    detail::validate_complete_all(completions, store_.options.max_payload_bytes);
    std::vector<Param> ids, versions, results;
    bool all_null = true;
    for (const auto& c : completions) {
      ids.push_back(num(c.lease->id()));
      versions.push_back(num(c.lease->token));
      results.push_back(c.result);
      all_null = all_null && c.result == "null";
    }
    std::vector<Param> params{pg::text_array(ids), pg::text_array(versions),
                              all_null ? Param{} : pg::text_array(results)};
    std::vector<pg::Step> steps = prefix();
    steps.push_back({&store_.sql.complete, {}, &params, true, false, "complete"});
    Result r;
    try {
      r = std::move(first_or_next(steps).back());
    } catch (...) {
      abandon();
      throw;
    }
    Answered done(r);
    for (const auto& c : completions)
      if (done.ask(c.lease->id(), c.lease->token) != Answered::Ask::first) {
        abandon();
        lease_lost(*c.lease, "complete_all");
      }
    commit("succeeded", *completions[0].lease);  // one commit: the first lease's outcome is every one's
  }

  FailOutcome fail(const Failure& failure) override {
    require_open();
    ensure_begun();
    Result r = run(store_.sql.fail, fail_params(lease_, failure));
    if (r.rows() != 1) lost("fail");
    auto outcome = decode_fail(r);
    commit(nullptr);
    return outcome;
  }

  void checkpoint(std::string_view stage, std::string_view state_json) override {
    require_open();
    detail::validate_progress(0, stage);
    detail::validate_json("checkpoint", state_json, store_.options.max_payload_bytes);
    ensure_begun();
    Result r = run(store_.sql.checkpoint,
                   {num(lease_.id()), num(lease_.token), std::string(stage), std::string(state_json)});
    if (r.rows() != 1) lost("checkpoint");
    commit(nullptr);
    start();
  }

  bool open() const noexcept override { return open_; }

 private:
  static constexpr std::string_view kLeaseLostState = "EQ001";  // migration 0007

  // Under a savepoint, so that a batch refused part way (a key conflict, a
  // parent that does not exist) writes nothing and the handler's transaction
  // goes on; any other error ends the transaction.
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks, bool is_batch) {
    require_open();
    if (tasks.size() > 100000) throw InvalidArgument("tasks", "at most 100000 tasks per batch");
    detail::validate_new_tasks(tasks, is_batch, store_.options.max_payload_bytes);
    if (is_batch) detail::check_batch_keys(tasks);
    try {
      ensure_begun();
      conn_->command("SAVEPOINT eoq_submit");
      std::vector<SubmitResult> out;
      try {
        out = submit_flow(*conn_, store_.sql, tasks, is_batch, store_.channel);
      } catch (const InvalidArgument&) {
        conn_->command("ROLLBACK TO SAVEPOINT eoq_submit; RELEASE SAVEPOINT eoq_submit");
        throw;
      }
      conn_->command("RELEASE SAVEPOINT eoq_submit");
      return out;
    } catch (const InvalidArgument&) {
      throw;
    } catch (...) {
      abandon();
      throw;
    }
  }

  // A transaction opens on the server with the first statement sent in it.
  void start() {
    open_ = true;
    begun_ = false;
  }
  // What must reach the server before the next statement, for the front of
  // its pipeline: BEGIN and the transaction's settings, and the statements
  // sent since. pipelined() says they went.
  std::vector<pg::Step> prefix() const {
    std::vector<pg::Step> steps;
    if (!begun_) {
      steps.push_back({nullptr, "BEGIN", nullptr, true, false, "BEGIN"});
      steps.push_back({nullptr, idle_timeout_, nullptr, true, false, "SET LOCAL"});
      if (!synchronous_)
        steps.push_back({nullptr, "SET LOCAL synchronous_commit = off", nullptr, true, false, "SET LOCAL"});
    }
    for (const auto& q : queued_) steps.push_back({nullptr, q.sql, &q.params, false, true, "handler SQL (sent)"});
    return steps;
  }
  void pipelined() {
    begun_ = true;
    queued_.clear();
    if (!open_) store_.freed();  // that pipeline committed a settlement
  }
  // For the statements that need their answer alone: the prefix on its own, one round trip.
  void ensure_begun() {
    if (begun_ && queued_.empty()) return;
    try {
      auto steps = prefix();
      first_or_next(steps);
    } catch (...) {
      abandon();
      throw;
    }
  }
  // Sends steps that hold no COMMIT. The transaction's first pipeline cannot
  // have committed anything, so after a transient error (a pooled connection
  // the server closed meanwhile: a restart, a pooler's idle timeout, a killed
  // backend) it goes again on a fresh connection, as BEGIN did when begin()
  // still sent it.
  std::vector<Result> first_or_next(const std::vector<pg::Step>& steps) {
    const bool first = !begun_;
    for (int attempt = 0;; ++attempt) {
      try {
        if (!conn_.get()) {  // the retry's fresh connection: connecting is retried too (a failover takes seconds)
          conn_ = store_.tx_pool.acquire();
          watch_connection();
        }
        auto rs = conn_->pipeline(steps);
        pipelined();
        return rs;
      } catch (const CommitInDoubt&) {
        throw;
      } catch (const TransientError&) {
        if (!first || attempt >= store_.options.transient_retries) throw;
      }
      {
        // Its place in the pool goes back before we wait for another: with as
        // many handlers as the pool has connections, all cut off at once (a
        // failover, a restart), each would wait for the others' places forever.
        auto dead = std::move(conn_);
        dead.discard();
      }
      pg::sleep_backoff(attempt);
    }
  }
  void require_open() {
    if (interrupted_) {
      abandon();
      throw LeaseLost(lease_.id(), lease_.token, "this lease transaction was interrupted: its attempt was ended");
    }
    if (!open_) throw UsageError("this lease transaction is already settled or broken");
  }
  // What interrupt() cancels with: the current connection's backend.
  void watch_connection() {
    std::unique_ptr<PGcancel, void (*)(PGcancel*)> c(conn_.get() ? PQgetCancel(conn_->get()) : nullptr, PQfreeCancel);
    std::lock_guard lk(cancel_mu_);
    cancel_ = std::move(c);
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
    queued_.clear();
    if (!open_) return;
    open_ = false;
    if (!conn_.get()) return;
    if (conn_->ok() && !interrupted_) {
      if (PQtransactionStatus(conn_->get()) == PQTRANS_IDLE) return;  // nothing was begun
      Result r(PQexec(conn_->get(), "ROLLBACK"));
      if (PQresultStatus(r.get()) == PGRES_COMMAND_OK) return;
    }
    conn_.discard();
  }
  [[noreturn]] void lost(const char* verb) {
    abandon();
    lease_lost(lease_, verb);
  }
  // COMMIT; when the connection drops during it, ask the server (on another
  // connection) whether the settlement is on record before answering.
  void commit(const char* expect) { commit(expect, lease_); }
  void commit(const char* expect, const Lease& asked) {
    open_ = false;
    try {
      conn_->command("COMMIT");
      store_.freed();
    } catch (const TransientError& e) {
      in_doubt(e, asked, expect);
    }
  }
  // All of a commit's settlements stand or fall together: one lease's tells.
  void in_doubt(const TransientError& e, const Lease& lease, const char* expect) {
    conn_.discard();
    std::optional<std::string> s;
    try {
      s = store_.settled(lease.id(), lease.token);
    } catch (const Error&) {
      throw CommitInDoubt(std::string(e.what()) + "; the outcome of the commit is unknown", e.sqlstate(), "COMMIT");
    }
    if (s && (!expect || *s == expect)) return;
    throw;  // called from a handler: the TransientError in hand
  }

  PostgresStore::Impl& store_;
  Lease lease_;
  pg::Pool::Borrowed conn_;
  const std::string idle_timeout_;
  const bool synchronous_;
  bool open_ = false;
  bool begun_ = false;  // BEGIN has reached the server
  struct Sent {
    std::string sql;
    std::vector<Param> params;
  };
  static constexpr std::size_t kQueuedMax = 1000;
  std::vector<Sent> queued_;  // send(): not yet on the server
  std::atomic<bool> interrupted_{false};
  std::mutex cancel_mu_;  // cancel_ is replaced with the connection, and read by interrupt()
  std::unique_ptr<PGcancel, void (*)(PGcancel*)> cancel_{nullptr, PQfreeCancel};
};

}  // namespace

std::unique_ptr<LeaseTransaction> PostgresStore::begin(const Lease& lease) { return begin(lease, {}); }

std::unique_ptr<LeaseTransaction> PostgresStore::begin(const Lease& lease, const TransactionOptions& options) {
  auto& impl = *impl_;
  for (int attempt = 0;; ++attempt) {
    try {
      return std::make_unique<PgLeaseTransaction>(impl, lease, impl.tx_pool.acquire(), options);
    } catch (const TransientError&) {
      if (attempt >= impl.options.transient_retries) throw;
      pg::sleep_backoff(attempt);
    }
  }
}

CancelOutcome PostgresStore::cancel(TaskId id, const Scope& scope) {
  auto& impl = *impl_;
  detail::validate_scope(scope);
  const std::vector<Param> params{num(id), scope.tenant}, request{num(id), scope.tenant, std::string("true")};
  if (auto out = decode_cancel(impl.run(impl.sql.cancel, request))) return *out;
  // The task changed state under the statement (claimed or settled
  // meanwhile). Run it again with the task's live row locked: then nothing
  // can move the task until the answer is in. Only a task that was not live
  // when the lock was taken and came back (retry) and was claimed before the
  // statement ran can slip past the lock, and the next round catches that.
  for (;;) {
    auto out = impl.run_on_connection([&](Connection& c) {
      return in_transaction(c, [&] {
        c.exec(impl.sql.lock_task, params);
        return decode_cancel(c.exec(impl.sql.cancel, request));
      });
    });
    if (out) return *out;
  }
}

RemoveOutcome PostgresStore::remove(TaskId id, const Scope& scope) {
  auto& impl = *impl_;
  detail::validate_scope(scope);
  const std::vector<Param> params{num(id), scope.tenant};
  std::optional<RemoveOutcome> out;
  // Again while the task moved under the statements: a waiting task released
  // to pending between them (it moves forward only, so this ends).
  while (!out) {
    out = impl.run_on_connection([&](Connection& c) {
      return in_transaction(c, [&]() -> std::optional<RemoveOutcome> {
        // Locked first: a claim skips the row from here on, so the task is
        // either pending (cancelled, then deleted) or running (left alone).
        c.exec(impl.sql.lock_task, params);
        // A pending or waiting task ends cancelled (its children follow), as
        // cancel() ends it, but a running one gets no cancel request.
        c.exec(impl.sql.cancel, {num(id), scope.tenant, std::string("false")});
        auto r = c.exec(impl.sql.remove_finished, params);
        if (r.i64(0, 0) > 0) return RemoveOutcome::removed;
        if (r.i64(0, 1) > 0) return RemoveOutcome::running;
        if (r.i64(0, 2) > 0) return std::nullopt;
        return RemoveOutcome::not_found;
      });
    });
  }
  // After a lost reply the first try may or may not have deleted it: either
  // way it is not there now, which is what not_found says.
  return *out;
}

RetryOutcome PostgresStore::retry(TaskId id, const Scope& scope) {
  auto& impl = *impl_;
  detail::validate_scope(scope);
  // Safe to repeat: a second run finds the task live and answers not_retryable,
  // which after a lost reply is checked below.
  bool retried = false;
  auto r = impl.run(impl.sql.retry, {num(id), scope.tenant, impl.channel}, &retried);
  if (r.i64(0, 0) > 0) return RetryOutcome::retried;
  if (r.i64(0, 1) > 0) return RetryOutcome::not_retryable;
  if (r.i64(0, 2) > 0) return retried ? RetryOutcome::retried : RetryOutcome::not_retryable;
  return RetryOutcome::not_found;
}

std::optional<Task> PostgresStore::get(TaskId id, const Scope& scope) {
  auto& impl = *impl_;
  detail::validate_scope(scope);
  auto r = impl.read(impl.sql.get, {num(id), scope.tenant});
  if (r.rows() == 0) return std::nullopt;
  return decode_task(r, 0);
}

std::optional<Task> PostgresStore::find(std::string_view queue, std::string_view key, const Scope& scope) {
  detail::validate_queue("queue", queue);
  detail::validate_scope(scope);
  return impl_->lookup_keys({std::string(queue)}, {scope.tenant}, {std::string(key)})[0];
}

TaskPage PostgresStore::list(const ListQuery& q, const Scope& scope) {
  auto& impl = *impl_;
  detail::validate_list(q);
  detail::validate_scope(scope);
  if (scope.tenant && q.tenant && *scope.tenant != *q.tenant) {
    TaskPage none;
    if (q.count_up_to > 0) none.total = ListTotal{0, TotalKind::exact};
    return none;
  }
  Param tenant = scope.tenant ? scope.tenant : q.tenant;
  Param status = q.status ? Param(std::string(to_string(*q.status))) : std::nullopt;
  std::optional<ListTotal> total;
  if (q.count_up_to > 0) {
    const auto n = impl.read(impl.sql.list_count, {q.queue, status, q.type, tenant, num(q.count_up_to + 1), q.key,
                                                   q.key_prefix, q.type_prefix, q.payload_contains, q.error_contains})
                       .i64(0, 0);
    if (n <= q.count_up_to) {
      total = ListTotal{n, TotalKind::exact};
    } else {
      total = ListTotal{q.count_up_to, TotalKind::at_least};
      // With no filter at all the planner's statistics tell how big both
      // tables are, at no cost; trusted only where they agree with the count.
      if (!q.queue && !q.status && !q.type && !tenant && !q.key && !q.key_prefix && !q.type_prefix &&
          !q.payload_contains && !q.error_contains) {
        auto e = impl.read(impl.sql.count_estimate, {});
        if (!e.null(0, 0) && e.i64(0, 0) > q.count_up_to) total = ListTotal{e.i64(0, 0), TotalKind::estimate};
      }
    }
  }
  auto after = q.newest_first ? q.after.value_or(std::numeric_limits<TaskId>::max()) : q.after.value_or(0);
  auto r = impl.read(q.newest_first ? impl.sql.list_desc : impl.sql.list,
                  {q.queue, status, q.type, tenant, num(after), num(q.limit + 1), q.key, q.key_prefix, q.type_prefix,
                   q.payload_contains, q.error_contains});
  TaskPage page;
  for (int i = 0; i < r.rows(); ++i) page.tasks.push_back(decode_task(r, i));
  // The statement reads one row past the page to say whether another follows.
  if (static_cast<int>(page.tasks.size()) > q.limit) {
    page.tasks.pop_back();
    page.next_after = page.tasks.back().id;
  }
  page.total = total;
  return page;
}

std::vector<QueueStats> PostgresStore::stats(const Scope& scope) {
  auto& impl = *impl_;
  detail::validate_scope(scope);
  auto r = impl.read(impl.sql.stats, {scope.tenant});
  std::map<std::string, QueueStats> by_queue;
  std::vector<std::string> paused;
  for (int i = 0; i < r.rows(); ++i) {
    if (r.text(i, 1) == "paused") {
      paused.push_back(r.text(i, 0));
      continue;
    }
    auto& s = by_queue[r.text(i, 0)];
    s.queue = r.text(i, 0);
    auto n = r.i64(i, 2);
    switch (parse_status(r.text(i, 1))) {
      case TaskStatus::pending: s.pending += n; break;
      case TaskStatus::running: s.running += n; break;
      case TaskStatus::succeeded:
        s.succeeded += n;
        s.succeeded_last_minute += r.i64(i, 4);
        s.succeeded_total += r.i64(i, 5);
        break;
      case TaskStatus::failed:
        s.failed += n;
        s.failed_last_minute += r.i64(i, 4);
        s.failed_total += r.i64(i, 5);
        break;
      case TaskStatus::cancelled: s.cancelled += n; s.cancelled_total += r.i64(i, 5); break;
      case TaskStatus::expired: s.expired += n; s.expired_total += r.i64(i, 5); break;
      case TaskStatus::waiting: s.waiting += n; break;
    }
    if (!r.null(i, 3)) s.oldest_pending_age = Millis(std::max<std::int64_t>(0, r.i64(i, 3)));
  }
  // A paused queue, or one with limits, is listed even when empty, so that
  // it can be resumed; in a tenant's scope only among the queues that tenant
  // has, so that the scope says nothing of other tenants' queues.
  for (const auto& q : paused) {
    if (scope.tenant && !by_queue.count(q)) continue;
    auto& s = by_queue[q];
    s.queue = q;
    s.paused = true;
  }
  for (auto& [q, l] : limits()) {
    if (scope.tenant && !by_queue.count(q)) continue;
    auto& s = by_queue[q];
    s.queue = q;
    s.limits = l;
  }
  std::vector<QueueStats> out;
  for (auto& [_, s] : by_queue) out.push_back(std::move(s));
  return out;
}

void PostgresStore::set_limits(std::string_view queue, const QueueLimits& limits) {
  auto& impl = *impl_;
  detail::validate_limits(queue, limits);
  const std::string q(queue);
  auto opt_num = [](const auto& v) { return v ? num(*v) : Param{}; };
  const Param r = limits.rate ? num(limits.rate->limit) : Param{};
  const Param rp = limits.rate ? num(limits.rate->period.count()) : Param{};
  const Param pr = limits.partition_rate ? num(limits.partition_rate->limit) : Param{};
  const Param prp = limits.partition_rate ? num(limits.partition_rate->period.count()) : Param{};
  impl.run_on_connection([&](Connection& c) {
    return in_transaction(c, [&] {
      c.exec(impl.sql.limits_lock, {q});
      if (limits.empty()) return c.exec(impl.sql.clear_limits, {q});
      return c.exec(impl.sql.set_limits,
                    {q, opt_num(limits.concurrency), opt_num(limits.partition_concurrency), r, rp, pr, prp});
    });
  });
  std::lock_guard lock(impl.limited_m);
  impl.limited_read = {};  // this store's next claim reads them again
}

std::vector<std::pair<std::string, QueueLimits>> PostgresStore::limits() {
  auto r = impl_->run(impl_->sql.limits, {});
  std::vector<std::pair<std::string, QueueLimits>> out;
  for (int i = 0; i < r.rows(); ++i) {
    QueueLimits l;
    if (!r.null(i, 1)) l.concurrency = r.i32(i, 1);
    if (!r.null(i, 2)) l.partition_concurrency = r.i32(i, 2);
    if (!r.null(i, 3)) l.rate = RateLimit{r.i32(i, 3), Millis(r.i64(i, 4))};
    if (!r.null(i, 5)) l.partition_rate = RateLimit{r.i32(i, 5), Millis(r.i64(i, 6))};
    out.emplace_back(r.text(i, 0), l);
  }
  return out;
}

void PostgresStore::pause(std::string_view queue) {
  detail::validate_queue("queue", queue);
  impl_->run(impl_->sql.pause, {std::string(queue)});
}

void PostgresStore::resume(std::string_view queue) {
  detail::validate_queue("queue", queue);
  impl_->run(impl_->sql.resume, {std::string(queue), impl_->channel});
}

std::vector<std::string> PostgresStore::paused_queues() {
  auto r = impl_->read(impl_->sql.paused_queues, {});
  std::vector<std::string> out;
  for (int i = 0; i < r.rows(); ++i) out.push_back(r.text(i, 0));
  return out;
}

std::vector<Throughput> PostgresStore::throughput(int minutes, const Scope& scope) {
  auto& impl = *impl_;
  detail::validate_scope(scope);
  detail::validate_throughput_minutes(minutes);
  auto r = impl.read(impl.sql.throughput, {scope.tenant, num(minutes)});
  std::vector<Throughput> out;
  out.reserve(static_cast<std::size_t>(r.rows()));
  for (int i = 0; i < r.rows(); ++i)
    out.push_back(Throughput{r.text(i, 0), parse_status(r.text(i, 1)), r.time(i, 2), r.i64(i, 3)});
  return out;
}

std::vector<Attempt> PostgresStore::history(TaskId id, const Scope& scope) {
  auto& impl = *impl_;
  // A task's tenant never changes, so checking it first is as good as joining.
  if (scope.tenant && !get(id, scope)) return {};
  auto r = impl.read(impl.sql.history, {num(id)});
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

Relatives PostgresStore::relatives(TaskId id, const Scope& scope) {
  auto& impl = *impl_;
  // Parents and children share the task's tenant (submit checks it).
  if (!get(id, scope)) return {};
  auto r = impl.read(impl.sql.relatives, {num(id)});
  Relatives out;
  for (int i = 0; i < r.rows(); ++i) {
    Relative rel{r.i64(i, 1), r.text(i, 2), parse_status(r.text(i, 3)), r.opt_text(i, 4)};
    (r.i32(i, 0) == 0 ? out.parents : out.children).push_back(std::move(rel));
  }
  return out;
}

std::int64_t PostgresStore::prune(Millis older_than, int batch_size) {
  auto& impl = *impl_;
  detail::validate_prune(older_than, batch_size);
  return impl.in_batches(impl.sql.prune, batch_size, num(older_than.count())).total;
}

std::int64_t PostgresStore::prunable(Millis older_than) {
  auto& impl = *impl_;
  detail::validate_prune(older_than, 1);
  return impl.run(impl.sql.prunable, {num(older_than.count())}).i64(0, 0);
}

MaintenanceReport PostgresStore::maintain() {
  auto& impl = *impl_;
  MaintenanceReport report;
  const int batch = impl.options.prune_batch;
  report.expired = impl.in_batches(impl.sql.expire, batch).total;
  report.reaped = impl.in_batches(impl.sql.reap, batch).total;
  impl.compact_totals();
  if (impl.options.retention) {
    // Pruning a backlog of a million rows deletes as much as a drain of a
    // million tasks writes: in slices of prune_budget, with the worker's pause
    // between them, it never takes the database from the running tasks.
    auto pruned = impl.in_batches(impl.sql.prune, batch, num(impl.options.retention->count()),
                                  std::chrono::steady_clock::now() + impl.options.prune_budget);
    report.pruned = pruned.total;
    report.more = pruned.more;
  }
  return report;
}

void PostgresStore::wait_for_tasks(const std::vector<std::string>& queues, Millis timeout) {
  auto& impl = *impl_;
  using SteadyClock = std::chrono::steady_clock;
  auto deadline = SteadyClock::now() + timeout;
  if (auto room = impl.rate_room_at.exchange(0); room != 0)
    deadline = std::min(deadline, SteadyClock::time_point(SteadyClock::duration(room)));
  std::unique_lock lk(impl.listen_m);
  // A wake() since the last wait returned ends this one at once, as on
  // MemoryStore: a worker wakes its store when a retry comes due sooner than
  // its claimer's wait, and that wake can land a moment before the wait
  // begins. The wait still goes through (a zero-length one), so the LISTEN
  // connection is set up all the same.
  const bool woken = impl.wake_gen != impl.wake_seen;
  if (woken) deadline = SteadyClock::now();
  auto gen = impl.wake_gen;
  auto seen = [&] { impl.wake_seen = impl.wake_gen; };  // with listen_m held
  if (impl.listen_conninfo().empty()) {
    // Nowhere to LISTEN: only wake() ends the wait early.
    impl.listen_cv.wait_until(lk, deadline, [&] { return impl.wake_gen != gen; });
    seen();
    return;
  }
  if (impl.listener_busy) {
    // Another thread is polling the LISTEN connection; it tells us what it hears.
    impl.listen_cv.wait_until(lk, deadline, [&] { return impl.wake_gen != gen; });
    seen();
    return;
  }
  impl.listener_busy = true;
  if (woken) {
    // That wake's write to wake_fd is still there for the poll: take it now,
    // or it would end the next wait too.
    std::uint64_t v;
    [[maybe_unused]] auto got = ::read(impl.wake_fd, &v, sizeof v);
  }
  lk.unlock();
  bool heard = false;
  try {
    if (!impl.listener || !impl.listener->ok()) {
      impl.listener.reset();
      auto c = std::make_unique<Connection>(impl.listen_conninfo(), "eoq-listen");
      c->command(fmt::format("LISTEN {}", quote_ident(impl.channel)).c_str());
      impl.listener = std::move(c);
    }
    PGconn* c = impl.listener->get();
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
      pollfd fds[2] = {{PQsocket(c), POLLIN, 0}, {impl.wake_fd, POLLIN, 0}};
      int rc = ::poll(fds, 2, static_cast<int>(std::min<std::int64_t>(left, 1000000)));
      if (rc < 0 && errno != EINTR) break;
      if (fds[1].revents & POLLIN) {
        std::uint64_t v;
        [[maybe_unused]] auto got = ::read(impl.wake_fd, &v, sizeof v);
        heard = true;
      }
      if (fds[0].revents & (POLLERR | POLLHUP)) {
        impl.listener.reset();
        break;
      }
      if (PQconsumeInput(c) == 0) {
        // The LISTEN connection broke (server restart): reconnect on the next wait.
        impl.listener.reset();
        break;
      }
    }
  } catch (const Error&) {
    // Cannot listen now (server down): sleep a little so callers fall back to polling.
    lk.lock();
    impl.listener_busy = false;
    impl.listen_cv.wait_until(lk, std::min(deadline, SteadyClock::now() + Millis(200)),
                           [&] { return impl.wake_gen != gen; });
    seen();
    impl.listen_cv.notify_all();
    return;
  }
  lk.lock();
  impl.listener_busy = false;
  if (heard) ++impl.wake_gen;
  seen();
  impl.listen_cv.notify_all();
}

TimePoint PostgresStore::now() {
  auto& impl = *impl_;
  auto r = impl.run(impl.sql.now, {});
  return r.time(0, 0);
}

void PostgresStore::wake() { impl_->wake(); }

}  // namespace eoq
