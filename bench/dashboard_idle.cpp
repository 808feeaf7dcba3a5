// The dashboard's answer time while idle connections are held open from the
// operator's own address (issue #31: with a thread per connection, 200 of them
// delayed a request to 12 s), beside the same requests with none open, in one
// run: p50, p99 and max of authenticated GET /api/stats, each on a new
// connection as a first visit opens one, and the ratio of the two.
//
//   bench_dashboard_idle [--idle 1000] [--requests 100]
//
// On a MemoryStore, so the figures are the HTTP server's and not the
// database's. Also prints the process's resident memory before and after the
// idle connections open (both ends are in this process; the kernel's socket
// buffers are not counted). Timings only; nothing here asserts a figure.
#include <eoq/dashboard.hpp>
#include <eoq/memory_store.hpp>

#include <fmt/format.h>
#include <httplib.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
const std::string kToken = "bench-token-0123456789";

struct Args {
  int idle = 1000;
  int requests = 100;
};

struct Figures {
  double p50_ms = 0, p99_ms = 0, max_ms = 0;
  int failed = 0;
};

// The idle connections and their server ends are all in this process.
void raise_open_file_limit(int connections) {
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) != 0) throw std::runtime_error("getrlimit failed");
  if (r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &r);
  }
  if (r.rlim_cur != RLIM_INFINITY && r.rlim_cur < static_cast<rlim_t>(2 * connections + 256))
    throw std::runtime_error(fmt::format("--idle {} needs about {} open files; the hard limit is {}", connections,
                                         2 * connections + 256, r.rlim_max));
}

int open_connection(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    throw std::runtime_error("connect failed");
  }
  return fd;
}

long rss_kib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.starts_with("VmRSS:")) return std::stol(line.substr(6));
  return -1;
}

Figures measure(int port, int requests) {
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(60, 0);
  client.set_read_timeout(60, 0);
  httplib::Headers auth{{"Authorization", "Bearer " + kToken}};
  std::vector<double> ms;
  Figures f;
  for (int i = 0; i < requests; ++i) {
    auto t0 = Clock::now();
    auto r = client.Get("/api/stats", auth);
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    if (!r || r->status != 200) ++f.failed;
  }
  std::sort(ms.begin(), ms.end());
  auto at = [&](double q) {
    auto i = static_cast<std::size_t>(q * static_cast<double>(ms.size()) + 0.999999);
    return ms[std::clamp<std::size_t>(i, 1, ms.size()) - 1];
  };
  f.p50_ms = at(0.50);
  f.p99_ms = at(0.99);
  f.max_ms = ms.back();
  return f;
}

void row(const std::string& what, const Figures& f) {
  fmt::print("| {:<28} | {:>8.2f} | {:>8.2f} | {:>8.2f} | {:>6} |\n", what, f.p50_ms, f.p99_ms, f.max_ms, f.failed);
}

}  // namespace

int main(int argc, char** argv) try {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&] {
      if (i + 1 >= argc) throw std::runtime_error(k + " needs a value");
      return std::stoi(argv[++i]);
    };
    if (k == "--idle") a.idle = next();
    else if (k == "--requests") a.requests = next();
    else throw std::runtime_error("unknown flag " + k + " (--idle, --requests)");
  }
  if (a.idle < 0 || a.requests < 1) throw std::runtime_error("--idle >= 0, --requests >= 1");
  raise_open_file_limit(a.idle);

  eoq::MemoryStore store;
  eoq::NewTask t;
  t.type = "bench";
  store.submit(t);  // so the stats have a queue to show
  eoq::DashboardOptions options;
  options.tokens = {{kToken, std::nullopt, false}};
  options.on_error = [](std::string_view) {};
  eoq::DashboardServer server(store, options, "127.0.0.1:0");
  server.start();
  const int port = server.port();

  measure(port, 10);  // warm-up: first connections, the store's first answers
  auto base = measure(port, a.requests);
  const long rss_before = rss_kib();
  std::vector<int> idle;
  idle.reserve(static_cast<std::size_t>(a.idle));
  for (int i = 0; i < a.idle; ++i) idle.push_back(open_connection(port));
  // Give the server the moment it needs to take them all in, as an attacker would.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const long rss_idle = rss_kib();
  auto loaded = measure(port, a.requests);
  for (int fd : idle) ::close(fd);

  fmt::print("dashboard answers ({} x GET /api/stats with a token, a new connection each, in ms)\n\n", a.requests);
  fmt::print("| {:<28} | {:>8} | {:>8} | {:>8} | {:>6} |\n", "idle connections open", "p50", "p99", "max", "failed");
  fmt::print("|{:-<30}|{:->10}|{:->10}|{:->10}|{:->8}|\n", "", "", "", "", "");
  row("0", base);
  row(fmt::format("{}", a.idle), loaded);
  fmt::print("\nratio ({} idle / 0 idle): p50 {:.2f}x, p99 {:.2f}x\n", a.idle, loaded.p50_ms / base.p50_ms,
             loaded.p99_ms / base.p99_ms);
  fmt::print("process RSS: {:.1f} MiB before the idle connections, {:.1f} MiB with them ({:.1f} KiB each)\n",
             static_cast<double>(rss_before) / 1024, static_cast<double>(rss_idle) / 1024,
             a.idle ? static_cast<double>(rss_idle - rss_before) / a.idle : 0.0);
  return base.failed + loaded.failed == 0 ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_dashboard_idle: %s\n", e.what());
  return 1;
}
