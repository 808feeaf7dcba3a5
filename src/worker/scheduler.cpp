// The Scheduler: periodic submissions with buckets in the store's time.
#include <eoq/scheduler.hpp>

#include "common/validate.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <random>
#include <stop_token>
#include <thread>
#include <vector>

namespace eoq {

namespace {

using Seconds = std::chrono::seconds;

std::int64_t epoch_seconds(TimePoint t) {
  return std::chrono::floor<Seconds>(t.time_since_epoch()).count();
}

std::string bucket_key(const std::string& name, std::int64_t bucket) {
  return fmt::format("periodic:{}:{}", name, bucket);
}

// The bucket in a key this scheduler wrote for `name`, if it is one.
std::optional<std::int64_t> bucket_of(const std::optional<std::string>& key, const std::string& name) {
  if (!key) return std::nullopt;
  const std::string prefix = "periodic:" + name + ":";
  if (!key->starts_with(prefix)) return std::nullopt;
  std::int64_t b = 0;
  const char* first = key->data() + prefix.size();
  const char* last = key->data() + key->size();
  auto [p, ec] = std::from_chars(first, last, b);
  if (ec != std::errc() || p != last || first == last) return std::nullopt;
  return b;
}


}  // namespace

struct Scheduler::Impl {
  Impl(TaskStore& s, SchedulerOptions o) : store(s), opt(std::move(o)) {
    if (opt.error_backoff_initial.count() <= 0) throw InvalidArgument("error_backoff_initial", "must be positive");
    if (opt.error_backoff_max < opt.error_backoff_initial)
      throw InvalidArgument("error_backoff_max", "must not be less than error_backoff_initial");
  }

  TaskStore& store;
  const SchedulerOptions opt;

  struct Entry {
    PeriodicTask p;
    std::optional<std::int64_t> done;  // the last bucket this scheduler submitted (or found taken)
    bool caught_up = false;
  };
  std::vector<Entry> entries;

  enum class State { idle, running, stopped };
  mutable std::mutex life_mu;
  std::atomic<State> state{State::idle};
  std::mutex mu;
  std::condition_variable_any cv;
  bool stop_requested = false;
  std::jthread thread;

  mutable std::mutex log_mu;
  template <class... Args>
  void log(LogLevel level, fmt::format_string<Args...> format, Args&&... args) const {
    if (level < opt.log_level) return;
    if (!opt.logger && level < LogLevel::warning) return;
    try {
      auto message = fmt::format(format, std::forward<Args>(args)...);
      std::lock_guard lk(log_mu);
      if (opt.logger) opt.logger(level, message);
      else std::fprintf(stderr, "eoq scheduler: %s: %s\n", std::string(to_string(level)).c_str(), message.c_str());
    } catch (...) {
      // A throwing logger must not take the scheduler down with it.
    }
  }

  // Submits `bucket` of entry `e`. Lenient: the bucket key is the scheduler's
  // own, and a deploy that changes the task mid-bucket must not make the next
  // submit of that bucket an error.
  SubmitResult submit(const Entry& e, std::int64_t bucket) {
    NewTask task = e.p.task;
    task.key = bucket_key(e.p.name, bucket);
    task.key_reuse = KeyReuse::lenient;
    return store.submit(task);
  }

  // The newest bucket before `before` that has a task, among the newest tasks
  // of the registration's queue and type (a bounded look: a catch-up must not
  // turn into a scan of a big queue's history).
  std::optional<std::int64_t> last_submitted(const Entry& e, std::int64_t before) {
    ListQuery q;
    q.queue = e.p.task.queue;
    q.type = e.p.task.type;
    q.tenant = e.p.task.tenant;
    q.newest_first = true;
    q.limit = 1000;
    for (int page = 0; page < 10; ++page) {
      auto got = store.list(q);
      std::optional<std::int64_t> newest;
      for (const auto& t : got.tasks) {
        if (t.tenant != e.p.task.tenant) continue;
        auto b = bucket_of(t.key, e.p.name);
        if (b && *b < before && (!newest || *b > *newest)) newest = b;
      }
      // Ids grow with submission, so the first page that has one has the newest.
      if (newest) return newest;
      if (!got.next_after) break;
      q.after = got.next_after;
    }
    return std::nullopt;
  }

  void catch_up(Entry& e, std::int64_t current) {
    const std::int64_t period = e.p.period.count();
    const std::int64_t previous = current - period;
    auto last = last_submitted(e, current);
    if (last && *last < previous) {
      auto r = submit(e, previous);
      log(LogLevel::info, "periodic {}: buckets {} to {} were missed; {} task {} for bucket {}", e.p.name,
          *last + period, previous, r.duplicate ? "another scheduler already caught up with" : "caught up with",
          r.task.id, previous);
    }
    e.caught_up = true;
  }

