// Past one server, against the real things: PgBouncer in transaction pooling
// mode, a failover to a synchronous standby, and reads from a hot standby.
// Each case starts its own servers (TempPostgres, TempPgBouncer) and stops them
// by pid.
#include "history.hpp"
#include "support.hpp"

#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <unistd.h>

using namespace std::chrono_literals;
using eoq::Millis;
using eoq::test::eventually;
using eoq::test::Gate;
namespace h = eoq::test::history;

namespace {

eoq::NewTask task(std::string type) {
  eoq::NewTask t;
  t.type = std::move(type);
  return t;
}

eoq::PostgresOptions options(std::string conninfo, std::string schema) {
  eoq::PostgresOptions o;
  o.conninfo = std::move(conninfo);
  o.schema = std::move(schema);
  return o;
}

// A primary with a streaming standby. With `synchronous`, a commit returns
// only once the standby has flushed it (synchronous_commit = on).
struct Replicated {
  eoq::testing::TempPostgres primary;
  eoq::testing::TempPostgres standby;
  explicit Replicated(bool synchronous)
      : primary(primary_options(synchronous)), standby(standby_options(primary.conninfo())) {}

  static eoq::testing::TempPostgresOptions primary_options(bool synchronous) {
    eoq::testing::TempPostgresOptions o;
    o.listen_tcp = true;
    o.fsync = false;  // a crashed primary is never started again here
    // Without fsync TempPostgres also turns synchronous_commit off, with which a
    // commit would not wait for the standby either.
    o.extra_config = "synchronous_commit = on\n";
    if (synchronous) o.extra_config += "synchronous_standby_names = 'standby1'\n";
    return o;
  }
  static eoq::testing::TempPostgresOptions standby_options(const std::string& primary) {
    eoq::testing::TempPostgresOptions o;
    o.listen_tcp = true;
    o.standby_of = primary;
    o.standby_name = "standby1";
    return o;
  }
  // Both servers in one connection string: libpq tries them in order and keeps
  // the one that takes writes.
  std::string multi_host() const {
    return fmt::format("host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres connect_timeout=5 "
                       "target_session_attrs=read-write",
                       primary.port(), standby.port());
  }
  // Waits until the standby has replayed everything the primary wrote so far.
  void catch_up() {
    eoq::test::Admin p(primary.conninfo()), s(standby.conninfo());
    // The insert position: commits whose WAL is not written out yet count too.
    auto lsn = p.scalar("SELECT pg_current_wal_insert_lsn()::text").value();
    REQUIRE(eventually([&] { return s.scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", {lsn}) == "t"; },
                       60s));
  }
};

}  // namespace

// ------------------------------------------------------------------- pgbouncer
#ifdef EOQ_HAVE_PGBOUNCER

TEST_CASE("behind PgBouncer's transaction pooling, named statements collide and transaction_pooling avoids them",
          "[pgbouncer]") {
  // One server connection for every client: two clients' transactions surely
  // land on the same server session.
  eoq::testing::TempPgBouncerOptions bo;
  bo.pool_size = 1;
  eoq::testing::TempPgBouncer bouncer(eoq::test::direct_database_url(), bo);
  const auto schema = eoq::test::fresh_schema("pgb");
  {
    eoq::PostgresStore direct(options(eoq::test::direct_database_url(), schema));
    direct.migrate();
  }
  SECTION("without it the second client's PREPARE finds the first one's statement on the server") {
    eoq::PostgresStore a(options(bouncer.conninfo(), schema)), b(options(bouncer.conninfo(), schema));
    auto id = a.submit(task("t")).task.id;
    CHECK(a.get(id));
    try {
      b.get(id);
      FAIL("a named statement prepared by another client was not in the way");
    } catch (const eoq::DatabaseError& e) {
      CHECK(e.sqlstate() == "42P05");  // duplicate_prepared_statement
    }
  }
  SECTION("with it every statement goes unnamed and two clients share the one server connection") {
    auto o = options(bouncer.conninfo(), schema);
    o.transaction_pooling = true;
    eoq::PostgresStore a(o), b(o);
    auto id = a.submit(task("t")).task.id;
    CHECK(b.get(id)->id == id);
    eoq::ClaimRequest claim;
    claim.queues = {"default"};
    claim.owner = "w";
    auto leases = b.claim(claim);
    REQUIRE(leases.size() == 1);
    auto tx = a.begin(leases[0]);  // a handler transaction: SET LOCAL, then the settlement
    tx->exec("SELECT 1");
    tx->complete("{}");
    CHECK(b.get(id)->status == eoq::TaskStatus::succeeded);
  }
  eoq::test::drop_schema(eoq::test::direct_database_url(), schema);
}

TEST_CASE("behind PgBouncer an idle store hears submits on listen_conninfo, and without it waits out its timeout",
          "[pgbouncer]") {
  eoq::testing::TempPgBouncer bouncer(eoq::test::direct_database_url());
  const auto schema = eoq::test::fresh_schema("pgl");
  auto o = options(bouncer.conninfo(), schema);
  o.transaction_pooling = true;
  eoq::PostgresStore submitter(o);
  submitter.migrate();
  SECTION("LISTEN on the direct connection") {
    auto lo = o;
    lo.listen_conninfo = eoq::test::direct_database_url();
    eoq::PostgresStore waiter(lo);
    waiter.wait_for_tasks({"default"}, 0ms);  // listening from now on
    std::atomic<bool> woke{false};
    std::thread t([&] {
      waiter.wait_for_tasks({"default"}, 300s);
      woke = true;
    });
    submitter.submit(task("t"));  // its NOTIFY commits through the pooler
    REQUIRE(eventually([&] { return woke.load(); }, 120s));
    t.join();
  }
  SECTION("no LISTEN through the pooler: nothing but wake() or the timeout ends a wait") {
    eoq::PostgresStore waiter(o);
    // A wake() before any wait is kept for the next one, which it ends at once.
    waiter.wake();
    auto t0 = std::chrono::steady_clock::now();
    waiter.wait_for_tasks({"default"}, 60s);
    CHECK(std::chrono::steady_clock::now() - t0 < 30s);
    std::atomic<bool> woke{false};
    std::thread t([&] {
      waiter.wait_for_tasks({"default"}, 300s);
      woke = true;
    });
    submitter.submit(task("t"));
    CHECK(submitter.stats().at(0).pending == 1);  // the NOTIFY went out, and nobody heard it
    CHECK_FALSE(woke.load());
    waiter.wake();  // whether or not the thread has begun to wait yet
    REQUIRE(eventually([&] { return woke.load(); }, 120s));
    t.join();
  }
  eoq::test::drop_schema(eoq::test::direct_database_url(), schema);
}

#endif  // EOQ_HAVE_PGBOUNCER

// -------------------------------------------------------------------- failover

TEST_CASE("a failover to a synchronous standby mid-run loses no task, no completion and repeats no effect",
          "[failover]") {
  Replicated servers(true);
  auto po = options(servers.multi_host(), "eoq");
  po.transient_retries = 5;
  eoq::PostgresStore pg(po);
  pg.migrate();
  eoq::test::Admin(servers.primary.conninfo())
      .exec("CREATE TABLE eoq.effects (task_id bigint NOT NULL, version bigint NOT NULL)");
  h::Recorder recorder;
  h::RecordingStore store(pg, recorder);

  eoq::WorkerOptions wo;
  wo.concurrency = 6;
  wo.lease = 5s;
  wo.poll_interval = 50ms;
  wo.maintenance_interval = 0ms;
  wo.error_backoff_initial = 20ms;
  wo.error_backoff_max = 200ms;
  wo.logger = [](eoq::LogLevel level, std::string_view m) {
    static const bool verbose = std::getenv("EOQ_TEST_VERBOSE") != nullptr;
    if (verbose) fmt::print(stderr, "[{}] {}\n", eoq::to_string(level), m);
  };
  eoq::Worker worker(store, wo);
  constexpr int n = 300, kHeld = 3;
  // kHeld tasks hold their transaction open after the INSERT until the primary
  // is gone, so the crash surely cuts open handler transactions.
  std::set<eoq::TaskId> held_ids;
  std::mutex mu;
  std::map<eoq::TaskId, int> runs;
  std::atomic<int> held{0};
  Gate failed_over;
  worker.on("write", [&](eoq::TaskContext& ctx) {
    ctx.exec("INSERT INTO eoq.effects VALUES ($1, $2)", {ctx.id(), ctx.lease().token});
    recorder.add(h::effect_of(ctx.lease()));
    bool hold = false;
    {
      std::lock_guard lk(mu);
      hold = ++runs[ctx.id()] == 1 && held_ids.count(ctx.id());
    }
    if (hold) {
      ++held;
      failed_over.wait(120s);
    }
  });
  auto t = task("write");
  t.retry.max_attempts = 20;
  t.retry.initial_delay = 50ms;
  t.retry.max_delay = 200ms;
  std::vector<eoq::NewTask> batch(n, t);
  auto submitted = store.submit_batch(batch);
  for (int i = 0; i < kHeld; ++i) held_ids.insert(submitted[n / 2 + i].task.id);
  worker.start();
  REQUIRE(eventually([&] { return held == kHeld; }, 120s));
  // Completions committed on the primary up to here are on the standby too:
  // that is what synchronous replication promises, and what the history checks.
  servers.primary.stop_immediate();
  servers.standby.promote();
  failed_over.release();
  REQUIRE(eventually([&] {
    try {
      auto s = store.stats();
      return !s.empty() && s[0].succeeded == n;
    } catch (const eoq::Error&) {
      return false;
    }
  }, 180s));
  worker.stop();

  eoq::test::Admin after(servers.standby.conninfo());
  CHECK(after.count("SELECT count(*) FROM eoq.effects") == n);
  auto events = recorder.events();
  h::append(events, h::load_postgres(after.get(), "eoq", "effects"));
  auto v = h::verify_and_print("failover to a synchronous standby", events);
  INFO(v.format());
  REQUIRE(v.ok());
  CHECK(v.succeeded == n);
  CHECK(v.effects == n);
  CHECK(v.claims > n);  // the held attempts died with the primary and ran again
}

// ----------------------------------------------------------------- replica reads

TEST_CASE("with read_conninfo get, list, stats and history read the standby while claims stay on the primary",
          "[replica]") {
  Replicated servers(false);
  auto o = options(servers.primary.conninfo(), "eoq");
  eoq::PostgresStore writer(o);
  writer.migrate();
  o.read_conninfo = servers.standby.conninfo();
  eoq::PostgresStore reader(o);
  auto first = writer.submit(task("t")).task.id;
  servers.catch_up();
  REQUIRE(reader.get(first));

  // With replay paused the standby stands still, so what the reader sees shows
  // where it reads from.
  eoq::test::Admin standby(servers.standby.conninfo());
  standby.exec("SELECT pg_wal_replay_pause()");
  auto second = writer.submit(task("t")).task.id;
  CHECK(writer.get(second));
  CHECK_FALSE(reader.get(second));
  CHECK(reader.list(eoq::ListQuery{}).tasks.size() == 1);
  CHECK(reader.stats().at(0).pending == 1);
  CHECK(reader.history(second).empty());
  // Claims and settlements go to the primary: both tasks, the new one included.
  eoq::ClaimRequest claim;
  claim.owner = "w";
  claim.limit = 10;
  auto leases = reader.claim(claim);
  REQUIRE(leases.size() == 2);
  for (const auto& l : leases) reader.complete(l);
  CHECK(writer.stats().at(0).succeeded == 2);
  CHECK(reader.stats().at(0).succeeded == 0);

  standby.exec("SELECT pg_wal_replay_resume()");
  servers.catch_up();
  CHECK(reader.get(second)->status == eoq::TaskStatus::succeeded);
  CHECK(reader.stats().at(0).succeeded == 2);
  CHECK(reader.history(second).size() == 1);
}

// ------------------------------------------------------------------ reconnects

TEST_CASE("a handler transaction whose pooled connection died reconnects even when the pool has no other place",
          "[postgres][failover]") {
  // One place in the store's pool: a handler transaction that finds its
  // connection dead must give that place back before it waits for a new one.
  // Found under Patroni (ha_test): four handlers on a pool of four, cut off
  // together by a switchover, waited for each other's places for ever while
  // their heartbeats kept the tasks' leases alive.
  eoq::test::StoreOptions so;
  so.pool_size = 1;
  eoq::test::TestStore ts(eoq::test::StoreKind::postgres, so);
  auto& store = ts.get();
  store.submit(task("t"));
  store.submit(task("t"));
  eoq::ClaimRequest claim;
  claim.owner = "w";
  claim.limit = 2;
  auto leases = store.claim(claim);
  REQUIRE(leases.size() == 2);
  std::string first_pid;
  {
    auto tx = store.begin(leases[0]);
    first_pid = tx->exec("SELECT pg_backend_pid()").scalar().value();
    tx->complete();
  }
  // The connection is back in the pool, idle, and the server ends its session.
  eoq::test::Admin admin(ts.conninfo());
  admin.exec("SELECT pg_terminate_backend($1::int)", {first_pid});
  REQUIRE(eventually([&] { return admin.count("SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int", {first_pid}) == 0; }));
  auto tx = store.begin(leases[1]);  // the dead connection
  auto ran = std::async(std::launch::async, [&] { return tx->exec("SELECT pg_backend_pid()").scalar().value(); });
  if (ran.wait_for(60s) != std::future_status::ready) {
    // Waiting in the pool for good: nothing can join that thread, so end here.
    std::fprintf(stderr, "FAILED: a handler transaction waited 60 s for a place in the pool that it held itself\n");
    std::_Exit(1);
  }
  CHECK(ran.get() != first_pid);
  tx->complete();
  CHECK(store.get(leases[1].id())->status == eoq::TaskStatus::succeeded);
}

TEST_CASE("a handler transaction's first statement retries reconnecting while the server refuses connections",
          "[postgres][failover]") {
  // A failover refuses connections for seconds: the first statement's retries
  // (transient_retries) cover connecting again, not only the dead connection.
  // Its own database, so that refusing connections disturbs no other test.
  const auto db = fmt::format("eoq_reconnect_{}", ::getpid());
  eoq::test::Admin admin(eoq::test::direct_database_url());
  if (admin.count("SELECT count(*) FROM pg_database WHERE datname = $1", {db}) > 0)
    admin.exec("DROP DATABASE " + db + " WITH (FORCE)");  // a leftover of an interrupted run
  admin.exec("CREATE DATABASE " + db);
  {
    eoq::PostgresOptions o;
    o.conninfo = eoq::test::conninfo_with(eoq::test::direct_database_url(), "dbname", db);
    o.pool_size = 1;
    o.transient_retries = 8;  // 50 ms doubling: 6 s in all
    eoq::PostgresStore store(o);
    store.migrate();
    store.submit(task("t"));
    store.submit(task("t"));
    eoq::ClaimRequest claim;
    claim.owner = "w";
    claim.limit = 2;
    auto leases = store.claim(claim);
    REQUIRE(leases.size() == 2);
    std::string first_pid;
    {
      auto tx = store.begin(leases[0]);
      first_pid = tx->exec("SELECT pg_backend_pid()").scalar().value();
      tx->complete();
    }
    admin.exec("ALTER DATABASE " + db + " ALLOW_CONNECTIONS false");
    admin.exec("SELECT pg_terminate_backend($1::int)", {first_pid});
    REQUIRE(eventually([&] { return admin.count("SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int", {first_pid}) == 0; }));
    auto tx = store.begin(leases[1]);  // the dead connection, and no new one for now
    auto ran = std::async(std::launch::async, [&] { return tx->exec("SELECT 1").scalar().value(); });
    std::this_thread::sleep_for(400ms);
    admin.exec("ALTER DATABASE " + db + " ALLOW_CONNECTIONS true");
    REQUIRE(ran.wait_for(60s) == std::future_status::ready);
    CHECK(ran.get() == "1");  // it did not throw
    tx->complete();
    CHECK(store.get(leases[1].id())->status == eoq::TaskStatus::succeeded);
  }
  admin.exec("DROP DATABASE " + db + " WITH (FORCE)");
}
