#pragma once
// The Scheduler submits periodic tasks and does nothing else: no claiming, no
// handlers, no queue of its own. A scheduler-only process runs one; a Worker's
// every() runs one inside the worker.
//
//   eoq::Scheduler scheduler(store);
//   scheduler.every("nightly-report", std::chrono::hours(24), report_task);
//   scheduler.run();  // until another thread calls request_stop() or stop()
//
// Period buckets come from the store's clock (TaskStore::now: the database's
// now() on Postgres), never from this machine's: schedulers on machines whose
// clocks disagree still submit each bucket's task only once that bucket has
// begun by the database's clock, and all agree on which bucket that is. Each
// submission's key is "periodic:<name>:<bucket start, epoch seconds>", so any
// number of schedulers with the same registration, restarted any number of
// times, create one task per bucket (duplicates are normal and quiet).
#include <eoq/task_store.hpp>
#include <eoq/worker.hpp>  // PeriodicTask, Logger, LogLevel

#include <chrono>
#include <memory>
#include <string>

namespace eoq {

struct SchedulerOptions {
  // After a time with no scheduler running, submit one task for the latest
  // bucket that was missed (with that bucket's key), before the current one.
  // "Missed" is read from the store: the newest earlier bucket that has a task
  // (looked up among the newest tasks of the periodic task's queue and type) is
  // older than the previous bucket. A registration with no earlier task (new,
  // or its tasks pruned by retention) catches nothing up. Off: missed buckets
  // stay missed.
  bool catch_up = false;
  // Waits after a failed store call: doubling from the first to the cap.
  Millis error_backoff_initial{100};
  Millis error_backoff_max{10000};
  // Empty: warnings and errors go to stderr. Calls are serialised.
  Logger logger;
  LogLevel log_level = LogLevel::info;
};

class Scheduler {
 public:
  // The store must outlive the scheduler.
  explicit Scheduler(TaskStore& store, SchedulerOptions options = {});
  ~Scheduler();  // stop()
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Registers a periodic submission. Before start()/run() only. Throws
  // InvalidArgument for a bad name ([A-Za-z0-9_.-], 1..128), a period under one
  // second, a key or a fixed deadline on the task, a name registered twice, or
  // a task the stores would refuse.
  Scheduler& every(PeriodicTask periodic);
  Scheduler& every(std::string name, std::chrono::seconds period, NewTask task);
  bool empty() const noexcept;  // nothing registered

  // One round on the calling thread, no thread needed: submits, for every
  // registration, the bucket that holds the store's now() unless this scheduler
  // already has (and, with catch_up, the latest missed bucket the first time).
  // Returns how long until the next bucket begins, by the store's clock. A
  // failed submission is retried by the next round; the first error is rethrown
  // after the other registrations had their turn.
  Millis tick();

  // Starts the scheduling thread and returns. Runs once: start after stop throws UsageError.
  void start();
  // start(), then blocks until request_stop() or stop(), and stops.
  void run();
  void request_stop() noexcept;  // returns at once; safe from any thread
  void stop();                   // stops and joins the thread; idempotent
  bool running() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace eoq
