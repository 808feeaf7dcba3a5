// What limits cost and how exact they are (issue 32), on one server in one run:
//   1. a no-op drain of a queue with a concurrency limit of 1,000 (which does
//      not bind) beside the same drain without limits;
//   2. 10,000 partitions with a limit of 1 each, the tasks spread over them,
//      beside the same tasks without limits;
//   3. a rate limit of N per second: the starts (by the database's clock, the
//      claim's now()) in every 10-second window, against 10 N.
// Each limited drain is compared with the mean of two plain drains, one just
// before it and one just after, so that a drift of the machine is seen by both.
//
//   bench_limits [--tasks N] [--partitions P] [--rate R] [--rate-seconds S] [--concurrency C]
//                [--rate-period-ms MS] [--prefetch N] [--wide-prefetch N] [--only wide|partitions|rate]
// A worker's leases count against a concurrency limit from the claim on,
// buffered ones too: with the default prefetch, which a no-op handler drives
// to its top (twice claim_batch), one worker holds up to 2,000 leases, so a
// limit of 1,000 binds. The limit-1,000 comparison therefore runs both drains
// with a prefetch of 400 unless --prefetch or --wide-prefetch says otherwise
// (--wide-prefetch -1: the worker's default; a handler that takes a
// millisecond keeps the default prefetch near 8, far below the limit).
//
// Runs on EOQ_BENCH_DATABASE_URL, or on a throwaway server it starts itself
// (fsync and synchronous_commit on).
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <unistd.h>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using eoq::Millis;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Args {
  int tasks = 100000;
  int partitions = 10000;
  int rate = 500;
  int rate_seconds = 30;
  int concurrency = 4;
  int rate_period_ms = 1000;
  int prefetch = -1;       // -1: the worker's default (measured)
  int wide_prefetch = 400;  // the limit-1,000 drains' (-1: the worker's default)
  std::string only;  // "", "wide", "partitions" or "rate"
};

int schema_no = 0;

std::unique_ptr<eoq::PostgresStore> fresh(const std::string& url) {
  eoq::PostgresOptions o;
  o.conninfo = url;
  o.schema = fmt::format("bench_limits_{}_{}", getpid(), ++schema_no);
  auto store = std::make_unique<eoq::PostgresStore>(o);
  store->migrate();
  return store;
}

void submit(eoq::TaskStore& store, int n, int partitions) {
  std::vector<eoq::NewTask> batch;
  for (int i = 0; i < n; ++i) {
    eoq::NewTask t;
    t.queue = "bench";
    t.type = "noop";
    // Spread the way customers' tasks arrive: partition i % P, so every
    // stretch of the queue holds many partitions.
    if (partitions > 0) t.partition = fmt::format("customer-{}", i % partitions);
    batch.push_back(std::move(t));
    if (batch.size() == 5000 || i + 1 == n) {
      store.submit_batch(batch);
      batch.clear();
    }
  }
}

std::int64_t succeeded(eoq::TaskStore& store) {
  std::int64_t done = 0;
  for (const auto& q : store.stats()) {
    if (q.failed + q.cancelled + q.expired > 0) throw std::runtime_error("a task ended other than succeeded");
    done += q.succeeded;
  }
  return done;
}

// Tasks per second of one worker draining `n` tasks.
double drain(const std::string& url, const std::string& name, const Args& a, int partitions,
             const eoq::QueueLimits& limits) {
  auto owned = fresh(url);
  auto& store = *owned;
  if (!limits.empty()) store.set_limits("bench", limits);
  submit(store, a.tasks, partitions);
  eoq::WorkerOptions wo;
  wo.queues = {"bench"};
  wo.concurrency = a.concurrency;
  if (a.prefetch >= 0) wo.prefetch = a.prefetch;
  eoq::Worker worker(store, wo);
  worker.on("noop", [](eoq::TaskContext&) {});
  const auto t0 = Clock::now();
  worker.start();
  // The worker's own count of completions that committed: polling stats()
  // every few ms cost the server as much as the drain it watched.
  while (worker.counters().succeeded < static_cast<std::uint64_t>(a.tasks)) {
    if (worker.counters().failed > 0) throw std::runtime_error("a task failed");
    std::this_thread::sleep_for(2ms);
  }
  const double s = seconds_since(t0);
  worker.stop();
  if (succeeded(store) != a.tasks) throw std::runtime_error("the store's count disagrees with the worker's");
  const double rate = a.tasks / s;
  std::printf("  %-44s %8d tasks in %6.2f s  %9.0f tasks/s\n", name.c_str(), a.tasks, s, rate);
  std::fflush(stdout);
  return rate;
}

void compare(const std::string& url, const Args& a, const std::string& name, int partitions,
             const eoq::QueueLimits& limits, double goal) {
  const double before = drain(url, "without limits", a, partitions, {});
  const double limited = drain(url, name, a, partitions, limits);
  const double after = drain(url, "without limits", a, partitions, {});
  const double ratio = limited / ((before + after) / 2);
  std::printf("  => %s: %.2f of the drain without limits (goal >= %.1f)\n\n", name.c_str(), ratio, goal);
  std::fflush(stdout);
}

