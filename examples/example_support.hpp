// example_support.hpp: shared plumbing of the scenario examples in this folder (a
// libpq connection for the examples' own tables, child processes, flag parsing,
// store options). It is not part of eoq's API and is not installed: a host has its
// own versions of these, and nothing here is needed to use eoq.
#pragma once

#include <eoq/eoq.hpp>

#include <libpq-fe.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace example {

using Row = std::vector<std::string>;

// The host's own connection, independent of eoq: each example uses it for its own
// tables (setup, and counting effects at the end).
class Db {
 public:
  explicit Db(const std::string& conninfo) : c_(PQconnectdb(conninfo.c_str()), &PQfinish) {
    if (PQstatus(c_.get()) != CONNECTION_OK) throw std::runtime_error(PQerrorMessage(c_.get()));
  }
  PGconn* get() const noexcept { return c_.get(); }
  std::vector<Row> query(const std::string& sql, const std::vector<std::string>& params = {}) {
    std::vector<const char*> values;
    for (const auto& p : params) values.push_back(p.c_str());
    std::unique_ptr<PGresult, decltype(&PQclear)> r(PQexecParams(c_.get(), sql.c_str(), static_cast<int>(values.size()),
                                                                 nullptr, values.data(), nullptr, nullptr, 0),
                                                    &PQclear);
    auto st = PQresultStatus(r.get());
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) throw std::runtime_error(PQerrorMessage(c_.get()));
    std::vector<Row> rows(static_cast<std::size_t>(PQntuples(r.get())));
    for (int i = 0; i < PQntuples(r.get()); ++i)
      for (int j = 0; j < PQnfields(r.get()); ++j)
        rows[static_cast<std::size_t>(i)].push_back(PQgetvalue(r.get(), i, j));
    return rows;
  }
  // The first column of the first row; throws when there is none.
  std::string one(const std::string& sql, const std::vector<std::string>& params = {}) {
    return query(sql, params).at(0).at(0);
  }

 private:
  std::unique_ptr<PGconn, decltype(&PQfinish)> c_;
};

// eoq's options for an example's own schema. conninfo empty: EOQ_DATABASE_URL;
// pool_size empty: eoq's default.
inline eoq::PostgresOptions store_options(std::string schema, std::string conninfo = {},
                                          std::optional<int> pool_size = std::nullopt) {
  eoq::PostgresOptions o;
  o.conninfo = std::move(conninfo);
  o.schema = std::move(schema);
  if (pool_size) o.pool_size = *pool_size;
  return o;
}

// This program in another process, so it can be stopped or killed for real:
// fork+exec of /proc/self/exe, which shares nothing with our threads and
// connections. args[0] is the child's argv[0].
class Child {
 public:
  explicit Child(std::vector<std::string> args) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    std::fflush(stdout);
    pid_ = fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive us
      execv("/proc/self/exe", argv.data());
      _exit(127);
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() { kill_now(); }
  // Sends `sig` (0: none) and waits for the exit; true when it exited 0.
  bool stop(int sig = 0) {
    if (pid_ <= 0) return true;
    if (sig) kill(pid_, sig);
    int st = 0;
    waitpid(pid_, &st, 0);
    pid_ = -1;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
  }
  void kill_now() { stop(SIGKILL); }

 private:
  pid_t pid_ = -1;
};

// Flags as "--name value" pairs, from argv[from] on.
using Flags = std::map<std::string, std::string>;

inline Flags flags(int argc, char** argv, int from) {
  Flags f;
  for (int i = from; i + 1 < argc; i += 2) f[argv[i]] = argv[i + 1];
  return f;
}

inline int flag(const Flags& f, const std::string& name, int fallback) {
  auto it = f.find(name);
  return it == f.end() ? fallback : std::stoi(it->second);
}

inline std::string flag(const Flags& f, const std::string& name, std::string fallback) {
  auto it = f.find(name);
  return it == f.end() ? fallback : it->second;
}

// Seconds since the demo started, in its child processes too: the parent passes
// started_ms() to them as "--t0", and a child calls start_at_t0(flags).
inline std::chrono::system_clock::time_point started = std::chrono::system_clock::now();
inline double elapsed() { return std::chrono::duration<double>(std::chrono::system_clock::now() - started).count(); }
inline std::string started_ms() {
  return std::to_string(std::chrono::duration_cast<eoq::Millis>(started.time_since_epoch()).count());
}
inline void start_at_t0(const Flags& f) {
  if (f.count("--t0")) started = std::chrono::system_clock::time_point(eoq::Millis(std::stoll(f.at("--t0"))));
}

// Every task the query matches, all pages of it: the examples' verdicts count
// what the store holds, not what they believe they submitted.
inline std::vector<eoq::Task> all_tasks(eoq::TaskStore& store, eoq::ListQuery q, const eoq::Scope& scope = {}) {
  std::vector<eoq::Task> out;
  q.limit = 1000;
  for (;;) {
    auto page = store.list(q, scope);
    out.insert(out.end(), page.tasks.begin(), page.tasks.end());
    if (!page.next_after) return out;
    q.after = page.next_after;
  }
}

inline std::vector<eoq::Task> tasks_of(eoq::TaskStore& store, std::string queue, std::string type) {
  eoq::ListQuery q;
  q.queue = std::move(queue);
  q.type = std::move(type);
  return all_tasks(store, q);
}

// Tasks per (tenant, key) as the store holds them; a key held by two tasks, or a
// task without the key it was meant to carry, shows up here.
inline std::map<std::string, int> tasks_per_key(const std::vector<eoq::Task>& tasks) {
  std::map<std::string, int> n;
  for (const auto& t : tasks) ++n[t.tenant.value_or("") + "/" + t.key.value_or("(no key)")];
  return n;
}

// A verdict line per check; the example exits 0 only when every one held.
class Checks {
 public:
  bool operator()(bool good, const std::string& what) {
    std::printf("%s %s\n", good ? "ok  " : "FAIL", what.c_str());
    std::fflush(stdout);
    ok_ = ok_ && good;
    return good;
  }
  bool ok() const noexcept { return ok_; }
  int exit_code() const noexcept { return ok_ ? 0 : 1; }

 private:
  bool ok_ = true;
};

}  // namespace example
