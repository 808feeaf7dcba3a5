#pragma once
// The operator's view of a store: a JSON API and a one-page live dashboard.
// `eoq dashboard` serves it; a host with its own HTTP server mounts it under a
// prefix by handing requests to Dashboard::handle. Link eoq::dashboard.
#include <eoq/task_store.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace eoq {

struct HttpRequest {
  std::string method{};                         // GET, POST, ...
  std::string path{};                           // the full path, prefix included, no query
  std::string query{};                          // the raw query string, without '?'
  std::map<std::string, std::string> headers{};  // names in lower case
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
// naming the line on anything else.
std::vector<ApiToken> load_tokens(const std::string& path);

struct DashboardOptions {
  std::string prefix{};              // where the host mounts it, e.g. "/eoq"; "" for the root
  std::vector<ApiToken> tokens{};    // bearer tokens accepted
  bool no_auth = false;              // no tokens needed: every request is an admin with write rights
  std::size_t max_body_bytes = 1 << 20;
};

class Dashboard {
 public:
  // Throws InvalidArgument for a bad prefix, or for no tokens without no_auth.
  Dashboard(TaskStore& store, DashboardOptions options);
  ~Dashboard();
  Dashboard(const Dashboard&) = delete;
  Dashboard& operator=(const Dashboard&) = delete;

  // Thread-safe. Answers 404 for paths outside the prefix, so a host may try
  // it first and fall through to its own routes.
  HttpResponse handle(const HttpRequest& request) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A Dashboard on its own HTTP server (cpp-httplib), for `eoq dashboard`.
class DashboardServer {
 public:
  // `listen` is host:port ("127.0.0.1:8080"; port 0 picks a free one). Refuses
  // (InvalidArgument naming "listen") a non-loopback address without tokens,
  // and no_auth on a non-loopback address.
  DashboardServer(TaskStore& store, DashboardOptions options, std::string listen);
  ~DashboardServer();  // stops
  DashboardServer(const DashboardServer&) = delete;
  DashboardServer& operator=(const DashboardServer&) = delete;

  void start();  // binds and serves on background threads; throws Error when it cannot bind
  int port() const noexcept;  // the bound port, after start()
  void stop();   // idempotent

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace eoq
