// deadline_reminders: to-dos with deadlines, and reminders that must fire before them.
//
// What it shows:
//  - a reminder is an eoq task with run_at = when to remind and deadline = the
//    to-do's deadline, so eoq never starts it late (still pending at the deadline,
//    it expires instead); the send itself also refuses to commit after the deadline.
//  - scheduling is checked: a reminder in the past or after the deadline is refused
//    with a clear error, and the same reminder twice is one task (its idempotency key
//    is the to-do and the reminder time).
//  - a to-do and its reminders are created in one transaction of our own
//    (PostgresStore::submit_on), and cancelling a to-do cancels it, every reminder not
//    yet sent and their eoq tasks in one transaction (PostgresStore::cancel_on).
//  - several workers send at once; each reminder is sent exactly once, because the
//    send is a row written in the transaction that completes its task.
//  - a worker killed (SIGKILL) in the middle of sending loses nothing: its half-done
//    sends roll back, its leases run out after 1.5 s, and the other workers send them.
//
//   deadline_reminders [--todos 4] [--workers 3]
//   deadline_reminders worker --id NAME [--stall-ms 0] [--lease-ms 1500]   (one worker)
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
#include <random>
#include <set>
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
using example::Row;
using example::started;
const char* const kSchema = "reminders_eoq";  // eoq's tables; ours are in "reminders"

// The host's own connection: its transactions create to-dos with their reminders
// and cancel them; at the end it counts the sends.
using example::Db;

// Rolls back unless commit() ran.
class Transaction {
 public:
  explicit Transaction(Db& db) : db_(db) { db_.query("BEGIN"); }
  ~Transaction() {
    if (!open_) return;
    try {
      db_.query("ROLLBACK");
    } catch (...) {
      // The connection is broken: the server rolls back when it closes.
    }
  }
  void commit() {
    db_.query("COMMIT");
    open_ = false;
  }

 private:
  Db& db_;
  bool open_ = true;
};

class Rejected : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

eoq::TimePoint now() { return std::chrono::time_point_cast<std::chrono::microseconds>(eoq::Clock::now()); }
std::string micros(eoq::TimePoint t) { return std::to_string(t.time_since_epoch().count()); }

// Schedules one reminder inside the caller's open transaction. The task and its
// row in reminders.reminders commit together, or neither does.
eoq::SubmitResult schedule_in(Db& db, const std::string& todo_id, eoq::TimePoint due, eoq::TimePoint at) {
  if (at <= now()) throw Rejected("remind_at: is in the past");
  eoq::NewTask t;
  t.queue = "reminders";
  t.type = "remind";
  t.key = "todo:" + todo_id + ":at:" + micros(at);
  t.payload = R"({"todo":)" + todo_id + "}";
  t.run_at = at;
  t.deadline = due;
  t.retry = {
      .max_attempts = 5, .backoff = eoq::Backoff::fixed, .initial_delay = 200ms, .max_delay = 200ms, .jitter = 0.2};
  eoq::SubmitResult r;
  try {
    r = eoq::PostgresStore::submit_on(db.get(), t, kSchema);  // eoq refuses run_at after the deadline
  } catch (const eoq::InvalidArgument& e) {
    throw Rejected(e.what());
  }
  db.query(
      "INSERT INTO reminders.reminders (todo_id, remind_at, task_id) VALUES ($1, reminders.at($2), $3)"
      " ON CONFLICT DO NOTHING",
      {todo_id, micros(at), std::to_string(r.task.id)});
  return r;
}

std::string add_todo(Db& db, const std::string& title, eoq::TimePoint due, const std::vector<eoq::TimePoint>& times) {
  Transaction tx(db);
  auto id = db.query("INSERT INTO reminders.todos (title, due) VALUES ($1, reminders.at($2)) RETURNING id",
                     {title, micros(due)})[0][0];
  for (auto at : times) schedule_in(db, id, due, at);
  tx.commit();
  return id;
}

