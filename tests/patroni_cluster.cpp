// See patroni_cluster.hpp. Layout of the cluster's directory (short: the Unix
// socket paths must fit in ~107 bytes):
//   /tmp/eoqha-XXXXXX/etcd/          etcd's data
//   /tmp/eoqha-XXXXXX/n<i>.yml       node i's Patroni configuration
//   /tmp/eoqha-XXXXXX/n<i>/data/     node i's PostgreSQL cluster (and its socket in n<i>/)
//   <log_dir>/etcd.log, <log_dir>/n<i>.log
#include "patroni_cluster.hpp"

#include <eoq/errors.hpp>

#include <libpq-fe.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

namespace eoq::test {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Steady = std::chrono::steady_clock;

namespace {

struct RunAs {
  bool drop = false;
  uid_t uid = 0;
  gid_t gid = 0;
};

RunAs run_as() {
  RunAs r;
  if (geteuid() != 0) return r;
  struct passwd pw {};
  struct passwd* found = nullptr;
  std::vector<char> buf(16384);
  if (getpwnam_r("postgres", &pw, buf.data(), buf.size(), &found) != 0 || !found)
    throw Error("PatroniCluster: running as root, but there is no 'postgres' user to run the cluster as");
  r.drop = true;
  r.uid = pw.pw_uid;
  r.gid = pw.pw_gid;
  return r;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string tail(const std::string& text, std::size_t bytes = 4000) {
  return text.size() > bytes ? "...\n" + text.substr(text.size() - bytes) : text;
}

// Gone, or a zombie nobody reaped yet.
bool gone(pid_t pid) {
  if (pid <= 0) return true;
  if (::kill(pid, 0) != 0) return errno == ESRCH;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

bool wait_gone(pid_t pid, std::chrono::milliseconds timeout) {
  auto deadline = Steady::now() + timeout;
  while (!gone(pid)) {
    if (Steady::now() > deadline) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

std::string cmdline_of(pid_t pid) {
  std::string all = slurp("/proc/" + std::to_string(pid) + "/cmdline");
  std::replace(all.begin(), all.end(), '\0', ' ');
  return all;
}

// Ports free on 127.0.0.1 right now: all bound at once, so they differ, then released.
std::vector<int> free_ports(int n) {
  std::vector<int> fds, ports;
  for (int i = 0; i < n; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw Error(fmt::format("PatroniCluster: socket: {}", std::strerror(errno)));
    fds.push_back(fd);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof addr;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      int e = errno;
      for (int f : fds) ::close(f);
      throw Error(fmt::format("PatroniCluster: cannot find a free TCP port: {}", std::strerror(e)));
    }
    ports.push_back(ntohs(addr.sin_port));
  }
  for (int f : fds) ::close(f);
  return ports;
}

// fork + execve with stdin from /dev/null and stdout and stderr appended to
// `log`; as `as` when it says so; in a session of its own; SIGTERM when the
// forking thread dies. Only async-signal-safe calls between fork and exec.
pid_t spawn(const std::vector<std::string>& args, const std::vector<std::string>& env, const fs::path& log,
            const RunAs& as) {
  std::vector<char*> argv, envp;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  std::string log_path = log.string();
  const pid_t parent = ::getpid();

  int err_pipe[2];
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) throw Error(fmt::format("PatroniCluster: pipe: {}", std::strerror(errno)));
  pid_t pid = ::fork();
  if (pid < 0) {
    int e = errno;
    ::close(err_pipe[0]);
    ::close(err_pipe[1]);
    throw Error(fmt::format("PatroniCluster: fork: {}", std::strerror(e)));
  }
  if (pid == 0) {
    auto fail = [&](int stage) {
      int code[2] = {stage, errno};
      [[maybe_unused]] auto n = ::write(err_pipe[1], code, sizeof code);
      ::_exit(127);
    };
    ::setsid();
    int in = ::open("/dev/null", O_RDONLY);
    if (in < 0) fail(1);
    int out = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out < 0) fail(2);
    if (as.drop && ::fchown(out, as.uid, as.gid) != 0) fail(2);
    if (::dup2(in, 0) < 0 || ::dup2(out, 1) < 0 || ::dup2(out, 2) < 0) fail(3);
    int keep = err_pipe[1];
    long max = ::sysconf(_SC_OPEN_MAX);
    if (max < 0 || max > 65536) max = 65536;
    for (int fd = 3; fd < max; ++fd)
      if (fd != keep) ::close(fd);
    if (as.drop) {
      if (::setgroups(0, nullptr) != 0 || ::setgid(as.gid) != 0 || ::setuid(as.uid) != 0) fail(4);
    }
    // After the change of user, which clears it.
    if (::prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) fail(5);
    if (::getppid() != parent) ::_exit(0);  // the test is already gone
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    ::signal(SIGPIPE, SIG_DFL);
    ::signal(SIGCHLD, SIG_DFL);
    ::execve(argv[0], argv.data(), envp.data());
    fail(6);
  }
  ::close(err_pipe[1]);
  int code[2] = {0, 0};
  ssize_t n;
  do n = ::read(err_pipe[0], code, sizeof code);
  while (n < 0 && errno == EINTR);
  ::close(err_pipe[0]);
  if (n == static_cast<ssize_t>(sizeof code)) {
    ::waitpid(pid, nullptr, 0);
    static const char* const what[] = {"", "open /dev/null", "open the log file", "dup2", "drop privileges to 'postgres'",
                                       "prctl", "exec"};
    throw Error(fmt::format("PatroniCluster: cannot start {}: {} failed: {}", args[0], what[code[0]],
                            std::strerror(code[1])));
  }
  return pid;
}

// Runs a program (as ourselves) to completion: its exit status and output.
std::pair<int, std::string> run_capture(const std::vector<std::string>& args, std::chrono::seconds timeout) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw Error(fmt::format("PatroniCluster: pipe: {}", std::strerror(errno)));
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) throw Error(fmt::format("PatroniCluster: fork: {}", std::strerror(errno)));
  if (pid == 0) {
    int in = ::open("/dev/null", O_RDONLY);
    if (in >= 0) ::dup2(in, 0);
    ::dup2(fds[1], 1);
    ::dup2(fds[1], 2);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  auto deadline = Steady::now() + timeout;
  bool timed_out = false;
  for (;;) {
    pollfd p{fds[0], POLLIN, 0};
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Steady::now()).count());
    if (left <= 0) {
      timed_out = true;
      break;
    }
    int r = ::poll(&p, 1, left);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) return {-1, out + "\n(timed out)"};
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

std::string find_bin_dir() {
  std::string best;
  int best_ver = -1;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/usr/lib/postgresql", ec)) {
    int ver = std::atoi(e.path().filename().c_str());
    if (ver > best_ver && ::access((e.path() / "bin" / "postgres").c_str(), X_OK) == 0) {
      best_ver = ver;
      best = (e.path() / "bin").string();
    }
  }
  if (best.empty()) throw Error("PatroniCluster: no PostgreSQL under /usr/lib/postgresql/<version>/bin");
  return best;
}

