// The chaos tests' history checker (history.hpp): hand-made good and bad
// histories, the line format, and histories read back from a real schema.
#include "history.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <fstream>
#include <set>
#include <string>
#include <thread>

using namespace std::chrono_literals;
namespace h = eoq::test::history;
using h::ViolationKind;

namespace {

// Four tasks that end well, after a lost lease and a zombie's rejected
// completion (1), a retry and a release (2), a cancel while pending (3) and a
// permanent failure (4). Times are database microseconds.
const char* const kGood = R"(
# task 1: w1's lease (version 2) expires, w2 reclaims (version 3) and completes;
# w1 wakes up and is told LeaseLost.
submit task=1 key=q/a max_attempts=3 client=1000
submit task=1 key=q/a max_attempts=3 client=1001
claim task=1 version=2 owner=w1 db=2000 until=5000 attempt=1
heartbeat task=1 version=2 owner=w1 db=3000 until=6000
claim task=1 version=3 owner=w2 db=6500 until=9500 attempt=2
complete task=1 version=2 owner=w1 ok=0 client=7000
complete task=1 version=3 owner=w2 db=8000
expire task=1 version=2 origin=db db=6000
effect task=1 version=3 origin=db
final task=1 status=succeeded attempt=2 origin=db

# task 2: fails and retries, a second worker releases it, a third completes.
submit task=2 key=q/b max_attempts=3
claim task=2 version=2 owner=w1 db=2100 until=5100 attempt=1
fail task=2 version=2 owner=w1 status=retry db=2500
claim task=2 version=4 owner=w3 db=3500 until=6500 attempt=2
release task=2 version=4 owner=w3 db=3600
claim task=2 version=6 owner=w2 db=3700 until=6700 attempt=2
complete task=2 version=6 owner=w2 db=4000
effect task=2 version=6 origin=db
final task=2 status=succeeded attempt=2 origin=db

# task 3: cancelled while pending.
submit task=3 key=q/c
cancel task=3 status=cancelled
final task=3 status=cancelled origin=db

# task 4: fails permanently.
submit task=4 max_attempts=1
claim task=4 version=2 owner=w1 db=1000 until=4000 attempt=1
fail task=4 version=2 owner=w1 status=failed db=1500
final task=4 status=failed attempt=1 origin=db
)";

h::Verdict check(const std::string& text, h::Options o = {}) { return h::verify(h::parse(text), o); }

// The verdict's violations as "kind task N", sorted: a case states the exact
// set it expects, so neither a missing nor an extra violation goes unnoticed.
std::multiset<std::string> violations_of(const h::Verdict& v) {
  std::multiset<std::string> out;
  for (const auto& x : v.violations) out.insert(fmt::format("{} task {}", h::to_string(x.kind), x.task));
  return out;
}
using Set = std::multiset<std::string>;

std::string replace(std::string s, const std::string& from, const std::string& to) {
  auto at = s.find(from);
  REQUIRE(at != std::string::npos);
  return s.replace(at, from.size(), to);
}

}  // namespace

TEST_CASE("history: a good history is accepted, with its counts", "[history]") {
  auto v = check(kGood);
  INFO(v.format());
  CHECK(v.ok());
  CHECK(v.tasks == 4);
  CHECK(v.submitted == 4);
  CHECK(v.terminal == 4);
  CHECK(v.succeeded == 2);
  CHECK(v.failed == 1);
  CHECK(v.cancelled == 1);
  CHECK(v.claims == 6);
  CHECK(v.completions == 2);  // the zombie's rejected completion does not count
  CHECK(v.effects == 2);
  CHECK(v.handovers_checked == 3);
  CHECK(v.handovers_unchecked == 0);
  CHECK(v.format().find(": OK") != std::string::npos);
}

TEST_CASE("history: a double effect is rejected", "[history]") {
  // The zombie's handler writes committed too (its writes were not in the
  // completing transaction).
  auto v = check(std::string(kGood) + "effect task=1 version=2 origin=db\n");
  INFO(v.format());
  CHECK_FALSE(v.ok());
  CHECK(v.count(ViolationKind::double_effect) == 1);
  CHECK(v.violations.size() == 1);
  CHECK(v.violations[0].task == 1);
  CHECK(v.format().find("double_effect task 1: 2 effect rows (versions 3, 2)") != std::string::npos);
}

