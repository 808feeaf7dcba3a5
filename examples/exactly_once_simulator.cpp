// exactly_once_simulator: many clients submit the same tasks at once, handlers are
// slow and fail at random, a worker process is killed mid-run, and still every
// task's effect happens exactly once.
//
// What it shows:
//  - a caller id is an idempotency key: submitted many times, by 10 threads at the
//    same instant, it yields one task, and every other submit gets that task back
//    marked as a duplicate. A task without a caller id is new on every submit.
//  - a handler's effect (a row in simulator.effects) commits with the task's
//    completion: an attempt that fails after writing it leaves no row, the retry
//    writes it again, and exactly one row survives.
//  - the workers are separate processes; one is killed (SIGKILL) while it runs
//    tasks. Its uncommitted effects vanish with its connections, its leases run out
//    (2 s), and the other workers run those tasks again.
//  - every action (submit, duplicate, attempt, failure, handler done, the kill, each
//    task's final state) is a line in a log file the user can read back
//    (--log, default exactly_once_simulator.log), checked against the store.
//  - the program exits 0 only if the store holds one task per caller id plus the
//    unkeyed ones, every succeeded task has exactly one effect row (written by its
//    last attempt) and every other none, the killed worker's tasks were recovered,
//    and the log accounts for every submit and attempt.
//
//   exactly_once_simulator [--tasks 40] [--unkeyed 5] [--submitters 10] [--repeats 5]
//                          [--min-delay-ms 100] [--max-delay-ms 600] [--failure-rate 0.2]
//                          [--workers 3] [--concurrency 4] [--max-attempts 10] [--timeout-s 120]
//                          [--log exactly_once_simulator.log] [--serve [HOST:PORT]]
//   exactly_once_simulator worker --id NAME ...    (one worker process; the run starts them)
//
// --serve (default 127.0.0.1:8080) shows the run live in eoq's dashboard and, after
// the verdict, keeps the workers and the page running until Ctrl-C: submit a task
// of type "charge" to queue "simulator" from the page and watch it run. Its payload
// may say {"caller_id": "me", "amount_cents": 500, "fail_attempts": 1} to make the
// first attempt fail, so the retry and the failed attempt's error show.
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops itself
// (kept for as long as the program runs, --serve included).
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include "example_support.hpp"
#include "serve.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <latch>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
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
  int tasks = 40, unkeyed = 5, submitters = 10, repeats = 5;
  int min_delay_ms = 100, max_delay_ms = 600;
  double failure_rate = 0.2;
  int workers = 3, concurrency = 4, max_attempts = 10, timeout_s = 120;
  std::string log = "exactly_once_simulator.log";
  std::string id;  // the worker subcommand's name
};

Options parse(int argc, char** argv, int from) {
  Options o;
  std::map<std::string, int*> ints{
      {"--tasks", &o.tasks},        {"--unkeyed", &o.unkeyed},           {"--submitters", &o.submitters},
      {"--repeats", &o.repeats},    {"--min-delay-ms", &o.min_delay_ms}, {"--max-delay-ms", &o.max_delay_ms},
      {"--workers", &o.workers},    {"--concurrency", &o.concurrency},   {"--max-attempts", &o.max_attempts},
      {"--timeout-s", &o.timeout_s}};
  for (int i = from; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) throw std::invalid_argument("missing value for " + flag);
    if (flag == "--failure-rate") o.failure_rate = std::stod(argv[++i]);
    else if (flag == "--log") o.log = argv[++i];
    else if (flag == "--id") o.id = argv[++i];
    else if (ints.count(flag)) *ints[flag] = std::stoi(argv[++i]);
    else throw std::invalid_argument("unknown flag " + flag);
  }
  if (o.tasks < 1 || o.submitters < 1 || o.repeats < 1 || o.min_delay_ms < 0 || o.max_delay_ms < o.min_delay_ms ||
      o.failure_rate < 0 || o.failure_rate > 1 || o.concurrency < 1 || o.max_attempts < 2)
    throw std::invalid_argument("flag out of range (see the usage at the top of the source)");
  if (o.workers < 2) throw std::invalid_argument("--workers: at least 2, since one of them is killed");
  return o;
}

