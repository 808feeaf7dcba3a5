// A worker as a long-running service: handlers with SQL effects, progress and
// checkpoints, a periodic task, a logger, and graceful shutdown on SIGTERM or
// SIGINT (what systemd, Kubernetes and Ctrl-C send).
//
// Signals are taken with sigwait on the main thread, not in a signal handler:
// Worker::stop() locks mutexes and joins threads, which a signal handler must
// not do. The mask is set before the worker starts, so its threads inherit it
// and the signal can only be delivered to sigwait.
//
//   worker_service            runs until SIGTERM / SIGINT
//   worker_service --demo     sends itself SIGTERM after a few seconds, then checks
//                             what the store and the greetings table hold
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops itself.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include "example_support.hpp"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <iostream>
#include <mutex>
#include <thread>

int main(int argc, char** argv) try {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  const std::string url = eoq::testing::database_url_or_temp("EOQ_DATABASE_URL");
  eoq::PostgresStore store(url);
  store.migrate();

  eoq::WorkerOptions options;
  options.queues = {"default"};
  options.concurrency = 4;
  options.shutdown_timeout = std::chrono::seconds(20);  // below the orchestrator's kill timer
  options.logger = [](eoq::LogLevel level, std::string_view message) {
    // Hook your own logging here; calls arrive one at a time.
    std::clog << "[" << eoq::to_string(level) << "] " << message << "\n";
  };
  eoq::Worker worker(store, options);

  // Writes through ctx.exec commit in the same transaction as the completion.
  // The table name is the host's own; created here to keep the example whole.
  {
    eoq::NewTask setup;
    setup.type = "setup";
    setup.key = "setup:greetings-table";
    setup.priority = -100;  // claimed before the greetings
    store.submit(setup);
  }
  worker.on("setup", [](eoq::TaskContext& ctx) {
    ctx.exec("CREATE TABLE IF NOT EXISTS public.eoq_example_greetings"
             " (task_id bigint PRIMARY KEY, name text NOT NULL)");
  });
  worker.on("greet", [](eoq::TaskContext& ctx) {
    ctx.progress(10, "greeting");
    ctx.exec("INSERT INTO public.eoq_example_greetings (task_id, name)"
             " VALUES ($1, $2::jsonb->>'name') ON CONFLICT DO NOTHING",
             {std::to_string(ctx.id()), ctx.payload()});
    ctx.set_result(R"({"greeted":true})");
  });
  // Two stages: a retry after a failure in stage two does not redo stage one.
  worker.on("report", [](eoq::TaskContext& ctx) {
    if (!ctx.checkpoint_stage()) {
      ctx.progress(50, "collect");
      ctx.checkpoint("collected", R"({"rows":3})");
    }
    if (!ctx.sleep_for(std::chrono::milliseconds(200))) throw std::runtime_error("interrupted; will resume");
    ctx.progress(100, "publish");
  });
  // Every 10 seconds, one "report" task across all processes running this code.
  eoq::NewTask report;
  report.type = "report";
  worker.every("report", std::chrono::seconds(10), report);

  for (const char* name : {"ada", "grace", "edsger"}) {
    eoq::NewTask t;
    t.type = "greet";
    t.payload = std::string(R"({"name":")") + name + R"("})";
    t.key = std::string("greet:") + name;
    t.run_at = std::chrono::time_point_cast<std::chrono::microseconds>(eoq::Clock::now() +
                                                                        std::chrono::milliseconds(500));
    store.submit(t);
  }

  worker.start();
  std::cout << "worker " << worker.id() << " running; send SIGTERM or press Ctrl-C to stop" << std::endl;

  const bool demo_mode = argc > 1 && std::strcmp(argv[1], "--demo") == 0;
  std::jthread demo;
  if (demo_mode)
    demo = std::jthread([] {
      std::this_thread::sleep_for(std::chrono::seconds(3));
      kill(getpid(), SIGTERM);
    });

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::cout << "got " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ", stopping" << std::endl;
  worker.stop();  // stops claiming, lets handlers finish, gives unfinished leases back

  auto c = worker.counters();
  std::cout << "claimed " << c.claimed << ", succeeded " << c.succeeded << ", failed " << c.failed << ", retried "
            << c.retried << ", released " << c.released << "\n";
  if (!demo_mode) return 0;

  // The demo's verdict, from the store and the table, not from what we meant to do:
  // each greeting one task (its key, once), succeeded, with one row naming that task.
  example::Checks check;
  example::Db db(url);
  auto greets = example::tasks_of(store, "default", "greet");
  bool greeted = greets.size() == 3;
  for (const auto& [key, n] : example::tasks_per_key(greets)) greeted = greeted && n == 1;
  for (const auto& t : greets)
    greeted = greeted && t.status == eoq::TaskStatus::succeeded &&
              db.one("SELECT count(*) FROM public.eoq_example_greetings WHERE task_id = $1 AND name = $2",
                     {std::to_string(t.id), t.key->substr(t.key->find(':') + 1)}) == "1";
  check(greeted && db.one("SELECT count(*) FROM public.eoq_example_greetings") == "3",
        "3 greet tasks in the store, one per key, each succeeded with exactly one greeting row");
  auto reports = example::tasks_of(store, "default", "report");
  bool one_per_period = !reports.empty();
  for (const auto& [key, n] : example::tasks_per_key(reports)) one_per_period = one_per_period && n == 1;
  check(one_per_period, std::to_string(reports.size()) + " periodic report task(s), one per 10 s period");
  auto setup_task = store.find("default", "setup:greetings-table");
  check(setup_task && setup_task->status == eoq::TaskStatus::succeeded && c.failed == 0,
        "the setup task succeeded, and nothing this worker ran failed");
  return check.exit_code();
} catch (const std::exception& e) {
  std::cerr << "worker_service: " << e.what() << "\n";
  return 1;
}
