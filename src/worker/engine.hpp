#pragma once
// The worker's inside: a small shared state (Engine) and the roles that work on
// it, one file each:
//
//   claimer.cpp      claims leases into the buffer, as many as the handlers will start soon
//   executor.cpp     the handler threads: take a lease, run the handler, hand on a Verdict
//   completer.cpp    settlement, the one path from Verdict to store call to counter;
//                    plain successes are settled in batches by the completer threads
//   heartbeat.cpp    keeps every held lease alive and hears cancel requests
//   watchdog.cpp     handler time limits: asks a handler to stop at its timeout, and
//                    fails its attempt when it is still running after the grace period
//   maintenance.cpp  store.maintain() now and then
//   worker.cpp       the Worker facade, start, and the ordered shutdown
// (every() runs an eoq::Scheduler, scheduler.cpp, beside them.)
//
// Every claimed lease lives in a TaskRun in `held` until exactly one finish()
// records its outcome; the heartbeat extends everything in `held`, so buffered
// leases and leases waiting for the completer stay alive too.
#include "common/validate.hpp"

#include <eoq/scheduler.hpp>
#include <eoq/worker.hpp>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <fmt/format.h>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <span>
#include <stop_token>
#include <thread>

namespace eoq::detail {

using Steady = std::chrono::steady_clock;

bool is_transient(const std::exception& e) noexcept;

// Waits after consecutive transient errors: doubling, capped, +-20% jitter so a
// fleet that lost its database does not reconnect in lockstep.
class ErrorBackoff {
 public:
  ErrorBackoff(Millis initial, Millis max) : initial_(initial), max_(max), next_(initial) {}
  Millis next();
  void reset() { next_ = initial_; }

 private:
  Millis initial_, max_, next_;
};

// How a lease ended, as counted in WorkerCounters.
enum class Outcome { succeeded, failed, retried, cancelled, expired, lease_lost, released, abandoned, snoozed };

// What ctx.snooze throws to unwind the handler. Not a std::exception, so that
// a handler's `catch (const std::exception&)` lets it through; the request is
// recorded in TaskRun::snooze before the throw, so it stands however the
// handler then leaves.
struct SnoozeRequest {};

// What running the handler came to. Settlement turns it into a store call.
struct Verdict {
  // settled: the lease ended before the handler could start (its deadline had
  // passed); nothing is left to settle. overdue: the watchdog failed the
  // attempt while the handler still ran; its writes roll back, and nothing
  // else is left to settle.
  enum class Kind { succeeded, failed, cancelled, lease_lost, settled, snoozed, overdue } kind = Kind::succeeded;
  Failure failure{};    // failed
  bool expected = false;  // failed by a PermanentError: the handler's own verdict, logged at info
  std::string reason{};   // cancelled: why the handler stopped
  bool database = false;  // failed by a DatabaseError: in a batch, perhaps another task's statement
  Millis delay{0};        // snoozed: run again this much later
};

class Engine;

// What settling a batch left to do: nothing (every run settled); the others
// again without `stale`, whose lease was found stale (settled lease_lost); or,
// `alone`, each run again in a transaction of its own (the commit failed on
// some run's own work, and which is not known).
struct BatchSettled {
  TaskRun* stale = nullptr;
  bool alone = false;
};

// A handler as Worker::on registered it.
struct Registered {
  Handler handler;
  int batch = 1;
  TransactionOptions tx{};
  std::optional<Millis> timeout{};
};

struct TaskRun;
// Handlers being timed, by when the watchdog must look at them next.
using WatchList = std::multimap<Steady::time_point, std::weak_ptr<TaskRun>>;

struct TaskRun : std::enable_shared_from_this<TaskRun> {
  TaskRun(Engine& e, Lease l, Steady::time_point claim_started, Millis lease_length)
      : engine(&e),
        lease(std::move(l)),
        claim_sent(claim_started),
        last_beat(claim_started.time_since_epoch().count()),
        expires((claim_started + lease_length).time_since_epoch().count()),
        checkpoint_stage(lease.task.checkpoint_stage),
        checkpoint_state(lease.task.checkpoint) {}

  Engine* engine;
  const Lease lease;  // never changes: heartbeats keep the token, so threads share it read-only
  // When the claim was sent: the store's clock read lease.claimed_at no earlier.
  const Steady::time_point claim_sent;
  std::list<std::shared_ptr<TaskRun>>::iterator held_at;  // its place in Engine::held (under mu)

  // Steady-clock ticks: when the last heartbeat was sent, and when the lease ends
  // at the latest if no later heartbeat got through (measured from the send, so
  // it errs early).
  std::atomic<Steady::rep> last_beat;
  std::atomic<Steady::rep> expires;