double unit_random() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return std::uniform_real_distribution<double>(0, 1)(gen);
}

// The action log: one line per action, appended by every process. One write()
// per line on an O_APPEND file, so lines from several processes never mix, and a
// line written just before a SIGKILL is still there.
class ActionLog {
 public:
  ActionLog(const std::string& path, bool truncate)
      : fd_(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | (truncate ? O_TRUNC : 0), 0644)) {
    if (fd_ < 0) throw std::runtime_error("--log: cannot open " + path + ": " + std::strerror(errno));
  }
  ~ActionLog() { ::close(fd_); }
  ActionLog(const ActionLog&) = delete;
  ActionLog& operator=(const ActionLog&) = delete;
  void write(const std::string& who, const std::string& action, eoq::TaskId task, const std::string& detail = "") {
    char head[96];
    std::snprintf(head, sizeof head, "%8.3f %-11s %-10s task=%lld ", example::elapsed(), who.c_str(), action.c_str(),
                  static_cast<long long>(task));
    std::string line = head + detail + "\n";
    if (::write(fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
      throw std::runtime_error("cannot write the action log");
  }

 private:
  int fd_;
};

// The charge: writes its effect first, then takes its time, then maybe fails: the
// worst moment to fail, since the effect is already written. A payload's
// "fail_attempts": n makes the first n attempts fail (for --serve's page).
void charge(eoq::TaskContext& ctx, const Options& opt, ActionLog& log) {
  const std::string who = ctx.lease().owner, attempt = "attempt=" + std::to_string(ctx.attempt());
  log.write(who, "attempt", ctx.id(), attempt + " caller=" + ctx.key().value_or("-"));
  auto row = ctx.exec(
      "INSERT INTO simulator.effects (task_id, caller_id, amount_cents, attempt, worker)"
      " VALUES ($1, $2::json->>'caller_id', coalesce(($2::json->>'amount_cents')::int, 0), $3, $4)"
      " RETURNING coalesce(($2::json->>'fail_attempts')::int, 0)",
      {std::to_string(ctx.id()), ctx.payload(), std::to_string(ctx.attempt()), who});
  auto delay = opt.min_delay_ms + unit_random() * (opt.max_delay_ms - opt.min_delay_ms);
  if (!ctx.sleep_for(eoq::Millis(static_cast<long>(delay)))) throw std::runtime_error("interrupted");
  if (ctx.attempt() <= std::stoi(*row.rows.at(0)[0]) || unit_random() < opt.failure_rate) {
    log.write(who, "failure", ctx.id(), attempt + " error=simulated failure after writing the effect");
    throw std::runtime_error("simulated failure after writing the effect");
  }
  ctx.set_result(R"({"charged":true})");
  log.write(who, "done", ctx.id(), attempt + " (handler returned; the effect commits with the completion)");
}

eoq::PostgresOptions store_options(int pool_size) {
  return example::store_options("simulator_eoq", std::getenv("EOQ_DATABASE_URL"), pool_size);
}

// The worker subcommand: one worker process, until it is stopped or killed.
int run_worker(const Options& opt) {
  auto stop = example::block_stop_signals();
  ActionLog log(opt.log, false);
  eoq::PostgresStore store(store_options(opt.concurrency));
  eoq::WorkerOptions wo;
  wo.queues = {"simulator"};
  wo.concurrency = opt.concurrency;
  wo.worker_id = opt.id;
  wo.lease = 2s;     // a killed worker's tasks run again 2 s later
  wo.prefetch = 0;   // every lease it holds is a handler running: the log shows each
  wo.poll_interval = 100ms;
  wo.logger = [](eoq::LogLevel level, std::string_view m) {
    if (level == eoq::LogLevel::error) std::fprintf(stderr, "%.*s\n", static_cast<int>(m.size()), m.data());
  };
  eoq::Worker worker(store, wo);
  worker.on("charge", [&](eoq::TaskContext& ctx) { charge(ctx, opt, log); });
  worker.start();
  int sig = 0;
  sigwait(&stop, &sig);
  worker.stop();
  return 0;
}

eoq::NewTask make_task(const Options& opt, std::optional<std::string> caller_id) {
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
}

std::vector<std::string> worker_args(const char* self, const Options& opt, const std::string& id) {
  return {self,
          "worker",
          "--id",
          id,
          "--concurrency",
          std::to_string(opt.concurrency),
          "--min-delay-ms",
          std::to_string(opt.min_delay_ms),
          "--max-delay-ms",
          std::to_string(opt.max_delay_ms),
          "--failure-rate",
          std::to_string(opt.failure_rate),
          "--log",
          opt.log,
          "--t0",
          example::started_ms()};
}

// Waits until nothing is pending or running; false on timeout.
bool drained(eoq::PostgresStore& store, std::chrono::steady_clock::time_point give_up) {
  for (;;) {
    std::int64_t open = 0;
    for (const auto& s : store.stats())
      if (s.queue == "simulator") open = s.pending + s.running;
    if (open == 0) return true;
    if (std::chrono::steady_clock::now() > give_up) {
      std::printf("timed out with %lld task(s) unfinished\n", static_cast<long long>(open));
      return false;
    }
    std::this_thread::sleep_for(50ms);
  }
}

}  // namespace

