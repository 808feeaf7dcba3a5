// Conformance: reads: get, find, list and its paging, stats, history.
#include "conformance/conformance.hpp"

// ---------------------------------------------------------------------------
// reads

STORE_CASE("get and find return the task, or nothing for unknown ids and keys", "[reads]") {
  auto t = store.submit(keyed("k", "q")).task;
  CHECK(must_get(store, t.id).id == t.id);
  CHECK_FALSE(store.get(t.id + 1000000));
  CHECK_FALSE(store.get(-1));
  REQUIRE(store.find("q", "k"));
  CHECK(store.find("q", "k")->id == t.id);
  CHECK_FALSE(store.find("other", "k"));
  CHECK_FALSE(store.find("q", "nope"));
  CHECK(store.history(t.id + 1000000).empty());
}

STORE_CASE("list filters by queue, status, type and tenant", "[reads]") {
  auto sub = [&](std::string q, std::string type, std::optional<std::string> tenant) {
    NewTask t = task(std::move(type), std::move(q));
    t.tenant = std::move(tenant);
    return store.submit(t).task.id;
  };
  auto a = sub("q1", "A", "x");
  auto b = sub("q1", "B", std::nullopt);
  auto c = sub("q2", "A", "x");
  auto d = sub("q2", "A", "y");
  claim(store, {"q2"}, "w", 10);  // c and d running
  auto e = sub("q1", "A", "x");
  auto ids = [&](eoq::ListQuery q) {
    std::vector<eoq::TaskId> out;
    for (auto& t : list_all(store, q)) out.push_back(t.id);
    return out;
  };
  using V = std::vector<eoq::TaskId>;
  CHECK(ids({}) == V{a, b, c, d, e});
  CHECK(ids(Q().queue("q1")) == V{a, b, e});
  CHECK(ids(Q().status(TaskStatus::running)) == V{c, d});
  CHECK(ids(Q().type("A")) == V{a, c, d, e});
  CHECK(ids(Q().tenant("x")) == V{a, c, e});
  CHECK(ids(Q().queue("q2").status(TaskStatus::running).type("A").tenant("y")) == V{d});
  CHECK(ids(Q().queue("q1").status(TaskStatus::running)).empty());
  CHECK(ids(Q().queue("nowhere")).empty());
  CHECK(ids(Q().after(c)) == V{d, e});
  auto page = store.list(Q().limit(2));
  CHECK(page.tasks.size() == 2);
  CHECK(page.next_after == std::optional<eoq::TaskId>(b));
}

STORE_CASE("paging through 250 tasks seven at a time yields each exactly once", "[reads]") {
  std::vector<NewTask> batch(250, task());
  std::vector<eoq::TaskId> expected;
  for (auto& r : store.submit_batch(batch)) expected.push_back(r.task.id);
  std::vector<eoq::TaskId> seen;
  eoq::ListQuery q = Q().limit(7);
  int pages = 0;
  for (;;) {
    auto p = store.list(q);
    ++pages;
    REQUIRE(pages < 100);
    REQUIRE(p.tasks.size() <= 7);
    for (auto& t : p.tasks) seen.push_back(t.id);
    if (p.tasks.size() == 7) {
      REQUIRE(p.next_after);
      CHECK(*p.next_after == p.tasks.back().id);
      q.after = p.next_after;
    } else {
      CHECK_FALSE(p.next_after);
      break;
    }
  }
  CHECK(pages == 36);
  CHECK(seen == expected);

  SECTION("a full last page says it is the last") {
    std::vector<NewTask> more(21, task("t", "exact"));
    store.submit_batch(more);
    eoq::ListQuery e = Q().queue("exact").limit(7);
    int n = 0;
    for (int i = 0; i < 3; ++i) {
      auto p = store.list(e);
      CHECK(p.tasks.size() == 7);
      n += static_cast<int>(p.tasks.size());
      if (i < 2) {
        REQUIRE(p.next_after);
        e.after = p.next_after;
      } else {
        CHECK_FALSE(p.next_after);
      }
    }
    CHECK(n == 21);
    CHECK_FALSE(store.list(Q().queue("exact").limit(21)).next_after);
    CHECK(store.list(Q().queue("exact").limit(20)).next_after);
  }
}

