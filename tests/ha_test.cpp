// High availability under a real manager: eoq against a Patroni cluster
// (tests/patroni_cluster.hpp: one etcd, PostgreSQL nodes under Patroni with
// synchronous_mode), connected the way the README tells users to: one
// multi-host connection string with target_session_attrs=read-write.
//
// Each case runs a load of separate processes (tests/ha_child.cpp): worker
// processes that drain, submitters that submit with keys, and a feeder thread
// here that keeps a backlog, all through the multi-host string; then hits the
// primary while they run, and lets them carry on by themselves. Afterwards the
// history checker reads the whole run (the children's own records and what the
// database kept) and the counts are checked with SQL: nothing lost, nothing run
// twice, no key made twice, no effect without its completion.
//
// Each fault is measured from the database's completion times: the longest
// time without a completion around it, and the drain rate in the 5 s before it
// and in the 5 s after completions resumed. They are printed as "figures: ..."
// lines (docs/scaling.md quotes them).
#include "history.hpp"
#include "patroni_cluster.hpp"
#include "support.hpp"

#include <eoq/eoq.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#ifndef EOQ_HA_CHILD
#error "EOQ_HA_CHILD (the path of eoq_ha_child) must be defined by the build"
#endif

using namespace std::chrono_literals;
namespace h = eoq::test::history;
using eoq::test::PatroniCluster;

namespace {

std::int64_t wall_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Seconds of steady load before, between and after the faults.
std::chrono::seconds settle() {
  const char* s = std::getenv("EOQ_HA_SETTLE_S");
  return std::chrono::seconds(s && *s ? std::atoi(s) : 8);
}

// PostgresOptions::transient_retries of the children that follow the README's
// advice for a Patroni cluster (name 1 and up); name 0 keeps the default.
constexpr int kTunedRetries = 10;

// A child's name (w0, s1, ...) says whether it keeps the defaults.
bool tuned(const std::string& name) { return name.size() > 1 && name[1] != '0'; }

struct Proc {
  eoq::test::Child child;
  std::string name;
};

// "result a=1 b=2" from a child's log -> {a: 1, b: 2}
std::map<std::string, long long> result_of(const std::string& log) {
  std::map<std::string, long long> out;
  auto at = log.rfind("result ");
  if (at == std::string::npos) return out;
  auto end = log.find('\n', at);
  std::string line = log.substr(at + 7, end == std::string::npos ? std::string::npos : end - at - 7);
  std::size_t i = 0;
  while (i < line.size()) {
    auto eq = line.find('=', i);
    auto sp = line.find(' ', i);
    if (eq == std::string::npos) break;
    if (sp == std::string::npos) sp = line.size();
    out[line.substr(i, eq - i)] = std::stoll(line.substr(eq + 1, sp - eq - 1));
    i = sp + 1;
  }
  return out;
}

// One fault: what was done, when (the wall clock, the same as the database's
// on this one host), and when a new leader took writes.
struct Fault {
  std::string what;
  std::int64_t at_us = 0;
  std::int64_t leader_us = 0;   // 0 when not awaited
  std::int64_t healthy_us = 0;  // when a sync standby streamed from the new leader again (0: not awaited)
};

struct Figures {
  double gap_s = 0;         // longest time without a completion around the fault
  double gap_from_s = 0;    // its start and end, relative to the fault
  double gap_to_s = 0;
  double leader_s = 0;      // from the fault until a new leader took writes (as the test saw it)
  double before = 0;        // completions per second, the 5 s before the fault
  double after = 0;         // and the 5 s after completions resumed (+1 s)
  double healthy_s = 0;     // from the fault until a sync standby streamed again
  double after_healthy = 0; // completions per second in the 5 s after that (+1 s)
  double later_gap_s = 0;   // the longest stretch without a completion after the outage (until the next fault)
  double later_at_s = 0;    // where it began
};

// The load: worker processes, keyed submitters, and a feeder keeping a backlog.
class Load {
 public:
  Load(PatroniCluster& cluster, std::string dir, int workers, int submitters)
      : cluster_(cluster), dir_(std::move(dir)), store_(store_options(cluster.conninfo())), client_(store_, parent_) {
    store_.migrate();
    eoq::test::Admin admin(cluster.conninfo());
    admin.exec("CREATE TABLE eoq.effects (task_id bigint NOT NULL, version bigint NOT NULL)");
    // The first worker and the first submitter keep eoq's defaults; the
    // others retry what is safe to retry for about 10 s (transient_retries =
    // 10: 50 ms doubling to 1.6 s), as README "High availability" advises.
    for (int i = 0; i < workers; ++i) {
      auto name = fmt::format("w{}", i);
      std::vector<std::string> args{EOQ_HA_CHILD, "worker", cluster.conninfo(), "eoq", dir_, "id=" + name,
                                    "history=" + dir_ + "/" + name + ".history", "lease_ms=5000", "concurrency=4",
                                    "sleep_ms=2"};
      if (i > 0) args.push_back(fmt::format("transient_retries={}", kTunedRetries));
      workers_.push_back(Proc{eoq::test::spawn_child(args, dir_ + "/" + name + ".log"), name});
    }
    for (int i = 0; i < submitters; ++i) {
      auto name = fmt::format("s{}", i);
      std::vector<std::string> args{EOQ_HA_CHILD, "submit", cluster.conninfo(), "eoq", dir_, "id=" + name,
                                    "history=" + dir_ + "/" + name + ".history", "interval_ms=10"};
      if (i > 0) args.push_back(fmt::format("transient_retries={}", kTunedRetries));
      submitters_.push_back(Proc{eoq::test::spawn_child(args, dir_ + "/" + name + ".log"), name});
    }
    feeder_ = std::thread([this] { feed(); });
  }
  ~Load() {
    stop_feeding_ = true;
    if (feeder_.joinable()) feeder_.join();
    for (auto* group : {&submitters_, &workers_})
      for (auto& p : *group)
        if (p.child.pid > 0) {
          ::kill(p.child.pid, SIGKILL);
          eoq::test::wait_child(p.child, 10s);
        }
  }
  Load(const Load&) = delete;
  Load& operator=(const Load&) = delete;

