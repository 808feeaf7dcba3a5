// The TaskStore contract in process memory. One mutex guards all state, so each
// call is one critical section: what a single fenced statement is on Postgres.
// The store's clock is detail::now(), read inside the critical section so that
// times and ids advance together.
#include <eoq/memory_store.hpp>

#include "common/validate.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <deque>
#include <cctype>
#include <condition_variable>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <tuple>
#include <utility>

namespace eoq {

namespace {

constexpr int kRetentionBatch = 1000;
constexpr TaskId kMinId = std::numeric_limits<TaskId>::min();

// Leases, extensions and retry delays are chosen by callers and may be huge;
// saturate instead of overflowing the microsecond clock.
TimePoint plus(TimePoint t, Millis d) {
  if (d.count() > 0 && std::chrono::duration_cast<Millis>(TimePoint::max() - t) < d) return TimePoint::max();
  return t + d;
}

// One task and what history() and workflows need beyond the task row.
struct Entry {
  Task task;
  TimePoint started_at{};        // of the attempt in progress
  std::vector<Attempt> history;  // attempts that have ended, oldest first
  std::vector<TaskId> parents;   // as named at submit
  std::vector<TaskId> children;  // tasks that named this one as a parent
  // Parents that have not ended yet. Each leaves this set once, when it first
  // ends, so a parent retried after it failed is never counted twice.
  std::set<TaskId> waiting_on;
  ParentFailure on_parent_failure = ParentFailure::cancel;
};

// A task accepted by a submit but not yet created: a batch being checked, or
// the tasks a handler submitted in its transaction, created when it commits.
struct Staged {
  NewTask n;
  TaskId id = 0;  // reserved when staged
  std::vector<TaskId> parents;
};
struct Staging {
  std::vector<Staged> tasks;
  std::map<std::tuple<std::string, std::string, std::string>, std::size_t> keys;  // index into tasks
};

// Indexes over the tasks, each holding only the tasks it serves, so that claim,
// lease recovery, expiry and retention never walk tasks they cannot act on.
using PendingKey = std::tuple<std::string, int, TimePoint, TaskId>;  // queue, priority, run_at, id
using LeaseKey = std::tuple<std::string, TimePoint, TaskId>;         // queue, lease_expires_at, id
using TimeKey = std::pair<TimePoint, TaskId>;

// An idempotency key: queue, tenant ("" for none), key.
using KeyOf = std::tuple<std::string, std::string, std::string>;
KeyOf key_of(const std::string& queue, const std::optional<std::string>& tenant, const std::string& key) {
  return {queue, tenant.value_or(""), key};
}

bool visible(const Task& t, const Scope& scope) { return !scope.tenant || t.tenant == scope.tenant; }

// A candidate for claim, in claim order.
using ClaimKey = std::tuple<int, TimePoint, TaskId>;  // priority, run_at, id

std::int64_t& count_of(QueueStats& s, TaskStatus status) {
  switch (status) {
    case TaskStatus::pending: return s.pending;
    case TaskStatus::running: return s.running;
    case TaskStatus::succeeded: return s.succeeded;
    case TaskStatus::failed: return s.failed;
    case TaskStatus::cancelled: return s.cancelled;
    case TaskStatus::expired: return s.expired;
    case TaskStatus::waiting: return s.waiting;
  }
  return s.expired;  // unreachable: every status is handled above
}

// A finished outcome's ever-counter.
std::int64_t& total_of(QueueStats& s, TaskStatus status) {
  switch (status) {
    case TaskStatus::succeeded: return s.succeeded_total;
    case TaskStatus::failed: return s.failed_total;
    case TaskStatus::cancelled: return s.cancelled_total;
    default: return s.expired_total;
  }
}

TimePoint minute_of(TimePoint t) { return std::chrono::floor<std::chrono::minutes>(t); }
// 10-second steps, as eoq.totals keeps them: "the last minute" is the same
// 50 to 60 seconds on both stores.
TimePoint bucket_of(TimePoint t) { return std::chrono::floor<std::chrono::duration<std::int64_t, std::ratio<10>>>(t); }

// Tasks finished in one bucket: its start, queue, tenant ("" for none), outcome.
using BucketKey = std::tuple<TimePoint, std::string, std::string, TaskStatus>;

bool has_tasks(const QueueStats& s) {
  return s.pending + s.running + s.succeeded + s.failed + s.cancelled + s.expired + s.waiting > 0;
}

}  // namespace

struct MemoryStore::State {
  explicit State(MemoryStoreOptions o) : options(std::move(o)), rng(std::random_device{}()) {}

  const MemoryStoreOptions options;

  std::mutex mu;
  std::condition_variable cv;  // wait_for_tasks sleeps here

  // Everything below is guarded by mu.
  TaskId next_id = 1;
  std::map<TaskId, Entry> tasks;  // every task, live or finished; ordered by id for list()
  std::map<KeyOf, TaskId> keys;  // outlives its task until prune
  std::set<PendingKey> pending;                 // pending tasks, in claim order per queue
  std::set<TimeKey> deadlines;                  // pending tasks that have a deadline
  std::set<LeaseKey> leases;                    // running tasks, by lease expiry per queue
  std::set<TimeKey> finished;                   // terminal tasks, by finished_at
  std::map<std::string, QueueStats, std::less<>> counts;  // per queue, sorted by name as stats() wants
  // Tasks that ever finished, per (queue, tenant or ""): only the *_total
  // fields are used. In 10-second buckets for the last day: the last
  // minute's counts and throughput().
  std::map<std::pair<std::string, std::string>, QueueStats> ever;
  std::map<BucketKey, std::int64_t> by_bucket;
  std::set<std::string, std::less<>> paused;  // queues claims skip
  std::map<std::string, QueueLimits, std::less<>> limits;
  // Starts in rate-limited queues, oldest first: (when, partition).
  std::map<std::string, std::deque<std::pair<TimePoint, std::string>>, std::less<>> starts;
  // When a start leaves a full rate window: waits end then, since no signal
  // says so.
  std::optional<TimePoint> rate_room_at;
  std::mt19937_64 rng;                          // backoff jitter

  // Wake-ups for wait_for_tasks. Like a LISTEN connection that stays open
  // between waits, a signal sent while nobody waited is kept: the next waiter
  // on that queue takes it and returns at once, so a submit that lands between
  // an empty claim and the wait is not slept through.
  struct Signal {
    std::uint64_t sent = 0;
    std::uint64_t seen = 0;  // `sent` as of the last waiter that returned
  };
  std::map<std::string, Signal, std::less<>> queue_signals;
  Signal any_signal;  // every queue's signals; for waiters that name no queue
  Signal wake_signal;

  // ---- indexes: the only code that knows which index holds which task ----

