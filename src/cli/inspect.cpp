// eoq stats, list and show: what is in the queues.
#include "cli/cli.hpp"

#include <algorithm>
#include <map>

namespace eoq::cli {

// ---------------------------------------------------------------- stats

Table stats_table(const std::vector<QueueStats>& stats, bool unicode) {
  Table table({{"QUEUE"},
               {"PENDING", true},
               {"RUNNING", true},
               {"WAITING", true},
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
    std::string name = s.queue;
    if (s.paused) name += " (paused)";
    if (!s.limits.empty()) name += " (limited)";
    table.add({name, std::to_string(s.pending), std::to_string(s.running), std::to_string(s.waiting),
               std::to_string(s.succeeded),
               std::to_string(s.failed), std::to_string(s.cancelled), std::to_string(s.expired), age,
               std::to_string(s.succeeded_last_minute), std::to_string(s.failed_last_minute)});
    total.pending += s.pending;
    total.running += s.running;
    total.waiting += s.waiting;
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
               std::to_string(total.waiting), std::to_string(total.succeeded), std::to_string(total.failed), std::to_string(total.cancelled),
               std::to_string(total.expired), age, std::to_string(total.succeeded_last_minute),
               std::to_string(total.failed_last_minute)});
  }
  return table;
}

int cmd_stats(Context& ctx) {
  auto stats = ctx.store().stats(ctx.scope());
  if (ctx.opt.json) {
    // GET /api/stats's shape, so one parser reads both.
    auto queues = Json::array();
    for (const auto& s : stats) queues.push_back(json::to_json(s));
    print_json({{"queues", std::move(queues)},
                {"now", json::format_time(std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now()))}});
  } else if (stats.empty()) {
    fmt::print("no tasks{} in schema \"{}\"\n", ctx.for_tenant(), ctx.opt.schema);
  } else {
    fmt::print("{}", stats_table(stats, ctx.unicode).render());
  }
  return kOk;
}

// ---------------------------------------------------------------- list

namespace {

std::string next_page_command(const Context& ctx, const ListArgs& a, TaskId next) {
  std::string cmd = "eoq";
  if (ctx.opt.schema != "eoq") cmd += " --schema " + shell_quote(ctx.opt.schema);
  if (ctx.scoped()) cmd += " --tenant " + shell_quote(ctx.opt.tenant);
  cmd += " list";
  if (a.queue_opt->count()) cmd += " --queue " + shell_quote(a.queue);
  if (a.status_opt->count()) cmd += " --status " + a.status;
  if (a.type_opt->count()) cmd += " --type " + shell_quote(a.type);
  if (a.key_opt->count()) cmd += " --key " + shell_quote(a.key);
  if (a.key_prefix_opt->count()) cmd += " --key-prefix " + shell_quote(a.key_prefix);
  if (a.type_prefix_opt->count()) cmd += " --type-prefix " + shell_quote(a.type_prefix);
  if (a.payload_opt->count()) cmd += " --payload-contains " + shell_quote(a.payload);
  if (a.error_opt->count()) cmd += " --error " + shell_quote(a.error);
  if (a.order != "oldest") cmd += " --order " + a.order;
  if (a.limit != 100) cmd += fmt::format(" --limit {}", a.limit);
  return cmd + fmt::format(" --after {}", next);
}

}  // namespace

int cmd_list(Context& ctx, const ListArgs& a) {
  ListQuery q;
  if (a.queue_opt->count()) q.queue = a.queue;
  if (a.status_opt->count()) q.status = parse_status(a.status);
  if (a.type_opt->count()) q.type = a.type;
  if (a.key_opt->count()) q.key = a.key;
  if (a.key_prefix_opt->count()) q.key_prefix = a.key_prefix;
  if (a.type_prefix_opt->count()) q.type_prefix = a.type_prefix;
  if (a.payload_opt->count()) q.payload_contains = a.payload;
  if (a.error_opt->count()) q.error_contains = a.error;
  if (a.after_opt->count()) q.after = a.after;
  q.newest_first = a.order == "newest";
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
               {"UPDATED"},
               {"ERROR", false, 40}},
              ctx.unicode);
  for (const auto& t : page.tasks) {
    table.add({std::to_string(t.id), std::string(to_string(t.status)), t.queue, t.type, t.tenant.value_or(""),
               t.key.value_or(""), std::to_string(t.priority), attempts_of(t), relative(t.run_at, at),
               relative(t.updated_at, at), t.last_error.value_or("")});
  }
  fmt::print("{}", table.render());
  if (page.next_after) fmt::print("\nnext page: {}\n", next_page_command(ctx, a, *page.next_after));
  return kOk;
}

// ---------------------------------------------------------------- show

namespace {

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

}  // namespace

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
    for (const auto& r : rs)
      text += fmt::format("{}{} {} ({})", text.empty() ? "" : "\n", r.id, r.type, to_string(r.status));
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

}  // namespace eoq::cli
