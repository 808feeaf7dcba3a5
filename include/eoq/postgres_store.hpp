#pragma once
// The TaskStore on PostgreSQL (libpq). libpq stays out of this header: host code
// that hands us its own connection includes <libpq-fe.h> itself.
#include <eoq/task_store.hpp>

#include <memory>

struct pg_conn;  // libpq's PGconn

namespace eoq {

struct PostgresOptions {
  // libpq connection string or URL. Empty: the EOQ_DATABASE_URL environment variable.
  std::string conninfo{};
  // Schema holding eoq's tables: [a-z_][a-z0-9_]*, at most 48 characters (it also
  // names the LISTEN channel, which has a 63-byte limit).
  std::string schema = "eoq";
  // Connections kept open; callers beyond this many wait for one.
  int pool_size = 8;
  std::size_t max_payload_bytes = 1 << 20;
  // maintain() deletes finished tasks older than this (empty: keep forever).
  std::optional<Millis> retention{};
  int prune_batch = 1000;
  // The most time one maintain() spends on retention; what is left waits for
  // the next call (MaintenanceReport::more). prune() itself has no budget.
  Millis prune_budget{200};
  // How many times a statement that is safe to repeat is retried after a
  // transient error (connection lost, server restarting, serialization failure).
  int transient_retries = 3;
  // A handler transaction idle (waiting for its client) longer than this is
  // ended by the server, so a frozen worker cannot hold row locks for long.
  Millis handler_idle_timeout{30000};

  // conninfo leads to a transaction-pooling proxy (PgBouncer with pool_mode =
  // transaction), which hands each transaction to any server connection: then
  // statements go unnamed (parsed on every call, a named prepared statement
  // would be missing on the next server connection) and the store does not
  // LISTEN through it (the proxy would not keep the session). The rest of
  // eoq's session use is transaction-scoped already: SET LOCAL, temporary
  // tables dropped at commit, transaction-level advisory locks.
  bool transaction_pooling = false;
  // A direct connection (not through the proxy) on which an idle worker LISTENs
  // for new tasks: one per store. Empty: conninfo, or with transaction_pooling
  // no LISTEN at all, and an idle worker polls every WorkerOptions::poll_interval.
  std::string listen_conninfo{};
  // A hot standby (or a pooler in front of standbys) for get, list, stats and
  // history, the reads of the dashboard and the CLI: they see the primary as of
  // the standby's replay, usually milliseconds behind and more under load or
  // after a network fault (pg_stat_replication.replay_lag), so a task just
  // submitted may be missing and a finished one shown running. Claims,
  // settlements, submits, find, cancel, retry and maintenance stay on conninfo.
  // Give it to the store of a dashboard or a report, not to a worker's store:
  // a worker reads its own writes back (after a commit in doubt). Empty: conninfo.
  std::string read_conninfo{};

  // migrate() applies each migration in a transaction of its own whose lock
  // waits end after this long (SET LOCAL lock_timeout), so a migration never
  // queues behind a running claim or settlement, and never holds up the ones
  // that arrive after it, for longer than this. A migration that times out is
  // rolled back and tried again after a backoff (50 ms doubling, at most 1 s),
  // up to migration_lock_retries times; then migrate() fails naming it
  // (DatabaseError, SQLSTATE 55P03), with the migrations before it applied and
  // nothing of it. See docs/upgrading.md.
  Millis migration_lock_timeout{100};
  int migration_lock_retries = 10;
};

class PostgresStore final : public TaskStore {
 public:
  explicit PostgresStore(PostgresOptions options = {});
  // Shorthand: a connection string, every other option default.
  explicit PostgresStore(std::string conninfo);
  ~PostgresStore() override;
  PostgresStore(const PostgresStore&) = delete;
  PostgresStore& operator=(const PostgresStore&) = delete;

  // Creates or upgrades the schema. Idempotent; safe from many processes at once.
  // Returns the migrations it applied ("0008_totals"), oldest first; none when
  // the schema was up to date. Each migration commits on its own, with its row
  // in the migrations table (see migration_lock_timeout). A schema ahead of
  // this build (a migration it does not know) is left alone: nothing is
  // applied, and when that migration breaks older programs this throws
  // SchemaTooNew naming it (docs/upgrading.md).
  std::vector<std::string> migrate();
  const PostgresOptions& options() const noexcept;

  // Transactional enqueue: submits on the host's own connection, inside whatever
  // transaction it has open, so the task exists if and only if that transaction
  // commits. Never commits or rolls back itself.
  static SubmitResult submit_on(pg_conn* connection, const NewTask& task,
                                std::string_view schema = "eoq",
                                std::size_t max_payload_bytes = 1 << 20);
  // Transactional cancel, with the rules of cancel(id, scope): on the host's own
  // connection, inside its open transaction, so a pending task is cancelled (and
  // a running one asked to stop) if and only if that transaction commits. Never
  // commits or rolls back itself. In a REPEATABLE READ or SERIALIZABLE
  // transaction a task that changes state meanwhile makes it fail with a
  // serialization error (retry the host's transaction).
  static CancelOutcome cancel_on(pg_conn* connection, TaskId id, const Scope& scope = {},
                                 std::string_view schema = "eoq");

  SubmitResult submit(const NewTask& task) override;
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks) override;
  std::vector<Lease> claim(const ClaimRequest& request) override;
  void complete(const Lease& lease, std::string_view result_json = "null") override;
  FailOutcome fail(const Lease& lease, const Failure& failure) override;
  HeartbeatResult heartbeat(const Lease& lease, Millis extension) override;
  void release(const Lease& lease) override;
  std::vector<bool> release_batch(std::span<const Lease> leases) override;
  bool expire_if_overdue(const Lease& lease) override;
  void cancel_running(const Lease& lease, std::string_view reason = {}) override;
  FailOutcome snooze(const Lease& lease, Millis delay) override;
  void progress(const Lease& lease, int percent, std::string_view stage) override;
  void checkpoint(const Lease& lease, std::string_view stage, std::string_view state_json) override;
  std::vector<bool> complete_batch(std::span<const Completion> completions) override;
  std::unique_ptr<LeaseTransaction> begin(const Lease& lease) override;
  std::unique_ptr<LeaseTransaction> begin(const Lease& lease, const TransactionOptions& options) override;
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
  Relatives relatives(TaskId id, const Scope& scope = {}) override;
  std::int64_t prune(Millis older_than, int batch_size = 1000) override;
  std::int64_t prunable(Millis older_than) override;
  MaintenanceReport maintain() override;
  void wait_for_tasks(const std::vector<std::string>& queues, Millis timeout) override;
  void wake() override;
  TimePoint now() override;

  struct Impl;  // opaque

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace eoq
