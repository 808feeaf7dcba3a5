// PostgresStore with real processes and real connections: races between
// processes (migrate, duplicate submits, claims), connections killed under
// load, transactional enqueue on the host's connection, the frozen-worker
// rule, and TempPostgres itself.
#include "history.hpp"
#include "postgres/queries.hpp"
#include "support.hpp"

#include <eoq/testing.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#ifndef EOQ_TEST_CHILD
#error "EOQ_TEST_CHILD must name the eoq_test_child executable"
#endif
#ifndef EOQ_MIGRATION_NAMES
#error "EOQ_MIGRATION_NAMES must list the migration files (tests/CMakeLists.txt)"
#endif

using namespace std::chrono_literals;
using eoq::Millis;
using eoq::NewTask;
using eoq::TaskStatus;
using eoq::test::Admin;
using eoq::test::StoreKind;
using eoq::test::TestStore;

using eoq::test::Q;
namespace h = eoq::test::history;

namespace {

// What EXPLAIN says of `sql` on `c`, its lines joined.
std::string plan_of(eoq::pg::Connection& c, const std::string& sql) {
  auto r = c.exec_params("EXPLAIN " + sql, {}, false, "explain");
  std::string plan;
  for (int i = 0; i < r.rows(); ++i) plan += std::string(PQgetvalue(r.get(), i, 0)) + "\n";
  return plan;
}

constexpr auto kChildTimeout = 120s;

NewTask task(std::string queue = "default") {
  NewTask t;
  t.type = "t";
  t.queue = std::move(queue);
  return t;
}

// Starts `n` children with the given subcommand arguments (after conninfo,
// schema and the go file), releases them at once, and waits for all.
struct Race {
  std::string dir = eoq::test::scratch_dir("race");
  std::string go = dir + "/go";
  std::vector<eoq::test::Child> children;

  void start(int n, const std::string& conninfo, const std::string& schema, const std::string& cmd,
             const std::function<std::vector<std::string>(int)>& extra) {
    for (int i = 0; i < n; ++i) {
      std::vector<std::string> argv = {EOQ_TEST_CHILD, cmd, conninfo, schema, go};
      for (auto& a : extra(i)) argv.push_back(a);
      children.push_back(eoq::test::spawn_child(argv, fmt::format("{}/child{}.log", dir, i)));
    }
    // Every child has connected (it says so in a file) before any may start.
    auto ready = [&] {
      int n_ready = 0;
      for (auto& c : children)
        n_ready += std::filesystem::exists(go + ".ready." + std::to_string(c.pid)) ? 1 : 0;
      return n_ready;
    };
    for (auto until = std::chrono::steady_clock::now() + kChildTimeout;
         ready() < n && std::chrono::steady_clock::now() < until;)
      std::this_thread::sleep_for(5ms);
    REQUIRE(ready() == n);
    std::ofstream(go) << "go\n";
  }
  // Exit statuses; prints the logs of children that failed.
  void finish() {
    for (auto& c : children) {
      auto log = c.log;
      int status = eoq::test::wait_child(c, kChildTimeout);
      INFO("child log " << log << ":\n" << eoq::test::read_file(log));
      CHECK(status == 0);
    }
  }
  std::string out(int i) const { return fmt::format("{}/out{}", dir, i); }
};

std::vector<std::vector<std::string>> read_rows(const std::string& path) {
  std::vector<std::vector<std::string>> rows;
  std::istringstream in(eoq::test::read_file(path));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::vector<std::string> row;
    std::string f;
    while (fields >> f) row.push_back(f);
    if (!row.empty()) rows.push_back(std::move(row));
  }
  return rows;
}

eoq::QueueStats stats_of(eoq::TaskStore& store, const std::string& queue) {
  for (auto& s : store.stats())
    if (s.queue == queue) return s;
  eoq::QueueStats empty;
  empty.queue = queue;
  return empty;
}

std::vector<eoq::Task> list_all(eoq::TaskStore& store, eoq::ListQuery q = {}) {
  std::vector<eoq::Task> out;
  q.limit = 1000;
  for (;;) {
    auto p = store.list(q);
    for (auto& t : p.tasks) out.push_back(std::move(t));
    if (!p.next_after) break;
    q.after = p.next_after;
  }
  return out;
}

}  // namespace

TEST_CASE("every statement of queries.sql prepares and returns the columns, in order and type, its decoder reads",
          "[postgres][sql]") {
  TestStore store(StoreKind::postgres);
  Admin admin(store.conninfo());
  const std::string quoted = "\"" + store.schema() + "\"";
  const auto& shapes = eoq::pg::result_shapes();
  auto shape_of = [&](const std::string& name) {
    return std::find_if(shapes.begin(), shapes.end(), [&](const auto& s) { return name == s.query; });
  };
  for (const auto& s : shapes) {
    INFO("result_shapes() names " << s.query);
    CHECK(std::any_of(eoq::pg::queries().begin(), eoq::pg::queries().end(),
                      [&](const auto& q) { return q.name == s.query; }));
  }
  // The staged submits read the stage, which exists only inside a transaction.
  admin.exec("BEGIN");
  admin.exec(eoq::pg::query("create_stage", quoted).sql);
  for (const auto& q : eoq::pg::queries()) {
    INFO("query " << q.name);
    auto st = eoq::pg::query(q.name, quoted);
    CHECK(st.sql.find("eoq.") == std::string::npos);
    auto shape = shape_of(q.name);
    REQUIRE(shape != shapes.end());  // every statement declares what its decoder reads
    if (!shape->columns) continue;   // a command: nothing to decode
    PGresult* prepared = PQprepare(admin.get(), "", st.sql.c_str(), 0, nullptr);
    INFO(PQresultErrorMessage(prepared));
    REQUIRE(PQresultStatus(prepared) == PGRES_COMMAND_OK);
    PQclear(prepared);
    PGresult* d = PQdescribePrepared(admin.get(), "");
    REQUIRE(PQresultStatus(d) == PGRES_COMMAND_OK);
    // "name:type oid" for each column; a column the decoder does not read counts by name only.
    std::string got, want;
    const auto& cols = *shape->columns;
    for (int i = 0; i < PQnfields(d); ++i) {
      auto at = static_cast<std::size_t>(i);
      bool read = at < cols.size() && cols[at].type != 0;
      got += fmt::format("{}:{} ", PQfname(d, i), read ? PQftype(d, i) : 0);
    }
    for (const auto& c : cols) want += fmt::format("{}:{} ", c.name, c.type);
    PQclear(d);
    CHECK(got == want);
  }
  admin.exec("ROLLBACK");
}

