// The executor: the handler threads. Each takes a lease from the buffer, runs
// the handler, and hands the verdict to settlement. A plain success is queued
// for the completers in the same critical section that takes the next lease,
// so a short task costs one lock round, not three.
#include "worker/engine.hpp"

#include "common/validate.hpp"

namespace eoq::detail {

LeaseTransaction& TaskRun::transaction() {
  if (batch_tx) return *batch_tx;
  if (!tx) {
    auto opened = engine->store.begin(lease, tx_options);
    std::lock_guard lk(tx_mu);
    tx = std::move(opened);
  }
  return *tx;
}

void Executor::run(const std::stop_token& st) {
  current_handler_engine = &e_;
  std::shared_ptr<TaskRun> run, queued;  // queued: a plain success for the completers
  std::vector<std::shared_ptr<TaskRun>> batch;  // HandlerOptions::batch: run's companions
  const Registered* batch_reg = nullptr;
  bool ran = false;
  auto take = [&] {
    run = std::move(e_.buffer.front());
    e_.buffer.pop_front();
    ++e_.busy_handlers;
    if (e_.max_batch <= 1) return;  // no type batches: no lookup under the lock
    auto reg = e_.handlers.find(run->lease.task.type);
    if (reg == e_.handlers.end() || reg->second.batch <= 1) return;
    // The rest of the batch: the buffer's next leases of the same type.
    batch_reg = &reg->second;
    batch.push_back(std::move(run));
    for (auto it = e_.buffer.begin(); it != e_.buffer.end() && static_cast<int>(batch.size()) < batch_reg->batch;) {
      if ((*it)->lease.task.type == batch.front()->lease.task.type) {
        batch.push_back(std::move(*it));
        it = e_.buffer.erase(it);
      } else {
        ++it;
      }
    }
    e_.batched += static_cast<int>(batch.size()) - 1;
  };
  for (;;) {
    bool wake_completer = false, wake_claimer = false, wake_stop = false;
    {
      std::lock_guard lk(e_.mu);
      if (ran) {
        --e_.busy_handlers;
        if (queued) {
          // The completers wait only for an empty queue; whoever makes it non-empty wakes one.
          wake_completer = e_.completions.empty();
          e_.completions.push_back(std::move(queued));
        }
        wake_stop = e_.stop_requested;  // only stop() waits for busy_handlers, after setting it
        ran = false;
      }
      // Once stopping, nothing new starts: stop() gives the buffered leases back.
      if (!e_.buffer.empty() && !e_.stopping) take();
      wake_claimer = e_.claimer.should_wake();
    }
    if (wake_completer) e_.cv_complete.notify_one();
    if (wake_claimer) e_.cv_capacity.notify_one();
    if (wake_stop) e_.cv_state.notify_all();
    if (!run && batch.empty()) {
      std::unique_lock lk(e_.mu);
      if (!e_.cv_work.wait(lk, st, [&] { return !e_.buffer.empty() && !e_.stopping; })) return;
      take();
    }
    ran = true;
    if (!batch.empty()) {
      const int extra = static_cast<int>(batch.size()) - 1;
      execute_batch(batch, *batch_reg);
      batch.clear();
      std::lock_guard lk(e_.mu);
      e_.batched -= extra;
      continue;
    }
    auto verdict = execute(*run);
    if (!e_.completer.settle(*run, verdict)) queued = run;
    run.reset();
  }
}

// Runs a batch in one transaction: each handler in turn, then every
// completion and the COMMIT together. A handler that does not succeed (or that
// leaves the transaction broken) ends the attempt: the transaction rolls back,
// that task is settled alone by its verdict, and the rest run again in a new
// one. A lease found stale at completion does the same without its task. Each
// round settles at least one run, so the loop ends.
void Executor::execute_batch(std::vector<std::shared_ptr<TaskRun>>& runs, const Registered& reg) {
  std::vector<TaskRun*> todo;
  todo.reserve(runs.size());
  for (auto& r : runs) todo.push_back(r.get());
  // Each of `some` again in a transaction of its own (alone() wants its shared_ptr).
  auto each_alone = [&](const std::vector<TaskRun*>& some) {
    for (TaskRun* r : some)
      for (auto& held : runs)
        if (held.get() == r) alone(held);
  };
  for (;;) {
    // A lease settled meanwhile (given back by stop(), failed by the watchdog) is not run again.
    std::erase_if(todo, [](TaskRun* r) { return r->taken(); });
    if (todo.empty()) return;
    if (e_.give_up) {
      // Past the shutdown deadline: what the batch still holds goes back now, not after another round.
      for (TaskRun* r : todo) e_.completer.give_back(*r, "its batch was still running at the shutdown deadline");
      return;
    }
    std::unique_ptr<LeaseTransaction> tx;
    try {
      tx = e_.store.begin(todo.front()->lease, reg.tx);
    } catch (const std::exception& e) {
      // As a handler whose ctx.exec could not reach the store: each fails and retries.
      for (TaskRun* r : todo) e_.completer.settle(*r, {Verdict::Kind::failed, Failure{e.what(), false}});
      return;
    }
    std::vector<TaskRun*> ran;
    std::size_t i = 0;
    std::optional<std::pair<TaskRun*, Verdict>> culprit;
    for (; i < todo.size(); ++i) {
      TaskRun& r = *todo[i];
      r.result = "null";  // a run again starts afresh
      r.share(tx.get(), &runs);
      Verdict v = execute(r);
      r.share(nullptr, nullptr);
      r.tx_view.reset();
      if (v.kind == Verdict::Kind::settled) continue;  // ended at hand-off, never started
      // A broken transaction may be another task's doing (a statement it sent
      // fails on this one's exec), whatever this handler made of the error.
      if (v.kind == Verdict::Kind::succeeded && !tx->open())
        v = {Verdict::Kind::failed,
             Failure{"a statement failed in the batch's transaction and the handler went on", false}, false, {},
             true};
      else if (v.kind != Verdict::Kind::succeeded && !tx->open())
        v.database = true;
      if (v.kind != Verdict::Kind::succeeded) {
        culprit.emplace(&r, std::move(v));
        ++i;
        break;
      }
      ran.push_back(&r);
    }
    if (culprit && culprit->second.database) {
      // A failed statement may have been sent by an earlier task of the
      // round (TaskContext::send goes out with the next statement): which
      // task it belongs to is not known, so each runs in a transaction of
      // its own, where its errors are its own.
      tx.reset();
      each_alone(todo);
      return;
    }
    if (culprit) {
      tx.reset();  // rolls back every task's writes of this round
      e_.completer.settle(*culprit->first, culprit->second);
      ran.insert(ran.end(), todo.begin() + static_cast<std::ptrdiff_t>(i), todo.end());
      todo = std::move(ran);
      continue;
    }
    if (ran.empty()) return;
    auto left = e_.completer.settle_batch(*tx, ran);
    if (left.alone) {
      tx.reset();
      each_alone(ran);
      return;
    }
    if (!left.stale) return;
    std::erase(ran, left.stale);
    todo = std::move(ran);
  }
}

// One task of a batch in a transaction of its own, settled at once: as run()
// does it, a plain success queued for the completers.
void Executor::alone(const std::shared_ptr<TaskRun>& run) {
  if (run->taken()) return;
  run->result = "null";
  auto verdict = execute(*run);
  if (e_.completer.settle(*run, verdict)) return;
  bool wake;
  {
    std::lock_guard lk(e_.mu);
    wake = e_.completions.empty();
    e_.completions.push_back(run);
  }
  if (wake) e_.cv_complete.notify_one();
}

Verdict Executor::execute(TaskRun& run) {
  if (run.lost) {
    e_.log(LogLevel::warning, "{}: lease lost before the handler started; skipped", run.describe());
    return {Verdict::Kind::lease_lost};
  }
  if (e_.completer.expired_at_handoff(run)) return {Verdict::Kind::settled};
  auto handler = e_.handlers.find(run.lease.task.type);
  if (handler == e_.handlers.end())
    return {Verdict::Kind::failed,
            Failure{fmt::format("no handler registered for task type '{}' on worker {}", run.lease.task.type, e_.id),
                    true}};

  std::optional<Failure> failure;
  std::optional<std::string> stopped;  // the handler threw Cancelled
  bool expected = false;                // a PermanentError: the handler's own verdict, not a fault
  bool database = false;                // a DatabaseError reached the handler's caller
  auto started = Steady::now();
  run.tx_options = handler->second.tx;
  run.snooze.reset();  // a batch's run again starts afresh
  const auto limit = run.lease.task.timeout ? run.lease.task.timeout : handler->second.timeout;
  if (limit) e_.watchdog.arm(run, *limit);
  run.in_handler = true;
  try {
    TaskContext ctx(run);
    handler->second.handler(ctx);
  } catch (const SnoozeRequest&) {
    // ctx.snooze recorded it in run.snooze.
  } catch (const Cancelled& e) {
    stopped = e.what();
  } catch (const Snooze& e) {
    try {
      validate_snooze_delay(e.delay());
      run.snooze = e.delay();
    } catch (const InvalidArgument& bad) {
      failure = Failure{fmt::format("eoq::Snooze: {}", bad.what()), false};
    }
  } catch (const PermanentError& e) {
    failure = Failure{e.what(), true};
    expected = true;
  } catch (const LeaseLost& e) {
    run.lost = true;
    e_.log(LogLevel::warning, "{}: {}", run.describe(), e.what());
  } catch (const DatabaseError& e) {
    failure = Failure{e.what(), false};
    database = true;
  } catch (const std::exception& e) {
    failure = Failure{e.what(), false};
  } catch (...) {
    failure = Failure{"handler threw a non-standard exception", false};
  }
  run.in_handler = false;
  const bool overdue = limit && !e_.watchdog.disarm(run);
  e_.record_duration(Steady::now() - started);

  if (overdue) {
    e_.log(LogLevel::warning, "{}: handler returned after its attempt was failed for its timeout; its outcome is "
           "discarded", run.describe());
    return {Verdict::Kind::overdue};
  }

  if (run.lost) {
    if (!run.settled)
      e_.log(LogLevel::warning, "{}: lease lost while the handler ran; its outcome is discarded", run.describe());
    return {Verdict::Kind::lease_lost};
  }
  // ctx.snooze is the handler's word, whatever it threw or returned after it.
  if (run.snooze) return {Verdict::Kind::snoozed, {}, false, {}, false, *run.snooze};
  if (failure) return {Verdict::Kind::failed, std::move(*failure), expected, {}, database};
  if (stopped) return {Verdict::Kind::cancelled, {}, false, std::move(*stopped)};
  return {Verdict::Kind::succeeded};
}

}  // namespace eoq::detail

