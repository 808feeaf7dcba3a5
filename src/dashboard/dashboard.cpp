// The dashboard's HTTP API and page, independent of any HTTP server: requests
// come in as HttpRequest (from server.cpp or a host's server) and leave as
// HttpResponse. Every read and change goes through the TaskStore with the
// caller's Scope.
#include <eoq/dashboard.hpp>
#include <eoq/errors.hpp>

#include "common/validate.hpp"
#include "dashboard/metrics.hpp"
#include "dashboard/page.hpp"
#include "json/task_json.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <charconv>
#include <chrono>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string_view>

namespace eoq {
namespace {

using Json = nlohmann::json;

constexpr int kMaxJsonDepth = 512;  // the stores refuse deeper JSON too (validate.hpp)

char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return lower(x) == lower(y);
         });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

const std::string* header(const HttpRequest& req, std::string_view name) {
  for (const auto& [k, v] : req.headers)
    if (iequals(k, name)) return &v;
  return nullptr;
}

// Replacing invalid UTF-8 rather than throwing: error messages may quote input.
std::string dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

HttpResponse json_response(int status, const Json& body) {
  HttpResponse r;
  r.status = status;
  r.body = dump(body);
  r.headers["Cache-Control"] = "no-store";
  r.headers["X-Content-Type-Options"] = "nosniff";
  return r;
}

HttpResponse error_response(int status, std::string message, std::optional<std::string> field = {},
                            std::optional<std::string> rule = {}) {
  Json body{{"error", std::move(message)}};
  if (field) body["field"] = std::move(*field);
  if (rule) body["rule"] = std::move(*rule);
  return json_response(status, body);
}

HttpResponse bad_request(const std::string& field, const std::string& rule) {
  return error_response(400, field + ": " + rule, field, rule);
}

HttpResponse not_found() { return error_response(404, "not found"); }

// One body for "no such task" and "another tenant's task" (not even the id),
// so the answer says nothing about ids a tenant may not see.
HttpResponse task_not_found() { return error_response(404, "task not found"); }

std::string now_text() {
  return json::format_time(std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now()));
}

// The first kPreviewBytes of `text`, cut at a character boundary, with "…"
// when something was cut.
constexpr std::size_t kPreviewBytes = 160;
std::string preview(std::string text) {
  if (text.size() <= kPreviewBytes) return text;
  std::size_t end = kPreviewBytes;
  while (end > 0 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
  text.resize(end);
  return text + "\u2026";
}

// --- tokens ---------------------------------------------------------------

// Time independent of where (or whether) the two differ, and of the secret's
// length: it walks the presented token, which the caller knows anyway, and
// folds the length difference into the result instead of returning early.
bool same_token(std::string_view presented, std::string_view secret) {
  unsigned diff = presented.size() == secret.size() ? 0u : 1u;
  const std::size_t n = secret.size();
  for (std::size_t i = 0; i < presented.size(); ++i)
    diff |= static_cast<unsigned char>(presented[i]) ^ static_cast<unsigned char>(secret[n ? i % n : 0]);
  return diff == 0 && n != 0;
}

bool token_char(char c) { return c > 0x20 && c < 0x7f; }

// --- query strings ----------------------------------------------------------

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  c = lower(c);
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

std::optional<std::string> percent_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] == '%') {
      if (i + 2 >= s.size()) return std::nullopt;
      int hi = hex_value(s[i + 1]), lo = hex_value(s[i + 2]);
      if (hi < 0 || lo < 0) return std::nullopt;
      out += static_cast<char>(hi * 16 + lo);
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Parameters by name. Unknown or repeated names are refused (a typo must not
// widen a filter silently); empty values count as absent.
std::map<std::string, std::string> parse_query(std::string_view query, std::initializer_list<std::string_view> known) {
  std::map<std::string, std::string> out;
  std::set<std::string> seen;
  while (!query.empty()) {
    auto amp = query.find('&');
    auto part = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view{} : query.substr(amp + 1);
    if (part.empty()) continue;
    auto eq = part.find('=');
    auto name = percent_decode(part.substr(0, eq));
    auto value = percent_decode(eq == std::string_view::npos ? std::string_view{} : part.substr(eq + 1));
    if (!name || !value) throw InvalidArgument("query", "has a malformed percent-encoding");
    if (!detail::is_utf8(*name) || !detail::is_utf8(*value)) throw InvalidArgument("query", "must be UTF-8");
    auto control = [](const std::string& v) {
      return std::any_of(v.begin(), v.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; });
    };
    if (control(*name) || control(*value)) throw InvalidArgument("query", "must not contain control characters");
    if (std::find(known.begin(), known.end(), *name) == known.end()) {
      std::string list;
      for (auto k : known) list += (list.empty() ? "" : ", ") + std::string(k);
      throw InvalidArgument(*name, fmt::format("is not a known parameter (known: {})", list));
    }
    if (!seen.insert(*name).second) throw InvalidArgument(*name, "is given more than once");
    if (!value->empty()) out[*name] = std::move(*value);
  }
  return out;
}

std::int64_t parse_integer(const std::string& field, std::string_view text, std::int64_t lo, std::int64_t hi) {
  std::int64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || v < lo || v > hi)
    throw InvalidArgument(field, fmt::format("must be an integer between {} and {}", lo, hi));
  return v;
}