  void index(const Entry& e) {
    const Task& t = e.task;
    switch (t.status) {
      case TaskStatus::pending:
        pending.emplace(t.queue, t.priority, t.run_at, t.id);
        if (t.deadline) deadlines.emplace(*t.deadline, t.id);
        break;
      case TaskStatus::running: leases.emplace(t.queue, *t.lease_expires_at, t.id); break;
      case TaskStatus::waiting: break;  // claimed by nobody: its last parent releases it
      default: finished.emplace(*t.finished_at, t.id); break;
    }
    auto& c = counts[t.queue];
    if (c.queue.empty()) c.queue = t.queue;
    ++count_of(c, t.status);
    // No change keeps a task finished (retry makes it pending), so a finished
    // task indexed is one that has just finished, as a row inserted into
    // eoq.finished is on Postgres.
    if (is_terminal(t.status)) {
      const auto& tenant = t.tenant ? *t.tenant : std::string();
      ++total_of(ever[{t.queue, tenant}], t.status);
      ++by_bucket[BucketKey{bucket_of(*t.finished_at), t.queue, tenant, t.status}];
      const TimePoint day_ago = *t.finished_at - std::chrono::hours(24);
      while (!by_bucket.empty() && std::get<0>(by_bucket.begin()->first) < day_ago) by_bucket.erase(by_bucket.begin());
    }
  }

  void unindex(const Entry& e) {
    const Task& t = e.task;
    switch (t.status) {
      case TaskStatus::pending:
        pending.erase(PendingKey{t.queue, t.priority, t.run_at, t.id});
        if (t.deadline) deadlines.erase(TimeKey{*t.deadline, t.id});
        break;
      case TaskStatus::running: leases.erase(LeaseKey{t.queue, *t.lease_expires_at, t.id}); break;
      case TaskStatus::waiting: break;
      default: finished.erase(TimeKey{*t.finished_at, t.id}); break;
    }
    auto it = counts.find(t.queue);
    --count_of(it->second, t.status);
    if (!has_tasks(it->second)) counts.erase(it);
  }

  // Every change to a field an index is built from (status, priority, run_at,
  // deadline, lease expiry, finished_at) goes through here, so the indexes
  // never disagree with the tasks.
  template <class F>
  void update(Entry& e, F&& change) {
    const bool was_running = e.task.status == TaskStatus::running;
    unindex(e);
    change(e.task);
    index(e);
    // A task of a queue with limits stopped running: a claim held back may go on.
    if (was_running && e.task.status != TaskStatus::running && limits.count(e.task.queue)) signal(e.task.queue);
  }

  // ---- state changes ----

  // Records the end of the attempt in progress; call before the lease fields
  // are cleared, they say whose attempt it was.
  void end_attempt(Entry& e, TimePoint at, std::string outcome, std::optional<std::string> error) {
    e.history.push_back(Attempt{e.task.attempts, e.task.lease_owner.value_or(""), e.started_at, at,
                                std::move(outcome), std::move(error)});
  }

  // Settling bumps the version, so any lease still held on the task is fenced off.
  void finish(Entry& e, TaskStatus status, TimePoint now, std::optional<std::string> error = std::nullopt) {
    update(e, [&](Task& t) {
      t.status = status;
      ++t.version;
      // lease_owner stays: a finished task says who ran its last attempt.
      t.lease_expires_at.reset();
      if (error) t.last_error = std::move(error);
      t.updated_at = now;
      t.finished_at = now;
    });
    settle_children(e, now);
  }

  // A task just ended: each child still waiting for it counts it once. A child
  // whose last parent ended is released (pending); one whose parent ended other
  // than succeeded is cancelled at once unless it runs whatever its parents did.
  // In the same critical section as the parent's settlement, as on Postgres in
  // the same transaction.
  void settle_children(const Entry& parent, TimePoint now) {
    const Task& p = parent.task;
    for (TaskId c : std::vector<TaskId>(parent.children)) {
      auto it = tasks.find(c);
      if (it == tasks.end()) continue;
      Entry& child = it->second;
      if (child.task.status != TaskStatus::waiting || child.waiting_on.erase(p.id) == 0) continue;
      if (p.status != TaskStatus::succeeded && child.on_parent_failure == ParentFailure::cancel) {
        finish(child, TaskStatus::cancelled, now, fmt::format("parent {} ended {}", p.id, to_string(p.status)));
        continue;
      }
      if (!child.waiting_on.empty()) continue;
      update(child, [&](Task& t) {
        t.status = TaskStatus::pending;
        t.updated_at = now;
      });
      signal(child.task.queue);
    }
  }

  // A lost lease is ended in history at the moment it ran out, not when
  // somebody noticed.
  void end_lost_attempt(Entry& e) {
    end_attempt(e, *e.task.lease_expires_at, "lease_expired", "lease expired");
  }

  // A task as a submit returns it before it is stored: what insert() will store.
  static Task provisional(const NewTask& n, TaskId id, TimePoint now) {
    Task t;
    t.id = id;
    t.queue = n.queue;
    t.type = n.type;
    t.payload = n.payload;
    t.key = n.key;
    t.tenant = n.tenant;
    t.priority = n.priority;
    t.run_at = n.run_at.value_or(now);
    t.deadline = n.deadline;
    t.retry = n.retry;
    t.partition = n.partition;
    t.timeout = n.timeout;
    t.version = 1;
    t.created_at = t.updated_at = now;
    return t;
  }

  // A parent named by id: a task of the same tenant, stored or staged before it.
  bool parent_exists(TaskId id, const NewTask& n, const Staging& staging) const {
    auto it = tasks.find(id);
    if (it != tasks.end()) return it->second.task.tenant == n.tenant;
    return std::any_of(staging.tasks.begin(), staging.tasks.end(),
                       [&](const Staged& s) { return s.id == id && s.n.tenant == n.tenant; });
  }

  // Checks one task of a submit against what is stored and what is staged
  // before it, and stages it (reserving its id) or answers with the task that
  // holds its key. Throws, staging nothing, when a key conflicts or a parent
  // does not exist. `index`: its position in a batch.
  SubmitResult stage(Staging& staging, const NewTask& n, std::optional<std::size_t> index, TimePoint now) {
    auto field = [&](std::string f) { return index ? fmt::format("tasks[{}].{}", *index, f) : f; };
    if (n.key) {
      auto k = keys.find(key_of(n.queue, n.tenant, *n.key));
      if (k != keys.end()) {
        const Task& holder = tasks.at(k->second).task;
        if (n.key_reuse == KeyReuse::strict)
          detail::check_key_reuse(n, index, holder.type, holder.payload, fmt::format("task {}", holder.id), holder.id);
        return {holder, true};
      }
      auto sk = staging.keys.find(key_of(n.queue, n.tenant, *n.key));
      if (sk != staging.keys.end()) {
        const Staged& first = staging.tasks[sk->second];
        if (n.key_reuse == KeyReuse::strict)
          detail::check_key_reuse(n, index, first.n.type, first.n.payload, fmt::format("task {}", first.id), first.id);
        return {provisional(first.n, first.id, now), true};
      }
    }
    Staged st{n, 0, {}};
    for (std::size_t i = 0; i < n.parents.size(); ++i) {
      if (!parent_exists(n.parents[i], n, staging))
        throw InvalidArgument(field(fmt::format("parents[{}]", i)), fmt::format("task {} does not exist", n.parents[i]));
      st.parents.push_back(n.parents[i]);
    }
    for (std::size_t i = 0; i < n.parent_keys.size(); ++i) {
      const auto ko = key_of(n.queue, n.tenant, n.parent_keys[i]);
      if (auto k = keys.find(ko); k != keys.end()) {
        st.parents.push_back(k->second);
      } else if (auto sk = staging.keys.find(ko); sk != staging.keys.end()) {
        st.parents.push_back(staging.tasks[sk->second].id);
      } else {
        throw InvalidArgument(field(fmt::format("parent_keys[{}]", i)),
                              fmt::format("no task holds the key '{}' in queue '{}'", n.parent_keys[i], n.queue));
      }
    }
    std::sort(st.parents.begin(), st.parents.end());
    st.parents.erase(std::unique(st.parents.begin(), st.parents.end()), st.parents.end());
    st.id = next_id++;
    if (n.key) staging.keys.emplace(key_of(n.queue, n.tenant, *n.key), staging.tasks.size());
    staging.tasks.push_back(std::move(st));
    return {provisional(n, staging.tasks.back().id, now), false};
  }

