// End-to-end harness: the database's own ceiling, submit rates, drain
// throughput, idle submit-to-start latency and growth, all in one run on one
// server, so that every figure can be read as a ratio of the ceiling.
//
//   throughput [--defaults | --concurrency C --claim-batch B --prefetch P] [--tasks N] [--latency-tasks L]
//              [--bulk-batch K] [--ceiling-seconds S] [--ceiling-clients K] [--growth G]
//   throughput --help
//
// Runs on EOQ_BENCH_DATABASE_URL, or on a throwaway server it starts itself
// (PostgreSQL defaults: fsync and synchronous_commit on).
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include <fmt/format.h>
#include <libpq-fe.h>
#include <csignal>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <optional>
#include <fstream>
#include <mutex>
#include <random>
#include <set>
#include <thread>

namespace {

using SteadyClock = std::chrono::steady_clock;

struct Args {
  int tasks = 100000;
  bool defaults = false;  // the Worker with WorkerOptions{} but for its queue
  int concurrency = 8;
  int claim_batch = 1000;
  std::optional<int> prefetch{};
  int latency_tasks = 1000;
  int bulk_batch = 10000;
  double ceiling_seconds = 10;
  int ceiling_clients = 8;
  int growth = 1000000;
  int sharing = 400;
  std::optional<bool> settle{};  // unset: with the growth drains only
  bool bulk_only = false;
};

const char* kHelp = R"(throughput: eoq's end-to-end figures on one server, each with a ratio to a baseline of the same run.

  --tasks N            tasks per drain (default 100000)
  --defaults           drain with WorkerOptions{} (only the queue set); overrides the three below
  --concurrency C      handler threads (default 8)
  --claim-batch B      most tasks per claim (default 1000)
  --prefetch P         fixed look-ahead; without it the worker measures its own
  --latency-tasks L    idle submit-to-start samples (default 1000)
  --bulk-batch K       tasks per submit_batch call (default 10000)
  --ceiling-seconds S  length of each ceiling run (default 10; 0: no ceiling runs)
  --ceiling-clients K  clients of the ceiling runs (default 8, as pgbench -c 8)
  --growth G           finished tasks kept for the growth and retention drains (default 1000000; 0: skip)
  --sharing T          slow tasks (50 ms) shared by two worker processes (default 400; 0: skip)
  --bulk-only          only the keyed submit_batch figure (--tasks tasks, --bulk-batch a call) into a new
                       schema; the side-by-side run alternates it with the bulk floor
  --settle 0|1         start each profiled drain after a CHECKPOINT, so that drains compared with one
                       another (growth, retention, the first and the next) start alike (default: 1 with
                       the growth drains, 0 without, as in a side-by-side run, whose peers get no such start)

Runs on EOQ_BENCH_DATABASE_URL, or on a throwaway server it starts itself.
)";

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + k);
      return argv[++i];
    };
    if (k == "--help" || k == "-h") {
      std::fputs(kHelp, stdout);
      std::exit(0);
    } else if (k == "--defaults") a.defaults = true;
    else if (k == "--bulk-batch") a.bulk_batch = std::stoi(next());
    else if (k == "--tasks") a.tasks = std::stoi(next());
    else if (k == "--concurrency") a.concurrency = std::stoi(next());
    else if (k == "--claim-batch") a.claim_batch = std::stoi(next());
    else if (k == "--prefetch") a.prefetch = std::stoi(next());
    else if (k == "--latency-tasks") a.latency_tasks = std::stoi(next());
    else if (k == "--ceiling-seconds") a.ceiling_seconds = std::stod(next());
    else if (k == "--ceiling-clients") a.ceiling_clients = std::stoi(next());
    else if (k == "--growth") a.growth = std::stoi(next());
    else if (k == "--sharing") a.sharing = std::stoi(next());
    else if (k == "--settle") a.settle = std::stoi(next()) != 0;
    else if (k == "--bulk-only") a.bulk_only = true;
    else throw std::runtime_error("unknown argument " + k);
  }
  return a;
}

double seconds_since(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

long rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return 0;
}

// --- the ceiling: the same row work with no queue logic -------------------

void must(PGconn* c, PGresult* r) {
  auto s = PQresultStatus(r);
  if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
    std::string m = PQerrorMessage(c);
    PQclear(r);
    throw std::runtime_error(m);
  }
  PQclear(r);
}

