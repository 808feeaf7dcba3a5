// DashboardServer: a Dashboard behind GNU libmicrohttpd. The only file that
// knows the HTTP server; it translates requests and enforces the listen rules.
#include <eoq/dashboard.hpp>
#include <eoq/errors.hpp>

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <mutex>
#include <optional>
#include <string_view>

namespace eoq {
namespace {

// Issue #31: a thread per connection let anyone who could reach the port stall
// the operator with idle connections. libmicrohttpd waits on all connections
// in a few epoll loops instead, so an idle connection costs a socket and its
// buffer, not a thread. More than one loop, because Dashboard::handle runs on
// the loop that owns the connection and may wait a few ms on the database
// (seconds when it is unreachable): only that loop's connections wait, the
// other loops go on answering.
constexpr unsigned kThreads = 8;
// An idle or stalled connection is closed after this long without a byte
// either way, so connections left open by anyone go away by themselves, and
// what a stalled request holds (its pool, a half-sent body) is handed back
// soon. The page polls every 0.5 s, well inside it. A sender that trickles a
// byte at a time stays; kConnections bounds those.
constexpr unsigned kIdleSeconds = 5;
// Beyond this many connections libmicrohttpd stops accepting until one closes
// (they wait in the kernel's backlog), so it bounds the memory connections can
// take: each has a fixed pool for its request line, headers and read buffer
// (kConnectionMemory), 128 MiB at most in all, paged in only as clients fill
// them (bench/dashboard_idle: ~4 KiB of resident memory per idle connection).
constexpr unsigned kConnections = 4096;
// Browser requests to localhost can carry other local apps' cookies. 32 KiB
// (libmicrohttpd's default) takes about 16 KiB of headers; 16 KiB took under
// 8 KiB, less than a single header line the previous server accepted.
constexpr std::size_t kConnectionMemory = 32u << 10;
// Files beyond the connections: the listening socket, epoll and event fds,
// the store's database connections, logs.
constexpr rlim_t kSpareFiles = 256;
// An oversize body is read and discarded up to this much, so the client gets
// the 413 on a connection still in step; beyond it the connection is given up.
constexpr std::size_t kDrainLimit = 64u << 20;
// Bodies are held whole until the request is complete, and a slow sender can
// keep one half-sent; this bounds what all of them together may hold.
constexpr std::size_t kBodyBudget = 64u << 20;

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

HttpResponse error_response(int status, const std::string& message, const char* field = nullptr) {
  HttpResponse out;
  out.status = status;
  out.body = json_error(message, field);
  return out;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// HttpRequest::path is percent-decoded, '+' left alone (it is a space only in
// a query). Decoded here from the raw target rather than taken from
// libmicrohttpd, whose decoded URL is a C string and would end at a "%00".
std::string decode_path(std::string_view raw) {
  std::string out;
  out.reserve(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) {
    int hi, lo;
    if (raw[i] == '%' && i + 2 < raw.size() && (hi = hex_digit(raw[i + 1])) >= 0 &&
        (lo = hex_digit(raw[i + 2])) >= 0) {
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += raw[i];
    }
  }
  return out;
}

bool same_word(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

std::optional<std::uint64_t> content_length(MHD_Connection* connection) {
  const char* v = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
  if (!v) return std::nullopt;
  std::uint64_t n = 0;
  auto end = v + std::strlen(v);
  if (std::from_chars(v, end, n).ec != std::errc{}) return std::nullopt;  // libmicrohttpd refuses these itself
  return n;
}

// Each connection is a file. At the usual soft limit of 1,024 the process runs
// out of files at ~1,000 idle connections: the operator's connection is not
// accepted, and the store cannot open a database connection either. So the
// soft limit is raised to fit kConnections (never past the hard one, never
// lowered; this server is meant for `eoq dashboard`'s process), and where the
// hard limit is lower, fewer connections are let in, leaving kSpareFiles.
unsigned connections_that_fit() {
  const rlim_t want = kConnections + kSpareFiles;
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) != 0) return kConnections;
  if (r.rlim_cur != RLIM_INFINITY && r.rlim_cur < want) {
    r.rlim_cur = r.rlim_max == RLIM_INFINITY ? want : std::min(want, r.rlim_max);
    ::setrlimit(RLIMIT_NOFILE, &r);
    ::getrlimit(RLIMIT_NOFILE, &r);
  }
  if (r.rlim_cur == RLIM_INFINITY || r.rlim_cur >= want) return kConnections;
  const rlim_t fit = r.rlim_cur > 2 * kSpareFiles ? r.rlim_cur - kSpareFiles : r.rlim_cur / 2;
  // libmicrohttpd splits the limit among its threads and refuses to start when a thread's share is 0.
  return static_cast<unsigned>(std::max<rlim_t>(fit, 4 * kThreads));
}

// One request in flight; libmicrohttpd hands it back on every call for the
// request (its con_cls) and says when it is done.
struct Request {
  std::string target;  // as sent: path and query, still percent-encoded
  std::string body;
  std::size_t received = 0;           // body bytes seen, kept or not
  std::size_t held = 0;               // of them, counted against kBodyBudget
  bool started = false;               // the first call (headers complete) was made
  bool keep_body = false;             // the method takes a body
  std::optional<HttpResponse> answer;  // decided before the body is in; the rest is discarded
};

}  // namespace

struct DashboardServer::Impl {
  Listen where;
  std::string listen;
  std::size_t max_body_bytes;
  bool no_auth;
  Dashboard dashboard;
  MHD_Daemon* daemon = nullptr;
  std::mutex mutex;  // start/stop
  bool started = false, stopped = false;
  int port = 0;
  std::atomic<std::size_t> held{0};  // body bytes all requests hold, against kBodyBudget

