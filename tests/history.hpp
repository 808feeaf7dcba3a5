#pragma once
// The history checker of the chaos tests.
//
// A chaos test (SIGKILL, zombie workers, Postgres restarts, backend kills)
// records what happened to every task: submits, claims (with their version),
// heartbeats, effect writes, completions, failures, releases, as seen by the
// client and as committed in the database. verify() reads such a history and
// checks the promises eoq makes:
//
//   - every task submitted ends terminal (no lost task);
//   - a succeeded task has exactly one effect row, any other task none;
//   - a committed completion carries the version of the task's latest claim,
//     and a task completes at most once;
//   - no two leases of one task overlap in committed (database) time, and no
//     operation of a lease commits after a newer lease was handed out;
//   - no claim starts an attempt beyond max_attempts;
//   - no task is claimed or started at or after its deadline;
//   - one key names one task;
//   - a dependent (a task with parents) is never claimed before every parent
//     succeeded, and one whose parent ended otherwise never runs and ends
//     cancelled (a run-anyway dependent: never claimed before every parent ended);
//   - no more tasks of a queue, or of a partition of it, run at once than its
//     concurrency limit (`limit` events) allows: see "Limits" below.
//
// Histories come from the chaos tests' Recorder, from a file in the line format
// below, or from the database itself (load_postgres), or any mix of them: an
// event seen both by the client and in the database counts once.
//
// Line format, one event per line, fields separated by spaces or tabs; blank
// lines and lines starting with '#' are ignored:
//
//   claim task=7 version=3 owner=w1 origin=db db=1700000000000000 until=1700000030000000 attempt=2
//
// The first word is the kind; then name=value fields, any order, all optional
// except task: task, version, owner, key, origin (client|db, default client),
// ok (1|0|true|false, default 1), client, db, until (microseconds since the
// epoch), deadline (submit: microseconds since the epoch), status, attempt,
// max_attempts, parent, queue and partition (submit: the task's; limit: what
// it limits), per_partition (limit: 1|0), concurrency (limit). Values are
// percent-encoded (%20 for a space, %25 for '%'). A `limit` event names no
// task:
//
//   limit queue=mail concurrency=6
//   limit queue=mail per_partition=1 concurrency=2 db=1700000000000000
//
// Limits. A task runs from its claim until its lease ends: its completion,
// failure or release commits, or its lease expires (as extended by the
// heartbeats that committed before it expired; a heartbeat after that revives
// a lease whose place the store has already given away, and the run counts as
// ended at the expiry). At no instant may more tasks of a limited scope run
// than its limit: a queue, one named partition of it, or each of its
// partitions on its own (per_partition=1), the tasks placed by their submit
// events' queue and partition (a task without a queue is not counted). A limit
// holds from its time (db, else client; neither: from the start) until the
// next limit event of the same scope; one without concurrency turns the scope's
// limit off. Since the events' times are bounds of the moments that matter,
// a run is counted only while it surely runs: from the latest bound of its
// claim's commit (the client's clock once claim() returned, else the claim's
// database time) to the earliest end its records allow (a settlement's commit
// is bounded below by its database time and by the client's clock before the
// call). This needs the client and the database server on one clock (one
// host), as the chaos tests have them. A lowered limit stops nothing that
// runs, so only the instants where a run starts are checked.
#include <eoq/task.hpp>
#include <eoq/task_store.hpp>

#include <libpq-fe.h>

#include <cstdint>
#include <iosfwd>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace eoq::test::history {

enum class Kind {
  submit,     // a task was created or found by its key (key, max_attempts, deadline)
  claim,      // a lease was handed out: version = token, db = claim time, until = lease expiry, attempt
  heartbeat,  // a lease was extended: version, db = when, until = new expiry
  effect,     // the handler's effect row (origin db: a row in the effects table; version = writer's token)
  complete,   // a completion: version = the lease's token, db = commit time
  fail,       // a failure: version, status = retry | failed | cancelled | snoozed, db = commit time
  release,    // a lease given back: version, db = commit time
  expire,     // a lease ended by expiry: version, db = lease_expires_at as last extended
  cancel,     // cancel(id) was called: status = its outcome
  final,      // the task's state at the end of the test: status, attempt = attempts
  start,      // a handler started on a lease: version, db = the store's time then (claim time plus
              // what the worker waited), else client = the client's clock
  parent,     // the task waits for `parent`; status = "run" when it runs whatever its parents did
  end,        // a handler returned (ok=1) or threw (ok=0) on a lease: version, client = the client's clock
  limit,      // a concurrency limit from its time on (no task): queue, partition or per_partition, concurrency
};

