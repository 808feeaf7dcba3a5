// The `eoq` command-line tool, run as a child process (EOQ_CLI) against a fresh
// schema of the test database: every command, its --json answer read back and
// compared with what the store says, its human output, and its exit code for
// each class of failure. Data is seeded and checked through the library.
#include "support.hpp"

#include "cli/text.hpp"
#include "json/task_json.hpp"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

extern char** environ;

#ifndef EOQ_CLI
#error "EOQ_CLI must name the eoq binary"
#endif

using namespace std::chrono_literals;
using eoq::Millis;
using eoq::NewTask;
using eoq::TaskStatus;
using eoq::test::StoreKind;
using eoq::test::TestStore;
using Json = nlohmann::json;

namespace {

struct Run {
  int code = -1;
  std::string out, err;
};

// Runs the binary with `args`; EOQ_DATABASE_URL is `url` (unset when empty),
// whatever the test's own environment says.
Run run_cli(const std::vector<std::string>& args, const std::optional<std::string>& url) {
  int out[2], err[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  REQUIRE(::pipe2(err, O_CLOEXEC) == 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err[1], 2);

  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (!std::string_view(*e).starts_with("EOQ_DATABASE_URL=")) env.emplace_back(*e);
  if (url) env.push_back("EOQ_DATABASE_URL=" + *url);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_s{EOQ_CLI};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);

  pid_t pid = -1;
  int rc = posix_spawn(&pid, EOQ_CLI, &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(out[1]);
  ::close(err[1]);
  if (rc != 0) {
    ::close(out[0]);
    ::close(err[0]);
    FAIL("cannot start " EOQ_CLI ": " << std::strerror(rc));
  }

  Run r;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  std::string* sinks[2] = {&r.out, &r.err};
  auto deadline = std::chrono::steady_clock::now() + 30s;
  int open = 2;
  bool timed_out = false;
  while (open > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left <= 0ms) {
      timed_out = true;
      ::kill(pid, SIGKILL);
      break;
    }
    if (::poll(fds, 2, static_cast<int>(left.count())) < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[4096];
      auto n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        sinks[i]->append(buf, static_cast<std::size_t>(n));
      } else {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open;
      }
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) ::close(f.fd);
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  // Shown with the next assertion, which is usually the one about this run.
  UNSCOPED_INFO("eoq " << fmt::format("{}", fmt::join(args, " ")) << " -> " << r.code << "\nstdout:\n" << r.out
                       << "\nstderr:\n" << r.err);
  REQUIRE_FALSE(timed_out);
  return r;
}

// The tool pointed at one TestStore's schema.
class Eoq {
 public:
  explicit Eoq(const TestStore& s) : url_(s.conninfo()), schema_(s.schema()) {}
  Eoq(std::string url, std::string schema) : url_(std::move(url)), schema_(std::move(schema)) {}

  Run operator()(std::vector<std::string> args) const {
    args.insert(args.begin(), {"--schema", schema_});
    return run_cli(args, url_);
  }
  // Runs with --json, checks the exit code and that stdout is one JSON document.
  Json json(std::vector<std::string> args, int expected_code = 0) const {
    args.push_back("--json");
    auto r = (*this)(args);
    INFO("stdout:\n" << r.out << "\nstderr:\n" << r.err);
    REQUIRE(r.code == expected_code);
    REQUIRE(Json::accept(r.out));
    return Json::parse(r.out);
  }
  const std::string& schema() const { return schema_; }