  Impl(TaskStore& store, DashboardOptions options, std::string listen_, Listen where_)
      : where(std::move(where_)),
        listen(std::move(listen_)),
        max_body_bytes(options.max_body_bytes),
        no_auth(options.no_auth),
        dashboard(store, std::move(options)) {}

  std::size_t body_budget() const { return std::max(kBodyBudget, max_body_bytes); }

  void release(Request& r) {
    held -= r.held;
    r.held = 0;
    std::string().swap(r.body);
  }

  HttpResponse too_large() const {
    return error_response(413, fmt::format("body: is more than the limit of {} bytes", max_body_bytes), "body");
  }

  // Decided from the headers alone, before any body is read.
  std::optional<HttpResponse> refuse_early(MHD_Connection* connection, const Request& r) const {
    if (no_auth) {
      // A page elsewhere could point its own host name at 127.0.0.1 (DNS
      // rebinding) and read an unauthenticated dashboard; its requests carry
      // that name in Host.
      const char* host = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_HOST);
      if (host && !is_loopback(host_name(host)))
        return error_response(403, "this dashboard runs without tokens and answers only to a loopback host name "
                                   "(localhost, 127.0.0.1, [::1])");
    }
    auto length = content_length(connection);
    if (length && ((r.keep_body && *length > max_body_bytes) || *length > kDrainLimit)) return too_large();
    return std::nullopt;
  }

  // Takes one piece of the body; false gives the connection up.
  bool take(Request& r, const char* data, std::size_t n) {
    r.received += n;
    if (r.received > kDrainLimit) return false;
    if (r.answer || !r.keep_body) return true;
    if (r.received > max_body_bytes) {
      release(r);
      r.answer = too_large();
      return true;
    }
    if (held.fetch_add(n) + n > body_budget()) {
      held -= n;
      release(r);
      auto busy = error_response(503, "body: too many requests are sending bodies at once; retry shortly", "body");
      busy.headers["Retry-After"] = "1";
      r.answer = std::move(busy);
      return true;
    }
    r.held += n;
    r.body.append(data, n);
    return true;
  }