  // Stages a whole batch or nothing.
  std::vector<SubmitResult> stage_all(Staging& staging, std::span<const NewTask> batch, bool is_batch, TimePoint now) {
    if (is_batch) detail::check_batch_keys(batch);
    Staging next = staging;
    std::vector<SubmitResult> out;
    out.reserve(batch.size());
    for (std::size_t i = 0; i < batch.size(); ++i)
      out.push_back(stage(next, batch[i], is_batch ? std::optional(i) : std::nullopt, now));
    staging = std::move(next);
    return out;
  }

  // Creates what was staged, in order. A key a plain submit took while a
  // handler's transaction held it staged is the one case where memory differs
  // from Postgres (whose second submit waits for the first to commit): the
  // staged task is then not created.
  void store_staged(Staging& staging, TimePoint now) {
    std::set<std::string> queues;
    for (auto& st : staging.tasks) {
      if (st.n.key && keys.count(key_of(st.n.queue, st.n.tenant, *st.n.key))) continue;
      insert(st, now);
      queues.insert(st.n.queue);
    }
    for (const auto& q : queues) signal(q);
    staging = {};
  }

  std::vector<SubmitResult> submit(std::span<const NewTask> batch, bool is_batch) {
    detail::validate_new_tasks(batch, is_batch, options.max_payload_bytes);
    std::lock_guard lk(mu);
    const TimePoint now = detail::now();
    // A key repeated later in the batch finds the key the earlier one just took.
    Staging staging;
    auto results = stage_all(staging, batch, is_batch, now);
    store_staged(staging, now);
    // Each created task as stored (one born waiting or cancelled says so).
    for (auto& r : results)
      if (!r.duplicate) r.task = tasks.at(r.task.id).task;
    return results;
  }

  void insert(Staged& st, TimePoint now) {
    const NewTask& n = st.n;
    Entry e;
    e.task = provisional(n, st.id, now);
    e.parents = st.parents;
    e.on_parent_failure = n.on_parent_failure;
    std::optional<std::string> parent_failed;
    for (TaskId p : st.parents) {
      auto it = tasks.find(p);
      if (it == tasks.end()) continue;  // pruned since it was named: it had ended
      Entry& parent = it->second;
      parent.children.push_back(st.id);
      const TaskStatus ps = parent.task.status;
      if (ps == TaskStatus::succeeded) continue;
      if (is_terminal(ps)) {
        if (!parent_failed && n.on_parent_failure == ParentFailure::cancel)
          parent_failed = fmt::format("parent {} ended {}", p, to_string(ps));
        continue;
      }
      e.waiting_on.insert(p);
    }
    Task& t = e.task;
    if (parent_failed) {
      t.status = TaskStatus::cancelled;
      t.last_error = std::move(parent_failed);
      t.finished_at = now;
      e.waiting_on.clear();
    } else if (!e.waiting_on.empty()) {
      t.status = TaskStatus::waiting;
    }
    if (n.key) keys.emplace(key_of(n.queue, n.tenant, *n.key), t.id);
    auto& stored = tasks.emplace(t.id, std::move(e)).first->second;
    index(stored);
  }

  // The entry a lease still governs, or null when the lease is stale.
  Entry* live(const Lease& lease) {
    auto it = tasks.find(lease.id());
    if (it == tasks.end()) return nullptr;
    const Task& t = it->second.task;
    if (t.status != TaskStatus::running || t.version != lease.token) return nullptr;
    return &it->second;
  }

  Entry& fenced(const Lease& lease) {
    if (Entry* e = live(lease)) return *e;
    auto it = tasks.find(lease.id());
    std::string why = it == tasks.end() ? "the task no longer exists"
                      : it->second.task.status != TaskStatus::running
                          ? fmt::format("the task is {}", to_string(it->second.task.status))
                          : fmt::format("the task was claimed again (now version {})", it->second.task.version);
    throw LeaseLost(lease.id(), lease.token, why);
  }

  FailOutcome fail(Entry& e, const Failure& failure, TimePoint now) {
    const Task& t = e.task;
    const TaskStatus final_status = t.cancel_requested ? TaskStatus::cancelled
                                    : failure.permanent || t.attempts >= t.retry.max_attempts ? TaskStatus::failed
                                                                                               : TaskStatus::pending;
    if (final_status != TaskStatus::pending) {
      end_attempt(e, now, std::string(to_string(final_status)), failure.error);
      finish(e, final_status, now, failure.error);
      return {final_status, std::nullopt};
    }
    end_attempt(e, now, "retry", failure.error);
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    const TimePoint retry_at = plus(now, t.retry.delay_after(t.attempts, u));
    update(e, [&](Task& task) {
      task.status = TaskStatus::pending;
      task.run_at = retry_at;
      task.last_error = failure.error;
      ++task.version;
      task.lease_owner.reset();
      task.lease_expires_at.reset();
      task.updated_at = now;
    });
    signal(e.task.queue);
    return {TaskStatus::pending, retry_at};
  }

  void checkpoint(Entry& e, std::string_view stage, std::string_view state_json, TimePoint now) {
    Task& t = e.task;  // no indexed field changes: no update() needed
    t.checkpoint_stage = std::string(stage);
    t.checkpoint = std::string(state_json);
    t.updated_at = now;
  }

  void complete(Entry& e, std::string_view result, TimePoint now) {
    end_attempt(e, now, "succeeded", std::nullopt);
    e.task.result = std::string(result);
    e.task.progress = 100;
    finish(e, TaskStatus::succeeded, now);
  }

  // Deletes a finished task with its key (freeing it) and history.
  void erase_finished(TaskId id) {
    auto it = tasks.find(id);
    const Task& t = it->second.task;
    if (t.key) {
      auto k = keys.find(key_of(t.queue, t.tenant, *t.key));
      if (k != keys.end() && k->second == id) keys.erase(k);
    }
    unindex(it->second);
    tasks.erase(it);
  }