// Deeper nesting than the stores accept is refused before parsing: the JSON
// library's dump() (used for payloads) recurses once per level.
bool nests_too_deep(std::string_view text) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

// "application/json" with any parameters (charset=utf-8).
bool is_json_type(const std::string* content_type) {
  if (!content_type) return false;
  std::string_view t = *content_type;
  return iequals(trim(t.substr(0, t.find(';'))), "application/json");
}

// --- routes -----------------------------------------------------------------

enum class Route {
  page, healthz, me, tasks, task, cancel, retry, remove, bulk, stats, throughput, metrics, pause, resume, limits
};

struct Match {
  Route route;
  std::string id;  // the {id} segment, unparsed
};

std::optional<Match> match(std::string_view rest) {
  if (rest == "/") return Match{Route::page, {}};
  if (rest == "/healthz") return Match{Route::healthz, {}};
  if (rest == "/api/me") return Match{Route::me, {}};
  if (rest == "/api/stats") return Match{Route::stats, {}};
  if (rest == "/api/throughput") return Match{Route::throughput, {}};
  if (rest == "/api/tasks/bulk") return Match{Route::bulk, {}};
  if (rest == "/metrics") return Match{Route::metrics, {}};
  if (rest == "/api/tasks") return Match{Route::tasks, {}};
  constexpr std::string_view queues = "/api/queues/";
  if (rest.starts_with(queues)) {
    rest.remove_prefix(queues.size());
    auto slash = rest.find('/');
    if (slash == 0 || slash == std::string_view::npos) return std::nullopt;
    auto action = rest.substr(slash);
    std::string queue(rest.substr(0, slash));
    if (action == "/pause") return Match{Route::pause, queue};
    if (action == "/resume") return Match{Route::resume, queue};
    if (action == "/limits") return Match{Route::limits, queue};
    return std::nullopt;
  }
  constexpr std::string_view tasks = "/api/tasks/";
  if (!rest.starts_with(tasks)) return std::nullopt;
  rest.remove_prefix(tasks.size());
  auto slash = rest.find('/');
  std::string id(rest.substr(0, slash));
  if (id.empty()) return std::nullopt;
  if (slash == std::string_view::npos) return Match{Route::task, id};
  auto action = rest.substr(slash);
  if (action == "/cancel") return Match{Route::cancel, id};
  if (action == "/retry") return Match{Route::retry, id};
  if (action == "/delete") return Match{Route::remove, id};
  return std::nullopt;
}

std::vector<std::string_view> methods_of(Route r) {
  switch (r) {
    case Route::tasks: return {"GET", "POST"};
    case Route::task: return {"GET", "DELETE"};
    case Route::cancel:
    case Route::retry:
    case Route::remove:
    case Route::bulk:
    case Route::pause:
    case Route::resume:
    case Route::limits: return {"POST"};
    default: return {"GET"};
  }
}

bool allowed(Route r, std::string_view method) {
  auto m = methods_of(r);
  return std::find(m.begin(), m.end(), method) != m.end();
}

struct Principal {
  std::optional<std::string> tenant;  // empty: every tenant
  bool write = false;
  Scope scope() const { return tenant ? Scope::only(*tenant) : Scope::all(); }
};

