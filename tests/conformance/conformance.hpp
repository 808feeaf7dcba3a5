#pragma once
// The TaskStore conformance suite: every rule of docs/contract.md, written once
// and run against MemoryStore and PostgresStore. Each case gets a fresh store
// (Postgres: a fresh schema), so cases run in parallel under ctest. The cases
// live beside this header, a file per topic; all but workflows.cpp make one
// binary, conformance_test (workflows.cpp is workflow_test: see
// tests/CMakeLists.txt).
//
//   STORE_CASE("sentence", "[tags]") { ... S is the TestStore, store the TaskStore ... }
//
// registers "MemoryStore: sentence" ([memory]) and "PostgresStore: sentence"
// ([postgres]). Cases only one store can run are plain TEST_CASEs.
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

// The fixture helpers every topic uses. Inline, not file-local: each file uses
// some of them.
namespace eoq::conformance {

constexpr auto kSlack = 25ms;  // rounding of delays and timestamps

inline NewTask task(std::string type = "t", std::string queue = "default") {
  NewTask t;
  t.type = std::move(type);
  t.queue = std::move(queue);
  return t;
}

inline NewTask keyed(std::string key, std::string queue = "default", std::string payload = "{}") {
  NewTask t = task("t", std::move(queue));
  t.key = std::move(key);
  t.payload = std::move(payload);
  return t;
}

inline std::vector<Lease> claim(eoq::TaskStore& store, std::vector<std::string> queues, std::string owner,
                                int limit, Millis lease = 30s) {
  eoq::ClaimRequest r;
  r.queues = std::move(queues);
  r.owner = std::move(owner);
  r.limit = limit;
  r.lease = lease;
  return store.claim(r);
}

inline Lease claim_one(eoq::TaskStore& store, std::string owner = "w1", Millis lease = 30s,
                       std::string queue = "default") {
  auto leases = claim(store, {std::move(queue)}, std::move(owner), 1, lease);
  REQUIRE(leases.size() == 1);
  return leases.front();
}

inline std::vector<Task> list_all(eoq::TaskStore& store, eoq::ListQuery q = {}) {
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

inline eoq::QueueStats stats_of(eoq::TaskStore& store, const std::string& queue) {
  for (auto& s : store.stats())
    if (s.queue == queue) return s;
  eoq::QueueStats empty;
  empty.queue = queue;
  return empty;
}

inline Task must_get(eoq::TaskStore& store, eoq::TaskId id) {
  auto t = store.get(id);
  REQUIRE(t.has_value());
  return *t;
}

// Every field of a task, for "nothing changed" comparisons with a readable diff.
inline std::string describe(const Task& t) {
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

inline void require_nothing_written(eoq::TaskStore& store) {
  CHECK(list_all(store).empty());
  CHECK(store.stats().empty());
}

inline Millis ms_between(TimePoint from, TimePoint to) { return std::chrono::duration_cast<Millis>(to - from); }

// "A terminal task keeps lease_owner (who ran its last attempt, if any) and has
// lease_expires_at cleared."
inline void check_terminal_lease_fields(const Task& t, const std::optional<std::string>& last_owner) {
  INFO("task " << t.id << " " << eoq::to_string(t.status));
  CHECK(eoq::is_terminal(t.status));
  CHECK(t.lease_owner == last_owner);
  CHECK_FALSE(t.lease_expires_at);
}

inline Lease stale_copy(const Lease& l) {
  Lease s = l;
  s.token += 1;
  return s;
}

}  // namespace eoq::conformance

using namespace eoq::conformance;