  std::atomic<bool> lost{false};            // the store fenced the lease off
  std::atomic<bool> cancel{false};          // cancel() was requested
  std::atomic<bool> heartbeats_off{false};  // released, or left to expire at shutdown
  std::atomic<bool> settled{false};         // finish() ran
  std::atomic<bool> in_handler{false};      // the handler is running now
  std::atomic<bool> timed_out{false};       // the handler ran past its timeout: ctx.should_stop()

  // Who settles an attempt whose handler has a time limit: the handler's
  // thread once the handler returned, or the watchdog once the grace period
  // passed first. Both compare-and-swap from kInHandler, so exactly one does.
  static constexpr int kInHandler = 0, kReturned = 1, kOverdue = 2;
  std::atomic<int> race{kReturned};
  // The run needs no handler call and no settlement any more: settled, or
  // taken over by the watchdog (whose settlement may still be under way).
  bool taken() const noexcept { return settled.load() || race.load() == kOverdue; }
  // Its entry in Watchdog's list while armed (guarded by the watchdog's mutex).
  std::optional<WatchList::iterator> watched;
  bool in_doubt = false;                    // a settlement's COMMIT outcome is unknown (settling thread only)

  // Wakes TaskContext::sleep_for when a flag above changes.
  std::mutex wake_mu;
  std::condition_variable wake_cv;
  void notify() {
    { std::lock_guard lk(wake_mu); }
    wake_cv.notify_all();
  }

  // Owned by the handler thread while the handler runs, then by whoever settles.
  std::string result = "null";
  std::optional<std::string> checkpoint_stage;
  std::optional<std::string> checkpoint_state;
  std::unique_ptr<LeaseTransaction> tx;
  // A batch's transaction, shared by its tasks (owned by the executor), or null.
  LeaseTransaction* batch_tx = nullptr;
  // While batch_tx is set: every run of the batch (owned by the executor).
  const std::vector<std::shared_ptr<TaskRun>>* batch_runs = nullptr;
  // Held while tx or batch_tx changes, and by the watchdog while it
  // interrupts them from its thread, so it never reaches one that is gone.
  std::mutex tx_mu;
  TransactionOptions tx_options{};
  std::optional<TaskTransaction> tx_view;
  int last_percent = -1;
  std::string last_stage;
  std::optional<Millis> snooze;  // ctx.snooze was called: the attempt ends snoozed

  bool locally_expired(Steady::time_point now) const noexcept {
    return now.time_since_epoch().count() >= expires.load();
  }
  std::string describe() const {
    return fmt::format("task {} ({}, attempt {})", lease.task.id, lease.task.type, lease.task.attempts);
  }
  void drop_transaction() {
    tx_view.reset();
    std::unique_ptr<LeaseTransaction> gone;
    {
      std::lock_guard lk(tx_mu);
      gone = std::move(tx);
    }
    gone.reset();  // rolls back whatever the handler wrote and did not commit
  }
  // The handler's transaction, opened on first use: the batch's, or its own.
  LeaseTransaction& transaction();
  void share(LeaseTransaction* batch, const std::vector<std::shared_ptr<TaskRun>>* runs) {
    std::lock_guard lk(tx_mu);
    batch_tx = batch;
    batch_runs = runs;
  }
  // The watchdog ends the attempt under a handler that still runs: a
  // statement it waits in is cancelled, and its transaction refuses more.
  // Returns the other runs of its batch that are still to settle: they wait
  // for this handler's thread, and would for as long as it is stuck.
  std::vector<std::shared_ptr<TaskRun>> interrupt() {
    std::vector<std::shared_ptr<TaskRun>> companions;
    std::lock_guard lk(tx_mu);
    if (LeaseTransaction* t = batch_tx ? batch_tx : tx.get()) t->interrupt();
    if (batch_runs)
      for (const auto& r : *batch_runs)
        if (r.get() != this && !r->taken()) companions.push_back(r);
    return companions;
  }
};

// Claims as many leases as the handlers will start before the next claim could
// answer, and no more, so fast tasks are claimed in large batches and slow ones
// stay in the queue for other workers.
class Claimer {
 public:
  explicit Claimer(Engine& e);
  void run(const std::stop_token& st);  // one claiming thread
  // Call with Engine::mu held.
  bool should_claim() const;
  bool should_wake() const { return waiting_ > 0 && should_claim(); }
  // A retry this worker scheduled comes due at `at` (store time).
  void note_retry(TimePoint at);
  // The last claim came back full: the queue is deeper than one claim, so
  // background work (retention) should yield to it.
  bool queue_deep() const noexcept { return queue_deep_.load(std::memory_order_relaxed); }

 private:
  int room() const;
  void adapt(Steady::time_point claim_started, int asked);
  Millis idle_wait(TimePoint last_claim);

