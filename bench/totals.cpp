// What stats() and throughput() cost as the history grows (issue #36): the
// finished table is grown to each size with set-based SQL (the triggers of
// migration 0008 append their totals rows for those inserts, as for any
// other), and at each size stats() and throughput(60) are timed beside the
// full count of `finished` that stats() ran before migration 0008, on the same
// server in the same run. Twice per size: right after maintain() summed the
// bulk's totals rows and a VACUUM (the few rows left sit behind the pages the
// compaction emptied, which a scan still reads), and settled, after a second
// maintain() and VACUUM (the rows move to the first pages and VACUUM cuts the
// rest off, as autovacuum and the next maintenance do in a running system).
//
//   totals [--sizes LIST] [--calls N] [--old-calls M] [--chunk C] [--queues Q] [--days D] [--pending P]
//
// Runs on EOQ_BENCH_DATABASE_URL, or on a throwaway server it starts itself
// (fsync and synchronous_commit on), in a fresh schema it drops at the end.
// At each size stats() is checked against the full count.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>

#include <fmt/format.h>
#include <libpq-fe.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unistd.h>
#include <vector>

namespace {

using SteadyClock = std::chrono::steady_clock;
double seconds_since(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}
double ms_since(SteadyClock::time_point t0) { return seconds_since(t0) * 1000; }

struct Args {
  std::vector<long long> sizes{0, 1000000, 10000000};
  int calls = 50;
  int old_calls = 5;
  long long chunk = 1000000;
  int queues = 4;
  int days = 3;
  int pending = 1000;
};

const char* kUsage = R"(totals: stats() and throughput(60) at growing history sizes, beside the old full count
  --sizes LIST    comma-separated finished-row counts, ascending (default 0,1000000,10000000)
  --calls N       timed calls of stats() and of throughput(60) per size (default 50)
  --old-calls M   timed runs of the pre-0008 stats query per size (default 5)
  --chunk C       rows per INSERT ... SELECT generate_series while growing (default 1000000)
  --queues Q      queues the finished rows are spread over (default 4)
  --days D        finished_at spread over the last D days (default 3)
  --pending P     live pending tasks beside the history (default 1000)
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
    } else if (k == "--calls") a.calls = std::stoi(next());
    else if (k == "--old-calls") a.old_calls = std::stoi(next());
    else if (k == "--chunk") a.chunk = std::stoll(next());
    else if (k == "--queues") a.queues = std::stoi(next());
    else if (k == "--days") a.days = std::stoi(next());
    else if (k == "--pending") a.pending = std::stoi(next());
    else if (k == "--sizes") {
      a.sizes.clear();
      std::stringstream ss(next());
      for (std::string s; std::getline(ss, s, ',');) a.sizes.push_back(std::stoll(s));
    } else throw std::invalid_argument("unknown argument " + k + " (see --help)");
  }
  if (a.sizes.empty()) throw std::invalid_argument("--sizes: at least one size");
  for (std::size_t i = 0; i < a.sizes.size(); ++i)
    if (a.sizes[i] < 0 || (i > 0 && a.sizes[i] < a.sizes[i - 1]))
      throw std::invalid_argument("--sizes: non-negative and ascending");
  if (a.calls < 1 || a.old_calls < 1) throw std::invalid_argument("--calls, --old-calls: at least 1");
  if (a.chunk < 1 || a.queues < 1 || a.days < 1 || a.pending < 0)
    throw std::invalid_argument("--chunk, --queues, --days: at least 1; --pending: at least 0");
  return a;
}

// One connection of our own, for the set-based SQL and the old query.
class Conn {
 public:
  explicit Conn(const std::string& url) : c_(PQconnectdb(url.c_str())) {
    if (PQstatus(c_) != CONNECTION_OK) {
      std::string m = PQerrorMessage(c_);
      PQfinish(c_);
      throw std::runtime_error(m);
    }
  }
  ~Conn() { PQfinish(c_); }
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;

