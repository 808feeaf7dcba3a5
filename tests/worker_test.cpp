// The Worker against the TaskStore contract: handlers, retries, progress,
// cancellation, checkpoints, heartbeats, lease loss, shutdown, periodic tasks,
// counters and store outages. Every case runs on MemoryStore; the cases that
// matter for SQL effects also run on PostgresStore when a database is available.
#include <catch2/catch.hpp>

#include "history.hpp"
#include "support.hpp"

#include <fmt/format.h>

#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <span>
#include <thread>

// The process chaos tests below (#ifdef EOQ_WORKER_CHILD) must never be
// compiled out without a trace: the build always names the child.
#ifndef EOQ_WORKER_CHILD
#error "EOQ_WORKER_CHILD must name the eoq_worker_child executable (tests/CMakeLists.txt)"
#endif

using namespace std::chrono_literals;
using eoq::Millis;
using Steady = std::chrono::steady_clock;
using eoq::test::StoreKind;
using eoq::test::eventually;
using eoq::test::Gate;
namespace h = eoq::test::history;

// Runs the rest of the test case once per store; `store` is a TaskStore& on a
// fresh store (Postgres: its own schema).
#define EOQ_EACH_STORE(store)                                                      \
  const StoreKind store##_kind = GENERATE(StoreKind::memory, StoreKind::postgres); \
  INFO("store: " << eoq::test::to_string(store##_kind));                          \
  eoq::test::TestStore store##_owner(store##_kind);                                \
  eoq::TaskStore& store = *store##_owner

namespace {

// Catch2 assertions are not thread-safe: handlers record what they see and the
// test thread checks it afterwards.

// Forwards to a real store, with switches that make chosen calls fail or stall
// the way a flaky network or a restarting server would.
class FaultyStore final : public eoq::TaskStore {
 public:
  explicit FaultyStore(eoq::TaskStore& inner) : inner_(inner) {}

  std::atomic<bool> heartbeats_down{false};   // heartbeat throws TransientError
  std::atomic<int> claim_failures{0};         // the next n claims throw TransientError
  std::atomic<int> complete_batch_failures{0};
  std::atomic<bool> everything_down{false};   // every call throws TransientError
  std::atomic<int> complete_batch_calls{0};
  std::atomic<int> max_batch_seen{0};
  std::atomic<int> claim_calls{0};
  std::atomic<int> waits{0};                  // wait_for_tasks calls begun
  std::atomic<bool> waiting_last{false};      // the last claim or wait_for_tasks call was the wait
  std::atomic<bool> expire_down{false};       // expire_if_overdue throws TransientError
  // Leases of tasks with a deadline say the claim read the store's clock 1 us
  // before it (the latest a claim may hand the task out): at hand-off the
  // deadline has passed by the claim's clock plus any wait, without waiting
  // for it. The task's row keeps its own deadline.
  std::atomic<bool> claims_at_deadline{false};
  std::atomic<int> expire_calls{0};
  // Whether expire_if_overdue was called for `id` (before its handler started, if it did).
  bool expire_asked(eoq::TaskId id) {
    std::lock_guard lk(asked_mu_);
    return asked_.count(id) > 0;
  }
  // True once a worker's claimer (the only caller of claim and wait_for_tasks)
  // found nothing to claim and is waiting: idle, by an event rather than a sleep.
  bool idle() const { return waiting_last.load(); }

  eoq::SubmitResult submit(const eoq::NewTask& t) override { check(); return inner_.submit(t); }
  std::vector<eoq::SubmitResult> submit_batch(std::span<const eoq::NewTask> t) override {
    check();
    return inner_.submit_batch(t);
  }
  std::vector<eoq::Lease> claim(const eoq::ClaimRequest& r) override {
    check();
    waiting_last = false;
    ++claim_calls;
    if (claim_failures.load() > 0) {
      --claim_failures;
      down("claim");
    }
    auto leases = inner_.claim(r);
    if (claims_at_deadline)
      for (auto& l : leases)
        if (l.task.deadline) l.claimed_at = *l.task.deadline - std::chrono::microseconds(1);
    return leases;
  }
  void complete(const eoq::Lease& l, std::string_view r) override { check(); inner_.complete(l, r); }
  eoq::FailOutcome fail(const eoq::Lease& l, const eoq::Failure& f) override { check(); return inner_.fail(l, f); }
  void release(const eoq::Lease& l) override { check(); inner_.release(l); }
  bool expire_if_overdue(const eoq::Lease& l) override {
    {
      std::lock_guard lk(asked_mu_);
      asked_.insert(l.id());
    }
    ++expire_calls;
    check();
    if (expire_down) down("expire_if_overdue");
    return inner_.expire_if_overdue(l);
  }
  void cancel_running(const eoq::Lease& l, std::string_view r) override { check(); inner_.cancel_running(l, r); }
  eoq::FailOutcome snooze(const eoq::Lease& l, Millis d) override { check(); return inner_.snooze(l, d); }
  std::atomic<std::int64_t> clock_offset_us{0};  // now() runs this far ahead of the store's clock
  eoq::TimePoint now() override {
    check();
    return inner_.now() + std::chrono::microseconds(clock_offset_us.load());
  }
  eoq::HeartbeatResult heartbeat(const eoq::Lease& l, Millis e) override {
    check();
    if (heartbeats_down) down("heartbeat");
    return inner_.heartbeat(l, e);
  }
  void progress(const eoq::Lease& l, int p, std::string_view s) override { check(); inner_.progress(l, p, s); }
  void checkpoint(const eoq::Lease& l, std::string_view s, std::string_view j) override {
    check();
    inner_.checkpoint(l, s, j);
  }
  std::vector<bool> complete_batch(std::span<const eoq::Completion> c) override {
    check();
    ++complete_batch_calls;
    int n = static_cast<int>(c.size());
    int prev = max_batch_seen.load();
    while (prev < n && !max_batch_seen.compare_exchange_weak(prev, n)) {
    }
    if (complete_batch_failures.load() > 0) {
      --complete_batch_failures;
      down("complete_batch");
    }
    return inner_.complete_batch(c);
  }
  std::unique_ptr<eoq::LeaseTransaction> begin(const eoq::Lease& l) override { check(); return inner_.begin(l); }
  eoq::CancelOutcome cancel(eoq::TaskId id, const eoq::Scope& s = {}) override { return inner_.cancel(id, s); }
  eoq::RetryOutcome retry(eoq::TaskId id, const eoq::Scope& s = {}) override { return inner_.retry(id, s); }
  std::optional<eoq::Task> get(eoq::TaskId id, const eoq::Scope& s = {}) override { return inner_.get(id, s); }
  std::optional<eoq::Task> find(std::string_view q, std::string_view k, const eoq::Scope& s = {}) override {
    return inner_.find(q, k, s);
  }
  eoq::TaskPage list(const eoq::ListQuery& q, const eoq::Scope& s = {}) override { return inner_.list(q, s); }
  std::vector<eoq::QueueStats> stats(const eoq::Scope& s = {}) override { return inner_.stats(s); }
  eoq::RemoveOutcome remove(eoq::TaskId id, const eoq::Scope& s = {}) override { return inner_.remove(id, s); }
  void pause(std::string_view q) override { inner_.pause(q); }
  void resume(std::string_view q) override { inner_.resume(q); }
  std::vector<std::string> paused_queues() override { return inner_.paused_queues(); }
  void set_limits(std::string_view queue, const eoq::QueueLimits& limits) override {
    inner_.set_limits(queue, limits);
  }
  std::vector<std::pair<std::string, eoq::QueueLimits>> limits() override { return inner_.limits(); }
  std::vector<eoq::Throughput> throughput(int m, const eoq::Scope& s = {}) override {
    return inner_.throughput(m, s);
  }
  std::vector<eoq::Attempt> history(eoq::TaskId id, const eoq::Scope& s = {}) override {
    return inner_.history(id, s);
  }
  eoq::Relatives relatives(eoq::TaskId id, const eoq::Scope& s = {}) override { return inner_.relatives(id, s); }
  std::int64_t prune(Millis o, int b) override { check(); return inner_.prune(o, b); }
  std::int64_t prunable(Millis o) override { return inner_.prunable(o); }
  eoq::MaintenanceReport maintain() override { check(); return inner_.maintain(); }
  void wait_for_tasks(const std::vector<std::string>& q, Millis t) override {
    ++waits;
    waiting_last = true;
    if (everything_down) {
      std::this_thread::sleep_for(std::min(t, Millis(20)));
      down("wait_for_tasks");
    }
    inner_.wait_for_tasks(q, t);
  }
  void wake() override { inner_.wake(); }

 private:
  void check() const {
    if (everything_down) down("store");
  }
  [[noreturn]] static void down(const char* what) {
    throw eoq::TransientError(std::string(what) + ": connection refused (injected)", "08006", what);
  }
  eoq::TaskStore& inner_;
  std::mutex asked_mu_;
  std::set<eoq::TaskId> asked_;
};

// Collects log lines so tests stay quiet and can look for messages.
struct LogSink {
  std::mutex mu;
  std::vector<std::pair<eoq::LogLevel, std::string>> lines;
  eoq::Logger logger() {
    return [this](eoq::LogLevel level, std::string_view message) {
      std::lock_guard lk(mu);
      lines.emplace_back(level, std::string(message));
      static const bool verbose = std::getenv("EOQ_TEST_VERBOSE") != nullptr;
      if (verbose) std::fprintf(stderr, "[%s] %.*s\n", std::string(eoq::to_string(level)).c_str(),
                                static_cast<int>(message.size()), message.data());
    };
  }
  bool contains(std::string_view needle) {
    std::lock_guard lk(mu);
    for (auto& [level, line] : lines)
      if (line.find(needle) != std::string::npos) return true;
    return false;
  }
};

eoq::TaskStatus status_of(eoq::TaskStore& store, eoq::TaskId id) { return store.get(id).value().status; }

bool is_done(eoq::TaskStore& store, eoq::TaskId id) { return eoq::is_terminal(status_of(store, id)); }

eoq::NewTask task(std::string type, std::string payload = "{}") {
  eoq::NewTask t;
  t.type = std::move(type);
  t.payload = std::move(payload);
  return t;
}

eoq::WorkerOptions fast_options(LogSink& sink) {
  eoq::WorkerOptions o;
  o.concurrency = 2;
  o.lease = 2000ms;
  o.poll_interval = 50ms;
  o.shutdown_timeout = 2000ms;
  o.maintenance_interval = 0ms;
  o.error_backoff_initial = 5ms;
  o.error_backoff_max = 50ms;
  o.logger = sink.logger();
  o.log_level = eoq::LogLevel::debug;
  return o;
}

void check_counters_add_up(const eoq::WorkerCounters& c) {
  CHECK(c.claimed == c.succeeded + c.failed + c.retried + c.cancelled + c.expired + c.lease_lost + c.released +
                         c.abandoned + c.snoozed + c.in_flight);
  std::uint64_t histogram = 0;
  for (auto n : c.handler_duration_buckets) histogram += n;
  CHECK(histogram == c.handler_runs);
  CHECK(c.handler_time_max <= c.handler_time_total);
}

}  // namespace

TEST_CASE("a worker runs the handler registered for the task's type and stores its result", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::atomic<int> calls{0};
  std::mutex mu;
  std::string type, payload, token;
  std::optional<std::string> key;
  int attempt = 0;
  eoq::TaskId seen_id = 0;
  worker.on("greet", [&](eoq::TaskContext& ctx) {
    ++calls;
    {
      std::lock_guard lk(mu);
      type = ctx.type();
      payload = ctx.payload();
      key = ctx.key();
      attempt = ctx.attempt();
      token = ctx.idempotency_token();
      seen_id = ctx.id();
    }
    ctx.set_result(R"({"greeting":"hello ada"})");
  });
  auto t = task("greet", R"({"name":"ada"})");
  t.key = "k1";
  auto id = store.submit(t).task.id;
  worker.start();
  REQUIRE(worker.running());
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK_FALSE(worker.running());
  auto done = store.get(id).value();
  CHECK(done.status == eoq::TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"({"greeting":"hello ada"})"));
  CHECK(calls == 1);
  {
    std::lock_guard lk(mu);
    CHECK(type == "greet");
    CHECK(attempt == 1);
    CHECK(payload == R"({"name":"ada"})");
    CHECK(key == std::optional<std::string>("k1"));
    CHECK(seen_id == id);
    CHECK(token == "eoq-task-" + std::to_string(id));
  }
  auto c = worker.counters();
  CHECK(c.claimed == 1);
  CHECK(c.succeeded == 1);
  CHECK(c.in_flight == 0);
  check_counters_add_up(c);
}

TEST_CASE("a handler that returns without a result stores null", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  worker.on("noop", [](eoq::TaskContext&) {});
  auto id = store.submit(task("noop")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK(store.get(id)->status == eoq::TaskStatus::succeeded);
  CHECK(store.get(id)->result.value_or("") == "null");
}

TEST_CASE("set_result refuses text that is not JSON", "[worker]") {
  eoq::MemoryStore store;
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::atomic<bool> refused{false};
  worker.on("bad-result", [&](eoq::TaskContext& ctx) {
    try {
      ctx.set_result("{not json");
    } catch (const eoq::InvalidArgument& e) {
      refused = e.field() == "result";
    }
  });
  auto id = store.submit(task("bad-result")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK(refused);
  CHECK(store.get(id)->status == eoq::TaskStatus::succeeded);
}

TEST_CASE("a throwing handler is retried per the task's policy until attempts run out", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::atomic<int> calls{0};
  worker.on("flaky", [&](eoq::TaskContext& ctx) {
    ++calls;
    if (ctx.payload() == R"("always")" || ctx.attempt() < 3)
      throw std::runtime_error("boom " + std::to_string(ctx.attempt()));
  });
  auto t = task("flaky", R"("always")");
  t.retry.max_attempts = 3;
  t.retry.initial_delay = 10ms;
  t.retry.max_delay = 20ms;
  auto always = store.submit(t).task.id;
  t.payload = R"("third time lucky")";
  auto lucky = store.submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, always) && is_done(store, lucky); }));
  worker.stop();

  auto a = store.get(always).value();
  CHECK(a.status == eoq::TaskStatus::failed);
  CHECK(a.attempts == 3);
  CHECK(a.last_error.value_or("").find("boom 3") != std::string::npos);
  auto h = store.history(always);
  REQUIRE(h.size() == 3);
  CHECK(h[0].outcome == "retry");
  CHECK(h[2].outcome == "failed");

  auto l = store.get(lucky).value();
  CHECK(l.status == eoq::TaskStatus::succeeded);
  CHECK(l.attempts == 3);
  CHECK(calls == 6);

  auto c = worker.counters();
  CHECK(c.claimed == 6);
  CHECK(c.retried == 4);
  CHECK(c.failed == 1);
  CHECK(c.succeeded == 1);
  CHECK(c.handler_runs == 6);
  check_counters_add_up(c);
}

TEST_CASE("PermanentError fails the task at once, whatever the retry policy", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  worker.on("invalid", [](eoq::TaskContext&) { throw eoq::PermanentError("address does not exist"); });
  auto t = task("invalid");
  t.retry.max_attempts = 5;
  auto id = store.submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  auto done = store.get(id).value();
  CHECK(done.status == eoq::TaskStatus::failed);
  CHECK(done.attempts == 1);
  CHECK(done.last_error.value_or("") == "address does not exist");
  CHECK(worker.counters().failed == 1);
}

TEST_CASE("a task of an unknown type fails permanently and the worker carries on", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  worker.on("known", [](eoq::TaskContext&) {});
  auto t = task("mystery");
  t.retry.max_attempts = 5;
  auto unknown = store.submit(t).task.id;
  auto known = store.submit(task("known")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, unknown) && is_done(store, known); }));
  auto after = store.submit(task("known")).task.id;
  REQUIRE(eventually([&] { return is_done(store, after); }));
  worker.stop();
  auto u = store.get(unknown).value();
  CHECK(u.status == eoq::TaskStatus::failed);
  CHECK(u.attempts == 1);
  CHECK(u.last_error.value_or("").find("no handler registered for task type 'mystery'") != std::string::npos);
  CHECK(store.get(known)->status == eoq::TaskStatus::succeeded);
  CHECK(store.get(after)->status == eoq::TaskStatus::succeeded);
}

TEST_CASE("handler exceptions of any kind become task failures", "[worker]") {
  eoq::MemoryStore store;
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  worker.on("int", [](eoq::TaskContext&) { throw 42; });
  auto t = task("int");
  t.retry.max_attempts = 1;
  auto id = store.submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK(store.get(id)->status == eoq::TaskStatus::failed);
  CHECK(store.get(id)->last_error.value_or("").find("non-standard exception") != std::string::npos);
}

TEST_CASE("progress reported by a handler is visible through get while it runs", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  Gate gate;
  worker.on("long", [&](eoq::TaskContext& ctx) {
    ctx.progress(40, "downloading");
    gate.wait();
    ctx.progress(100, "done");
  });
  auto id = store.submit(task("long")).task.id;
  worker.start();
  CHECK(eventually([&] {
    auto t = store.get(id).value();
    return t.progress == 40 && t.stage == "downloading" && t.status == eoq::TaskStatus::running;
  }));
  gate.release();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  auto t = store.get(id).value();
  CHECK(t.progress == 100);
  CHECK(t.stage == "done");
}

TEST_CASE("progress outside 0..100 is refused in the handler", "[worker]") {
  eoq::MemoryStore store;
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::atomic<bool> refused{false};
  worker.on("p", [&](eoq::TaskContext& ctx) {
    try {
      ctx.progress(101);
    } catch (const eoq::InvalidArgument& e) {
      refused = e.field() == "progress";
    }
  });
  auto id = store.submit(task("p")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK(refused);
}

TEST_CASE("a handler sees cancellation requested through cancel() and the task ends cancelled", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.lease = 300ms;  // heartbeat every 100 ms carries the news
  eoq::Worker worker(store, options);
  std::atomic<bool> started{false}, saw_cancel{false};
  worker.on("cancellable", [&](eoq::TaskContext& ctx) {
    started = true;
    while (ctx.sleep_for(60s)) {
    }
    saw_cancel = ctx.cancelled();
    throw std::runtime_error("cancelled by request");
  });
  auto id = store.submit(task("cancellable")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return started.load(); }));
  auto t0 = std::chrono::steady_clock::now();
  CHECK(store.cancel(id) == eoq::CancelOutcome::cancel_requested);
  REQUIRE(eventually([&] { return is_done(store, id); }, 45s));
  // The news interrupted the handler's sleep: it did not sit out its 60 s.
  CHECK(std::chrono::steady_clock::now() - t0 < 30s);
  worker.stop();
  CHECK(saw_cancel);
  CHECK(store.get(id)->status == eoq::TaskStatus::cancelled);
  CHECK(worker.counters().cancelled == 1);
}

TEST_CASE("checkpoints are handed back after a failure so finished stages are not redone", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::mutex mu;
  std::map<std::string, int> runs;  // stage -> times executed
  std::vector<std::optional<std::string>> seen_stage;
  std::atomic<bool> state_ok{true};
  worker.on("pipeline", [&](eoq::TaskContext& ctx) {
    {
      std::lock_guard lk(mu);
      seen_stage.push_back(ctx.checkpoint_stage());
    }
    auto stage = ctx.checkpoint_stage().value_or("");
    if (stage.empty()) {
      std::lock_guard lk(mu);
      ++runs["extract"];
    }
    if (stage.empty()) ctx.checkpoint("extracted", R"({"rows":120})");
    if (stage.empty() || stage == "extracted") {
      if (ctx.checkpoint_state() != std::optional<std::string>(R"({"rows":120})")) state_ok = false;
      {
        std::lock_guard lk(mu);
        ++runs["transform"];
      }
      if (ctx.attempt() == 1) throw std::runtime_error("transform crashed");
      ctx.checkpoint("transformed", R"({"rows":118})");
    }
    {
      std::lock_guard lk(mu);
      ++runs["load"];
    }
    ctx.set_result(*ctx.checkpoint_state());
  });
  auto t = task("pipeline");
  t.retry.initial_delay = 10ms;
  auto id = store.submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  auto done = store.get(id).value();
  CHECK(done.status == eoq::TaskStatus::succeeded);
  CHECK(done.attempts == 2);
  CHECK(done.result == std::optional<std::string>(R"({"rows":118})"));
  CHECK(done.checkpoint_stage == std::optional<std::string>("transformed"));
  CHECK(state_ok);
  std::lock_guard lk(mu);
  CHECK(runs["extract"] == 1);
  CHECK(runs["transform"] == 2);
  CHECK(runs["load"] == 1);
  REQUIRE(seen_stage.size() == 2);
  CHECK_FALSE(seen_stage[0].has_value());
  CHECK(seen_stage[1] == std::optional<std::string>("extracted"));
}

