// Conformance: workflows (docs/contract.md, "Workflows"): tasks submitted in a
// lease's transaction exist if and only if it commits; a task that names
// parents waits until all of them succeeded, is released exactly once, and is
// cancelled when one ends otherwise.
#include "conformance/conformance.hpp"

#include <eoq/worker.hpp>

#include <mutex>

using eoq::TaskId;
using eoq::test::eventually;

namespace {

NewTask with_parents(std::string type, std::vector<TaskId> parents) {
  NewTask t = task(std::move(type));
  t.parents = std::move(parents);
  return t;
}

// The lease of `id`; the other tasks claimed with it are given back unrun, so a
// later claim_id finds them.
Lease claim_id(eoq::TaskStore& store, TaskId id) {
  std::optional<Lease> found;
  for (auto& l : claim(store, {"default"}, "w1", 100)) {
    if (l.id() == id) found = l;
    else store.release(l);
  }
  if (!found) FAIL("task " << id << " was not claimable");
  return *found;
}

std::vector<TaskId> ids_of(const std::vector<eoq::Relative>& rs) {
  std::vector<TaskId> out;
  for (const auto& r : rs) out.push_back(r.id);
  return out;
}

}  // namespace

STORE_CASE("tasks submitted in a lease's transaction exist only once it commits", "[workflows]") {
  auto parent = store.submit(task("parent")).task.id;
  {
    auto tx = store.begin(claim_id(store, parent));
    auto child = tx->submit(task("child"));
    auto batch = tx->submit_batch(std::vector<NewTask>{task("b1"), task("b2")});
    CHECK_FALSE(child.duplicate);
    CHECK(child.task.id > parent);
    CHECK_FALSE(store.get(child.task.id));
    CHECK_FALSE(store.get(batch[1].task.id));
    tx->complete("1");
    CHECK(must_get(store, child.task.id).status == TaskStatus::pending);
    CHECK(store.get(batch[0].task.id)->type == "b1");
    CHECK(store.get(batch[1].task.id)->type == "b2");
  }
  SECTION("a transaction that ends without settling, or whose lease was lost, leaves none") {
    auto p2 = store.submit(task("parent")).task.id;
    auto lease = claim_id(store, p2);
    TaskId dropped = 0, lost = 0;
    {
      auto tx = store.begin(lease);
      dropped = tx->submit(task("child")).task.id;
    }
    auto stale = store.begin(lease);
    lost = stale->submit(task("child")).task.id;
    store.complete(lease);  // settles through another path: the lease in `stale` is now stale
    CHECK_THROWS_AS(stale->complete(), eoq::LeaseLost);
    CHECK_FALSE(store.get(dropped));
    CHECK_FALSE(store.get(lost));
    for (const auto& l : claim(store, {"default"}, "w1", 100)) {
      CHECK(l.id() != dropped);
      CHECK(l.id() != lost);
    }
  }
  SECTION("a checkpoint commits what was submitted so far; a failure keeps it too") {
    auto p2 = store.submit(task("parent")).task.id;
    auto tx = store.begin(claim_id(store, p2));
    auto a = tx->submit(task("a")).task.id;
    tx->checkpoint("one", "{}");
    CHECK(must_get(store, a).status == TaskStatus::pending);
    auto b = tx->submit(task("b")).task.id;
    tx->fail({"boom", false});
    CHECK(must_get(store, b).status == TaskStatus::pending);
  }
}

STORE_CASE("keys, duplicates and validation in a lease's transaction are those of submit", "[workflows]") {
  auto held = store.submit(keyed("held")).task.id;
  auto p = store.submit(task("parent")).task.id;
  auto tx = store.begin(claim_id(store, p));
  auto first = tx->submit(keyed("k"));
  auto again = tx->submit(keyed("k"));
  CHECK(again.duplicate);
  CHECK(again.task.id == first.task.id);
  auto old = tx->submit(keyed("held"));
  CHECK(old.duplicate);
  CHECK(old.task.id == held);
  CHECK_THROWS_AS(tx->submit(keyed("held", "default", R"({"other":1})")), eoq::KeyConflict);
  // A batch refused part way writes nothing of itself, and the transaction goes on.
  std::vector<NewTask> bad{keyed("fresh"), keyed("held", "default", "[1]")};
  CHECK(field_of([&] { tx->submit_batch(bad); }) == "tasks[1].key");
  NewTask empty = task("");
  CHECK(field_of([&] { tx->submit(empty); }) == "type");
  tx->complete();
  CHECK(store.find("default", "k")->id == first.task.id);
  CHECK_FALSE(store.find("default", "fresh"));
}