// "http://host:port" names the same server as the Host header "host:port".
bool same_origin(std::string_view origin, const std::string* host) {
  if (!host) return false;
  for (std::string_view scheme : {"http://", "https://"})
    if (origin.starts_with(scheme)) return origin.substr(scheme.size()) == *host;
  return false;
}

}  // namespace

// --- load_tokens --------------------------------------------------------------

std::vector<ApiToken> load_tokens(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InvalidArgument(path, fmt::format("cannot be read: {}", std::strerror(errno)));
  std::vector<ApiToken> tokens;
  std::set<std::string> seen;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    auto where = fmt::format("{}:{}", path, n);
    std::string_view text = trim(line);
    if (text.empty() || text.front() == '#') continue;
    std::istringstream words{std::string(text)};
    std::vector<std::string> w;
    for (std::string s; words >> s;) w.push_back(s);
    if (w.size() != 3)
      throw InvalidArgument(where, fmt::format("must be \"<token> <tenant|*> <read|write>\", found {} fields", w.size()));
    if (!std::all_of(w[0].begin(), w[0].end(), token_char))
      throw InvalidArgument(where, "the token must be printable ASCII without spaces");
    if (!seen.insert(w[0]).second) throw InvalidArgument(where, "repeats a token given on an earlier line");
    if (w[1].size() > 256) throw InvalidArgument(where, "the tenant must be at most 256 characters");
    if (w[2] != "read" && w[2] != "write")
      throw InvalidArgument(where, fmt::format("the rights must be \"read\" or \"write\", not \"{}\"", w[2]));
    ApiToken t;
    t.token = std::move(w[0]);
    if (w[1] != "*") t.tenant = std::move(w[1]);
    t.write = w[2] == "write";
    tokens.push_back(std::move(t));
  }
  if (tokens.empty()) throw InvalidArgument(path, "has no tokens (one per line: \"<token> <tenant|*> <read|write>\")");
  return tokens;
}

// --- Dashboard ----------------------------------------------------------------

struct Dashboard::Impl {
  TaskStore& store;
  DashboardOptions options;

  void report(const std::string& what) const noexcept {
    try {
      if (options.on_error) options.on_error(what);
      else fmt::print(stderr, "eoq dashboard: {}\n", what);
    } catch (...) {
    }
  }

  // Checks every token in full whatever matched, so the time says nothing
  // about which token (or how much of one) was right.
  std::optional<Principal> authenticate(const HttpRequest& req) const {
    if (options.no_auth) return Principal{std::nullopt, true};
    const std::string* auth = header(req, "authorization");
    if (!auth) return std::nullopt;
    std::string_view v = trim(*auth);
    if (v.size() < 7 || !iequals(v.substr(0, 7), "bearer ")) return std::nullopt;
    std::string_view presented = trim(v.substr(7));
    const ApiToken* found = nullptr;
    for (const auto& t : options.tokens) {
      bool same = same_token(presented, t.token);
      found = same ? &t : found;
    }
    if (!found) return std::nullopt;
    return Principal{found->tenant, found->write};
  }

  HttpResponse unauthorized(const HttpRequest& req) const {
    bool presented = header(req, "authorization") != nullptr;
    auto r = error_response(401, presented ? "unknown token" : "a token is needed: send Authorization: Bearer <token>");
    r.headers["WWW-Authenticate"] =
        presented ? R"(Bearer realm="eoq", error="invalid_token")" : R"(Bearer realm="eoq")";
    return r;
  }

