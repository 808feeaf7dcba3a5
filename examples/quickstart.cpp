// The shortest tour of eoq: submit tasks (one of them twice), run a worker
// whose handler fails once and is retried, and print what happened.
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops itself.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include <chrono>
#include <iostream>
#include <thread>

int main() try {
  eoq::PostgresStore store(eoq::testing::database_url_or_temp("EOQ_DATABASE_URL"));
  store.migrate();

  // Three submits; the third repeats the first one's key, so it creates nothing.
  std::vector<eoq::TaskId> ids;
  for (auto [who, key] : {std::pair{"ada", "greet:ada"}, {"grace", "greet:grace"}, {"ada", "greet:ada"}}) {
    eoq::NewTask t;
    t.type = "greet";
    t.payload = std::string(R"({"name":")") + who + R"("})";
    t.key = key;
    t.retry = {.max_attempts = 3, .backoff = eoq::Backoff::fixed, .initial_delay = eoq::Millis(100)};
    auto r = store.submit(t);
    std::cout << "submit " << key << " -> task " << r.task.id << (r.duplicate ? " (duplicate: already exists)" : "")
              << "\n";
    if (!r.duplicate) ids.push_back(r.task.id);
  }

  eoq::WorkerOptions options;
  options.concurrency = 2;
  eoq::Worker worker(store, options);
  worker.on("greet", [](eoq::TaskContext& ctx) {
    // The first attempt for grace fails: the task is retried after 100 ms.
    if (ctx.payload().find("grace") != std::string::npos && ctx.attempt() == 1)
      throw std::runtime_error("transient trouble, try again");
    ctx.set_result(R"({"greeted":true})");
  });
  worker.start();
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (worker.counters().succeeded < ids.size() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  worker.stop();

  bool ok = true;
  for (auto id : ids) {
    auto t = store.get(id);
    std::cout << "task " << id << " " << *t->key << ": " << eoq::to_string(t->status) << " after " << t->attempts
              << " attempt(s), result " << t->result.value_or("none") << "\n";
    for (const auto& a : store.history(id))
      std::cout << "  attempt " << a.number << " by " << a.owner << ": " << a.outcome
                << (a.error ? " (" + *a.error + ")" : "") << "\n";
    ok = ok && t->status == eoq::TaskStatus::succeeded;
  }
  auto c = worker.counters();
  std::cout << "worker " << worker.id() << ": claimed " << c.claimed << ", succeeded " << c.succeeded
            << ", retried " << c.retried << "\n";
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "quickstart: " << e.what() << "\n";
  return 1;
}
