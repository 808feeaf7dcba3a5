// A throwaway PostgreSQL server: initdb into a fresh temporary directory, start
// `postgres` as a child process (as the `postgres` user when we are root), stop
// it by pid. Every program is run with fork/exec and an argv vector; no shell.
//
// Layout of the directory (kept short: the Unix socket path must fit in ~107 bytes):
//   <parent>/eoqpg-XXXXXX/            socket directory (.s.PGSQL.<port>)
//   <parent>/eoqpg-XXXXXX/data/       the cluster
//   <parent>/eoqpg-XXXXXX/initdb.log  initdb's output
//   <parent>/eoqpg-XXXXXX/server.log  the server's stderr
//
// With listen_tcp the connection string uses 127.0.0.1 and the chosen port (the
// Unix socket stays available in the directory as well).
#include <eoq/errors.hpp>
#include <eoq/testing.hpp>

#include <libpq-fe.h>

#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

namespace eoq::testing {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

constexpr std::size_t kMaxSocketPath = 107;  // sizeof(sockaddr_un::sun_path) - 1
constexpr auto kStartTimeout = 60s;
constexpr auto kStopTimeout = 30s;

struct RunAs {
  bool drop = false;  // true when we are root: the child becomes this user
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
    throw Error("TempPostgres: running as root, but there is no 'postgres' user to run the server as "
                "(PostgreSQL refuses to run as root)");
  r.drop = true;
  r.uid = pw.pw_uid;
  r.gid = pw.pw_gid;
  return r;
}

bool executable(const fs::path& p) { return ::access(p.c_str(), X_OK) == 0; }

std::string tail_of(const fs::path& file, std::size_t bytes = 3000) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return "(no log at " + file.string() + ")";
  in.seekg(0, std::ios::end);
  auto size = static_cast<std::size_t>(std::max<std::streamoff>(0, in.tellg()));
  std::size_t from = size > bytes ? size - bytes : 0;
  in.seekg(static_cast<std::streamoff>(from));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  if (text.empty()) return fmt::format("({} is empty)", file.string());
  return fmt::format("last lines of {}:\n{}{}", file.string(), from ? "...\n" : "", text);
}

// Quotes a value for a libpq key=value connection string.
std::string conn_value(std::string_view v) {
  std::string out = "'";
  for (char c : v) {
    if (c == '\'' || c == '\\') out += '\\';
    out += c;
  }
  return out + "'";
}

// Closes every descriptor above 2 in a freshly forked child.
void close_other_fds() noexcept {
  long max = ::sysconf(_SC_OPEN_MAX);
  if (max < 0 || max > 65536) max = 65536;
  for (int fd = 3; fd < max; ++fd) ::close(fd);
}

// fork + exec of argv[0] (a full path) with stdin from /dev/null and stdout and
// stderr appended to `log`. Only async-signal-safe calls between fork and exec.
// new_session: the child leads its own session, so a terminal's or ctest's
// signals to our process group do not reach it.
pid_t spawn(const std::vector<std::string>& args, const fs::path& log, const RunAs& as, bool new_session) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::string log_path = log.string();

  int err_pipe[2];
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) throw Error(fmt::format("TempPostgres: pipe: {}", std::strerror(errno)));
  pid_t pid = ::fork();
  if (pid < 0) {
    int e = errno;
    ::close(err_pipe[0]);
    ::close(err_pipe[1]);
    throw Error(fmt::format("TempPostgres: fork: {}", std::strerror(e)));
  }
  if (pid == 0) {
    auto fail = [&](int stage) {
      int code[2] = {stage, errno};
      [[maybe_unused]] auto n = ::write(err_pipe[1], code, sizeof code);
      ::_exit(127);
    };
    if (new_session) ::setsid();
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
    // Signals we may have blocked or ignored must not leak into the server.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    ::signal(SIGPIPE, SIG_DFL);
    ::execv(argv[0], argv.data());
    fail(5);
  }
  ::close(err_pipe[1]);
  int code[2] = {0, 0};
  ssize_t n;
  do n = ::read(err_pipe[0], code, sizeof code);
  while (n < 0 && errno == EINTR);
  ::close(err_pipe[0]);
  if (n == static_cast<ssize_t>(sizeof code)) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    static const char* const what[] = {"", "open /dev/null", "open log file", "dup2", "drop privileges to 'postgres'",
                                       "exec"};
    throw Error(fmt::format("TempPostgres: cannot start {}: {} failed: {}", args[0], what[code[0]],
                            std::strerror(code[1])));
  }
  return pid;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("was killed by signal {}", WTERMSIG(status));
  return "stopped";
}

