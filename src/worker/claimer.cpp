// The claimer: takes leases into the buffer the handlers drain (Engine::kClaimers
// threads run it; the accounting below lets several claims be in flight).
//
// How many to hold is measured, not configured (unless WorkerOptions::prefetch
// fixes it): beyond one lease per handler thread, the claimer keeps as many as
// the handlers finish during two claim round trips. Many short
// tasks therefore make it claim in large batches (each claim returns while the
// previous batch still runs), and slow tasks keep it at about one spare lease,
// so that a worker does not hoard work that idle workers elsewhere could start.
#include "worker/engine.hpp"

#include <algorithm>
#include <cmath>

namespace eoq::detail {

Claimer::Claimer(Engine& e) : e_(e), ahead_(e.opt.prefetch.value_or(0)) {}

// A handler thread that runs batches holds up to a batch of leases at once.
int Claimer::room() const {
  int capacity = e_.opt.concurrency * e_.max_batch + ahead_;
  return capacity - static_cast<int>(e_.buffer.size()) - e_.busy_handlers - e_.batched - claiming_;
}

// Claim when a handler would otherwise idle, or when half the capacity is free:
// a busy worker then takes leases in batches, not one round trip per finished task.
bool Claimer::should_claim() const {
  // Back-pressure: completions that cannot be written must not pile up behind new claims.
  if (e_.completions.size() >= static_cast<std::size_t>(2 * e_.opt.complete_batch)) return false;
  int r = room();
  if (r <= 0) return false;
  if (e_.busy_handlers + static_cast<int>(e_.buffer.size()) < e_.opt.concurrency) return true;
  return r >= std::max(1, (e_.opt.concurrency * e_.max_batch + ahead_) / 2);
}

// After each claim: how long handlers take (their mean run time since the last
// claim) and how long a claim takes set how far ahead to claim: as many leases
// as the handler threads finish during two claim round trips. Handler run time,
// not the pace at which leases leave the buffer, because handlers take leases
// in bursts right after a claim, and short windows around such a burst read
// slow tasks as fast ones.
void Claimer::adapt(Steady::time_point claim_started, int asked) {
  auto now = Steady::now();
  double rtt = std::chrono::duration<double>(now - claim_started).count();
  auto runs = e_.counters.handler_runs.load();
  auto total_us = e_.counters.handler_us_total.load();
  std::lock_guard lk(e_.mu);
  claiming_ -= asked;
  rtt_ = rtt_ == 0 ? rtt : 0.7 * rtt_ + 0.3 * rtt;
  if (e_.opt.prefetch) return;
  if (runs > runs_mark_) {
    // The handlers' mean run time since the last claim; at least a microsecond,
    // since the counters count whole microseconds.
    double mean = std::max(1e-6, static_cast<double>(total_us - us_mark_) / 1e6 / static_cast<double>(runs - runs_mark_));
    run_time_ = run_time_ == 0 ? mean : 0.5 * run_time_ + 0.5 * mean;
    runs_mark_ = runs;
    us_mark_ = total_us;
  }
  if (run_time_ == 0) return;  // nothing ran yet: hold one lease per handler thread
  // The horizon is at least a millisecond: waking threads and settling cost
  // time too, however fast the store answers (MemoryStore: microseconds).
  const double most = 2.0 * e_.opt.claim_batch;
  const double rate = e_.opt.concurrency / run_time_;
  ahead_ = static_cast<int>(std::clamp(std::ceil(rate * 2 * std::max(rtt_, 1e-3)), 0.0, most));
}

void Claimer::run(const std::stop_token& st) {
  ErrorBackoff backoff(e_.opt.error_backoff_initial, e_.opt.error_backoff_max);
  ClaimRequest request{e_.opt.queues, e_.id, 1, e_.opt.lease};
  // Listen before the first claim: a notification sent between an empty first
  // claim and the first wait would go unheard for a whole poll interval.
  try {
    e_.store.wait_for_tasks(e_.opt.queues, Millis(0));
  } catch (const std::exception& e) {
    e_.store_error("waiting for tasks", e);
  }
  while (!st.stop_requested() && !e_.stop_requested) {
    {
      std::unique_lock lk(e_.mu);
      ++waiting_;
      e_.cv_capacity.wait(lk, st, [&] { return e_.stop_requested || should_claim(); });
      --waiting_;
      if (st.stop_requested() || e_.stop_requested) break;
      request.limit = std::min(e_.opt.claim_batch, room());
      claiming_ += request.limit;
    }
    request.after = since_full_ + 1 < kFullClaimEvery ? after_ : std::nullopt;
    std::vector<Lease> leases;
    auto started = Steady::now();
    auto claim_started_at = std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now());
    try {
      leases = e_.store.claim(request);
      backoff.reset();
    } catch (const std::exception& e) {
      {
        std::lock_guard lk(e_.mu);
        claiming_ -= request.limit;
      }
      e_.store_error("claim", e);
      e_.nap(backoff.next(), st);
      continue;
    }
    const bool full = static_cast<int>(leases.size()) == request.limit;
    since_full_ = request.after ? since_full_ + 1 : 0;
    after_.reset();
    if (full) {
      for (const auto& l : leases) {
        ClaimPosition p{l.task.priority, l.task.run_at, l.task.id};
        if (!after_ || *after_ < p) after_ = p;
      }
    }
    if (!leases.empty()) {
      std::vector<std::shared_ptr<TaskRun>> runs;
      runs.reserve(leases.size());
      for (auto& l : leases) runs.push_back(std::make_shared<TaskRun>(e_, std::move(l), started, e_.opt.lease));
      {
        std::lock_guard lk(e_.mu);
        for (auto& run : runs) {
          run->held_at = e_.held.insert(e_.held.end(), run);
          e_.buffer.push_back(run);
        }
      }
      e_.counters.claimed.fetch_add(runs.size());
      e_.counters.in_flight.fetch_add(runs.size());
      if (runs.size() == 1) e_.cv_work.notify_one();
      else e_.cv_work.notify_all();
      e_.log(LogLevel::debug, "claimed {} task(s)", runs.size());
    }
    queue_deep_.store(full, std::memory_order_relaxed);
    adapt(started, request.limit);
    // A short claim that started past a place may have left tasks before it:
    // claim again at once from the front rather than wait.
    if (!full && request.after) continue;
    if (!full && !st.stop_requested() && !e_.stop_requested) {
      // The queues look drained: sleep until a notification, wake() or the poll interval.
      try {
        e_.store.wait_for_tasks(e_.opt.queues, idle_wait(claim_started_at));
      } catch (const std::exception& e) {
        e_.store_error("waiting for tasks", e);
        e_.nap(backoff.next(), st);
      }
    }
  }
  {
    std::lock_guard lk(e_.mu);
    --e_.claimers_running;
  }
  e_.cv_state.notify_all();
}

void Claimer::note_retry(TimePoint at) {
  bool earliest = false;
  {
    std::lock_guard lk(e_.mu);
    if (retries_due_.size() < 100000) {
      retries_due_.push(at.time_since_epoch().count());
      earliest = retries_due_.top() == at.time_since_epoch().count();
    }
  }
  // The claimer may already be waiting out a longer timeout (the store's own
  // notification about this retry can beat us to it): have it recompute.
  if (earliest) e_.wake_store();
}

// How long the idle claimer may wait: the poll interval, or less when one of
// our retries comes due sooner. Retries due before the last claim started had
// their chance in it.
Millis Claimer::idle_wait(TimePoint last_claim) {
  std::lock_guard lk(e_.mu);
  while (!retries_due_.empty() && retries_due_.top() <= last_claim.time_since_epoch().count()) retries_due_.pop();
  if (retries_due_.empty()) return e_.opt.poll_interval;
  auto now = std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now());
  auto wait = std::chrono::ceil<Millis>(std::chrono::microseconds(retries_due_.top()) - now.time_since_epoch());
  return std::clamp(wait + Millis(1), Millis(1), e_.opt.poll_interval);
}

}  // namespace eoq::detail
