// producer_consumer: separate producer, consumer and scheduler processes sharing
// one queue in PostgreSQL, started and stopped at will.
//
// What it shows:
//  - the producer submits typed jobs with the client's own idempotency keys, so
//    running it again (a retry, a second copy) adds nothing;
//  - consumers come and go: while none runs, jobs wait; a consumer stopped with
//    SIGTERM gives its unfinished jobs back at once; one killed with SIGKILL in the
//    middle of its jobs loses none of them: its leases run out (2 s) and the next
//    consumer does them, each exactly once;
//  - a failing job retries with a fixed backoff, and ends "failed": a terminal
//    state that stays queryable (`status <id>`), never silently dropped;
//  - the scheduler submits a periodic job with a time-bucketed key, so two
//    schedulers, and a scheduler restarted, still make one job per period.
//
//   producer_consumer produce [--jobs 10] [--batch b1]     submit jobs, then exit
//   producer_consumer consume --id NAME                    run a consumer until SIGTERM / Ctrl-C
//   producer_consumer schedule --id NAME [--period 1]      run a scheduler until SIGTERM / Ctrl-C
//   producer_consumer status <id>                          one job's state and attempts
//   producer_consumer demo                                 all of the above, checked (what ctest runs)
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops
// itself (the demo's child processes share it through EOQ_DATABASE_URL). A
// throwaway server lives only as long as its process, so to run the subcommands
// by hand in separate terminals, point EOQ_DATABASE_URL at a server of your own.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include "example_support.hpp"

#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
using example::Child;
using example::flag;
using example::flags;
const char* const kQueue = "jobs";

// The host's own connection: creates the results table, and counts it in the demo.
using example::Db;

std::string url() { return std::getenv("EOQ_DATABASE_URL"); }

// Every process may be the first, so each sets up what is missing; the advisory
// lock makes concurrent setups wait for each other instead of racing on CREATE TABLE.
std::unique_ptr<eoq::PostgresStore> open_store() {
  Db db(url());
  db.query("BEGIN");
  db.query("SELECT pg_advisory_xact_lock(hashtext('eoq example producer_consumer'))");
  db.query("SET LOCAL client_min_messages = warning");
  db.query("CREATE SCHEMA IF NOT EXISTS jobs");
  // No unique constraint: a job done twice must show up as two rows.
  db.query(
      "CREATE TABLE IF NOT EXISTS jobs.done (task_id bigint NOT NULL, key text, type text NOT NULL,"
      " consumer text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())");
  db.query("COMMIT");
  auto store = std::make_unique<eoq::PostgresStore>(example::store_options("jobs_eoq", url()));
  store->migrate();  // safe from many processes at once
  return store;
}

// produce: jobs 1..N-2 are ordinary, N-1 always fails (and retries), N is an
// invoice no retry can fix.
int produce(eoq::PostgresStore& store, const std::map<std::string, std::string>& f) {
  const int jobs = std::stoi(flag(f, "--jobs", "10"));
  const std::string batch = flag(f, "--batch", "b1");
  const char* const types[] = {"thumbnail", "invoice", "email"};
  std::vector<eoq::NewTask> tasks;
  for (int i = 1; i <= jobs; ++i) {
    eoq::NewTask t;
    t.queue = kQueue;
    t.key = batch + "-job-" + std::to_string(i);
    t.type = i == jobs - 1 ? "flaky" : i == jobs ? "invoice" : types[i % 3];
    t.payload = R"({"n":)" + std::to_string(i) + R"(,"cents":)" + std::to_string(i == jobs ? -500 : 100 * i) + "}";
    t.retry = {
        .max_attempts = 3, .backoff = eoq::Backoff::fixed, .initial_delay = 500ms, .max_delay = 500ms, .jitter = 0};
    tasks.push_back(t);
  }
  int fresh = 0;
  for (const auto& r : store.submit_batch(tasks)) fresh += !r.duplicate;
  std::printf("[producer] submitted %d jobs (%s-job-1..%d): %d new, %d already there\n", jobs, batch.c_str(), jobs,
              fresh, jobs - fresh);
  return 0;
}

// Blocks SIGTERM and SIGINT before any thread starts (so all inherit the mask)
// and returns the set for sigwait: stopping a worker is no job for a signal handler.
sigset_t block_stop_signals() {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGTERM);
  sigaddset(&s, SIGINT);
  pthread_sigmask(SIG_BLOCK, &s, nullptr);
  return s;
}

eoq::Logger prefixed(std::string who) {
  return [who](eoq::LogLevel, std::string_view message) {
    std::printf("[%s] %.*s\n", who.c_str(), static_cast<int>(message.size()), message.data());
  };
}

