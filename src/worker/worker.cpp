// The worker: one claimer, N handler threads, a heartbeat thread, a completer,
// and (when asked for) a periodic scheduler and a maintenance thread.
//
// Every claimed lease lives in a TaskRun held in `held` until exactly one
// finish() call records its outcome; the heartbeat thread extends everything in
// `held`, so buffered leases and leases waiting for the completer stay alive too.
// Handlers that opened a transaction settle through it on their own thread;
// plain successes go to the completer, which settles many per round trip.
#include <eoq/worker.hpp>

#include <eoq/scheduler.hpp>

#include "common/validate.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <fmt/format.h>
#include <map>
#include <mutex>
#include <queue>
#include <random>
#include <stop_token>
#include <thread>
#include <unistd.h>

namespace eoq {

std::string_view to_string(LogLevel level) noexcept {
  switch (level) {
    case LogLevel::debug: return "debug";
    case LogLevel::info: return "info";
    case LogLevel::warning: return "warning";
    case LogLevel::error: return "error";
  }
  return "unknown";
}

namespace detail {
namespace {

using Steady = std::chrono::steady_clock;

std::mt19937_64& rng() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return gen;
}

double unit_random() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng()); }

std::string default_worker_id() {
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0') std::snprintf(host, sizeof host, "unknown-host");
  return fmt::format("{}:{}:{:08x}", host, static_cast<long>(getpid()),
                     static_cast<std::uint32_t>(rng()() & 0xffffffffu));
}

bool is_transient(const std::exception& e) noexcept {
  const auto* db = dynamic_cast<const DatabaseError*>(&e);
  return db != nullptr && db->transient();
}

// Waits after consecutive transient errors: doubling, capped, +-20% jitter so a
// fleet that lost its database does not reconnect in lockstep.
class Backoff {
 public:
  Backoff(Millis initial, Millis max) : initial_(initial), max_(max), next_(initial) {}
  Millis next() {
    Millis current = next_;
    next_ = std::min(max_, next_ * 2);
    auto jittered = static_cast<Millis::rep>(static_cast<double>(current.count()) * (0.8 + 0.4 * unit_random()));
    return Millis(std::max<Millis::rep>(1, jittered));
  }
  void reset() { next_ = initial_; }

 private:
  Millis initial_, max_, next_;
};

enum class Outcome { succeeded, failed, retried, cancelled, expired, lease_lost, released, abandoned };

}  // namespace

class Engine;

struct TaskRun {
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
  std::optional<TaskTransaction> tx_view;
  int last_percent = -1;
  std::string last_stage;

  bool locally_expired(Steady::time_point now) const noexcept {
    return now.time_since_epoch().count() >= expires.load();
  }
  std::string describe() const {
    return fmt::format("task {} ({}, attempt {})", lease.task.id, lease.task.type, lease.task.attempts);
  }
};

namespace {
thread_local const Engine* current_handler_engine = nullptr;
}

class Engine {
 public:
  Engine(TaskStore& s, WorkerOptions o) : store(s), opt(std::move(o)) {
    validate_options();
    id = opt.worker_id.empty() ? default_worker_id() : opt.worker_id;
    heartbeat_interval = opt.heartbeat_interval.count() > 0 ? opt.heartbeat_interval : opt.lease / 3;
    heartbeat_interval = std::max(heartbeat_interval, Millis(1));
    periodic = std::make_unique<Scheduler>(store, scheduler_options());
  }

  ~Engine() { stop(); }

  TaskStore& store;
  const WorkerOptions opt;
  std::string id;
  Millis heartbeat_interval{};
  std::map<std::string, Handler, std::less<>> handlers;
  std::unique_ptr<Scheduler> periodic;  // every(): runs beside the claimer, on the worker's logger

  SchedulerOptions scheduler_options() {
    SchedulerOptions so;
    so.error_backoff_initial = opt.error_backoff_initial;
    so.error_backoff_max = opt.error_backoff_max;
    so.log_level = opt.log_level;
    // Through emit(), so the host's logger still hears one call at a time.
    so.logger = [this](LogLevel level, std::string_view message) {
      if (opt.logger || level >= LogLevel::warning) emit(level, message);
    };
    return so;
  }

  // ---------------------------------------------------------------- logging

  mutable std::mutex log_mu;

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

  void emit(LogLevel level, std::string_view message) const noexcept {
    std::lock_guard lk(log_mu);
    try {
      if (opt.logger) opt.logger(level, message);
      else std::fprintf(stderr, "eoq worker %s: %s: %.*s\n", id.c_str(), std::string(to_string(level)).c_str(),
                        static_cast<int>(message.size()), message.data());
    } catch (...) {
      // A throwing logger must not take a worker thread down with it.
    }
  }

  // --------------------------------------------------------------- counters

  struct Counters {
    std::atomic<std::uint64_t> claimed{0}, succeeded{0}, failed{0}, retried{0}, cancelled{0}, lease_lost{0},
        released{0}, abandoned{0}, in_flight{0}, store_errors{0}, handler_runs{0};
    std::atomic<std::uint64_t> expired{0};
    std::atomic<std::int64_t> handler_us_total{0}, handler_us_max{0};
    std::array<std::atomic<std::uint64_t>, WorkerCounters::duration_bounds.size() + 1> buckets{};
  } counters;

