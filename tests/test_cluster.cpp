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

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::string(argv[1]) != "start" && std::string(argv[1]) != "stop")) {
    std::fprintf(stderr, "usage: eoq_test_cluster start|stop <state dir>\n");
    return 2;
  }
  try {
    return std::string(argv[1]) == "start" ? start(argv[2]) : stop(argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eoq_test_cluster %s: %s\n", argv[1], e.what());
    return 1;
  }
}
