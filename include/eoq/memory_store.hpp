#pragma once
// The TaskStore contract in process memory: thread-safe, not durable. For unit
// tests of host code, and as the reference the conformance suite holds the
// Postgres store to. LeaseTransaction::exec throws UsageError (there is no SQL).
#include <eoq/task_store.hpp>

#include <memory>

namespace eoq {

struct MemoryStoreOptions {
  std::size_t max_payload_bytes = 1 << 20;
  std::optional<Millis> retention{};  // maintain() prunes finished tasks older than this
};

class MemoryStore final : public TaskStore {
 public:
  explicit MemoryStore(MemoryStoreOptions options = {});
  ~MemoryStore() override;
  MemoryStore(const MemoryStore&) = delete;
  MemoryStore& operator=(const MemoryStore&) = delete;

  SubmitResult submit(const NewTask& task) override;
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks) override;
  std::vector<Lease> claim(const ClaimRequest& request) override;
  void complete(const Lease& lease, std::string_view result_json = "null") override;
  FailOutcome fail(const Lease& lease, const Failure& failure) override;
  HeartbeatResult heartbeat(const Lease& lease, Millis extension) override;
  void release(const Lease& lease) override;
  bool expire_if_overdue(const Lease& lease) override;
  void cancel_running(const Lease& lease, std::string_view reason = {}) override;
  FailOutcome snooze(const Lease& lease, Millis delay) override;
  void progress(const Lease& lease, int percent, std::string_view stage) override;
  void checkpoint(const Lease& lease, std::string_view stage, std::string_view state_json) override;
  std::vector<bool> complete_batch(std::span<const Completion> completions) override;
  using TaskStore::begin;  // with TransactionOptions: nothing to trade, they are ignored
  std::unique_ptr<LeaseTransaction> begin(const Lease& lease) override;
  CancelOutcome cancel(TaskId id, const Scope& scope = {}) override;
  RetryOutcome retry(TaskId id, const Scope& scope = {}) override;
  RemoveOutcome remove(TaskId id, const Scope& scope = {}) override;
  void pause(std::string_view queue) override;
  void resume(std::string_view queue) override;
  std::vector<std::string> paused_queues() override;
  void set_limits(std::string_view queue, const QueueLimits& limits) override;
  std::vector<std::pair<std::string, QueueLimits>> limits() override;
  std::optional<Task> get(TaskId id, const Scope& scope = {}) override;
  std::optional<Task> find(std::string_view queue, std::string_view key, const Scope& scope = {}) override;
  TaskPage list(const ListQuery& query, const Scope& scope = {}) override;
  std::vector<QueueStats> stats(const Scope& scope = {}) override;
  std::vector<Throughput> throughput(int minutes, const Scope& scope = {}) override;
  std::vector<Attempt> history(TaskId id, const Scope& scope = {}) override;
  std::int64_t prune(Millis older_than, int batch_size = 1000) override;
  std::int64_t prunable(Millis older_than) override;
  MaintenanceReport maintain() override;
  void wait_for_tasks(const std::vector<std::string>& queues, Millis timeout) override;
  void wake() override;
  TimePoint now() override;
  Relatives relatives(TaskId id, const Scope& scope = {}) override;

 private:
  struct State;
  class Transaction;  // begin(): settles and submits in one critical section
  friend class Transaction;
  std::unique_ptr<State> state_;
};

}  // namespace eoq
