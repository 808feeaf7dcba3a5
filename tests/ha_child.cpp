// The host processes of the high-availability tests (tests/ha_test.cpp): a
// worker and a submitter, each as a host application would be written, against
// a Patroni cluster through one multi-host connection string. They run until
// SIGTERM, then print one line, "result key=value ...", with what the host saw.
//
//   ha_child worker <conninfo> <schema> <dir> [key=value ...]
//     An eoq::Worker with WorkerOptions defaults except `lease_ms`, `concurrency`
//     and `id`. Its handler (type "effect") inserts (task id, lease token) into
//     <schema>.effects inside ctx.transaction(), then sleeps `sleep_ms`; its
//     start, effect and end go to the history. Counts what reached the host: the
//     worker's warnings and errors (its logger) and the exceptions its handler
//     saw (a statement that failed under it: the failover cut its transaction).
//   ha_child submit <conninfo> <schema> <dir> [key=value ...]
//     Submits task after task with keys "<id>-<n>", one every `interval_ms`. A
//     submit that throws is an error the host saw: it waits 50 ms and submits
//     the same key again (what a key is for). Reports the longest time from a
//     key's first try to its success, and the longest single call.
//
// keys: id, history (the file the client side of the history goes to), lease_ms,
// concurrency, sleep_ms, interval_ms, transient_retries (PostgresOptions; default
// as in eoq), error_backoff_max_ms (WorkerOptions; default as in eoq).
#include "history.hpp"

#include <eoq/eoq.hpp>
#include <eoq/worker.hpp>

#include <fmt/format.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <thread>

namespace {

namespace h = eoq::test::history;
using Steady = std::chrono::steady_clock;

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

// Wall-clock time for the log lines, so that they line up with the faults.
std::string stamp() {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch());
  return fmt::format("{}.{:06d}", us.count() / 1000000, static_cast<int>(us.count() % 1000000));
}

std::atomic<bool> g_stop{false};

// SIGTERM and SIGINT, blocked in every thread, are taken here.
void wait_for_stop(sigset_t signals) {
  int sig = 0;
  sigwait(&signals, &sig);
  g_stop = true;
}

int run_worker(const std::string& conninfo, const std::string& schema, std::map<std::string, std::string>& kv,
               const sigset_t& signals) {
  eoq::PostgresOptions po;
  po.conninfo = conninfo;
  po.schema = schema;
  po.pool_size = 4;
  if (kv.count("transient_retries")) po.transient_retries = static_cast<int>(get(kv, "transient_retries", 3));
  eoq::PostgresStore pg(po);
  std::unique_ptr<h::Recorder> recorder =
      kv.count("history") ? std::make_unique<h::Recorder>(kv["history"]) : std::make_unique<h::Recorder>();
  h::RecordingStore store(pg, *recorder);

  std::atomic<long> warnings{0}, errors{0}, handler_exceptions{0};
  eoq::WorkerOptions wo;
  wo.concurrency = static_cast<int>(get(kv, "concurrency", 4));
  wo.lease = eoq::Millis(get(kv, "lease_ms", 5000));
  if (kv.count("error_backoff_max_ms")) wo.error_backoff_max = eoq::Millis(get(kv, "error_backoff_max_ms", 10000));
  if (kv.count("id")) wo.worker_id = kv["id"];
  wo.logger = [&](eoq::LogLevel level, std::string_view message) {
    if (level == eoq::LogLevel::warning) ++warnings;
    if (level >= eoq::LogLevel::error) ++errors;
    if (level >= eoq::LogLevel::warning)
      std::fprintf(stderr, "%s [%s] %.*s\n", stamp().c_str(), std::string(eoq::to_string(level)).c_str(),
                   static_cast<int>(message.size()), message.data());
  };
  eoq::Worker worker(store, wo);
  const std::string effects = "\"" + schema + "\".effects";
  const long sleep_ms = get(kv, "sleep_ms", 0);
  worker.on("effect", [&](eoq::TaskContext& ctx) {
    store.recorder().add(h::start_of(ctx.lease()));
    bool ok = false;
    try {
      ctx.transaction().exec("INSERT INTO " + effects + " (task_id, version) VALUES ($1, $2)",
                             {std::to_string(ctx.id()), std::to_string(ctx.lease().token)});
      store.recorder().add(h::effect_of(ctx.lease()));
      if (sleep_ms > 0) ctx.sleep_for(eoq::Millis(sleep_ms));
      ok = true;
    } catch (const std::exception& e) {
      ++handler_exceptions;
      std::fprintf(stderr, "%s [handler] task %lld: %s\n", stamp().c_str(), static_cast<long long>(ctx.id()), e.what());
      store.recorder().add(h::end_of(ctx.lease(), false));
      throw;
    }
    store.recorder().add(h::end_of(ctx.lease(), ok));
  });
  worker.start();
  std::printf("ready %s\n", worker.id().c_str());
  std::fflush(stdout);
  wait_for_stop(signals);
  worker.stop();
  auto c = worker.counters();
  std::printf("result claimed=%llu succeeded=%llu failed=%llu retried=%llu lease_lost=%llu released=%llu "
              "abandoned=%llu store_errors=%llu warnings=%ld errors=%ld handler_exceptions=%ld\n",
              static_cast<unsigned long long>(c.claimed), static_cast<unsigned long long>(c.succeeded),
              static_cast<unsigned long long>(c.failed), static_cast<unsigned long long>(c.retried),
              static_cast<unsigned long long>(c.lease_lost), static_cast<unsigned long long>(c.released),
              static_cast<unsigned long long>(c.abandoned), static_cast<unsigned long long>(c.store_errors),
              warnings.load(), errors.load(), handler_exceptions.load());
  return 0;
}

