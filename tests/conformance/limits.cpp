// Concurrency and rate limits per queue and per partition (TaskStore::set_limits).
#include "conformance.hpp"

namespace {

NewTask in(std::string partition, std::string queue = "q") {
  NewTask t = task("t", std::move(queue));
  if (!partition.empty()) t.partition = std::move(partition);
  return t;
}

eoq::QueueLimits concurrency(int n) {
  eoq::QueueLimits l;
  l.concurrency = n;
  return l;
}

eoq::QueueLimits per_partition(int n) {
  eoq::QueueLimits l;
  l.partition_concurrency = n;
  return l;
}

std::map<std::string, int> by_partition(const std::vector<Lease>& leases) {
  std::map<std::string, int> out;
  for (const auto& l : leases) ++out[l.task.partition.value_or("")];
  return out;
}

}  // namespace

STORE_CASE("a concurrency limit of 1, 3 and 0: never more running than it allows, over many claims",
           "[claim][limits]") {
  for (int i = 0; i < 10; ++i) store.submit(in(""));
  for (int limit : {1, 3, 0}) {
    store.set_limits("q", concurrency(limit));
    std::vector<Lease> held;
    // Claimers asking for more than the limit, again and again, get no more in all.
    for (int round = 0; round < 3; ++round)
      for (auto& l : claim(store, {"q"}, "w" + std::to_string(round), 10)) held.push_back(l);
    CHECK(static_cast<int>(held.size()) == limit);
    CHECK(stats_of(store, "q").running == limit);
    for (auto& l : held) store.release(l);
  }
  {
    // Claims that each fit in the room left: they add up to the limit, no more.
    store.set_limits("q", concurrency(5));
    std::vector<Lease> held;
    for (int round = 0; round < 4; ++round)
      for (auto& l : claim(store, {"q"}, "w" + std::to_string(round), 2)) held.push_back(l);
    CHECK(held.size() == 5);
    CHECK(stats_of(store, "q").running == 5);
    for (auto& l : held) store.release(l);
  }
  // A freed place is taken again; a completion frees it.
  store.set_limits("q", concurrency(2));
  auto first = claim(store, {"q"}, "w", 10);
  REQUIRE(first.size() == 2);
  CHECK(claim(store, {"q"}, "w", 10).empty());
  store.complete(first[0]);
  auto next = claim(store, {"q"}, "w", 10);
  CHECK(next.size() == 1);
  // Other queues are not limited by it.
  store.submit(in("", "r"));
  CHECK(claim(store, {"q", "r"}, "w", 10).size() == 1);
}

STORE_CASE("limits are stored, listed, shown in stats, replaced and removed", "[limits]") {
  CHECK(store.limits().empty());
  eoq::QueueLimits l;
  l.concurrency = 5;
  l.partition_concurrency = 1;
  l.rate = eoq::RateLimit{100, 60s};
  l.partition_rate = eoq::RateLimit{10, 1s};
  store.set_limits("q", l);
  auto all = store.limits();
  REQUIRE(all.size() == 1);
  CHECK(all[0].first == "q");
  CHECK(all[0].second == l);
  // Listed in stats even with no tasks, so that an operator sees and changes them.
  CHECK(stats_of(store, "q").limits == l);
  store.set_limits("q", concurrency(7));
  REQUIRE(store.limits().size() == 1);
  CHECK(store.limits()[0].second == concurrency(7));
  store.set_limits("q", {});  // none
  CHECK(store.limits().empty());
  for (int i = 0; i < 4; ++i) store.submit(in(""));
  CHECK(claim(store, {"q"}, "w", 10).size() == 4);
}

STORE_CASE("a limit per partition: each partition runs at most its limit, and a full one holds back no other",
           "[claim][limits]") {
  store.set_limits("q", per_partition(1));
  // The head of the queue is all one partition; the others come behind it.
  for (int i = 0; i < 20; ++i) store.submit(in("big"));
  for (const char* p : {"a", "b", "c"}) store.submit(in(p));
  store.submit(in(""));  // no partition: a partition of its own
  auto got = claim(store, {"q"}, "w", 100);
  CHECK(by_partition(got) == std::map<std::string, int>{{"", 1}, {"a", 1}, {"b", 1}, {"big", 1}, {"c", 1}});
  CHECK(claim(store, {"q"}, "w", 100).empty());
  // Raising the limit while tasks run lets more start, at once, without a restart.
  store.set_limits("q", per_partition(3));
  auto more = claim(store, {"q"}, "w", 100);
  CHECK(by_partition(more) == std::map<std::string, int>{{"big", 2}});
  // Lowering it below what runs stops nothing, and starts nothing until enough end.
  store.set_limits("q", per_partition(2));
  CHECK(claim(store, {"q"}, "w", 100).empty());
  for (auto& l : got)
    if (l.task.partition == std::optional<std::string>("big")) store.complete(l);
  CHECK(claim(store, {"q"}, "w", 100).empty());  // big: 2 running, limit 2
  store.complete(more[0]);
  CHECK(by_partition(claim(store, {"q"}, "w", 100)) == std::map<std::string, int>{{"big", 1}});
}