 private:
  std::string url_, schema_;
};

NewTask task(std::string type, std::string queue = "default") {
  NewTask t;
  t.type = std::move(type);
  t.queue = std::move(queue);
  return t;
}

eoq::Lease claim_one(eoq::TaskStore& store, std::string queue = "default") {
  eoq::ClaimRequest r;
  r.queues = {std::move(queue)};
  r.owner = "worker-1";
  auto leases = store.claim(r);
  REQUIRE(leases.size() == 1);
  return leases.front();
}

std::vector<eoq::TaskId> ids_of(const Json& tasks) {
  std::vector<eoq::TaskId> ids;
  for (const auto& t : tasks) ids.push_back(t.at("id").get<eoq::TaskId>());
  return ids;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

eoq::TimePoint time_of(const Json& v) { return eoq::json::parse_time("test", v.get<std::string>()); }

Json opt_json(const std::optional<std::string>& s) { return s ? Json(*s) : Json(nullptr); }

// Every field of the JSON task against the store's task.
void check_task(const Json& j, const eoq::Task& t) {
  CHECK(j.at("id") == t.id);
  CHECK(j.at("queue") == t.queue);
  CHECK(j.at("type") == t.type);
  CHECK(j.at("key") == opt_json(t.key));
  CHECK(j.at("tenant") == opt_json(t.tenant));
  CHECK(j.at("status") == std::string(eoq::to_string(t.status)));
  CHECK(j.at("priority") == t.priority);
  CHECK(j.at("payload") == Json::parse(t.payload));
  CHECK(time_of(j.at("run_at")) == t.run_at);
  CHECK((j.at("deadline").is_null() ? std::nullopt : std::optional(time_of(j.at("deadline")))) == t.deadline);
  CHECK(j.at("attempts") == t.attempts);
  CHECK(j.at("retry").at("max_attempts") == t.retry.max_attempts);
  CHECK(j.at("version") == t.version);
  CHECK(j.at("lease_owner") == opt_json(t.lease_owner));
  CHECK(j.at("cancel_requested") == t.cancel_requested);
  CHECK(j.at("progress") == t.progress);
  CHECK(j.at("stage") == t.stage);
  CHECK(j.at("checkpoint_stage") == opt_json(t.checkpoint_stage));
  CHECK(j.at("checkpoint") == (t.checkpoint ? Json::parse(*t.checkpoint) : Json(nullptr)));
  CHECK(j.at("result") == (t.result ? Json::parse(*t.result) : Json(nullptr)));
  CHECK(j.at("last_error") == opt_json(t.last_error));
  CHECK(time_of(j.at("created_at")) == t.created_at);
  CHECK(time_of(j.at("updated_at")) == t.updated_at);
  CHECK((j.at("finished_at").is_null() ? std::nullopt : std::optional(time_of(j.at("finished_at")))) ==
        t.finished_at);
}

std::int64_t minutes_between(eoq::TimePoint a, eoq::TimePoint b) {
  return std::chrono::duration_cast<std::chrono::minutes>(a - b).count();
}

}  // namespace

// ---------------------------------------------------------------- no database needed

TEST_CASE("cli: --help lists every command, the environment and the exit codes", "[cli]") {
  auto r = run_cli({"--help"}, std::nullopt);
  CHECK(r.code == 0);
  for (auto cmd : {"migrate", "stats", "list", "show", "submit", "cancel", "delete", "retry", "pause", "resume", "prune", "watch", "dashboard"})
    CHECK(contains(r.out, fmt::format("\n  {} ", cmd)));
  CHECK(contains(r.out, "EOQ_DATABASE_URL"));
  CHECK(contains(r.out, "Exit status"));
  for (auto cmd : {"migrate", "stats", "list", "show", "submit", "cancel", "delete", "retry", "pause", "resume", "prune", "watch", "dashboard"}) {
    auto h = run_cli({cmd, "--help"}, std::nullopt);
    INFO(cmd);
    CHECK(h.code == 0);
    CHECK(contains(h.out, fmt::format("Usage: eoq {}", cmd)));
    CHECK(contains(h.out, "Example"));
    CHECK(contains(h.out, "Global options"));
  }
  CHECK(run_cli({"--version"}, std::nullopt).out.starts_with("eoq "));
  // No command: the help, and the status of bad input.
  auto bare = run_cli({}, std::nullopt);
  CHECK(bare.code == 2);
  CHECK(contains(bare.out, "Usage: eoq"));
}

TEST_CASE("cli: parse errors exit 2 and say what was wrong on stderr", "[cli]") {
  auto r = run_cli({"list", "--bogus"}, "postgresql://127.0.0.1:1/x");
  CHECK(r.code == 2);
  CHECK(r.out.empty());
  CHECK(contains(r.err, "--bogus"));
  CHECK(contains(r.err, "eoq list --help"));

  auto unknown = run_cli({"frobnicate"}, std::nullopt);
  CHECK(unknown.code == 2);
  CHECK(contains(unknown.err, "unknown command 'frobnicate' (the commands: stats, list, "));
  CHECK(run_cli({"list", "--status", "done"}, std::nullopt).code == 2);
  CHECK(run_cli({"list", "--limit", "0"}, std::nullopt).code == 2);
  CHECK(run_cli({"submit"}, std::nullopt).code == 2);  // --type is required
  auto id = run_cli({"show", "abc"}, std::nullopt);
  CHECK(id.code == 2);
  CHECK(contains(id.err, "'abc' is not a task id"));

  // Bad values the tool checks itself, before it needs a database.
  auto payload = run_cli({"submit", "--type", "t", "--payload", "{x"}, std::nullopt);
  CHECK(payload.code == 2);
  CHECK(contains(payload.err, "invalid payload (--payload): must be valid JSON text"));
  auto run_at = run_cli({"submit", "--type", "t", "--run-at", "tomorrow"}, std::nullopt);
  CHECK(run_at.code == 2);
  CHECK(contains(run_at.err, "--run-at"));
  auto older = run_cli({"prune", "--older-than", "7"}, std::nullopt);
  CHECK(older.code == 2);
  CHECK(contains(older.err, "--older-than"));
  CHECK(contains(older.err, "has no unit"));
  CHECK(run_cli({"watch", "--interval", "10ms"}, std::nullopt).code == 2);
}

TEST_CASE("cli: the dashboard refuses to start without a way to authenticate", "[cli]") {
  auto r = run_cli({"dashboard", "--listen", "127.0.0.1:0"}, "postgresql://127.0.0.1:1/x");
  CHECK(r.code == 2);
  CHECK(contains(r.err, "--tokens"));
  CHECK(contains(r.err, "--no-auth"));
  CHECK(run_cli({"dashboard", "--tokens", "/nonexistent/tokens"}, std::nullopt).code == 2);
  auto dir = eoq::test::scratch_dir("cli-tokens");
  std::ofstream(dir + "/tokens") << "secret * read\n";
  CHECK(run_cli({"dashboard", "--tokens", dir + "/tokens", "--no-auth"}, std::nullopt).code == 2);
  auto scoped = run_cli({"--tenant", "acme", "dashboard", "--no-auth"}, std::nullopt);
  CHECK(scoped.code == 2);
  CHECK(contains(scoped.err, "--tenant"));
}

TEST_CASE("cli: an unreachable database exits 3, a missing one 2", "[cli]") {
  auto r = run_cli({"stats"}, "postgresql://127.0.0.1:1/x");
  CHECK(r.code == 3);
  CHECK(r.out.empty());
  CHECK(contains(r.err, "eoq: cannot connect to the database ("));
  CHECK(contains(r.err, "is it running, and are EOQ_DATABASE_URL or --database-url right?"));
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);  // one line

  // --database-url wins over the environment.
  CHECK(run_cli({"--database-url", "postgresql://127.0.0.1:1/x", "list"}, eoq::test::test_database_url()).code == 3);

  auto none = run_cli({"list"}, std::nullopt);
  CHECK(none.code == 2);
  CHECK(contains(none.err, "set EOQ_DATABASE_URL or pass --database-url"));
  auto bad = run_cli({"list"}, "postgresql://%zz");
  CHECK(bad.code == 2);
  CHECK(contains(bad.err, "--database-url"));
}

// ---------------------------------------------------------------- migrate

TEST_CASE("cli: migrate creates the tables and commands before it say to run it", "[cli]") {
  auto url = eoq::test::test_database_url();
  auto schema = eoq::test::fresh_schema("cli_migrate");
  struct Drop {
    std::string url, schema;
    ~Drop() { eoq::test::drop_schema(url, schema); }
  } drop{url, schema};
  Eoq eoq_cli(url, schema);

  auto before = eoq_cli({"stats"});
  CHECK(before.code == 3);
  CHECK(contains(before.err, fmt::format("run 'eoq --schema {} migrate' first", schema)));

  auto r = eoq_cli({"migrate"});
  CHECK(r.code == 0);
  // It says what it applied, and only then that the schema is up to date.
  CHECK(r.out.starts_with(fmt::format("schema \"{}\": applied 12 migrations (0001_tasks, ", schema)));
  CHECK(contains(r.out, "0012_limit_grants); it is up to date now\n"));
  auto again = eoq_cli.json({"migrate"});
  CHECK(again == Json{{"schema", schema}, {"migrated", true}, {"applied", Json::array()}});
  CHECK(eoq_cli({"migrate"}).out == fmt::format("schema \"{}\" is up to date\n", schema));

  eoq::PostgresOptions o;
  o.conninfo = url;
  o.schema = schema;
  eoq::PostgresStore store(o);
  CHECK(store.stats().empty());
  CHECK(eoq_cli({"stats"}).code == 0);

  CHECK(run_cli({"--schema", "Bad-Name", "stats"}, url).code == 2);
}

