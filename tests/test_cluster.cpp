// The ctest fixture: one throwaway PostgreSQL cluster for the whole test run.
//
//   eoq_test_cluster start <state dir>   starts a server, writes <state dir>/conninfo
//   eoq_test_cluster stop <state dir>    stops it by pid and deletes its files
//
// When EOQ_TEST_DATABASE_URL is set, both do nothing: the tests use that database.
// The server outlives `start` (its output goes to its own log file, so ctest
// does not wait for it); `stop` finds it through <state dir>/server.
#include <eoq/testing.hpp>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// The server started by `start`, deliberately never destroyed: it must outlive
// this process. A global keeps it reachable, so LeakSanitizer stays quiet.
eoq::testing::TempPostgres* g_server = nullptr;

bool gone(pid_t pid) {
  if (::kill(pid, 0) != 0) return errno == ESRCH;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

// True when pid is a postgres server whose data directory is `data`.
bool is_our_server(pid_t pid, const fs::path& data) {
  std::ifstream pidfile(data / "postmaster.pid");
  long recorded = 0;
  if (!(pidfile >> recorded) || recorded != pid) return false;
  std::ifstream cmd("/proc/" + std::to_string(pid) + "/cmdline");
  std::string argv0;
  std::getline(cmd, argv0, '\0');
  return argv0.size() >= 8 && argv0.compare(argv0.size() - 8, 8, "postgres") == 0;
}

// Stops whatever an earlier `start` left behind in `state`. Returns 0 on success.
int stop(const fs::path& state) {
  std::error_code ec;
  fs::remove(state / "conninfo", ec);
  std::ifstream in(state / "server");
  long pid = 0;
  std::string base;
  if (!(in >> pid) || !(in >> base)) return 0;  // nothing started
  in.close();
  fs::path data = fs::path(base) / "data";
  if (pid > 0 && is_our_server(static_cast<pid_t>(pid), data)) {
    ::kill(static_cast<pid_t>(pid), SIGINT);  // fast shutdown
    auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!gone(static_cast<pid_t>(pid)) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(10ms);
    if (!gone(static_cast<pid_t>(pid))) {
      std::fprintf(stderr, "eoq_test_cluster: server %ld ignored SIGINT for 30 s, sending SIGKILL\n", pid);
      ::kill(static_cast<pid_t>(pid), SIGKILL);
      deadline = std::chrono::steady_clock::now() + 10s;
      while (!gone(static_cast<pid_t>(pid)) && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(10ms);
    }
  }
  // Only ever delete a directory TempPostgres made.
  if (fs::path(base).filename().string().rfind("eoqpg-", 0) == 0) fs::remove_all(base, ec);
  fs::remove(state / "server", ec);
  std::printf("eoq_test_cluster: stopped server %ld\n", pid);
  return 0;
}

int start(const fs::path& state) {
  if (const char* url = std::getenv("EOQ_TEST_DATABASE_URL"); url && *url) {
    std::printf("eoq_test_cluster: EOQ_TEST_DATABASE_URL is set; not starting a server\n");
    std::error_code ec;
    fs::remove(state / "conninfo", ec);
    return 0;
  }
  stop(state);  // a leftover from an interrupted run
  fs::create_directories(state);
  eoq::testing::TempPostgresOptions o;
  o.fsync = false;  // a throwaway cluster: durability buys the tests nothing
  o.max_connections = 400;
  g_server = new eoq::testing::TempPostgres(o);
  auto* server = g_server;
  fs::path base = fs::path(server->data_dir()).parent_path();
  {
    std::ofstream out(state / "server");
    out << server->pid() << "\n" << base.string() << "\n";
    if (!out) throw std::runtime_error("cannot write " + (state / "server").string());
  }
  {
    std::ofstream out(state / "conninfo.tmp");
    out << server->conninfo() << "\n";
    if (!out) throw std::runtime_error("cannot write " + (state / "conninfo.tmp").string());
  }
  fs::rename(state / "conninfo.tmp", state / "conninfo");
  std::printf("eoq_test_cluster: server %d at %s\n", server->pid(), server->conninfo().c_str());
  std::fflush(stdout);
  return 0;
}

// PgBouncer (transaction pooling) in front of the cluster, for the tests
// labelled pgbouncer: <state>/pgbouncer-conninfo, <state>/pgbouncer (pid, dir).
eoq::testing::TempPgBouncer* g_bouncer = nullptr;

int stop_pgbouncer(const fs::path& state) {
  std::error_code ec;
  fs::remove(state / "pgbouncer-conninfo", ec);
  std::ifstream in(state / "pgbouncer");
  long pid = 0;
  std::string dir;
  if (!(in >> pid) || !(in >> dir)) return 0;
  in.close();
  // Only a pgbouncer running our own config file.
  std::ifstream cmd("/proc/" + std::to_string(pid) + "/cmdline");
  std::string all((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
  if (pid > 0 && all.find("pgbouncer") != std::string::npos && all.find(dir) != std::string::npos) {
    ::kill(static_cast<pid_t>(pid), SIGTERM);
    auto deadline = std::chrono::steady_clock::now() + 30s;
    while (!gone(static_cast<pid_t>(pid)) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(10ms);
    if (!gone(static_cast<pid_t>(pid))) ::kill(static_cast<pid_t>(pid), SIGKILL);
  }
  if (fs::path(dir).filename().string().rfind("eoqpgb-", 0) == 0) fs::remove_all(dir, ec);
  fs::remove(state / "pgbouncer", ec);
  std::printf("eoq_test_cluster: stopped pgbouncer %ld\n", pid);
  return 0;
}

int start_pgbouncer(const fs::path& state) {
  stop_pgbouncer(state);
  std::string server;
  if (const char* url = std::getenv("EOQ_TEST_DATABASE_URL"); url && *url) {
    server = url;
  } else {
    std::ifstream in(state / "conninfo");
    std::getline(in, server);
  }
  if (server.empty()) throw std::runtime_error("no cluster to put pgbouncer in front of (start it first)");
  eoq::testing::TempPgBouncerOptions o;
  o.pool_size = 20;
  g_bouncer = new eoq::testing::TempPgBouncer(server, o);
  {
    std::ofstream out(state / "pgbouncer");
    out << g_bouncer->pid() << "\n" << g_bouncer->directory() << "\n";
    if (!out) throw std::runtime_error("cannot write " + (state / "pgbouncer").string());
  }
  {
    std::ofstream out(state / "pgbouncer-conninfo.tmp");
    out << g_bouncer->conninfo() << "\n";
    if (!out) throw std::runtime_error("cannot write " + (state / "pgbouncer-conninfo.tmp").string());
  }
  fs::rename(state / "pgbouncer-conninfo.tmp", state / "pgbouncer-conninfo");
  std::printf("eoq_test_cluster: pgbouncer %d at %s\n", g_bouncer->pid(), g_bouncer->conninfo().c_str());
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc == 3 ? argv[1] : "";
  if (cmd != "start" && cmd != "stop" && cmd != "pgbouncer-start" && cmd != "pgbouncer-stop") {
    std::fprintf(stderr, "usage: eoq_test_cluster start|stop|pgbouncer-start|pgbouncer-stop <state dir>\n");
    return 2;
  }
  try {
    if (cmd == "pgbouncer-start") return start_pgbouncer(argv[2]);
    if (cmd == "pgbouncer-stop") return stop_pgbouncer(argv[2]);
    return cmd == "start" ? start(argv[2]) : stop(argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eoq_test_cluster %s: %s\n", argv[1], e.what());
    return 1;
  }
}