STORE_CASE("a queue limit and a partition limit together: both hold", "[claim][limits]") {
  eoq::QueueLimits l;
  l.concurrency = 3;
  l.partition_concurrency = 2;
  store.set_limits("q", l);
  for (int i = 0; i < 5; ++i) store.submit(in("a"));
  for (int i = 0; i < 5; ++i) store.submit(in("b"));
  auto got = claim(store, {"q"}, "w", 100);
  REQUIRE(got.size() == 3);
  auto parts = by_partition(got);
  CHECK(parts["a"] == 2);
  CHECK(parts["b"] == 1);
}

STORE_CASE("a place held by a lease that ran out comes back, and running tasks count when a limit is first set",
           "[claim][limits]") {
  for (int i = 0; i < 3; ++i) store.submit(in("p"));
  auto before = claim(store, {"q"}, "w1", 1, 300ms);  // started before any limit
  REQUIRE(before.size() == 1);
  store.set_limits("q", per_partition(1));
  CHECK(claim(store, {"q"}, "w2", 10).empty());  // the task started before counts
  std::this_thread::sleep_for(450ms);           // its lease runs out (by the store's clock)
  auto after = claim(store, {"q"}, "w2", 10);
  REQUIRE(after.size() == 1);
  // The stale holder is fenced off and frees nothing.
  CHECK_THROWS_AS(store.complete(before[0]), eoq::LeaseLost);
  CHECK(claim(store, {"q"}, "w3", 10).empty());
  store.complete(after[0]);
  CHECK(claim(store, {"q"}, "w3", 10).size() == 1);
}

STORE_CASE("a rate limit: at most N starts in any window of its period, the rest wait as no attempt",
           "[claim][limits]") {
  eoq::QueueLimits l;
  l.rate = eoq::RateLimit{3, 800ms};
  store.set_limits("q", l);
  for (int i = 0; i < 8; ++i) store.submit(in(""));
  auto first = claim(store, {"q"}, "w", 10);
  REQUIRE(first.size() == 3);
  for (auto& x : first) store.complete(x);  // finishing frees no start
  CHECK(claim(store, {"q"}, "w", 10).empty());
  auto waiting = list_all(store, eoq::ListQuery{.queue = "q", .status = TaskStatus::pending});
  REQUIRE(waiting.size() == 5);
  for (const auto& t : waiting) CHECK(t.attempts == 0);
  std::this_thread::sleep_for(1000ms);
  CHECK(claim(store, {"q"}, "w", 10).size() == 3);
}

STORE_CASE("a rate limit per partition counts each partition's starts", "[claim][limits]") {
  eoq::QueueLimits l;
  l.partition_rate = eoq::RateLimit{1, 60s};
  store.set_limits("q", l);
  for (const char* p : {"a", "a", "b", "b", "c"}) store.submit(in(p));
  auto got = claim(store, {"q"}, "w", 10);
  CHECK(by_partition(got) == std::map<std::string, int>{{"a", 1}, {"b", 1}, {"c", 1}});
  for (auto& x : got) store.complete(x);
  CHECK(claim(store, {"q"}, "w", 10).empty());
}

STORE_CASE("limits and partitions refuse bad input by field and write nothing", "[limits][validation]") {
  CHECK(field_of([&] { store.set_limits("q", concurrency(-1)); }) == "limits.concurrency");
  CHECK(field_of([&] { store.set_limits("q", per_partition(1000001)); }) == "limits.partition_concurrency");
  eoq::QueueLimits l;
  l.rate = eoq::RateLimit{5, 0ms};
  CHECK(field_of([&] { store.set_limits("q", l); }) == "limits.rate.period");
  l.rate = eoq::RateLimit{-5, 1s};
  CHECK(field_of([&] { store.set_limits("q", l); }) == "limits.rate.limit");
  l.rate.reset();
  l.partition_rate = eoq::RateLimit{5, -1ms};
  CHECK(field_of([&] { store.set_limits("q", l); }) == "limits.partition_rate.period");
  CHECK(field_of([&] { store.set_limits("bad queue!", concurrency(1)); }) == "queue");
  CHECK(store.limits().empty());
  NewTask t = in(std::string(513, 'p'));
  CHECK(field_of([&] { store.submit(t); }) == "partition");
  t.partition = "";
  CHECK(field_of([&] { store.submit(t); }) == "partition");
  t.partition.reset();
  t.timeout = 0ms;
  CHECK(field_of([&] { store.submit(t); }) == "timeout");
  require_nothing_written(store);
}