TEST_CASE("the bulk-submit stage lives per session and per schema, and is empty after every transaction",
          "[postgres][sql]") {
  // Two stores' schemas in one session, as a transaction-pooling proxy may
  // arrange: each stage draws ids from its own schema's sequence.
  TestStore a(StoreKind::postgres), b(StoreKind::postgres);
  Admin admin(a.conninfo());
  auto create = [&](const TestStore& s) { return eoq::pg::query("create_stage", "\"" + s.schema() + "\"").sql; };
  // The stage's name as the COPY statement gives it: the schema and a hash of the stage's definition.
  auto stage = [&](const TestStore& s) {
    const auto copy = eoq::pg::query("copy_stage", "\"" + s.schema() + "\"").sql;
    const auto from = copy.find("pg_temp.");
    return copy.substr(from, copy.find(' ', from) - from);
  };
  REQUIRE(stage(a) != stage(b));
  CHECK(stage(a).find("\"eoq_stage_" + a.schema() + "_") == std::string("pg_temp.").size());
  auto copy_one = [&](const TestStore& s) {
    // Only the columns a stage row needs here; COPY's other columns stay NULL.
    admin.exec(fmt::format("INSERT INTO {} (queue, ord) VALUES ('q', 1)", stage(s)));
  };
  for (int round = 0; round < 2; ++round) {
    admin.exec("BEGIN");
    admin.exec(create(a));
    admin.exec(create(a));  // again in the same transaction: no error, no notice
    admin.exec(create(b));
    copy_one(a);
    copy_one(b);
    CHECK(admin.count(fmt::format("SELECT count(*) FROM {}", stage(a))) == 1);
    CHECK(admin.scalar(fmt::format("SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = '{}'::regclass",
                                   stage(b)))
              .value_or("")
              .find(b.schema()) != std::string::npos);
    admin.exec("COMMIT");
    CHECK(admin.count(fmt::format("SELECT count(*) FROM {}", stage(a))) == 0);
    CHECK(admin.count(fmt::format("SELECT count(*) FROM {}", stage(b))) == 0);
  }
  // The stores themselves, batch after batch on their own pooled sessions.
  for (auto* s : {&a, &b}) {
    for (int batch = 0; batch < 3; ++batch) {
      std::vector<eoq::NewTask> tasks(1000);
      for (std::size_t i = 0; i < tasks.size(); ++i) {
        tasks[i].queue = "q";
        tasks[i].type = "t";
        tasks[i].key = fmt::format("{}-{}", batch, i);
      }
      auto r = s->get().submit_batch(tasks);
      REQUIRE(r.size() == tasks.size());
      for (std::size_t i = 0; i < r.size(); ++i) {
        CHECK_FALSE(r[i].duplicate);
        CHECK(r[i].task.key == tasks[i].key);
        CHECK(s->get().get(r[i].task.id).value().key == tasks[i].key);
      }
    }
  }
  Admin check(b.conninfo());
  CHECK(check.count(fmt::format("SELECT count(*) FROM \"{}\".tasks", a.schema())) == 3000);
  CHECK(check.count(fmt::format("SELECT count(*) FROM \"{}\".tasks", b.schema())) == 3000);
}

TEST_CASE("a bulk submit still works after its schema was dropped and migrated again while its session lived",
          "[postgres][sql]") {
  // DROP SCHEMA ... CASCADE takes the id default off every session's stage
  // (it draws from the schema's sequence); the stage keeps its name.
  eoq::test::StoreOptions one;
  one.pool_size = 1;  // every batch on the same session, and so the same stage
  TestStore s(StoreKind::postgres, one);
  auto batch = [](int round) {
    std::vector<eoq::NewTask> tasks(1000);
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      tasks[i].queue = "q";
      tasks[i].type = "t";
      tasks[i].key = fmt::format("{}-{}", round, i);
    }
    // A repeated key sends the batch through the stage; round 1, right after
    // the schema was dropped and migrated, goes straight in by COPY.
    if (round != 1) tasks.back().key = tasks.front().key;
    return tasks;
  };
  REQUIRE(s->submit_batch(batch(0)).size() == 1000);
  {
    Admin admin(s.conninfo());
    admin.exec(fmt::format("DROP SCHEMA \"{}\" CASCADE", s.schema()));
  }
  s.postgres()->migrate();
  for (int round = 1; round <= 2; ++round) {
    auto in = batch(round);
    auto r = s->submit_batch(in);
    REQUIRE(r.size() == in.size());
    for (std::size_t i = 0; i < r.size(); ++i) CHECK(s->get(r[i].task.id).value().key == in[i].key);
  }
  // Renamed away and migrated again: the stage still has a default, but it
  // draws from the old schema's sequence; the new schema's must hand out the ids.
  const std::string old_schema = s.schema() + "_old";
  {
    Admin admin(s.conninfo());
    admin.exec(fmt::format("DROP SCHEMA IF EXISTS \"{}\" CASCADE", old_schema));
    admin.exec(fmt::format("ALTER SCHEMA \"{}\" RENAME TO \"{}\"", s.schema(), old_schema));
  }
  s.postgres()->migrate();
  auto in = batch(3);
  auto r = s->submit_batch(in);
  REQUIRE(r.size() == in.size());
  Admin admin(s.conninfo());
  const auto last = admin.count(fmt::format("SELECT last_value FROM \"{}\".task_ids", s.schema()));
  for (std::size_t i = 0; i < r.size(); ++i) {
    CHECK(r[i].task.id <= last);
    CHECK(s->get(r[i].task.id).value().key == in[i].key);
  }
  CHECK(r.back().duplicate);
  CHECK(admin.count(fmt::format("SELECT count(*) FROM \"{}\".tasks", s.schema())) == 999);
  admin.exec(fmt::format("DROP SCHEMA \"{}\" CASCADE", old_schema));
}

TEST_CASE("a large batch whose tasks cannot be stored takes none of its keys", "[postgres][sql]") {
  // The keys go in by one COPY and the tasks by the next: a failure in the
  // second must take the first back with it. A trigger that refuses one
  // payload stands in for any such failure.
  TestStore s(StoreKind::postgres);
  Admin admin(s.conninfo());
  const std::string schema = "\"" + s.schema() + "\"";
  admin.exec(fmt::format("CREATE FUNCTION {}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                         "IF NEW.payload::text = '\"refuse\"' THEN RAISE EXCEPTION 'refused'; END IF; "
                         "RETURN NEW; END $$",
                         schema));
  admin.exec(fmt::format("CREATE TRIGGER refuse BEFORE INSERT ON {0}.tasks FOR EACH ROW EXECUTE FUNCTION {0}.refuse()",
                         schema));
  std::vector<eoq::NewTask> tasks(1200);
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    tasks[i].queue = "q";
    tasks[i].type = "t";
    tasks[i].key = fmt::format("k{}", i);
  }
  tasks[1100].payload = R"("refuse")";
  CHECK_THROWS(s->submit_batch(tasks));
  CHECK(admin.count(fmt::format("SELECT count(*) FROM {}.keys", schema)) == 0);
  CHECK(admin.count(fmt::format("SELECT count(*) FROM {}.tasks", schema)) == 0);
  // The same keys, nothing refused: all new, all in.
  tasks[1100].payload = "{}";
  for (const auto& r : s->submit_batch(tasks)) CHECK_FALSE(r.duplicate);
  CHECK(admin.count(fmt::format("SELECT count(*) FROM {}.keys", schema)) == 1200);
}

TEST_CASE("a bulk submit answers each task's own id and times, whether its ids run without gaps or not",
          "[postgres][sql]") {
  // A large batch draws its ids in one statement before it COPYs its rows, so
  // they mostly run on without a gap and the answer carries only the first. A
  // sequence that steps by 3 (or another session drawing ids meanwhile) breaks
  // the run: the answer then carries every id.
  TestStore s(StoreKind::postgres);
  Admin admin(s.conninfo());
  auto batch = [](int round, bool narrow, bool keyed) {
    std::vector<eoq::NewTask> tasks(1200);
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      tasks[i].queue = narrow || i % 2 ? "q" : "r";
      tasks[i].type = "t";
      tasks[i].payload = fmt::format(R"({{"i":{}}})", i);
      if (keyed) tasks[i].key = fmt::format("{}-{}", round, i);
      if (!narrow && i % 3 == 0)
        tasks[i].run_at = std::chrono::time_point_cast<std::chrono::microseconds>(eoq::Clock::now() - std::chrono::hours(1));
    }
    return tasks;
  };
  int round = 0;
  for (int step : {1, 3}) {
    admin.exec(fmt::format("ALTER SEQUENCE \"{}\".task_ids INCREMENT BY {}", s.schema(), step));
    for (bool narrow : {true, false})
      for (bool keyed : {true, false}) {
        INFO("step " << step << ", narrow " << narrow << ", keyed " << keyed);
        auto in = batch(++round, narrow, keyed);
        auto r = s->submit_batch(in);
        REQUIRE(r.size() == in.size());
        std::set<std::int64_t> ids;
        for (std::size_t i = 0; i < r.size(); ++i) {
          const auto& t = r[i].task;
          ids.insert(t.id);
          auto stored = s->get(t.id);
          REQUIRE(stored);
          CHECK(stored->payload == in[i].payload);
          CHECK(stored->key == in[i].key);
          CHECK(stored->queue == in[i].queue);
          CHECK(t.created_at == stored->created_at);
          CHECK(t.updated_at == stored->updated_at);
          CHECK(t.status == stored->status);
          CHECK(t.run_at == stored->run_at);
          CHECK(t.version == stored->version);
          if (i > 0) CHECK(t.id - r[i - 1].task.id == step);
        }
        CHECK(ids.size() == in.size());
      }
  }
}