  PGresult* check(PGresult* r) {
    auto s = PQresultStatus(r);
    if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
      std::string m = PQerrorMessage(c_);
      PQclear(r);
      throw std::runtime_error(m);
    }
    return r;
  }
  void command(const std::string& sql) { PQclear(check(PQexec(c_, sql.c_str()))); }
  long long count(const std::string& sql) {
    PGresult* r = check(PQexec(c_, sql.c_str()));
    long long v = std::stoll(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
  }
  void prepare(const char* name, const std::string& sql) {
    PQclear(check(PQprepare(c_, name, sql.c_str(), 1, nullptr)));
  }
  // Runs a one-parameter prepared statement with NULL; the caller PQclear()s.
  PGresult* exec_null(const char* name) {
    const char* p[] = {nullptr};
    return check(PQexecPrepared(c_, name, 1, p, nullptr, nullptr, 0));
  }

 private:
  PGconn* c_;
};

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (auto at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

// The `stats` query of src/postgres/queries.sql before migration 0008 (commit
// cd3ba6a^), kept word for word as this benchmark's baseline: it counts every
// row of `finished` on each call. `eoq.` is replaced by the bench's schema.
const char* kOldStats = R"(
SELECT queue, status, count(*)::bigint AS count,
       (extract(epoch FROM now() - min(run_at) FILTER (WHERE status = 'pending' AND run_at <= now())) * 1000)::bigint
         AS oldest_pending_ms,
       0::bigint AS last_minute
FROM eoq.tasks WHERE $1::text IS NULL OR tenant = $1 GROUP BY queue, status
UNION ALL
SELECT queue, status, count(*)::bigint, NULL::bigint, 0::bigint
FROM eoq.waiting WHERE $1::text IS NULL OR tenant = $1 GROUP BY queue, status
UNION ALL
SELECT queue, status, count(*)::bigint, NULL::bigint,
       count(*) FILTER (WHERE finished_at > now() - interval '1 minute')
FROM eoq.finished WHERE $1::text IS NULL OR tenant = $1 GROUP BY queue, status;
)";

// Adds finished rows with ids (from, to]: `queues` queues, the four finished
// statuses (90% succeeded, 6% failed, 3% cancelled, 1% expired), finished_at
// scattered over the last `days` days, one statement per `chunk` rows.
void grow(Conn& c, const std::string& schema, long long from, long long to, const Args& a) {
  for (long long lo = from; lo < to; lo += a.chunk) {
    long long hi = std::min(to, lo + a.chunk);
    c.command(fmt::format(
        "INSERT INTO {0}.finished (id, queue, type, payload, status, priority, run_at, attempts, max_attempts, "
        "backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, version, started_at, created_at, updated_at, "
        "finished_at, result, last_error) "
        "SELECT g, 'q' || ((g / 7) % {3}), 'bench', '{{\"n\":1}}', "
        "CASE WHEN g % 100 < 90 THEN 'succeeded' WHEN g % 100 < 96 THEN 'failed' "
        "     WHEN g % 100 < 99 THEN 'cancelled' ELSE 'expired' END, "
        "0, f - interval '1 second', 1, 3, 'exponential', 1000, 60000, 0.1, 3, f - interval '100 ms', "
        "f - interval '1 second', f, f, "
        "CASE WHEN g % 100 < 90 THEN '{{\"ok\":true}}'::json END, CASE WHEN g % 100 >= 90 THEN 'bench' END "
        "FROM generate_series({1}::bigint + 1, {2}::bigint) g, "
        "LATERAL (SELECT now() - ((g * 7919) % ({4}::bigint * 86400000)) * interval '1 millisecond' AS f) t",
        schema, lo, hi, a.queues, a.days));
  }
}

struct Summary {
  double median = 0, p95 = 0, max = 0;
};
Summary summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  auto rank = [&](double q) {
    auto i = static_cast<std::size_t>(q * static_cast<double>(v.size()) + 0.999999);
    return v[std::min(v.size(), std::max<std::size_t>(i, 1)) - 1];
  };
  return {v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2, rank(0.95), v.back()};
}

template <class F>
std::vector<double> time_calls(int n, F&& f) {
  f();  // warm: plan, caches
  std::vector<double> ms;
  for (int i = 0; i < n; ++i) {
    auto t0 = SteadyClock::now();
    f();
    ms.push_back(ms_since(t0));
  }
  return ms;
}

using Counts = std::map<std::tuple<std::string, std::string>, long long>;

