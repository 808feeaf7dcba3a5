// staged_workflow: a pipeline of tasks that wait for each other: fetch, then two
// transforms in parallel (squares and cubes of what fetch read), then publish, which
// reads both transforms' results. The host glues nothing together: each task names
// its parents when it is submitted, and eoq releases it in the transaction that
// settles its last parent.
//
// What it shows:
//  - a whole workflow submitted in one batch, each task naming its parents by key;
//    a task is never claimed before every parent has succeeded (the verdicts check
//    the store's timestamps), and publish reads its parents' results
//    (ctx.parent_results()).
//  - progress at stage boundaries: a workflow is 33 % once fetch succeeded, 66 %
//    once both transforms did, 100 % once published.
//  - one workflow's cube transform fails for good: that workflow ends failed, its
//    publish cancelled with the reason, and the error is shown.
//  - a worker process is killed (SIGKILL) while transforms run. When its leases run
//    out (1.5 s) another worker runs them again; what the killed attempts wrote
//    rolled back, so every stage's rows exist exactly once (the tables have no
//    unique constraints: a stage that committed twice would show up twice).
//
//   staged_workflow [--workflows 3] [--stage-ms 2000] [--fail-workflow N (default: the last; 0: none)]
//                   [--serve [HOST:PORT]]
//   staged_workflow worker --id NAME [--stage-ms 2000] [--lease-ms 1500]   (one worker)
//
// --serve (default 127.0.0.1:8080) shows the run in eoq's dashboard, where a task's
// detail view draws its parents and children; it keeps serving after the verdicts
// until Ctrl-C.
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops itself.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include "example_support.hpp"
#include "serve.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
using example::Child;  // a worker in its own process, so it can be killed for real
using example::Db;
using example::elapsed;
using example::flag;
using example::flags;

constexpr const char* kQueue = "workflow";
constexpr int kSlices = 4;  // progress reports per task

// Every task's payload names its workflow; a transform also names its kind.
int workflow_of(eoq::TaskContext& ctx) {
  return std::stoi(*ctx.exec("SELECT ($1::json->>'wf')", {ctx.payload()}).scalar());
}

// A stage takes its time (reporting progress, giving up early when the worker
// stops), then writes in the handler's transaction: its rows and its log line
// commit with the task's success, or not at all.
void take_time(eoq::TaskContext& ctx, eoq::Millis stage_ms, const std::string& stage) {
  for (int slice = 0; slice < kSlices; ++slice) {
    ctx.progress(slice * 100 / kSlices, stage);
    if (!ctx.sleep_for(stage_ms / kSlices)) throw std::runtime_error("interrupted in " + stage);
  }
}

void log_stage(eoq::TaskContext& ctx, int wf, const std::string& stage) {
  ctx.exec("INSERT INTO workflow.stage_log (workflow, stage, task_id, worker, attempt) VALUES ($1, $2, $3, $4, $5)",
           {std::to_string(wf), stage, std::to_string(ctx.id()), ctx.lease().owner, std::to_string(ctx.attempt())});
}

void fetch(eoq::TaskContext& ctx, eoq::Millis stage_ms) {
  take_time(ctx, stage_ms, "fetch");
  const int wf = workflow_of(ctx);
  log_stage(ctx, wf, "fetch");
  ctx.exec("INSERT INTO workflow.fetched (workflow, n) SELECT $1, g FROM generate_series(1, $2) g",
           {std::to_string(wf), std::to_string(10 * wf)});
  ctx.set_result(*ctx.exec("SELECT json_build_object('rows', count(*))::text FROM workflow.fetched WHERE workflow = $1",
                           {std::to_string(wf)})
                      .scalar());
}

void transform(eoq::TaskContext& ctx, eoq::Millis stage_ms, int failing_workflow) {
  const int wf = workflow_of(ctx);
  const std::string kind = *ctx.exec("SELECT $1::json->>'kind'", {ctx.payload()}).scalar();
  take_time(ctx, stage_ms, kind);
  // The injected failure: a permanent error ends the task failed at once.
  if (wf == failing_workflow && kind == "cube")
    throw eoq::PermanentError("cube of " + std::to_string(10 * wf) + " overflows the report's column (injected)");
  log_stage(ctx, wf, kind);
  ctx.exec("INSERT INTO workflow.transformed (workflow, kind, value)"
           " SELECT $1, $2, CASE $2 WHEN 'square' THEN n * n ELSE n * n * n END FROM workflow.fetched"
           " WHERE workflow = $1",
           {std::to_string(wf), kind});
  ctx.set_result(*ctx.exec("SELECT json_build_object('kind', $2::text, 'sum', sum(value))::text"
                           " FROM workflow.transformed WHERE workflow = $1 AND kind = $2",
                           {std::to_string(wf), kind})
                      .scalar());
}