TEST_CASE("heartbeats keep a lease alive for a handler that runs three times the lease", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.lease = 300ms;
  eoq::Worker worker(store, options);
  std::atomic<int> calls{0};
  std::atomic<bool> lost{false};
  worker.on("slow", [&](eoq::TaskContext& ctx) {
    ++calls;
    std::this_thread::sleep_for(900ms);
    lost = ctx.lease_lost();
  });
  auto id = store.submit(task("slow")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return calls == 1; }));
  // A rival claims all along: it would take the task the moment its lease lapsed.
  std::atomic<int> stolen{0};
  {
    std::jthread rival([&](std::stop_token st) {
      while (!st.stop_requested()) {
        auto got = store.claim(eoq::ClaimRequest{{"default"}, "rival", 10, 300ms});
        stolen += static_cast<int>(got.size());
        std::this_thread::sleep_for(10ms);
      }
    });
    REQUIRE(eventually([&] { return is_done(store, id); }, 5s));
  }
  worker.stop();
  CHECK(stolen == 0);
  CHECK(calls == 1);
  CHECK_FALSE(lost);
  auto done = store.get(id).value();
  CHECK(done.status == eoq::TaskStatus::succeeded);
  CHECK(done.attempts == 1);
  CHECK(worker.counters().succeeded == 1);
  CHECK(worker.counters().lease_lost == 0);
}

TEST_CASE("a worker whose heartbeats stall loses the lease to a new owner and its outcome is discarded", "[worker]") {
  // true: heartbeats recover and tell the handler; false: they stay down and the
  // batched completion is what gets rejected.
  const bool heartbeats_recover = GENERATE(true, false);
  EOQ_EACH_STORE(memory);
  FaultyStore store(memory);
  LogSink sink;
  auto options = fast_options(sink);
  options.lease = 200ms;
  options.concurrency = 1;  // so this worker cannot reclaim the task itself
  options.prefetch = 0;
  eoq::Worker worker(store, options);
  std::atomic<bool> started{false}, noticed{false};
  Gate gate;
  worker.on("victim", [&](eoq::TaskContext& ctx) {
    started = true;
    gate.wait();
    if (heartbeats_recover) {
      while (ctx.sleep_for(5s)) {
      }
      noticed = ctx.lease_lost();
    }
    ctx.set_result(R"("zombie")");
  });
  auto id = store.submit(task("victim")).task.id;
  store.heartbeats_down = true;
  worker.start();
  REQUIRE(eventually([&] { return started.load(); }));
  std::this_thread::sleep_for(350ms);  // past the lease
  auto thief = memory.claim(eoq::ClaimRequest{{"default"}, "thief", 1, 10s});
  REQUIRE(thief.size() == 1);
  CHECK(thief[0].task.attempts == 2);
  if (heartbeats_recover) store.heartbeats_down = false;
  gate.release();
  REQUIRE(eventually([&] { return worker.counters().lease_lost == 1; }, 5s));
  store.heartbeats_down = false;
  CHECK(noticed == heartbeats_recover);
  // The zombie's result never lands; the thief's does.
  CHECK(memory.get(id)->status == eoq::TaskStatus::running);
  memory.complete(thief[0], R"("thief")");
  worker.stop();
  auto done = memory.get(id).value();
  CHECK(done.status == eoq::TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"("thief")"));
  auto c = worker.counters();
  CHECK(c.succeeded == 0);
  CHECK(c.lease_lost == 1);
  check_counters_add_up(c);
}

TEST_CASE("a lease lost before its handler starts is skipped", "[worker]") {
  EOQ_EACH_STORE(memory);
  FaultyStore store(memory);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 1;
  options.prefetch = 1;
  options.lease = 200ms;
  eoq::Worker worker(store, options);
  Gate gate;
  std::atomic<int> calls{0};
  worker.on("t", [&](eoq::TaskContext&) {
    ++calls;
    gate.wait();
  });
  auto first = store.submit(task("t")).task.id;
  auto second = store.submit(task("t")).task.id;
  worker.start();
  // first runs, second waits in the buffer; its lease runs out and a rival takes it.
  REQUIRE(eventually([&] { return calls == 1 && status_of(memory, second) == eoq::TaskStatus::running; }));
  store.heartbeats_down = true;
  // Both leases lapse (their expiry, not a sleep, decides when): a rival takes both.
  std::vector<eoq::Lease> rival;
  REQUIRE(eventually([&] {
    for (auto& l : memory.claim(eoq::ClaimRequest{{"default"}, "rival", 5, 10s})) rival.push_back(l);
    return rival.size() == 2;
  }, 30s));
  store.heartbeats_down = false;
  REQUIRE(eventually([&] { return worker.counters().lease_lost >= 1; }));
  gate.release();
  REQUIRE(eventually([&] { return worker.counters().in_flight == 0; }));
  worker.stop();
  CHECK(calls == 1);
  CHECK(worker.counters().lease_lost == 2);
  CHECK(worker.counters().succeeded == 0);
  (void)first;
}

TEST_CASE("an idle worker is woken by a submit, not by its poll interval, and does not poll while idle",
          "[worker]") {
  EOQ_EACH_STORE(inner);
  FaultyStore store(inner);
  LogSink sink;
  auto options = fast_options(sink);
  options.poll_interval = 30s;  // only the wake-up can explain a start well before it
  eoq::Worker worker(store, options);
  std::atomic<int> runs{0};
  worker.on("ping", [&](eoq::TaskContext&) { ++runs; });
  inner.wait_for_tasks({"default"}, 0ms);  // the store listens from now on: no submit goes unheard
  worker.start();
  for (int i = 0; i < 5; ++i) {
    // The claimer found nothing and waits: an event, not a sleep.
    REQUIRE(eventually([&] { return store.idle(); }, 60s));
    const int claims = store.claim_calls;
    auto t0 = std::chrono::steady_clock::now();
    auto id = store.submit(task("ping")).task.id;
    REQUIRE(eventually([&] { return is_done(inner, id); }, 60s));
    CHECK(std::chrono::steady_clock::now() - t0 < 15s);  // the poll would take 30 s
    // One claim takes the task, one more finds the queue empty: a handful, not a busy loop.
    const int after = store.claim_calls;
    CHECK(after - claims <= 4);
  }
  // Idle: no claims at all while nothing is submitted (the poll interval is 30 s).
  REQUIRE(eventually([&] { return store.idle(); }, 60s));
  const int idle_claims = store.claim_calls;
  std::this_thread::sleep_for(500ms);  // a busy claimer would claim hundreds of times here
  CHECK(store.claim_calls == idle_claims);
  worker.stop();
  CHECK(runs == 5);
}

TEST_CASE("an idle worker runs a retry when it comes due, not at the next poll", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.poll_interval = 30s;
  eoq::Worker worker(store, options);
  std::mutex mu;
  std::vector<std::chrono::steady_clock::time_point> runs;
  worker.on("again", [&](eoq::TaskContext& ctx) {
    {
      std::lock_guard lk(mu);
      runs.push_back(std::chrono::steady_clock::now());
    }
    if (ctx.attempt() == 1) throw std::runtime_error("once more");
  });
  auto t = task("again");
  t.retry.backoff = eoq::Backoff::fixed;
  t.retry.initial_delay = 300ms;
  t.retry.jitter = 0;
  auto id = store.submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }, 60s));
  worker.stop();
  std::lock_guard lk(mu);
  REQUIRE(runs.size() == 2);
  auto gap = runs[1] - runs[0];
  CHECK(gap >= 250ms);  // not before the backoff
  CHECK(gap < 15s);     // not at the next poll, 30 s away
}

TEST_CASE("stop() returns promptly on an idle worker", "[worker]") {
  EOQ_EACH_STORE(inner);
  FaultyStore store(inner);
  LogSink sink;
  auto options = fast_options(sink);
  options.poll_interval = 60s;
  eoq::Worker worker(store, options);
  worker.on("x", [](eoq::TaskContext&) {});
  worker.start();
  REQUIRE(eventually([&] { return store.idle(); }, 60s));  // in its 60 s wait
  auto t0 = std::chrono::steady_clock::now();
  worker.stop();
  CHECK(std::chrono::steady_clock::now() - t0 < 30s);  // it did not sit out the wait
  worker.stop();  // idempotent
  CHECK_THROWS_AS(worker.start(), eoq::UsageError);
}

TEST_CASE("run() blocks until stop() is called from another thread", "[worker]") {
  eoq::MemoryStore store;
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  worker.on("x", [](eoq::TaskContext&) {});
  auto id = store.submit(task("x")).task.id;
  std::thread runner([&] { worker.run(); });
  REQUIRE(eventually([&] { return is_done(store, id); }));
  CHECK(worker.running());
  worker.stop();
  runner.join();
  CHECK_FALSE(worker.running());
}

TEST_CASE("a handler may ask its worker to stop", "[worker]") {
  eoq::MemoryStore store;
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::atomic<bool> stopping{false};
  worker.on("shutdown", [&](eoq::TaskContext& ctx) {
    worker.stop();  // from a handler: a request, finished by run()
    stopping = ctx.stopping();
  });
  auto id = store.submit(task("shutdown")).task.id;
  worker.run();
  CHECK(stopping);
  CHECK(store.get(id)->status == eoq::TaskStatus::succeeded);
  CHECK_FALSE(worker.running());
}

// A worker's claims start past the last task of its previous full claim
// (ClaimRequest::after), and every few claims from the front: a task that
// sorts before that place waits a few claims, not until the queue is drained.
TEST_CASE("a more urgent task submitted during a deep drain starts within a few claims", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.claim_batch = 20;
  options.prefetch = 20;
  std::vector<eoq::NewTask> low;
  for (int i = 0; i < 4000; ++i) {
    auto t = task("low");
    t.priority = 10;
    low.push_back(t);
  }
  store.submit_batch(low);
  std::atomic<int> low_runs{0}, low_at_urgent{-1};
  eoq::Worker worker(store, options);
  worker.on("low", [&](eoq::TaskContext&) {
    ++low_runs;
    std::this_thread::sleep_for(200us);
  });
  worker.on("urgent", [&](eoq::TaskContext&) { low_at_urgent = low_runs.load(); });
  worker.start();
  REQUIRE(eventually([&] { return low_runs >= 200; }));
  auto urgent = task("urgent");
  urgent.priority = 0;
  auto id = store.submit(urgent).task.id;
  const int low_at_submit = low_runs;
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  INFO("low-priority tasks run before the urgent one started: " << low_at_urgent - low_at_submit);
  // At most 8 claims of 20, what was held then, and slack; far from the ~3,800 left.
  CHECK(low_at_urgent - low_at_submit < 400);
}

TEST_CASE("stop() during work lets handlers finish, gives buffered leases back, and loses nothing", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 2;
  options.prefetch = 4;
  options.lease = 1000ms;
  options.shutdown_timeout = 30s;
  std::atomic<int> interrupted{0}, started{0};
  std::vector<eoq::TaskId> ids;
  for (int i = 0; i < 10; ++i) ids.push_back(store.submit(task("job")).task.id);
  {
    eoq::Worker worker(store, options);
    worker.on("job", [&](eoq::TaskContext& ctx) {
      // Cooperative: wraps up when told the worker stops.
      ++started;
      if (!ctx.sleep_for(120s)) {
        ++interrupted;
        throw std::runtime_error("interrupted by shutdown");
      }
    });
    worker.start();
    REQUIRE(eventually([&] { return started == 2 && worker.counters().claimed >= 6; }));
    auto t0 = std::chrono::steady_clock::now();
    worker.stop();
    // The handlers were told and wrapped up: stop() sat out neither their 120 s
    // sleep nor the 30 s shutdown_timeout.
    CHECK(std::chrono::steady_clock::now() - t0 < 15s);
    auto c = worker.counters();
    CHECK(c.in_flight == 0);
    CHECK(c.released == 4);  // the prefetched ones
    CHECK(c.retried == 2);   // the interrupted ones
    check_counters_add_up(c);
  }
  CHECK(interrupted == 2);
  // Nothing holds a live lease now: every task is pending or claimable at once.
  for (auto id : ids) {
    auto t = store.get(id).value();
    if (t.status == eoq::TaskStatus::running) CHECK(t.lease_expires_at.value() <= eoq::Clock::now());
  }
  // A second worker picks everything up.
  eoq::Worker second(store, fast_options(sink));
  second.on("job", [](eoq::TaskContext&) {});
  second.start();
  REQUIRE(eventually([&] {
    for (auto id : ids)
      if (!is_done(store, id)) return false;
    return true;
  }, 15s));
  second.stop();
  for (auto id : ids) CHECK(store.get(id)->status == eoq::TaskStatus::succeeded);
}

TEST_CASE("a handler still running at the shutdown deadline loses its lease to the next worker", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 1;
  options.prefetch = 0;
  options.lease = 60s;
  options.shutdown_timeout = 100ms;
  eoq::Worker stubborn(store, options);
  Gate gate;
  std::atomic<bool> started{false}, told{false};
  stubborn.on("job", [&](eoq::TaskContext& ctx) {
    started = true;
    gate.wait();
    told = ctx.lease_lost();
    ctx.set_result(R"("stubborn")");
  });
  auto id = store.submit(task("job")).task.id;
  stubborn.start();
  REQUIRE(eventually([&] { return started.load(); }));
  std::thread stopper([&] { stubborn.stop(); });
  // At the shutdown deadline the lease is given back: a rival takes over at once,
  // long before the 60 s lease would have lapsed.
  std::vector<eoq::Lease> rival;
  auto t0 = std::chrono::steady_clock::now();
  REQUIRE(eventually([&] {
    rival = store.claim(eoq::ClaimRequest{{"default"}, "rival", 1, 10s});
    return !rival.empty();
  }, 45s));
  CHECK(std::chrono::steady_clock::now() - t0 < 30s);
  CHECK(rival[0].task.attempts == 1);  // the interrupted attempt does not count
  store.complete(rival[0], R"("rival")");
  gate.release();
  stopper.join();
  CHECK(told);
  CHECK(store.get(id)->result == std::optional<std::string>(R"("rival")"));
  auto c = stubborn.counters();
  CHECK(c.released == 1);
  CHECK(c.succeeded == 0);
  check_counters_add_up(c);
  CHECK(sink.contains("still running after shutdown_timeout"));
}

TEST_CASE("periodic tasks from three workers produce one task per bucket", "[worker][periodic]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  std::mutex mu;
  std::map<eoq::TaskId, int> runs;
  auto tick = [&](eoq::TaskContext& ctx) {
    std::lock_guard lk(mu);
    ++runs[ctx.id()];
  };
  auto seconds_now = [] {
    return std::chrono::duration_cast<std::chrono::seconds>(eoq::Clock::now().time_since_epoch()).count();
  };
  std::vector<std::unique_ptr<eoq::Worker>> workers;
  for (int i = 0; i < 3; ++i) {
    auto w = std::make_unique<eoq::Worker>(store, fast_options(sink));
    w->on("tick", tick);
    w->every("tick", 1s, task("tick"));
    workers.push_back(std::move(w));
  }
  auto first_bucket = seconds_now();
  for (auto& w : workers) w->start();
  std::this_thread::sleep_for(2500ms);
  auto last_bucket = seconds_now();
  // A restart submits nothing new for a bucket that already has its task.
  workers[0]->stop();
  workers[0] = std::make_unique<eoq::Worker>(store, fast_options(sink));
  workers[0]->on("tick", tick);
  workers[0]->every("tick", 1s, task("tick"));
  workers[0]->start();
  std::this_thread::sleep_for(100ms);
  REQUIRE(eventually([&] {
    eoq::ListQuery q;
    q.type = "tick";
    q.status = eoq::TaskStatus::pending;
    return store.list(q).tasks.empty();
  }));
  for (auto& w : workers) w->stop();
  auto after_stop = seconds_now();

  eoq::ListQuery q;
  q.type = "tick";
  q.limit = 1000;
  auto tasks = store.list(q).tasks;
  std::set<long long> buckets;
  int not_run = 0;
  std::lock_guard lk(mu);
  for (auto& t : tasks) {
    REQUIRE(t.key.has_value());
    REQUIRE(t.key->rfind("periodic:tick:", 0) == 0);
    buckets.insert(std::stoll(t.key->substr(14)));
    if (t.status == eoq::TaskStatus::succeeded) CHECK(runs[t.id] == 1);
    else ++not_run;  // a bucket that began while the workers were stopping
  }
  CHECK(not_run <= 1);
  CHECK(buckets.size() == tasks.size());
  CHECK(*buckets.begin() >= first_bucket);
  CHECK(*buckets.rbegin() <= after_stop);
  // Every bucket in between exactly once.
  CHECK(static_cast<long long>(buckets.size()) == *buckets.rbegin() - *buckets.begin() + 1);
  CHECK(static_cast<long long>(buckets.size()) >= last_bucket - first_bucket + 1);
}

TEST_CASE("periodic registrations are validated", "[worker][periodic]") {
  eoq::MemoryStore store;
  eoq::Worker worker(store);
  CHECK_THROWS_AS(worker.every("bad name", 1s, task("t")), eoq::InvalidArgument);
  CHECK_THROWS_AS(worker.every("zero", 0s, task("t")), eoq::InvalidArgument);
  auto keyed = task("t");
  keyed.key = "mine";
  CHECK_THROWS_AS(worker.every("keyed", 1s, keyed), eoq::InvalidArgument);
  CHECK_THROWS_AS(worker.every("untyped", 1s, eoq::NewTask{}), eoq::InvalidArgument);
  worker.every("ok", 1s, task("t"));
  CHECK_THROWS_AS(worker.every("ok", 2s, task("t")), eoq::InvalidArgument);
}

TEST_CASE("worker options are validated with the field named", "[worker]") {
  eoq::MemoryStore store;
  auto field_of = [&](eoq::WorkerOptions o) -> std::string {
    try {
      eoq::Worker w(store, std::move(o));
    } catch (const eoq::InvalidArgument& e) {
      return e.field();
    }
    return "";
  };
  eoq::WorkerOptions o;
  o.concurrency = 0;
  CHECK(field_of(o) == "concurrency");
  o = {};
  o.lease = 0ms;
  CHECK(field_of(o) == "lease");
  o = {};
  o.heartbeat_interval = o.lease;
  CHECK(field_of(o) == "heartbeat_interval");
  o = {};
  o.claim_batch = 0;
  CHECK(field_of(o) == "claim_batch");
  o = {};
  o.queues = {"bad queue"};
  CHECK(field_of(o) == "queues");
  o = {};
  o.queues = {};
  CHECK(field_of(o) == "queues");
  o = {};
  o.poll_interval = 0ms;
  CHECK(field_of(o) == "poll_interval");
  CHECK(field_of({}) == "");
}

TEST_CASE("handlers and periodic tasks are registered before start", "[worker]") {
  eoq::MemoryStore store;
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  CHECK_THROWS_AS(worker.on("", [](eoq::TaskContext&) {}), eoq::InvalidArgument);
  CHECK_THROWS_AS(worker.on("x", eoq::Handler{}), eoq::InvalidArgument);
  worker.start();
  CHECK_THROWS_AS(worker.on("late", [](eoq::TaskContext&) {}), eoq::UsageError);
  CHECK_THROWS_AS(worker.every("late", 1s, task("t")), eoq::UsageError);
  worker.stop();
}

TEST_CASE("the default worker id is host:pid:random and is the lease owner", "[worker]") {
  eoq::MemoryStore store;
  LogSink sink;
  auto options = fast_options(sink);
  eoq::Worker a(store, options), b(store, options);
  CHECK(a.id() != b.id());
  CHECK(std::count(a.id().begin(), a.id().end(), ':') >= 2);
  CHECK(a.id().find(":" + std::to_string(::getpid()) + ":") != std::string::npos);
  options.worker_id = "w-1";
  eoq::Worker named(store, options);
  CHECK(named.id() == "w-1");
  std::atomic<bool> owner_ok{false};
  named.on("x", [&](eoq::TaskContext& ctx) { owner_ok = ctx.lease().owner == "w-1"; });
  auto id = store.submit(task("x")).task.id;
  named.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  named.stop();
  CHECK(owner_ok);
  CHECK(store.history(id).at(0).owner == "w-1");
}

