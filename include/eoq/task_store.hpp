#pragma once
// The contract every store keeps. The Worker knows only this interface.
#include <eoq/errors.hpp>
#include <eoq/task.hpp>

#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

namespace eoq::detail {

template <class T>
inline constexpr bool is_character_v =
    std::is_same_v<T, char> || std::is_same_v<T, wchar_t> || std::is_same_v<T, char8_t> ||
    std::is_same_v<T, char16_t> || std::is_same_v<T, char32_t>;

template <class T>
inline constexpr bool is_optional_v = false;
template <class T>
inline constexpr bool is_optional_v<std::optional<T>> = true;

// Shortest round-trip text; NaN and infinities as Postgres reads them for
// float4, float8 and numeric.
template <std::floating_point T>
std::string float_text(T value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, value);
  return std::string(buf, r.ptr);
}

template <class T>
constexpr std::string_view type_name() {
  if constexpr (std::is_same_v<T, std::string>) return "std::string";
  else if constexpr (std::is_same_v<T, std::string_view>) return "std::string_view";
  else if constexpr (std::is_same_v<T, bool>) return "bool";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "std::int64_t";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "std::int32_t";
  else if constexpr (std::is_same_v<T, std::int16_t>) return "std::int16_t";
  else if constexpr (std::is_same_v<T, std::int8_t>) return "std::int8_t";
  else if constexpr (std::is_same_v<T, std::uint64_t>) return "std::uint64_t";
  else if constexpr (std::is_same_v<T, std::uint32_t>) return "std::uint32_t";
  else if constexpr (std::is_same_v<T, std::uint16_t>) return "std::uint16_t";
  else if constexpr (std::is_same_v<T, std::uint8_t>) return "std::uint8_t";
  else if constexpr (std::is_same_v<T, long long>) return "long long";
  else if constexpr (std::is_same_v<T, unsigned long long>) return "unsigned long long";
  else return "the requested type";
}

// Throws UsageError: column `name` (index `index`) as `type`: `text` (if any) `why`.
[[noreturn]] void bad_cell(std::string_view name, std::size_t index, std::string_view type, const std::string* text,
                           std::string_view why);

template <class T>
T convert_cell(const std::string& text, std::string_view name, std::size_t index) {
  if constexpr (std::is_same_v<T, std::string>) {
    return text;
  } else if constexpr (std::is_same_v<T, std::string_view>) {
    return std::string_view(text);
  } else if constexpr (std::is_same_v<T, bool>) {
    if (text == "t" || text == "true") return true;
    if (text == "f" || text == "false") return false;
    bad_cell(name, index, type_name<T>(), &text, "is not a boolean (t or f)");
  } else if constexpr (std::is_floating_point_v<T>) {
    T out{};
    auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
    if (ec == std::errc::result_out_of_range) bad_cell(name, index, type_name<T>(), &text, "is out of range");
    if (ec != std::errc() || p != text.data() + text.size() || text.empty())
      bad_cell(name, index, type_name<T>(), &text, "is not a number");
    return out;
  } else if constexpr (std::is_integral_v<T> && !is_character_v<T>) {
    T out{};
    auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
    if (ec == std::errc::result_out_of_range) bad_cell(name, index, type_name<T>(), &text, "is out of range");
    if (ec != std::errc() || p != text.data() + text.size() || text.empty())
      bad_cell(name, index, type_name<T>(), &text, "is not an integer");
    return out;
  } else {
    static_assert(!sizeof(T), "RowView::get reads std::string, std::string_view, integers, float, double, bool "
                              "and std::optional of those");
  }
}

}  // namespace eoq::detail

namespace eoq {

// One parameter of a handler's SQL, sent as text for the server to parse as its
// placeholder's type: integers, floating point (the shortest text that reads
// back to the same value; NaN and infinities as Postgres spells them), bool,
// strings and string views. std::nullopt, `{}` and an empty std::optional<T>
// are NULL. A lone `char` is refused at compile time (a number or a string?).
//
//   ctx.exec("INSERT INTO t VALUES ($1, $2, $3, $4, $5)", {42, "x", 1.5, true, std::nullopt});
class SqlParam {
 public:
  SqlParam() noexcept = default;
  SqlParam(std::nullopt_t) noexcept {}
  SqlParam(std::string text) noexcept : text_(std::move(text)) {}
  SqlParam(std::string_view text) : text_(std::string(text)) {}
  SqlParam(const char* text) : text_(text ? std::optional<std::string>(text) : std::nullopt) {}
  SqlParam(bool value) : text_(value ? "true" : "false") {}
  template <class T>
    requires(std::is_integral_v<T> && !std::is_same_v<T, bool> && !detail::is_character_v<T>)
  SqlParam(T value) : text_(std::to_string(value)) {}
  template <std::floating_point T>
  SqlParam(T value) : text_(detail::float_text(value)) {}
  template <class T>
  SqlParam(const std::optional<T>& value) : text_(value ? SqlParam(*value).text_ : std::nullopt) {}
  template <class T>
    requires detail::is_character_v<T>
  SqlParam(T) = delete;

