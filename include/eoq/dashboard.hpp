#pragma once
// The operator's view of a store: a JSON API and a one-page live dashboard.
// `eoq dashboard` serves it; a host with its own HTTP server mounts it under a
// prefix by handing requests to Dashboard::handle. Link eoq::dashboard.
//
// Mounting it in a host's cpp-httplib server (any HTTP server works the same way):
//
//   eoq::Dashboard dashboard(store, {.prefix = "/ops/eoq", .tokens = eoq::load_tokens("tokens")});
//   auto mount = [&](const httplib::Request& req, httplib::Response& res) {
//     auto q = req.target.find('?');
//     eoq::HttpRequest in{req.method, req.path, q == std::string::npos ? "" : req.target.substr(q + 1),
//                         {req.headers.begin(), req.headers.end()}, req.body};
//     eoq::HttpResponse out = dashboard.handle(in);
//     res.status = out.status;
//     for (const auto& [name, value] : out.headers) res.set_header(name, value);
//     res.set_content(out.body, out.content_type);
//   };
//   server.Get("/ops/eoq(/.*)?", mount);
//   server.Post("/ops/eoq/.*", mount);
//
// The routes (under the prefix; API answers are JSON):
//   GET  /                      the page (no token needed; it asks for one)
//   GET  /healthz               200 when the store answers, else 503 (no token needed)
//   GET  /api/me                who the token is: {"auth", "tenant", "write"}
//   GET  /api/tasks             ?queue=&status=&type=&tenant=&after=&limit=&view=summary&count=
//                               -> {"tasks", "next_after", "now"}; summary: without payload, result, checkpoint
//                               but with "result_preview" (the result's JSON text, at most 160 bytes and "…");
//                               count=N (1..1000000) adds "total" and "total_kind" for the filter (not
//                               `after`): "exact", "at_least" (more than N; total is N) or "estimate"
//   POST /api/tasks             submit (src/json/task_json.hpp's shape) -> 201 {"duplicate": false, "task"} | 200 duplicate
//   GET  /api/tasks/{id}        {"task", "attempts"}
//   POST /api/tasks/{id}/cancel 200 {"outcome", "task"}; 409 when already finished
//   POST /api/tasks/{id}/retry  200 {"outcome", "task"}; 409 when not failed, expired or cancelled
//   GET  /api/stats             ?tenant= -> {"queues", "now"}
//   GET  /metrics               the token's queues in the Prometheus text format (eoq/metrics.hpp);
//                               a scrape sends the token as `authorization: {credentials: ...}`
// Errors: {"error": message, "field": ..., "rule": ...}; 400 bad input (nothing
// written), 401 no or unknown token, 403 no rights, 404 no such task or route
// (another tenant's task answers exactly like a missing one), 405 wrong method,
// 409 not possible in the task's state, 415 a body that is not JSON, 503 the
// database is unreachable (retry later).
#include <eoq/task_store.hpp>

#include <cstdint>
#include <functional>
#include <string_view>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace eoq {

struct HttpRequest {
  std::string method{};                         // GET, HEAD, POST, ...
  std::string path{};                           // the full path, prefix included, no query, percent-decoded
  std::string query{};                          // the raw query string, without '?'
  std::map<std::string, std::string> headers{};  // names in any case: looked up case-insensitively
  std::string body{};
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body{};
  std::map<std::string, std::string> headers{};  // extra headers
};

// Who may do what. A token names one tenant (sees only that tenant's tasks, and
// submits as that tenant) or every tenant (an admin); only tokens with write
// rights may submit, cancel or retry.
struct ApiToken {
  std::string token{};
  std::optional<std::string> tenant{};  // empty: admin, every tenant
  bool write = false;
};

// Reads a token file: one token per line, "<token> <tenant|*> <read|write>";
// blank lines and lines starting with '#' are skipped. Throws InvalidArgument
// naming the line ("<path>:<line>") on anything else, on a token given twice,
// and on a file without tokens. Error messages never quote a token.
std::vector<ApiToken> load_tokens(const std::string& path);

struct DashboardOptions {
  std::string prefix{};              // where the host mounts it, e.g. "/eoq"; "" for the root
  std::vector<ApiToken> tokens{};    // bearer tokens accepted
  // No tokens needed: every request is an admin with write rights. DashboardServer
  // allows it only on loopback and answers only loopback Host names (against DNS
  // rebinding); a host that mounts a no_auth Dashboard itself must do the same.
  bool no_auth = false;
  std::size_t max_body_bytes = 1 << 20;
  // Hears the details of 500 and 503 answers, which clients get only in general
  // terms. Default: one line on stderr.
  std::function<void(std::string_view)> on_error{};
};

class Dashboard {
 public:
  // Throws InvalidArgument for a bad prefix, for no tokens without no_auth, and
  // for tokens together with no_auth.
  Dashboard(TaskStore& store, DashboardOptions options);
  ~Dashboard();
  Dashboard(const Dashboard&) = delete;
  Dashboard& operator=(const Dashboard&) = delete;

  // Thread-safe; never throws (errors become responses). Answers 404 for paths
  // outside the prefix, so a host may try it first and fall through to its own
  // routes.
  HttpResponse handle(const HttpRequest& request) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A Dashboard on its own HTTP server (GNU libmicrohttpd), for `eoq dashboard`.
class DashboardServer {
 public:
  // `listen` is host:port ("127.0.0.1:8080", "[::1]:8080"; port 0 picks a free
  // one). Refuses (InvalidArgument naming "listen") a non-loopback address
  // without tokens, and no_auth on a non-loopback address. With no_auth it
  // answers only requests whose Host is a loopback name (DNS rebinding).
  DashboardServer(TaskStore& store, DashboardOptions options, std::string listen);
  ~DashboardServer();  // stops
  DashboardServer(const DashboardServer&) = delete;
  DashboardServer& operator=(const DashboardServer&) = delete;

  void start();  // binds and serves on background threads; throws Error when it cannot bind
  int port() const noexcept;  // the bound port, after start()
  void stop();   // idempotent; waits for requests in progress

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace eoq