  Millis tick() {
    const TimePoint now = store.now();
    const std::int64_t now_s = epoch_seconds(now);
    TimePoint next = now + std::chrono::hours(24);
    std::exception_ptr first_error;
    for (auto& e : entries) {
      const std::int64_t period = e.p.period.count();
      const std::int64_t bucket = now_s - (now_s % period + period) % period;
      next = std::min(next, TimePoint(Seconds(bucket + period)));
      try {
        if (opt.catch_up && !e.caught_up) catch_up(e, bucket);
        if (e.done == bucket) continue;
        auto r = submit(e, bucket);
        e.done = bucket;
        log(LogLevel::debug, "periodic {}: bucket {} {} task {}", e.p.name, bucket,
            r.duplicate ? "already has" : "submitted", r.task.id);
      } catch (const std::exception& ex) {
        log(LogLevel::warning, "periodic {}: submitting bucket {}: {}", e.p.name, bucket, ex.what());
        if (!first_error) first_error = std::current_exception();
      }
    }
    if (first_error) std::rethrow_exception(first_error);
    return std::max(Millis(1), std::chrono::ceil<Millis>(next - now));
  }

  void loop(std::stop_token st) {
    Millis backoff = opt.error_backoff_initial;
    while (!st.stop_requested()) {
      Millis wait{};
      try {
        // The store's clock says how long until the next bucket; the steady
        // clock measures that wait here, so this machine's wall clock plays no
        // part. A millisecond past the boundary, so the next round is in it.
        wait = tick() + Millis(1);
        backoff = opt.error_backoff_initial;
      } catch (const std::exception&) {
        auto jittered = static_cast<Millis::rep>(static_cast<double>(backoff.count()) * (0.8 + 0.4 * detail::unit_random()));
        wait = Millis(std::max<Millis::rep>(1, jittered));
        backoff = std::min(opt.error_backoff_max, backoff * 2);
      }
      std::unique_lock lk(mu);
      cv.wait_for(lk, st, wait, [&] { return stop_requested; });
      if (stop_requested) break;
    }
  }
};

Scheduler::Scheduler(TaskStore& store, SchedulerOptions options)
    : impl_(std::make_unique<Impl>(store, std::move(options))) {}

Scheduler::~Scheduler() { stop(); }

Scheduler& Scheduler::every(PeriodicTask p) {
  std::lock_guard life(impl_->life_mu);
  if (impl_->state.load() != Impl::State::idle)
    throw UsageError("Scheduler::every: register periodic tasks before start()");
  if (p.name.empty() || p.name.size() > 128) throw InvalidArgument("name", "must be 1 to 128 characters");
  for (char c : p.name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
              c == '.';
    if (!ok) throw InvalidArgument("name", "may contain only letters, digits, '_', '-' and '.'");
  }
  if (p.period.count() < 1) throw InvalidArgument("period", "must be at least one second");
  if (p.task.key) throw InvalidArgument("key", "is set by the scheduler for periodic tasks; leave it empty");
  if (p.task.deadline) throw InvalidArgument("deadline", "cannot be a fixed time on a periodic task");
  for (const auto& other : impl_->entries)
    if (other.p.name == p.name) throw InvalidArgument("name", "'" + p.name + "' is already registered");
  NewTask probe = p.task;
  probe.key = "periodic:" + p.name + ":0";
  detail::validate_new_task(probe, static_cast<std::size_t>(-1), detail::now());
  impl_->entries.push_back(Impl::Entry{std::move(p), std::nullopt, false});
  return *this;
}

Scheduler& Scheduler::every(std::string name, std::chrono::seconds period, NewTask task) {
  return every(PeriodicTask{std::move(name), period, std::move(task)});
}

bool Scheduler::empty() const noexcept { return impl_->entries.empty(); }

Millis Scheduler::tick() { return impl_->tick(); }

void Scheduler::start() {
  std::lock_guard life(impl_->life_mu);
  if (impl_->state.load() != Impl::State::idle)
    throw UsageError("a Scheduler runs once: start() after stop() or a second start()");
  impl_->thread = std::jthread([this](std::stop_token st) { impl_->loop(st); });
  impl_->state = Impl::State::running;
}

void Scheduler::run() {
  start();
  {
    std::unique_lock lk(impl_->mu);
    impl_->cv.wait(lk, [&] { return impl_->stop_requested; });
  }
  stop();
}

void Scheduler::request_stop() noexcept {
  {
    std::lock_guard lk(impl_->mu);
    impl_->stop_requested = true;
  }
  impl_->cv.notify_all();
}

void Scheduler::stop() {
  std::lock_guard life(impl_->life_mu);
  if (impl_->state.load() != Impl::State::running) return;
  request_stop();
  impl_->thread.request_stop();
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->state = Impl::State::stopped;
}

bool Scheduler::running() const noexcept { return impl_->state.load() == Impl::State::running; }

}  // namespace eoq