  WorkerCounters snapshot() const noexcept {
    WorkerCounters c;
    c.claimed = counters.claimed.load();
    c.succeeded = counters.succeeded.load();
    c.failed = counters.failed.load();
    c.retried = counters.retried.load();
    c.cancelled = counters.cancelled.load();
    c.expired = counters.expired.load();
    c.lease_lost = counters.lease_lost.load();
    c.released = counters.released.load();
    c.abandoned = counters.abandoned.load();
    c.in_flight = counters.in_flight.load();
    c.store_errors = counters.store_errors.load();
    c.handler_runs = counters.handler_runs.load();
    c.handler_time_total = std::chrono::microseconds(counters.handler_us_total.load());
    c.handler_time_max = std::chrono::microseconds(counters.handler_us_max.load());
    for (std::size_t i = 0; i < c.handler_duration_buckets.size(); ++i)
      c.handler_duration_buckets[i] = counters.buckets[i].load();
    return c;
  }

  void record_duration(Steady::duration d) noexcept {
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(d).count();
    counters.handler_runs.fetch_add(1);
    counters.handler_us_total.fetch_add(us);
    auto prev = counters.handler_us_max.load();
    while (prev < us && !counters.handler_us_max.compare_exchange_weak(prev, us)) {
    }
    std::size_t i = 0;
    const auto& bounds = WorkerCounters::duration_bounds;
    while (i < bounds.size() && d > bounds[i]) ++i;
    counters.buckets[i].fetch_add(1);
  }

  // --------------------------------------------------------------- lifecycle

  enum class State { idle, running, stopped };
  mutable std::mutex life_mu;  // serialises start() and stop()
  std::atomic<State> state{State::idle};

  std::atomic<bool> stop_requested{false};  // request_stop(): run() returns, claiming ends
  std::atomic<bool> stopping{false};        // TaskContext::stopping()
  std::atomic<bool> give_up{false};         // shutdown deadline passed: store errors are no longer retried

  // Guarded by mu, down to the threads.
  std::mutex mu;
  std::condition_variable_any cv_work;      // handlers: buffer not empty
  std::condition_variable_any cv_capacity;  // claimer: room for more leases
  std::condition_variable_any cv_complete;  // completer: completions queued
  std::condition_variable_any cv_state;     // stop()/run(): handlers idle, claimer or completer done, stop requested
  std::condition_variable_any cv_sleep;     // back-off and timer waits, cut short by give_up or stop tokens
  std::deque<std::shared_ptr<TaskRun>> buffer;
  std::deque<std::shared_ptr<TaskRun>> completions;
  std::map<std::pair<TaskId, std::int64_t>, std::shared_ptr<TaskRun>> held;
  int busy_handlers = 0;
  // Each notify of a condition_variable_any takes its internal lock, and each
  // needless wake-up costs a context switch per task: notify the claimer only
  // when it waits and may claim, the completer only when its queue was empty.
  bool claimer_waiting = false;
  bool claimer_done = false;
  bool completer_done = false;
  // When retries this worker scheduled come due (store time, microseconds since
  // the epoch). A retry becoming due sends no notification, so the idle claimer
  // wakes for it instead of waiting out the poll interval.
  std::priority_queue<std::int64_t, std::vector<std::int64_t>, std::greater<>> retries_due;

  std::jthread claimer, heartbeater, completer, maintainer;
  std::vector<std::jthread> handler_threads;

  void start() {
    std::lock_guard life(life_mu);
    if (state.load() != State::idle) throw UsageError("a Worker runs once: start() after stop() or a second start()");
    if (handlers.empty() && periodic->empty())
      log(LogLevel::warning, "no handlers registered: every task claimed from [{}] will fail",
          fmt::join(opt.queues, ", "));
    log(LogLevel::info, "worker {} starting on queues [{}] with {} handler threads, lease {} ms", id,
        fmt::join(opt.queues, ", "), opt.concurrency, opt.lease.count());
    heartbeater = std::jthread([this](std::stop_token st) { heartbeat_loop(st); });
    completer = std::jthread([this](std::stop_token st) { complete_loop(st); });
    for (int i = 0; i < opt.concurrency; ++i)
      handler_threads.emplace_back([this](std::stop_token st) { handler_loop(st); });
    claimer = std::jthread([this](std::stop_token st) { claim_loop(st); });
    if (!periodic->empty()) periodic->start();
    if (opt.maintenance_interval.count() > 0)
      maintainer = std::jthread([this](std::stop_token st) { maintain_loop(st); });
    state = State::running;
  }

  void request_stop() noexcept {
    stopping = true;
    std::vector<std::shared_ptr<TaskRun>> holding;
    {
      std::lock_guard lk(mu);
      stop_requested = true;
      for (auto& [key, run] : held) holding.push_back(run);
    }
    for (auto& run : holding) run->notify();  // wakes sleep_for: stopping() is now true
    cv_state.notify_all();
    cv_capacity.notify_all();
    // The claimer may be blocked in wait_for_tasks; stop() makes sure it leaves.
    try {
      store.wake();
    } catch (...) {
    }
  }

  void run() {
    start();
    {
      std::unique_lock lk(mu);
      cv_state.wait(lk, [&] { return stop_requested.load(); });
    }
    stop();
  }

