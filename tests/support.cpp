#include "support.hpp"

#include <eoq/testing.hpp>

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

extern char** environ;

#ifndef EOQ_TEST_CLUSTER_FILE
#define EOQ_TEST_CLUSTER_FILE ""
#endif
#ifndef EOQ_TEST_PGBOUNCER_FILE
#define EOQ_TEST_PGBOUNCER_FILE ""
#endif
#ifndef EOQ_TEST_SCRATCH_DIR
#define EOQ_TEST_SCRATCH_DIR "/tmp"
#endif

namespace eoq::test {

namespace fs = std::filesystem;

namespace {

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string quote_value(std::string_view v) {
  std::string out = "'";
  for (char c : v) {
    if (c == '\'' || c == '\\') out += '\\';
    out += c;
  }
  return out + "'";
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// The tests labelled pgbouncer run with EOQ_TEST_PGBOUNCER=1: their stores go
// through the PgBouncer (transaction pooling) the ctest fixture started.
bool pooled() { return !env("EOQ_TEST_PGBOUNCER").empty(); }

std::string compute_url();

std::string pgbouncer_url() {
  std::string file = EOQ_TEST_PGBOUNCER_FILE;
  std::string url = trim(read_file(file));
  if (url.empty())
    throw Error("EOQ_TEST_PGBOUNCER is set, but the pgbouncer fixture wrote no " + file +
                " (run through ctest, which starts it: ctest -L pgbouncer)");
  return url;
}

std::string compute_url() {
  if (auto url = env("EOQ_TEST_DATABASE_URL"); !url.empty()) return url;
  std::string file = EOQ_TEST_CLUSTER_FILE;
  if (!file.empty()) {
    std::string url = trim(read_file(file));
    if (!url.empty() && PQping(url.c_str()) == PQPING_OK) return url;
  }
  // Run on its own (not under ctest): a server for this process only.
  static std::unique_ptr<eoq::testing::TempPostgres> server;
  eoq::testing::TempPostgresOptions o;
  o.fsync = false;
  o.max_connections = 300;
  server = std::make_unique<eoq::testing::TempPostgres>(o);
  return server->conninfo();
}

}  // namespace

std::string direct_database_url() {
  static std::mutex m;
  static std::string url;
  std::lock_guard lock(m);
  if (url.empty()) url = compute_url();
  return url;
}

std::string test_database_url() {
  if (pooled()) {
    static const std::string url = pgbouncer_url();
    return url;
  }
  return direct_database_url();
}

void use_test_pooling(PostgresOptions& options) {
  if (!pooled()) return;
  options.transaction_pooling = true;
  options.listen_conninfo = direct_database_url();
}

std::string fresh_schema(std::string_view hint) {
  static std::atomic<int> counter{0};
  static const std::string salt = [] {
    std::random_device rd;
    const char* digits = "0123456789abcdefghijklmnopqrstuvwxyz";
    std::string s;
    for (int i = 0; i < 4; ++i) s += digits[rd() % 36];
    return s;
  }();
  std::string h;
  for (char c : hint) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    h += ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_') ? c : '_';
  }
  if (h.empty() || (h[0] >= '0' && h[0] <= '9')) h = "t" + h;
  if (h.size() > 24) h.resize(24);
  return fmt::format("{}_{}_{}_{}", h, ::getpid(), ++counter, salt);
}

std::string conninfo_with(const std::string& conninfo, const std::string& key, const std::string& value) {
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (!opts) {
    std::string why = err ? err : "cannot parse";
    if (err) PQfreemem(err);
    throw Error("conninfo_with: " + trim(why));
  }
  std::string out;
  for (PQconninfoOption* o = opts; o->keyword; ++o) {
    if (!o->val || key == o->keyword) continue;
    out += fmt::format("{}={} ", o->keyword, quote_value(o->val));
  }
  PQconninfoFree(opts);
  out += fmt::format("{}={}", key, quote_value(value));
  return out;
}

std::string_view to_string(StoreKind kind) noexcept {
  return kind == StoreKind::memory ? "MemoryStore" : "PostgresStore";
}

TestStore::TestStore(StoreKind kind, StoreOptions options) : kind_(kind), options_(std::move(options)) {
  if (kind_ == StoreKind::memory) {
    MemoryStoreOptions o;
    o.max_payload_bytes = options_.max_payload_bytes;
    o.retention = options_.retention;
    store_ = std::make_unique<MemoryStore>(o);
    return;
  }
  conninfo_ = test_database_url();
  if (!options_.application_name.empty())
    conninfo_ = conninfo_with(conninfo_, "application_name", options_.application_name);
  schema_ = fresh_schema();
  auto pg = another();
  static_cast<PostgresStore&>(*pg).migrate();
  store_ = std::move(pg);
}

TestStore::~TestStore() {
  store_.reset();
  if (kind_ == StoreKind::postgres && env("EOQ_TEST_KEEP_SCHEMAS").empty()) drop_schema(conninfo_, schema_);
}

PostgresStore* TestStore::postgres() const noexcept {
  return kind_ == StoreKind::postgres ? static_cast<PostgresStore*>(store_.get()) : nullptr;
}

std::unique_ptr<TaskStore> TestStore::another() const {
  if (kind_ == StoreKind::memory) return nullptr;
  PostgresOptions o;
  o.conninfo = conninfo_;
  o.schema = schema_;
  o.pool_size = options_.pool_size;
  o.max_payload_bytes = options_.max_payload_bytes;
  o.retention = options_.retention;
  o.transient_retries = options_.transient_retries;
  o.prune_batch = options_.prune_batch;
  o.prune_budget = options_.prune_budget;
  use_test_pooling(o);
  return std::make_unique<PostgresStore>(o);
}

void drop_schema(const std::string& conninfo, const std::string& schema) {
  try {
    Admin admin(conninfo);
    admin.exec(fmt::format("SET client_min_messages = warning; DROP SCHEMA IF EXISTS \"{}\" CASCADE", schema));
  } catch (...) {
    // cleanup only
  }
}

Admin::Admin(const std::string& conninfo) {
  std::string c = conninfo_with(conninfo, "application_name", "eoq-test-admin");
  conn_ = PQconnectdb(c.c_str());
  if (PQstatus(conn_) != CONNECTION_OK) {
    std::string msg = trim(PQerrorMessage(conn_));
    PQfinish(conn_);
    conn_ = nullptr;
    throw Error("test admin connection failed: " + msg);
  }
}

Admin::~Admin() {
  if (conn_) PQfinish(conn_);
}

Admin::Result Admin::exec(const std::string& sql, const std::vector<std::optional<std::string>>& params) {
  std::vector<const char*> values;
  for (const auto& p : params) values.push_back(p ? p->c_str() : nullptr);
  PGresult* r;
  if (params.empty() && sql.find(';') != std::string::npos)
    r = PQexec(conn_, sql.c_str());  // several statements of our own (no parameters)
  else
    r = PQexecParams(conn_, sql.c_str(), static_cast<int>(values.size()), nullptr, values.data(), nullptr, nullptr, 0);
  auto status = PQresultStatus(r);
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    std::string msg = trim(PQresultErrorMessage(r));
    PQclear(r);
    throw Error(fmt::format("test SQL failed: {} ({})", msg, sql));
  }
  Result out;
  for (int i = 0; i < PQntuples(r); ++i) {
    std::vector<std::optional<std::string>> row;
    for (int j = 0; j < PQnfields(r); ++j)
      row.push_back(PQgetisnull(r, i, j) ? std::nullopt : std::optional<std::string>(PQgetvalue(r, i, j)));
    out.rows.push_back(std::move(row));
  }
  const char* n = PQcmdTuples(r);
  out.affected = n && *n ? std::atoll(n) : 0;
  PQclear(r);
  return out;
}