// The HTTP status of GET path on 127.0.0.1:port; 0 when nothing answers in time.
int http_status(int port, const std::string& path, std::chrono::milliseconds timeout = 2000ms) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  auto deadline = Steady::now() + timeout;
  auto left = [&] {
    return std::max<int>(0, static_cast<int>(
                                std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Steady::now()).count()));
  };
  int status = 0;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 && errno != EINPROGRESS) {
    ::close(fd);
    return 0;
  }
  pollfd p{fd, POLLOUT, 0};
  if (::poll(&p, 1, left()) == 1) {
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err == 0) {
      std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
      std::size_t sent = 0;
      while (sent < req.size()) {
        ssize_t n = ::send(fd, req.data() + sent, req.size() - sent, MSG_NOSIGNAL);
        if (n > 0) {
          sent += static_cast<std::size_t>(n);
          continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
          pollfd w{fd, POLLOUT, 0};
          if (::poll(&w, 1, left()) != 1) break;
          continue;
        }
        break;
      }
      std::string got;
      char buf[1024];
      while (sent == req.size() && got.find("\r\n") == std::string::npos) {
        pollfd r{fd, POLLIN, 0};
        if (::poll(&r, 1, left()) != 1) break;
        ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (n <= 0) break;
        got.append(buf, static_cast<std::size_t>(n));
      }
      // "HTTP/1.0 200 OK"
      auto sp = got.find(' ');
      if (got.rfind("HTTP/", 0) == 0 && sp != std::string::npos) status = std::atoi(got.c_str() + sp + 1);
    }
  }
  ::close(fd);
  return status;
}

