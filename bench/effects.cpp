// Tasks whose handler writes: a drain where each handler inserts one row keyed
// by its task in the transaction that completes the task, beside the physical
// ceiling of that transaction on the same server in the same run (one INSERT
// and one UPDATE per commit, no queue logic, as ../shared/peers/effect-ceiling.sh
// runs it with pgbench) and beside a no-op drain.
//
//   effects [--tasks N] [--clients K] [--ceiling-seconds S] [--modes LIST] [--batch B] [--async-commit]
//           [--without-totals]
//
// Runs on EOQ_BENCH_DATABASE_URL, or on a throwaway server it starts itself
// (fsync and synchronous_commit on). Every drain is checked afterwards: each task
// succeeded once and left exactly one effect row.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>

#include <fmt/format.h>
#include <libpq-fe.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

namespace {

using SteadyClock = std::chrono::steady_clock;
double seconds_since(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

struct Args {
  int tasks = 20000;
  int clients = 8;
  double ceiling_seconds = 10;
  std::vector<std::string> modes{"ceiling", "noop", "per-task", "batch"};
  int batch = 100;
  int concurrency = 0;  // 0: WorkerOptions{}'s
  bool send = false;    // the handler's INSERT through ctx.send, not ctx.exec
  bool async_commit = false;
  bool without_totals = false;  // the totals triggers of migration 0008 disabled: their cost, by difference
};

const char* kUsage = R"(effects: drain tasks whose handler inserts one row, beside the same transaction's ceiling
  --tasks N            tasks per drain (default 20000)
  --clients K          clients of the ceiling run (default 8, as effect-ceiling.sh)
  --ceiling-seconds S  length of the ceiling run (default 10)
  --modes LIST         comma-separated, in order: ceiling, noop, per-task, batch (default: all four)
  --batch B            HandlerOptions::batch of the batch drain (default 100)
  --concurrency C      handler threads (default: WorkerOptions{}'s)
  --send               the handlers write through ctx.send (not waited for) instead of ctx.exec
  --async-commit       the worker's lease transactions commit with synchronous_commit off
  --without-totals     bench only, to measure their cost: disables the triggers that keep eoq.totals
                       (migration 0008: totals_added, totals_removed, totals_truncated) on this run's
                       schema, so the drains run without the totals upkeep and stats() is wrong there
Runs on EOQ_BENCH_DATABASE_URL, or on a throwaway server it starts itself.
)";

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(k + " needs a value");
      return argv[++i];
    };
    if (k == "--help" || k == "-h") {
      fmt::print("{}", kUsage);
      std::exit(0);
    } else if (k == "--tasks") a.tasks = std::stoi(next());
    else if (k == "--clients") a.clients = std::stoi(next());
    else if (k == "--ceiling-seconds") a.ceiling_seconds = std::stod(next());
    else if (k == "--batch") a.batch = std::stoi(next());
    else if (k == "--async-commit") a.async_commit = true;
    else if (k == "--without-totals") a.without_totals = true;
    else if (k == "--concurrency") a.concurrency = std::stoi(next());
    else if (k == "--send") a.send = true;
    else if (k == "--modes") {
      a.modes.clear();
      std::stringstream ss(next());
      for (std::string m; std::getline(ss, m, ',');) {
        if (m != "ceiling" && m != "noop" && m != "per-task" && m != "batch")
          throw std::invalid_argument("--modes: unknown mode '" + m + "'");
        a.modes.push_back(m);
      }
    } else throw std::invalid_argument("unknown argument " + k + " (see --help)");
  }
  if (a.tasks < 1) throw std::invalid_argument("--tasks must be at least 1");
  return a;
}

void must(PGconn* c, PGresult* r) {
  auto s = PQresultStatus(r);
  if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
    std::string m = PQerrorMessage(c);
    PQclear(r);
    throw std::runtime_error(m);
  }
  PQclear(r);
}

std::string scalar(const std::string& url, const std::string& sql) {
  PGconn* c = PQconnectdb(url.c_str());
  PGresult* r = PQexec(c, sql.c_str());
  if (PQresultStatus(r) != PGRES_TUPLES_OK) {
    std::string m = PQerrorMessage(c);
    PQclear(r);
    PQfinish(c);
    throw std::runtime_error(m);
  }
  std::string v = PQgetvalue(r, 0, 0);
  PQclear(r);
  PQfinish(c);
  return v;
}

void command(const std::string& url, const std::string& sql) {
  PGconn* c = PQconnectdb(url.c_str());
  must(c, PQexec(c, sql.c_str()));
  PQfinish(c);
}

