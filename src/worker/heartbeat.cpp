// The heartbeat: extends every held lease (running, buffered, or waiting for
// the completers) before it runs out, and hears cancel requests and lost
// leases on the way.
#include "worker/engine.hpp"

#include <algorithm>

namespace eoq::detail {

void Heartbeater::run(const std::stop_token& st) {
  // Checking four times per interval keeps each lease's heartbeat within
  // 1.25 intervals (lease/2.4 by default) of the previous one.
  const Millis tick = std::max(Millis(1), e_.heartbeat_interval / 4);
  const auto interval_ticks = std::chrono::duration_cast<Steady::duration>(e_.heartbeat_interval).count();
  std::vector<std::shared_ptr<TaskRun>> due;
  while (!st.stop_requested()) {
    due.clear();
    auto now = Steady::now();
    {
      std::lock_guard lk(e_.mu);
      for (auto& run : e_.held)
        if (!run->heartbeats_off && !run->lost && !run->settled &&
            now.time_since_epoch().count() - run->last_beat.load() >= interval_ticks)
          due.push_back(run);
    }
    for (auto& run : due) {
      if (st.stop_requested()) break;
      if (!beat(*run)) break;  // the store is down: try the rest next tick instead of hammering it
    }
    std::unique_lock lk(e_.mu);
    e_.cv_sleep.wait_for(lk, st, tick, [] { return false; });
  }
}

bool Heartbeater::beat(TaskRun& run) {
  auto sent = Steady::now();
  try {
    auto r = e_.store.heartbeat(run.lease, e_.opt.lease);
    run.last_beat = sent.time_since_epoch().count();
    run.expires = (sent + e_.opt.lease).time_since_epoch().count();
    if (r.cancel_requested && !run.cancel.exchange(true)) {
      e_.log(LogLevel::info, "{}: cancellation requested", run.describe());
      run.notify();
    }
  } catch (const LeaseLost& e) {
    // A lease settled since the snapshot was taken is not lost, just done.
    if (!run.settled && !run.heartbeats_off) {
      run.lost = true;
      e_.log(LogLevel::warning, "{}: {}", run.describe(), e.what());
      run.notify();
      drop_if_buffered(run);
    }
  } catch (const std::exception& e) {
    e_.store_error(fmt::format("{}: heartbeat", run.describe()), e);
    return !is_transient(e);  // one lease's own trouble must not starve the others
  }
  return true;
}

// A buffered lease that is lost would only wait for a free handler to be
// skipped; dropping it now frees its slot for a live task.
void Heartbeater::drop_if_buffered(TaskRun& run) {
  bool dropped = false;
  {
    std::lock_guard lk(e_.mu);
    auto it = std::find_if(e_.buffer.begin(), e_.buffer.end(), [&](const auto& r) { return r.get() == &run; });
    if (it != e_.buffer.end()) {
      e_.buffer.erase(it);
      dropped = true;
    }
  }
  if (dropped) {
    e_.finish(run, Outcome::lease_lost);
    e_.cv_capacity.notify_one();
  }
}

}  // namespace eoq::detail
