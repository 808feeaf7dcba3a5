#pragma once
// Value types shared by every store and the worker.
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace eoq {

// The library's version, "MAJOR.MINOR.PATCH" (eoq_build_info, eoq --version).
const char* version() noexcept;

using Clock = std::chrono::system_clock;
using TimePoint = std::chrono::time_point<Clock, std::chrono::microseconds>;
using Millis = std::chrono::milliseconds;
using TaskId = std::int64_t;

// `waiting`: named parents that have not all succeeded yet; never claimed until
// the last of them succeeds (then `pending`), or one ends otherwise (then
// `cancelled`, unless the task runs whatever its parents did).
enum class TaskStatus { pending, running, succeeded, failed, cancelled, expired, waiting };

std::string_view to_string(TaskStatus s) noexcept;
// Throws InvalidArgument("status", ...) for an unknown name.
TaskStatus parse_status(std::string_view name);
inline bool is_terminal(TaskStatus s) noexcept {
  return s != TaskStatus::pending && s != TaskStatus::running && s != TaskStatus::waiting;
}

enum class Backoff { fixed, exponential };

// What a submit does when its key is already taken (in its queue, by its tenant).
enum class KeyReuse {
  // Returns the existing task as a duplicate if its type and payload equal the
  // submitted ones (payloads compared as text, byte for byte, as stored); throws
  // KeyConflict otherwise, writing nothing.
  strict,
  // Returns the existing task as a duplicate whatever it holds (eoq before strict keys).
  lenient,
};

// How a failed attempt is retried. The delay before attempt n+1, after n failed
// attempts, is initial_delay (fixed) or initial_delay * 2^(n-1) capped at
// max_delay (exponential); jitter then moves it by up to +-jitter of itself.
struct RetryPolicy {
  int max_attempts = 3;
  Backoff backoff = Backoff::exponential;
  Millis initial_delay{1000};
  Millis max_delay{std::chrono::minutes(10)};
  double jitter = 0.1;  // 0..1

  // unit_random in [0, 1); 0.5 means "no jitter".
  Millis delay_after(int failed_attempts, double unit_random = 0.5) const noexcept;
  bool operator==(const RetryPolicy&) const = default;
};

// What a dependent does when one of its parents ends failed, cancelled or expired.
enum class ParentFailure {
  cancel,  // the dependent ends `cancelled`, its last_error naming the parent
  run,     // the dependent runs once every parent has ended, whatever the outcome
};

// What a caller submits. Only `type` is required.
struct NewTask {
  std::string queue = "default";
  std::string type{};
  std::string payload = "{}";           // JSON text
  std::optional<std::string> key{};       // idempotency key, unique per queue
  int priority = 0;                     // lower runs first
  std::optional<TimePoint> run_at{};      // not before (default: now)
  std::optional<TimePoint> deadline{};    // not after: never started later than this
  RetryPolicy retry{};
  // Owner, for scoped reads. Keys are unique per (queue, tenant): two tenants
  // never see each other's task through a shared key.
  std::optional<std::string> tenant{};
  KeyReuse key_reuse = KeyReuse::strict;
  // Tasks this one waits for: ids, and keys in this task's queue (and tenant).
  // Each must exist and belong to the same tenant. The task is not claimed
  // until every parent has succeeded.
  std::vector<TaskId> parents{};
  std::vector<std::string> parent_keys{};
  ParentFailure on_parent_failure = ParentFailure::cancel;
  // Concurrency and rate limits (TaskStore::set_limit) count the tasks of a
  // queue per partition: a tenant, a customer id, whatever must not run more
  // than so many at once. Empty: the queue's unnamed partition.
  std::optional<std::string> partition{};
  // How long one attempt may run: at the timeout the handler sees
  // ctx.should_stop(); if it has not returned after the worker's grace
  // period the attempt fails with "timeout" (and is retried per `retry`).
  // Empty: HandlerOptions::timeout of its type, if any.
  std::optional<Millis> timeout{};
};

struct Task {
  TaskId id = 0;
  std::string queue{};
  std::string type{};
  std::string payload{};
  std::optional<std::string> key{};
  std::optional<std::string> tenant{};
  TaskStatus status = TaskStatus::pending;
  int priority = 0;
  TimePoint run_at{};
  std::optional<TimePoint> deadline{};
  int attempts = 0;  // attempts started so far
  RetryPolicy retry{};
  std::int64_t version = 0;  // fencing token; changes on every claim and settle
  std::optional<std::string> lease_owner{};
  std::optional<TimePoint> lease_expires_at{};
  // When the latest attempt started (kept after it ends; empty before the first
  // claim and after retry()).
  std::optional<TimePoint> started_at{};
  bool cancel_requested = false;
  int progress = 0;  // 0..100
  std::string stage{};
  std::optional<std::string> checkpoint_stage{};
  std::optional<std::string> checkpoint{};  // JSON text
  std::optional<std::string> result{};      // JSON text
  std::optional<std::string> last_error{};
  TimePoint created_at{};
  TimePoint updated_at{};
  std::optional<TimePoint> finished_at{};
  std::optional<std::string> partition{};  // NewTask::partition
  std::optional<Millis> timeout{};         // NewTask::timeout
};

struct SubmitResult {
  Task task{};
  bool duplicate = false;  // the key was taken: `task` is the existing task, untouched
};

// The right to settle one attempt of one task. `token` is the task's version
// after the claim; every fenced call checks it.
struct Lease {
  Task task{};  // as of the claim
  std::string owner{};
  std::int64_t token = 0;
  TimePoint expires_at{};
  // The store's clock when the claim ran. Time a lease spends in a worker's
  // buffer is measured from here (steady clock), so a deadline check at hand-off
  // needs no agreement between the worker's clock and the store's.
  TimePoint claimed_at{};
  TaskId id() const noexcept { return task.id; }
  int attempt() const noexcept { return task.attempts; }
};

// A task's place in claim order: priority, then run_at, then id.
struct ClaimPosition {
  int priority = 0;
  TimePoint run_at{};
  TaskId id = 0;
  friend auto operator<=>(const ClaimPosition&, const ClaimPosition&) = default;
};

struct ClaimRequest {
  std::vector<std::string> queues{"default"};
  std::string owner{};
  int limit = 1;
  Millis lease{30000};
  // Take only tasks after this place in claim order. A Worker passes the last
  // task of its previous full claim, so that the next claim does not walk
  // again past the tasks it holds (and, on Postgres, past the index entries
  // of tasks it finished). Tasks that sort before it (a higher priority
  // submitted since, a lease given back or run out) are left to a claim
  // without it, which the Worker makes every few claims.
  std::optional<ClaimPosition> after{};
};

struct Failure {
  std::string error{};
  bool permanent = false;  // no retry, whatever the policy says
};

// What fail() (or snooze()) did with the task.
struct FailOutcome {
  TaskStatus status = TaskStatus::pending;  // pending (will run again), failed or cancelled
  std::optional<TimePoint> retry_at{};        // when status is pending: its new run_at
};

struct HeartbeatResult {
  TimePoint expires_at{};
  bool cancel_requested = false;
};

struct Completion {
  const Lease* lease = nullptr;
  std::string result = "null";  // JSON text
};

enum class CancelOutcome { cancelled, cancel_requested, already_finished, not_found };

// What retry() did: a failed, expired or cancelled task is pending again; a
// pending, running or succeeded task is left alone (not_retryable).
enum class RetryOutcome { retried, not_retryable, not_found };
// TaskStore::remove: `running` is refused (cancel it first: its handler holds it).
enum class RemoveOutcome { removed, running, not_found };
std::string_view to_string(RemoveOutcome o) noexcept;

std::string_view to_string(CancelOutcome o) noexcept;
std::string_view to_string(RetryOutcome o) noexcept;

// Whose tasks a read, cancel or retry may see. The default sees every tenant
// (an operator). A tenant scope never returns, counts or changes another
// tenant's task: such an id answers exactly as an id that does not exist.
struct Scope {
  std::optional<std::string> tenant{};
  static Scope all() { return {}; }
  static Scope only(std::string tenant) { return Scope{std::move(tenant)}; }
};

struct ListQuery {
  std::optional<std::string> queue{};
  std::optional<TaskStatus> status{};
  std::optional<std::string> type{};
  std::optional<std::string> tenant{};
  // Search, each unset for any: the key exactly, or its start; the type's
  // start; a JSON value the payload contains, as jsonb's @> reads it
  // (R"({"user":{"id":7}})" matches a payload with that member among others);
  // text in last_error, in any case.
  std::optional<std::string> key{}, key_prefix{}, type_prefix{}, payload_contains{}, error_contains{};
  std::optional<TaskId> after{};  // keyset cursor: ids past this one in the listing order
  int limit = 100;
  bool newest_first = false;  // ids descending (a live view); ascending otherwise
  // Opt in to TaskPage::total: how many tasks match the filters (queue, status,
  // type, tenant and the scope; not `after`), counted up to this many
  // (0..1,000,000). 0, the default: no count, and list() costs what it did.
  std::int64_t count_up_to = 0;
};

// How far to trust TaskPage::total's count.
//   exact     the number of matching tasks (it was at most count_up_to)
//   at_least  more than count_up_to match; count is count_up_to
//   estimate  more than count_up_to match and the store estimated how many
//             (PostgresStore: from the planner's statistics, for a list with
//             no filter at all); count is above count_up_to
enum class TotalKind { exact, at_least, estimate };
std::string_view to_string(TotalKind k) noexcept;

struct ListTotal {
  std::int64_t count = 0;
  TotalKind kind = TotalKind::exact;
};

struct TaskPage {
  std::vector<Task> tasks{};          // ordered by id (descending when newest_first)
  std::optional<TaskId> next_after{};  // pass as `after` for the next page; empty when none follows
  std::optional<ListTotal> total{};    // only when the query's count_up_to > 0
};

// At most `limit` task starts in any window of `period` (sliding, by the
// store's clock).
struct RateLimit {
  int limit = 0;       // 0..1,000,000
  Millis period{1000};  // 1 ms..7 days
  bool operator==(const RateLimit&) const = default;
};

// A queue's limits, enforced by the store for every worker, process and
// machine at once (TaskStore::set_limits). Each is off while empty. A task
// whose start a limit forbids waits (pending): it is neither failed nor
// counted as an attempt. A partition is NewTask::partition ('' for none).
struct QueueLimits {
  std::optional<int> concurrency{};            // tasks of the queue running at once, 0..1,000,000
  std::optional<int> partition_concurrency{};  // tasks of each partition running at once
  std::optional<RateLimit> rate{};             // starts of the queue
  std::optional<RateLimit> partition_rate{};   // starts of each partition
  bool empty() const noexcept { return !concurrency && !partition_concurrency && !rate && !partition_rate; }
  bool operator==(const QueueLimits&) const = default;
};

struct QueueStats {
  std::string queue{};
  std::int64_t pending = 0, running = 0, succeeded = 0, failed = 0, cancelled = 0, expired = 0;
  std::int64_t waiting = 0;  // for parents
  std::optional<Millis> oldest_pending_age{};  // of pending tasks whose run_at has come
  // Throughput: tasks that finished in the last minute, by outcome (on
  // PostgresStore, counted in 10-second steps: the last 50 to 60 seconds).
  std::int64_t succeeded_last_minute = 0, failed_last_minute = 0;
  // Tasks that ever finished so (on PostgresStore since the schema's
  // migration 0008): counters that only grow, whatever retention, retry or a
  // delete later does to the rows; succeeded..expired above are the rows kept.
  std::int64_t succeeded_total = 0, failed_total = 0, cancelled_total = 0, expired_total = 0;
  bool paused = false;  // TaskStore::pause: claims take none of its tasks (stats lists it even when empty)
  QueueLimits limits{};  // TaskStore::set_limits (stats lists a queue with limits even when empty)
};

// Tasks of one queue that finished with one outcome in one minute (stats'
// source, kept at the same small cost; the dashboard's charts).
struct Throughput {
  std::string queue{};
  TaskStatus status = TaskStatus::succeeded;
  TimePoint minute{};  // its start
  std::int64_t finished = 0;
};

// One attempt of a task, oldest first. The attempt in progress has no end.
struct Attempt {
  int number = 0;
  std::string owner{};
  TimePoint started_at{};
  std::optional<TimePoint> finished_at{};
  // running, succeeded, retry, failed, cancelled, lease_expired, expired (the
  // deadline passed while the lease waited in a worker's buffer: never started),
  // or snoozed (put off by its handler: not counted, so the next attempt has
  // the same number)
  std::string outcome{};
  std::optional<std::string> error{};
};

// A parent or child of a task, as it stands now.
struct Relative {
  TaskId id = 0;
  std::string type{};
  TaskStatus status = TaskStatus::pending;
  std::optional<std::string> result{};  // JSON text, once succeeded
};

// The tasks a task waits for and the tasks that wait for it, each ordered by id.
struct Relatives {
  std::vector<Relative> parents{};
  std::vector<Relative> children{};
};

}  // namespace eoq
