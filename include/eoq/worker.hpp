#pragma once
// The Worker claims tasks from a TaskStore and runs the host's handlers on them.
//
//   eoq::Worker worker(store, {.queues = {"mail"}, .concurrency = 8});
//   worker.on("send-email", [](eoq::TaskContext& ctx) {
//     ctx.exec("INSERT INTO sent(task_id) VALUES ($1)", {ctx.id()});
//     ctx.set_result(R"({"sent":true})");
//   });
//   worker.run();  // until another thread calls worker.stop()
//
// A handler returns to succeed and throws to fail: PermanentError fails the task
// for good, Cancelled ends it cancelled, Snooze (or ctx.snooze) puts it off
// without counting the attempt, anything else retries it per the task's
// RetryPolicy. Its SQL (through
// ctx.exec / ctx.transaction()) commits in the same transaction that completes
// the task, or not at all.
//
// The Worker uses only the TaskStore interface, so it runs the same against
// PostgresStore and MemoryStore (where ctx.exec throws UsageError).
#include <eoq/errors.hpp>
#include <eoq/task.hpp>
#include <eoq/task_store.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace eoq {

// Thrown by a handler to fail its task without retry, whatever the task's
// RetryPolicy says (bad input that no retry can fix).
class PermanentError : public Error {
 public:
  using Error::Error;
};

// Thrown by a handler that stops because it was asked to (it saw
// ctx.cancelled()), or because its work is no longer wanted: the task ends
// `cancelled`, not failed and not retried, and the worker logs it at info. Any
// SQL the handler ran in the task's transaction rolls back.
//
//   if (ctx.cancelled()) throw eoq::Cancelled{};
class Cancelled : public Error {
 public:
  Cancelled() : Error("stopped by its handler") {}
  explicit Cancelled(const std::string& reason) : Error(reason) {}
};

// Thrown by a handler whose task cannot run yet ("run me again after
// `delay`": an upstream rate limit, a resource not ready): the attempt ends
// `snoozed` in history and does not count against max_attempts (a snooze on
// the last attempt still runs again), any SQL and submits the handler made in
// the task's transaction roll back, and the task is pending again with run_at
// = the store's now() + delay (TaskStore::snooze). A task with a cancel
// request ends cancelled instead. delay: 0 to 365 days; outside that the
// attempt fails (retried per its RetryPolicy) with the InvalidArgument's text.
// ctx.snooze(delay) does the same and cannot be swallowed by a handler's
// `catch (const std::exception&)`.
//
//   if (quota_left == 0) throw eoq::Snooze{std::chrono::seconds(30)};
class Snooze : public Error {
 public:
  explicit Snooze(Millis delay) : Error("snoozed by its handler"), delay_(delay) {}
  Millis delay() const noexcept { return delay_; }

 private:
  Millis delay_;
};

enum class LogLevel { debug, info, warning, error };
std::string_view to_string(LogLevel level) noexcept;

// Receives the worker's log lines. Calls are serialised by the worker, so the
// callback needs no locking of its own; it must not call back into the worker.
using Logger = std::function<void(LogLevel level, std::string_view message)>;

// A snapshot of what a worker has done since it started, for the host to export
// (Prometheus, StatsD, logs). Every claimed lease ends in exactly one of
// succeeded, failed, retried, cancelled, expired, lease_lost, released,
// abandoned or snoozed; until then it is counted in in_flight:
//   claimed == succeeded + failed + retried + cancelled + expired + lease_lost
//              + released + abandoned + snoozed + in_flight
struct WorkerCounters {
  std::uint64_t claimed = 0;     // leases taken
  std::uint64_t succeeded = 0;   // completed
  std::uint64_t failed = 0;      // failed for good: PermanentError, unknown type, attempts used up
  std::uint64_t retried = 0;     // failed and scheduled to run again
  std::uint64_t cancelled = 0;   // ended cancelled after cancel() was requested
  std::uint64_t expired = 0;     // deadline passed while buffered: ended expired, never started
  std::uint64_t lease_lost = 0;  // outcome discarded: the store fenced the lease off
  std::uint64_t released = 0;    // given back unfinished (shutdown, or a commit that failed): runs again
  std::uint64_t abandoned = 0;   // outcome unknown to the store (it was unreachable); the lease expires
  std::uint64_t snoozed = 0;     // put off by its handler (Snooze): runs again later, the attempt not counted
  std::uint64_t in_flight = 0;   // leases held right now (buffered, running or being settled)
  std::uint64_t store_errors = 0;  // failed store calls (each retried or given up on, and logged)