TEST_CASE("many tasks on two workers with eight handler threads each run exactly once", "[worker][load]") {
  EOQ_EACH_STORE(memory);
  FaultyStore store(memory);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 8;
  options.prefetch = 16;
  options.claim_batch = 50;
  std::mutex mu;
  std::map<eoq::TaskId, int> seen;
  auto handler = [&](eoq::TaskContext& ctx) {
    std::lock_guard lk(mu);
    ++seen[ctx.id()];
  };
  constexpr int n = 3000;
  std::vector<eoq::NewTask> batch(n, task("count"));
  auto submitted = store.submit_batch(batch);
  eoq::Worker a(store, options), b(store, options);
  a.on("count", handler);
  b.on("count", handler);
  a.start();
  b.start();
  REQUIRE(eventually([&] { return a.counters().succeeded + b.counters().succeeded == n; }, 60s));
  a.stop();
  b.stop();
  std::lock_guard lk(mu);
  CHECK(seen.size() == n);
  for (auto& [id, count] : seen) CHECK(count == 1);
  for (auto& r : submitted) CHECK(memory.get(r.task.id)->status == eoq::TaskStatus::succeeded);
  auto ca = a.counters(), cb = b.counters();
  check_counters_add_up(ca);
  check_counters_add_up(cb);
  CHECK(ca.claimed + cb.claimed == n);
  CHECK(ca.handler_runs + cb.handler_runs == n);
  // Busy workers settle many completions per round trip.
  CHECK(store.max_batch_seen > 1);
  CHECK(store.complete_batch_calls < n);
}

TEST_CASE("transient store errors are logged, backed off and survived", "[worker][outage]") {
  EOQ_EACH_STORE(memory);
  FaultyStore store(memory);
  LogSink sink;
  auto options = fast_options(sink);
  options.poll_interval = 30s;  // the recovery below cannot be the poll's doing
  eoq::Worker worker(store, options);
  worker.on("x", [](eoq::TaskContext&) {});
  store.claim_failures = 3;
  store.complete_batch_failures = 2;
  auto id = store.submit(task("x")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  CHECK(store.get(id)->status == eoq::TaskStatus::succeeded);
  CHECK(store.get(id)->attempts == 1);  // the completion was retried, not the task
  CHECK(worker.counters().store_errors >= 5);
  CHECK(sink.contains("injected"));

  // A full outage: everything fails for a while (the worker meets it: its
  // errors climb), then comes back.
  store.everything_down = true;
  const auto errors = worker.counters().store_errors;
  store.wake();
  REQUIRE(eventually([&] { return worker.counters().store_errors >= errors + 3; }, 60s));
  auto t0 = std::chrono::steady_clock::now();
  auto later = memory.submit(task("x")).task.id;
  store.everything_down = false;
  REQUIRE(eventually([&] { return is_done(memory, later); }, 60s));
  // The back-off is capped at 50 ms; the poll would take 30 s.
  CHECK(std::chrono::steady_clock::now() - t0 < 15s);
  worker.stop();
  CHECK(memory.get(later)->status == eoq::TaskStatus::succeeded);
  check_counters_add_up(worker.counters());
}

TEST_CASE("stop() stays prompt while the store is down", "[worker][outage]") {
  EOQ_EACH_STORE(memory);
  FaultyStore store(memory);
  LogSink sink;
  auto options = fast_options(sink);
  // Every back-off after an error is a minute long: stop() must cut it short.
  options.error_backoff_initial = 60s;
  options.error_backoff_max = 60s;
  options.shutdown_timeout = 300ms;
  eoq::Worker worker(store, options);
  worker.on("x", [](eoq::TaskContext&) {});
  auto id = store.submit(task("x")).task.id;
  store.complete_batch_failures = 1000000;  // completions cannot land
  worker.start();
  REQUIRE(eventually([&] { return worker.counters().handler_runs == 1; }, 60s));
  REQUIRE(eventually([&] { return store.complete_batch_calls >= 1; }, 60s));  // the completer backs off
  const auto errors = worker.counters().store_errors;
  store.everything_down = true;
  store.wake();
  REQUIRE(eventually([&] { return worker.counters().store_errors > errors; }, 60s));  // so does the claimer
  auto t0 = std::chrono::steady_clock::now();
  worker.stop();
  CHECK(std::chrono::steady_clock::now() - t0 < 30s);
  auto c = worker.counters();
  CHECK(c.abandoned == 1);
  CHECK(c.in_flight == 0);
  check_counters_add_up(c);
  CHECK(memory.get(id)->status == eoq::TaskStatus::running);  // its lease will lapse; nothing is lost
}

TEST_CASE("maintenance runs now and then and its report is logged", "[worker]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.maintenance_interval = 50ms;
  eoq::Worker worker(store, options);
  auto t = task("x");
  t.deadline = std::chrono::time_point_cast<std::chrono::microseconds>(eoq::Clock::now() + 30ms);
  t.queue = "elsewhere";  // not claimed by this worker, so only maintenance expires it
  auto id = store.submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return status_of(store, id) == eoq::TaskStatus::expired; }, 3s));
  REQUIRE(eventually([&] { return sink.contains("maintenance: 1 expired"); }, 3s));
  worker.stop();
}

TEST_CASE("ctx.transaction() settles through the lease transaction on the memory store", "[worker]") {
  eoq::MemoryStore store;
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::atomic<bool> usage_error{false}, in_tx{false};
  worker.on("tx", [&](eoq::TaskContext& ctx) {
    ctx.transaction();
    in_tx = ctx.in_transaction();
    try {
      ctx.exec("SELECT 1");
    } catch (const eoq::UsageError&) {
      usage_error = true;  // the memory store has no SQL
    }
    ctx.checkpoint("half", R"({"n":1})");
    ctx.set_result(R"({"ok":true})");
  });
  auto id = store.submit(task("tx")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK(in_tx);
  CHECK(usage_error);
  auto done = store.get(id).value();
  CHECK(done.status == eoq::TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"({"ok":true})"));
  CHECK(done.checkpoint_stage == std::optional<std::string>("half"));
}

TEST_CASE("the logger hears about failures and a throwing logger is harmless", "[worker]") {
  eoq::MemoryStore store;
  std::atomic<int> calls{0};
  eoq::WorkerOptions options;
  options.poll_interval = 50ms;
  options.maintenance_interval = 0ms;
  options.logger = [&](eoq::LogLevel, std::string_view) {
    ++calls;
    throw std::runtime_error("logger broke");
  };
  eoq::Worker worker(store, options);
  worker.on("fail", [](eoq::TaskContext&) { throw eoq::PermanentError("nope"); });
  auto id = store.submit(task("fail")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK(calls > 0);
}

// ------------------------------------------------------------------ Postgres only

namespace {

// An effects table in the test's schema, and a way to count its rows.
struct Effects {
  explicit Effects(const eoq::test::TestStore& ts)
      : admin(ts.conninfo()), table("\"" + ts.schema() + "\".effects") {
    admin.exec("CREATE TABLE " + table + " (task_id bigint PRIMARY KEY, attempt int NOT NULL)");
  }
  std::string insert() const { return "INSERT INTO " + table + " (task_id, attempt) VALUES ($1, $2)"; }
  long long count() { return admin.count("SELECT count(*) FROM " + table); }
  long long count_for(eoq::TaskId id) {
    return admin.count("SELECT count(*) FROM " + table + " WHERE task_id = $1", {std::to_string(id)});
  }
  eoq::test::Admin admin;
  std::string table;
};

eoq::Params row_of(const eoq::TaskContext& ctx) {
  return {std::to_string(ctx.id()), std::to_string(ctx.attempt())};
}

}  // namespace

TEST_CASE("a handler's SQL commits in the transaction that completes its task", "[worker][postgres]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  Effects effects(ts);
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  std::atomic<long long> visible_before_commit{-1};
  std::string conninfo = ts.conninfo(), table = effects.table;
  worker.on("write", [&](eoq::TaskContext& ctx) {
    auto r = ctx.exec(effects.insert(), row_of(ctx));
    if (r.affected != 1) throw eoq::PermanentError("insert did not insert");
    // Another connection cannot see the row yet: it commits with the completion.
    eoq::test::Admin other(conninfo);
    visible_before_commit = other.count("SELECT count(*) FROM " + table);
    ctx.set_result(R"({"written":1})");
  });
  auto id = ts->submit(task("write")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(*ts, id); }));
  worker.stop();
  CHECK(visible_before_commit == 0);
  CHECK(ts->get(id)->status == eoq::TaskStatus::succeeded);
  auto result = ts->get(id)->result.value_or("");
  result.erase(std::remove(result.begin(), result.end(), ' '), result.end());  // jsonb spacing
  CHECK(result == R"({"written":1})");
  CHECK(effects.count_for(id) == 1);
}

TEST_CASE("a throwing handler's SQL rolls back and only the successful attempt's commits", "[worker][postgres]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  Effects effects(ts);
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) {
    ctx.exec(effects.insert(), row_of(ctx));
    if (ctx.payload() == R"("permanent")") throw eoq::PermanentError("refused after writing");
    if (ctx.attempt() == 1) throw std::runtime_error("crashed after writing");
  });
  auto t = task("write");
  t.retry.initial_delay = 10ms;
  auto retried = ts->submit(t).task.id;
  t.payload = R"("permanent")";
  auto refused = ts->submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(*ts, retried) && is_done(*ts, refused); }));
  worker.stop();
  CHECK(ts->get(retried)->status == eoq::TaskStatus::succeeded);
  CHECK(ts->get(retried)->attempts == 2);
  CHECK(effects.count_for(retried) == 1);
  CHECK(effects.admin.scalar("SELECT attempt FROM " + effects.table + " WHERE task_id = $1",
                             {std::to_string(retried)}) == std::optional<std::string>("2"));
  CHECK(ts->get(refused)->status == eoq::TaskStatus::failed);
  CHECK(effects.count_for(refused) == 0);
}

TEST_CASE("a handler's SQL rolls back when its lease was lost", "[worker][postgres]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  Effects effects(ts);
  FaultyStore store(*ts);
  LogSink sink;
  auto options = fast_options(sink);
  options.lease = 200ms;
  options.concurrency = 1;
  options.prefetch = 0;
  eoq::Worker worker(store, options);
  Gate gate;
  std::atomic<bool> started{false};
  worker.on("write", [&](eoq::TaskContext& ctx) {
    ctx.exec(effects.insert(), row_of(ctx));
    started = true;
    gate.wait();
  });
  auto id = store.submit(task("write")).task.id;
  store.heartbeats_down = true;
  worker.start();
  REQUIRE(eventually([&] { return started.load(); }));
  std::this_thread::sleep_for(350ms);
  auto thief = ts->claim(eoq::ClaimRequest{{"default"}, "thief", 1, 10s});
  REQUIRE(thief.size() == 1);
  gate.release();
  REQUIRE(eventually([&] { return worker.counters().lease_lost == 1; }));
  worker.stop();
  CHECK(effects.count_for(id) == 0);
  // The new owner's effects are the ones that count.
  auto tx = ts->begin(thief[0]);
  tx->exec(effects.insert(), {std::to_string(id), "2"});
  tx->complete(R"("thief")");
  CHECK(effects.count_for(id) == 1);
  CHECK(ts->get(id)->result == std::optional<std::string>(R"("thief")"));
}

TEST_CASE("a checkpoint in a handler's transaction commits the writes made so far", "[worker][postgres]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  eoq::test::Admin admin(ts.conninfo());
  std::string table = "\"" + ts.schema() + "\".stages";
  admin.exec("CREATE TABLE " + table + " (task_id bigint, stage text, PRIMARY KEY (task_id, stage))");
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  std::atomic<int> stage_one_runs{0};
  worker.on("two-stage", [&](eoq::TaskContext& ctx) {
    auto insert = "INSERT INTO " + table + " VALUES ($1, $2)";
    if (!ctx.checkpoint_stage()) {
      ++stage_one_runs;
      ctx.exec(insert, {std::to_string(ctx.id()), "one"});
      ctx.checkpoint("one", R"({"done":1})");
    }
    ctx.exec(insert, {std::to_string(ctx.id()), "two"});
    if (ctx.attempt() == 1) throw std::runtime_error("stage two crashed");
  });
  auto t = task("two-stage");
  t.retry.initial_delay = 10ms;
  auto id = ts->submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(*ts, id); }));
  worker.stop();
  CHECK(ts->get(id)->status == eoq::TaskStatus::succeeded);
  CHECK(stage_one_runs == 1);
  CHECK(admin.count("SELECT count(*) FROM " + table + " WHERE stage = 'one'") == 1);
  CHECK(admin.count("SELECT count(*) FROM " + table + " WHERE stage = 'two'") == 1);
}

TEST_CASE("a worker rides out a Postgres restart and every effect lands exactly once",
          "[worker][postgres][outage]") {
  eoq::testing::TempPostgresOptions po;
  po.fsync = false;
  eoq::testing::TempPostgres server(po);
  eoq::PostgresOptions o;
  o.conninfo = server.conninfo();
  o.schema = "eoq";
  eoq::PostgresStore pg(o);
  pg.migrate();
  h::Recorder recorder;
  h::RecordingStore store(pg, recorder);
  eoq::test::Admin admin(server.conninfo());
  // No unique constraint: a repeated effect must show up as a duplicate row.
  admin.exec("CREATE TABLE eoq.effects (task_id bigint NOT NULL, version bigint NOT NULL)");
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 6;
  options.lease = 5s;
  eoq::Worker worker(store, options);
  constexpr int n = 400, kHeld = 3;

  // kHeld tasks from the middle of the queue hold their first attempt open
  // after the INSERT until the server has restarted, so the restart surely
  // kills open handler transactions: those attempts' writes must vanish and
  // the tasks must run again.
  std::set<eoq::TaskId> held_ids;
  std::mutex mu;
  std::map<eoq::TaskId, int> runs;                // handler runs per task
  std::map<eoq::TaskId, std::int64_t> held_token;  // the held run's lease token
  std::atomic<int> held{0};
  Gate restarted;
  worker.on("write", [&](eoq::TaskContext& ctx) {
    ctx.exec("INSERT INTO eoq.effects VALUES ($1, $2)", {std::to_string(ctx.id()), std::to_string(ctx.lease().token)});
    recorder.add(h::effect_of(ctx.lease()));
    bool hold = false;
    {
      std::lock_guard lk(mu);
      if (++runs[ctx.id()] == 1 && held_ids.count(ctx.id())) {
        hold = true;
        held_token[ctx.id()] = ctx.lease().token;
      }
    }
    if (hold) {
      ++held;
      restarted.wait(120s);  // the transaction stays open, its INSERT uncommitted
    }
  });
  auto t = task("write");
  t.retry.max_attempts = 20;
  t.retry.initial_delay = 50ms;
  t.retry.max_delay = 200ms;
  std::vector<eoq::NewTask> batch(n, t);
  auto submitted = store.submit_batch(batch);
  for (int i = 0; i < kHeld; ++i) held_ids.insert(submitted[n / 2 + i].task.id);
  worker.start();
  REQUIRE(eventually([&] { return held == kHeld; }, 120s));
  server.restart();
  restarted.release();
  REQUIRE(eventually([&] {
    try {
      auto s = store.stats();
      return !s.empty() && s[0].succeeded == n;
    } catch (const eoq::Error&) {
      return false;
    }
  }, 120s));
  worker.stop();
  eoq::test::Admin after(server.conninfo());
  CHECK(after.count("SELECT count(*) FROM eoq.effects") == n);
  // store_errors may be 0: the store retries safe statements across a restart itself.
  check_counters_add_up(worker.counters());
  {
    std::lock_guard lk(mu);
    REQUIRE(held_token.size() == static_cast<std::size_t>(kHeld));
    for (auto [id, token] : held_token) {
      INFO("held task " << id << ", its first lease's token " << token);
      CHECK(runs[id] >= 2);  // the restart killed the first run; it ran again
      auto done = store.get(id).value();
      CHECK(done.status == eoq::TaskStatus::succeeded);
      // Completed under a later lease (completion sets version = token + 1). The
      // attempt count need not grow: a run the worker gives back does not count.
      CHECK(done.version > token + 1);
      CHECK(after.count("SELECT count(*) FROM eoq.effects WHERE task_id = $1 AND version = $2",
                        {std::to_string(id), std::to_string(token)}) == 0);  // its INSERT died with it
      CHECK(after.count("SELECT count(*) FROM eoq.effects WHERE task_id = $1", {std::to_string(id)}) == 1);
    }
  }

  auto events = recorder.events();
  h::append(events, h::load_postgres(after.get(), "eoq", "effects"));
  auto v = h::verify_and_print("postgres restart", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == n);
  CHECK(v.effects == n);
  CHECK(v.claims > n);  // the killed attempts were claimed again
  CHECK(v.handovers_checked >= kHeld);
  CHECK(v.handovers_unchecked == 0);
}

// --------------------------------------------------------------- worker processes
//
// These start tests/worker_child.cpp as separate processes and kill or freeze
// them. The build passes its path as EOQ_WORKER_CHILD.
#ifdef EOQ_WORKER_CHILD

namespace {

struct ChildWorker {
  eoq::test::Child child;
  std::string name;
};

// What the two multi-process chaos runs below share: a throwaway server of
// their own (their restart must not touch the shared test cluster), a
// migrated schema with the effects and counter tables the crash-mode
// children write (no unique constraint on effects: a repeated effect shows up
// as a duplicate row), and the children, each recording its history beside
// its log in `dir`.
struct ChaosRig {
  static eoq::testing::TempPostgresOptions server_options() {
    eoq::testing::TempPostgresOptions po;
    po.fsync = false;
    return po;
  }
  static eoq::PostgresOptions store_options(const std::string& conninfo, const std::string& schema) {
    eoq::PostgresOptions o;
    o.conninfo = conninfo;
    o.schema = schema;
    return o;
  }
  explicit ChaosRig(std::string name)
      : schema(std::move(name)), server(server_options()), pg(store_options(server.conninfo(), schema)) {
    pg.migrate();
    eoq::test::Admin setup(server.conninfo());
    setup.exec(fmt::format("CREATE TABLE {}.effects (task_id bigint NOT NULL, version bigint NOT NULL)", schema));
    setup.exec(fmt::format("CREATE TABLE {}.counter (n bigint NOT NULL)", schema));
    setup.exec(fmt::format("INSERT INTO {}.counter VALUES (0)", schema));
  }
  ChildWorker start(const std::string& dir, int i, int generation, const std::vector<std::string>& extra = {}) {
    auto name = fmt::format("w{}-{}", i, generation);
    std::vector<std::string> args{EOQ_WORKER_CHILD, "crash", server.conninfo(), schema, dir, "id=" + name,
                                  "history=" + dir + "/" + name + ".history", "lease_ms=1000", "concurrency=4",
                                  "sleep_ms=20"};
    args.insert(args.end(), extra.begin(), extra.end());
    return ChildWorker{eoq::test::spawn_child(args, dir + "/" + name + ".log"), name};
  }

