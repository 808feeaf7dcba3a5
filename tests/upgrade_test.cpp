// Upgrades that never stop the queue (docs/upgrading.md): migrations applied
// one by one while a Worker drains and a submitter submits, a migration that
// cannot take its locks, and a schema ahead of this build.
#include "postgres/migrations.hpp"
#include "support.hpp"

#include <eoq/postgres_store.hpp>
#include <eoq/worker.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using eoq::test::Admin;

namespace {

eoq::PostgresOptions options_for(const std::string& url, const std::string& schema) {
  eoq::PostgresOptions o;
  o.conninfo = url;
  o.schema = schema;
  return o;
}

// Sets eoq::detail::test_migrations for one test, and clears it again. Only
// while no store of the test is in use.
using MigrationList = std::vector<std::pair<std::string, std::string>>;

struct TestMigrations {
  std::deque<std::string> texts;  // stable storage for the names and SQL
  explicit TestMigrations(const std::vector<std::pair<std::string, std::string>>& list) {
    eoq::detail::test_migrations.clear();
    for (const auto& [name, sql] : list) {
      const char* n = texts.emplace_back(name).c_str();
      const char* s = texts.emplace_back(sql).c_str();
      eoq::detail::test_migrations.push_back({n, s});
    }
  }
  ~TestMigrations() { eoq::detail::test_migrations.clear(); }
  TestMigrations(const TestMigrations&) = delete;
  TestMigrations& operator=(const TestMigrations&) = delete;
};

std::string embedded_sql(std::string_view name) {
  for (std::size_t i = 0; i < eoq::detail::kMigrationCount; ++i)
    if (eoq::detail::kMigrations[i].name == name) return eoq::detail::kMigrations[i].sql;
  FAIL("no embedded migration " << name);
  return {};
}

std::string applied_names(Admin& admin, const std::string& schema) {
  return admin.scalar(fmt::format("SELECT string_agg(name, ',' ORDER BY name) FROM \"{}\".migrations", schema))
      .value_or("");
}

bool has_column(Admin& admin, const std::string& schema, const std::string& table, const std::string& column) {
  return admin.count("SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 "
                     "AND column_name = $3",
                     {schema, table, column}) == 1;
}

}  // namespace