STORE_CASE("newest_first pages from the newest task down, each exactly once, across both states", "[reads]") {
  std::vector<eoq::TaskId> ids;
  for (int i = 0; i < 23; ++i) ids.push_back(store.submit(task("t", i % 3 ? "q" : "other")).task.id);
  for (int i = 0; i < 5; ++i) store.complete(claim_one(store, "w", 30s, "q"));  // some finished, some live
  std::vector<eoq::TaskId> seen;
  eoq::ListQuery q = Q().limit(4).newest_first();
  for (int page = 0; page < 20; ++page) {
    auto p = store.list(q);
    for (auto& t : p.tasks) seen.push_back(t.id);
    if (!p.next_after) break;
    q.after = p.next_after;
  }
  std::vector<eoq::TaskId> expected(ids.rbegin(), ids.rend());
  CHECK(seen == expected);
  auto finished = store.list(Q().status(TaskStatus::succeeded).limit(2).newest_first());
  REQUIRE(finished.tasks.size() == 2);
  CHECK(finished.tasks[0].id > finished.tasks[1].id);
  CHECK(store.list(Q().queue("other").newest_first()).tasks.size() == 8);
}

STORE_CASE("stats count tasks per status per queue, sorted by queue, with the oldest pending age", "[reads]") {
  CHECK(store.stats().empty());
  // queue b: running, succeeded, failed, a lost lease (still running), two pending
  auto start = now();
  store.submit(task("t", "b"));
  claim_one(store, "w", 30s, "b");
  store.submit(task("t", "b"));
  store.complete(claim_one(store, "w", 30s, "b"));
  store.submit(task("t", "b"));
  store.fail(claim_one(store, "w", 30s, "b"), {"x", true});
  NewTask lost = task("t", "b");
  lost.retry.max_attempts = 3;
  store.submit(lost);
  claim_one(store, "w", 1ms, "b");
  NewTask old = task("t", "b");
  old.run_at = start - 10s;
  store.submit(old);
  NewTask later = task("t", "b");
  later.run_at = start + 1h;
  store.submit(later);
  // queue a: cancelled and expired
  auto c = store.submit(task("t", "a")).task.id;
  store.cancel(c);
  NewTask e = task("t", "a");
  e.deadline = now() + 150ms;
  store.submit(e);
  std::this_thread::sleep_until(*e.deadline + 50ms);
  CHECK(claim(store, {"a"}, "w", 10).empty());  // expires it

  auto st = store.stats();
  auto end = now();
  REQUIRE(st.size() == 2);
  CHECK(st[0].queue == "a");
  CHECK(st[1].queue == "b");
  CHECK(st[0].pending == 0);
  CHECK(st[0].running == 0);
  CHECK(st[0].cancelled == 1);
  CHECK(st[0].expired == 1);
  CHECK_FALSE(st[0].oldest_pending_age);
  CHECK(st[1].pending == 2);
  CHECK(st[1].running == 2);
  CHECK(st[1].succeeded == 1);
  CHECK(st[1].failed == 1);
  CHECK(st[1].cancelled == 0);
  CHECK(st[1].expired == 0);
  REQUIRE(st[1].oldest_pending_age);
  CHECK(*st[1].oldest_pending_age >= 10s - kSlack);
  CHECK(*st[1].oldest_pending_age <= ms_between(start - 10s, end) + kSlack);
}