namespace {
// A store whose sessions carry a name of their own, to be found in
// pg_stat_activity, with autovacuum off for its live table (it would analyze
// these rows too, at a moment of its choosing): only the store's statistics
// refresh moves the planner's row count.
struct RefreshedStore {
  explicit RefreshedStore(const std::string& name) : options(named(name)), s(StoreKind::postgres, options),
                                                     admin(s.conninfo()), quoted("\"" + s.schema() + "\"") {
    admin.exec(fmt::format("ALTER TABLE {}.tasks SET (autovacuum_enabled = false)", quoted));
  }
  static eoq::test::StoreOptions named(const std::string& name) {
    eoq::test::StoreOptions o;
    o.application_name = name + "-" + eoq::test::fresh_schema();
    return o;
  }
  double reltuples() {
    auto sql = fmt::format("SELECT reltuples FROM pg_class WHERE oid = '{}.tasks'::regclass", quoted);
    return std::stod(admin.scalar(sql).value_or("nan"));
  }
  double settles_at(double want) {
    for (int i = 0; i < 200 && reltuples() != want; ++i) std::this_thread::sleep_for(50ms);
    return reltuples();
  }
  // The store's sessions whose last statement is LIKE `like`.
  int sessions(const std::string& like) {
    return std::stoi(*admin.scalar(fmt::format(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{}' AND query LIKE '{}'",
        options.application_name, like)));
  }
  static std::vector<eoq::NewTask> batch(int n, int round) {
    std::vector<eoq::NewTask> tasks(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      tasks[static_cast<std::size_t>(i)].type = "t";
      tasks[static_cast<std::size_t>(i)].key = fmt::format("{}-{}", round, i);
    }
    return tasks;
  }
  eoq::test::StoreOptions options;
  TestStore s;
  Admin admin;
  std::string quoted;
};
}  // namespace

TEST_CASE("a large batch into a table never analyzed analyzes it, and another within seconds does not",
          "[postgres][sql]") {
  // The refresh is an optimisation whose failures are swallowed, and it runs
  // after submit_batch returns, so only its effect shows it works: the
  // planner's row count for the live table, once it arrives.
  RefreshedStore r("refresh");
  auto& s = r.s;
  CHECK(r.reltuples() < 0);  // never analyzed
  s->submit_batch(r.batch(10, 0));
  std::this_thread::sleep_for(300ms);
  CHECK(r.reltuples() < 0);  // not a large batch: nothing analyzed
  s->submit_batch(r.batch(1500, 1));
  CHECK(r.settles_at(1510) == 1510);
  // The refresh ran on a connection of its own: the one that submitted, whose
  // stage and statements the next batch wants, was left for it.
  CHECK(r.sessions("ANALYZE%") == 1);
  CHECK(r.sessions("COMMIT") == 1);
  s->submit_batch(r.batch(1500, 2));
  std::this_thread::sleep_for(300ms);
  CHECK(r.reltuples() == 1510);  // within seconds of the last refresh
  // The store goes while a refresh may still run: it waits for it.
  auto other = s.another();
  other->submit_batch(r.batch(5000, 3));
  other.reset();
}

TEST_CASE("a statistics refresh whose spare connection the server has closed runs on another", "[postgres][sql]") {
  // The refresh borrows the connection idle the longest, the one a server's
  // idle_session_timeout or a NAT closes first.
  RefreshedStore r("respare");
  r.s->submit_batch(r.batch(1500, 0));
  REQUIRE(r.settles_at(1500) == 1500);
  // The server ends the session the refresh ran on; it stays in the pool,
  // idle, until the next refresh borrows it.
  REQUIRE(r.sessions("ANALYZE%") == 1);
  r.admin.exec(fmt::format("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{}' "
                           "AND query LIKE 'ANALYZE%'",
                           r.options.application_name));
  for (int i = 0; i < 100 && r.sessions("ANALYZE%") != 0; ++i) std::this_thread::sleep_for(20ms);
  REQUIRE(r.sessions("ANALYZE%") == 0);
  std::this_thread::sleep_for(5100ms);  // refreshes are at least 5 s apart
  r.s->submit_batch(r.batch(1500, 1));
  CHECK(r.settles_at(3000) == 3000);
}

TEST_CASE("a claim rewrites each small task on its own page, so the claim leaves the indexes alone",
          "[postgres][sql]") {
  // A claim that finds no room on the row's page writes the new version
  // elsewhere and inserts it into both indexes (a seventh of the claims, and a
  // quarter of a claim's server time, at fillfactor 50). The smallest tasks
  // grow the most, relatively, when leased; the owner is the default worker id
  // of a host with a long name (a Kubernetes pod, say).
  TestStore s(StoreKind::postgres);
  Admin admin(s.conninfo());
  const std::string tasks = "\"" + s.schema() + "\".tasks";
  std::vector<eoq::NewTask> batch(2000);
  for (auto& t : batch) {
    t.queue = "q";
    t.type = "t";
    t.payload = "{}";
  }
  REQUIRE(s->submit_batch(batch).size() == batch.size());
  const std::string pages =
      fmt::format("SELECT string_agg(id || ':' || (ctid::text::point)[0], ',' ORDER BY id) FROM {}", tasks);
  auto before = admin.scalar(pages);
  auto rows_per_page = admin.count(fmt::format(
      "SELECT max(n) FROM (SELECT count(*) AS n FROM {} GROUP BY (ctid::text::point)[0]) p", tasks));
  INFO("pending rows per page: " << rows_per_page);
  eoq::ClaimRequest r{{"q"}, "payments-api-7d9f8c6b5d-x2k4p.internal:1234567:0123abcd", 1000, eoq::Millis(30000)};
  REQUIRE(s->claim(r).size() == 1000);
  REQUIRE(s->claim(r).size() == 1000);
  CHECK(admin.count(fmt::format("SELECT count(*) FROM {} WHERE status = 'running'", tasks)) == 2000);
  // A HOT update keeps the row on its page (the ctid of the old version leads
  // to the new one): every id still sits on the page it was inserted on.
  CHECK(admin.scalar(pages) == before);
}