TEST_CASE("history: a completion by a stale version is rejected", "[history]") {
  // The zombie's completion commits after the reclaim (no version fence), and
  // the new owner's is then refused.
  auto text = replace(kGood, "complete task=1 version=2 owner=w1 ok=0 client=7000",
                      "complete task=1 version=2 owner=w1 db=7000");
  text = replace(text, "complete task=1 version=3 owner=w2 db=8000", "complete task=1 version=3 owner=w2 ok=0");
  text = replace(text, "effect task=1 version=3 origin=db", "effect task=1 version=2 origin=db");
  auto v = check(text);
  INFO(v.format());
  CHECK_FALSE(v.ok());
  // stale_lease: it committed after version 3 was handed out.
  CHECK(violations_of(v) == Set{"stale_completion task 1", "stale_lease task 1"});
}

TEST_CASE("history: a completion by a version no claim handed out is rejected", "[history]") {
  auto v = check(std::string(kGood) + "complete task=2 version=9 owner=w9 db=4100\n");
  INFO(v.format());
  CHECK(violations_of(v) == Set{"double_completion task 2", "stale_completion task 2"});
}

TEST_CASE("history: a lost task is rejected", "[history]") {
  SECTION("submitted, never seen again") {
    auto v = check(std::string(kGood) + "submit task=5 key=q/e max_attempts=3\n");
    INFO(v.format());
    REQUIRE(v.violations.size() == 1);
    CHECK(v.violations[0].kind == ViolationKind::lost_task);
    CHECK(v.violations[0].task == 5);
  }
  SECTION("left running") {
    auto text = replace(kGood, "final task=2 status=succeeded attempt=2 origin=db", "final task=2 status=running origin=db");
    text = replace(text, "complete task=2 version=6 owner=w2 db=4000", "");
    text = replace(text, "effect task=2 version=6 origin=db", "");
    auto v = check(text);
    INFO(v.format());
    REQUIRE(v.violations.size() == 1);
    CHECK(v.violations[0].kind == ViolationKind::lost_task);
    CHECK(v.violations[0].task == 2);
    CHECK(v.violations[0].detail == "ended running, not terminal");
  }
}

TEST_CASE("history: overlapping leases are rejected", "[history]") {
  SECTION("reclaimed before the lease expired") {
    auto v = check(replace(kGood, "claim task=1 version=3 owner=w2 db=6500", "claim task=1 version=3 owner=w2 db=5500"));
    INFO(v.format());
    REQUIRE(violations_of(v) == Set{"lease_overlap task 1"});
    CHECK(v.violations[0].detail == "version 3 was claimed 0.000500 s before version 2 ended (by expire)");
  }
  SECTION("a heartbeat extended the lease past the next claim (no expiry recorded)") {
    auto text = replace(kGood, "expire task=1 version=2 origin=db db=6000", "");
    text = replace(text, "heartbeat task=1 version=2 owner=w1 db=3000 until=6000",
                   "heartbeat task=1 version=2 owner=w1 db=3000 until=7000");
    auto v = check(text);
    INFO(v.format());
    CHECK(violations_of(v) == Set{"lease_overlap task 1"});
  }
  SECTION("within the allowed clock slack it passes") {
    h::Options o;
    o.slack_us = 600;
    auto v = check(replace(kGood, "claim task=1 version=3 owner=w2 db=6500", "claim task=1 version=3 owner=w2 db=5500"), o);
    INFO(v.format());
    CHECK(v.ok());
  }
}

TEST_CASE("history: a stale lease's heartbeat committed after a reclaim is rejected", "[history]") {
  auto v = check(std::string(kGood) + "heartbeat task=1 version=2 owner=w1 db=7000 until=10000\n");
  INFO(v.format());
  REQUIRE(v.violations.size() == 1);
  CHECK(v.violations[0].kind == ViolationKind::stale_lease);
  CHECK(v.violations[0].detail == "heartbeat by version 2 committed 0.000500 s after version 3 was claimed");
}

TEST_CASE("history: effects of tasks that did not succeed, and missing effects, are rejected", "[history]") {
  auto v = check(std::string(kGood) + "effect task=4 version=2 origin=db\n");
  INFO(v.format());
  REQUIRE(v.violations.size() == 1);
  CHECK(v.violations[0].kind == ViolationKind::orphan_effect);

  auto missing = replace(kGood, "effect task=2 version=6 origin=db", "");
  auto m = check(missing);
  INFO(m.format());
  REQUIRE(m.violations.size() == 1);
  CHECK(m.violations[0].kind == ViolationKind::missing_effect);
  h::Options o;
  o.require_effects = false;
  CHECK(check(missing, o).ok());

  // Written under another lease than the completing one.
  auto w = check(replace(kGood, "effect task=1 version=3 origin=db", "effect task=1 version=2 origin=db"));
  INFO(w.format());
  REQUIRE(w.violations.size() == 1);
  CHECK(w.violations[0].kind == ViolationKind::effect_version);

  // A client-side effect event is context only: the database decides.
  CHECK(check(std::string(kGood) + "effect task=1 version=2 owner=w1\n").ok());
}