  std::string schema;
  eoq::testing::TempPostgres server;
  eoq::PostgresStore pg;
};

// The chaos both multi-process runs below share: until `ended()` reaches `n`
// (or `within` passes), every `gap` (a random pause in that range) SIGKILLs a
// random child and starts it again, and once a third of the tasks ended
// restarts the server instead (in-flight transactions die with it); then
// stops every child with SIGTERM and expects each to exit cleanly. Returns
// how many children it killed; `restarted` says whether the restart happened.
template <class Start, class Ended>
int kill_children_and_restart(std::vector<ChildWorker>& children, std::vector<int>& generation, Start start,
                              Ended ended, long long n, eoq::testing::TempPostgres& server,
                              std::pair<int, int> gap_ms, std::chrono::seconds within, bool& restarted) {
  std::mt19937 rng(std::random_device{}());
  int kills = 0;
  restarted = false;
  const auto deadline = std::chrono::steady_clock::now() + within;
  for (long long done = 0; done < n && std::chrono::steady_clock::now() < deadline; done = ended()) {
    std::this_thread::sleep_for(Millis(std::uniform_int_distribution<int>(gap_ms.first, gap_ms.second)(rng)));
    if (!restarted && done >= n / 3) {
      server.restart();
      restarted = true;
      continue;
    }
    auto i = static_cast<std::size_t>(std::uniform_int_distribution<int>(0, static_cast<int>(children.size()) - 1)(rng));
    ::kill(children[i].child.pid, SIGKILL);
    CHECK(eoq::test::wait_child(children[i].child, 10s) == 128 + SIGKILL);
    ++kills;
    children[i] = start(static_cast<int>(i), ++generation[i]);
  }
  for (auto& c : children) {
    CHECK(eventually([&] { return eoq::test::read_file(c.child.log).find("ready ") != std::string::npos; }, 20s));
    ::kill(c.child.pid, SIGTERM);
  }
  for (auto& c : children) {
    INFO(c.name << " log:\n" << eoq::test::read_file(c.child.log));
    CHECK(eoq::test::wait_child(c.child, 30s) == 0);
  }
  return kills;
}

ChildWorker start_child(const std::string& mode, const eoq::test::TestStore& ts, const std::string& dir,
                        const std::string& name, std::vector<std::string> extra = {}) {
  std::vector<std::string> argv{EOQ_WORKER_CHILD, mode, ts.conninfo(), ts.schema(), dir, "id=" + name,
                                "history=" + dir + "/" + name + ".history"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return ChildWorker{eoq::test::spawn_child(argv, dir + "/" + name + ".log"), name};
}

// "counters claimed=1 succeeded=0 ..." from a child's log -> {claimed: 1, ...}
std::map<std::string, long long> child_counters(const std::string& log) {
  std::map<std::string, long long> out;
  auto at = log.rfind("counters ");
  if (at == std::string::npos) return out;
  std::string line = log.substr(at + 9, log.find('\n', at) - at - 9);
  std::size_t i = 0;
  while (i < line.size()) {
    auto eq = line.find('=', i);
    auto sp = line.find(' ', i);
    if (eq == std::string::npos) break;
    if (sp == std::string::npos) sp = line.size();
    out[line.substr(i, eq - i)] = std::stoll(line.substr(eq + 1, sp - eq - 1));
    i = sp + 1;
  }
  return out;
}

long long succeeded_in(eoq::TaskStore& store) {
  long long n = 0;
  for (auto& q : store.stats()) n += q.succeeded;
  return n;
}

// The effects table (no unique constraint: a repeated effect must show up as
// a duplicate row) and the counter that crash-mode children write, and n
// tasks of type "effect" submitted through `client` (recorded), with attempts
// enough for every kill to cost the tasks it held one.
void crash_setup(const eoq::test::TestStore& ts, eoq::test::Admin& admin, h::RecordingStore& client, int n) {
  const std::string effects = "\"" + ts.schema() + "\".effects", counter = "\"" + ts.schema() + "\".counter";
  admin.exec("CREATE TABLE " + effects + " (task_id bigint NOT NULL, version bigint NOT NULL)");
  admin.exec("CREATE TABLE " + counter + " (n bigint NOT NULL)");
  admin.exec("INSERT INTO " + counter + " VALUES (0)");
  auto t = task("effect");
  t.retry.max_attempts = 1000;
  t.retry.initial_delay = 10ms;
  t.retry.max_delay = 100ms;
  std::vector<eoq::NewTask> batch(static_cast<std::size_t>(n), t);
  for (std::size_t at = 0; at < batch.size(); at += 1000)
    client.submit_batch(std::span<const eoq::NewTask>(batch).subspan(at, std::min<std::size_t>(1000, batch.size() - at)));
}

// Runs `workers` crash-mode children with `opts`, SIGKILLs one at random every
// 100-400 ms (and starts it again) until the store has n successes or 240 s
// have passed, then stops them all with SIGTERM, checking each exits cleanly.
// Returns the number of kills.
int kill_at_random(const eoq::test::TestStore& ts, const std::string& dir, const std::string& prefix, int workers,
                   long long n, const std::vector<std::string>& opts) {
  std::vector<ChildWorker> children;
  std::vector<int> generation(static_cast<std::size_t>(workers), 0);
  for (int i = 0; i < workers; ++i)
    children.push_back(start_child("crash", ts, dir, prefix + std::to_string(i) + "-0", opts));
  std::mt19937 rng(std::random_device{}());
  int kills = 0;
  auto deadline = std::chrono::steady_clock::now() + 240s;
  while (succeeded_in(*ts) < n && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(Millis(std::uniform_int_distribution<int>(100, 400)(rng)));
    auto i = static_cast<std::size_t>(std::uniform_int_distribution<int>(0, workers - 1)(rng));
    ::kill(children[i].child.pid, SIGKILL);
    CHECK(eoq::test::wait_child(children[i].child, 10s) == 128 + SIGKILL);
    ++kills;
    children[i] = start_child("crash", ts, dir, prefix + std::to_string(i) + "-" + std::to_string(++generation[i]), opts);
  }
  // A child blocks SIGTERM only once it is up; one restarted a moment ago may not be yet.
  for (auto& c : children) {
    CHECK(eventually([&] { return eoq::test::read_file(c.child.log).find("ready ") != std::string::npos; }, 20s));
    ::kill(c.child.pid, SIGTERM);
  }
  for (auto& c : children) {
    INFO(c.name << " log:\n" << eoq::test::read_file(c.child.log));
    CHECK(eoq::test::wait_child(c.child, 30s) == 0);
  }
  return kills;
}

}  // namespace

TEST_CASE("worker processes killed at random lose no task and repeat no effect", "[worker][postgres][process]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  eoq::test::Admin admin(ts.conninfo());
  const std::string effects = "\"" + ts.schema() + "\".effects", counter = "\"" + ts.schema() + "\".counter";
  constexpr int n = 5000, workers = 4;
  h::Recorder parent;
  h::RecordingStore client(*ts, parent);
  crash_setup(ts, admin, client, n);
  auto dir = eoq::test::scratch_dir("worker-crash");
  // No prefetch: the look-ahead is measured, as with WorkerOptions defaults.
  int kills = kill_at_random(ts, dir, "w", workers, n, {"lease_ms=1000", "concurrency=4"});

  INFO("kills: " << kills);
  CHECK(kills >= 10);
  REQUIRE(succeeded_in(*ts) == n);
  CHECK(admin.count("SELECT count(*) FROM " + effects) == n);
  CHECK(admin.count("SELECT count(DISTINCT task_id) FROM " + effects) == n);
  CHECK(admin.scalar("SELECT n FROM " + counter) == std::optional<std::string>(std::to_string(n)));

  // The children's own records end where they were killed; the database's side
  // has every claim, lost lease and effect row.
  auto events = parent.events();
  h::append(events, h::load_logs(dir));
  auto db = h::load_postgres(admin.get(), ts.schema(), "effects");
  h::append(events, db);
  auto v = h::verify_and_print("worker processes killed", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == n);
  CHECK(v.effects == n);
  CHECK(v.claims > n);  // the killed workers' leases were taken over
  CHECK(v.handovers_checked > 0);
  CHECK(v.handovers_unchecked == 0);  // every handover had the times to compare

  // The checks can fail on this very history: a completion by a lease that was
  // lost to a kill, and a second effect row written under it.
  auto lost = std::find_if(db.begin(), db.end(), [](const h::Event& e) { return e.kind == h::Kind::expire; });
  REQUIRE(lost != db.end());
  auto stale = events;
  h::Event zombie;
  zombie.kind = h::Kind::complete;
  zombie.task = lost->task;
  zombie.version = lost->version;
  stale.push_back(zombie);
  auto sv = h::verify_and_print("worker processes killed, with a stale completion added", stale);
  CHECK(sv.count(h::ViolationKind::stale_completion) == 1);
  CHECK(sv.count(h::ViolationKind::double_completion) == 1);

  admin.exec("INSERT INTO " + effects + " (task_id, version) VALUES ($1, $2)",
             {std::to_string(lost->task), std::to_string(lost->version)});
  auto doubled = parent.events();
  h::append(doubled, h::load_logs(dir));
  h::append(doubled, h::load_postgres(admin.get(), ts.schema(), "effects"));
  auto dv = h::verify_and_print("worker processes killed, with a duplicate effect row", doubled);
  REQUIRE(dv.violations.size() == 1);
  CHECK(dv.violations[0].kind == h::ViolationKind::double_effect);
  CHECK(dv.violations[0].task == lost->task);
}

TEST_CASE("batch worker processes killed at random, one task in 37 failing once, lose no task and repeat no effect",
          "[worker][postgres][process][batch]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  eoq::test::Admin admin(ts.conninfo());
  const std::string effects = "\"" + ts.schema() + "\".effects", counter = "\"" + ts.schema() + "\".counter";
  constexpr int n = 3000, workers = 3;
  h::Recorder parent;
  h::RecordingStore client(*ts, parent);
  crash_setup(ts, admin, client, n);
  auto dir = eoq::test::scratch_dir("worker-crash-batch");
  int kills = kill_at_random(ts, dir, "b", workers, n, {"lease_ms=1000", "concurrency=2", "batch=40", "fail_every=37"});

  INFO("kills: " << kills);
  CHECK(kills >= 5);
  REQUIRE(succeeded_in(*ts) == n);
  CHECK(admin.count("SELECT count(*) FROM " + effects) == n);
  CHECK(admin.count("SELECT count(DISTINCT task_id) FROM " + effects) == n);
  CHECK(admin.scalar("SELECT n FROM " + counter) == std::optional<std::string>(std::to_string(n)));
  // Every task that failed once did so after writing: none of those writes committed.
  CHECK(admin.count("SELECT count(*) FROM \"" + ts.schema() + "\".attempts WHERE error LIKE 'injected failure%'") >=
        n / 74);  // most of the n / 37; a kill can take a first attempt before its handler ran
  // The totals stats() sums (eoq.totals, appended in the transactions that the
  // kills cut short and summed by the children's maintenance) agree with a
  // full count of the history.
  auto st = ts->stats();
  REQUIRE(st.size() == 1);
  for (auto [status, kept, ever] : {std::tuple{"succeeded", st[0].succeeded, st[0].succeeded_total},
                                    std::tuple{"failed", st[0].failed, st[0].failed_total},
                                    std::tuple{"cancelled", st[0].cancelled, st[0].cancelled_total},
                                    std::tuple{"expired", st[0].expired, st[0].expired_total}}) {
    INFO(status);
    const auto full = admin.count(
        fmt::format("SELECT count(*) FROM \"{}\".finished WHERE status = '{}'", ts.schema(), status));
    CHECK(kept == full);
    CHECK(ever == full);  // nothing was pruned or retried by hand
  }

  auto events = parent.events();
  h::append(events, h::load_logs(dir));
  h::append(events, h::load_postgres(admin.get(), ts.schema(), "effects"));
  auto v = h::verify_and_print("batch worker processes killed", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == n);
  CHECK(v.effects == n);
  CHECK(v.claims > n);
}

TEST_CASE("a frozen worker's late completion and SQL are rejected after another worker took its task over",
          "[worker][postgres][process]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  eoq::test::Admin admin(ts.conninfo());
  const std::string effects = "\"" + ts.schema() + "\".effects";
  admin.exec("CREATE TABLE " + effects +
             " (task_id bigint NOT NULL, attempt int NOT NULL, owner text NOT NULL, version bigint NOT NULL)");
  h::Recorder parent;
  auto id = h::RecordingStore(*ts, parent).submit(task("effect")).task.id;
  auto dir = eoq::test::scratch_dir("worker-zombie");
  const std::vector<std::string> single{"lease_ms=1000", "concurrency=1", "prefetch=0"};

  auto opts = single;
  opts.push_back("sleep_ms=4000");
  auto zombie = start_child("zombie", ts, dir, "zombie", opts);
  REQUIRE(eventually([&] { return !eoq::test::read_file(dir + "/started-1").empty(); }, 20s));
  ::kill(zombie.child.pid, SIGSTOP);  // mid-handler, its SQL written but not committed
  std::this_thread::sleep_for(1500ms);  // past its lease

  opts = single;
  opts.push_back("sleep_ms=0");
  auto rescuer = start_child("zombie", ts, dir, "rescuer", opts);
  REQUIRE(eventually([&] { return status_of(*ts, id) == eoq::TaskStatus::succeeded; }, 20s));
  ::kill(rescuer.child.pid, SIGTERM);
  CHECK(eoq::test::wait_child(rescuer.child, 30s) == 0);

  ::kill(zombie.child.pid, SIGCONT);
  // It wakes up, finishes its handler and tries to complete: fenced off.
  REQUIRE(eventually([&] { return eoq::test::read_file(zombie.child.log).find("lease lost") != std::string::npos; },
                     20s));
  ::kill(zombie.child.pid, SIGTERM);
  CHECK(eoq::test::wait_child(zombie.child, 30s) == 0);
  auto zc = child_counters(eoq::test::read_file(zombie.child.log));
  INFO("zombie log:\n" << eoq::test::read_file(zombie.child.log));
  CHECK(zc["claimed"] == 1);
  CHECK(zc["succeeded"] == 0);
  CHECK(zc["lease_lost"] == 1);

  auto done = ts->get(id).value();
  CHECK(done.status == eoq::TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"("rescuer")"));
  CHECK(done.attempts == 2);
  auto rows = admin.exec("SELECT attempt, owner FROM " + effects).rows;
  REQUIRE(rows.size() == 1);  // the zombie's insert never committed
  CHECK(rows[0][0] == std::optional<std::string>("2"));
  CHECK(rows[0][1] == std::optional<std::string>("rescuer"));
  auto tries = ts->history(id);
  REQUIRE(tries.size() == 2);
  CHECK(tries[0].owner == "zombie");
  CHECK(tries[0].outcome == "lease_expired");
  CHECK(tries[1].owner == "rescuer");
  CHECK(tries[1].outcome == "succeeded");

  auto events = parent.events();
  h::append(events, h::load_logs(dir));
  h::append(events, h::load_postgres(admin.get(), ts.schema(), "effects"));
  auto v = h::verify_and_print("frozen worker", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == 1);
  CHECK(v.claims == 2);
  CHECK(v.completions == 1);
  CHECK(v.effects == 1);
  CHECK(v.handovers_checked == 1);
  CHECK(v.handovers_unchecked == 0);

  // Had the zombie's late completion gone through, the checker would say so.
  auto claim = std::find_if(events.begin(), events.end(), [](const h::Event& e) {
    return e.kind == h::Kind::claim && e.owner == "zombie";
  });
  REQUIRE(claim != events.end());
  h::Event late;
  late.kind = h::Kind::complete;
  late.task = claim->task;
  late.version = claim->version;
  late.owner = "zombie";
  events.push_back(late);
  auto bad = h::verify_and_print("frozen worker, with a committed completion by the zombie added", events);
  CHECK(bad.has(h::ViolationKind::stale_completion));
  CHECK(bad.has(h::ViolationKind::double_completion));
}

TEST_CASE("a frozen worker holding row locks is cut off by the server so the next owner can proceed",
          "[worker][postgres][process]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  eoq::test::Admin admin(ts.conninfo());
  const std::string effects = "\"" + ts.schema() + "\".effects";
  // The key makes the next owner's insert wait for the frozen owner's uncommitted row.
  admin.exec("CREATE TABLE " + effects +
             " (task_id bigint PRIMARY KEY, attempt int NOT NULL, owner text NOT NULL, version bigint NOT NULL)");
  h::Recorder parent;
  auto id = h::RecordingStore(*ts, parent).submit(task("effect")).task.id;
  auto dir = eoq::test::scratch_dir("worker-locks");

  auto zombie = start_child("zombie", ts, dir, "zombie",
                            {"lease_ms=1000", "concurrency=1", "prefetch=0", "sleep_ms=3000", "idle_timeout_ms=1000"});
  REQUIRE(eventually([&] { return !eoq::test::read_file(dir + "/started-1").empty(); }, 20s));
  ::kill(zombie.child.pid, SIGSTOP);

  auto rescuer = start_child("zombie", ts, dir, "rescuer", {"lease_ms=1000", "concurrency=1", "prefetch=0"});
  // Without the server ending the frozen transaction, this would wait for SIGCONT.
  REQUIRE(eventually([&] { return status_of(*ts, id) == eoq::TaskStatus::succeeded; }, 20s));
  ::kill(rescuer.child.pid, SIGTERM);
  CHECK(eoq::test::wait_child(rescuer.child, 30s) == 0);

  ::kill(zombie.child.pid, SIGCONT);
  // It wakes up, its handler returns and its completion is refused.
  REQUIRE(eventually([&] { return eoq::test::read_file(zombie.child.log).find("lease lost") != std::string::npos; },
                     60s));
  ::kill(zombie.child.pid, SIGTERM);
  CHECK(eoq::test::wait_child(zombie.child, 30s) == 0);
  auto zc = child_counters(eoq::test::read_file(zombie.child.log));
  INFO("zombie log:\n" << eoq::test::read_file(zombie.child.log));
  CHECK(zc["succeeded"] == 0);
  CHECK(zc["lease_lost"] == 1);
  auto rows = admin.exec("SELECT attempt, owner FROM " + effects).rows;
  REQUIRE(rows.size() == 1);
  CHECK(rows[0][1] == std::optional<std::string>("rescuer"));
  CHECK(ts->get(id)->result == std::optional<std::string>(R"("rescuer")"));

  auto events = parent.events();
  h::append(events, h::load_logs(dir));
  h::append(events, h::load_postgres(admin.get(), ts.schema(), "effects"));
  auto v = h::verify_and_print("frozen worker holding locks", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == 1);
  CHECK(v.claims == 2);
  CHECK(v.handovers_checked == 1);
  CHECK(v.handovers_unchecked == 0);
  CHECK(v.effects == 1);
}

TEST_CASE("workflows: worker processes killed and a Postgres restart mid-pipeline never run a dependent early",
          "[worker][postgres][process][workflows]") {
  ChaosRig rig("flows");
  auto& server = rig.server;
  auto& pg = rig.pg;
  const std::string& schema = rig.schema;
  h::Recorder parent;
  h::RecordingStore client(pg, parent);

  // Chains a -> (b, c) -> d, one batch each, parents named by key; every tenth
  // a fails for good, so its b, c and d must end cancelled unrun. A last task
  // waits for every d and runs whatever they did.
  constexpr int chains = 120, failing = chains / 10;
  std::vector<eoq::TaskId> ds;
  for (int i = 0; i < chains; ++i) {
    auto make = [&](const char* stage, std::vector<std::string> parents) {
      auto t = task("effect", i % 10 == 0 && std::string(stage) == "a" ? R"({"fail":true})" : "{}");
      t.key = fmt::format("{}-{}", stage, i);
      t.parent_keys = std::move(parents);
      t.retry.max_attempts = 1000;  // every kill costs the tasks it held an attempt
      t.retry.initial_delay = 10ms;
      t.retry.max_delay = 100ms;
      return t;
    };
    auto a = fmt::format("a-{}", i), b = fmt::format("b-{}", i), c = fmt::format("c-{}", i);
    auto r = client.submit_batch(std::vector<eoq::NewTask>{make("a", {}), make("b", {a}), make("c", {a}),
                                                           make("d", {b, c})});
    ds.push_back(r[3].task.id);
  }
  auto last = task("effect");
  last.parents = ds;
  last.on_parent_failure = eoq::ParentFailure::run;
  last.retry.max_attempts = 1000;
  const auto last_id = client.submit(last).task.id;
  const int n = 4 * chains + 1;

  auto dir = eoq::test::scratch_dir("workflow-chaos");
  auto start = [&](int i, int generation) { return rig.start(dir, i, generation); };
  constexpr int workers = 3;
  std::vector<ChildWorker> children;
  std::vector<int> generation(workers, 0);
  for (int i = 0; i < workers; ++i) children.push_back(start(i, 0));

  auto ended = [&]() -> long long {
    try {
      long long k = 0;
      for (auto& q : pg.stats()) k += q.succeeded + q.failed + q.cancelled;
      return k;
    } catch (const eoq::Error&) {
      return -1;  // the server is restarting
    }
  };
  // Mid-pipeline: handler transactions and settlements in flight die with the restart.
  bool restarted = false;
  const int kills = kill_children_and_restart(children, generation, start, ended, n, server, {150, 400}, 240s,
                                              restarted);

  INFO("kills: " << kills);
  CHECK(restarted);
  CHECK(kills >= 5);
  REQUIRE(ended() == n);
  CHECK(pg.get(last_id)->status == eoq::TaskStatus::succeeded);
  eoq::test::Admin admin(server.conninfo());
  const long long ran = n - 4 * failing;  // every task but the failing chains
  CHECK(admin.count("SELECT count(*) FROM flows.effects") == ran);
  CHECK(admin.count("SELECT count(DISTINCT task_id) FROM flows.effects") == ran);

  auto events = parent.events();
  h::append(events, h::load_logs(dir));
  h::append(events, h::load_postgres(admin.get(), schema, "effects"));
  auto v = h::verify_and_print("workflows with worker kills and a Postgres restart", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == ran);
  CHECK(v.failed == failing);
  CHECK(v.cancelled == 3 * failing);
  CHECK(v.edges_checked == 4 * chains + chains);
  CHECK(v.claims > ran);  // the killed workers' leases were taken over

  // The checks can fail on this very history: a cancelled dependent of a
  // failed parent claimed after all, and one claimed before its parents ended.
  auto doomed = pg.find("default", "d-0").value();
  REQUIRE(doomed.status == eoq::TaskStatus::cancelled);
  auto bad = events;
  h::Event claim;
  claim.kind = h::Kind::claim;
  claim.origin = h::Origin::db;
  claim.task = doomed.id;
  claim.version = 99;
  claim.db_us = h::micros(doomed.created_at);
  bad.push_back(claim);
  auto early = pg.find("default", "d-1").value();
  claim.task = early.id;
  claim.version = early.version + 10;
  claim.db_us = h::micros(early.created_at);
  bad.push_back(claim);
  auto bv = h::verify_and_print("workflows, with a doomed and an early claim added", bad);
  CHECK(bv.count(h::ViolationKind::dependent_ran_after_failed_parent) == 1);
  CHECK(bv.count(h::ViolationKind::dependent_started_early) >= 1);
}