TEST_CASE("a generic claim plan built on a table analyzed while empty still walks the claim index once it fills",
          "[postgres][sql]") {
  TestStore store(StoreKind::postgres);
  Admin admin(store.conninfo());
  const std::string quoted = "\"" + store.schema() + "\"";
  admin.exec(fmt::format("ANALYZE {}.tasks", quoted));
  eoq::pg::Connection c(store.conninfo(), "eoq-test", true, true);
  auto claim = eoq::pg::query("claim_one", quoted);
  REQUIRE(claim.generic);
  const eoq::pg::Param none;  // ClaimRequest::after
  // Plans it on the empty table.
  CHECK(c.exec(claim, {"q", "10", "test", "30000", none, none, none}).rows() == 0);
  // 20,000 tasks arrive and nothing analyzes the table since.
  admin.exec(fmt::format(
      "INSERT INTO {0}.tasks (id, queue, type, payload, status, priority, run_at, max_attempts, backoff, "
      "backoff_initial_ms, backoff_max_ms, backoff_jitter) "
      "SELECT nextval('{0}.task_ids'), 'q', 'noop', '{{}}', 'pending', 0, now(), 3, 'exponential', 1000, 60000, 0.1 "
      "FROM generate_series(1, 20000)",
      quoted));
  auto plan = plan_of(c, "EXECUTE eoq_claim_one('q', 10, 'test', 30000, NULL, NULL, NULL)");
  INFO(plan);
  CHECK(plan.find("$1") != std::string::npos);  // the generic plan, not one made for these values
  CHECK(plan.find("Index Scan using tasks_claim") != std::string::npos);
  CHECK(plan.find("Seq Scan") == std::string::npos);
  CHECK(plan.find("JIT") == std::string::npos);
  CHECK(plan.find("Index Cond: ((id >= ") != std::string::npos);  // the leases, by their id range
  // ClaimRequest::after enters the claim index at its place.
  CHECK(plan.find("Index Cond: ((queue = $1) AND (ROW(priority, run_at, id) > ROW(") != std::string::npos);
  CHECK(c.exec(claim, {"q", "10", "test", "30000", none, none, none}).rows() == 10);
  // So does the claim the store tries first.
  auto pending = eoq::pg::query("claim_pending_one", quoted);
  REQUIRE(pending.generic);
  CHECK(c.exec(pending, {"q", "10", "test", "30000", none, none, none}).rows() == 10);
  auto pending_plan = plan_of(c, "EXECUTE eoq_claim_pending_one('q', 10, 'test', 30000, NULL, NULL, NULL)");
  INFO(pending_plan);
  CHECK(pending_plan.find("$1") != std::string::npos);
  CHECK(pending_plan.find("Index Scan using tasks_claim") != std::string::npos);
  CHECK(pending_plan.find("Seq Scan") == std::string::npos);
  CHECK(pending_plan.find("Index Cond: ((id >= ") != std::string::npos);
  CHECK(pending_plan.find("finished") == std::string::npos);  // settles nothing
  // The completion's generic plan does not meet each settled row with its
  // result by a nested loop (quadratic in the batch).
  auto complete = eoq::pg::query("complete", quoted);
  REQUIRE(complete.generic);
  CHECK(c.exec(complete, {"{}", "{}", "{}"}).rows() == 0);
  auto complete_plan = plan_of(c, "EXECUTE eoq_complete('{1}', '{1}', '{null}')");
  INFO(complete_plan);
  CHECK(complete_plan.find("Nested Loop") == std::string::npos);
  CHECK(complete_plan.find("Seq Scan") == std::string::npos);
  // Neighbouring ids are read as one range of the primary key.
  CHECK(complete_plan.find("Index Cond: ((id >= ") != std::string::npos);
  // A statement not marked generic runs under the session's own settings again.
  c.exec(eoq::pg::query("stats", quoted), {std::nullopt});
  auto show = [&] {
    auto r = c.exec_params("SHOW plan_cache_mode", {}, false, "show");
    return std::string(PQgetvalue(r.get(), 0, 0));
  };
  CHECK(show() == "auto");
  c.exec(claim, {"q", "1", "test", "30000", none, none, none});
  CHECK(show() == "force_generic_plan");
  // A transaction runs under the session's own settings, and a rollback does
  // not bring the generic ones back.
  c.begin();
  CHECK(show() == "auto");
  c.command("ROLLBACK");
  CHECK(show() == "auto");
  c.exec(claim, {"q", "1", "test", "30000", none, none, none});
  CHECK(show() == "force_generic_plan");
}

TEST_CASE("key lookups and key pruning enter the keys' primary key by the key", "[postgres][sql]") {
  TestStore store(StoreKind::postgres);
  Admin admin(store.conninfo());
  const std::string quoted = "\"" + store.schema() + "\"";
  // Keys that differ only in case, in a trailing space or in how an accent
  // is encoded stay distinct keys (byte equality, as before the index took
  // the byte order).
  std::vector<NewTask> batch;
  for (std::string k : {"a", "A", "\xC3\xA9", "e\xCC\x81", "a ", "b", "B"}) {
    NewTask t;
    t.queue = "q";
    t.type = "noop";
    t.key = k;
    batch.push_back(t);
  }
  for (int i = 0; i < 20000; ++i) {
    NewTask t;
    t.queue = i % 2 ? "q" : "r";
    t.type = "noop";
    t.key = fmt::format("k{}", i);
    if (i % 3 == 0) t.tenant = "acme";
    batch.push_back(t);
  }
  for (const auto& r : store->submit_batch(batch)) CHECK_FALSE(r.duplicate);
  for (std::string k : {"a", "A", "\xC3\xA9", "e\xCC\x81", "a ", "b", "B"}) {
    auto found = store->find("q", k);
    REQUIRE(found);
    CHECK(found->key == k);
  }
  CHECK_FALSE(store->find("q", "k0"));  // k0 is queue r's, under tenant acme
  CHECK_FALSE(store->find("r", "k0"));
  REQUIRE(store->find("r", "k0", eoq::Scope::only("acme")));
  admin.exec(fmt::format("ANALYZE {}.keys", quoted));
  eoq::pg::Connection c(store.conninfo(), "eoq-test", true, true);
  auto by_keys = eoq::pg::query("by_keys", quoted);
  REQUIRE(by_keys.generic);
  CHECK(c.exec(by_keys, {"{q}", "{NULL}", "{a}"}).rows() == 1);
  auto lookup = plan_of(c, "EXECUTE eoq_by_keys('{q}', '{NULL}', '{a}')");
  INFO(lookup);
  // The key leads the index condition: compared under another collation it
  // would fall to a filter over every key of the queue.
  CHECK(lookup.find("Index Scan using keys_pkey") != std::string::npos);
  CHECK(lookup.find("Index Cond: ((key = ") != std::string::npos);
  CHECK(lookup.find("Seq Scan on keys") == std::string::npos);
  auto prune_stmt = eoq::pg::query("prune", quoted);
  CHECK(c.exec(prune_stmt, {"3600000", "100"}).rows() == 1);  // prepares it
  auto prune = plan_of(c, "EXECUTE eoq_prune(0, 100)");
  INFO(prune);
  CHECK(prune.find("keys_pkey") != std::string::npos);
  CHECK(prune.find("Index Cond: ((key = ") != std::string::npos);
  CHECK(prune.find("Seq Scan on keys") == std::string::npos);
}

TEST_CASE("a schema from before keys were per tenant is upgraded with its keys intact", "[postgres][migrate]") {
  auto url = eoq::test::test_database_url();
  auto schema = eoq::test::fresh_schema("upgrade");
  eoq::test::Admin admin(url);
  eoq::PostgresOptions o;
  o.conninfo = url;
  o.schema = schema;
  {
    // What 0.1's migrate() left: 0001 only, keys unique per (queue, key).
    eoq::PostgresStore store(o);
    store.migrate();
    admin.exec(fmt::format("DROP TABLE \"{0}\".keys, \"{0}\".waiting, \"{0}\".edges, \"{0}\".totals, "
                           "\"{0}\".paused_queues, \"{0}\".limits, \"{0}\".grants, \"{0}\".starts; "
                           "DROP FUNCTION \"{0}\".release_children, \"{0}\".totals_added, \"{0}\".totals_removed, "
                           "\"{0}\".totals_truncated, \"{0}\".limit_busy, \"{0}\".unlimited, "
                           "\"{0}\".limit_lock CASCADE; "
                           "ALTER TABLE \"{0}\".tasks DROP COLUMN partition_key, DROP COLUMN timeout_ms; "
                           "ALTER TABLE \"{0}\".finished DROP COLUMN partition_key, DROP COLUMN timeout_ms; "
                           "DELETE FROM \"{0}\".migrations WHERE name <> '0001_tasks'", schema));
    admin.exec(fmt::format("CREATE TABLE \"{0}\".keys (queue text NOT NULL, key text NOT NULL, task_id bigint NOT NULL, "
                           "PRIMARY KEY (queue, key))", schema));
    admin.exec(fmt::format("INSERT INTO \"{0}\".tasks (id, queue, type, key, tenant, payload, status, priority, run_at, "
                           "max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter) VALUES "
                           "(1, 'q', 't', 'k', 'acme', '{{}}', 'pending', 0, now(), 3, 'fixed', 0, 0, 0), "
                           "(2, 'q', 't', 'k2', NULL, '{{}}', 'pending', 0, now(), 3, 'fixed', 0, 0, 0)", schema));
    admin.exec(fmt::format("INSERT INTO \"{0}\".keys VALUES ('q', 'k', 1), ('q', 'k2', 2)", schema));
    // History kept before 0008: its totals start from it.
    admin.exec(fmt::format("INSERT INTO \"{0}\".finished (id, queue, type, tenant, payload, status, priority, run_at, "
                           "max_attempts, backoff, backoff_initial_ms, backoff_max_ms, backoff_jitter, finished_at) "
                           "VALUES (3, 'q', 't', NULL, '{{}}', 'succeeded', 0, now(), 3, 'fixed', 0, 0, 0, now()), "
                           "(4, 'q', 't', NULL, '{{}}', 'failed', 0, now(), 3, 'fixed', 0, 0, 0, now() - interval '3 days')",
                           schema));
    admin.exec(fmt::format("SELECT setval('\"{0}\".task_ids', 4)", schema));
  }
  eoq::PostgresStore store(o);
  store.migrate();
  auto st = store.stats();
  REQUIRE(st.size() == 1);
  CHECK(st[0].succeeded == 1);
  CHECK(st[0].succeeded_total == 1);
  CHECK(st[0].failed_total == 1);
  CHECK(st[0].succeeded_last_minute == 1);
  CHECK(st[0].failed_last_minute == 0);  // three days old
  auto acme = store.find("q", "k", eoq::Scope::only("acme"));
  REQUIRE(acme);
  CHECK(acme->id == 1);
  CHECK_FALSE(store.find("q", "k"));
  REQUIRE(store.find("q", "k2"));
  eoq::NewTask again;
  again.queue = "q";
  again.type = "t";
  again.key = "k";
  again.tenant = "acme";
  auto dup = store.submit(again);
  CHECK(dup.duplicate);
  CHECK(dup.task.id == 1);
  again.tenant = "other";
  CHECK_FALSE(store.submit(again).duplicate);
  // 0003 (workflows) on a schema that had tasks: one of them can be a parent.
  eoq::NewTask child;
  child.type = "t";
  child.parents = {2};
  CHECK(store.submit(child).task.status == eoq::TaskStatus::waiting);
  admin.exec(fmt::format("DROP SCHEMA \"{}\" CASCADE", schema));
}