  // Handler run time: count, sum and maximum, and a histogram whose bucket i
  // counts runs of at most duration_bounds[i] (the last bucket: everything longer).
  static constexpr std::array<Millis, 12> duration_bounds{
      Millis(5),    Millis(10),   Millis(25),   Millis(50),    Millis(100),   Millis(250),
      Millis(500),  Millis(1000), Millis(2500), Millis(10000), Millis(30000), Millis(60000)};
  std::uint64_t handler_runs = 0;
  std::chrono::microseconds handler_time_total{0};
  std::chrono::microseconds handler_time_max{0};
  std::array<std::uint64_t, duration_bounds.size() + 1> handler_duration_buckets{};
};

struct WorkerOptions {
  std::vector<std::string> queues{"default"};
  int concurrency = 4;      // handler threads
  Millis lease{30000};      // each claim and heartbeat extends the lease by this much
  // Heartbeat period; zero means lease / 3. Must be shorter than the lease.
  Millis heartbeat_interval{0};
  int claim_batch = 1000;   // most tasks taken per claim round trip (1..10000)
  // Leases held beyond the handler threads, so a handler that finishes finds its
  // next task without a round trip. Empty (the default): measured, as many as
  // the handlers start during two claim round trips (up to 2 * claim_batch), so
  // short tasks are claimed in large batches and slow ones are not hoarded.
  // A number fixes it (0: hold only what runs). Buffered leases are
  // heartbeated, and given back by stop().
  std::optional<int> prefetch{};
  int complete_batch = 1000;  // most completions per complete_batch round trip
  // Longest an idle worker waits for a notification before it polls again.
  Millis poll_interval{1000};
  std::string worker_id;     // lease owner; empty: "<host>:<pid>:<random>"
  // stop() lets running handlers finish for this long, then gives their leases back.
  Millis shutdown_timeout{20000};
  // How long a handler that ran past its timeout (HandlerOptions::timeout,
  // Task::timeout) has to return, once asked to stop, before its attempt is
  // failed with "timeout". 0 to 7 days.
  Millis timeout_grace{5000};
  // How often store.maintain() runs (expire overdue tasks, reap dead leases,
  // retention); zero disables it.
  Millis maintenance_interval{30000};
  // Waits after a transient store error (connection lost, server restarting):
  // doubling from the first to the cap.
  Millis error_backoff_initial{100};
  Millis error_backoff_max{10000};
  // false: handler transactions commit without waiting for their WAL to reach
  // disk (TransactionOptions::synchronous_commit; HandlerOptions can say so
  // per task type instead). Exactly-once for writes in the same database
  // holds; a database crash can undo a success that was already visible for
  // up to ~0.6 s, and the task then runs again. See docs/contract.md.
  bool synchronous_commit = true;
  // Empty: warnings and errors go to stderr. To silence, pass a callback that drops them.
  Logger logger;
  LogLevel log_level = LogLevel::info;
};

namespace detail {
struct TaskRun;  // one held lease inside the worker (worker.cpp)
}

// Run-scoped SQL for a handler: every statement runs in the transaction that
// completes the task, so its writes commit if and only if the task succeeds.
class TaskTransaction {
 public:
  explicit TaskTransaction(LeaseTransaction& tx) noexcept : tx_(&tx) {}
  // One parameterised statement ($1, $2, ...). Throws UsageError on a store
  // without SQL (MemoryStore).
  Rows exec(std::string_view sql, const Params& params = {}) { return tx_->exec(sql, params); }
  // See TaskContext::send.
  void send(std::string_view sql, const Params& params = {}) { tx_->send(sql, params); }

 private:
  LeaseTransaction* tx_;
};

// What a handler sees of its task. Valid only during the handler call, and only
// on the handler's thread.
class TaskContext {
 public:
  explicit TaskContext(detail::TaskRun& run) noexcept : run_(&run) {}
  TaskContext(const TaskContext&) = delete;
  TaskContext& operator=(const TaskContext&) = delete;

  const Task& task() const noexcept;  // as claimed
  TaskId id() const noexcept;
  const std::string& queue() const noexcept;
  const std::string& type() const noexcept;
  const std::optional<std::string>& key() const noexcept;
  const std::string& payload() const noexcept;  // JSON text
  int attempt() const noexcept;                 // 1 on the first run
  const Lease& lease() const noexcept;
  // Stable across attempts and unique across queues: hand it to external services
  // that deduplicate ("eoq-task-<id>").
  std::string idempotency_token() const;

  // Stores progress (0..100) and a stage name, visible through TaskStore::get.
  // Throws LeaseLost when the lease is gone; other store errors are logged and
  // ignored, since progress is advisory.
  void progress(int percent, std::string_view stage = {});