enum class Origin {
  client,  // what a client observed (ok = whether the call reported success)
  db,      // read back from the database: committed
};

struct Event {
  Kind kind = Kind::submit;
  Origin origin = Origin::client;
  TaskId task = 0;
  std::int64_t version = 0;  // lease token; 0 = not applicable / unknown
  std::string owner{};
  std::string key{};
  bool ok = true;  // client events: the call succeeded (the client was told it committed)
  std::optional<std::int64_t> client_us{};  // client clock, microseconds since the epoch
  std::optional<std::int64_t> db_us{};      // database time of the commit (now() of its transaction)
  std::optional<std::int64_t> until_us{};   // claim / heartbeat: lease_expires_at
  std::string status{};                     // fail: retry|failed|cancelled; final: the status; cancel: outcome
  int attempt = 0;                          // claim: attempts after the claim; final: attempts
  int max_attempts = 0;                     // submit: the task's max_attempts (0 = unknown)
  std::optional<std::int64_t> deadline_us{};  // submit: the task's deadline, if it has one
  TaskId parent = 0;                           // parent: the task waited for
  std::string queue{};                         // submit: the task's queue (empty: unknown); limit: the queue
  std::string partition{};                     // submit: the task's partition ('' for none); limit: the one limited
  bool per_partition = false;                  // limit: each partition of the queue on its own
  std::optional<int> concurrency{};            // limit: tasks running at once (empty: the limit is off)

  // Committed as far as this history knows: read from the database, or a client
  // call that reported success.
  bool committed() const noexcept { return origin == Origin::db || ok; }
};

std::string_view to_string(Kind k) noexcept;
std::optional<Kind> parse_kind(std::string_view name) noexcept;

// One event in the line format (no trailing newline).
std::string to_line(const Event& e);
// Parses the line format; throws std::runtime_error("line N: ...") on bad input.
std::vector<Event> parse(std::istream& in);
std::vector<Event> parse(std::string_view text);
std::vector<Event> load_file(const std::string& path);
void save_file(const std::string& path, const std::vector<Event>& events);

// Microseconds since the epoch of a store time point, for Event fields.
inline std::int64_t micros(TimePoint t) noexcept { return t.time_since_epoch().count(); }

// Collects events from many threads.
class Recorder {
 public:
  Recorder() = default;
  // Also appends every event to `path` as a line, each with one write(2) as it
  // happens: a process killed with SIGKILL keeps all but the event in flight.
  explicit Recorder(const std::string& path);
  ~Recorder();
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

  void add(Event e);
  std::vector<Event> events() const;
  void save(const std::string& path) const;

 private:
  mutable std::mutex m_;
  std::vector<Event> events_;
  int fd_ = -1;
};

// A Recorder's file (see Recorder(path)), or empty when there is none. A last
// line without its newline is dropped: the writer was killed in the middle of it.
std::vector<Event> load_log(const std::string& path);
// load_log of every file in `dir` whose name ends in ".history".
std::vector<Event> load_logs(const std::string& dir);

// A TaskStore that forwards to `inner` and records, as client events, what its
// callers were told: submits, claims (token, claim time, expiry, attempt),
// heartbeats, completions (also through begin()), failures, releases and
// cancels, and expiries at hand-off (as fail with status expired), and the
// queues' limits as set_limits sets them (limit events); ok=0 when the call
// threw, whatever it did in the database. A
// handler records its own effect writes. Times it gives as db are exact where
// the store's answer carries now() of the transaction (claim: updated_at;
// heartbeat: the new expiry minus the extension). A release leaves no trace in
// the database, so its db time is the client's clock just before the call: a
// lower bound of the release's now() when client and server share a host,
// enough to show that the next lease started after the release. Client times
// are the client's clock before the call, so that a settlement's is a lower
// bound of its commit, except where an upper bound is what the limits need:
// claim, heartbeat and set_limits take it once the call returned.
class RecordingStore final : public TaskStore {
 public:
  RecordingStore(TaskStore& inner, Recorder& recorder) : inner_(inner), rec_(recorder) {}