TEST_CASE("a connection the server refuses for good fails at once, not as a transient outage", "[postgres]") {
  auto url = eoq::test::test_database_url();
  auto refused = [&](const std::string& key, const std::string& value) -> std::string {
    eoq::PostgresOptions o;
    o.conninfo = eoq::test::conninfo_with(url, key, value);
    // Eight retries would back off 6.35 s at least (50 ms doubling, capped at
    // 1.6 s): a refusal taken for an outage could not fail within half that.
    o.transient_retries = 8;
    eoq::PostgresStore store(o);
    auto started = std::chrono::steady_clock::now();
    try {
      store.get(1);
    } catch (const eoq::TransientError& e) {
      return std::string("transient: ") + e.what();
    } catch (const eoq::DatabaseError& e) {
      // No retry with backoff happened first.
      CHECK(std::chrono::steady_clock::now() - started < std::chrono::milliseconds(3000));
      return e.sqlstate();
    }
    return "connected";
  };
  CHECK(refused("dbname", "no_such_database_eoq") == "3D000");
  CHECK(refused("user", "no_such_role_eoq") == "28000");
}

TEST_CASE("several processes migrating one fresh schema at once all succeed and leave it complete",
          "[postgres][processes]") {
  std::string url = eoq::test::test_database_url();
  std::string schema = eoq::test::fresh_schema("mig");
  constexpr int kProcesses = 6;
  Race race;
  race.start(kProcesses, url, schema, "migrate", [](int) { return std::vector<std::string>{}; });
  race.finish();

  Admin admin(url);
  auto tables = admin.count(
      "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = ANY($2::text[])",
      {schema, "{tasks,finished,keys,attempts,migrations,waiting,edges}"});
  CHECK(tables == 7);
  // Every migration file applied once: the names (a primary key) are exactly the files'.
  auto applied = admin.count(fmt::format("SELECT count(*) FROM \"{}\".migrations", schema));
  CHECK(admin.scalar(fmt::format("SELECT string_agg(name, ',' ORDER BY name) FROM \"{}\".migrations", schema))
            .value_or("(none)") == EOQ_MIGRATION_NAMES);

  {
    eoq::PostgresOptions o;
    o.conninfo = url;
    o.schema = schema;
    eoq::PostgresStore store(o);
    store.migrate();  // once more: a no-op
    CHECK(admin.count(fmt::format("SELECT count(*) FROM \"{}\".migrations", schema)) == applied);
    auto id = store.submit(task()).task.id;
    eoq::ClaimRequest r;
    r.owner = "w";
    auto leases = store.claim(r);
    REQUIRE(leases.size() == 1);
    CHECK(leases[0].id() == id);
    store.complete(leases[0]);
    CHECK(store.get(id)->status == TaskStatus::succeeded);
  }
  eoq::test::drop_schema(url, schema);
}

TEST_CASE("eight processes of eight threads submitting one key at once create exactly one task",
          "[postgres][processes]") {
  TestStore s(StoreKind::postgres);
  constexpr int kProcesses = 8, kThreads = 8;
  Race race;
  race.start(kProcesses, s.conninfo(), s.schema(), "submit-key", [&](int i) {
    return std::vector<std::string>{std::to_string(kThreads), "race", "the-key", race.out(i)};
  });
  race.finish();

  std::set<std::string> ids;
  int created = 0, results = 0;
  for (int i = 0; i < kProcesses; ++i)
    for (auto& row : read_rows(race.out(i))) {
      REQUIRE(row.size() == 2);
      ids.insert(row[0]);
      created += row[1] == "0" ? 1 : 0;
      ++results;
    }
  CHECK(results == kProcesses * kThreads);
  CHECK(ids.size() == 1);
  CHECK(created == 1);
  auto all = list_all(*s, Q().queue("race"));
  REQUIRE(all.size() == 1);
  CHECK(std::to_string(all[0].id) == *ids.begin());
  CHECK(stats_of(*s, "race").pending == 1);
}

TEST_CASE("eight processes of eight threads submitting one strict key with different payloads at once: one task, "
          "every other submit a KeyConflict naming it, nothing else written",
          "[postgres][processes][keys]") {
  TestStore s(StoreKind::postgres);
  constexpr int kProcesses = 8, kThreads = 8;
  Race race;
  race.start(kProcesses, s.conninfo(), s.schema(), "submit-strict", [&](int i) {
    return std::vector<std::string>{std::to_string(kThreads), "race", "the-key", race.out(i)};
  });
  race.finish();

  // outcome path id pid thread field differs key fresh
  std::vector<std::vector<std::string>> rows;
  for (int i = 0; i < kProcesses; ++i)
    for (auto& row : read_rows(race.out(i))) {
      REQUIRE(row.size() == 9);
      rows.push_back(row);
    }
  REQUIRE(rows.size() == static_cast<std::size_t>(kProcesses * kThreads));
  std::vector<std::vector<std::string>> created;
  for (auto& r : rows)
    if (r[0] == "created") created.push_back(r);
  REQUIRE(created.size() == 1);
  const auto& winner = created[0];
  const std::string id = winner[2];
  int conflicts = 0;
  for (auto& r : rows) {
    if (r == winner) continue;
    INFO(fmt::format("{} {} (pid {} thread {}) answered {} {}", r[1], r[8], r[3], r[4], r[0], r[2]));
    CHECK(r[0] == "conflict");  // never a duplicate: the payloads differ; never another error
    if (r[0] != "conflict") continue;
    ++conflicts;
    CHECK(r[2] == id);  // names the one task that holds the key
    CHECK(r[5] == (r[1] == "batch" ? "tasks[0].key" : "key"));
    CHECK(r[6] == "payload");
    CHECK(r[7] == "the-key");
  }
  CHECK(conflicts == kProcesses * kThreads - 1);

  // The one task, with the winner's payload; of the batches' fresh keys only
  // the winner's (if it submitted a batch) was written: a conflict writes nothing.
  auto all = list_all(*s, Q().queue("race"));
  std::vector<eoq::Task> keyed;
  for (auto& t : all)
    if (t.key == std::optional<std::string>("the-key")) keyed.push_back(t);
  REQUIRE(keyed.size() == 1);
  CHECK(std::to_string(keyed[0].id) == id);
  CHECK(keyed[0].payload == fmt::format(R"({{"pid": {}, "thread": {}}})", winner[3], winner[4]));
  const std::size_t fresh_written = winner[1] == "batch" ? 1 : 0;
  CHECK(all.size() == 1 + fresh_written);
  for (auto& r : rows)
    if (r[1] == "batch" && r != winner) {
      INFO("fresh key " << r[8]);
      CHECK_FALSE(s->find("race", r[8]));
    }
  Admin admin(s.conninfo());
  CHECK(admin.count(fmt::format("SELECT count(*) FROM \"{}\".keys WHERE queue = 'race'", s.schema())) ==
        static_cast<long long>(1 + fresh_written));
  CHECK(stats_of(*s, "race").pending == static_cast<std::int64_t>(1 + fresh_written));
}

