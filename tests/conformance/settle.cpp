// Conformance: settling under a lease. Fencing, heartbeats, progress,
// checkpoints, release, completion, terminal states, expiry of a held lease.
#include "conformance/conformance.hpp"

// ---------------------------------------------------------------------------
// fencing

STORE_CASE("a worker whose lease ran out and was reclaimed can no longer change the task", "[fencing]") {
  NewTask t = task();
  t.retry.max_attempts = 5;
  auto id = store.submit(t).task.id;
  auto a = claim_one(store, "worker-a", 200ms);
  std::this_thread::sleep_for(300ms);
  auto b = claim_one(store, "worker-b", 30s);
  CHECK(b.id() == id);
  CHECK(b.task.attempts == 2);
  CHECK(b.token > a.token);
  store.progress(b, 30, "b-was-here");
  auto snapshot = describe(must_get(store, id));

  CHECK(outcome_of([&] { store.complete(a, R"({"by": "a"})"); }) == "LeaseLost");
  CHECK(describe(must_get(store, id)) == snapshot);
  CHECK(outcome_of([&] { store.fail(a, {"a failed", false}); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.fail(a, {"a failed", true}); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.heartbeat(a, 60s); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.progress(a, 99, "a-stage"); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.checkpoint(a, "a-cp", R"({"a": 1})"); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.release(a); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.begin(a)->complete(R"({"by": "a"})"); }) == "LeaseLost");
  eoq::Completion ca{&a, R"({"by": "a"})"};
  CHECK(store.complete_batch(std::span(&ca, 1)) == std::vector<bool>{false});
  CHECK(describe(must_get(store, id)) == snapshot);

  store.complete(b, R"({"by": "b"})");
  auto done = must_get(store, id);
  CHECK(done.status == TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"({"by": "b"})"));
  auto h = store.history(id);
  REQUIRE(h.size() == 2);
  CHECK(h[0].owner == "worker-a");
  CHECK(h[0].outcome == "lease_expired");
  CHECK(h[0].error == std::optional<std::string>("lease expired"));
  CHECK(h[1].owner == "worker-b");
  CHECK(h[1].outcome == "succeeded");
  CHECK(outcome_of([&] { store.complete(a); }) == "LeaseLost");
}

STORE_CASE("a lease past its expiry that nobody reclaimed still settles the task", "[fencing]") {
  store.submit(task());
  auto l = claim_one(store, "w", 100ms);
  std::this_thread::sleep_for(200ms);
  CHECK(store.heartbeat(l, 5s).expires_at > now());
  store.complete(l, "42");
  CHECK(must_get(store, l.id()).status == TaskStatus::succeeded);
}

STORE_CASE("a lease past its expiry with attempts left survives maintain until someone reclaims it", "[fencing]") {
  NewTask t = task();
  t.retry.max_attempts = 3;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store, "w", 100ms);
  std::this_thread::sleep_for(200ms);
  auto report = store.maintain();
  CHECK(report.expired == 0);
  auto got = must_get(store, id);
  CHECK(got.status == TaskStatus::running);
  CHECK(got.version == l.token);
  store.complete(l, "1");
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

STORE_CASE("a settled lease can settle nothing again", "[fencing]") {
  store.submit(task());
  auto l = claim_one(store);
  store.complete(l, "1");
  auto snapshot = describe(must_get(store, l.id()));
  CHECK(outcome_of([&] { store.complete(l, "2"); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.fail(l, {"x", false}); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.heartbeat(l, 1s); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.progress(l, 1, ""); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.checkpoint(l, "s", "{}"); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.release(l); }) == "LeaseLost");
  CHECK(describe(must_get(store, l.id())) == snapshot);
}

STORE_CASE("a lease with the wrong token or an unknown task is lost", "[fencing]") {
  store.submit(task());
  auto l = claim_one(store);
  auto snapshot = describe(must_get(store, l.id()));
  auto wrong = stale_copy(l);
  CHECK(outcome_of([&] { store.complete(wrong); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.heartbeat(wrong, 1s); }) == "LeaseLost");
  auto older = l;
  older.token -= 1;
  CHECK(outcome_of([&] { store.fail(older, {"x", true}); }) == "LeaseLost");
  auto unknown = l;
  unknown.task.id = l.id() + 1000000;
  CHECK(outcome_of([&] { store.complete(unknown); }) == "LeaseLost");
  CHECK(describe(must_get(store, l.id())) == snapshot);
  store.complete(l);
  CHECK(must_get(store, l.id()).status == TaskStatus::succeeded);
}

