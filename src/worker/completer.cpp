// Settlement: the one path from a handler's verdict to a store call to a
// counter. Failures, and successes whose handler opened a transaction, settle
// on the handler's thread (their store call commits the handler's own writes);
// plain successes go to the completer threads, which settle many per round trip.
#include "worker/engine.hpp"

namespace eoq::detail {

bool Completer::settle(TaskRun& run, const Verdict& verdict) {
  switch (verdict.kind) {
    case Verdict::Kind::lease_lost:
      run.drop_transaction();
      e_.finish(run, Outcome::lease_lost);
      return true;
    case Verdict::Kind::failed:
      // A failed handler's writes must not commit: roll back, then record the
      // failure outside the transaction.
      run.drop_transaction();
      settle_failure(run, verdict.failure, verdict.expected);
      return true;
    case Verdict::Kind::cancelled:
      run.drop_transaction();  // a stopped handler's writes do not commit
      settle_cancelled(run, verdict.reason);
      return true;
    case Verdict::Kind::snoozed:
      run.drop_transaction();  // the attempt did not happen: neither do its writes
      settle_snoozed(run, verdict.delay);
      return true;
    case Verdict::Kind::settled:
      return true;
    case Verdict::Kind::overdue:
      run.drop_transaction();  // the watchdog failed the attempt: nothing of the handler's commits
      return true;
    case Verdict::Kind::succeeded:
      if (!run.tx) return false;
      settle_transaction(run);
      return true;
  }
  return true;
}

// The store's clock decides: the claim's time plus the steady time since the
// claim was sent (an overestimate, so a late task is never let through); only a
// task that looks overdue costs a store call.
bool Completer::expired_at_handoff(TaskRun& run) {
  const auto& deadline = run.lease.task.deadline;
  if (!deadline) return false;
  auto waited = std::chrono::duration_cast<std::chrono::microseconds>(Steady::now() - run.claim_sent);
  if (run.lease.claimed_at + waited < *deadline) return false;
  try {
    if (!e_.store.expire_if_overdue(run.lease)) return false;
    e_.log(LogLevel::info, "{}: deadline passed while it waited for a handler; expired, not started",
           run.describe());
    e_.finish(run, Outcome::expired);
  } catch (const LeaseLost& e) {
    e_.log(LogLevel::warning, "{}: {}", run.describe(), e.what());
    e_.finish(run, Outcome::lease_lost);
  } catch (const std::exception& e) {
    // Unreachable store: the lease runs out and the next claim expires the task.
    e_.store_error(fmt::format("{}: expiring at its deadline", run.describe()), e);
    e_.finish(run, Outcome::abandoned);
  }
  return true;
}

// The handler stopped on purpose (Cancelled): the task ends cancelled, quietly.
// The store retries transient errors itself; if it still cannot be reached the
// lease runs out and the task runs again (or ends cancelled, if a cancel was
// requested), so nothing is lost.
void Completer::settle_cancelled(TaskRun& run, const std::string& reason) {
  try {
    e_.store.cancel_running(run.lease, reason);
    e_.log(LogLevel::info, "{} cancelled by its handler: {}", run.describe(), reason);
    e_.finish(run, Outcome::cancelled);
  } catch (const LeaseLost& e) {
    e_.log(LogLevel::warning, "{}: cancellation not recorded: {}", run.describe(), e.what());
    e_.finish(run, Outcome::lease_lost);
  } catch (const std::exception& e) {
    e_.store_error(fmt::format("{}: recording the cancellation", run.describe()), e);
    e_.finish(run, Outcome::abandoned);
  }
}

// The handler put its task off (Snooze). Transient store errors are retried
// while the lease lasts: given up, the lease runs out and the task runs again
// with the attempt counted, which is what a snooze was meant to avoid.
void Completer::settle_snoozed(TaskRun& run, Millis delay) {
  ErrorBackoff backoff(e_.opt.error_backoff_initial, e_.opt.error_backoff_max);
  for (;;) {
    try {
      auto out = e_.store.snooze(run.lease, delay);
      if (out.status == TaskStatus::cancelled) {
        e_.log(LogLevel::info, "{} cancelled (it was snoozing)", run.describe());
        e_.finish(run, Outcome::cancelled);
        return;
      }
      if (out.retry_at) e_.claimer.note_retry(*out.retry_at);
      e_.log(LogLevel::info, "{} snoozed for {} ms", run.describe(), delay.count());
      e_.finish(run, Outcome::snoozed);
      return;
    } catch (const LeaseLost& e) {
      e_.log(LogLevel::warning, "{}: snooze not recorded: {}", run.describe(), e.what());
      e_.finish(run, Outcome::lease_lost);
      return;
    } catch (const std::exception& e) {
      e_.store_error(fmt::format("{}: recording the snooze", run.describe()), e);
      if (!is_transient(e) || e_.give_up || run.locally_expired(Steady::now())) {
        e_.finish(run, Outcome::abandoned);
        return;
      }
      e_.nap(backoff.next(), {});
    }
  }
}

// `expected`: a PermanentError the handler threw on purpose, logged at info;
// other permanent failures (no handler, attempts used up) are warnings.
void Completer::settle_failure(TaskRun& run, const Failure& failure, bool expected) {
  ErrorBackoff backoff(e_.opt.error_backoff_initial, e_.opt.error_backoff_max);
  for (;;) {
    try {
      auto out = e_.store.fail(run.lease, failure);
      if (out.status == TaskStatus::pending) {
        if (out.retry_at) e_.claimer.note_retry(*out.retry_at);
        e_.log(LogLevel::info, "{} failed, will retry: {}", run.describe(), failure.error);
        e_.finish(run, Outcome::retried);
      } else if (out.status == TaskStatus::cancelled) {
        e_.log(LogLevel::info, "{} cancelled", run.describe());
        e_.finish(run, Outcome::cancelled);
      } else {
        e_.log(expected ? LogLevel::info : LogLevel::warning, "{} failed{}: {}", run.describe(),
               failure.permanent ? " permanently" : "", failure.error);
        e_.finish(run, Outcome::failed);
      }
      return;
    } catch (const LeaseLost& e) {
      if (run.in_doubt) {
        if (auto o = settled_by_us(run)) {
          e_.finish(run, *o);
          return;
        }
      }
      e_.log(LogLevel::warning, "{}: failure not recorded: {}", run.describe(), e.what());
      e_.finish(run, Outcome::lease_lost);
      return;
    } catch (const std::exception& e) {
      e_.store_error(fmt::format("{}: recording the failure", run.describe()), e);
      if (dynamic_cast<const CommitInDoubt*>(&e)) run.in_doubt = true;
      if (!is_transient(e) || e_.give_up || run.locally_expired(Steady::now())) {
        e_.finish(run, Outcome::abandoned);
        return;
      }
      e_.nap(backoff.next(), {});
    }
  }
}

BatchSettled Completer::settle_batch(LeaseTransaction& tx, std::span<TaskRun* const> runs) {
  std::vector<Completion> completions;
  completions.reserve(runs.size());
  for (TaskRun* r : runs) completions.push_back(Completion{&r->lease, r->result});
  try {
    tx.complete_all(completions);
    e_.finish(runs, Outcome::succeeded);
    return {};
  } catch (const LeaseLost& e) {
    for (TaskRun* r : runs)
      if (r->lease.task.id == e.task_id()) {
        e_.log(LogLevel::warning, "{}: completion rejected, the batch's writes rolled back: {}", r->describe(),
               e.what());
        r->lost = true;
        e_.finish(*r, Outcome::lease_lost);
        return {r, false};
      }
    e_.store_error("completing a batch", e);  // a stale lease the batch did not hold: cannot happen
  } catch (const CommitInDoubt& e) {
    e_.store_error(fmt::format("completing a batch of {} (from {})", runs.size(), runs.front()->describe()), e);
    // One commit: every task's outcome is the first one's.
    if (auto o = settled_by_us(*runs.front()); o == Outcome::succeeded) {
      e_.finish(runs, Outcome::succeeded);
      return {};
    }
  } catch (const TransientError& e) {
    e_.store_error(fmt::format("completing a batch of {} (from {})", runs.size(), runs.front()->describe()), e);
  } catch (const InvalidArgument& refused) {
    // A result the store refuses (too large): each runs alone, where it fails only its own task.
    e_.log(LogLevel::info, "a batch of {} (from {}) was refused at its completion, each task runs alone: {}",
           runs.size(), runs.front()->describe(), refused.what());
    return {nullptr, true};
  } catch (const DatabaseError& e) {
    // Some task's own work was refused at the end (a statement it sent, a
    // deferred constraint), and which one is not known: each runs alone.
    e_.log(LogLevel::info, "a batch of {} (from {}) failed at its commit, each task runs alone: {}", runs.size(),
           runs.front()->describe(), e.what());
    return {nullptr, true};
  } catch (const std::exception& e) {
    e_.store_error(fmt::format("completing a batch of {} (from {})", runs.size(), runs.front()->describe()), e);
  }
  // The writes did not commit and cannot be replayed from here: the tasks go
  // back to run again.
  for (TaskRun* r : runs) give_back(*r, "its batch's completion could not be committed");
  return {};
}

void Completer::settle_transaction(TaskRun& run) {
  if (!run.tx->open()) {
    // A statement failed, the handler caught its error and returned: the
    // transaction is gone with the handler's writes, so the task failed.
    run.drop_transaction();
    settle_failure(run, Failure{"a statement in the task's transaction failed and the handler returned anyway", false},
                   false);
    return;
  }
  try {
    run.tx->complete(run.result);
    run.drop_transaction();
    e_.finish(run, Outcome::succeeded);
    return;
  } catch (const LeaseLost& e) {
    run.drop_transaction();
    e_.log(LogLevel::warning, "{}: completion rejected, its writes rolled back: {}", run.describe(), e.what());
    e_.finish(run, Outcome::lease_lost);
    return;
  } catch (const CommitInDoubt& e) {
    run.drop_transaction();
    e_.store_error(fmt::format("{}: completing", run.describe()), e);
    if (auto o = settled_by_us(run)) {
      e_.finish(run, *o);
      return;
    }
  } catch (const TransientError& e) {
    run.drop_transaction();
    e_.store_error(fmt::format("{}: completing", run.describe()), e);
  } catch (const InvalidArgument& e) {
    // The handler's result broke a rule of the store (its size): the handler's
    // failure, or giving the task back would repeat it for ever.
    run.drop_transaction();
    settle_failure(run, Failure{e.what(), false}, false);
    return;
  } catch (const DatabaseError& e) {
    // The server refused the handler's own work at the end (a statement it
    // sent, a deferred constraint at COMMIT): the handler's failure, settled
    // by its retry policy like a throw. Giving the task back would repeat it
    // for ever without counting an attempt.
    run.drop_transaction();
    settle_failure(run, Failure{e.what(), false}, false);
    return;
  } catch (const std::exception& e) {
    run.drop_transaction();
    e_.store_error(fmt::format("{}: completing", run.describe()), e);
  }
  // The handler's writes did not commit and cannot be replayed from here: hand
  // the task back so it runs again from its last checkpoint.
  give_back(run, "its completion could not be committed");
}

// The task becomes pending again at once and the interrupted attempt does not
// count. If the handler is still running, its lease is gone from now on and
// whatever it does later is discarded.
void Completer::give_back(TaskRun& run, std::string_view why) {
  run.heartbeats_off = true;
  // Before the call, so a handler returning meanwhile discards its outcome
  // instead of racing the release with a completion.
  run.lost = true;
  try {
    e_.store.release(run.lease);
    e_.log(LogLevel::info, "{}: lease given back ({})", run.describe(), why);
    e_.finish(run, Outcome::released);
  } catch (const LeaseLost&) {
    e_.finish(run, Outcome::lease_lost);
  } catch (const std::exception& e) {
    e_.store_error(fmt::format("{}: giving the lease back", run.describe()), e);
    e_.finish(run, Outcome::abandoned);  // the lease runs out on its own
  }
  run.notify();
}

void Completer::give_back(std::span<const std::shared_ptr<TaskRun>> runs, std::string_view why) {
  if (runs.empty()) return;
  if (runs.size() == 1) return give_back(*runs.front(), why);
  std::vector<Lease> leases;
  leases.reserve(runs.size());
  for (const auto& run : runs) {
    run->heartbeats_off = true;
    run->lost = true;
    leases.push_back(run->lease);
  }
  std::vector<TaskRun*> given, lost;
  try {
    auto applied = e_.store.release_batch(leases);
    for (std::size_t i = 0; i < runs.size(); ++i) (i < applied.size() && applied[i] ? given : lost).push_back(runs[i].get());
    e_.log(LogLevel::info, "{} lease(s) given back ({})", given.size(), why);
    e_.finish(given, Outcome::released);
    e_.finish(lost, Outcome::lease_lost);
  } catch (const std::exception& e) {
    e_.store_error(fmt::format("giving {} lease(s) back", runs.size()), e);
    std::vector<TaskRun*> all;
    for (const auto& run : runs) all.push_back(run.get());
    e_.finish(all, Outcome::abandoned);  // the leases run out on their own
  }
  for (const auto& run : runs) run->notify();
}

// After a COMMIT in doubt: did our settlement land? It did if the row moved
// exactly one version past our token and left `running` (a new owner would
// have moved it at least one version by its claim, and another by settling).
std::optional<Outcome> Completer::settled_by_us(TaskRun& run) {
  try {
    auto task = e_.store.get(run.lease.task.id);
    if (!task || task->version != run.lease.token + 1 || task->status == TaskStatus::running) return std::nullopt;
    switch (task->status) {
      case TaskStatus::succeeded: return Outcome::succeeded;
      case TaskStatus::pending: return Outcome::retried;
      case TaskStatus::cancelled: return Outcome::cancelled;
      default: return Outcome::failed;
    }
  } catch (const std::exception& e) {
    e_.store_error(fmt::format("{}: checking an in-doubt settlement", run.describe()), e);
    return std::nullopt;
  }
}

void Completer::run(const std::stop_token& st) {
  ErrorBackoff backoff(e_.opt.error_backoff_initial, e_.opt.error_backoff_max);
  std::vector<std::shared_ptr<TaskRun>> batch;
  for (;;) {
    batch.clear();
    bool wake_claimer = false, wake_other = false;
    {
      std::unique_lock lk(e_.mu);
      e_.cv_complete.wait(lk, st, [&] { return !e_.completions.empty(); });
      if (e_.completions.empty()) break;  // stop requested and nothing left
      auto n = std::min(e_.completions.size(), static_cast<std::size_t>(e_.opt.complete_batch));
      auto end = e_.completions.begin() + static_cast<std::ptrdiff_t>(n);
      batch.assign(std::make_move_iterator(e_.completions.begin()), std::make_move_iterator(end));
      e_.completions.erase(e_.completions.begin(), end);
      // More than one batch waiting: the other completer takes the next in parallel.
      wake_other = !e_.completions.empty();
      wake_claimer = e_.claimer.should_wake();
    }
    if (wake_other) e_.cv_complete.notify_one();
    if (wake_claimer) e_.cv_capacity.notify_one();
    if (flush(batch)) {
      backoff.reset();
      continue;
    }
    // A transient error: keep what can still be settled, in front, and retry after a pause.
    auto now = Steady::now();
    std::vector<std::shared_ptr<TaskRun>> retry;
    for (auto& run : batch) {
      if (run->lost) e_.finish(*run, Outcome::lease_lost);
      else if (e_.give_up || run->locally_expired(now)) {
        e_.log(LogLevel::warning, "{}: completion could not be recorded before the lease ran out", run->describe());
        e_.finish(*run, Outcome::abandoned);
      } else retry.push_back(run);
    }
    if (!retry.empty()) {
      std::lock_guard lk(e_.mu);
      e_.completions.insert(e_.completions.begin(), retry.begin(), retry.end());
    }
    e_.nap(backoff.next(), {});
  }
  {
    std::lock_guard lk(e_.mu);
    --e_.completers_running;
  }
  e_.cv_state.notify_all();
}

// Settles a batch in one round trip. False: a transient error, nothing settled, retry.
bool Completer::flush(std::vector<std::shared_ptr<TaskRun>>& batch) {
  std::vector<Completion> items;
  items.reserve(batch.size());
  for (auto& run : batch) items.push_back(Completion{&run->lease, run->result});
  std::vector<bool> applied;
  try {
    applied = e_.store.complete_batch(items);
  } catch (const std::exception& e) {
    e_.store_error(fmt::format("completing {} task(s)", batch.size()), e);
    if (dynamic_cast<const CommitInDoubt*>(&e))
      for (auto& run : batch) run->in_doubt = true;
    if (is_transient(e)) return false;
    // Not worth retrying as a batch (a bad row?): settle one by one so one
    // task cannot hold the others back.
    for (auto& run : batch) complete_one(*run);
    return true;
  }
  std::vector<TaskRun*> done;
  done.reserve(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) {
    auto& run = *batch[i];
    if (i < applied.size() && applied[i]) {
      done.push_back(&run);
    } else if (auto o = run.in_doubt ? settled_by_us(run) : std::nullopt) {
      e_.finish(run, *o);
    } else {
      e_.log(LogLevel::warning, "{}: completion rejected, the lease was lost", run.describe());
      e_.finish(run, Outcome::lease_lost);
    }
  }
  e_.finish(done, Outcome::succeeded);
  return true;
}

void Completer::complete_one(TaskRun& run) {
  try {
    e_.store.complete(run.lease, run.result);
    e_.finish(run, Outcome::succeeded);
  } catch (const LeaseLost& e) {
    e_.log(LogLevel::warning, "{}: completion rejected: {}", run.describe(), e.what());
    e_.finish(run, Outcome::lease_lost);
  } catch (const std::exception& e) {
    e_.store_error(fmt::format("{}: completing", run.describe()), e);
    e_.finish(run, Outcome::abandoned);
  }
}

}  // namespace eoq::detail