STORE_CASE("finished totals stay right through retry, cancel, waiting tasks and retention; *_total never falls",
           "[reads][totals]") {
  auto totals = [&](const std::string& queue = "default", const eoq::Scope& scope = {}) {
    for (auto& q : store.stats(scope))
      if (q.queue == queue) return q;
    return eoq::QueueStats{};
  };
  std::vector<eoq::TaskId> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(store.submit(task()).task.id);
  for (int i = 0; i < 3; ++i) store.complete(claim_one(store));
  auto failing = claim_one(store);
  store.fail(failing, {"boom", true});
  store.cancel(ids[4]);

  auto s = totals();
  CHECK(s.succeeded == 3);
  CHECK(s.failed == 1);
  CHECK(s.cancelled == 1);
  CHECK(s.succeeded_total == 3);
  CHECK(s.failed_total == 1);
  CHECK(s.cancelled_total == 1);
  CHECK(s.expired_total == 0);
  CHECK(s.succeeded_last_minute == 3);
  CHECK(s.failed_last_minute == 1);

  // A retried task leaves `failed` but not failed_total; its success counts too.
  REQUIRE(store.retry(failing.id()) == eoq::RetryOutcome::retried);
  s = totals();
  CHECK(s.failed == 0);
  CHECK(s.failed_total == 1);
  CHECK(s.pending == 1);
  store.complete(claim_one(store));
  s = totals();
  CHECK(s.succeeded == 4);
  CHECK(s.succeeded_total == 4);

  // A child waits for its parent (waiting), and is cancelled with it.
  auto parent = store.submit(task()).task.id;
  NewTask child = task("child");
  child.parents = {parent};
  store.submit(child);
  s = totals();
  CHECK(s.waiting == 1);
  CHECK(s.pending == 1);
  store.cancel(parent);
  s = totals();
  CHECK(s.waiting == 0);
  CHECK(s.pending == 0);
  CHECK(s.cancelled == 3);
  CHECK(s.cancelled_total == 3);

  // Another tenant's tasks count in its scope and in the whole, not in a third.
  NewTask theirs = task();
  theirs.tenant = "acme";
  store.submit(theirs);
  store.complete(claim_one(store));
  CHECK(totals("default", eoq::Scope::only("acme")).succeeded_total == 1);
  CHECK(totals("default", eoq::Scope::only("acme")).succeeded == 1);
  CHECK(totals("default", eoq::Scope::only("nobody")).succeeded_total == 0);
  CHECK(totals().succeeded_total == 5);

  // The same counts, minute by minute, from the same source.
  auto counted = [&](TaskStatus st, const eoq::Scope& scope = {}) {
    std::int64_t n = 0;
    for (auto& t : store.throughput(60, scope)) {
      CHECK(t.queue == "default");
      CHECK(t.minute <= now());
      CHECK(t.minute > now() - 62min);
      if (t.status == st) n += t.finished;
    }
    return n;
  };
  CHECK(counted(TaskStatus::succeeded) == 5);
  CHECK(counted(TaskStatus::failed) == 1);
  CHECK(counted(TaskStatus::cancelled) == 3);
  CHECK(counted(TaskStatus::expired) == 0);
  CHECK(counted(TaskStatus::succeeded, eoq::Scope::only("acme")) == 1);
  CHECK(field_of([&] { store.throughput(0); }) == "minutes");
  CHECK(field_of([&] { store.throughput(1441); }) == "minutes");

  // Retention deletes the rows: the counts of rows fall to 0; the totals,
  // the last minute and the minutes stay (they count finishings, not rows).
  CHECK(store.prune(0ms) == 8);  // 5 succeeded, 3 cancelled; the failed one was retried
  for (int round = 0; round < 2; ++round) {
    INFO("round " << round << (round ? ": after maintenance summed the totals" : ""));
    s = totals();
    CHECK(s.queue == "default");
    CHECK(s.succeeded == 0);
    CHECK(s.failed == 0);
    CHECK(s.cancelled == 0);
    CHECK(s.succeeded_total == 5);
    CHECK(s.failed_total == 1);
    CHECK(s.cancelled_total == 3);
    CHECK(s.succeeded_last_minute == 5);
    CHECK(s.failed_last_minute == 1);
    CHECK(counted(TaskStatus::succeeded) == 5);
    CHECK(counted(TaskStatus::cancelled) == 3);
    CHECK(totals("default", eoq::Scope::only("acme")).succeeded_total == 1);
    store.maintain();
  }
}

STORE_CASE("history lists every attempt with its outcome, error and owner", "[reads]") {
  NewTask t = task();
  t.retry = {.max_attempts = 4, .backoff = eoq::Backoff::fixed, .initial_delay = 0ms, .max_delay = 0ms,
             .jitter = 0};
  auto id = store.submit(t).task.id;
  auto l1 = claim_one(store, "w1");
  store.fail(l1, {"e1", false});
  claim_one(store, "w2", 100ms);
  std::this_thread::sleep_for(200ms);
  auto l3 = claim_one(store, "w3");
  auto h = store.history(id);
  REQUIRE(h.size() == 3);
  CHECK(h[0].number == 1);
  CHECK(h[0].owner == "w1");
  CHECK(h[0].outcome == "retry");
  CHECK(h[0].error == std::optional<std::string>("e1"));
  CHECK(h[0].finished_at);
  CHECK(h[1].number == 2);
  CHECK(h[1].owner == "w2");
  CHECK(h[1].outcome == "lease_expired");
  CHECK(h[1].error == std::optional<std::string>("lease expired"));
  CHECK(h[2].number == 3);
  CHECK(h[2].owner == "w3");
  CHECK(h[2].outcome == "running");
  CHECK_FALSE(h[2].finished_at);
  CHECK(h[0].started_at <= h[1].started_at);
  CHECK(h[1].started_at <= h[2].started_at);
  store.complete(l3);
  h = store.history(id);
  REQUIRE(h.size() == 3);
  CHECK(h[2].outcome == "succeeded");
  CHECK(h[2].finished_at);
}

STORE_CASE("stats count the tasks that finished in the last minute by outcome", "[reads]") {
  for (int i = 0; i < 3; ++i) store.submit(task("t", "q"));
  store.complete(claim_one(store, "w", 30s, "q"));
  store.complete(claim_one(store, "w", 30s, "q"));
  store.fail(claim_one(store, "w", 30s, "q"), {"x", true});
  auto c = store.submit(task("t", "q")).task.id;
  store.cancel(c);
  auto s = stats_of(store, "q");
  CHECK(s.succeeded_last_minute == 2);
  CHECK(s.failed_last_minute == 1);
  CHECK(s.cancelled == 1);
}