  // Appends the pending tasks of `queue` whose run_at has come, in claim order,
  // up to `limit`. Within one priority run_at ascends, so the first task not yet
  // due ends that priority: jump to the next one instead of walking past every
  // delayed task.
  // With `after`, only tasks past that place in claim order.
  void ready_pending(const std::string& queue, TimePoint now, std::size_t limit,
                     const std::optional<ClaimPosition>& after, std::vector<ClaimKey>& out) const {
    std::size_t taken = 0;
    auto it = after ? pending.upper_bound(PendingKey{queue, after->priority, after->run_at, after->id})
                    : pending.lower_bound(PendingKey{queue, std::numeric_limits<int>::min(), TimePoint::min(), kMinId});
    while (taken < limit && it != pending.end() && std::get<0>(*it) == queue) {
      const auto& [q, priority, run_at, id] = *it;
      if (run_at <= now) {
        out.emplace_back(priority, run_at, id);
        ++taken;
        ++it;
        continue;
      }
      if (priority == std::numeric_limits<int>::max()) break;
      it = pending.lower_bound(PendingKey{queue, priority + 1, TimePoint::min(), kMinId});
    }
  }

  // The earliest run_at that has come among the pending tasks of `queue`: the
  // first task of each priority is that priority's earliest.
  std::optional<TimePoint> oldest_ready(const std::string& queue, TimePoint now) const {
    std::optional<TimePoint> oldest;
    auto it = pending.lower_bound(PendingKey{queue, std::numeric_limits<int>::min(), TimePoint::min(), kMinId});
    while (it != pending.end() && std::get<0>(*it) == queue) {
      const auto& [q, priority, run_at, id] = *it;
      if (run_at <= now && (!oldest || run_at < *oldest)) oldest = run_at;
      if (priority == std::numeric_limits<int>::max()) break;
      it = pending.lower_bound(PendingKey{queue, priority + 1, TimePoint::min(), kMinId});
    }
    return oldest;
  }

  // ---- waiting ----

  void signal(const std::string& queue) {
    ++queue_signals[queue].sent;
    ++any_signal.sent;
    cv.notify_all();
  }

  // Calls f on the signals a waiter on `queues` listens to (an empty list: all).
  template <class F>
  void for_signals(const std::vector<std::string>& queues, F&& f) {
    f(wake_signal);
    if (queues.empty()) {
      f(any_signal);
      return;
    }
    for (const auto& q : queues) {
      auto it = queue_signals.find(q);
      if (it != queue_signals.end()) f(it->second);
    }
  }

  // Counters only grow, so their sum changes exactly when one of them does.
  std::uint64_t generation(const std::vector<std::string>& queues) {
    std::uint64_t g = 0;
    for_signals(queues, [&](const Signal& s) { g += s.sent; });
    return g;
  }

  bool missed(const std::vector<std::string>& queues) {
    bool any = false;
    for_signals(queues, [&](const Signal& s) { any = any || s.sent != s.seen; });
    return any;
  }

  void mark_seen(const std::vector<std::string>& queues) {
    for_signals(queues, [](Signal& s) { s.seen = s.sent; });
  }
};

// On memory there is no SQL to share a transaction with: settling through the
// transaction is the plain fenced call, and the tasks submitted in it are
// created in the same critical section (staged until then, their ids
// reserved). A LeaseLost ends it, as a rollback would, and drops them.
class MemoryStore::Transaction final : public LeaseTransaction {
 public:
  Transaction(MemoryStore::State& state, const Lease& lease) : state_(state), lease_(lease) {}

  Rows exec(std::string_view, const Params&) override {
    throw UsageError("MemoryStore has no SQL: handlers that run SQL in their task's transaction need PostgresStore");
  }

  SubmitResult submit(const NewTask& task) override {
    return submit_batch(std::span<const NewTask>(&task, 1), false)[0];
  }
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks) override {
    return submit_batch(tasks, true);
  }

  void complete(std::string_view result_json) override {
    detail::validate_json("result", result_json, state_.options.max_payload_bytes);
    settle([&](Entry& e, TimePoint now) { state_.complete(e, result_json, now); });
    open_ = false;
  }

  void complete_all(std::span<const Completion> completions) override {
    require_open();
    detail::validate_complete_all(completions, state_.options.max_payload_bytes);
    std::lock_guard lk(state_.mu);
    std::vector<Entry*> live;
    live.reserve(completions.size());
    for (const auto& c : completions) {
      Entry* e = state_.live(*c.lease);
      if (!e || std::find(live.begin(), live.end(), e) != live.end()) {
        open_ = false;
        staged_ = {};
        if (e) throw LeaseLost(c.lease->id(), c.lease->token, "the task is named twice in one complete_all");
        state_.fenced(*c.lease);  // throws LeaseLost with the reason
      }
      live.push_back(e);
    }
    const TimePoint now = detail::now();
    state_.store_staged(staged_, now);
    for (std::size_t i = 0; i < live.size(); ++i) state_.complete(*live[i], completions[i].result, now);
    open_ = false;
  }

  FailOutcome fail(const Failure& failure) override {
    FailOutcome outcome;
    settle([&](Entry& e, TimePoint now) { outcome = state_.fail(e, failure, now); });
    open_ = false;
    return outcome;
  }

  // Stays open: on Postgres a new transaction starts for what follows.
  void checkpoint(std::string_view stage, std::string_view state_json) override {
    detail::validate_progress(0, stage);
    detail::validate_json("checkpoint", state_json, state_.options.max_payload_bytes);
    settle([&](Entry& e, TimePoint now) { state_.checkpoint(e, stage, state_json, now); });
  }

  bool open() const noexcept override { return open_; }

 private:
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks, bool is_batch) {
    require_open();
    detail::validate_new_tasks(tasks, is_batch, state_.options.max_payload_bytes);
    std::lock_guard lk(state_.mu);
    return state_.stage_all(staged_, tasks, is_batch, detail::now());
  }

  // The staged tasks are created only if the lease still holds, with the settlement.
  template <class F>
  void settle(F&& f) {
    require_open();
    std::lock_guard lk(state_.mu);
    Entry* e = state_.live(lease_);
    if (!e) {
      open_ = false;
      staged_ = {};
      state_.fenced(lease_);  // throws LeaseLost with the reason
    }
    const TimePoint now = detail::now();
    state_.store_staged(staged_, now);
    f(*e, now);
  }
  void require_open() const {
    if (!open_) throw UsageError("this lease transaction is already settled or broken");
  }

  MemoryStore::State& state_;
  Lease lease_;
  Staging staged_;
  bool open_ = true;
};

MemoryStore::MemoryStore(MemoryStoreOptions options) {
  if (options.retention && options.retention->count() < 0)
    throw InvalidArgument("retention", "must not be negative");
  state_ = std::make_unique<State>(std::move(options));
}

MemoryStore::~MemoryStore() = default;

SubmitResult MemoryStore::submit(const NewTask& task) {
  return state_->submit(std::span<const NewTask>(&task, 1), false)[0];
}

std::vector<SubmitResult> MemoryStore::submit_batch(std::span<const NewTask> tasks) {
  detail::validate_batch_size(tasks.size());
  return state_->submit(tasks, true);
}