  void stop() {
    if (current_handler_engine == this) {
      // Joining our own thread would deadlock; whoever runs run() or stop() finishes the job.
      request_stop();
      return;
    }
    std::lock_guard life(life_mu);
    if (state.load() != State::running) return;
    const auto deadline = Steady::now() + opt.shutdown_timeout;
    request_stop();
    log(LogLevel::info, "worker {} stopping", id);

    // 1. No more claims. wake() may reach the store before the claimer enters
    // wait_for_tasks, so repeat it until the claimer has left.
    claimer.request_stop();
    periodic->request_stop();
    maintainer.request_stop();
    {
      std::unique_lock lk(mu);
      while (!claimer_done) {
        lk.unlock();
        try {
          store.wake();
        } catch (...) {
        }
        lk.lock();
        cv_state.wait_for(lk, Millis(20), [&] { return claimer_done; });
      }
    }
    claimer.join();
    periodic->stop();
    if (maintainer.joinable()) maintainer.join();

    // 2. Leases claimed but not started go back at once: nobody will run them here.
    std::deque<std::shared_ptr<TaskRun>> unstarted;
    {
      std::lock_guard lk(mu);
      unstarted.swap(buffer);
    }
    for (auto& run : unstarted) give_back(*run, "worker shutting down before the task started");

    // 3. Running handlers get until the deadline.
    {
      std::unique_lock lk(mu);
      if (!cv_state.wait_until(lk, deadline, [&] { return busy_handlers == 0; })) {
        std::vector<std::shared_ptr<TaskRun>> late;
        for (auto& [key, run] : held)
          if (run->in_handler) late.push_back(run);
        lk.unlock();
        give_up = true;
        cv_sleep.notify_all();
        log(LogLevel::warning,
            "{} handler(s) still running after shutdown_timeout ({} ms); giving their leases back and "
            "waiting for them to return",
            late.size(), opt.shutdown_timeout.count());
        // The host is about to go (its own kill timer is running): another worker
        // should get these tasks now rather than after their leases lapse.
        for (auto& run : late) give_back(*run, "handler still running at the shutdown deadline");
        lk.lock();
        cv_state.wait(lk, [&] { return busy_handlers == 0; });
      }
    }
    for (auto& t : handler_threads) t.request_stop();
    cv_work.notify_all();
    for (auto& t : handler_threads) t.join();

    // 4. Flush completions; give the completer at least a moment even when the
    // handlers used up the deadline.
    completer.request_stop();
    {
      std::unique_lock lk(mu);
      auto flush_deadline = std::max(deadline, Steady::now() + Millis(1000));
      if (!cv_state.wait_until(lk, flush_deadline, [&] { return completer_done; })) {
        give_up = true;
        lk.unlock();
        cv_sleep.notify_all();
        lk.lock();
      }
    }
    completer.join();

    // 5. Nothing is left to keep alive.
    heartbeater.request_stop();
    heartbeater.join();

    std::vector<std::shared_ptr<TaskRun>> leftovers;
    {
      std::lock_guard lk(mu);
      for (auto& [key, run] : held) leftovers.push_back(run);
    }
    for (auto& run : leftovers) {
      log(LogLevel::warning, "{}: not settled at shutdown; its lease will expire", run->describe());
      finish(*run, Outcome::abandoned);
    }
    state = State::stopped;
    auto c = snapshot();
    log(LogLevel::info, "worker {} stopped: {} claimed, {} succeeded, {} failed, {} retried, {} lease lost", id,
        c.claimed, c.succeeded, c.failed, c.retried, c.lease_lost);
  }

  // ------------------------------------------------------------ bookkeeping

  // Records the one outcome of a lease and forgets it. Later calls are ignored,
  // so racing paths (a heartbeat that sees the completion as a lost lease) cannot
  // count a lease twice.
  void finish(TaskRun& run, Outcome outcome) {
    if (run.settled.exchange(true)) return;
    {
      std::lock_guard lk(mu);
      held.erase({run.lease.task.id, run.lease.token});
    }
    counters.in_flight.fetch_sub(1);
    switch (outcome) {
      case Outcome::succeeded: counters.succeeded.fetch_add(1); break;
      case Outcome::failed: counters.failed.fetch_add(1); break;
      case Outcome::retried: counters.retried.fetch_add(1); break;
      case Outcome::cancelled: counters.cancelled.fetch_add(1); break;
      case Outcome::expired: counters.expired.fetch_add(1); break;
      case Outcome::lease_lost: counters.lease_lost.fetch_add(1); break;
      case Outcome::released: counters.released.fetch_add(1); break;
      case Outcome::abandoned: counters.abandoned.fetch_add(1); break;
    }
    run.notify();
  }

  void store_error(std::string_view what, const std::exception& e) {
    counters.store_errors.fetch_add(1);
    log(is_transient(e) ? LogLevel::warning : LogLevel::error, "{}: {}", what, e.what());
  }

  // Sleeps for `d`, or less when the stop token fires or shutdown gives up.
  void nap(Millis d, const std::stop_token& st) {
    std::unique_lock lk(mu);
    cv_sleep.wait_for(lk, st, d, [&] { return give_up.load(); });
  }

  // The task becomes pending again at once and the interrupted attempt does not
  // count. If the handler is still running, its lease is gone from now on and
  // whatever it does later is discarded.
  void give_back(TaskRun& run, std::string_view why) {
    run.heartbeats_off = true;
    // Before the call, so a handler returning meanwhile discards its outcome
    // instead of racing the release with a completion.
    run.lost = true;
    try {
      store.release(run.lease);
      log(LogLevel::info, "{}: lease given back ({})", run.describe(), why);
      finish(run, Outcome::released);
    } catch (const LeaseLost&) {
      finish(run, Outcome::lease_lost);
    } catch (const std::exception& e) {
      store_error(fmt::format("{}: giving the lease back", run.describe()), e);
      finish(run, Outcome::abandoned);  // the lease runs out on its own
    }
    run.notify();
  }

