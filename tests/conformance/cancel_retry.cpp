// Conformance: retries and backoff, deadlines, cancellation, and retrying a finished task.
#include "conformance/conformance.hpp"

// ---------------------------------------------------------------------------
// retry and backoff

TEST_CASE("RetryPolicy::delay_after follows fixed and exponential backoff with a cap and jitter bounds",
          "[retry][memory]") {
  eoq::RetryPolicy fixed{.max_attempts = 5, .backoff = eoq::Backoff::fixed, .initial_delay = 1000ms,
                         .max_delay = 60s, .jitter = 0};
  CHECK(fixed.delay_after(1) == 1000ms);
  CHECK(fixed.delay_after(2) == 1000ms);
  CHECK(fixed.delay_after(50) == 1000ms);

  eoq::RetryPolicy expo{.max_attempts = 5, .backoff = eoq::Backoff::exponential, .initial_delay = 100ms,
                        .max_delay = 1000ms, .jitter = 0};
  CHECK(expo.delay_after(1) == 100ms);
  CHECK(expo.delay_after(2) == 200ms);
  CHECK(expo.delay_after(3) == 400ms);
  CHECK(expo.delay_after(4) == 800ms);
  CHECK(expo.delay_after(5) == 1000ms);  // capped
  CHECK(expo.delay_after(64) == 1000ms);
  CHECK(expo.delay_after(1000) == 1000ms);  // no overflow
  CHECK(expo.delay_after(1, 0.0) == 100ms);  // no jitter, whatever the random number
  CHECK(expo.delay_after(1, 0.99) == 100ms);

  eoq::RetryPolicy zero{.max_attempts = 5, .backoff = eoq::Backoff::exponential, .initial_delay = 0ms,
                        .max_delay = 0ms, .jitter = 0.5};
  CHECK(zero.delay_after(3, 0.9) == 0ms);

  eoq::RetryPolicy jittered{.max_attempts = 5, .backoff = eoq::Backoff::exponential, .initial_delay = 1000ms,
                            .max_delay = 8000ms, .jitter = 0.5};
  CHECK(jittered.delay_after(1, 0.5) == 1000ms);
  CHECK(jittered.delay_after(1, 0.0) == 500ms);
  CHECK(jittered.delay_after(2, 0.0) == 1000ms);
  CHECK(jittered.delay_after(2, 0.75) == 2500ms);
  CHECK(jittered.delay_after(1, 0.999999) >= 1499ms);
  CHECK(jittered.delay_after(1, 0.999999) <= 1500ms);
  CHECK(jittered.delay_after(10, 0.0) == 4000ms);  // jitter applies to the capped delay
  for (int n = 1; n <= 6; ++n)
    for (double u : {0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.999}) {
      auto base = std::min<Millis::rep>(1000LL << (n - 1), 8000);
      auto d = jittered.delay_after(n, u).count();
      CHECK(d >= base / 2);
      CHECK(d <= base * 3 / 2);
    }
}