// Reads what its two parents returned: it runs only once both succeeded.
void publish(eoq::TaskContext& ctx, eoq::Millis stage_ms) {
  const int wf = workflow_of(ctx);
  take_time(ctx, stage_ms, "publish");
  std::string squares, cubes;
  for (const auto& p : ctx.parent_results()) {
    if (p.status != eoq::TaskStatus::succeeded || !p.result)
      throw std::logic_error("publish ran before parent " + std::to_string(p.id) + " succeeded");
    auto row = ctx.exec("SELECT $1::json->>'kind', $1::json->>'sum'", {*p.result}).one_row();
    (*row[0] == "square" ? squares : cubes) = *row[1];
  }
  if (squares.empty() || cubes.empty()) throw std::logic_error("publish is missing a parent's result");
  log_stage(ctx, wf, "publish");
  ctx.exec("INSERT INTO workflow.published (workflow, squares, cubes) VALUES ($1, $2, $3)",
           {std::to_string(wf), squares, cubes});
  ctx.set_result(R"({"squares":)" + squares + R"(,"cubes":)" + cubes + "}");
}

eoq::WorkerOptions worker_options(std::string id, eoq::Millis lease) {
  eoq::WorkerOptions o;
  o.queues = {kQueue};
  o.concurrency = 4;
  o.prefetch = 0;
  o.lease = lease;
  o.poll_interval = 200ms;
  o.worker_id = std::move(id);
  return o;
}

void register_handlers(eoq::Worker& w, eoq::Millis stage_ms, int failing_workflow) {
  w.on("fetch", [stage_ms](eoq::TaskContext& ctx) { fetch(ctx, stage_ms); });
  w.on("transform", [=](eoq::TaskContext& ctx) { transform(ctx, stage_ms, failing_workflow); });
  w.on("publish", [stage_ms](eoq::TaskContext& ctx) { publish(ctx, stage_ms); });
}

eoq::PostgresOptions store_options() {
  return example::store_options("workflow_eoq");  // conninfo: EOQ_DATABASE_URL, which main() sets
}

// The "worker" subcommand: one worker, until it is killed.
int run_worker(const example::Flags& f) {
  example::start_at_t0(f);
  eoq::PostgresStore store(store_options());
  eoq::Worker worker(store, worker_options(f.at("--id"), eoq::Millis(flag(f, "--lease-ms", 1500))));
  register_handlers(worker, eoq::Millis(flag(f, "--stage-ms", 2000)), flag(f, "--fail-workflow", 0));
  worker.run();
  return 0;
}

std::string key(const char* stage, int wf) { return std::string(stage) + "-" + std::to_string(wf); }

// One workflow, one batch: parents named by key, earlier in the same batch.
std::vector<eoq::NewTask> workflow_tasks(int wf) {
  auto make = [&](const char* type, std::string k, std::string payload, std::vector<std::string> parents) {
    eoq::NewTask t;
    t.queue = kQueue;
    t.type = type;
    t.key = std::move(k);
    t.payload = std::move(payload);
    t.parent_keys = std::move(parents);
    return t;
  };
  const std::string w = std::to_string(wf);
  return {make("fetch", key("fetch", wf), R"({"wf":)" + w + "}", {}),
          make("transform", key("square", wf), R"({"wf":)" + w + R"(,"kind":"square"})", {key("fetch", wf)}),
          make("transform", key("cube", wf), R"({"wf":)" + w + R"(,"kind":"cube"})", {key("fetch", wf)}),
          make("publish", key("publish", wf), R"({"wf":)" + w + "}", {key("square", wf), key("cube", wf)})};
}

// The store's tasks of workflow `wf` by stage key prefix (fetch, square, cube, publish).
using Workflow = std::map<std::string, eoq::Task>;
std::map<int, Workflow> by_workflow(const std::vector<eoq::Task>& tasks) {
  std::map<int, Workflow> out;
  for (const auto& t : tasks) {
    if (!t.key) continue;
    auto dash = t.key->rfind('-');
    out[std::stoi(t.key->substr(dash + 1))][t.key->substr(0, dash)] = t;
  }
  return out;
}

// 33 % per stage boundary passed: fetch, both transforms, publish.
int percent(const Workflow& w) {
  auto ok = [&](const char* s) { return w.count(s) && w.at(s).status == eoq::TaskStatus::succeeded; };
  if (ok("publish")) return 100;
  if (ok("square") && ok("cube")) return 66;
  return ok("fetch") ? 33 : 0;
}

