// The Worker facade, the engine's shared pieces (logging, counters, the one
// finish() per lease), start and the ordered shutdown. The roles are in the
// other files of this folder; engine.hpp has the map.
#include "worker/engine.hpp"

#include "common/validate.hpp"

#include <algorithm>
#include <cstdio>
#include <random>
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

thread_local const Engine* current_handler_engine = nullptr;

namespace {

std::mt19937_64& rng() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return gen;
}

std::string default_worker_id() {
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0') std::snprintf(host, sizeof host, "unknown-host");
  return fmt::format("{}:{}:{:08x}", host, static_cast<long>(getpid()),
                     static_cast<std::uint32_t>(rng()() & 0xffffffffu));
}

}  // namespace

bool is_transient(const std::exception& e) noexcept {
  const auto* db = dynamic_cast<const DatabaseError*>(&e);
  return db != nullptr && db->transient();
}

Millis ErrorBackoff::next() {
  Millis current = next_;
  next_ = std::min(max_, next_ * 2);
  auto jittered = static_cast<Millis::rep>(static_cast<double>(current.count()) * (0.8 + 0.4 * unit_random()));
  return Millis(std::max<Millis::rep>(1, jittered));
}

Engine::Engine(TaskStore& s, WorkerOptions o) : store(s), opt(std::move(o)) {
  validate_options();
  id = opt.worker_id.empty() ? default_worker_id() : opt.worker_id;
  heartbeat_interval = opt.heartbeat_interval.count() > 0 ? opt.heartbeat_interval : opt.lease / 3;
  heartbeat_interval = std::max(heartbeat_interval, Millis(1));
  periodic = std::make_unique<Scheduler>(store, scheduler_options());
}

