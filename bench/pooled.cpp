// Many worker processes through PgBouncer beside the same processes connected
// directly, in one run on one throwaway server (fsync and synchronous_commit on):
//
//   pooled [--processes P] [--threads T] [--tasks N] [--server-connections S]
//
// Each mode submits N no-op tasks, starts P worker processes of T handler
// threads each (this program again, with --child), and times the drain from
// their start until every task succeeded. Pooled: the processes connect to a
// PgBouncer (pool_mode = transaction, S server connections) with
// PostgresOptions::transaction_pooling and LISTEN on a direct connection.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include <fmt/format.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using SteadyClock = std::chrono::steady_clock;

int child(const std::string& conninfo, const std::string& listen, const std::string& schema, int threads) {
  // SIGTERM is taken by sigwait: blocked before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  eoq::PostgresOptions po;
  po.conninfo = conninfo;
  po.schema = schema;
  po.transaction_pooling = !listen.empty();
  po.listen_conninfo = listen;
  eoq::PostgresStore store(po);
  eoq::WorkerOptions wo;
  wo.queues = {"drain"};
  wo.concurrency = threads;
  eoq::Worker worker(store, wo);
  worker.on("noop", [](eoq::TaskContext&) {});
  worker.start();
  int sig = 0;
  sigwait(&signals, &sig);
  worker.stop();
  return 0;
}

double drain(const std::string& self, const std::string& direct, const std::string& conninfo, bool pooled,
             int processes, int threads, int tasks) {
  const auto schema = fmt::format("bench_pool_{}_{}", pooled ? "p" : "d", ::getpid());
  eoq::PostgresOptions po;
  po.conninfo = direct;
  po.schema = schema;
  eoq::PostgresStore store(po);
  store.migrate();
  std::vector<eoq::NewTask> batch;
  for (int i = 0; i < tasks; ++i) {
    eoq::NewTask t;
    t.queue = "drain";
    t.type = "noop";
    batch.push_back(std::move(t));
  }
  for (std::size_t at = 0; at < batch.size(); at += 10000)
    store.submit_batch(std::span(batch).subspan(at, std::min<std::size_t>(10000, batch.size() - at)));

  auto t0 = SteadyClock::now();
  std::vector<pid_t> pids;
  for (int p = 0; p < processes; ++p) {
    std::vector<std::string> args{self, "--child", conninfo, pooled ? direct : "", schema, std::to_string(threads)};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = 0;
    if (posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), environ) != 0)
      throw std::runtime_error("cannot start a worker process");
    pids.push_back(pid);
  }
  for (;;) {
    auto s = store.stats();
    if (!s.empty() && s[0].succeeded == tasks) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  double secs = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  for (pid_t pid : pids) ::kill(pid, SIGTERM);
  for (pid_t pid : pids) ::waitpid(pid, nullptr, 0);
  return tasks / secs;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc == 6 && std::string(argv[1]) == "--child") return child(argv[2], argv[3], argv[4], std::stoi(argv[5]));
  int processes = 16, threads = 8, tasks = 50000, server_connections = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    int v = std::stoi(argv[i + 1]);
    if (k == "--processes") processes = v;
    else if (k == "--threads") threads = v;
    else if (k == "--tasks") tasks = v;
    else if (k == "--server-connections") server_connections = v;
    else throw std::runtime_error("unknown option " + k);
  }
  const std::string self = "/proc/self/exe";
  char path[4096];
  auto n = ::readlink(self.c_str(), path, sizeof path - 1);
  if (n <= 0) throw std::runtime_error("cannot find this program's path");
  path[n] = 0;

  eoq::testing::TempPostgresOptions so;
  so.max_connections = 100 + processes * 20;  // direct: each process holds up to 2 x pool_size + 1
  eoq::testing::TempPostgres server(so);
  eoq::testing::TempPgBouncerOptions bo;
  bo.pool_size = server_connections;
  bo.max_client_conn = 100 + processes * 20;
  eoq::testing::TempPgBouncer bouncer(server.conninfo(), bo);

  fmt::print("pooled: {} worker processes x {} threads, {} tasks, {} cores\n", processes, threads, tasks,
             std::thread::hardware_concurrency());
  double direct = drain(path, server.conninfo(), server.conninfo(), false, processes, threads, tasks);
  fmt::print("direct connections:                          {:9.0f} tasks/s\n", direct);
  double pooled = drain(path, server.conninfo(), bouncer.conninfo(), true, processes, threads, tasks);
  fmt::print("PgBouncer, transaction pooling, {:3} server conns: {:9.0f} tasks/s  ({:.2f} of direct)\n",
             server_connections, pooled, pooled / direct);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "pooled: %s\n", e.what());
  return 1;
}
