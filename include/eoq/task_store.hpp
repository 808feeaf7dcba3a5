#pragma once
// The contract every store keeps. The Worker knows only this interface.
#include <eoq/errors.hpp>
#include <eoq/task.hpp>

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace eoq {

// Rows from a handler's SQL, as text (NULL is an empty optional).
struct Rows {
  std::vector<std::string> columns{};
  std::vector<std::vector<std::optional<std::string>>> rows{};
  std::int64_t affected = 0;  // rows changed by INSERT/UPDATE/DELETE

  std::size_t size() const noexcept { return rows.size(); }
  bool empty() const noexcept { return rows.empty(); }
  // The single row a statement must return; throws UsageError otherwise.
  const std::vector<std::optional<std::string>>& one_row() const;
  // The value in the single row and single column.
  std::optional<std::string> scalar() const;
};

using Params = std::vector<std::optional<std::string>>;

// The transaction a handler's own writes share with the settlement of its task.
// Either complete()/fail() commits the handler's writes together with the task's
// new state, or nothing commits: LeaseLost, an exception, a crash, a destructor
// without settlement all roll back.
class LeaseTransaction {
 public:
  virtual ~LeaseTransaction() = default;
  // Runs one parameterised statement ($1, $2, ...) inside the transaction.
  // Throws UsageError on a store that has no SQL (MemoryStore).
  virtual Rows exec(std::string_view sql, const Params& params = {}) = 0;
  // Fenced completion, then COMMIT. Throws LeaseLost (and rolls back) when stale.
  virtual void complete(std::string_view result_json = "null") = 0;
  // Fenced failure, then COMMIT, keeping the handler's writes made so far.
  virtual FailOutcome fail(const Failure& failure) = 0;
  // Fenced checkpoint, then COMMIT: the writes made so far and the saved stage
  // become durable together. A new transaction starts for what follows.
  virtual void checkpoint(std::string_view stage, std::string_view state_json) = 0;
  virtual bool open() const noexcept = 0;
};

struct MaintenanceReport {
  std::int64_t expired = 0;        // pending tasks past their deadline
  std::int64_t reaped = 0;         // running tasks whose lease ran out, settled or made claimable
  std::int64_t pruned = 0;         // finished tasks deleted by retention
};

class TaskStore {
 public:
  virtual ~TaskStore() = default;

  // Creates the task, or returns the existing one when the key is taken.
  virtual SubmitResult submit(const NewTask& task) = 0;
  // Many tasks at once; results in input order. Validates all before writing any.
  virtual std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks) = 0;

  // Leases up to request.limit ready tasks, by priority, then run_at, then id.
  virtual std::vector<Lease> claim(const ClaimRequest& request) = 0;

  // Fenced: throw LeaseLost and change nothing when the lease is stale.
  virtual void complete(const Lease& lease, std::string_view result_json = "null") = 0;
  virtual FailOutcome fail(const Lease& lease, const Failure& failure) = 0;
  virtual HeartbeatResult heartbeat(const Lease& lease, Millis extension) = 0;
  // Gives an unfinished task back (graceful shutdown): pending again at once, and
  // the interrupted attempt does not count. A task with a cancel request ends
  // cancelled instead.
  virtual void release(const Lease& lease) = 0;
  // For a lease that waited (in a worker's buffer) before its handler starts: a
  // task is never started after its deadline. When the deadline has passed by
  // the store's clock, ends the task `expired` (the attempt recorded as
  // `expired`) and returns true; otherwise changes nothing and returns false.
  // Fenced: LeaseLost when the lease is stale.
  virtual bool expire_if_overdue(const Lease& lease) = 0;
  // The holder stops its task on purpose (a handler that saw a cancel request,
  // or found its work no longer wanted): ends it `cancelled` whether or not a
  // cancel was requested, the attempt recorded as `cancelled` with `reason` as
  // its error (none when empty); last_error unchanged. Fenced: LeaseLost when stale.
  virtual void cancel_running(const Lease& lease, std::string_view reason = {}) = 0;
  virtual void progress(const Lease& lease, int percent, std::string_view stage) = 0;
  virtual void checkpoint(const Lease& lease, std::string_view stage, std::string_view state_json) = 0;

  // Settles many leases in one round trip. Returns, per input, whether it was
  // applied (false: that lease was stale and its task is untouched).
  virtual std::vector<bool> complete_batch(std::span<const Completion> completions) = 0;

  // Opens the transaction a handler's writes share with its task's settlement.
  virtual std::unique_ptr<LeaseTransaction> begin(const Lease& lease) = 0;

  // Reads, cancel and retry take a Scope: the default sees every tenant.
  virtual CancelOutcome cancel(TaskId id, const Scope& scope = {}) = 0;
  // A failed, expired or cancelled task runs again: pending at once, as a new
  // attempt (its history, checkpoint and last error kept). It gets at least one
  // more attempt than it has used, and a deadline that has passed is dropped.
  virtual RetryOutcome retry(TaskId id, const Scope& scope = {}) = 0;

  virtual std::optional<Task> get(TaskId id, const Scope& scope = {}) = 0;
  // The task submitted with `key` to `queue` by the scope's tenant (the default
  // scope: by no tenant), since keys are unique per (queue, tenant).
  virtual std::optional<Task> find(std::string_view queue, std::string_view key, const Scope& scope = {}) = 0;
  // A tenant scope and query.tenant both filter: different tenants list nothing.
  virtual TaskPage list(const ListQuery& query, const Scope& scope = {}) = 0;
  virtual std::vector<QueueStats> stats(const Scope& scope = {}) = 0;
  virtual std::vector<Attempt> history(TaskId id, const Scope& scope = {}) = 0;

  // Deletes finished tasks (with their keys and history) that finished more than
  // `older_than` ago, `batch_size` rows per statement. Returns how many.
  virtual std::int64_t prune(Millis older_than, int batch_size = 1000) = 0;
  // How many finished tasks prune(older_than) would delete now (a dry run).
  virtual std::int64_t prunable(Millis older_than) = 0;
  // Housekeeping a worker runs now and then: expire overdue pending tasks, settle
  // tasks whose lease ran out with no attempts left, apply the retention setting.
  virtual MaintenanceReport maintain() = 0;

  // Blocks until tasks may be ready on one of `queues`, wake() is called, or the
  // timeout passes. May return early; callers claim and wait again.
  virtual void wait_for_tasks(const std::vector<std::string>& queues, Millis timeout) = 0;
  virtual void wake() = 0;
};

}  // namespace eoq