// ---------------------------------------------------------------- submit

TEST_CASE("cli: submit creates the task the store then holds, every field as given", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  auto before = eoq::test::now();
  auto j = eoq_cli.json({"submit", "--queue", "reports", "--type", "monthly", "--key", "2026-11", "--payload",
                         R"({"month": 11, "tags": ["a", "b"]})", "--run-at", "+10m", "--deadline", "+2h",
                         "--priority", "-5", "--max-attempts", "7"});
  CHECK(j.at("duplicate") == false);
  auto id = j.at("task").at("id").get<eoq::TaskId>();
  auto stored = S->get(id);
  REQUIRE(stored);
  check_task(j.at("task"), *stored);
  CHECK(stored->queue == "reports");
  CHECK(stored->type == "monthly");
  CHECK(stored->key == "2026-11");
  CHECK(Json::parse(stored->payload) == Json{{"month", 11}, {"tags", {"a", "b"}}});
  CHECK(stored->priority == -5);
  CHECK(stored->retry.max_attempts == 7);
  CHECK(stored->status == TaskStatus::pending);
  CHECK(minutes_between(stored->run_at, before) == 10);
  REQUIRE(stored->deadline);
  CHECK(minutes_between(*stored->deadline, before) == 120);
  CHECK_FALSE(stored->tenant);

  SECTION("an RFC 3339 time is taken exactly, and the human output names the task") {
    auto r = eoq_cli({"submit", "--type", "later", "--run-at", "2030-01-02T03:04:05.5+01:00"});
    CHECK(r.code == 0);
    CHECK(r.out.starts_with("submitted task "));
    auto page = S->list(eoq::test::Q().type("later"));
    REQUIRE(page.tasks.size() == 1);
    CHECK(contains(r.out, fmt::format("task {} (queue default, type later)", page.tasks[0].id)));
    CHECK(eoq::json::format_time(page.tasks[0].run_at) == "2030-01-02T02:04:05.500000Z");
    CHECK(Json::parse(page.tasks[0].payload) == Json::object());
  }

  SECTION("a taken key submits nothing and shows the existing task") {
    auto dup = eoq_cli.json({"submit", "--queue", "reports", "--type", "monthly", "--key", "2026-11", "--payload",
                             R"({"month": 11, "tags": ["a", "b"]})"});
    CHECK(dup.at("duplicate") == true);
    check_task(dup.at("task"), *S->get(id));
    CHECK(dup.at("task").at("type") == "monthly");
    CHECK(S->list(eoq::test::Q().queue("reports")).tasks.size() == 1);

    // The same key for another type or payload is a conflict, exit 4, and submits nothing.
    auto other = eoq_cli({"submit", "--queue", "reports", "--type", "other", "--key", "2026-11"});
    CHECK(other.code == 4);
    CHECK(contains(other.err, "key conflict: '2026-11' is already used by task " + std::to_string(id) +
                                  " with a different type and payload"));
    // The remedy is the CLI's own flag, not a C++ enum; and the flag does what it says.
    CHECK(contains(other.err, "--key-reuse lenient"));
    CHECK_FALSE(contains(other.err, "KeyReuse"));
    auto lenient = eoq_cli.json({"submit", "--queue", "reports", "--type", "other", "--key", "2026-11",
                                 "--key-reuse", "lenient"});
    CHECK(lenient.at("duplicate") == true);
    CHECK(lenient.at("task").at("id") == id);
    CHECK(eoq_cli({"submit", "--type", "x", "--key", "k", "--key-reuse", "sloppy"}).code == 2);
    CHECK(S->list(eoq::test::Q().queue("reports")).tasks.size() == 1);

    // The same JSON as the HTTP API stores it (compact, members in another
    // order) is the same payload: a duplicate, not a conflict.
    eoq::NewTask api;
    api.queue = "reports";
    api.type = "monthly";
    api.key = "2026-12";
    api.payload = R"({"tags":["a","b"],"month":12})";
    auto held = S->submit(api).task;
    auto typed = eoq_cli({"submit", "--queue", "reports", "--type", "monthly", "--key", "2026-12", "--payload",
                          R"({"month": 12, "tags": ["a", "b"]})"});
    CHECK(typed.code == 0);
    CHECK(contains(typed.out, fmt::format("already belongs to task {}", held.id)));

    // A finished task keeps its key: the message says how it ended.
    auto first = eoq_cli.json({"submit", "--queue", "daily", "--type", "d", "--key", "2026-11-23"});
    auto first_id = first.at("task").at("id").get<eoq::TaskId>();
    S->complete(claim_one(*S, "daily"), "null");
    auto human = eoq_cli({"submit", "--queue", "daily", "--type", "d", "--key", "2026-11-23"});
    CHECK(human.code == 0);
    CHECK(contains(human.out, fmt::format("duplicate: key \"2026-11-23\" in queue daily already belongs to task {} "
                                          "(succeeded, 1 of 3 attempts used, finished ",
                                          first_id)));
    CHECK(contains(human.out, "nothing new was submitted"));
  }

  SECTION("the payload may come from a file") {
    auto dir = eoq::test::scratch_dir("cli-payload");
    std::ofstream(dir + "/p.json") << R"({"from": "file"})";
    auto f = eoq_cli.json({"submit", "--type", "f", "--payload", "@" + dir + "/p.json"});
    CHECK(Json::parse(S->get(f.at("task").at("id").get<eoq::TaskId>())->payload) == Json{{"from", "file"}});
    auto missing = eoq_cli({"submit", "--type", "f", "--payload", "@" + dir + "/nope.json"});
    CHECK(missing.code == 2);
    CHECK(contains(missing.err, "payload"));
  }

  SECTION("the store's rules come back as bad input naming the flag, and nothing is written") {
    auto past = eoq_cli({"submit", "--type", "t", "--deadline", "2020-01-01T00:00:00Z"});
    CHECK(past.code == 2);
    CHECK(contains(past.err, "invalid deadline (--deadline): is in the past"));
    auto attempts = eoq_cli({"submit", "--type", "t", "--max-attempts", "0"});
    CHECK(attempts.code == 2);
    CHECK(contains(attempts.err, "--max-attempts"));
    auto queue = eoq_cli({"submit", "--type", "t", "--queue", "no spaces"});
    CHECK(queue.code == 2);
    CHECK(contains(queue.err, "invalid queue (--queue)"));
    auto payload = eoq_cli({"submit", "--type", "t", "--payload", "[1,"});
    CHECK(payload.code == 2);
    CHECK(contains(payload.err, "payload"));
    CHECK(S->list(eoq::test::Q().type("t")).tasks.empty());
  }
}

