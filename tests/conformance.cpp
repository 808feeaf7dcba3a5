// The TaskStore conformance suite: every rule of docs/contract.md, written once
// and run against MemoryStore and PostgresStore. Each case gets a fresh store
// (Postgres: a fresh schema), so cases run in parallel under ctest.
//
//   STORE_CASE("sentence", "[tags]") { ... S is the TestStore, store the TaskStore ... }
//
// registers "MemoryStore: sentence" ([memory]) and "PostgresStore: sentence"
// ([postgres]). Cases only one store can run are plain TEST_CASEs below.
#include "support.hpp"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <latch>
#include <map>
#include <set>
#include <thread>

using namespace std::chrono_literals;
using eoq::Lease;
using eoq::Millis;
using eoq::NewTask;
using eoq::Task;
using eoq::TaskStatus;
using eoq::TimePoint;
using eoq::test::now;
using eoq::test::StoreKind;
using eoq::test::TestStore;

#define EOQ_CAT2(a, b) a##b
#define EOQ_CAT(a, b) EOQ_CAT2(a, b)
#define STORE_CASE_IMPL(NAME, TAGS, FN)                                                              \
  static void FN(TestStore& S, eoq::TaskStore& store);                                                \
  TEST_CASE("MemoryStore: " NAME, "[conformance][memory]" TAGS) {                                    \
    TestStore s(StoreKind::memory);                                                                   \
    FN(s, *s);                                                                                        \
  }                                                                                                   \
  TEST_CASE("PostgresStore: " NAME, "[conformance][postgres]" TAGS) {                                \
    TestStore s(StoreKind::postgres);                                                                 \
    FN(s, *s);                                                                                        \
  }                                                                                                   \
  static void FN([[maybe_unused]] TestStore& S, [[maybe_unused]] eoq::TaskStore& store)
#define STORE_CASE(NAME, TAGS) STORE_CASE_IMPL(NAME, TAGS, EOQ_CAT(store_case_, __LINE__))

namespace Catch {
template <>
struct StringMaker<TaskStatus> {
  static std::string convert(TaskStatus s) { return std::string(eoq::to_string(s)); }
};
template <>
struct StringMaker<TimePoint> {
  static std::string convert(TimePoint t) { return fmt::format("{}us", t.time_since_epoch().count()); }
};
template <>
struct StringMaker<eoq::CancelOutcome> {
  static std::string convert(eoq::CancelOutcome c) {
    switch (c) {
      case eoq::CancelOutcome::cancelled: return "cancelled";
      case eoq::CancelOutcome::cancel_requested: return "cancel_requested";
      case eoq::CancelOutcome::already_finished: return "already_finished";
      case eoq::CancelOutcome::not_found: return "not_found";
    }
    return "?";
  }
};
}  // namespace Catch

using eoq::test::Q;