  // The result stored on success (JSON text; default null). Invalid JSON throws
  // InvalidArgument here rather than failing the completion later.
  void set_result(std::string json);

  // The last checkpoint saved by any attempt of this task, or empty.
  const std::optional<std::string>& checkpoint_stage() const noexcept;
  const std::optional<std::string>& checkpoint_state() const noexcept;  // JSON text
  // Saves a named stage and a small JSON state, fenced like completion. With a
  // transaction open, the SQL run so far commits together with it (a new
  // transaction starts for what follows). Throws LeaseLost when the lease is gone.
  void checkpoint(std::string_view stage, std::string_view state_json = "null");

  // Opens (on first use) the transaction that completes the task. If the handler
  // throws, the lease is lost or the process dies, nothing run in it commits
  // (except what a checkpoint already committed). On Postgres it holds a
  // connection of the store's handler pool for the rest of the handler, and the
  // server ends it if it sits idle longer than PostgresOptions::handler_idle_timeout.
  TaskTransaction& transaction();
  // Shorthand for transaction().exec(sql, params).
  Rows exec(std::string_view sql, const Params& params = {});
  // A statement whose answer the handler does not need (an INSERT, UPDATE or
  // DELETE), in the task's transaction like exec, but not waited for: it goes
  // to the server with whatever goes next, at the latest with the task's
  // completion and COMMIT, in one round trip (with HandlerOptions::batch, a
  // whole batch's statements and completions in one). Statements run in the
  // order the handler called exec and send. An error in it fails the task as
  // if the handler had thrown it (retried per its RetryPolicy), and nothing
  // of the task's transaction commits.
  void send(std::string_view sql, const Params& params = {});
  bool in_transaction() const noexcept;

  // Submits in the task's transaction (opening it): the tasks exist if and only
  // if it commits, with the task's completion or a checkpoint. A handler that
  // throws, loses its lease or dies leaves none behind. Validation, keys and
  // duplicates as TaskStore::submit; a KeyConflict leaves the transaction usable.
  // Works on both stores.
  SubmitResult submit(const NewTask& task);
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks);
  // The parents this task waited for, by id, with their results (JSON text;
  // empty for a parent that did not succeed, or one retention has deleted).
  std::vector<Relative> parent_results() const;

  // Ends the attempt snoozed: the task runs again `delay` from now (the
  // store's clock), the attempt not counted; see eoq::Snooze. Throws a value
  // that is no std::exception to unwind the handler, and the snooze stands
  // however the handler then leaves (returning, or throwing something else).
  // A delay outside 0..365 days throws InvalidArgument("delay", ...) instead
  // and snoozes nothing.
  [[noreturn]] void snooze(Millis delay);

  // cancel() was called on this task. Seen at the next heartbeat. Returning
  // completes the task as usual; `throw eoq::Cancelled{}` ends it cancelled.
  bool cancelled() const noexcept;
  // The worker is shutting down: finish soon or throw; after shutdown_timeout the
  // lease is given back.
  bool stopping() const noexcept;
  // The store fenced this lease off: another owner may be running the task, and
  // whatever this handler does will be discarded.
  bool lease_lost() const noexcept;
  // The handler has run past its timeout (HandlerOptions::timeout,
  // Task::timeout): return within WorkerOptions::timeout_grace, or the
  // attempt fails with "timeout" and what the handler does after is discarded.
  bool timed_out() const noexcept;
  bool should_stop() const noexcept { return cancelled() || stopping() || lease_lost() || timed_out(); }
  // Sleeps for up to `duration`, waking early when should_stop() turns true.
  // Returns !should_stop().
  bool sleep_for(Millis duration);

  // Logs through the worker's logger, prefixed with the task id and type.
  void log(LogLevel level, std::string_view message) const;

 private:
  detail::TaskRun* run_;
};

using Handler = std::function<void(TaskContext&)>;

