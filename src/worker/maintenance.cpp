// Housekeeping threads: store.maintain() now and then (expire overdue tasks,
// reap dead leases, retention), and the periodic scheduler.
#include "worker/engine.hpp"

#include <algorithm>

namespace eoq::detail {

void Maintainer::maintain(const std::stop_token& st) {
  // The first run lands at a random point of the interval, so workers started
  // together do not all maintain at once.
  auto wait = Millis(static_cast<Millis::rep>(static_cast<double>(e_.opt.maintenance_interval.count()) *
                                              (0.1 + 0.9 * unit_random())));
  for (;;) {
    {
      std::unique_lock lk(e_.mu);
      e_.cv_sleep.wait_for(lk, st, wait, [] { return false; });
    }
    if (st.stop_requested()) return;
    wait = e_.opt.maintenance_interval;
    try {
      auto started = Steady::now();
      auto r = e_.store.maintain();
      e_.log(r.expired + r.reaped + r.pruned > 0 ? LogLevel::info : LogLevel::debug,
             "maintenance: {} expired, {} reaped, {} pruned{}", r.expired, r.reaped, r.pruned,
             r.more ? ", more to prune" : "");
      // A retention backlog: the next slice after a pause four times this one's
      // length, so pruning takes at most a fifth of one connection's time.
      if (r.more)
        wait = std::clamp(std::chrono::duration_cast<Millis>(4 * (Steady::now() - started)), Millis(10), wait);
    } catch (const std::exception& e) {
      e_.store_error("maintenance", e);
    }
  }
}

void Maintainer::schedule(const std::stop_token& st) {
  ErrorBackoff backoff(e_.opt.error_backoff_initial, e_.opt.error_backoff_max);
  std::vector<std::int64_t> done(e_.periodics.size(), -1);
  while (!st.stop_requested()) {
    bool failed = false;
    auto now = Clock::now();
    auto now_s = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
    auto next = now + std::chrono::hours(24);
    for (std::size_t i = 0; i < e_.periodics.size(); ++i) {
      const auto& p = e_.periodics[i];
      auto period = p.period.count();
      auto bucket = now_s - now_s % period;
      next = std::min(next, Clock::time_point(std::chrono::seconds(bucket + period)));
      if (bucket == done[i]) continue;
      NewTask task = p.task;
      task.key = fmt::format("periodic:{}:{}", p.name, bucket);
      try {
        auto r = e_.store.submit(task);
        done[i] = bucket;
        e_.log(LogLevel::debug, "periodic {}: bucket {} {} task {}", p.name, bucket,
               r.duplicate ? "already has" : "submitted", r.task.id);
      } catch (const std::exception& e) {
        e_.store_error(fmt::format("periodic {}: submitting bucket {}", p.name, bucket), e);
        failed = true;
      }
    }
    Millis wait = failed ? backoff.next() : std::chrono::ceil<Millis>(next - Clock::now()) + Millis(1);
    if (!failed) backoff.reset();
    std::unique_lock lk(e_.mu);
    e_.cv_sleep.wait_for(lk, st, std::max(wait, Millis(1)), [] { return false; });
  }
}

}  // namespace eoq::detail
