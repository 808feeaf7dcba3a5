// DashboardServer: a Dashboard behind cpp-httplib's server. The only file that
// knows httplib; it translates requests and enforces the listen rules.
#include <eoq/dashboard.hpp>
#include <eoq/errors.hpp>

#include <arpa/inet.h>
#include <sys/socket.h>
#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

namespace eoq {
namespace {

// httplib gives each connection a thread for as long as it is kept alive, and
// a polling page keeps up to three alive; with a store that answers slowly,
// requests hold them longer still. Idle threads cost little.
constexpr std::size_t kThreads = 32;
// An oversize body is read and discarded up to this much, so the client gets
// the 400 on a connection still in step; beyond it the connection is given up.
constexpr std::size_t kDrainLimit = 64u << 20;

struct Listen {
  std::string host;
  int port = 0;
};

Listen parse_listen(const std::string& listen) {
  const auto rule = fmt::format("\"{}\" must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080 (port 0: any free port)",
                                listen);
  Listen out;
  std::string_view s = listen, port;
  if (s.starts_with('[')) {
    auto close = s.find(']');
    if (close == std::string_view::npos || close + 1 >= s.size() || s[close + 1] != ':')
      throw InvalidArgument("listen", rule);
    out.host = std::string(s.substr(1, close - 1));
    port = s.substr(close + 2);
  } else {
    auto colon = s.rfind(':');
    if (colon == std::string_view::npos || s.substr(0, colon).find(':') != std::string_view::npos)
      throw InvalidArgument("listen", rule);
    out.host = std::string(s.substr(0, colon));
    port = s.substr(colon + 1);
  }
  if (out.host.empty() || port.empty() || port.size() > 5 ||
      !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }))
    throw InvalidArgument("listen", rule);
  out.port = std::stoi(std::string(port));
  if (out.port > 65535) throw InvalidArgument("listen", rule);
  return out;
}

// Only literal loopback addresses and "localhost": a name that happens to
// resolve to 127.0.0.1 today may not tomorrow.
bool is_loopback(std::string host) {
  for (auto& c : host) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (host == "localhost" || host == "localhost.") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;
}

// The host name in a Host header: "[::1]:8080" -> "::1", "localhost:8080" -> "localhost".
std::string host_name(std::string_view h) {
  if (h.starts_with('[')) return std::string(h.substr(1, h.find(']') - 1));
  return std::string(h.substr(0, h.find(':')));
}

std::string json_error(const std::string& message, const char* field = nullptr) {
  nlohmann::json body{{"error", message}};
  if (field) body["field"] = field;
  return body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// httplib listens with a backlog of 5 (a compile-time constant of the system
// library), so a burst of connections (50 clients at once, a browser opening
// six) overflows it: the kernel drops handshakes and clients stall or fail.
// listen() again on the bound socket raises it.
class Server : public httplib::Server {
 public:
  bool raise_backlog() { return ::listen(svr_sock_, SOMAXCONN) == 0; }
};

}  // namespace

struct DashboardServer::Impl {
  Listen where;
  std::string listen;
  std::size_t max_body_bytes;
  bool no_auth;
  Dashboard dashboard;
  Server server;
  std::thread thread;
  std::mutex mutex;  // start/stop
  bool started = false, stopped = false;
  std::atomic<bool> finished{false};  // the serving thread returned
  int port = 0;

  Impl(TaskStore& store, DashboardOptions options, std::string listen_, Listen where_)
      : where(std::move(where_)),
        listen(std::move(listen_)),
        max_body_bytes(options.max_body_bytes),
        no_auth(options.no_auth),
        dashboard(store, std::move(options)) {}

  void forward(const httplib::Request& req, httplib::Response& res, std::string body) const {
    HttpRequest in;
    in.method = req.method;
    in.path = req.path;
    if (auto q = req.target.find('?'); q != std::string::npos) in.query = req.target.substr(q + 1);
    for (const auto& [name, value] : req.headers) in.headers.emplace(name, value);
    in.body = std::move(body);
    HttpResponse out = dashboard.handle(in);
    res.status = out.status;
    for (const auto& [name, value] : out.headers) res.set_header(name, value);
    res.set_content(std::move(out.body), out.content_type.c_str());
  }

  void forward_with_body(const httplib::Request& req, httplib::Response& res,
                         const httplib::ContentReader& read) const {
    // A request with neither Content-Length nor Transfer-Encoding has no body
    // (RFC 9112, 6.3), as `curl -X POST .../cancel` sends it. httplib 0.11 would
    // read such a body until the connection closes and time out instead.
    if (!req.has_header("Content-Length") && !req.has_header("Transfer-Encoding")) {
      forward(req, res, {});
      return;
    }
    std::string body;
    std::size_t total = 0;
    bool read_ok = read([&](const char* data, std::size_t n) {
      total += n;
      if (total <= max_body_bytes) body.append(data, n);
      return total <= kDrainLimit;
    });
    // httplib answers 413 itself only when a Content-Length is over kDrainLimit.
    if (total > max_body_bytes || res.status == 413) {
      res.status = 400;
      res.set_content(json_error(fmt::format("body: is more than the limit of {} bytes", max_body_bytes), "body"),
                      "application/json");
      return;
    }
    if (!read_ok) {
      res.status = 400;
      res.set_content(json_error("body: could not be read (malformed chunked or compressed body?)", "body"),
                      "application/json");
      return;
    }
    forward(req, res, std::move(body));
  }