  // The text sent, or empty for NULL.
  const std::optional<std::string>& text() const noexcept { return text_; }
  bool is_null() const noexcept { return !text_; }

 private:
  std::optional<std::string> text_;
};

using Params = std::vector<SqlParam>;

// One row of a handler's query result: the cells as text (NULL is an empty
// optional), and typed reads that name the column and the type when the text
// does not convert. Valid while the Rows it came from lives.
class RowView {
 public:
  RowView(const std::vector<std::optional<std::string>>& cells, const std::vector<std::string>& columns) noexcept
      : cells_(&cells), columns_(&columns) {}
  std::size_t size() const noexcept { return cells_->size(); }
  const std::optional<std::string>& operator[](std::size_t column) const;  // the text
  bool is_null(std::size_t column) const { return !(*this)[column]; }

  // T: std::string, std::string_view (into the cell), any integer type, float,
  // double, bool (Postgres' t/f), or std::optional<T> of one of them to read
  // NULL as empty. A NULL read as a plain T, text that is not a T, or a value
  // out of T's range throws UsageError naming the column and T.
  template <class T>
  T get(std::size_t column) const {
    if constexpr (detail::is_optional_v<T>) {
      const auto& cell = (*this)[column];
      if (!cell) return std::nullopt;
      return get<typename T::value_type>(column);
    } else {
      const auto& cell = (*this)[column];
      if (!cell) detail::bad_cell(name(column), column, detail::type_name<T>(), nullptr, "is NULL (read it as a std::optional)");
      return detail::convert_cell<T>(*cell, name(column), column);
    }
  }
  template <class T>
  T get(std::string_view column) const {
    return get<T>(index_of(column));
  }

 private:
  std::string_view name(std::size_t column) const noexcept;
  std::size_t index_of(std::string_view column) const;  // UsageError for an unknown name
  const std::vector<std::optional<std::string>>* cells_;
  const std::vector<std::string>* columns_;
};

// Rows from a handler's SQL, as text (NULL is an empty optional).
struct Rows {
  std::vector<std::string> columns{};
  std::vector<std::vector<std::optional<std::string>>> rows{};
  std::int64_t affected = 0;  // rows changed by INSERT/UPDATE/DELETE