  HttpResponse route(const HttpRequest& req, std::string_view rest) const {
    const std::string method = req.method == "HEAD" ? "GET" : req.method;
    auto m = match(rest);
    if (!m) return not_found();
    if (!allowed(m->route, method)) {
      std::string allow;
      for (auto a : methods_of(m->route)) allow += (allow.empty() ? "" : ", ") + std::string(a);
      if (allow.find("GET") != std::string::npos) allow += ", HEAD";
      auto r = error_response(405, fmt::format("{} is not allowed here (allowed: {})", req.method, allow));
      r.headers["Allow"] = allow;
      return r;
    }
    if (m->route == Route::page) return page();
    if (m->route == Route::healthz) return healthz();

    auto who = authenticate(req);
    if (!who) return unauthorized(req);
    if (method == "POST" || method == "DELETE") {
      if (!who->write)
        return error_response(403, "this token is read-only: submit, cancel, retry and delete need write rights");
      // A browser marks requests another site makes it send; refusing them keeps
      // a page elsewhere from using a dashboard open without tokens.
      if (const auto* site = header(req, "sec-fetch-site"); site && *site != "same-origin" && *site != "none")
        return error_response(403, "cross-site request refused");
      // Browsers without Sec-Fetch-Site still send Origin on a cross-site POST.
      if (const auto* origin = header(req, "origin"); origin && !same_origin(*origin, header(req, "host")))
        return error_response(403, "cross-site request refused");
    }
    if (m->route == Route::pause || m->route == Route::resume) {
      // A queue is every tenant's: a tenant's token may not stop the others'.
      if (who->tenant) return error_response(403, "pausing a queue needs an admin token (tenant *)");
      const bool pause = m->route == Route::pause;
      if (pause) store.pause(m->id);
      else store.resume(m->id);
      return json_response(200, {{"queue", m->id}, {"paused", pause}});
    }
    if (m->route == Route::limits) {
      if (who->tenant) return error_response(403, "setting a queue's limits needs an admin token (tenant *)");
      Json body;
      if (auto refused = parse_body(req, body)) return *refused;
      auto limits = json::limits_from_json(body);
      store.set_limits(m->id, limits);
      return json_response(200, {{"queue", m->id}, {"limits", json::to_json(limits)}});
    }
    std::optional<TaskId> id;
    if (!m->id.empty()) id = parse_integer("id", m->id, 1, INT64_MAX);

    switch (m->route) {
      case Route::me:
        return json_response(200, {{"auth", !options.no_auth},
                                   {"tenant", who->tenant ? Json(*who->tenant) : Json(nullptr)},
                                   {"write", who->write}});
      case Route::tasks: return method == "GET" ? list(req, *who) : submit(req, *who);
      case Route::task: return method == "DELETE" ? remove(*id, *who) : get(*id, *who);
      case Route::cancel: return cancel(*id, *who);
      case Route::retry: return retry(*id, *who);
      case Route::remove: return remove(*id, *who);
      case Route::bulk: return bulk(req, *who);
      case Route::stats: return stats(req, *who);
      case Route::throughput: return throughput(req, *who);
      case Route::metrics: return detail::metrics_response(store, who->scope());
      default: return not_found();
    }
  }

  static HttpResponse page() {
    HttpResponse r;
    r.content_type = "text/html; charset=utf-8";
    r.body = std::string(detail::dashboard_page());
    // Inline script and style only: nothing may load from elsewhere, and the
    // page talks to nothing but its own origin.
    r.headers["Content-Security-Policy"] =
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
    r.headers["X-Content-Type-Options"] = "nosniff";
    r.headers["Referrer-Policy"] = "no-referrer";
    r.headers["Cache-Control"] = "no-cache";
    return r;
  }

  // Unauthenticated (load balancers probe it), so it says nothing but yes or no.
  HttpResponse healthz() const {
    try {
      ListQuery q;
      q.limit = 1;
      store.list(q);
      return json_response(200, {{"status", "ok"}});
    } catch (const std::exception&) {
      auto r = json_response(503, {{"status", "unavailable"}, {"error", "the task store does not answer"}});
      r.headers["Retry-After"] = "1";
      return r;
    }
  }

  // The filters and search of GET /api/tasks, also the "filter" of a bulk action.
  static ListQuery list_query(std::map<std::string, std::string>& p) {
    ListQuery q;
    if (p.count("queue")) q.queue = p["queue"];
    if (p.count("status")) q.status = parse_status(p["status"]);
    if (p.count("type")) q.type = p["type"];
    if (p.count("tenant")) q.tenant = p["tenant"];
    if (p.count("key")) q.key = p["key"];
    if (p.count("key_prefix")) q.key_prefix = p["key_prefix"];
    if (p.count("type_prefix")) q.type_prefix = p["type_prefix"];
    if (p.count("payload_contains")) q.payload_contains = p["payload_contains"];
    if (p.count("error")) q.error_contains = p["error"];
    return q;
  }