STORE_CASE("a failed attempt with attempts left is retried after an exponential backoff, then fails for good",
           "[retry]") {
  NewTask t = task();
  t.retry = {.max_attempts = 3, .backoff = eoq::Backoff::exponential, .initial_delay = 300ms, .max_delay = 10s,
             .jitter = 0};
  auto id = store.submit(t).task.id;

  auto l1 = claim_one(store, "w1");
  auto before = now();
  auto o1 = store.fail(l1, {"e1", false});
  auto after = now();
  CHECK(o1.status == TaskStatus::pending);
  REQUIRE(o1.retry_at);
  CHECK(*o1.retry_at >= before + 300ms - kSlack);
  CHECK(*o1.retry_at <= after + 300ms + kSlack);
  auto p = must_get(store, id);
  CHECK(p.status == TaskStatus::pending);
  CHECK(p.run_at == *o1.retry_at);
  CHECK(p.last_error == std::optional<std::string>("e1"));
  CHECK(p.attempts == 1);
  CHECK(p.version == l1.token + 1);
  CHECK_FALSE(p.lease_owner);
  CHECK_FALSE(p.lease_expires_at);
  CHECK_FALSE(p.finished_at);
  // Not claimable before run_at, checked whatever the load: claim from now on
  // until a claim gets it; that claim must not have ended before retry_at.
  std::vector<Lease> got;
  auto got_by = now();
  for (auto give_up = now() + 30s; got.empty() && now() < give_up;) {
    got = claim(store, {"default"}, "w2", 1);
    got_by = now();
    if (got.empty()) std::this_thread::sleep_for(5ms);
  }
  REQUIRE(got.size() == 1);
  CHECK(got_by + kSlack >= *o1.retry_at);  // not before run_at
  auto l2 = got.front();
  CHECK(l2.attempt() == 2);
  before = now();
  auto o2 = store.fail(l2, {"e2", false});
  after = now();
  CHECK(o2.status == TaskStatus::pending);
  REQUIRE(o2.retry_at);
  CHECK(*o2.retry_at >= before + 600ms - kSlack);  // doubled
  CHECK(*o2.retry_at <= after + 600ms + kSlack);

  std::this_thread::sleep_until(*o2.retry_at + 30ms);
  auto l3 = claim_one(store, "w3");
  CHECK(l3.attempt() == 3);
  auto o3 = store.fail(l3, {"e3", false});
  CHECK(o3.status == TaskStatus::failed);
  CHECK_FALSE(o3.retry_at);
  auto f = must_get(store, id);
  CHECK(f.status == TaskStatus::failed);
  CHECK(f.last_error == std::optional<std::string>("e3"));
  CHECK(f.finished_at);
  CHECK(f.attempts == 3);
  check_terminal_lease_fields(f, "w3");
  CHECK(claim(store, {"default"}, "w", 1).empty());

  auto h = store.history(id);
  REQUIRE(h.size() == 3);
  CHECK(h[0].outcome == "retry");
  CHECK(h[0].error == std::optional<std::string>("e1"));
  CHECK(h[0].owner == "w1");
  CHECK(h[1].outcome == "retry");
  CHECK(h[1].error == std::optional<std::string>("e2"));
  CHECK(h[2].outcome == "failed");
  CHECK(h[2].error == std::optional<std::string>("e3"));
  CHECK(h[2].owner == "w3");
}

STORE_CASE("fixed backoff delays every retry by the same amount and jitter stays within its bounds", "[retry]") {
  SECTION("fixed") {
    NewTask t = task();
    t.retry = {.max_attempts = 4, .backoff = eoq::Backoff::fixed, .initial_delay = 120ms, .max_delay = 10s,
               .jitter = 0};
    store.submit(t);
    for (int attempt = 1; attempt <= 2; ++attempt) {
      auto l = claim_one(store);
      auto before = now();
      auto o = store.fail(l, {"again", false});
      auto after = now();
      REQUIRE(o.retry_at);
      CHECK(*o.retry_at >= before + 120ms - kSlack);
      CHECK(*o.retry_at <= after + 120ms + kSlack);
      std::this_thread::sleep_until(*o.retry_at + 30ms);
    }
    CHECK(claim_one(store).attempt() == 3);
  }
  SECTION("jitter") {
    NewTask t = task();
    t.retry = {.max_attempts = 4, .backoff = eoq::Backoff::exponential, .initial_delay = 10s, .max_delay = 60s,
               .jitter = 0.5};
    store.submit(t);
    auto l = claim_one(store);
    auto before = now();
    auto o = store.fail(l, {"again", false});
    auto after = now();
    REQUIRE(o.retry_at);
    CHECK(*o.retry_at >= before + 5s - kSlack);
    CHECK(*o.retry_at <= after + 15s + kSlack);
  }
}

STORE_CASE("a permanent failure fails the task at once whatever the policy says", "[retry]") {
  NewTask t = task();
  t.retry.max_attempts = 10;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store);
  auto o = store.fail(l, {"bad input", true});
  CHECK(o.status == TaskStatus::failed);
  CHECK_FALSE(o.retry_at);
  auto f = must_get(store, id);
  CHECK(f.status == TaskStatus::failed);
  CHECK(f.last_error == std::optional<std::string>("bad input"));
  CHECK(f.finished_at);
  CHECK(f.version == l.token + 1);
  check_terminal_lease_fields(f, "w1");
  auto h = store.history(id);
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "failed");
  CHECK(h[0].error == std::optional<std::string>("bad input"));
  CHECK(h[0].finished_at);
}