  std::size_t size() const noexcept { return rows.size(); }
  bool empty() const noexcept { return rows.empty(); }
  // Row i with typed reads: rows[i].get<std::int64_t>(0), rows[i].get<std::string>("name").
  RowView operator[](std::size_t row) const;
  // The single row a statement must return; throws UsageError otherwise.
  const std::vector<std::optional<std::string>>& one_row() const;
  // The value in the single row and single column.
  std::optional<std::string> scalar() const;
  // Typed: the single row's single column as T (see RowView::get).
  template <class T>
  T scalar() const {
    scalar();  // exactly one row and one column, or UsageError
    return (*this)[0].get<T>(0);
  }
};

// The transaction a handler's own writes share with the settlement of its task.
// Either complete()/fail() commits the handler's writes together with the task's
// new state, or nothing commits: LeaseLost, an exception, a crash, a destructor
// without settlement all roll back.
// How a lease transaction commits.
struct TransactionOptions {
  // true: the server's own setting (on, unless its configuration says
  // otherwise). false: its COMMIT returns before the commit's WAL is on disk
  // (synchronous_commit = off for this transaction alone), so it waits for no
  // disk flush. A crash of the database server within about three times
  // wal_writer_delay (0.6 s by default) after it can undo it: the handler's
  // writes and the task's settlement vanish together, the task is `running`
  // again under the lost lease, and it runs again when that lease expires, as
  // after any lost lease (the attempt counts: with none left it ends failed).
  // Writes in the same database stay exactly-once; what a reader saw in that
  // window (the success, the handler's rows) can be undone. Submits outside
  // handler transactions stay durable whatever this says.
  bool synchronous_commit = true;
};

class LeaseTransaction {
 public:
  virtual ~LeaseTransaction() = default;
  // Runs one parameterised statement ($1, $2, ...) inside the transaction.
  // Throws UsageError on a store that has no SQL (MemoryStore).
  virtual Rows exec(std::string_view sql, const Params& params = {}) = 0;
  // One parameterised statement whose answer the caller does not need (an
  // INSERT, UPDATE or DELETE): queued, and sent in order, in this transaction,
  // in the same round trip as whatever goes to the server next (the next
  // exec, or the settlement and its COMMIT). An error in it surfaces there,
  // as that call's exception, and nothing of the transaction commits. The
  // default runs exec() at once.
  virtual void send(std::string_view sql, const Params& params = {}) { exec(sql, params); }
  // Submits in this transaction: the tasks exist if and only if it commits (with
  // the task's settlement or a checkpoint). Validation, keys and duplicates as
  // TaskStore::submit / submit_batch; a KeyConflict writes nothing and leaves
  // the transaction usable.
  virtual SubmitResult submit(const NewTask& task) = 0;
  virtual std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks) = 0;
  // Fenced completion, then COMMIT. Throws LeaseLost (and rolls back) when stale.
  virtual void complete(std::string_view result_json = "null") = 0;
  // Fenced completion of many leases held by the same worker (this
  // transaction's own among them, or not), then COMMIT: all of them settle
  // with everything written in this transaction, or none does. When any lease
  // is stale, throws LeaseLost naming that task, rolls back and changes
  // nothing. At most 10,000 completions.
  virtual void complete_all(std::span<const Completion> completions) = 0;
  // Fenced failure, then COMMIT, keeping the handler's writes made so far.
  virtual FailOutcome fail(const Failure& failure) = 0;
  // Fenced checkpoint, then COMMIT: the writes made so far and the saved stage
  // become durable together. A new transaction starts for what follows.
  virtual void checkpoint(std::string_view stage, std::string_view state_json) = 0;
  virtual bool open() const noexcept = 0;
  // From another thread, when the attempt is being ended under a handler that
  // still runs (the Worker's timeout): cancels the statement it is waiting in,
  // if the store can, and makes every later call throw LeaseLost. Nothing of
  // the transaction commits. The default does nothing (MemoryStore, whose
  // calls cannot hang).
  virtual void interrupt() noexcept {}
};

struct MaintenanceReport {
  std::int64_t expired = 0;        // pending tasks past their deadline
  std::int64_t reaped = 0;         // running tasks whose lease ran out, settled or made claimable
  std::int64_t pruned = 0;         // finished tasks deleted by retention
  // Retention stopped at its time budget with more to delete: call again soon.
  // A backlog is worked off in slices, so it never takes the database from the
  // tasks that are running.
  bool more = false;
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
  // release() for many leases in one round trip (a worker shutting down with a
  // full buffer). Returns, per input, whether that lease was still held and its
  // task given back (or ended cancelled); false: stale, task untouched. The
  // default calls release() once per lease.
  virtual std::vector<bool> release_batch(std::span<const Lease> leases);
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
  // The holder puts its task off (a handler's eoq::Snooze): pending again with
  // run_at = the store's now + delay, the attempt recorded in history as
  // `snoozed` but not counted (attempts - 1, as release() does, so a snooze on
  // the last attempt still runs again); progress, checkpoint and last_error
  // kept. A task with a cancel request ends cancelled instead, as release()
  // ends it. Returns {pending, the new run_at} or {cancelled}. delay 0..365
  // days (InvalidArgument "delay"). Fenced: LeaseLost when stale.
  virtual FailOutcome snooze(const Lease& lease, Millis delay) = 0;
  virtual void progress(const Lease& lease, int percent, std::string_view stage) = 0;
  virtual void checkpoint(const Lease& lease, std::string_view stage, std::string_view state_json) = 0;

  // Settles many leases in one round trip. Returns, per input, whether it was
  // applied (false: that lease was stale and its task is untouched).
  virtual std::vector<bool> complete_batch(std::span<const Completion> completions) = 0;