TEST_CASE("eight processes of four threads claiming 20000 tasks claim each exactly once", "[postgres][processes]") {
  TestStore s(StoreKind::postgres);
  constexpr int kTasks = 20000, kProcesses = 8, kThreads = 4;
  std::vector<NewTask> batch(1000, task("bulk"));
  h::Recorder parent;
  h::RecordingStore client(*s, parent);
  for (int i = 0; i < kTasks / 1000; ++i) REQUIRE(client.submit_batch(batch).size() == 1000);
  REQUIRE(stats_of(*s, "bulk").pending == kTasks);

  Race race;
  race.start(kProcesses, s.conninfo(), s.schema(), "claim-all", [&](int i) {
    return std::vector<std::string>{std::to_string(kThreads), "50", "bulk", race.out(i)};
  });
  race.finish();

  std::map<std::string, int> claimed;
  int not_applied = 0, lines = 0;
  for (int i = 0; i < kProcesses; ++i)
    for (auto& row : read_rows(race.out(i))) {
      REQUIRE(row.size() == 3);
      ++claimed[row[0]];
      not_applied += row[2] == "1" ? 0 : 1;
      ++lines;
    }
  int twice = 0;
  for (auto& [id, n] : claimed) twice += n > 1 ? 1 : 0;
  CHECK(claimed.size() == kTasks);
  CHECK(lines == kTasks);
  CHECK(twice == 0);
  CHECK(not_applied == 0);
  auto st = stats_of(*s, "bulk");
  CHECK(st.pending == 0);
  CHECK(st.running == 0);
  CHECK(st.succeeded == kTasks);
  int not_once = 0;
  for (auto& t : list_all(*s, Q().queue("bulk")))
    not_once += (t.status == TaskStatus::succeeded && t.attempts == 1) ? 0 : 1;
  CHECK(not_once == 0);

  // No handler writes here: the completion is the effect.
  auto events = parent.events();
  h::append(events, h::load_logs(race.dir));
  Admin admin(s.conninfo());
  h::append(events, h::load_postgres(admin.get(), s.schema(), ""));
  h::Options o;
  o.require_effects = false;
  auto v = h::verify_and_print("claim race", events, o);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == kTasks);
  CHECK(v.claims == kTasks);
  CHECK(v.completions == kTasks);
}

TEST_CASE("connections killed while operations run either retry transparently or throw TransientError, "
          "and no task is lost or doubled",
          "[postgres][faults]") {
  eoq::test::StoreOptions so;
  so.application_name = fmt::format("eoq_drop_{}", ::getpid());
  so.pool_size = 4;
  so.transient_retries = 3;
  TestStore s(StoreKind::postgres, so);
  h::Recorder recorder;
  h::RecordingStore store(*s, recorder);
  Admin killer(s.conninfo());  // its own application_name, so it never kills itself

  std::atomic<bool> stop{false};
  std::mutex m;
  std::vector<std::string> failures;  // anything but success or TransientError
  std::atomic<int> ok_ops{0}, transient{0}, killed{0}, killed_busy{0}, submitted{0};
  std::vector<eoq::Lease> in_doubt;  // completions that threw TransientError
  auto record = [&](const std::string& what, const std::exception& e) {
    std::lock_guard lock(m);
    failures.push_back(what + ": " + e.what());
  };
  // Runs op; success and TransientError are the only allowed outcomes.
  auto guarded = [&](const std::string& what, auto&& op) -> bool {
    try {
      op();
      ++ok_ops;
      return true;
    } catch (const eoq::TransientError&) {
      ++transient;
      return false;
    } catch (const std::exception& e) {
      record(what, e);
      return false;
    }
  };

  std::vector<std::thread> threads;
  threads.emplace_back([&] {  // submitter: keyed, so a repeat is safe
    for (int i = 0; !stop; ++i) {
      NewTask t = task();
      t.key = fmt::format("k{}", i);
      submitted = i + 1;
      guarded("submit", [&] { store.submit(t); });
    }
  });
  threads.emplace_back([&] {  // claimer and completer
    eoq::ClaimRequest r;
    r.owner = "drop-worker";
    r.limit = 5;
    r.lease = 2s;
    while (!stop) {
      std::vector<eoq::Lease> leases;
      if (!guarded("claim", [&] { leases = store.claim(r); })) continue;
      for (auto& l : leases) {
        guarded("heartbeat", [&] { store.heartbeat(l, 2s); });
        guarded("progress", [&] { store.progress(l, 50, "half"); });
        try {
          store.complete(l, "1");
          ++ok_ops;
        } catch (const eoq::TransientError&) {
          ++transient;
          std::lock_guard lock(m);
          in_doubt.push_back(l);
        } catch (const std::exception& e) {
          record("complete", e);
        }
      }
    }
  });
  threads.emplace_back([&] {  // reader
    while (!stop) {
      guarded("get", [&] { store.get(1); });
      guarded("list", [&] { store.list(Q().limit(50)); });
      guarded("stats", [&] { store.stats(); });
      guarded("find", [&] { store.find("default", "k1"); });
    }
  });
  threads.emplace_back([&] {  // killer
    while (!stop) {
      std::this_thread::sleep_for(120ms);
      try {
        // Idle pool connections die too; the busy ones were in the middle of a
        // statement, so the operation on them surely met the kill.
        auto row = killer.exec(
            "SELECT count(*) FILTER (WHERE state <> 'idle'), count(pg_terminate_backend(pid)) "
            "FROM pg_stat_activity WHERE application_name = $1",
            {so.application_name}).rows.at(0);
        killed_busy += std::stoi(row.at(0).value_or("0"));
        killed += std::stoi(row.at(1).value_or("0"));
      } catch (const std::exception& e) {
        record("killer", e);
      }
    }
  });
  // Until the kills surely hit operations in flight (not a fixed time), or a
  // generous bound that only a broken killer reaches.
  auto enough = std::chrono::steady_clock::now() + 60s;
  while (!(killed_busy >= 5 && ok_ops > 50) && std::chrono::steady_clock::now() < enough)
    std::this_thread::sleep_for(20ms);
  stop = true;
  for (auto& t : threads) t.join();

  INFO("ok operations " << ok_ops << ", TransientError " << transient << ", backends killed " << killed << " ("
                        << killed_busy << " in a statement), keys submitted " << submitted
                        << ", completions in doubt " << in_doubt.size());
  for (const auto& f : failures) FAIL_CHECK(f);
  CHECK(killed_busy >= 5);  // operations met the kills, not only idle pool connections
  CHECK(ok_ops > 50);

  // One completion in doubt for certain: its statement waits for a row lock
  // held here, and its backend is killed while it waits. With no retries the
  // client gets TransientError and cannot know whether it committed.
  {
    eoq::PostgresOptions po;
    const std::string app = so.application_name + "_doubt";
    po.conninfo = eoq::test::conninfo_with(s.conninfo(), "application_name", app);
    po.schema = s.schema();
    po.transient_retries = 0;
    eoq::PostgresStore raw(po);
    h::RecordingStore doubtful(raw, recorder);
    auto id = doubtful.submit(task("doubt")).task.id;
    eoq::ClaimRequest r;
    r.owner = "doubt-worker";
    r.queues = {"doubt"};
    r.limit = 1;
    r.lease = 60s;
    auto got = store.claim(r);
    REQUIRE(got.size() == 1);
    REQUIRE(got[0].id() == id);
    std::optional<eoq::Lease> lease = got[0];
    Admin locker(s.conninfo());
    locker.exec("BEGIN");
    locker.exec(fmt::format("SELECT 1 FROM \"{}\".tasks WHERE id = $1 FOR UPDATE", s.schema()), {std::to_string(id)});
    std::atomic<int> outcome{0};  // 1 completed, 2 TransientError, 3 anything else
    std::string other;
    std::thread completer([&] {
      try {
        doubtful.complete(*lease, "1");
        outcome = 1;
      } catch (const eoq::TransientError&) {
        outcome = 2;
      } catch (const std::exception& e) {
        other = e.what();
        outcome = 3;
      }
    });
    bool waiting = false;
    for (auto until = std::chrono::steady_clock::now() + 60s; !waiting && std::chrono::steady_clock::now() < until;
         std::this_thread::sleep_for(5ms))
      waiting = killer.count("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND "
                             "wait_event_type = 'Lock'",
                             {app}) == 1;
    CHECK(waiting);
    CHECK(killer.count("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1 "
                       "AND wait_event_type = 'Lock'",
                       {app}) == 1);
    locker.exec("ROLLBACK");  // had the kill missed, the completion would now go through
    completer.join();
    INFO("the completion in doubt ended: " << other);
    REQUIRE(outcome == 2);
    in_doubt.push_back(*lease);
    // Resolved below like every other: it did not commit, so the lease still holds.
    auto still = store.get(id).value();
    CHECK(still.status == TaskStatus::running);
    CHECK(still.version == lease->token);
  }
  REQUIRE_FALSE(in_doubt.empty());

  // Completions whose answer was lost: either they committed, or the task is
  // still running under that lease (or was reclaimed after it lapsed).
  for (auto& l : in_doubt) {
    auto t = store.get(l.id());
    REQUIRE(t);
    if (t->status == TaskStatus::succeeded) {
      CHECK_THROWS_AS(store.complete(l), eoq::LeaseLost);
    } else if (t->status == TaskStatus::running && t->version == l.token) {
      store.complete(l, "1");
    } else {
      CHECK(t->version > l.token);  // reclaimed: drained below
    }
  }
  // Every key attempted exists exactly once.
  int n = submitted;
  std::set<eoq::TaskId> ids;
  for (int i = 0; i < n; ++i) {
    NewTask t = task();
    t.key = fmt::format("k{}", i);
    ids.insert(store.submit(t).task.id);
  }
  CHECK(static_cast<int>(ids.size()) == n);
  CHECK(static_cast<int>(list_all(store, Q().queue("default")).size()) == n);

  // Leases granted by claims whose answer was lost lapse; then drain everything.
  std::this_thread::sleep_for(2100ms);
  eoq::ClaimRequest r;
  r.owner = "drainer";
  r.limit = 200;
  auto give_up = std::chrono::steady_clock::now() + 30s;
  for (;;) {
    auto leases = store.claim(r);
    if (!leases.empty()) {
      std::vector<eoq::Completion> done;
      for (auto& l : leases) done.push_back({&l, "2"});
      store.complete_batch(done);
      continue;
    }
    auto st = stats_of(store, "default");
    if (st.pending == 0 && st.running == 0) break;
    REQUIRE(std::chrono::steady_clock::now() < give_up);
    std::this_thread::sleep_for(50ms);
  }
  auto st = stats_of(store, "default");
  CHECK(st.succeeded == n);
  CHECK(st.failed == 0);
  CHECK(st.cancelled == 0);
  CHECK(st.expired == 0);

  // No handler writes here: the completion is the effect.
  auto events = recorder.events();
  h::append(events, h::load_postgres(killer.get(), s.schema(), ""));
  h::Options o;
  o.require_effects = false;
  auto v = h::verify_and_print("backends killed", events, o);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == n + 1);  // and the one in doubt on its own queue
  CHECK(stats_of(store, "doubt").succeeded == 1);
}