STORE_CASE("a task whose lease expired with no attempts left fails with lease expired", "[retry][lease]") {
  NewTask t = task();
  t.retry.max_attempts = 1;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store, "w", 100ms);
  std::this_thread::sleep_for(200ms);
  SECTION("noticed by a claim") { CHECK(claim(store, {"default"}, "w2", 10).empty()); }
  SECTION("noticed by maintain") {
    auto report = store.maintain();
    CHECK(report.reaped == 1);
    CHECK(report.expired == 0);
  }
  auto f = must_get(store, id);
  CHECK(f.status == TaskStatus::failed);
  CHECK(f.last_error == std::optional<std::string>("lease expired"));
  CHECK(f.finished_at);
  check_terminal_lease_fields(f, "w");
  auto h = store.history(id);
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "lease_expired");
  CHECK(h[0].error == std::optional<std::string>("lease expired"));
  CHECK(outcome_of([&] { store.complete(l); }) == "LeaseLost");
  CHECK(must_get(store, id).status == TaskStatus::failed);
}

// ---------------------------------------------------------------------------
// deadlines

STORE_CASE("a pending task past its deadline expires and is never handed out", "[deadline]") {
  NewTask t = task();
  t.deadline = now() + 300ms;
  auto id = store.submit(t).task.id;
  std::this_thread::sleep_until(*t.deadline + 50ms);
  SECTION("noticed by a claim") { CHECK(claim(store, {"default"}, "w", 10).empty()); }
  SECTION("noticed by maintain") {
    auto report = store.maintain();
    CHECK(report.expired == 1);
    CHECK(claim(store, {"default"}, "w", 10).empty());
  }
  auto e = must_get(store, id);
  CHECK(e.status == TaskStatus::expired);
  CHECK(e.last_error == std::optional<std::string>("deadline passed"));
  CHECK(e.finished_at);
  CHECK(e.attempts == 0);
  check_terminal_lease_fields(e, std::nullopt);
  CHECK(store.history(id).empty());
}

STORE_CASE("a running task whose lease ran out past its deadline expires", "[deadline]") {
  NewTask t = task();
  t.deadline = now() + 600ms;
  t.retry.max_attempts = 5;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store, "w", 100ms);
  std::this_thread::sleep_until(*t.deadline + 50ms);
  CHECK(claim(store, {"default"}, "w2", 10).empty());
  auto e = must_get(store, id);
  CHECK(e.status == TaskStatus::expired);
  CHECK(e.last_error == std::optional<std::string>("deadline passed"));
  check_terminal_lease_fields(e, "w");
  auto h = store.history(id);
  REQUIRE(h.size() == 1);
  CHECK(h[0].outcome == "lease_expired");
  CHECK(outcome_of([&] { store.complete(l); }) == "LeaseLost");
}

STORE_CASE("a task started before its deadline may still finish after it", "[deadline]") {
  NewTask t = task();
  t.deadline = now() + 600ms;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store, "w", 30s);
  std::this_thread::sleep_until(*t.deadline + 50ms);
  CHECK(store.maintain().expired == 0);
  store.complete(l, "1");
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

// ---------------------------------------------------------------------------
// cancellation

STORE_CASE("cancelling a pending task cancels it at once", "[cancel]") {
  auto id = store.submit(task()).task.id;
  CHECK(store.cancel(id) == eoq::CancelOutcome::cancelled);
  auto c = must_get(store, id);
  CHECK(c.status == TaskStatus::cancelled);
  CHECK(c.finished_at);
  check_terminal_lease_fields(c, std::nullopt);
  CHECK(claim(store, {"default"}, "w", 10).empty());
  CHECK(store.cancel(id) == eoq::CancelOutcome::already_finished);
}

