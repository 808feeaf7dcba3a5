// Conformance: snooze, a holder putting its task off ("run me again after d").
#include "conformance/conformance.hpp"

STORE_CASE("snooze puts the task off by the store's clock, recorded as snoozed, and does not count the attempt",
           "[snooze]") {
  NewTask t = task();
  t.retry.max_attempts = 1;  // a snooze on the last attempt must still run again
  auto id = store.submit(t).task.id;
  auto l = claim_one(store);
  REQUIRE(l.attempt() == 1);
  store.progress(l, 40, "half");
  store.checkpoint(l, "cp", "[1]");
  const auto before = store.now();
  auto out = store.snooze(l, 400ms);
  const auto after = store.now();

  CHECK(out.status == TaskStatus::pending);
  REQUIRE(out.retry_at.has_value());
  auto p = must_get(store, id);
  CHECK(p.status == TaskStatus::pending);
  CHECK(p.attempts == 0);
  CHECK(p.retry.max_attempts == 1);
  CHECK(p.version == l.token + 1);
  CHECK(p.run_at == *out.retry_at);
  CHECK(p.run_at >= before + 400ms);
  CHECK(p.run_at <= after + 400ms);
  CHECK_FALSE(p.lease_owner);
  CHECK_FALSE(p.lease_expires_at);
  CHECK_FALSE(p.finished_at);
  CHECK_FALSE(p.last_error);
  CHECK(p.progress == 40);
  CHECK(p.checkpoint_stage == std::optional<std::string>("cp"));
  CHECK(p.checkpoint == std::optional<std::string>("[1]"));
  auto h = store.history(id);
  REQUIRE(h.size() == 1);
  CHECK(h[0].number == 1);
  CHECK(h[0].outcome == "snoozed");
  CHECK(h[0].owner == "w1");
  CHECK(h[0].finished_at.has_value());
  CHECK_FALSE(h[0].error.has_value());

  CHECK(claim(store, {"default"}, "w2", 10).empty());  // not due yet
  std::this_thread::sleep_until(now() + (p.run_at - store.now()) + kSlack);
  auto again = claim_one(store, "w2");
  CHECK(again.id() == id);
  CHECK(again.attempt() == 1);
  CHECK(again.task.checkpoint == std::optional<std::string>("[1]"));
  store.complete(again, R"("done")");
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
  h = store.history(id);
  REQUIRE(h.size() == 2);
  CHECK(h[0].outcome == "snoozed");
  CHECK(h[1].number == 1);
  CHECK(h[1].owner == "w2");
  CHECK(h[1].outcome == "succeeded");
}

STORE_CASE("snoozed attempts share their number with the attempt after them, in order, whatever ends that one",
           "[snooze][retry]") {
  NewTask t = task();
  t.retry.max_attempts = 2;
  t.retry.initial_delay = 0ms;
  t.retry.max_delay = 0ms;
  auto id = store.submit(t).task.id;
  store.snooze(claim_one(store, "a"), 0ms);
  store.snooze(claim_one(store, "b"), 0ms);
  auto l = claim_one(store, "c");
  CHECK(l.attempt() == 1);
  CHECK(store.fail(l, {"boom", false}).status == TaskStatus::pending);
  store.snooze(claim_one(store, "d"), 0ms);
  l = claim_one(store, "e");
  CHECK(l.attempt() == 2);
  CHECK(store.fail(l, {"boom again", false}).status == TaskStatus::failed);

  auto h = store.history(id);
  std::vector<std::tuple<int, std::string, std::string>> got;
  for (const auto& a : h) got.emplace_back(a.number, a.owner, a.outcome);
  CHECK(got == std::vector<std::tuple<int, std::string, std::string>>{
                   {1, "a", "snoozed"}, {1, "b", "snoozed"}, {1, "c", "retry"}, {2, "d", "snoozed"}, {2, "e", "failed"}});
  CHECK(must_get(store, id).attempts == 2);
}

STORE_CASE("a snooze with no delay makes the task claimable at once", "[snooze]") {
  auto id = store.submit(task()).task.id;
  auto out = store.snooze(claim_one(store), 0ms);
  CHECK(out.status == TaskStatus::pending);
  auto l = claim_one(store, "w2");
  CHECK(l.id() == id);
  CHECK(l.attempt() == 1);
}

STORE_CASE("a snooze of a task with a cancel request ends it cancelled, as release does", "[snooze][cancel]") {
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  REQUIRE(store.cancel(id) == eoq::CancelOutcome::cancel_requested);
  auto out = store.snooze(l, 10s);
  CHECK(out.status == TaskStatus::cancelled);
  CHECK_FALSE(out.retry_at.has_value());
  auto c = must_get(store, id);
  CHECK(c.status == TaskStatus::cancelled);
  CHECK(c.version == l.token + 1);
  CHECK(c.finished_at.has_value());
  CHECK_FALSE(c.last_error.has_value());
  check_terminal_lease_fields(c, "w1");
  auto h = store.history(id);
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "cancelled");
  CHECK(stats_of(store, "default").cancelled_total == 1);
  CHECK(outcome_of([&] { store.snooze(l, 0ms); }) == "LeaseLost");
  CHECK(claim(store, {"default"}, "w2", 10).empty());
}

STORE_CASE("a snooze under a stale lease throws LeaseLost and changes nothing", "[snooze][fencing]") {
  SECTION("a lease reclaimed by another worker") {
    NewTask t = task();
    t.retry.max_attempts = 5;
    auto id = store.submit(t).task.id;
    auto old = claim_one(store, "w1", 100ms);
    std::this_thread::sleep_for(150ms);
    auto current = claim_one(store, "w2");
    auto before = describe(must_get(store, id));
    CHECK(outcome_of([&] { store.snooze(old, 1s); }) == "LeaseLost");
    CHECK(outcome_of([&] { store.snooze(stale_copy(current), 1s); }) == "LeaseLost");
    CHECK(describe(must_get(store, id)) == before);
    store.complete(current);
  }
  SECTION("a lease whose task was settled, or snoozed already") {
    auto id = store.submit(task()).task.id;
    auto l = claim_one(store);
    store.snooze(l, 1h);
    auto before = describe(must_get(store, id));
    CHECK(outcome_of([&] { store.snooze(l, 0ms); }) == "LeaseLost");
    CHECK(outcome_of([&] { store.complete(l); }) == "LeaseLost");
    CHECK(describe(must_get(store, id)) == before);
    CHECK(store.history(id).size() == 1);
  }
}

STORE_CASE("a snooze refuses a negative delay or one over 365 days, naming delay, and changes nothing",
           "[snooze][validation]") {
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  auto before = describe(must_get(store, id));
  CHECK(field_of([&] { store.snooze(l, -1ms); }) == "delay");
  CHECK(field_of([&] { store.snooze(l, std::chrono::hours(24 * 365) + 1ms); }) == "delay");
  CHECK(describe(must_get(store, id)) == before);
  CHECK(store.history(id).size() == 1);  // the running attempt only
  auto out = store.snooze(l, std::chrono::hours(24 * 365));
  CHECK(out.status == TaskStatus::pending);
}
