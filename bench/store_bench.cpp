// Micro-benchmarks of the Postgres store: submit, claim, complete, each at
// several batch sizes. Runs on EOQ_BENCH_DATABASE_URL or a throwaway server.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <atomic>

namespace {

eoq::PostgresStore& store() {
  static eoq::PostgresStore s = [] {
    eoq::PostgresOptions o;
    o.conninfo = eoq::testing::database_url_or_temp("EOQ_BENCH_DATABASE_URL");
    o.schema = fmt::format("bench_{}", ::getpid());
    return eoq::PostgresStore(o);
  }();
  static bool migrated = (s.migrate(), true);
  (void)migrated;
  return s;
}

std::vector<eoq::NewTask> tasks(std::int64_t n, const char* queue) {
  std::vector<eoq::NewTask> v(static_cast<std::size_t>(n));
  for (auto& t : v) {
    t.queue = queue;
    t.type = "noop";
    t.payload = R"({"user": 42, "action": "noop"})";
  }
  return v;
}

void Submit(benchmark::State& state) {
  auto& s = store();
  auto batch = tasks(state.range(0), "bench_submit");
  for (auto _ : state) {
    if (batch.size() == 1) benchmark::DoNotOptimize(s.submit(batch[0]));
    else benchmark::DoNotOptimize(s.submit_batch(batch));
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(Submit)->Arg(1)->Arg(100)->Arg(1000)->UseRealTime();

void SubmitWithKey(benchmark::State& state) {
  auto& s = store();
  static std::atomic<std::int64_t> next{0};
  auto batch = tasks(state.range(0), "bench_submit_key");
  for (auto _ : state) {
    for (auto& t : batch) t.key = fmt::format("k{}", next++);
    if (batch.size() == 1) benchmark::DoNotOptimize(s.submit(batch[0]));
    else benchmark::DoNotOptimize(s.submit_batch(batch));
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(SubmitWithKey)->Arg(1)->Arg(1000)->Arg(10000)->UseRealTime();

// Claim N then complete them (complete_batch, or one by one for N = 1).
void ClaimComplete(benchmark::State& state) {
  auto& s = store();
  const int n = static_cast<int>(state.range(0));
  const std::string queue = fmt::format("bench_claim_{}", n);
  auto refill = tasks(10000, queue.c_str());
  eoq::ClaimRequest req{.queues = {queue}, .owner = "bench", .limit = n, .lease = eoq::Millis(30000)};
  std::int64_t done = 0;
  for (auto _ : state) {
    auto leases = s.claim(req);
    if (static_cast<int>(leases.size()) < n) {
      state.PauseTiming();
      s.submit_batch(refill);
      state.ResumeTiming();
      if (leases.empty()) continue;
    }
    if (leases.size() == 1) {
      s.complete(leases[0]);
    } else {
      std::vector<eoq::Completion> cs;
      for (auto& l : leases) cs.push_back({&l, "null"});
      s.complete_batch(cs);
    }
    done += static_cast<std::int64_t>(leases.size());
  }
  state.SetItemsProcessed(done);
}
BENCHMARK(ClaimComplete)->Arg(1)->Arg(10)->Arg(100)->Arg(1000)->UseRealTime();

// Completion alone: claim outside the timer, then settle one by one or batched.
void Complete(benchmark::State& state) {
  auto& s = store();
  const int n = static_cast<int>(state.range(0));
  const std::string queue = fmt::format("bench_complete_{}", n);
  auto refill = tasks(n, queue.c_str());
  eoq::ClaimRequest req{.queues = {queue}, .owner = "bench", .limit = n, .lease = eoq::Millis(30000)};
  for (auto _ : state) {
    state.PauseTiming();
    s.submit_batch(refill);
    auto leases = s.claim(req);
    std::vector<eoq::Completion> cs;
    for (auto& l : leases) cs.push_back({&l, "null"});
    state.ResumeTiming();
    if (n == 1) s.complete(leases[0]);
    else s.complete_batch(cs);
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(Complete)->Arg(1)->Arg(100)->Arg(1000)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
