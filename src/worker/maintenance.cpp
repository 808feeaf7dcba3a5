// Housekeeping: store.maintain() now and then (expire overdue tasks, reap dead
// leases, retention in slices).
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
      // A retention backlog: the next slice after a pause as long as this one
      // while the queues are idle, nine times as long while they are deep.
      // Retention bounds history, it has no deadline: on a busy server it takes
      // a tenth of one connection, not a fifth of the machine from the tasks.
      if (r.more) {
        const int pause = e_.claimer.queue_deep() ? 9 : 1;
        wait = std::clamp(std::chrono::duration_cast<Millis>(pause * (Steady::now() - started)), Millis(10), wait);
      }
    } catch (const std::exception& e) {
      e_.store_error("maintenance", e);
    }
  }
}

}  // namespace eoq::detail
