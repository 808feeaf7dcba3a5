// The watchdog: one thread that times the handlers that have a time limit.
// At the timeout it tells the handler (ctx.timed_out()); when the grace
// period has passed as well, it ends the attempt itself, failed with
// "timeout", while the handler still runs, and the handler's own outcome is
// discarded whenever it returns. Its thread stays busy until then: a C++
// function cannot be stopped from outside.
//
// Nothing the handler wrote in the task's transaction can commit after that:
//   - its transaction commits only with the task's completion (or a
//     checkpoint), both fenced on the lease's version, which the failure moves
//     on; on Postgres the completion then raises EQ001 on the server before
//     its COMMIT, and the worker does not even send it (the race below);
//   - first the watchdog interrupts that transaction (on Postgres a cancel
//     request for a statement the handler waits in, LeaseLost for every
//     later call, its connection closed rather than pooled), so a handler
//     stuck in SQL returns and its row locks go with its transaction.
// The failure does not wait for the handler's transaction either: that
// transaction locks the task's row only in its settling statements, which a
// handler still running does not send, except ctx.checkpoint (refused here
// once the lease is going; one in flight holds the row for a round trip). A
// handler whose own SQL locks eoq's rows and then sits idle holds the failure
// until the server ends its transaction (PostgresOptions::handler_idle_timeout).
#include "worker/engine.hpp"

namespace eoq::detail {

void Watchdog::arm(TaskRun& run, Millis limit) {
  run.timed_out = false;
  run.race = TaskRun::kInHandler;
  bool earliest;
  {
    std::lock_guard lk(mu_);
    run.watched = due_.emplace(Steady::now() + limit, run.weak_from_this());
    earliest = *run.watched == due_.begin();
  }
  if (earliest) cv_.notify_one();
}

bool Watchdog::disarm(TaskRun& run) {
  {
    std::lock_guard lk(mu_);
    if (run.watched) due_.erase(*run.watched);
    run.watched.reset();
  }
  int expected = TaskRun::kInHandler;
  return run.race.compare_exchange_strong(expected, TaskRun::kReturned);
}

void Watchdog::run(const std::stop_token& st) {
  std::unique_lock lk(mu_);
  while (!st.stop_requested()) {
    if (due_.empty()) {
      cv_.wait(lk, st, [&] { return !due_.empty(); });
      continue;
    }
    const auto at = due_.begin()->first;
    if (Steady::now() < at) {
      // Woken early by an earlier deadline (or by nothing: the loop looks again).
      cv_.wait_until(lk, st, at, [&] { return due_.empty() || due_.begin()->first < at; });
      continue;
    }
    auto run = due_.begin()->second.lock();
    due_.erase(due_.begin());
    if (!run) continue;  // an armed run is disarmed before it can go; defensive only
    run->watched.reset();
    if (!run->timed_out.exchange(true)) {
      // The timeout: the handler should stop now; it has the grace period to return.
      run->watched = due_.emplace(Steady::now() + e_.opt.timeout_grace, run);
      lk.unlock();
      e_.log(LogLevel::info, "{}: past its timeout; its handler is asked to stop", run->describe());
      run->notify();
      lk.lock();
      continue;
    }
    lk.unlock();
    fail_overdue(run);
    lk.lock();
  }
}

// The grace period has passed and the handler has not returned.
void Watchdog::fail_overdue(const std::shared_ptr<TaskRun>& run) {
  int expected = TaskRun::kInHandler;
  if (!run->race.compare_exchange_strong(expected, TaskRun::kOverdue)) return;  // it returned just now
  // From here the lease is being ended: no more heartbeats, and the handler's
  // ctx calls (checkpoint) see it gone before they reach the store.
  run->heartbeats_off = true;
  const bool was_lost = run->lost.exchange(true);
  // A handler waiting in a statement is let go, and its locks with its
  // transaction, before the failure, which could otherwise wait behind a
  // lock the handler holds on the task's row.
  const auto companions = run->interrupt();
  if (was_lost) {
    e_.finish(*run, Outcome::lease_lost);  // the store had fenced it off already: nothing to fail
  } else {
    settle(*run);
  }
  run->notify();
  // The rest of its batch would wait for the stuck thread: back to the queue
  // with them, their attempts not counted (their writes were in the batch's
  // transaction, which will not commit).
  if (!companions.empty()) e_.completer.give_back(companions, "its batch's handler thread is stuck past a timeout");
}

// The attempt fails with "timeout", by the task's retry policy.
void Watchdog::settle(TaskRun& run) {
  const Failure timeout{"timeout", false};
  try {
    auto out = e_.store.fail(run.lease, timeout);
    const auto late = e_.opt.timeout_grace.count();
    if (out.status == TaskStatus::pending) {
      if (out.retry_at) e_.claimer.note_retry(*out.retry_at);
      e_.log(LogLevel::warning, "{}: handler still running {} ms after its timeout; attempt failed (timeout), "
             "will retry; the handler's outcome will be discarded", run.describe(), late);
      e_.finish(run, Outcome::retried);
    } else if (out.status == TaskStatus::cancelled) {
      e_.log(LogLevel::info, "{} cancelled (its handler ran past its timeout)", run.describe());
      e_.finish(run, Outcome::cancelled);
    } else {
      e_.log(LogLevel::warning, "{}: handler still running {} ms after its timeout; attempt failed (timeout), "
             "no attempts left; the handler's outcome will be discarded", run.describe(), late);
      e_.finish(run, Outcome::failed);
    }
  } catch (const LeaseLost& e) {
    e_.log(LogLevel::warning, "{}: timeout not recorded: {}", run.describe(), e.what());
    e_.finish(run, Outcome::lease_lost);
  } catch (const std::exception& e) {
    // With heartbeats off the lease runs out, and the next claim counts the attempt.
    e_.store_error(fmt::format("{}: recording its timeout", run.describe()), e);
    e_.finish(run, Outcome::abandoned);
  }
}

}  // namespace eoq::detail