// One more reminder for an existing to-do. FOR SHARE keeps the to-do from being
// cancelled until we commit, so a cancel either sees this reminder or comes first.
void schedule_reminder(Db& db, const std::string& todo_id, eoq::TimePoint at, const char* what) {
  std::printf("  reminder for to-do %s %s: ", todo_id.c_str(), what);
  try {
    Transaction tx(db);
    auto row = db.query(
        "SELECT (extract(epoch FROM due) * 1000000)::bigint, status FROM reminders.todos"
        " WHERE id = $1 FOR SHARE",
        {todo_id});
    if (row.empty() || row[0][1] != "open") throw Rejected("to-do " + todo_id + " is not open");
    auto r = schedule_in(db, todo_id, eoq::TimePoint(std::chrono::microseconds(std::stoll(row[0][0]))), at);
    tx.commit();
    std::printf(r.duplicate ? "already scheduled as task %lld; nothing new\n" : "scheduled as task %lld\n",
                static_cast<long long>(r.task.id));
  } catch (const Rejected& e) {
    std::printf("rejected (%s)\n", e.what());
  }
}

// Cancels a to-do, every reminder of it not yet sent and their eoq tasks, in one
// transaction: all of it commits or none of it does, so no crash can leave a
// cancelled to-do with a reminder still queued. The send handler flips a reminder
// from 'scheduled' to 'sent' under a row lock and we take the reminders' row locks
// before the tasks', so a reminder being sent right now is either sent before
// this commits or finds itself cancelled (its running task is asked to stop, and
// its handler ends it cancelled).
void cancel_todo(Db& db, const std::string& todo_id) {
  std::vector<Row> cancelled;
  {
    Transaction tx(db);
    db.query("UPDATE reminders.todos SET status = 'cancelled' WHERE id = $1", {todo_id});
    cancelled = db.query(
        "UPDATE reminders.reminders SET status = 'cancelled'"
        " WHERE todo_id = $1 AND status = 'scheduled' RETURNING task_id",
        {todo_id});
    for (const auto& r : cancelled) eoq::PostgresStore::cancel_on(db.get(), std::stoll(r[0]), {}, kSchema);
    tx.commit();
  }
  std::printf("[%4.1fs] cancelled to-do %s and its %zu pending reminder(s) in one transaction\n", elapsed(),
              todo_id.c_str(), cancelled.size());
}

// Sends one reminder. `stall` keeps the transaction open after the send is written:
// the worker we kill is caught there, mid-send.
void send_reminder(eoq::TaskContext& ctx, eoq::Millis stall) {
  const std::string task = std::to_string(ctx.id());
  auto marked = ctx.exec(
      "UPDATE reminders.reminders r SET status = 'sent' FROM reminders.todos t"
      " WHERE r.task_id = $1 AND t.id = r.todo_id AND r.status = 'scheduled'"
      " AND clock_timestamp() < t.due RETURNING r.id",
      {task});
  if (marked.empty()) {
    auto why = ctx.exec("SELECT status FROM reminders.reminders WHERE task_id = $1", {task});
    if (why.empty()) throw eoq::PermanentError("no reminder belongs to this task");
    // Nothing to send, nothing to retry: the task ends cancelled, like its reminder.
    if (why.rows[0][0] == "cancelled") throw eoq::Cancelled("the to-do was cancelled");
    throw eoq::PermanentError("the deadline passed before the reminder could be sent");
  }
  ctx.exec("INSERT INTO reminders.sends (reminder_id, worker) VALUES ($1, $2)",
           {*marked.rows[0][0], ctx.lease().owner});
  if (stall.count() > 0) {
    std::printf("[%4.1fs] %s: sending reminder %s (task %s), stalling before commit\n", elapsed(),
                ctx.lease().owner.c_str(), marked.rows[0][0]->c_str(), task.c_str());
    std::fflush(stdout);
    ctx.sleep_for(stall);
  }
  thread_local std::mt19937 gen{std::random_device{}()};
  ctx.sleep_for(eoq::Millis(std::uniform_int_distribution<int>(20, 120)(gen)));  // the mail server
}

eoq::PostgresOptions store_options() {
  return example::store_options(kSchema);  // conninfo: EOQ_DATABASE_URL, which main() sets
}

eoq::WorkerOptions worker_options(std::string id, eoq::Millis lease) {
  eoq::WorkerOptions o;
  o.queues = {"reminders"};
  o.concurrency = 2;
  o.prefetch = 0;  // a worker holds only what it runs, so a killed one strands little
  o.lease = lease;
  o.poll_interval = 200ms;
  o.worker_id = std::move(id);
  return o;
}