int run_submitter(const std::string& conninfo, const std::string& schema, std::map<std::string, std::string>& kv,
                  const sigset_t& signals) {
  eoq::PostgresOptions po;
  po.conninfo = conninfo;
  po.schema = schema;
  po.pool_size = 2;
  if (kv.count("transient_retries")) po.transient_retries = static_cast<int>(get(kv, "transient_retries", 3));
  eoq::PostgresStore pg(po);
  std::unique_ptr<h::Recorder> recorder =
      kv.count("history") ? std::make_unique<h::Recorder>(kv["history"]) : std::make_unique<h::Recorder>();
  h::RecordingStore store(pg, *recorder);
  const std::string id = kv.count("id") ? kv["id"] : "s";
  const auto interval = std::chrono::milliseconds(get(kv, "interval_ms", 10));

  std::thread stopper(wait_for_stop, signals);
  long long submitted = 0, duplicates = 0, errors = 0;
  std::chrono::microseconds longest_key{0}, longest_call{0};
  std::printf("ready %s\n", id.c_str());
  std::fflush(stdout);
  for (long long n = 0; !g_stop; ++n) {
    eoq::NewTask t;
    t.type = "effect";
    t.key = fmt::format("{}-{}", id, n);
    t.retry.max_attempts = 1000;  // every failover may cost the tasks it cut an attempt
    t.retry.initial_delay = std::chrono::milliseconds(10);
    t.retry.max_delay = std::chrono::milliseconds(100);
    const auto first = Steady::now();
    for (;;) {
      const auto t0 = Steady::now();
      try {
        auto r = store.submit(t);
        ++submitted;
        duplicates += r.duplicate;
        longest_call = std::max(longest_call, std::chrono::duration_cast<std::chrono::microseconds>(Steady::now() - t0));
        break;
      } catch (const std::exception& e) {
        ++errors;
        longest_call = std::max(longest_call, std::chrono::duration_cast<std::chrono::microseconds>(Steady::now() - t0));
        std::fprintf(stderr, "%s [submit] %s: %s\n", stamp().c_str(), t.key->c_str(), e.what());
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
    longest_key = std::max(longest_key, std::chrono::duration_cast<std::chrono::microseconds>(Steady::now() - first));
    std::this_thread::sleep_for(interval);
  }
  stopper.join();
  std::printf("result submitted=%lld duplicates=%lld errors=%lld longest_key_ms=%lld longest_call_ms=%lld\n", submitted,
              duplicates, errors, static_cast<long long>(longest_key.count() / 1000),
              static_cast<long long>(longest_call.count() / 1000));
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 5) {
    std::fprintf(stderr, "usage: ha_child worker|submit <conninfo> <schema> <dir> [key=value ...]\n");
    return 2;
  }
  std::string mode = argv[1], conninfo = argv[2], schema = argv[3];
  auto kv = parse(argc, argv, 5);
  // Blocked before any thread starts, so that every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  if (mode == "worker") return run_worker(conninfo, schema, kv, signals);
  if (mode == "submit") return run_submitter(conninfo, schema, kv, signals);
  std::fprintf(stderr, "ha_child: unknown mode '%s'\n", mode.c_str());
  return 2;
} catch (const std::exception& e) {
  std::fprintf(stderr, "ha_child: %s\n", e.what());
  return 1;
}
