// Conformance: submitting: fields, ids, keys and their reuse rules, batches.
#include "conformance/conformance.hpp"

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

STORE_CASE("a large batch stores every field of its tasks as given", "[submit][batch]") {
  // Postgres writes a batch of this size field by field: in COPY's binary
  // format straight into its tables, or, when the batch repeats a key, in COPY
  // text into its stage. Each field must come back as it went in, NULLs and all.
  const auto base = std::chrono::time_point_cast<std::chrono::microseconds>(now()) + std::chrono::hours(1);
  for (bool repeats : {false, true}) {
    INFO("the batch repeats a key: " << repeats);
    std::vector<NewTask> batch;
    for (int i = 0; i < 1200; ++i) {
      NewTask t = task(fmt::format("type{}", i % 3));
      t.payload = fmt::format(R"({{"i": {}}})", i);
      if (i % 2 == 0) t.key = fmt::format("field{}-{}", repeats, i);
      if (i % 3 == 0) t.tenant = fmt::format("tenant\\{}", i % 4);  // a backslash: escaped in COPY text
      t.priority = i % 5 - 2;
      if (i % 4 != 0) t.run_at = base + std::chrono::microseconds(i * 1001);
      if (i % 6 == 0) t.deadline = base + std::chrono::hours(2) + std::chrono::microseconds(i);
      t.retry.max_attempts = 1 + i % 9;
      t.retry.backoff = i % 2 ? eoq::Backoff::fixed : eoq::Backoff::exponential;
      t.retry.initial_delay = eoq::Millis(10 + i);
      t.retry.max_delay = eoq::Millis(100000 + i);
      t.retry.jitter = (i % 10) / 8.0 > 1 ? 1 : (i % 10) / 8.0;
      batch.push_back(std::move(t));
    }
    if (repeats) batch.push_back(batch[6]);  // keyed, with a tenant and a deadline
    auto r = store.submit_batch(batch);
    REQUIRE(r.size() == batch.size());
    if (repeats) {
      CHECK(r.back().duplicate);
      CHECK(r.back().task.id == r[6].task.id);
    }
    int same = 0;
    for (std::size_t i = 0; i < 1200; ++i) {
      const auto& in = batch[i];
      auto got = store.get(r[i].task.id);
      REQUIRE(got);
      INFO("tasks[" << i << "]");
      CHECK_FALSE(r[i].duplicate);
      CHECK(got->type == in.type);
      CHECK(got->payload == in.payload);
      CHECK(got->key == in.key);
      CHECK(got->tenant == in.tenant);
      CHECK(got->priority == in.priority);
      if (in.run_at) CHECK(got->run_at == *in.run_at);
      CHECK(got->run_at == r[i].task.run_at);
      // What submit_batch answered is what the store holds: the answer is not read back row by row.
      CHECK(got->created_at == r[i].task.created_at);
      CHECK(got->version == r[i].task.version);
      CHECK(got->status == r[i].task.status);
      CHECK(got->deadline == in.deadline);
      CHECK(got->retry == in.retry);
      same += got->type == in.type && got->payload == in.payload && got->key == in.key && got->tenant == in.tenant &&
              got->priority == in.priority && got->deadline == in.deadline && got->retry == in.retry;
    }
    CHECK(same == 1200);
  }
}