  HttpResponse forward(MHD_Connection* connection, const char* method, Request& r) const {
    HttpRequest in;
    in.method = method;
    std::string_view target = r.target;
    auto q = target.find('?');
    in.path = decode_path(target.substr(0, q));
    if (q != std::string_view::npos) in.query = std::string(target.substr(q + 1));
    MHD_get_connection_values_n(
        connection, MHD_HEADER_KIND,
        [](void* cls, MHD_ValueKind, const char* key, std::size_t key_size, const char* value,
           std::size_t value_size) {
          static_cast<HttpRequest*>(cls)->headers.emplace(std::string(key, key_size),
                                                          value ? std::string(value, value_size) : std::string());
          return MHD_YES;
        },
        &in);
    if (r.keep_body) in.body = std::move(r.body);
    return dashboard.handle(in);
  }

  static MHD_Result queue(MHD_Connection* connection, HttpResponse out) {
    auto* body = new std::string(std::move(out.body));
    MHD_Response* response = MHD_create_response_from_buffer_with_free_callback_cls(
        body->size(), body->data(), [](void* p) { delete static_cast<std::string*>(p); }, body);
    if (!response) {
      delete body;
      return MHD_NO;
    }
    MHD_add_response_header(response, MHD_HTTP_HEADER_CONTENT_TYPE, out.content_type.c_str());
    for (const auto& [name, value] : out.headers) MHD_add_response_header(response, name.c_str(), value.c_str());
    MHD_Result queued = MHD_queue_response(connection, static_cast<unsigned>(out.status), response);
    MHD_destroy_response(response);
    return queued;
  }

  // libmicrohttpd calls this once the headers are in, once per piece of body,
  // and once more when the body is complete; a response can be queued only on
  // the first call or the last.
  MHD_Result on_request(MHD_Connection* connection, const char* method, const char* data, std::size_t* size,
                        Request& r) {
    if (!r.started) {
      r.started = true;
      const std::string_view m = method;
      r.keep_body = m != MHD_HTTP_METHOD_GET && m != MHD_HTTP_METHOD_HEAD && m != MHD_HTTP_METHOD_OPTIONS;
      r.answer = refuse_early(connection, r);
      if (!r.answer) return MHD_YES;
      // A client waiting for "100 Continue" never sends the body, and one past
      // the drain limit is not worth reading: answer now and close.
      const char* expect = MHD_lookup_connection_value(connection, MHD_HEADER_KIND, MHD_HTTP_HEADER_EXPECT);
      auto length = content_length(connection);
      if ((expect && same_word(expect, "100-continue")) || (length && *length > kDrainLimit))
        return queue(connection, std::move(*r.answer));
      return MHD_YES;
    }
    if (*size > 0) {
      const std::size_t n = *size;
      *size = 0;  // all taken: libmicrohttpd fails a connection whose handler leaves data unread
      return take(r, data, n) ? MHD_YES : MHD_NO;
    }
    HttpResponse out = r.answer ? std::move(*r.answer) : forward(connection, method, r);
    release(r);
    return queue(connection, std::move(out));
  }

  static void* on_target(void*, const char* uri, MHD_Connection*) noexcept {
    try {
      auto* r = new Request;
      r->target = uri ? uri : "";
      return r;
    } catch (...) {
      return nullptr;  // on_access then closes the connection
    }
  }

  static MHD_Result on_access(void* cls, MHD_Connection* connection, const char* /*url: decoded, see decode_path*/,
                              const char* method, const char*, const char* data, std::size_t* size,
                              void** con_cls) noexcept {
    auto& self = *static_cast<Impl*>(cls);
    auto* r = static_cast<Request*>(*con_cls);
    if (!r) return MHD_NO;
    try {
      return self.on_request(connection, method, data, size, *r);
    } catch (...) {
      try {
        self.release(*r);
        return queue(connection, error_response(500, "internal error"));
      } catch (...) {
        return MHD_NO;
      }
    }
  }