// Whether the server at `conninfo` answers and takes writes.
bool takes_writes(const std::string& conninfo) {
  PGconn* c = PQconnectdb((conninfo + " connect_timeout=2").c_str());
  bool ok = false;
  if (PQstatus(c) == CONNECTION_OK) {
    PGresult* r = PQexec(c, "SELECT pg_is_in_recovery()");
    ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && std::string(PQgetvalue(r, 0, 0)) == "f";
    PQclear(r);
  }
  PQfinish(c);
  return ok;
}

// The application_name of the standby streaming synchronously from the server at `conninfo`, or empty.
std::string streaming_sync(const std::string& conninfo) {
  PGconn* c = PQconnectdb((conninfo + " connect_timeout=2").c_str());
  std::string name;
  if (PQstatus(c) == CONNECTION_OK) {
    PGresult* r = PQexec(c, "SELECT application_name FROM pg_stat_replication "
                            "WHERE state = 'streaming' AND sync_state = 'sync'");
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) >= 1) name = PQgetvalue(r, 0, 0);
    PQclear(r);
  }
  PQfinish(c);
  return name;
}

// Reaps the zombies of the cluster's processes that land on this process (a
// child subreaper): our own etcd and Patroni children, and the postmasters
// (with their backends) that Patroni starts detached. Others' children are
// left to whoever waits for them: only processes named like the cluster's.
class Reaper {
 public:
  Reaper() {
    ::prctl(PR_SET_CHILD_SUBREAPER, 1);
    thread_ = std::thread([this] { loop(); });
  }
  ~Reaper() {
    stop_ = true;
    thread_.join();
    reap_once();
    ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  }
  Reaper(const Reaper&) = delete;
  Reaper& operator=(const Reaper&) = delete;

 private:
  void loop() {
    while (!stop_) {
      reap_once();
      std::this_thread::sleep_for(20ms);
    }
  }
  static void reap_once() {
    static const std::set<std::string> ours{"postgres", "patroni", "etcd", "pg_rewind", "pg_basebackup", "initdb",
                                            "pg_ctl", "python3", "pg_controldata"};
    const pid_t self = ::getpid();
    DIR* d = ::opendir("/proc");
    if (!d) return;
    while (dirent* e = ::readdir(d)) {
      if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
      std::ifstream stat(std::string("/proc/") + e->d_name + "/stat");
      std::string line;
      if (!std::getline(stat, line)) continue;
      auto open = line.find('(');
      auto close = line.rfind(')');
      if (open == std::string::npos || close == std::string::npos || close + 4 >= line.size()) continue;
      std::string comm = line.substr(open + 1, close - open - 1);
      char state = line[close + 2];
      long ppid = std::atol(line.c_str() + close + 4);
      if (state == 'Z' && ppid == self && ours.count(comm)) ::waitpid(std::atoi(e->d_name), nullptr, WNOHANG);
    }
    ::closedir(d);
  }
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace

struct PatroniCluster::Impl {
  PatroniOptions o;
  RunAs as = run_as();
  std::unique_ptr<Reaper> reaper = std::make_unique<Reaper>();
  fs::path dir, log_dir;
  std::string dir_s, bin_dir;
  int etcd_client = 0, etcd_peer = 0;
  std::vector<int> pg, rest;
  pid_t etcd = -1;
  std::vector<pid_t> patroni;

  std::string name(int i) const { return "n" + std::to_string(i); }
  fs::path config(int i) const { return dir / (name(i) + ".yml"); }
  fs::path data(int i) const { return dir / name(i) / "data"; }
  fs::path log(int i) const { return log_dir / (name(i) + ".log"); }

  void chown_to_us(const fs::path& p) const {
    if (as.drop && ::chown(p.c_str(), as.uid, as.gid) != 0)
      throw Error(fmt::format("PatroniCluster: chown {}: {}", p.string(), std::strerror(errno)));
  }
  std::vector<std::string> env() const {
    return {"PATH=/usr/bin:/bin", "HOME=" + dir.string(), "LANG=C.UTF-8", "LC_ALL=C.UTF-8", "PYTHONUNBUFFERED=1"};
  }