// ---------------------------------------------------------------- list

TEST_CASE("cli: list filters, and pages through everything with the printed cursor", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  std::vector<eoq::TaskId> all, in_a, type_y;
  for (int i = 0; i < 3; ++i) {
    auto id = S->submit(task("x", "a")).task.id;
    all.push_back(id);
    in_a.push_back(id);
  }
  for (int i = 0; i < 2; ++i) {
    auto id = S->submit(task("y", "b")).task.id;
    all.push_back(id);
    type_y.push_back(id);
  }
  auto failed = claim_one(*S, "a");
  S->fail(failed, {"boom", true});

  CHECK(ids_of(eoq_cli.json({"list", "--queue", "a"}).at("tasks")) == in_a);
  CHECK(ids_of(eoq_cli.json({"list", "--type", "y"}).at("tasks")) == type_y);
  auto f = eoq_cli.json({"list", "--status", "failed"});
  REQUIRE(f.at("tasks").size() == 1);
  check_task(f.at("tasks")[0], *S->get(failed.id()));
  CHECK(f.at("next_after").is_null());
  CHECK(eoq_cli.json({"list", "--queue", "nope"}).at("tasks").empty());

  // Page by page, each with the cursor the previous one gave.
  std::vector<eoq::TaskId> seen;
  std::vector<std::string> args{"list", "--limit", "2"};
  for (int page = 0; page < 10; ++page) {
    auto j = eoq_cli.json(args);
    auto ids = ids_of(j.at("tasks"));
    CHECK(ids.size() <= 2);
    seen.insert(seen.end(), ids.begin(), ids.end());
    if (j.at("next_after").is_null()) break;
    CHECK(j.at("next_after") == ids.back());
    args = {"list", "--limit", "2", "--after", std::to_string(j.at("next_after").get<eoq::TaskId>())};
  }
  CHECK(seen == all);

  auto human = eoq_cli({"list", "--queue", "a", "--limit", "2"});
  CHECK(human.code == 0);
  CHECK(human.out.starts_with("ID  STATUS"));
  CHECK(contains(human.out, fmt::format("next page: eoq --schema {} list --queue a --limit 2 --after {}",
                                        S.schema(), in_a[1])));
  auto last = eoq_cli({"list", "--after", std::to_string(all.back())});
  CHECK(last.out == "no more tasks\n");

  // The error column, and the search: error text, newest first.
  CHECK(contains(eoq_cli({"list", "--status", "failed"}).out, "ERROR"));
  CHECK(contains(eoq_cli({"list", "--status", "failed"}).out, "boom"));
  CHECK(ids_of(eoq_cli.json({"list", "--error", "BOOM"}).at("tasks")) == std::vector<eoq::TaskId>{failed.id()});
  CHECK(ids_of(eoq_cli.json({"list", "--order", "newest", "--type-prefix", "y"}).at("tasks")) ==
        std::vector<eoq::TaskId>(type_y.rbegin(), type_y.rend()));
  auto keyed_task = task("z", "c");
  keyed_task.key = "order-2026-12-07";
  keyed_task.payload = R"({"user": {"id": 7}, "n": 2})";
  auto kid = S->submit(keyed_task).task.id;
  CHECK(ids_of(eoq_cli.json({"list", "--key", "order-2026-12-07"}).at("tasks")) == std::vector<eoq::TaskId>{kid});
  CHECK(ids_of(eoq_cli.json({"list", "--key-prefix", "order-2026"}).at("tasks")) == std::vector<eoq::TaskId>{kid});
  CHECK(ids_of(eoq_cli.json({"list", "--payload-contains", R"({"user":{"id":7}})"}).at("tasks")) ==
        std::vector<eoq::TaskId>{kid});
  auto paged = eoq_cli({"list", "--order", "newest", "--key-prefix", "order", "--limit", "1"});
  CHECK(paged.code == 0);
  auto bad = eoq_cli({"list", "--payload-contains", "{nope"});
  CHECK(bad.code == 2);
  CHECK(contains(bad.err, "invalid payload_contains (--payload-contains)"));
  CHECK(eoq_cli({"list", "--order", "sideways"}).code == 2);
}

TEST_CASE("cli: delete removes a task and frees its key; a running one is refused", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  auto t = task("d");
  t.key = "k1";
  auto id = S->submit(t).task.id;
  auto r = eoq_cli({"delete", std::to_string(id)});
  CHECK(r.code == 0);
  CHECK(r.out == fmt::format("deleted task {}, with its key and history\n", id));
  CHECK_FALSE(S->get(id));
  CHECK_FALSE(S->submit(t).duplicate);  // the key is free again

  auto running = claim_one(*S);
  auto busy = eoq_cli({"delete", std::to_string(running.id())});
  CHECK(busy.code == 2);
  CHECK(contains(busy.err, fmt::format("task {} is running: cancel it first ('eoq cancel {}')", running.id(),
                                       running.id())));
  CHECK(S->get(running.id()));
  CHECK(eoq_cli({"delete", "999999"}).code == 1);
  S->complete(running, "null");
  CHECK(eoq_cli.json({"delete", std::to_string(running.id())}) ==
        Json{{"outcome", "removed"}, {"id", running.id()}});
}

