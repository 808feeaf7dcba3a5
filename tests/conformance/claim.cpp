// Conformance: claiming: order, limits, queues, exclusivity; the store's clock; waiting for tasks.
#include "conformance/conformance.hpp"

// ---------------------------------------------------------------------------
// claim

STORE_CASE("claims hand out tasks by priority then run_at then id", "[claim]") {
  auto base = now();
  auto sub = [&](int priority, std::optional<TimePoint> run_at) {
    NewTask t = task();
    t.priority = priority;
    t.run_at = run_at;
    return store.submit(t).task.id;
  };
  auto t1 = sub(5, std::nullopt);
  auto t2 = sub(-1, std::nullopt);
  auto t3 = sub(0, base - 10s);
  auto t4 = sub(0, base - 20s);
  auto t5 = sub(0, base - 20s);
  auto t6 = sub(0, std::nullopt);
  std::vector<eoq::TaskId> expected = {t2, t4, t5, t3, t6, t1};
  std::vector<eoq::TaskId> got;
  SECTION("in one claim") {
    for (auto& l : claim(store, {"default"}, "w", 10)) {
      CHECK(l.task.status == TaskStatus::running);
      got.push_back(l.id());
    }
  }
  SECTION("one at a time") {
    for (int i = 0; i < 6; ++i) got.push_back(claim_one(store).id());
    CHECK(claim(store, {"default"}, "w", 1).empty());
  }
  CHECK(got == expected);
}

STORE_CASE("a claim takes at most limit tasks", "[claim]") {
  for (int i = 0; i < 5; ++i) store.submit(task());
  CHECK(claim(store, {"default"}, "w", 2).size() == 2);
  CHECK(claim(store, {"default"}, "w", 2).size() == 2);
  CHECK(claim(store, {"default"}, "w", 2).size() == 1);
  CHECK(claim(store, {"default"}, "w", 2).empty());
}

STORE_CASE("a claim takes tasks from every queue it names and from no other", "[claim]") {
  auto a = store.submit(task("t", "a")).task.id;
  auto b = store.submit(task("t", "b")).task.id;
  auto c = store.submit(task("t", "c")).task.id;
  CHECK(claim(store, {"nothing-here"}, "w", 10).empty());
  auto got = claim(store, {"a", "b"}, "w", 10);
  std::set<eoq::TaskId> ids;
  for (auto& l : got) ids.insert(l.id());
  CHECK(ids == std::set<eoq::TaskId>{a, b});
  CHECK(must_get(store, c).status == TaskStatus::pending);
  auto gc = claim(store, {"c"}, "w", 10);
  REQUIRE(gc.size() == 1);
  CHECK(gc[0].id() == c);
}

// The Postgres store leases a claim's rows by their id range when the ids are
// close together and by the ids themselves when they are far apart; the other
// queues' tasks in between must stay as they were either way, through both
// the one-queue and the several-queue statement.
STORE_CASE("a claim leases its own tasks only, whether their ids are close together or far apart", "[claim]") {
  auto mixed = [&](const std::string& queue, int strangers_between) {
    std::vector<eoq::TaskId> mine, others;
    for (int i = 0; i < 6; ++i) {
      mine.push_back(store.submit(task("t", queue)).task.id);
      for (int j = 0; j < strangers_between; ++j) others.push_back(store.submit(task("t", "strangers")).task.id);
    }
    return std::pair{mine, others};
  };
  auto check = [&](const std::vector<eoq::Lease>& got, const std::vector<eoq::TaskId>& mine,
                   const std::vector<eoq::TaskId>& others) {
    std::vector<eoq::TaskId> ids;
    for (const auto& l : got) ids.push_back(l.id());
    CHECK(ids == mine);
    for (auto id : mine) CHECK(must_get(store, id).status == TaskStatus::running);
    for (auto id : others) {
      auto t = must_get(store, id);
      CHECK(t.status == TaskStatus::pending);
      CHECK(t.version == 1);
      CHECK_FALSE(t.lease_owner);
    }
  };
  SECTION("close together") {
    auto [mine, others] = mixed("near", 1);
    check(claim(store, {"near"}, "w", 10), mine, others);
  }
  SECTION("far apart") {
    auto [mine, others] = mixed("apart", 8);
    check(claim(store, {"apart"}, "w", 10), mine, others);
  }
  SECTION("far apart, several queues") {
    auto [mine, others] = mixed("apart", 8);
    check(claim(store, {"apart", "empty"}, "w", 10), mine, others);
  }
}