  void write_config(int i) const {
    std::string params;
    for (const auto& p : o.parameters) params += "        " + p + "\n";
    std::string yml = fmt::format(R"(scope: eoqha
namespace: /eoq/
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry_timeout}
    maximum_lag_on_failover: 1048576
    primary_start_timeout: 0
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_log_hints: 'on'
        max_connections: 300
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 256MB
        fsync: 'off'
        shared_buffers: 64MB
{params}  initdb:
  - encoding: UTF8
  - auth: trust
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/{name}/pgpass
  authentication:
    superuser:
      username: postgres
    replication:
      username: postgres
    rewind:
      username: postgres
  parameters:
    unix_socket_directories: '{dir}/{name}'
  pg_hba:
  - local all all trust
  - host replication all 127.0.0.1/32 trust
  - host all all 127.0.0.1/32 trust
)",
                                  fmt::arg("name", name(i)), fmt::arg("rest", rest[i]), fmt::arg("etcd", etcd_client),
                                  fmt::arg("ttl", o.ttl), fmt::arg("loop_wait", o.loop_wait),
                                  fmt::arg("retry_timeout", o.retry_timeout), fmt::arg("params", params),
                                  fmt::arg("pg", pg[i]), fmt::arg("data", data(i).string()), fmt::arg("bin", bin_dir),
                                  fmt::arg("dir", dir.string()));
    std::ofstream out(config(i));
    out << yml;
    out.close();
    if (!out) throw Error("PatroniCluster: cannot write " + config(i).string());
    chown_to_us(config(i));
  }

  void start_etcd() {
    auto client = fmt::format("http://127.0.0.1:{}", etcd_client);
    auto peer = fmt::format("http://127.0.0.1:{}", etcd_peer);
    etcd = spawn({"/usr/bin/etcd", "--name", "e0", "--data-dir", (dir / "etcd").string(), "--listen-client-urls", client,
                  "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                  "--initial-cluster", "e0=" + peer, "--initial-cluster-state", "new", "--initial-cluster-token",
                  "eoqha-" + std::to_string(::getpid())},
                 env(), log_dir / "etcd.log", as);
    auto deadline = Steady::now() + 60s;
    while (http_status(etcd_client, "/health") != 200) {
      if (gone(etcd) || Steady::now() > deadline)
        throw Error("PatroniCluster: etcd did not come up; " + tail(slurp(log_dir / "etcd.log")));
      std::this_thread::sleep_for(50ms);
    }
  }

  void start_patroni(int i) {
    if (patroni[i] > 0 && !gone(patroni[i])) throw Error("PatroniCluster: " + name(i) + "'s Patroni is running already");
    patroni[i] = spawn({"/usr/bin/patroni", config(i).string()}, env(), log(i), as);
  }

  void stop_patroni(int i, std::chrono::seconds timeout) {
    if (patroni[i] <= 0) return;
    if (!gone(patroni[i])) {
      ::kill(patroni[i], SIGTERM);
      if (!wait_gone(patroni[i], timeout)) {
        ::kill(patroni[i], SIGKILL);
        wait_gone(patroni[i], 10s);
      }
    }
    patroni[i] = -1;
  }

  int postmaster(int i) const {
    std::ifstream in(data(i) / "postmaster.pid");
    long pid = 0;
    if (!(in >> pid) || pid <= 0 || gone(static_cast<pid_t>(pid))) return -1;
    // Only a postgres serving this data directory.
    if (cmdline_of(static_cast<pid_t>(pid)).find(data(i).string()) == std::string::npos) return -1;
    return static_cast<int>(pid);
  }

  void teardown() noexcept {
    try {
      for (std::size_t i = 0; i < patroni.size(); ++i)
        if (patroni[i] > 0 && !gone(patroni[i])) ::kill(patroni[i], SIGTERM);
      for (std::size_t i = 0; i < patroni.size(); ++i) stop_patroni(static_cast<int>(i), 30s);
      for (std::size_t i = 0; i < patroni.size(); ++i) {
        int pm = postmaster(static_cast<int>(i));
        if (pm <= 0) continue;
        ::kill(pm, SIGQUIT);
        if (!wait_gone(pm, 10s)) {
          ::kill(pm, SIGKILL);
          wait_gone(pm, 10s);
        }
      }
      if (etcd > 0 && !gone(etcd)) {
        ::kill(etcd, SIGTERM);
        if (!wait_gone(etcd, 10s)) {
          ::kill(etcd, SIGKILL);
          wait_gone(etcd, 10s);
        }
      }
    } catch (...) {
    }
    reaper.reset();
    std::error_code ec;
    if (!dir.empty() && !std::getenv("EOQ_TEST_KEEP_PATRONI") && dir.filename().string().rfind("eoqha-", 0) == 0)
      fs::remove_all(dir, ec);
  }
};

