// Helper process for postgres_test: each subcommand is one participant in a
// race between processes. Every subcommand first gets ready (connects), says so
// by creating <go file>.ready.<pid>, then waits until <go file> exists, so all
// participants start at the same moment.
//
//   eoq_test_child migrate    <conninfo> <schema> <go file>
//   eoq_test_child submit-key <conninfo> <schema> <go file> <threads> <queue> <key> <out file>
//       each thread submits the key once; writes "<id> <duplicate 0|1>" per submit
//   eoq_test_child submit-strict <conninfo> <schema> <go file> <threads> <queue> <key> <out file>
//       each thread submits the key once with a strict key and a payload of its
//       own ({"pid": P, "thread": T}): even threads with submit, odd ones with
//       submit_batch of two tasks, the key's and a fresh key of their own
//       ("fresh-P-T"); writes per submit
//       "<created|duplicate|conflict|error> <submit|batch> <id> <pid> <thread> <field> <differs> <key> <fresh key>",
//       where for a conflict <id> is the holder's id and field, differs and key
//       are the KeyConflict's (spaces in differs as '_'; '-' where none)
//   eoq_test_child claim-all  <conninfo> <schema> <go file> <threads> <batch> <queue> <out file>
//       threads claim batches and complete them until the queue is drained;
//       writes "<id> <token> <applied 0|1>" per lease, and the claims and
//       completions as it sees them to <out file>.history (history.hpp)
//
// Exit status 0 on success; any error is printed to stderr and exits 1.
#include "history.hpp"

#include <eoq/eoq.hpp>

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

void wait_for_go(const std::string& path) {
  std::ofstream(path + ".ready." + std::to_string(::getpid())) << "ready\n";
  auto give_up = std::chrono::steady_clock::now() + 120s;
  while (!std::filesystem::exists(path)) {
    if (std::chrono::steady_clock::now() > give_up) throw std::runtime_error("no go file after 120 s: " + path);
    std::this_thread::sleep_for(1ms);
  }
}

eoq::PostgresOptions options(const std::string& conninfo, const std::string& schema, int pool) {
  eoq::PostgresOptions o;
  o.conninfo = conninfo;
  o.schema = schema;
  o.pool_size = pool;
  return o;
}

void write_lines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream out(path + ".tmp");
  for (const auto& l : lines) out << l << "\n";
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path);
  std::filesystem::rename(path + ".tmp", path);
}

// Runs body(i) on n threads; rethrows the first error.
template <class F>
void on_threads(int n, F body) {
  std::mutex m;
  std::string error;
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      try {
        body(i);
      } catch (const std::exception& e) {
        std::lock_guard lock(m);
        if (error.empty()) error = e.what();
      }
    });
  for (auto& t : threads) t.join();
  if (!error.empty()) throw std::runtime_error(error);
}

int migrate(char** argv) {
  eoq::PostgresStore store(options(argv[2], argv[3], 1));
  wait_for_go(argv[4]);
  store.migrate();
  return 0;
}

int submit_key(char** argv) {
  int threads = std::stoi(argv[5]);
  std::string queue = argv[6], key = argv[7], out = argv[8];
  eoq::PostgresStore store(options(argv[2], argv[3], threads));
  // Open the connections before the start so the race is on the insert.
  on_threads(threads, [&](int) { store.get(0); });
  wait_for_go(argv[4]);
  std::mutex m;
  std::vector<std::string> lines;
  on_threads(threads, [&](int i) {
    eoq::NewTask t;
    t.queue = queue;
    t.type = "race";
    t.key = key;
    t.payload = fmt::format(R"({{"pid": {}, "thread": {}}})", ::getpid(), i);
    t.key_reuse = eoq::KeyReuse::lenient;  // each submitter its own payload: the winner's is kept
    auto r = store.submit(t);
    std::lock_guard lock(m);
    lines.push_back(fmt::format("{} {}", r.task.id, r.duplicate ? 1 : 0));
  });
  write_lines(out, lines);
  return 0;
}