STORE_CASE("a task waits until every parent succeeded, and is released once", "[workflows]") {
  auto p1 = store.submit(task("p")).task.id;
  auto p2 = store.submit(task("p")).task.id;
  auto child = store.submit(with_parents("child", {p1, p2, p1})).task;
  CHECK(child.status == TaskStatus::waiting);
  CHECK(must_get(store, child.id).status == TaskStatus::waiting);
  auto rel = store.relatives(child.id);
  CHECK(ids_of(rel.parents) == std::vector<TaskId>{p1, p2});
  CHECK(ids_of(store.relatives(p1).children) == std::vector<TaskId>{child.id});
  auto st = store.stats();
  REQUIRE(st.size() == 1);
  CHECK(st[0].waiting == 1);
  CHECK(st[0].pending == 2);

  auto leases = claim(store, {"default"}, "w1", 100);
  REQUIRE(leases.size() == 2);  // the child is not claimable
  store.complete(leases[0], R"({"part":1})");
  CHECK(must_get(store, child.id).status == TaskStatus::waiting);
  store.complete(leases[1], R"({"part":2})");
  CHECK(must_get(store, child.id).status == TaskStatus::pending);
  auto next = claim(store, {"default"}, "w1", 100);
  REQUIRE(next.size() == 1);
  CHECK(next[0].id() == child.id);
  rel = store.relatives(child.id);
  REQUIRE(rel.parents.size() == 2);
  CHECK(rel.parents[0].status == TaskStatus::succeeded);
  CHECK(rel.parents[1].result == std::optional<std::string>(R"({"part":2})"));
  // A parent never counts twice: a retry of an ended parent changes nothing for it.
  CHECK(store.retry(p1) == eoq::RetryOutcome::not_retryable);
}

STORE_CASE("a parent that fails cancels its waiting dependents and theirs, but a run-anyway dependent runs",
           "[workflows]") {
  auto p = store.submit(task("p")).task.id;
  auto ok = store.submit(task("p")).task.id;
  auto c = store.submit(with_parents("c", {p, ok})).task.id;
  auto g = store.submit(with_parents("g", {c})).task.id;
  NewTask anyway = with_parents("r", {p});
  anyway.on_parent_failure = eoq::ParentFailure::run;
  auto r = store.submit(anyway).task.id;
  auto leases = claim(store, {"default"}, "w1", 100);
  REQUIRE(leases.size() == 2);  // p and ok; c, g and r wait
  store.fail(leases[0], {"bad input", true});
  auto ct = store.get(c);
  CHECK(ct->status == TaskStatus::cancelled);
  CHECK(ct->last_error == std::optional<std::string>(fmt::format("parent {} ended failed", p)));
  CHECK(store.get(g)->last_error == std::optional<std::string>(fmt::format("parent {} ended cancelled", c)));
  CHECK(must_get(store, r).status == TaskStatus::pending);
  // The other parent ending later changes nothing for the cancelled child.
  store.complete(leases[1]);
  CHECK(leases[1].id() == ok);
  CHECK(must_get(store, c).status == TaskStatus::cancelled);
  // Retrying the failed parent does not revive its dependents, and it counts once.
  CHECK(store.retry(p) == eoq::RetryOutcome::retried);
  for (auto& l : claim(store, {"default"}, "w1", 100)) store.complete(l);  // r and p again
  CHECK(must_get(store, c).status == TaskStatus::cancelled);
}

STORE_CASE("a run-anyway dependent of several parents waits until the last of them ended, however each ended",
           "[workflows]") {
  // Three parents ending one by one, in each order of outcomes that matters:
  // a failure first, a success first; the child must wait for all three.
  const bool first_fails = GENERATE(true, false);
  INFO((first_fails ? "the first parent fails" : "the first parent succeeds"));
  std::vector<TaskId> parents;
  for (int i = 0; i < 3; ++i) parents.push_back(store.submit(task("p")).task.id);
  NewTask anyway = with_parents("r", parents);
  anyway.on_parent_failure = eoq::ParentFailure::run;
  auto r = store.submit(anyway).task.id;
  CHECK(must_get(store, r).status == TaskStatus::waiting);

  auto first = claim_id(store, parents[0]);
  if (first_fails) store.fail(first, {"bad input", true});
  else store.complete(first);
  CHECK(must_get(store, r).status == TaskStatus::waiting);
  auto st = stats_of(store, "default");
  CHECK(st.waiting == 1);

  auto second = claim_id(store, parents[1]);
  if (first_fails) store.complete(second);
  else store.fail(second, {"bad input", true});
  CHECK(must_get(store, r).status == TaskStatus::waiting);
  // Nothing but the last parent is claimable: the child is not.
  auto leases = claim(store, {"default"}, "w1", 100);
  REQUIRE(leases.size() == 1);
  CHECK(leases[0].id() == parents[2]);

  store.complete(leases[0]);
  CHECK(must_get(store, r).status == TaskStatus::pending);
  auto next = claim(store, {"default"}, "w1", 100);
  REQUIRE(next.size() == 1);
  CHECK(next[0].id() == r);
  auto rel = store.relatives(r);
  REQUIRE(rel.parents.size() == 3);
  CHECK(rel.parents[0].status == (first_fails ? TaskStatus::failed : TaskStatus::succeeded));
  CHECK(rel.parents[1].status == (first_fails ? TaskStatus::succeeded : TaskStatus::failed));
  CHECK(rel.parents[2].status == TaskStatus::succeeded);
}