// ---------------------------------------------------------------- show

TEST_CASE("cli: show gives the task, its checkpoint, result, last error and every attempt", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  auto nt = task("resize");
  nt.key = "img-7";
  nt.payload = R"({"image": 7})";
  nt.retry.initial_delay = Millis(0);
  nt.retry.max_delay = Millis(0);
  auto id = S->submit(nt).task.id;
  S->fail(claim_one(*S), {"first boom", false});
  auto second = claim_one(*S);
  S->checkpoint(second, "thumbnails", R"({"done": 3})");
  S->fail(second, {"second boom\nat line 2", true});

  auto j = eoq_cli.json({"show", std::to_string(id)});
  auto stored = S->get(id);
  check_task(j.at("task"), *stored);
  CHECK(j.at("task").at("status") == "failed");
  CHECK(j.at("task").at("checkpoint_stage") == "thumbnails");
  CHECK(j.at("task").at("checkpoint") == Json{{"done", 3}});
  auto history = S->history(id);
  REQUIRE(j.at("attempts").size() == history.size());
  REQUIRE(history.size() == 2);
  for (std::size_t i = 0; i < history.size(); ++i) {
    const auto& a = j.at("attempts")[i];
    CHECK(a.at("number") == history[i].number);
    CHECK(a.at("owner") == history[i].owner);
    CHECK(a.at("outcome") == history[i].outcome);
    CHECK(a.at("error") == opt_json(history[i].error));
    CHECK(time_of(a.at("started_at")) == history[i].started_at);
  }
  CHECK(j.at("attempts")[0].at("error") == "first boom");

  auto human = eoq_cli({"show", std::to_string(id)});
  CHECK(human.code == 0);
  CHECK(human.out.starts_with(fmt::format("task {}  failed\n", id)));
  CHECK(contains(human.out, "  key          img-7\n"));
  CHECK(contains(human.out, "  checkpoint   stage \"thumbnails\": {\"done\":3}\n"));
  CHECK(contains(human.out, "  last error   second boom\n               at line 2\n"));
  CHECK(contains(human.out, "  payload      {\"image\":7}\n"));
  CHECK(contains(human.out, "attempts\n  #  OUTCOME"));
  CHECK(contains(human.out, "first boom"));

  SECTION("a succeeded task shows its result") {
    auto done = S->submit(task("sum")).task.id;
    S->complete(claim_one(*S), R"({"total": 42})");
    auto d = eoq_cli.json({"show", std::to_string(done)});
    CHECK(d.at("task").at("result") == Json{{"total", 42}});
    CHECK(contains(eoq_cli({"show", std::to_string(done)}).out, "  result       {\"total\":42}\n"));
  }

  SECTION("a snoozed attempt shows as snoozed, with the number of the attempt after it") {
    auto later = S->submit(task("poll")).task.id;
    S->snooze(claim_one(*S), Millis(0));
    S->complete(claim_one(*S));
    auto d = eoq_cli.json({"show", std::to_string(later)});
    REQUIRE(d.at("attempts").size() == 2);
    CHECK(d.at("attempts")[0].at("outcome") == "snoozed");
    CHECK(d.at("attempts")[0].at("number") == 1);
    CHECK(d.at("attempts")[1].at("outcome") == "succeeded");
    CHECK(d.at("attempts")[1].at("number") == 1);
    CHECK(contains(eoq_cli({"show", std::to_string(later)}).out, "  1  snoozed"));
  }

  SECTION("an unknown id exits 1") {
    auto r = eoq_cli({"show", "999999"});
    CHECK(r.code == 1);
    CHECK(r.out.empty());
    CHECK(r.err == "eoq: task 999999 not found: 'eoq list' shows the ids there are\n");
  }
}

TEST_CASE("cli: show lists a task's parents and children with where each stands", "[cli][workflows]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  auto done = S->submit(task("fetch")).task.id;
  S->complete(claim_one(*S), R"({"rows": 3})");
  auto open = S->submit(task("load")).task.id;
  auto both = task("merge");
  both.parents = {open, done};
  auto child = S->submit(both).task.id;
  auto after = task("publish");
  after.parents = {child};
  auto grandchild = S->submit(after).task.id;

  auto j = eoq_cli.json({"show", std::to_string(child)});
  CHECK(j.at("task").at("status") == "waiting");
  CHECK(j.at("parents") == Json::array({Json{{"id", done}, {"type", "fetch"}, {"status", "succeeded"},
                                             {"result", Json{{"rows", 3}}}},
                                        Json{{"id", open}, {"type", "load"}, {"status", "pending"},
                                             {"result", nullptr}}}));
  CHECK(j.at("children") == Json::array({Json{{"id", grandchild}, {"type", "publish"}, {"status", "waiting"},
                                              {"result", nullptr}}}));

  auto human = eoq_cli({"show", std::to_string(child)});
  CHECK(human.code == 0);
  CHECK(human.out.starts_with(fmt::format("task {}  waiting\n", child)));
  CHECK(contains(human.out, fmt::format("  parents      {} fetch (succeeded)\n               {} load (pending)\n",
                                        done, open)));
  CHECK(contains(human.out, fmt::format("  children     {} publish (waiting)\n", grandchild)));
  // A task outside any workflow shows neither line; its JSON has empty lists.
  auto plain = eoq_cli({"show", std::to_string(grandchild)});
  CHECK_FALSE(contains(plain.out, "  children"));
  CHECK(contains(plain.out, fmt::format("  parents      {} merge (waiting)\n", child)));
  auto alone = eoq_cli.json({"show", std::to_string(open)});
  CHECK(alone.at("parents") == Json::array());
  CHECK(alone.at("children").size() == 1);

  // The waiting tasks are found by status and counted by stats.
  auto waiting = eoq_cli.json({"list", "--status", "waiting"});
  REQUIRE(waiting.at("tasks").size() == 2);
  CHECK(waiting.at("tasks")[0].at("id") == child);
  CHECK(waiting.at("tasks")[1].at("id") == grandchild);

  // Settling the last parent moves the child on; show says so.
  S->complete(claim_one(*S));
  CHECK(eoq_cli.json({"show", std::to_string(child)}).at("task").at("status") == "pending");
  CHECK(eoq_cli.json({"show", std::to_string(grandchild)}).at("parents")[0].at("status") == "pending");
}