TEST_CASE("migrations applied one by one while a worker drains and a submitter submits keep the workload's lock "
          "waits short and lose nothing",
          "[postgres][migrate][online]") {
  const auto url = eoq::test::test_database_url();
  const auto schema = eoq::test::fresh_schema("online");
  Admin admin(url);
  {
    eoq::PostgresStore(options_for(url, schema)).migrate();
  }
  // Migrations of the kinds docs/upgrading.md calls safe online, each taking
  // a lock that conflicts with the drain, several rounds of them: nullable
  // columns added to the tables a claim, a settlement and a submit write
  // (tasks and finished too, whose rows the claims return as t.*), two of
  // them holding ACCESS EXCLUSIVE for 50 ms as a slower migration would, a
  // plain 50 ms ACCESS EXCLUSIVE on tasks and finished, and again the real
  // statements of 0005 (tasks' fillfactor), 0007 (a function the settlements
  // call) and 0011 (the attempts primary key rebuilt).
  std::vector<std::pair<std::string, std::string>> list;
  constexpr int kRounds = 4;
  for (int r = 0; r < kRounds; ++r) {
    auto name = [&](int i, std::string_view what) { return fmt::format("9{}{:02}_online_{}", r, i, what); };
    list.emplace_back(name(1, "keys_column"),
                      fmt::format("ALTER TABLE @schema@.keys ADD COLUMN online_{} text; SELECT pg_sleep(0.05);", r));
    list.emplace_back(name(2, "attempts_column"),
                      fmt::format("ALTER TABLE @schema@.attempts ADD COLUMN online_{} int DEFAULT 0; "
                                  "SELECT pg_sleep(0.05);",
                                  r));
    list.emplace_back(name(3, "again_0005"), embedded_sql("0005_tasks_fillfactor"));
    list.emplace_back(name(4, "again_0007"), embedded_sql("0007_lease_lost"));
    list.emplace_back(name(5, "again_0011"), embedded_sql("0011_snooze"));
    list.emplace_back(name(6, "tasks_lock"),
                      "LOCK TABLE @schema@.tasks, @schema@.finished IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(0.05);");
    list.emplace_back(name(7, "tasks_column"), fmt::format("ALTER TABLE @schema@.tasks ADD COLUMN online_{0} text; "
                                                           "ALTER TABLE @schema@.finished ADD COLUMN online_{0} text;",
                                                           r));
  }
  TestMigrations extra(list);

  // The workload's own connections carry a name, so pg_locks tells its waits.
  const std::string app = "eoq_online_" + schema;
  auto work_options = options_for(eoq::test::conninfo_with(url, "application_name", app), schema);
  eoq::PostgresStore work(work_options);

  std::mutex mu;
  std::set<eoq::TaskId> ran;
  int runs = 0;
  eoq::WorkerOptions wo;
  wo.queues = {"online"};
  wo.concurrency = 2;
  wo.lease = 10000ms;
  wo.poll_interval = 20ms;
  wo.maintenance_interval = 0ms;
  wo.error_backoff_initial = 5ms;
  wo.error_backoff_max = 50ms;
  std::mutex log_mu;
  std::vector<std::string> problems;  // the worker's warnings and errors, failed submits
  wo.logger = [&](eoq::LogLevel level, std::string_view line) {
    std::lock_guard lk(log_mu);
    if (level >= eoq::LogLevel::warning) problems.push_back("worker: " + std::string(line));
  };
  eoq::Worker worker(work, wo);
  worker.on("job", [&](eoq::TaskContext& ctx) {
    std::lock_guard lk(mu);
    ran.insert(ctx.id());
    ++runs;
  });

  // The longest wait of a workload connection for a lock, sampled from pg_locks.
  std::atomic<bool> stop_monitor{false};
  std::atomic<long long> longest_wait_us{0};
  std::atomic<int> waits_seen{0};
  std::thread monitor([&] {
    Admin watch(url);
    while (!stop_monitor) {
      auto w = watch.scalar(
          "SELECT coalesce(max((extract(epoch FROM clock_timestamp() - l.waitstart) * 1e6)::bigint), -1) "
          "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE NOT l.granted AND a.application_name = $1",
          {app});
      auto us = std::stoll(w.value_or("-1"));
      if (us >= 0) {
        ++waits_seen;
        if (us > longest_wait_us) longest_wait_us = us;
      }
      std::this_thread::sleep_for(2ms);
    }
  });

  std::atomic<bool> migrated{false};
  std::vector<eoq::TaskId> submitted;
  long long longest_submit_us = 0;
  std::thread submitter([&] {
    for (int i = 0; !migrated || i < 200; ++i) {
      eoq::NewTask t;
      t.queue = "online";
      t.type = "job";
      t.key = fmt::format("k{}", i);
      auto began = std::chrono::steady_clock::now();
      try {
        submitted.push_back(work.submit(t).task.id);
      } catch (const std::exception& e) {
        std::lock_guard lk(log_mu);
        problems.push_back(std::string("submit: ") + e.what());
        continue;
      }
      longest_submit_us = std::max<long long>(
          longest_submit_us,
          std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - began).count());
      std::this_thread::sleep_for(1ms);
    }
  });
  worker.start();

  // A reader that keeps tasks under ACCESS SHARE for 400 ms at a time (a slow
  // report, a long transaction): a migration queued behind it would stop the
  // drain for as long; with lock_timeout it steps back after 100 ms instead.
  std::atomic<bool> stop_reader{false};
  std::atomic<int> reads{0};
  std::thread reader([&] {
    Admin slow(url);
    while (!stop_reader) {
      slow.exec("BEGIN");
      slow.exec(fmt::format("SELECT count(*) FROM \"{}\".tasks", schema));
      std::this_thread::sleep_for(400ms);
      slow.exec("COMMIT");
      ++reads;
      std::this_thread::sleep_for(400ms);
    }
  });
  std::this_thread::sleep_for(300ms);  // the drain is under way
  eoq::PostgresOptions mo = options_for(url, schema);
  mo.migration_lock_timeout = 100ms;
  mo.migration_lock_retries = 20;
  std::vector<std::string> applied;
  const auto began = std::chrono::steady_clock::now();
  std::string migrate_error;
  try {
    applied = eoq::PostgresStore(mo).migrate();
  } catch (const std::exception& e) {
    migrate_error = e.what();
  }
  const auto took = std::chrono::steady_clock::now() - began;
  stop_reader = true;
  reader.join();
  std::this_thread::sleep_for(300ms);  // and goes on after it
  migrated = true;
  submitter.join();

  const bool drained = eoq::test::eventually(
      [&] {
        std::lock_guard lk(mu);
        return ran.size() >= submitted.size();
      },
      30s);
  worker.stop();
  stop_monitor = true;
  monitor.join();

  INFO("migrate took " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms; longest "
                       << "workload lock wait " << longest_wait_us / 1000 << " ms (" << waits_seen
                       << " samples waiting); longest submit " << longest_submit_us / 1000 << " ms; "
                       << submitted.size() << " submitted; " << reads << " slow reads");
  CHECK(migrate_error == "");
  CHECK(applied.size() == list.size());
  CHECK(drained);
  {
    std::lock_guard lk(log_mu);
    for (const auto& p : problems) UNSCOPED_INFO(p);
    CHECK(problems.empty());
  }
  // Nothing lost, nothing twice: every task ran once and finished.
  {
    std::lock_guard lk(mu);
    CHECK(ran.size() == submitted.size());
    CHECK(runs == static_cast<int>(submitted.size()));
    CHECK(std::set<eoq::TaskId>(submitted.begin(), submitted.end()) == ran);
  }
  CHECK(admin.count(fmt::format("SELECT count(*) FROM \"{}\".finished WHERE status = 'succeeded'", schema)) ==
        static_cast<long long>(submitted.size()));
  CHECK(admin.count(fmt::format("SELECT count(*) FROM \"{}\".tasks", schema)) == 0);
  // The drain did meet the migrations' locks, and never waited for long: a
  // migration waits at most lock_timeout (100 ms) before it steps back, and
  // holds what it took for about 50 ms, so the drain never waited out the slow
  // reader's 400 ms behind a queued migration (with a lock_timeout of 5 s the
  // longest wait seen was 446 ms). The bound leaves room for a loaded
  // machine; the one-transaction migrate() of before held every lock until
  // the last migration committed, for the whole of migrate().
  CHECK(reads > 0);
  CHECK(waits_seen > 0);
  CHECK(longest_wait_us < 350'000);
  eoq::test::drop_schema(url, schema);
}

