// Conformance: lease transactions. The handler's SQL commits with the
// settlement (Postgres), its typed parameters and reads, and what the memory
// store does instead.
#include "conformance/conformance.hpp"

// ---------------------------------------------------------------------------
// lease transactions: memory

TEST_CASE("MemoryStore: a lease transaction cannot run SQL but settles like the plain calls",
          "[conformance][memory][transaction]") {
  TestStore s(StoreKind::memory);
  auto& store = *s;
  NewTask t = task();
  t.retry.max_attempts = 3;
  t.retry.initial_delay = 0ms;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store);
  {
    auto tx = store.begin(l);
    CHECK(tx->open());
    CHECK_THROWS_AS(tx->exec("SELECT 1"), eoq::UsageError);
    tx->checkpoint("cp", R"({"n": 1})");
    CHECK(must_get(store, id).checkpoint_stage == std::optional<std::string>("cp"));
    auto o = tx->fail({"again", false});
    CHECK(o.status == TaskStatus::pending);
  }
  std::this_thread::sleep_for(20ms);
  auto l2 = claim_one(store);
  auto tx = store.begin(l2);
  tx->complete(R"({"ok": 1})");
  CHECK_FALSE(tx->open());
  auto done = must_get(store, id);
  CHECK(done.status == TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"({"ok": 1})"));
  auto stale = store.begin(l2);
  CHECK_THROWS_AS(stale->complete("1"), eoq::LeaseLost);
}

// ---------------------------------------------------------------------------
// lease transactions: Postgres (the handler's SQL commits with the settlement)

namespace {

struct PgEffects {
  TestStore s{StoreKind::postgres};
  eoq::test::Admin admin{s.conninfo()};
  std::string table;
  PgEffects() : table(fmt::format("\"{}\".effects", s.schema())) {
    admin.exec(fmt::format("CREATE TABLE {} (task_id bigint NOT NULL, note text)", table));
  }
  long long rows(const std::string& note) {
    return admin.count(fmt::format("SELECT count(*) FROM {} WHERE note = $1", table), {note});
  }
  std::string insert() const { return fmt::format("INSERT INTO {} (task_id, note) VALUES ($1, $2)", table); }
};

}  // namespace

TEST_CASE("PostgresStore: a handler's SQL commits together with the task's completion",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  auto tx = store.begin(l);
  CHECK(tx->open());
  auto ins = tx->exec(fx.insert(), {std::to_string(id), "done"});
  CHECK(ins.affected == 1);
  auto sel = tx->exec(fmt::format("SELECT task_id, note FROM {} WHERE note = $1", fx.table), {"done"});
  REQUIRE(sel.size() == 1);
  CHECK(sel.rows[0][0] == std::optional<std::string>(std::to_string(id)));
  CHECK(fx.rows("done") == 0);  // not visible outside before the commit
  tx->complete(R"({"ok": true})");
  CHECK_FALSE(tx->open());
  CHECK(fx.rows("done") == 1);
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

TEST_CASE("PostgresStore: with a stale lease the completion throws LeaseLost and the handler's SQL is rolled back",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  NewTask t = task();
  t.retry.max_attempts = 5;
  auto id = store.submit(t).task.id;
  auto a = claim_one(store, "worker-a", 200ms);
  std::this_thread::sleep_for(300ms);
  auto b = claim_one(store, "worker-b", 30s);
  REQUIRE(b.id() == id);
  auto tx = store.begin(a);
  tx->exec(fx.insert(), {std::to_string(id), "by-a"});
  CHECK(outcome_of([&] { tx->complete(R"({"by": "a"})"); }) == "LeaseLost");
  CHECK_FALSE(tx->open());
  CHECK(fx.rows("by-a") == 0);
  CHECK(must_get(store, id).status == TaskStatus::running);

  auto txb = store.begin(b);
  txb->exec(fx.insert(), {std::to_string(id), "by-b"});
  txb->complete(R"({"by": "b"})");
  CHECK(fx.rows("by-b") == 1);
  auto done = must_get(store, id);
  CHECK(done.status == TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"({"by": "b"})"));
}