  SubmitResult submit(const NewTask& task) override;
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks) override;
  std::vector<Lease> claim(const ClaimRequest& request) override;
  void complete(const Lease& lease, std::string_view result_json = "null") override;
  FailOutcome fail(const Lease& lease, const Failure& failure) override;
  HeartbeatResult heartbeat(const Lease& lease, Millis extension) override;
  void release(const Lease& lease) override;
  bool expire_if_overdue(const Lease& lease) override;
  void cancel_running(const Lease& lease, std::string_view reason = {}) override;
  FailOutcome snooze(const Lease& lease, Millis delay) override;
  void progress(const Lease& lease, int percent, std::string_view stage) override;
  void checkpoint(const Lease& lease, std::string_view stage, std::string_view state_json) override;
  std::vector<bool> complete_batch(std::span<const Completion> completions) override;
  std::unique_ptr<LeaseTransaction> begin(const Lease& lease) override;
  std::unique_ptr<LeaseTransaction> begin(const Lease& lease, const TransactionOptions& options) override;
  CancelOutcome cancel(TaskId id, const Scope& scope = {}) override;
  // Not recorded: no chaos test retries, and the checker treats terminal states as final.
  RetryOutcome retry(TaskId id, const Scope& scope = {}) override { return inner_.retry(id, scope); }
  std::optional<Task> get(TaskId id, const Scope& scope = {}) override { return inner_.get(id, scope); }
  std::optional<Task> find(std::string_view queue, std::string_view key, const Scope& scope = {}) override {
    return inner_.find(queue, key, scope);
  }
  TaskPage list(const ListQuery& query, const Scope& scope = {}) override { return inner_.list(query, scope); }
  std::vector<QueueStats> stats(const Scope& scope = {}) override { return inner_.stats(scope); }
  RemoveOutcome remove(TaskId id, const Scope& scope = {}) override { return inner_.remove(id, scope); }
  void pause(std::string_view queue) override { inner_.pause(queue); }
  void resume(std::string_view queue) override { inner_.resume(queue); }
  std::vector<std::string> paused_queues() override { return inner_.paused_queues(); }
  void set_limits(std::string_view queue, const eoq::QueueLimits& limits) override;
  std::vector<std::pair<std::string, eoq::QueueLimits>> limits() override { return inner_.limits(); }
  std::vector<Throughput> throughput(int minutes, const Scope& scope = {}) override {
    return inner_.throughput(minutes, scope);
  }
  std::vector<Attempt> history(TaskId id, const Scope& scope = {}) override { return inner_.history(id, scope); }
  Relatives relatives(TaskId id, const Scope& scope = {}) override { return inner_.relatives(id, scope); }
  std::int64_t prune(Millis older_than, int batch_size = 1000) override { return inner_.prune(older_than, batch_size); }
  std::int64_t prunable(Millis older_than) override { return inner_.prunable(older_than); }
  MaintenanceReport maintain() override { return inner_.maintain(); }
  void wait_for_tasks(const std::vector<std::string>& queues, Millis timeout) override {
    inner_.wait_for_tasks(queues, timeout);
  }
  void wake() override { inner_.wake(); }
  TimePoint now() override { return inner_.now(); }

  Recorder& recorder() const noexcept { return rec_; }

 private:
  TaskStore& inner_;
  Recorder& rec_;
};

// The client event a handler records for its effect write under `lease`.
Event effect_of(const Lease& lease);
// The client events a handler records as it starts and as it returns (ok) or
// throws (not ok) under `lease`, with the client's clock.
Event start_of(const Lease& lease);
Event end_of(const Lease& lease, bool ok);

