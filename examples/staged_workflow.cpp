// staged_workflow: tasks in stages (fetch -> transform -> publish) that report their
// stage and progress, and resume at the stage they were in after their worker dies.
//
// What it shows:
//  - a stage's writes and its checkpoint commit together (ctx.checkpoint with the
//    handler's transaction open), so a stage is done and recorded as done in one
//    step. The next attempt reads ctx.checkpoint_stage() / checkpoint_state() and
//    goes on from there; a stage cut off half-way left nothing and runs again.
//  - a worker process is killed (SIGKILL) mid-transform. When its leases run out
//    (1.5 s) another worker resumes each task at transform: fetch does not run again,
//    which the tables prove (every stage wrote exactly once per task).
//  - a live listing (TaskStore::list) of every task's status, stage and progress.
//
//   staged_workflow [--workflows 5] [--stage-ms 800]
//   staged_workflow worker --id NAME [--stage-ms 800] [--lease-ms 1500]   (one worker)
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops itself.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include "example_support.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
using example::Child;  // a worker in its own process, so it can be killed for real
using example::elapsed;
using example::flag;
using example::flags;
const char* const kStages[] = {"fetch", "transform", "publish"};
constexpr int kSlices = 4;  // progress reports per stage

// The host's own connection: creates the tables, and checks them at the end.
using example::Db;

// Each stage writes its output in the handler's transaction and returns the state
// the next stage needs (JSON, built by the database, which also reads it back).
std::string run_stage(eoq::TaskContext& ctx, int stage, const std::string& state) {
  const std::string id = std::to_string(ctx.id());
  ctx.exec("INSERT INTO workflow.stage_log (task_id, stage, worker, attempt) VALUES ($1, $2, $3, $4)",
           {id, kStages[stage], ctx.lease().owner, std::to_string(ctx.attempt())});
  switch (stage) {
    case 0:
      ctx.exec(
          "INSERT INTO workflow.fetched (task_id, n) SELECT $1, g FROM generate_series(1, ($2::json->>'rows')::int) g",
          {id, ctx.payload()});
      return *ctx.exec("SELECT json_build_object('rows', count(*))::text FROM workflow.fetched WHERE task_id = $1",
                       {id})
                  .scalar();
    case 1:
      ctx.exec(
          "INSERT INTO workflow.transformed (task_id, square) SELECT task_id, n * n FROM workflow.fetched"
          " WHERE task_id = $1",
          {id});
      return *ctx.exec(
                     "SELECT json_build_object('rows', count(*), 'sum', sum(square))::text FROM workflow.transformed"
                     " WHERE task_id = $1",
                     {id})
                  .scalar();
    default:
      ctx.exec(
          "INSERT INTO workflow.published (task_id, rows, total)"
          " VALUES ($1, ($2::json->>'rows')::int, ($2::json->>'sum')::bigint)",
          {id, state});
      return state;
  }
}

void run_workflow(eoq::TaskContext& ctx, eoq::Millis stage_ms) {
  // The checkpoint names the last finished stage; start after it.
  int first = 0;
  std::string state = ctx.checkpoint_state().value_or("{}");
  if (const auto& done = ctx.checkpoint_stage())
    for (int i = 0; i < 3; ++i)
      if (*done == kStages[i]) first = i + 1;
  for (int stage = first; stage < 3; ++stage) {
    for (int slice = 0; slice < kSlices; ++slice) {
      ctx.progress((stage * kSlices + slice) * 100 / (3 * kSlices), kStages[stage]);
      if (!ctx.sleep_for(stage_ms / kSlices))
        throw std::runtime_error("interrupted; resumes at " + std::string(kStages[stage]));
    }
    state = run_stage(ctx, stage, state);
    // Commits this stage's writes with the checkpoint. The last stage's writes
    // commit with the completion instead.
    if (stage < 2) ctx.checkpoint(kStages[stage], state);
  }
  ctx.set_result(state);
}