  // Stops submitting, lets the workers finish every task, stops them; returns
  // the children's results by name.
  std::map<std::string, std::map<std::string, long long>> finish() {
    std::map<std::string, std::map<std::string, long long>> results;
    for (auto& p : submitters_) ::kill(p.child.pid, SIGTERM);
    for (auto& p : submitters_) {
      INFO(p.name << " log:\n" << eoq::test::read_file(p.child.log));
      CHECK(eoq::test::wait_child(p.child, 60s) == 0);
      results[p.name] = result_of(eoq::test::read_file(p.child.log));
    }
    stop_feeding_ = true;
    feeder_.join();
    const bool drained = eoq::test::eventually(
        [&] {
          try {
            auto s = store_.stats();
            return !s.empty() && s[0].pending == 0 && s[0].running == 0;
          } catch (const eoq::Error&) {
            return false;
          }
        },
        120s);
    if (!drained) dump_stacks();
    CHECK(drained);
    for (auto& p : workers_) ::kill(p.child.pid, SIGTERM);
    for (auto& p : workers_) {
      INFO(p.name << " log:\n" << eoq::test::read_file(p.child.log));
      CHECK(eoq::test::wait_child(p.child, 60s) == 0);
      results[p.name] = result_of(eoq::test::read_file(p.child.log));
    }
    results["feeder"] = {{"submitted", fed_.load()}, {"errors", feeder_errors_.load()}};
    return results;
  }

  // Every worker's threads' stacks into <dir>/<name>.stacks (when gdb is there), for a stall.
  void dump_stacks() {
    if (::access("/usr/bin/gdb", X_OK) != 0) return;
    for (auto& p : workers_) {
      if (p.child.pid <= 0) continue;
      auto out = dir_ + "/" + p.name + ".stacks";
      eoq::test::Child gdb = eoq::test::spawn_child(
          {"/usr/bin/gdb", "-p", std::to_string(p.child.pid), "-batch", "-ex", "thread apply all bt"}, out);
      eoq::test::wait_child(gdb, 120s);
      fmt::print("{}'s stacks: {}\n", p.name, out);
    }
  }