STORE_CASE("cancelling a running task requests cancellation and its holder decides the end", "[cancel]") {
  NewTask t = task();
  t.retry.max_attempts = 5;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store, "w", 30s);
  CHECK(store.cancel(id) == eoq::CancelOutcome::cancel_requested);
  auto r = must_get(store, id);
  CHECK(r.status == TaskStatus::running);
  CHECK(r.cancel_requested);
  CHECK(store.cancel(id) == eoq::CancelOutcome::cancel_requested);
  CHECK(store.heartbeat(l, 30s).cancel_requested);

  SECTION("fail ends it cancelled") {
    auto o = store.fail(l, {"stopped", false});
    CHECK(o.status == TaskStatus::cancelled);
    CHECK_FALSE(o.retry_at);
    auto c = must_get(store, id);
    CHECK(c.status == TaskStatus::cancelled);
    CHECK(c.finished_at);
    check_terminal_lease_fields(c, "w");
    auto h = store.history(id);
    REQUIRE(h.size() == 1);
    CHECK(h[0].outcome == "cancelled");
    CHECK(h[0].error == std::optional<std::string>("stopped"));
  }
  SECTION("complete still ends it succeeded") {
    store.complete(l, R"({"late": true})");
    auto s = must_get(store, id);
    CHECK(s.status == TaskStatus::succeeded);
    CHECK(s.result == std::optional<std::string>(R"({"late": true})"));
    check_terminal_lease_fields(s, "w");
  }
  SECTION("release ends it cancelled") {
    store.release(l);
    auto c = must_get(store, id);
    CHECK(c.status == TaskStatus::cancelled);
    CHECK(c.finished_at);
    CHECK(c.version == l.token + 1);
    check_terminal_lease_fields(c, "w");
    auto h = store.history(id);
    REQUIRE(h.size() == 1);
    CHECK(h[0].outcome == "cancelled");
  }
  SECTION("its lease expiring ends it cancelled") {
    auto shorter = claim(store, {"default"}, "w", 1);
    CHECK(shorter.empty());
    // Let the lease lapse: heartbeat it down to 50 ms.
    store.heartbeat(l, 50ms);
    std::this_thread::sleep_for(150ms);
    CHECK(claim(store, {"default"}, "w2", 10).empty());
    auto c = must_get(store, id);
    CHECK(c.status == TaskStatus::cancelled);
    check_terminal_lease_fields(c, "w");
    auto h = store.history(id);
    REQUIRE(h.size() == 1);
    CHECK(h[0].outcome == "lease_expired");
  }
  SECTION("its lease expiring ends it cancelled at maintain, attempts left or not") {
    store.heartbeat(l, 50ms);
    std::this_thread::sleep_for(150ms);
    CHECK(store.maintain().reaped == 1);
    auto c = must_get(store, id);
    CHECK(c.status == TaskStatus::cancelled);
    CHECK_FALSE(c.last_error);  // unchanged
    check_terminal_lease_fields(c, "w");
  }
  CHECK(claim(store, {"default"}, "w", 10).empty());
}

STORE_CASE("cancelling a finished task changes nothing and an unknown id is not found", "[cancel]") {
  store.submit(task());
  auto l = claim_one(store);
  store.complete(l, "1");
  auto snapshot = describe(must_get(store, l.id()));
  CHECK(store.cancel(l.id()) == eoq::CancelOutcome::already_finished);
  CHECK(describe(must_get(store, l.id())) == snapshot);
  CHECK(store.cancel(l.id() + 1000000) == eoq::CancelOutcome::not_found);
}

