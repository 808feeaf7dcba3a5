// Workflows at size, each beside a plain drain of the same number of tasks in
// the same run on the same server, so every figure reads as a ratio:
//
//   fan-out   1 parent, N children naming it (released in the parent's settling transaction)
//   fan-in    N parents, 1 child naming all of them (each settlement counts down one row)
//   pipeline  a 3-stage pipeline of P tasks: P/3 chains a -> b -> c
//
// For each: the submit time (the dependents go through submit_flow: parents
// locked and read once per batch) and the drain time (worker start until every
// task succeeded), against the plain submit and drain of the same count.
//
//   workflows [--fan 10000] [--pipeline 100000] [--concurrency 8] [--batch 10000]
//
// Runs on EOQ_BENCH_DATABASE_URL, or on a throwaway server it starts itself
// (PostgreSQL defaults: fsync and synchronous_commit on). Timings only; nothing
// here asserts a figure.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct Args {
  int fan = 10000;
  int pipeline = 100000;
  int concurrency = 8;
  int batch = 10000;
};

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

eoq::NewTask task(std::vector<eoq::TaskId> parents = {}) {
  eoq::NewTask t;
  t.queue = "bench";
  t.type = "noop";
  t.parents = std::move(parents);
  return t;
}

// Submits in batches of at most `batch`; the ids in input order.
std::vector<eoq::TaskId> submit_all(eoq::TaskStore& store, const std::vector<eoq::NewTask>& tasks, int batch) {
  std::vector<eoq::TaskId> ids;
  ids.reserve(tasks.size());
  std::span<const eoq::NewTask> all(tasks);
  for (std::size_t at = 0; at < all.size(); at += static_cast<std::size_t>(batch)) {
    auto part = all.subspan(at, std::min<std::size_t>(static_cast<std::size_t>(batch), all.size() - at));
    for (const auto& r : store.submit_batch(part)) ids.push_back(r.task.id);
  }
  return ids;
}

struct Run {
  std::string name;
  long long tasks = 0;
  double submit_s = 0, drain_s = 0;
};

// A fresh schema; `submit` fills it, then one worker drains it.
Run measure(const std::string& url, const std::string& name, int concurrency,
            const std::function<long long(eoq::TaskStore&)>& submit) {
  static int n = 0;
  eoq::PostgresOptions o;
  o.conninfo = url;
  o.schema = fmt::format("bench_flows_{}", ++n);
  eoq::PostgresStore store(o);
  store.migrate();
  Run r;
  r.name = name;
  auto t0 = Clock::now();
  r.tasks = submit(store);
  r.submit_s = seconds_since(t0);
  eoq::WorkerOptions wo;
  wo.queues = {"bench"};
  wo.concurrency = concurrency;
  eoq::Worker worker(store, wo);
  worker.on("noop", [](eoq::TaskContext&) {});
  auto t1 = Clock::now();
  worker.start();
  for (;;) {
    long long done = 0, other = 0;
    for (const auto& q : store.stats()) {
      done += q.succeeded;
      other += q.failed + q.cancelled + q.expired;
    }
    if (other > 0) throw std::runtime_error(name + ": a task ended other than succeeded");
    if (done >= r.tasks) break;
    std::this_thread::sleep_for(20ms);
  }
  r.drain_s = seconds_since(t1);
  worker.stop();
  std::printf("  %-28s %7lld tasks  submit %6.2f s (%8.0f/s)  drain %6.2f s (%8.0f/s)\n", name.c_str(), r.tasks,
              r.submit_s, static_cast<double>(r.tasks) / r.submit_s, r.drain_s,
              static_cast<double>(r.tasks) / r.drain_s);
  std::fflush(stdout);
  return r;
}

void ratio(const Run& flow, const Run& plain) {
  std::printf("  => %s vs plain: submit %.2fx the time, drain %.2fx the time (%.0f%% of the plain drain's rate)\n\n",
              flow.name.c_str(), flow.submit_s / plain.submit_s, flow.drain_s / plain.drain_s,
              100.0 * plain.drain_s / flow.drain_s);
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
    if (k == "--fan") a.fan = next();
    else if (k == "--pipeline") a.pipeline = next();
    else if (k == "--concurrency") a.concurrency = next();
    else if (k == "--batch") a.batch = next();
    else throw std::runtime_error("unknown flag " + k + " (--fan, --pipeline, --concurrency, --batch)");
  }
  if (a.fan < 1 || a.pipeline < 3 || a.concurrency < 1 || a.batch < 1 || a.batch > 100000)
    throw std::runtime_error("--fan >= 1, --pipeline >= 3, --concurrency >= 1, 1 <= --batch <= 100000");
  const std::string url = eoq::testing::database_url_or_temp("EOQ_BENCH_DATABASE_URL");
  auto plain = [&](long long n) {
    return [&a, n](eoq::TaskStore& s) {
      submit_all(s, std::vector<eoq::NewTask>(static_cast<std::size_t>(n), task()), a.batch);
      return n;
    };
  };
  std::printf("workflows: concurrency %d, batches of %d\n\n", a.concurrency, a.batch);

  const long long fan_n = a.fan + 1;
  auto fan_plain = measure(url, "plain", a.concurrency, plain(fan_n));
  auto fan_out = measure(url, fmt::format("fan-out 1 x {}", a.fan), a.concurrency, [&](eoq::TaskStore& s) {
    auto p = s.submit(task()).task.id;
    submit_all(s, std::vector<eoq::NewTask>(static_cast<std::size_t>(a.fan), task({p})), a.batch);
    return fan_n;
  });
  ratio(fan_out, fan_plain);
  auto fan_in = measure(url, fmt::format("fan-in {} x 1", a.fan), a.concurrency, [&](eoq::TaskStore& s) {
    auto ps = submit_all(s, std::vector<eoq::NewTask>(static_cast<std::size_t>(a.fan), task()), a.batch);
    s.submit(task(ps));
    return fan_n;
  });
  ratio(fan_in, fan_plain);

  const int chains = a.pipeline / 3;
  const long long pipe_n = 3LL * chains;
  auto pipe_plain = measure(url, "plain", a.concurrency, plain(pipe_n));
  auto pipe = measure(url, fmt::format("pipeline 3 x {}", chains), a.concurrency, [&](eoq::TaskStore& s) {
    auto stage = submit_all(s, std::vector<eoq::NewTask>(static_cast<std::size_t>(chains), task()), a.batch);
    for (int k = 1; k < 3; ++k) {
      std::vector<eoq::NewTask> next;
      next.reserve(stage.size());
      for (auto id : stage) next.push_back(task({id}));
      stage = submit_all(s, next, a.batch);
    }
    return pipe_n;
  });
  ratio(pipe, pipe_plain);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "workflows: %s\n", e.what());
  return 1;
}