STORE_CASE("a task's partition and timeout are kept and read back, live and finished, single and in batches",
           "[submit][limits]") {
  NewTask t = in("customer-7");
  t.timeout = 1500ms;
  auto id = store.submit(t).task.id;
  auto got = must_get(store, id);
  CHECK(got.partition == std::optional<std::string>("customer-7"));
  CHECK(got.timeout == std::optional<Millis>(1500ms));
  CHECK_FALSE(must_get(store, store.submit(in("")).task.id).partition);
  // Batches: small (arrays), large and alike (narrow stage), large and mixed.
  for (std::size_t n : {3u, 1200u}) {
    for (bool mixed : {false, true}) {
      std::vector<NewTask> batch(n, t);
      if (mixed)
        for (std::size_t i = 0; i < n; i += 2) batch[i].partition = "p" + std::to_string(i);
      auto res = store.submit_batch(batch);
      for (std::size_t i : {std::size_t{0}, std::size_t{1}, n - 1}) {
        auto back = must_get(store, res[i].task.id);
        CHECK(back.partition == batch[i].partition);
        CHECK(back.timeout == batch[i].timeout);
        CHECK(res[i].task.partition == batch[i].partition);
      }
    }
  }
  auto lease = claim(store, {"q"}, "w", 1);
  REQUIRE(lease.size() == 1);
  CHECK(lease[0].task.partition == std::optional<std::string>("customer-7"));
  store.complete(lease[0]);
  CHECK(must_get(store, lease[0].id()).partition == std::optional<std::string>("customer-7"));
  CHECK(must_get(store, lease[0].id()).timeout == std::optional<Millis>(1500ms));
}

namespace {

struct Worst {
  int all = 0, partition = 0, done = 0;
  bool failed = false;
};

// 8 claimers, each with a store of its own on Postgres (another process would
// do the same; memory: the one store), claim up to 3 at a time and hold what
// they got for 2 ms: the most that ran at once, overall and in one partition.
template <class Fixture>
Worst claim_in_threads(Fixture& S, eoq::TaskStore& store, int tasks, int partitions) {
  std::vector<NewTask> batch;
  for (int i = 0; i < tasks; ++i) batch.push_back(in(partitions > 0 ? "p" + std::to_string(i % partitions) : ""));
  store.submit_batch(batch);
  std::mutex mu;
  std::map<std::string, int> now_running;
  int all_running = 0;
  Worst worst;
  std::vector<std::thread> threads;
  std::atomic<bool> failed{false};
  for (int w = 0; w < 8; ++w)
    threads.emplace_back([&, w] {
      try {
        std::unique_ptr<eoq::TaskStore> other = S.another();
        eoq::TaskStore* own = other ? other.get() : &store;
        for (;;) {
          auto got = claim(*own, {"q"}, "w" + std::to_string(w), 3);
          {
            std::lock_guard lock(mu);
            if (got.empty() && worst.done == tasks) return;
            for (auto& x : got) {
              worst.partition = std::max(worst.partition, ++now_running[x.task.partition.value_or("")]);
              worst.all = std::max(worst.all, ++all_running);
            }
          }
          std::this_thread::sleep_for(2ms);
          for (auto& x : got) {
            {
              // Counted out before the completion: the store may start the
              // next one as soon as it commits.
              std::lock_guard lock(mu);
              --now_running[x.task.partition.value_or("")];
              --all_running;
              ++worst.done;
            }
            own->complete(x);
          }
          if (got.empty()) std::this_thread::sleep_for(1ms);
        }
      } catch (...) {
        failed = true;
      }
    });
  for (auto& t : threads) t.join();
  worst.failed = failed;
  return worst;
}

}  // namespace

STORE_CASE("many claimers in threads never run more of a partition than its limit at once",
           "[claim][limits][concurrency]") {
  eoq::QueueLimits l;
  l.concurrency = 6;
  l.partition_concurrency = 2;
  store.set_limits("q", l);
  auto worst = claim_in_threads(S, store, 300, 5);
  CHECK_FALSE(worst.failed);
  CHECK(worst.done == 300);
  CHECK(worst.partition <= 2);
  CHECK(worst.all <= 6);
  CHECK(worst.all >= 2);  // it did run in parallel
}