TEST_CASE("limits: worker processes killed and a Postgres restart never run more of a queue or a partition than "
          "its limits",
          "[worker][postgres][process][limits]") {
  ChaosRig rig("lim");
  auto& server = rig.server;
  auto& pg = rig.pg;
  const std::string& schema = rig.schema;
  h::Recorder parent;
  h::RecordingStore client(pg, parent);

  // Twelve handler threads over three workers for six places in the queue, two
  // in each partition: both limits bind all the time. Half the tasks are in
  // one hot partition, which alone could fill the queue; the rest spread over
  // five partitions and none. Every fifth has a deadline within the run, so
  // that some expire waiting (in the queue or a worker's buffer) and others
  // start close to theirs.
  eoq::QueueLimits limits;
  limits.concurrency = 6;
  limits.partition_concurrency = 2;
  client.set_limits("default", limits);
  constexpr int n = 400;
  std::mt19937 rng(std::random_device{}());
  std::vector<eoq::NewTask> batch;
  const auto now = pg.now();
  for (int i = 0; i < n; ++i) {
    auto t = task("effect");
    if (i % 2 == 0) t.partition = "hot";
    else if (i % 7 != 0) t.partition = fmt::format("p{}", i % 5);
    t.retry.max_attempts = 1000;  // every kill costs the tasks it held an attempt
    t.retry.initial_delay = 10ms;
    t.retry.max_delay = 100ms;
    if (i % 5 == 0) t.deadline = now + Millis(std::uniform_int_distribution<int>(1000, 20000)(rng));
    batch.push_back(std::move(t));
  }
  client.submit_batch(batch);

  auto dir = eoq::test::scratch_dir("limits-chaos");
  auto start = [&](int i, int generation) { return rig.start(dir, i, generation, {"sleep_spread_ms=80"}); };
  constexpr int workers = 3;
  std::vector<ChildWorker> children;
  std::vector<int> generation(workers, 0);
  for (int i = 0; i < workers; ++i) children.push_back(start(i, 0));

  auto ended = [&]() -> long long {
    try {
      long long k = 0;
      for (auto& q : pg.stats()) k += q.succeeded + q.failed + q.cancelled + q.expired;
      return k;
    } catch (const eoq::Error&) {
      return -1;  // the server is restarting
    }
  };
  // Leases run out during the restart; heartbeats and settlements in flight die with it.
  bool restarted = false;
  const int kills = kill_children_and_restart(children, generation, start, ended, n, server, {300, 900}, 180s,
                                              restarted);

  INFO("kills: " << kills);
  CHECK(restarted);
  CHECK(kills >= 5);
  REQUIRE(ended() == n);
  eoq::test::Admin admin(server.conninfo());
  const auto succeeded = admin.count("SELECT count(*) FROM lim.finished WHERE status = 'succeeded'");
  CHECK(succeeded + admin.count("SELECT count(*) FROM lim.finished WHERE status = 'expired'") == n);
  CHECK(admin.count("SELECT count(*) FROM lim.effects") == succeeded);
  CHECK(admin.count("SELECT count(DISTINCT task_id) FROM lim.effects") == succeeded);
  CHECK(admin.scalar("SELECT n FROM lim.counter") == std::optional<std::string>(std::to_string(succeeded)));

  auto events = parent.events();
  h::append(events, h::load_logs(dir));
  h::append(events, h::load_postgres(admin.get(), schema, "effects"));
  auto v = h::verify_and_print("limits with worker kills and a Postgres restart", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == succeeded);
  CHECK(v.claims > succeeded);  // the killed workers' leases were taken over
  CHECK(v.handler_starts >= succeeded);
  CHECK(v.deadline_starts_checked > 0);  // handlers started on tasks with deadlines
  // Every run was counted against both limits, and both were reached.
  CHECK(v.limit_starts_checked >= 2 * succeeded);
  CHECK(v.limit_full > 0);

  // The check can fail on this very history: with one place in the hot
  // partition, its pairs of runs are too many.
  auto one = events;
  h::Event tighter;
  tighter.kind = h::Kind::limit;
  tighter.queue = "default";
  tighter.partition = "hot";
  tighter.concurrency = 1;
  one.push_back(tighter);
  auto ov = h::verify_and_print("limits, with one place in the hot partition", one);
  CHECK(ov.count(h::ViolationKind::limit_exceeded) > 0);
  CHECK(ov.violations.size() == static_cast<std::size_t>(ov.count(h::ViolationKind::limit_exceeded)));
}

#endif  // EOQ_WORKER_CHILD

// ------------------------------------------------------------------ pace
// How many leases the worker holds is measured, not configured. Counted here,
// never timed: the speed itself is bench/throughput's business.

TEST_CASE("Worker: with default options many short tasks are claimed in large batches", "[worker][pace]") {
  EOQ_EACH_STORE(inner);
  FaultyStore store(inner);
  const int n = 20000;
  std::vector<eoq::NewTask> tasks(n, task("noop"));
  for (std::size_t i = 0; i < tasks.size(); i += 5000) store.submit_batch(std::span(tasks).subspan(i, 5000));
  std::atomic<int> ran{0};
  LogSink sink;
  eoq::WorkerOptions o;  // the defaults, but for a quiet logger
  o.logger = sink.logger();
  eoq::Worker w(store, o);
  w.on("noop", [&](eoq::TaskContext&) { ++ran; });
  w.start();
  REQUIRE(eventually([&] { return w.counters().succeeded == static_cast<std::uint64_t>(n); }, 120s));
  w.stop();
  CHECK(ran.load() == n);
  INFO("claims: " << store.claim_calls.load() << ", largest completion batch: " << store.max_batch_seen.load());
  // A fixed look-ahead of 4 (the old default) takes at most 8 leases per claim:
  // 2,500 claims or more for these tasks.
  CHECK(store.claim_calls.load() < n / 100);
  // Completions pile up behind a database round trip, so they go in batches;
  // the in-memory store answers too fast for a queue to form.
  if (inner_kind == StoreKind::postgres) CHECK(store.max_batch_seen.load() >= 100);
  check_counters_add_up(w.counters());
}

TEST_CASE("Worker: with default options slow tasks are not hoarded in the buffer", "[worker][pace]") {
  EOQ_EACH_STORE(store);
  const int n = 40;
  std::vector<eoq::NewTask> tasks(n, task("slow"));
  store.submit_batch(tasks);
  LogSink sink;
  eoq::WorkerOptions o;
  o.concurrency = 2;
  o.logger = sink.logger();
  eoq::Worker w(store, o);
  std::atomic<std::uint64_t> most{0};
  w.on("slow", [&](eoq::TaskContext& ctx) {
    auto held = w.counters().in_flight;
    auto prev = most.load();
    while (prev < held && !most.compare_exchange_weak(prev, held)) {
    }
    ctx.sleep_for(50ms);
  });
  w.start();
  REQUIRE(eventually([&] { return w.counters().succeeded == static_cast<std::uint64_t>(n); }, 60s));
  w.stop();
  // Two running and a spare or a few: what the handlers finish during two claim
  // round trips. A worker tuned for short tasks (a fixed look-ahead of hundreds)
  // would hold all 40 and leave other workers idle.
  INFO("most leases held at once: " << most.load());
  CHECK(most.load() <= 8);
  check_counters_add_up(w.counters());
}

// ---------------------------------------------------------------------------
// Deadlines behind the buffer, Cancelled, the Scheduler

TEST_CASE("a task whose deadline passes while it waits in the prefetch buffer ends expired and never starts",
          "[worker][deadline]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 1;
  options.prefetch = 4;
  eoq::Worker worker(store, options);
  Gate gate;
  std::atomic<int> slow_started{0}, late_calls{0};
  worker.on("slow", [&](eoq::TaskContext&) {
    ++slow_started;
    gate.wait();
  });
  worker.on("late", [&](eoq::TaskContext&) { ++late_calls; });

  auto slow = store.submit(task("slow")).task.id;
  REQUIRE(slow > 0);
  worker.start();
  REQUIRE(eventually([&] { return slow_started.load() == 1; }));
  auto late_task = task("late");
  late_task.deadline = eoq::test::now() + 500ms;
  auto late = store.submit(late_task).task.id;
  // Claimed into the buffer before its deadline: the only handler is busy.
  REQUIRE(eventually([&] { return worker.counters().claimed == 2; }, 400ms));
  CHECK(status_of(store, late) == eoq::TaskStatus::running);
  std::this_thread::sleep_until(std::chrono::system_clock::now() + (*late_task.deadline - eoq::test::now()) + 100ms);
  gate.release();

  REQUIRE(eventually([&] { return is_done(store, late) && is_done(store, slow); }));
  worker.stop();
  CHECK(late_calls.load() == 0);
  auto got = store.get(late).value();
  CHECK(got.status == eoq::TaskStatus::expired);
  CHECK(got.last_error == std::optional<std::string>("deadline passed"));
  auto h = store.history(late);
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "expired");
  CHECK(status_of(store, slow) == eoq::TaskStatus::succeeded);
  auto c = worker.counters();
  CHECK(c.expired == 1);
  CHECK(c.succeeded == 1);
  check_counters_add_up(c);
  CHECK(sink.contains("deadline passed while it waited for a handler"));
}

TEST_CASE("a buffered task whose deadline has not passed runs when a handler frees up", "[worker][deadline]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 1;
  options.prefetch = 4;
  eoq::Worker worker(store, options);
  Gate gate;
  std::atomic<int> slow_started{0}, later_calls{0};
  worker.on("slow", [&](eoq::TaskContext&) {
    ++slow_started;
    gate.wait();
  });
  worker.on("later", [&](eoq::TaskContext&) { ++later_calls; });
  store.submit(task("slow"));
  worker.start();
  REQUIRE(eventually([&] { return slow_started.load() == 1; }));
  auto t = task("later");
  t.deadline = eoq::test::now() + 60s;
  auto id = store.submit(t).task.id;
  REQUIRE(eventually([&] { return worker.counters().claimed == 2; }));
  std::this_thread::sleep_for(200ms);
  gate.release();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK(later_calls.load() == 1);
  CHECK(status_of(store, id) == eoq::TaskStatus::succeeded);
  CHECK(worker.counters().expired == 0);
}

// The hand-off rule at its edge, with no wait for a deadline: each lease says
// its claim read the store's clock 1 us before the task's deadline, so by the
// time a handler is free the deadline has passed by the claim's clock plus the
// wait. The worker must then ask the store (expire_if_overdue) before starting
// the handler, and start nothing when the store cannot be asked. (The rows keep
// a deadline an hour away, so a store that is asked says "not overdue".)
TEST_CASE("hand-off: a task past its deadline by the claim's clock starts only once the store said it is not "
          "overdue, and never while the store cannot be asked",
          "[worker][deadline][outage]") {
  EOQ_EACH_STORE(inner);
  FaultyStore store(inner);
  store.claims_at_deadline = true;
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 1;
  eoq::Worker worker(store, options);
  std::mutex mu;
  std::vector<std::pair<eoq::TaskId, bool>> starts;  // the task, and whether the store was asked first
  worker.on("due", [&](eoq::TaskContext& ctx) {
    std::lock_guard lk(mu);
    starts.emplace_back(ctx.id(), store.expire_asked(ctx.id()));
  });
  constexpr int kTasks = 5;
  std::vector<eoq::TaskId> ids;
  for (int i = 0; i < kTasks; ++i) {
    auto t = task("due");
    t.deadline = eoq::test::now() + std::chrono::hours(1);
    ids.push_back(inner.submit(t).task.id);
  }

  SECTION("the store cannot be asked: no handler starts, each lease is left to run out") {
    store.expire_down = true;
    worker.start();
    // Each task ends its hand-off one way or the other: abandoned, or run.
    REQUIRE(eventually([&] {
      auto c = worker.counters();
      return c.abandoned + c.handler_runs >= static_cast<std::uint64_t>(kTasks);
    }));
    worker.stop();
    auto c = worker.counters();
    CHECK(c.handler_runs == 0);
    CHECK(c.abandoned >= static_cast<std::uint64_t>(kTasks));
    CHECK(c.succeeded == 0);
    check_counters_add_up(c);
    CHECK(store.expire_calls.load() >= kTasks);
    {
      std::lock_guard lk(mu);
      CHECK(starts.empty());
    }
    CHECK(sink.contains("expiring at its deadline"));
    // Not started and not settled: each still holds the lease the store never heard back on.
    for (auto id : ids) CHECK(status_of(inner, id) == eoq::TaskStatus::running);
  }
  SECTION("the store answers: every handler starts after the store was asked") {
    worker.start();
    REQUIRE(eventually([&] { return worker.counters().succeeded == static_cast<std::uint64_t>(kTasks); }));
    worker.stop();
    std::lock_guard lk(mu);
    REQUIRE(starts.size() == static_cast<std::size_t>(kTasks));
    for (auto& [id, asked] : starts) {
      INFO("task " << id);
      CHECK(asked);
    }
    CHECK(worker.counters().expired == 0);
    for (auto id : ids) CHECK(status_of(inner, id) == eoq::TaskStatus::succeeded);
  }
}

TEST_CASE("a handler that throws Cancelled after a cancel request ends its task cancelled, logged at info only",
          "[worker][cancel]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.lease = 600ms;  // heartbeats every 200 ms carry the cancel request
  eoq::Worker worker(store, options);
  std::atomic<bool> started{false};
  worker.on("long", [&](eoq::TaskContext& ctx) {
    started = true;
    while (ctx.sleep_for(10s)) {
    }
    if (ctx.cancelled()) throw eoq::Cancelled{};
  });
  worker.on("unwanted", [](eoq::TaskContext&) { throw eoq::Cancelled("the to-do is gone"); });
  worker.on("bad-input", [](eoq::TaskContext&) { throw eoq::PermanentError("payload names no user"); });
  auto id = store.submit(task("long")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return started.load(); }));
  CHECK(store.cancel(id) == eoq::CancelOutcome::cancel_requested);
  auto unwanted = store.submit(task("unwanted")).task.id;
  auto bad = store.submit(task("bad-input")).task.id;
  REQUIRE(eventually([&] { return is_done(store, id) && is_done(store, unwanted) && is_done(store, bad); }));
  worker.stop();

  CHECK(status_of(store, id) == eoq::TaskStatus::cancelled);
  CHECK(status_of(store, unwanted) == eoq::TaskStatus::cancelled);
  CHECK(store.history(unwanted).at(0).error == std::optional<std::string>("the to-do is gone"));
  CHECK(status_of(store, bad) == eoq::TaskStatus::failed);
  auto c = worker.counters();
  CHECK(c.cancelled == 2);
  CHECK(c.failed == 1);
  CHECK(c.retried == 0);
  std::lock_guard lk(sink.mu);
  for (auto& [level, line] : sink.lines) {
    INFO(line);
    CHECK(level < eoq::LogLevel::warning);
  }
}

// ---------------------------------------------------------------------------
// The Scheduler on its own

namespace {
std::vector<eoq::Task> periodic_tasks(eoq::TaskStore& store, const std::string& name) {
  std::vector<eoq::Task> out;
  for (auto& t : store.list(eoq::ListQuery{.limit = 1000}).tasks)
    if (t.key && t.key->starts_with("periodic:" + name + ":")) out.push_back(t);
  return out;
}
std::int64_t bucket_of(const eoq::Task& t) { return std::stoll(t.key->substr(t.key->rfind(':') + 1)); }
std::int64_t seconds_of(eoq::TimePoint t) {
  return std::chrono::floor<std::chrono::seconds>(t.time_since_epoch()).count();
}
}  // namespace

TEST_CASE("a Scheduler alone submits the bucket of the store's clock, once, and claims nothing",
          "[worker][scheduler]") {
  EOQ_EACH_STORE(inner);
  FaultyStore store(inner);
  // The store's clock runs a whole period ahead of this machine's: a scheduler
  // that read the local clock would name the previous bucket.
  constexpr std::int64_t period = 3600;
  store.clock_offset_us = period * 1000000;
  LogSink sink;
  eoq::Scheduler scheduler(store, {.logger = sink.logger(), .log_level = eoq::LogLevel::debug});
  scheduler.every("hourly", std::chrono::seconds(period), task("report"));

  auto before = store.now();
  auto wait = scheduler.tick();
  auto after = store.now();
  auto made = periodic_tasks(inner, "hourly");
  REQUIRE(made.size() == 1);
  auto b = bucket_of(made[0]);
  auto bucket_at = [&](eoq::TimePoint t) { return seconds_of(t) - seconds_of(t) % period; };
  CHECK((b == bucket_at(before) || b == bucket_at(after)));
  CHECK(b != bucket_at(eoq::test::now()));
  // Until the next bucket by the store's clock, as the tick read it (between before and after).
  auto next = std::chrono::seconds(b + period);
  CHECK(wait.count() > 0);
  CHECK(wait <= std::chrono::ceil<Millis>(next - before.time_since_epoch()) + 1ms);
  CHECK(wait >= std::chrono::floor<Millis>(next - after.time_since_epoch()));

  // Again, and a second scheduler (another process): still one task.
  scheduler.tick();
  eoq::Scheduler other(store, {.logger = sink.logger()});
  other.every("hourly", std::chrono::seconds(period), task("report"));
  other.tick();
  CHECK(periodic_tasks(inner, "hourly").size() == 1);

  // Run on its own thread: no claim, ever.
  scheduler.start();
  std::this_thread::sleep_for(100ms);
  scheduler.stop();
  CHECK(store.claim_calls.load() == 0);
  CHECK_FALSE(scheduler.running());
  CHECK_THROWS_AS(scheduler.start(), eoq::UsageError);
}

TEST_CASE("a Scheduler thread submits each bucket as it begins by the store's clock", "[worker][scheduler]") {
  EOQ_EACH_STORE(inner);
  FaultyStore store(inner);
  LogSink sink;
  eoq::Scheduler scheduler(store, {.logger = sink.logger()});
  scheduler.every("tick", std::chrono::seconds(1), task("t"));
  scheduler.start();
  REQUIRE(eventually([&] { return periodic_tasks(inner, "tick").size() >= 3; }, 6s));
  scheduler.stop();
  auto made = periodic_tasks(inner, "tick");
  std::set<std::int64_t> buckets;
  for (auto& t : made) {
    buckets.insert(bucket_of(t));
    // Never before its bucket began by the store's clock.
    CHECK(seconds_of(t.created_at) >= bucket_of(t));
  }
  CHECK(buckets.size() == made.size());
}

TEST_CASE("with catch_up a Scheduler submits one task for the buckets missed while none ran", "[worker][scheduler]") {
  EOQ_EACH_STORE(store);
  constexpr std::int64_t period = 600;
  const auto now_s = seconds_of(store.now());
  const auto current = now_s - now_s % period;
  auto earlier = [&](const std::string& name, std::int64_t bucket) {
    auto t = task("digest");
    t.key = "periodic:" + name + ":" + std::to_string(bucket);
    store.submit(t);
  };
  LogSink sink;
  auto make = [&](bool catch_up) {
    return std::make_unique<eoq::Scheduler>(store, eoq::SchedulerOptions{.catch_up = catch_up,
                                                                         .logger = sink.logger()});
  };

  SECTION("three buckets missed: one task for the latest of them, then the current one") {
    earlier("digest", current - 4 * period);
    auto s = make(true);
    s->every("digest", std::chrono::seconds(period), task("digest"));
    s->tick();
    std::set<std::int64_t> buckets;
    for (auto& t : periodic_tasks(store, "digest")) buckets.insert(bucket_of(t));
    CHECK(buckets == std::set<std::int64_t>{current - 4 * period, current - period, current});
    CHECK(sink.contains("were missed"));
    // A second scheduler starting now catches up nothing new.
    auto again = make(true);
    again->every("digest", std::chrono::seconds(period), task("digest"));
    again->tick();
    CHECK(periodic_tasks(store, "digest").size() == 3);
  }
  SECTION("off by default: missed buckets stay missed") {
    earlier("digest", current - 4 * period);
    auto s = make(false);
    s->every("digest", std::chrono::seconds(period), task("digest"));
    s->tick();
    CHECK(periodic_tasks(store, "digest").size() == 2);
  }
  SECTION("nothing missed, or nothing known: no catch-up") {
    earlier("digest", current - period);
    auto s = make(true);
    s->every("digest", std::chrono::seconds(period), task("digest"));
    s->every("fresh", std::chrono::seconds(period), task("digest"));
    s->tick();
    CHECK(periodic_tasks(store, "digest").size() == 2);
    CHECK(periodic_tasks(store, "fresh").size() == 1);
  }
}