STORE_CASE("a claim with `after` takes only tasks past that place in claim order, and leaves the rest",
           "[claim]") {
  auto sub = [&](int priority, const std::string& queue) {
    NewTask t = task("t", queue);
    t.priority = priority;
    return store.submit(t).task;
  };
  auto t1 = sub(0, "default"), t2 = sub(0, "other"), t3 = sub(0, "default"), t4 = sub(5, "other");
  eoq::ClaimRequest r;
  r.owner = "w";
  r.limit = 10;
  r.after = eoq::ClaimPosition{t2.priority, t2.run_at, t2.id};
  SECTION("one queue") {
    r.queues = {"default"};
    auto got = store.claim(r);
    REQUIRE(got.size() == 1);
    CHECK(got[0].id() == t3.id);
    r.after.reset();
    got = store.claim(r);
    REQUIRE(got.size() == 1);
    CHECK(got[0].id() == t1.id);
  }
  SECTION("several queues") {
    r.queues = {"default", "other"};
    auto got = store.claim(r);
    REQUIRE(got.size() == 2);
    CHECK(got[0].id() == t3.id);
    CHECK(got[1].id() == t4.id);
    r.after.reset();
    got = store.claim(r);
    REQUIRE(got.size() == 2);
    CHECK(got[0].id() == t1.id);
    CHECK(got[1].id() == t2.id);
  }
  SECTION("a lost lease before the place is left too") {
    r.queues = {"default", "other"};
    r.after.reset();
    r.lease = 1ms;
    r.limit = 1;
    REQUIRE(store.claim(r).at(0).id() == t1.id);
    std::this_thread::sleep_for(20ms);
    r.lease = 30s;
    r.limit = 10;
    r.after = eoq::ClaimPosition{t2.priority, t2.run_at, t2.id};
    auto got = store.claim(r);
    REQUIRE(got.size() == 2);
    CHECK(got[0].id() == t3.id);
    r.after.reset();
    got = store.claim(r);
    REQUIRE(got.size() == 2);
    CHECK(got[0].id() == t1.id);  // the lost lease, taken over
    CHECK(got[0].attempt() == 2);
    CHECK(got[1].id() == t2.id);
  }
}

// The Postgres store first tries a claim that only leases pending tasks, and
// falls back to the one that also settles when a candidate needs it: a lost
// lease to record (and lease again) or a deadline passed.
STORE_CASE("a claim that meets tasks to settle among pending ones settles those and leases the rest", "[claim]") {
  // In claim order: b (its lease runs out), a, c (its deadline passes), d.
  NewTask lost = task();
  lost.retry.max_attempts = 5;
  auto b = store.submit(lost).task.id;
  REQUIRE(claim_one(store, "w-old", 100ms).id() == b);
  auto a = store.submit(task()).task.id;
  NewTask late = task();
  late.deadline = now() + 150ms;
  auto c = store.submit(late).task.id;
  auto d = store.submit(task()).task.id;
  std::this_thread::sleep_for(300ms);
  std::vector<std::string> queues{"default"};
  std::set<eoq::TaskId> got;
  auto take = [&](int limit) {
    for (auto& l : claim(store, queues, "w-new", limit)) got.insert(l.id());
  };
  SECTION("in one claim") { take(10); }
  SECTION("in one claim on two queues") {
    queues.push_back("elsewhere");
    take(10);
  }
  SECTION("in claims of two") {
    take(2);
    CHECK(got == std::set<eoq::TaskId>{b, a});
    take(2);
  }
  SECTION("in claims of two on two queues") {
    queues.push_back("elsewhere");
    take(2);
    CHECK(got == std::set<eoq::TaskId>{b, a});
    take(2);
  }
  CHECK(got == std::set<eoq::TaskId>{a, b, d});
  for (auto id : got) {
    auto t = must_get(store, id);
    CHECK(t.status == TaskStatus::running);
    CHECK(t.lease_owner == std::optional<std::string>("w-new"));
  }
  CHECK(must_get(store, b).attempts == 2);
  auto h = store.history(b);
  REQUIRE(h.size() == 2);  // the lost attempt, and the one now running
  CHECK(h[0].owner == "w-old");
  CHECK(h[0].outcome == "lease_expired");
  CHECK(h[1].owner == "w-new");
  auto e = must_get(store, c);
  CHECK(e.status == TaskStatus::expired);
  CHECK(e.last_error == std::optional<std::string>("deadline passed"));
  CHECK(claim(store, queues, "w-new", 10).empty());
}