// Postgres COPYs only key and payload when a large batch's tasks share every
// other field, and takes the shared ones once; NULLs shared or not.
STORE_CASE("a large batch whose tasks share all but key and payload stores the shared fields as given",
           "[submit][batch]") {
  const auto base = std::chrono::time_point_cast<std::chrono::microseconds>(now()) + std::chrono::hours(1);
  NewTask shared = task("shared\\type", "bulk");
  shared.tenant = "ten\\ant";
  shared.priority = -7;
  shared.run_at = base;
  shared.deadline = base + std::chrono::hours(2);
  shared.retry = eoq::RetryPolicy{5, eoq::Backoff::fixed, eoq::Millis(123), eoq::Millis(4567), 0.25};
  auto make = [&](const NewTask& like, int from, int n) {
    std::vector<NewTask> batch;
    for (int i = from; i < from + n; ++i) {
      NewTask t = like;
      t.payload = fmt::format(R"({{"i": {}}})", i);
      if (i % 2 == 0) t.key = fmt::format("s{}", i);
      // What a text[] literal or COPY's text format must escape, in keys and payloads.
      if (i % 10 == 0) t.key = fmt::format("s{} \"q\" \\ , {{}} NULL \u00e9", i);
      if (i % 10 == 1) t.key = "NULL" + std::to_string(i);
      if (i % 10 == 2) t.payload = fmt::format(R"({{"i": {}, "s": "a \"b\" \\ c, {{d}} NULL\n"}})", i);
      batch.push_back(std::move(t));
    }
    return batch;
  };
  auto check = [&](const std::vector<NewTask>& in, const std::vector<eoq::SubmitResult>& r, std::size_t from) {
    REQUIRE(r.size() == in.size());
    int same = 0;
    for (std::size_t i = from; i < in.size(); ++i) {
      auto got = store.get(r[i].task.id);
      REQUIRE(got);
      const auto& t = in[i];
      same += !r[i].duplicate && got->queue == t.queue && got->type == t.type && got->tenant == t.tenant &&
              got->key == t.key && got->payload == t.payload && got->priority == t.priority &&
              got->run_at == t.run_at.value_or(got->created_at) && got->deadline == t.deadline &&
              got->retry == t.retry && r[i].task.run_at == got->run_at;
    }
    CHECK(same == static_cast<int>(in.size() - from));
  };
  auto first = make(shared, 0, 1200);
  check(first, store.submit_batch(first), 0);

  SECTION("with taken keys among them") {
    auto second = make(shared, 600, 1200);  // s600..s1198 are taken
    auto r = store.submit_batch(second);
    int dup = 0;
    for (std::size_t i = 0; i < 600; ++i) dup += second[i].key ? r[i].duplicate : !r[i].duplicate;
    CHECK(dup == 600);
    check(second, r, 600);
  }
  SECTION("one task differing in one field") {
    auto second = make(shared, 5000, 1200);
    second.back().priority = 3;
    check(second, store.submit_batch(second), 0);
  }
  SECTION("NULLs shared") {
    auto second = make(task("plain"), 7000, 1200);
    check(second, store.submit_batch(second), 0);
  }
}

STORE_CASE("a large batch repeating taken keys returns their tasks, and racing large batches create each key once",
           "[submit][batch][key]") {
  // Postgres COPYs a large batch's keys straight into its keys table and falls
  // back to its stage and ON CONFLICT when one is taken: both ways must answer
  // alike.
  std::vector<NewTask> first, second;
  for (int i = 0; i < 2000; ++i) (i < 1500 ? first : second).push_back(keyed(fmt::format("r{}", i)));
  auto a = store.submit_batch(first);
  second.insert(second.begin(), first.begin(), first.end());  // taken keys first, then 500 new ones
  auto b = store.submit_batch(second);
  REQUIRE(b.size() == 2000);
  int same = 0, fresh = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    if (i < 1500) same += b[i].duplicate && b[i].task.id == a[i].task.id;
    else fresh += !b[i].duplicate && b[i].task.key == second[i].key;
  }
  CHECK(same == 1500);
  CHECK(fresh == 500);

  // Four submitters, one batch of the same 1,200 new keys each, at once: every
  // key is created by exactly one of them and all four agree on its task.
  std::vector<NewTask> race;
  for (int i = 0; i < 1200; ++i) race.push_back(keyed(fmt::format("race{}", i)));
  std::vector<std::vector<eoq::SubmitResult>> got(4);
  std::latch go(4);
  {
    std::vector<std::jthread> threads;
    for (std::size_t t = 0; t < 4; ++t)
      threads.emplace_back([&, t] {
        go.arrive_and_wait();
        got[t] = store.submit_batch(race);
      });
  }
  int created = 0, agree = 0;
  for (std::size_t i = 0; i < race.size(); ++i) {
    int made = 0;
    bool one_id = true;
    for (std::size_t t = 0; t < 4; ++t) {
      REQUIRE(got[t].size() == race.size());
      made += !got[t][i].duplicate;
      one_id = one_id && got[t][i].task.id == got[0][i].task.id;
    }
    created += made;
    agree += one_id;
  }
  CHECK(created == 1200);
  CHECK(agree == 1200);
  CHECK(list_all(store).size() == 2000 + 1200);
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

  // Payloads compare as JSON values: equal JSON spelled differently is the same payload.
  auto spaced = store.submit(keyed("k1", "default", R"({ "a": 1 })"));
  CHECK(spaced.duplicate);
  CHECK(spaced.task.id == first.id);

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