  // After a COMMIT in doubt: did our settlement land? It did if the row moved
  // exactly one version past our token and left `running` (a new owner would
  // have moved it at least one version by its claim, and another by settling).
  std::optional<Outcome> settled_by_us(TaskRun& run) {
    try {
      auto task = store.get(run.lease.task.id);
      if (!task || task->version != run.lease.token + 1 || task->status == TaskStatus::running) return std::nullopt;
      switch (task->status) {
        case TaskStatus::succeeded: return Outcome::succeeded;
        case TaskStatus::pending: return Outcome::retried;
        case TaskStatus::cancelled: return Outcome::cancelled;
        default: return Outcome::failed;
      }
    } catch (const std::exception& e) {
      store_error(fmt::format("{}: checking an in-doubt settlement", run.describe()), e);
      return std::nullopt;
    }
  }

  // -------------------------------------------------------------- claimer

  int room() const {
    int capacity = opt.concurrency + opt.prefetch;
    return capacity - static_cast<int>(buffer.size()) - busy_handlers;
  }
  // Claim when a handler would otherwise idle, or when half the capacity is free:
  // a busy worker then takes leases in batches, not one round trip per finished task.
  bool should_claim() const {
    if (completions.size() >= static_cast<std::size_t>(opt.complete_batch)) return false;  // back-pressure
    int r = room();
    if (r <= 0) return false;
    if (busy_handlers + static_cast<int>(buffer.size()) < opt.concurrency) return true;
    return r >= std::max(1, (opt.concurrency + opt.prefetch) / 2);
  }

