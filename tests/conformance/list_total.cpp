// Conformance: list()'s opt-in total (ListQuery::count_up_to, TaskPage::total),
// against MemoryStore and PostgresStore alike. The planner's estimate, which
// only Postgres has, is a plain TEST_CASE at the end.
#include "conformance/conformance.hpp"

using eoq::ListTotal;
using eoq::TotalKind;

namespace Catch {
template <>
struct StringMaker<TotalKind> {
  static std::string convert(TotalKind k) { return std::string(eoq::to_string(k)); }
};
}  // namespace Catch

namespace {

NewTask entry(std::string queue, std::string type, std::optional<std::string> tenant = std::nullopt) {
  NewTask t;
  t.queue = std::move(queue);
  t.type = std::move(type);
  t.tenant = std::move(tenant);
  return t;
}

// The total a list with this query reports; fails the test when there is none.
ListTotal total_of(eoq::TaskStore& store, const eoq::ListQuery& q, const eoq::Scope& scope = {}) {
  auto page = store.list(q, scope);
  REQUIRE(page.total.has_value());
  return *page.total;
}

// 7 tasks in queue "a" (4 of type x, 3 of type y; 2 of the x succeeded and one
// y failed), 3 in queue "b" of type x for tenant "t".
void fill(eoq::TaskStore& store) {
  for (int i = 0; i < 4; ++i) store.submit(entry("a", "x"));
  for (int i = 0; i < 3; ++i) store.submit(entry("a", "y"));
  for (int i = 0; i < 3; ++i) store.submit(entry("b", "x", "t"));
  eoq::ClaimRequest r;
  r.queues = {"a"};
  r.owner = "w";
  r.limit = 10;
  r.lease = std::chrono::seconds(30);
  auto leases = store.claim(r);
  REQUIRE(leases.size() == 7);
  int succeeded = 0, failed = 0;
  for (const auto& l : leases) {
    if (l.task.type == "x" && succeeded < 2) {
      store.complete(l, "1");
      ++succeeded;
    } else if (l.task.type == "y" && failed < 1) {
      eoq::Failure f;
      f.error = "no";
      f.permanent = true;
      store.fail(l, f);
      ++failed;
    } else {
      store.release(l);
    }
  }
}

}  // namespace

STORE_CASE("list counts the tasks matching its filters only when asked", "[reads][total]") {
  fill(store);
  CHECK_FALSE(store.list(Q()).total);
  CHECK_FALSE(store.list(Q().queue("a").limit(1)).total);

  auto exact = [&](const eoq::ListQuery& q, const eoq::Scope& scope = {}) {
    auto t = total_of(store, q, scope);
    CHECK(t.kind == TotalKind::exact);
    return t.count;
  };
  CHECK(exact(Q().count_up_to(100)) == 10);
  CHECK(exact(Q().queue("a").count_up_to(100)) == 7);
  CHECK(exact(Q().queue("b").count_up_to(100)) == 3);
  CHECK(exact(Q().queue("c").count_up_to(100)) == 0);
  CHECK(exact(Q().type("x").count_up_to(100)) == 7);
  CHECK(exact(Q().queue("a").type("y").count_up_to(100)) == 3);
  CHECK(exact(Q().status(TaskStatus::succeeded).count_up_to(100)) == 2);
  CHECK(exact(Q().status(TaskStatus::failed).count_up_to(100)) == 1);
  CHECK(exact(Q().status(TaskStatus::pending).count_up_to(100)) == 7);
  CHECK(exact(Q().queue("a").status(TaskStatus::pending).count_up_to(100)) == 4);
  CHECK(exact(Q().tenant("t").count_up_to(100)) == 3);
  // The total is the filter's, not the page's: limit, after and order leave it alone.
  auto page = store.list(Q().queue("a").limit(2).count_up_to(100));
  CHECK(page.tasks.size() == 2);
  REQUIRE(page.next_after);
  CHECK(exact(Q().queue("a").limit(2).after(*page.next_after).count_up_to(100)) == 7);
  CHECK(exact(Q().queue("a").limit(2).newest_first().count_up_to(100)) == 7);
  // Exactly at the cap is still exact.
  CHECK(exact(Q().queue("a").count_up_to(7)) == 7);
  CHECK(exact(Q().count_up_to(10)) == 10);
}