  HttpResponse list(const HttpRequest& req, const Principal& who) const {
    auto p = parse_query(req.query, {"queue", "status", "type", "tenant", "key", "key_prefix", "type_prefix",
                                     "payload_contains", "error", "after", "limit", "view", "order", "count"});
    bool summary = false;
    if (p.count("view")) {
      if (p["view"] != "full" && p["view"] != "summary") throw InvalidArgument("view", "must be \"full\" or \"summary\"");
      summary = p["view"] == "summary";
    }
    ListQuery q = list_query(p);
    if (p.count("after")) q.after = parse_integer("after", p["after"], 0, INT64_MAX);
    if (p.count("limit")) q.limit = static_cast<int>(parse_integer("limit", p["limit"], 1, 1000));
    if (p.count("order")) {
      if (p["order"] != "oldest" && p["order"] != "newest")
        throw InvalidArgument("order", "must be \"oldest\" or \"newest\"");
      q.newest_first = p["order"] == "newest";
    }
    if (p.count("count")) q.count_up_to = parse_integer("count", p["count"], 1, 1'000'000);
    auto page = store.list(q, who.scope());
    auto body = json::to_json(page);
    if (page.total) {
      body["total"] = page.total->count;
      body["total_kind"] = to_string(page.total->kind);
    }
    // A table polled twice a second has no use for payloads of up to a megabyte
    // each; the result's first characters are enough for its column.
    if (summary)
      for (auto& t : body["tasks"]) {
        if (t.contains("result") && !t["result"].is_null()) t["result_preview"] = preview(dump(t["result"]));
        for (const char* big : {"payload", "result", "checkpoint"}) t.erase(big);
      }
    body["now"] = now_text();
    return json_response(200, body);
  }

  // The scope a ?tenant= asks for: an admin's narrows to that tenant; a
  // tenant asking for another tenant's numbers gets none (empty), as list()
  // gives none.
  static std::optional<Scope> asked_scope(std::map<std::string, std::string>& p, const Principal& who) {
    if (!p.count("tenant")) return who.scope();
    if (who.tenant) return p["tenant"] == *who.tenant ? std::optional(who.scope()) : std::nullopt;
    return Scope::only(p["tenant"]);
  }

  HttpResponse stats(const HttpRequest& req, const Principal& who) const {
    auto p = parse_query(req.query, {"tenant"});
    Json queues = Json::array();
    if (auto scope = asked_scope(p, who))
      for (const auto& s : store.stats(*scope)) queues.push_back(json::to_json(s));
    return json_response(200, {{"queues", std::move(queues)}, {"now", now_text()}});
  }

  HttpResponse get(TaskId id, const Principal& who) const {
    auto task = store.get(id, who.scope());
    if (!task) return task_not_found();
    Json attempts = Json::array();
    for (const auto& a : store.history(id, who.scope())) attempts.push_back(json::to_json(a));
    auto family = json::to_json(store.relatives(id, who.scope()));
    return json_response(200, {{"task", json::to_json(*task)},
                               {"attempts", std::move(attempts)},
                               {"parents", std::move(family["parents"])},
                               {"children", std::move(family["children"])}});
  }

  // A JSON request body into `body`, or the answer that refuses it.
  std::optional<HttpResponse> parse_body(const HttpRequest& req, Json& body) const {
    if (req.body.size() > options.max_body_bytes)
      return bad_request("body", fmt::format("is {} bytes, more than the limit of {}", req.body.size(),
                                             options.max_body_bytes));
    if (!is_json_type(header(req, "content-type")))
      return error_response(415, "the body must be JSON: send Content-Type: application/json", "content-type");
    if (nests_too_deep(req.body)) return bad_request("body", fmt::format("nests deeper than {} levels", kMaxJsonDepth));
    try {
      body = Json::parse(req.body);
    } catch (const Json::exception& e) {
      // nlohmann prefixes "[json.exception.parse_error.101] "; the rest reads well.
      std::string why = e.what();
      if (auto close = why.find("] "); why.starts_with("[json.exception") && close != std::string::npos)
        why.erase(0, close + 2);
      return bad_request("body", "is not valid JSON: " + why);
    }
    return std::nullopt;
  }

