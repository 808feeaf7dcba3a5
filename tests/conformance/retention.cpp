// Conformance: retention: prune, prunable, and maintain's slices.
#include "conformance/conformance.hpp"

// ---------------------------------------------------------------------------
// retention

STORE_CASE("prune deletes old finished tasks with their keys and history and leaves live tasks", "[prune]") {
  auto s = store.submit(keyed("k1")).task.id;
  store.complete(claim_one(store));
  store.submit(keyed("k2"));
  auto lf = claim_one(store);
  store.fail(lf, {"x", true});
  auto c = store.submit(keyed("k3")).task.id;
  store.cancel(c);
  auto p = store.submit(keyed("k4")).task.id;
  auto r = store.submit(keyed("k5")).task.id;
  NewTask pending_later = keyed("k6");
  pending_later.run_at = now() + 1h;
  store.submit(pending_later);
  auto lr = claim_one(store);
  REQUIRE(lr.id() == p);  // the first pending task
  std::this_thread::sleep_for(20ms);

  CHECK(store.prune(1h, 10) == 0);
  CHECK(store.prune(0ms, 1) == 3);
  CHECK_FALSE(store.get(s));
  CHECK_FALSE(store.get(lf.id()));
  CHECK_FALSE(store.get(c));
  CHECK(store.history(lf.id()).empty());
  CHECK_FALSE(store.find("default", "k1"));
  CHECK(must_get(store, p).status == TaskStatus::running);
  CHECK(must_get(store, r).status == TaskStatus::pending);
  CHECK(list_all(store).size() == 3);
  auto again = store.submit(keyed("k1"));
  CHECK_FALSE(again.duplicate);
  CHECK(again.task.id > s);
  store.complete(lr);  // the live lease still works

  SECTION("in bounded batches until none is left") {
    std::vector<NewTask> batch(25, task("t", "bulk"));
    for (auto& res : store.submit_batch(batch)) store.cancel(res.task.id);
    std::this_thread::sleep_for(20ms);
    CHECK(store.prune(0ms, 10) >= 25);
    CHECK(list_all(store, Q().queue("bulk")).empty());
    CHECK(stats_of(store, "bulk").cancelled == 0);
  }
}

STORE_CASE("maintain prunes finished tasks only when retention is configured", "[prune]") {
  store.submit(task());
  store.complete(claim_one(store));
  std::this_thread::sleep_for(20ms);
  CHECK(store.maintain().pruned == 0);
  CHECK(list_all(store).size() == 1);

  eoq::test::StoreOptions o;
  o.retention = 0ms;
  TestStore kept(S.kind(), o);
  kept->submit(task());
  auto l = claim_one(*kept);
  kept->complete(l);
  kept->submit(task());  // live: stays
  std::this_thread::sleep_for(20ms);
  CHECK(kept->maintain().pruned == 1);
  CHECK_FALSE(kept->get(l.id()));
  CHECK(list_all(*kept).size() == 1);
}

STORE_CASE("maintain works off a retention backlog in slices until nothing is left", "[prune]") {
  eoq::test::StoreOptions o;
  o.retention = 0ms;
  o.prune_batch = 10;
  o.prune_budget = 1ms;  // Postgres: a hundred statements cannot fit
  TestStore kept(S.kind(), o);
  std::vector<NewTask> tasks(1000, task());
  kept->submit_batch(tasks);
  auto leases = kept->claim(eoq::ClaimRequest{{"default"}, "w", 1000, 30s});
  REQUIRE(leases.size() == 1000);
  std::vector<eoq::Completion> done;
  for (const auto& l : leases) done.push_back({&l, "null"});
  kept->complete_batch(done);
  std::this_thread::sleep_for(20ms);

  auto first = kept->maintain();
  if (S.kind() == StoreKind::postgres) {
    CHECK(first.more);
    CHECK(first.pruned < 1000);
  } else {
    CHECK_FALSE(first.more);  // in memory, a backlog costs nothing worth slicing
  }
  std::int64_t pruned = first.pruned;
  for (bool more = first.more; more;) {
    auto r = kept->maintain();
    pruned += r.pruned;
    more = r.more;
  }
  CHECK(pruned == 1000);
  CHECK(list_all(*kept).empty());
  CHECK_FALSE(kept->maintain().more);
}

STORE_CASE("prunable counts what prune would delete and changes nothing", "[prune]") {
  store.submit(task());
  store.complete(claim_one(store));
  auto c = store.submit(task()).task.id;
  store.cancel(c);
  store.submit(task());
  std::this_thread::sleep_for(20ms);
  CHECK(store.prunable(1h) == 0);
  CHECK(store.prunable(0ms) == 2);
  CHECK(list_all(store).size() == 3);
  CHECK(store.prune(0ms) == 2);
  CHECK(store.prunable(0ms) == 0);
  CHECK(field_of([&] { store.prunable(-1ms); }) == "older_than");
}