  std::vector<h::Event> client_events() const { return parent_.events(); }
  eoq::PostgresStore& store() { return store_; }

 private:
  static eoq::PostgresOptions store_options(const std::string& conninfo) {
    eoq::PostgresOptions o;
    o.conninfo = conninfo;
    o.schema = "eoq";
    o.pool_size = 2;
    return o;
  }
  // Keeps 8,000 to 12,000 tasks pending (keyed, so that a batch cut by a fault
  // is simply submitted again), so that the workers always have a backlog: a
  // few seconds of work, so that a slow batch never leaves them idle.
  void feed() {
    long long next = 0;
    while (!stop_feeding_) {
      std::int64_t pending = 0;
      try {
        auto s = store_.stats();
        pending = s.empty() ? 0 : s[0].pending;
      } catch (const eoq::Error&) {
        std::this_thread::sleep_for(100ms);
        continue;
      }
      if (pending < 8000) {
        std::vector<eoq::NewTask> batch;
        for (int i = 0; i < 4000; ++i) {
          eoq::NewTask t;
          t.type = "effect";
          t.key = fmt::format("f-{}", next + i);
          t.retry.max_attempts = 1000;
          t.retry.initial_delay = 10ms;
          t.retry.max_delay = 100ms;
          batch.push_back(std::move(t));
        }
        for (;;) {
          try {
            client_.submit_batch(batch);
            break;
          } catch (const eoq::Error&) {
            ++feeder_errors_;
            if (stop_feeding_) return;
            std::this_thread::sleep_for(50ms);
          }
        }
        next += 4000;
        fed_ = next;
      }
      std::this_thread::sleep_for(100ms);
    }
  }