  HttpResponse submit(const HttpRequest& req, const Principal& who) const {
    Json body;
    if (auto refused = parse_body(req, body)) return *refused;
    NewTask task = json::new_task_from_json(body);
    if (who.tenant) {
      if (task.tenant && *task.tenant != *who.tenant)
        return error_response(403,
                              fmt::format("this token submits as tenant \"{}\" only; the body names tenant \"{}\"",
                                          *who.tenant, *task.tenant),
                              "tenant");
      task.tenant = who.tenant;
    }
    auto r = store.submit(task);
    auto out = json_response(r.duplicate ? 200 : 201, {{"duplicate", r.duplicate}, {"task", json::to_json(r.task)}});
    if (!r.duplicate) out.headers["Location"] = fmt::format("{}/api/tasks/{}", options.prefix, r.task.id);
    return out;
  }

  HttpResponse cancel(TaskId id, const Principal& who) const {
    auto outcome = store.cancel(id, who.scope());
    if (outcome == CancelOutcome::not_found) return task_not_found();
    auto task = store.get(id, who.scope());
    Json body{{"outcome", to_string(outcome)}, {"task", task ? json::to_json(*task) : Json(nullptr)}};
    if (outcome != CancelOutcome::already_finished) return json_response(200, body);
    body["error"] = fmt::format("task {} already finished ({}): nothing to cancel", id,
                                task ? to_string(task->status) : "gone");
    return json_response(409, body);
  }

  HttpResponse remove(TaskId id, const Principal& who) const {
    auto outcome = store.remove(id, who.scope());
    if (outcome == RemoveOutcome::not_found) return task_not_found();
    Json body{{"outcome", to_string(outcome)}, {"id", id}};
    if (outcome == RemoveOutcome::removed) return json_response(200, body);
    body["error"] = fmt::format("task {} is running: cancel it first, then delete it once its worker has stopped it",
                                id);
    return json_response(409, body);
  }

  // Tasks finished per minute over the last `minutes` (default 60): what the
  // charts draw when a page opens.
  HttpResponse throughput(const HttpRequest& req, const Principal& who) const {
    auto p = parse_query(req.query, {"minutes", "tenant"});
    const int minutes = p.count("minutes") ? static_cast<int>(parse_integer("minutes", p["minutes"], 1, 1440)) : 60;
    Json points = Json::array();
    if (auto scope = asked_scope(p, who)) {
      for (const auto& t : store.throughput(minutes, *scope))
        points.push_back({{"queue", t.queue},
                          {"outcome", to_string(t.status)},
                          {"minute", json::format_time(t.minute)},
                          {"finished", t.finished}});
    }
    return json_response(200, {{"minutes", minutes}, {"points", std::move(points)}, {"now", now_text()}});
  }