  static void on_done(void* cls, MHD_Connection*, void** con_cls, MHD_RequestTerminationCode) noexcept {
    auto* r = static_cast<Request*>(*con_cls);
    if (!r) return;
    static_cast<Impl*>(cls)->release(*r);
    delete r;
    *con_cls = nullptr;
  }
};

namespace {

// The listening socket is made here rather than by libmicrohttpd, for three
// things it would do otherwise: bind "localhost" (a name, not an address),
// SO_REUSEADDR without SO_REUSEPORT (with which a second dashboard on a taken
// port starts "fine" and the kernel splits requests between the two), and a
// backlog large enough for a burst (50 clients at once, a browser opening six)
// without the kernel dropping handshakes. Returns -1 with errno set.
int open_listener(const Listen& where, int& port_out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const auto service = std::to_string(where.port);
  if (int rc = ::getaddrinfo(where.host.c_str(), service.c_str(), &hints, &found); rc != 0) {
    errno = rc == EAI_SYSTEM ? errno : EADDRNOTAVAIL;
    return -1;
  }
  int fd = -1, saved = EADDRNOTAVAIL;
  for (addrinfo* a = found; a; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) {
      saved = errno;
      continue;
    }
    int yes = 1, no = 0;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    if (a->ai_family == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof no);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, SOMAXCONN) == 0) break;
    saved = errno;
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(found);
  if (fd < 0) {
    errno = saved;
    return -1;
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
    saved = errno;
    ::close(fd);
    errno = saved;
    return -1;
  }
  port_out = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                         : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return fd;
}

}  // namespace

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
  int port = 0;
  int fd = open_listener(I.where, port);
  if (fd < 0)
    throw Error(fmt::format("cannot listen on {}: {} (is the port in use, or the address not on this machine?)",
                            I.listen, std::strerror(errno)));
  const unsigned connections = connections_that_fit();
  // On loopback every client, the operator's browser included, has the same
  // address, so a cap per address would only lock the operator out sooner: an
  // attacker filling it fills the operator's share too. On a network address
  // (tokens required) it keeps one attacking host from taking every slot, so
  // the operator's own address still gets in.
  const unsigned per_address = is_loopback(I.where.host) ? 0 /* none */ : connections / 2;
  // From here the daemon owns fd and closes it in MHD_stop_daemon. It closes
  // it on most of its failure paths too, but not all; a failed start may leak
  // this one descriptor rather than risk closing a number reused meanwhile.
  I.daemon = MHD_start_daemon(
      MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ITC, 0, nullptr, nullptr, &Impl::on_access, &I,
      MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_THREAD_POOL_SIZE, kThreads, MHD_OPTION_CONNECTION_TIMEOUT,
      kIdleSeconds, MHD_OPTION_CONNECTION_LIMIT, connections, MHD_OPTION_PER_IP_CONNECTION_LIMIT, per_address,
      MHD_OPTION_CONNECTION_MEMORY_LIMIT, kConnectionMemory, MHD_OPTION_URI_LOG_CALLBACK,
      static_cast<void* (*)(void*, const char*, MHD_Connection*)>(&Impl::on_target), &I,
      MHD_OPTION_NOTIFY_COMPLETED, static_cast<MHD_RequestCompletedCallback>(&Impl::on_done), &I, MHD_OPTION_END);
  if (!I.daemon)
    throw Error(fmt::format("cannot listen on {}: the HTTP server did not start (out of threads or memory?)",
                            I.listen));
  I.port = port;
  I.started = true;
}

int DashboardServer::port() const noexcept { return impl_->port; }

void DashboardServer::stop() {
  if (!impl_) return;
  auto& I = *impl_;
  std::lock_guard lock(I.mutex);
  if (!I.started || I.stopped) return;
  I.stopped = true;
  // Closes every connection, idle keep-alive ones at once, after the requests
  // being handled finish.
  MHD_stop_daemon(I.daemon);
  I.daemon = nullptr;
}

}  // namespace eoq