SchedulerOptions Engine::scheduler_options() {
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

void Engine::emit(LogLevel level, std::string_view message) const noexcept {
  std::lock_guard lk(log_mu);
  try {
    if (opt.logger) opt.logger(level, message);
    else std::fprintf(stderr, "eoq worker %s: %s: %.*s\n", id.c_str(), std::string(to_string(level)).c_str(),
                      static_cast<int>(message.size()), message.data());
  } catch (...) {
    // A throwing logger must not take a worker thread down with it.
  }
}

void Engine::store_error(std::string_view what, const std::exception& e) {
  counters.store_errors.fetch_add(1);
  log(is_transient(e) ? LogLevel::warning : LogLevel::error, "{}: {}", what, e.what());
}

void Engine::wake_store() noexcept {
  try {
    store.wake();
  } catch (const std::exception& e) {
    // Whoever waits in wait_for_tasks wakes at its poll interval instead.
    log(LogLevel::debug, "waking the store's waiters failed: {}", e.what());
  } catch (...) {
  }
}

WorkerCounters Engine::snapshot() const noexcept {
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
  c.snoozed = counters.snoozed.load();
  c.in_flight = counters.in_flight.load();
  c.store_errors = counters.store_errors.load();
  c.handler_runs = counters.handler_runs.load();
  c.handler_time_total = std::chrono::microseconds(counters.handler_us_total.load());
  c.handler_time_max = std::chrono::microseconds(counters.handler_us_max.load());
  for (std::size_t i = 0; i < c.handler_duration_buckets.size(); ++i)
    c.handler_duration_buckets[i] = counters.buckets[i].load();
  return c;
}

void Engine::record_duration(Steady::duration d) noexcept {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(d).count();
  counters.handler_runs.fetch_add(1, std::memory_order_relaxed);
  counters.handler_us_total.fetch_add(us, std::memory_order_relaxed);
  auto prev = counters.handler_us_max.load(std::memory_order_relaxed);
  while (prev < us && !counters.handler_us_max.compare_exchange_weak(prev, us)) {
  }
  std::size_t i = 0;
  const auto& bounds = WorkerCounters::duration_bounds;
  while (i < bounds.size() && d > bounds[i]) ++i;
  counters.buckets[i].fetch_add(1, std::memory_order_relaxed);
}

void Engine::finish(TaskRun& run, Outcome outcome) {
  TaskRun* one = &run;
  finish(std::span<TaskRun* const>(&one, 1), outcome);
}

void Engine::finish(std::span<TaskRun* const> runs, Outcome outcome) {
  std::vector<TaskRun*> mine;
  mine.reserve(runs.size());
  for (auto* run : runs)
    if (!run->settled.exchange(true)) mine.push_back(run);
  if (mine.empty()) return;
  {
    std::lock_guard lk(mu);
    for (auto* run : mine) held.erase(run->held_at);
  }
  const auto n = mine.size();
  counters.in_flight.fetch_sub(n);
  switch (outcome) {
    case Outcome::succeeded: counters.succeeded.fetch_add(n); break;
    case Outcome::failed: counters.failed.fetch_add(n); break;
    case Outcome::retried: counters.retried.fetch_add(n); break;
    case Outcome::cancelled: counters.cancelled.fetch_add(n); break;
    case Outcome::expired: counters.expired.fetch_add(n); break;
    case Outcome::lease_lost: counters.lease_lost.fetch_add(n); break;
    case Outcome::released: counters.released.fetch_add(n); break;
    case Outcome::abandoned: counters.abandoned.fetch_add(n); break;
    case Outcome::snoozed: counters.snoozed.fetch_add(n); break;
  }
  for (auto* run : mine) run->notify();
}

void Engine::nap(Millis d, const std::stop_token& st) {
  std::unique_lock lk(mu);
  cv_sleep.wait_for(lk, st, d, [&] { return give_up.load(); });
}

void Engine::start() {
  std::lock_guard life(life_mu);
  if (state.load() != State::idle) throw UsageError("a Worker runs once: start() after stop() or a second start()");
  if (handlers.empty() && periodic->empty())
    log(LogLevel::warning, "no handlers registered: every task claimed from [{}] will fail",
        fmt::join(opt.queues, ", "));
  log(LogLevel::info, "worker {} starting on queues [{}] with {} handler threads, lease {} ms", id,
      fmt::join(opt.queues, ", "), opt.concurrency, opt.lease.count());
  // Running before the first thread starts: a task can be claimed and settled
  // before start() returns, and running() must not read false meanwhile.
  for (const auto& [type, reg] : handlers) max_batch = std::max(max_batch, reg.batch);
  state = State::running;
  heartbeat_thread = std::jthread([this](std::stop_token st) { heartbeater.run(st); });
  watchdog_thread = std::jthread([this](std::stop_token st) { watchdog.run(st); });
  completers_running = kCompleters;
  for (int i = 0; i < kCompleters; ++i)
    completer_threads.emplace_back([this](std::stop_token st) { completer.run(st); });
  for (int i = 0; i < opt.concurrency; ++i)
    handler_threads.emplace_back([this](std::stop_token st) { executor.run(st); });
  claimers_running = kClaimers;
  for (int i = 0; i < kClaimers; ++i)
    claimer_threads.emplace_back([this](std::stop_token st) { claimer.run(st); });
  if (!periodic->empty()) periodic->start();
  if (opt.maintenance_interval.count() > 0)
    maintenance_thread = std::jthread([this](std::stop_token st) { maintainer.maintain(st); });
}

void Engine::request_stop() noexcept {
  stopping = true;
  std::vector<std::shared_ptr<TaskRun>> holding;
  {
    std::lock_guard lk(mu);
    stop_requested = true;
    holding.assign(held.begin(), held.end());
  }
  for (auto& run : holding) run->notify();  // wakes sleep_for: stopping() is now true
  cv_state.notify_all();
  cv_capacity.notify_all();
  // The claimer may be blocked in wait_for_tasks; stop() makes sure it leaves.
  wake_store();
}

void Engine::run() {
  start();
  {
    std::unique_lock lk(mu);
    cv_state.wait(lk, [&] { return stop_requested.load(); });
  }
  stop();
}

void Engine::stop() {
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
  for (auto& t : claimer_threads) t.request_stop();
  periodic->request_stop();
  maintenance_thread.request_stop();
  {
    std::unique_lock lk(mu);
    while (claimers_running > 0) {
      lk.unlock();
      wake_store();
      lk.lock();
      cv_state.wait_for(lk, Millis(20), [&] { return claimers_running == 0; });
    }
  }
  for (auto& t : claimer_threads) t.join();
  periodic->stop();
  if (maintenance_thread.joinable()) maintenance_thread.join();

  // 2. Leases claimed but not started go back at once: nobody will run them here.
  std::vector<std::shared_ptr<TaskRun>> unstarted;
  {
    std::lock_guard lk(mu);
    unstarted.assign(std::make_move_iterator(buffer.begin()), std::make_move_iterator(buffer.end()));
    buffer.clear();
  }
  completer.give_back(unstarted, "worker shutting down before the task started");

  // 3. Running handlers get until the deadline.
  {
    std::unique_lock lk(mu);
    if (!cv_state.wait_until(lk, deadline, [&] { return busy_handlers == 0; })) {
      std::vector<std::shared_ptr<TaskRun>> late;
      for (auto& run : held)
        if (run->in_handler && !run->taken()) late.push_back(run);
      lk.unlock();
      give_up = true;
      cv_sleep.notify_all();
      log(LogLevel::warning,
          "{} handler(s) still running after shutdown_timeout ({} ms); giving their leases back and "
          "waiting for them to return",
          late.size(), opt.shutdown_timeout.count());
      // The host is about to go (its own kill timer is running): another worker
      // should get these tasks now rather than after their leases lapse.
      completer.give_back(late, "handler still running at the shutdown deadline");
      lk.lock();
      cv_state.wait(lk, [&] { return busy_handlers == 0; });
    }
  }
  for (auto& t : handler_threads) t.request_stop();
  cv_work.notify_all();
  for (auto& t : handler_threads) t.join();
  // No handler runs any more, so none is left to time.
  watchdog_thread.request_stop();
  watchdog_thread.join();

  // 4. Flush completions; give the completers at least a moment even when the
  // handlers used up the deadline.
  for (auto& t : completer_threads) t.request_stop();
  {
    std::unique_lock lk(mu);
    auto flush_deadline = std::max(deadline, Steady::now() + Millis(1000));
    if (!cv_state.wait_until(lk, flush_deadline, [&] { return completers_running == 0; })) {
      give_up = true;
      lk.unlock();
      cv_sleep.notify_all();
      lk.lock();
    }
  }
  for (auto& t : completer_threads) t.join();

  // 5. Nothing is left to keep alive.
  heartbeat_thread.request_stop();
  heartbeat_thread.join();

  std::vector<std::shared_ptr<TaskRun>> leftovers;
  {
    std::lock_guard lk(mu);
    leftovers.assign(held.begin(), held.end());
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

void Engine::validate_options() const {
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
  if (opt.prefetch && (*opt.prefetch < 0 || *opt.prefetch > 10000))
    throw InvalidArgument("prefetch", "must be between 0 and 10000, or empty to adapt");
  if (opt.complete_batch < 1 || opt.complete_batch > 10000)
    throw InvalidArgument("complete_batch", "must be between 1 and 10000");
  if (opt.poll_interval.count() <= 0) throw InvalidArgument("poll_interval", "must be positive");
  if (opt.shutdown_timeout.count() < 0) throw InvalidArgument("shutdown_timeout", "must not be negative");
  if (opt.timeout_grace.count() < 0) throw InvalidArgument("timeout_grace", "must not be negative");
  if (opt.timeout_grace > std::chrono::hours(24 * 7)) throw InvalidArgument("timeout_grace", "must be at most 7 days");
  if (opt.maintenance_interval.count() < 0) throw InvalidArgument("maintenance_interval", "must not be negative");
  if (opt.error_backoff_initial.count() <= 0) throw InvalidArgument("error_backoff_initial", "must be positive");
  if (opt.error_backoff_max < opt.error_backoff_initial)
    throw InvalidArgument("error_backoff_max", "must not be less than error_backoff_initial");
  if (!opt.worker_id.empty()) validate_owner(opt.worker_id);
}

}  // namespace detail

// ----------------------------------------------------------------------- Worker

struct Worker::Impl : detail::Engine {
  using Engine::Engine;
};

Worker::Worker(TaskStore& store, WorkerOptions options) : impl_(std::make_unique<Impl>(store, std::move(options))) {}

Worker::~Worker() = default;

Worker& Worker::on(std::string type, Handler handler) { return on(std::move(type), std::move(handler), {}); }

Worker& Worker::on(std::string type, Handler handler, HandlerOptions options) {
  std::lock_guard life(impl_->life_mu);
  if (impl_->state.load() != Impl::State::idle) throw UsageError("Worker::on: register handlers before start()");
  if (type.empty()) throw InvalidArgument("type", "must not be empty");
  if (!handler) throw InvalidArgument("handler", "must not be empty");
  if (options.batch < 1 || options.batch > 1000)
    throw InvalidArgument("batch", fmt::format("must be between 1 and 1000, not {}", options.batch));
  if (options.timeout) detail::validate_positive("timeout", *options.timeout);
  TransactionOptions tx{options.synchronous_commit.value_or(impl_->opt.synchronous_commit)};
  impl_->handlers[std::move(type)] = detail::Registered{std::move(handler), options.batch, tx, options.timeout};
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

Worker& Worker::cron(CronTask c) {
  std::lock_guard life(impl_->life_mu);
  if (impl_->state.load() != Impl::State::idle) throw UsageError("Worker::cron: register cron tasks before start()");
  impl_->periodic->cron(std::move(c));
  return *this;
}

Worker& Worker::cron(std::string name, std::string schedule, NewTask task, std::string time_zone) {
  return cron(CronTask{std::move(name), std::move(schedule), std::move(time_zone), std::move(task)});
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
