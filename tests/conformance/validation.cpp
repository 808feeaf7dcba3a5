// Conformance: bad input: rejected naming the field and the rule, and nothing written; Postgres configuration errors.
#include "conformance/conformance.hpp"

// ---------------------------------------------------------------------------
// bad input

STORE_CASE("invalid tasks are rejected naming the field and nothing is written", "[validation]") {
  auto with = [](auto change) {
    NewTask t = task();
    change(t);
    return t;
  };
  auto later = now() + 1h;
  std::vector<std::pair<std::string, NewTask>> cases = {
      {"type", with([](NewTask& t) { t.type = ""; })},
      {"type", with([](NewTask& t) { t.type = "a\nb"; })},
      {"type", with([](NewTask& t) { t.type = std::string(257, 't'); })},
      {"payload", with([](NewTask& t) { t.payload = "not json"; })},
      {"payload", with([](NewTask& t) { t.payload = R"({"a": })"; })},
      {"payload", with([](NewTask& t) { t.payload = R"({"a": 1} {"b": 2})"; })},
      {"payload", with([](NewTask& t) { t.payload = ""; })},
      {"payload", with([](NewTask& t) { t.payload = "{'single': 1}"; })},
      {"payload", with([](NewTask& t) { t.payload = "[1, 2,]"; })},
      {"payload", with([](NewTask& t) { t.payload = R"({"x": 1e400})"; })},  // beyond a double
      {"payload", with([](NewTask& t) { t.payload = "-1E+309"; })},
      {"payload", with([](NewTask& t) { t.payload = R"({"x": ")" + std::string(10 << 20, 'a') + R"("})"; })},
      {"deadline", with([](NewTask& t) { t.deadline = now() - 1s; })},
      {"run_at", with([&](NewTask& t) {
         t.deadline = later;
         t.run_at = later + 1s;
       })},
      // Before PostgreSQL's earliest timestamp (4714-11-24 BC), and the earliest time a TimePoint holds.
      {"run_at", with([](NewTask& t) { t.run_at = TimePoint(std::chrono::microseconds(-210866803200000001)); })},
      {"run_at", with([](NewTask& t) { t.run_at = TimePoint::min(); })},
      {"queue", with([](NewTask& t) { t.queue = "a'b"; })},
      {"queue", with([](NewTask& t) { t.queue = "a;b"; })},
      {"queue", with([](NewTask& t) { t.queue = "a\"; DROP TABLE tasks; --"; })},
      {"queue", with([](NewTask& t) { t.queue = ""; })},
      {"queue", with([](NewTask& t) { t.queue = "has space"; })},
      {"queue", with([](NewTask& t) { t.queue = std::string(129, 'q'); })},
      {"key", with([](NewTask& t) { t.key = ""; })},
      {"key", with([](NewTask& t) { t.key = "tab\there"; })},
      {"key", with([](NewTask& t) { t.key = std::string(513, 'k'); })},
      {"tenant", with([](NewTask& t) { t.tenant = ""; })},
      {"priority", with([](NewTask& t) { t.priority = 40000; })},
      {"priority", with([](NewTask& t) { t.priority = -40000; })},
      {"retry.max_attempts", with([](NewTask& t) { t.retry.max_attempts = 0; })},
      {"retry.max_attempts", with([](NewTask& t) { t.retry.max_attempts = 1001; })},
      {"retry.initial_delay", with([](NewTask& t) { t.retry.initial_delay = -1ms; })},
      {"retry.max_delay", with([](NewTask& t) {
         t.retry.initial_delay = 10s;
         t.retry.max_delay = 1s;
       })},
      {"retry.max_delay", with([](NewTask& t) { t.retry.max_delay = std::chrono::hours(24 * 366); })},
      {"retry.jitter", with([](NewTask& t) { t.retry.jitter = 1.5; })},
      {"retry.jitter", with([](NewTask& t) { t.retry.jitter = -0.1; })},
  };
  for (const auto& [field, t] : cases) {
    INFO("expecting field " << field << ", queue '" << t.queue.substr(0, 40) << "', payload '"
                            << t.payload.substr(0, 40) << "'");
    CHECK(field_of([&] { store.submit(t); }) == field);
    std::vector<NewTask> batch = {task(), t};
    CHECK(field_of([&] { store.submit_batch(batch); }) == "tasks[1]." + field);
  }
  require_nothing_written(store);
}

STORE_CASE("a payload may be exactly max_payload_bytes long but not longer", "[validation]") {
  eoq::test::StoreOptions o;
  o.max_payload_bytes = 1000;
  TestStore small(S.kind(), o);
  NewTask ok = task();
  ok.payload = "\"" + std::string(998, 'x') + "\"";
  REQUIRE(ok.payload.size() == 1000);
  CHECK_FALSE(small->submit(ok).duplicate);
  NewTask big = ok;
  big.payload = "\"" + std::string(999, 'x') + "\"";
  CHECK(field_of([&] { small->submit(big); }) == "payload");
  CHECK(list_all(*small).size() == 1);
}