TEST_CASE("history: a client told of a completion the database does not have is rejected", "[history]") {
  auto v = check(std::string(kGood) + "complete task=4 version=2 owner=w1 client=1600\n");
  INFO(v.format());
  CHECK(violations_of(v) == Set{"completion_not_recorded task 4"});
}

TEST_CASE("history: attempts beyond max_attempts and one key naming two tasks are rejected", "[history]") {
  auto a = check(std::string(kGood) + "claim task=4 version=4 owner=w2 db=1600 until=4600 attempt=2\n");
  INFO(a.format());
  CHECK(violations_of(a) == Set{"attempts_exceeded task 4"});

  auto k = check(std::string(kGood) + "submit task=7 key=q/a\nfinal task=7 status=cancelled origin=db\n");
  INFO(k.format());
  REQUIRE(k.violations.size() == 1);
  CHECK(k.violations[0].kind == ViolationKind::duplicate_key);
  CHECK(k.violations[0].detail == "key 'q/a' names tasks 1, 7");
}

TEST_CASE("history: the line format round-trips and reports bad lines by number", "[history]") {
  h::Event e;
  e.kind = h::Kind::claim;
  e.origin = h::Origin::db;
  e.task = 42;
  e.version = 7;
  e.owner = "host a%1=2";
  e.key = "q/k\tx";
  e.ok = false;
  e.client_us = 1;
  e.db_us = 2;
  e.until_us = 3;
  e.status = "retry";
  e.attempt = 2;
  e.max_attempts = 5;
  auto line = h::to_line(e);
  CHECK(line.find(" owner=host%20a%251%3D2 ") != std::string::npos);
  CHECK(line.find(" key=q/k%09x ") != std::string::npos);
  auto back = h::parse(line);
  REQUIRE(back.size() == 1);
  CHECK(h::to_line(back[0]) == line);
  CHECK(back[0].owner == e.owner);
  CHECK(back[0].key == e.key);
  CHECK(back[0].origin == h::Origin::db);
  CHECK_FALSE(back[0].ok);
  CHECK(back[0].until_us == std::optional<std::int64_t>(3));

  CHECK_THROWS_WITH(h::parse("submit task=1\n\nbogus task=2\n"), "line 3: unknown event kind 'bogus'");
  CHECK_THROWS_WITH(h::parse("claim version=2\n"), "line 1: task= is missing");
  CHECK_THROWS_WITH(h::parse("claim task=x\n"), "line 1: task=x is not an integer");
  CHECK_THROWS_WITH(h::parse("claim task=1 colour=red\n"), "line 1: unknown field 'colour'");

  auto dir = eoq::test::scratch_dir("history");
  auto events = h::parse(kGood);
  h::save_file(dir + "/h.txt", events);
  auto again = h::load_file(dir + "/h.txt");
  REQUIRE(again.size() == events.size());
  for (std::size_t i = 0; i < events.size(); ++i) CHECK(h::to_line(again[i]) == h::to_line(events[i]));
}

TEST_CASE("history: a Recorder's file has every event as it happens, and a torn last line is dropped", "[history]") {
  auto dir = eoq::test::scratch_dir("history-log");
  auto events = h::parse(kGood);
  {
    h::Recorder r(dir + "/a.history");
    for (auto& e : events) r.add(e);
    // Read while the recorder is still open, as after a SIGKILL.
    CHECK(h::load_log(dir + "/a.history").size() == events.size());
  }
  {
    std::ofstream torn(dir + "/b.history");
    torn << "submit task=9\nclaim task=9 vers";
  }
  CHECK(h::load_log(dir + "/b.history").size() == 1);
  CHECK(h::load_log(dir + "/missing.history").empty());
  CHECK(h::load_logs(dir).size() == events.size() + 1);
}

