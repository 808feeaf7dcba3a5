#pragma once
// Shared helpers for eoq's tests: where the test database is, a fresh schema per
// test, stores of either kind, an admin connection for looking behind a store's
// back, and child processes.
//
// The database: $EOQ_TEST_DATABASE_URL when set; otherwise the throwaway cluster
// the ctest fixture (eoq_test_cluster) started for the whole run; otherwise (a
// test binary run on its own) a TempPostgres started for this process.
#include <eoq/eoq.hpp>

#include <libpq-fe.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace eoq::test {

// The connection string of the test database (see above). Starts the
// per-process fallback server on first use when neither is available.
std::string test_database_url();
// The server itself, never through PgBouncer (the same as test_database_url()
// except in the runs labelled pgbouncer).
std::string direct_database_url();
// In the runs labelled pgbouncer (EOQ_TEST_PGBOUNCER set), a store's options
// for a transaction pooler: transaction_pooling on, LISTEN on the direct
// connection. Otherwise nothing. TestStore applies it; child processes must too.
void use_test_pooling(PostgresOptions& options);

// A schema name unique to this call: [a-z_][a-z0-9_]*, at most 48 characters,
// made of `hint`, the process id and a counter. Each Postgres test uses its own.
std::string fresh_schema(std::string_view hint = "t");

// `conninfo` (a key=value string or a URL) with `key` set to `value`, as a
// key=value string.
std::string conninfo_with(const std::string& conninfo, const std::string& key, const std::string& value);

enum class StoreKind { memory, postgres };
std::string_view to_string(StoreKind kind) noexcept;

struct StoreOptions {
  std::size_t max_payload_bytes = 1 << 20;
  std::optional<Millis> retention;
  int pool_size = 8;
  int transient_retries = 3;
  int prune_batch = 1000;     // Postgres only
  Millis prune_budget{200};   // Postgres only
  std::string application_name;  // Postgres: sets application_name in the connection string
};

// A store for one test. Postgres: its own fresh schema, migrated, dropped again
// when the TestStore goes (unless EOQ_TEST_KEEP_SCHEMAS is set).
class TestStore {
 public:
  explicit TestStore(StoreKind kind, StoreOptions options = {});
  ~TestStore();
  TestStore(const TestStore&) = delete;
  TestStore& operator=(const TestStore&) = delete;

  TaskStore& operator*() const noexcept { return *store_; }
  TaskStore* operator->() const noexcept { return store_.get(); }
  TaskStore& get() const noexcept { return *store_; }
  StoreKind kind() const noexcept { return kind_; }
  bool has_sql() const noexcept { return kind_ == StoreKind::postgres; }
  // Postgres only (empty for memory).
  const std::string& schema() const noexcept { return schema_; }
  const std::string& conninfo() const noexcept { return conninfo_; }
  PostgresStore* postgres() const noexcept;
  // Another store object on the same data (Postgres: same schema, new pool).
  // Memory has only one: returns nullptr.
  std::unique_ptr<TaskStore> another() const;

 private:
  StoreKind kind_;
  StoreOptions options_;
  std::string schema_, conninfo_;
  std::unique_ptr<TaskStore> store_;
};

// Drops a schema and everything in it (best effort, for cleanup).
void drop_schema(const std::string& conninfo, const std::string& schema);

// A plain libpq connection for checks a store's API cannot make. Text results.
class Admin {
 public:
  explicit Admin(const std::string& conninfo);
  ~Admin();
  Admin(const Admin&) = delete;
  Admin& operator=(const Admin&) = delete;
  PGconn* get() const noexcept { return conn_; }

  // Runs a parameterised statement; throws eoq::Error with the server's message on failure.
  struct Result {
    std::vector<std::vector<std::optional<std::string>>> rows;
    long long affected = 0;
  };
  Result exec(const std::string& sql, const std::vector<std::optional<std::string>>& params = {});
  std::optional<std::string> scalar(const std::string& sql, const std::vector<std::optional<std::string>>& params = {});
  long long count(const std::string& sql, const std::vector<std::optional<std::string>>& params = {});

 private:
  PGconn* conn_ = nullptr;
};

// Child processes, started with posix_spawn from an argv vector (no shell);
// stdout and stderr go to `log`.
struct Child {
  int pid = -1;
  std::string log;
};
Child spawn_child(const std::vector<std::string>& argv, const std::string& log);
// Waits for it; kills it (SIGKILL, by pid) after `timeout`. Returns the exit
// status (128 + signal when killed by one, -1 after the timeout).
int wait_child(Child& child, std::chrono::milliseconds timeout);
// The text of a file (for child logs and outputs); empty when missing.
std::string read_file(const std::string& path);
// A fresh directory for a test's files, under the build tree's scratch area.
std::string scratch_dir(std::string_view hint);

inline TimePoint now() {
  return std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now());
}

// Polls `pred` until it holds or `timeout` passes; true if it held.
template <class Pred>
bool eventually(Pred pred, Millis timeout = std::chrono::seconds(10)) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return pred();
}

// A gate a handler waits on until the test opens it.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  void release() {
    {
      std::lock_guard lk(mu);
      open = true;
    }
    cv.notify_all();
  }
  bool wait(Millis timeout = std::chrono::seconds(10)) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, timeout, [&] { return open; });
  }
};

// A ListQuery built field by field, so a test reads like the filter it sets.
struct Q {
  eoq::ListQuery q;
  Q& queue(std::string v) { q.queue = std::move(v); return *this; }
  Q& status(eoq::TaskStatus v) { q.status = v; return *this; }
  Q& type(std::string v) { q.type = std::move(v); return *this; }
  Q& tenant(std::string v) { q.tenant = std::move(v); return *this; }
  Q& after(eoq::TaskId v) { q.after = v; return *this; }
  Q& limit(int v) { q.limit = v; return *this; }
  Q& newest_first() { q.newest_first = true; return *this; }
  Q& count_up_to(std::int64_t v) { q.count_up_to = v; return *this; }
  operator eoq::ListQuery() const { return q; }
};

}  // namespace eoq::test
