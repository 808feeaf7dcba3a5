// eoq: the operator's command-line tool. Every command is one or two calls on
// eoq::PostgresStore; the tool is about the face around them: parsing, tables
// for people, JSON for scripts (the HTTP API's shape), and exit codes a script
// can branch on. This file: the shared helpers, the command line, and the
// mapping of errors to exit codes; the commands are in inspect.cpp, manage.cpp
// and live.cpp (see cli.hpp).
#include "cli/cli.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>

#ifndef EOQ_VERSION
#define EOQ_VERSION "unknown"
#endif

namespace eoq::cli {

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

TimePoint now() { return std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now()); }

void print_json(const Json& j, int indent) {
  // Task text is UTF-8 by the database's rules; `replace` keeps one odd byte
  // from turning a whole answer into an exception.
  fmt::print("{}\n", j.dump(indent, ' ', false, Json::error_handler_t::replace));
}

Json task_or_null(const std::optional<Task>& t) { return t ? json::to_json(*t) : Json(nullptr); }

std::string short_time(TimePoint t) { return json::format_time(t).substr(0, 19) + "Z"; }
std::string when(TimePoint t, TimePoint at) { return fmt::format("{} ({})", short_time(t), relative(t, at)); }

std::string attempts_of(const Task& t) { return fmt::format("{}/{}", t.attempts, t.retry.max_attempts); }

std::string compact(std::string_view json_text, std::size_t limit) {
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
  throw Failure(kNotFound, fmt::format("task {} not found{}: 'eoq list' shows the ids there are", id,
                                       ctx.for_tenant()));
}