// ------------------------------------------------------------------ TaskContext

namespace eoq {

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
  if (run_->batch_tx)
    throw UsageError("ctx.checkpoint: not in a batch (HandlerOptions::batch), whose commit is the batch's");
  // A checkpoint commits the handler's writes: not once the lease is known to be going.
  if (run_->lost) throw LeaseLost(run_->lease.id(), run_->lease.token, "ctx.checkpoint: the lease is lost or ended");
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
  if (!run_->tx_view) run_->tx_view.emplace(run_->transaction());
  return *run_->tx_view;
}

Rows TaskContext::exec(std::string_view sql, const Params& params) { return transaction().exec(sql, params); }
void TaskContext::send(std::string_view sql, const Params& params) { transaction().send(sql, params); }
bool TaskContext::in_transaction() const noexcept { return run_->tx_view.has_value(); }

SubmitResult TaskContext::submit(const NewTask& task) {
  transaction();
  return run_->transaction().submit(task);
}

std::vector<SubmitResult> TaskContext::submit_batch(std::span<const NewTask> tasks) {
  transaction();
  return run_->transaction().submit_batch(tasks);
}

std::vector<Relative> TaskContext::parent_results() const {
  return run_->engine->store.relatives(run_->lease.task.id).parents;
}
void TaskContext::snooze(Millis delay) {
  detail::validate_snooze_delay(delay);
  run_->snooze = delay;
  throw detail::SnoozeRequest{};
}

bool TaskContext::cancelled() const noexcept { return run_->cancel.load(); }
bool TaskContext::stopping() const noexcept { return run_->engine->stopping.load(); }
bool TaskContext::lease_lost() const noexcept { return run_->lost.load(); }
bool TaskContext::timed_out() const noexcept { return run_->timed_out.load(); }

bool TaskContext::sleep_for(Millis duration) {
  std::unique_lock lk(run_->wake_mu);
  run_->wake_cv.wait_for(lk, duration, [&] { return should_stop(); });
  return !should_stop();
}

void TaskContext::log(LogLevel level, std::string_view message) const {
  run_->engine->log(level, "{}: {}", run_->describe(), message);
}

}  // namespace eoq