namespace {



constexpr auto kSlack = 25ms;  // rounding of delays and timestamps

NewTask task(std::string type = "t", std::string queue = "default") {
  NewTask t;
  t.type = std::move(type);
  t.queue = std::move(queue);
  return t;
}

NewTask keyed(std::string key, std::string queue = "default", std::string payload = "{}") {
  NewTask t = task("t", std::move(queue));
  t.key = std::move(key);
  t.payload = std::move(payload);
  return t;
}

std::vector<Lease> claim(eoq::TaskStore& store, std::vector<std::string> queues, std::string owner, int limit,
                         Millis lease = 30s) {
  eoq::ClaimRequest r;
  r.queues = std::move(queues);
  r.owner = std::move(owner);
  r.limit = limit;
  r.lease = lease;
  return store.claim(r);
}

Lease claim_one(eoq::TaskStore& store, std::string owner = "w1", Millis lease = 30s, std::string queue = "default") {
  auto leases = claim(store, {std::move(queue)}, std::move(owner), 1, lease);
  REQUIRE(leases.size() == 1);
  return leases.front();
}

std::vector<Task> list_all(eoq::TaskStore& store, eoq::ListQuery q = {}) {
  std::vector<Task> out;
  q.limit = 1000;
  for (int page = 0; page < 1000; ++page) {
    auto p = store.list(q);
    for (auto& t : p.tasks) out.push_back(std::move(t));
    if (!p.next_after) break;
    q.after = p.next_after;
  }
  return out;
}

eoq::QueueStats stats_of(eoq::TaskStore& store, const std::string& queue) {
  for (auto& s : store.stats())
    if (s.queue == queue) return s;
  eoq::QueueStats empty;
  empty.queue = queue;
  return empty;
}

Task must_get(eoq::TaskStore& store, eoq::TaskId id) {
  auto t = store.get(id);
  REQUIRE(t.has_value());
  return *t;
}

// Every field of a task, for "nothing changed" comparisons with a readable diff.
std::string describe(const Task& t) {
  auto o = [](const std::optional<std::string>& s) { return s ? "'" + *s + "'" : std::string("-"); };
  auto ot = [](const std::optional<TimePoint>& p) {
    return p ? std::to_string(p->time_since_epoch().count()) : std::string("-");
  };
  return fmt::format(
      "id={} queue={} type={} key={} tenant={} payload={} status={} priority={} run_at={} deadline={} attempts={} "
      "max_attempts={} version={} owner={} lease_expires={} cancel_requested={} progress={} stage='{}' "
      "checkpoint_stage={} checkpoint={} result={} last_error={} created={} updated={} finished={}",
      t.id, t.queue, t.type, o(t.key), o(t.tenant), t.payload, eoq::to_string(t.status), t.priority,
      t.run_at.time_since_epoch().count(), ot(t.deadline), t.attempts, t.retry.max_attempts, t.version,
      o(t.lease_owner), ot(t.lease_expires_at), t.cancel_requested, t.progress, t.stage, o(t.checkpoint_stage),
      o(t.checkpoint), o(t.result), o(t.last_error), t.created_at.time_since_epoch().count(),
      t.updated_at.time_since_epoch().count(), ot(t.finished_at));
}

// The field an InvalidArgument names, or what happened instead.
template <class F>
std::string field_of(F&& f) {
  try {
    f();
  } catch (const eoq::InvalidArgument& e) {
    return e.field();
  } catch (const std::exception& e) {
    return std::string("not InvalidArgument: ") + e.what();
  }
  return "no exception";
}

// "ok", "LeaseLost" or what else was thrown.
template <class F>
std::string outcome_of(F&& f) {
  try {
    f();
  } catch (const eoq::LeaseLost&) {
    return "LeaseLost";
  } catch (const std::exception& e) {
    return std::string("other: ") + e.what();
  }
  return "ok";
}

void require_nothing_written(eoq::TaskStore& store) {
  CHECK(list_all(store).empty());
  CHECK(store.stats().empty());
}

Millis ms_between(TimePoint from, TimePoint to) { return std::chrono::duration_cast<Millis>(to - from); }

// "A terminal task keeps lease_owner (who ran its last attempt, if any) and has
// lease_expires_at cleared."
void check_terminal_lease_fields(const Task& t, const std::optional<std::string>& last_owner) {
  INFO("task " << t.id << " " << eoq::to_string(t.status));
  CHECK(eoq::is_terminal(t.status));
  CHECK(t.lease_owner == last_owner);
  CHECK_FALSE(t.lease_expires_at);
}

Lease stale_copy(const Lease& l) {
  Lease s = l;
  s.token += 1;
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------
// submit

STORE_CASE("a submitted task comes back with every field it was given", "[submit]") {
  auto before = now();
  NewTask t;
  t.queue = "emails.v2:eu-1";
  t.type = "send-email";
  t.payload = R"({"n": [1, 2, 3], "to": "ada@example.com", "nested": {"v": null, "ok": true}})";
  t.key = "order-42";
  t.priority = -7;
  t.run_at = before + 1h;
  t.deadline = before + 2h;
  t.retry.max_attempts = 7;
  t.retry.backoff = eoq::Backoff::fixed;
  t.retry.initial_delay = 250ms;
  t.retry.max_delay = 5s;
  t.retry.jitter = 0.25;
  t.tenant = "acme";
  auto r = store.submit(t);
  auto after = now();
  CHECK_FALSE(r.duplicate);

  auto check = [&](const Task& got) {
    CHECK(got.id > 0);
    CHECK(got.queue == t.queue);
    CHECK(got.type == t.type);
    CHECK(got.payload == t.payload);
    CHECK(got.key == t.key);
    CHECK(got.tenant == t.tenant);
    CHECK(got.status == TaskStatus::pending);
    CHECK(got.priority == -7);
    CHECK(got.run_at == *t.run_at);
    CHECK(got.deadline == t.deadline);
    CHECK(got.attempts == 0);
    CHECK(got.retry == t.retry);
    CHECK(got.version == 1);
    CHECK_FALSE(got.lease_owner);
    CHECK_FALSE(got.lease_expires_at);
    CHECK_FALSE(got.cancel_requested);
    CHECK(got.progress == 0);
    CHECK(got.stage.empty());
    CHECK_FALSE(got.checkpoint_stage);
    CHECK_FALSE(got.checkpoint);
    CHECK_FALSE(got.result);
    CHECK_FALSE(got.last_error);
    CHECK(got.created_at >= before - 1s);
    CHECK(got.created_at <= after + 1s);
    CHECK_FALSE(got.finished_at);
  };
  check(r.task);
  auto got = must_get(store, r.task.id);
  check(got);
  CHECK(describe(got) == describe(r.task));
  auto found = store.find(t.queue, *t.key, eoq::Scope::only(*t.tenant));  // keys are per tenant
  REQUIRE(found);
  CHECK(found->id == r.task.id);
  CHECK_FALSE(store.find(t.queue, *t.key));
}

STORE_CASE("a task submitted without run_at may run now and has no key, tenant or deadline", "[submit]") {
  auto before = now();
  auto r = store.submit(task("plain"));
  auto after = now();
  CHECK(r.task.run_at >= before - 1s);
  CHECK(r.task.run_at <= after + 1s);
  CHECK_FALSE(r.task.key);
  CHECK_FALSE(r.task.tenant);
  CHECK_FALSE(r.task.deadline);
  CHECK(r.task.payload == "{}");
  CHECK(r.task.queue == "default");
  CHECK(r.task.retry == eoq::RetryPolicy{});
  auto l = claim_one(store);
  CHECK(l.id() == r.task.id);
}

STORE_CASE("ids are positive and increase with submit order", "[submit]") {
  eoq::TaskId last = 0;
  for (int i = 0; i < 20; ++i) {
    auto r = store.submit(task(fmt::format("t{}", i), i % 2 ? "a" : "b"));
    CHECK(r.task.id > last);
    last = r.task.id;
  }
}

STORE_CASE("a second submit with the same key returns the existing task and changes nothing", "[submit][key]") {
  auto first = store.submit(keyed("k", "default", R"({"v": 1})"));
  REQUIRE_FALSE(first.duplicate);
  NewTask again = keyed("k", "default", R"({"v": 2})");
  again.type = "other-type";
  again.priority = 99;
  again.key_reuse = eoq::KeyReuse::lenient;  // strict would refuse the other type and payload
  auto second = store.submit(again);
  CHECK(second.duplicate);
  CHECK(second.task.id == first.task.id);
  CHECK(second.task.payload == R"({"v": 1})");
  CHECK(second.task.type == "t");
  CHECK(describe(must_get(store, first.task.id)) == describe(first.task));
  CHECK(list_all(store).size() == 1);
  CHECK(stats_of(store, "default").pending == 1);
}

STORE_CASE("a key stays taken after its task finishes", "[submit][key]") {
  auto first = store.submit(keyed("k"));
  auto l = claim_one(store);
  store.complete(l, R"({"done": true})");
  auto again = store.submit(keyed("k"));
  CHECK(again.duplicate);
  CHECK(again.task.id == first.task.id);
  CHECK(again.task.status == TaskStatus::succeeded);
  CHECK(again.task.result == std::optional<std::string>(R"({"done": true})"));
  CHECK(again.task.attempts == 1);
  CHECK(list_all(store).size() == 1);
  CHECK(claim(store, {"default"}, "w", 10).empty());

  SECTION("also when the task failed or was cancelled") {
    store.submit(keyed("f"));
    auto lf = claim_one(store);
    eoq::Failure fail{"bad", true};
    store.fail(lf, fail);
    auto c = store.submit(keyed("c"));
    CHECK(store.cancel(c.task.id) == eoq::CancelOutcome::cancelled);
    auto df = store.submit(keyed("f"));
    auto dc = store.submit(keyed("c"));
    CHECK(df.duplicate);
    CHECK(df.task.status == TaskStatus::failed);
    CHECK(dc.duplicate);
    CHECK(dc.task.status == TaskStatus::cancelled);
    CHECK(list_all(store).size() == 3);
  }
}

STORE_CASE("the same key in two queues makes two tasks", "[submit][key]") {
  auto a = store.submit(keyed("k", "qa"));
  auto b = store.submit(keyed("k", "qb"));
  CHECK_FALSE(a.duplicate);
  CHECK_FALSE(b.duplicate);
  CHECK(a.task.id != b.task.id);
  CHECK(store.find("qa", "k")->id == a.task.id);
  CHECK(store.find("qb", "k")->id == b.task.id);
  CHECK(list_all(store).size() == 2);
}

STORE_CASE("tasks without a key are never duplicates", "[submit][key]") {
  auto a = store.submit(task());
  auto b = store.submit(task());
  CHECK_FALSE(b.duplicate);
  CHECK(a.task.id != b.task.id);
  CHECK(list_all(store).size() == 2);
}

STORE_CASE("a hundred and twenty eight threads submitting one key at once create exactly one task",
           "[submit][key][concurrency]") {
  constexpr int kThreads = 128;
  std::vector<eoq::SubmitResult> results(kThreads);
  std::vector<std::string> errors(kThreads);
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      go.arrive_and_wait();
      try {
        NewTask t = keyed("the-key", "default", fmt::format(R"({{"n": {}}})", i));
        t.key_reuse = eoq::KeyReuse::lenient;  // each thread its own payload: the winner's is kept
        results[static_cast<std::size_t>(i)] = store.submit(t);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(i)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& e : errors) CHECK(e.empty());
  int created = 0;
  std::string winner_payload;
  std::set<eoq::TaskId> ids;
  for (const auto& r : results) {
    ids.insert(r.task.id);
    if (!r.duplicate) {
      ++created;
      winner_payload = r.task.payload;
    }
  }
  CHECK(created == 1);
  CHECK(ids.size() == 1);
  auto all = list_all(store);
  REQUIRE(all.size() == 1);
  CHECK(all[0].payload == winner_payload);
  CHECK(stats_of(store, "default").pending == 1);
}

STORE_CASE("a batch of a thousand tasks is created in order", "[submit][batch]") {
  std::vector<NewTask> batch;
  for (int i = 0; i < 1000; ++i) {
    NewTask t = task(fmt::format("t{}", i), i % 3 ? "a" : "b");
    if (i % 2 == 0) t.key = fmt::format("k{}", i);
    t.payload = fmt::format(R"({{"i": {}}})", i);
    batch.push_back(std::move(t));
  }
  auto results = store.submit_batch(batch);
  REQUIRE(results.size() == 1000);
  eoq::TaskId last = 0;
  bool types_in_order = true, ids_increase = true, none_duplicate = true;
  for (std::size_t i = 0; i < results.size(); ++i) {
    types_in_order = types_in_order && results[i].task.type == batch[i].type &&
                     results[i].task.payload == batch[i].payload && results[i].task.queue == batch[i].queue;
    ids_increase = ids_increase && results[i].task.id > last;
    none_duplicate = none_duplicate && !results[i].duplicate;
    last = results[i].task.id;
  }
  CHECK(types_in_order);
  CHECK(ids_increase);
  CHECK(none_duplicate);
  CHECK(list_all(store).size() == 1000);
  CHECK(stats_of(store, "a").pending + stats_of(store, "b").pending == 1000);

  SECTION("submitting it again creates nothing") {
    auto again = store.submit_batch(batch);
    REQUIRE(again.size() == 1000);
    int dup = 0;
    for (std::size_t i = 0; i < again.size(); ++i)
      if (batch[i].key) {
        dup += again[i].duplicate ? 1 : 0;
        CHECK(again[i].task.id == results[i].task.id);
      }
    CHECK(dup == 500);
    CHECK(list_all(store).size() == 1500);  // the 500 without a key are new
  }
}

STORE_CASE("a large batch keeps every byte of its payloads and the key rules of a small one", "[submit][batch]") {
  // Postgres COPYs batches of this size: its text format's escapes (backslash,
  // tab, newline, \N for NULL) must not leak into what is stored.
  const std::vector<std::string> payloads = {"{\t\"s\":\n\"a\\\\b\\tc\"\r}", R"({"q": "\"quoted\"", "u": "\u00e9\u00e9"})",
                                             "[1, 2.5e3, null, true]", R"("\\N")"};
  std::vector<NewTask> batch;
  for (int i = 0; i < 2500; ++i) {
    NewTask t = task(i % 7 == 0 ? "\\N" : fmt::format("t\\{}", i));
    t.payload = payloads[static_cast<std::size_t>(i) % payloads.size()];
    if (i % 5 == 0) t.key = fmt::format("big{}", i);
    batch.push_back(std::move(t));
  }
  auto r = store.submit_batch(batch);
  REQUIRE(r.size() == 2500);
  std::map<eoq::TaskId, Task> stored;
  eoq::ListQuery q;
  q.limit = 1000;
  for (;;) {
    auto page = store.list(q);
    for (auto& t : page.tasks) stored[t.id] = t;
    if (!page.next_after) break;
    q.after = page.next_after;
  }
  REQUIRE(stored.size() == 2500);
  int same = 0;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const auto& t = stored.at(r[i].task.id);
    same += t.payload == batch[i].payload && t.type == batch[i].type && t.key == batch[i].key && !t.tenant ? 1 : 0;
  }
  CHECK(same == 2500);

  // A taken key with another payload at the end of a large batch: nothing of it is written.
  std::vector<NewTask> more(1500, task());
  more.back() = keyed("big0", "default", R"({"other": 1})");
  CHECK_THROWS_AS(store.submit_batch(more), eoq::KeyConflict);
  CHECK(list_all(store).size() == 2500);
}