STORE_CASE("past count_up_to the total says at least, never a number it did not count", "[reads][total]") {
  fill(store);
  auto t = total_of(store, Q().queue("a").count_up_to(6));
  CHECK(t.kind == TotalKind::at_least);
  CHECK(t.count == 6);
  t = total_of(store, Q().type("x").count_up_to(1));
  CHECK(t.kind == TotalKind::at_least);
  CHECK(t.count == 1);
  t = total_of(store, Q().status(TaskStatus::pending).count_up_to(5));
  CHECK(t.kind == TotalKind::at_least);
  CHECK(t.count == 5);
  // No filter: at least the cap, or (Postgres, with statistics) an estimate above it.
  t = total_of(store, Q().count_up_to(4));
  if (t.kind == TotalKind::estimate) {
    CHECK(S.kind() == StoreKind::postgres);
    CHECK(t.count > 4);
  } else {
    CHECK(t.kind == TotalKind::at_least);
    CHECK(t.count == 4);
  }
}

STORE_CASE("a tenant scope's total counts that tenant's tasks only", "[reads][total][tenant]") {
  fill(store);
  store.submit(entry("a", "x", "u"));
  const auto T = eoq::Scope::only("t"), U = eoq::Scope::only("u");
  auto t = total_of(store, Q().count_up_to(100), T);
  CHECK(t.kind == TotalKind::exact);
  CHECK(t.count == 3);
  CHECK(total_of(store, Q().count_up_to(100), U).count == 1);
  CHECK(total_of(store, Q().queue("a").count_up_to(100), T).count == 0);
  // A query naming another tenant than its scope lists and counts nothing.
  t = total_of(store, Q().tenant("u").count_up_to(100), T);
  CHECK(t.kind == TotalKind::exact);
  CHECK(t.count == 0);
  // Past the cap under a scope: at least, never an estimate of every tenant's tasks.
  t = total_of(store, Q().count_up_to(2), T);
  CHECK(t.kind == TotalKind::at_least);
  CHECK(t.count == 2);
}

STORE_CASE("count_up_to outside 0..1000000 is refused naming the field", "[reads][total][validation]") {
  store.submit(entry("a", "x"));
  CHECK(field_of([&] { store.list(Q().count_up_to(-1)); }) == "count_up_to");
  CHECK(field_of([&] { store.list(Q().count_up_to(1'000'001)); }) == "count_up_to");
  CHECK(total_of(store, Q().count_up_to(1'000'000)).count == 1);
  CHECK_FALSE(store.list(Q().count_up_to(0)).total);
}

TEST_CASE("PostgresStore: an unfiltered total past the cap is the planner's estimate once statistics exist",
          "[postgres][reads][total]") {
  TestStore S(StoreKind::postgres);
  auto& store = *S;
  std::vector<NewTask> batch;
  for (int i = 0; i < 300; ++i) batch.push_back(entry(i % 2 ? "a" : "b", "x"));
  store.submit_batch(batch);
  eoq::ClaimRequest r;
  r.queues = {"a"};
  r.owner = "w";
  r.limit = 100;
  r.lease = std::chrono::seconds(30);
  auto leases = store.claim(r);
  REQUIRE(leases.size() == 100);
  for (const auto& l : leases) store.complete(l);
  eoq::test::Admin admin(S.conninfo());
  admin.exec("ANALYZE \"" + S.schema() + "\".tasks");
  admin.exec("ANALYZE \"" + S.schema() + "\".finished");

  auto t = total_of(store, Q().count_up_to(50));
  CHECK(t.kind == TotalKind::estimate);
  CHECK(t.count >= 270);
  CHECK(t.count <= 330);
  // A filter has no estimate to go on: at least the cap.
  t = total_of(store, Q().queue("a").count_up_to(50));
  CHECK(t.kind == TotalKind::at_least);
  CHECK(t.count == 50);
  // Below the cap it is counted, statistics or not.
  t = total_of(store, Q().count_up_to(1000));
  CHECK(t.kind == TotalKind::exact);
  CHECK(t.count == 300);
}

