// Conformance: tenants: keys per tenant, and a scope that never reaches another tenant.
#include "conformance/conformance.hpp"

// ---------------------------------------------------------------------------
// tenants

namespace {
NewTask owned(std::optional<std::string> tenant, std::optional<std::string> key = std::nullopt,
              std::string queue = "default") {
  NewTask t = task("t", std::move(queue));
  t.tenant = std::move(tenant);
  t.key = std::move(key);
  return t;
}
const eoq::Scope A = eoq::Scope::only("a");
const eoq::Scope B = eoq::Scope::only("b");
}  // namespace

STORE_CASE("keys are unique per queue and tenant, so one tenant's key never answers with another's task",
           "[tenant][key]") {
  auto a = store.submit(owned("a", "k"));
  auto b = store.submit(owned("b", "k"));
  auto none = store.submit(owned(std::nullopt, "k"));
  CHECK_FALSE(a.duplicate);
  CHECK_FALSE(b.duplicate);
  CHECK_FALSE(none.duplicate);
  CHECK(a.task.id != b.task.id);
  CHECK(b.task.id != none.task.id);
  auto a2 = store.submit(owned("a", "k"));
  CHECK(a2.duplicate);
  CHECK(a2.task.id == a.task.id);
  CHECK(a2.task.tenant == std::optional<std::string>("a"));
  CHECK(store.submit(owned("b", "k")).task.id == b.task.id);
  CHECK(store.submit(owned(std::nullopt, "k")).task.id == none.task.id);

  REQUIRE(store.find("default", "k", A));
  CHECK(store.find("default", "k", A)->id == a.task.id);
  CHECK(store.find("default", "k", B)->id == b.task.id);
  CHECK(store.find("default", "k")->id == none.task.id);
  CHECK_FALSE(store.find("default", "k", eoq::Scope::only("c")));

  // A batch decides keys the same way, within itself too.
  std::vector<NewTask> batch{owned("a", "k"), owned("c", "k"), owned("c", "k"), owned("b", "k2")};
  auto res = store.submit_batch(batch);
  CHECK(res[0].duplicate);
  CHECK(res[0].task.id == a.task.id);
  CHECK_FALSE(res[1].duplicate);
  CHECK(res[2].duplicate);
  CHECK(res[2].task.id == res[1].task.id);
  CHECK_FALSE(res[3].duplicate);
  CHECK(list_all(store).size() == 5);
}

STORE_CASE("threads racing one key under two tenants create exactly one task per tenant", "[tenant][key]") {
  constexpr int kThreads = 16;
  std::vector<eoq::TaskId> ids(kThreads);
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      go.arrive_and_wait();
      ids[static_cast<std::size_t>(i)] = store.submit(owned(i % 2 ? "a" : "b", "race")).task.id;
    });
  for (auto& t : threads) t.join();
  std::set<eoq::TaskId> distinct(ids.begin(), ids.end());
  CHECK(distinct.size() == 2);
  CHECK(list_all(store).size() == 2);
  CHECK(list_all(store, Q().tenant("a")).size() == 1);
}

STORE_CASE("a tenant scope never returns, counts or touches another tenant's tasks", "[tenant]") {
  auto a_pending = store.submit(owned("a", "ka")).task.id;
  auto b_run = store.submit(owned("b")).task.id;
  auto lb = claim_one(store, "w");
  REQUIRE(lb.id() == a_pending);  // claim order is by id; take the next one for b
  store.release(lb);
  auto leases = claim(store, {"default"}, "w", 2);
  REQUIRE(leases.size() == 2);
  const Lease& b_lease = leases[0].id() == b_run ? leases[0] : leases[1];
  const Lease& a_lease = leases[0].id() == b_run ? leases[1] : leases[0];
  store.release(a_lease);  // a's task pending again, b's running
  auto b_done = store.submit(owned("b")).task.id;
  store.cancel(b_done);
  auto untenanted = store.submit(owned(std::nullopt)).task.id;
  const auto before_b = describe(must_get(store, b_run));
  const auto before_done = describe(must_get(store, b_done));

  // reads
  CHECK(store.get(a_pending, A));
  CHECK_FALSE(store.get(b_run, A));
  CHECK_FALSE(store.get(untenanted, A));
  CHECK(store.get(b_run, B));
  CHECK(store.get(b_run));
  CHECK_FALSE(store.find("default", "ka", B));
  auto page = store.list(Q().limit(100), A);
  REQUIRE(page.tasks.size() == 1);
  CHECK(page.tasks[0].id == a_pending);
  CHECK(store.list(Q().tenant("b"), A).tasks.empty());
  CHECK(store.list(Q().tenant("a"), A).tasks.size() == 1);
  CHECK(store.list(Q().limit(100), B).tasks.size() == 2);
  CHECK(store.list(Q().limit(100)).tasks.size() == 4);
  auto sa = store.stats(A);
  REQUIRE(sa.size() == 1);
  CHECK(sa[0].pending == 1);
  CHECK(sa[0].running == 0);
  CHECK(sa[0].cancelled == 0);
  auto sb = store.stats(B);
  REQUIRE(sb.size() == 1);
  CHECK(sb[0].pending == 0);
  CHECK(sb[0].running == 1);
  CHECK(sb[0].cancelled == 1);
  CHECK(store.stats(eoq::Scope::only("nobody")).empty());
  CHECK(stats_of(store, "default").pending == 2);
  CHECK(store.history(b_run, A).empty());
  CHECK(store.history(b_run, B).size() == 1);  // the attempt in progress

  // changes: another tenant's task answers exactly as a missing one, untouched
  CHECK(store.cancel(b_run, A) == eoq::CancelOutcome::not_found);
  CHECK(store.cancel(b_done, A) == eoq::CancelOutcome::not_found);
  CHECK(store.cancel(untenanted, A) == eoq::CancelOutcome::not_found);
  CHECK(store.retry(b_done, A) == eoq::RetryOutcome::not_found);
  CHECK(describe(must_get(store, b_run)) == before_b);
  CHECK(describe(must_get(store, b_done)) == before_done);
  CHECK(must_get(store, untenanted).status == TaskStatus::pending);
  store.complete(b_lease);  // b's lease was not disturbed

  CHECK(store.cancel(a_pending, A) == eoq::CancelOutcome::cancelled);
  CHECK(store.retry(a_pending, A) == eoq::RetryOutcome::retried);

  CHECK(field_of([&] { store.get(a_pending, eoq::Scope::only("")); }) == "scope.tenant");
  CHECK(field_of([&] { store.list(Q(), eoq::Scope::only(std::string(300, 'x'))); }) == "scope.tenant");
}