// Claim-and-complete as two committed UPDATEs by id (or id range), no search,
// no fencing: what the server can do with the rows a queue touches.
double ceiling(const std::string& url, int rows, int batch, int clients, double secs) {
  {
    PGconn* c = PQconnectdb(url.c_str());
    must(c, PQexec(c, "DROP TABLE IF EXISTS eoq_ceiling"));
    must(c, PQexec(c, "CREATE TABLE eoq_ceiling (id bigint PRIMARY KEY, status int NOT NULL DEFAULT 0, "
                      "version int NOT NULL DEFAULT 0, queue text NOT NULL DEFAULT 'default', "
                      "priority int NOT NULL DEFAULT 0, run_at timestamptz NOT NULL DEFAULT now(), "
                      "lease_owner text, lease_expires timestamptz, payload json NOT NULL DEFAULT '{\"n\":1}')"));
    auto ins = fmt::format("INSERT INTO eoq_ceiling (id) SELECT g FROM generate_series(1, {}) g", rows);
    must(c, PQexec(c, ins.c_str()));
    must(c, PQexec(c, "VACUUM ANALYZE eoq_ceiling"));
    must(c, PQexec(c, "CHECKPOINT"));
    PQfinish(c);
  }
  std::atomic<long> done{0};
  auto t0 = SteadyClock::now();
  std::vector<std::thread> ts;
  for (int k = 0; k < clients; ++k)
    ts.emplace_back([&, k] {
      PGconn* c = PQconnectdb(url.c_str());
      must(c, PQprepare(c, "claim",
                        "UPDATE eoq_ceiling SET status = 1, version = version + 1, lease_owner = 'w', "
                        "lease_expires = now() + interval '30 s' WHERE id BETWEEN $1 AND $2",
                        0, nullptr));
      must(c, PQprepare(c, "complete",
                        "UPDATE eoq_ceiling SET status = 2, version = version + 1, lease_expires = NULL "
                        "WHERE id BETWEEN $1 AND $2",
                        0, nullptr));
      std::mt19937 rng(static_cast<unsigned>(k));
      std::uniform_int_distribution<int> pick(0, rows / batch - 1);
      long n = 0;
      while (seconds_since(t0) < secs) {
        int s = pick(rng);
        auto lo = std::to_string(s * batch + 1), hi = std::to_string(s * batch + batch);
        const char* p[] = {lo.c_str(), hi.c_str()};
        must(c, PQexecPrepared(c, "claim", 2, p, nullptr, nullptr, 0));
        must(c, PQexecPrepared(c, "complete", 2, p, nullptr, nullptr, 0));
        n += batch;
      }
      done += n;
      PQfinish(c);
    });
  for (auto& t : ts) t.join();
  double rate = static_cast<double>(done) / seconds_since(t0);
  PGconn* c = PQconnectdb(url.c_str());
  must(c, PQexec(c, "DROP TABLE eoq_ceiling"));
  PQfinish(c);
  return rate;
}

// --- eoq ------------------------------------------------------------------

std::vector<eoq::NewTask> noop_tasks(int n, const std::string& queue) {
  std::vector<eoq::NewTask> v(static_cast<std::size_t>(n));
  for (auto& t : v) {
    t.queue = queue;
    t.type = "noop";
    t.payload = R"({"n":1})";
  }
  return v;
}

// keyed: each task gets its own idempotency key, as the bulk floor's rows do
// (the keys table is half the work of a keyed insert).
double submit_bulk(eoq::TaskStore& s, int n, const std::string& queue, int chunk = 1000, bool keyed = false) {
  double busy = 0;  // the submit_batch calls only, not building their input
  for (int done = 0; done < n; done += chunk) {
    auto b = noop_tasks(std::min(chunk, n - done), queue);
    if (keyed)
      for (std::size_t i = 0; i < b.size(); ++i) b[i].key = fmt::format("{}-{}", queue, done + static_cast<int>(i));
    auto t0 = SteadyClock::now();
    s.submit_batch(b);
    busy += seconds_since(t0);
  }
  return n / busy;
}

struct Drain {
  double rate;
  long max_rss_kib;
  double client_us_per_task;
};

