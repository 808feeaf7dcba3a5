// exactly_once_simulator: many clients submit the same tasks at once, handlers are
// slow and fail at random, and still every task's effect happens exactly once.
//
// What it shows:
//  - a caller id is an idempotency key: submitted many times, from many threads at
//    the same instant, it yields one task, and every other submit gets that task
//    back marked as a duplicate. A task without a caller id is new on every submit.
//  - a handler's effect (a row in simulator.effects) commits with the task's
//    completion: an attempt that fails after writing it leaves no row, the retry
//    writes it again, and exactly one row survives.
//  - the report lists, per task, how often it was submitted, its attempts, their
//    errors and its final status. The program exits 0 only if every succeeded task
//    has exactly one effect row (written by its last attempt) and every other none.
//
//   exactly_once_simulator [--tasks 40] [--unkeyed 5] [--submitters 8] [--repeats 5]
//                          [--min-delay-ms 100] [--max-delay-ms 600] [--failure-rate 0.2]
//                          [--workers 2] [--concurrency 8] [--max-attempts 10] [--timeout-s 120]
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops itself.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include "example_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <latch>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
// The host's own connection: creates the example's table and counts effects at
// the end, independently of eoq.
using example::Db;

struct Options {
  int tasks = 40, unkeyed = 5, submitters = 8, repeats = 5;
  int min_delay_ms = 100, max_delay_ms = 600;
  double failure_rate = 0.2;
  int workers = 2, concurrency = 8, max_attempts = 10, timeout_s = 120;
};

Options parse(int argc, char** argv) {
  Options o;
  std::map<std::string, int*> ints{
      {"--tasks", &o.tasks},        {"--unkeyed", &o.unkeyed},           {"--submitters", &o.submitters},
      {"--repeats", &o.repeats},    {"--min-delay-ms", &o.min_delay_ms}, {"--max-delay-ms", &o.max_delay_ms},
      {"--workers", &o.workers},    {"--concurrency", &o.concurrency},   {"--max-attempts", &o.max_attempts},
      {"--timeout-s", &o.timeout_s}};
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) throw std::invalid_argument("missing value for " + flag);
    if (flag == "--failure-rate") o.failure_rate = std::stod(argv[++i]);
    else if (ints.count(flag)) *ints[flag] = std::stoi(argv[++i]);
    else throw std::invalid_argument("unknown flag " + flag);
  }
  if (o.tasks < 1 || o.submitters < 1 || o.repeats < 1 || o.min_delay_ms < 0 || o.max_delay_ms < o.min_delay_ms ||
      o.failure_rate < 0 || o.failure_rate > 1 || o.workers < 1 || o.concurrency < 1)
    throw std::invalid_argument("flag out of range");
  return o;
}

double unit_random() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return std::uniform_real_distribution<double>(0, 1)(gen);
}

// How many submits returned each task.
struct SubmitLog {
  std::mutex m;
  std::map<eoq::TaskId, int> submits;
  void note(const eoq::SubmitResult& r) {
    std::lock_guard lk(m);
    ++submits[r.task.id];
  }
};

}  // namespace

