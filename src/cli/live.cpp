// eoq watch and dashboard: views that stay up until Ctrl-C.
#include "cli/cli.hpp"

#include <eoq/dashboard.hpp>

#include <signal.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <cstdio>
#include <ctime>

namespace eoq::cli {

// ---------------------------------------------------------------- watch

namespace {

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

}  // namespace

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

}  // namespace eoq::cli