STORE_CASE("list searches by key, key and type prefix, payload containment and error text, and counts alike",
           "[reads][search]") {
  auto add = [&](std::string type, std::optional<std::string> key, std::string payload) {
    NewTask t = entry("default", std::move(type));
    t.key = std::move(key);
    t.payload = std::move(payload);
    return store.submit(t).task.id;
  };
  const auto a = add("email.welcome", "order-1001", R"({"user": {"id": 7, "tags": ["vip", "eu"]}, "n": 1.50})");
  const auto b = add("email.invoice", "order-1002", R"({"user": {"id": 8, "tags": ["eu"]}})");
  const auto c = add("sms", "ORDER-1003", R"(["x", "y"])");
  const auto d = add("email.welcome", std::nullopt, R"({"user": {"id": 7}})");
  // An error to search: d fails for good.
  auto l = claim_one(store);
  while (l.id() != d) {
    store.release(l);
    l = claim_one(store);
  }
  (void)l;
  store.fail(l, {"SMTP 550: Mailbox Unavailable", true});

  auto ids = [&](eoq::ListQuery q) {
    std::vector<eoq::TaskId> out;
    q.count_up_to = 100;
    auto page = store.list(q);
    for (const auto& t : page.tasks) out.push_back(t.id);
    // The count uses the same filters.
    CHECK(page.total->count == static_cast<std::int64_t>(out.size()));
    q.newest_first = true;
    std::vector<eoq::TaskId> desc;
    for (const auto& t : store.list(q).tasks) desc.push_back(t.id);
    CHECK(std::vector<eoq::TaskId>(desc.rbegin(), desc.rend()) == out);
    return out;
  };
  using V = std::vector<eoq::TaskId>;
  eoq::ListQuery q;
  q.key = "order-1002";
  CHECK(ids(q) == V{b});
  q = {};
  q.key_prefix = "order-";
  CHECK(ids(q) == V{a, b});  // case counts in keys: ORDER-1003 is another key
  q = {};
  q.type_prefix = "email.";
  CHECK(ids(q) == V{a, b, d});
  q.type_prefix = "email.w";
  CHECK(ids(q) == V{a, d});
  q = {};
  q.payload_contains = R"({"user": {"id": 7}})";
  CHECK(ids(q) == V{a, d});
  q.payload_contains = R"({"user": {"tags": ["eu"]}})";
  CHECK(ids(q) == V{a, b});
  q.payload_contains = R"({"user": {"tags": ["eu", "vip"]}, "n": 1.5})";  // order aside, 1.50 is 1.5
  CHECK(ids(q) == V{a});
  q.payload_contains = R"({"user": {"tags": "eu"}})";  // a scalar is no array below the top
  CHECK(ids(q).empty());
  q.payload_contains = R"("x")";  // at the top an array contains what it holds
  CHECK(ids(q) == V{c});
  q.payload_contains = "{}";
  CHECK(ids(q) == V{a, b, d});  // every object contains the empty one; the array does not
  q = {};
  q.error_contains = "mailbox unavailable";
  CHECK(ids(q) == V{d});
  q.error_contains = "no such error";
  CHECK(ids(q).empty());
  // Together, and with the other filters.
  q = {};
  q.type_prefix = "email";
  q.payload_contains = R"({"user": {"id": 7}})";
  q.status = TaskStatus::pending;
  CHECK(ids(q) == V{a});

  // Bad search input: named, nothing else.
  q = {};
  q.payload_contains = "{not json";
  CHECK(field_of([&] { store.list(q); }) == "payload_contains");
  q = {};
  q.key_prefix = "";
  CHECK(field_of([&] { store.list(q); }) == "key_prefix");
  q = {};
  q.error_contains = std::string(2000, 'x');
  CHECK(field_of([&] { store.list(q); }) == "error_contains");
}

STORE_CASE("list's count includes the tasks that wait for their parents", "[reads][total]") {
  auto parent = store.submit(entry("default", "p")).task.id;
  NewTask child = entry("default", "c");
  child.parents = {parent};
  store.submit(child);
  eoq::ListQuery q;
  q.count_up_to = 100;
  auto page = store.list(q);
  CHECK(page.tasks.size() == 2);
  CHECK(page.total->count == 2);
  q.status = TaskStatus::waiting;
  CHECK(total_of(store, q).count == 1);
}