// The work itself is a row in jobs.done, written in the transaction that completes
// the job. Each job takes a moment, so a consumer stopped mid-way has some in hand;
// short enough to finish even when the consumer is stopping.
void do_job(eoq::TaskContext& ctx) {
  std::this_thread::sleep_for(150ms);
  if (ctx.type() == "flaky") throw std::runtime_error("upstream unavailable");
  if (ctx.type() == "invoice" && *ctx.exec("SELECT ($1::json->>'cents')::int < 0", {ctx.payload()}).scalar() == "t")
    throw eoq::PermanentError("invoice amount is negative");
  ctx.exec("INSERT INTO jobs.done (task_id, key, type, consumer) VALUES ($1, $2, $3, $4)",
           {std::to_string(ctx.id()), ctx.key(), ctx.type(), ctx.lease().owner});
}

int consume(eoq::PostgresStore& store, const std::map<std::string, std::string>& f) {
  auto stop = block_stop_signals();
  eoq::WorkerOptions o;
  o.queues = {kQueue};
  o.concurrency = 2;
  o.prefetch = 0;
  o.worker_id = f.at("--id");
  o.logger = prefixed(o.worker_id);
  o.lease = 2s;  // a killed consumer's jobs run again 2 s later
  eoq::Worker worker(store, o);
  for (const char* type : {"thumbnail", "invoice", "email", "flaky", "report"}) worker.on(type, do_job);
  worker.start();
  int sig = 0;
  sigwait(&stop, &sig);
  worker.stop();  // running jobs finish; the rest go back to the queue at once
  return 0;
}

// A Worker only for its periodic scheduler: it needs a queue to claim from, so it
// gets one that nobody submits to (eoq has no scheduler-only mode).
int schedule(eoq::PostgresStore& store, const std::map<std::string, std::string>& f) {
  auto stop = block_stop_signals();
  eoq::WorkerOptions o;
  o.queues = {"jobs-scheduler-idle"};
  o.concurrency = 1;
  o.maintenance_interval = 0ms;
  o.worker_id = f.at("--id");
  o.log_level = eoq::LogLevel::debug;  // the periodic submits, and duplicates, are debug lines
  o.logger = [id = o.worker_id](eoq::LogLevel, std::string_view m) {
    if (m.starts_with("periodic")) std::printf("[%s] %.*s\n", id.c_str(), static_cast<int>(m.size()), m.data());
  };
  eoq::Worker worker(store, o);
  eoq::NewTask report;
  report.queue = kQueue;
  report.type = "report";
  worker.every("report", std::chrono::seconds(std::stoi(flag(f, "--period", "1"))), report);
  worker.start();
  int sig = 0;
  sigwait(&stop, &sig);
  worker.stop();
  return 0;
}

int status(eoq::PostgresStore& store, const std::string& id) {
  auto t = store.get(std::stoll(id));
  if (!t) {
    std::printf("no job %s\n", id.c_str());
    return 2;
  }
  std::printf("job %lld: %s, key %s, %s after %d attempt(s)\n", static_cast<long long>(t->id), t->type.c_str(),
              t->key.value_or("-").c_str(), std::string(eoq::to_string(t->status)).c_str(), t->attempts);
  std::printf("  payload %s, result %s, last error: %s\n", t->payload.c_str(), t->result.value_or("-").c_str(),
              t->last_error.value_or("-").c_str());
  for (const auto& a : store.history(t->id))
    std::printf("  attempt %d by %s: %s%s\n", a.number, a.owner.c_str(), a.outcome.c_str(),
                a.error ? (" (" + *a.error + ")").c_str() : "");
  return 0;
}

// One step of the demo in its own process (a Child): this program, run as
// `producer_consumer <args>`.
std::vector<std::string> step(std::vector<std::string> args) {
  args.insert(args.begin(), "producer_consumer");
  return args;
}

// A fresh start, so that a rerun on the same database finds no keys taken.
void reset() {
  Db db(url());
  db.query("SET client_min_messages = warning");
  db.query("DROP SCHEMA IF EXISTS jobs CASCADE");
  db.query("DROP SCHEMA IF EXISTS jobs_eoq CASCADE");
}