PatroniCluster::PatroniCluster(PatroniOptions options) : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  m.o = std::move(options);
  if (m.o.nodes < 1) throw Error("PatroniCluster: needs at least one node");
  for (const char* p : {"/usr/bin/patroni", "/usr/bin/patronictl", "/usr/bin/etcd"})
    if (::access(p, X_OK) != 0)
      throw Error(fmt::format("PatroniCluster: {} is missing (apt-get install patroni etcd-server)", p));
  m.bin_dir = m.o.bin_dir.empty() ? find_bin_dir() : m.o.bin_dir;
  char tmpl[] = "/tmp/eoqha-XXXXXX";
  if (!::mkdtemp(tmpl)) throw Error(fmt::format("PatroniCluster: mkdtemp: {}", std::strerror(errno)));
  m.dir = tmpl;
  m.dir_s = m.dir.string();
  try {
    m.chown_to_us(m.dir);
    m.log_dir = m.o.log_dir.empty() ? m.dir : fs::path(m.o.log_dir);
    fs::create_directories(m.log_dir);
    auto ports = free_ports(2 + 2 * m.o.nodes);
    m.etcd_client = ports[0];
    m.etcd_peer = ports[1];
    m.patroni.assign(static_cast<std::size_t>(m.o.nodes), -1);
    for (int i = 0; i < m.o.nodes; ++i) {
      m.pg.push_back(ports[2 + 2 * i]);
      m.rest.push_back(ports[3 + 2 * i]);
      fs::create_directories(m.dir / m.name(i));
      ::chmod((m.dir / m.name(i)).c_str(), 0700);
      m.chown_to_us(m.dir / m.name(i));
      m.write_config(i);
    }
    m.start_etcd();
    // Node 0 bootstraps alone, so that it is the first leader; then the replicas.
    m.start_patroni(0);
    auto deadline = Steady::now() + 120s;
    while (!(http_status(m.rest[0], "/primary") == 200 && takes_writes(node_conninfo(0)))) {
      if (gone(m.patroni[0]) || Steady::now() > deadline)
        throw Error("PatroniCluster: n0 did not bootstrap; " + tail(log(0)));
      std::this_thread::sleep_for(100ms);
    }
    for (int i = 1; i < m.o.nodes; ++i) m.start_patroni(i);
    wait_healthy(180s);
    // Every replica streaming, not only the synchronous one.
    deadline = Steady::now() + 120s;
    for (int i = 1; i < m.o.nodes; ++i)
      while (rest_status(i, "/replica") != 200) {
        if (Steady::now() > deadline) throw Error("PatroniCluster: " + name(i) + " did not start as a replica; " + tail(log(i)));
        std::this_thread::sleep_for(100ms);
      }
  } catch (...) {
    m.teardown();
    throw;
  }
}

PatroniCluster::~PatroniCluster() { impl_->teardown(); }

int PatroniCluster::nodes() const noexcept { return impl_->o.nodes; }
std::string PatroniCluster::name(int node) const { return impl_->name(node); }
int PatroniCluster::pg_port(int node) const { return impl_->pg.at(static_cast<std::size_t>(node)); }
int PatroniCluster::rest_port(int node) const { return impl_->rest.at(static_cast<std::size_t>(node)); }
const std::string& PatroniCluster::directory() const noexcept { return impl_->dir_s; }

std::string PatroniCluster::conninfo(int connect_timeout_s) const {
  std::string hosts, ports;
  for (int i = 0; i < nodes(); ++i) {
    hosts += (i ? "," : "") + std::string("127.0.0.1");
    ports += (i ? "," : "") + std::to_string(pg_port(i));
  }
  return fmt::format("host={} port={} user=postgres dbname=postgres target_session_attrs=read-write connect_timeout={}",
                     hosts, ports, connect_timeout_s);
}

std::string PatroniCluster::url() const {
  std::string hosts;
  for (int i = 0; i < nodes(); ++i) hosts += fmt::format("{}127.0.0.1:{}", i ? "," : "", pg_port(i));
  return fmt::format("postgresql://postgres@{}/postgres?target_session_attrs=read-write&connect_timeout=3", hosts);
}

std::string PatroniCluster::node_conninfo(int node) const {
  return fmt::format("host=127.0.0.1 port={} user=postgres dbname=postgres", pg_port(node));
}

int PatroniCluster::rest_status(int node, const std::string& path) const { return http_status(rest_port(node), path); }

int PatroniCluster::leader() const {
  for (int i = 0; i < nodes(); ++i)
    if (patroni_pid(i) > 0 && rest_status(i, "/primary") == 200) return i;
  return -1;
}