namespace {

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
      {"tokens", "--tokens"},         {"key_prefix", "--key-prefix"}, {"type_prefix", "--type-prefix"},
      {"payload_contains", "--payload-contains"}, {"error_contains", "--error"},
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
    return report(kKeyConflict, fmt::format("key conflict: {} (payloads are compared as JSON values); to get the "
                                            "task that holds the key instead, submit with --key-reuse lenient",
                                            e.conflict()));
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
  } catch (const SchemaTooNew& e) {
    // A newer eoq migrated the schema past what this one may run against.
    return report(kUnavailable, e.what());
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
                        "Columns: counts by status (WAITING: for their parents); OLDEST PENDING, how long the\n"
                        "longest-waiting ready task has waited; SUCCEEDED/MIN and FAILED/MIN, tasks that finished\n"
                        "in the last minute. --json prints GET /api/stats's JSON, which also has every\n"
                        "outcome's *_total (tasks that ever finished so).\n\n"
                        "Examples:\n  eoq stats\n  eoq --tenant acme stats\n  eoq stats --json | jq '.queues[] | "
                        "select(.failed_last_minute > 0)'");
  actions.emplace_back(stats, cmd_stats);

  // -- list
  ListArgs list_args;
  auto* list = command(app, "list", "List tasks, with filters, search and pagination", kInspect,
                       "Tasks come in id order (--order newest: newest first). When a page is full, the\n"
                       "command for the next page is printed (--json: next_after, null at the end).\n"
                       "--tenant lists one tenant's tasks.\n\n"
                       "Examples:\n  eoq list --status failed --queue emails\n  eoq list --limit 20 --after 1200"
                       "\n  eoq --tenant acme list --type send_invoice\n  eoq list --order newest --key-prefix "
                       "order-2026-\n  eoq list --payload-contains '{\"user\": {\"id\": 7}}' --error timeout\n"
                       "  eoq list --status running --json | jq '.tasks[].id'");
  list_args.queue_opt = list->add_option("--queue", list_args.queue, "Only tasks in this queue")->type_name("QUEUE");
  list_args.status_opt =
      list->add_option("--status", list_args.status, "Only tasks in this status")
          ->type_name("STATUS")
          ->check(CLI::IsMember({"pending", "running", "succeeded", "failed", "cancelled", "expired", "waiting"}));
  list_args.type_opt = list->add_option("--type", list_args.type, "Only tasks of this type")->type_name("TYPE");
  list_args.type_prefix_opt =
      list->add_option("--type-prefix", list_args.type_prefix, "Only types that start so")->type_name("TEXT");
  list_args.key_opt = list->add_option("--key", list_args.key, "Only the task with this key")->type_name("KEY");
  list_args.key_prefix_opt =
      list->add_option("--key-prefix", list_args.key_prefix, "Only keys that start so")->type_name("TEXT");
  list_args.payload_opt = list->add_option("--payload-contains", list_args.payload,
                                           "Only payloads that contain this JSON (as\njsonb's @>: members and "
                                           "elements)")
                              ->type_name("JSON");
  list_args.error_opt =
      list->add_option("--error", list_args.error, "Only tasks whose last error holds this\ntext (any case)")
          ->type_name("TEXT");
  list->add_option("--order", list_args.order, "oldest or newest first")
      ->type_name("ORDER")
      ->check(CLI::IsMember({"oldest", "newest"}))
      ->capture_default_str();
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
      "another type or payload (compared as JSON values), nothing is submitted and the exit\n"
      "status is 4, unless --key-reuse lenient.\n\n"
      "Examples:\n  eoq submit --type send_email --payload '{\"to\": \"ann@example.com\"}'\n"
      "  eoq submit --queue reports --type monthly --key 2026-11 --run-at +2h --deadline +1d\n"
      "  eoq --tenant acme submit --type import --payload @import.json --max-attempts 5");
  submit->add_option("--queue", submit_args.queue, "The queue")->type_name("QUEUE")->capture_default_str();
  submit->add_option("--type", submit_args.type, "What the task does: picks the handler that\nworkers run for it")
      ->type_name("TYPE")
      ->required();
  submit_args.key_opt =
      submit->add_option("--key", submit_args.key, "Idempotency key, unique per queue (and tenant)")->type_name("KEY");
  submit->add_option("--key-reuse", submit_args.key_reuse,
                     "strict: a --key taken by a task of another type\nor payload (compared as JSON values) exits 4;\n"
                     "lenient: shows that task, exit status 0")
      ->type_name("MODE")
      ->check(quiet(CLI::IsMember({"strict", "lenient"})))
      ->capture_default_str();
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

  // -- pause / resume
  std::string pause_queue, resume_queue;
  auto* pause = command(app, "pause", "Pause a queue: no worker claims its tasks", kChange,
                        "Every worker, process and machine at once, from the moment the command returns;\n"
                        "tasks running then finish, submits go on. Persisted until 'eoq resume'. A paused\n"
                        "queue shows as paused in 'eoq stats', the dashboard and /metrics.\n\n"
                        "Example:\n  eoq pause emails");
  pause->add_option("queue", pause_queue, "The queue")->required()->type_name("QUEUE");
  actions.emplace_back(pause, [&](Context& c) { return cmd_pause(c, pause_queue, true); });
  auto* resume = command(app, "resume", "Resume a paused queue", kChange,
                         "Workers waiting for work wake up at once.\n\nExample:\n  eoq resume emails");
  resume->add_option("queue", resume_queue, "The queue")->required()->type_name("QUEUE");
  actions.emplace_back(resume, [&](Context& c) { return cmd_pause(c, resume_queue, false); });

  // -- limit / limits
  LimitArgs limit_args;
  auto* limit = command(app, "limit", "Set a queue's concurrency and rate limits", kChange,
                        "For every worker, process and machine at once, from the moment the command\n"
                        "returns; running tasks count and are not stopped. The limits given replace all\n"
                        "of the queue's limits; --none removes them. A partition is what a task names\n"
                        "as its partition (a tenant, a customer id).\n\n"
                        "Examples:\n  eoq limit emails --concurrency 3\n"
                        "  eoq limit reports --partition-concurrency 1 --rate 100/1m\n  eoq limit emails --none");
  limit->add_option("queue", limit_args.queue, "The queue")->required()->type_name("QUEUE");
  limit_args.concurrency_opt =
      limit->add_option("--concurrency", limit_args.concurrency, "Tasks of the queue running at once")
          ->type_name("N");
  limit_args.partition_concurrency_opt =
      limit->add_option("--partition-concurrency", limit_args.partition_concurrency,
                        "Tasks of each partition running at once")
          ->type_name("N");
  limit_args.rate_opt =
      limit->add_option("--rate", limit_args.rate, "Starts of the queue per period (100/1m, 5/s)")->type_name("N/PERIOD");
  limit_args.partition_rate_opt =
      limit->add_option("--partition-rate", limit_args.partition_rate, "Starts of each partition per period")
          ->type_name("N/PERIOD");
  limit->add_flag("--none", limit_args.none, "Remove the queue's limits");
  actions.emplace_back(limit, [&](Context& c) { return cmd_limit(c, limit_args); });
  auto* limits = command(app, "limits", "List the queues that have limits", kInspect,
                         "Example:\n  eoq limits --json");
  actions.emplace_back(limits, [&](Context& c) { return cmd_limits(c); });

  // -- delete
  TaskId delete_id = 0;
  auto* del = command(app, "delete", "Delete a task with its key and history", kChange,
                      "A finished task goes at once; a pending or waiting one is cancelled first (its waiting\n"
                      "children follow it, as on cancel). A running task is refused (exit status 2): cancel\n"
                      "it, then delete it once its worker has stopped it. Its key can be used again.\n"
                      "Outcomes (--json: outcome): removed; running; not_found (exit status 1).\n\n"
                      "Example:\n  eoq delete 42");
  del->add_option("id", delete_id, "The task's id")->required()->type_name("ID")->check(whole_number(1, "a task id (a whole number from 1)"));
  actions.emplace_back(del, [&](Context& c) { return cmd_delete(c, delete_id); });

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
  std::string commands;
  for (const auto& [sub, _] : actions) commands += (commands.empty() ? "" : ", ") + sub->get_name();
  app.failure_message([commands](const CLI::App* a, const CLI::Error& e) {
    // A word that is no command is left over, and CLI11 only says that a
    // command is missing.
    if (a->get_subcommands().empty() && !a->remaining().empty() && !a->remaining().front().starts_with('-'))
      return fmt::format("eoq: unknown command '{}' (the commands: {})\nRun 'eoq --help' for usage.\n",
                         a->remaining().front(), commands);
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