TEST_CASE("history: a history read back from a Postgres schema is checked", "[history][postgres]") {
  using eoq::test::Admin;
  using eoq::test::StoreKind;
  using eoq::test::TestStore;
  TestStore s(StoreKind::postgres);
  auto& store = *s;
  Admin admin(s.conninfo());
  admin.exec(fmt::format("CREATE TABLE \"{}\".effects (task_id bigint NOT NULL, version bigint NOT NULL)", s.schema()));
  const auto insert_effect = fmt::format("INSERT INTO \"{}\".effects (task_id, version) VALUES ($1, $2)", s.schema());
  h::Recorder client;

  auto submit = [&](const std::string& queue) {
    eoq::NewTask t;
    t.type = "t";
    t.queue = queue;
    t.key = "k";
    t.retry.max_attempts = 3;
    t.retry.initial_delay = eoq::Millis(0);
    auto r = store.submit(t);
    h::Event e;
    e.task = r.task.id;
    e.key = queue + "/k";
    e.max_attempts = 3;
    client.add(e);
    return r.task.id;
  };
  auto claim = [&](const std::string& queue, const std::string& owner, eoq::Millis lease) {
    eoq::ClaimRequest req;
    req.queues = {queue};
    req.owner = owner;
    req.lease = lease;
    auto leases = store.claim(req);
    REQUIRE(leases.size() == 1);
    h::Event e;
    e.kind = h::Kind::claim;
    e.task = leases[0].id();
    e.version = leases[0].token;
    e.owner = owner;
    e.db_us = h::micros(leases[0].task.updated_at);
    e.until_us = h::micros(leases[0].expires_at);
    e.attempt = leases[0].attempt();
    client.add(e);
    return leases[0];
  };
  auto complete = [&](const eoq::Lease& l) {
    auto tx = store.begin(l);
    tx->exec(insert_effect, {std::to_string(l.id()), std::to_string(l.token)});
    h::Event e;
    e.kind = h::Kind::complete;
    e.task = l.id();
    e.version = l.token;
    e.owner = l.owner;
    try {
      tx->complete("null");
    } catch (const eoq::LeaseLost&) {
      e.ok = false;
    }
    client.add(e);
    return e.ok;
  };

  // a: w1's lease runs out, w2 reclaims and completes, w1's completion is refused.
  auto a = submit("qa");
  auto a1 = claim("qa", "w1", 200ms);
  std::this_thread::sleep_for(300ms);
  auto a2 = claim("qa", "w2", 30s);
  REQUIRE(a2.id() == a);
  CHECK(complete(a2));
  CHECK_FALSE(complete(a1));
  // b: fails once, then completes.
  auto b = submit("qb");
  auto b1 = claim("qb", "w1", 30s);
  CHECK(store.fail(b1, {"boom", false}).status == eoq::TaskStatus::pending);
  std::this_thread::sleep_for(20ms);
  auto b2 = claim("qb", "w3", 30s);
  REQUIRE(b2.id() == b);
  CHECK(complete(b2));
  // c: cancelled while pending.
  auto c = submit("qc");
  CHECK(store.cancel(c) == eoq::CancelOutcome::cancelled);

  auto db = h::load_postgres(admin.get(), s.schema(), "effects");
  auto v = h::verify(db);
  INFO(v.format());
  CHECK(v.ok());
  CHECK(v.tasks == 3);
  CHECK(v.succeeded == 2);
  CHECK(v.cancelled == 1);
  CHECK(v.claims == 4);
  CHECK(v.completions == 2);
  CHECK(v.effects == 2);
  CHECK(v.handovers_checked == 2);

  // The client's view and the database's, together: each claim counts once.
  auto both = client.events();
  both.insert(both.end(), db.begin(), db.end());
  auto vb = h::verify(both);
  INFO(vb.format());
  CHECK(vb.ok());
  CHECK(vb.claims == 4);
  CHECK(vb.completions == 2);

  // A second effect row for a: rejected.
  admin.exec(insert_effect, {std::to_string(a), std::to_string(a1.token)});
  auto bad = h::verify(h::load_postgres(admin.get(), s.schema(), "effects"));
  CHECK(bad.count(ViolationKind::double_effect) == 1);
  CHECK(bad.violations.size() == 1);
}