// ---------------------------------------------------------------- cancel and retry

TEST_CASE("cli: cancel reports each outcome with its exit code", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  auto pending = S->submit(task("p")).task.id;
  auto j = eoq_cli.json({"cancel", std::to_string(pending)});
  CHECK(j.at("outcome") == "cancelled");
  CHECK(S->get(pending)->status == TaskStatus::cancelled);
  check_task(j.at("task"), *S->get(pending));

  auto running = S->submit(task("r", "busy")).task.id;
  claim_one(*S, "busy");
  auto r = eoq_cli({"cancel", std::to_string(running)});
  CHECK(r.code == 0);
  CHECK(contains(r.out, fmt::format("task {} is running: cancel requested", running)));
  CHECK(S->get(running)->cancel_requested);

  auto finished = eoq_cli({"cancel", std::to_string(pending)});
  CHECK(finished.code == 0);
  CHECK(finished.out == fmt::format("task {} already finished (cancelled): nothing to cancel\n", pending));
  CHECK(eoq_cli.json({"cancel", std::to_string(pending)}).at("outcome") == "already_finished");

  auto missing = eoq_cli.json({"cancel", "999999"}, 1);
  CHECK(missing == Json{{"outcome", "not_found"}, {"task", nullptr}});
}

TEST_CASE("cli: retry runs a failed task again and refuses other states naming them", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  auto nt = task("flaky");
  nt.retry.max_attempts = 1;
  auto id = S->submit(nt).task.id;
  S->fail(claim_one(*S), {"down", false});
  REQUIRE(S->get(id)->status == TaskStatus::failed);

  auto j = eoq_cli.json({"retry", std::to_string(id)});
  CHECK(j.at("outcome") == "retried");
  check_task(j.at("task"), *S->get(id));
  CHECK(j.at("task").at("status") == "pending");
  // It really runs again: a worker gets it, as attempt 2.
  auto again = claim_one(*S);
  CHECK(again.id() == id);
  CHECK(again.attempt() == 2);
  S->complete(again, "null");

  auto done = eoq_cli({"retry", std::to_string(id)});
  CHECK(done.code == 2);
  CHECK(done.err == fmt::format("eoq: task {} is succeeded: only failed, expired or cancelled tasks can be retried "
                                "(it succeeded; submit a new task to run it again)\n",
                                id));
  auto dj = eoq_cli.json({"retry", std::to_string(id)}, 2);
  CHECK(dj.at("outcome") == "not_retryable");
  CHECK(dj.at("task").at("status") == "succeeded");

  auto waiting = S->submit(task("w")).task.id;
  auto w = eoq_cli({"retry", std::to_string(waiting)});
  CHECK(w.code == 2);
  CHECK(contains(w.err, "is pending"));

  auto cancelled = S->submit(task("c")).task.id;
  S->cancel(cancelled);
  auto c = eoq_cli({"retry", std::to_string(cancelled)});
  CHECK(c.code == 0);
  CHECK(c.out == fmt::format("task {} will run again: pending now, attempt 1 of at most 3\n", cancelled));

  CHECK(eoq_cli({"retry", "999999"}).code == 1);
}

// ---------------------------------------------------------------- tenants

TEST_CASE("cli: --tenant sees only its own tasks and another tenant's id is like a missing one", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  auto acme_task = task("a");
  acme_task.tenant = "acme";
  auto mine = S->submit(acme_task).task.id;
  auto bolt_task = task("b", "other");
  bolt_task.tenant = "bolt";
  bolt_task.retry.max_attempts = 1;
  auto theirs = S->submit(bolt_task).task.id;
  S->fail(claim_one(*S, "other"), {"x", true});
  auto untenanted = S->submit(task("n")).task.id;

  auto as_acme = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {"--tenant", "acme"});
    return args;
  };
  auto same_as_missing = [&](const std::string& cmd) {
    auto other = eoq_cli(as_acme({cmd, std::to_string(theirs)}));
    auto missing = eoq_cli(as_acme({cmd, "999999"}));
    CHECK(other.code == 1);
    CHECK(missing.code == 1);
    CHECK(other.out == missing.out);
    auto err = other.err;
    err.replace(err.find(std::to_string(theirs)), std::to_string(theirs).size(), "999999");
    CHECK(err == missing.err);
    CHECK(contains(missing.err, "not found for tenant \"acme\""));
  };
  same_as_missing("show");
  same_as_missing("cancel");
  same_as_missing("retry");
  CHECK(S->get(theirs)->status == TaskStatus::failed);  // neither cancelled nor retried

  CHECK(ids_of(eoq_cli.json(as_acme({"list"})).at("tasks")) == std::vector<eoq::TaskId>{mine});
  // After the command too, where it falls through to the global option.
  CHECK(ids_of(eoq_cli.json({"list", "--tenant", "acme"}).at("tasks")) == std::vector<eoq::TaskId>{mine});
  CHECK(ids_of(eoq_cli.json({"list"}).at("tasks")) == std::vector<eoq::TaskId>{mine, theirs, untenanted});
  auto stats = eoq_cli.json(as_acme({"stats"})).at("queues");
  REQUIRE(stats.size() == 1);
  CHECK(stats[0].at("queue") == "default");
  CHECK(stats[0].at("pending") == 1);
  CHECK(stats[0].at("failed") == 0);
  CHECK(eoq_cli.json(as_acme({"show", std::to_string(mine)})).at("task").at("tenant") == "acme");

  auto submitted = eoq_cli.json(as_acme({"submit", "--type", "s", "--key", "k"}));
  CHECK(S->get(submitted.at("task").at("id").get<eoq::TaskId>())->tenant == "acme");
  // Keys are per tenant: the same key for another tenant is a new task.
  auto other = eoq_cli.json({"--tenant", "bolt", "submit", "--type", "s", "--key", "k"});
  CHECK(other.at("duplicate") == false);

  auto prune = eoq_cli(as_acme({"prune", "--older-than", "0s"}));
  CHECK(prune.code == 2);
  CHECK(contains(prune.err, "without --tenant"));
  CHECK(S->get(theirs));
}