// The store alone, no Worker: one thread claims 1,000 and completes them in one
// batch, over and over. What the Worker adds (or loses) is the difference.
double bare_loop(eoq::TaskStore& s, const std::string& queue, int n) {
  eoq::ClaimRequest req{{queue}, "bare-loop", 1000, eoq::Millis(30000)};
  auto t0 = SteadyClock::now();
  int done = 0;
  while (done < n) {
    auto leases = s.claim(req);
    if (leases.empty()) throw std::runtime_error("bare loop: the queue ran dry early");
    std::vector<eoq::Completion> c;
    c.reserve(leases.size());
    for (auto& l : leases) c.push_back(eoq::Completion{&l, "null"});
    s.complete_batch(c);
    done += static_cast<int>(leases.size());
  }
  return n / seconds_since(t0);
}

// Where a drained task's time goes: the server's time in each statement (from
// pg_stat_statements, when the server loads it) and this process's CPU time,
// both per task. Nothing is read when the extension is missing.
struct Profile {
  bool server = false;
  double claim_us = 0, complete_us = 0, other_us = 0, client_us = 0;
  // What else the server did meanwhile (it shares the two cores): WAL written
  // per task, server-wide (full-page images after a checkpoint's start add to
  // it, and so does autovacuum), and the share of the drain during which a
  // checkpoint was writing out or an autovacuum worker was busy, sampled
  // every 50 ms, with the tables autovacuum worked on (their names need
  // pg_read_all_stats or a superuser; without, they read "<insufficient privilege>").
  bool background = false;
  double wal_bytes = 0, checkpointing = 0, vacuuming = 0;
  std::string vacuumed;
};

double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