Counts finished_counts(const std::vector<eoq::QueueStats>& stats) {
  Counts out;
  for (const auto& s : stats) {
    out[{s.queue, "pending"}] = s.pending;
    out[{s.queue, "succeeded"}] = s.succeeded;
    out[{s.queue, "failed"}] = s.failed;
    out[{s.queue, "cancelled"}] = s.cancelled;
    out[{s.queue, "expired"}] = s.expired;
  }
  std::erase_if(out, [](const auto& kv) { return kv.second == 0; });
  return out;
}

struct Row {
  long long size = 0;
  double grow_s = 0, vacuum_s = 0;
  long long totals_before = 0;  // rows in eoq.totals once grown, before maintain()
  double stats_uncompacted_ms = 0;
  // [0]: right after the bulk's compaction and a VACUUM; [1]: settled, after a
  // second compaction and VACUUM (what autovacuum and the next maintain() do).
  double maintain_ms[2]{};
  long long totals_rows[2]{}, totals_pages[2]{};
  Summary stats[2], throughput[2];
  double old_ms = 0;
};

std::string size_label(long long n) {
  if (n >= 1000000 && n % 1000000 == 0) return fmt::format("{}M", n / 1000000);
  if (n >= 1000 && n % 1000 == 0) return fmt::format("{}k", n / 1000);
  return std::to_string(n);
}

}  // namespace

