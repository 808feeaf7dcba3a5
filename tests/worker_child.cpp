// A worker process for worker_test's process-level cases (crash, zombie). It
// runs an eoq::Worker on PostgresStore until SIGTERM, then stops gracefully and
// prints its counters as one line: "counters claimed=.. succeeded=.. ...".
//
//   worker_child <mode> <conninfo> <schema> <dir> [key=value ...]
//
// modes (the handler for task type "effect"):
//   crash   inside ctx.transaction(): counter row + 1, (task id, lease token) into effects, then
//           `sleep_ms` (plus up to `sleep_spread_ms` more, at random) with the transaction open; a
//           payload with "fail" fails for good instead. Each run's start and end go to the history.
//   zombie  inserts (task id, attempt, owner, lease token) into effects, touches
//           <dir>/started-<attempt>, then sleeps `sleep_ms` before returning (the
//           test freezes it there)
// keys: id, concurrency, lease_ms, sleep_ms, sleep_spread_ms, prefetch (absent: measured), idle_timeout_ms, history
// (a file the client side of the history goes to as it happens; see history.hpp); crash mode also
// batch (HandlerOptions::batch, default 1) and fail_every (a task whose id it divides throws after
// writing its effect, on its first attempt: in a batch, its writes and the others' roll back)
#include "history.hpp"
#include "support.hpp"

#include <eoq/eoq.hpp>
#include <eoq/worker.hpp>

#include <signal.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>

namespace {

std::map<std::string, std::string> parse(int argc, char** argv, int first) {
  std::map<std::string, std::string> kv;
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    auto eq = a.find('=');
    if (eq != std::string::npos) kv[a.substr(0, eq)] = a.substr(eq + 1);
  }
  return kv;
}

long get(const std::map<std::string, std::string>& kv, const std::string& key, long fallback) {
  auto it = kv.find(key);
  return it == kv.end() ? fallback : std::stol(it->second);
}

// A handler run in the history: its start as it begins, its end as it
// returns or throws, so that the checker sees real starts (deadlines) and a
// reader sees which runs a kill cut short (a start without an end).
class RunRecord {
 public:
  RunRecord(eoq::test::history::Recorder& rec, const eoq::Lease& lease)
      : rec_(rec), lease_(lease), unwinding_(std::uncaught_exceptions()) {
    rec_.add(eoq::test::history::start_of(lease_));
  }
  RunRecord(const RunRecord&) = delete;
  RunRecord& operator=(const RunRecord&) = delete;
  ~RunRecord() {
    try {
      rec_.add(eoq::test::history::end_of(lease_, std::uncaught_exceptions() == unwinding_));
    } catch (...) {
      // A history file that cannot be written shows up as a missing end; a
      // destructor must not throw.
    }
  }