std::vector<Lease> MemoryStore::claim(const ClaimRequest& request) {
  auto& state = *state_;
  detail::validate_claim(request);
  std::vector<std::string> queues = request.queues;
  std::sort(queues.begin(), queues.end());
  queues.erase(std::unique(queues.begin(), queues.end()), queues.end());
  const auto limit = static_cast<std::size_t>(request.limit);

  std::lock_guard lk(state.mu);
  const TimePoint now = detail::now();

  // Up to `limit` ready tasks per queue (every one of a queue with limits,
  // which may pass over many), plus every lost lease (ordered by expiry, not
  // claim order, so all are needed), then the best `limit` overall that the
  // limits let start.
  std::vector<ClaimKey> candidates;
  // Per limited queue: what runs (under a live lease) and what started within
  // the rate periods, per partition and in all.
  struct Busy {
    const QueueLimits* limits = nullptr;
    std::map<std::string, std::int64_t> running, started_p;
    std::int64_t running_all = 0, started_all = 0;
  };
  std::map<std::string, Busy, std::less<>> busy;
  for (const auto& q : queues) {
    if (state.paused.count(q)) continue;
    auto lim = state.limits.find(q);
    if (lim != state.limits.end()) {
      Busy& b = busy[q];
      b.limits = &lim->second;
      for (auto it = state.leases.lower_bound(LeaseKey{q, TimePoint::min(), kMinId});
           it != state.leases.end() && std::get<0>(*it) == q; ++it) {
        if (std::get<1>(*it) <= now) continue;
        ++b.running[state.tasks.at(std::get<2>(*it)).task.partition.value_or("")];
        ++b.running_all;
      }
      auto& log = state.starts[q];
      Millis keep{0};
      if (b.limits->rate) keep = std::max(keep, b.limits->rate->period);
      if (b.limits->partition_rate) keep = std::max(keep, b.limits->partition_rate->period);
      while (!log.empty() && log.front().first <= now - keep) log.pop_front();
      for (const auto& [at, partition] : log) {
        if (b.limits->rate && at > now - b.limits->rate->period) ++b.started_all;
        if (b.limits->partition_rate && at > now - b.limits->partition_rate->period) ++b.started_p[partition];
      }
    }
    state.ready_pending(q, now, lim != state.limits.end() ? std::numeric_limits<std::size_t>::max() : limit,
                        request.after, candidates);
    for (auto it = state.leases.lower_bound(LeaseKey{q, TimePoint::min(), kMinId});
         it != state.leases.end() && std::get<0>(*it) == q && std::get<1>(*it) <= now; ++it) {
      const Task& t = state.tasks.at(std::get<2>(*it)).task;
      if (t.run_at <= now) candidates.emplace_back(t.priority, t.run_at, t.id);
    }
  }
  if (request.after) {  // the lost leases, which ready_pending did not see
    const ClaimKey after{request.after->priority, request.after->run_at, request.after->id};
    std::erase_if(candidates, [&](const ClaimKey& k) { return k <= after; });
  }
  std::sort(candidates.begin(), candidates.end());
  // Queues with limits first (their limits bound what they take), as on
  // Postgres: a deep queue without limits would otherwise leave them nothing.
  std::stable_partition(candidates.begin(), candidates.end(), [&](const ClaimKey& k) {
    return busy.count(state.tasks.at(std::get<2>(k)).task.queue) > 0;
  });
  // Whether the limits of the task's queue let it start now; counts it if so.
  auto admit = [&](const Task& t) {
    auto it = busy.find(t.queue);
    if (it == busy.end()) return true;
    Busy& b = it->second;
    const QueueLimits& l = *b.limits;
    const std::string partition = t.partition.value_or("");
    if (l.concurrency && b.running_all >= *l.concurrency) return false;
    if (l.partition_concurrency && b.running[partition] >= *l.partition_concurrency) return false;
    auto full_until = [&](Millis period) {
      // The oldest start still in the window leaves it then.
      for (const auto& [at, p] : state.starts[t.queue])
        if (at > now - period) {
          const TimePoint free_at = at + period;
          if (!state.rate_room_at || free_at < *state.rate_room_at) state.rate_room_at = free_at;
          break;
        }
      return false;
    };
    if (l.rate && b.started_all >= l.rate->limit) return full_until(l.rate->period);
    if (l.partition_rate && b.started_p[partition] >= l.partition_rate->limit)
      return full_until(l.partition_rate->period);
    ++b.running_all;
    ++b.running[partition];
    ++b.started_all;
    ++b.started_p[partition];
    if (l.rate || l.partition_rate) state.starts[t.queue].emplace_back(now, partition);
    return true;
  };

  std::vector<Lease> leases;
  std::size_t taken = 0;
  for (const auto& [priority, run_at, id] : candidates) {
    if (taken == limit) break;
    Entry& e = state.tasks.at(id);
    // A task to settle rather than start (as claim settles them) needs no room.
    const bool was_lost = e.task.status == TaskStatus::running;
    const bool ends = (e.task.deadline && *e.task.deadline <= now) ||
                      (was_lost && (e.task.cancel_requested || e.task.attempts >= e.task.retry.max_attempts));
    if (!ends && busy.count(e.task.queue) && !admit(e.task)) continue;
    ++taken;
    const bool lost = e.task.status == TaskStatus::running;
    if (lost) state.end_lost_attempt(e);
    if (e.task.deadline && *e.task.deadline <= now) {
      state.finish(e, TaskStatus::expired, now, "deadline passed");
      continue;
    }
    if (lost && e.task.cancel_requested) {
      state.finish(e, TaskStatus::cancelled, now);
      continue;
    }
    if (lost && e.task.attempts >= e.task.retry.max_attempts) {
      state.finish(e, TaskStatus::failed, now, "lease expired");
      continue;
    }
    state.update(e, [&](Task& t) {
      t.status = TaskStatus::running;
      ++t.attempts;
      ++t.version;
      t.lease_owner = request.owner;
      t.lease_expires_at = plus(now, request.lease);
      t.updated_at = now;
      // Progress describes the attempt; the checkpoint is what survives it.
      t.progress = 0;
      t.stage.clear();
      t.started_at = now;
    });
    e.started_at = now;
    leases.push_back(Lease{e.task, request.owner, e.task.version, *e.task.lease_expires_at, now});
  }
  std::sort(leases.begin(), leases.end(), [](const Lease& a, const Lease& b) {
    return std::tie(a.task.priority, a.task.run_at, a.task.id) < std::tie(b.task.priority, b.task.run_at, b.task.id);
  });
  return leases;
}

void MemoryStore::complete(const Lease& lease, std::string_view result_json) {
  auto& state = *state_;
  detail::validate_json("result", result_json, state.options.max_payload_bytes);
  std::lock_guard lk(state.mu);
  state.complete(state.fenced(lease), result_json, detail::now());
}