  void configure() {
    server.new_task_queue = [] { return new httplib::ThreadPool(kThreads); };
    // httplib's default is SO_REUSEPORT, with which a second dashboard on a
    // taken port starts "fine" and the kernel splits requests between the two.
    // SO_REUSEADDR only lets a restart take the port back from TIME_WAIT.
    server.set_socket_options([](socket_t sock) {
      int yes = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    });
    server.set_payload_max_length(kDrainLimit);
    // Short, so stop() does not wait long for idle keep-alive connections
    // (httplib finishes them before its threads exit); the page polls faster.
    server.set_keep_alive_timeout(2);
    server.set_read_timeout(10);
    server.set_write_timeout(10);
    if (no_auth) {
      // A page elsewhere could point its own host name at 127.0.0.1 (DNS
      // rebinding) and read an unauthenticated dashboard; its requests carry
      // that name in Host.
      server.set_pre_routing_handler([](const httplib::Request& req, httplib::Response& res) {
        if (!req.has_header("Host") || is_loopback(host_name(req.get_header_value("Host"))))
          return httplib::Server::HandlerResponse::Unhandled;
        res.status = 403;
        res.set_content(json_error("this dashboard runs without tokens and answers only to a loopback host name "
                                   "(localhost, 127.0.0.1, [::1])"),
                        "application/json");
        return httplib::Server::HandlerResponse::Handled;
      });
    }
    auto plain = [this](const httplib::Request& req, httplib::Response& res) { forward(req, res, {}); };
    auto with_body = [this](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& read) {
      forward_with_body(req, res, read);
    };
    server.Get(".*", plain);  // and HEAD
    server.Options(".*", plain);
    server.Post(".*", with_body);
    server.Put(".*", with_body);
    server.Patch(".*", with_body);
    server.Delete(".*", with_body);
    server.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
      res.status = 500;
      res.set_content(json_error("internal error"), "application/json");
    });
  }
};

DashboardServer::DashboardServer(TaskStore& store, DashboardOptions options, std::string listen) {
  auto where = parse_listen(listen);
  if (!is_loopback(where.host)) {
    if (options.no_auth)
      throw InvalidArgument("listen", fmt::format("{} is not a loopback address, and a dashboard without tokens "
                                                  "lets anyone who can reach it submit and cancel tasks: drop "
                                                  "--no-auth (no_auth) and pass --tokens FILE, or listen on "
                                                  "127.0.0.1",
                                                  where.host));
    if (options.tokens.empty())
      throw InvalidArgument("listen", fmt::format("{} is not a loopback address: serving it needs access tokens "
                                                  "(pass --tokens FILE, or set DashboardOptions::tokens), or listen "
                                                  "on 127.0.0.1",
                                                  where.host));
  }
  impl_ = std::make_unique<Impl>(store, std::move(options), std::move(listen), std::move(where));
}

DashboardServer::~DashboardServer() { stop(); }

void DashboardServer::start() {
  auto& I = *impl_;
  std::lock_guard lock(I.mutex);
  if (I.started) throw UsageError("DashboardServer::start: already started");
  I.configure();
  int port = I.where.port;
  if (port == 0) {
    port = I.server.bind_to_any_port(I.where.host);
  } else if (!I.server.bind_to_port(I.where.host, port)) {
    port = -1;
  }
  if (port <= 0)
    throw Error(fmt::format("cannot listen on {}: {} (is the port in use, or the address not on this machine?)",
                            I.listen, std::strerror(errno)));
  if (!I.server.raise_backlog())
    throw Error(fmt::format("cannot listen on {}: {}", I.listen, std::strerror(errno)));
  I.port = port;
  I.started = true;
  I.thread = std::thread([&I] {
    I.server.listen_after_bind();
    I.finished = true;
  });
  // httplib's stop() does nothing until its loop runs, so stop() right after
  // start() would otherwise leave the thread serving forever.
  while (!I.server.is_running() && !I.finished) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

int DashboardServer::port() const noexcept { return impl_->port; }

void DashboardServer::stop() {
  if (!impl_) return;
  auto& I = *impl_;
  std::lock_guard lock(I.mutex);
  if (!I.started || I.stopped) return;
  I.stopped = true;
  I.server.stop();
  if (I.thread.joinable()) I.thread.join();
}

}  // namespace eoq