  // POST /api/tasks/bulk {"action": "cancel"|"retry"|"delete", "ids": [...]}
  // or {"action", "filter": {the filters and search of GET /api/tasks}}: each
  // task in its own transaction, as the single actions; a filter takes at most
  // kBulkLimit tasks per request, and a request acts for at most kBulkBudget
  // ("more": true says to send it again; "remaining", the ids not reached).
  static constexpr std::size_t kBulkLimit = 10000;
  static constexpr std::chrono::seconds kBulkBudget{2};
  HttpResponse bulk(const HttpRequest& req, const Principal& who) const {
    if (!is_json_type(header(req, "content-type")))
      return error_response(415, "the body must be JSON (Content-Type: application/json)");
    Json body;
    try {
      body = Json::parse(req.body);
    } catch (const Json::parse_error&) {
      throw InvalidArgument("body", "must be a JSON object");
    }
    if (!body.is_object()) throw InvalidArgument("body", "must be a JSON object");
    for (const auto& [name, _] : body.items())
      if (name != "action" && name != "ids" && name != "filter")
        throw InvalidArgument(name, "is not a known field (known: action, ids, filter)");
    if (!body.contains("action") || !body["action"].is_string())
      throw InvalidArgument("action", "must be \"cancel\", \"retry\" or \"delete\"");
    const std::string action = body["action"];
    if (action != "cancel" && action != "retry" && action != "delete")
      throw InvalidArgument("action", "must be \"cancel\", \"retry\" or \"delete\"");
    if (body.contains("ids") == body.contains("filter"))
      throw InvalidArgument("ids", "give either ids (a list of task ids) or filter (an object of list filters)");
    std::vector<TaskId> ids;
    bool more = false;
    if (body.contains("ids")) {
      if (!body["ids"].is_array() || body["ids"].size() > kBulkLimit)
        throw InvalidArgument("ids", fmt::format("must be a list of at most {} task ids", kBulkLimit));
      for (std::size_t i = 0; i < body["ids"].size(); ++i) {
        const auto& v = body["ids"][i];
        if (!v.is_number_integer() || v.get<std::int64_t>() < 1)
          throw InvalidArgument(fmt::format("ids[{}]", i), "must be a task id (a whole number from 1)");
        ids.push_back(v.get<TaskId>());
      }
    } else {
      if (!body["filter"].is_object()) throw InvalidArgument("filter", "must be an object of list filters");
      std::map<std::string, std::string> p;
      for (const auto& [name, v] : body["filter"].items()) {
        static const std::set<std::string> known{"queue", "status", "type", "tenant", "key", "key_prefix",
                                                 "type_prefix", "payload_contains", "error"};
        if (!known.count(name))
          throw InvalidArgument("filter." + name, "is not a known filter (known: queue, status, type, tenant, key, "
                                                  "key_prefix, type_prefix, payload_contains, error)");
        if (!v.is_string()) throw InvalidArgument("filter." + name, "must be a string");
        p[name] = v.get<std::string>();
      }
      if (p.empty()) throw InvalidArgument("filter", "must name at least one filter (to act on every task, say so "
                                                     "with a filter such as status)");
      ListQuery q = list_query(p);
      q.limit = 1000;
      // Ids first, then the actions: the actions change what the filter matches.
      bool next = false;
      while (ids.size() <= kBulkLimit) {
        auto page = store.list(q, who.scope());
        for (const auto& t : page.tasks) ids.push_back(t.id);
        next = page.next_after.has_value();
        if (!next) break;
        q.after = page.next_after;
      }
      more = ids.size() > kBulkLimit || next;
      if (ids.size() > kBulkLimit) ids.resize(kBulkLimit);
    }
    // At most kBulkBudget of actions per request: the server's threads serve
    // other connections too, and a client sees its answer (with what is left
    // to do) instead of a timeout. An error stops the round; what was done is
    // still reported.
    std::map<std::string, std::int64_t> outcomes;
    const auto until = std::chrono::steady_clock::now() + kBulkBudget;
    std::size_t done = 0;
    Json body_error;
    for (; done < ids.size() && std::chrono::steady_clock::now() < until; ++done) {
      const auto id = ids[done];
      try {
        std::string_view o = action == "cancel" ? to_string(store.cancel(id, who.scope()))
                             : action == "retry" ? to_string(store.retry(id, who.scope()))
                                                 : to_string(store.remove(id, who.scope()));
        ++outcomes[std::string(o)];
      } catch (const std::exception& e) {
        report(fmt::format("bulk {} of task {}: {}", action, id, e.what()));
        body_error = fmt::format("task {}: the database is unavailable or refused the {}; "
                                 "the tasks before it are done, send the rest again",
                                 id, action);
        break;
      }
    }
    Json counts = Json::object();
    for (const auto& [o, n] : outcomes) counts[o] = n;
    Json rest = Json::array();
    for (std::size_t i = done; i < ids.size(); ++i) rest.push_back(ids[i]);
    Json out{{"action", action}, {"tasks", done}, {"outcomes", std::move(counts)},
             {"more", more || done < ids.size()}, {"remaining", std::move(rest)}};
    if (!body_error.is_null()) out["error"] = std::move(body_error);
    return json_response(body_error.is_null() ? 200 : 503, out);
  }

  HttpResponse retry(TaskId id, const Principal& who) const {
    auto outcome = store.retry(id, who.scope());
    if (outcome == RetryOutcome::not_found) return task_not_found();
    auto task = store.get(id, who.scope());
    Json body{{"outcome", to_string(outcome)}, {"task", task ? json::to_json(*task) : Json(nullptr)}};
    if (outcome == RetryOutcome::retried) return json_response(200, body);
    body["error"] = fmt::format("task {} is {}: only failed, expired or cancelled tasks can be retried", id,
                                task ? to_string(task->status) : "gone");
    return json_response(409, body);
  }
};