// The least a task with one effect needs: BEGIN; INSERT the effect; UPDATE the
// task row; COMMIT, each statement prepared and sent on its own, as pgbench -M
// prepared does, by `clients` connections for `secs` seconds.
double ceiling(const std::string& url, int clients, double secs) {
  const int rows = 200000;
  command(url,
          "SET client_min_messages = warning; DROP TABLE IF EXISTS fx_tasks, fx_effects; "
          "CREATE TABLE fx_tasks (id bigint PRIMARY KEY, status text NOT NULL, version int NOT NULL, payload jsonb); "
          "INSERT INTO fx_tasks SELECT g, 'running', 0, '{}' FROM generate_series(1, " +
              std::to_string(rows) +
              ") g; "
              "CREATE TABLE fx_effects (task_id bigint NOT NULL, who text NOT NULL)");
  command(url, "VACUUM ANALYZE fx_tasks");
  command(url, "CHECKPOINT");
  std::atomic<long> done{0};
  auto t0 = SteadyClock::now();
  std::vector<std::thread> ts;
  for (int k = 0; k < clients; ++k)
    ts.emplace_back([&, k] {
      PGconn* c = PQconnectdb(url.c_str());
      must(c, PQprepare(c, "b", "BEGIN", 0, nullptr));
      must(c, PQprepare(c, "i", "INSERT INTO fx_effects (task_id, who) VALUES ($1, 'x')", 0, nullptr));
      must(c, PQprepare(c, "u", "UPDATE fx_tasks SET status = 'succeeded', version = version + 1 WHERE id = $1", 0,
                        nullptr));
      must(c, PQprepare(c, "c", "COMMIT", 0, nullptr));
      std::mt19937 rng(static_cast<unsigned>(k));
      std::uniform_int_distribution<int> pick(1, rows);
      long n = 0;
      while (seconds_since(t0) < secs) {
        auto id = std::to_string(pick(rng));
        const char* p[] = {id.c_str()};
        must(c, PQexecPrepared(c, "b", 0, nullptr, nullptr, nullptr, 0));
        must(c, PQexecPrepared(c, "i", 1, p, nullptr, nullptr, 0));
        must(c, PQexecPrepared(c, "u", 1, p, nullptr, nullptr, 0));
        must(c, PQexecPrepared(c, "c", 0, nullptr, nullptr, nullptr, 0));
        ++n;
      }
      done += n;
      PQfinish(c);
    });
  for (auto& t : ts) t.join();
  double rate = static_cast<double>(done) / seconds_since(t0);
  command(url, "DROP TABLE fx_tasks, fx_effects");
  return rate;
}

void submit(eoq::TaskStore& s, const std::string& queue, const std::string& type, int n) {
  for (int done = 0; done < n; done += 10000) {
    std::vector<eoq::NewTask> b(static_cast<std::size_t>(std::min(10000, n - done)));
    for (auto& t : b) {
      t.queue = queue;
      t.type = type;
      t.payload = R"({"n":1})";
    }
    s.submit_batch(b);
  }
}