std::optional<std::string> Admin::scalar(const std::string& sql, const std::vector<std::optional<std::string>>& params) {
  auto r = exec(sql, params);
  if (r.rows.size() != 1 || r.rows[0].size() != 1)
    throw Error(fmt::format("test SQL returned {} rows, expected one value ({})", r.rows.size(), sql));
  return r.rows[0][0];
}

long long Admin::count(const std::string& sql, const std::vector<std::optional<std::string>>& params) {
  auto v = scalar(sql, params);
  return v ? std::atoll(v->c_str()) : 0;
}

Child spawn_child(const std::vector<std::string>& args, const std::string& log) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw Error(fmt::format("cannot start {}: {}", args[0], std::strerror(rc)));
  return Child{pid, log};
}

int wait_child(Child& child, std::chrono::milliseconds timeout) {
  if (child.pid <= 0) return -1;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(child.pid, &status, WNOHANG);
    if (r == child.pid) {
      child.pid = -1;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(child.pid, SIGKILL);
      ::waitpid(child.pid, &status, 0);
      child.pid = -1;
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string scratch_dir(std::string_view hint) {
  static std::atomic<int> counter{0};
  fs::path dir = fs::path(EOQ_TEST_SCRATCH_DIR) / fmt::format("{}-{}-{}", hint, ::getpid(), ++counter);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

}  // namespace eoq::test