// ---------------------------------------------------------------------------
// terminal states

STORE_CASE("terminal tasks never change again", "[terminal]") {
  store.submit(keyed("s"));
  auto ls = claim_one(store);
  store.complete(ls, R"({"r": 1})");
  store.submit(keyed("f"));
  auto lf = claim_one(store);
  store.fail(lf, {"boom", true});
  auto c = store.submit(keyed("c")).task.id;
  store.cancel(c);
  NewTask e = keyed("e");
  e.deadline = now() + 200ms;
  auto eid = store.submit(e).task.id;
  std::this_thread::sleep_until(*e.deadline + 50ms);
  store.maintain();
  REQUIRE(must_get(store, eid).status == TaskStatus::expired);

  std::vector<eoq::TaskId> ids = {ls.id(), lf.id(), c, eid};
  check_terminal_lease_fields(must_get(store, ls.id()), "w1");
  check_terminal_lease_fields(must_get(store, lf.id()), "w1");
  check_terminal_lease_fields(must_get(store, c), std::nullopt);
  check_terminal_lease_fields(must_get(store, eid), std::nullopt);
  std::vector<std::string> before;
  for (auto id : ids) before.push_back(describe(must_get(store, id)));

  for (auto id : ids) CHECK(store.cancel(id) == eoq::CancelOutcome::already_finished);
  CHECK(claim(store, {"default"}, "w", 100).empty());
  store.maintain();
  for (const char* k : {"s", "f", "c", "e"}) {
    NewTask again = keyed(k, "default", R"({"x": 1})");
    again.key_reuse = eoq::KeyReuse::lenient;
    CHECK(store.submit(again).duplicate);
  }
  for (auto* l : {&ls, &lf}) {
    CHECK(outcome_of([&] { store.complete(*l, "2"); }) == "LeaseLost");
    CHECK(outcome_of([&] { store.fail(*l, {"x", false}); }) == "LeaseLost");
    CHECK(outcome_of([&] { store.heartbeat(*l, 1s); }) == "LeaseLost");
    CHECK(outcome_of([&] { store.progress(*l, 5, "x"); }) == "LeaseLost");
    CHECK(outcome_of([&] { store.checkpoint(*l, "x", "{}"); }) == "LeaseLost");
    CHECK(outcome_of([&] { store.release(*l); }) == "LeaseLost");
  }
  for (std::size_t i = 0; i < ids.size(); ++i) CHECK(describe(must_get(store, ids[i])) == before[i]);
}

// ---------------------------------------------------------------------------
// heartbeat, progress, checkpoint, release

STORE_CASE("a heartbeat extends the lease without changing the version", "[lease]") {
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store, "w", 300ms);
  auto before = now();
  auto hb = store.heartbeat(l, 60s);
  auto after = now();
  CHECK_FALSE(hb.cancel_requested);
  CHECK(hb.expires_at >= before + 60s - kSlack);
  CHECK(hb.expires_at <= after + 60s + kSlack);
  auto got = must_get(store, id);
  CHECK(got.lease_expires_at == std::optional<TimePoint>(hb.expires_at));
  CHECK(got.version == l.token);
  std::this_thread::sleep_for(400ms);  // past the original lease
  CHECK(claim(store, {"default"}, "w2", 10).empty());
  store.complete(l, "1");
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

STORE_CASE("progress and stage are stored without changing the version", "[lease]") {
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  store.progress(l, 40, "downloading");
  auto got = must_get(store, id);
  CHECK(got.progress == 40);
  CHECK(got.stage == "downloading");
  CHECK(got.version == l.token);
  store.progress(l, 100, "");
  got = must_get(store, id);
  CHECK(got.progress == 100);
  CHECK(got.stage.empty());
  store.progress(l, 0, std::string(256, 's'));
  CHECK(must_get(store, id).stage.size() == 256);
  store.complete(l);
}