STORE_CASE("parents that already ended, parents by key, cancel of a waiting task", "[workflows]") {
  auto done = store.submit(keyed("done")).task.id;
  store.complete(claim_id(store, done));
  auto failed = store.submit(task("f")).task.id;
  store.fail(claim_id(store, failed), {"no", true});

  NewTask by_key = task("child");
  by_key.parent_keys = {"done"};
  auto ready = store.submit(by_key).task;
  CHECK(ready.status == TaskStatus::pending);
  CHECK(ids_of(store.relatives(ready.id).parents) == std::vector<TaskId>{done});

  auto born = store.submit(with_parents("child", {done, failed})).task;
  CHECK(born.status == TaskStatus::cancelled);
  CHECK(must_get(store, born.id).status == TaskStatus::cancelled);
  CHECK(store.get(born.id)->last_error == std::optional<std::string>(fmt::format("parent {} ended failed", failed)));

  auto live = store.submit(task("p")).task.id;
  auto w = store.submit(with_parents("w", {live})).task.id;
  auto ww = store.submit(with_parents("ww", {w})).task.id;
  CHECK(store.cancel(w) == eoq::CancelOutcome::cancelled);
  CHECK(must_get(store, ww).status == TaskStatus::cancelled);
  CHECK(store.cancel(w) == eoq::CancelOutcome::already_finished);
}

STORE_CASE("parents that do not exist, or belong to another tenant, are refused and nothing is written",
           "[workflows]") {
  NewTask other;
  other.type = "t";
  other.tenant = "acme";
  auto theirs = store.submit(other).task.id;
  auto mine = store.submit(task()).task.id;
  CHECK(field_of([&] { store.submit(with_parents("c", {mine, theirs})); }) == "parents[1]");
  CHECK(field_of([&] { store.submit(with_parents("c", {mine + 1000})); }) == "parents[0]");
  NewTask by_key = task("c");
  by_key.parent_keys = {"nobody"};
  CHECK(field_of([&] { store.submit(by_key); }) == "parent_keys[0]");
  NewTask zero = with_parents("c", {0});
  CHECK(field_of([&] { store.submit(zero); }) == "parents[0]");
  std::vector<NewTask> batch{keyed("first"), with_parents("c", {mine + 1000})};
  CHECK(field_of([&] { store.submit_batch(batch); }) == "tasks[1].parents[0]");
  CHECK_FALSE(store.find("default", "first"));
  // Within a batch a task may name an earlier one by key.
  NewTask second = task("c");
  second.parent_keys = {"first"};
  auto ok = store.submit_batch(std::vector<NewTask>{keyed("first"), second});
  CHECK(ok[1].task.status == TaskStatus::waiting);
  CHECK(ids_of(store.relatives(ok[1].task.id).parents) == std::vector<TaskId>{ok[0].task.id});
  // A chain in one batch whose head names a failed task: each is born
  // cancelled, naming the one before it.
  auto failed = store.submit(task("f")).task.id;
  store.fail(claim_id(store, failed), {"no", true});
  NewTask head = keyed("head");
  head.parents = {failed};
  NewTask mid = keyed("mid");
  mid.parent_keys = {"head"};
  NewTask tail = task("tail");
  tail.parent_keys = {"mid"};
  auto chain = store.submit_batch(std::vector<NewTask>{head, mid, tail});
  TaskId before = failed;
  std::string how = "failed";
  for (const auto& r : chain) {
    CHECK(r.task.status == TaskStatus::cancelled);
    CHECK(store.get(r.task.id)->status == TaskStatus::cancelled);
    CHECK(store.get(r.task.id)->last_error == std::optional<std::string>(fmt::format("parent {} ended {}", before, how)));
    before = r.task.id;
    how = "cancelled";
  }
  // Only an earlier task of the batch counts: a key a later one takes is refused.
  NewTask early = task("early");
  early.parent_keys = {"later"};
  CHECK(field_of([&] { store.submit_batch(std::vector<NewTask>{early, keyed("later")}); }) == "tasks[0].parent_keys[0]");
  CHECK_FALSE(store.find("default", "later"));
}

