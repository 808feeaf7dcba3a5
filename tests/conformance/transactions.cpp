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