class StatementClock {
 public:
  explicit StatementClock(const std::string& url) : url_(url), c_(PQconnectdb(url.c_str())) {
    PGresult* r = PQexec(c_, "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'");
    on_ = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
    PQclear(r);
  }
  ~StatementClock() {
    sampling_ = std::jthread();
    if (sampler_) PQfinish(sampler_);
    PQfinish(c_);
  }
  // `settle`: the drain starts on a server with nothing left to write. The
  // drains are compared with one another (growth, retention, the first against
  // the next), and the phase before each one differs in how much it left dirty
  // (a million-task history: a gigabyte of WAL, and a checkpoint writing it out
  // through the next drain at up to half its speed, 2026-11-30). Settled, every
  // drain meets the same start: a checkpoint just done. CHECKPOINT needs a
  // superuser or pg_checkpoint; without either the drains start as they come.
  void start(bool settle) {
    sampling_ = std::jthread();  // a sampler left running by a start() without read()
    if (settle) {
      PGresult* settled = PQexec(c_, "CHECKPOINT");
      if (PQresultStatus(settled) != PGRES_COMMAND_OK && !warned_) {
        warned_ = true;
        fmt::print(stderr, "throughput: CHECKPOINT failed, the drains start unsettled: {}", PQerrorMessage(c_));
      }
      PQclear(settled);
    }
    if (on_) PQclear(PQexec(c_, "SELECT pg_stat_statements_reset()"));
    lsn0_ = lsn();
    samples_ = checkpointing_ = vacuuming_ = 0;
    vacuumed_.clear();
    sampling_ = std::jthread([this](const std::stop_token& st) { sample(st); });
  }
  // Milliseconds spent in eoq's claim and complete statements and all others of `schema`.
  void read(const std::string& schema, int tasks, Profile& p) {
    sampling_ = std::jthread();  // stops and joins the sampler
    if (auto now = lsn(); now && lsn0_ && samples_ > 0) {
      p.background = true;
      p.wal_bytes = static_cast<double>(*now - *lsn0_) / tasks;
      p.checkpointing = static_cast<double>(checkpointing_) / samples_;
      p.vacuuming = static_cast<double>(vacuuming_) / samples_;
      p.vacuumed.clear();
      for (const auto& t : vacuumed_) p.vacuumed += (p.vacuumed.empty() ? "" : ", ") + t;
    }
    if (!on_) return;
    auto sql = fmt::format("SELECT query, total_exec_time FROM pg_stat_statements WHERE query LIKE '%\"{}\".%'",
                           schema);
    PGresult* r = PQexec(c_, sql.c_str());
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
      p.server = true;
      for (int i = 0; i < PQntuples(r); ++i) {
        std::string q = PQgetvalue(r, i, 0);
        double us = std::stod(PQgetvalue(r, i, 1)) * 1000 / tasks;
        if (q.find("WITH cand") != std::string::npos) p.claim_us += us;
        else if (q.find("unnest($1::bigint[], $2::bigint[], $3::text[])") != std::string::npos) p.complete_us += us;
        else p.other_us += us;
      }
    }
    PQclear(r);
  }

 private:
  // The server's WAL insert position, in bytes.
  std::optional<long long> lsn() {
    PGresult* r = PQexec(c_, "SELECT pg_current_wal_insert_lsn() - '0/0'");
    std::optional<long long> out;
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) out = std::stoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return out;
  }

  // On a connection of its own: the drain must not wait for it.
  // Opened once, by the first drain: a connection started within each drain
  // would take its share of the two cores there.
  void sample(const std::stop_token& st) {
    if (!sampler_) sampler_ = PQconnectdb(url_.c_str());
    PGconn* c = sampler_;
    std::mutex m;
    std::condition_variable_any cv;
    while (PQstatus(c) == CONNECTION_OK && !st.stop_requested()) {
      PGresult* r = PQexec(c,
                           "SELECT count(*) FILTER (WHERE backend_type = 'checkpointer' "
                           "                          AND wait_event IS DISTINCT FROM 'CheckpointerMain'), "
                           "       count(*) FILTER (WHERE backend_type = 'autovacuum worker' AND state = 'active'), "
                           "       string_agg(regexp_replace(query, '^autovacuum: ', ''), '|') "
                           "         FILTER (WHERE backend_type = 'autovacuum worker' AND state = 'active') "
                           "FROM pg_stat_activity");
      if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) {
        ++samples_;
        checkpointing_ += std::string_view(PQgetvalue(r, 0, 0)) != "0";
        vacuuming_ += std::string_view(PQgetvalue(r, 0, 1)) != "0";
        std::string_view what = PQgetvalue(r, 0, 2);
        for (std::size_t at = 0; !what.empty() && at != std::string_view::npos;) {
          auto bar = what.find('|', at);
          vacuumed_.emplace(what.substr(at, bar == std::string_view::npos ? bar : bar - at));
          at = bar == std::string_view::npos ? bar : bar + 1;
        }
      }
      PQclear(r);
      std::unique_lock lk(m);
      cv.wait_for(lk, st, std::chrono::milliseconds(50), [] { return false; });  // ends early on stop
    }
  }

  std::string url_;
  PGconn* c_;
  PGconn* sampler_ = nullptr;  // the sampler's; used by one sampler thread at a time
  bool on_ = false;
  bool warned_ = false;
  std::optional<long long> lsn0_;
  int samples_ = 0, checkpointing_ = 0, vacuuming_ = 0;  // written by the sampler, read after it joined
  std::set<std::string> vacuumed_;                         // likewise
  std::jthread sampling_;
};

// `maintain`: run the store's maintenance (and so retention) every second
// rather than the default half minute.
// The Worker of the run: WorkerOptions{} with --defaults, else the flags'.
eoq::WorkerOptions worker_options(const Args& a, const std::string& queue) {
  eoq::WorkerOptions o;
  o.queues = {queue};
  if (!a.defaults) {
    o.concurrency = a.concurrency;
    o.claim_batch = a.claim_batch;
    o.prefetch = a.prefetch;
    o.complete_batch = a.claim_batch;
  }
  return o;
}