STORE_CASE("a checkpoint survives retries and lease loss and is handed back on the next claim", "[checkpoint]") {
  NewTask t = task();
  t.retry = {.max_attempts = 5, .backoff = eoq::Backoff::fixed, .initial_delay = 0ms, .max_delay = 0ms,
             .jitter = 0};
  auto id = store.submit(t).task.id;
  auto l1 = claim_one(store);
  CHECK_FALSE(l1.task.checkpoint_stage);
  store.checkpoint(l1, "step-1", R"({"done": 1})");
  auto got = must_get(store, id);
  CHECK(got.checkpoint_stage == std::optional<std::string>("step-1"));
  CHECK(got.checkpoint == std::optional<std::string>(R"({"done": 1})"));
  CHECK(got.version == l1.token);
  store.fail(l1, {"retry me", false});

  auto l2 = claim_one(store, "w2", 100ms);
  CHECK(l2.task.checkpoint_stage == std::optional<std::string>("step-1"));
  CHECK(l2.task.checkpoint == std::optional<std::string>(R"({"done": 1})"));
  store.checkpoint(l2, "step-2", R"({"done": 2})");
  std::this_thread::sleep_for(200ms);  // l2's lease lapses

  auto l3 = claim_one(store, "w3");
  CHECK(l3.task.attempts == 3);
  CHECK(l3.task.checkpoint_stage == std::optional<std::string>("step-2"));
  CHECK(l3.task.checkpoint == std::optional<std::string>(R"({"done": 2})"));
  store.release(l3);
  auto l4 = claim_one(store, "w4");
  CHECK(l4.task.checkpoint_stage == std::optional<std::string>("step-2"));
  store.complete(l4);
}

STORE_CASE("release gives the task back at once without counting the attempt", "[release]") {
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  store.progress(l, 40, "half");
  store.checkpoint(l, "cp", "[1]");
  auto before = now();
  store.release(l);
  auto p = must_get(store, id);
  CHECK(p.status == TaskStatus::pending);
  CHECK(p.attempts == 0);
  CHECK(p.version == l.token + 1);
  CHECK(p.run_at <= now() + kSlack);
  CHECK(p.run_at >= before - 1s);
  CHECK_FALSE(p.lease_owner);
  CHECK_FALSE(p.lease_expires_at);
  CHECK(p.progress == 40);
  CHECK(p.stage == "half");
  CHECK(p.checkpoint_stage == std::optional<std::string>("cp"));
  CHECK(p.checkpoint == std::optional<std::string>("[1]"));
  CHECK_FALSE(p.finished_at);
  CHECK(store.history(id).empty());
  CHECK(outcome_of([&] { store.release(l); }) == "LeaseLost");
  auto again = claim_one(store);
  CHECK(again.id() == id);
  CHECK(again.attempt() == 1);
}

STORE_CASE("release_batch gives many leases back in one call, leaves stale ones alone, ends a cancel-requested one cancelled",
           "[release]") {
  std::vector<eoq::TaskId> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(store.submit(task()).task.id);
  auto leases = claim(store, {"default"}, "w", 5);
  REQUIRE(leases.size() == 5);
  std::sort(leases.begin(), leases.end(), [](const Lease& a, const Lease& b) { return a.id() < b.id(); });
  // leases[1] is given back first, so the batch's copy of it is stale; leases[2] has a cancel request.
  store.release(leases[1]);
  auto again = claim_one(store, "w2");
  REQUIRE(again.id() == leases[1].id());
  CHECK(store.cancel(leases[2].id()) == eoq::CancelOutcome::cancel_requested);
  std::vector<Lease> batch = {leases[0], leases[1], leases[2], leases[3], leases[3], stale_copy(leases[4])};
  auto applied = store.release_batch(batch);
  CHECK(applied == std::vector<bool>{true, false, true, true, false, false});
  auto p0 = must_get(store, leases[0].id());
  CHECK(p0.status == TaskStatus::pending);
  CHECK(p0.attempts == 0);
  CHECK(p0.version == leases[0].token + 1);
  CHECK_FALSE(p0.lease_owner);
  CHECK(must_get(store, leases[3].id()).status == TaskStatus::pending);
  // The rival's lease on leases[1]'s task is untouched.
  auto r1 = must_get(store, leases[1].id());
  CHECK(r1.status == TaskStatus::running);
  CHECK(r1.lease_owner == std::optional<std::string>("w2"));
  CHECK(r1.version == again.token);
  auto c2 = must_get(store, leases[2].id());
  CHECK(c2.status == TaskStatus::cancelled);
  CHECK(c2.version == leases[2].token + 1);
  check_terminal_lease_fields(c2, "w");
  auto h = store.history(leases[2].id());
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "cancelled");
  // A stale token: the task is still held by the batch's owner, untouched.
  auto r4 = must_get(store, leases[4].id());
  CHECK(r4.status == TaskStatus::running);
  CHECK(r4.version == leases[4].token);
  CHECK(store.release_batch(std::vector<Lease>{}).empty());
  // The released ones are claimable again, their attempt not counted.
  auto next = claim(store, {"default"}, "w3", 10);
  REQUIRE(next.size() == 2);
  for (const auto& l : next) CHECK(l.attempt() == 1);
}