STORE_CASE("a task whose run_at is in the future is not claimed until then", "[claim]") {
  NewTask t = task();
  t.run_at = now() + 1s;
  auto id = store.submit(t).task.id;
  CHECK(claim(store, {"default"}, "w", 10).empty());
  CHECK(must_get(store, id).status == TaskStatus::pending);
  std::this_thread::sleep_until(*t.run_at + 50ms);
  auto got = claim(store, {"default"}, "w", 10);
  REQUIRE(got.size() == 1);
  CHECK(got[0].id() == id);
}

STORE_CASE("a claim makes the task running with a new version, an owner and a lease expiry", "[claim]") {
  auto submitted = store.submit(task()).task;
  auto before = now();
  auto l = claim_one(store, "worker-1", 10s);
  auto after = now();
  CHECK(l.owner == "worker-1");
  CHECK(l.task.id == submitted.id);
  CHECK(l.task.status == TaskStatus::running);
  CHECK(l.task.attempts == 1);
  CHECK(l.attempt() == 1);
  CHECK(l.task.version == submitted.version + 1);
  CHECK(l.token == l.task.version);
  CHECK(l.task.lease_owner == std::optional<std::string>("worker-1"));
  REQUIRE(l.task.lease_expires_at);
  CHECK(*l.task.lease_expires_at == l.expires_at);
  CHECK(l.expires_at >= before + 10s - kSlack);
  CHECK(l.expires_at <= after + 10s + kSlack);
  auto got = must_get(store, l.id());
  CHECK(describe(got) == describe(l.task));
  auto h = store.history(l.id());
  REQUIRE(h.size() == 1);
  CHECK(h[0].number == 1);
  CHECK(h[0].owner == "worker-1");
  CHECK(h[0].outcome == "running");
  CHECK_FALSE(h[0].finished_at);
  CHECK(h[0].started_at >= before - 1s);
  CHECK(h[0].started_at <= after + 1s);
}

STORE_CASE("eight threads claiming at once hand out every task exactly once", "[claim][concurrency]") {
  constexpr int kTasks = 400, kThreads = 8;
  std::vector<NewTask> batch(kTasks, task());
  store.submit_batch(batch);
  std::vector<std::vector<Lease>> got(kThreads);
  std::vector<std::string> errors(kThreads);
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      auto& mine = got[static_cast<std::size_t>(i)];
      go.arrive_and_wait();
      try {
        for (;;) {
          auto ls = claim(store, {"default"}, fmt::format("w{}", i), 7);
          if (ls.empty()) break;
          for (auto& l : ls) mine.push_back(std::move(l));
        }
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(i)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& e : errors) CHECK(e.empty());
  std::map<eoq::TaskId, int> times;
  std::vector<eoq::Completion> completions;
  for (auto& per : got)
    for (auto& l : per) {
      ++times[l.id()];
      completions.push_back({&l, "1"});
    }
  CHECK(times.size() == kTasks);
  CHECK(completions.size() == kTasks);
  int twice = 0;
  for (auto& [id, n] : times) twice += n > 1 ? 1 : 0;
  CHECK(twice == 0);
  CHECK(stats_of(store, "default").running == kTasks);
  auto applied = store.complete_batch(completions);
  CHECK(std::count(applied.begin(), applied.end(), true) == kTasks);
  CHECK(stats_of(store, "default").succeeded == kTasks);
}

// ---------------------------------------------------------------------------
// the store's time in a lease

STORE_CASE("a claim tells the store's time of the claim in the lease", "[deadline]") {
  store.submit(task());
  auto before = now();
  auto l = claim_one(store);
  auto after = now();
  CHECK(l.claimed_at == l.task.started_at.value_or(TimePoint{}));
  CHECK(l.claimed_at >= before - kSlack);
  CHECK(l.claimed_at <= after + kSlack);
}