int PatroniCluster::sync_standby() const {
  for (int i = 0; i < nodes(); ++i)
    if (patroni_pid(i) > 0 && rest_status(i, "/sync") == 200) return i;
  return -1;
}

int PatroniCluster::wait_healthy(std::chrono::milliseconds timeout) const {
  auto deadline = Steady::now() + timeout;
  for (;;) {
    int running = 0;
    for (int i = 0; i < nodes(); ++i) running += patroni_pid(i) > 0;
    int l = leader();
    if (l >= 0 && takes_writes(node_conninfo(l))) {
      if (running == 1) return l;
      int s = sync_standby();
      if (s >= 0 && s != l && streaming_sync(node_conninfo(l)) == name(s)) return l;
    }
    if (Steady::now() > deadline) {
      std::string logs;
      for (int i = 0; i < nodes(); ++i) logs += "\n" + name(i) + ": " + tail(log(i), 1500);
      throw Error("PatroniCluster: not healthy in time (a leader that takes writes and a sync standby streaming); " +
                  list() + logs);
    }
    std::this_thread::sleep_for(100ms);
  }
}

int PatroniCluster::wait_new_leader(int old_leader, std::chrono::milliseconds timeout) const {
  auto deadline = Steady::now() + timeout;
  for (;;) {
    int l = leader();
    if (l >= 0 && l != old_leader && takes_writes(node_conninfo(l))) return l;
    if (Steady::now() > deadline) throw Error("PatroniCluster: no new leader in time; " + list());
    std::this_thread::sleep_for(50ms);
  }
}

int PatroniCluster::postmaster_pid(int node) const { return impl_->postmaster(node); }

std::vector<int> PatroniCluster::walsender_pids(int node) const {
  PGconn* c = PQconnectdb((node_conninfo(node) + " connect_timeout=2").c_str());
  std::vector<int> pids;
  if (PQstatus(c) == CONNECTION_OK) {
    PGresult* r = PQexec(c, "SELECT pid FROM pg_stat_replication");
    if (PQresultStatus(r) == PGRES_TUPLES_OK)
      for (int i = 0; i < PQntuples(r); ++i) pids.push_back(std::atoi(PQgetvalue(r, i, 0)));
    PQclear(r);
  }
  PQfinish(c);
  return pids;
}

int PatroniCluster::patroni_pid(int node) const {
  pid_t p = impl_->patroni.at(static_cast<std::size_t>(node));
  return p > 0 && !gone(p) ? p : -1;
}

void PatroniCluster::kill_postmaster(int node) {
  int pm = postmaster_pid(node);
  if (pm <= 0) throw Error("PatroniCluster: " + name(node) + " has no postmaster running");
  if (::kill(pm, SIGKILL) != 0) throw Error(fmt::format("PatroniCluster: kill {}: {}", pm, std::strerror(errno)));
}

void PatroniCluster::stop_patroni(int node) { impl_->stop_patroni(node, std::chrono::seconds(60)); }

void PatroniCluster::signal_patroni(int node, int signal) {
  int pid = patroni_pid(node);
  if (pid <= 0) throw Error("PatroniCluster: " + name(node) + "'s Patroni is not running");
  ::kill(pid, signal);
}

void PatroniCluster::wait_patroni_exit(int node) { impl_->stop_patroni(node, std::chrono::seconds(60)); }

void PatroniCluster::start_patroni(int node) { impl_->start_patroni(node); }

std::string PatroniCluster::switchover(int to) {
  int from = leader();
  if (from < 0) throw Error("PatroniCluster: switchover: no leader; " + list());
  auto [status, out] = run_capture({"/usr/bin/patronictl", "-c", impl_->config(to).string(), "switchover", "--leader",
                                    name(from), "--candidate", name(to), "--force"},
                                   std::chrono::seconds(120));
  if (status != 0 || out.find("Successfully switched over") == std::string::npos)
    throw Error(fmt::format("PatroniCluster: patronictl switchover {} -> {} failed (status {}):\n{}", name(from), name(to),
                            status, out));
  return out;
}

std::string PatroniCluster::list() const {
  return run_capture({"/usr/bin/patronictl", "-c", impl_->config(0).string(), "list"}, std::chrono::seconds(30)).second;
}

std::string PatroniCluster::log(int node) const { return slurp(impl_->log(node)); }

}  // namespace eoq::test