 private:
  eoq::test::history::Recorder& rec_;
  const eoq::Lease& lease_;
  int unwinding_;
};

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 5) {
    std::fprintf(stderr, "usage: worker_child crash|zombie <conninfo> <schema> <dir> [key=value ...]\n");
    return 2;
  }
  std::string mode = argv[1], conninfo = argv[2], schema = argv[3], dir = argv[4];
  auto kv = parse(argc, argv, 5);

  // SIGTERM and SIGINT are taken by sigwait below, not by a handler: blocked here,
  // before any thread starts, so every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  eoq::PostgresOptions po;
  po.conninfo = conninfo;
  po.schema = schema;
  po.pool_size = 4;
  po.handler_idle_timeout = eoq::Millis(get(kv, "idle_timeout_ms", 30000));
  eoq::test::use_test_pooling(po);
  eoq::PostgresStore pg(po);
  namespace h = eoq::test::history;
  std::unique_ptr<h::Recorder> recorder =
      kv.count("history") ? std::make_unique<h::Recorder>(kv["history"]) : std::make_unique<h::Recorder>();
  h::RecordingStore store(pg, *recorder);

  eoq::WorkerOptions wo;
  wo.concurrency = static_cast<int>(get(kv, "concurrency", 4));
  // Without a prefetch key the worker measures its look-ahead, as by default.
  if (kv.count("prefetch")) wo.prefetch = static_cast<int>(get(kv, "prefetch", 0));
  wo.lease = eoq::Millis(get(kv, "lease_ms", 1000));
  wo.poll_interval = eoq::Millis(200);
  wo.shutdown_timeout = eoq::Millis(2000);
  wo.error_backoff_initial = eoq::Millis(20);
  wo.error_backoff_max = eoq::Millis(500);
  if (kv.count("id")) wo.worker_id = kv["id"];
  wo.logger = [](eoq::LogLevel level, std::string_view message) {
    if (level >= eoq::LogLevel::info)
      std::fprintf(stderr, "[%s] %.*s\n", std::string(eoq::to_string(level)).c_str(),
                   static_cast<int>(message.size()), message.data());
  };
  eoq::Worker worker(store, wo);

  const std::string effects = "\"" + schema + "\".effects";
  const std::string counter = "\"" + schema + "\".counter";
  if (mode == "crash") {
    const long sleep_ms = get(kv, "sleep_ms", 0);
    const long spread_ms = get(kv, "sleep_spread_ms", 0);
    const long fail_every = get(kv, "fail_every", 0);
    worker.on("effect", [&, sleep_ms, spread_ms, fail_every](eoq::TaskContext& ctx) {
      RunRecord run(store.recorder(), ctx.lease());
      // The workflow chaos test's parents that fail for good.
      if (ctx.payload().find("\"fail\"") != std::string::npos) throw eoq::PermanentError("injected failure");
      auto& tx = ctx.transaction();
      tx.exec("UPDATE " + counter + " SET n = n + 1");
      tx.exec("INSERT INTO " + effects + " (task_id, version) VALUES ($1, $2)",
              {std::to_string(ctx.id()), std::to_string(ctx.lease().token)});
      store.recorder().add(h::effect_of(ctx.lease()));
      if (fail_every > 0 && ctx.id() % fail_every == 0 && ctx.attempt() == 1)
        throw std::runtime_error("injected failure after the effect");
      // Held open, so that kills and restarts land inside handler transactions.
      long ms = sleep_ms;
      if (spread_ms > 0) {
        thread_local std::mt19937 rng(std::random_device{}());
        ms += std::uniform_int_distribution<long>(0, spread_ms)(rng);
      }
      if (ms > 0) ctx.sleep_for(eoq::Millis(ms));
    }, {.batch = static_cast<int>(get(kv, "batch", 1))});
  } else if (mode == "zombie") {
    long sleep_ms = get(kv, "sleep_ms", 0);
    worker.on("effect", [&, sleep_ms](eoq::TaskContext& ctx) {
      ctx.exec("INSERT INTO " + effects + " (task_id, attempt, owner, version) VALUES ($1, $2, $3, $4)",
               {std::to_string(ctx.id()), std::to_string(ctx.attempt()), ctx.lease().owner,
                std::to_string(ctx.lease().token)});
      store.recorder().add(h::effect_of(ctx.lease()));
      std::ofstream(dir + "/started-" + std::to_string(ctx.attempt())) << ctx.lease().owner << "\n";
      // A plain sleep, not ctx.sleep_for: a frozen or careless handler does not look at its context.
      std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
      ctx.set_result("\"" + ctx.lease().owner + "\"");
    });
  } else {
    std::fprintf(stderr, "worker_child: unknown mode '%s'\n", mode.c_str());
    return 2;
  }

  worker.start();
  std::printf("ready %s\n", worker.id().c_str());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&signals, &sig);
  worker.stop();

  auto c = worker.counters();
  std::printf("counters claimed=%llu succeeded=%llu failed=%llu retried=%llu lease_lost=%llu released=%llu "
              "abandoned=%llu\n",
              static_cast<unsigned long long>(c.claimed), static_cast<unsigned long long>(c.succeeded),
              static_cast<unsigned long long>(c.failed), static_cast<unsigned long long>(c.retried),
              static_cast<unsigned long long>(c.lease_lost), static_cast<unsigned long long>(c.released),
              static_cast<unsigned long long>(c.abandoned));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "worker_child: %s\n", e.what());
  return 1;
}