TEST_CASE("PostgresStore: cancel_on cancels in the host's transaction, with cancel's rules, only if it commits",
          "[conformance][postgres][cancel]") {
  TestStore S(StoreKind::postgres);
  auto& store = *S;
  eoq::test::Admin host(S.conninfo());
  using eoq::CancelOutcome;
  using eoq::PostgresStore;

  auto pending = store.submit(task()).task.id;
  host.exec("BEGIN");
  CHECK(PostgresStore::cancel_on(host.get(), pending, {}, S.schema()) == CancelOutcome::cancelled);
  host.exec("ROLLBACK");
  CHECK(must_get(store, pending).status == TaskStatus::pending);
  host.exec("BEGIN");
  CHECK(PostgresStore::cancel_on(host.get(), pending, {}, S.schema()) == CancelOutcome::cancelled);
  // Not visible to others before the host commits.
  CHECK(must_get(store, pending).status == TaskStatus::pending);
  host.exec("COMMIT");
  auto got = must_get(store, pending);
  CHECK(got.status == TaskStatus::cancelled);
  CHECK(got.finished_at.has_value());

  auto running = store.submit(task()).task.id;
  auto l = claim_one(store);
  REQUIRE(l.id() == running);
  host.exec("BEGIN");
  CHECK(PostgresStore::cancel_on(host.get(), running, {}, S.schema()) == CancelOutcome::cancel_requested);
  host.exec("COMMIT");
  CHECK(must_get(store, running).cancel_requested);
  CHECK(store.heartbeat(l, 30s).cancel_requested);

  CHECK(PostgresStore::cancel_on(host.get(), pending, {}, S.schema()) == CancelOutcome::already_finished);
  CHECK(PostgresStore::cancel_on(host.get(), 987654321, {}, S.schema()) == CancelOutcome::not_found);

  NewTask owned = task();
  owned.tenant = "acme";
  auto acme = store.submit(owned).task.id;
  auto before = describe(must_get(store, acme));
  CHECK(PostgresStore::cancel_on(host.get(), acme, eoq::Scope::only("other"), S.schema()) ==
        CancelOutcome::not_found);
  CHECK(describe(must_get(store, acme)) == before);
  CHECK(PostgresStore::cancel_on(host.get(), acme, eoq::Scope::only("acme"), S.schema()) ==
        CancelOutcome::cancelled);

  CHECK(field_of([&] { PostgresStore::cancel_on(nullptr, pending, {}, S.schema()); }) == "connection");
  CHECK(field_of([&] { PostgresStore::cancel_on(host.get(), pending, {}, "bad;schema"); }) == "schema");
  CHECK(field_of([&] { PostgresStore::cancel_on(host.get(), pending, eoq::Scope::only(""), S.schema()); }) ==
        "scope.tenant");
}

STORE_CASE("cancel_running ends the holder's task cancelled, asked for or not, and is fenced", "[cancel]") {
  SECTION("after a cancel request") {
    auto id = store.submit(task()).task.id;
    auto l = claim_one(store);
    REQUIRE(store.cancel(id) == eoq::CancelOutcome::cancel_requested);
    store.cancel_running(l, "saw the request");
    auto got = must_get(store, id);
    CHECK(got.status == TaskStatus::cancelled);
    CHECK(got.version == l.token + 1);
    CHECK(got.finished_at.has_value());
    CHECK_FALSE(got.lease_expires_at.has_value());
    CHECK_FALSE(got.last_error.has_value());
    auto h = store.history(id);
    REQUIRE(h.size() == 1);
    CHECK(h[0].outcome == "cancelled");
    CHECK(h[0].error == std::optional<std::string>("saw the request"));
    CHECK(outcome_of([&] { store.cancel_running(l); }) == "LeaseLost");
    CHECK(outcome_of([&] { store.complete(l); }) == "LeaseLost");
  }
  SECTION("without one, and without a reason") {
    auto id = store.submit(task()).task.id;
    auto l = claim_one(store);
    store.cancel_running(l);
    CHECK(must_get(store, id).status == TaskStatus::cancelled);
    auto h = store.history(id);
    REQUIRE(h.size() == 1);
    CHECK(h[0].outcome == "cancelled");
    CHECK_FALSE(h[0].error.has_value());
  }
  SECTION("a stale lease changes nothing") {
    auto id = store.submit(task()).task.id;
    auto old = claim_one(store, "w1", 100ms);
    std::this_thread::sleep_for(150ms);
    auto current = claim_one(store, "w2");
    auto before = describe(must_get(store, id));
    CHECK(outcome_of([&] { store.cancel_running(old); }) == "LeaseLost");
    CHECK(describe(must_get(store, id)) == before);
    store.complete(current);
  }
}