int main(int argc, char** argv) try {
  auto serve_on = example::take_serve_flag(argc, argv);
  setenv("EOQ_DATABASE_URL", eoq::testing::database_url_or_temp("EOQ_DATABASE_URL").c_str(), 1);
  const bool worker_mode = argc > 1 && std::string(argv[1]) == "worker";
  // The worker subcommand's --t0 (the run's start, for log times) is read here.
  std::vector<char*> args(argv, argv + argc);
  for (int i = 1; i + 1 < static_cast<int>(args.size()); ++i)
    if (std::string(args[static_cast<std::size_t>(i)]) == "--t0") {
      example::start_at_t0({{"--t0", args[static_cast<std::size_t>(i) + 1]}});
      args.erase(args.begin() + i, args.begin() + i + 2);
      break;
    }
  const Options opt = parse(static_cast<int>(args.size()), args.data(), worker_mode ? 2 : 1);
  if (worker_mode) return run_worker(opt);
  auto stop_signals = example::block_stop_signals();  // before any thread: see serve.hpp

  // A fresh schema for eoq and one for our own table, so a rerun on the same
  // database starts from nothing (caller ids would otherwise still be taken).
  const std::string url = std::getenv("EOQ_DATABASE_URL");
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

  eoq::PostgresStore store(store_options(opt.submitters));
  store.migrate();
  ActionLog log(opt.log, true);
  std::optional<example::Serve> serve;
  if (serve_on) serve.emplace(store, *serve_on);

  // The workers, each its own process, started before the submits so that
  // processing overlaps the storm. The first seen running a task is killed.
  std::vector<std::unique_ptr<example::Child>> workers;
  for (int w = 1; w <= opt.workers; ++w)
    workers.push_back(std::make_unique<example::Child>(worker_args(argv[0], opt, "worker-" + std::to_string(w))));

  // How many submits returned each task, and what each submit was told.
  std::mutex m;
  std::map<eoq::TaskId, int> submits;
  auto submit = [&](const std::string& who, const eoq::NewTask& t) {
    auto r = store.submit(t);
    log.write(who, r.duplicate ? "duplicate" : "submit", r.task.id, "caller=" + t.key.value_or("-"));
    std::lock_guard lk(m);
    ++submits[r.task.id];
    return r;
  };
  std::latch stampede(opt.submitters);
  std::atomic<int> stampede_created{0};
  std::atomic<eoq::TaskId> stampede_task{0};
  std::vector<std::jthread> submitters;
  for (int s = 0; s < opt.submitters; ++s)
    submitters.emplace_back([&, s] {
      const std::string who = "submitter-" + std::to_string(s + 1);
      // Everyone submits order-1 at the same instant: the unique key decides.
      stampede.arrive_and_wait();
      auto r = submit(who, make_task(opt, "order-1"));
      if (!r.duplicate) ++stampede_created;
      stampede_task = r.task.id;
      // Then the other submits, spread over the threads and interleaved.
      for (int n = s; n < opt.tasks * opt.repeats; n += opt.submitters)
        submit(who, make_task(opt, "order-" + std::to_string(n % opt.tasks + 1)));
      for (int n = s; n < opt.unkeyed; n += opt.submitters) submit(who, make_task(opt, std::nullopt));
    });
  submitters.clear();  // joins

  std::printf("%d threads submitted order-1 at the same instant: %d task created (%lld), %d duplicates\n",
              opt.submitters, stampede_created.load(), static_cast<long long>(stampede_task.load()),
              opt.submitters - stampede_created.load());
  std::printf("then %d caller ids were submitted %d times each and %d tasks without a caller id once each\n", opt.tasks,
              opt.repeats, opt.unkeyed);

  // Kill the first worker seen running tasks (whichever claimed first; one
  // worker may take every task of a small run): they are stuck "running" until
  // their leases run out, then the other workers take them.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(opt.timeout_s);
  std::set<eoq::TaskId> held;
  std::string victim;  // "worker-N"
  for (;;) {
    eoq::ListQuery q;
    q.queue = "simulator";
    q.status = eoq::TaskStatus::running;
    for (const auto& t : example::all_tasks(store, q))
      if (t.lease_owner && (victim.empty() || *t.lease_owner == victim)) {
        victim = *t.lease_owner;
        held.insert(t.id);
      }
    if (!held.empty()) break;
    if (std::chrono::steady_clock::now() > give_up) throw std::runtime_error("no worker was seen running a task");
    std::this_thread::sleep_for(20ms);
  }
  workers.at(static_cast<std::size_t>(std::stoi(victim.substr(victim.find('-') + 1)) - 1))->kill_now();
  std::string held_list;
  for (auto id : held) held_list += (held_list.empty() ? "" : " ") + std::to_string(id);
  log.write("main", "killed", 0, victim + " (SIGKILL) while it ran tasks " + held_list);
  std::printf("[%4.1fs] killed %s (SIGKILL) while it ran task(s) %s\n", example::elapsed(), victim.c_str(),
              held_list.c_str());

  if (!drained(store, give_up)) return 1;

  // The effects, counted in the database: task id -> (rows, attempt that wrote it).
  std::map<eoq::TaskId, std::pair<int, int>> effects;
  for (const auto& r : db.query("SELECT task_id, count(*), max(attempt) FROM simulator.effects GROUP BY task_id"))
    effects[std::stoll(r[0])] = {std::stoi(r[1]), std::stoi(r[2])};
  // The action log, read back: per task, the submits and the attempts it records.
  std::map<eoq::TaskId, int> logged_submits, logged_attempts;
  {
    std::ifstream in(opt.log);
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream words(line);
      std::string at, who, action, task;
      words >> at >> who >> action >> task;
      if (!task.starts_with("task=")) continue;
      auto id = std::stoll(task.substr(5));
      if (action == "submit" || action == "duplicate") ++logged_submits[id];
      if (action == "attempt") ++logged_attempts[id];
    }
  }

  std::printf("\n%6s  %-10s %7s %8s  %-9s %7s  %s\n", "task", "caller id", "submits", "attempts", "status", "effects",
              "errors");
  example::Checks check;
  bool each_ok = true, log_ok = true, recovered = true;
  // The tasks the kill left stuck "running": an attempt of the victim that ended by
  // its lease running out. (A task listed as running at the kill may still have
  // committed in the instant before it.)
  std::string stuck;
  int tasks = 0, succeeded = 0, attempts = 0, effect_rows = 0;
  eoq::ListQuery all;
  all.queue = "simulator";
  const auto stored = example::all_tasks(store, all);
  for (const auto& t : stored) {
    ++tasks;
    attempts += t.attempts;
    auto [rows, by_attempt] = effects[t.id];
    effect_rows += rows;
    bool done = t.status == eoq::TaskStatus::succeeded;
    succeeded += done;
    // Exactly one effect for a succeeded task, from the attempt that succeeded; none otherwise.
    bool task_ok = done ? rows == 1 && by_attempt == t.attempts : rows == 0;
    each_ok = each_ok && task_ok;
    // "attempts 1, 2: <error>" when they failed alike, else each with its own error.
    std::string numbers, errors, last;
    bool alike = true;
    int killed_attempts = 0;
    const auto history = store.history(t.id);
    for (const auto& a : history) {
      killed_attempts += a.owner == victim && a.outcome == "lease_expired";
      if (!a.error) continue;
      alike = alike && (last.empty() || *a.error == last);
      last = *a.error;
      numbers += (numbers.empty() ? "" : ", ") + std::to_string(a.number);
      errors += (errors.empty() ? "" : "; ") + std::to_string(a.number) + ": " + *a.error;
    }
    if (alike && !last.empty()) errors = "attempt " + numbers + ": " + last;
    // Every attempt is in the log, but for one the victim may have claimed in the
    // instant before it was killed, before its handler could write a line.
    log_ok = log_ok && logged_submits[t.id] == submits[t.id] && logged_attempts[t.id] <= t.attempts &&
             logged_attempts[t.id] >= t.attempts - killed_attempts;
    if (killed_attempts > 0) {
      stuck += (stuck.empty() ? "" : " ") + std::to_string(t.id);
      recovered = recovered && done && history.back().owner != victim;
    }
    log.write("main", "settled", t.id,
              std::string(eoq::to_string(t.status)) + " after " + std::to_string(t.attempts) + " attempt(s), " +
                  std::to_string(rows) + " effect row(s)");
    std::printf("%6lld  %-10s %7d %8d  %-9s %7d%s  %s\n", static_cast<long long>(t.id), t.key.value_or("-").c_str(),
                submits[t.id], t.attempts, std::string(eoq::to_string(t.status)).c_str(), rows, task_ok ? "" : " !!",
                errors.c_str());
  }

  auto per_key = example::tasks_per_key(stored);
  int keyed_once = 0, keyed_twice = 0;
  for (const auto& [key, n] : per_key)
    if (!key.ends_with("(no key)")) (n == 1 ? keyed_once : keyed_twice) += 1;
  std::printf("\n");
  check(keyed_once == opt.tasks && keyed_twice == 0 && tasks == opt.tasks + opt.unkeyed && stampede_created == 1,
        std::to_string(tasks) + " tasks in the store: one per caller id (" + std::to_string(keyed_once) + " of " +
            std::to_string(opt.tasks) + ") plus " + std::to_string(opt.unkeyed) +
            " without one; the stampede of " + std::to_string(opt.submitters) + " created one");
  check(each_ok, std::to_string(effect_rows) + " effect row(s) for " + std::to_string(succeeded) +
                     " succeeded task(s), after " + std::to_string(attempts - succeeded) +
                     " failed or killed attempt(s): every effect happened exactly once");
  check(recovered && !stuck.empty(), "the tasks the kill left stuck running (" + stuck +
                                        ") expired, ran again on another worker and succeeded");
  check(log_ok, "the action log " + opt.log + " records every submit and every attempt the store counts");
  std::printf("read it back: grep 'task=%s ' %s\n", stuck.empty() ? "1" : stuck.substr(0, stuck.find(' ')).c_str(),
              opt.log.c_str());

  if (serve) serve->wait_for_stop_signal(stop_signals);
  for (std::size_t w = 1; w < workers.size(); ++w) workers[w]->stop(SIGTERM);
  return check.exit_code();
} catch (const std::exception& e) {
  std::fprintf(stderr, "exactly_once_simulator: %s\n", e.what());
  return 1;
}