// The "worker" subcommand: one reminder worker, until it is killed.
int run_worker(const std::map<std::string, std::string>& f) {
  example::start_at_t0(f);
  eoq::PostgresStore store(store_options());
  eoq::Worker worker(store, worker_options(f.at("--id"), eoq::Millis(flag(f, "--lease-ms", 1500))));
  eoq::Millis stall(flag(f, "--stall-ms", 0));
  worker.on("remind", [stall](eoq::TaskContext& ctx) { send_reminder(ctx, stall); });
  worker.run();
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  setenv("EOQ_DATABASE_URL", eoq::testing::database_url_or_temp("EOQ_DATABASE_URL").c_str(), 1);
  if (argc > 1 && std::string(argv[1]) == "worker") return run_worker(flags(argc, argv, 2));
  auto f = flags(argc, argv, 1);
  const int todos = flag(f, "--todos", 4), workers = flag(f, "--workers", 3);

  Db db(std::getenv("EOQ_DATABASE_URL"));
  db.query("SET client_min_messages = warning");
  db.query("DROP SCHEMA IF EXISTS reminders CASCADE");
  db.query(std::string("DROP SCHEMA IF EXISTS ") + kSchema + " CASCADE");
  db.query("CREATE SCHEMA reminders");
  // Times travel as microseconds since the epoch, as eoq's TimePoint has them.
  db.query(
      "CREATE FUNCTION reminders.at(micros bigint) RETURNS timestamptz IMMUTABLE LANGUAGE sql"
      " AS $$ SELECT 'epoch'::timestamptz + micros * interval '1 microsecond' $$");
  db.query(
      "CREATE TABLE reminders.todos (id bigserial PRIMARY KEY, title text NOT NULL,"
      " due timestamptz NOT NULL, status text NOT NULL DEFAULT 'open')");
  db.query(
      "CREATE TABLE reminders.reminders (id bigserial PRIMARY KEY, todo_id bigint NOT NULL"
      " REFERENCES reminders.todos, remind_at timestamptz NOT NULL, task_id bigint NOT NULL,"
      " status text NOT NULL DEFAULT 'scheduled', UNIQUE (todo_id, remind_at))");
  // No unique constraint: a double send must show up in the count.
  db.query(
      "CREATE TABLE reminders.sends (reminder_id bigint NOT NULL, worker text NOT NULL,"
      " sent_at timestamptz NOT NULL DEFAULT clock_timestamp())");
  eoq::PostgresStore store(store_options());
  store.migrate();

  // Every to-do is due in 25 s, with reminders spread over the first seconds.
  const auto t = now(), due = t + 25s;
  std::vector<std::string> ids;
  for (int i = 0; i < todos; ++i) {
    auto step = eoq::Millis(250 * i);
    ids.push_back(add_todo(db, "to-do " + std::to_string(i + 1), due, {t + 1s + step, t + 3s + step, t + 5s + step}));
  }
  const auto doomed_todo = add_todo(db, "to be cancelled", due, {t + 5s, t + 6s, t + 7s});
  std::printf("created %d to-dos with 3 reminders each, plus to-do %s to cancel; all due in 25 s\n", todos,
              doomed_todo.c_str());
  schedule_reminder(db, ids[0], now() - 5s, "5 s ago");
  schedule_reminder(db, ids[0], due + 5s, "5 s after its deadline");
  schedule_reminder(db, ids[0], t + 1s, "at the time of its first reminder, again");

  // A worker that stalls in the middle of every send; kill it once it holds one.
  std::vector<std::string> held;
  {
    Child doomed({argv[0], "worker", "--id", "doomed", "--stall-ms", "60000", "--lease-ms", "1500", "--t0",
                  example::started_ms()});
    auto holding = [&] {
      std::vector<std::string> ids;
      eoq::ListQuery q;
      q.queue = "reminders";
      q.status = eoq::TaskStatus::running;
      for (const auto& t : store.list(q).tasks)
        if (t.lease_owner == "doomed") ids.push_back(std::to_string(t.id));
      return ids;
    };
    for (auto give_up = started + 20s; held.empty() && std::chrono::system_clock::now() < give_up;) {
      std::this_thread::sleep_for(50ms);
      held = holding();
    }
    std::this_thread::sleep_for(500ms);  // a moment to take a second one
    held = holding();
    if (held.empty()) throw std::runtime_error("the worker to be killed never took a reminder");
    doomed.kill_now();
    std::printf("[%4.1fs] killed worker 'doomed' (SIGKILL) while it held %zu reminder task(s)\n", elapsed(),
                held.size());
  }
  cancel_todo(db, doomed_todo);

  std::vector<std::unique_ptr<eoq::PostgresStore>> stores;
  std::vector<std::unique_ptr<eoq::Worker>> running;
  for (int w = 1; w <= workers; ++w) {
    stores.push_back(std::make_unique<eoq::PostgresStore>(store_options()));
    running.push_back(std::make_unique<eoq::Worker>(*stores.back(), worker_options("worker-" + std::to_string(w), 5s)));
    running.back()->on("remind", [](eoq::TaskContext& ctx) { send_reminder(ctx, 0ms); });
    running.back()->start();
  }
  std::printf("[%4.1fs] started %d reminder workers\n", elapsed(), workers);
  for (auto give_up = started + 50s; std::chrono::system_clock::now() < give_up;) {
    auto open = db.query("SELECT count(*) FROM reminders.reminders WHERE status = 'scheduled'")[0][0];
    bool queue_empty = true;
    for (const auto& s : store.stats())
      if (s.queue == "reminders") queue_empty = s.pending + s.running == 0;
    if (open == "0" && queue_empty) break;
    std::this_thread::sleep_for(100ms);
  }
  for (auto& w : running) w->stop();
  std::printf("[%4.1fs] all reminders settled\n\n", elapsed());

  bool ok = true;
  auto check = [&](bool good, const std::string& what) {
    std::printf("%s %s\n", good ? "ok  " : "FAIL", what.c_str());
    ok = ok && good;
  };
  auto one = [&](const std::string& sql, const std::vector<std::string>& params = {}) {
    return db.query(sql, params)[0][0];
  };
  auto sent = one("SELECT count(*) FROM reminders.reminders WHERE status = 'sent'");
  check(sent == std::to_string(3 * todos) &&
            one("SELECT count(*) FROM reminders.reminders WHERE status = 'scheduled'") == "0",
        sent + " reminders sent: every one of the to-dos not cancelled");
  check(one("SELECT count(*) FROM (SELECT r.id FROM reminders.reminders r LEFT JOIN reminders.sends s"
            " ON s.reminder_id = r.id GROUP BY r.id, r.status"
            " HAVING count(s.*) <> CASE r.status WHEN 'sent' THEN 1 ELSE 0 END) x") == "0",
        "each sent reminder has exactly one send row, each cancelled one none");
  check(one("SELECT count(*) FROM reminders.sends s JOIN reminders.reminders r ON r.id = s.reminder_id"
            " JOIN reminders.todos t ON t.id = r.todo_id WHERE s.sent_at >= t.due OR s.sent_at < r.remind_at") == "0",
        "every send happened at or after its reminder time and before the deadline");
  check(one("SELECT count(*) FROM reminders.reminders") == std::to_string(3 * todos + 3),
        "the repeated reminder was not scheduled twice");
  bool all_cancelled = true;
  for (const auto& r : db.query("SELECT task_id FROM reminders.reminders WHERE todo_id = $1", {doomed_todo}))
    all_cancelled = all_cancelled && store.get(std::stoll(r[0]))->status == eoq::TaskStatus::cancelled;
  check(all_cancelled && one("SELECT count(*) FROM reminders.reminders WHERE todo_id = $1 AND status = 'cancelled'",
                             {doomed_todo}) == "3",
        "the cancelled to-do's 3 reminders: cancelled in our table and in eoq, none sent");
  auto senders = one("SELECT count(DISTINCT worker) FROM reminders.sends");
  check(one("SELECT count(*) FROM reminders.sends WHERE worker = 'doomed'") == "0",
        "the killed worker's half-done sends rolled back; " + senders + " workers shared the sends");
  for (const auto& id : held) {
    auto task = store.get(std::stoll(id));
    auto history = store.history(task->id);
    bool recovered = task->status == eoq::TaskStatus::succeeded && history.size() >= 2 &&
                     history.front().outcome == "lease_expired" && task->lease_owner != "doomed";
    check(recovered, "task " + id + " (held by the killed worker): attempt 1 " + history.front().outcome +
                         ", then sent by " + task->lease_owner.value_or("?") + " on attempt " +
                         std::to_string(task->attempts));
  }
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "deadline_reminders: %s\n", e.what());
  return 1;
}