  PatroniCluster& cluster_;
  std::string dir_;
  eoq::PostgresStore store_;
  h::Recorder parent_;
  h::RecordingStore client_;
  std::vector<Proc> workers_, submitters_;
  std::thread feeder_;
  std::atomic<bool> stop_feeding_{false};
  std::atomic<long long> fed_{0}, feeder_errors_{0};
};

// The completion times (finished_at of succeeded tasks, microseconds) in [from, to).
std::vector<std::int64_t> completions(eoq::test::Admin& admin, std::int64_t from, std::int64_t to) {
  auto rows = admin.exec("SELECT (extract(epoch FROM finished_at) * 1000000)::bigint FROM eoq.finished "
                         "WHERE status = 'succeeded' AND finished_at >= to_timestamp($1::double precision / 1e6) "
                         "AND finished_at < to_timestamp($2::double precision / 1e6) ORDER BY 1",
                         {std::to_string(from), std::to_string(to)})
                  .rows;
  std::vector<std::int64_t> out;
  out.reserve(rows.size());
  for (auto& r : rows) out.push_back(std::stoll(*r[0]));
  return out;
}

Figures measure(eoq::test::Admin& admin, const Fault& f, std::int64_t until_us) {
  Figures out;
  const std::int64_t s = 1000000;
  auto t = completions(admin, f.at_us - 6 * s, until_us);
  // The outage: the longest stretch without a completion from 1 s before the
  // fault until 5 s after a new leader took writes. Then the longest one after
  // it (a rejoining standby that becomes synchronous makes commits wait while
  // it catches up).
  const std::int64_t horizon = (f.leader_us ? f.leader_us : f.at_us) + 5 * s;
  std::int64_t best = 0, from = 0, to = 0;
  for (std::size_t i = 1; i < t.size(); ++i) {
    if (t[i] < f.at_us - s || t[i - 1] > horizon) continue;
    if (t[i] - t[i - 1] > best) {
      best = t[i] - t[i - 1];
      from = t[i - 1];
      to = t[i];
    }
  }
  for (std::size_t i = 1; i < t.size(); ++i) {
    if (t[i - 1] < to + s) continue;
    if (t[i] - t[i - 1] > out.later_gap_s * s) {
      out.later_gap_s = static_cast<double>(t[i] - t[i - 1]) / s;
      out.later_at_s = static_cast<double>(t[i - 1] - f.at_us) / s;
    }
  }
  auto count = [&](std::int64_t a, std::int64_t b) {
    return std::count_if(t.begin(), t.end(), [&](std::int64_t x) { return x >= a && x < b; });
  };
  out.gap_s = static_cast<double>(best) / s;
  out.gap_from_s = static_cast<double>(from - f.at_us) / s;
  out.gap_to_s = static_cast<double>(to - f.at_us) / s;
  out.leader_s = f.leader_us ? static_cast<double>(f.leader_us - f.at_us) / s : 0;
  out.before = static_cast<double>(count(f.at_us - 6 * s, f.at_us - s)) / 5;
  out.after = static_cast<double>(count(to + s, to + 6 * s)) / 5;
  if (f.healthy_us) {
    out.healthy_s = static_cast<double>(f.healthy_us - f.at_us) / s;
    out.after_healthy = static_cast<double>(count(f.healthy_us + s, f.healthy_us + 6 * s)) / 5;
  }
  return out;
}

std::string describe(const Fault& f, const Figures& g) {
  return fmt::format("{}: no completion for {:.2f} s (from {:+.2f} s to {:+.2f} s of the fault; a new leader took writes "
                     "at {:+.2f} s); drain {:.0f}/s in the 5 s before, {:.0f}/s in the 5 s after +1 s (ratio {:.2f}), "
                     "{:.0f}/s once a sync standby streamed again at {:+.1f} s (ratio {:.2f}); the longest pause "
                     "after the outage {:.2f} s at {:+.1f} s",
                     f.what, g.gap_s, g.gap_from_s, g.gap_to_s, g.leader_s, g.before, g.after,
                     g.before > 0 ? g.after / g.before : 0.0, g.after_healthy, g.healthy_s,
                     g.before > 0 ? g.after_healthy / g.before : 0.0, g.later_gap_s, g.later_at_s);
}

// The whole run through the history checker and SQL counts. Returns the verdict.
h::Verdict check_run(Load& load, eoq::test::Admin& admin, const std::string& dir,
                     const std::map<std::string, std::map<std::string, long long>>& results, const std::string& label) {
  auto events = load.client_events();
  h::append(events, h::load_logs(dir));
  h::append(events, h::load_postgres(admin.get(), "eoq", "effects"));
  auto v = h::verify_and_print(label, events);
  INFO(v.format());
  CHECK(v.ok());
  const auto tasks = admin.count("SELECT (SELECT count(*) FROM eoq.tasks) + (SELECT count(*) FROM eoq.finished)");
  const auto succeeded = admin.count("SELECT count(*) FROM eoq.finished WHERE status = 'succeeded'");
  CHECK(succeeded == tasks);  // every task ran and succeeded: none lost, none failed for good
  CHECK(v.succeeded == succeeded);
  // One effect row per succeeded task, none of another: an effect committed
  // with its completion, or not at all.
  CHECK(admin.count("SELECT count(*) FROM eoq.effects") == succeeded);
  CHECK(admin.count("SELECT count(DISTINCT task_id) FROM eoq.effects") == succeeded);
  CHECK(admin.count("SELECT count(*) FROM eoq.effects e WHERE NOT EXISTS "
                    "(SELECT 1 FROM eoq.finished f WHERE f.id = e.task_id AND f.status = 'succeeded')") == 0);
  // One task per key, and every key a submitter was told about is there.
  CHECK(admin.count("SELECT count(*) FROM eoq.keys") == tasks);
  for (const auto& [name, r] : results) {
    if (name[0] != 's') continue;
    INFO(name);
    CHECK(r.at("submitted") > 0);
    CHECK(admin.count("SELECT count(*) FROM eoq.keys WHERE key LIKE $1", {name + "-%"}) == r.at("submitted"));
  }
  CHECK(admin.count("SELECT count(*) FROM eoq.keys WHERE key LIKE 'f-%'") == results.at("feeder").at("submitted"));
  return v;
}

// What the host saw, summed over the children of one kind ('s' or 'w') and
// setting (tuned or defaults).
std::map<std::string, long long> seen(const std::map<std::string, std::map<std::string, long long>>& results, char kind,
                                      bool tuned_ones) {
  std::map<std::string, long long> sum;
  for (const auto& [name, r] : results) {
    if (name[0] != kind || tuned(name) != tuned_ones) continue;
    for (const auto& [k, v] : r) {
      if (k.find("longest") != std::string::npos) sum[k] = std::max(sum[k], v);
      else sum[k] += v;
    }
  }
  return sum;
}

std::string summary(const std::map<std::string, std::map<std::string, long long>>& results) {
  std::string out;
  for (bool t : {false, true}) {
    auto s = seen(results, 's', t), w = seen(results, 'w', t);
    out += fmt::format("\n  {}: submit calls that threw {} (the longest a key took from its first try to its success "
                       "{} ms; the longest call {} ms; duplicates answered {}); workers: handler exceptions {}, "
                       "warnings {}, errors {}, store errors {}, given back {}, abandoned to expire {}, lease lost {}",
                       t ? fmt::format("transient_retries={}", kTunedRetries) : std::string("eoq's defaults"),
                       s["errors"], s["longest_key_ms"], s["longest_call_ms"], s["duplicates"],
                       w["handler_exceptions"], w["warnings"], w["errors"], w["store_errors"], w["released"],
                       w["abandoned"], w["lease_lost"]);
  }
  return fmt::format("what the host saw:{}\n  feeder (submit_batch, retried by the test): batches retried {}", out,
                     results.at("feeder").at("errors"));
}

// Patroni ran pg_rewind on the node (and, since the node came back, it worked).
bool rewound(const std::string& log) { return log.find("running pg_rewind from") != std::string::npos; }

}  // namespace