Drain drain(eoq::TaskStore& s, const Args& a, const std::string& queue, int n, bool maintain = false) {
  std::atomic<int> ran{0};
  eoq::WorkerOptions o = worker_options(a, queue);
  if (maintain) o.maintenance_interval = eoq::Millis(1000);
  eoq::Worker w(s, o);
  w.on("noop", [&](eoq::TaskContext&) { ran.fetch_add(1, std::memory_order_relaxed); });
  long rss = 0;
  auto t0 = SteadyClock::now();
  double cpu0 = cpu_seconds();
  w.start();
  // Done when every task is settled in the store, not merely handled.
  while (w.counters().succeeded < static_cast<std::uint64_t>(n)) {
    rss = std::max(rss, rss_kib());
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  double secs = seconds_since(t0);
  double cpu = cpu_seconds() - cpu0;
  w.stop();
  if (ran.load() < n) throw std::runtime_error("handler ran fewer times than tasks completed");
  return {n / secs, rss, cpu * 1e6 / n};
}

struct Latency {
  double p50, p99, p999, max;
};

// One of the worker processes of the sharing run: WorkerOptions defaults with
// four handler threads on `queue`, until SIGTERM.
int fair_child(const std::string& url, const std::string& schema, const std::string& queue) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  eoq::PostgresOptions po;
  po.conninfo = url;
  po.schema = schema;
  eoq::PostgresStore store(po);
  eoq::WorkerOptions o;
  o.queues = {queue};
  o.concurrency = 4;
  if (std::getenv("EOQ_BENCH_DEBUG")) {
    o.log_level = eoq::LogLevel::debug;
    o.logger = [](eoq::LogLevel, std::string_view m) {
      fmt::print(stderr, "[{} {}] {}\n", getpid(), SteadyClock::now().time_since_epoch().count() / 1000000 % 100000, m);
    };
  }
  eoq::Worker w(store, o);
  w.on("slow", [](eoq::TaskContext&) { std::this_thread::sleep_for(std::chrono::milliseconds(50)); });
  w.start();
  std::fputc('r', stdout);  // ready: the parent submits once both workers run
  std::fflush(stdout);
  int sig = 0;
  sigwait(&set, &sig);
  w.stop();
  if (std::getenv("EOQ_BENCH_DEBUG"))
    fmt::print(stderr, "sharing child {}: {} claimed, {} succeeded, {} released\n", getpid(), w.counters().claimed,
               w.counters().succeeded, w.counters().released);
  return 0;
}