TEST_CASE("the checker rejects a task claimed or started at or after its deadline", "[history]") {
  const std::string ok_history = R"(
submit task=1 max_attempts=3 deadline=1000000
claim task=1 version=2 origin=db db=900000 until=30900000 attempt=1
start task=1 version=2 client=950000
complete task=1 version=2 origin=db db=1200000
final task=1 status=succeeded origin=db
)";
  auto good = h::verify(h::parse(ok_history), {.slack_us = 0, .require_effects = false});
  INFO(good.format());
  CHECK(good.ok());

  SECTION("a handler started after the deadline, from a buffer") {
    auto v = h::verify(h::parse(R"(
submit task=1 max_attempts=3 deadline=1000000
claim task=1 version=2 origin=db db=900000 until=30900000 attempt=1
start task=1 version=2 db=1100000
complete task=1 version=2 origin=db db=1200000
final task=1 status=succeeded origin=db
)"),
                       {.slack_us = 0, .require_effects = false});
    CHECK(v.count(ViolationKind::started_after_deadline) == 1);
    CHECK(v.violations.size() == 1);
  }
  SECTION("a claim at the deadline") {
    auto v = h::verify(h::parse(R"(
submit task=1 max_attempts=3 deadline=1000000
claim task=1 version=2 origin=db db=1000000 until=31000000 attempt=1
final task=1 status=succeeded origin=db
complete task=1 version=2 origin=db db=1200000
)"),
                       {.slack_us = 0, .require_effects = false});
    CHECK(v.count(ViolationKind::started_after_deadline) == 1);
  }
  SECTION("expired at hand-off instead is fine, and the line format keeps the deadline") {
    auto events = h::parse(R"(
submit task=1 max_attempts=3 deadline=1000000
claim task=1 version=2 origin=db db=900000 until=30900000 attempt=1
fail task=1 version=2 status=expired
)");
    auto v = h::verify(events, {.slack_us = 0, .require_effects = false});
    INFO(v.format());
    CHECK(v.ok());
    CHECK(v.expired == 1);
    CHECK(h::to_line(events[0]).find("deadline=1000000") != std::string::npos);
  }
}

namespace {

// A pipeline: 10 -> (11, 12) -> 13, and 14 -> 15 where 14 fails; 16 runs
// whatever 14 did. Times are database microseconds.
const char* const kFlow = R"(
submit task=10
claim task=10 version=2 owner=w1 db=1000 until=9000 attempt=1
complete task=10 version=2 owner=w1 db=2000
effect task=10 version=2 origin=db
final task=10 status=succeeded attempt=1 origin=db db=2000
submit task=11
parent task=11 parent=10
claim task=11 version=2 owner=w1 db=2100 until=9000 attempt=1
complete task=11 version=2 owner=w1 db=3000
effect task=11 version=2 origin=db
final task=11 status=succeeded attempt=1 origin=db db=3000
submit task=12
parent task=12 parent=10
claim task=12 version=2 owner=w2 db=2200 until=9000 attempt=1
complete task=12 version=2 owner=w2 db=3500
effect task=12 version=2 origin=db
final task=12 status=succeeded attempt=1 origin=db db=3500
submit task=13
parent task=13 parent=11
parent task=13 parent=12
claim task=13 version=2 owner=w1 db=3600 until=9000 attempt=1
complete task=13 version=2 owner=w1 db=4000
effect task=13 version=2 origin=db
final task=13 status=succeeded attempt=1 origin=db db=4000
submit task=14 max_attempts=1
claim task=14 version=2 owner=w1 db=1000 until=9000 attempt=1
fail task=14 version=2 owner=w1 status=failed db=1500
final task=14 status=failed attempt=1 origin=db db=1500
submit task=15
parent task=15 parent=14
final task=15 status=cancelled origin=db db=1500
submit task=16
parent task=16 parent=14 status=run
claim task=16 version=2 owner=w2 db=1600 until=9000 attempt=1
complete task=16 version=2 owner=w2 db=1700
effect task=16 version=2 origin=db
final task=16 status=succeeded attempt=1 origin=db db=1700
)";

std::string replaced(std::string text, const std::string& from, const std::string& to) {
  auto at = text.find(from);
  REQUIRE(at != std::string::npos);
  return text.replace(at, from.size(), to);
}

}  // namespace