TEST_CASE("PostgresStore: destroying an unsettled lease transaction rolls its SQL back",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  {
    auto tx = store.begin(l);
    tx->exec(fx.insert(), {std::to_string(id), "abandoned"});
  }
  CHECK(fx.rows("abandoned") == 0);
  auto got = must_get(store, id);
  CHECK(got.status == TaskStatus::running);
  CHECK(got.version == l.token);
  store.complete(l);
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

TEST_CASE("PostgresStore: failing through the transaction keeps the handler's writes",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  auto tx = store.begin(l);
  tx->exec(fx.insert(), {std::to_string(id), "partial"});
  auto o = tx->fail({"later", false});
  CHECK(o.status == TaskStatus::pending);
  CHECK(fx.rows("partial") == 1);
  CHECK(must_get(store, id).status == TaskStatus::pending);
}

TEST_CASE("PostgresStore: a checkpoint through the transaction commits the writes so far and continues",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  {
    auto tx = store.begin(l);
    tx->exec(fx.insert(), {std::to_string(id), "step-1"});
    tx->checkpoint("step-1", R"({"n": 1})");
    CHECK(fx.rows("step-1") == 1);
    tx->exec(fx.insert(), {std::to_string(id), "step-2"});
  }
  CHECK(fx.rows("step-2") == 0);
  auto got = must_get(store, id);
  CHECK(got.checkpoint_stage == std::optional<std::string>("step-1"));
  CHECK(got.status == TaskStatus::running);
}

TEST_CASE("PostgresStore: a failing statement in a lease transaction throws and the completion cannot commit it",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  auto tx = store.begin(l);
  tx->exec(fx.insert(), {std::to_string(id), "before-error"});
  CHECK_THROWS_AS(tx->exec("SELECT * FROM no_such_table_anywhere"), eoq::DatabaseError);
  tx.reset();
  CHECK(fx.rows("before-error") == 0);
  store.complete(l);
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

// ---------------------------------------------------------------------------
// Typed handler SQL

namespace {
template <class F>
std::string usage_error_of(F&& f) {
  try {
    f();
  } catch (const eoq::UsageError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not UsageError: ") + e.what();
  }
  return "no exception";
}
}  // namespace

static_assert(!std::is_constructible_v<eoq::SqlParam, char>, "a char is neither a number nor a string");
static_assert(std::is_constructible_v<eoq::SqlParam, std::optional<std::string>>, "the string form still works");

TEST_CASE("Rows: typed reads convert text and name the column and the type on a mismatch", "[conformance][rows]") {
  eoq::Rows rows;
  rows.columns = {"id", "name", "ratio", "ok", "missing", "big"};
  rows.rows = {{"42", "ann", "0.25", "t", std::nullopt, "100000"}};
  auto r = rows[0];
  CHECK(r.get<std::int64_t>(0) == 42);
  CHECK(r.get<int>("id") == 42);
  CHECK(r.get<std::string>("name") == "ann");
  CHECK(r.get<std::string_view>(1) == "ann");
  CHECK(r.get<double>("ratio") == 0.25);
  CHECK(r.get<bool>("ok"));
  CHECK(r.get<std::optional<std::int64_t>>("missing") == std::nullopt);
  CHECK(r.get<std::optional<std::int64_t>>("id") == std::optional<std::int64_t>(42));
  CHECK(r.is_null(4));

  CHECK(usage_error_of([&] { r.get<std::int64_t>("name"); }) ==
        R"(column "name" (1) read as std::int64_t: "ann" is not an integer)");
  CHECK(usage_error_of([&] { r.get<std::int64_t>("missing"); }) ==
        R"(column "missing" (4) read as std::int64_t: is NULL (read it as a std::optional))");
  CHECK(usage_error_of([&] { r.get<std::int16_t>("big"); }) ==
        R"(column "big" (5) read as std::int16_t: "100000" is out of range)");
  CHECK(usage_error_of([&] { r.get<int>("ratio"); }).find("is not an integer") != std::string::npos);
  CHECK(usage_error_of([&] { r.get<bool>("name"); }).find("is not a boolean") != std::string::npos);
  CHECK(usage_error_of([&] { r.get<double>("name"); }).find("read as double") != std::string::npos);
  CHECK(usage_error_of([&] { r.get<int>("nope"); }).find(R"(column "nope" is not in the result)") !=
        std::string::npos);
  CHECK(usage_error_of([&] { r.get<int>(6); }).find("column 6 does not exist") != std::string::npos);
  CHECK(usage_error_of([&] { rows[1]; }).find("row 1 does not exist") != std::string::npos);
}

TEST_CASE("SqlParam: numbers, bools and NULL become the text Postgres parses", "[conformance][rows]") {
  auto text = [](const eoq::SqlParam& p) { return p.text().value_or("NULL"); };
  CHECK(text(42) == "42");
  CHECK(text(std::int64_t{-9007199254740993}) == "-9007199254740993");
  CHECK(text(std::uint64_t{18446744073709551615u}) == "18446744073709551615");
  CHECK(text(1.5) == "1.5");
  CHECK(text(0.1) == "0.1");
  CHECK(text(0.1f) == "0.1");
  CHECK(text(std::numeric_limits<double>::quiet_NaN()) == "NaN");
  CHECK(text(-std::numeric_limits<double>::infinity()) == "-Infinity");
  CHECK(text(true) == "true");
  CHECK(text("x") == "x");
  CHECK(text(std::string_view("sv")) == "sv");
  CHECK(text(std::nullopt) == "NULL");
  CHECK(text(std::optional<int>()) == "NULL");
  CHECK(text(std::optional<int>(7)) == "7");
  CHECK(text({}) == "NULL");
  eoq::Params p{42, "x", 1.5, true, std::nullopt};
  CHECK(p.size() == 5);
}

TEST_CASE("PostgresStore: a handler's SQL takes typed parameters and gives typed reads",
          "[conformance][postgres][transaction][rows]") {
  TestStore S(StoreKind::postgres);
  auto& store = *S;
  store.submit(task());
  auto l = claim_one(store);
  auto tx = store.begin(l);
  auto rows = tx->exec("SELECT $1::bigint AS i, $2::text AS s, $3::float8 AS d, $4::boolean AS b, $5::int AS n, "
                       "$6::int2 AS small, $7::float8 AS nan, $8::float8 AS inf, $9::real AS f",
                       {std::int64_t{9007199254740993}, "x", 0.1, true, std::nullopt, std::optional<int>(7),
                        std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(), 0.1f});
  auto r = rows[0];
  CHECK(r.get<std::int64_t>("i") == 9007199254740993);
  CHECK(r.get<std::string>("s") == "x");
  CHECK(r.get<double>("d") == 0.1);
  CHECK(r.get<bool>("b"));
  CHECK(r.get<std::optional<int>>("n") == std::nullopt);
  CHECK(r.get<std::int16_t>("small") == 7);
  CHECK(std::isnan(r.get<double>("nan")));
  CHECK(r.get<double>("inf") == std::numeric_limits<double>::infinity());
  CHECK(r.get<float>("f") == 0.1f);
  CHECK(usage_error_of([&] { r.get<std::int64_t>("s"); }) == R"(column "s" (1) read as std::int64_t: "x" is not an integer)");
  // The string form still works, NULL as an empty optional included.
  auto old = tx->exec("SELECT $1::int + 1, $2::text IS NULL", {std::to_string(41), std::optional<std::string>()});
  CHECK(old.rows[0][0] == std::optional<std::string>("42"));
  CHECK(old[0].get<bool>(1));
  CHECK(tx->exec("SELECT count(*) FROM generate_series(1, $1)", {5}).scalar<std::int64_t>() == 5);
  tx->complete();
}

// ---------------------------------------------------------------------------
// complete_all: many leases of one worker settle in one transaction, or none does

namespace {

// Three tasks claimed by "w1", in id order, and (Postgres) an effects table the
// transaction writes one row per task into.
struct ThreeLeases {
  std::vector<eoq::TaskId> ids;
  std::vector<Lease> leases;
  std::optional<eoq::test::Admin> admin;
  std::string table;

  // `short_at`: the lease of that task is claimed for 200 ms, the others for 30 s.
  ThreeLeases(TestStore& S, eoq::TaskStore& store, std::optional<int> short_at = std::nullopt) {
    for (int i = 0; i < 3; ++i) {
      NewTask t = task();
      t.retry.max_attempts = 5;
      ids.push_back(store.submit(t).task.id);
    }
    for (int i = 0; i < 3; ++i) leases.push_back(claim_one(store, "w1", short_at == i ? Millis(200) : Millis(30s)));
    for (int i = 0; i < 3; ++i) REQUIRE(leases[i].id() == ids[i]);
    if (S.has_sql()) {
      admin.emplace(S.conninfo());
      table = fmt::format("\"{}\".effects", S.schema());
      admin->exec(fmt::format("CREATE TABLE {} (task_id bigint PRIMARY KEY)", table));
    }
  }
  // The handler's writes: an effect row per task (Postgres) and a keyed submit (both stores).
  void write(eoq::LeaseTransaction& tx) {
    if (admin)
      for (auto id : ids) CHECK(tx.exec(fmt::format("INSERT INTO {} (task_id) VALUES ($1)", table), {id}).affected == 1);
    auto child = tx.submit(keyed("child-of-the-batch"));
    CHECK_FALSE(child.duplicate);
  }
  long long effect_rows() { return admin ? admin->count(fmt::format("SELECT count(*) FROM {}", table)) : 0; }
  std::vector<std::string> snapshot(eoq::TaskStore& store) {
    std::vector<std::string> out;
    for (auto id : ids) out.push_back(describe(must_get(store, id)));
    return out;
  }
};

std::vector<eoq::Completion> completions_of(const std::vector<Lease>& leases) {
  std::vector<eoq::Completion> out;
  for (const auto& l : leases) out.push_back({&l, fmt::format(R"({{"task": {}}})", l.id())});
  return out;
}

}  // namespace

STORE_CASE("complete_all settles every lease with the transaction's writes in one commit", "[transaction][complete_all]") {
  ThreeLeases fx(S, store);
  auto tx = store.begin(fx.leases[0]);
  fx.write(*tx);
  CHECK_FALSE(store.find("default", "child-of-the-batch"));  // not before the commit
  auto completions = completions_of(fx.leases);
  tx->complete_all(completions);
  CHECK_FALSE(tx->open());
  for (std::size_t i = 0; i < fx.ids.size(); ++i) {
    auto t = must_get(store, fx.ids[i]);
    INFO(describe(t));
    CHECK(t.status == TaskStatus::succeeded);
    CHECK(t.result == std::optional<std::string>(fmt::format(R"({{"task": {}}})", fx.ids[i])));
    CHECK(t.attempts == 1);
    check_terminal_lease_fields(t, std::string("w1"));
  }
  auto child = store.find("default", "child-of-the-batch");
  REQUIRE(child);
  CHECK(child->status == TaskStatus::pending);
  if (S.has_sql()) CHECK(fx.effect_rows() == 3);
  // Settled: the leases are spent.
  for (const auto& l : fx.leases) CHECK(outcome_of([&] { store.complete(l); }) == "LeaseLost");
}

STORE_CASE("complete_all may settle leases other than the transaction's own", "[transaction][complete_all]") {
  ThreeLeases fx(S, store);
  auto tx = store.begin(fx.leases[0]);
  fx.write(*tx);
  std::vector<Lease> others{fx.leases[1], fx.leases[2]};
  auto completions = completions_of(others);
  tx->complete_all(completions);
  CHECK_FALSE(tx->open());
  CHECK(must_get(store, fx.ids[1]).status == TaskStatus::succeeded);
  CHECK(must_get(store, fx.ids[2]).status == TaskStatus::succeeded);
  auto own = must_get(store, fx.ids[0]);
  CHECK(own.status == TaskStatus::running);
  CHECK(own.version == fx.leases[0].token);
  CHECK(store.find("default", "child-of-the-batch"));
  if (S.has_sql()) CHECK(fx.effect_rows() == 3);
  store.complete(fx.leases[0]);  // its lease is still good
  CHECK(must_get(store, fx.ids[0]).status == TaskStatus::succeeded);
}

STORE_CASE("complete_all with one stale lease throws LeaseLost naming its task and changes nothing",
           "[transaction][complete_all]") {
  const int stale_at = GENERATE(0, 1, 2);  // 0: the transaction's own lease
  const bool reclaimed = GENERATE(true, false);  // taken over after expiry, or released
  INFO("stale lease: task " << stale_at << (reclaimed ? ", claimed again after expiry" : ", released"));
  ThreeLeases fx(S, store, reclaimed ? std::optional<int>(stale_at) : std::nullopt);
  std::optional<Lease> thief;
  if (reclaimed) {
    std::this_thread::sleep_for(300ms);
    thief = claim_one(store, "w2", 30s);
    REQUIRE(thief->id() == fx.ids[stale_at]);
  } else {
    store.release(fx.leases[stale_at]);
  }
  auto tx = store.begin(fx.leases[0]);
  fx.write(*tx);
  const auto before = fx.snapshot(store);
  auto completions = completions_of(fx.leases);
  std::string outcome = "ok";
  try {
    tx->complete_all(completions);
  } catch (const eoq::LeaseLost& e) {
    outcome = "LeaseLost on task " + std::to_string(e.task_id());
  } catch (const std::exception& e) {
    outcome = std::string("other: ") + e.what();
  }
  CHECK(outcome == "LeaseLost on task " + std::to_string(fx.ids[stale_at]));
  CHECK_FALSE(tx->open());
  tx.reset();
  // Nothing settled, nothing the transaction wrote or submitted is there.
  CHECK(fx.snapshot(store) == before);
  CHECK_FALSE(store.find("default", "child-of-the-batch"));
  if (S.has_sql()) CHECK(fx.effect_rows() == 0);
  // The others are still running under their leases, which still settle.
  std::vector<eoq::Completion> rest;
  for (int i = 0; i < 3; ++i) {
    if (i == stale_at) continue;
    auto t = must_get(store, fx.ids[i]);
    CHECK(t.status == TaskStatus::running);
    CHECK(t.version == fx.leases[i].token);
    CHECK(t.lease_owner == std::optional<std::string>("w1"));
    rest.push_back({&fx.leases[i], "null"});
  }
  CHECK(store.complete_batch(rest) == std::vector<bool>{true, true});
  auto stale = must_get(store, fx.ids[stale_at]);
  if (reclaimed) {
    CHECK(stale.status == TaskStatus::running);
    CHECK(stale.lease_owner == std::optional<std::string>("w2"));
    store.complete(*thief, R"("w2")");
    CHECK(must_get(store, fx.ids[stale_at]).result == std::optional<std::string>(R"("w2")"));
  } else {
    CHECK(stale.status == TaskStatus::pending);
  }
}

STORE_CASE("complete_all refuses bad input naming the field and changes nothing", "[transaction][complete_all]") {
  ThreeLeases fx(S, store);
  auto tx = store.begin(fx.leases[0]);
  fx.write(*tx);
  const auto before = fx.snapshot(store);
  auto check_unchanged = [&] {
    CHECK(fx.snapshot(store) == before);
    CHECK_FALSE(store.find("default", "child-of-the-batch"));
    if (S.has_sql()) CHECK(fx.effect_rows() == 0);
  };

  CHECK(field_of([&] { tx->complete_all({}); }) == "completions");
  check_unchanged();
  std::vector<eoq::Completion> too_many(10001, eoq::Completion{&fx.leases[0], "null"});
  CHECK(field_of([&] { tx->complete_all(too_many); }) == "completions");
  check_unchanged();
  auto null_lease = completions_of(fx.leases);
  null_lease[1].lease = nullptr;
  CHECK(field_of([&] { tx->complete_all(null_lease); }) == "completions[1].lease");
  check_unchanged();
  auto bad_json = completions_of(fx.leases);
  bad_json[2].result = "{not json";
  CHECK(field_of([&] { tx->complete_all(bad_json); }) == "completions[2].result");
  check_unchanged();
  auto empty_result = completions_of(fx.leases);
  empty_result[0].result = "";
  CHECK(field_of([&] { tx->complete_all(empty_result); }) == "completions[0].result");
  check_unchanged();
  // One completion names its field as the span's, not as complete()'s "result".
  std::vector<eoq::Completion> one{eoq::Completion{&fx.leases[0], "{not json"}};
  CHECK(field_of([&] { tx->complete_all(one); }) == "completions[0].result");
  check_unchanged();

  tx.reset();
  check_unchanged();
  for (std::size_t i = 0; i < fx.ids.size(); ++i) CHECK(must_get(store, fx.ids[i]).version == fx.leases[i].token);
}