// ---------------------------------------------------------------- prune

TEST_CASE("cli: prune --dry-run counts without deleting and prune deletes old finished tasks", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  std::vector<eoq::TaskId> finished;
  for (int i = 0; i < 2; ++i) {
    finished.push_back(S->submit(task("f")).task.id);
    S->complete(claim_one(*S), "null");
  }
  auto pending = S->submit(task("p")).task.id;

  CHECK(eoq_cli.json({"prune", "--older-than", "7d", "--dry-run"}) == Json{{"would_delete", 0}});
  CHECK(eoq_cli.json({"prune", "--older-than", "0s", "--dry-run"}) == Json{{"would_delete", 2}});
  auto dry = eoq_cli({"prune", "--older-than", "0s", "--dry-run"});
  CHECK(dry.out == "would delete 2 tasks that finished more than 0s ago (dry run: nothing was deleted)\n");
  for (auto id : finished) CHECK(S->get(id));

  CHECK(eoq_cli({"prune", "--older-than", "1h30m"}).out == "deleted 0 tasks that finished more than 1h30m ago\n");
  CHECK(eoq_cli.json({"prune", "--older-than", "0s"}) == Json{{"deleted", 2}});
  for (auto id : finished) CHECK_FALSE(S->get(id));
  CHECK(S->get(pending));
  CHECK(eoq_cli({"prune"}).code == 2);  // --older-than is required
}

// ---------------------------------------------------------------- stats

TEST_CASE("cli: stats shows what the store counts, per queue", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  CHECK(eoq_cli({"stats"}).out == fmt::format("no tasks in schema \"{}\"\n", S.schema()));
  CHECK(eoq_cli.json({"stats"}).at("queues") == Json::array());

  S->submit(task("a", "q1"));
  S->submit(task("a", "q1"));
  S->submit(task("a", "q1"));
  claim_one(*S, "q1");
  S->submit(task("b", "q2"));
  S->complete(claim_one(*S, "q2"), "null");
  auto nt = task("b", "q2");
  nt.retry.max_attempts = 1;
  S->submit(nt);
  S->fail(claim_one(*S, "q2"), {"no", false});
  auto child = task("c", "q1");
  child.parents = {S->list(eoq::test::Q().queue("q1").status(TaskStatus::pending)).tasks.at(0).id};
  S->submit(child);

  // The API's JSON: {"queues": [...], "now": ...}.
  auto whole = eoq_cli.json({"stats"});
  CHECK(whole.at("now").is_string());
  auto j = whole.at("queues");
  auto stats = S->stats();
  REQUIRE(j.size() == stats.size());
  REQUIRE(stats.size() == 2);
  for (std::size_t i = 0; i < stats.size(); ++i) {
    const auto& s = stats[i];
    const auto& q = j[i];
    CHECK(q.at("queue") == s.queue);
    CHECK(q.at("pending") == s.pending);
    CHECK(q.at("running") == s.running);
    CHECK(q.at("succeeded") == s.succeeded);
    CHECK(q.at("failed") == s.failed);
    CHECK(q.at("cancelled") == s.cancelled);
    CHECK(q.at("expired") == s.expired);
    CHECK(q.at("succeeded_last_minute") == s.succeeded_last_minute);
    CHECK(q.at("failed_last_minute") == s.failed_last_minute);
    CHECK(q.at("oldest_pending_age_ms").is_null() == !s.oldest_pending_age);
    CHECK(q.at("waiting") == s.waiting);
    CHECK(q.at("succeeded_total") == s.succeeded_total);
    CHECK(q.at("failed_total") == s.failed_total);
  }
  CHECK(j[0].at("waiting") == 1);
  CHECK(j[1].at("succeeded_total") == 1);
  CHECK(j[0].at("pending") == 2);
  CHECK(j[0].at("running") == 1);
  CHECK(j[1].at("succeeded_last_minute") == 1);
  CHECK(j[1].at("failed_last_minute") == 1);

  auto human = eoq_cli({"stats"});
  CHECK(human.out.starts_with("QUEUE  PENDING  RUNNING  WAITING  SUCCEEDED  FAILED"));
  CHECK(contains(human.out, "\nq1           2        1        1          0       0"));
  CHECK(contains(human.out, "\nq2           0        0        0          1       1"));
  CHECK(contains(human.out, "\n(all)        2        1        1          1       1"));
}

// ---------------------------------------------------------------- watch

TEST_CASE("cli: watch prints frames with each running task's progress bar", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  auto running = S->submit(task("resize", "images")).task.id;
  auto lease = claim_one(*S, "images");
  S->progress(lease, 40, "thumbnails");
  auto pending = S->submit(task("later", "images")).task.id;

  auto r = eoq_cli({"watch", "--count", "2", "--interval", "100ms"});
  CHECK(r.code == 0);
  CHECK(r.err.empty());
  CHECK_FALSE(contains(r.out, "\x1b"));  // not a terminal: no escape sequences
  std::string bar = "[########............]  40% thumbnails";
  std::size_t frames = 0, bars = 0;
  for (auto p = r.out.find("eoq watch  schema "); p != std::string::npos; p = r.out.find("eoq watch  schema ", p + 1))
    ++frames;
  for (auto p = r.out.find(bar); p != std::string::npos; p = r.out.find(bar, p + 1)) ++bars;
  CHECK(frames == 2);
  CHECK(bars == 2);
  CHECK(contains(r.out, "frame 1 of 2"));
  CHECK(contains(r.out, "\n\neoq watch  schema "));  // frames apart by a blank line
  CHECK(contains(r.out, fmt::format("{}  images  resize", running)));
  CHECK(contains(r.out, "running: 1\n"));
  CHECK(contains(r.out, "pending: 1\n"));
  CHECK(contains(r.out, fmt::format("{}  images  later", pending)));

  auto j = eoq_cli({"watch", "--count", "1", "--json"});
  CHECK(j.code == 0);
  REQUIRE(std::count(j.out.begin(), j.out.end(), '\n') == 1);
  auto frame = Json::parse(j.out);
  REQUIRE(frame.at("running").size() == 1);
  check_task(frame.at("running")[0], *S->get(running));
  CHECK(frame.at("running")[0].at("progress") == 40);
  CHECK(ids_of(frame.at("pending")) == std::vector<eoq::TaskId>{pending});
  CHECK(frame.at("stats")[0].at("queue") == "images");
}