STORE_CASE("strict keys compare payloads as JSON values, as jsonb equality does", "[keys]") {
  const std::string stored = R"({"user": {"id": 7, "tags": ["a", "b"]}, "amount": 1.50, "note": "caf\u00e9"})";
  auto first = store.submit(keyed("j", "default", stored)).task;
  CHECK(first.payload == stored);  // kept as submitted

  for (const std::string& same : {
           std::string(R"({"amount":1.5,"note":"café","user":{"tags":["a","b"],"id":7}})"),  // order, escapes
           std::string("{\n  \"note\" : \"caf\\u00e9\",\t\"amount\": 15e-1, \"user\":{\"id\":7.0,\"tags\":[\"a\",\"b\"]}}"),
           std::string(R"({"amount":0.150E1,"user":{"id":70e-1,"tags":["a","b"]},"note":"caf\u00E9"})"),
           // Of a repeated name the last counts, as in jsonb.
           std::string(R"({"amount":99,"amount":1.5,"note":"café","user":{"id":7,"tags":["a","b"]}})"),
       }) {
    INFO(same);
    auto r = store.submit(keyed("j", "default", same));
    CHECK(r.duplicate);
    CHECK(r.task.id == first.id);
    CHECK(r.task.payload == stored);
  }

  std::string other;
  for (const std::string& differs : {
           std::string(R"({"amount":1.5,"note":"café","user":{"id":7,"tags":["b","a"]}})"),  // array order counts
           std::string(R"({"amount":"1.5","note":"café","user":{"id":7,"tags":["a","b"]}})"),  // a string is no number
           std::string(R"({"amount":1.5,"note":"cafe","user":{"id":7,"tags":["a","b"]}})"),
           std::string(R"({"amount":1.5,"note":"café","user":{"id":7,"tags":["a","b"]},"x":null})"),
           std::string(R"({"amount":1.51,"note":"café","user":{"id":7,"tags":["a","b"]}})"),
           std::string(R"({"amount":-1.5,"note":"café","user":{"id":7,"tags":["a","b"]}})"),
           std::string(R"({"amount":1.5,"note":"café","user":{"id":70,"tags":["a","b"]}})"),
       }) {
    INFO(differs);
    auto e = conflict_of([&] { store.submit(keyed("j", "default", differs)); }, other);
    INFO(other);
    REQUIRE(e);
    CHECK(e->differs() == "payload");
  }
  CHECK(list_all(store).size() == 1);

  // Scalars and zeros: -0 is 0 (numeric has no negative zero), 1E2 is 100.
  store.submit(keyed("zero", "default", "-0.0"));
  CHECK(store.submit(keyed("zero", "default", "0")).duplicate);
  store.submit(keyed("hundred", "default", "1E2"));
  CHECK(store.submit(keyed("hundred", "default", "100.00")).duplicate);
  CHECK(conflict_of([&] { store.submit(keyed("hundred", "default", "1000")); }, other).has_value());

  // Within one batch the same rule: the spelled-differently repeat is a duplicate.
  std::vector<NewTask> batch{keyed("b1", "default", R"({"x": [1, 2]})"), keyed("b1", "default", R"({"x":[1.0,2]})"),
                             keyed("j", "default", R"({"user":{"tags":["a","b"],"id":7},"note":"café","amount":1.5})")};
  auto r = store.submit_batch(batch);
  REQUIRE(r.size() == 3);
  CHECK(r[1].duplicate);
  CHECK(r[1].task.id == r[0].task.id);
  CHECK(r[2].duplicate);
  CHECK(r[2].task.id == first.id);
  std::vector<NewTask> bad{keyed("b2", "default", R"({"x":1})"), keyed("b2", "default", R"({"x":[1]})")};
  auto e = conflict_of([&] { store.submit_batch(bad); }, other);
  REQUIRE(e);
  CHECK(e->field() == "tasks[1].key");
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

  // Long keys that share their first bytes, in other queues and tenants: only
  // the same (queue, tenant, key) repeats.
  const std::string k = "order-2026-11-30-000001";
  NewTask tenant_k = keyed(k, "default", R"({"v":1})");
  tenant_k.tenant = "acme";
  std::vector<NewTask> alike{keyed(k, "default", R"({"v":1})"), keyed(k + "0", "default", R"({"v":1})"),
                             keyed(k, "other", R"({"v":1})"), tenant_k, keyed(k, "default", R"({"v":1})"),
                             keyed(k, "default", R"({"v":2})")};
  auto g = conflict_of([&] { store.submit_batch(alike); }, other);
  REQUIRE(g);
  CHECK(g->field() == "tasks[5].key");
  CHECK(std::string(g->what()).find("tasks[0] of this batch") != std::string::npos);
  alike.pop_back();
  auto a = store.submit_batch(alike);
  REQUIRE(a.size() == 5);
  for (int i : {0, 1, 2, 3}) CHECK_FALSE(a[static_cast<std::size_t>(i)].duplicate);
  CHECK(a[4].duplicate);
  CHECK(a[4].task.id == a[0].task.id);
  CHECK(list_all(store).size() == 6);
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