TEST_CASE("with catch_up a Scheduler catches up exactly one missed bucket, the commonest outage",
          "[worker][scheduler]") {
  EOQ_EACH_STORE(inner);
  FaultyStore store(inner);
  constexpr std::int64_t period = 600;
  // The store's clock set to the middle of a bucket, so no bucket boundary
  // falls between reading it here and the scheduler's tick.
  const auto real = seconds_of(inner.now());
  const auto current = real - real % period;
  store.clock_offset_us = (current + period / 2 - real) * 1000000;
  const auto mid = seconds_of(store.now()) - current;
  REQUIRE(mid >= period / 2);
  REQUIRE(mid < period / 2 + 60);
  auto earlier = [&](const std::string& name, std::int64_t bucket) {
    auto t = task("digest");
    t.key = "periodic:" + name + ":" + std::to_string(bucket);
    store.submit(t);
  };
  LogSink sink;
  // One bucket missed (the scheduler was down across one boundary), and for
  // contrast one where nothing was missed.
  earlier("digest", current - 2 * period);
  earlier("steady", current - period);
  eoq::Scheduler s(store, {.catch_up = true, .logger = sink.logger()});
  s.every("digest", std::chrono::seconds(period), task("digest"));
  s.every("steady", std::chrono::seconds(period), task("digest"));
  s.tick();
  auto buckets = [&](const std::string& name) {
    std::set<std::int64_t> out;
    for (auto& t : periodic_tasks(inner, name)) out.insert(bucket_of(t));
    return out;
  };
  CHECK(buckets("digest") == std::set<std::int64_t>{current - 2 * period, current - period, current});
  CHECK(buckets("steady") == std::set<std::int64_t>{current - period, current});
  CHECK(sink.contains(fmt::format("buckets {} to {} were missed", current - period, current - period)));
}

TEST_CASE("a Scheduler refuses bad registrations naming the field", "[worker][scheduler]") {
  eoq::MemoryStore store;
  eoq::Scheduler s(store);
  auto field = [&](eoq::PeriodicTask p) {
    try {
      s.every(std::move(p));
    } catch (const eoq::InvalidArgument& e) {
      return e.field();
    }
    return std::string("no exception");
  };
  CHECK(field({"bad name", std::chrono::seconds(60), task("t")}) == "name");
  CHECK(field({"ok", std::chrono::seconds(0), task("t")}) == "period");
  auto keyed = task("t");
  keyed.key = "k";
  CHECK(field({"ok", std::chrono::seconds(60), keyed}) == "key");
  CHECK(field({"ok", std::chrono::seconds(60), task("")}) == "type");
  CHECK(s.empty());
  s.every("ok", std::chrono::seconds(60), task("t"));
  CHECK(field({"ok", std::chrono::seconds(60), task("t")}) == "name");
  CHECK_FALSE(s.empty());
}

// ------------------------------------------------------------ batches (HandlerOptions::batch)
//
// A batch runs its tasks' handlers one after another in one transaction and
// commits their completions together. The handlers below record the id of the
// transaction each run wrote in (txid_current()), so a test can tell which runs
// shared a transaction and check that a transaction rolled back left nothing.

namespace {

// An effects table for batch handlers: one row per handler run that commits,
// with the attempt and the transaction it was written in. No unique
// constraint: a repeated effect shows up as a second row.
struct BatchEffects {
  explicit BatchEffects(const eoq::test::TestStore& ts) : admin(ts.conninfo()), table("\"" + ts.schema() + "\".effects") {
    admin.exec("CREATE TABLE " + table + " (task_id bigint NOT NULL, attempt int NOT NULL, txid bigint NOT NULL)");
  }
  // Writes the task's row in the handler's transaction; returns that transaction's id.
  std::int64_t write(eoq::TaskContext& ctx) const {
    return ctx
        .exec("INSERT INTO " + table + " (task_id, attempt, txid) VALUES ($1, $2, txid_current()) RETURNING txid",
              {ctx.id(), ctx.attempt()})
        .scalar<std::int64_t>();
  }
  long long count() { return admin.count("SELECT count(*) FROM " + table); }
  long long count_for(eoq::TaskId id) {
    return admin.count("SELECT count(*) FROM " + table + " WHERE task_id = $1", {std::to_string(id)});
  }
  long long count_in(std::int64_t txid) {
    return admin.count("SELECT count(*) FROM " + table + " WHERE txid = $1", {std::to_string(txid)});
  }
  std::optional<std::string> attempt_of(eoq::TaskId id) {
    return admin.scalar("SELECT attempt FROM " + table + " WHERE task_id = $1", {std::to_string(id)});
  }
  eoq::test::Admin admin;
  std::string table;
};

// Every handler run: its task, attempt and transaction (0: none).
struct BatchRun {
  eoq::TaskId id = 0;
  int attempt = 0;
  std::int64_t txid = 0;
};
struct RunLog {
  std::mutex mu;
  std::vector<BatchRun> runs;
  void add(const eoq::TaskContext& ctx, std::int64_t txid) {
    std::lock_guard lk(mu);
    runs.push_back({ctx.id(), ctx.attempt(), txid});
  }
  std::vector<BatchRun> all() {
    std::lock_guard lk(mu);
    return runs;
  }
  // Runs of other tasks than `id` in transaction `txid`.
  std::size_t others_in(std::int64_t txid, eoq::TaskId id) {
    std::lock_guard lk(mu);
    return static_cast<std::size_t>(
        std::count_if(runs.begin(), runs.end(), [&](const BatchRun& r) { return r.txid == txid && r.id != id; }));
  }
  std::size_t runs_of(eoq::TaskId id) {
    std::lock_guard lk(mu);
    return static_cast<std::size_t>(std::count_if(runs.begin(), runs.end(), [&](const BatchRun& r) { return r.id == id; }));
  }
};

bool all_done(eoq::TaskStore& store, const std::vector<eoq::SubmitResult>& submitted) {
  for (const auto& s : submitted)
    if (!is_done(store, s.task.id)) return false;
  return true;
}

eoq::QueueStats queue_stats(eoq::TaskStore& store, const std::string& queue = "default") {
  for (auto& s : store.stats())
    if (s.queue == queue) return s;
  return {};
}

}  // namespace

TEST_CASE("batch: a throwing handler rolls its batch back, is settled alone by its verdict, and the others commit once",
          "[worker][postgres][batch]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  RunLog log;  // before the worker, which its handler must not outlive
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) {
    auto txid = fx.write(ctx);
    // Only a task's first run sets a result: a run again starts afresh, so a
    // result must never outlive the rolled-back run that set it.
    if (log.runs_of(ctx.id()) == 0) ctx.set_result(fmt::format(R"({{"txid": {}}})", txid));
    log.add(ctx, txid);
    const auto& p = ctx.payload();
    if (p == R"("fails")") throw std::runtime_error("refused after writing");
    if (p == R"("retries")" && ctx.attempt() == 1) throw std::runtime_error("crashed after writing");
    if (p == R"("permanent")") throw eoq::PermanentError("bad input, after writing");
    if (p == R"("cancels")") throw eoq::Cancelled("not wanted, after writing");
  }, {.batch = 50});
  constexpr int n = 100;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  for (auto& t : tasks) {
    t.retry.max_attempts = 3;
    t.retry.initial_delay = 10ms;
    t.retry.max_delay = 20ms;
  }
  const std::map<int, std::string> culprits{{7, "fails"}, {30, "retries"}, {61, "permanent"}, {88, "cancels"}};
  for (const auto& [i, p] : culprits) tasks[i].payload = "\"" + p + "\"";
  tasks[7].retry.max_attempts = 1;  // its one failure is final
  auto submitted = ts->submit_batch(tasks);
  auto id_of = [&](int i) { return submitted[static_cast<std::size_t>(i)].task.id; };
  worker.start();
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 30s));
  worker.stop();

  for (int i = 0; i < n; ++i) {
    if (culprits.count(i)) continue;
    auto t = ts->get(id_of(i)).value();
    INFO("task " << t.id);
    CHECK(t.status == eoq::TaskStatus::succeeded);
    CHECK(t.attempts == 1);
    CHECK(fx.count_for(t.id) == 1);
  }
  auto fails = ts->get(id_of(7)).value();
  CHECK(fails.status == eoq::TaskStatus::failed);
  CHECK(fails.attempts == 1);
  CHECK(fails.last_error.value_or("").find("refused after writing") != std::string::npos);
  CHECK(fx.count_for(fails.id) == 0);
  auto retries = ts->get(id_of(30)).value();
  CHECK(retries.status == eoq::TaskStatus::succeeded);
  CHECK(retries.attempts == 2);
  CHECK(fx.count_for(retries.id) == 1);
  CHECK(fx.attempt_of(retries.id) == std::optional<std::string>("2"));  // the first attempt's row rolled back
  auto permanent = ts->get(id_of(61)).value();
  CHECK(permanent.status == eoq::TaskStatus::failed);
  CHECK(permanent.attempts == 1);  // max_attempts 3, but a PermanentError does not retry
  CHECK(fx.count_for(permanent.id) == 0);
  auto cancels = ts->get(id_of(88)).value();
  CHECK(cancels.status == eoq::TaskStatus::cancelled);
  CHECK(fx.count_for(cancels.id) == 0);
  CHECK(fx.count() == n - 3);
  CHECK(fx.admin.count("SELECT count(DISTINCT task_id) FROM " + fx.table) == n - 3);

  // A task's result is its committed run's, or null (a run again that set none).
  std::map<eoq::TaskId, std::string> committed_txid;
  for (const auto& row : fx.admin.exec("SELECT task_id, txid FROM " + fx.table).rows)
    committed_txid[std::stoll(row[0].value())] = row[1].value();
  for (const auto& s : submitted) {
    auto t = ts->get(s.task.id).value();
    if (t.status != eoq::TaskStatus::succeeded) continue;
    INFO("task " << t.id << " result " << t.result.value_or("(none)") << ", committed in transaction "
                 << committed_txid[t.id] << ", runs " << log.runs_of(t.id));
    CHECK((t.result.value_or("null") == "null" || t.result == fmt::format(R"({{"txid": {}}})", committed_txid[t.id])));
  }

  // Each failing run's transaction left nothing behind, though other tasks'
  // runs had written in it before the handler threw.
  std::size_t shared = 0;
  for (const auto& r : log.all()) {
    auto it = std::find_if(culprits.begin(), culprits.end(), [&](const auto& c) { return id_of(c.first) == r.id; });
    if (it == culprits.end() || (it->second == "retries" && r.attempt == 2)) continue;
    INFO("failing run of task " << r.id << " (" << it->second << ") in transaction " << r.txid);
    CHECK(fx.count_in(r.txid) == 0);
    shared += log.others_in(r.txid, r.id);
  }
  CHECK(shared > 0);
  // Batches: the committed rows came from a few transactions, not one per task.
  CHECK(fx.admin.count("SELECT count(DISTINCT txid) FROM " + fx.table) <= 10);

  auto c = worker.counters();
  CHECK(c.claimed == n + 1);  // the retry's second claim
  CHECK(c.succeeded == n - 3);
  CHECK(c.failed == 2);
  CHECK(c.retried == 1);
  CHECK(c.cancelled == 1);
  CHECK(c.lease_lost == 0);
  CHECK(c.in_flight == 0);
  CHECK(c.handler_runs > c.claimed);  // the culprits' companions ran again
  check_counters_add_up(c);
}

TEST_CASE("batch: a handler that swallows a failed statement fails its task, and the others commit once",
          "[worker][postgres][batch]") {
  // 1: the same rule without batches, each task in a transaction of its own.
  const int batch = GENERATE(50, 1);
  INFO("HandlerOptions::batch = " << batch);
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  RunLog log;
  std::atomic<int> swallowed{0}, not_database_errors{0};
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) {
    log.add(ctx, fx.write(ctx));
    if (ctx.payload() != R"("breaks")") return;
    try {
      ctx.exec("SELECT * FROM no_such_table_anywhere");
    } catch (const eoq::DatabaseError&) {
      ++swallowed;  // and returns as if all went well
    } catch (...) {
      ++not_database_errors;
    }
  }, {.batch = batch});
  constexpr int n = 60, breaker = 20;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  tasks[breaker].payload = R"("breaks")";
  tasks[breaker].retry.max_attempts = 2;
  tasks[breaker].retry.initial_delay = 10ms;
  auto submitted = ts->submit_batch(tasks);
  const auto broken = submitted[breaker].task.id;
  worker.start();
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 20s));
  worker.stop();

  // Once per attempt; in a batch maybe more (the attempt runs again alone).
  CHECK((batch == 1 ? swallowed.load() == 2 : swallowed.load() >= 2));
  CHECK(not_database_errors == 0);
  auto b = ts->get(broken).value();
  CHECK(b.status == eoq::TaskStatus::failed);
  CHECK(b.attempts == 2);
  CHECK(fx.count_for(broken) == 0);
  for (int i = 0; i < n; ++i) {
    if (i == breaker) continue;
    auto t = ts->get(submitted[i].task.id).value();
    INFO("task " << t.id);
    CHECK(t.status == eoq::TaskStatus::succeeded);
    CHECK(t.attempts == 1);
    CHECK(fx.count_for(t.id) == 1);
  }
  CHECK(fx.count() == n - 1);
  for (const auto& r : log.all())
    if (r.id == broken) CHECK(fx.count_in(r.txid) == 0);
  auto c = worker.counters();
  CHECK(c.claimed == n + 1);
  CHECK(c.succeeded == n - 1);
  CHECK(c.retried == 1);
  CHECK(c.failed == 1);
  CHECK(c.in_flight == 0);
  check_counters_add_up(c);
}

TEST_CASE("batch: a lease stolen mid-batch is counted lost, its writes never commit, and the others commit once",
          "[worker][postgres][batch]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  FaultyStore store(*ts);
  LogSink sink;
  auto options = fast_options(sink);
  options.queues = {"default", "steal"};  // the victim alone in "steal", where the thief claims
  options.lease = 300ms;
  options.concurrency = 1;
  options.prefetch = 0;
  RunLog log;
  Gate gate;
  std::atomic<bool> victim_started{false};
  std::atomic<eoq::TaskId> victim{0};
  eoq::Worker worker(store, options);
  worker.on("write", [&](eoq::TaskContext& ctx) {
    log.add(ctx, fx.write(ctx));
    if (ctx.id() == victim.load() && !victim_started.exchange(true)) gate.wait();
  }, {.batch = 50});
  constexpr int before = 10, after = 10;
  std::vector<eoq::TaskId> others;
  for (int i = 0; i < before; ++i) others.push_back(store.submit(task("write")).task.id);
  auto v = task("write");
  v.queue = "steal";
  victim = store.submit(v).task.id;
  for (int i = 0; i < after; ++i) others.push_back(store.submit(task("write")).task.id);
  // No heartbeats: every lease of the batch runs out, and the thief takes the
  // victim's. Nor claims after the first, or this worker would take its own
  // expired leases back (its batch holds fewer than it has room for).
  store.heartbeats_down = true;
  worker.start();
  REQUIRE(eventually([&] { return worker.counters().claimed == before + after + 1; }));
  store.claim_failures = 1000000;
  REQUIRE(eventually([&] { return victim_started.load(); }));
  std::this_thread::sleep_for(450ms);
  auto thief = ts->claim(eoq::ClaimRequest{{"steal"}, "thief", 1, 10s});
  REQUIRE(thief.size() == 1);
  REQUIRE(thief[0].id() == victim.load());
  gate.release();
  REQUIRE(eventually([&] {
    auto c = worker.counters();
    return c.lease_lost == 1 && c.succeeded == before + after;
  }, 10s));
  store.heartbeats_down = false;
  store.claim_failures = 0;
  worker.stop();

  // The victim ran in the middle of the batch, its companions before and after it.
  auto runs = log.all();
  auto first = std::find_if(runs.begin(), runs.end(), [&](const BatchRun& r) { return r.id == victim.load(); });
  REQUIRE(first != runs.end());
  CHECK(log.others_in(first->txid, victim) == before + after);
  CHECK(fx.count_in(first->txid) == 0);
  CHECK(log.runs_of(victim) == 1);
  CHECK(fx.count_for(victim) == 0);
  auto stolen = ts->get(victim).value();
  CHECK(stolen.status == eoq::TaskStatus::running);
  CHECK(stolen.lease_owner == std::optional<std::string>("thief"));
  for (auto id : others) {
    INFO("task " << id);
    CHECK(ts->get(id)->status == eoq::TaskStatus::succeeded);
    CHECK(fx.count_for(id) == 1);
  }
  CHECK(fx.count() == before + after);
  auto c = worker.counters();
  CHECK(c.claimed == before + after + 1);
  CHECK(c.lease_lost == 1);
  CHECK(c.in_flight == 0);
  check_counters_add_up(c);
  // The new owner's effect is the one that counts.
  auto tx = ts->begin(thief[0]);
  tx->exec("INSERT INTO " + fx.table + " (task_id, attempt, txid) VALUES ($1, 2, txid_current())", {victim.load()});
  tx->complete(R"("thief")");
  CHECK(fx.count_for(victim) == 1);
  CHECK(ts->get(victim)->status == eoq::TaskStatus::succeeded);
}

TEST_CASE("batch: ctx.checkpoint throws UsageError inside a batch, and works outside one", "[worker][batch]") {
  EOQ_EACH_STORE(store);
  std::atomic<int> usage_errors{0}, other_errors{0}, checkpoints{0};
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  worker.on("batched", [&](eoq::TaskContext& ctx) {
    try {
      ctx.checkpoint("half", R"({"n":1})");
      ++checkpoints;
    } catch (const eoq::UsageError&) {
      ++usage_errors;
    } catch (...) {
      ++other_errors;
    }
  }, {.batch = 10});
  worker.on("single", [&](eoq::TaskContext& ctx) {
    ctx.checkpoint("half", R"({"n":1})");
    ++checkpoints;
  });
  std::vector<eoq::NewTask> tasks(5, task("batched"));
  tasks.push_back(task("single"));
  auto submitted = store.submit_batch(tasks);
  worker.start();
  REQUIRE(eventually([&] { return all_done(store, submitted); }));
  worker.stop();
  CHECK(usage_errors == 5);
  CHECK(other_errors == 0);
  CHECK(checkpoints == 1);
  for (std::size_t i = 0; i < 5; ++i) {
    auto t = store.get(submitted[i].task.id).value();
    CHECK(t.status == eoq::TaskStatus::succeeded);
    CHECK_FALSE(t.checkpoint_stage);
  }
  auto single = store.get(submitted[5].task.id).value();
  CHECK(single.status == eoq::TaskStatus::succeeded);
  CHECK(single.checkpoint_stage == std::optional<std::string>("half"));
}

TEST_CASE("batch: submits made by a handler commit with its batch and roll back with its failure", "[worker][batch]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  worker.on("parent", [&](eoq::TaskContext& ctx) {
    auto child = task("child");
    child.queue = "children";  // no worker serves it
    child.key = "child-of-" + std::to_string(ctx.id());
    ctx.submit(child);
    if (ctx.payload() == R"("throws")") throw std::runtime_error("after submitting");
  }, {.batch = 20});
  constexpr int n = 30, thrower = 5;
  std::vector<eoq::NewTask> tasks(n, task("parent"));
  tasks[thrower].payload = R"("throws")";
  tasks[thrower].retry.max_attempts = 1;
  auto submitted = store.submit_batch(tasks);
  worker.start();
  REQUIRE(eventually([&] { return all_done(store, submitted); }));
  worker.stop();
  for (int i = 0; i < n; ++i) {
    auto id = submitted[i].task.id;
    INFO("task " << id);
    auto child = store.find("children", "child-of-" + std::to_string(id));
    if (i == thrower) {
      CHECK(status_of(store, id) == eoq::TaskStatus::failed);
      CHECK_FALSE(child);
    } else {
      CHECK(status_of(store, id) == eoq::TaskStatus::succeeded);
      CHECK(child);
    }
  }
  CHECK(queue_stats(store, "children").pending == n - 1);
  auto c = worker.counters();
  CHECK(c.succeeded == n - 1);
  CHECK(c.failed == 1);
  check_counters_add_up(c);
}