void rate(const std::string& url, const Args& a) {
  auto owned = fresh(url);
  auto& store = *owned;
  eoq::QueueLimits l;
  // N per second as N * period / 1 s per period: the limit allows a burst of
  // the whole period's starts at once, so a shorter period spreads them.
  const int per_period = static_cast<int>(static_cast<long long>(a.rate) * a.rate_period_ms / 1000);
  if (per_period < 1) throw std::runtime_error("--rate x --rate-period-ms must allow one start per period");
  l.rate = eoq::RateLimit{per_period, Millis(a.rate_period_ms)};
  store.set_limits("bench", l);
  const int n = a.rate * (a.rate_seconds + 5);
  submit(store, n, 0);
  eoq::WorkerOptions wo;
  wo.queues = {"bench"};
  wo.concurrency = a.concurrency;
  if (a.prefetch >= 0) wo.prefetch = a.prefetch;
  eoq::Worker worker(store, wo);
  worker.on("noop", [](eoq::TaskContext&) {});
  worker.start();
  std::this_thread::sleep_for(std::chrono::seconds(a.rate_seconds));
  worker.stop();
  // The claims' own clock: each attempt's start, read back from the store.
  std::vector<std::int64_t> starts;  // microseconds
  eoq::ListQuery q;
  q.queue = "bench";
  q.limit = 1000;
  for (;;) {
    auto page = store.list(q);
    for (const auto& t : page.tasks)
      if (t.started_at && t.attempts > 0) starts.push_back(t.started_at->time_since_epoch().count());
    if (!page.next_after) break;
    q.after = page.next_after;
  }
  std::sort(starts.begin(), starts.end());
  if (starts.size() < 2) throw std::runtime_error("rate: too few starts");
  const std::int64_t window = 10'000'000, step = 10'000;
  const std::int64_t allowed = 10LL * a.rate;
  std::int64_t most = 0, least = -1, windows = 0;
  // Every window of 10 s that lies inside the run, moved by 10 ms.
  for (std::int64_t from = starts.front(); from + window <= starts.back(); from += step, ++windows) {
    auto lo = std::lower_bound(starts.begin(), starts.end(), from);
    auto hi = std::lower_bound(starts.begin(), starts.end(), from + window);
    const std::int64_t in = hi - lo;
    most = std::max(most, in);
    least = least < 0 ? in : std::min(least, in);
  }
  std::printf("  rate limit %d per %d ms (%d/s): %zu starts in %d s; over %lld windows of 10 s: most %lld, least %lld of %lld allowed\n",
              per_period, a.rate_period_ms, a.rate, starts.size(), a.rate_seconds, static_cast<long long>(windows), static_cast<long long>(most),
              static_cast<long long>(least), static_cast<long long>(allowed));
  std::printf("  => most / allowed %.4f (never above 1), least / allowed %.4f (goal >= 0.99)\n\n",
              static_cast<double>(most) / static_cast<double>(allowed),
              static_cast<double>(least) / static_cast<double>(allowed));
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) try {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&] {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + k);
      return std::stoi(argv[++i]);
    };
    if (k == "--tasks") a.tasks = next();
    else if (k == "--partitions") a.partitions = next();
    else if (k == "--rate") a.rate = next();
    else if (k == "--rate-seconds") a.rate_seconds = next();
    else if (k == "--concurrency") a.concurrency = next();
    else if (k == "--prefetch") a.prefetch = next();
    else if (k == "--wide-prefetch") a.wide_prefetch = next();
    else if (k == "--rate-period-ms") a.rate_period_ms = next();
    else if (k == "--only" && i + 1 < argc) a.only = argv[++i];
    else throw std::runtime_error("unknown flag " + k +
                                  " (--tasks, --partitions, --rate, --rate-seconds, --concurrency, --prefetch,"
                                  " --wide-prefetch, --rate-period-ms, --only)");
  }
  if (a.tasks < 1 || a.partitions < 1 || a.rate < 1 || a.rate_seconds < 11 || a.concurrency < 1)
    throw std::runtime_error("--tasks, --partitions, --rate, --concurrency >= 1; --rate-seconds >= 11");
  const std::string url = eoq::testing::database_url_or_temp("EOQ_BENCH_DATABASE_URL");
  std::printf("limits: %d no-op tasks per drain, one worker of concurrency %d\n\n", a.tasks, a.concurrency);
  if (a.only != "" && a.only != "wide" && a.only != "partitions" && a.only != "rate")
    throw std::runtime_error("--only: one of wide, partitions, rate");
  if (a.only == "" || a.only == "wide") {
    eoq::QueueLimits wide;
    wide.concurrency = 1000;
    Args unbound = a;
    if (unbound.prefetch < 0) unbound.prefetch = a.wide_prefetch;
    compare(url, unbound,
            unbound.prefetch < 0 ? std::string("concurrency limit 1,000 (default prefetch)")
                                 : fmt::format("concurrency limit 1,000 (prefetch {})", unbound.prefetch),
            0, wide, 0.9);
  }
  if (a.only == "" || a.only == "partitions") {
    eoq::QueueLimits one_each;
    one_each.partition_concurrency = 1;
    compare(url, a, fmt::format("{} partitions, limit 1 each", a.partitions), a.partitions, one_each, 0.5);
  }
  if (a.only == "" || a.only == "rate") {
    rate(url, a);
    if (a.rate_period_ms == 1000) {
      Args fine = a;
      fine.rate_period_ms = 100;
      rate(url, fine);
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_limits: %s\n", e.what());
  return 1;
}