// Runs a program to completion; throws with the log tail when it fails.
void run_to_completion(const std::vector<std::string>& args, const fs::path& log, const RunAs& as) {
  pid_t pid = spawn(args, log, as, false);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw Error(fmt::format("TempPostgres: waitpid: {}", std::strerror(errno)));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw Error(fmt::format("TempPostgres: {} {}; {}", args[0], describe_status(status), tail_of(log)));
}

// Output of a program (for pg_config --bindir); empty on any failure.
std::string capture(const std::vector<std::string>& args) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return {};
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    return {};
  }
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_RDWR);
    if (devnull >= 0) {
      ::dup2(devnull, 0);
      ::dup2(devnull, 2);
    }
    ::dup2(fds[1], 1);
    close_other_fds();
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  std::string out;
  char buf[512];
  for (;;) {
    ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n > 0) out.append(buf, static_cast<std::size_t>(n));
    else if (n < 0 && errno == EINTR) continue;
    else break;
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return {};
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

fs::path find_bin_dir(const std::string& configured) {
  auto usable = [](const fs::path& d) { return executable(d / "initdb") && executable(d / "postgres"); };
  if (!configured.empty()) {
    if (!usable(configured))
      throw InvalidArgument("bin_dir", fmt::format("'{}' holds no executable initdb and postgres", configured));
    return configured;
  }
  std::vector<fs::path> tried;
  auto try_dir = [&](const fs::path& d) {
    tried.push_back(d);
    return usable(d);
  };
  if (auto d = capture({"pg_config", "--bindir"}); !d.empty() && try_dir(d)) return d;
  // Debian/Ubuntu: /usr/lib/postgresql/<major>/bin, newest first.
  std::vector<std::pair<int, fs::path>> versions;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/usr/lib/postgresql", ec)) {
    const auto name = entry.path().filename().string();
    if (!name.empty() && std::all_of(name.begin(), name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      versions.emplace_back(std::atoi(name.c_str()), entry.path() / "bin");
  }
  std::sort(versions.begin(), versions.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (const auto& [v, d] : versions)
    if (try_dir(d)) return d;
  if (const char* path = std::getenv("PATH")) {
    std::stringstream ss(path);
    std::string item;
    while (std::getline(ss, item, ':'))
      if (!item.empty() && try_dir(item)) return item;
  }
  std::string list;
  for (const auto& t : tried) list += (list.empty() ? "" : ", ") + t.string();
  throw Error(fmt::format("TempPostgres: cannot find the PostgreSQL server programs (initdb, postgres); tried {}. "
                          "Install the postgresql package or set TempPostgresOptions::bin_dir",
                          list.empty() ? "nothing" : list));
}

int free_tcp_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw Error(fmt::format("TempPostgres: socket: {}", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    int e = errno;
    ::close(fd);
    throw Error(fmt::format("TempPostgres: cannot find a free TCP port: {}", std::strerror(e)));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

// Gone, or a zombie nobody reaped yet (an orphaned server's parent may be a
// container init that does not reap).
bool process_gone(pid_t pid) {
  if (::kill(pid, 0) != 0) return errno == ESRCH;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

std::optional<pid_t> read_postmaster_pid(const fs::path& data_dir) {
  std::ifstream in(data_dir / "postmaster.pid");
  long pid = 0;
  if (in >> pid && pid > 0) return static_cast<pid_t>(pid);
  return std::nullopt;
}

void chown_tree(const fs::path& p, const RunAs& as) {
  if (!as.drop) return;
  if (::chown(p.c_str(), as.uid, as.gid) != 0)
    throw Error(fmt::format("TempPostgres: chown {} to postgres: {}", p.string(), std::strerror(errno)));
}

void validate_db_name(const std::string& name) {
  bool ok = !name.empty() && name.size() <= 63 && ((name[0] >= 'a' && name[0] <= 'z') || name[0] == '_');
  for (char c : name) ok = ok && ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_');
  if (!ok)
    throw InvalidArgument("name", fmt::format("'{}' must match [a-z_][a-z0-9_]* and be at most 63 characters", name));
}

struct ConnCloser {
  void operator()(PGconn* c) const noexcept { PQfinish(c); }
};
struct ResultCloser {
  void operator()(PGresult* r) const noexcept { PQclear(r); }
};

}  // namespace

struct TempPostgres::Impl {
  TempPostgresOptions options;
  RunAs as;
  fs::path bin_dir;
  fs::path dir;         // socket directory and parent of data/
  fs::path data;
  std::string data_str;
  fs::path socket_dir;  // == dir unless dir is too long for a socket path
  bool own_socket_dir = false;
  int port = 5432;
  std::string conninfo;
  pid_t pid = -1;        // the postmaster, while running
  pid_t child = -1;      // our child process (the same as pid when we started it)

  std::string conninfo_for(const std::string& db) const {
    if (options.listen_tcp)
      return fmt::format("host=127.0.0.1 port={} user=postgres dbname={} connect_timeout=10", port, db);
    return fmt::format("host={} port={} user=postgres dbname={} connect_timeout=10", conn_value(socket_dir.string()),
                       port, db);
  }

  void create_dirs() {
    fs::path parent = options.parent_dir;
    if (parent.empty()) {
      const char* tmp = std::getenv("TMPDIR");
      parent = tmp && *tmp ? tmp : "/tmp";
    }
    std::error_code ec;
    fs::create_directories(parent, ec);
    std::string pattern = (parent / "eoqpg-XXXXXX").string();
    if (!::mkdtemp(pattern.data()))
      throw Error(fmt::format("TempPostgres: cannot create a directory in {}: {}", parent.string(),
                              std::strerror(errno)));
    dir = pattern;
    data = dir / "data";
    data_str = data.string();
    chown_tree(dir, as);
    socket_dir = dir;
    if ((socket_dir / ".s.PGSQL.65535.lock").string().size() > kMaxSocketPath) {
      std::string short_pattern = "/tmp/eoqs-XXXXXX";
      if (!::mkdtemp(short_pattern.data()))
        throw Error(fmt::format("TempPostgres: cannot create a socket directory in /tmp: {}", std::strerror(errno)));
      socket_dir = short_pattern;
      own_socket_dir = true;
      chown_tree(socket_dir, as);
    }
    if (as.drop) {
      // The server user must be able to reach its directory (a rough check: the
      // exact one would need the server user's groups).
      struct stat st {};
      for (fs::path p = fs::absolute(dir).parent_path(); p != p.root_path(); p = p.parent_path()) {
        if (::stat(p.c_str(), &st) == 0 && (st.st_mode & S_IXOTH) == 0 && st.st_uid != as.uid &&
            !(st.st_gid == as.gid && (st.st_mode & S_IXGRP))) {
          remove_dirs();
          throw Error(fmt::format("TempPostgres: the 'postgres' user cannot enter {} (choose another parent_dir)",
                                  p.string()));
        }
      }
    }
  }

  void init_cluster() {
    fs::path log = dir / "initdb.log";
    if (options.standby_of.empty()) {
      run_to_completion({(bin_dir / "initdb").string(), "-D", data.string(), "-U", "postgres", "--auth=trust",
                         "--no-locale", "-E", "UTF8", "--no-sync", "--no-instructions"},
                        log, as);
    } else {
      // The primary's files and configuration, then ours on top (later lines win).
      run_to_completion({(bin_dir / "pg_basebackup").string(), "-D", data.string(), "-X", "stream", "-c", "fast",
                         "--no-sync", "-d", options.standby_of},
                        log, as);
      std::ofstream signal(data / "standby.signal");
      signal.close();
      chown_tree(data / "standby.signal", as);
    }
    std::ofstream conf(data / "postgresql.conf", std::ios::app);
    conf << "\n# eoq::testing::TempPostgres\n"
         << "listen_addresses = '" << (options.listen_tcp ? "127.0.0.1" : "") << "'\n"
         << "port = " << port << "\n"
         << "unix_socket_directories = '" << socket_dir.string() << "'\n"
         << "max_connections = " << options.max_connections << "\n"
         << "fsync = " << (options.fsync ? "on" : "off") << "\n";
    if (!options.fsync) conf << "synchronous_commit = off\nfull_page_writes = off\n";
    conf << "logging_collector = off\n"
         << "log_min_messages = warning\n"
         << "shared_buffers = 64MB\n"
         << "dynamic_shared_memory_type = posix\n";
    if (!options.standby_of.empty()) {
      // Doubled quotes: the connection string is a quoted value in the config file.
      std::string primary = options.standby_of + " application_name=" + options.standby_name, quoted;
      for (char c : primary) quoted += c == '\'' ? std::string("''") : std::string(1, c);
      // The primary's list of synchronous standbys must not come along: once
      // promoted, this server would wait for a standby it does not have.
      conf << "primary_conninfo = '" << quoted << "'\nhot_standby = on\nsynchronous_standby_names = ''\n";
    }
    if (!options.extra_config.empty()) conf << options.extra_config << "\n";
    conf.close();
    if (!conf) throw Error(fmt::format("TempPostgres: cannot write {}", (data / "postgresql.conf").string()));
  }

  void start() {
    fs::path log = dir / "server.log";
    child = spawn({(bin_dir / "postgres").string(), "-D", data.string()}, log, as, true);
    pid = child;
    auto give_up = std::chrono::steady_clock::now() + kStartTimeout;
    std::string ping = conninfo_for("postgres");
    for (;;) {
      int status = 0;
      pid_t r = ::waitpid(child, &status, WNOHANG);
      if (r == child) {
        child = pid = -1;
        throw Error(fmt::format("TempPostgres: the server {} during startup; {}", describe_status(status),
                                tail_of(log)));
      }
      if (PQping(ping.c_str()) == PQPING_OK) break;
      if (std::chrono::steady_clock::now() > give_up) {
        stop_server();
        throw Error(fmt::format("TempPostgres: the server did not accept connections within {} s; {}",
                                kStartTimeout.count(), tail_of(log)));
      }
      std::this_thread::sleep_for(20ms);
    }
    if (auto p = read_postmaster_pid(data)) pid = *p;
    conninfo = conninfo_for("postgres");
  }

  // SIGINT (fast shutdown), then SIGKILL after the timeout. Reaps our child.
  void stop_server() noexcept {
    if (pid <= 0) return;
    ::kill(pid, SIGINT);
    auto deadline = std::chrono::steady_clock::now() + kStopTimeout;
    bool killed = false;
    for (;;) {
      if (child > 0) {
        int status = 0;
        if (::waitpid(child, &status, WNOHANG) == child) {
          if (child == pid) break;
          child = -1;
        }
      }
      if (process_gone(pid)) break;
      if (!killed && std::chrono::steady_clock::now() > deadline) {
        ::kill(pid, SIGKILL);
        killed = true;
        deadline = std::chrono::steady_clock::now() + 10s;
      } else if (killed && std::chrono::steady_clock::now() > deadline) {
        break;  // nothing more we can do
      }
      std::this_thread::sleep_for(10ms);
    }
    if (child > 0) {
      int status = 0;
      ::waitpid(child, &status, WNOHANG);
    }
    child = pid = -1;
  }

  void remove_dirs() noexcept {
    std::error_code ec;
    if (!dir.empty()) fs::remove_all(dir, ec);
    if (own_socket_dir) fs::remove_all(socket_dir, ec);
    dir.clear();
  }
};

TempPostgres::TempPostgres(TempPostgresOptions options) : impl_(std::make_unique<Impl>()) {
  auto& I = *impl_;
  if (options.max_connections < 1) throw InvalidArgument("max_connections", "must be at least 1");
  I.options = std::move(options);
  I.as = run_as();
  I.bin_dir = find_bin_dir(I.options.bin_dir);
  I.create_dirs();
  try {
    I.port = I.options.listen_tcp ? free_tcp_port() : 5432;
    I.init_cluster();
    I.start();
  } catch (...) {
    I.stop_server();
    I.remove_dirs();
    throw;
  }
}

TempPostgres::~TempPostgres() {
  if (!impl_) return;
  impl_->stop_server();
  impl_->remove_dirs();
}

const std::string& TempPostgres::conninfo() const noexcept { return impl_->conninfo; }

std::string TempPostgres::create_database(const std::string& name) {
  validate_db_name(name);
  auto& I = *impl_;
  if (I.pid <= 0) throw UsageError("TempPostgres: create_database on a stopped server");
  std::unique_ptr<PGconn, ConnCloser> conn(PQconnectdb(I.conninfo.c_str()));
  if (PQstatus(conn.get()) != CONNECTION_OK)
    throw Error(fmt::format("TempPostgres: cannot connect to create database {}: {}", name,
                            PQerrorMessage(conn.get())));
  // The name is validated above, so quoting it is enough; no user text reaches the SQL otherwise.
  std::string sql = fmt::format("CREATE DATABASE \"{}\"", name);
  std::unique_ptr<PGresult, ResultCloser> res(PQexec(conn.get(), sql.c_str()));
  if (PQresultStatus(res.get()) != PGRES_COMMAND_OK) {
    std::string msg = PQresultErrorMessage(res.get());
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    throw Error(fmt::format("TempPostgres: CREATE DATABASE {} failed: {}", name, msg));
  }
  return I.conninfo_for(name);
}

void TempPostgres::restart() {
  auto& I = *impl_;
  I.stop_server();
  I.start();
}

void TempPostgres::stop() { impl_->stop_server(); }

void TempPostgres::stop_immediate() {
  auto& I = *impl_;
  if (I.pid <= 0) return;
  ::kill(I.pid, SIGQUIT);
  auto give_up = std::chrono::steady_clock::now() + kStopTimeout;
  for (;;) {
    if (I.child > 0 && ::waitpid(I.child, nullptr, WNOHANG) == I.child) {
      if (I.child == I.pid) break;
      I.child = -1;
    }
    if (process_gone(I.pid)) break;
    if (std::chrono::steady_clock::now() > give_up) {
      I.stop_server();  // SIGINT, then SIGKILL
      return;
    }
    std::this_thread::sleep_for(10ms);
  }
  // Gone (and reaped, when it was our child): its pid may be anyone's now.
  I.child = I.pid = -1;
}

void TempPostgres::promote() {
  auto& I = *impl_;
  std::unique_ptr<PGconn, ConnCloser> conn(PQconnectdb(I.conninfo.c_str()));
  if (PQstatus(conn.get()) != CONNECTION_OK)
    throw Error(fmt::format("TempPostgres: cannot connect to promote: {}", PQerrorMessage(conn.get())));
  std::unique_ptr<PGresult, ResultCloser> res(PQexec(conn.get(), "SELECT pg_promote(true, 60)"));
  if (PQresultStatus(res.get()) != PGRES_TUPLES_OK || std::string(PQgetvalue(res.get(), 0, 0)) != "t")
    throw Error(fmt::format("TempPostgres: pg_promote failed: {}; {}", PQresultErrorMessage(res.get()),
                            tail_of(I.dir / "server.log")));
}

int TempPostgres::port() const noexcept { return impl_->port; }

int TempPostgres::pid() const noexcept { return impl_->pid; }

const std::string& TempPostgres::data_dir() const noexcept { return impl_->data_str; }

// --- TempPgBouncer ---------------------------------------------------------------

std::string TempPgBouncer::find_binary() {
  if (const char* path = std::getenv("PATH")) {
    std::stringstream ss(path);
    std::string item;
    while (std::getline(ss, item, ':'))
      if (!item.empty() && executable(fs::path(item) / "pgbouncer")) return (fs::path(item) / "pgbouncer").string();
  }
  if (executable("/usr/sbin/pgbouncer")) return "/usr/sbin/pgbouncer";
  return {};
}

struct TempPgBouncer::Impl {
  TempPgBouncerOptions options;
  RunAs as;
  fs::path dir;
  std::string dir_str;
  std::string conninfo;
  pid_t pid = -1;

  // SIGTERM is PgBouncer's immediate shutdown (SIGINT would wait for clients).
  void stop() noexcept {
    if (pid <= 0) return;
    ::kill(pid, SIGTERM);
    auto deadline = std::chrono::steady_clock::now() + kStopTimeout;
    int status = 0;
    while (::waitpid(pid, &status, WNOHANG) != pid) {
      if (std::chrono::steady_clock::now() > deadline) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        break;
      }
      std::this_thread::sleep_for(10ms);
    }
    pid = -1;
  }
  void remove_dir() noexcept {
    std::error_code ec;
    if (!dir.empty()) fs::remove_all(dir, ec);
    dir.clear();
  }
};

TempPgBouncer::TempPgBouncer(const std::string& server_conninfo, TempPgBouncerOptions options)
    : impl_(std::make_unique<Impl>()) {
  auto& I = *impl_;
  I.options = std::move(options);
  std::string binary = I.options.binary.empty() ? find_binary() : I.options.binary;
  if (binary.empty() || !executable(binary))
    throw Error("TempPgBouncer: pgbouncer is not installed (apt-get install pgbouncer)");
  if (I.options.pool_size < 1) throw InvalidArgument("pool_size", "must be at least 1");
  // The server's address and user, and the rest of its connection string.
  std::string host, port = "5432", user = "postgres";
  std::string rest;
  {
    char* err = nullptr;
    PQconninfoOption* opts = PQconninfoParse(server_conninfo.c_str(), &err);
    if (!opts) {
      std::string why = err ? err : "cannot be parsed";
      if (err) PQfreemem(err);
      throw InvalidArgument("server_conninfo", why);
    }
    for (PQconninfoOption* o = opts; o->keyword; ++o) {
      if (!o->val) continue;
      std::string key = o->keyword;
      if (key == "host") host = o->val;
      else if (key == "port") port = o->val;
      else if (key == "user") user = o->val;
      if (key != "host" && key != "port" && key != "hostaddr") rest += fmt::format("{}={} ", key, conn_value(o->val));
    }
    PQconninfoFree(opts);
  }
  I.as = run_as();
  fs::path parent = I.options.parent_dir;
  if (parent.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    parent = tmp && *tmp ? tmp : "/tmp";
  }
  std::string pattern = (parent / "eoqpgb-XXXXXX").string();
  if (!::mkdtemp(pattern.data()))
    throw Error(fmt::format("TempPgBouncer: cannot create a directory in {}: {}", parent.string(),
                            std::strerror(errno)));
  I.dir = pattern;
  I.dir_str = pattern;
  try {
    chown_tree(I.dir, I.as);
    int listen_port = free_tcp_port();
    {
      std::ofstream users(I.dir / "users.txt");
      users << "\"" << user << "\" \"\"\n";
      std::ofstream ini(I.dir / "pgbouncer.ini");
      ini << "[databases]\n* = host=" << host << " port=" << port << "\n"
          << "[pgbouncer]\n"
          << "listen_addr = 127.0.0.1\nlisten_port = " << listen_port << "\nunix_socket_dir =\n"
          << "auth_type = trust\nauth_file = " << (I.dir / "users.txt").string() << "\n"
          << "pool_mode = " << I.options.pool_mode << "\n"
          << "default_pool_size = " << I.options.pool_size << "\nmax_db_connections = " << I.options.pool_size
          << "\nmax_client_conn = " << I.options.max_client_conn << "\n"
          // libpq sends it, and PgBouncer 1.18 refuses unknown startup parameters.
          << "ignore_startup_parameters = extra_float_digits\n"
          << "logfile = " << (I.dir / "pgbouncer.log").string() << "\n"
          << "log_connections = 0\nlog_disconnections = 0\n";
      if (!users || !ini) throw Error(fmt::format("TempPgBouncer: cannot write in {}", I.dir.string()));
    }
    I.pid = spawn({binary, (I.dir / "pgbouncer.ini").string()}, I.dir / "stderr.log", I.as, true);
    I.conninfo = rest + fmt::format("host=127.0.0.1 port={}", listen_port);
    auto give_up = std::chrono::steady_clock::now() + kStartTimeout;
    while (PQping(I.conninfo.c_str()) != PQPING_OK) {
      int status = 0;
      if (::waitpid(I.pid, &status, WNOHANG) == I.pid) {
        I.pid = -1;
        throw Error(fmt::format("TempPgBouncer: pgbouncer {} during startup; {}", describe_status(status),
                                tail_of(I.dir / "stderr.log")));
      }
      if (std::chrono::steady_clock::now() > give_up)
        throw Error(fmt::format("TempPgBouncer: pgbouncer did not accept connections within {} s; {}",
                                kStartTimeout.count(), tail_of(I.dir / "pgbouncer.log")));
      std::this_thread::sleep_for(20ms);
    }
  } catch (...) {
    I.stop();
    I.remove_dir();
    throw;
  }
}

TempPgBouncer::~TempPgBouncer() {
  if (!impl_) return;
  impl_->stop();
  impl_->remove_dir();
}

const std::string& TempPgBouncer::conninfo() const noexcept { return impl_->conninfo; }
int TempPgBouncer::pid() const noexcept { return impl_->pid; }
const std::string& TempPgBouncer::directory() const noexcept { return impl_->dir_str; }
void TempPgBouncer::stop() { impl_->stop(); }

std::string database_url_or_temp(const char* env_var) {
  if (env_var) {
    const char* v = std::getenv(env_var);
    if (v && *v) return v;
  }
  static std::mutex m;
  static std::unique_ptr<TempPostgres> server;  // destroyed (stopped) at process exit
  std::lock_guard lock(m);
  if (!server) server = std::make_unique<TempPostgres>();
  return server->conninfo();
}

}  // namespace eoq::testing