TEST_CASE("batch: synchronous_commit off, from WorkerOptions or HandlerOptions, reaches the handler's transaction",
          "[worker][postgres][batch]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  // The test servers run with synchronous_commit = off (they have no fsync),
  // so this store's sessions start with it on: "on" then means nobody turned it off.
  // Straight to the server: a pooler would refuse the startup option.
  eoq::PostgresOptions o;
  o.conninfo = eoq::test::conninfo_with(eoq::test::direct_database_url(), "options", "-c synchronous_commit=on");
  o.schema = ts.schema();
  eoq::PostgresStore store(o);
  std::mutex mu;
  std::map<std::string, std::set<std::string>> seen;  // task type -> what SHOW said
  std::atomic<int> errors{0};
  auto handler = [&](eoq::TaskContext& ctx) {
    try {
      auto value = ctx.exec("SHOW synchronous_commit").scalar<std::string>();
      std::lock_guard lk(mu);
      seen[ctx.type()].insert(value);
    } catch (...) {
      ++errors;
      throw;
    }
  };
  LogSink sink;
  auto defaults = fast_options(sink);
  defaults.queues = {"defaults"};
  eoq::Worker by_default(store, defaults);
  by_default.on("plain", handler);
  by_default.on("batch", handler, {.batch = 10});
  by_default.on("off", handler, {.synchronous_commit = false});
  by_default.on("batch-off", handler, {.batch = 10, .synchronous_commit = false});
  auto async = fast_options(sink);
  async.queues = {"async"};
  async.synchronous_commit = false;
  eoq::Worker async_worker(store, async);
  async_worker.on("async-plain", handler);
  async_worker.on("async-batch", handler, {.batch = 10});
  async_worker.on("async-on", handler, {.synchronous_commit = true});
  async_worker.on("async-batch-on", handler, {.batch = 10, .synchronous_commit = true});
  const std::map<std::string, std::string> expected{
      {"plain", "on"},       {"batch", "on"},       {"off", "off"},         {"batch-off", "off"},
      {"async-plain", "off"}, {"async-batch", "off"}, {"async-on", "on"}, {"async-batch-on", "on"}};
  std::vector<eoq::SubmitResult> submitted;
  for (const auto& [type, _] : expected)
    for (int i = 0; i < 3; ++i) {
      auto t = task(type);
      t.queue = type.rfind("async", 0) == 0 ? "async" : "defaults";
      submitted.push_back(store.submit(t));
    }
  by_default.start();
  async_worker.start();
  REQUIRE(eventually([&] { return all_done(store, submitted); }));
  by_default.stop();
  async_worker.stop();
  CHECK(errors == 0);
  for (const auto& s : submitted) CHECK(status_of(store, s.task.id) == eoq::TaskStatus::succeeded);
  std::lock_guard lk(mu);
  for (const auto& [type, value] : expected) {
    INFO("task type " << type);
    CHECK(seen[type] == std::set<std::string>{value});
  }
}

TEST_CASE("batch: four handler threads with batches of 100 drain 5,000 tasks, some throwing once, each effect once",
          "[worker][postgres][batch][load]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 4;
  options.log_level = eoq::LogLevel::warning;
  eoq::Worker worker(*ts, options);
  worker.on("write", [&](eoq::TaskContext& ctx) {
    fx.write(ctx);
    if (ctx.payload() == R"("throws")" && ctx.attempt() == 1) throw std::runtime_error("first attempt fails");
  }, {.batch = 100});
  constexpr int n = 5000;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  std::set<std::size_t> throwers;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    tasks[i].retry.initial_delay = 10ms;
    tasks[i].retry.max_delay = 50ms;
    if (i % 97 == 0) {
      tasks[i].payload = R"("throws")";
      throwers.insert(i);
    }
  }
  std::vector<eoq::SubmitResult> submitted;
  for (std::size_t at = 0; at < tasks.size(); at += 1000) {
    auto part = ts->submit_batch(std::span<const eoq::NewTask>(tasks).subspan(at, 1000));
    submitted.insert(submitted.end(), part.begin(), part.end());
  }
  const auto t0 = std::chrono::steady_clock::now();
  worker.start();
  REQUIRE(eventually([&] { return queue_stats(*ts).succeeded == n; }, 120s));
  worker.stop();
  INFO("drained in " << std::chrono::duration_cast<Millis>(std::chrono::steady_clock::now() - t0).count() << " ms");

  auto s = queue_stats(*ts);
  CHECK(s.succeeded == n);
  CHECK(s.failed == 0);
  CHECK(s.pending + s.running == 0);
  CHECK(fx.count() == n);
  CHECK(fx.admin.count("SELECT count(DISTINCT task_id) FROM " + fx.table) == n);
  const auto k = static_cast<long long>(throwers.size());
  CHECK(fx.admin.count("SELECT count(*) FROM " + fx.table + " WHERE attempt = 2") == k);
  CHECK(fx.admin.count("SELECT count(*) FROM " + fx.table + " WHERE attempt <> 1 AND attempt <> 2") == 0);
  for (auto i : throwers) {
    auto t = ts->get(submitted[i].task.id).value();
    INFO("thrower " << t.id);
    CHECK(t.attempts == 2);
    CHECK(fx.attempt_of(t.id) == std::optional<std::string>("2"));
  }
  // Batches: a few rows per commit at the least.
  CHECK(fx.admin.count("SELECT count(DISTINCT txid) FROM " + fx.table) < n / 10);
  auto c = worker.counters();
  CHECK(c.claimed == static_cast<std::uint64_t>(n + k));
  CHECK(c.succeeded == static_cast<std::uint64_t>(n));
  CHECK(c.retried == static_cast<std::uint64_t>(k));
  CHECK(c.failed == 0);
  CHECK(c.lease_lost == 0);
  CHECK(c.released + c.abandoned == 0);
  CHECK(c.in_flight == 0);
  CHECK(c.handler_runs >= c.claimed);
  check_counters_add_up(c);
}

TEST_CASE("batch: Postgres killed twice mid-drain under batches that commit asynchronously: every effect lands once",
          "[worker][postgres][outage][batch]") {
  eoq::testing::TempPostgresOptions po;
  po.fsync = false;
  // Without fsync TempPostgres turns synchronous_commit off for everything;
  // here only the handlers' transactions commit asynchronously (claims,
  // heartbeats, failures and releases wait for their WAL), as in production.
  // A crash still loses what sat in the WAL buffers: commits without fsync
  // survive a killed postmaster only once written.
  po.extra_config = "synchronous_commit = on\nwal_writer_delay = 10s\n";
  eoq::testing::TempPostgres server(po);
  eoq::PostgresOptions o;
  o.conninfo = server.conninfo();
  o.schema = "eoq";
  eoq::PostgresStore pg(o);
  pg.migrate();
  h::Recorder recorder;
  h::RecordingStore store(pg, recorder);
  {
    eoq::test::Admin admin(server.conninfo());
    // The primary key refuses a second effect; the count below would see one anyway.
    admin.exec("CREATE TABLE eoq.effects (task_id bigint PRIMARY KEY, version bigint NOT NULL)");
  }
  LogSink sink;
  // Two workers, asynchronous commit said two ways: by the worker, by the handler.
  auto async_worker = fast_options(sink);
  async_worker.concurrency = 3;
  async_worker.lease = 2s;
  async_worker.log_level = eoq::LogLevel::warning;
  async_worker.synchronous_commit = false;
  auto async_handler = async_worker;
  async_handler.synchronous_commit = true;
  std::atomic<long long> runs{0};
  eoq::Worker a(store, async_worker), b(store, async_handler);
  auto handler = [&](eoq::TaskContext& ctx) {
    ctx.exec("INSERT INTO eoq.effects VALUES ($1, $2)", {ctx.id(), ctx.lease().token});
    recorder.add(h::effect_of(ctx.lease()));
    ++runs;
    std::this_thread::sleep_for(1ms);  // a drain long enough to be killed twice
    if (ctx.payload() == R"("throws")" && ctx.attempt() == 1) throw std::runtime_error("first attempt fails");
  };
  a.on("write", handler, {.batch = 25});
  b.on("write", handler, {.batch = 25, .synchronous_commit = false});

  constexpr int n = 3000;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    tasks[i].retry.max_attempts = 20;  // each kill may cost the tasks in flight an attempt
    tasks[i].retry.initial_delay = 20ms;
    tasks[i].retry.max_delay = 200ms;
    if (i % 41 == 0) tasks[i].payload = R"("throws")";  // culprits in the batches too
  }
  for (std::size_t at = 0; at < tasks.size(); at += 1000)
    store.submit_batch(std::span<const eoq::NewTask>(tasks).subspan(at, 1000));
  auto committed_effects = [&] { return eoq::test::Admin(server.conninfo()).count("SELECT count(*) FROM eoq.effects"); };
  const auto t0 = std::chrono::steady_clock::now();
  a.start();
  b.start();
  for (int kill = 1; kill <= 2; ++kill) {
    REQUIRE(eventually([&] { return runs.load() >= n * kill / 4; }, 60s));
    auto before = committed_effects();
    INFO("kill " << kill << ": " << before << " effects committed before it");
    REQUIRE(before < n);  // mid-drain
    server.stop_immediate();
    std::this_thread::sleep_for(300ms);
    server.restart();
  }
  auto finished = [&] {
    try {
      auto s = queue_stats(store);
      return s.succeeded + s.failed + s.cancelled + s.expired == n;
    } catch (const eoq::Error&) {
      return false;
    }
  };
  REQUIRE(eventually(finished, 60s));
  a.stop();
  b.stop();
  INFO("drained in " << std::chrono::duration_cast<Millis>(std::chrono::steady_clock::now() - t0).count() << " ms");

  eoq::test::Admin after(server.conninfo());
  auto s = queue_stats(store);
  CHECK(s.succeeded == n);
  CHECK(after.count("SELECT count(*) FROM eoq.effects") == n);
  CHECK(after.count("SELECT count(DISTINCT task_id) FROM eoq.effects") == n);
  // Each effect row was written under the lease that completed its task.
  CHECK(after.count("SELECT count(*) FROM eoq.effects e JOIN eoq.finished f ON f.id = e.task_id "
                    "WHERE f.status = 'succeeded' AND f.version = e.version + 1") == n);
  check_counters_add_up(a.counters());
  check_counters_add_up(b.counters());

  // The history, without the clients' completions: an asynchronous commit
  // reported to the client can be undone by the crash (and its task run
  // again), which is the contract of synchronous_commit = false. What the
  // database kept must hold every promise.
  auto events = recorder.events();
  std::multimap<eoq::TaskId, std::int64_t> told;  // completions reported to a worker: task -> lease
  std::erase_if(events, [&](const h::Event& e) {
    if (e.kind != h::Kind::complete || e.origin != h::Origin::client) return false;
    if (e.ok) told.emplace(e.task, e.version);
    return true;
  });
  auto db = h::load_postgres(after.get(), "eoq", "effects");
  long long undone = 0;
  for (const auto& e : db) {
    if (e.kind != h::Kind::complete) continue;
    auto [from, to] = told.equal_range(e.task);
    undone += std::count_if(from, to, [&](const auto& t) { return t.second != e.version; });
  }
  std::printf("batches killed twice: %lld successes reported to a worker were undone by a crash and ran again\n", undone);
  h::append(events, db);
  auto v = h::verify_and_print("batches, Postgres killed twice", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == n);
  CHECK(v.effects == n);
  CHECK(v.claims > n);  // the killed attempts (and the culprits) were claimed again
  CHECK(v.handovers_checked > 0);
}

TEST_CASE("send: statements not waited for commit with the task, in order with exec, one per task",
          "[worker][postgres][send]") {
  const int batch = GENERATE(1, 50);
  INFO("HandlerOptions::batch = " << batch);
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  LogSink sink;
  std::atomic<int> unseen{0};
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) {
    ctx.send("INSERT INTO " + fx.table + " (task_id, attempt, txid) VALUES ($1, $2, txid_current())",
             {ctx.id(), ctx.attempt()});
    // A statement that waits for its answer goes after the ones sent before it.
    auto seen = ctx.exec("SELECT count(*) FROM " + fx.table + " WHERE task_id = $1", {ctx.id()}).scalar<std::int64_t>();
    if (seen != 1) ++unseen;
    ctx.send("UPDATE " + fx.table + " SET attempt = attempt + 100 WHERE task_id = $1", {ctx.id()});
  }, {.batch = batch});
  constexpr int n = 200;
  auto submitted = ts->submit_batch(std::vector<eoq::NewTask>(n, task("write")));
  worker.start();
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 20s));
  worker.stop();
  CHECK(unseen == 0);
  CHECK(fx.count() == n);
  for (const auto& s : submitted) {
    INFO("task " << s.task.id);
    CHECK(ts->get(s.task.id)->status == eoq::TaskStatus::succeeded);
    CHECK(fx.count_for(s.task.id) == 1);
    CHECK(fx.attempt_of(s.task.id) == std::optional<std::string>("101"));  // the UPDATE sent last ran too
  }
  auto c = worker.counters();
  CHECK(c.succeeded == n);
  CHECK(c.failed + c.retried + c.released + c.abandoned == 0);
  check_counters_add_up(c);
}

TEST_CASE("send: a statement sent that fails fails its task by its retry policy, and nothing of it commits",
          "[worker][postgres][send]") {
  const int batch = GENERATE(1, 50);
  INFO("HandlerOptions::batch = " << batch);
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) {
    ctx.send("INSERT INTO " + fx.table + " (task_id, attempt, txid) VALUES ($1, $2, txid_current())",
             {ctx.id(), ctx.attempt()});
    // Not null violated on the server, seen only when the statement goes out
    // (with the completion): the handler itself returns normally.
    if (ctx.payload() == R"("bad")")
      ctx.send("INSERT INTO " + fx.table + " (task_id, attempt, txid) VALUES ($1, NULL, 0)", {ctx.id()});
  }, {.batch = batch});
  constexpr int n = 60, bad = 31;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  tasks[bad].payload = R"("bad")";
  tasks[bad].retry.max_attempts = 2;
  tasks[bad].retry.initial_delay = 10ms;
  auto submitted = ts->submit_batch(tasks);
  worker.start();
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 20s));
  worker.stop();
  auto b = ts->get(submitted[bad].task.id).value();
  CHECK(b.status == eoq::TaskStatus::failed);
  CHECK(b.attempts == 2);
  CHECK(b.last_error.value_or("").find("null value") != std::string::npos);
  CHECK(fx.count_for(b.id) == 0);  // its first INSERT rolled back with the one that failed
  for (int i = 0; i < n; ++i) {
    if (i == bad) continue;
    INFO("task " << submitted[i].task.id);
    CHECK(ts->get(submitted[i].task.id)->status == eoq::TaskStatus::succeeded);
    CHECK(fx.count_for(submitted[i].task.id) == 1);
  }
  CHECK(fx.count() == n - 1);
  auto c = worker.counters();
  CHECK(c.succeeded == n - 1);
  CHECK(c.retried == 1);
  CHECK(c.failed == 1);
  CHECK(c.released + c.abandoned + c.lease_lost == 0);
  check_counters_add_up(c);
}

TEST_CASE("batch: a statement sent by one task that fails on another's exec blames neither wrongly",
          "[worker][postgres][batch][send]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  LogSink sink;
  std::atomic<int> rethrown{0};
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) {
    if (ctx.payload() == R"("bad")") {
      // Fails on the server only when it goes out: with the next task's exec.
      ctx.send("INSERT INTO " + fx.table + " (task_id, attempt, txid) VALUES ($1, NULL, 0)", {ctx.id()});
      return;
    }
    try {
      fx.write(ctx);
    } catch (const std::exception& e) {
      ++rethrown;  // a handler that turns any error into its own verdict
      throw eoq::PermanentError(std::string("rethrown: ") + e.what());
    }
  }, {.batch = 50});
  constexpr int n = 40, bad = 10;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  tasks[bad].payload = R"("bad")";
  tasks[bad].retry.max_attempts = 2;
  tasks[bad].retry.initial_delay = 10ms;
  auto submitted = ts->submit_batch(tasks);
  worker.start();
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 20s));
  worker.stop();
  CHECK(rethrown >= 1);  // the case this is about happened
  auto b = ts->get(submitted[bad].task.id).value();
  CHECK(b.status == eoq::TaskStatus::failed);
  CHECK(b.attempts == 2);
  for (int i = 0; i < n; ++i) {
    if (i == bad) continue;
    auto t = ts->get(submitted[i].task.id).value();
    INFO("task " << t.id << ": " << t.last_error.value_or(""));
    CHECK(t.status == eoq::TaskStatus::succeeded);
    CHECK(t.attempts == 1);
    CHECK(fx.count_for(t.id) == 1);
  }
  CHECK(fx.count() == n - 1);
}

TEST_CASE("a result the store refuses fails its task by its retry policy, alone and in a batch",
          "[worker][postgres][batch]") {
  const int batch = GENERATE(1, 50);
  INFO("HandlerOptions::batch = " << batch);
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) {
    fx.write(ctx);
    if (ctx.payload() == R"("huge")") ctx.set_result("\"" + std::string(2 << 20, 'x') + "\"");  // over 1 MiB
  }, {.batch = batch});
  constexpr int n = 30, huge = 7;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  tasks[huge].payload = R"("huge")";
  tasks[huge].retry.max_attempts = 2;
  tasks[huge].retry.initial_delay = 10ms;
  auto submitted = ts->submit_batch(tasks);
  worker.start();
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 20s));
  worker.stop();
  auto h = ts->get(submitted[huge].task.id).value();
  CHECK(h.status == eoq::TaskStatus::failed);
  CHECK(h.attempts == 2);
  CHECK(h.last_error.value_or("").find("result") != std::string::npos);
  CHECK(fx.count_for(h.id) == 0);
  for (int i = 0; i < n; ++i) {
    if (i == huge) continue;
    CHECK(ts->get(submitted[i].task.id)->status == eoq::TaskStatus::succeeded);
    CHECK(fx.count_for(submitted[i].task.id) == 1);
  }
  auto c = worker.counters();
  CHECK(c.released + c.abandoned == 0);
  check_counters_add_up(c);
}

// Not [postgres]: the runs through PgBouncer would end PgBouncer's server
// connections, not the store's.
TEST_CASE("a handler connection the server closed while pooled is replaced, no attempt lost",
          "[worker][connections]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) { fx.write(ctx); });
  worker.start();
  auto first = ts->submit(task("write"));
  REQUIRE(eventually([&] { return all_done(*ts, std::vector<eoq::SubmitResult>{first}); }, 10s));
  // Every idle handler connection of the store dies (a restart, a pooler's idle timeout).
  fx.admin.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'eoq-handler' "
                "AND pid <> pg_backend_pid()");
  REQUIRE(eventually([&] {
    return fx.admin.count("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'eoq-handler'") == 0;
  }, 5s));
  std::vector<eoq::SubmitResult> more;
  for (int i = 0; i < 8; ++i) more.push_back(ts->submit(task("write")));
  REQUIRE(eventually([&] { return all_done(*ts, more); }, 10s));
  worker.stop();
  for (const auto& m : more) {
    auto t = ts->get(m.task.id).value();
    INFO("task " << t.id << ": " << t.last_error.value_or(""));
    CHECK(t.status == eoq::TaskStatus::succeeded);
    CHECK(t.attempts == 1);
    CHECK(fx.count_for(t.id) == 1);
  }
  CHECK(worker.counters().retried == 0);
}

TEST_CASE("batch: at the shutdown deadline a running batch gives every lease back and commits nothing",
          "[worker][postgres][batch]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 1;
  options.lease = 60s;
  options.shutdown_timeout = 100ms;
  eoq::Worker worker(*ts, options);
  Gate gate;
  std::atomic<bool> started{false};
  worker.on("write", [&](eoq::TaskContext& ctx) {
    fx.write(ctx);
    if (ctx.payload() == R"("stubborn")" && !started.exchange(true)) gate.wait();  // past the deadline
  }, {.batch = 10});
  constexpr int n = 10, stubborn = 2;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  tasks[stubborn].payload = R"("stubborn")";
  auto submitted = ts->submit_batch(tasks);
  worker.start();
  REQUIRE(eventually([&] { return started.load(); }));
  REQUIRE(worker.counters().claimed == n);  // all ten in the one batch
  std::thread stopper([&] { worker.stop(); });
  // The stubborn one's lease goes back at the deadline; then the handler returns.
  REQUIRE(eventually([&] { return worker.counters().released >= 1; }, 10s));
  gate.release();
  stopper.join();
  auto c = worker.counters();
  INFO("released " << c.released << ", lease_lost " << c.lease_lost << ", succeeded " << c.succeeded);
  // After the deadline the batch runs nothing again: every lease went back, none of its writes committed.
  CHECK(c.succeeded == 0);
  CHECK(c.released + c.lease_lost == n);
  CHECK(c.in_flight == 0);
  check_counters_add_up(c);
  CHECK(fx.count() == 0);
  // Another worker runs them all, each once.
  LogSink sink2;
  eoq::Worker next(*ts, fast_options(sink2));
  next.on("write", [&](eoq::TaskContext& ctx) { fx.write(ctx); }, {.batch = 10});
  next.start();
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 20s));
  next.stop();
  for (const auto& s : submitted) CHECK(fx.count_for(s.task.id) == 1);
}