  void claim_loop(std::stop_token st) {
    Backoff backoff(opt.error_backoff_initial, opt.error_backoff_max);
    ClaimRequest request{opt.queues, id, 1, opt.lease};
    while (!st.stop_requested() && !stop_requested) {
      {
        std::unique_lock lk(mu);
        claimer_waiting = true;
        cv_capacity.wait(lk, st, [&] { return stop_requested || should_claim(); });
        claimer_waiting = false;
        if (st.stop_requested() || stop_requested) break;
        request.limit = std::min(opt.claim_batch, room());
      }
      std::vector<Lease> leases;
      auto started = Steady::now();
      auto claim_started_at = std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now());
      try {
        leases = store.claim(request);
        backoff.reset();
      } catch (const std::exception& e) {
        store_error("claim", e);
        nap(backoff.next(), st);
        continue;
      }
      if (!leases.empty()) {
        std::vector<std::shared_ptr<TaskRun>> runs;
        runs.reserve(leases.size());
        for (auto& l : leases) runs.push_back(std::make_shared<TaskRun>(*this, std::move(l), started, opt.lease));
        {
          std::lock_guard lk(mu);
          for (auto& run : runs) {
            held.emplace(std::pair{run->lease.task.id, run->lease.token}, run);
            buffer.push_back(run);
          }
        }
        counters.claimed.fetch_add(runs.size());
        counters.in_flight.fetch_add(runs.size());
        if (runs.size() == 1) cv_work.notify_one();
        else cv_work.notify_all();
        log(LogLevel::debug, "claimed {} task(s)", runs.size());
      }
      if (static_cast<int>(leases.size()) < request.limit && !st.stop_requested() && !stop_requested) {
        // The queues look drained: sleep until a notification, wake() or the poll interval.
        try {
          store.wait_for_tasks(opt.queues, idle_wait(claim_started_at));
        } catch (const std::exception& e) {
          store_error("waiting for tasks", e);
          nap(backoff.next(), st);
        }
      }
    }
    {
      std::lock_guard lk(mu);
      claimer_done = true;
    }
    cv_state.notify_all();
  }

  // --------------------------------------------------------------- handlers

  void handler_loop(std::stop_token st) {
    current_handler_engine = this;
    for (;;) {
      std::shared_ptr<TaskRun> run;
      {
        std::unique_lock lk(mu);
        // Once stopping, nothing new starts: stop() gives the buffered leases back.
        if (!cv_work.wait(lk, st, [&] { return !buffer.empty() && !stopping; })) return;
        run = std::move(buffer.front());
        buffer.pop_front();
        ++busy_handlers;
      }
      execute(run);
      bool wake_claimer = false, wake_stop = false;
      {
        std::lock_guard lk(mu);
        --busy_handlers;
        wake_claimer = claimer_should_wake();
        wake_stop = stop_requested;  // only stop() waits for busy_handlers, after setting it
      }
      if (wake_claimer) cv_capacity.notify_one();
      if (wake_stop) cv_state.notify_all();
    }
  }

  // The claimer waits on cv_capacity; call with mu held.
  bool claimer_should_wake() const { return claimer_waiting && should_claim(); }

  void execute(const std::shared_ptr<TaskRun>& shared) {
    TaskRun& run = *shared;
    if (run.lost) {
      log(LogLevel::warning, "{}: lease lost before the handler started; skipped", run.describe());
      finish(run, Outcome::lease_lost);
      return;
    }
    if (expired_at_handoff(run)) return;
    auto handler = handlers.find(run.lease.task.type);
    if (handler == handlers.end()) {
      settle_failure(run, Failure{fmt::format("no handler registered for task type '{}' on worker {}",
                                              run.lease.task.type, id),
                                  true});
      return;
    }

    std::optional<Failure> failure;
    std::optional<std::string> stopped;  // the handler threw Cancelled
    bool expected = false;                // a PermanentError: the handler's own verdict, not a fault
    auto started = Steady::now();
    run.in_handler = true;
    try {
      TaskContext ctx(run);
      handler->second(ctx);
    } catch (const Cancelled& e) {
      stopped = e.what();
    } catch (const PermanentError& e) {
      failure = Failure{e.what(), true};
      expected = true;
    } catch (const LeaseLost& e) {
      run.lost = true;
      log(LogLevel::warning, "{}: {}", run.describe(), e.what());
    } catch (const std::exception& e) {
      failure = Failure{e.what(), false};
    } catch (...) {
      failure = Failure{"handler threw a non-standard exception", false};
    }
    run.in_handler = false;
    record_duration(Steady::now() - started);

    if (run.lost) {
      run.tx_view.reset();
      run.tx.reset();  // rolls back whatever the handler wrote
      if (!run.settled)
        log(LogLevel::warning, "{}: lease lost while the handler ran; its outcome is discarded", run.describe());
      finish(run, Outcome::lease_lost);
      return;
    }
    if (failure) {
      // A failed handler's writes must not commit: roll back, then record the
      // failure outside the transaction.
      run.tx_view.reset();
      run.tx.reset();
      settle_failure(run, *failure, expected);
      return;
    }
    if (stopped) {
      run.tx_view.reset();
      run.tx.reset();  // a stopped handler's writes do not commit
      settle_cancelled(run, *stopped);
      return;
    }
    if (run.tx) {
      settle_transaction(run);
      return;
    }
    bool was_empty = false;
    {
      std::lock_guard lk(mu);
      was_empty = completions.empty();
      completions.push_back(shared);
    }
    // The completer waits only for an empty queue; whoever made it non-empty woke it.
    if (was_empty) cv_complete.notify_one();
  }

  // A lease can wait in the buffer past its task's deadline, and a task is never
  // started after its deadline. The store's clock decides: the claim's time plus
  // the steady time since the claim was sent (an overestimate, so a late task is
  // never let through); only a task that looks overdue costs a store call.
  // True when the task must not start (expired, lease lost, or store unreachable:
  // then the lease runs out and the next claim expires it).
  bool expired_at_handoff(TaskRun& run) {
    const auto& deadline = run.lease.task.deadline;
    if (!deadline) return false;
    auto waited = std::chrono::duration_cast<std::chrono::microseconds>(Steady::now() - run.claim_sent);
    if (run.lease.claimed_at + waited < *deadline) return false;
    try {
      if (!store.expire_if_overdue(run.lease)) return false;
      log(LogLevel::info, "{}: deadline passed while it waited for a handler; expired, not started", run.describe());
      finish(run, Outcome::expired);
    } catch (const LeaseLost& e) {
      log(LogLevel::warning, "{}: {}", run.describe(), e.what());
      finish(run, Outcome::lease_lost);
    } catch (const std::exception& e) {
      store_error(fmt::format("{}: expiring at its deadline", run.describe()), e);
      finish(run, Outcome::abandoned);
    }
    return true;
  }

  // The handler stopped on purpose (Cancelled): the task ends cancelled, quietly.
  // The store retries transient errors itself; if it still cannot be reached the
  // lease runs out and the task runs again (or ends cancelled, if a cancel was
  // requested), so nothing is lost.
  void settle_cancelled(TaskRun& run, const std::string& reason) {
    try {
      store.cancel_running(run.lease, reason);
      log(LogLevel::info, "{} cancelled by its handler: {}", run.describe(), reason);
      finish(run, Outcome::cancelled);
    } catch (const LeaseLost& e) {
      log(LogLevel::warning, "{}: cancellation not recorded: {}", run.describe(), e.what());
      finish(run, Outcome::lease_lost);
    } catch (const std::exception& e) {
      store_error(fmt::format("{}: recording the cancellation", run.describe()), e);
      finish(run, Outcome::abandoned);
    }
  }

  // `expected`: a PermanentError the handler threw on purpose, logged at info;
  // other permanent failures (no handler, attempts used up) are warnings.
  void settle_failure(TaskRun& run, const Failure& failure, bool expected = false) {
    Backoff backoff(opt.error_backoff_initial, opt.error_backoff_max);
    std::stop_token none;
    for (;;) {
      try {
        auto out = store.fail(run.lease, failure);
        if (out.status == TaskStatus::pending) {
          if (out.retry_at) note_retry(*out.retry_at);
          log(LogLevel::info, "{} failed, will retry: {}", run.describe(), failure.error);
          finish(run, Outcome::retried);
        } else if (out.status == TaskStatus::cancelled) {
          log(LogLevel::info, "{} cancelled", run.describe());
          finish(run, Outcome::cancelled);
        } else {
          log(expected ? LogLevel::info : LogLevel::warning, "{} failed{}: {}", run.describe(),
              failure.permanent ? " permanently" : "", failure.error);
          finish(run, Outcome::failed);
        }
        return;
      } catch (const LeaseLost& e) {
        if (run.in_doubt) {
          if (auto o = settled_by_us(run)) {
            finish(run, *o);
            return;
          }
        }
        log(LogLevel::warning, "{}: failure not recorded: {}", run.describe(), e.what());
        finish(run, Outcome::lease_lost);
        return;
      } catch (const std::exception& e) {
        store_error(fmt::format("{}: recording the failure", run.describe()), e);
        if (dynamic_cast<const CommitInDoubt*>(&e)) run.in_doubt = true;
        if (!is_transient(e) || give_up || run.locally_expired(Steady::now())) {
          finish(run, Outcome::abandoned);
          return;
        }
        nap(backoff.next(), none);
      }
    }
  }

  void note_retry(TimePoint at) {
    bool earliest = false;
    {
      std::lock_guard lk(mu);
      if (retries_due.size() < 100000) {
        retries_due.push(at.time_since_epoch().count());
        earliest = retries_due.top() == at.time_since_epoch().count();
      }
    }
    // The claimer may already be waiting out a longer timeout (the store's own
    // notification about this retry can beat us to it): have it recompute.
    if (earliest) {
      try {
        store.wake();
      } catch (...) {
      }
    }
  }

  // How long the idle claimer may wait: the poll interval, or less when one of
  // our retries comes due sooner. Retries due before the last claim started had
  // their chance in it.
  Millis idle_wait(TimePoint last_claim) {
    std::lock_guard lk(mu);
    while (!retries_due.empty() && retries_due.top() <= last_claim.time_since_epoch().count()) retries_due.pop();
    if (retries_due.empty()) return opt.poll_interval;
    auto now = std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now());
    auto wait = std::chrono::ceil<Millis>(std::chrono::microseconds(retries_due.top()) - now.time_since_epoch());
    return std::clamp(wait + Millis(1), Millis(1), opt.poll_interval);
  }

  void settle_transaction(TaskRun& run) {
    try {
      run.tx->complete(run.result);
      run.tx_view.reset();
      run.tx.reset();
      finish(run, Outcome::succeeded);
      return;
    } catch (const LeaseLost& e) {
      run.tx_view.reset();
      run.tx.reset();
      log(LogLevel::warning, "{}: completion rejected, its writes rolled back: {}", run.describe(), e.what());
      finish(run, Outcome::lease_lost);
      return;
    } catch (const CommitInDoubt& e) {
      run.tx_view.reset();
      run.tx.reset();
      store_error(fmt::format("{}: completing", run.describe()), e);
      if (auto o = settled_by_us(run)) {
        finish(run, *o);
        return;
      }
    } catch (const std::exception& e) {
      run.tx_view.reset();
      run.tx.reset();
      store_error(fmt::format("{}: completing", run.describe()), e);
    }
    // The handler's writes did not commit and cannot be replayed from here: hand
    // the task back so it runs again from its last checkpoint.
    give_back(run, "its completion could not be committed");
  }

  // -------------------------------------------------------------- completer

  void complete_loop(std::stop_token st) {
    Backoff backoff(opt.error_backoff_initial, opt.error_backoff_max);
    for (;;) {
      std::vector<std::shared_ptr<TaskRun>> batch;
      bool wake_claimer = false;
      {
        std::unique_lock lk(mu);
        cv_complete.wait(lk, st, [&] { return !completions.empty(); });
        if (completions.empty()) break;  // stop requested and nothing left
        auto n = std::min(completions.size(), static_cast<std::size_t>(opt.complete_batch));
        auto end = completions.begin() + static_cast<std::ptrdiff_t>(n);
        batch.assign(std::make_move_iterator(completions.begin()), std::make_move_iterator(end));
        completions.erase(completions.begin(), end);
        wake_claimer = claimer_should_wake();
      }
      if (wake_claimer) cv_capacity.notify_one();
      if (flush(batch)) {
        backoff.reset();
        continue;
      }
      // A transient error: keep what can still be settled, in front, and retry after a pause.
      auto now = Steady::now();
      std::vector<std::shared_ptr<TaskRun>> retry;
      for (auto& run : batch) {
        if (run->lost) finish(*run, Outcome::lease_lost);
        else if (give_up || run->locally_expired(now)) {
          log(LogLevel::warning, "{}: completion could not be recorded before the lease ran out", run->describe());
          finish(*run, Outcome::abandoned);
        } else retry.push_back(run);
      }
      if (!retry.empty()) {
        std::lock_guard lk(mu);
        completions.insert(completions.begin(), retry.begin(), retry.end());
      }
      nap(backoff.next(), {});
    }
    {
      std::lock_guard lk(mu);
      completer_done = true;
    }
    cv_state.notify_all();
  }

  // Settles a batch in one round trip. False: a transient error, nothing settled, retry.
  bool flush(std::vector<std::shared_ptr<TaskRun>>& batch) {
    std::vector<Completion> items;
    items.reserve(batch.size());
    for (auto& run : batch) items.push_back(Completion{&run->lease, run->result});
    std::vector<bool> applied;
    try {
      applied = store.complete_batch(items);
    } catch (const std::exception& e) {
      store_error(fmt::format("completing {} task(s)", batch.size()), e);
      if (dynamic_cast<const CommitInDoubt*>(&e))
        for (auto& run : batch) run->in_doubt = true;
      if (is_transient(e)) return false;
      // Not worth retrying as a batch (a bad row?): settle one by one so one
      // task cannot hold the others back.
      for (auto& run : batch) complete_one(*run);
      return true;
    }
    for (std::size_t i = 0; i < batch.size(); ++i) {
      auto& run = *batch[i];
      if (i < applied.size() && applied[i]) {
        finish(run, Outcome::succeeded);
      } else if (auto o = run.in_doubt ? settled_by_us(run) : std::nullopt) {
        finish(run, *o);
      } else {
        log(LogLevel::warning, "{}: completion rejected, the lease was lost", run.describe());
        finish(run, Outcome::lease_lost);
      }
    }
    return true;
  }

  void complete_one(TaskRun& run) {
    try {
      store.complete(run.lease, run.result);
      finish(run, Outcome::succeeded);
    } catch (const LeaseLost& e) {
      log(LogLevel::warning, "{}: completion rejected: {}", run.describe(), e.what());
      finish(run, Outcome::lease_lost);
    } catch (const std::exception& e) {
      store_error(fmt::format("{}: completing", run.describe()), e);
      finish(run, Outcome::abandoned);
    }
  }

  // -------------------------------------------------------------- heartbeat

  void heartbeat_loop(std::stop_token st) {
    // Checking four times per interval keeps each lease's heartbeat within
    // 1.25 intervals (lease/2.4 by default) of the previous one.
    const Millis tick = std::max(Millis(1), heartbeat_interval / 4);
    const auto interval_ticks = std::chrono::duration_cast<Steady::duration>(heartbeat_interval).count();
    while (!st.stop_requested()) {
      std::vector<std::shared_ptr<TaskRun>> due;
      auto now = Steady::now();
      {
        std::lock_guard lk(mu);
        for (auto& [key, run] : held)
          if (!run->heartbeats_off && !run->lost && !run->settled &&
              now.time_since_epoch().count() - run->last_beat.load() >= interval_ticks)
            due.push_back(run);
      }
      for (auto& run : due) {
        if (st.stop_requested()) break;
        if (!beat(*run)) break;  // the store is down: try the rest next tick instead of hammering it
      }
      std::unique_lock lk(mu);
      cv_sleep.wait_for(lk, st, tick, [] { return false; });
    }
  }

  bool beat(TaskRun& run) {
    auto sent = Steady::now();
    try {
      auto r = store.heartbeat(run.lease, opt.lease);
      run.last_beat = sent.time_since_epoch().count();
      run.expires = (sent + opt.lease).time_since_epoch().count();
      if (r.cancel_requested && !run.cancel.exchange(true)) {
        log(LogLevel::info, "{}: cancellation requested", run.describe());
        run.notify();
      }
    } catch (const LeaseLost& e) {
      // A lease settled since the snapshot was taken is not lost, just done.
      if (!run.settled && !run.heartbeats_off) {
        run.lost = true;
        log(LogLevel::warning, "{}: {}", run.describe(), e.what());
        run.notify();
        drop_if_buffered(run);
      }
    } catch (const std::exception& e) {
      store_error(fmt::format("{}: heartbeat", run.describe()), e);
      return !is_transient(e);  // one lease's own trouble must not starve the others
    }
    return true;
  }

  // A buffered lease that is lost would only wait for a free handler to be
  // skipped; dropping it now frees its slot for a live task.
  void drop_if_buffered(TaskRun& run) {
    bool dropped = false;
    {
      std::lock_guard lk(mu);
      auto it = std::find_if(buffer.begin(), buffer.end(), [&](const auto& r) { return r.get() == &run; });
      if (it != buffer.end()) {
        buffer.erase(it);
        dropped = true;
      }
    }
    if (dropped) {
      finish(run, Outcome::lease_lost);
      cv_capacity.notify_one();
    }
  }

  // ------------------------------------------------------------ maintenance

  void maintain_loop(std::stop_token st) {
    // The first run lands at a random point of the interval, so workers started
    // together do not all maintain at once.
    auto wait = Millis(static_cast<Millis::rep>(static_cast<double>(opt.maintenance_interval.count()) *
                                                (0.1 + 0.9 * unit_random())));
    for (;;) {
      {
        std::unique_lock lk(mu);
        cv_sleep.wait_for(lk, st, wait, [] { return false; });
      }
      if (st.stop_requested()) return;
      wait = opt.maintenance_interval;
      try {
        auto r = store.maintain();
        log(r.expired + r.reaped + r.pruned > 0 ? LogLevel::info : LogLevel::debug,
            "maintenance: {} expired, {} reaped, {} pruned", r.expired, r.reaped, r.pruned);
      } catch (const std::exception& e) {
        store_error("maintenance", e);
      }
    }
  }

  // ------------------------------------------------------------- validation

  void validate_options() const {
    if (opt.queues.empty()) throw InvalidArgument("queues", "must name at least one queue");
    for (const auto& q : opt.queues) validate_queue("queues", q);
    if (opt.concurrency < 1 || opt.concurrency > 4096)
      throw InvalidArgument("concurrency", "must be between 1 and 4096");
    if (opt.lease.count() <= 0) throw InvalidArgument("lease", "must be positive");
    if (opt.heartbeat_interval.count() < 0) throw InvalidArgument("heartbeat_interval", "must not be negative");
    if (opt.heartbeat_interval >= opt.lease)
      throw InvalidArgument("heartbeat_interval", "must be shorter than the lease");
    if (opt.claim_batch < 1 || opt.claim_batch > 10000)
      throw InvalidArgument("claim_batch", "must be between 1 and 10000");
    if (opt.prefetch < 0 || opt.prefetch > 10000) throw InvalidArgument("prefetch", "must be between 0 and 10000");
    if (opt.complete_batch < 1 || opt.complete_batch > 10000)
      throw InvalidArgument("complete_batch", "must be between 1 and 10000");
    if (opt.poll_interval.count() <= 0) throw InvalidArgument("poll_interval", "must be positive");
    if (opt.shutdown_timeout.count() < 0) throw InvalidArgument("shutdown_timeout", "must not be negative");
    if (opt.maintenance_interval.count() < 0)
      throw InvalidArgument("maintenance_interval", "must not be negative");
    if (opt.error_backoff_initial.count() <= 0)
      throw InvalidArgument("error_backoff_initial", "must be positive");
    if (opt.error_backoff_max < opt.error_backoff_initial)
      throw InvalidArgument("error_backoff_max", "must not be less than error_backoff_initial");
    if (!opt.worker_id.empty()) validate_owner(opt.worker_id);
  }
};

}  // namespace detail