STORE_CASE("a key repeated within a batch returns the first one's task for the later ones", "[submit][batch][key]") {
  auto existing = store.submit(keyed("k0"));
  NewTask k1_again = keyed("k1", "default", R"({"a": 2})");
  k1_again.key_reuse = eoq::KeyReuse::lenient;
  std::vector<NewTask> batch = {keyed("k1", "default", R"({"a": 1})"), keyed("k2"), k1_again, task(), keyed("k2"),
                                keyed("k0")};
  auto r = store.submit_batch(batch);
  REQUIRE(r.size() == 6);
  CHECK_FALSE(r[0].duplicate);
  CHECK_FALSE(r[1].duplicate);
  CHECK(r[2].duplicate);
  CHECK(r[2].task.id == r[0].task.id);
  CHECK(r[2].task.payload == R"({"a": 1})");
  CHECK_FALSE(r[3].duplicate);
  CHECK(r[4].duplicate);
  CHECK(r[4].task.id == r[1].task.id);
  CHECK(r[5].duplicate);
  CHECK(r[5].task.id == existing.task.id);
  CHECK(list_all(store).size() == 4);
  CHECK(store.find("default", "k1")->payload == R"({"a": 1})");
}

STORE_CASE("an invalid task anywhere in a batch rejects the whole batch and writes nothing",
           "[submit][batch][validation]") {
  std::vector<NewTask> batch;
  for (int i = 0; i < 10; ++i) batch.push_back(keyed(fmt::format("k{}", i)));
  SECTION("bad payload") {
    batch[7].payload = "{not json";
    CHECK(field_of([&] { store.submit_batch(batch); }) == "tasks[7].payload");
  }
  SECTION("bad queue on the first") {
    batch[0].queue = "q;drop";
    CHECK(field_of([&] { store.submit_batch(batch); }) == "tasks[0].queue");
  }
  SECTION("deadline in the past on the last") {
    batch[9].deadline = now() - 1s;
    CHECK(field_of([&] { store.submit_batch(batch); }) == "tasks[9].deadline");
  }
  require_nothing_written(store);
  CHECK_FALSE(store.find("default", "k0"));
}

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