int demo(eoq::PostgresStore& store) {
  const int jobs = 10;
  auto producer_jobs = [&] {
    std::vector<eoq::Task> out;
    for (int i = 1; i <= jobs; ++i) out.push_back(*store.find(kQueue, "b1-job-" + std::to_string(i)));
    return out;
  };
  auto count = [&](eoq::TaskStatus s) {
    int n = 0;
    for (const auto& t : producer_jobs()) n += t.status == s;
    return n;
  };
  auto wait_until = [](const std::function<bool()>& done, const char* what) {
    for (auto give_up = std::chrono::steady_clock::now() + 30s; !done();) {
      if (std::chrono::steady_clock::now() > give_up) throw std::runtime_error(std::string("timed out: ") + what);
      std::this_thread::sleep_for(50ms);
    }
  };

  std::printf("== no consumer yet: the producer runs, the jobs wait\n");
  if (!Child(step({"produce", "--jobs", std::to_string(jobs)})).stop()) throw std::runtime_error("produce failed");
  std::this_thread::sleep_for(1s);
  std::printf("[demo] a second later: %d of %d jobs pending\n", count(eoq::TaskStatus::pending), jobs);
  bool waited = count(eoq::TaskStatus::pending) == jobs;

  std::printf("== two schedulers and consumer c1 start; the producer runs again\n");
  auto s1 = std::make_unique<Child>(step({"schedule", "--id", "s1"}));
  Child s2(step({"schedule", "--id", "s2"}));
  Child c1(step({"consume", "--id", "c1"}));
  Child(step({"produce", "--jobs", std::to_string(jobs)})).stop();
  wait_until([&] { return count(eoq::TaskStatus::succeeded) >= 3; }, "c1 to finish 3 jobs");

  std::printf("== c1 is stopped (SIGTERM) and s1 killed (SIGKILL) and restarted\n");
  c1.stop(SIGTERM);
  s1->stop(SIGKILL);
  s1 = std::make_unique<Child>(step({"schedule", "--id", "s1"}));
  int done_then = count(eoq::TaskStatus::succeeded);
  std::this_thread::sleep_for(1500ms);
  int done_later = count(eoq::TaskStatus::succeeded);
  std::printf("[demo] no consumer for 1.5 s: %d jobs done before, %d after, %d waiting\n", done_then, done_later,
              count(eoq::TaskStatus::pending));
  waited = waited && done_then == done_later;

  std::printf("== consumer c2 starts\n");
  auto c2 = std::make_unique<Child>(step({"consume", "--id", "c2"}));
  wait_until([&] { return count(eoq::TaskStatus::pending) + count(eoq::TaskStatus::running) == 0; },
             "the producer's jobs to settle");

  std::printf("== batch b2 arrives; c2 is killed (SIGKILL) in the middle of it, and c3 takes over\n");
  Child(step({"produce", "--jobs", std::to_string(jobs), "--batch", "b2"})).stop();
  auto running_on = [&](const std::string& consumer) {
    eoq::ListQuery q;
    q.queue = kQueue;
    q.status = eoq::TaskStatus::running;
    std::vector<eoq::TaskId> ids;
    for (const auto& t : store.list(q).tasks)
      if (t.lease_owner == consumer && t.type != "report") ids.push_back(t.id);
    return ids;
  };
  std::vector<eoq::TaskId> held;
  wait_until([&] { return !(held = running_on("c2")).empty(); }, "c2 to hold a job of batch b2");
  c2->stop(SIGKILL);
  std::printf("[demo] killed c2 while it ran %zu job(s)\n", held.size());
  Child c3(step({"consume", "--id", "c3"}));
  auto b2_open = [&] {
    int n = 0;
    for (int i = 1; i <= jobs; ++i) {
      auto s = store.find(kQueue, "b2-job-" + std::to_string(i))->status;
      n += s == eoq::TaskStatus::pending || s == eoq::TaskStatus::running;
    }
    return n;
  };
  wait_until([&] { return b2_open() == 0; }, "batch b2 to settle after the kill");
  std::this_thread::sleep_for(1s);  // one more periodic job, for c3 to run
  s1->stop(SIGTERM);
  s2.stop(SIGTERM);
  c3.stop(SIGTERM);

  std::printf("== checks\n");
  example::Checks check;
  check(waited, "jobs waited while no consumer ran");
  Db db(url());
  std::map<std::string, int> done_rows;
  for (const auto& r : db.query("SELECT task_id, count(*) FROM jobs.done GROUP BY task_id"))
    done_rows[r[0]] = std::stoi(r[1]);

  // Counted in the store, by key: every job the producers meant, once, and nothing else.
  eoq::ListQuery all;
  all.queue = kQueue;
  auto tasks = example::all_tasks(store, all);
  std::map<std::string, int> per_key;
  int extra = 0, wrong_done = 0, produced = 0;
  for (const auto& t : tasks) {
    wrong_done += done_rows[std::to_string(t.id)] != (t.status == eoq::TaskStatus::succeeded ? 1 : 0);
    if (t.type == "report") continue;
    ++produced;
    if (!t.key || !(t.key->starts_with("b1-job-") || t.key->starts_with("b2-job-"))) ++extra;
    ++per_key[t.key.value_or("")];
  }
  bool each_once = per_key.size() == 2 * jobs;
  for (const auto& [key, n] : per_key) each_once = each_once && n == 1;
  check(produced == 2 * jobs && extra == 0 && each_once,
        std::to_string(produced) + " jobs in the store for 3 producer runs of 2 batches of " + std::to_string(jobs) +
            " keys: one per key (the second b1 run added none), nothing else");
  check(wrong_done == 0 && static_cast<int>(done_rows.size()) <= static_cast<int>(tasks.size()),
        "each succeeded job done exactly once, no failed or unfinished one done at all (" +
            std::to_string(tasks.size()) + " tasks, periodic ones included)");
  bool recovered = !held.empty();
  std::string how;
  for (auto id : held) {
    auto t = *store.get(id);
    auto h = store.history(id);
    recovered = recovered && h.size() >= 2 && h.front().outcome == "lease_expired" && h.front().owner == "c2" &&
                t.status != eoq::TaskStatus::pending && t.status != eoq::TaskStatus::running;
    how += " " + std::to_string(id) + ":" + std::string(eoq::to_string(t.status));
  }
  check(recovered, "the jobs c2 held when killed ran again after their leases expired, none lost:" + how);

  eoq::Task flaky, invoice;
  for (int i = 1; i <= jobs; ++i) {
    auto t = *store.find(kQueue, "b1-job-" + std::to_string(i));
    if (t.type == "flaky") flaky = t;
    if (i == jobs) invoice = t;
  }
  auto h = store.history(flaky.id);
  std::string gaps;
  bool fixed = h.size() == 3;
  for (std::size_t i = 1; i < h.size(); ++i) {
    auto gap = std::chrono::duration_cast<eoq::Millis>(h[i].started_at - *h[i - 1].finished_at).count();
    gaps += (gaps.empty() ? "" : ", ") + std::to_string(gap) + " ms";
    fixed = fixed && gap >= 500 && gap < 2000;
  }
  check(flaky.status == eoq::TaskStatus::failed && flaky.attempts == 3 && fixed,
        "the flaky job failed for good after 3 attempts, retried after " + gaps + " (fixed backoff 500 ms)");
  check(invoice.status == eoq::TaskStatus::failed && invoice.attempts == 1,
        "the bad invoice failed at once: " + invoice.last_error.value_or("?"));

  // Periodic jobs: one per bucket, and no bucket skipped, across restarts and two schedulers.
  std::set<long long> buckets;
  int reports = 0;
  for (const auto& t : tasks) {
    if (t.type != "report") continue;
    ++reports;
    buckets.insert(std::stoll(t.key->substr(t.key->rfind(':') + 1)));
  }
  bool contiguous = !buckets.empty() && *buckets.rbegin() - *buckets.begin() + 1 == reports;
  check(reports == static_cast<int>(buckets.size()) && contiguous,
        std::to_string(reports) + " periodic jobs for " + std::to_string(buckets.size()) +
            " consecutive 1 s buckets: one each, from 2 schedulers and a restart");

  std::printf("== status %lld\n", static_cast<long long>(flaky.id));
  check(Child(step({"status", std::to_string(flaky.id)})).stop(), "the failed job stays queryable");
  return check.exit_code();
}

}  // namespace

int main(int argc, char** argv) try {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // whole lines, since several processes share stdout
  setenv("EOQ_DATABASE_URL", eoq::testing::database_url_or_temp("EOQ_DATABASE_URL").c_str(), 1);
  const std::string command = argc > 1 ? argv[1] : "";
  const auto f = flags(argc, argv, 2);
  if (command == "demo") reset();
  if (command == "produce") return produce(*open_store(), f);
  if (command == "consume") return consume(*open_store(), f);
  if (command == "schedule") return schedule(*open_store(), f);
  if (command == "status" && argc == 3) return status(*open_store(), argv[2]);
  if (command == "demo") return demo(*open_store());
  std::fprintf(stderr,
               "usage: producer_consumer produce|consume|schedule|status <id>|demo (see the source's header)\n");
  return 2;
} catch (const std::exception& e) {
  std::fprintf(stderr, "producer_consumer: %s\n", e.what());
  return 1;
}