  Engine& e_;
  // All guarded by Engine::mu.
  int waiting_ = 0;   // claiming threads waiting for room
  int ahead_ = 0;     // leases to hold beyond the handler threads
  int claiming_ = 0;  // leases asked for by claims in flight
  // A handler's mean run time and the claim's round trip, in seconds, both
  // smoothed; the handler counters as of the last claim.
  double run_time_ = 0, rtt_ = 0;
  std::uint64_t runs_mark_ = 0;
  std::int64_t us_mark_ = 0;
  // When retries this worker scheduled come due (store time, microseconds since
  // the epoch). A retry becoming due sends no notification, so the idle claimer
  // wakes for it instead of waiting out the poll interval.
  std::priority_queue<std::int64_t, std::vector<std::int64_t>, std::greater<>> retries_due_;
  std::atomic<bool> queue_deep_{false};
  // Where the next claim may start (ClaimRequest::after): past the last task
  // of the previous full claim. Every kFullClaimEvery-th claim, and the claim
  // after a short one, starts from the front, so a task that sorts before
  // (a higher priority submitted since, a lease given back or run out) waits
  // a few claims at most. Claiming thread only.
  static constexpr int kFullClaimEvery = 8;
  std::optional<ClaimPosition> after_;
  int since_full_ = 0;
};

class Executor {
 public:
  explicit Executor(Engine& e) : e_(e) {}
  void run(const std::stop_token& st);  // one handler thread

 private:
  Verdict execute(TaskRun& run);
  // HandlerOptions::batch: the runs (of one type) in shared transactions until
  // each is settled. Call without Engine::mu.
  void execute_batch(std::vector<std::shared_ptr<TaskRun>>& runs, const Registered& reg);
  void alone(const std::shared_ptr<TaskRun>& run);
  Engine& e_;
};

class Completer {
 public:
  explicit Completer(Engine& e) : e_(e) {}
  void run(const std::stop_token& st);  // one completer thread
  // The settlement of a handler's verdict. Returns false for a plain success,
  // which the caller queues for a batched completion (it holds Engine::mu
  // anyway to take its next lease); everything else is settled here.
  bool settle(TaskRun& run, const Verdict& verdict);
  // A lease can wait in the buffer past its task's deadline, and a task is never
  // started after its deadline. True when the task must not start (settled
  // expired, lease lost, or the store unreachable).
  bool expired_at_handoff(TaskRun& run);
  // Pending again at once, the interrupted attempt not counted.
  void give_back(TaskRun& run, std::string_view why);
  // The same for many leases in one store round trip (shutdown).
  void give_back(std::span<const std::shared_ptr<TaskRun>> runs, std::string_view why);

 private:
  void settle_failure(TaskRun& run, const Failure& failure, bool expected);
  void settle_cancelled(TaskRun& run, const std::string& reason);
  void settle_snoozed(TaskRun& run, Millis delay);
  void settle_transaction(TaskRun& run);
  bool flush(std::vector<std::shared_ptr<TaskRun>>& batch);
 public:
  // A batch's completions and COMMIT (HandlerOptions::batch): settles every
  // run, or rolls everything back and says what the caller must run again.
  BatchSettled settle_batch(LeaseTransaction& tx, std::span<TaskRun* const> runs);

 private:
  void complete_one(TaskRun& run);
  std::optional<Outcome> settled_by_us(TaskRun& run);
  Engine& e_;
};

class Heartbeater {
 public:
  explicit Heartbeater(Engine& e) : e_(e) {}
  void run(const std::stop_token& st);

 private:
  bool beat(TaskRun& run);
  void drop_if_buffered(TaskRun& run);
  Engine& e_;
};

// Handler time limits (HandlerOptions::timeout, Task::timeout). At the
// timeout the handler is asked to stop (ctx.timed_out(), sleep_for wakes);
// if it has not returned WorkerOptions::timeout_grace later, its attempt is
// failed with "timeout" while it runs, so the task is retried (or fails) now
// rather than whenever the handler returns. A handler cannot be interrupted:
// its thread, and its slot, stay busy until it returns, and its outcome is
// then discarded (its writes roll back; the failure moved the task's version
// on, so its completion could only meet LeaseLost anyway).
class Watchdog {
 public:
  explicit Watchdog(Engine& e) : e_(e) {}
  void run(const std::stop_token& st);  // the watchdog thread
  // Just before the handler is called: watch it for `limit`.
  void arm(TaskRun& run, Millis limit);
  // Just after it returned: true when its verdict stands, false when the
  // watchdog took the attempt over.
  bool disarm(TaskRun& run);

 private:
  void fail_overdue(const std::shared_ptr<TaskRun>& run);
  void settle(TaskRun& run);
  Engine& e_;
  std::mutex mu_;
  std::condition_variable_any cv_;
  WatchList due_;  // guarded by mu_
};

class Maintainer {
 public:
  explicit Maintainer(Engine& e) : e_(e) {}
  void maintain(const std::stop_token& st);