// Slow tasks shared fairly: `tasks` tasks of 50 ms, two worker processes of
// four threads each. Returns the makespan over the ideal (tasks * 50 ms / 8):
// a worker that hoards leases in its buffer leaves the other idle and shows here.
double sharing(eoq::PostgresStore& s, const std::string& url, const std::string& schema, int tasks) {
  const std::string queue = "sharing";
  std::vector<pid_t> kids;
  int ready[2];
  if (pipe(ready) != 0) throw std::runtime_error("pipe failed");
  for (int i = 0; i < 2; ++i) {
    pid_t pid = fork();
    if (pid == 0) {
      dup2(ready[1], STDOUT_FILENO);
      execl("/proc/self/exe", "throughput", "--sharing-child", url.c_str(), schema.c_str(), queue.c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
    kids.push_back(pid);
  }
  close(ready[1]);
  char byte;
  for (int i = 0; i < 2; ++i)
    if (read(ready[0], &byte, 1) != 1) throw std::runtime_error("a sharing worker did not start");
  close(ready[0]);
  // Both workers are idle, listening: the tasks arrive at once, as a burst would.
  std::vector<eoq::NewTask> batch(static_cast<std::size_t>(tasks));
  for (auto& t : batch) {
    t.queue = queue;
    t.type = "slow";
  }
  // Done when the queue has no live task left, counted in the live table (the
  // claim index serves it): stats() counts the whole finished table, which by
  // now holds hundreds of thousands of rows, and its 100+ ms per call showed
  // in the makespan.
  auto stop_kids = [&] {
    for (pid_t k : kids) kill(k, SIGTERM);
    for (pid_t k : kids) waitpid(k, nullptr, 0);
  };
  double secs = 0;
  try {
    PGconn* c = PQconnectdb(url.c_str());
    if (PQstatus(c) != CONNECTION_OK) {
      std::string why = PQerrorMessage(c);
      PQfinish(c);
      throw std::runtime_error("sharing: cannot connect: " + why);
    }
    const auto live = fmt::format("SELECT count(*) FROM \"{}\".tasks WHERE queue = '{}'", schema, queue);
    auto t0 = SteadyClock::now();
    s.submit_batch(batch);
    for (bool empty = false; !empty;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      PGresult* r = PQexec(c, live.c_str());
      const bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;
      empty = ok && std::string(PQgetvalue(r, 0, 0)) == "0";
      PQclear(r);
      if (!ok) {
        std::string why = PQerrorMessage(c);
        PQfinish(c);
        throw std::runtime_error("sharing: " + why);
      }
    }
    secs = seconds_since(t0);
    PQfinish(c);
    std::int64_t succeeded = -1;
    for (const auto& q : s.stats())
      if (q.queue == queue) succeeded = q.succeeded;
    if (succeeded != tasks) throw std::runtime_error("sharing: not every slow task succeeded");
  } catch (...) {
    stop_kids();
    throw;
  }
  stop_kids();
  return secs / (tasks * 0.050 / 8);
}

// Submit-to-start on an idle worker (the run's, as the drain's): tasks one at
// a time with random gaps; the handler stamps its start. Both clocks are this
// process's steady clock.
Latency latency(eoq::TaskStore& s, const Args& a, int n, const std::string& queue) {
  std::mutex m;
  std::condition_variable started;
  std::vector<double> lat;  // and its size: the samples started so far
  eoq::Worker w(s, worker_options(a, queue));
  w.on("ping", [&](eoq::TaskContext& ctx) {
    auto now = SteadyClock::now().time_since_epoch().count();
    auto sent = std::stoll(ctx.payload().substr(5));
    {
      std::lock_guard lk(m);
      lat.push_back(static_cast<double>(now - sent) / 1e6);
    }
    started.notify_one();
  });
  w.start();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // let it go idle
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> gap_us(2000, 5000);
  for (int i = 0; i < n; ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds(gap_us(rng)));
    eoq::NewTask t;
    t.queue = queue;
    t.type = "ping";
    t.payload = fmt::format("{{\"t\":{}}}", SteadyClock::now().time_since_epoch().count());
    s.submit(t);
    // One at a time: wait for this one to start before the next is sent. On a
    // condition variable, as the latency floor's submitter waits: polling every
    // 0.1 ms woke this thread a dozen times per sample, on the two cores the
    // worker and the server share.
    std::unique_lock lk(m);
    started.wait(lk, [&] { return static_cast<int>(lat.size()) > i; });
  }
  w.stop();
  if (lat.empty()) return {};  // --latency-tasks 0
  std::sort(lat.begin(), lat.end());
  auto at = [&](double q) { return lat[std::min(lat.size() - 1, static_cast<std::size_t>(q * lat.size()))]; };
  return {at(0.50), at(0.99), at(0.999), lat.back()};
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc == 5 && std::string(argv[1]) == "--sharing-child") return fair_child(argv[2], argv[3], argv[4]);
  Args a = parse(argc, argv);
  std::string url = eoq::testing::database_url_or_temp("EOQ_BENCH_DATABASE_URL");
  if (a.bulk_only)
    fmt::print("eoq throughput harness: keyed submit_batch only, {} tasks in calls of {}, {} cores\n", a.tasks,
               a.bulk_batch, std::thread::hardware_concurrency());
  else if (a.defaults)
    fmt::print("eoq throughput harness: {} tasks, WorkerOptions defaults, {} cores\n", a.tasks,
               std::thread::hardware_concurrency());
  else
    fmt::print("eoq throughput harness: {} tasks, concurrency {}, claim batch {}, prefetch {}, {} cores\n", a.tasks,
               a.concurrency, a.claim_batch, a.prefetch ? std::to_string(*a.prefetch) : "adaptive",
               std::thread::hardware_concurrency());
  const bool settle = a.settle.value_or(a.growth > 0);
  if (settle && !a.bulk_only) fmt::print("each profiled drain starts after a CHECKPOINT (--settle)\n");

  // --ceiling-seconds 0 skips the ceilings (their ratios then read "inf"), e.g.
  // when pgbench measures them in the same run, or to keep the server's WAL cold.
  const int ceiling_rows = 1000000 > a.tasks * 10 ? a.tasks * 10 : 1000000;
  const bool ceilings = a.ceiling_seconds > 0 && !a.bulk_only;
  double c1 = ceilings ? ceiling(url, ceiling_rows, 1, a.ceiling_clients, a.ceiling_seconds) : 0;
  double c100 = ceilings ? ceiling(url, ceiling_rows, 100, a.ceiling_clients, a.ceiling_seconds) : 0;

  eoq::PostgresOptions po;
  po.conninfo = url;
  po.schema = fmt::format("bench_tp_{}", ::getpid());
  eoq::PostgresStore store(po);
  store.migrate();

  double bulk = submit_bulk(store, a.tasks, "drain", a.bulk_batch, true);
  if (a.bulk_only) {
    fmt::print("| eoq submit_batch ({} per call, each task keyed) | {:.0f} tasks/s |\n", a.bulk_batch, bulk);
    return 0;
  }
  auto t0 = SteadyClock::now();
  const int singles = std::min(1000, a.tasks);
  for (auto& t : noop_tasks(singles, "single")) store.submit(t);
  double single = singles / seconds_since(t0);

  StatementClock statements(url);
  auto profiled_drain = [&](const std::string& queue, Profile& profile) {
    statements.start(settle);
    auto d = drain(store, a, queue, a.tasks);
    profile.client_us = d.client_us_per_task;
    statements.read(po.schema, a.tasks, profile);
    return d;
  };
  // Two rows per profiled drain: where a task's time went, and what else the
  // server did meanwhile.
  auto profile_rows = [](std::string_view which, const Profile& p, double rate) {
    if (p.server)
      fmt::print("| {}, per task: server in claim / complete / other statements; client CPU | "
                 "{:.1f} / {:.1f} / {:.1f} / {:.1f} us | wall {:.1f} us |\n",
                 which, p.claim_us, p.complete_us, p.other_us, p.client_us, 1e6 / rate);
    else
      fmt::print("| {}, per task: client CPU (server: load pg_stat_statements to see it) | {:.1f} us | wall {:.1f} us |\n",
                 which, p.client_us, 1e6 / rate);
    if (p.background)
      fmt::print("| {}, the server meanwhile: WAL per task; share of the drain a checkpoint was writing / autovacuum "
                 "was busy | {:.0f} B; {:.0f}% / {:.0f}%{} | |\n",
                 which, p.wal_bytes, 100 * p.checkpointing, 100 * p.vacuuming,
                 p.vacuumed.empty() ? "" : fmt::format(" ({})", p.vacuumed));
  };
  Profile profile, profile_again;
  auto empty = profiled_drain("drain", profile);
  // The same drain again at once, on the same (still small) tables: tells the
  // run's first drain apart from a first drain on an empty table.
  double bulk_unkeyed = submit_bulk(store, a.tasks, "again", a.bulk_batch);
  auto again = profiled_drain("again", profile_again);
  submit_bulk(store, a.tasks, "bare", a.bulk_batch);
  double bare = bare_loop(store, "bare", a.tasks);
  drain(store, a, "single", singles);  // the single submits, out of the way
  auto lat = latency(store, a, a.latency_tasks, "latency");
  double shared = a.sharing > 0 ? sharing(store, url, po.schema, a.sharing) : 0;

  fmt::print("\n| figure | value | ratio |\n|---|--:|--:|\n");
  fmt::print("| ceiling: single-row claim+complete UPDATEs, {} clients | {:.0f} tasks/s | 1.00 |\n", a.ceiling_clients, c1);
  fmt::print("| ceiling: batch-100 claim+complete UPDATEs, {} clients | {:.0f} tasks/s | 1.00 |\n", a.ceiling_clients, c100);
  fmt::print("| eoq submit_batch ({} per call, each task keyed) | {:.0f} tasks/s | {:.2f} of batch ceiling |\n",
             a.bulk_batch, bulk, bulk / c100);
  fmt::print("| eoq submit_batch without keys | {:.0f} tasks/s | {:.2f} of keyed |\n", bulk_unkeyed, bulk_unkeyed / bulk);
  fmt::print("| eoq submit, one at a time | {:.0f} tasks/s | {:.2f} of single ceiling |\n", single, single / c1);
  fmt::print("| eoq drain, empty history | {:.0f} tasks/s | {:.2f} of batch ceiling |\n", empty.rate, empty.rate / c100);
  fmt::print("| eoq drain again, at once, same tables | {:.0f} tasks/s | {:.2f} of the first |\n", again.rate,
             again.rate / empty.rate);
  fmt::print("| store alone: claim(1,000) + complete_batch, one thread | {:.0f} tasks/s | {:.2f} of batch ceiling |\n",
             bare, bare / c100);
  fmt::print("| worker RSS during drain ({} handler threads) | {:.1f} MiB | |\n", a.defaults ? 4 : a.concurrency,
             empty.max_rss_kib / 1024.0);
  if (a.latency_tasks > 0)
    fmt::print("| idle submit-to-start p50 / p99 / p99.9 / max ({} tasks) | {:.2f} / {:.2f} / {:.2f} / {:.2f} ms | |\n",
               a.latency_tasks, lat.p50, lat.p99, lat.p999, lat.max);
  profile_rows("profile of the first drain", profile, empty.rate);
  profile_rows("the drain run again at once", profile_again, again.rate);
  if (a.sharing > 0)
    fmt::print("| slow tasks shared: {} of 50 ms, 2 worker processes x 4 threads | {:.2f} x ideal makespan | |\n",
               a.sharing, shared);

  if (a.growth > 0) {
    // The growth drains' baseline: the mean of the two drains on small tables,
    // not the first alone. The first swung most (42k, then 27.5k tasks/s in two
    // runs of one week), and the growth ratios swung with it (0.75 and 1.59).
    const double base = (empty.rate + again.rate) / 2;
    fmt::print("| baseline of the growth ratios: mean of the two small-table drains (the first / the second) | {:.0f} "
               "tasks/s | {:.2f} / {:.2f} |\n",
               base, empty.rate / base, again.rate / base);
    // History grows: G finished tasks stay in the table (retention off) ...
    submit_bulk(store, a.growth, "history", 10000);
    drain(store, a, "history", a.growth);
    // Built in seconds, that history leaves at once the vacuum work a service
    // spreads over the hours it takes to gather a million tasks (a million
    // dead rows in tasks, a million new ones in finished and keys). Left to
    // autovacuum, it took one of the two cores through the next drains in some
    // runs and not in others (0.73 against 1.11 of the empty-table drain,
    // 2026-11-30): vacuum first, so the drain measures the history's size.
    {
      PGconn* c = PQconnectdb(url.c_str());
      for (const char* table : {"tasks", "finished", "keys", "attempts"})
        must(c, PQexec(c, fmt::format("VACUUM (ANALYZE) \"{}\".{}", po.schema, table).c_str()));
      PQfinish(c);
    }
    submit_bulk(store, a.tasks, "drain");
    Profile profile_grown, profile_pruned;
    auto grown = profiled_drain("drain", profile_grown);
    fmt::print("| eoq drain with {} finished tasks kept (retention off) | {:.0f} tasks/s | {:.2f} of baseline |\n",
               a.growth, grown.rate, grown.rate / base);
    profile_rows("that drain", profile_grown, grown.rate);
    // What an operator's view costs at this size: stats() sums eoq.totals
    // (bench_totals measures it against history size), list(newest_first)
    // reads one page by the primary key. The table
    // grew by a million rows in seconds, faster than autovacuum re-analyzes it
    // in service; analyze first, as it would have been.
    {
      PGconn* c = PQconnectdb(url.c_str());
      must(c, PQexec(c, fmt::format("ANALYZE \"{}\".finished", po.schema).c_str()));
      PQfinish(c);
    }
    auto timed = [](auto&& f) {
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < 5; ++i) f();
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 5;
    };
    double stats_ms = timed([&] { store.stats(); });
    eoq::ListQuery newest;
    newest.newest_first = true;
    double list_ms = timed([&] { store.list(newest); });
    std::int64_t finished = 0;
    for (const auto& q : store.stats()) finished += q.succeeded + q.failed + q.cancelled + q.expired;
    fmt::print("| stats() / list(100 newest) with {} finished tasks | {:.1f} / {:.1f} ms | |\n", finished, stats_ms,
               list_ms);
    // ... and with retention on, pruning them in bounded batches meanwhile.
    eoq::PostgresOptions pr = po;
    pr.retention = eoq::Millis(0);
    eoq::PostgresStore pruning(pr);
    submit_bulk(pruning, a.tasks, "drain");
    statements.start(settle);
    auto pruned = drain(pruning, a, "drain", a.tasks, true);
    profile_pruned.client_us = pruned.client_us_per_task;
    statements.read(po.schema, a.tasks, profile_pruned);
    fmt::print("| eoq drain while retention prunes them | {:.0f} tasks/s | {:.2f} of baseline |\n", pruned.rate,
               pruned.rate / base);
    profile_rows("that drain", profile_pruned, pruned.rate);
  }
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "throughput: {}\n", e.what());
  return 1;
}