TEST_CASE("Patroni: a primary's postmaster SIGKILLed, then its successor's Patroni stopped, under load: "
          "the old primaries rejoin and nothing is lost, run twice or keyed twice",
          "[patroni][ha][failover]") {
  auto dir = eoq::test::scratch_dir("ha-failover");
  eoq::test::PatroniOptions po;
  po.nodes = 2;
  po.log_dir = dir;
  PatroniCluster cluster(po);
  INFO(cluster.list());
  fmt::print("cluster: {}\n", cluster.conninfo());
  Load load(cluster, dir, 3, 2);
  std::vector<Fault> faults;

  std::this_thread::sleep_for(settle());
  // 1. SIGKILL to the primary's postmaster. Patroni (primary_start_timeout 0)
  // demotes the node instead of restarting it, and the sync standby takes over.
  // For 300 ms before the kill the primary's WAL senders are frozen: the
  // primary goes on writing commits (submits, claims, completions with their
  // effects) to its own WAL that no client is told about, since each waits for
  // the standby. The senders die frozen with it, so that WAL never leaves:
  // those commits die with the primary, and its WAL goes past the new
  // primary's, so it can only rejoin through pg_rewind.
  const int a = cluster.leader();
  REQUIRE(a >= 0);
  const int b = cluster.sync_standby();
  REQUIRE(b >= 0);
  const auto senders = cluster.walsender_pids(a);
  REQUIRE(!senders.empty());
  for (int pid : senders) ::kill(pid, SIGSTOP);
  std::this_thread::sleep_for(300ms);
  Fault f1{fmt::format("SIGKILL to {}'s postmaster, {} promoted", cluster.name(a), cluster.name(b)), wall_us()};
  cluster.kill_postmaster(a);
  for (int pid : senders) ::kill(pid, SIGKILL);
  REQUIRE(cluster.wait_new_leader(a) == b);
  f1.leader_us = wall_us();
  // The old primary rejoins as a replica by itself, through pg_rewind, and
  // becomes the sync standby again.
  REQUIRE(cluster.wait_healthy(120s) == b);
  f1.healthy_us = wall_us();
  faults.push_back(f1);
  CHECK(cluster.sync_standby() == a);
  CHECK(rewound(cluster.log(a)));
  fmt::print("figures: {} rejoined as the sync standby{} {:.1f} s after the fault\n", cluster.name(a),
             rewound(cluster.log(a)) ? " through pg_rewind" : "", static_cast<double>(wall_us() - f1.at_us) / 1e6);
  std::this_thread::sleep_for(settle());

  // 2. Stop the new primary's Patroni (SIGTERM: it stops its PostgreSQL and
  // lets go of the leader key): the failover back to the first node.
  Fault f2{fmt::format("{}'s Patroni stopped, {} promoted", cluster.name(b), cluster.name(a)), wall_us()};
  cluster.signal_patroni(b, SIGTERM);
  REQUIRE(cluster.wait_new_leader(b) == a);
  f2.leader_us = wall_us();
  cluster.wait_patroni_exit(b);
  std::this_thread::sleep_for(2s);
  cluster.start_patroni(b);
  REQUIRE(cluster.wait_healthy(120s) == a);
  f2.healthy_us = wall_us();
  faults.push_back(f2);
  CHECK(cluster.sync_standby() == b);
  fmt::print("figures: {} rejoined as the sync standby {:.1f} s after the fault (its Patroni started again after 2 s)\n",
             cluster.name(b), static_cast<double>(wall_us() - f2.at_us) / 1e6);
  std::this_thread::sleep_for(settle());

  auto results = load.finish();
  const int l = cluster.leader();
  REQUIRE(l >= 0);
  eoq::test::Admin admin(cluster.node_conninfo(l));
  auto v = check_run(load, admin, dir, results, "Patroni failover under load");
  CHECK(v.claims > v.succeeded);  // some attempts died with the primaries
  for (std::size_t i = 0; i < faults.size(); ++i) {
    auto g = measure(admin, faults[i], i + 1 < faults.size() ? faults[i + 1].at_us : wall_us());
    fmt::print("figures: {}\n", describe(faults[i], g));
    CHECK(g.before > 0);
    CHECK(g.after > 0);
  }
  fmt::print("figures: {}\n", summary(results));
  // Retrying as the README advises rides through both failovers.
  auto s = seen(results, 's', true), w = seen(results, 'w', true);
  CHECK(s["errors"] == 0);
  CHECK(w["handler_exceptions"] == 0);
}