 private:
  Engine& e_;
};

class Engine {
 public:
  Engine(TaskStore& s, WorkerOptions o);
  ~Engine() { stop(); }

  TaskStore& store;
  const WorkerOptions opt;
  std::string id;
  Millis heartbeat_interval{};
  std::map<std::string, Registered, std::less<>> handlers;
  std::unique_ptr<Scheduler> periodic;  // every(): runs beside the claimer, on the worker's logger

  // Claim and completion statements in flight at once. One of each keeps both
  // of the server's statements running while the handlers work; measured on 2
  // cores, a second claimer made every claim skip the other's locked rows and
  // a second completer added contention, not speed (bench/throughput).
  static constexpr int kClaimers = 1;
  static constexpr int kCompleters = 1;

  template <class... Args>
  void log(LogLevel level, fmt::format_string<Args...> format, Args&&... args) const {
    if (level < opt.log_level) return;
    if (!opt.logger && level < LogLevel::warning) return;
    std::string message;
    try {
      message = fmt::format(format, std::forward<Args>(args)...);
    } catch (...) {
      return;
    }
    emit(level, message);
  }
  void emit(LogLevel level, std::string_view message) const noexcept;
  void store_error(std::string_view what, const std::exception& e);
  // store.wake(), whose failure only costs a poll interval: logged, not thrown.
  void wake_store() noexcept;

  struct Counters {
    std::atomic<std::uint64_t> claimed{0}, succeeded{0}, failed{0}, retried{0}, cancelled{0}, expired{0},
        lease_lost{0}, released{0}, abandoned{0}, snoozed{0}, in_flight{0}, store_errors{0}, handler_runs{0};
    std::atomic<std::int64_t> handler_us_total{0}, handler_us_max{0};
    std::array<std::atomic<std::uint64_t>, WorkerCounters::duration_bounds.size() + 1> buckets{};
  } counters;
  WorkerCounters snapshot() const noexcept;
  void record_duration(Steady::duration d) noexcept;

  // Lifecycle.
  enum class State { idle, running, stopped };
  mutable std::mutex life_mu;  // serialises start() and stop()
  std::atomic<State> state{State::idle};
  std::atomic<bool> stop_requested{false};  // request_stop(): run() returns, claiming ends
  std::atomic<bool> stopping{false};        // TaskContext::stopping()
  std::atomic<bool> give_up{false};         // shutdown deadline passed: store errors are no longer retried
  void start();
  void request_stop() noexcept;
  void run();
  void stop();

  // Guarded by mu, down to the threads.
  std::mutex mu;
  std::condition_variable_any cv_work;      // handlers: buffer not empty
  std::condition_variable_any cv_capacity;  // claimer: room for more leases
  std::condition_variable_any cv_complete;  // completers: completions queued
  std::condition_variable_any cv_state;     // stop()/run(): handlers idle, claimer or completers done, stop requested
  std::condition_variable_any cv_sleep;     // back-off and timer waits, cut short by give_up or stop tokens
  std::deque<std::shared_ptr<TaskRun>> buffer;
  std::deque<std::shared_ptr<TaskRun>> completions;
  std::list<std::shared_ptr<TaskRun>> held;
  int busy_handlers = 0;
  int batched = 0;    // leases that running batches hold beyond one each
  int max_batch = 1;  // the largest HandlerOptions::batch registered (set by start())
  int claimers_running = 0;
  int completers_running = 0;

  // Records the one outcome of a lease and forgets it. Later calls are ignored,
  // so racing paths (a heartbeat that sees the completion as a lost lease)
  // cannot count a lease twice. The caller holds a shared_ptr to each run:
  // `held` lets go of its own here. Many at once take the lock once.
  void finish(TaskRun& run, Outcome outcome);
  void finish(std::span<TaskRun* const> runs, Outcome outcome);
  // Sleeps for `d`, or less when the stop token fires or shutdown gives up.
  void nap(Millis d, const std::stop_token& st);

  Claimer claimer{*this};
  Executor executor{*this};
  Completer completer{*this};
  Heartbeater heartbeater{*this};
  Maintainer maintainer{*this};
  Watchdog watchdog{*this};

 private:
  void validate_options() const;
  SchedulerOptions scheduler_options();
  mutable std::mutex log_mu;
  std::jthread heartbeat_thread, maintenance_thread, watchdog_thread;
  std::vector<std::jthread> claimer_threads, handler_threads, completer_threads;
};

// The engine whose handler runs on this thread, if any: stop() from a handler
// must not join its own thread.
extern thread_local const Engine* current_handler_engine;

}  // namespace eoq::detail