  // Opens the transaction a handler's writes share with its task's settlement.
  virtual std::unique_ptr<LeaseTransaction> begin(const Lease& lease) = 0;
  // The same, committing as `options` say. A store with no durability to trade
  // (MemoryStore) ignores them.
  virtual std::unique_ptr<LeaseTransaction> begin(const Lease& lease, const TransactionOptions& options) {
    (void)options;
    return begin(lease);
  }

  // Reads, cancel and retry take a Scope: the default sees every tenant.
  virtual CancelOutcome cancel(TaskId id, const Scope& scope = {}) = 0;
  // A failed, expired or cancelled task runs again: pending at once, as a new
  // attempt (its history, checkpoint and last error kept). It gets at least one
  // more attempt than it has used, and a deadline that has passed is dropped.
  virtual RetryOutcome retry(TaskId id, const Scope& scope = {}) = 0;
  // Deletes a task with its key, attempts and edges to its parents, in one
  // transaction, as retention would. A pending or waiting task is cancelled
  // first (its waiting children follow as on cancel(), and it counts in
  // cancelled_total); a running one is refused (`running`: cancel it, and
  // delete it once its handler has stopped). Its key can then be used again.
  virtual RemoveOutcome remove(TaskId id, const Scope& scope = {}) = 0;
  // Pausing a queue: no claim that starts after pause returns (by any worker,
  // process or machine) takes its tasks; running tasks finish and settle as
  // usual, submits go on. Persisted until resume. Both are idempotent and
  // apply to the queue in every tenant.
  virtual void pause(std::string_view queue) = 0;
  virtual void resume(std::string_view queue) = 0;
  virtual std::vector<std::string> paused_queues() = 0;
  // Sets a queue's limits (replacing all of them; empty limits: none), for
  // every claim that starts after this returns, by any worker. Tasks running
  // now count against them, and none is stopped: a limit lowered below what
  // runs lets nothing start until enough have ended. A running task holds its
  // place until it is settled or given back, or its lease runs out (by the
  // store's clock). InvalidArgument (naming the field, writing nothing) for a
  // number out of range or a period that is not positive.
  virtual void set_limits(std::string_view queue, const QueueLimits& limits) = 0;
  // Every queue with limits, by name.
  virtual std::vector<std::pair<std::string, QueueLimits>> limits() = 0;

  virtual std::optional<Task> get(TaskId id, const Scope& scope = {}) = 0;
  // The task submitted with `key` to `queue` by the scope's tenant (the default
  // scope: by no tenant), since keys are unique per (queue, tenant).
  virtual std::optional<Task> find(std::string_view queue, std::string_view key, const Scope& scope = {}) = 0;
  // A tenant scope and query.tenant both filter: different tenants list nothing.
  virtual TaskPage list(const ListQuery& query, const Scope& scope = {}) = 0;
  virtual std::vector<QueueStats> stats(const Scope& scope = {}) = 0;
  // Tasks finished per minute and queue and outcome over the last `minutes`
  // (1..1440; PostgresStore keeps minutes for two hours, so at most 120 of
  // them have counts), oldest first; minutes with none are left out.
  virtual std::vector<Throughput> throughput(int minutes, const Scope& scope = {}) = 0;
  virtual std::vector<Attempt> history(TaskId id, const Scope& scope = {}) = 0;
  // The task's parents and children (empty for an unknown or invisible id).
  virtual Relatives relatives(TaskId id, const Scope& scope = {}) = 0;

  // Deletes finished tasks (with their keys and history) that finished more than
  // `older_than` ago, `batch_size` rows per statement. Returns how many.
  virtual std::int64_t prune(Millis older_than, int batch_size = 1000) = 0;
  // How many finished tasks prune(older_than) would delete now (a dry run).
  virtual std::int64_t prunable(Millis older_than) = 0;
  // Housekeeping a worker runs now and then: expire overdue pending tasks, settle
  // tasks whose lease ran out with no attempts left, apply the retention setting.
  virtual MaintenanceReport maintain() = 0;

  // Blocks until tasks may be ready on one of `queues`, wake() is called, or the
  // timeout passes. May return early; callers claim and wait again. A wake()
  // while nobody waits ends the next wait at once.
  virtual void wait_for_tasks(const std::vector<std::string>& queues, Millis timeout) = 0;
  virtual void wake() = 0;

  // The store's clock, which every lease and deadline decision uses: the
  // database's now() on Postgres, the system clock in memory. Schedulers compute
  // period buckets from it so that machines whose clocks disagree still agree.
  virtual TimePoint now() = 0;
};

}  // namespace eoq
