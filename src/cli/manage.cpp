// eoq migrate, submit, cancel, retry and prune: the commands that change something.
#include "cli/cli.hpp"

#include <fmt/ranges.h>

#include <charconv>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

namespace eoq::cli {

// ---------------------------------------------------------------- migrate

int cmd_migrate(Context& ctx) {
  auto applied = ctx.store().migrate();
  if (ctx.opt.json) {
    print_json({{"schema", ctx.opt.schema}, {"migrated", true}, {"applied", applied}});
  } else if (applied.empty()) {
    fmt::print("schema \"{}\" is up to date\n", ctx.opt.schema);
  } else {
    fmt::print("schema \"{}\": applied {} migration{} ({}); it is up to date now\n", ctx.opt.schema,
               applied.size(), applied.size() == 1 ? "" : "s", fmt::join(applied, ", "));
  }
  return kOk;
}

// ---------------------------------------------------------------- submit

namespace {

std::string read_payload(const std::string& arg) {
  if (arg == "-") return std::string(std::istreambuf_iterator<char>(std::cin), {});
  if (!arg.empty() && arg[0] == '@') {
    std::ifstream in(arg.substr(1), std::ios::binary);
    if (!in) throw InvalidArgument("payload", fmt::format("cannot read the file '{}'", arg.substr(1)));
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  return arg;
}

}  // namespace

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
  t.key_reuse = a.key_reuse == "lenient" ? KeyReuse::lenient : KeyReuse::strict;
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

int cmd_delete(Context& ctx, TaskId id) {
  auto outcome = ctx.store().remove(id, ctx.scope());
  if (ctx.opt.json) print_json({{"outcome", to_string(outcome)}, {"id", id}});
  switch (outcome) {
    case RemoveOutcome::not_found: not_found(ctx, id);
    case RemoveOutcome::removed:
      if (!ctx.opt.json) fmt::print("deleted task {}, with its key and history\n", id);
      return kOk;
    case RemoveOutcome::running:
      throw Failure(kBadInput, fmt::format("task {} is running: cancel it first ('eoq cancel {}'), then delete it "
                                           "once its worker has stopped it",
                                           id, id));
  }
  return kOk;
}

int cmd_pause(Context& ctx, const std::string& queue, bool pause) {
  if (ctx.scoped())
    throw Failure(kBadInput, "pause and resume act on a queue in every tenant: run them without --tenant");
  if (pause) ctx.store().pause(queue);
  else ctx.store().resume(queue);
  if (ctx.opt.json) {
    print_json({{"queue", queue}, {"paused", pause}});
  } else if (pause) {
    fmt::print("queue {} is paused: no worker claims its tasks until 'eoq resume {}'; running ones finish\n",
               clean(queue), clean(queue));
  } else {
    fmt::print("queue {} is running: workers claim its tasks again\n", clean(queue));
  }
  return kOk;
}

RateLimit parse_rate(std::string_view field, std::string_view text) {
  const auto slash = text.find('/');
  const std::string rule = "must be N/DURATION, such as 100/1m, 5/s or 10/500ms";
  if (slash == std::string_view::npos || slash == 0) throw InvalidArgument(std::string(field), rule);
  int n = 0;
  auto digits = text.substr(0, slash);
  auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n);
  if (ec != std::errc() || p != digits.data() + digits.size()) throw InvalidArgument(std::string(field), rule);
  auto period = text.substr(slash + 1);
  // A bare unit is one of it: 5/s, 100/m.
  const bool bare = !period.empty() && !(period[0] >= '0' && period[0] <= '9');
  return RateLimit{n, parse_duration(field, bare ? "1" + std::string(period) : std::string(period))};
}

std::string format_limits(const QueueLimits& l) {
  std::vector<std::string> parts;
  if (l.concurrency) parts.push_back(fmt::format("at most {} running", *l.concurrency));
  if (l.partition_concurrency) parts.push_back(fmt::format("at most {} running per partition", *l.partition_concurrency));
  if (l.rate) parts.push_back(fmt::format("at most {} starts per {}", l.rate->limit, format_duration(l.rate->period)));
  if (l.partition_rate)
    parts.push_back(fmt::format("at most {} starts per {} per partition", l.partition_rate->limit,
                                format_duration(l.partition_rate->period)));
  if (parts.empty()) return "no limits";
  return fmt::format("{}", fmt::join(parts, ", "));
}

int cmd_limit(Context& ctx, const LimitArgs& a) {
  if (ctx.scoped())
    throw Failure(kBadInput, "limits apply to a queue in every tenant: run 'eoq limit' without --tenant");
  const bool any = *a.concurrency_opt || *a.partition_concurrency_opt || *a.rate_opt || *a.partition_rate_opt;
  if (a.none == any)
    throw Failure(kBadInput, "say the limits (--concurrency, --partition-concurrency, --rate, --partition-rate) "
                             "or --none, not both");
  QueueLimits l;
  if (*a.concurrency_opt) l.concurrency = a.concurrency;
  if (*a.partition_concurrency_opt) l.partition_concurrency = a.partition_concurrency;
  if (*a.rate_opt) l.rate = parse_rate("rate", a.rate);
  if (*a.partition_rate_opt) l.partition_rate = parse_rate("partition_rate", a.partition_rate);
  ctx.store().set_limits(a.queue, l);
  if (ctx.opt.json) {
    print_json({{"queue", a.queue}, {"limits", json::to_json(l)}});
  } else {
    fmt::print("queue {}: {}\n", clean(a.queue), format_limits(l));
  }
  return kOk;
}

int cmd_limits(Context& ctx) {
  auto all = ctx.store().limits();
  if (ctx.opt.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& [q, l] : all) out.push_back({{"queue", q}, {"limits", json::to_json(l)}});
    print_json(out);
    return kOk;
  }
  if (all.empty()) fmt::print("no queue has limits\n");
  for (const auto& [q, l] : all) fmt::print("{}: {}\n", clean(q), format_limits(l));
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

}  // namespace eoq::cli