// ---------------------------------------------------------------------------
// waiting

STORE_CASE("wait_for_tasks returns on a submit to its queue, on wake and at the timeout", "[wait]") {
  // Each section bounds the wait from both sides: it does not return before its
  // cause (a wait that returns at once fails here), and it returns well before
  // the timeout it would otherwise sit out. A first wait of 0 ms makes the store
  // listen (Postgres: LISTEN), so a submit made before the second wait is heard.
  using Steady = std::chrono::steady_clock;
  SECTION("a submit wakes a waiter, not before it is made") {
    store.wait_for_tasks({"woken"}, 0ms);
    std::atomic<bool> submitting{false};
    auto t0 = Steady::now();
    std::thread submitter([&] {
      std::this_thread::sleep_for(200ms);
      submitting = true;
      store.submit(task("t", "woken"));
    });
    store.wait_for_tasks({"woken"}, 60s);
    auto waited = Steady::now() - t0;
    const bool after_submit = submitting;  // read before the join, which waits for the submit
    submitter.join();
    CHECK(after_submit);
    CHECK(waited < 30s);  // the timeout would take 60 s
  }
  SECTION("a large batch wakes a waiter on each of its queues") {
    // Batches of 1,000 and more notify from the list of their queues, each
    // once: "second" is neither the first task's queue nor the only one.
    for (bool narrow : {false, true}) {
      INFO("narrow " << narrow);
      const std::string queue = narrow ? "only" : "second";
      store.wait_for_tasks({queue}, 0ms);
      std::atomic<bool> submitting{false};
      auto t0 = Steady::now();
      std::thread submitter([&] {
        std::this_thread::sleep_for(200ms);
        std::vector<NewTask> batch;
        for (int i = 0; i < 1200; ++i) batch.push_back(task("t", narrow ? "only" : i % 3 == 0 ? "first" : "second"));
        submitting = true;
        store.submit_batch(batch);
      });
      store.wait_for_tasks({queue}, 60s);
      auto waited = Steady::now() - t0;
      const bool after_submit = submitting;
      submitter.join();
      CHECK(after_submit);
      CHECK(waited < 30s);  // the timeout would take 60 s
    }
  }
  SECTION("a batch that creates no task wakes no waiter") {
    // Every key taken: nothing is created, so nothing is announced. A large
    // batch too, whose first try (Postgres: COPY) meets the taken keys only
    // after it has drawn its ids and queued its notifications.
    for (int size : {3, 1200}) {
      INFO("batch of " << size);
      std::vector<NewTask> batch;
      for (int i = 0; i < size; ++i) batch.push_back(keyed(fmt::format("dup-{}-{}", size, i), "dup"));
      store.submit_batch(batch);
      store.wait_for_tasks({"dup"}, 0ms);
      // The batch that created the tasks did announce them, to a store already
      // listening since the first round: take that announcement first.
      store.wait_for_tasks({"dup"}, 300ms);
      for (const auto& r : store.submit_batch(batch)) REQUIRE(r.duplicate);
      auto t0 = Steady::now();
      store.wait_for_tasks({"dup"}, 400ms);
      CHECK(Steady::now() - t0 >= 395ms);
    }
  }
  SECTION("wake ends a wait, not before it is called") {
    store.wait_for_tasks({"quiet"}, 0ms);
    std::atomic<bool> waking{false};
    auto t0 = Steady::now();
    std::thread waker([&] {
      std::this_thread::sleep_for(200ms);
      waking = true;
      store.wake();
    });
    store.wait_for_tasks({"quiet"}, 60s);
    auto waited = Steady::now() - t0;
    const bool after_wake = waking;  // read before the join, which waits for the wake
    waker.join();
    CHECK(after_wake);
    CHECK(waited < 30s);  // the timeout would take 60 s
  }
  SECTION("a wake just before a wait ends that wait at once, and only that one") {
    // A worker wakes its store when a retry comes due sooner than its
    // claimer's wait; that wake can come a moment before the wait begins.
    store.wait_for_tasks({"quiet"}, 0ms);
    store.wake();
    auto t0 = Steady::now();
    store.wait_for_tasks({"quiet"}, 60s);
    CHECK(Steady::now() - t0 < 30s);  // the timeout would take 60 s
    auto t1 = Steady::now();
    store.wait_for_tasks({"quiet"}, 300ms);
    CHECK(Steady::now() - t1 >= 295ms);  // the wake was used up
  }
  SECTION("the timeout ends a wait, and is waited") {
    store.wait_for_tasks({"quiet"}, 0ms);
    auto t0 = Steady::now();
    store.wait_for_tasks({"quiet"}, 300ms);
    auto waited = Steady::now() - t0;
    CHECK(waited >= 295ms);  // (a whole millisecond may be lost to rounding)
    CHECK(waited < 30s);
  }
  SECTION("a submit to another queue does not end a wait") {
    store.wait_for_tasks({"quiet"}, 0ms);
    std::atomic<bool> entered{false}, returned{false};
    Steady::duration waited{};
    std::thread waiter([&] {
      entered = true;
      auto t0 = Steady::now();
      store.wait_for_tasks({"quiet"}, 3000ms);
      waited = Steady::now() - t0;
      returned = true;
    });
    while (!entered) std::this_thread::sleep_for(1ms);
    int submitted_while_waiting = 0;
    for (int i = 0; i < 5; ++i) {
      store.submit(task("t", "other"));
      if (!returned) ++submitted_while_waiting;
      std::this_thread::sleep_for(20ms);
    }
    waiter.join();
    CHECK(submitted_while_waiting >= 1);
    CHECK(waited >= 2995ms);  // the whole timeout: no submit to "other" ended it
  }
}