// A workflow on one line: its boundary percentage, then each task not yet
// succeeded with its status (and stage progress and owner while it runs).
std::string describe(int wf, const Workflow& w) {
  std::string line = "wf-" + std::to_string(wf) + " " + std::to_string(percent(w)) + "%";
  for (const char* s : {"fetch", "square", "cube", "publish"}) {
    if (!w.count(s) || w.at(s).status == eoq::TaskStatus::succeeded) continue;
    const auto& t = w.at(s);
    line += std::string(" ") + s + ":" + std::string(eoq::to_string(t.status));
    if (t.status == eoq::TaskStatus::running)
      line += " " + std::to_string(t.progress) + "% " + t.lease_owner.value_or("");
    if (t.status == eoq::TaskStatus::failed) line += " (" + t.last_error.value_or("") + ")";
  }
  return line;
}

class Listing {
 public:
  explicit Listing(eoq::TaskStore& store) : store_(store) {}
  std::vector<eoq::Task> show(bool force = false) {
    eoq::ListQuery q;
    q.queue = kQueue;
    auto tasks = example::all_tasks(store_, q);
    std::string line, shape;
    for (const auto& [wf, w] : by_workflow(tasks)) {
      line += "  " + describe(wf, w);
      for (const auto& [_, t] : w) shape += std::string(eoq::to_string(t.status)) + t.lease_owner.value_or("") + "|";
    }
    if (force || shape != last_shape_ || (line != last_ && elapsed() - printed_at_ >= 0.5)) {
      std::printf("[%4.1fs]%s\n", elapsed(), line.c_str());
      std::fflush(stdout);
      last_ = line;
      last_shape_ = shape;
      printed_at_ = elapsed();
    }
    return tasks;
  }

 private:
  eoq::TaskStore& store_;
  std::string last_, last_shape_;
  double printed_at_ = 0;
};