// ---------------------------------------------------------------- the text helpers, in-process

TEST_CASE("cli: durations, times and table cells", "[cli]") {
  using namespace eoq::cli;
  CHECK(parse_duration("d", "7d") == std::chrono::hours(24 * 7));
  CHECK(parse_duration("d", "1h30m") == std::chrono::minutes(90));
  CHECK(parse_duration("d", "500ms") == Millis(500));
  CHECK(parse_duration("d", "2w") == std::chrono::hours(24 * 14));
  CHECK(parse_duration("d", "0s") == Millis(0));
  for (auto bad : {"", "7", "d", "7x", "-1s", "1.5h", "s7", "99999999999999999999d"})
    CHECK_THROWS_AS(parse_duration("d", bad), eoq::InvalidArgument);

  auto at = eoq::json::parse_time("t", "2026-01-01T00:00:00Z");
  CHECK(parse_when("t", "now", at) == at);
  CHECK(parse_when("t", "+2h", at) == at + std::chrono::hours(2));
  CHECK(parse_when("t", "2026-01-01T01:00:00+01:00", at) == at);
  CHECK_THROWS_AS(parse_when("t", "+", at), eoq::InvalidArgument);
  CHECK_THROWS_AS(parse_when("t", "2026-01-01", at), eoq::InvalidArgument);

  CHECK(format_duration(Millis(850)) == "850ms");
  CHECK(format_duration(Millis(45'000)) == "45s");
  CHECK(format_duration(Millis(192'000)) == "3m12s");
  CHECK(format_duration(std::chrono::minutes(125)) == "2h05m");
  CHECK(format_duration(std::chrono::hours(76)) == "3d04h");
  CHECK(relative(at + std::chrono::seconds(30), at) == "in 30s");
  CHECK(relative(at - std::chrono::seconds(30), at) == "30s ago");
  CHECK(relative(at + Millis(400), at) == "now");

  CHECK(clean("a\x1b[2Jb\tc\nd") == "a?[2Jb c d");
  CHECK(clean("x\ny", true) == "x\ny");
  CHECK(clean("\xc2\x9b" "31m") == "?31m");  // the 8-bit CSI
  CHECK(clean("caf\xc3\xa9") == "caf\xc3\xa9");
  CHECK(truncate("abcdefgh", 5, false) == "ab...");
  CHECK(truncate("abcdefgh", 5, true) == "abcd\xe2\x80\xa6");
  CHECK(truncate("\xc3\xa9\xc3\xa9\xc3\xa9", 3, false) == "\xc3\xa9\xc3\xa9\xc3\xa9");
  CHECK(progress_bar(40, "x", 10, false) == "[####......]  40% x");
  CHECK(progress_bar(150, "", 4, false) == "[####] 100%");

  Table t({{"ID", true}, {"NAME"}});
  t.add({"7", "seven"});
  t.add({"12", ""});
  CHECK(t.render() == "ID  NAME\n 7  seven\n12  -\n");
}

TEST_CASE("cli: pause and resume a queue; stats marks it", "[cli]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  S->submit(task("a", "mail"));
  auto p = eoq_cli({"pause", "mail"});
  CHECK(p.code == 0);
  CHECK(contains(p.out, "queue mail is paused"));
  CHECK(S->paused_queues() == std::vector<std::string>{"mail"});
  CHECK(contains(eoq_cli({"stats"}).out, "\nmail (paused)"));
  CHECK(eoq_cli.json({"stats"}).at("queues")[0].at("paused") == true);
  CHECK(eoq_cli({"--tenant", "acme", "pause", "mail"}).code == 2);
  CHECK(eoq_cli({"pause", "bad queue"}).code == 2);
  CHECK(eoq_cli.json({"resume", "mail"}) == Json{{"queue", "mail"}, {"paused", false}});
  CHECK(S->paused_queues().empty());
}

TEST_CASE("cli: limit sets, shows and removes a queue's limits; bad ones are refused by field", "[cli][limits]") {
  TestStore S(StoreKind::postgres);
  Eoq eoq_cli(S);
  S->submit(task("a", "mail"));
  auto set = eoq_cli({"limit", "mail", "--concurrency", "3", "--partition-concurrency", "1", "--rate", "100/1m",
                      "--partition-rate", "5/s"});
  CHECK(set.code == 0);
  CHECK(contains(set.out, "queue mail: at most 3 running, at most 1 running per partition, at most 100 starts per"));
  auto all = S->limits();
  REQUIRE(all.size() == 1);
  CHECK(all[0].second.concurrency == 3);
  CHECK(all[0].second.partition_concurrency == 1);
  CHECK(all[0].second.rate == eoq::RateLimit{100, std::chrono::minutes(1)});
  CHECK(all[0].second.partition_rate == eoq::RateLimit{5, std::chrono::seconds(1)});
  CHECK(contains(eoq_cli({"stats"}).out, "\nmail (limited)"));
  CHECK(eoq_cli.json({"stats"}).at("queues")[0].at("limits").at("concurrency") == 3);
  auto listed = eoq_cli.json({"limits"});
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].at("limits").at("rate") == Json{{"limit", 100}, {"period_ms", 60000}});
  auto bad = eoq_cli({"limit", "mail", "--concurrency", "-1"});
  CHECK(bad.code == 2);
  CHECK(contains(bad.err, "limits.concurrency"));
  auto bad_rate = eoq_cli({"limit", "mail", "--rate", "100"});
  CHECK(bad_rate.code == 2);
  CHECK(contains(bad_rate.err, "rate"));
  CHECK(eoq_cli({"limit", "mail", "--rate", "5/0s"}).code == 2);
  CHECK(eoq_cli({"limit", "mail"}).code == 2);  // neither limits nor --none
  CHECK(eoq_cli({"--tenant", "acme", "limit", "mail", "--none"}).code == 2);
  CHECK(S->limits().size() == 1);  // refusals changed nothing
  CHECK(eoq_cli({"limit", "mail", "--none"}).code == 0);
  CHECK(S->limits().empty());
  CHECK(contains(eoq_cli({"limits"}).out, "no queue has limits"));
}