namespace {

std::string normalize_prefix(std::string prefix) {
  while (!prefix.empty() && prefix.back() == '/') prefix.pop_back();
  if (prefix.empty()) return prefix;
  const char* rule = "must be empty or a path such as \"/ops/eoq\" (letters, digits, '-', '_', '.', '~' between slashes)";
  if (prefix.front() != '/') throw InvalidArgument("prefix", rule);
  std::string_view rest = prefix;
  while (!rest.empty()) {
    rest.remove_prefix(1);  // the '/'
    auto seg = rest.substr(0, rest.find('/'));
    bool ok = !seg.empty() && seg != "." && seg != ".." && std::all_of(seg.begin(), seg.end(), [](char c) {
      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
             c == '.' || c == '~';
    });
    if (!ok) throw InvalidArgument("prefix", rule);
    rest.remove_prefix(seg.size());
  }
  return prefix;
}

}  // namespace

Dashboard::Dashboard(TaskStore& store, DashboardOptions options) {
  options.prefix = normalize_prefix(std::move(options.prefix));
  if (options.no_auth && !options.tokens.empty())
    throw InvalidArgument("no_auth", "conflicts with tokens: use tokens, or no_auth alone for a local dashboard");
  if (!options.no_auth && options.tokens.empty())
    throw InvalidArgument("tokens", "are required (a token file), unless no_auth is set for a local dashboard");
  for (const auto& t : options.tokens) {
    if (t.token.empty() || !std::all_of(t.token.begin(), t.token.end(), token_char))
      throw InvalidArgument("tokens", "a token must be non-empty printable ASCII without spaces");
    if (t.tenant && t.tenant->empty()) throw InvalidArgument("tokens", "a tenant must not be empty (none: admin)");
  }
  // Two entries for one token would leave its rights to the order of the list.
  for (std::size_t i = 0; i < options.tokens.size(); ++i)
    for (std::size_t j = i + 1; j < options.tokens.size(); ++j)
      if (options.tokens[i].token == options.tokens[j].token)
        throw InvalidArgument("tokens", "a token is listed twice");
  if (options.max_body_bytes == 0) throw InvalidArgument("max_body_bytes", "must be positive");
  impl_ = std::make_unique<Impl>(Impl{store, std::move(options)});
}

Dashboard::~Dashboard() = default;

HttpResponse Dashboard::handle(const HttpRequest& request) const {
  const auto& I = *impl_;
  std::string_view path = request.path;
  const std::string& prefix = I.options.prefix;
  if (!path.starts_with(prefix)) return not_found();
  auto rest = path.substr(prefix.size());
  if (rest.empty()) {
    // "/ops/eoq" -> "/ops/eoq/", so the page's relative API paths resolve under
    // the prefix. Relative, so it survives a proxy that strips a path prefix.
    if (request.method != "GET" && request.method != "HEAD") return not_found();
    HttpResponse r;
    r.status = 308;
    r.content_type = "text/plain";
    r.headers["Location"] = prefix.substr(prefix.rfind('/') + 1) + "/";
    return r;
  }
  if (rest.front() != '/') return not_found();
  try {
    return I.route(request, rest);
  } catch (const KeyConflict& e) {
    // The request is well formed; it conflicts with the task that holds the key.
    // The remedy in the API's own words; KeyConflict's names a C++ enum.
    auto rule = e.conflict() + " (payloads are compared as JSON values); to get the task that holds the key "
                               "instead, send \"key_reuse\":\"lenient\"";
    return error_response(409, e.field() + ": " + rule, e.field(), rule);
  } catch (const InvalidArgument& e) {
    return error_response(400, e.what(), e.field(), e.rule());
  } catch (const TransientError& e) {
    // The details (host, user, database) are for the operator's log, not for
    // every token holder.
    I.report(fmt::format("{} {}: {}", request.method, request.path, e.what()));
    auto r = error_response(503, "the database is unavailable, try again");
    r.headers["Retry-After"] = "1";
    return r;
  } catch (const std::exception& e) {
    I.report(fmt::format("{} {}: {}", request.method, request.path, e.what()));
    return error_response(500, "internal error (the server's log has the details)");
  } catch (...) {
    return error_response(500, "internal error");
  }
}

}  // namespace eoq