// ------------------------------------------------------------------ TaskContext

const Task& TaskContext::task() const noexcept { return run_->lease.task; }
TaskId TaskContext::id() const noexcept { return run_->lease.task.id; }
const std::string& TaskContext::queue() const noexcept { return run_->lease.task.queue; }
const std::string& TaskContext::type() const noexcept { return run_->lease.task.type; }
const std::optional<std::string>& TaskContext::key() const noexcept { return run_->lease.task.key; }
const std::string& TaskContext::payload() const noexcept { return run_->lease.task.payload; }
int TaskContext::attempt() const noexcept { return run_->lease.task.attempts; }
const Lease& TaskContext::lease() const noexcept { return run_->lease; }
std::string TaskContext::idempotency_token() const { return fmt::format("eoq-task-{}", run_->lease.task.id); }

void TaskContext::progress(int percent, std::string_view stage) {
  detail::validate_progress(percent, stage);
  if (percent == run_->last_percent && stage == run_->last_stage) return;
  try {
    run_->engine->store.progress(run_->lease, percent, stage);
    run_->last_percent = percent;
    run_->last_stage = std::string(stage);
  } catch (const LeaseLost&) {
    run_->lost = true;
    throw;
  } catch (const InvalidArgument&) {
    throw;
  } catch (const std::exception& e) {
    run_->engine->store_error(fmt::format("{}: progress", run_->describe()), e);
  }
}