TEST_CASE("history: dependents claimed after their parents are accepted, early or doomed ones are rejected",
          "[history][workflows]") {
  auto good = check(kFlow);
  INFO(good.format());
  CHECK(good.ok());
  CHECK(good.edges_checked == 6);

  // Task 13 claimed while parent 12 was still running.
  auto early =
      check(replaced(kFlow, "claim task=13 version=2 owner=w1 db=3600", "claim task=13 version=2 owner=w1 db=3400"));
  CHECK(early.violations.size() == 1);
  CHECK(early.count(ViolationKind::dependent_started_early) == 1);
  // Released on the first parent: claimed before the second (12) succeeded.
  auto first = check(replaced(replaced(kFlow, "complete task=12 version=2 owner=w2 db=3500",
                                       "complete task=12 version=2 owner=w2 db=3900"),
                              "final task=12 status=succeeded attempt=1 origin=db db=3500",
                              "final task=12 status=succeeded attempt=1 origin=db db=3900"));
  CHECK(first.count(ViolationKind::dependent_started_early) >= 1);
  // Task 15 ran although its parent failed.
  auto doomed = check(replaced(kFlow, "final task=15 status=cancelled origin=db db=1500",
                               "claim task=15 version=2 owner=w1 db=1600 until=9000 attempt=1\n"
                               "complete task=15 version=2 owner=w1 db=1700\neffect task=15 version=2 origin=db\n"
                               "final task=15 status=succeeded attempt=1 origin=db db=1700"));
  CHECK(doomed.violations.size() == 1);
  CHECK(doomed.count(ViolationKind::dependent_ran_after_failed_parent) == 1);
  // Without the run-anyway flag, task 16 running after 14 failed is the same fault.
  auto strict = check(replaced(kFlow, "parent task=16 parent=14 status=run", "parent task=16 parent=14"));
  CHECK(strict.count(ViolationKind::dependent_ran_after_failed_parent) == 1);
  // A dependent left waiting is a lost task.
  auto waiting =
      check(replaced(kFlow, "final task=15 status=cancelled origin=db db=1500", "final task=15 status=waiting origin=db"));
  CHECK(waiting.count(ViolationKind::lost_task) == 1);

  // The parent field round-trips through the line format.
  auto events = h::parse(kFlow);
  std::string lines;
  for (const auto& e : events) lines += h::to_line(e) + "\n";
  auto again = h::parse(lines);
  REQUIRE(again.size() == events.size());
  for (std::size_t i = 0; i < events.size(); ++i) {
    CHECK(again[i].parent == events[i].parent);
    CHECK(again[i].status == events[i].status);
  }
}

namespace {

// Queue q runs at most 3 at once, and at most 2 of each partition. Partition a
// runs 1 and 2 together, and 3 once 1 completed; 4 (partition b) fills the
// queue; 5 (no partition) starts when 3 ends. Times are database microseconds.
const char* const kLimits = R"(
limit queue=q concurrency=3
limit queue=q per_partition=1 concurrency=2
submit task=1 queue=q partition=a
claim task=1 version=2 owner=w1 db=1000 until=31000 attempt=1
complete task=1 version=2 owner=w1 db=5000
final task=1 status=succeeded origin=db
submit task=2 queue=q partition=a
claim task=2 version=2 owner=w2 db=2000 until=32000 attempt=1
complete task=2 version=2 owner=w2 db=9000
final task=2 status=succeeded origin=db
submit task=3 queue=q partition=a
claim task=3 version=2 owner=w1 db=5000 until=35000 attempt=1
complete task=3 version=2 owner=w1 db=8000
final task=3 status=succeeded origin=db
submit task=4 queue=q partition=b
claim task=4 version=2 owner=w3 db=3000 until=33000 attempt=1
complete task=4 version=2 owner=w3 db=6000
final task=4 status=succeeded origin=db
submit task=5 queue=q
claim task=5 version=2 owner=w3 db=8000 until=38000 attempt=1
complete task=5 version=2 owner=w3 db=8500
final task=5 status=succeeded origin=db
submit task=6 queue=r partition=a
claim task=6 version=2 owner=w4 db=2500 until=32500 attempt=1
complete task=6 version=2 owner=w4 db=7000
final task=6 status=succeeded origin=db
)";

const h::Options kNoEffects{.slack_us = 0, .require_effects = false};

}  // namespace