TEST_CASE("a migration that cannot take its locks fails after its retries naming itself, and nothing of it is applied",
          "[postgres][migrate]") {
  const auto url = eoq::test::test_database_url();
  const auto schema = eoq::test::fresh_schema("blocked");
  Admin admin(url);
  {
    eoq::PostgresStore(options_for(url, schema)).migrate();
  }
  // The first test migration needs nothing another session holds; the second
  // needs ACCESS EXCLUSIVE on tasks (and does two things: both or neither).
  TestMigrations extra(MigrationList{{"9101_blocked_free", "CREATE TABLE @schema@.blocked_free (x int);"},
                        {"9102_blocked_tasks", "CREATE TABLE @schema@.blocked_side (x int); "
                                               "ALTER TABLE @schema@.tasks ADD COLUMN blocked_note text;"}});
  const auto before = applied_names(admin, schema);
  // A long transaction that read tasks: it holds ACCESS SHARE until it ends.
  Admin holder(url);
  holder.exec("BEGIN");
  holder.exec(fmt::format("SELECT count(*) FROM \"{}\".tasks", schema));

  auto mo = options_for(url, schema);
  mo.migration_lock_timeout = 50ms;
  mo.migration_lock_retries = 3;
  eoq::PostgresStore store(mo);
  std::string message, sqlstate, statement;
  const auto began = std::chrono::steady_clock::now();
  try {
    store.migrate();
  } catch (const eoq::DatabaseError& e) {
    message = e.what();
    sqlstate = e.sqlstate();
    statement = e.statement();
  }
  const auto took = std::chrono::steady_clock::now() - began;
  INFO(message);
  CHECK(sqlstate == "55P03");
  CHECK(statement == "9102_blocked_tasks");
  CHECK(message.find("migration 9102_blocked_tasks could not take its locks") != std::string::npos);
  CHECK(message.find("in 4 tries") != std::string::npos);
  CHECK(message.find("nothing of it was applied") != std::string::npos);
  // Four tries of 50 ms and three backoffs (25 to 50, 50 to 100, 100 to 200 ms).
  CHECK(took >= 200ms);
  CHECK(took < 5s);
  // The migration before it committed; of this one nothing did.
  CHECK(applied_names(admin, schema) == before + ",9101_blocked_free");
  CHECK(admin.count("SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = $2",
                    {schema, "blocked_side"}) == 0);
  CHECK_FALSE(has_column(admin, schema, "tasks", "blocked_note"));
  // The holder was never blocked, nor was a writer behind the migration for
  // longer than its lock_timeout: the store still submits and claims.
  holder.exec(fmt::format("SELECT count(*) FROM \"{}\".tasks", schema));
  eoq::NewTask t;
  t.type = "t";
  auto id = store.submit(t).task.id;
  CHECK(store.get(id));

  // Once the holder ends, the same call applies it.
  holder.exec("COMMIT");
  CHECK(store.migrate() == std::vector<std::string>{"9102_blocked_tasks"});
  CHECK(has_column(admin, schema, "tasks", "blocked_note"));
  eoq::test::drop_schema(url, schema);
}