void TaskContext::set_result(std::string json) {
  if (!detail::is_json(json)) throw InvalidArgument("result", "must be valid JSON text");
  run_->result = std::move(json);
}

const std::optional<std::string>& TaskContext::checkpoint_stage() const noexcept { return run_->checkpoint_stage; }
const std::optional<std::string>& TaskContext::checkpoint_state() const noexcept { return run_->checkpoint_state; }

void TaskContext::checkpoint(std::string_view stage, std::string_view state_json) {
  try {
    if (run_->tx) run_->tx->checkpoint(stage, state_json);
    else run_->engine->store.checkpoint(run_->lease, stage, state_json);
  } catch (const LeaseLost&) {
    run_->lost = true;
    throw;
  }
  run_->checkpoint_stage = std::string(stage);
  run_->checkpoint_state = std::string(state_json);
}

TaskTransaction& TaskContext::transaction() {
  if (!run_->tx) {
    run_->tx = run_->engine->store.begin(run_->lease);
    run_->tx_view.emplace(*run_->tx);
  }
  return *run_->tx_view;
}

Rows TaskContext::exec(std::string_view sql, const Params& params) { return transaction().exec(sql, params); }
bool TaskContext::in_transaction() const noexcept { return run_->tx != nullptr; }
bool TaskContext::cancelled() const noexcept { return run_->cancel.load(); }
bool TaskContext::stopping() const noexcept { return run_->engine->stopping.load(); }
bool TaskContext::lease_lost() const noexcept { return run_->lost.load(); }