// ---------------------------------------------------------------------------
// tenants and retry

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
// lease transactions: memory

TEST_CASE("MemoryStore: a lease transaction cannot run SQL but settles like the plain calls",
          "[conformance][memory][transaction]") {
  TestStore s(StoreKind::memory);
  auto& store = *s;
  NewTask t = task();
  t.retry.max_attempts = 3;
  t.retry.initial_delay = 0ms;
  auto id = store.submit(t).task.id;
  auto l = claim_one(store);
  {
    auto tx = store.begin(l);
    CHECK(tx->open());
    CHECK_THROWS_AS(tx->exec("SELECT 1"), eoq::UsageError);
    tx->checkpoint("cp", R"({"n": 1})");
    CHECK(must_get(store, id).checkpoint_stage == std::optional<std::string>("cp"));
    auto o = tx->fail({"again", false});
    CHECK(o.status == TaskStatus::pending);
  }
  std::this_thread::sleep_for(20ms);
  auto l2 = claim_one(store);
  auto tx = store.begin(l2);
  tx->complete(R"({"ok": 1})");
  CHECK_FALSE(tx->open());
  auto done = must_get(store, id);
  CHECK(done.status == TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"({"ok": 1})"));
  auto stale = store.begin(l2);
  CHECK_THROWS_AS(stale->complete("1"), eoq::LeaseLost);
}