// Drains `n` tasks of `queue` with a Worker of WorkerOptions{} (the queue set,
// and the commit mode); returns tasks/s from the worker's start to the last
// success, and checks that every task succeeded once.
double drain(eoq::PostgresStore& s, const std::string& url, const std::string& schema, const std::string& mode,
             const Args& a) {
  const std::string queue = "fx_" + std::string(mode == "per-task" ? "one" : mode);
  const std::string effects = schema + ".fx_effects";
  command(url, fmt::format("CREATE TABLE IF NOT EXISTS {} (task_id bigint PRIMARY KEY, who text NOT NULL)", effects));
  submit(s, queue, "fx", a.tasks);
  command(url, fmt::format("VACUUM ANALYZE {0}.tasks, {1}", schema, effects));
  command(url, "CHECKPOINT");

  eoq::WorkerOptions wo;
  wo.queues = {queue};
  wo.logger = [](eoq::LogLevel, std::string_view m) { fmt::print(stderr, "worker: {}\n", m); };
  wo.log_level = eoq::LogLevel::warning;
  if (a.async_commit) wo.synchronous_commit = false;
  if (a.concurrency > 0) wo.concurrency = a.concurrency;
  eoq::Worker w(s, wo);
  const std::string insert = fmt::format("INSERT INTO {} (task_id, who) VALUES ($1, $2)", effects);
  if (mode == "noop") {
    w.on("fx", [](eoq::TaskContext&) {});
  } else {
    eoq::HandlerOptions ho;
    if (mode == "batch") ho.batch = a.batch;
    if (a.send) w.on("fx", [&](eoq::TaskContext& ctx) { ctx.send(insert, {ctx.id(), "w"}); }, ho);
    else w.on("fx", [&](eoq::TaskContext& ctx) { ctx.exec(insert, {ctx.id(), "w"}); }, ho);
  }
  auto t0 = SteadyClock::now();
  w.start();
  while (w.counters().succeeded < static_cast<std::uint64_t>(a.tasks)) {
    auto c = w.counters();
    if (c.failed + c.lease_lost + c.abandoned > 0)
      throw std::runtime_error(fmt::format("{}: {} failed, {} lost, {} abandoned", mode, c.failed, c.lease_lost,
                                           c.abandoned));
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  double rate = a.tasks / seconds_since(t0);
  w.stop();
  auto c = w.counters();
  if (c.succeeded != static_cast<std::uint64_t>(a.tasks) || c.retried != 0)
    throw std::runtime_error(fmt::format("{}: {} succeeded, {} retried of {}", mode, c.succeeded, c.retried, a.tasks));
  if (mode != "noop") {
    auto rows = std::stol(scalar(url, "SELECT count(*) FROM " + effects));
    if (rows != a.tasks) throw std::runtime_error(fmt::format("{}: {} effect rows for {} tasks", mode, rows, a.tasks));
  }
  command(url, "DROP TABLE " + effects);
  return rate;
}

}  // namespace

int main(int argc, char** argv) try {
  Args a = parse(argc, argv);
  std::string url = eoq::testing::database_url_or_temp("EOQ_BENCH_DATABASE_URL");
  fmt::print("eoq effects harness: {} tasks per drain, WorkerOptions{{}}{}{}, {} cores{}\n", a.tasks,
             a.concurrency > 0 ? fmt::format(" with {} handler threads", a.concurrency) : "",
             a.async_commit ? " with synchronous_commit off" : "", std::thread::hardware_concurrency(),
             a.without_totals ? "; totals triggers disabled (--without-totals)" : "");
  eoq::PostgresOptions po;
  po.conninfo = url;
  po.schema = fmt::format("bench_fx_{}", ::getpid());
  eoq::PostgresStore store(po);
  store.migrate();
  if (a.without_totals)
    command(url, fmt::format("ALTER TABLE {0}.finished DISABLE TRIGGER totals_added, DISABLE TRIGGER totals_removed, "
                             "DISABLE TRIGGER totals_truncated",
                             po.schema));

  double ceil = 0, noop = 0;
  fmt::print("| figure | tasks/s | ratio |\n|---|--:|--:|\n");
  for (const auto& m : a.modes) {
    if (m == "ceiling") {
      ceil = ceiling(url, a.clients, a.ceiling_seconds);
      fmt::print("| ceiling: BEGIN, INSERT, UPDATE, COMMIT, {} clients | {:.0f} | 1.00 |\n", a.clients, ceil);
      continue;
    }
    double r = drain(store, url, po.schema, m, a);
    if (m == "noop") noop = r;
    const char* call = a.send ? "ctx.send" : "ctx.exec";
    std::string label = m == "noop"       ? "eoq no-op handler"
                        : m == "per-task" ? fmt::format("eoq per-task: {}(INSERT), atomic with completion", call)
                                          : fmt::format("eoq HandlerOptions{{.batch = {}}}: {}(INSERT), one commit per batch",
                                                        a.batch, call);
    std::string ratio;
    if (ceil > 0) ratio += fmt::format("{:.2f} of ceiling", r / ceil);
    if (noop > 0 && m != "noop") ratio += fmt::format("{}{:.2f} of no-op", ratio.empty() ? "" : "; ", r / noop);
    fmt::print("| {} | {:.0f} | {} |\n", label, r, ratio.empty() ? "-" : ratio);
    std::fflush(stdout);
  }
  // What the totals upkeep left (the workers' maintenance sums it every few seconds); none when disabled.
  fmt::print("eoq.totals after the drains: {} rows{}\n", scalar(url, "SELECT count(*) FROM " + po.schema + ".totals"),
             a.without_totals ? " (triggers disabled)" : "");
  command(url, fmt::format("SET client_min_messages = warning; DROP SCHEMA {} CASCADE", po.schema));
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "effects: {}\n", e.what());
  return 1;
}