TEST_CASE("cancel of a task claimed while the cancel statement waited for its row answers cancel_requested",
          "[postgres][cancel]") {
  TestStore store(StoreKind::postgres);
  const auto id = store->submit(task()).task.id;
  // A claim in flight: the row is running in a transaction that has not
  // committed, so the cancel statement waits on the row, then finds it neither
  // pending (its DELETE) nor running (its UPDATE, in its older snapshot).
  Admin claimer(store.conninfo());
  claimer.exec("BEGIN");
  claimer.exec(fmt::format("UPDATE \"{}\".tasks SET status = 'running', version = version + 1, attempts = 1, "
                           "lease_owner = 'other', lease_expires_at = now() + interval '1 hour', started_at = now() "
                           "WHERE id = $1",
                           store.schema()),
               {std::to_string(id)});
  std::optional<eoq::CancelOutcome> outcome;
  std::thread canceller([&] { outcome = store->cancel(id); });
  Admin watcher(store.conninfo());
  // Not a timing assertion: waits (up to a minute) until the cancel is blocked on the row.
  bool blocked = false;
  for (int i = 0; i < 6000 && !blocked; ++i) {
    blocked = watcher.count("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
                            {"%\"" + store.schema() + "\".tasks%"}) > 0;
    if (!blocked) std::this_thread::sleep_for(10ms);
  }
  claimer.exec("COMMIT");
  canceller.join();
  REQUIRE(blocked);
  CHECK(outcome == eoq::CancelOutcome::cancel_requested);
  auto t = store->get(id);
  REQUIRE(t);
  CHECK(t->status == TaskStatus::running);
  CHECK(t->cancel_requested);
}