// ---------------------------------------------------------------------------
// complete and complete_batch

STORE_CASE("completing stores the result and finishes the task", "[complete]") {
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store, "w");
  auto before = now();
  store.complete(l, R"({"ok": true})");
  auto after = now();
  auto s = must_get(store, id);
  CHECK(s.status == TaskStatus::succeeded);
  CHECK(s.result == std::optional<std::string>(R"({"ok": true})"));
  REQUIRE(s.finished_at);
  CHECK(*s.finished_at >= before - 1s);
  CHECK(*s.finished_at <= after + 1s);
  CHECK(s.version == l.token + 1);
  check_terminal_lease_fields(s, "w");
  auto h = store.history(id);
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "succeeded");
  CHECK(h[0].owner == "w");
  CHECK(h[0].finished_at);
  CHECK_FALSE(h[0].error);
}

STORE_CASE("complete_batch with a stale and the current lease of one task settles the current one with its result",
           "[complete]") {
  auto id = store.submit(task()).task.id;
  auto stale = claim(store, {"default"}, "w1", 1, 1ms).at(0);
  std::this_thread::sleep_for(20ms);  // the lease runs out; the next claim takes the task over
  auto current = claim_one(store, "w2");
  REQUIRE(current.id() == id);
  REQUIRE(current.token > stale.token);
  std::vector<eoq::Completion> both{{&stale, R"("stale")"}, {&current, R"("current")"}};
  CHECK(store.complete_batch(both) == std::vector<bool>{false, true});
  auto done = must_get(store, id);
  CHECK(done.status == TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"("current")"));
}

STORE_CASE("complete_batch applies the valid leases and reports the stale ones", "[complete]") {
  for (int i = 0; i < 5; ++i) store.submit(task());
  auto ls = claim(store, {"default"}, "w", 5);
  REQUIRE(ls.size() == 5);
  store.complete(ls[1], R"("alone")");
  auto stale3 = stale_copy(ls[3]);
  auto snapshot3 = describe(must_get(store, ls[3].id()));
  std::vector<eoq::Completion> batch = {{&ls[0], "0"}, {&ls[1], "1"}, {&ls[2], "2"}, {&stale3, "3"}, {&ls[4], "4"}};
  CHECK(store.complete_batch(batch) == std::vector<bool>{true, false, true, false, true});
  CHECK(must_get(store, ls[0].id()).result == std::optional<std::string>("0"));
  CHECK(must_get(store, ls[1].id()).result == std::optional<std::string>(R"("alone")"));
  CHECK(must_get(store, ls[2].id()).status == TaskStatus::succeeded);
  CHECK(describe(must_get(store, ls[3].id())) == snapshot3);
  CHECK(must_get(store, ls[4].id()).result == std::optional<std::string>("4"));
  CHECK(store.complete_batch({}).empty());

  SECTION("the same lease twice in one batch applies once") {
    store.submit(task());
    auto l = claim_one(store);
    std::vector<eoq::Completion> twice = {{&l, R"("first")"}, {&l, R"("second")"}};
    CHECK(store.complete_batch(twice) == std::vector<bool>{true, false});
    auto done = must_get(store, l.id());
    CHECK(done.result == std::optional<std::string>(R"("first")"));
    CHECK(done.version == l.token + 1);
  }

  SECTION("invalid JSON anywhere applies nothing") {
    std::vector<eoq::Completion> bad = {{&ls[3], "3"}, {&ls[3], "{oops"}};
    CHECK_THAT(field_of([&] { store.complete_batch(bad); }), Catch::Contains("result"));
    CHECK(describe(must_get(store, ls[3].id())) == snapshot3);
  }
}

