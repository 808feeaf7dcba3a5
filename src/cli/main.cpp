// eoq: the operator's command-line tool. Every command is one or two calls on
// eoq::PostgresStore; this file is about the face around them: parsing, tables
// for people, JSON for scripts (the HTTP API's shape), and exit codes a script
// can branch on.
#include "cli/text.hpp"
#include "dashboard/task_json.hpp"

#include <eoq/dashboard.hpp>
#include <eoq/errors.hpp>
#include <eoq/postgres_store.hpp>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <signal.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#ifndef EOQ_VERSION
#define EOQ_VERSION "unknown"
#endif

namespace eoq::cli {
namespace {

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

bool utf8_locale() {
  for (const char* name : {"LC_ALL", "LC_CTYPE", "LANG"}) {
    const char* v = std::getenv(name);
    if (!v || !*v) continue;
    std::string s(v);
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    return s.find("utf-8") != std::string::npos || s.find("utf8") != std::string::npos;
  }
  return false;
}

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

TimePoint now() { return std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now()); }

void print_json(const Json& j, int indent = 2) {
  // Task text is UTF-8 by the database's rules; `replace` keeps one odd byte
  // from turning a whole answer into an exception.
  fmt::print("{}\n", j.dump(indent, ' ', false, Json::error_handler_t::replace));
}

Json task_or_null(const std::optional<Task>& t) { return t ? json::to_json(*t) : Json(nullptr); }

// Seconds, not microseconds: what a person reads, and still valid RFC 3339.
std::string short_time(TimePoint t) { return json::format_time(t).substr(0, 19) + "Z"; }
std::string when(TimePoint t, TimePoint at) { return fmt::format("{} ({})", short_time(t), relative(t, at)); }

std::string attempts_of(const Task& t) { return fmt::format("{}/{}", t.attempts, t.retry.max_attempts); }

std::string compact(std::string_view json_text, std::size_t limit = 2000) {
  std::string s;
  try {
    s = Json::parse(json_text).dump(-1, ' ', false, Json::error_handler_t::replace);
  } catch (const Json::exception&) {
    s = std::string(json_text);
  }
  // Cut by code points, so the shortened text is still UTF-8.
  if (display_width(s) > limit) return fmt::format("{} ({} bytes; --json shows all)", truncate(s, limit, false), s.size());
  return s;
}

// For commands a person can paste back: values with spaces or quotes survive the shell.
std::string shell_quote(std::string_view v) {
  bool plain = !v.empty() && std::all_of(v.begin(), v.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || std::string_view("_./:=@+-,").find(c) != std::string_view::npos;
  });
  if (plain) return std::string(v);
  std::string out = "'";
  for (char c : v) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

[[noreturn]] void not_found(const Context& ctx, TaskId id) {
  // Word for word the same whether the id is unused or another tenant's, so a
  // scoped caller learns nothing about ids it may not see.
  throw Failure(kNotFound, fmt::format("task {} not found{}: 'eoq list' shows the ids there are", id,
                                       ctx.for_tenant()));
}

// ---------------------------------------------------------------- migrate

int cmd_migrate(Context& ctx) {
  ctx.store().migrate();
  if (ctx.opt.json) {
    print_json({{"schema", ctx.opt.schema}, {"migrated", true}});
  } else {
    fmt::print("schema \"{}\" is up to date\n", ctx.opt.schema);
  }
  return kOk;
}

// ---------------------------------------------------------------- stats

Table stats_table(const std::vector<QueueStats>& stats, bool unicode) {
  Table table({{"QUEUE"},
               {"PENDING", true},
               {"RUNNING", true},
               {"SUCCEEDED", true},
               {"FAILED", true},
               {"CANCELLED", true},
               {"EXPIRED", true},
               {"OLDEST PENDING", true},
               {"SUCCEEDED/MIN", true},
               {"FAILED/MIN", true}},
              unicode);
  QueueStats total;
  total.queue = "(all)";
  for (const auto& s : stats) {
    auto age = s.oldest_pending_age ? format_duration(*s.oldest_pending_age) : "-";
    table.add({s.queue, std::to_string(s.pending), std::to_string(s.running), std::to_string(s.succeeded),
               std::to_string(s.failed), std::to_string(s.cancelled), std::to_string(s.expired), age,
               std::to_string(s.succeeded_last_minute), std::to_string(s.failed_last_minute)});
    total.pending += s.pending;
    total.running += s.running;
    total.succeeded += s.succeeded;
    total.failed += s.failed;
    total.cancelled += s.cancelled;
    total.expired += s.expired;
    total.succeeded_last_minute += s.succeeded_last_minute;
    total.failed_last_minute += s.failed_last_minute;
    if (s.oldest_pending_age && (!total.oldest_pending_age || *s.oldest_pending_age > *total.oldest_pending_age))
      total.oldest_pending_age = s.oldest_pending_age;
  }
  if (stats.size() > 1) {
    auto age = total.oldest_pending_age ? format_duration(*total.oldest_pending_age) : "-";
    table.add({total.queue, std::to_string(total.pending), std::to_string(total.running),
               std::to_string(total.succeeded), std::to_string(total.failed), std::to_string(total.cancelled),
               std::to_string(total.expired), age, std::to_string(total.succeeded_last_minute),
               std::to_string(total.failed_last_minute)});
  }
  return table;
}

int cmd_stats(Context& ctx) {
  auto stats = ctx.store().stats(ctx.scope());
  if (ctx.opt.json) {
    auto out = Json::array();
    for (const auto& s : stats) out.push_back(json::to_json(s));
    print_json(out);
  } else if (stats.empty()) {
    fmt::print("no tasks{} in schema \"{}\"\n", ctx.for_tenant(), ctx.opt.schema);
  } else {
    fmt::print("{}", stats_table(stats, ctx.unicode).render());
  }
  return kOk;
}

// ---------------------------------------------------------------- list

struct ListArgs {
  std::string queue, status, type;
  TaskId after = 0;
  int limit = 100;
  CLI::Option *queue_opt = nullptr, *status_opt = nullptr, *type_opt = nullptr, *after_opt = nullptr;
};

std::string next_page_command(const Context& ctx, const ListArgs& a, TaskId next) {
  std::string cmd = "eoq";
  if (ctx.opt.schema != "eoq") cmd += " --schema " + shell_quote(ctx.opt.schema);
  if (ctx.scoped()) cmd += " --tenant " + shell_quote(ctx.opt.tenant);
  cmd += " list";
  if (a.queue_opt->count()) cmd += " --queue " + shell_quote(a.queue);
  if (a.status_opt->count()) cmd += " --status " + a.status;
  if (a.type_opt->count()) cmd += " --type " + shell_quote(a.type);
  if (a.limit != 100) cmd += fmt::format(" --limit {}", a.limit);
  return cmd + fmt::format(" --after {}", next);
}

int cmd_list(Context& ctx, const ListArgs& a) {
  ListQuery q;
  if (a.queue_opt->count()) q.queue = a.queue;
  if (a.status_opt->count()) q.status = parse_status(a.status);
  if (a.type_opt->count()) q.type = a.type;
  if (a.after_opt->count()) q.after = a.after;
  q.limit = a.limit;
  auto page = ctx.store().list(q, ctx.scope());
  if (ctx.opt.json) {
    print_json(json::to_json(page));
    return kOk;
  }
  if (page.tasks.empty()) {
    fmt::print("{}{}\n", a.after_opt->count() ? "no more tasks" : "no tasks match", ctx.for_tenant());
    return kOk;
  }
  auto at = now();
  Table table({{"ID", true},
               {"STATUS"},
               {"QUEUE", false, 20},
               {"TYPE", false, 28},
               {"TENANT", false, 16},
               {"KEY", false, 24},
               {"PRI", true},
               {"ATTEMPTS", true},
               {"RUN AT"},
               {"UPDATED"}},
              ctx.unicode);
  for (const auto& t : page.tasks) {
    table.add({std::to_string(t.id), std::string(to_string(t.status)), t.queue, t.type, t.tenant.value_or(""),
               t.key.value_or(""), std::to_string(t.priority), attempts_of(t), relative(t.run_at, at),
               relative(t.updated_at, at)});
  }
  fmt::print("{}", table.render());
  if (page.next_after) fmt::print("\nnext page: {}\n", next_page_command(ctx, a, *page.next_after));
  return kOk;
}

// ---------------------------------------------------------------- show

void field(std::string_view label, std::string_view value) {
  constexpr int kLabel = 13;
  std::string text = clean(value, true);
  std::string indent(2 + kLabel, ' ');
  std::string out = fmt::format("  {:<{}}", label, kLabel);
  for (char c : text) out += c == '\n' ? "\n" + indent : std::string(1, c);
  fmt::print("{}\n", out);
}

std::string retry_rule(const RetryPolicy& r) {
  if (r.max_delay.count() == 0) return "retries at once";
  if (r.backoff == Backoff::fixed || r.initial_delay == r.max_delay)
    return fmt::format("retries every {}", format_duration(r.initial_delay));
  return fmt::format("retries back off from {} to at most {}", format_duration(r.initial_delay),
                     format_duration(r.max_delay));
}

int cmd_show(Context& ctx, TaskId id) {
  auto& store = ctx.store();
  auto task = store.get(id, ctx.scope());
  if (!task) not_found(ctx, id);
  auto attempts = store.history(id, ctx.scope());
  auto family = store.relatives(id, ctx.scope());
  if (ctx.opt.json) {
    auto list = Json::array();
    for (const auto& a : attempts) list.push_back(json::to_json(a));
    auto rel = json::to_json(family);
    print_json({{"task", json::to_json(*task)},
                {"attempts", std::move(list)},
                {"parents", std::move(rel["parents"])},
                {"children", std::move(rel["children"])}});
    return kOk;
  }
  const Task& t = *task;
  auto at = now();
  fmt::print("task {}  {}\n", t.id, to_string(t.status));
  field("queue", t.queue);
  field("type", t.type);
  if (t.tenant) field("tenant", *t.tenant);
  if (t.key) field("key", *t.key);
  field("priority", std::to_string(t.priority));
  field("attempts", fmt::format("{} of {} ({})", t.attempts, t.retry.max_attempts, retry_rule(t.retry)));
  field("run at", when(t.run_at, at));
  if (t.deadline) field("deadline", when(*t.deadline, at));
  field("created", when(t.created_at, at));
  field("updated", when(t.updated_at, at));
  if (t.finished_at) field("finished", when(*t.finished_at, at));
  // Where an unfinished or failed task got to; a success is its own progress report.
  if (t.status == TaskStatus::running || (t.status != TaskStatus::succeeded && (t.progress > 0 || !t.stage.empty())))
    field("progress", progress_bar(t.progress, t.stage, 20, ctx.unicode));
  // The store keeps the last owner after the task settles; only a live lease is news.
  if (t.status == TaskStatus::running && t.lease_owner) {
    field("lease", t.lease_expires_at
                       ? fmt::format("{}, expires {}", *t.lease_owner, relative(*t.lease_expires_at, at))
                       : *t.lease_owner);
  }
  if (t.cancel_requested) field("cancel", "requested: the worker stops at its next heartbeat");
  if (t.checkpoint_stage || t.checkpoint) {
    field("checkpoint", fmt::format("stage \"{}\": {}", t.checkpoint_stage.value_or(""),
                                    t.checkpoint ? compact(*t.checkpoint) : "null"));
  }
  if (t.result) field("result", compact(*t.result));
  if (t.last_error) field("last error", *t.last_error);
  field("payload", compact(t.payload));
  // A workflow's neighbours, with where each stands: enough to follow it with `eoq show`.
  auto relatives = [&](std::string_view label, const std::vector<Relative>& rs) {
    if (rs.empty()) return;
    std::string text;
    for (const auto& r : rs) text += fmt::format("{}{} {} ({})", text.empty() ? "" : "\n", r.id, r.type, to_string(r.status));
    field(label, text);
  };
  relatives("parents", family.parents);
  relatives("children", family.children);

  fmt::print("\n");
  if (attempts.empty()) {
    fmt::print("no attempts yet\n");
    return kOk;
  }
  Table table({{"#", true}, {"OUTCOME"}, {"OWNER", false, 24}, {"STARTED"}, {"TOOK", true}, {"ERROR", false, 60}},
              ctx.unicode);
  for (const auto& a : attempts) {
    auto took = a.finished_at ? format_duration(std::chrono::duration_cast<Millis>(*a.finished_at - a.started_at))
                              : "(" + format_duration(std::chrono::duration_cast<Millis>(at - a.started_at)) + ")";
    table.add({std::to_string(a.number), a.outcome, a.owner, relative(a.started_at, at), took, a.error.value_or("")});
  }
  fmt::print("attempts\n{}", table.render("  "));
  return kOk;
}

// ---------------------------------------------------------------- submit

struct SubmitArgs {
  std::string queue = "default", type, key, payload = "{}", run_at, deadline;
  int priority = 0, max_attempts = RetryPolicy{}.max_attempts;
  CLI::Option *key_opt = nullptr, *run_at_opt = nullptr, *deadline_opt = nullptr;
};

std::string read_payload(const std::string& arg) {
  if (arg == "-") return std::string(std::istreambuf_iterator<char>(std::cin), {});
  if (!arg.empty() && arg[0] == '@') {
    std::ifstream in(arg.substr(1), std::ios::binary);
    if (!in) throw InvalidArgument("payload", fmt::format("cannot read the file '{}'", arg.substr(1)));
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  return arg;
}

int cmd_submit(Context& ctx, const SubmitArgs& a) {
  NewTask t;
  t.queue = a.queue;
  t.type = a.type;
  t.payload = read_payload(a.payload);
  // nlohmann says where the text goes wrong; the store would only say that it does.
  try {
    auto parsed = Json::parse(t.payload);
    (void)parsed;
  } catch (const Json::parse_error& e) {
    std::string why = e.what();
    if (auto p = why.find("] "); p != std::string::npos) why = why.substr(p + 2);
    throw InvalidArgument("payload", "must be valid JSON text: " + why);
  }
  if (a.key_opt->count()) t.key = a.key;
  t.priority = a.priority;
  t.retry.max_attempts = a.max_attempts;
  auto at = now();
  if (a.run_at_opt->count()) t.run_at = parse_when("run_at", a.run_at, at);
  if (a.deadline_opt->count()) t.deadline = parse_when("deadline", a.deadline, at);
  if (ctx.scoped()) t.tenant = ctx.opt.tenant;

  auto result = ctx.store().submit(t);
  const Task& task = result.task;
  if (ctx.opt.json) {
    print_json({{"duplicate", result.duplicate}, {"task", json::to_json(task)}});
    return kOk;
  }
  if (!result.duplicate) {
    fmt::print("submitted task {} (queue {}, type {}): pending, runs {}\n", task.id, clean(task.queue),
               clean(task.type), task.run_at <= now() ? "now" : when(task.run_at, at));
    return kOk;
  }
  std::string state = fmt::format("{}, {} of {} attempts used", to_string(task.status), task.attempts,
                                  task.retry.max_attempts);
  if (task.finished_at) state += ", finished " + relative(*task.finished_at, now());
  fmt::print("duplicate: key \"{}\" in queue {} already belongs to task {} ({}); nothing new was submitted\n",
             clean(task.key.value_or("")), clean(task.queue), task.id, state);
  return kOk;
}

// ---------------------------------------------------------------- cancel / retry

int cmd_cancel(Context& ctx, TaskId id) {
  auto& store = ctx.store();
  auto outcome = store.cancel(id, ctx.scope());
  std::optional<Task> task;
  if (outcome != CancelOutcome::not_found) task = store.get(id, ctx.scope());
  if (ctx.opt.json) print_json({{"outcome", to_string(outcome)}, {"task", task_or_null(task)}});
  switch (outcome) {
    case CancelOutcome::not_found: not_found(ctx, id);
    case CancelOutcome::cancelled:
      if (!ctx.opt.json) fmt::print("cancelled task {}: it will not run\n", id);
      return kOk;
    case CancelOutcome::cancel_requested:
      if (!ctx.opt.json)
        fmt::print("task {} is running: cancel requested; its worker stops it at the next heartbeat "
                   "('eoq show {}' to follow)\n",
                   id, id);
      return kOk;
    case CancelOutcome::already_finished:
      // The point of a cancel, that the task not run (any further), holds: a
      // script cancelling a batch should not stop at the ones that finished.
      if (!ctx.opt.json)
        fmt::print("task {} already finished ({}): nothing to cancel\n", id,
                   task ? to_string(task->status) : std::string_view("finished"));
      return kOk;
  }
  return kOk;
}

int cmd_retry(Context& ctx, TaskId id) {
  auto& store = ctx.store();
  auto outcome = store.retry(id, ctx.scope());
  std::optional<Task> task;
  if (outcome != RetryOutcome::not_found) task = store.get(id, ctx.scope());
  if (ctx.opt.json) print_json({{"outcome", to_string(outcome)}, {"task", task_or_null(task)}});
  switch (outcome) {
    case RetryOutcome::not_found: not_found(ctx, id);
    case RetryOutcome::retried:
      if (!ctx.opt.json) {
        if (task)
          fmt::print("task {} will run again: pending now, attempt {} of at most {}\n", id, task->attempts + 1,
                     task->retry.max_attempts);
        else
          fmt::print("task {} will run again\n", id);
      }
      return kOk;
    case RetryOutcome::not_retryable: {
      // Unlike cancel, the point (the task runs again) does not hold, so a
      // script must not mistake this for success.
      std::string status = task ? std::string(to_string(task->status)) : "not finished";
      std::string why = task && task->status == TaskStatus::succeeded
                            ? "it succeeded; submit a new task to run it again"
                            : "it has not finished, so it runs anyway";
      throw Failure(kBadInput, fmt::format("task {} is {}: only failed, expired or cancelled tasks can be "
                                           "retried ({})",
                                           id, status, why));
    }
  }
  return kOk;
}

// ---------------------------------------------------------------- prune

struct PruneArgs {
  std::string older_than;
  bool dry_run = false;
};

int cmd_prune(Context& ctx, const PruneArgs& a) {
  if (ctx.scoped())
    throw Failure(kBadInput, "prune cannot be limited to one tenant: it deletes every tenant's old finished "
                             "tasks; run it without --tenant");
  auto age = parse_duration("older_than", a.older_than);
  auto& store = ctx.store();
  if (a.dry_run) {
    auto n = store.prunable(age);
    if (ctx.opt.json)
      print_json({{"would_delete", n}});
    else
      fmt::print("would delete {} task{} that finished more than {} ago (dry run: nothing was deleted)\n", n,
                 n == 1 ? "" : "s", a.older_than);
    return kOk;
  }
  auto n = store.prune(age);
  if (ctx.opt.json)
    print_json({{"deleted", n}});
  else
    fmt::print("deleted {} task{} that finished more than {} ago\n", n, n == 1 ? "" : "s", a.older_than);
  return kOk;
}

// ---------------------------------------------------------------- watch

struct WatchArgs {
  std::string interval = "1s", queue;
  int count = 0;
  int limit = 10;
  CLI::Option* queue_opt = nullptr;
};

struct Snapshot {
  TimePoint at;
  std::vector<QueueStats> stats;
  TaskPage running, pending;
};

Snapshot snapshot(Context& ctx, const WatchArgs& a) {
  auto& store = ctx.store();
  Snapshot s;
  s.at = now();
  s.stats = store.stats(ctx.scope());
  if (a.queue_opt->count())
    std::erase_if(s.stats, [&](const QueueStats& q) { return q.queue != a.queue; });
  ListQuery q;
  if (a.queue_opt->count()) q.queue = a.queue;
  q.limit = a.limit;
  q.status = TaskStatus::running;
  s.running = store.list(q, ctx.scope());
  q.status = TaskStatus::pending;
  s.pending = store.list(q, ctx.scope());
  return s;
}

Json snapshot_json(const Snapshot& s) {
  auto stats = Json::array();
  for (const auto& q : s.stats) stats.push_back(json::to_json(q));
  auto tasks = [](const TaskPage& p) {
    auto out = Json::array();
    for (const auto& t : p.tasks) out.push_back(json::to_json(t));
    return out;
  };
  return {{"time", json::format_time(s.at)},
          {"stats", std::move(stats)},
          {"running", tasks(s.running)},
          {"pending", tasks(s.pending)}};
}

std::string local_clock(TimePoint t) {
  std::time_t tt = Clock::to_time_t(std::chrono::time_point_cast<Clock::duration>(t));
  std::tm tm{};
  localtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%H:%M:%S", &tm);
  return buf;
}

std::string section_title(std::string_view name, std::int64_t total, std::size_t shown) {
  if (total == 0) return fmt::format("{}: none\n", name);
  if (static_cast<std::int64_t>(shown) < total)
    return fmt::format("{}: {} (showing the first {})\n", name, total, shown);
  return fmt::format("{}: {}\n", name, total);
}

std::string frame_text(const Context& ctx, const Snapshot& s, const std::string& header) {
  std::string out = header + "\n\n";
  if (s.stats.empty()) {
    out += fmt::format("no tasks{}\n", ctx.for_tenant());
  } else {
    out += stats_table(s.stats, ctx.unicode).render();
  }
  std::int64_t running = 0, pending = 0;
  for (const auto& q : s.stats) {
    running += q.running;
    pending += q.pending;
  }
  // The counts and the lists are two statements apart; never claim fewer
  // tasks than are on screen.
  running = std::max<std::int64_t>(running, static_cast<std::int64_t>(s.running.tasks.size()));
  pending = std::max<std::int64_t>(pending, static_cast<std::int64_t>(s.pending.tasks.size()));

  out += "\n" + section_title("running", running, s.running.tasks.size());
  if (!s.running.tasks.empty()) {
    Table t({{"ID", true}, {"QUEUE", false, 20}, {"TYPE", false, 24}, {"ATTEMPT", true}, {"OWNER", false, 24},
             {"PROGRESS", false, 80}},
            ctx.unicode);
    for (const auto& task : s.running.tasks)
      t.add({std::to_string(task.id), task.queue, task.type, attempts_of(task), task.lease_owner.value_or(""),
             progress_bar(task.progress, task.stage, 20, ctx.unicode) +
                 (task.cancel_requested ? " (cancel requested)" : "")});
    out += t.render("  ");
  }
  out += "\n" + section_title("pending", pending, s.pending.tasks.size());
  if (!s.pending.tasks.empty()) {
    Table t({{"ID", true}, {"QUEUE", false, 20}, {"TYPE", false, 24}, {"PRI", true}, {"READY"}, {"ATTEMPTS", true}},
            ctx.unicode);
    for (const auto& task : s.pending.tasks)
      t.add({std::to_string(task.id), task.queue, task.type, std::to_string(task.priority),
             relative(task.run_at, s.at), attempts_of(task)});
    out += t.render("  ");
  }
  return out;
}

int terminal_columns() {
  winsize ws{};
  if (::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 0;
}

// Redraws in place: home, each line cleared to its end, the rest of the
// screen cleared. Cheaper on the eye than clearing first (no flicker), and
// lines cut to the terminal's width so none wraps and shifts the next frame.
void draw_in_place(const std::string& frame, bool unicode) {
  int cols = terminal_columns();
  std::string out = "\x1b[H";
  std::istringstream lines(frame);
  for (std::string line; std::getline(lines, line);) {
    if (cols > 0) line = truncate(line, static_cast<std::size_t>(cols - 1), unicode);
    out += line + "\x1b[K\n";
  }
  out += "\x1b[J";
  std::fwrite(out.data(), 1, out.size(), stdout);
  std::fflush(stdout);
}

int cmd_watch(Context& ctx, const WatchArgs& a) {
  auto interval = parse_duration("interval", a.interval);
  if (interval < Millis(100)) throw InvalidArgument("interval", "must be at least 100ms");
  // Ctrl-C is how a watch normally ends: wait for it as an event, so the
  // cursor comes back and the exit status is 0.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  sigprocmask(SIG_BLOCK, &stop, nullptr);

  bool ansi = ctx.tty && !ctx.opt.json;
  if (ansi) std::fputs("\x1b[?25l\x1b[H\x1b[2J", stdout);
  try {
    for (int frame = 1;; ++frame) {
      std::optional<Snapshot> snap;
      std::string error;
      try {
        snap = snapshot(ctx, a);
      } catch (const DatabaseError& e) {
        // After the first frame a blip should not end an operator's watch.
        if (frame == 1) throw;
        error = e.what();
      }
      if (ctx.opt.json) {
        print_json(snap ? snapshot_json(*snap) : Json{{"time", json::format_time(now())}, {"error", error}},
                   -1);
        std::fflush(stdout);
      } else {
        std::string header = fmt::format("eoq watch  schema {}{}  {}  every {}", ctx.opt.schema,
                                         ctx.scoped() ? ", tenant " + clean(ctx.opt.tenant) : "",
                                         local_clock(snap ? snap->at : now()), format_duration(interval));
        if (a.count > 0) header += fmt::format("  frame {} of {}", frame, a.count);
        else if (ansi) header += "  (Ctrl-C to stop)";
        std::string text = snap ? frame_text(ctx, *snap, header)
                                : header + "\n\ndatabase unavailable, retrying: " + clean(error) + "\n";
        if (ansi) {
          draw_in_place(text, ctx.unicode);
        } else {
          fmt::print("{}{}", frame > 1 ? "\n" : "", text);
          std::fflush(stdout);
        }
      }
      if (a.count > 0 && frame >= a.count) break;
      auto ms = interval.count();
      timespec ts{static_cast<time_t>(ms / 1000), static_cast<long>(ms % 1000) * 1000000L};
      if (sigtimedwait(&stop, nullptr, &ts) > 0) break;
    }
  } catch (...) {
    if (ansi) std::fputs("\x1b[?25h", stdout);
    throw;
  }
  if (ansi) std::fputs("\x1b[?25h", stdout);
  return kOk;
}

// ---------------------------------------------------------------- dashboard

struct DashboardArgs {
  std::string listen = "127.0.0.1:8080", tokens, prefix;
  bool no_auth = false;
  CLI::Option* tokens_opt = nullptr;
};

int cmd_dashboard(Context& ctx, const DashboardArgs& a) {
  if (ctx.scoped())
    throw Failure(kBadInput, "--tenant does not apply to the dashboard: each token in the --tokens file names "
                             "the tenant it sees");
  if (!a.tokens_opt->count() && !a.no_auth)
    throw Failure(kBadInput, "the dashboard needs --tokens FILE (one \"<token> <tenant|*> <read|write>\" per "
                             "line), or --no-auth on a loopback address");
  auto colon = a.listen.rfind(':');
  if (colon == std::string::npos || colon == 0)
    throw InvalidArgument("listen", "must be HOST:PORT, such as 127.0.0.1:8080 (port 0 picks a free one)");
  std::string host = a.listen.substr(0, colon);
  if (host.find(':') != std::string::npos && host.front() != '[') host = "[" + host + "]";

  DashboardOptions options;
  options.prefix = a.prefix;
  options.no_auth = a.no_auth;
  if (a.tokens_opt->count()) {
    try {
      options.tokens = load_tokens(a.tokens);
    } catch (const InvalidArgument& e) {
      // The field is "<path>:<line>", not an option name.
      throw Failure(kBadInput, fmt::format("bad token file (--tokens): {}: {}", e.field(), e.rule()));
    }
  }

  // Blocked before the server starts its threads, which inherit the mask, so
  // the signal reaches sigwait below and nothing else.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  auto& store = ctx.store(8);
  // A cheap query that fails now, with exit code 3, rather than on the first
  // page load, when the database is down or the schema is not migrated.
  (void)store.get(0);
  DashboardServer server(store, std::move(options), a.listen);
  try {
    server.start();
  } catch (const InvalidArgument&) {
    throw;
  } catch (const Error& e) {
    throw Failure(kBadInput, fmt::format("{}: choose another address with --listen HOST:PORT", e.what()));
  }
  fmt::print("eoq dashboard listening on http://{}:{}/\n", host, server.port());
  std::fflush(stdout);
  if (!a.prefix.empty())
    fmt::print(stderr, "eoq: the dashboard is at http://{}:{}{}/; Ctrl-C stops it\n", host, server.port(),
               a.prefix);
  int sig = 0;
  sigwait(&stop, &sig);
  server.stop();
  fmt::print(stderr, "eoq: dashboard stopped ({})\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
  return kOk;
}

// ---------------------------------------------------------------- errors

// The command-line spelling of a library field, so a message points at the
// flag to fix.
std::string flag_of(const std::string& field) {
  static const std::map<std::string, std::string> flags = {
      {"conninfo", "--database-url"}, {"schema", "--schema"},        {"scope.tenant", "--tenant"},
      {"tenant", "--tenant"},         {"queue", "--queue"},          {"type", "--type"},
      {"key", "--key"},               {"payload", "--payload"},      {"priority", "--priority"},
      {"run_at", "--run-at"},         {"deadline", "--deadline"},    {"retry.max_attempts", "--max-attempts"},
      {"status", "--status"},         {"limit", "--limit"},          {"older_than", "--older-than"},
      {"interval", "--interval"},     {"listen", "--listen"},        {"prefix", "--prefix"},
      {"tokens", "--tokens"},
  };
  auto it = flags.find(field);
  return it == flags.end() ? "" : it->second;
}

std::string hint_for(const std::string& field) {
  if (field == "payload") return "\n     quote it for the shell, e.g. --payload '{\"user\": 7}', or read it from a file: --payload @FILE";
  if (field == "conninfo") return "\n     e.g. postgresql://user:password@localhost:5432/app or 'host=localhost dbname=app'";
  return "";
}

// libpq's messages span lines (a hint, the statement's text with a caret);
// one line of the gist reads better after "eoq: ".
std::string db_message(std::string_view what, std::string_view drop_prefix = {}) {
  std::string s(what);
  if (auto p = s.find("\nLINE "); p != std::string::npos) s.resize(p);
  if (!drop_prefix.empty() && s.starts_with(drop_prefix)) s.erase(0, drop_prefix.size());
  for (std::string_view noise : {"ERROR:  ", "FATAL:  "})
    for (auto p = s.find(noise); p != std::string::npos; p = s.find(noise)) s.erase(p, noise.size());
  std::string out;
  for (char c : s) {
    bool space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
    if (space && (out.empty() || out.back() == ' ')) continue;
    out += space ? ' ' : c;
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return clean(out);
}

bool undefined_schema(const DatabaseError& e) {
  // 42P01 undefined_table, 3F000 invalid_schema_name.
  return e.sqlstate() == "42P01" || e.sqlstate() == "3F000";
}

int report(int code, const std::string& message) {
  std::fflush(stdout);
  fmt::print(stderr, "eoq: {}\n", message);
  return code;
}

int run_command(Context& ctx, const std::function<int(Context&)>& command) {
  try {
    return command(ctx);
  } catch (const Failure& e) {
    return report(e.code(), e.what());
  } catch (const KeyConflict& e) {
    return report(kKeyConflict, fmt::format("key conflict: {}", e.rule()));
  } catch (const InvalidArgument& e) {
    auto flag = flag_of(e.field());
    return report(kBadInput, fmt::format("invalid {}{}: {}{}", e.field(), flag.empty() ? "" : " (" + flag + ")",
                                         e.rule(), hint_for(e.field())));
  } catch (const CommitInDoubt& e) {
    return report(kUnavailable, fmt::format("the database connection broke during the submit: {}",
                                            db_message(e.what())));
  } catch (const TransientError& e) {
    if (e.statement() == "connect")
      // libpq's reason (refused, no such database, bad password) is in the
      // message; the store reports every connect failure alike.
      return report(kUnavailable, fmt::format("cannot connect to the database ({}): is it running, and are "
                                              "EOQ_DATABASE_URL or --database-url right?",
                                              db_message(e.what(), "cannot connect to PostgreSQL: ")));
    return report(kUnavailable,
                  fmt::format("the database is unavailable ({}): try again shortly", db_message(e.what())));
  } catch (const DatabaseError& e) {
    if (undefined_schema(e))
      return report(kUnavailable, fmt::format("schema \"{}\" has no eoq tables ({}): run 'eoq{} migrate' first, "
                                              "or name the right schema with --schema",
                                              ctx.opt.schema, db_message(e.what()),
                                              ctx.opt.schema == "eoq" ? "" : " --schema " + ctx.opt.schema));
    return report(kUnavailable, fmt::format("the database refused the request: {}", db_message(e.what())));
  } catch (const NotFound& e) {
    return report(kNotFound, e.what());
  } catch (const std::exception& e) {
    return report(kUnavailable, fmt::format("unexpected error: {}", e.what()));
  }
}

// ---------------------------------------------------------------- the command line

constexpr const char* kMainFooter = R"(Environment:
  EOQ_DATABASE_URL   the database: a libpq URL or key=value string (--database-url wins)
  PGCONNECT_TIMEOUT  seconds to wait for a connection (eoq's default: 10); every
                     other libpq variable (PGPASSWORD, PGSSLMODE, ...) applies too

Global options go before or after the command: eoq --json list, eoq list --json.

Exit status:
  0  done; also a duplicate submit (the existing task is shown) and a cancel of
     a task that had already finished
  1  not found: no task with that id (or, under --tenant, another tenant's)
  2  bad input: an unknown option or invalid value, a retry of a task that is
     not failed, expired or cancelled, a port the dashboard cannot listen on
  3  the database: unreachable, shutting down, not migrated, or it refused
  4  key conflict: submit --key names a task of another type or payload

Run 'eoq COMMAND --help' for a command's options and examples.)";

// The validators' own names (NONNEGATIVE, INT in [1 - 1000]) read as noise in
// the help; the options' descriptions give the ranges in words.
CLI::Validator quiet(CLI::Validator v) {
  v.description("");
  return v;
}

// CLI11's number validators answer "abc" with a range up to DBL_MAX.
CLI::Validator whole_number(std::int64_t min, std::string what) {
  return CLI::Validator(
      [min, what](std::string& text) -> std::string {
        std::int64_t v = 0;
        auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
        if (ec != std::errc() || p != text.data() + text.size() || v < min)
          return fmt::format("'{}' is not {}", text, what);
        return {};
      },
      "");
}

CLI::App* command(CLI::App& app, const char* name, const char* description, const char* group,
                  const char* footer) {
  auto* sub = app.add_subcommand(name, description);
  sub->group(group);
  sub->footer(std::string(footer) +
              "\n\nGlobal options: --database-url URL, --schema NAME, --tenant TENANT, --json\n"
              "(before or after the command; see 'eoq --help').");
  return sub;
}

int run(int argc, char** argv) {
  // libpq waits forever for an unreachable host by default; an operator's
  // command should give up and say so. Explicit settings still win.
  ::setenv("PGCONNECT_TIMEOUT", "10", 0);
  ::setenv("PGAPPNAME", "eoq-cli", 0);

  Context ctx;
  CLI::App app{"eoq: look into and operate the eoq task queues in a PostgreSQL database.", "eoq"};
  app.set_version_flag("--version", "eoq " EOQ_VERSION);
  app.fallthrough();
  auto fmt_ = app.get_formatter();
  fmt_->column_width(26);
  fmt_->label("SUBCOMMAND", "COMMAND");
  fmt_->label("Positionals", "Arguments");

  app.add_option("--database-url", ctx.opt.database_url,
                 "The database: a libpq URL such as\npostgresql://user@host/db, or key=value pairs")
      ->envname("EOQ_DATABASE_URL")
      ->type_name("URL");
  app.add_option("--schema", ctx.opt.schema, "The schema that holds eoq's tables")
      ->type_name("NAME")
      ->capture_default_str();
  ctx.tenant_option =
      app.add_option("--tenant", ctx.opt.tenant,
                     "Act as this tenant: read, cancel, retry and\nsubmit only its tasks")
          ->type_name("TENANT");
  app.add_flag("--json", ctx.opt.json, "One JSON document on stdout (the HTTP API's\nshape) instead of tables");

  std::vector<std::pair<CLI::App*, std::function<int(Context&)>>> actions;
  const char* kInspect = "Inspect";
  const char* kChange = "Change";
  const char* kRun = "Set up and serve";

  // -- stats
  auto* stats = command(app, "stats", "Tasks per queue: counts, oldest pending, throughput", kInspect,
                        "Columns: counts by status; OLDEST PENDING, how long the longest-waiting ready task\n"
                        "has waited; SUCCEEDED/MIN and FAILED/MIN, tasks that finished in the last 60 seconds.\n\n"
                        "Examples:\n  eoq stats\n  eoq --tenant acme stats\n  eoq stats --json | jq '.[] | "
                        "select(.failed_last_minute > 0)'");
  actions.emplace_back(stats, cmd_stats);

  // -- list
  ListArgs list_args;
  auto* list = command(app, "list", "List tasks, with filters and pagination", kInspect,
                       "Tasks come in id order. When a page is full, the command for the next page is\n"
                       "printed (--json: next_after, null at the end). --tenant lists one tenant's tasks.\n\n"
                       "Examples:\n  eoq list --status failed --queue emails\n  eoq list --limit 20 --after 1200"
                       "\n  eoq --tenant acme list --type send_invoice\n  eoq list --status running --json | jq "
                       "'.tasks[].id'");
  list_args.queue_opt = list->add_option("--queue", list_args.queue, "Only tasks in this queue")->type_name("QUEUE");
  list_args.status_opt =
      list->add_option("--status", list_args.status, "Only tasks in this status")
          ->type_name("STATUS")
          ->check(CLI::IsMember({"pending", "running", "succeeded", "failed", "cancelled", "expired", "waiting"}));
  list_args.type_opt = list->add_option("--type", list_args.type, "Only tasks of this type")->type_name("TYPE");
  list_args.after_opt = list->add_option("--after", list_args.after, "Only ids greater than this: the cursor\nthe previous page printed")
                            ->type_name("ID")
                            ->check(whole_number(0, "a task id (a whole number from 0)"));
  list->add_option("--limit", list_args.limit, "Tasks per page (1..1000)")
      ->type_name("N")
      ->check(quiet(CLI::Range(1, 1000)))
      ->capture_default_str();
  actions.emplace_back(list, [&](Context& c) { return cmd_list(c, list_args); });

  // -- show
  TaskId show_id = 0;
  auto* show = command(app, "show", "One task with its attempts, checkpoint and result",
                       kInspect,
                       "Examples:\n  eoq show 42\n  eoq show 42 --json | jq '.attempts[] | select(.error)'");
  show->add_option("id", show_id, "The task's id")->required()->type_name("ID")->check(whole_number(1, "a task id (a whole number from 1)"));
  actions.emplace_back(show, [&](Context& c) { return cmd_show(c, show_id); });

  // -- watch
  WatchArgs watch_args;
  auto* watch = command(app, "watch", "Live view of the queues and running tasks", kInspect,
                        "On a terminal the view redraws in place until Ctrl-C. Otherwise (a pipe, a file)\n"
                        "each frame is printed after the last, separated by a blank line; with --json each\n"
                        "frame is one line: {\"time\", \"stats\", \"running\", \"pending\"}.\n\n"
                        "Examples:\n  eoq watch\n  eoq watch --queue images --interval 500ms\n"
                        "  eoq watch --count 1 > snapshot.txt");
  watch->add_option("--interval", watch_args.interval, "Time between frames (at least 100ms)")
      ->type_name("DURATION")
      ->capture_default_str();
  watch->add_option("--count", watch_args.count, "Stop after N frames (0: until Ctrl-C)")
      ->type_name("N")
      ->check(whole_number(0, "a number of frames (0 or more)"))
      ->capture_default_str();
  watch_args.queue_opt = watch->add_option("--queue", watch_args.queue, "Only this queue")->type_name("QUEUE");
  watch->add_option("--limit", watch_args.limit, "Running and pending tasks shown, each\n(1..1000)")
      ->type_name("N")
      ->check(quiet(CLI::Range(1, 1000)))
      ->capture_default_str();
  actions.emplace_back(watch, [&](Context& c) { return cmd_watch(c, watch_args); });

  // -- submit
  SubmitArgs submit_args;
  auto* submit = command(
      app, "submit", "Submit a task (at most once per --key and queue)", kChange,
      "Times: RFC 3339 (2026-11-23T10:00:00Z, 2026-11-23T11:00:00+01:00) or relative to now\n"
      "(+30s, +10m, +2h, +1d12h). A --key that is already taken in the queue submits nothing:\n"
      "the existing task is shown, marked duplicate, and the exit status is 0; if that task has\n"
      "another type or payload, nothing is submitted and the exit status is 4.\n\n"
      "Examples:\n  eoq submit --type send_email --payload '{\"to\": \"ann@example.com\"}'\n"
      "  eoq submit --queue reports --type monthly --key 2026-11 --run-at +2h --deadline +1d\n"
      "  eoq --tenant acme submit --type import --payload @import.json --max-attempts 5");
  submit->add_option("--queue", submit_args.queue, "The queue")->type_name("QUEUE")->capture_default_str();
  submit->add_option("--type", submit_args.type, "What the task does: picks the handler that\nworkers run for it")
      ->type_name("TYPE")
      ->required();
  submit_args.key_opt =
      submit->add_option("--key", submit_args.key, "Idempotency key, unique per queue (and tenant)")->type_name("KEY");
  submit->add_option("--payload", submit_args.payload, "The task's input as JSON; @FILE reads a\nfile, - reads stdin")
      ->type_name("JSON")
      ->capture_default_str();
  submit_args.run_at_opt =
      submit->add_option("--run-at", submit_args.run_at, "Not before this time (default: now)")->type_name("TIME");
  submit_args.deadline_opt = submit->add_option("--deadline", submit_args.deadline,
                                                "Not started after this time: it expires\ninstead")
                                 ->type_name("TIME");
  submit->add_option("--priority", submit_args.priority, "Lower runs first (-32768..32767)")
      ->type_name("N")
      ->capture_default_str();
  submit->add_option("--max-attempts", submit_args.max_attempts, "Attempts before the task fails for good\n(1..1000)")
      ->type_name("N")
      ->capture_default_str();
  actions.emplace_back(submit, [&](Context& c) { return cmd_submit(c, submit_args); });

  // -- cancel
  TaskId cancel_id = 0;
  auto* cancel = command(app, "cancel", "Cancel a task, or ask its worker to stop it",
                         kChange,
                         "Outcomes (--json: outcome): cancelled; cancel_requested (running: its worker stops\n"
                         "at its next heartbeat); already_finished (exit status 0: it will not run again);\n"
                         "not_found (exit status 1).\n\nExample:\n  eoq cancel 42");
  cancel->add_option("id", cancel_id, "The task's id")->required()->type_name("ID")->check(whole_number(1, "a task id (a whole number from 1)"));
  actions.emplace_back(cancel, [&](Context& c) { return cmd_cancel(c, cancel_id); });

  // -- retry
  TaskId retry_id = 0;
  auto* retry = command(app, "retry", "Run a failed, expired or cancelled task again", kChange,
                        "The task becomes pending at once, with at least one more attempt than it has used;\n"
                        "its history, checkpoint and last error are kept, a passed deadline is dropped.\n"
                        "Any other task is not_retryable: exit status 2, and the message says its status.\n\n"
                        "Example:\n  eoq retry 42");
  retry->add_option("id", retry_id, "The task's id")->required()->type_name("ID")->check(whole_number(1, "a task id (a whole number from 1)"));
  actions.emplace_back(retry, [&](Context& c) { return cmd_retry(c, retry_id); });

  // -- prune
  PruneArgs prune_args;
  auto* prune = command(app, "prune", "Delete finished tasks older than an age",
                        kChange,
                        "Finished means succeeded, failed, cancelled or expired; pending and running tasks\n"
                        "are never deleted. A pruned task's key can be submitted again. Not available\n"
                        "with --tenant: it applies to every tenant.\n\n"
                        "Examples:\n  eoq prune --older-than 7d --dry-run\n  eoq prune --older-than 30d");
  prune->add_option("--older-than", prune_args.older_than, "Finished longer ago than this: 7d, 12h, 1d12h, ...")
      ->type_name("DURATION")
      ->required();
  prune->add_flag("--dry-run", prune_args.dry_run, "Only count what would be deleted");
  actions.emplace_back(prune, [&](Context& c) { return cmd_prune(c, prune_args); });

  // -- migrate
  auto* migrate = command(app, "migrate", "Create or upgrade eoq's tables (idempotent)", kRun,
                          "Safe to run from many processes at once and on every deploy.\n\n"
                          "Example:\n  EOQ_DATABASE_URL=postgresql://app@db/app eoq migrate");
  actions.emplace_back(migrate, cmd_migrate);

  // -- dashboard
  DashboardArgs dash_args;
  auto* dashboard = command(
      app, "dashboard", "Serve the web dashboard and its JSON API", kRun,
      "Prints one line, 'eoq dashboard listening on http://HOST:PORT/', once it serves.\n"
      "A token file has one '<token> <tenant|*> <read|write>' per line; '*' sees every\n"
      "tenant, write may submit, cancel and retry. --no-auth (everyone is an admin) and a\n"
      "listen address other than loopback without tokens are refused.\n\n"
      "Examples:\n  eoq dashboard --no-auth\n  eoq dashboard --listen 0.0.0.0:8080 --tokens /etc/eoq/tokens\n"
      "  eoq dashboard --listen 127.0.0.1:0 --tokens tokens.txt --prefix /eoq");
  dashboard->add_option("--listen", dash_args.listen, "Where to serve (port 0 picks a free one)")
      ->type_name("HOST:PORT")
      ->capture_default_str();
  dash_args.tokens_opt = dashboard->add_option("--tokens", dash_args.tokens, "The bearer tokens file")
                             ->type_name("FILE")
                             ->check(quiet(CLI::ExistingFile));
  auto* no_auth = dashboard->add_flag("--no-auth", dash_args.no_auth, "No tokens: every request is an admin\n(loopback addresses only)");
  no_auth->excludes(dash_args.tokens_opt);
  dashboard->add_option("--prefix", dash_args.prefix, "Serve under this path, e.g. /eoq")->type_name("PATH");
  actions.emplace_back(dashboard, [&](Context& c) { return cmd_dashboard(c, dash_args); });

  // Set last: subcommands inherit the footer and the subcommand limit of the app.
  app.footer(kMainFooter);
  app.require_subcommand(1);
  app.failure_message([](const CLI::App* a, const CLI::Error& e) {
    std::string where = "eoq";
    for (const auto* sub : a->get_subcommands()) where += " " + sub->get_name();
    return fmt::format("eoq: {}\nRun '{} --help' for usage.\n", e.what(), where);
  });

  if (argc <= 1) {
    fmt::print("{}", app.help());
    return kBadInput;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? kOk : kBadInput;
  }
  for (const auto& [sub, action] : actions)
    if (sub->parsed()) return run_command(ctx, action);
  return kBadInput;  // unreachable: require_subcommand(1)
}

}  // namespace
}  // namespace eoq::cli

int main(int argc, char** argv) { return eoq::cli::run(argc, argv); }