STORE_CASE("invalid claims are rejected naming the field and change nothing", "[validation]") {
  auto id = store.submit(task()).task.id;
  auto snapshot = describe(must_get(store, id));
  auto req = [](auto change) {
    eoq::ClaimRequest r;
    r.owner = "w";
    change(r);
    return r;
  };
  std::vector<std::pair<std::string, eoq::ClaimRequest>> cases = {
      {"limit", req([](eoq::ClaimRequest& r) { r.limit = 0; })},
      {"limit", req([](eoq::ClaimRequest& r) { r.limit = -1; })},
      {"limit", req([](eoq::ClaimRequest& r) { r.limit = 10001; })},
      {"lease", req([](eoq::ClaimRequest& r) { r.lease = 0ms; })},
      {"lease", req([](eoq::ClaimRequest& r) { r.lease = -5s; })},
      {"lease", req([](eoq::ClaimRequest& r) { r.lease = std::chrono::hours(24 * 7) + 1ms; })},
      {"queues", req([](eoq::ClaimRequest& r) { r.queues = {}; })},
      {"queues", req([](eoq::ClaimRequest& r) { r.queues = {"default", "x'y"}; })},
      {"queues", req([](eoq::ClaimRequest& r) { r.queues = {"a;b"}; })},
      {"owner", req([](eoq::ClaimRequest& r) { r.owner = ""; })},
  };
  for (const auto& [field, r] : cases) {
    INFO("expecting field " << field);
    CHECK(field_of([&] { store.claim(r); }) == field);
  }
  CHECK(describe(must_get(store, id)) == snapshot);
  CHECK(store.history(id).empty());
  auto longest = claim(store, {"default"}, "w", 1, std::chrono::hours(24 * 7));
  CHECK(longest.size() == 1);  // exactly 7 days is allowed
}

STORE_CASE("invalid fenced calls are rejected naming the field and change nothing", "[validation]") {
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  auto snapshot = describe(must_get(store, id));
  CHECK(field_of([&] { store.heartbeat(l, 0ms); }) == "extension");
  CHECK(field_of([&] { store.heartbeat(l, -5s); }) == "extension");
  CHECK(field_of([&] { store.heartbeat(l, std::chrono::hours(24 * 7) + 1ms); }) == "extension");
  CHECK(field_of([&] { store.progress(l, 101, ""); }) == "progress");
  CHECK(field_of([&] { store.progress(l, -1, ""); }) == "progress");
  CHECK(field_of([&] { store.progress(l, 50, std::string(257, 's')); }) == "stage");
  CHECK(field_of([&] { store.complete(l, "not json"); }) == "result");
  CHECK(field_of([&] { store.complete(l, ""); }) == "result");
  CHECK(field_of([&] { store.checkpoint(l, "s", "{bad"); }) == "checkpoint");
  eoq::Completion bad{&l, "{"};
  CHECK_THAT(field_of([&] { store.complete_batch(std::span(&bad, 1)); }), Catch::Contains("result"));
  CHECK(describe(must_get(store, id)) == snapshot);
  store.complete(l, "true");
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

STORE_CASE("invalid list and prune arguments are rejected naming the field", "[validation]") {
  store.submit(task());
  CHECK(field_of([&] { store.list(Q().limit(0)); }) == "limit");
  CHECK(field_of([&] { store.list(Q().limit(1001)); }) == "limit");
  CHECK(field_of([&] { store.prune(-1ms, 10); }) == "older_than");
  CHECK(field_of([&] { store.prune(0ms, 0); }) == "batch_size");
  CHECK(field_of([&] { store.prune(0ms, 100001); }) == "batch_size");
  CHECK(list_all(store).size() == 1);
}

// ---------------------------------------------------------------------------
// Postgres configuration errors

TEST_CASE("PostgresStore: a schema name with a quote or semicolon is rejected when the store is made",
          "[conformance][postgres][validation]") {
  auto url = eoq::test::test_database_url();
  for (const std::string& bad : std::vector<std::string>{"bad'name", "x;drop", "", "Upper", "1abc", "a\"b", "a b",
                                                          std::string(64, 'a')}) {
    INFO("schema '" << bad << "'");
    eoq::PostgresOptions o;
    o.conninfo = url;
    o.schema = bad;
    CHECK(field_of([&] { eoq::PostgresStore s(o); }) == "schema");
  }
}

TEST_CASE("PostgresStore: a broken connection string is an error naming conninfo",
          "[conformance][postgres][validation]") {
  for (const std::string& bad :
       std::vector<std::string>{"host='unterminated", "nokeyword", "postgresql://[::1", "bogus_option=1"}) {
    INFO("conninfo '" << bad << "'");
    eoq::PostgresOptions o;
    o.conninfo = bad;
    o.schema = "eoq_never_created";
    o.transient_retries = 0;
    CHECK(field_of([&] {
            eoq::PostgresStore s(o);
            s.migrate();
          }) == "conninfo");
  }
}

TEST_CASE("PostgresStore: a server that is not there is an eoq error", "[conformance][postgres][validation]") {
  eoq::PostgresOptions o;
  o.conninfo = "host=/nonexistent-eoq-socket-dir port=1 connect_timeout=2";
  o.schema = "eoq_never_created";
  o.transient_retries = 0;
  bool threw_eoq_error = false;
  try {
    eoq::PostgresStore s(o);
    s.submit(task());
  } catch (const eoq::Error&) {
    threw_eoq_error = true;
  }
  CHECK(threw_eoq_error);
}