int main(int argc, char** argv) try {
  Args a = parse(argc, argv);
  std::string url = eoq::testing::database_url_or_temp("EOQ_BENCH_DATABASE_URL");
  fmt::print("eoq totals harness: stats() x{} and throughput(60) x{} per size, old full count x{}; {} queues, "
             "finished_at over {} days, {} pending; {} cores\n",
             a.calls, a.calls, a.old_calls, a.queues, a.days, a.pending, std::thread::hardware_concurrency());
  eoq::PostgresOptions po;
  po.conninfo = url;
  po.schema = fmt::format("bench_tot_{}", ::getpid());
  po.pool_size = 2;
  eoq::PostgresStore store(po);
  store.migrate();
  Conn c(url);
  c.command("SET client_min_messages = warning");
  c.prepare("old_stats", replace_all(kOldStats, "eoq.", po.schema + "."));
  if (a.pending > 0) {
    std::vector<eoq::NewTask> b(static_cast<std::size_t>(a.pending));
    for (std::size_t i = 0; i < b.size(); ++i) {
      b[i].queue = fmt::format("q{}", static_cast<int>(i) % a.queues);
      b[i].type = "bench";
      b[i].payload = R"({"n":1})";
    }
    store.submit_batch(b);
  }
  // The store compacts at most every 5 s: wait out the rest of that before each maintain().
  auto last_maintain = SteadyClock::now() - std::chrono::seconds(60);

  std::vector<Row> rows;
  long long have = 0;
  const std::string totals = po.schema + ".totals";
  auto compact = [&](Row& r, int phase) {
    std::this_thread::sleep_until(last_maintain + std::chrono::milliseconds(5200));
    last_maintain = SteadyClock::now();
    store.maintain();
    r.maintain_ms[phase] = ms_since(last_maintain);
    auto t0 = SteadyClock::now();
    c.command(fmt::format("VACUUM ANALYZE {0}.tasks, {0}.finished, {0}.totals, {0}.waiting", po.schema));
    if (phase == 0) r.vacuum_s = seconds_since(t0);
    r.totals_rows[phase] = c.count("SELECT count(*) FROM " + totals);
    r.totals_pages[phase] =
        c.count(fmt::format("SELECT pg_relation_size('{}') / current_setting('block_size')::int", totals));
  };
  Counts old;
  auto check = [&](const Row& r, const std::vector<eoq::QueueStats>& st) {
    auto now = finished_counts(st);
    long long finished = 0;
    for (const auto& [k, n] : now)
      if (std::get<1>(k) != "pending") finished += n;
    if (now != old || finished != r.size)
      throw std::runtime_error(fmt::format("{}: stats() disagrees with the full count ({} finished rows by stats())",
                                           size_label(r.size), finished));
  };
  for (long long size : a.sizes) {
    Row r;
    r.size = size;
    auto t0 = SteadyClock::now();
    grow(c, po.schema, have, size, a);
    r.grow_s = seconds_since(t0);
    have = size;
    r.totals_before = c.count("SELECT count(*) FROM " + totals);
    r.stats_uncompacted_ms = summarize(time_calls(2, [&] { store.stats(); })).median;

    std::vector<eoq::QueueStats> st[2];
    for (int phase : {0, 1}) {
      compact(r, phase);
      r.stats[phase] = summarize(time_calls(a.calls, [&] { st[phase] = store.stats(); }));
      r.throughput[phase] = summarize(time_calls(a.calls, [&] { store.throughput(60); }));
      fmt::print(stderr,
                 "{}: compaction {} took {:.0f} ms: totals {} rows in {} pages; stats() median {:.2f} ms, "
                 "throughput(60) {:.2f} ms\n",
                 size_label(size), phase + 1, r.maintain_ms[phase], r.totals_rows[phase], r.totals_pages[phase],
                 r.stats[phase].median, r.throughput[phase].median);
    }
    r.old_ms = summarize(time_calls(a.old_calls, [&] {
                 PGresult* res = c.exec_null("old_stats");
                 old.clear();
                 for (int i = 0; i < PQntuples(res); ++i)
                   old[{PQgetvalue(res, i, 0), PQgetvalue(res, i, 1)}] += std::stoll(PQgetvalue(res, i, 2));
                 PQclear(res);
               })).median;
    // The new figures must be the old ones.
    check(r, st[0]);
    check(r, st[1]);
    rows.push_back(r);
    fmt::print(stderr, "{}: grew in {:.1f} s (totals {} rows before maintain(), stats() then {:.1f} ms); "
               "old full count {:.1f} ms\n",
               size_label(size), r.grow_s, r.totals_before, r.stats_uncompacted_ms, r.old_ms);
  }

  auto ratio = [](double x) { return x < 10 ? fmt::format("{:.1f}x", x) : fmt::format("{:.0f}x", x); };
  fmt::print("\nSettled (a second compaction and VACUUM after the bulk's, as autovacuum and the next maintain() do):\n"
             "| finished rows | stats() median / p95 / max | throughput(60) median / p95 | old full count median | "
             "old / new |\n|--:|--:|--:|--:|--:|\n");
  for (const auto& r : rows)
    fmt::print("| {} | {:.2f} / {:.2f} / {:.2f} ms | {:.2f} / {:.2f} ms | {:.1f} ms | {} |\n", size_label(r.size),
               r.stats[1].median, r.stats[1].p95, r.stats[1].max, r.throughput[1].median, r.throughput[1].p95,
               r.old_ms, ratio(r.old_ms / r.stats[1].median));
  fmt::print("\nRight after the bulk's compaction and a VACUUM (the totals rows sit behind the pages the compaction "
             "emptied):\n| finished rows | stats() median / p95 / max | throughput(60) median / p95 | old / new |\n"
             "|--:|--:|--:|--:|\n");
  for (const auto& r : rows)
    fmt::print("| {} | {:.2f} / {:.2f} / {:.2f} ms | {:.2f} / {:.2f} ms | {} |\n", size_label(r.size),
               r.stats[0].median, r.stats[0].p95, r.stats[0].max, r.throughput[0].median, r.throughput[0].p95,
               ratio(r.old_ms / r.stats[0].median));
  fmt::print("\nGrowing and compacting:\n| finished rows | grow | totals rows before maintain() | stats() then | "
             "compaction 1 | VACUUM ANALYZE | totals rows / pages after | compaction 2 | totals rows / pages after |\n"
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
  for (const auto& r : rows)
    fmt::print("| {} | {:.1f} s | {} | {:.1f} ms | {:.0f} ms | {:.1f} s | {} / {} | {:.0f} ms | {} / {} |\n",
               size_label(r.size), r.grow_s, r.totals_before, r.stats_uncompacted_ms, r.maintain_ms[0], r.vacuum_s,
               r.totals_rows[0], r.totals_pages[0], r.maintain_ms[1], r.totals_rows[1], r.totals_pages[1]);
  c.command(fmt::format("DROP SCHEMA {} CASCADE", po.schema));
  return 0;
} catch (const std::exception& e) {
  fmt::print(stderr, "totals: {}\n", e.what());
  return 1;
}