STORE_CASE("many parents ending at the same instant release their child exactly once", "[workflows][concurrency]") {
  constexpr int kParents = 40;
  std::vector<NewTask> parents(kParents, task("p"));
  std::vector<TaskId> ids;
  for (auto& r : store.submit_batch(parents)) ids.push_back(r.task.id);
  auto child = store.submit(with_parents("child", ids)).task.id;
  auto leases = claim(store, {"default"}, "w1", kParents);
  REQUIRE(leases.size() == kParents);
  std::vector<std::unique_ptr<eoq::TaskStore>> stores;
  constexpr int kThreads = 4;
  for (int i = 0; i < kThreads; ++i) stores.push_back(S.another());
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      eoq::TaskStore& s = stores[static_cast<std::size_t>(i)] ? *stores[static_cast<std::size_t>(i)] : store;
      go.arrive_and_wait();
      for (int j = i; j < kParents; j += kThreads) s.complete(leases[static_cast<std::size_t>(j)]);
    });
  for (auto& t : threads) t.join();
  CHECK(must_get(store, child).status == TaskStatus::pending);
  auto next = claim(store, {"default"}, "w1", 100);
  REQUIRE(next.size() == 1);
  CHECK(next[0].id() == child);
}

STORE_CASE("a dependent submitted while its parent settles is never left waiting", "[workflows][concurrency]") {
  auto other = S.another();
  eoq::TaskStore& submitter = other ? *other : store;
  for (int round = 0; round < 30; ++round) {
    auto p = store.submit(task("p")).task.id;
    auto lease = claim_id(store, p);
    const bool fails = round % 3 == 2;
    std::latch go(2);
    TaskId child = 0;
    std::thread t([&] {
      go.arrive_and_wait();
      child = submitter.submit(with_parents("c", {p})).task.id;
    });
    go.arrive_and_wait();
    if (fails) store.fail(lease, {"no", true});
    else store.complete(lease);
    t.join();
    INFO("round " << round);
    CHECK(must_get(store, child).status == (fails ? TaskStatus::cancelled : TaskStatus::pending));
    if (!fails) store.complete(claim_id(store, child));
  }
}

namespace {

eoq::WorkerOptions quiet_options() {
  eoq::WorkerOptions o;
  o.concurrency = 2;
  o.lease = 5000ms;
  o.poll_interval = 50ms;
  o.maintenance_interval = 0ms;
  o.logger = [](eoq::LogLevel, std::string_view) {};
  return o;
}

}  // namespace

STORE_CASE("Worker: a handler's submits exist only if its task completes, and a child reads its parents' results",
           "[workflows][worker]") {
  std::atomic<int> parent_runs{0}, child_runs{0};
  std::mutex mu;
  std::vector<eoq::Relative> seen;
  eoq::Worker worker(store, quiet_options());
  worker.on("order", [&](eoq::TaskContext& ctx) {
    NewTask receipt = task("receipt");
    receipt.key = fmt::format("receipt-of-{}", ctx.id());
    ctx.submit(receipt);
    // The first attempt fails after its submit: the submit rolls back with it.
    if (++parent_runs == 1) throw std::runtime_error("card declined");
    ctx.set_result(R"({"charged":true})");
  });
  worker.on("receipt", [&](eoq::TaskContext&) { ++child_runs; });
  worker.on("part", [&](eoq::TaskContext& ctx) { ctx.set_result(ctx.payload()); });
  worker.on("report", [&](eoq::TaskContext& ctx) {
    std::lock_guard lk(mu);
    seen = ctx.parent_results();
  });
  NewTask order = task("order");
  order.retry.initial_delay = 0ms;
  auto id = store.submit(order).task.id;
  NewTask p1 = task("part"), p2 = task("part");
  p1.payload = "[1]";
  p2.payload = "[2]";
  auto a = store.submit(p1).task.id, b = store.submit(p2).task.id;
  auto report = store.submit(with_parents("report", {a, b})).task.id;
  worker.start();
  REQUIRE(eventually([&] {
    auto r = store.find("default", fmt::format("receipt-of-{}", id));
    return r && r->status == TaskStatus::succeeded && must_get(store, report).status == TaskStatus::succeeded;
  }, 20s));
  worker.stop();
  CHECK(parent_runs == 2);
  CHECK(child_runs == 1);
  CHECK(store.history(id).size() == 2);
  std::lock_guard lk(mu);
  REQUIRE(seen.size() == 2);
  CHECK(seen[0].id == a);
  CHECK(seen[0].result == std::optional<std::string>("[1]"));
  CHECK(seen[1].result == std::optional<std::string>("[2]"));
}