TEST_CASE("history: runs within their queue's and partitions' limits are accepted, one more is rejected",
          "[history][limits]") {
  auto good = check(kLimits, kNoEffects);
  INFO(good.format());
  CHECK(good.ok());
  // Five starts in q, each against the queue's limit and its partition's;
  // the queue was full at 3000 and 5000, partition a at 2000 and 5000 (1
  // ended at 5000 exactly, so 3 took its place). Queue r has no limit.
  CHECK(good.limit_starts_checked == 10);
  CHECK(good.limit_full == 4);

  SECTION("a fourth in the queue, in a partition of its own") {
    auto v = check(std::string(kLimits) + "submit task=7 queue=q partition=c\n"
                                          "claim task=7 version=2 owner=w5 db=4000 until=34000 attempt=1\n"
                                          "complete task=7 version=2 owner=w5 db=4500\n"
                                          "final task=7 status=succeeded origin=db\n",
                   kNoEffects);
    INFO(v.format());
    REQUIRE(violations_of(v) == Set{"limit_exceeded task 7"});
    CHECK(v.violations[0].detail ==
          "version 2 started while queue 'q' ran (4 at once, limit 3): 1 (version 2), 2 (version 2), 4 (version 2)");
  }
  SECTION("a third of partition a, the queue within its limit") {
    auto v = check(std::string(kLimits) + "submit task=7 queue=q partition=a\n"
                                          "claim task=7 version=2 owner=w5 db=2500 until=32500 attempt=1\n"
                                          "complete task=7 version=2 owner=w5 db=2800\n"
                                          "final task=7 status=succeeded origin=db\n",
                   kNoEffects);
    INFO(v.format());
    REQUIRE(violations_of(v) == Set{"limit_exceeded task 7"});
    CHECK(v.violations[0].detail ==
          "version 2 started while queue 'q' partition 'a' ran (3 at once, limit 2): 1 (version 2), 2 (version 2)");
  }
  SECTION("3 claimed before 1 completed") {
    auto v = check(replace(kLimits, "claim task=3 version=2 owner=w1 db=5000", "claim task=3 version=2 owner=w1 db=4999"),
                   kNoEffects);
    INFO(v.format());
    // Partition a had 1 and 2, the queue 1, 2 and 4.
    CHECK(violations_of(v) == Set{"limit_exceeded task 3", "limit_exceeded task 3"});
  }
  SECTION("a limit holds from its time on; one without concurrency turns it off") {
    auto later = replace(kLimits, "limit queue=q per_partition=1 concurrency=2",
                         "limit queue=q per_partition=1 concurrency=1 db=3000\n"
                         "limit queue=q per_partition=1 db=6000");
    auto v = check(later, kNoEffects);
    INFO(v.format());
    // At 5000 partition a had 2 running (2 and 3) with a limit of 1; 2 at
    // 2000 came before the limit, 5 at 8000 after it went.
    CHECK(violations_of(v) == Set{"limit_exceeded task 3"});
  }
}

TEST_CASE("history: a lease that expired frees its place exactly at its expiry, as heartbeats extended it",
          "[history][limits]") {
  // Task 1's worker dies: its lease runs out at 5000 and w2 reclaims it at 6000.
  // Task 2, of the same partition (limit 1), starts at 5000.
  const std::string base = R"(
limit queue=q per_partition=1 concurrency=1
submit task=1 queue=q partition=a max_attempts=3
claim task=1 version=2 owner=w1 db=1000 until=5000 attempt=1
expire task=1 version=2 origin=db db=5000
claim task=1 version=3 owner=w2 db=6000 until=10000 attempt=2
complete task=1 version=3 owner=w2 db=7000
final task=1 status=succeeded attempt=2 origin=db
submit task=2 queue=q partition=a
claim task=2 version=2 owner=w3 db=5000 until=9000 attempt=1
complete task=2 version=2 owner=w3 db=5500
final task=2 status=succeeded origin=db
)";
  auto good = check(base, kNoEffects);
  INFO(good.format());
  CHECK(good.ok());
  CHECK(good.limit_starts_checked == 3);
  CHECK(good.revived == 0);

  SECTION("a microsecond before the expiry") {
    auto v = check(replace(base, "claim task=2 version=2 owner=w3 db=5000", "claim task=2 version=2 owner=w3 db=4999"),
                   kNoEffects);
    INFO(v.format());
    CHECK(violations_of(v) == Set{"limit_exceeded task 2"});
  }
  SECTION("a heartbeat before the expiry extended the lease past 5000") {
    auto text = replace(base, "expire task=1 version=2 origin=db db=5000",
                        "heartbeat task=1 version=2 owner=w1 db=4000 client=4001 until=5800\n"
                        "expire task=1 version=2 origin=db db=5800");
    auto v = check(text, kNoEffects);
    INFO(v.format());
    CHECK(violations_of(v) == Set{"limit_exceeded task 2"});
    // ... unless it returned only after the lease had run out: then it may
    // have committed after a claim that counted the lease expired.
    auto late = check(replace(text, "client=4001", "client=5000"), kNoEffects);
    INFO(late.format());
    CHECK(late.ok());
    CHECK(late.revived == 1);
  }
  SECTION("a heartbeat after the expiry revives the lease, but its place was free from the expiry on") {
    auto text = replace(base, "expire task=1 version=2 origin=db db=5000",
                        "heartbeat task=1 version=2 owner=w1 db=5000 until=5900\n"
                        "expire task=1 version=2 origin=db db=5900");
    auto v = check(text, kNoEffects);
    INFO(v.format());
    CHECK(v.ok());
    CHECK(v.revived == 1);
  }
}