std::vector<bool> MemoryStore::complete_batch(std::span<const Completion> completions) {
  auto& state = *state_;
  detail::validate_completions(completions, state.options.max_payload_bytes);
  std::vector<bool> applied(completions.size(), false);
  std::lock_guard lk(state.mu);
  const TimePoint now = detail::now();
  for (std::size_t i = 0; i < completions.size(); ++i) {
    if (Entry* e = state.live(*completions[i].lease)) {
      state.complete(*e, completions[i].result, now);
      applied[i] = true;
    }
  }
  return applied;
}

FailOutcome MemoryStore::fail(const Lease& lease, const Failure& failure) {
  auto& state = *state_;
  std::lock_guard lk(state.mu);
  return state.fail(state.fenced(lease), failure, detail::now());
}

HeartbeatResult MemoryStore::heartbeat(const Lease& lease, Millis extension) {
  auto& state = *state_;
  detail::validate_positive("extension", extension);
  std::lock_guard lk(state.mu);
  Entry& e = state.fenced(lease);
  const TimePoint now = detail::now();
  // A lease that ran out in a queue with limits: a claim may have given its place away.
  if (*e.task.lease_expires_at <= now && state.limits.count(e.task.queue))
    throw LeaseLost(lease.id(), lease.token, "heartbeat found the lease run out in a queue with limits");
  const TimePoint expires = plus(now, extension);
  state.update(e, [&](Task& t) { t.lease_expires_at = expires; });
  return {expires, e.task.cancel_requested};
}

void MemoryStore::release(const Lease& lease) {
  auto& state = *state_;
  std::lock_guard lk(state.mu);
  Entry& e = state.fenced(lease);
  const TimePoint now = detail::now();
  if (e.task.cancel_requested) {
    state.end_attempt(e, now, "cancelled", std::nullopt);
    state.finish(e, TaskStatus::cancelled, now);
    return;
  }
  // The interrupted attempt does not count and leaves no history: the next
  // claim starts the same attempt number again.
  state.update(e, [&](Task& t) {
    t.status = TaskStatus::pending;
    t.run_at = now;
    --t.attempts;
    ++t.version;
    t.lease_owner.reset();
    t.lease_expires_at.reset();
    t.updated_at = now;
  });
  state.signal(e.task.queue);
}

bool MemoryStore::expire_if_overdue(const Lease& lease) {
  auto& state = *state_;
  std::lock_guard lk(state.mu);
  Entry& e = state.fenced(lease);
  const TimePoint now = detail::now();
  if (!e.task.deadline || *e.task.deadline > now) return false;
  state.end_attempt(e, now, "expired", "deadline passed before the task started");
  state.finish(e, TaskStatus::expired, now, "deadline passed");
  return true;
}

void MemoryStore::cancel_running(const Lease& lease, std::string_view reason) {
  auto& state = *state_;
  std::lock_guard lk(state.mu);
  Entry& e = state.fenced(lease);
  const TimePoint now = detail::now();
  state.end_attempt(e, now, "cancelled", reason.empty() ? std::nullopt : std::optional<std::string>(reason));
  state.finish(e, TaskStatus::cancelled, now);
}

FailOutcome MemoryStore::snooze(const Lease& lease, Millis delay) {
  auto& state = *state_;
  detail::validate_snooze_delay(delay);
  std::lock_guard lk(state.mu);
  Entry& e = state.fenced(lease);
  const TimePoint now = detail::now();
  if (e.task.cancel_requested) {
    state.end_attempt(e, now, "cancelled", std::nullopt);
    state.finish(e, TaskStatus::cancelled, now);
    return {TaskStatus::cancelled, std::nullopt};
  }
  // Recorded, but not counted: the next claim starts the same attempt number again.
  state.end_attempt(e, now, "snoozed", std::nullopt);
  const TimePoint run_at = plus(now, delay);
  state.update(e, [&](Task& t) {
    t.status = TaskStatus::pending;
    t.run_at = run_at;
    --t.attempts;
    ++t.version;
    t.lease_owner.reset();
    t.lease_expires_at.reset();
    t.updated_at = now;
  });
  // A task put off is not ready: only one due now is worth waking a claimer for.
  if (delay.count() == 0) state.signal(e.task.queue);
  return {TaskStatus::pending, run_at};
}

void MemoryStore::progress(const Lease& lease, int percent, std::string_view stage) {
  auto& state = *state_;
  detail::validate_progress(percent, stage);
  std::lock_guard lk(state.mu);
  Task& t = state.fenced(lease).task;  // no indexed field changes: no update() needed
  t.progress = percent;
  t.stage = std::string(stage);
  t.updated_at = detail::now();
}

void MemoryStore::checkpoint(const Lease& lease, std::string_view stage, std::string_view state_json) {
  auto& state = *state_;
  detail::validate_progress(0, stage);
  detail::validate_json("checkpoint", state_json, state.options.max_payload_bytes);
  std::lock_guard lk(state.mu);
  state.checkpoint(state.fenced(lease), stage, state_json, detail::now());
}

std::unique_ptr<LeaseTransaction> MemoryStore::begin(const Lease& lease) {
  return std::make_unique<Transaction>(*state_, lease);
}

CancelOutcome MemoryStore::cancel(TaskId id, const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  std::lock_guard lk(state.mu);
  auto it = state.tasks.find(id);
  if (it == state.tasks.end() || !visible(it->second.task, scope)) return CancelOutcome::not_found;
  Entry& e = it->second;
  switch (e.task.status) {
    case TaskStatus::pending:
    case TaskStatus::waiting: state.finish(e, TaskStatus::cancelled, detail::now()); return CancelOutcome::cancelled;
    case TaskStatus::running:
      // The holder settles it; its lease stays valid, so the version stays.
      e.task.cancel_requested = true;
      e.task.updated_at = detail::now();
      return CancelOutcome::cancel_requested;
    default: return CancelOutcome::already_finished;
  }
}

RemoveOutcome MemoryStore::remove(TaskId id, const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  std::lock_guard lk(state.mu);
  auto it = state.tasks.find(id);
  if (it == state.tasks.end() || !visible(it->second.task, scope)) return RemoveOutcome::not_found;
  Entry& e = it->second;
  if (e.task.status == TaskStatus::running) return RemoveOutcome::running;
  if (!is_terminal(e.task.status)) state.finish(e, TaskStatus::cancelled, detail::now());
  state.erase_finished(id);
  return RemoveOutcome::removed;
}

RetryOutcome MemoryStore::retry(TaskId id, const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  std::lock_guard lk(state.mu);
  auto it = state.tasks.find(id);
  if (it == state.tasks.end() || !visible(it->second.task, scope)) return RetryOutcome::not_found;
  Entry& e = it->second;
  const auto status = e.task.status;
  if (status != TaskStatus::failed && status != TaskStatus::cancelled && status != TaskStatus::expired)
    return RetryOutcome::not_retryable;
  const TimePoint now = detail::now();
  state.update(e, [&](Task& t) {
    t.status = TaskStatus::pending;
    ++t.version;
    t.run_at = now;
    if (t.deadline && *t.deadline <= now) t.deadline.reset();
    t.retry.max_attempts = std::max(t.retry.max_attempts, t.attempts + 1);
    t.cancel_requested = false;
    t.lease_owner.reset();
    t.started_at.reset();
    t.progress = 0;
    t.stage.clear();
    t.result.reset();
    t.finished_at.reset();
    t.updated_at = now;
  });
  state.signal(e.task.queue);
  return RetryOutcome::retried;
}