bool attempt_lost_by(eoq::TaskStore& store, const eoq::Task& t, const std::string& owner) {
  for (const auto& a : store.history(t.id))
    if (a.outcome == "lease_expired" && a.owner == owner) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) try {
  setenv("EOQ_DATABASE_URL", eoq::testing::database_url_or_temp("EOQ_DATABASE_URL").c_str(), 1);
  if (argc > 1 && std::string(argv[1]) == "worker") return run_worker(flags(argc, argv, 2));
  auto serve_on = example::take_serve_flag(argc, argv);
  auto f = flags(argc, argv, 1);
  const int workflows = flag(f, "--workflows", 3), stage_ms = flag(f, "--stage-ms", 2000);
  const int failing = flag(f, "--fail-workflow", workflows);
  if (workflows < 2) throw std::runtime_error("--workflows: at least 2 (one of them fails on purpose)");
  auto stop_signals = example::block_stop_signals();  // before any thread: see serve.hpp

  Db db(std::getenv("EOQ_DATABASE_URL"));
  db.query("SET client_min_messages = warning");
  db.query("DROP SCHEMA IF EXISTS workflow CASCADE");
  db.query("DROP SCHEMA IF EXISTS workflow_eoq CASCADE");
  db.query("CREATE SCHEMA workflow");
  // No unique constraints: a stage that committed twice must show up as twice the rows.
  db.query("CREATE TABLE workflow.stage_log (workflow int, stage text, task_id bigint, worker text, attempt int)");
  db.query("CREATE TABLE workflow.fetched (workflow int, n bigint)");
  db.query("CREATE TABLE workflow.transformed (workflow int, kind text, value numeric)");
  db.query("CREATE TABLE workflow.published (workflow int, squares numeric, cubes numeric)");
  eoq::PostgresStore store(store_options());
  store.migrate();
  std::optional<example::Serve> serve;
  if (serve_on) serve.emplace(store, *serve_on);

  for (int wf = 1; wf <= workflows; ++wf) store.submit_batch(workflow_tasks(wf));
  std::printf("submitted %d workflows: fetch -> (square, cube) -> publish, %d ms per task; wf-%d's cube fails\n",
              workflows, stage_ms, failing);

  Listing listing(store);
  const auto stage = std::to_string(stage_ms), fail_flag = std::to_string(failing);
  {
    Child first({argv[0], "worker", "--id", "worker-a", "--stage-ms", stage, "--fail-workflow", fail_flag, "--t0",
                 example::started_ms()});
    std::printf("[%4.1fs] started worker-a in its own process (4 at a time, lease 1.5 s)\n", elapsed());
    // Killed half-way through a transform: fetch has committed, the transform not.
    for (bool mid_transform = false; !mid_transform;) {
      std::this_thread::sleep_for(100ms);
      for (const auto& t : listing.show())
        mid_transform = mid_transform ||
                        (t.type == "transform" && t.status == eoq::TaskStatus::running && t.progress >= 50);
      if (elapsed() > 60) throw std::runtime_error("worker-a never got half-way through a transform");
    }
    listing.show(true);
    first.kill_now();
    std::printf("[%4.1fs] killed worker-a (SIGKILL)\n", elapsed());
  }

  eoq::PostgresStore second_store(store_options());
  eoq::Worker second(second_store, worker_options("worker-b", 5s));
  register_handlers(second, eoq::Millis(stage_ms), failing);
  second.start();
  std::printf("[%4.1fs] started worker-b\n", elapsed());
  std::vector<eoq::Task> tasks;
  for (bool done = false; !done;) {
    std::this_thread::sleep_for(100ms);
    tasks = listing.show();
    done = !tasks.empty();
    for (const auto& t : tasks) done = done && eoq::is_terminal(t.status);
    if (elapsed() > 110) throw std::runtime_error("timed out");
  }
  // With --serve worker-b keeps running: what the page submits or retries runs.
  if (!serve) second.stop();
  listing.show(true);

  // The verdicts: what the store and the tables hold, not what we submitted.
  std::printf("\n");
  example::Checks check;
  auto per_key = example::tasks_per_key(tasks);
  bool once = per_key.size() == static_cast<std::size_t>(4 * workflows);
  for (const auto& [k, n] : per_key) once = once && n == 1;
  check(once, std::to_string(tasks.size()) + " tasks in the store, one per key (" + std::to_string(4 * workflows) +
                  " keys)");
  auto count = [&](const std::string& sql, int wf) { return std::stoll(db.one(sql, {std::to_string(wf)})); };
  bool resumed = false;
  for (const auto& [wf, w] : by_workflow(tasks)) {
    const std::string name = "wf-" + std::to_string(wf);
    if (w.size() != 4) {
      check(false, name + " has " + std::to_string(w.size()) + " tasks, not 4");
      continue;
    }
    for (const auto& [_, t] : w) resumed = resumed || (attempt_lost_by(store, t, "worker-a") &&
                                                       t.status == eoq::TaskStatus::succeeded);
    const auto &fe = w.at("fetch"), &sq = w.at("square"), &cu = w.at("cube"), &pu = w.at("publish");
    // A dependent's (last) attempt started after its parents ended.
    auto after = [](const eoq::Task& child, const eoq::Task& parent) {
      return child.started_at && parent.finished_at && *child.started_at >= *parent.finished_at;
    };
    const long long n = 10LL * wf;
    const long long logged = count("SELECT count(*) FROM workflow.stage_log WHERE workflow = $1", wf);
    if (wf != failing) {
      bool all_ok = fe.status == eoq::TaskStatus::succeeded && sq.status == eoq::TaskStatus::succeeded &&
                    cu.status == eoq::TaskStatus::succeeded && pu.status == eoq::TaskStatus::succeeded;
      check(all_ok && percent(w) == 100, name + " succeeded (100%)");
      check(after(sq, fe) && after(cu, fe) && after(pu, sq) && after(pu, cu),
            name + ": each task started after its parents ended");
      auto pub = db.query("SELECT squares::text, cubes::text FROM workflow.published WHERE workflow = $1",
                          {std::to_string(wf)});
      const long long squares = n * (n + 1) * (2 * n + 1) / 6, cubes = (n * (n + 1) / 2) * (n * (n + 1) / 2);
      check(logged == 4 && count("SELECT count(*) FROM workflow.fetched WHERE workflow = $1", wf) == n &&
                count("SELECT count(*) FROM workflow.transformed WHERE workflow = $1", wf) == 2 * n &&
                pub.size() == 1 && pub[0][0] == std::to_string(squares) && pub[0][1] == std::to_string(cubes),
            name + ": every stage wrote its rows exactly once; published squares " + std::to_string(squares) +
                " and cubes " + std::to_string(cubes));
    } else {
      const std::string error = cu.last_error.value_or("(no error)");
      check(cu.status == eoq::TaskStatus::failed && pu.status == eoq::TaskStatus::cancelled &&
                sq.status == eoq::TaskStatus::succeeded && percent(w) == 33,
            name + " ended failed at 33%: cube failed (" + error + "); publish " +
                std::string(eoq::to_string(pu.status)) + " (" + pu.last_error.value_or("") + ")");
      check(pu.last_error == "parent " + std::to_string(cu.id) + " ended failed" && !pu.started_at &&
                count("SELECT count(*) FROM workflow.published WHERE workflow = $1", wf) == 0 && logged == 2,
            name + ": publish never ran and nothing was published; fetch and square wrote once");
    }
  }
  check(resumed, "a task whose attempt died with worker-a (lease expired) ran again on worker-b and succeeded");
  if (serve) {
    serve->wait_for_stop_signal(stop_signals);
    second.stop();
  }
  return check.exit_code();
} catch (const std::exception& e) {
  std::fprintf(stderr, "staged_workflow: %s\n", e.what());
  return 1;
}
