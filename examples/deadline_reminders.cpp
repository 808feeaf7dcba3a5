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
//    (PostgresStore::submit_on), and deleting a to-do removes it and its reminders
//    and cancels their eoq tasks in one transaction (PostgresStore::cancel_on).
//  - reminders belong to a user (eoq's tenant): alice can neither see nor cancel
//    bob's, neither through eoq (Scope::only) nor through the app's own delete.
//  - one send fails (the mail server refuses it once, injected); the others are
//    sent regardless, and that one is sent on its retry.
//  - several workers send at once; each reminder is sent exactly once, because the
//    send is a row written in the transaction that completes its task.
//  - a worker killed (SIGKILL) in the middle of sending loses nothing: its half-done
//    sends roll back, its leases run out after 1.5 s, and the other workers send them.
//  - checked by counting the store's own tasks by key (one per reminder, none
//    extra), the app's rows, and the sends.
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
// The task belongs to the to-do's owner (its tenant), so eoq's reads and cancels
// scoped to another user never see it. `fail_first_send` injects one refusal by
// the mail server.
eoq::SubmitResult schedule_in(Db& db, const std::string& owner, const std::string& todo_id, eoq::TimePoint due,
                              eoq::TimePoint at, bool fail_first_send = false) {
  if (at <= now()) throw Rejected("remind_at: is in the past");
  eoq::NewTask t;
  t.queue = "reminders";
  t.type = "remind";
  t.tenant = owner;
  t.key = "todo:" + todo_id + ":at:" + micros(at);
  t.payload = R"({"todo":)" + todo_id + (fail_first_send ? R"(,"fail_first_send":true})" : "}");
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

std::string add_todo(Db& db, const std::string& owner, const std::string& title, eoq::TimePoint due,
                     const std::vector<eoq::TimePoint>& times, int fail_first_send_of = -1) {
  Transaction tx(db);
  auto id = db.query("INSERT INTO reminders.todos (owner, title, due) VALUES ($1, $2, reminders.at($3)) RETURNING id",
                     {owner, title, micros(due)})[0][0];
  for (std::size_t i = 0; i < times.size(); ++i)
    schedule_in(db, owner, id, due, times[i], static_cast<int>(i) == fail_first_send_of);
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
        "SELECT (extract(epoch FROM due) * 1000000)::bigint, owner FROM reminders.todos"
        " WHERE id = $1 FOR SHARE",
        {todo_id});
    if (row.empty()) throw Rejected("to-do " + todo_id + " does not exist");
    auto r = schedule_in(db, row[0][1], todo_id, eoq::TimePoint(std::chrono::microseconds(std::stoll(row[0][0]))), at);
    tx.commit();
    std::printf(r.duplicate ? "already scheduled as task %lld; nothing new\n" : "scheduled as task %lld\n",
                static_cast<long long>(r.task.id));
  } catch (const Rejected& e) {
    std::printf("rejected (%s)\n", e.what());
  }
}