TEST_CASE("a program meeting a schema ahead of it keeps working unless a migration it does not know breaks it, "
          "and then refuses by name before claiming",
          "[postgres][migrate]") {
  const auto url = eoq::test::test_database_url();
  const auto schema = eoq::test::fresh_schema("ahead");
  Admin admin(url);
  auto o = options_for(url, schema);
  // This build, at the last embedded migration, with one task waiting.
  eoq::PostgresStore older(o);
  older.migrate();
  eoq::NewTask t;
  t.type = "t";
  t.queue = "ahead";
  const auto first = older.submit(t).task.id;
  const auto second = older.submit(t).task.id;

  // A newer build adds a compatible migration: a nullable column.
  {
    TestMigrations newer(MigrationList{{"9201_ahead_compatible", "ALTER TABLE @schema@.attempts ADD COLUMN ahead_note text;"}});
    CHECK(eoq::PostgresStore(o).migrate() == std::vector<std::string>{"9201_ahead_compatible"});
  }
  // The older build keeps working: migrate() applies and downgrades nothing,
  // and claims go on.
  CHECK(older.migrate().empty());
  CHECK(has_column(admin, schema, "attempts", "ahead_note"));
  eoq::ClaimRequest r;
  r.owner = "older";
  r.queues = {"ahead"};
  auto leases = older.claim(r);
  REQUIRE(leases.size() == 1);
  CHECK(leases[0].id() == first);
  older.complete(leases[0]);

  // A later one breaks programs built before it (it says so in its SQL).
  {
    TestMigrations newer(MigrationList{{"9201_ahead_compatible", "ALTER TABLE @schema@.attempts ADD COLUMN ahead_note text;"},
                          {"9202_ahead_breaking", std::string(eoq::detail::kBreaksOlderMarker) +
                                                      "\nCREATE TABLE @schema@.ahead_new (x int);"}});
    CHECK(eoq::PostgresStore(o).migrate() == std::vector<std::string>{"9202_ahead_breaking"});
  }
  CHECK(admin.scalar(fmt::format("SELECT breaks_older::text FROM \"{}\".migrations WHERE name = $1", schema),
                     {"9202_ahead_breaking"}) == "true");
  CHECK(admin.scalar(fmt::format("SELECT breaks_older::text FROM \"{}\".migrations WHERE name = $1", schema),
                     {"9201_ahead_compatible"}) == "false");
  // A fresh program of the older build refuses, by name, before claiming.
  eoq::PostgresStore restarted(o);
  auto refused = [&](auto&& call) -> std::string {
    try {
      call();
    } catch (const eoq::SchemaTooNew& e) {
      return e.what();
    }
    return "(no error)";
  };
  const auto claim_error = refused([&] { restarted.claim(r); });
  INFO(claim_error);
  CHECK(claim_error.find("9202_ahead_breaking") != std::string::npos);
  CHECK(claim_error.find("9201_ahead_compatible") == std::string::npos);
  CHECK(claim_error.find("claim() claimed nothing") != std::string::npos);
  CHECK(restarted.get(second)->status == eoq::TaskStatus::pending);
  // Every claim refuses (not only the first), and migrate() too, changing nothing.
  CHECK(refused([&] { restarted.claim(r); }).find("9202_ahead_breaking") != std::string::npos);
  const auto names = applied_names(admin, schema);
  const auto migrate_error = refused([&] { restarted.migrate(); });
  INFO(migrate_error);
  CHECK(migrate_error.find("9202_ahead_breaking") != std::string::npos);
  CHECK(migrate_error.find("migrate() applied nothing") != std::string::npos);
  CHECK(applied_names(admin, schema) == names);
  CHECK(restarted.get(second)->status == eoq::TaskStatus::pending);

  // A Worker of the older build claims nothing and says why.
  std::mutex mu;
  std::vector<std::string> lines;
  eoq::WorkerOptions wo;
  wo.queues = {"ahead"};
  wo.poll_interval = 20ms;
  wo.maintenance_interval = 0ms;
  wo.error_backoff_initial = 5ms;
  wo.error_backoff_max = 50ms;
  wo.logger = [&](eoq::LogLevel, std::string_view line) {
    std::lock_guard lk(mu);
    lines.emplace_back(line);
  };
  std::atomic<int> handled{0};
  {
    eoq::PostgresStore worker_store(o);
    eoq::Worker worker(worker_store, wo);
    worker.on("t", [&](eoq::TaskContext&) { ++handled; });
    worker.start();
    CHECK(eoq::test::eventually([&] {
      std::lock_guard lk(mu);
      return std::any_of(lines.begin(), lines.end(),
                         [](const std::string& l) { return l.find("9202_ahead_breaking") != std::string::npos; });
    }));
    worker.stop();
    CHECK(worker.counters().claimed == 0);
  }
  CHECK(handled == 0);
  CHECK(restarted.get(second)->status == eoq::TaskStatus::pending);

  // The newer build (which knows both) works on.
  {
    TestMigrations newer(MigrationList{{"9201_ahead_compatible", "ALTER TABLE @schema@.attempts ADD COLUMN ahead_note text;"},
                          {"9202_ahead_breaking", std::string(eoq::detail::kBreaksOlderMarker) +
                                                      "\nCREATE TABLE @schema@.ahead_new (x int);"}});
    eoq::PostgresStore current(o);
    CHECK(current.migrate().empty());
    auto got = current.claim(r);
    REQUIRE(got.size() == 1);
    CHECK(got[0].id() == second);
    current.complete(got[0]);
  }
  eoq::test::drop_schema(url, schema);
}