// The committed history as the database keeps it, from an eoq schema and an
// effects table (columns task_id bigint and version bigint: the token of the
// lease whose transaction wrote the row). Gives, all with origin db: a submit
// and a final event per task; a claim per recorded attempt (attempts table,
// and the last attempt of a running or succeeded task) with the event that
// ended it (complete, fail, expire); an effect per effects row. Released
// attempts leave no trace in the database (release takes the attempt back).
// A schema with workflow tables (migration 0003) also gives a parent event per
// edge (without the run-anyway flag, which the database drops at release: a
// client's submit records it) and counts its waiting tasks as not terminal.
// `schema` and `effects_table` must be plain identifiers ([a-z_][a-z0-9_]*);
// `effects_table` lives in `effects_schema` (default: `schema`). A schema with
// limits (migration 0010) gives each submit its queue and partition, and a
// limit event per limit in force (from its updated_at: the table keeps no
// earlier ones). An empty
// `effects_table` reads no effects (a test whose tasks write none: check it with
// Options::require_effects off).
std::vector<Event> load_postgres(PGconn* conn, const std::string& schema, const std::string& effects_table,
                                 const std::string& effects_schema = "");

enum class ViolationKind {
  lost_task,                // submitted but not terminal at the end
  double_effect,            // more than one effect row for a task
  missing_effect,           // a succeeded task without its effect row
  orphan_effect,            // an effect row of a task that did not succeed
  effect_version,           // the effect row was written under another lease than the completing one
  double_completion,        // two different leases completed one task
  stale_completion,         // a completion whose version is not the task's latest claim
  completion_not_recorded,  // a client was told its completion committed, the task did not succeed
  stale_lease,              // an operation of a lease committed after a newer lease was handed out
  lease_overlap,            // a lease handed out while the previous one was still valid
  attempts_exceeded,        // a claim started attempt n > max_attempts
  duplicate_key,            // one key, two tasks
  started_after_deadline,   // a claim or a handler start at or after the task's deadline
  dependent_started_early,  // a dependent claimed before a parent succeeded (run-anyway: ended)
  dependent_ran_after_failed_parent,  // a parent ended other than succeeded, the dependent did not end cancelled
  limit_exceeded,           // a run started while its queue or partition already ran as many as its limit allows
};
std::string_view to_string(ViolationKind k) noexcept;

struct Violation {
  ViolationKind kind{};
  TaskId task = 0;
  std::string detail{};
};

struct Options {
  // Allowed disagreement between database timestamps (now() is a
  // transaction's start, not its commit), in microseconds. For the limits:
  // a run that ends within slack_us after another starts is not counted there.
  std::int64_t slack_us = 0;
  // Succeeded tasks must have exactly one effect row (off for histories
  // without an effects table).
  bool require_effects = true;
};

struct Verdict {
  std::int64_t events = 0, tasks = 0, submitted = 0, terminal = 0;
  std::int64_t succeeded = 0, failed = 0, cancelled = 0, expired = 0;
  std::int64_t claims = 0, completions = 0, effects = 0;
  std::int64_t handovers_checked = 0, handovers_unchecked = 0;  // consecutive leases compared in time
  std::int64_t edges_checked = 0;  // (parent, dependent) pairs whose order was checked
  std::int64_t handler_starts = 0, handler_ends = 0;
  std::int64_t deadline_starts_checked = 0;  // committed claims and handler starts compared with a deadline
  // Runs whose start was compared with a limit in force (once per scope), and
  // how many of those filled it: the limit was reached, so the check had teeth.
  std::int64_t limit_starts_checked = 0, limit_full = 0;
  std::int64_t revived = 0;  // leases extended by a heartbeat not known to have committed before they expired
  std::vector<Violation> violations{};

  bool ok() const noexcept { return violations.empty(); }
  std::int64_t count(ViolationKind k) const noexcept;
  bool has(ViolationKind k) const noexcept { return count(k) > 0; }
  // One line of counts and the verdict, then up to `max_listed` violations, one a line.
  std::string format(std::size_t max_listed = 20) const;
};

Verdict verify(const std::vector<Event>& events, const Options& options = {});

// verify(), with the verdict printed to stdout as "<label>: <verdict>", so a
// chaos test's log shows its counts whether it passes or not.
Verdict verify_and_print(std::string_view label, const std::vector<Event>& events, const Options& options = {});

// Appends `more` to `to`: the sides of one history (client, children, database).
inline void append(std::vector<Event>& to, const std::vector<Event>& more) {
  to.insert(to.end(), more.begin(), more.end());
}

}  // namespace eoq::test::history