int main(int argc, char** argv) try {
  const Options opt = parse(argc, argv);
  const std::string url = eoq::testing::database_url_or_temp("EOQ_DATABASE_URL");

  // A fresh schema for eoq and one for our own table, so a rerun on the same
  // database starts from nothing (caller ids would otherwise still be taken).
  Db db(url);
  db.query("SET client_min_messages = warning");
  db.query("DROP SCHEMA IF EXISTS simulator CASCADE");
  db.query("DROP SCHEMA IF EXISTS simulator_eoq CASCADE");
  db.query("CREATE SCHEMA simulator");
  // Deliberately no unique constraint: a second effect for a task must show up
  // in the count, not be hidden by an error.
  db.query(
      "CREATE TABLE simulator.effects (task_id bigint NOT NULL, caller_id text, amount_cents int NOT NULL,"
      " attempt int NOT NULL, worker text NOT NULL)");

  auto store_options = [&](int pool_size) { return example::store_options("simulator_eoq", url, pool_size); };
  eoq::PostgresStore store(store_options(opt.submitters));
  store.migrate();

  // The handler writes its effect first, then takes its time, then maybe fails:
  // the worst moment to fail, since the effect is already written.
  auto handler = [&opt](eoq::TaskContext& ctx) {
    ctx.exec(
        "INSERT INTO simulator.effects (task_id, caller_id, amount_cents, attempt, worker)"
        " VALUES ($1, $2::json->>'caller_id', ($2::json->>'amount_cents')::int, $3, $4)",
        {std::to_string(ctx.id()), ctx.payload(), std::to_string(ctx.attempt()), ctx.lease().owner});
    auto delay = opt.min_delay_ms + unit_random() * (opt.max_delay_ms - opt.min_delay_ms);
    if (!ctx.sleep_for(eoq::Millis(static_cast<long>(delay)))) throw std::runtime_error("interrupted");
    if (unit_random() < opt.failure_rate) throw std::runtime_error("simulated failure after writing the effect");
    ctx.set_result(R"({"charged":true})");
  };

  // One store per worker, as if each ran in its own process.
  std::vector<std::unique_ptr<eoq::PostgresStore>> worker_stores;
  std::vector<std::unique_ptr<eoq::Worker>> workers;
  for (int w = 0; w < opt.workers; ++w) {
    worker_stores.push_back(std::make_unique<eoq::PostgresStore>(store_options(opt.concurrency)));
    eoq::WorkerOptions wo;
    wo.queues = {"simulator"};
    wo.concurrency = opt.concurrency;
    wo.worker_id = "worker-" + std::to_string(w + 1);
    workers.push_back(std::make_unique<eoq::Worker>(*worker_stores.back(), wo));
    workers.back()->on("charge", handler);
    workers.back()->start();  // before submitting: processing overlaps the submit storm
  }

  auto make_task = [&](std::optional<std::string> caller_id) {
    eoq::NewTask t;
    t.queue = "simulator";
    t.type = "charge";
    t.key = caller_id;
    // The amount comes from the caller id, so every repeat of a submit is identical.
    auto amount = caller_id ? 100 + static_cast<int>(std::hash<std::string>{}(*caller_id) % 9900) : 4200;
    t.payload = std::string(R"({"caller_id":)") + (caller_id ? "\"" + *caller_id + "\"" : "null") +
                R"(,"amount_cents":)" + std::to_string(amount) + "}";
    t.retry = {.max_attempts = opt.max_attempts,
               .backoff = eoq::Backoff::fixed,
               .initial_delay = 100ms,
               .max_delay = 100ms,
               .jitter = 0.5};
    return t;
  };

  SubmitLog log;
  std::latch stampede(opt.submitters);
  std::atomic<int> stampede_created{0};
  std::atomic<eoq::TaskId> stampede_task{0};
  std::vector<std::jthread> submitters;
  for (int s = 0; s < opt.submitters; ++s)
    submitters.emplace_back([&, s] {
      // Everyone submits order-1 at the same instant: the unique key decides.
      stampede.arrive_and_wait();
      auto r = store.submit(make_task("order-1"));
      log.note(r);
      if (!r.duplicate) ++stampede_created;
      stampede_task = r.task.id;
      // Then the other submits, spread over the threads and interleaved.
      for (int n = s; n < opt.tasks * opt.repeats; n += opt.submitters)
        log.note(store.submit(make_task("order-" + std::to_string(n % opt.tasks + 1))));
      for (int n = s; n < opt.unkeyed; n += opt.submitters) log.note(store.submit(make_task(std::nullopt)));
    });
  submitters.clear();  // joins

  std::printf("%d threads submitted order-1 at the same instant: %d task created (%lld), %d duplicates\n",
              opt.submitters, stampede_created.load(), static_cast<long long>(stampede_task.load()),
              opt.submitters - stampede_created.load());
  std::printf("then %d caller ids were submitted %d times each and %d tasks without a caller id once each\n", opt.tasks,
              opt.repeats, opt.unkeyed);

  // Wait until nothing is pending or running.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(opt.timeout_s);
  for (;;) {
    std::int64_t open = 0;
    for (const auto& s : store.stats())
      if (s.queue == "simulator") open = s.pending + s.running;
    if (open == 0) break;
    if (std::chrono::steady_clock::now() > give_up) {
      std::printf("timed out with %lld task(s) unfinished\n", static_cast<long long>(open));
      return 1;
    }
    std::this_thread::sleep_for(50ms);
  }
  for (auto& w : workers) w->stop();

  // The effects, counted in the database: task id -> (rows, attempt that wrote it).
  std::map<eoq::TaskId, std::pair<int, int>> effects;
  for (const auto& r : db.query("SELECT task_id, count(*), max(attempt) FROM simulator.effects GROUP BY task_id"))
    effects[std::stoll(r[0])] = {std::stoi(r[1]), std::stoi(r[2])};

  std::printf("\n%6s  %-10s %7s %8s  %-9s %7s  %s\n", "task", "caller id", "submits", "attempts", "status", "effects",
              "errors");
  bool ok = true;
  int tasks = 0, keyed = 0, succeeded = 0, attempts = 0, effect_rows = 0;
  eoq::ListQuery q;
  q.queue = "simulator";
  q.limit = 1000;
  for (;;) {
    auto page = store.list(q);
    for (const auto& t : page.tasks) {
      ++tasks;
      keyed += t.key.has_value();
      attempts += t.attempts;
      auto [rows, by_attempt] = effects[t.id];
      effect_rows += rows;
      bool done = t.status == eoq::TaskStatus::succeeded;
      succeeded += done;
      // Exactly one effect for a succeeded task, from the attempt that succeeded; none otherwise.
      bool task_ok = done ? rows == 1 && by_attempt == t.attempts : rows == 0;
      ok = ok && task_ok;
      // "attempts 1, 2: <error>" when they failed alike, else each with its own error.
      std::string numbers, errors, last;
      bool alike = true;
      for (const auto& a : store.history(t.id)) {
        if (!a.error) continue;
        alike = alike && (last.empty() || *a.error == last);
        last = *a.error;
        numbers += (numbers.empty() ? "" : ", ") + std::to_string(a.number);
        errors += (errors.empty() ? "" : "; ") + std::to_string(a.number) + ": " + *a.error;
      }
      if (alike && !last.empty()) errors = "attempt " + numbers + ": " + last;
      std::printf("%6lld  %-10s %7d %8d  %-9s %7d%s  %s\n", static_cast<long long>(t.id), t.key.value_or("-").c_str(),
                  log.submits[t.id], t.attempts, std::string(eoq::to_string(t.status)).c_str(), rows,
                  task_ok ? "" : " !!", errors.c_str());
    }
    if (!page.next_after) break;
    q.after = page.next_after;
  }

  bool counts_ok = keyed == opt.tasks && tasks == opt.tasks + opt.unkeyed && stampede_created == 1;
  ok = ok && counts_ok;
  std::printf("\n%d tasks (%d with a caller id, expected %d + %d): %s\n", tasks, keyed, opt.tasks, opt.unkeyed,
              counts_ok ? "one task per caller id" : "WRONG");
  std::printf("%d succeeded, %d attempts in all, %d failed attempt(s) whose effects were rolled back\n", succeeded,
              attempts, attempts - succeeded);
  std::printf("%d effect row(s) for %d succeeded task(s): %s\n", effect_rows, succeeded,
              ok ? "every effect happened exactly once" : "INVARIANT BROKEN");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "exactly_once_simulator: %s\n", e.what());
  return 1;
}