// ---------------------------------------------------------------------------
// Snooze: a handler that says "run me again after d"

TEST_CASE("snooze: a handler that snoozes runs again after the delay, the attempt not counted, even on its last one",
          "[worker][snooze]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::mutex mu;
  std::vector<std::pair<int, Steady::time_point>> runs;  // attempt, when
  worker.on("later", [&](eoq::TaskContext& ctx) {
    std::size_t n;
    {
      std::lock_guard lk(mu);
      runs.emplace_back(ctx.attempt(), Steady::now());
      n = runs.size();
    }
    if (n == 1) throw eoq::Snooze{300ms};
    if (n == 2) {
      try {
        ctx.snooze(200ms);
      } catch (const std::exception&) {
        // ctx.snooze must not be swallowed by a handler's catch-all for errors.
      }
      ctx.set_result(R"("must not be stored")");
      return;
    }
    ctx.set_result(R"("third run")");
  });
  auto t = task("later");
  t.retry.max_attempts = 1;
  auto id = store.submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }, 10s));
  worker.stop();

  auto done = store.get(id).value();
  CHECK(done.status == eoq::TaskStatus::succeeded);
  CHECK(done.attempts == 1);
  CHECK(done.result == std::optional<std::string>(R"("third run")"));
  std::vector<std::pair<int, std::string>> seen;
  for (const auto& a : store.history(id)) seen.emplace_back(a.number, a.outcome);
  CHECK(seen == std::vector<std::pair<int, std::string>>{{1, "snoozed"}, {1, "snoozed"}, {1, "succeeded"}});
  {
    std::lock_guard lk(mu);
    REQUIRE(runs.size() == 3);
    for (const auto& r : runs) CHECK(r.first == 1);
    // The store's clock put each run off: never earlier than the delay (its clock and ours tick alike).
    CHECK(runs[1].second - runs[0].second >= 300ms - 5ms);
    CHECK(runs[2].second - runs[1].second >= 200ms - 5ms);
  }
  auto c = worker.counters();
  CHECK(c.claimed == 3);
  CHECK(c.snoozed == 2);
  CHECK(c.succeeded == 1);
  CHECK(c.failed + c.retried == 0);
  check_counters_add_up(c);
  CHECK(sink.contains("snoozed for 300 ms"));
}

TEST_CASE("snooze: a bad delay fails the attempt by its retry policy; ctx.snooze refuses it where it is called",
          "[worker][snooze]") {
  eoq::MemoryStore store;
  LogSink sink;
  eoq::Worker worker(store, fast_options(sink));
  std::atomic<bool> refused{false};
  worker.on("thrown", [](eoq::TaskContext&) { throw eoq::Snooze{-1ms}; });
  worker.on("called", [&](eoq::TaskContext& ctx) {
    try {
      ctx.snooze(std::chrono::hours(24 * 366));
    } catch (const eoq::InvalidArgument& e) {
      refused = e.field() == "delay";
    }
  });
  auto t = task("thrown");
  t.retry.max_attempts = 1;
  auto thrown = store.submit(t).task.id;
  auto called = store.submit(task("called")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, thrown) && is_done(store, called); }));
  worker.stop();
  auto f = store.get(thrown).value();
  CHECK(f.status == eoq::TaskStatus::failed);
  CHECK(f.last_error.value_or("").find("delay: must not be negative") != std::string::npos);
  CHECK(refused);
  CHECK(store.get(called)->status == eoq::TaskStatus::succeeded);
  CHECK(worker.counters().snoozed == 0);
}

TEST_CASE("snooze: a task asked to cancel that snoozes ends cancelled", "[worker][snooze][cancel]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.lease = 600ms;  // heartbeats every 200 ms carry the cancel request
  eoq::Worker worker(store, options);
  std::atomic<bool> started{false};
  worker.on("patient", [&](eoq::TaskContext& ctx) {
    started = true;
    while (ctx.sleep_for(10s)) {
    }
    ctx.snooze(1s);
  });
  auto id = store.submit(task("patient")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return started.load(); }));
  CHECK(store.cancel(id) == eoq::CancelOutcome::cancel_requested);
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK(status_of(store, id) == eoq::TaskStatus::cancelled);
  auto h = store.history(id);
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "cancelled");
  auto c = worker.counters();
  CHECK(c.cancelled == 1);
  CHECK(c.snoozed == 0);
  check_counters_add_up(c);
}

TEST_CASE("snooze: a snoozing handler's SQL and submits roll back, and the run after it commits once",
          "[worker][postgres][snooze]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  Effects effects(ts);  // task_id is its key: a first run's row that committed would refuse the second's
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  std::atomic<int> runs{0};
  worker.on("write", [&](eoq::TaskContext& ctx) {
    ctx.exec(effects.insert(), row_of(ctx));
    auto child = task("child");
    child.queue = "children";
    child.key = "child-of-" + std::to_string(ctx.id());
    ctx.submit(child);
    if (++runs == 1) ctx.snooze(500ms);
  });
  auto id = ts->submit(task("write")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return worker.counters().snoozed == 1; }));
  // Between the snooze and the next run: nothing of the first run is there.
  CHECK(effects.count_for(id) == 0);
  CHECK_FALSE(ts->find("children", "child-of-" + std::to_string(id)).has_value());
  CHECK(status_of(*ts, id) == eoq::TaskStatus::pending);
  REQUIRE(eventually([&] { return is_done(*ts, id); }, 10s));
  worker.stop();
  CHECK(runs == 2);
  CHECK(status_of(*ts, id) == eoq::TaskStatus::succeeded);
  CHECK(effects.count_for(id) == 1);
  CHECK(effects.admin.scalar("SELECT attempt FROM " + effects.table + " WHERE task_id = $1",
                             {std::to_string(id)}) == std::optional<std::string>("1"));
  CHECK(ts->find("children", "child-of-" + std::to_string(id)).has_value());
  auto c = worker.counters();
  CHECK(c.snoozed == 1);
  CHECK(c.succeeded == 1);
  check_counters_add_up(c);
}

TEST_CASE("snooze: in a batch a snoozing handler rolls its batch back, is settled alone, and the others commit once",
          "[worker][postgres][batch][snooze]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  RunLog log;
  LogSink sink;
  eoq::Worker worker(*ts, fast_options(sink));
  worker.on("write", [&](eoq::TaskContext& ctx) {
    auto txid = fx.write(ctx);
    const bool first = log.runs_of(ctx.id()) == 0;
    log.add(ctx, txid);
    if (ctx.payload() == R"("snoozes")" && first) throw eoq::Snooze{200ms};
  }, {.batch = 20});
  constexpr int n = 20, snoozer = 6;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  for (auto& t : tasks) t.retry.max_attempts = 1;
  tasks[snoozer].payload = R"("snoozes")";
  auto submitted = ts->submit_batch(tasks);
  worker.start();
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 20s));
  worker.stop();
  for (const auto& s : submitted) {
    auto t = ts->get(s.task.id).value();
    INFO("task " << t.id);
    CHECK(t.status == eoq::TaskStatus::succeeded);
    CHECK(t.attempts == 1);
    CHECK(fx.count_for(t.id) == 1);
  }
  const auto sid = submitted[snoozer].task.id;
  // The snoozing run wrote in a transaction shared with others, and none of it committed.
  std::int64_t snoozed_tx = 0;
  for (const auto& r : log.all())
    if (r.id == sid) {
      snoozed_tx = r.txid;
      break;
    }
  CHECK(fx.count_in(snoozed_tx) == 0);
  CHECK(log.others_in(snoozed_tx, sid) > 0);
  std::vector<std::string> outcomes;
  for (const auto& a : ts->history(sid)) outcomes.push_back(a.outcome);
  CHECK(outcomes == std::vector<std::string>{"snoozed", "succeeded"});
  auto c = worker.counters();
  CHECK(c.claimed == n + 1);
  CHECK(c.snoozed == 1);
  CHECK(c.succeeded == n);
  check_counters_add_up(c);
}

// ---------------------------------------------------------------------------
// Timeouts: HandlerOptions::timeout, Task::timeout, WorkerOptions::timeout_grace

namespace {
// Opens the gate when the test leaves, however it leaves, so that a handler
// waiting on it lets the worker stop. Declare it after the worker.
struct OpenOnExit {
  Gate& gate;
  ~OpenOnExit() { gate.release(); }
};
}  // namespace

TEST_CASE("timeout: a handler past its timeout sees should_stop, sleep_for wakes, and returning within the grace "
          "completes the task",
          "[worker][timeout]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.timeout_grace = 5s;
  eoq::Worker worker(store, options);
  std::atomic<bool> before{true}, after{false}, stop_seen{false}, woke{false};
  std::atomic<long long> slept_ms{-1};
  worker.on("slow", [&](eoq::TaskContext& ctx) {
    before = ctx.timed_out() || ctx.should_stop();
    auto t0 = Steady::now();
    woke = !ctx.sleep_for(20s);
    slept_ms = std::chrono::duration_cast<Millis>(Steady::now() - t0).count();
    after = ctx.timed_out();
    stop_seen = ctx.should_stop();
    ctx.set_result(R"("stopped in time")");
  }, {.timeout = 200ms});
  auto id = store.submit(task("slow")).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }));
  worker.stop();
  CHECK_FALSE(before);
  CHECK(woke);
  CHECK(after);
  CHECK(stop_seen);
  CHECK(slept_ms >= 190);
  CHECK(slept_ms < 3000);
  auto t = store.get(id).value();
  CHECK(t.status == eoq::TaskStatus::succeeded);
  CHECK(t.result == std::optional<std::string>(R"("stopped in time")"));
  auto c = worker.counters();
  CHECK(c.succeeded == 1);
  CHECK(c.retried + c.failed == 0);
  check_counters_add_up(c);
}

TEST_CASE("timeout: a handler still running after the grace has its attempt failed with timeout and retried at once, "
          "and what it does later is discarded",
          "[worker][timeout]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 2;  // the retry runs beside the stuck handler
  options.timeout_grace = 100ms;
  eoq::Worker worker(store, options);
  Gate gate;
  OpenOnExit open{gate};
  std::atomic<bool> stuck_returned{false}, late_checkpoint_refused{false};
  worker.on("stuck", [&](eoq::TaskContext& ctx) {
    if (ctx.attempt() == 1) {
      gate.wait(20s);  // ignores should_stop
      try {
        ctx.checkpoint("late", "{}");
      } catch (const eoq::LeaseLost&) {
        late_checkpoint_refused = true;
      }
      ctx.set_result(R"("first, too late")");
      stuck_returned = true;
      return;
    }
    ctx.set_result(R"("second")");
  }, {.timeout = 100ms});
  auto t = task("stuck");
  t.retry.max_attempts = 2;
  t.retry.initial_delay = 10ms;
  t.retry.max_delay = 10ms;
  auto id = store.submit(t).task.id;
  worker.start();
  // The second attempt succeeds while the first handler is still stuck.
  REQUIRE(eventually([&] { return is_done(store, id); }, 5s));
  CHECK_FALSE(stuck_returned);
  gate.release();
  REQUIRE(eventually([&] { return stuck_returned.load(); }));
  worker.stop();

  auto done = store.get(id).value();
  CHECK(done.status == eoq::TaskStatus::succeeded);
  CHECK(done.attempts == 2);
  CHECK(done.result == std::optional<std::string>(R"("second")"));
  CHECK_FALSE(done.checkpoint_stage.has_value());
  CHECK(late_checkpoint_refused);
  auto h = store.history(id);
  REQUIRE(h.size() == 2);
  CHECK(h[0].outcome == "retry");
  CHECK(h[0].error == std::optional<std::string>("timeout"));
  CHECK(h[1].outcome == "succeeded");
  auto c = worker.counters();
  CHECK(c.claimed == 2);
  CHECK(c.retried == 1);
  CHECK(c.succeeded == 1);
  CHECK(c.lease_lost == 0);
  check_counters_add_up(c);
  CHECK(sink.contains("attempt failed (timeout), will retry"));
  CHECK(sink.contains("its outcome is discarded"));
}

TEST_CASE("timeout: with no attempts left a handler past its grace fails its task with timeout", "[worker][timeout]") {
  eoq::MemoryStore store;
  LogSink sink;
  auto options = fast_options(sink);
  options.timeout_grace = 0ms;
  eoq::Worker worker(store, options);
  Gate gate;
  OpenOnExit open{gate};
  worker.on("stuck", [&](eoq::TaskContext&) { gate.wait(20s); }, {.timeout = 50ms});
  auto t = task("stuck");
  t.retry.max_attempts = 1;
  auto id = store.submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, id); }, 5s));
  gate.release();
  worker.stop();
  auto f = store.get(id).value();
  CHECK(f.status == eoq::TaskStatus::failed);
  CHECK(f.last_error == std::optional<std::string>("timeout"));
  auto c = worker.counters();
  CHECK(c.failed == 1);
  CHECK(c.succeeded == 0);
  check_counters_add_up(c);
}

TEST_CASE("timeout: a task's own timeout overrides its type's", "[worker][timeout]") {
  EOQ_EACH_STORE(store);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 3;
  options.timeout_grace = 5s;
  eoq::Worker worker(store, options);
  std::mutex mu;
  std::map<eoq::TaskId, std::pair<bool, long long>> seen;  // timed out, after how long
  auto handler = [&](eoq::TaskContext& ctx) {
    auto t0 = Steady::now();
    ctx.sleep_for(1500ms);
    std::lock_guard lk(mu);
    seen[ctx.id()] = {ctx.timed_out(), std::chrono::duration_cast<Millis>(Steady::now() - t0).count()};
  };
  worker.on("limited", handler, {.timeout = 10s});
  worker.on("unlimited", handler);
  auto own = task("limited");
  own.timeout = 200ms;  // shorter than its type's
  auto own_id = store.submit(own).task.id;
  if (!store.get(own_id)->timeout) {
    WARN("this store does not keep Task::timeout yet: the per-task case is skipped");
    return;
  }
  auto type_id = store.submit(task("limited")).task.id;
  auto free = task("unlimited");
  free.timeout = 300ms;  // a type with no limit of its own
  auto free_id = store.submit(free).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(store, own_id) && is_done(store, type_id) && is_done(store, free_id); }));
  worker.stop();
  std::lock_guard lk(mu);
  CHECK(seen[own_id].first);
  CHECK(seen[own_id].second < 1000);
  CHECK_FALSE(seen[type_id].first);
  CHECK(seen[type_id].second >= 1400);
  CHECK(seen[free_id].first);
  CHECK(seen[free_id].second < 1000);
}

TEST_CASE("timeout: bad limits are refused naming the field", "[worker][timeout]") {
  eoq::MemoryStore store;
  eoq::Worker worker(store);
  auto field_of = [&](eoq::HandlerOptions o) {
    try {
      worker.on("t", [](eoq::TaskContext&) {}, o);
    } catch (const eoq::InvalidArgument& e) {
      return e.field();
    }
    return std::string("accepted");
  };
  CHECK(field_of({.timeout = 0ms}) == "timeout");
  CHECK(field_of({.timeout = -5ms}) == "timeout");
  CHECK(field_of({.timeout = std::chrono::hours(24 * 8)}) == "timeout");
  CHECK(field_of({.timeout = 1ms}) == "accepted");
  eoq::WorkerOptions o;
  o.timeout_grace = -1ms;
  try {
    eoq::Worker bad(store, o);
    FAIL("a negative timeout_grace was accepted");
  } catch (const eoq::InvalidArgument& e) {
    CHECK(e.field() == "timeout_grace");
  }
  auto t = task("t");
  t.timeout = 0ms;
  try {
    store.submit(t);
    FAIL("a task with a zero timeout was accepted");
  } catch (const eoq::InvalidArgument& e) {
    CHECK(e.field() == "timeout");
  }
}

TEST_CASE("timeout: a stuck handler in a batch: the batch rolls back, the others are given back and run, once",
          "[worker][postgres][timeout]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  BatchEffects fx(ts);
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 2;
  options.timeout_grace = 100ms;
  eoq::Worker worker(*ts, options);
  Gate gate;
  OpenOnExit open{gate};
  std::atomic<int> stuck{0};
  worker.on("write", [&](eoq::TaskContext& ctx) {
    fx.write(ctx);
    if (ctx.payload() == R"("stuck")" && ctx.attempt() == 1) {
      ++stuck;
      gate.wait(20s);
    }
  }, {.batch = 10, .timeout = 300ms});
  constexpr int n = 10, culprit = 4;
  std::vector<eoq::NewTask> tasks(n, task("write"));
  for (auto& t : tasks) {
    t.retry.max_attempts = 2;
    t.retry.initial_delay = 10ms;
    t.retry.max_delay = 10ms;
  }
  tasks[culprit].payload = R"("stuck")";
  auto submitted = ts->submit_batch(tasks);
  worker.start();
  // Everything, the stuck task's retry included, is done while its first handler is still stuck.
  REQUIRE(eventually([&] { return all_done(*ts, submitted); }, 10s));
  CHECK(stuck == 1);
  gate.release();
  worker.stop();
  for (const auto& s : submitted) {
    auto t = ts->get(s.task.id).value();
    INFO("task " << t.id);
    CHECK(t.status == eoq::TaskStatus::succeeded);
    CHECK(fx.count_for(t.id) == 1);
  }
  const auto sid = submitted[culprit].task.id;
  CHECK(fx.attempt_of(sid) == std::optional<std::string>("2"));
  auto h = ts->history(sid);
  REQUIRE(h.size() == 2);
  CHECK(h[0].error == std::optional<std::string>("timeout"));
  CHECK(fx.count() == n);
  auto c = worker.counters();
  INFO("claimed " << c.claimed << ", succeeded " << c.succeeded << ", retried " << c.retried << ", released "
                  << c.released << ", lease_lost " << c.lease_lost << ", abandoned " << c.abandoned);
  CHECK(c.retried == 1);
  CHECK(c.released == n - 1);  // its batch, given back so as not to wait for the stuck thread
  CHECK(c.succeeded == n);
  check_counters_add_up(c);
}

TEST_CASE("timeout: a handler stuck in SQL past its grace is cancelled, and its row locks do not hold up the retry",
          "[worker][postgres][timeout]") {
  eoq::test::TestStore ts(StoreKind::postgres);
  Effects effects(ts);  // task_id is its key: the retry's insert waits for the stuck one's transaction
  LogSink sink;
  auto options = fast_options(sink);
  options.concurrency = 2;
  options.timeout_grace = 100ms;
  eoq::Worker worker(*ts, options);
  std::atomic<bool> stuck_done{false};
  std::atomic<long long> stuck_ms{-1};
  std::string stuck_error;
  std::mutex mu;
  worker.on("write", [&](eoq::TaskContext& ctx) {
    ctx.exec(effects.insert(), row_of(ctx));
    if (ctx.attempt() > 1) return;
    auto t0 = Steady::now();
    try {
      ctx.exec("SELECT pg_sleep(30)");
    } catch (const std::exception& e) {
      std::lock_guard lk(mu);
      stuck_error = e.what();
    }
    stuck_ms = std::chrono::duration_cast<Millis>(Steady::now() - t0).count();
    stuck_done = true;
  }, {.timeout = 200ms});
  auto t = task("write");
  t.retry.max_attempts = 2;
  t.retry.initial_delay = 10ms;
  t.retry.max_delay = 10ms;
  auto id = ts->submit(t).task.id;
  worker.start();
  REQUIRE(eventually([&] { return is_done(*ts, id) && stuck_done; }, 10s));
  worker.stop();
  CHECK(stuck_ms < 5000);
  {
    std::lock_guard lk(mu);
    CHECK(stuck_error.find("57014") != std::string::npos);  // query_canceled
  }
  CHECK(status_of(*ts, id) == eoq::TaskStatus::succeeded);
  CHECK(effects.count_for(id) == 1);
  CHECK(effects.admin.scalar("SELECT attempt FROM " + effects.table + " WHERE task_id = $1",
                             {std::to_string(id)}) == std::optional<std::string>("2"));
  auto h = ts->history(id);
  REQUIRE(h.size() == 2);
  CHECK(h[0].error == std::optional<std::string>("timeout"));
  auto c = worker.counters();
  CHECK(c.retried == 1);
  CHECK(c.succeeded == 1);
  check_counters_add_up(c);
}