std::optional<Task> MemoryStore::get(TaskId id, const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  std::lock_guard lk(state.mu);
  auto it = state.tasks.find(id);
  if (it == state.tasks.end() || !visible(it->second.task, scope)) return std::nullopt;
  return it->second.task;
}

std::optional<Task> MemoryStore::find(std::string_view queue, std::string_view key, const Scope& scope) {
  auto& state = *state_;
  detail::validate_queue("queue", queue);
  detail::validate_scope(scope);
  std::lock_guard lk(state.mu);
  auto k = state.keys.find(key_of(std::string(queue), scope.tenant, std::string(key)));
  if (k == state.keys.end()) return std::nullopt;
  return state.tasks.at(k->second).task;
}

TaskPage MemoryStore::list(const ListQuery& q, const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  detail::validate_list(q);
  const auto limit = static_cast<std::size_t>(q.limit);
  TaskPage page;
  std::lock_guard lk(state.mu);
  auto lower = [](std::string s) {
    for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  const auto error_text = q.error_contains ? lower(*q.error_contains) : std::string();
  auto matches = [&](const Task& t) {
    if ((q.queue && t.queue != *q.queue) || (q.status && t.status != *q.status) || (q.type && t.type != *q.type) ||
        (q.tenant && t.tenant != *q.tenant) || !visible(t, scope))
      return false;
    if ((q.key && t.key != *q.key) || (q.key_prefix && !(t.key && t.key->starts_with(*q.key_prefix))) ||
        (q.type_prefix && !t.type.starts_with(*q.type_prefix)))
      return false;
    if (q.error_contains && !(t.last_error && lower(*t.last_error).find(error_text) != std::string::npos)) return false;
    return !q.payload_contains || detail::json_contains(t.payload, *q.payload_contains);
  };
  auto take = [&](const Task& t) {
    if (matches(t)) page.tasks.push_back(t);
  };
  if (q.count_up_to > 0) {
    // Counted as Postgres counts: up to one past the cap, then "at least". No
    // estimate here (nothing to take it from), so at_least past the cap.
    std::int64_t n = 0;
    for (auto it = state.tasks.begin(); it != state.tasks.end() && n <= q.count_up_to; ++it)
      if (matches(it->second.task)) ++n;
    page.total = n <= q.count_up_to ? ListTotal{n, TotalKind::exact} : ListTotal{q.count_up_to, TotalKind::at_least};
  }
  if (q.newest_first) {
    auto end = q.after ? state.tasks.lower_bound(*q.after) : state.tasks.end();
    for (auto it = std::make_reverse_iterator(end); it != state.tasks.rend() && page.tasks.size() <= limit; ++it)
      take(it->second.task);
  } else {
    for (auto it = state.tasks.upper_bound(q.after.value_or(0)); it != state.tasks.end() && page.tasks.size() <= limit; ++it)
      take(it->second.task);
  }
  // One row past the page says whether another page follows.
  if (page.tasks.size() > limit) {
    page.tasks.pop_back();
    page.next_after = page.tasks.back().id;
  }
  return page;
}

void MemoryStore::pause(std::string_view queue) {
  detail::validate_queue("queue", queue);
  std::lock_guard lk(state_->mu);
  state_->paused.emplace(queue);
}

void MemoryStore::resume(std::string_view queue) {
  detail::validate_queue("queue", queue);
  std::lock_guard lk(state_->mu);
  if (state_->paused.erase(std::string(queue)) > 0) state_->signal(std::string(queue));
}

void MemoryStore::set_limits(std::string_view queue, const QueueLimits& limits) {
  detail::validate_limits(queue, limits);
  std::lock_guard lk(state_->mu);
  const std::string q(queue);
  if (limits.empty()) {
    state_->limits.erase(q);
    state_->starts.erase(q);
  } else {
    state_->limits[q] = limits;
  }
  state_->signal(q);  // a limit raised or gone may let waiting tasks start
}

std::vector<std::pair<std::string, QueueLimits>> MemoryStore::limits() {
  std::lock_guard lk(state_->mu);
  return {state_->limits.begin(), state_->limits.end()};
}

std::vector<std::string> MemoryStore::paused_queues() {
  std::lock_guard lk(state_->mu);
  return {state_->paused.begin(), state_->paused.end()};
}

std::vector<Throughput> MemoryStore::throughput(int minutes, const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  detail::validate_throughput_minutes(minutes);
  std::lock_guard lk(state.mu);
  const TimePoint since = minute_of(detail::now()) - std::chrono::minutes(minutes);
  std::map<std::tuple<TimePoint, std::string, std::string_view>, Throughput> sum;  // minute, queue, outcome name
  for (auto it = state.by_bucket.lower_bound(BucketKey{since, {}, {}, TaskStatus::pending});
       it != state.by_bucket.end(); ++it) {
    const auto& [bucket, queue, tenant, status] = it->first;
    if (scope.tenant && tenant != *scope.tenant) continue;
    auto& t = sum[{minute_of(bucket), queue, to_string(status)}];
    t.queue = queue;
    t.status = status;
    t.minute = minute_of(bucket);
    t.finished += it->second;
  }
  std::vector<Throughput> out;
  out.reserve(sum.size());
  for (auto& [_, t] : sum) out.push_back(std::move(t));
  return out;
}

std::vector<QueueStats> MemoryStore::stats(const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  std::lock_guard lk(state.mu);
  const TimePoint now = detail::now();
  const TimePoint minute_ago = now - std::chrono::minutes(1);
  std::vector<QueueStats> out;
  // The buckets that start in the last minute, as the stats query sums them.
  auto count_recent = [&](std::map<std::string, QueueStats, std::less<>>& by_queue) {
    for (auto it = state.by_bucket.lower_bound(BucketKey{minute_ago, {}, {}, TaskStatus::pending});
         it != state.by_bucket.end(); ++it) {
      const auto& [bucket, queue, tenant, status] = it->first;
      if (bucket <= minute_ago || (scope.tenant && tenant != *scope.tenant)) continue;
      auto q = by_queue.find(queue);
      if (q == by_queue.end()) continue;
      if (status == TaskStatus::succeeded) q->second.succeeded_last_minute += it->second;
      if (status == TaskStatus::failed) q->second.failed_last_minute += it->second;
    }
  };
  // Queues whose tasks are all pruned still have totals, as on Postgres; a
  // paused queue is listed even when empty, so that it can be seen and
  // resumed (in a tenant's scope only among that tenant's queues).
  auto mark_paused = [&](std::map<std::string, QueueStats, std::less<>>& by_queue) {
    for (const auto& q : state.paused) {
      if (scope.tenant && !by_queue.count(q)) continue;
      auto& c = by_queue[q];
      c.queue = q;
      c.paused = true;
    }
    for (const auto& [q, l] : state.limits) {
      if (scope.tenant && !by_queue.count(q)) continue;
      auto& c = by_queue[q];
      c.queue = q;
      c.limits = l;
    }
  };
  auto add_totals = [&](std::map<std::string, QueueStats, std::less<>>& by_queue) {
    for (const auto& [at, e] : state.ever) {
      if (scope.tenant && at.second != *scope.tenant) continue;
      auto& c = by_queue[at.first];
      c.queue = at.first;
      c.succeeded_total += e.succeeded_total;
      c.failed_total += e.failed_total;
      c.cancelled_total += e.cancelled_total;
      c.expired_total += e.expired_total;
    }
  };
  if (!scope.tenant) {
    auto counts = state.counts;
    add_totals(counts);
    mark_paused(counts);
    count_recent(counts);
    out.reserve(counts.size());
    for (auto& [queue, c] : counts) {
      out.push_back(c);
      if (auto oldest = state.oldest_ready(queue, now))
        out.back().oldest_pending_age = std::chrono::duration_cast<Millis>(now - *oldest);
    }
    return out;
  }
  // The per-queue counts are kept for everyone; one tenant's are counted here.
  std::map<std::string, QueueStats, std::less<>> counts;
  std::map<std::string, TimePoint, std::less<>> oldest;
  for (const auto& [id, e] : state.tasks) {
    const Task& t = e.task;
    if (!visible(t, scope)) continue;
    auto& c = counts[t.queue];
    c.queue = t.queue;
    ++count_of(c, t.status);
    if (t.status == TaskStatus::pending && t.run_at <= now) {
      auto [o, fresh] = oldest.emplace(t.queue, t.run_at);
      if (!fresh && t.run_at < o->second) o->second = t.run_at;
    }
  }
  add_totals(counts);
  mark_paused(counts);
  count_recent(counts);
  for (auto& [queue, c] : counts) {
    out.push_back(c);
    if (auto o = oldest.find(queue); o != oldest.end())
      out.back().oldest_pending_age = std::chrono::duration_cast<Millis>(now - o->second);
  }
  return out;
}

std::vector<Attempt> MemoryStore::history(TaskId id, const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  std::lock_guard lk(state.mu);
  auto it = state.tasks.find(id);
  if (it == state.tasks.end() || !visible(it->second.task, scope)) return {};
  const Entry& e = it->second;
  std::vector<Attempt> out = e.history;
  if (e.task.status == TaskStatus::running)
    out.push_back(Attempt{e.task.attempts, e.task.lease_owner.value_or(""), e.started_at, std::nullopt, "running",
                          std::nullopt});
  return out;
}

std::int64_t MemoryStore::prune(Millis older_than, int batch_size) {
  auto& state = *state_;
  detail::validate_prune(older_than, batch_size);
  return detail::in_batches(batch_size, [&](int size) {
           std::lock_guard lk(state.mu);
           const TimePoint now = detail::now();
           // A window reaching back before 1970 keeps everything (and must not overflow).
           const TimePoint cutoff = older_than >= std::chrono::duration_cast<Millis>(now.time_since_epoch())
                                        ? TimePoint{}
                                        : now - older_than;
           int removed = 0;
           while (removed < size && !state.finished.empty() && state.finished.begin()->first < cutoff) {
             state.erase_finished(state.finished.begin()->second);
             ++removed;
           }
           return removed;
         })
      .total;
}

std::int64_t MemoryStore::prunable(Millis older_than) {
  auto& state = *state_;
  detail::validate_prune(older_than, 1);
  std::lock_guard lk(state.mu);
  const TimePoint now = detail::now();
  if (older_than >= std::chrono::duration_cast<Millis>(now.time_since_epoch())) return 0;
  auto end = state.finished.lower_bound(TimeKey{now - older_than, kMinId});
  return static_cast<std::int64_t>(std::distance(state.finished.begin(), end));
}

MaintenanceReport MemoryStore::maintain() {
  auto& state = *state_;
  MaintenanceReport report;
  {
    std::lock_guard lk(state.mu);
    const TimePoint now = detail::now();
    while (!state.deadlines.empty() && state.deadlines.begin()->first <= now) {
      state.finish(state.tasks.at(state.deadlines.begin()->second), TaskStatus::expired, now, "deadline passed");
      ++report.expired;
    }
    // Lost leases with attempts left are not touched: the next claim takes them
    // over (and counts the attempt) in the same step.
    std::vector<TaskId> dead;
    for (const auto& [queue, expires, id] : state.leases) {
      if (expires > now) continue;
      const Task& t = state.tasks.at(id).task;
      if (t.cancel_requested || t.attempts >= t.retry.max_attempts) dead.push_back(id);
    }
    for (TaskId id : dead) {
      Entry& e = state.tasks.at(id);
      state.end_lost_attempt(e);
      if (e.task.cancel_requested)
        state.finish(e, TaskStatus::cancelled, now);
      else
        state.finish(e, TaskStatus::failed, now, "lease expired");
      ++report.reaped;
    }
  }
  if (state.options.retention) report.pruned = prune(*state.options.retention, kRetentionBatch);
  return report;
}

void MemoryStore::wait_for_tasks(const std::vector<std::string>& queues, Millis timeout) {
  auto& state = *state_;
  // Returning early is allowed; capping keeps steady_clock::now() + timeout
  // from overflowing for "forever".
  timeout = std::min<Millis>(timeout, std::chrono::hours(24));
  std::unique_lock lk(state.mu);
  if (!state.missed(queues)) {
    // Every waiter present when a signal comes returns, as every listener hears a NOTIFY.
    const auto start = state.generation(queues);
    if (state.rate_room_at) {
      auto until = std::chrono::duration_cast<Millis>(*state.rate_room_at - detail::now()) + Millis(1);
      timeout = std::clamp(until, Millis(0), timeout);
      state.rate_room_at.reset();
    }
    state.cv.wait_for(lk, timeout, [&] { return state.generation(queues) != start; });
  }
  state.mark_seen(queues);
}

TimePoint MemoryStore::now() { return detail::now(); }

Relatives MemoryStore::relatives(TaskId id, const Scope& scope) {
  auto& state = *state_;
  detail::validate_scope(scope);
  std::lock_guard lk(state.mu);
  auto it = state.tasks.find(id);
  if (it == state.tasks.end() || !visible(it->second.task, scope)) return {};
  auto list = [&](std::vector<TaskId> ids) {
    std::sort(ids.begin(), ids.end());
    std::vector<Relative> out;
    for (TaskId r : ids) {
      auto t = state.tasks.find(r);
      // A relative pruned by retention is gone; parents and children share a tenant.
      if (t == state.tasks.end()) continue;
      const Task& task = t->second.task;
      out.push_back(Relative{task.id, task.type, task.status, task.result});
    }
    return out;
  };
  return {list(it->second.parents), list(it->second.children)};
}

void MemoryStore::wake() {
  auto& state = *state_;
  std::lock_guard lk(state.mu);
  ++state.wake_signal.sent;
  state.cv.notify_all();
}

}  // namespace eoq