STORE_CASE("retry runs a failed, cancelled or expired task again as a new attempt with its history kept",
           "[retry]") {
  NewTask t = keyed("r");
  t.retry = {.max_attempts = 2, .backoff = eoq::Backoff::fixed, .initial_delay = 0ms, .max_delay = 0ms,
             .jitter = 0};
  auto id = store.submit(t).task.id;
  auto l1 = claim_one(store, "w1");
  store.fail(l1, {"boom 1", false});
  auto l2 = claim_one(store, "w2");
  CHECK(store.fail(l2, {"boom 2", false}).status == TaskStatus::failed);
  auto failed = must_get(store, id);
  REQUIRE(failed.status == TaskStatus::failed);

  auto before = now();
  CHECK(store.retry(id) == eoq::RetryOutcome::retried);
  auto again = must_get(store, id);
  CHECK(again.status == TaskStatus::pending);
  CHECK(again.version > failed.version);
  CHECK(again.attempts == 2);
  CHECK(again.retry.max_attempts == 3);
  CHECK(again.run_at >= before - kSlack);
  CHECK(again.run_at <= now() + kSlack);
  CHECK_FALSE(again.finished_at);
  CHECK(again.last_error == std::optional<std::string>("boom 2"));
  CHECK(store.submit(keyed("r")).task.id == id);  // the key still names it
  CHECK(outcome_of([&] { store.complete(l2); }) == "LeaseLost");  // the old lease stays dead

  CHECK_FALSE(again.started_at);
  auto claimed_at = now();
  auto l3 = claim_one(store, "w3");
  CHECK(l3.id() == id);
  CHECK(l3.attempt() == 3);
  REQUIRE(must_get(store, id).started_at);
  CHECK(*must_get(store, id).started_at >= claimed_at - kSlack);
  CHECK(*must_get(store, id).started_at <= now() + kSlack);
  CHECK(l3.task.started_at == must_get(store, id).started_at);
  store.complete(l3, R"({"ok": true})");
  auto h = store.history(id);
  REQUIRE(h.size() == 3);
  CHECK(h[0].outcome == "retry");
  CHECK(h[1].outcome == "failed");
  CHECK(h[2].outcome == "succeeded");
  CHECK(h[2].owner == "w3");
  CHECK(must_get(store, id).started_at == std::optional<TimePoint>(h[2].started_at));  // kept when it ends
  CHECK(store.retry(id) == eoq::RetryOutcome::not_retryable);  // succeeded stays succeeded
  CHECK(must_get(store, id).status == TaskStatus::succeeded);

  SECTION("a cancelled task") {
    auto c = store.submit(task()).task.id;
    REQUIRE(store.cancel(c) == eoq::CancelOutcome::cancelled);
    CHECK(store.retry(c) == eoq::RetryOutcome::retried);
    auto l = claim_one(store);
    CHECK(l.id() == c);
    CHECK(l.attempt() == 1);
  }
  SECTION("an expired task loses its passed deadline") {
    NewTask e = task();
    e.deadline = now() + 100ms;
    auto x = store.submit(e).task.id;
    std::this_thread::sleep_until(*e.deadline + 50ms);
    store.maintain();
    REQUIRE(must_get(store, x).status == TaskStatus::expired);
    CHECK(store.retry(x) == eoq::RetryOutcome::retried);
    auto back = must_get(store, x);
    CHECK(back.status == TaskStatus::pending);
    CHECK_FALSE(back.deadline);
    CHECK(claim_one(store).id() == x);
  }
  SECTION("live and unknown tasks are left alone") {
    auto p = store.submit(task()).task.id;
    auto before_p = describe(must_get(store, p));
    CHECK(store.retry(p) == eoq::RetryOutcome::not_retryable);
    CHECK(describe(must_get(store, p)) == before_p);
    auto l = claim_one(store);
    CHECK(store.retry(l.id()) == eoq::RetryOutcome::not_retryable);
    store.complete(l);
    CHECK(store.retry(id + 1000000) == eoq::RetryOutcome::not_found);
  }
}

// ---------------------------------------------------------------------------
// remove