// The Postgres store sends a batch whose results are all JSON null without
// them; the fence, the stale lease and the duplicate must hold the same way.
STORE_CASE("complete_batch without results applies the valid leases once and stores null results", "[complete]") {
  for (int i = 0; i < 4; ++i) store.submit(task());
  auto ls = claim(store, {"default"}, "w", 4);
  REQUIRE(ls.size() == 4);
  auto stale2 = stale_copy(ls[2]);
  auto snapshot2 = describe(must_get(store, ls[2].id()));
  std::vector<eoq::Completion> batch = {{&ls[0]}, {&ls[1]}, {&stale2}, {&ls[3]}, {&ls[0]}};
  CHECK(store.complete_batch(batch) == std::vector<bool>{true, true, false, true, false});
  for (int i : {0, 1, 3}) {
    auto done = must_get(store, ls[static_cast<std::size_t>(i)].id());
    CHECK(done.status == TaskStatus::succeeded);
    CHECK(done.result == std::optional<std::string>("null"));
    CHECK(done.version == ls[static_cast<std::size_t>(i)].token + 1);
    check_terminal_lease_fields(done, "w");
  }
  CHECK(describe(must_get(store, ls[2].id())) == snapshot2);
  // One real result among nulls takes the path with results; the nulls stay null.
  for (int i = 0; i < 2; ++i) store.submit(task());
  auto more = claim(store, {"default"}, "w", 2);
  REQUIRE(more.size() == 2);
  std::vector<eoq::Completion> mixed = {{&more[0]}, {&more[1], R"({"n": 1})"}};
  CHECK(store.complete_batch(mixed) == std::vector<bool>{true, true});
  CHECK(must_get(store, more[0].id()).result == std::optional<std::string>("null"));
  CHECK(must_get(store, more[1].id()).result == std::optional<std::string>(R"({"n": 1})"));
}

// The Postgres store reads a batch's rows by their id range when the ids are
// close together and by the ids themselves when they are far apart; the tasks
// between them that the batch does not name must stay untouched either way.
STORE_CASE("complete_batch settles the named tasks only, whether their ids are close together or far apart",
           "[complete]") {
  for (int i = 0; i < 30; ++i) store.submit(task());
  auto ls = claim(store, {"default"}, "w", 30);
  REQUIRE(ls.size() == 30);
  auto untouched = [&](std::size_t i) { return describe(must_get(store, ls[i].id())); };
  std::vector<std::string> before;
  for (std::size_t i = 0; i < ls.size(); ++i) before.push_back(untouched(i));
  // Close: 3 of the 4 ids in [ls[0], ls[3]]; ls[2] in between is not named.
  std::vector<eoq::Completion> close = {{&ls[0]}, {&ls[1]}, {&ls[3]}};
  CHECK(store.complete_batch(close) == std::vector<bool>{true, true, true});
  // Far apart: 2 ids with 24 others between them.
  std::vector<eoq::Completion> apart = {{&ls[4], R"("first")"}, {&ls[29], R"("last")"}};
  CHECK(store.complete_batch(apart) == std::vector<bool>{true, true});
  for (std::size_t i : {0u, 1u, 3u, 4u, 29u}) CHECK(must_get(store, ls[i].id()).status == TaskStatus::succeeded);
  CHECK(must_get(store, ls[4].id()).result == std::optional<std::string>(R"("first")"));
  CHECK(must_get(store, ls[29].id()).result == std::optional<std::string>(R"("last")"));
  for (std::size_t i = 5; i < 29; ++i) CHECK(untouched(i) == before[i]);
  CHECK(untouched(2) == before[2]);
}

STORE_CASE("expire_if_overdue ends a held lease expired once its deadline has passed, and not before",
           "[deadline]") {
  NewTask t = task();
  t.deadline = now() + 400ms;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store);

  CHECK_FALSE(store.expire_if_overdue(l));
  auto unchanged = must_get(store, id);
  CHECK(unchanged.status == TaskStatus::running);
  CHECK(unchanged.version == l.token);

  std::this_thread::sleep_for(*t.deadline - now() + 50ms);
  CHECK(store.expire_if_overdue(l));
  auto got = must_get(store, id);
  CHECK(got.status == TaskStatus::expired);
  CHECK(got.last_error == std::optional<std::string>("deadline passed"));
  CHECK(got.version == l.token + 1);
  CHECK(got.finished_at.has_value());
  CHECK_FALSE(got.lease_expires_at.has_value());
  CHECK(got.lease_owner == std::optional<std::string>("w1"));
  auto h = store.history(id);
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "expired");
  CHECK(h[0].finished_at.has_value());

  // The lease is spent: nothing else it does lands.
  CHECK(outcome_of([&] { store.complete(l); }) == "LeaseLost");
  CHECK(outcome_of([&] { store.expire_if_overdue(l); }) == "LeaseLost");
  CHECK(must_get(store, id).status == TaskStatus::expired);
}

STORE_CASE("expire_if_overdue leaves a task without a deadline running, and refuses a stale lease", "[deadline]") {
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  CHECK_FALSE(store.expire_if_overdue(l));
  CHECK(must_get(store, id).status == TaskStatus::running);
  store.complete(l);
  CHECK(outcome_of([&] { store.expire_if_overdue(l); }) == "LeaseLost");
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}