TEST_CASE("a migrations table left by an eoq before breaks_older is read as it is and gets the column from migrate()",
          "[postgres][migrate]") {
  const auto url = eoq::test::test_database_url();
  const auto schema = eoq::test::fresh_schema("oldtable");
  Admin admin(url);
  auto o = options_for(url, schema);
  eoq::PostgresStore(o).migrate();
  admin.exec(fmt::format("ALTER TABLE \"{}\".migrations DROP COLUMN breaks_older", schema));
  // The schema check of a claim reads the table without the column.
  {
    eoq::PostgresStore store(o);
    eoq::NewTask t;
    t.type = "t";
    auto id = store.submit(t).task.id;
    eoq::ClaimRequest r;
    r.owner = "w";
    auto leases = store.claim(r);
    REQUIRE(leases.size() == 1);
    CHECK(leases[0].id() == id);
    store.complete(leases[0]);
  }
  CHECK_FALSE(has_column(admin, schema, "migrations", "breaks_older"));
  CHECK(eoq::PostgresStore(o).migrate().empty());
  CHECK(has_column(admin, schema, "migrations", "breaks_older"));
  CHECK(admin.count(fmt::format("SELECT count(*) FROM \"{}\".migrations WHERE breaks_older", schema)) == 0);
  eoq::test::drop_schema(url, schema);
}

TEST_CASE("migrate() rejects a lock timeout that is not positive and negative retries", "[postgres][migrate]") {
  auto o = options_for("postgresql://localhost/none", "eoq");
  o.migration_lock_timeout = 0ms;
  CHECK_THROWS_AS(eoq::PostgresStore(o), eoq::InvalidArgument);
  o.migration_lock_timeout = 100ms;
  o.migration_lock_retries = -1;
  CHECK_THROWS_AS(eoq::PostgresStore(o), eoq::InvalidArgument);
}