TEST_CASE("cancel_on of a task claimed while its cancel statement waited for the row asks the task to stop, "
          "in the host's transaction or in autocommit",
          "[postgres][cancel][submit_on]") {
  const bool in_host_tx = GENERATE(false, true);
  INFO((in_host_tx ? "in the host's transaction" : "autocommit"));
  TestStore store(StoreKind::postgres);
  const auto id = store->submit(task()).task.id;
  // A claim in flight, as in the cancel() case above: the cancel statement
  // waits on the row, then finds it neither pending nor (in its snapshot)
  // running, and must lock the row and look again.
  Admin claimer(store.conninfo());
  claimer.exec("BEGIN");
  claimer.exec(fmt::format("UPDATE \"{}\".tasks SET status = 'running', version = version + 1, attempts = 1, "
                           "lease_owner = 'other', lease_expires_at = now() + interval '1 hour', started_at = now() "
                           "WHERE id = $1",
                           store.schema()),
               {std::to_string(id)});
  Admin host(store.conninfo());
  if (in_host_tx) host.exec("BEGIN");
  std::optional<eoq::CancelOutcome> outcome;
  std::string error;
  std::thread canceller([&] {
    try {
      outcome = eoq::PostgresStore::cancel_on(host.get(), id, {}, store.schema());
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  Admin watcher(store.conninfo());
  // Not a timing assertion: waits (up to a minute) until the cancel is blocked on the row.
  bool blocked = false;
  for (int i = 0; i < 6000 && !blocked; ++i) {
    blocked = watcher.count("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
                            {"%\"" + store.schema() + "\".tasks%"}) > 0;
    if (!blocked) std::this_thread::sleep_for(10ms);
  }
  claimer.exec("COMMIT");
  canceller.join();
  REQUIRE(blocked);
  INFO(error);
  CHECK(outcome == eoq::CancelOutcome::cancel_requested);
  if (in_host_tx) {
    // The request is the host's until it commits.
    CHECK_FALSE(store->get(id)->cancel_requested);
    host.exec("COMMIT");
  }
  auto t = store->get(id);
  REQUIRE(t);
  CHECK(t->status == TaskStatus::running);
  CHECK(t->cancel_requested);
}

TEST_CASE("a task submitted on the host's own connection exists only if the host's transaction commits",
          "[postgres][submit_on]") {
  TestStore s(StoreKind::postgres);
  Admin host(s.conninfo());
  host.exec("BEGIN");
  NewTask t = task();
  t.key = "tx-rolled-back";
  auto r = eoq::PostgresStore::submit_on(host.get(), t, s.schema());
  CHECK_FALSE(r.duplicate);
  host.exec("ROLLBACK");
  CHECK_FALSE(s->get(r.task.id));
  CHECK_FALSE(s->find("default", "tx-rolled-back"));

  host.exec("BEGIN");
  t.key = "tx-committed";
  auto c = eoq::PostgresStore::submit_on(host.get(), t, s.schema());
  CHECK_FALSE(s->get(c.task.id));  // not visible before the commit
  host.exec("COMMIT");
  auto got = s->get(c.task.id);
  REQUIRE(got);
  CHECK(got->status == TaskStatus::pending);
  CHECK(eoq::PostgresStore::submit_on(host.get(), t, s.schema()).duplicate);

  NewTask bad = task();
  bad.payload = "nope";
  try {
    eoq::PostgresStore::submit_on(host.get(), bad, s.schema());
    FAIL("submit_on accepted a payload that is not JSON");
  } catch (const eoq::InvalidArgument& e) {
    CHECK(e.field() == "payload");
  }
  CHECK_THROWS_AS(eoq::PostgresStore::submit_on(host.get(), t, "bad;schema"), eoq::InvalidArgument);
}

TEST_CASE("a handler transaction idle past handler_idle_timeout is ended by the server and frees its locks",
          "[postgres][transaction]") {
  std::string url = eoq::test::test_database_url();
  std::string schema = eoq::test::fresh_schema("idle");
  eoq::PostgresOptions o;
  o.conninfo = url;
  o.schema = schema;
  o.handler_idle_timeout = 500ms;
  o.transient_retries = 0;
  {
    eoq::PostgresStore store(o);
    store.migrate();
    Admin admin(url);
    admin.exec(fmt::format("CREATE TABLE \"{}\".account (id int PRIMARY KEY, balance int)", schema));
    admin.exec(fmt::format("INSERT INTO \"{}\".account VALUES (1, 0)", schema));
    auto id = store.submit(task()).task.id;
    eoq::ClaimRequest r;
    r.owner = "frozen";
    auto leases = store.claim(r);
    REQUIRE(leases.size() == 1);
    auto tx = store.begin(leases[0]);
    tx->exec(fmt::format("UPDATE \"{}\".account SET balance = balance + 100 WHERE id = 1", schema));
    // The worker "freezes" with the row locked. This update waits for that lock:
    // it gets it once the server ends the idle transaction (after 500 ms), long
    // before the 5 s lock_timeout that would fail it if nothing ended it.
    admin.exec("SET lock_timeout = '5s'");
    auto changed =
        admin.exec(fmt::format("UPDATE \"{}\".account SET balance = balance + 1 WHERE id = 1", schema)).affected;
    CHECK(changed == 1);
    std::string thrown = "nothing", sqlstate;
    try {
      tx->complete("1");
    } catch (const eoq::TransientError& e) {
      thrown = "TransientError";
      sqlstate = e.sqlstate();
    } catch (const std::exception& e) {
      thrown = std::string("another exception: ") + e.what();
    }
    // The server ended the session: a transient error (the task may run again),
    // reported as the idle-in-transaction timeout itself (25P03) when libpq has
    // read the server's last message, else as the connection it closed (08006).
    CHECK(thrown == "TransientError");
    INFO("SQLSTATE " << sqlstate);
    CHECK((sqlstate == "25P03" || sqlstate == "08006"));
    CHECK(admin.scalar(fmt::format("SELECT balance FROM \"{}\".account WHERE id = 1", schema)) ==
          std::optional<std::string>("1"));
    auto t = store.get(id);
    REQUIRE(t);
    // Nothing of the attempt committed: the task still runs under the same lease.
    CHECK(t->status == TaskStatus::running);
    CHECK(t->version == leases[0].token);
  }
  eoq::test::drop_schema(url, schema);
}

TEST_CASE("TempPostgres serves a database over TCP, restarts keeping its data and address, and stops by pid",
          "[postgres][temp_postgres]") {
  namespace fs = std::filesystem;
  std::string data;
  int last_pid = 0;
  {
    eoq::testing::TempPostgresOptions o;
    o.fsync = false;
    o.listen_tcp = true;
    o.max_connections = 20;
    eoq::testing::TempPostgres pg(o);
    data = pg.data_dir();
    CHECK(fs::exists(fs::path(data) / "PG_VERSION"));
    CHECK(pg.pid() > 0);
    CHECK(::kill(pg.pid(), 0) == 0);
    CHECK_THAT(pg.conninfo(), Catch::Contains("127.0.0.1"));
    {
      Admin a(pg.conninfo());
      a.exec("CREATE TABLE kept (v text)");
      a.exec("INSERT INTO kept VALUES ('before restart')");
    }
    auto db = pg.create_database("eoq_tp_check");
    {
      Admin a(db);
      CHECK(a.scalar("SELECT current_database()") == std::optional<std::string>("eoq_tp_check"));
    }
    try {
      pg.create_database("bad;name");
      FAIL("create_database accepted an invalid name");
    } catch (const eoq::InvalidArgument& e) {
      CHECK(e.field() == "name");
    }
    CHECK_THROWS_AS(pg.create_database("eoq_tp_check"), eoq::Error);  // exists already

    int before = pg.pid();
    std::string address = pg.conninfo();
    pg.restart();
    CHECK(pg.conninfo() == address);
    CHECK(pg.pid() > 0);
    CHECK(pg.pid() != before);
    CHECK(::kill(before, 0) != 0);
    {
      Admin a(pg.conninfo());
      CHECK(a.scalar("SELECT v FROM kept") == std::optional<std::string>("before restart"));
    }
    last_pid = pg.pid();
    pg.stop();
    CHECK(::kill(last_pid, 0) != 0);
    CHECK(PQping(address.c_str()) != PQPING_OK);
    pg.restart();  // starts again after a stop
    CHECK(PQping(address.c_str()) == PQPING_OK);
    last_pid = pg.pid();
  }
  CHECK(::kill(last_pid, 0) != 0);
  CHECK_FALSE(fs::exists(data));
}

TEST_CASE("a queue with only a rate limit keeps no grants, and one with a concurrency limit keeps only live ones",
          "[postgres][limits]") {
  // Grants (migration 0012) count what runs; a claim of a queue without a
  // concurrency limit deletes them, else they would pile up for ever.
  TestStore s(StoreKind::postgres);
  Admin admin(s.conninfo());
  const std::string grants = "SELECT count(*) FROM \"" + s.schema() + "\".grants WHERE queue = 'q'";
  eoq::QueueLimits rate;
  rate.rate = eoq::RateLimit{1000, std::chrono::seconds(1)};
  s->set_limits("q", rate);
  for (int i = 0; i < 20; ++i) {
    eoq::NewTask t;
    t.queue = "q";
    t.type = "t";
    s->submit(t);
  }
  for (int i = 0; i < 10; ++i) {
    auto got = s->claim(eoq::ClaimRequest{{"q"}, "w", 2, eoq::Millis(30000), {}});
    REQUIRE(got.size() == 2);
    for (auto& l : got) s->complete(l);
  }
  CHECK(admin.count(grants) <= 1);  // the last claim's, deleted by the next
  eoq::QueueLimits both = rate;
  both.concurrency = 5;
  s->set_limits("q", both);
  for (int i = 0; i < 20; ++i) {
    eoq::NewTask t;
    t.queue = "q";
    t.type = "t";
    s->submit(t);
  }
  for (int i = 0; i < 10; ++i) {
    auto got = s->claim(eoq::ClaimRequest{{"q"}, "w", 2, eoq::Millis(30000), {}});
    REQUIRE(got.size() == 2);
    for (auto& l : got) s->complete(l);
  }
  CHECK(admin.count(grants) <= 3);  // ended grants go once the bound asks for a count
}