TEST_CASE("history: a claim that waited for its queue's lock is judged by when it returned", "[history][limits]") {
  // Task 2's claim began (db=3900) before 1's completion committed, waited for
  // the claims of the queue to be its turn, and saw the completion: it returned
  // at 4200, after the completion's call began (4100).
  const std::string text = R"(
limit queue=q concurrency=1
submit task=1 queue=q
claim task=1 version=2 owner=w1 db=1000 until=31000 attempt=1
complete task=1 version=2 owner=w1 origin=db db=4000
complete task=1 version=2 owner=w1 client=4100
final task=1 status=succeeded origin=db
submit task=2 queue=q
claim task=2 version=2 owner=w2 db=3900 client=4200 until=33900 attempt=1
complete task=2 version=2 owner=w2 db=5000
final task=2 status=succeeded origin=db
)";
  auto v = check(text, kNoEffects);
  INFO(v.format());
  CHECK(v.ok());
  CHECK(v.limit_starts_checked == 2);
  // Known only by its database time, the claim began before the completion did.
  CHECK(violations_of(check(replace(text, " client=4200", ""), kNoEffects)) == Set{"limit_exceeded task 2"});
  // Returned before the completion's call began: both ran at once.
  CHECK(violations_of(check(replace(text, "client=4200", "client=4050"), kNoEffects)) ==
        Set{"limit_exceeded task 2"});
}

TEST_CASE("history: limit events, queues and partitions round-trip through the line format", "[history][limits]") {
  auto events = h::parse(kLimits);
  REQUIRE(events.size() >= 3);
  CHECK(h::to_line(events[0]) == "limit origin=client queue=q concurrency=3");
  CHECK(h::to_line(events[1]) == "limit origin=client queue=q per_partition=1 concurrency=2");
  CHECK(events[2].queue == "q");
  CHECK(events[2].partition == "a");
  h::Event e;
  e.kind = h::Kind::limit;
  e.origin = h::Origin::db;
  e.queue = "q x";
  e.partition = "tenant=7";
  e.concurrency = 0;
  e.db_us = 5;
  auto line = h::to_line(e);
  CHECK(line == "limit origin=db db=5 queue=q%20x partition=tenant%3D7 concurrency=0");
  auto back = h::parse(line);
  REQUIRE(back.size() == 1);
  CHECK(h::to_line(back[0]) == line);
  CHECK(back[0].concurrency == std::optional<int>(0));
  CHECK(h::parse("end task=3 version=2 ok=0 client=9\n").at(0).kind == h::Kind::end);

  CHECK_THROWS_WITH(h::parse("limit concurrency=2\n"), "line 1: a limit needs queue=");
  CHECK_THROWS_WITH(h::parse("limit queue=q partition=a per_partition=1\n"),
                    "line 1: a limit names one partition or per_partition=1, not both");
  CHECK_THROWS_WITH(h::parse("limit queue=q per_partition=2\n"),
                    "line 1: per_partition must be 1, 0, true or false, not '2'");
  // Histories from before limits parse and pass as they did.
  CHECK(check(kGood).ok());
}

TEST_CASE("history: limits and partitions read back from a Postgres schema are checked", "[history][postgres][limits]") {
  using eoq::test::StoreKind;
  eoq::test::TestStore s(StoreKind::postgres);
  eoq::test::Admin admin(s.conninfo());
  h::Recorder client;
  h::RecordingStore store(*s, client);
  eoq::QueueLimits limits;
  limits.concurrency = 2;
  limits.partition_concurrency = 1;
  store.set_limits("q", limits);
  for (const char* p : {"a", "a", "b"}) {
    eoq::NewTask t;
    t.type = "t";
    t.queue = "q";
    t.partition = p;
    store.submit(t);
  }
  eoq::ClaimRequest req;
  req.queues = {"q"};
  req.owner = "w";
  req.limit = 10;
  auto first = store.claim(req);
  REQUIRE(first.size() == 2);  // one of a, one of b
  CHECK(store.claim(req).empty());
  for (auto& l : first) store.complete(l);
  auto second = store.claim(req);
  REQUIRE(second.size() == 1);
  store.complete(second[0]);

  auto db = h::load_postgres(admin.get(), s.schema(), "");
  std::set<std::string> scopes;
  for (const auto& e : db)
    if (e.kind == h::Kind::limit) scopes.insert(fmt::format("{} {} {}", e.queue, e.per_partition, *e.concurrency));
  CHECK(scopes == std::set<std::string>{"q false 2", "q true 1"});
  auto v = h::verify(db, kNoEffects);
  INFO(v.format());
  CHECK(v.ok());
  CHECK(v.limit_starts_checked == 6);  // three runs, each against both limits
  auto both = client.events();
  h::append(both, db);
  auto vb = h::verify(both, kNoEffects);
  INFO(vb.format());
  CHECK(vb.ok());
  // The client's limit events and the database's make one timeline per scope.
  CHECK(vb.limit_starts_checked == 6);
}