STORE_CASE("many claimers in threads never run more of a queue than its limit at once, with no partitions",
           "[claim][limits][concurrency]") {
  // Without limits per partition a claim counts what runs from an upper
  // bound, and counts exactly only when the bound leaves too little room.
  store.set_limits("q", concurrency(5));
  auto worst = claim_in_threads(S, store, 300, 0);
  CHECK_FALSE(worst.failed);
  CHECK(worst.done == 300);
  CHECK(worst.all <= 5);
  CHECK(worst.all >= 2);
}

STORE_CASE("a lease that ran out in a queue with limits cannot be revived by a late heartbeat", "[limits][heartbeat]") {
  store.set_limits("q", per_partition(1));
  store.submit(in("p"));
  store.submit(in("p"));
  auto first = claim(store, {"q"}, "w1", 1, 200ms);
  REQUIRE(first.size() == 1);
  std::this_thread::sleep_for(350ms);
  auto second = claim(store, {"q"}, "w2", 1);  // the place counted free: the other task starts
  REQUIRE(second.size() == 1);
  CHECK_THROWS_AS(store.heartbeat(first[0], 30s), eoq::LeaseLost);
  // Outside limits a late heartbeat still extends a lease nobody took over.
  store.submit(in("", "free"));
  auto other = claim(store, {"free"}, "w1", 1, 200ms);
  REQUIRE(other.size() == 1);
  std::this_thread::sleep_for(350ms);
  CHECK_NOTHROW(store.heartbeat(other[0], 30s));
}

STORE_CASE("a task's partition and timeout survive every way it can end", "[limits][settle]") {
  auto make = [&](std::optional<TimePoint> deadline = std::nullopt) {
    NewTask t = in("part-9");
    t.timeout = 2500ms;
    t.deadline = deadline;
    t.retry.max_attempts = 1;
    return store.submit(t).task.id;
  };
  auto lease_of = [&](eoq::TaskId id, Millis lease = 30s) {
    auto got = claim(store, {"q"}, "w", 1, lease);
    REQUIRE(got.size() == 1);
    REQUIRE(got[0].id() == id);
    return got[0];
  };
  std::vector<std::pair<std::string, eoq::TaskId>> ended;
  {
    auto id = make();
    store.complete(lease_of(id));
    ended.emplace_back("complete", id);
  }
  {
    auto id = make();
    auto l = lease_of(id);
    eoq::Completion c{&l, "null"};
    store.complete_batch(std::span<const eoq::Completion>(&c, 1));
    ended.emplace_back("complete_batch", id);
  }
  {
    auto id = make();
    store.fail(lease_of(id), eoq::Failure{"no", true});
    ended.emplace_back("fail", id);
  }
  {
    auto id = make();
    store.cancel(id);
    ended.emplace_back("cancel pending", id);
  }
  {
    auto id = make();
    store.cancel_running(lease_of(id), "stop");
    ended.emplace_back("cancel_running", id);
  }
  {
    auto id = make();
    auto l = lease_of(id);
    store.cancel(id);
    store.release(l);
    ended.emplace_back("release with a cancel request", id);
  }
  {
    auto id = make();
    auto l = lease_of(id);
    store.cancel(id);
    store.snooze(l, 1s);
    ended.emplace_back("snooze with a cancel request", id);
  }
  {
    auto id = make(now() + 300ms);
    auto l = lease_of(id);
    std::this_thread::sleep_for(400ms);
    CHECK(store.expire_if_overdue(l));
    ended.emplace_back("expire_if_overdue", id);
  }
  {
    auto id = make();
    lease_of(id, 100ms);
    std::this_thread::sleep_for(250ms);
    store.maintain();  // no attempts left: the reaper ends it failed
    ended.emplace_back("reaped", id);
  }
  for (const auto& [how, id] : ended) {
    INFO(how);
    auto t = must_get(store, id);
    CHECK(eoq::is_terminal(t.status));
    CHECK(t.partition == std::optional<std::string>("part-9"));
    CHECK(t.timeout == std::optional<Millis>(2500ms));
  }
}

STORE_CASE("a claim over several queues takes a limited queue's room before a deep queue without limits",
           "[claim][limits]") {
  store.set_limits("small", concurrency(2));
  for (int i = 0; i < 20; ++i) store.submit(in("", "deep"));
  for (int i = 0; i < 3; ++i) store.submit(in("", "small"));
  auto got = claim(store, {"deep", "small"}, "w", 5);
  REQUIRE(got.size() == 5);
  int small = 0;
  for (const auto& l : got) small += l.task.queue == "small" ? 1 : 0;
  CHECK(small == 2);
  // Still claim order among the leases answered.
  CHECK(std::is_sorted(got.begin(), got.end(), [](const Lease& a, const Lease& b) {
    return std::tie(a.task.priority, a.task.run_at, a.task.id) < std::tie(b.task.priority, b.task.run_at, b.task.id);
  }));
}