// ---------------------------------------------------------------------------
// lease transactions: Postgres (the handler's SQL commits with the settlement)

namespace {

struct PgEffects {
  TestStore s{StoreKind::postgres};
  eoq::test::Admin admin{s.conninfo()};
  std::string table;
  PgEffects() : table(fmt::format("\"{}\".effects", s.schema())) {
    admin.exec(fmt::format("CREATE TABLE {} (task_id bigint NOT NULL, note text)", table));
  }
  long long rows(const std::string& note) {
    return admin.count(fmt::format("SELECT count(*) FROM {} WHERE note = $1", table), {note});
  }
  std::string insert() const { return fmt::format("INSERT INTO {} (task_id, note) VALUES ($1, $2)", table); }
};

}  // namespace

TEST_CASE("PostgresStore: a handler's SQL commits together with the task's completion",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  auto tx = store.begin(l);
  CHECK(tx->open());
  auto ins = tx->exec(fx.insert(), {std::to_string(id), "done"});
  CHECK(ins.affected == 1);
  auto sel = tx->exec(fmt::format("SELECT task_id, note FROM {} WHERE note = $1", fx.table), {"done"});
  REQUIRE(sel.size() == 1);
  CHECK(sel.rows[0][0] == std::optional<std::string>(std::to_string(id)));
  CHECK(fx.rows("done") == 0);  // not visible outside before the commit
  tx->complete(R"({"ok": true})");
  CHECK_FALSE(tx->open());
  CHECK(fx.rows("done") == 1);
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

TEST_CASE("PostgresStore: with a stale lease the completion throws LeaseLost and the handler's SQL is rolled back",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  NewTask t = task();
  t.retry.max_attempts = 5;
  auto id = store.submit(t).task.id;
  auto a = claim_one(store, "worker-a", 200ms);
  std::this_thread::sleep_for(300ms);
  auto b = claim_one(store, "worker-b", 30s);
  REQUIRE(b.id() == id);
  auto tx = store.begin(a);
  tx->exec(fx.insert(), {std::to_string(id), "by-a"});
  CHECK(outcome_of([&] { tx->complete(R"({"by": "a"})"); }) == "LeaseLost");
  CHECK_FALSE(tx->open());
  CHECK(fx.rows("by-a") == 0);
  CHECK(must_get(store, id).status == TaskStatus::running);

  auto txb = store.begin(b);
  txb->exec(fx.insert(), {std::to_string(id), "by-b"});
  txb->complete(R"({"by": "b"})");
  CHECK(fx.rows("by-b") == 1);
  auto done = must_get(store, id);
  CHECK(done.status == TaskStatus::succeeded);
  CHECK(done.result == std::optional<std::string>(R"({"by": "b"})"));
}

TEST_CASE("PostgresStore: destroying an unsettled lease transaction rolls its SQL back",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  {
    auto tx = store.begin(l);
    tx->exec(fx.insert(), {std::to_string(id), "abandoned"});
  }
  CHECK(fx.rows("abandoned") == 0);
  auto got = must_get(store, id);
  CHECK(got.status == TaskStatus::running);
  CHECK(got.version == l.token);
  store.complete(l);
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
}

TEST_CASE("PostgresStore: failing through the transaction keeps the handler's writes",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  auto tx = store.begin(l);
  tx->exec(fx.insert(), {std::to_string(id), "partial"});
  auto o = tx->fail({"later", false});
  CHECK(o.status == TaskStatus::pending);
  CHECK(fx.rows("partial") == 1);
  CHECK(must_get(store, id).status == TaskStatus::pending);
}

TEST_CASE("PostgresStore: a checkpoint through the transaction commits the writes so far and continues",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  {
    auto tx = store.begin(l);
    tx->exec(fx.insert(), {std::to_string(id), "step-1"});
    tx->checkpoint("step-1", R"({"n": 1})");
    CHECK(fx.rows("step-1") == 1);
    tx->exec(fx.insert(), {std::to_string(id), "step-2"});
  }
  CHECK(fx.rows("step-2") == 0);
  auto got = must_get(store, id);
  CHECK(got.checkpoint_stage == std::optional<std::string>("step-1"));
  CHECK(got.status == TaskStatus::running);
}

TEST_CASE("PostgresStore: a failing statement in a lease transaction throws and the completion cannot commit it",
          "[conformance][postgres][transaction]") {
  PgEffects fx;
  auto& store = *fx.s;
  auto id = store.submit(task()).task.id;
  auto l = claim_one(store);
  auto tx = store.begin(l);
  tx->exec(fx.insert(), {std::to_string(id), "before-error"});
  CHECK_THROWS_AS(tx->exec("SELECT * FROM no_such_table_anywhere"), eoq::DatabaseError);
  tx.reset();
  CHECK(fx.rows("before-error") == 0);
  store.complete(l);
  CHECK(must_get(store, id).status == TaskStatus::succeeded);
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

// ---------------------------------------------------------------------------
// Deadlines behind a worker's buffer, cancel from a handler, strict keys

STORE_CASE("a claim tells the store's time of the claim in the lease", "[deadline]") {
  store.submit(task());
  auto before = now();
  auto l = claim_one(store);
  auto after = now();
  CHECK(l.claimed_at == l.task.started_at.value_or(TimePoint{}));
  CHECK(l.claimed_at >= before - kSlack);
  CHECK(l.claimed_at <= after + kSlack);
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

namespace {
// The KeyConflict a call throws, or empty (with what happened in `other`).
template <class F>
std::optional<eoq::KeyConflict> conflict_of(F&& f, std::string& other) {
  try {
    f();
    other = "no exception";
  } catch (const eoq::KeyConflict& e) {
    return e;
  } catch (const std::exception& e) {
    other = std::string("not KeyConflict: ") + e.what();
  }
  return std::nullopt;
}
}  // namespace

STORE_CASE("a key reused with another type or payload is a KeyConflict that writes nothing", "[keys]") {
  auto first = store.submit(keyed("k1", "default", R"({"a":1})")).task;
  auto before = describe(first);

  auto same = store.submit(keyed("k1", "default", R"({"a":1})"));
  CHECK(same.duplicate);
  CHECK(same.task.id == first.id);

  std::string other;
  auto payload = conflict_of([&] { store.submit(keyed("k1", "default", R"({"a":2})")); }, other);
  INFO(other);
  REQUIRE(payload);
  CHECK(payload->field() == "key");
  CHECK(payload->key() == "k1");
  CHECK(payload->differs() == "payload");
  CHECK(payload->existing_task_id() == first.id);
  CHECK(std::string(payload->what()).find("'k1' is already used by task " + std::to_string(first.id)) !=
        std::string::npos);

  NewTask retyped = keyed("k1", "default", R"({"a":1})");
  retyped.type = "other";
  auto type = conflict_of([&] { store.submit(retyped); }, other);
  REQUIRE(type);
  CHECK(type->differs() == "type");
  retyped.payload = "{}";
  auto both = conflict_of([&] { store.submit(retyped); }, other);
  REQUIRE(both);
  CHECK(both->differs() == "type and payload");

  // Payloads compare as stored text: equal JSON spelled differently is another payload.
  auto spaced = conflict_of([&] { store.submit(keyed("k1", "default", R"({"a": 1})")); }, other);
  REQUIRE(spaced);
  CHECK(spaced->differs() == "payload");

  // A KeyConflict is an InvalidArgument: code that handles bad input handles it.
  CHECK(field_of([&] { store.submit(keyed("k1", "default", "[]")); }) == "key");

  CHECK(describe(must_get(store, first.id)) == before);
  CHECK(list_all(store).size() == 1);

  SECTION("lenient returns the existing task, as before strict keys") {
    NewTask t = keyed("k1", "default", R"({"a":2})");
    t.key_reuse = eoq::KeyReuse::lenient;
    auto r = store.submit(t);
    CHECK(r.duplicate);
    CHECK(r.task.id == first.id);
    CHECK(r.task.payload == R"({"a":1})");
  }
  SECTION("also after the task finished") {
    store.complete(claim_one(store));
    CHECK(conflict_of([&] { store.submit(keyed("k1", "default", "{}")); }, other).has_value());
    CHECK(store.submit(keyed("k1", "default", R"({"a":1})")).duplicate);
  }
  SECTION("the same key elsewhere is another key") {
    CHECK_FALSE(store.submit(keyed("k1", "other-queue", "{}")).duplicate);
    NewTask t = keyed("k1", "default", "{}");
    t.tenant = "acme";
    CHECK_FALSE(store.submit(t).duplicate);
  }
}

STORE_CASE("a batch with a conflicting key writes nothing, within itself or against a taken key", "[keys][batch]") {
  auto held = store.submit(keyed("held", "default", R"({"v":1})")).task;
  std::string other;

  std::vector<NewTask> inside{keyed("a", "default", R"({"v":1})"), keyed("b"), keyed("a", "default", R"({"v":2})")};
  auto e = conflict_of([&] { store.submit_batch(inside); }, other);
  INFO(other);
  REQUIRE(e);
  CHECK(e->field() == "tasks[2].key");
  CHECK(e->existing_task_id() == 0);
  CHECK(std::string(e->what()).find("tasks[0] of this batch") != std::string::npos);
  CHECK(list_all(store).size() == 1);

  std::vector<NewTask> against{keyed("c"), task(), keyed("held", "default", R"({"v":9})")};
  auto f = conflict_of([&] { store.submit_batch(against); }, other);
  REQUIRE(f);
  CHECK(f->field() == "tasks[2].key");
  CHECK(f->existing_task_id() == held.id);
  CHECK(list_all(store).size() == 1);
  CHECK_FALSE(store.find("default", "c").has_value());

  // Equal repeats are duplicates; a lenient one takes whatever holds the key.
  NewTask loose = keyed("held", "default", R"({"v":9})");
  loose.key_reuse = eoq::KeyReuse::lenient;
  std::vector<NewTask> fine{keyed("d", "default", R"({"v":1})"), keyed("d", "default", R"({"v":1})"),
                            keyed("held", "default", R"({"v":1})"), loose};
  auto r = store.submit_batch(fine);
  REQUIRE(r.size() == 4);
  CHECK_FALSE(r[0].duplicate);
  CHECK(r[1].duplicate);
  CHECK(r[1].task.id == r[0].task.id);
  CHECK(r[2].duplicate);
  CHECK(r[2].task.id == held.id);
  CHECK(r[3].duplicate);
  CHECK(r[3].task.id == held.id);
  CHECK(list_all(store).size() == 2);
}

TEST_CASE("PostgresStore: submit_on refuses a key reused with another payload and writes nothing",
          "[conformance][postgres][keys]") {
  TestStore S(StoreKind::postgres);
  auto& store = *S;
  eoq::test::Admin host(S.conninfo());
  auto held = store.submit(keyed("k", "default", R"({"v":1})")).task;
  host.exec("BEGIN");
  std::string other;
  auto e = conflict_of(
      [&] { eoq::PostgresStore::submit_on(host.get(), keyed("k", "default", R"({"v":2})"), S.schema()); }, other);
  INFO(other);
  REQUIRE(e);
  CHECK(e->existing_task_id() == held.id);
  // The host's transaction is still usable: the conflict was found without an SQL error.
  auto dup = eoq::PostgresStore::submit_on(host.get(), keyed("k", "default", R"({"v":1})"), S.schema());
  CHECK(dup.duplicate);
  host.exec("COMMIT");
  CHECK(list_all(store).size() == 1);
}

// ---------------------------------------------------------------------------
// Typed handler SQL

namespace {
template <class F>
std::string usage_error_of(F&& f) {
  try {
    f();
  } catch (const eoq::UsageError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not UsageError: ") + e.what();
  }
  return "no exception";
}
}  // namespace

static_assert(!std::is_constructible_v<eoq::SqlParam, char>, "a char is neither a number nor a string");
static_assert(std::is_constructible_v<eoq::SqlParam, std::optional<std::string>>, "the string form still works");

TEST_CASE("Rows: typed reads convert text and name the column and the type on a mismatch", "[conformance][rows]") {
  eoq::Rows rows;
  rows.columns = {"id", "name", "ratio", "ok", "missing", "big"};
  rows.rows = {{"42", "ann", "0.25", "t", std::nullopt, "100000"}};
  auto r = rows[0];
  CHECK(r.get<std::int64_t>(0) == 42);
  CHECK(r.get<int>("id") == 42);
  CHECK(r.get<std::string>("name") == "ann");
  CHECK(r.get<std::string_view>(1) == "ann");
  CHECK(r.get<double>("ratio") == 0.25);
  CHECK(r.get<bool>("ok"));
  CHECK(r.get<std::optional<std::int64_t>>("missing") == std::nullopt);
  CHECK(r.get<std::optional<std::int64_t>>("id") == std::optional<std::int64_t>(42));
  CHECK(r.is_null(4));

  CHECK(usage_error_of([&] { r.get<std::int64_t>("name"); }) ==
        R"(column "name" (1) read as std::int64_t: "ann" is not an integer)");
  CHECK(usage_error_of([&] { r.get<std::int64_t>("missing"); }) ==
        R"(column "missing" (4) read as std::int64_t: is NULL (read it as a std::optional))");
  CHECK(usage_error_of([&] { r.get<std::int16_t>("big"); }) ==
        R"(column "big" (5) read as std::int16_t: "100000" is out of range)");
  CHECK(usage_error_of([&] { r.get<int>("ratio"); }).find("is not an integer") != std::string::npos);
  CHECK(usage_error_of([&] { r.get<bool>("name"); }).find("is not a boolean") != std::string::npos);
  CHECK(usage_error_of([&] { r.get<double>("name"); }).find("read as double") != std::string::npos);
  CHECK(usage_error_of([&] { r.get<int>("nope"); }).find(R"(column "nope" is not in the result)") !=
        std::string::npos);
  CHECK(usage_error_of([&] { r.get<int>(6); }).find("column 6 does not exist") != std::string::npos);
  CHECK(usage_error_of([&] { rows[1]; }).find("row 1 does not exist") != std::string::npos);
}

TEST_CASE("SqlParam: numbers, bools and NULL become the text Postgres parses", "[conformance][rows]") {
  auto text = [](const eoq::SqlParam& p) { return p.text().value_or("NULL"); };
  CHECK(text(42) == "42");
  CHECK(text(std::int64_t{-9007199254740993}) == "-9007199254740993");
  CHECK(text(std::uint64_t{18446744073709551615u}) == "18446744073709551615");
  CHECK(text(1.5) == "1.5");
  CHECK(text(0.1) == "0.1");
  CHECK(text(0.1f) == "0.1");
  CHECK(text(std::numeric_limits<double>::quiet_NaN()) == "NaN");
  CHECK(text(-std::numeric_limits<double>::infinity()) == "-Infinity");
  CHECK(text(true) == "true");
  CHECK(text("x") == "x");
  CHECK(text(std::string_view("sv")) == "sv");
  CHECK(text(std::nullopt) == "NULL");
  CHECK(text(std::optional<int>()) == "NULL");
  CHECK(text(std::optional<int>(7)) == "7");
  CHECK(text({}) == "NULL");
  eoq::Params p{42, "x", 1.5, true, std::nullopt};
  CHECK(p.size() == 5);
}

TEST_CASE("PostgresStore: a handler's SQL takes typed parameters and gives typed reads",
          "[conformance][postgres][transaction][rows]") {
  TestStore S(StoreKind::postgres);
  auto& store = *S;
  store.submit(task());
  auto l = claim_one(store);
  auto tx = store.begin(l);
  auto rows = tx->exec("SELECT $1::bigint AS i, $2::text AS s, $3::float8 AS d, $4::boolean AS b, $5::int AS n, "
                       "$6::int2 AS small, $7::float8 AS nan, $8::float8 AS inf, $9::real AS f",
                       {std::int64_t{9007199254740993}, "x", 0.1, true, std::nullopt, std::optional<int>(7),
                        std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(), 0.1f});
  auto r = rows[0];
  CHECK(r.get<std::int64_t>("i") == 9007199254740993);
  CHECK(r.get<std::string>("s") == "x");
  CHECK(r.get<double>("d") == 0.1);
  CHECK(r.get<bool>("b"));
  CHECK(r.get<std::optional<int>>("n") == std::nullopt);
  CHECK(r.get<std::int16_t>("small") == 7);
  CHECK(std::isnan(r.get<double>("nan")));
  CHECK(r.get<double>("inf") == std::numeric_limits<double>::infinity());
  CHECK(r.get<float>("f") == 0.1f);
  CHECK(usage_error_of([&] { r.get<std::int64_t>("s"); }) == R"(column "s" (1) read as std::int64_t: "x" is not an integer)");
  // The string form still works, NULL as an empty optional included.
  auto old = tx->exec("SELECT $1::int + 1, $2::text IS NULL", {std::to_string(41), std::optional<std::string>()});
  CHECK(old.rows[0][0] == std::optional<std::string>("42"));
  CHECK(old[0].get<bool>(1));
  CHECK(tx->exec("SELECT count(*) FROM generate_series(1, $1)", {5}).scalar<std::int64_t>() == 5);
  tx->complete();
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
