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
//
//   scheduler.cron("digest", "30 2 * * mon-fri", digest_task, "Europe/Berlin");
//
// Cron registrations work the same way with fire times for buckets: a fire
// time's bucket lasts until the next fire time, its key is
// "cron:<name>:<fire time, epoch seconds>", and the store's clock says which
// fire time is the current one (the latest at or before its now()).
#include <eoq/task_store.hpp>
#include <eoq/worker.hpp>  // PeriodicTask, CronTask, Logger, LogLevel

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
  // stay missed. For cron registrations the buckets are fire times: the
  // previous one is the fire time before the current one.
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

  // Registers a cron submission. Before start()/run() only.
  //
  // The schedule: five fields, minute (0-59) hour (0-23) day-of-month (1-31)
  // month (1-12 or jan-dec) day-of-week (0-7 or sun-sat; 0 and 7 are Sunday),
  // separated by spaces. Each is '*', a value, a range "1-5", a step over '*' or
  // a range ("*/15", "1-30/5"), or a comma-separated list of those; names are
  // case-insensitive. When day-of-month and day-of-week are both restricted
  // (neither begins with '*'), a day matching either one fires (Vixie cron's
  // rule: "0 0 1,15 * mon" is the 1st, the 15th and every Monday); otherwise
  // both must match. Or one of @yearly (= @annually, "0 0 1 1 *"), @monthly
  // ("0 0 1 * *"), @weekly ("0 0 * * 0"), @daily (= @midnight, "0 0 * * *"),
  // @hourly ("0 * * * *"). No seconds or years field, no L, W, # or ?.
  //
  // The fields are read on the wall clock of `time_zone`, an IANA name read
  // from the TZif files in $TZDIR or /usr/share/zoneinfo (Debian's tzdata);
  // "UTC" needs no file. Daylight saving follows cronie:
  // - A fixed-time schedule (neither minute nor hour begins with '*', e.g.
  //   "30 2 * * *") fires once per matching wall time: one that does not exist
  //   (02:30 on the spring-forward day in New York or Berlin) fires at the first
  //   instant after the gap (03:00 local, the transition), one that happens twice
  //   (01:30 on the fall-back day in New York) fires at its first occurrence.
  // - Any other schedule ("*/15 * * * *", "30 * * * *", @hourly) fires at every
  //   instant whose wall time matches: not in the missing hour, in both copies of
  //   the repeated one (they are distinct instants), so "every 15 minutes" is
  //   never doubled or skipped.
  // A scheduler that was not running at a fire time submits that fire time's
  // task once when it comes back before the next one (the bucket rule above;
  // cronie and Oban's Cron plugin do not run it late). So does a registration's
  // first tick: "0 3 * * *" registered at 15:00 submits today's 03:00 at once,
  // as every() submits the bucket it starts in. With catch_up, the latest fire
  // time missed before the current one is submitted too.
  //
  // Throws InvalidArgument: "schedule" for a malformed expression (the rule
  // names the field: "minute field '61' is out of range 0-59") or one that
  // never fires ("0 0 30 2 *"); "time_zone" for an unknown zone, a name with
  // ".." or a leading '/'; and for the task, as every() does. Names share one
  // namespace with every().
  Scheduler& cron(CronTask cron);
  Scheduler& cron(std::string name, std::string schedule, NewTask task, std::string time_zone = "UTC");
  bool empty() const noexcept;  // nothing registered

  // One round on the calling thread, no thread needed: submits, for every
  // registration, the bucket that holds the store's now() unless this scheduler
  // already has (and, with catch_up, the latest missed bucket the first time).
  // Returns how long until the next bucket begins (or fire time comes), by the
  // store's clock. A
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