int submit_strict(char** argv) {
  int threads = std::stoi(argv[5]);
  std::string queue = argv[6], key = argv[7], out = argv[8];
  eoq::PostgresStore store(options(argv[2], argv[3], threads));
  on_threads(threads, [&](int) { store.get(0); });
  wait_for_go(argv[4]);
  std::mutex m;
  std::vector<std::string> lines;
  on_threads(threads, [&](int i) {
    eoq::NewTask t;
    t.queue = queue;
    t.type = "race";
    t.key = key;
    t.payload = fmt::format(R"({{"pid": {}, "thread": {}}})", ::getpid(), i);
    t.key_reuse = eoq::KeyReuse::strict;
    const bool batch = i % 2 == 1;
    const std::string fresh = batch ? fmt::format("fresh-{}-{}", ::getpid(), i) : "-";
    std::string line;
    auto row = [&](std::string_view outcome, long long id, std::string_view field, std::string differs,
                   std::string_view k) {
      std::replace(differs.begin(), differs.end(), ' ', '_');
      return fmt::format("{} {} {} {} {} {} {} {} {}", outcome, batch ? "batch" : "submit", id, ::getpid(), i, field,
                         differs, k, fresh);
    };
    try {
      eoq::SubmitResult r;
      if (batch) {
        eoq::NewTask other = t;
        other.key = fresh;
        other.payload = "{}";
        r = store.submit_batch(std::vector<eoq::NewTask>{t, other})[0];
      } else {
        r = store.submit(t);
      }
      line = row(r.duplicate ? "duplicate" : "created", r.task.id, "-", "-", "-");
    } catch (const eoq::KeyConflict& e) {
      line = row("conflict", e.existing_task_id(), e.field(), e.differs(), e.key());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "thread %d: %s\n", i, e.what());
      line = row("error", 0, "-", "-", "-");
    }
    std::lock_guard lock(m);
    lines.push_back(std::move(line));
  });
  write_lines(out, lines);
  return 0;
}

int claim_all(char** argv) {
  int threads = std::stoi(argv[5]);
  int batch = std::stoi(argv[6]);
  std::string queue = argv[7], out = argv[8];
  eoq::PostgresStore pg(options(argv[2], argv[3], threads));
  eoq::test::history::Recorder recorder(out + ".history");
  eoq::test::history::RecordingStore store(pg, recorder);
  on_threads(threads, [&](int) { store.get(0); });
  wait_for_go(argv[4]);
  std::mutex m;
  std::vector<std::string> lines;
  on_threads(threads, [&](int i) {
    eoq::ClaimRequest req;
    req.queues = {queue};
    req.owner = fmt::format("child-{}-{}", ::getpid(), i);
    req.limit = batch;
    req.lease = 120s;
    std::vector<std::string> mine;
    for (;;) {
      auto leases = store.claim(req);
      if (leases.empty()) {
        bool drained = true;
        for (const auto& s : store.stats())
          if (s.queue == queue && (s.pending > 0 || s.running > 0)) drained = false;
        if (drained) break;
        std::this_thread::sleep_for(5ms);
        continue;
      }
      std::vector<eoq::Completion> done;
      done.reserve(leases.size());
      for (const auto& l : leases) done.push_back({&l, fmt::format(R"({{"by": "{}"}})", req.owner)});
      auto applied = store.complete_batch(done);
      if (applied.size() != leases.size()) throw std::runtime_error("complete_batch returned the wrong count");
      for (std::size_t k = 0; k < leases.size(); ++k)
        mine.push_back(fmt::format("{} {} {}", leases[k].id(), leases[k].token, applied[k] ? 1 : 0));
    }
    std::lock_guard lock(m);
    lines.insert(lines.end(), mine.begin(), mine.end());
  });
  write_lines(out, lines);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "migrate" && argc == 5) return migrate(argv);
    if (cmd == "submit-key" && argc == 9) return submit_key(argv);
    if (cmd == "submit-strict" && argc == 9) return submit_strict(argv);
    if (cmd == "claim-all" && argc == 9) return claim_all(argv);
    std::fprintf(stderr, "eoq_test_child: bad arguments (see tests/child.cpp)\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eoq_test_child %s: %s\n", argc > 1 ? argv[1] : "", e.what());
    return 1;
  }
}