STORE_CASE("remove deletes a finished or pending task with its key; a running one is refused", "[remove]") {
  using eoq::RemoveOutcome;
  auto done = store.submit(keyed("k-done")).task.id;
  store.complete(claim_one(store));
  auto pending = store.submit(keyed("k-pending")).task.id;
  auto running = store.submit(keyed("k-running")).task.id;
  // Claim the one meant to run (claims take the oldest first: pending is older).
  auto l1 = claim_one(store);
  auto l2 = claim_one(store);
  REQUIRE(l2.id() == running);
  store.release(l1);
  REQUIRE(must_get(store, pending).status == TaskStatus::pending);

  CHECK(store.remove(done) == RemoveOutcome::removed);
  CHECK_FALSE(store.get(done));
  CHECK(store.history(done).empty());
  CHECK(store.remove(done) == RemoveOutcome::not_found);
  // Its key is free again: a new task, not a duplicate.
  auto again = store.submit(keyed("k-done"));
  CHECK_FALSE(again.duplicate);
  CHECK(again.task.id != done);

  CHECK(store.remove(pending) == RemoveOutcome::removed);
  CHECK_FALSE(store.get(pending));
  CHECK_FALSE(store.submit(keyed("k-pending")).duplicate);

  CHECK(store.remove(running) == RemoveOutcome::running);
  CHECK(must_get(store, running).status == TaskStatus::running);
  CHECK_FALSE(must_get(store, running).cancel_requested);  // refused: nothing asked of its worker
  store.complete(l2);  // its lease still holds
  CHECK(store.remove(running) == RemoveOutcome::removed);

  CHECK(store.remove(999999) == RemoveOutcome::not_found);
  // Another tenant's task is not found, and stays.
  NewTask theirs = task();
  theirs.tenant = "acme";
  auto t = store.submit(theirs).task.id;
  CHECK(store.remove(t, eoq::Scope::only("other")) == RemoveOutcome::not_found);
  CHECK(store.get(t));
  CHECK(store.remove(t, eoq::Scope::only("acme")) == RemoveOutcome::removed);

  // The rows are gone from the counts; removing a pending task cancelled it first.
  auto s = stats_of(store, "default");
  CHECK(s.pending == 2);  // k-done's and k-pending's new tasks
  CHECK(s.succeeded == 0);
  CHECK(s.succeeded_total == 2);
  CHECK(s.cancelled_total == 2);  // pending and the tenant's
}

STORE_CASE("removing a parent cancels its waiting children as cancel does; a run-anyway child is released",
           "[remove][workflows]") {
  auto parent = store.submit(task()).task.id;
  NewTask child = task("child");
  child.parents = {parent};
  auto waits = store.submit(child).task.id;
  NewTask anyway = task("anyway");
  anyway.parents = {parent};
  anyway.on_parent_failure = eoq::ParentFailure::run;
  auto runs = store.submit(anyway).task.id;
  REQUIRE(must_get(store, waits).status == TaskStatus::waiting);

  CHECK(store.remove(parent) == eoq::RemoveOutcome::removed);
  CHECK(must_get(store, waits).status == TaskStatus::cancelled);
  CHECK(must_get(store, runs).status == TaskStatus::pending);
  // A waiting task itself can be removed.
  auto p2 = store.submit(task()).task.id;
  NewTask c2 = task("child");
  c2.parents = {p2};
  auto w2 = store.submit(c2).task.id;
  CHECK(store.remove(w2) == eoq::RemoveOutcome::removed);
  CHECK_FALSE(store.get(w2));
  store.complete(claim_one(store));  // the parent (or the released child) ends without trouble
}

STORE_CASE("remove racing the release of a waiting task removes it, never reports it running", "[remove][workflows]") {
  for (int round = 0; round < 40; ++round) {
    INFO("round " << round);
    auto parent = store.submit(task()).task.id;
    NewTask c = task("child", "children");
    c.parents = {parent};
    auto child = store.submit(c).task.id;
    auto lease = claim_one(store);
    REQUIRE(lease.id() == parent);
    std::atomic<bool> go{false};
    std::thread releaser([&] {
      while (!go) std::this_thread::yield();
      store.complete(lease);  // releases the child: waiting -> pending
    });
    go = true;
    auto outcome = store.remove(child);
    releaser.join();
    CHECK(outcome == eoq::RemoveOutcome::removed);
    CHECK_FALSE(store.get(child));
  }
  CHECK(claim(store, {"children"}, "w", 100).empty());
}