STORE_CASE("now() is the store's clock", "[clock]") {
  auto before = now();
  auto t = store.now();
  auto after = now();
  // The test server runs on this host, so its clock and ours agree to within rounding.
  CHECK(t >= before - kSlack);
  CHECK(t <= after + kSlack);
  // The clock leases are measured by: a claim right after reads no earlier time.
  store.submit(task());
  CHECK(claim_one(store).claimed_at >= t);
}

STORE_CASE("a paused queue is claimed by nobody until resumed; its running tasks settle; stats show it",
           "[claim][pause]") {
  auto running = store.submit(task("t", "q")).task.id;
  auto held = claim(store, {"q"}, "w1", 1);
  REQUIRE(held.size() == 1);
  REQUIRE(held[0].id() == running);
  store.pause("q");
  store.pause("q");  // idempotent
  CHECK(store.paused_queues() == std::vector<std::string>{"q"});
  for (int i = 0; i < 3; ++i) store.submit(task("t", "q"));  // submits go on
  auto other = store.submit(task("t", "r")).task.id;

  auto got = claim(store, {"q", "r"}, "w2", 10);
  REQUIRE(got.size() == 1);
  CHECK(got[0].id() == other);
  CHECK(claim(store, {"q"}, "w2", 10).empty());
  store.complete(held[0]);  // a task running when the queue was paused settles as usual
  CHECK(must_get(store, running).status == TaskStatus::succeeded);

  auto q = stats_of(store, "q");
  CHECK(q.paused);
  CHECK(q.pending == 3);
  CHECK_FALSE(stats_of(store, "r").paused);
  // A paused queue with no tasks is still listed, so that it can be resumed.
  store.pause("empty");
  CHECK(stats_of(store, "empty").paused);
  CHECK(stats_of(store, "empty").pending == 0);
  // A tenant's scope shows the pause only on queues it has tasks in: it says
  // nothing of others' queues.
  CHECK(store.stats(eoq::Scope::only("nobody")).empty());
  NewTask mine = task("t", "q");
  mine.tenant = "acme";
  store.submit(mine);
  auto scoped = store.stats(eoq::Scope::only("acme"));
  REQUIRE(scoped.size() == 1);
  CHECK(scoped[0].queue == "q");
  CHECK(scoped[0].paused);
  CHECK(field_of([&] { store.pause("bad queue!"); }) == "queue");
  CHECK(field_of([&] { store.resume(""); }) == "queue");

  store.resume("q");
  store.resume("q");  // idempotent
  store.resume("never-paused");
  CHECK(store.paused_queues() == std::vector<std::string>{"empty"});
  CHECK(claim(store, {"q"}, "w2", 10).size() == 4);  // acme's too
  CHECK_FALSE(stats_of(store, "q").paused);
}