bool TaskContext::sleep_for(Millis duration) {
  std::unique_lock lk(run_->wake_mu);
  run_->wake_cv.wait_for(lk, duration, [&] { return should_stop(); });
  return !should_stop();
}

void TaskContext::log(LogLevel level, std::string_view message) const {
  run_->engine->log(level, "{}: {}", run_->describe(), message);
}

// ----------------------------------------------------------------------- Worker

struct Worker::Impl : detail::Engine {
  using Engine::Engine;
};

Worker::Worker(TaskStore& store, WorkerOptions options) : impl_(std::make_unique<Impl>(store, std::move(options))) {}

Worker::~Worker() = default;

Worker& Worker::on(std::string type, Handler handler) {
  std::lock_guard life(impl_->life_mu);
  if (impl_->state.load() != Impl::State::idle) throw UsageError("Worker::on: register handlers before start()");
  if (type.empty()) throw InvalidArgument("type", "must not be empty");
  if (!handler) throw InvalidArgument("handler", "must not be empty");
  impl_->handlers[std::move(type)] = std::move(handler);
  return *this;
}

Worker& Worker::every(PeriodicTask p) {
  std::lock_guard life(impl_->life_mu);
  if (impl_->state.load() != Impl::State::idle)
    throw UsageError("Worker::every: register periodic tasks before start()");
  impl_->periodic->every(std::move(p));
  return *this;
}

Worker& Worker::every(std::string name, std::chrono::seconds period, NewTask task) {
  return every(PeriodicTask{std::move(name), period, std::move(task)});
}

void Worker::start() { impl_->start(); }
void Worker::run() { impl_->run(); }
void Worker::request_stop() noexcept { impl_->request_stop(); }
void Worker::stop() { impl_->stop(); }
bool Worker::running() const noexcept { return impl_->state.load() == Impl::State::running; }
const std::string& Worker::id() const noexcept { return impl_->id; }
const WorkerOptions& Worker::options() const noexcept { return impl_->opt; }
WorkerCounters Worker::counters() const noexcept { return impl_->snapshot(); }

}  // namespace eoq