eoq::WorkerOptions worker_options(std::string id, eoq::Millis lease) {
  eoq::WorkerOptions o;
  o.queues = {"workflow"};
  o.concurrency = 3;
  o.prefetch = 0;
  o.lease = lease;
  o.poll_interval = 200ms;
  o.worker_id = std::move(id);
  return o;
}

eoq::PostgresOptions store_options() {
  return example::store_options("workflow_eoq");  // conninfo: EOQ_DATABASE_URL, which main() sets
}

// The "worker" subcommand: one worker, until it is killed.
int run_worker(const std::map<std::string, std::string>& f) {
  example::start_at_t0(f);
  eoq::PostgresStore store(store_options());
  eoq::Worker worker(store, worker_options(f.at("--id"), eoq::Millis(flag(f, "--lease-ms", 1500))));
  eoq::Millis stage_ms(flag(f, "--stage-ms", 800));
  worker.on("report", [stage_ms](eoq::TaskContext& ctx) { run_workflow(ctx, stage_ms); });
  worker.run();
  return 0;
}

// Each task's status, stage, progress and owner, on one line: printed when a task
// changes status, stage or owner, and otherwise every half second while it moves.
class Listing {
 public:
  explicit Listing(eoq::TaskStore& store) : store_(store) {}
  std::vector<eoq::Task> show(bool force = false) {
    eoq::ListQuery q;
    q.queue = "workflow";
    auto tasks = store_.list(q).tasks;
    std::string line, shape;
    for (const auto& t : tasks) {
      std::string status(eoq::to_string(t.status));
      line += "  #" + std::to_string(t.id) + " " + status;
      shape += status + t.stage + t.lease_owner.value_or("") + "|";
      if (t.status == eoq::TaskStatus::running)
        line += " " + t.stage + " " + std::to_string(t.progress) + "% " + t.lease_owner.value_or("");
    }
    if (force || shape != last_shape_ || (line != last_ && elapsed() - printed_at_ >= 0.5)) {
      std::printf("[%4.1fs]%s\n", elapsed(), line.c_str());
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

}  // namespace

int main(int argc, char** argv) try {
  setenv("EOQ_DATABASE_URL", eoq::testing::database_url_or_temp("EOQ_DATABASE_URL").c_str(), 1);
  if (argc > 1 && std::string(argv[1]) == "worker") return run_worker(flags(argc, argv, 2));
  auto f = flags(argc, argv, 1);
  const int workflows = flag(f, "--workflows", 5), stage_ms = flag(f, "--stage-ms", 800);

  Db db(std::getenv("EOQ_DATABASE_URL"));
  db.query("SET client_min_messages = warning");
  db.query("DROP SCHEMA IF EXISTS workflow CASCADE");
  db.query("DROP SCHEMA IF EXISTS workflow_eoq CASCADE");
  db.query("CREATE SCHEMA workflow");
  // No unique constraints: a stage that ran twice must show up as twice the rows.
  db.query("CREATE TABLE workflow.stage_log (task_id bigint, stage text, worker text, attempt int)");
  db.query("CREATE TABLE workflow.fetched (task_id bigint, n int)");
  db.query("CREATE TABLE workflow.transformed (task_id bigint, square bigint)");
  db.query("CREATE TABLE workflow.published (task_id bigint, rows int, total bigint)");
  eoq::PostgresStore store(store_options());
  store.migrate();

  for (int i = 1; i <= workflows; ++i) {
    eoq::NewTask t;
    t.queue = "workflow";
    t.type = "report";
    t.key = "report-" + std::to_string(i);
    t.payload = R"({"rows":)" + std::to_string(10 * i) + "}";
    store.submit(t);
  }
  std::printf("submitted %d workflows (fetch -> transform -> publish, %d ms per stage)\n", workflows, stage_ms);

  Listing listing(store);
  auto stage = std::to_string(stage_ms);
  {
    Child first({argv[0], "worker", "--id", "worker-a", "--stage-ms", stage, "--t0", example::started_ms()});
    std::printf("[%4.1fs] started worker-a in its own process (3 at a time, lease 1.5 s)\n", elapsed());
    // Kill it half-way through transform: fetch is checkpointed, transform is not.
    for (bool mid_transform = false; !mid_transform;) {
      std::this_thread::sleep_for(100ms);
      for (const auto& t : listing.show())
        mid_transform = mid_transform || (t.stage == "transform" && t.progress >= 50);
      if (elapsed() > 30) throw std::runtime_error("worker-a never got half-way through transform");
    }
    listing.show(true);
    first.kill_now();
    std::printf("[%4.1fs] killed worker-a (SIGKILL)\n", elapsed());
  }

  eoq::PostgresStore second_store(store_options());
  eoq::Worker second(second_store, worker_options("worker-b", 5s));
  second.on("report", [&](eoq::TaskContext& ctx) { run_workflow(ctx, eoq::Millis(stage_ms)); });
  second.start();
  std::printf("[%4.1fs] started worker-b\n", elapsed());
  for (bool done = false; !done;) {
    std::this_thread::sleep_for(100ms);
    done = true;
    for (const auto& t : listing.show()) done = done && eoq::is_terminal(t.status);
    if (elapsed() > 100) throw std::runtime_error("timed out");
  }
  second.stop();

  std::printf("\n");
  bool ok = true;
  eoq::ListQuery q;
  q.queue = "workflow";
  for (const auto& t : store.list(q).tasks) {
    const std::string id = std::to_string(t.id);
    const long long rows = 10LL * std::stoi(t.key->substr(7));
    std::string who;
    for (const auto& r : db.query("SELECT stage, worker, count(*) OVER (PARTITION BY stage) FROM workflow.stage_log"
                                  " WHERE task_id = $1 ORDER BY attempt, array_position($2::text[], stage)",
                                  {id, "{fetch,transform,publish}"}))
      who += (who.empty() ? "" : ", ") + r[0] + " by " + r[1] + (r[2] == "1" ? "" : " (x" + r[2] + "!)");
    auto count = [&](const char* table) {
      return std::stoll(
          db.query(std::string("SELECT count(*) FROM workflow.") + table + " WHERE task_id = $1", {id})[0][0]);
    };
    auto published = db.query("SELECT rows, total FROM workflow.published WHERE task_id = $1", {id});
    bool task_ok = t.status == eoq::TaskStatus::succeeded && count("stage_log") == 3 && count("fetched") == rows &&
                   count("transformed") == rows && published.size() == 1 &&
                   published[0][1] == std::to_string(rows * (rows + 1) * (2 * rows + 1) / 6);
    std::string attempts;
    for (const auto& a : store.history(t.id)) attempts += (attempts.empty() ? "" : ", ") + a.outcome + " by " + a.owner;
    std::printf("%s #%s %s: %s; attempts: %s\n", task_ok ? "ok  " : "FAIL", id.c_str(), t.key->c_str(), who.c_str(),
                attempts.c_str());
    ok = ok && task_ok;
  }
  auto resumed = db.query(
      "SELECT count(DISTINCT task_id) FROM workflow.stage_log a WHERE stage = 'fetch'"
      " AND worker = 'worker-a' AND EXISTS (SELECT 1 FROM workflow.stage_log b"
      " WHERE b.task_id = a.task_id AND b.stage = 'transform' AND b.worker = 'worker-b')")[0][0];
  std::printf(
      "%s %s task(s) fetched by the killed worker-a went on at transform on worker-b; "
      "every stage wrote its rows exactly once\n",
      resumed != "0" && ok ? "ok  " : "FAIL", resumed.c_str());
  return ok && resumed != "0" ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "staged_workflow: %s\n", e.what());
  return 1;
}