TEST_CASE("Patroni: two planned switchovers under load lose nothing, run nothing twice, and a host that retries "
          "as advised sees no error",
          "[patroni][ha][switchover]") {
  auto dir = eoq::test::scratch_dir("ha-switchover");
  eoq::test::PatroniOptions po;
  po.nodes = 3;  // a replica that is not the sync standby, too: it follows each new leader
  po.log_dir = dir;
  PatroniCluster cluster(po);
  INFO(cluster.list());
  fmt::print("cluster: {}\n", cluster.conninfo());
  Load load(cluster, dir, 3, 2);
  std::vector<Fault> faults;
  std::this_thread::sleep_for(settle());
  for (int round = 0; round < 2; ++round) {
    const int from = cluster.leader();
    REQUIRE(from >= 0);
    const int to = cluster.sync_standby();
    REQUIRE(to >= 0);
    Fault f{fmt::format("patronictl switchover {} -> {}", cluster.name(from), cluster.name(to)), wall_us()};
    auto done = std::async(std::launch::async, [&] { return cluster.switchover(to); });
    REQUIRE(cluster.wait_new_leader(from) == to);
    f.leader_us = wall_us();
    INFO(done.get());
    REQUIRE(cluster.wait_healthy(120s) == to);
    f.healthy_us = wall_us();
    faults.push_back(f);
    std::this_thread::sleep_for(settle());
  }
  auto results = load.finish();
  const int l = cluster.leader();
  REQUIRE(l >= 0);
  eoq::test::Admin admin(cluster.node_conninfo(l));
  check_run(load, admin, dir, results, "Patroni switchover under load");
  for (std::size_t i = 0; i < faults.size(); ++i) {
    auto g = measure(admin, faults[i], i + 1 < faults.size() ? faults[i + 1].at_us : wall_us());
    fmt::print("figures: {}\n", describe(faults[i], g));
    CHECK(g.before > 0);
    CHECK(g.after > 0);
  }
  fmt::print("figures: {}\n", summary(results));
  // A planned switchover is what a host must not have to handle: with the
  // advised retries, no submit threw and no handler saw a statement fail.
  auto s = seen(results, 's', true), w = seen(results, 'w', true);
  CHECK(s["errors"] == 0);
  CHECK(w["handler_exceptions"] == 0);
}