// `user` deletes a to-do for good: the to-do, its reminders and their eoq tasks
// (cancelled) go in one transaction, so no crash can leave a deleted to-do with
// a reminder still queued. Only the owner's delete matches a row; anyone else's
// deletes nothing, and cancel_on is scoped to the owner as well. The send handler
// flips a reminder to 'sent' under its row lock, and we take the reminders' locks
// before the tasks', so a reminder being sent right now is either sent before
// this commits or finds itself gone (its running task is asked to stop, and its
// handler ends it cancelled). Returns the ids of the cancelled tasks.
std::vector<std::string> delete_todo(Db& db, const std::string& user, const std::string& todo_id) {
  std::vector<std::string> tasks;
  Transaction tx(db);
  if (db.query("SELECT 1 FROM reminders.todos WHERE id = $1 AND owner = $2 FOR UPDATE", {todo_id, user}).empty()) {
    std::printf("[%4.1fs] %s may not delete to-do %s: no such to-do of theirs; nothing changed\n", elapsed(),
                user.c_str(), todo_id.c_str());
    return tasks;
  }
  for (const auto& r : db.query("DELETE FROM reminders.reminders WHERE todo_id = $1 RETURNING task_id", {todo_id})) {
    eoq::PostgresStore::cancel_on(db.get(), std::stoll(r[0]), eoq::Scope::only(user), kSchema);
    tasks.push_back(r[0]);
  }
  db.query("DELETE FROM reminders.todos WHERE id = $1", {todo_id});
  tx.commit();
  std::printf("[%4.1fs] %s deleted to-do %s: its %zu reminder(s) removed, their tasks cancelled, one transaction\n",
              elapsed(), user.c_str(), todo_id.c_str(), tasks.size());
  return tasks;
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
    // Nothing to send, nothing to retry: the task ends cancelled, like its deleted to-do.
    if (why.empty()) throw eoq::Cancelled("the to-do was deleted");
    throw eoq::PermanentError("the deadline passed before the reminder could be sent");
  }
  ctx.exec("INSERT INTO reminders.sends (reminder_id, worker) VALUES ($1, $2)",
           {*marked.rows[0][0], ctx.lease().owner});
  // After the send row is written, so the refusal shows that it rolls back too.
  if (ctx.attempt() == 1 && ctx.payload().find(R"("fail_first_send":true)") != std::string::npos)
    throw std::runtime_error("mail server refused the message (injected failure)");
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
      "CREATE TABLE reminders.todos (id bigserial PRIMARY KEY, owner text NOT NULL, title text NOT NULL,"
      " due timestamptz NOT NULL)");
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

  // Every to-do is due in 25 s, with reminders spread over the first seconds;
  // alice and bob own every other one. To-do 2's last reminder meets a mail
  // server that refuses it once (late enough that the doomed worker never has it).
  const auto t = now(), due = t + 25s;
  const std::string users[] = {"alice", "bob"};
  std::vector<std::string> ids;
  for (int i = 0; i < todos; ++i) {
    auto step = eoq::Millis(250 * i);
    ids.push_back(add_todo(db, users[i % 2], "to-do " + std::to_string(i + 1), due,
                           {t + 1s + step, t + 3s + step, t + 5s + step}, i == 1 ? 2 : -1));
  }
  const auto doomed_todo = add_todo(db, "bob", "to be deleted", due, {t + 5s, t + 6s, t + 7s});
  std::printf("created %d to-dos with 3 reminders each for alice and bob, plus bob's to-do %s to delete;"
              " all due in 25 s\n", todos, doomed_todo.c_str());
  schedule_reminder(db, ids[0], now() - 5s, "5 s ago");
  schedule_reminder(db, ids[0], due + 5s, "5 s after its deadline");
  schedule_reminder(db, ids[0], t + 1s, "at the time of its first reminder, again");

  // Ownership, through eoq and through the app: alice lists only her reminders,
  // and neither eoq's cancel nor the app's delete lets her touch bob's.
  auto reminder_tasks = [&](const eoq::Scope& scope) {
    eoq::ListQuery q;
    q.queue = "reminders";
    return example::all_tasks(store, q, scope);
  };
  example::Checks check;
  {
    auto alice_sees = reminder_tasks(eoq::Scope::only("alice"));
    bool only_hers = !alice_sees.empty();
    for (const auto& task : alice_sees) only_hers = only_hers && task.tenant == "alice";
    auto alice_owns = db.one("SELECT count(*) FROM reminders.reminders r JOIN reminders.todos t ON t.id = r.todo_id"
                             " WHERE t.owner = 'alice'");
    check(only_hers && std::to_string(alice_sees.size()) == alice_owns,
          "alice's scope lists " + std::to_string(alice_sees.size()) + " reminder tasks: exactly her " + alice_owns +
              ", none of bob's");
    auto bobs = db.query("SELECT task_id FROM reminders.reminders WHERE todo_id = $1", {doomed_todo});
    auto bob_task = std::stoll(bobs.at(0)[0]);
    auto outcome = store.cancel(bob_task, eoq::Scope::only("alice"));
    auto seen = store.get(bob_task, eoq::Scope::only("alice"));
    check(outcome == eoq::CancelOutcome::not_found && !seen &&
              store.get(bob_task)->status == eoq::TaskStatus::pending,
          "alice cancelling bob's reminder task " + std::to_string(bob_task) + " through eoq: " +
              std::string(eoq::to_string(outcome)) + ", it stays pending, and she cannot read it");
    auto removed = delete_todo(db, "alice", doomed_todo);
    check(removed.empty() && db.one("SELECT count(*) FROM reminders.reminders WHERE todo_id = $1", {doomed_todo}) == "3",
          "alice deleting bob's to-do " + doomed_todo + ": refused, its 3 reminders still there");
  }

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
  const auto deleted_tasks = delete_todo(db, "bob", doomed_todo);

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

  auto one = [&](const std::string& sql, const std::vector<std::string>& params = {}) { return db.one(sql, params); };
  auto sent = one("SELECT count(*) FROM reminders.reminders WHERE status = 'sent'");
  check(sent == std::to_string(3 * todos) &&
            one("SELECT count(*) FROM reminders.reminders WHERE status = 'scheduled'") == "0",
        sent + " reminders sent: every one of the to-dos not deleted");
  check(one("SELECT count(*) FROM (SELECT r.id FROM reminders.reminders r LEFT JOIN reminders.sends s"
            " ON s.reminder_id = r.id GROUP BY r.id HAVING count(s.*) <> 1) x") == "0",
        "each sent reminder has exactly one send row");
  check(one("SELECT count(*) FROM reminders.sends s JOIN reminders.reminders r ON r.id = s.reminder_id"
            " JOIN reminders.todos t ON t.id = r.todo_id WHERE s.sent_at >= t.due OR s.sent_at < r.remind_at") == "0",
        "every send happened at or after its reminder time and before the deadline");

  // The store's own count: one task per reminder key, none without a reminder.
  // The app's table could not show a second task for a key (its unique
  // constraint would hide it); the store can.
  const auto tasks = reminder_tasks({});
  std::set<std::string> task_ids, expected_ids(deleted_tasks.begin(), deleted_tasks.end());
  for (const auto& task : tasks) task_ids.insert(std::to_string(task.id));
  for (const auto& r : db.query("SELECT task_id FROM reminders.reminders")) expected_ids.insert(r[0]);
  int keys_twice = 0;
  for (const auto& [key, n] : example::tasks_per_key(tasks)) keys_twice += n != 1;
  check(tasks.size() == static_cast<std::size_t>(3 * todos + 3) && keys_twice == 0 && task_ids == expected_ids,
        std::to_string(tasks.size()) + " reminder tasks in eoq, one per key, each behind a reminder (or a deleted"
        " one): the repeated reminder was not scheduled twice");

  bool all_cancelled = deleted_tasks.size() == 3;
  for (const auto& id : deleted_tasks)
    all_cancelled = all_cancelled && store.get(std::stoll(id))->status == eoq::TaskStatus::cancelled;
  check(all_cancelled && one("SELECT count(*) FROM reminders.todos WHERE id = $1", {doomed_todo}) == "0" &&
            one("SELECT count(*) FROM reminders.reminders WHERE todo_id = $1", {doomed_todo}) == "0",
        "bob's deleted to-do: gone with its reminders, their 3 tasks cancelled in eoq, none sent");

  auto injected = db.query("SELECT task_id FROM reminders.reminders WHERE todo_id = $1 ORDER BY remind_at DESC LIMIT 1",
                           {ids.at(1)});
  auto injected_task = store.get(std::stoll(injected.at(0)[0]));
  auto injected_history = store.history(injected_task->id);
  check(injected_task->status == eoq::TaskStatus::succeeded && injected_history.size() == 2 &&
            injected_history[0].error.value_or("").find("injected") != std::string::npos,
        "the send the mail server refused (task " + std::to_string(injected_task->id) + "): attempt 1 " +
            injected_history[0].error.value_or("?") + ", sent on attempt " +
            std::to_string(injected_task->attempts) + "; the other sends went on");

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
  return check.exit_code();
} catch (const std::exception& e) {
  std::fprintf(stderr, "deadline_reminders: %s\n", e.what());
  return 1;
}
