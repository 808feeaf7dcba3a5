// The Scheduler: periodic submissions with buckets in the store's time.
#include <eoq/scheduler.hpp>

#include "common/validate.hpp"
#include "worker/cron.hpp"

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

// `kind` is "periodic" (every) or "cron": the key's first part.
std::string bucket_key(std::string_view kind, const std::string& name, std::int64_t bucket) {
  return fmt::format("{}:{}:{}", kind, name, bucket);
}

// The bucket in a key this scheduler wrote for `name`, if it is one.
std::optional<std::int64_t> bucket_of(const std::optional<std::string>& key, std::string_view kind,
                                      const std::string& name) {
  if (!key) return std::nullopt;
  const std::string prefix = fmt::format("{}:{}:", kind, name);
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

  // A registration of either kind. Buckets are epoch seconds: a period's start
  // (every) or a fire time (cron), each lasting until the next.
  struct Entry {
    std::string name;
    NewTask task;
    std::string_view kind;            // "periodic" or "cron"
    std::int64_t period = 0;          // every
    std::optional<detail::cron::Schedule> schedule;  // cron
    std::shared_ptr<const detail::cron::Zone> zone;
    std::optional<std::int64_t> done;  // the last bucket this scheduler submitted (or found taken)
    bool caught_up = false;

    // The bucket that holds `t`; none only for a cron schedule that has not
    // fired within the search horizon before `t`.
    std::optional<std::int64_t> bucket_at(std::int64_t t) const {
      if (schedule) return schedule->latest_at_or_before(t, *zone);
      return t - (t % period + period) % period;
    }
    std::optional<std::int64_t> next_after(std::int64_t t) const {
      if (schedule) return schedule->next_after(t, *zone);
      return *bucket_at(t) + period;
    }
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
    NewTask task = e.task;
    task.key = bucket_key(e.kind, e.name, bucket);
    task.key_reuse = KeyReuse::lenient;
    return store.submit(task);
  }

  // The newest bucket before `before` that has a task, among the newest tasks
  // of the registration's queue and type (a bounded look: a catch-up must not
  // turn into a scan of a big queue's history).
  std::optional<std::int64_t> last_submitted(const Entry& e, std::int64_t before) {
    ListQuery q;
    q.queue = e.task.queue;
    q.type = e.task.type;
    q.tenant = e.task.tenant;
    q.newest_first = true;
    q.limit = 1000;
    for (int page = 0; page < 10; ++page) {
      auto got = store.list(q);
      std::optional<std::int64_t> newest;
      for (const auto& t : got.tasks) {
        if (t.tenant != e.task.tenant) continue;
        auto b = bucket_of(t.key, e.kind, e.name);
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
    const auto previous = e.bucket_at(current - 1);
    auto last = last_submitted(e, current);
    if (last && previous && *last < *previous) {
      auto r = submit(e, *previous);
      log(LogLevel::info, "{} {}: buckets {} to {} were missed; {} task {} for bucket {}", e.kind, e.name,
          e.next_after(*last).value_or(*previous), *previous,
          r.duplicate ? "another scheduler already caught up with" : "caught up with", r.task.id, *previous);
    }
    e.caught_up = true;
  }

  Millis tick() {
    const TimePoint now = store.now();
    const std::int64_t now_s = epoch_seconds(now);
    TimePoint next = now + std::chrono::hours(24);
    std::exception_ptr first_error;
    for (auto& e : entries) {
      if (auto n = e.next_after(now_s)) next = std::min(next, TimePoint(Seconds(*n)));
      const auto found = e.bucket_at(now_s);
      if (!found) continue;
      const std::int64_t bucket = *found;
      try {
        if (opt.catch_up && !e.caught_up) catch_up(e, bucket);
        if (e.done == bucket) continue;
        auto r = submit(e, bucket);
        e.done = bucket;
        log(LogLevel::debug, "{} {}: bucket {} {} task {}", e.kind, e.name, bucket,
            r.duplicate ? "already has" : "submitted", r.task.id);
      } catch (const std::exception& ex) {
        log(LogLevel::warning, "{} {}: submitting bucket {}: {}", e.kind, e.name, bucket, ex.what());
        if (!first_error) first_error = std::current_exception();
      }
    }
    if (first_error) std::rethrow_exception(first_error);
    return std::max(Millis(1), std::chrono::ceil<Millis>(next - now));
  }

  // The rules every() and cron() share: a name unique across both, a task the
  // stores would take once the scheduler sets its key.
  void require_idle(const char* verb) const {
    if (state.load() != State::idle)
      throw UsageError(fmt::format("Scheduler::{}: register periodic tasks before start()", verb));
  }

  void add(Entry e, const char* verb) {
    std::lock_guard life(life_mu);
    require_idle(verb);
    if (e.name.empty() || e.name.size() > 128) throw InvalidArgument("name", "must be 1 to 128 characters");
    for (char c : e.name) {
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                c == '-' || c == '.';
      if (!ok) throw InvalidArgument("name", "may contain only letters, digits, '_', '-' and '.'");
    }
    if (e.task.key) throw InvalidArgument("key", "is set by the scheduler for periodic tasks; leave it empty");
    if (e.task.deadline) throw InvalidArgument("deadline", "cannot be a fixed time on a periodic task");
    for (const auto& other : entries)
      if (other.name == e.name) throw InvalidArgument("name", "'" + e.name + "' is already registered");
    NewTask probe = e.task;
    probe.key = bucket_key(e.kind, e.name, 0);
    detail::validate_new_task(probe, static_cast<std::size_t>(-1), detail::now());
    entries.push_back(std::move(e));
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
  impl_->require_idle("every");
  if (p.period.count() < 1) throw InvalidArgument("period", "must be at least one second");
  Impl::Entry e;
  e.name = std::move(p.name);
  e.task = std::move(p.task);
  e.kind = "periodic";
  e.period = p.period.count();
  impl_->add(std::move(e), "every");
  return *this;
}

Scheduler& Scheduler::cron(CronTask c) {
  impl_->require_idle("cron");
  Impl::Entry e;
  e.schedule = detail::cron::Schedule::parse(c.schedule);
  e.zone = detail::cron::Zone::load(c.time_zone);
  e.name = std::move(c.name);
  e.task = std::move(c.task);
  e.kind = "cron";
  impl_->add(std::move(e), "cron");
  return *this;
}

Scheduler& Scheduler::cron(std::string name, std::string schedule, NewTask task, std::string time_zone) {
  return cron(CronTask{std::move(name), std::move(schedule), std::move(time_zone), std::move(task)});
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
