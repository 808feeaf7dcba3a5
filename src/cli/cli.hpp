#pragma once
// What the `eoq` tool's files share: the exit codes, the Context every command
// gets (options, the store, the terminal), the helpers several commands use,
// and the commands themselves, a file per group: inspect.cpp (stats, list,
// show), manage.cpp (migrate, submit, cancel, retry, prune), live.cpp (watch,
// dashboard). main.cpp parses the command line and maps errors to exit codes.
#include "cli/text.hpp"
#include "json/task_json.hpp"

#include <eoq/errors.hpp>
#include <eoq/postgres_store.hpp>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace eoq::cli {

using Json = nlohmann::json;

// The exit codes scripts rely on; the help's footer documents them.
enum ExitCode : int { kOk = 0, kNotFound = 1, kBadInput = 2, kUnavailable = 3, kKeyConflict = 4 };

// A failure this tool explains in its own words: "eoq: <message>" on stderr.
class Failure : public std::runtime_error {
 public:
  Failure(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

struct GlobalOptions {
  std::string database_url;
  std::string schema = "eoq";
  std::string tenant;
  bool json = false;
};

// Whether the locale says UTF-8 (LC_ALL, LC_CTYPE, LANG, first set wins).
bool utf8_locale();

class Context {
 public:
  GlobalOptions opt;
  CLI::Option* tenant_option = nullptr;
  bool tty = ::isatty(STDOUT_FILENO) == 1;
  // Bars and ellipses in block characters only where they will surely render.
  bool unicode = tty && utf8_locale();

  bool scoped() const { return tenant_option && tenant_option->count() > 0; }
  Scope scope() const { return scoped() ? Scope::only(opt.tenant) : Scope::all(); }
  std::string for_tenant() const { return scoped() ? fmt::format(" for tenant \"{}\"", clean(opt.tenant)) : ""; }

  PostgresStore& store(int pool_size = 2) {
    if (store_) return *store_;
    if (opt.database_url.empty())
      throw Failure(kBadInput,
                    "no database given: set EOQ_DATABASE_URL or pass --database-url, e.g. "
                    "--database-url postgresql://user@localhost/app");
    PostgresOptions o;
    o.conninfo = opt.database_url;
    o.schema = opt.schema;
    o.pool_size = pool_size;
    store_ = std::make_unique<PostgresStore>(std::move(o));
    return *store_;
  }

 private:
  std::unique_ptr<PostgresStore> store_;
};

TimePoint now();
void print_json(const Json& j, int indent = 2);
Json task_or_null(const std::optional<Task>& t);
// Seconds, not microseconds: what a person reads, and still valid RFC 3339.
std::string short_time(TimePoint t);
std::string when(TimePoint t, TimePoint at);
std::string attempts_of(const Task& t);
// A JSON value on one line, cut (by code points) past `limit` columns.
std::string compact(std::string_view json_text, std::size_t limit = 2000);
// For commands a person can paste back: values with spaces or quotes survive the shell.
std::string shell_quote(std::string_view v);
// Word for word the same whether the id is unused or another tenant's, so a
// scoped caller learns nothing about ids it may not see.
[[noreturn]] void not_found(const Context& ctx, TaskId id);

// ---- inspect.cpp
struct ListArgs {
  std::string queue, status, type, key, key_prefix, type_prefix, payload, error, order = "oldest";
  TaskId after = 0;
  int limit = 100;
  CLI::Option *queue_opt = nullptr, *status_opt = nullptr, *type_opt = nullptr, *after_opt = nullptr,
              *key_opt = nullptr, *key_prefix_opt = nullptr, *type_prefix_opt = nullptr, *payload_opt = nullptr,
              *error_opt = nullptr;
};

Table stats_table(const std::vector<QueueStats>& stats, bool unicode);
int cmd_stats(Context& ctx);
int cmd_list(Context& ctx, const ListArgs& a);
int cmd_show(Context& ctx, TaskId id);

// ---- manage.cpp
struct SubmitArgs {
  std::string queue = "default", type, key, key_reuse = "strict", payload = "{}", run_at, deadline;
  int priority = 0, max_attempts = RetryPolicy{}.max_attempts;
  CLI::Option *key_opt = nullptr, *run_at_opt = nullptr, *deadline_opt = nullptr;
};

struct PruneArgs {
  std::string older_than;
  bool dry_run = false;
};

int cmd_migrate(Context& ctx);
int cmd_submit(Context& ctx, const SubmitArgs& a);
int cmd_cancel(Context& ctx, TaskId id);
int cmd_retry(Context& ctx, TaskId id);
int cmd_delete(Context& ctx, TaskId id);
int cmd_pause(Context& ctx, const std::string& queue, bool pause);

struct LimitArgs {
  std::string queue, rate, partition_rate;
  int concurrency = 0, partition_concurrency = 0;
  bool none = false;
  CLI::Option *concurrency_opt = nullptr, *partition_concurrency_opt = nullptr, *rate_opt = nullptr,
              *partition_rate_opt = nullptr;
};
// N/DURATION ("100/1m", "5/s", "10/500ms"); InvalidArgument(field) otherwise.
RateLimit parse_rate(std::string_view field, std::string_view text);
std::string format_limits(const QueueLimits& limits);
int cmd_limit(Context& ctx, const LimitArgs& a);
int cmd_limits(Context& ctx);
int cmd_prune(Context& ctx, const PruneArgs& a);

// ---- live.cpp
struct WatchArgs {
  std::string interval = "1s", queue;
  int count = 0;
  int limit = 10;
  CLI::Option* queue_opt = nullptr;
};

struct DashboardArgs {
  std::string listen = "127.0.0.1:8080", tokens, prefix;
  bool no_auth = false;
  CLI::Option* tokens_opt = nullptr;
};

int cmd_watch(Context& ctx, const WatchArgs& a);
int cmd_dashboard(Context& ctx, const DashboardArgs& a);

}  // namespace eoq::cli