// How the worker runs the tasks of one type (Worker::on).
struct HandlerOptions {
  // Up to this many claimed tasks of the type run one after another on one
  // handler thread, in one transaction: every task's SQL (ctx.exec, ctx.submit)
  // and every task's completion commit together, so the commit's disk flush is
  // paid once per batch, not once per task. Each task keeps its own effects:
  // a handler that throws (or breaks the transaction with a failed statement)
  // rolls the transaction back, its task is settled alone by its verdict, and
  // the others run again in a new transaction, so nothing of the failed task
  // commits and nothing of the others is lost or doubled. A handler in a
  // batch therefore may run more than once for one attempt (its database
  // writes commit once); ctx.checkpoint throws UsageError there. 1..1000;
  // 1 (the default): each task in a transaction of its own. A handler thread
  // that runs batches holds up to a batch of leases, so a worker with a batch
  // type registered holds up to concurrency x the largest batch (plus its
  // look-ahead) of whatever its queues hold: give slow types that do not batch
  // a worker (or queue) of their own.
  int batch = 1;
  // Overrides WorkerOptions::synchronous_commit for this type.
  std::optional<bool> synchronous_commit{};
  // How long one call of the handler may run; a task's own Task::timeout
  // overrides it. Empty: no limit. At the timeout the handler sees
  // ctx.timed_out() and ctx.should_stop(), and ctx.sleep_for wakes. A
  // handler that returns within WorkerOptions::timeout_grace after that
  // settles as it would have without a timeout: returning completes the task
  // with its writes, throwing fails it (as River and Oban do with a job that
  // returns in time). One still running after the grace has its attempt
  // failed with the error "timeout" there and then, retried per the task's
  // RetryPolicy or failed when no attempts remain (counted as retried or
  // failed). What that handler does afterwards is discarded: the failure
  // moved the task's version on, so its completion meets LeaseLost, its
  // transaction rolls back (on Postgres the server refuses its COMMIT), and
  // ctx.checkpoint throws LeaseLost. A handler cannot be interrupted: its
  // thread keeps its slot among `concurrency` (and, on Postgres, its handler
  // connection) until it returns. In a batch the time counts per handler
  // call; a handler failed so rolls its batch back, and the other tasks its
  // thread holds are given back (pending at once, attempts not counted)
  // rather than wait for it. Positive, at most 7 days (field "timeout").
  std::optional<Millis> timeout{};
};

// "Every `period`, submit `task`": the scheduler submits it with the key
// "periodic:<name>:<bucket start, epoch seconds>", so any number of workers with
// the same registration, restarted any number of times, create one task per
// period bucket (the store's idempotency decides; duplicates are normal).
// Buckets are read from the store's clock (TaskStore::now). Worker::every runs
// an eoq::Scheduler (scheduler.hpp) inside the worker; a process that only
// schedules runs a Scheduler alone.
struct PeriodicTask {
  std::string name;  // [A-Za-z0-9_.-], 1..128 characters
  std::chrono::seconds period{60};
  NewTask task;      // its key is set by the scheduler and must be empty here
};

// "At the times a cron expression names, in a time zone, submit `task`": the
// scheduler submits it with the key "cron:<name>:<fire time, epoch seconds>",
// so, as with every(), any number of workers and schedulers create one task per
// fire time. The rules (fields, names, @-forms, daylight saving) are
// Scheduler::cron's (scheduler.hpp). Names share one namespace with every().
struct CronTask {
  std::string name;               // [A-Za-z0-9_.-], 1..128 characters
  std::string schedule;           // "*/15 * * * *", "30 2 * * mon-fri", "@daily", ...
  std::string time_zone = "UTC";  // an IANA name: "Europe/Berlin"
  NewTask task;                   // its key is set by the scheduler and must be empty here
};

class Worker {
 public:
  // The store must outlive the worker.
  Worker(TaskStore& store, WorkerOptions options = {});
  ~Worker();  // stop()
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Registers the handler for a task type (replacing any earlier one). Before
  // start()/run() only. Tasks of a type nobody registered fail permanently.
  Worker& on(std::string type, Handler handler);
  Worker& on(std::string type, Handler handler, HandlerOptions options);
  // Registers a periodic submission (see Scheduler::every). Before start()/run() only.
  Worker& every(PeriodicTask periodic);
  Worker& every(std::string name, std::chrono::seconds period, NewTask task);
  // Registers a cron submission (see Scheduler::cron). Before start()/run() only.
  Worker& cron(CronTask cron);
  Worker& cron(std::string name, std::string schedule, NewTask task, std::string time_zone = "UTC");

  // Starts the threads and returns. A Worker runs once: start after stop throws UsageError.
  void start();
  // start(), then blocks until request_stop() or stop() is called, and shuts down.
  void run();
  // Stops claiming and wakes run(); returns at once. Safe from any thread,
  // handlers included (not from a signal handler: use sigwait, see examples).
  void request_stop() noexcept;
  // Graceful shutdown: stops claiming, gives buffered leases back, lets running
  // handlers finish for up to shutdown_timeout, then gives their leases back too
  // and waits for the handlers to return (a handler cannot be interrupted), and
  // flushes pending completions. Idempotent. From a handler, acts as request_stop().
  void stop();
  bool running() const noexcept;  // started and not yet stopped

  const std::string& id() const noexcept;  // the lease owner name
  const WorkerOptions& options() const noexcept;
  WorkerCounters counters() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace eoq
