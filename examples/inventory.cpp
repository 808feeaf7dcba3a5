// inventory: a stock of 100 items, 10,000 purchase tasks at once, and not one item
// sold twice or sold short; 200 at once against 100 sell exactly 100 as well.
//
// What it shows:
//  - a purchase handler takes one item (an UPDATE that only matches while qty > 0)
//    and writes an audit row, both in the transaction that completes its task: a
//    purchase succeeds with its audit row, or fails "sold out" with nothing written.
//  - restock tasks, interleaved with the purchases, add items the same way.
//  - checked by counting rows: succeeded purchases == min(demand, stock) without restocks (with them, never more than stock + restocked, the rest still on the shelf),
//    the stock never went below 0 (every audit row carries the balance it left), and
//    every succeeded task has exactly one audit row and no other task has one.
//  - resubmitting every purchase with its client key buys nothing more.
//  - the read side: stock reads go through a cache (StockCache below) that a
//    commit invalidates (the handlers NOTIFY in their transaction, so only a
//    committed change is heard), that lets one reader refill a missing entry
//    while the others wait for it, and that fails open to the database while its
//    LISTEN connection is down (the example kills it mid-run). Measured and
//    checked: a purchase is visible to a read within 100 ms of its buyer seeing it
//    succeed, p99 read latency under 5 ms under the mixed load, more than 90% of
//    the reads made while it listens answered without a database query, one
//    query for 32 readers of a cold entry. --timing-margin N multiplies the two
//    time limits (ctest passes a large one: a loaded CI box under a sanitizer
//    must not make the run flaky).
//  - p50/p99 purchase latency, from submit to settled (the tasks' own timestamps).
//
//   inventory [--stock 100] [--purchases 10000] [--restocks 0] [--restock-size 25]
//             [--submitters 4] [--workers 2] [--concurrency 8] [--readers 4]
//             [--timing-margin 1] [--timeout-s 300]
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops itself.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include "example_support.hpp"

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <latch>
#include <map>
#include <mutex>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;
// The host's own connection: sets the stock up, and reads the audit trail at the end.
using example::Db;

struct Options {
  int stock = 100, purchases = 10000, restocks = 0, restock_size = 25;
  int submitters = 4, workers = 2, concurrency = 8, readers = 4, timing_margin = 1, timeout_s = 300;
};

Options parse(int argc, char** argv) {
  Options o;
  std::map<std::string, int*> ints{{"--stock", &o.stock},
                                   {"--purchases", &o.purchases},
                                   {"--restocks", &o.restocks},
                                   {"--restock-size", &o.restock_size},
                                   {"--submitters", &o.submitters},
                                   {"--workers", &o.workers},
                                   {"--concurrency", &o.concurrency},
                                   {"--readers", &o.readers},
                                   {"--timing-margin", &o.timing_margin},
                                   {"--timeout-s", &o.timeout_s}};
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!ints.count(argv[i])) throw std::invalid_argument(std::string("unknown flag ") + argv[i]);
    *ints[argv[i]] = std::stoi(argv[i + 1]);
  }
  if (o.stock < 0 || o.purchases < 1 || o.restocks < 0 || o.submitters < 1 || o.workers < 1 || o.concurrency < 1 ||
      o.readers < 1 || o.timing_margin < 1)
    throw std::invalid_argument("flag out of range: at least one purchase, submitter, worker, handler and reader");
  // A purchase that runs before a restock arrives finds the shelf empty, so with
  // restocks only a demand well beyond the supply sells all of it.
  if (o.restocks > 0 && o.purchases < 4 * (o.stock + o.restocks * o.restock_size))
    throw std::invalid_argument("--restocks: needs purchases >= 4 x (stock + restocks x restock-size)");
  return o;
}

double millis(eoq::TimePoint from, eoq::TimePoint to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(p * static_cast<double>(v.size() - 1))];
}

// The read side: stock levels cached in this process, in front of the database.
//  - a commit invalidates: the handlers NOTIFY "inventory_stock" with the sku in
//    the transaction that changes it, so the listener hears of a change only once
//    it is committed, and drops that entry.
//  - a refill cannot resurrect a stale value: each entry has a generation, bumped
//    by every invalidation, and a value read under an older generation is not kept.
//  - single flight: the first reader of a missing entry refills it; readers that
//    come meanwhile wait for that refill instead of querying too.
//  - fails open: while the LISTEN connection is down no invalidation can be heard,
//    so nothing is cached; every read goes to the database until the listener is
//    back (and starts from an empty cache, since it may have missed changes).
class StockCache {
 public:
  explicit StockCache(std::string url) : url_(std::move(url)), listener_([this](std::stop_token st) { listen(st); }) {
    std::unique_lock lk(m_);
    // Listening before the first read, or the database is not there.
    if (!cv_.wait_for(lk, 30s, [&] { return available_; }))
      throw std::runtime_error("the cache's LISTEN connection did not come up within 30 s");
  }
  ~StockCache() {
    listener_.request_stop();
    listener_.join();
  }

  // `db` is the calling thread's own connection (libpq connections are not shared).
  int read(Db& db, const std::string& sku) {
    std::unique_lock lk(m_);
    bool waited = false;
    for (;;) {
      if (!available_) {
        ++fail_open_;
        lk.unlock();
        return load(db, sku);
      }
      auto& e = entries_[sku];
      if (e.value) {
        ++(waited ? coalesced_ : hits_);
        return *e.value;
      }
      if (!e.loading) break;
      waited = true;
      cv_.wait(lk);
    }
    auto& e = entries_[sku];
    e.loading = true;
    const auto generation = e.generation;
    ++misses_;
    lk.unlock();
    std::optional<int> value;
    try {
      value = load(db, sku);
    } catch (...) {
      lk.lock();
      entries_[sku].loading = false;
      cv_.notify_all();
      throw;
    }
    lk.lock();
    auto& after = entries_[sku];
    after.loading = false;
    if (after.generation == generation && available_) after.value = value;
    cv_.notify_all();
    return *value;
  }

  struct Counts {
    std::int64_t hits, coalesced, misses, fail_open, loads, invalidations, outages;
  };
  Counts counts() {
    std::lock_guard lk(m_);
    return {hits_, coalesced_, misses_, fail_open_, loads_.load(), invalidations_, outages_};
  }
  bool available() {
    std::lock_guard lk(m_);
    return available_;
  }

 private:
  struct Entry {
    std::optional<int> value;
    std::uint64_t generation = 0;
    bool loading = false;
  };

  int load(Db& db, const std::string& sku) {
    ++loads_;
    return std::stoi(db.one("SELECT qty FROM inventory.stock WHERE sku = $1", {sku}));
  }
  void invalidate_locked(const std::string& sku) {
    auto& e = entries_[sku];
    ++e.generation;
    e.value.reset();
    ++invalidations_;
  }
  void drop_all_locked() {
    for (auto& [sku, e] : entries_) {
      ++e.generation;
      e.value.reset();
    }
  }
  void set_available(bool up) {
    std::lock_guard lk(m_);
    if (!up && available_) ++outages_;
    drop_all_locked();
    available_ = up;
    cv_.notify_all();
  }

  // The listener's own connection, named so that the example can find and kill it.
  void listen(std::stop_token st) {
    while (!st.stop_requested()) {
      const char* keys[] = {"dbname", "application_name", nullptr};
      const char* values[] = {url_.c_str(), "inventory-cache-listener", nullptr};
      std::unique_ptr<PGconn, decltype(&PQfinish)> c(PQconnectdbParams(keys, values, 1), &PQfinish);
      // The server's "terminating connection" notice is our outage, counted below, not news for stderr.
      PQsetNoticeProcessor(c.get(), [](void*, const char*) {}, nullptr);
      std::unique_ptr<PGresult, decltype(&PQclear)> r(
          PQstatus(c.get()) == CONNECTION_OK ? PQexec(c.get(), "LISTEN inventory_stock") : nullptr, &PQclear);
      if (!r || PQresultStatus(r.get()) != PGRES_COMMAND_OK) {
        std::this_thread::sleep_for(100ms);
        continue;
      }
      set_available(true);
      while (!st.stop_requested()) {
        pollfd p{PQsocket(c.get()), POLLIN, 0};
        if (::poll(&p, 1, 50) < 0) continue;
        if (!PQconsumeInput(c.get()) || PQstatus(c.get()) != CONNECTION_OK) break;
        while (PGnotify* n = PQnotifies(c.get())) {
          {
            std::lock_guard lk(m_);
            invalidate_locked(n->extra);
          }
          PQfreemem(n);
        }
      }
      set_available(false);  // fail open until the listener is back
      // Not straight back at a server that just went away: a pause, as a
      // service's listener would make (and an outage the readers see).
      std::this_thread::sleep_for(100ms);
    }
  }

  std::string url_;
  std::mutex m_;
  std::condition_variable cv_;
  std::map<std::string, Entry> entries_;
  bool available_ = false;
  std::int64_t hits_ = 0, coalesced_ = 0, misses_ = 0, fail_open_ = 0, invalidations_ = 0, outages_ = 0;
  std::atomic<std::int64_t> loads_{0};  // counted outside the lock: fail-open reads query too
  std::jthread listener_;  // last: started once everything it uses exists
};

}  // namespace

// The submitted purchase n (from 0): the client's key makes a resubmit harmless.
eoq::NewTask purchase_task(int n) {
  eoq::NewTask p;
  p.queue = "shop";
  p.type = "purchase";
  p.key = "purchase-" + std::to_string(n + 1);
  p.payload = R"({"sku":"widget","customer":)" + std::to_string(n + 1) + "}";
  return p;
}

int main(int argc, char** argv) try {
  const Options opt = parse(argc, argv);
  const std::string url = eoq::testing::database_url_or_temp("EOQ_DATABASE_URL");

  Db db(url);
  db.query("SET client_min_messages = warning");
  db.query("DROP SCHEMA IF EXISTS inventory CASCADE");
  db.query("DROP SCHEMA IF EXISTS inventory_eoq CASCADE");
  db.query("CREATE SCHEMA inventory");
  // Deliberately no CHECK (qty >= 0): the handlers keep it so, and the audit trail proves it.
  db.query("CREATE TABLE inventory.stock (sku text PRIMARY KEY, qty int NOT NULL)");
  db.query(
      "CREATE TABLE inventory.audit (id bigserial PRIMARY KEY, task_id bigint NOT NULL, sku text NOT NULL,"
      " delta int NOT NULL, qty_after int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())");
  // The widget is on sale; "probe" is bought by the read-your-write probe alone;
  // the rest of the catalog is read, not bought.
  db.query("INSERT INTO inventory.stock VALUES ('widget', $1), ('probe', 1000000)", {std::to_string(opt.stock)});
  db.query("INSERT INTO inventory.stock SELECT 'sku-' || n, 50 FROM generate_series(3, 10) n");
  const std::vector<std::string> catalog{"widget", "probe", "sku-3", "sku-4", "sku-5",
                                         "sku-6",  "sku-7", "sku-8", "sku-9", "sku-10"};

  auto store_options = [&](int pool_size) { return example::store_options("inventory_eoq", url, pool_size); };
  eoq::PostgresStore store(store_options(opt.submitters + 2));
  store.migrate();

  // The stock row's lock orders every change, so each audit row's qty_after is the
  // balance right after that change, and audit ids follow the same order. The
  // NOTIFY is delivered when this transaction commits, and only then.
  auto purchase = [](eoq::TaskContext& ctx) {
    auto taken = ctx.exec(
        "UPDATE inventory.stock SET qty = qty - 1 WHERE sku = $1::json->>'sku' AND qty > 0"
        " RETURNING sku, qty",
        {ctx.payload()});
    if (taken.empty()) throw eoq::PermanentError("sold out");
    ctx.exec("INSERT INTO inventory.audit (task_id, sku, delta, qty_after) VALUES ($1, $2, -1, $3)",
             {std::to_string(ctx.id()), taken.rows[0][0], taken.rows[0][1]});
    ctx.exec("SELECT pg_notify('inventory_stock', $1)", {taken.rows[0][0]});
    ctx.set_result(R"({"bought":1,"qty_after":)" + *taken.rows[0][1] + "}");
  };
  auto restock = [](eoq::TaskContext& ctx) {
    auto added = ctx.exec(
        "UPDATE inventory.stock SET qty = qty + ($1::json->>'qty')::int"
        " WHERE sku = $1::json->>'sku' RETURNING sku, qty, ($1::json->>'qty')",
        {ctx.payload()});
    ctx.exec("INSERT INTO inventory.audit (task_id, sku, delta, qty_after) VALUES ($1, $2, $3, $4)",
             {std::to_string(ctx.id()), *added.rows.at(0)[0], *added.rows[0][2], *added.rows[0][1]});
    ctx.exec("SELECT pg_notify('inventory_stock', $1)", {added.rows[0][0]});
  };

  std::vector<std::unique_ptr<eoq::PostgresStore>> stores;
  std::vector<std::unique_ptr<eoq::Worker>> workers;
  // One more worker for the probe's queue: the storm's workers hold up to
  // thousands of claimed purchases each, and a buyer's purchase is not behind them.
  for (int w = 0; w <= opt.workers; ++w) {
    const bool probe_worker = w == opt.workers;
    stores.push_back(std::make_unique<eoq::PostgresStore>(store_options(opt.concurrency)));
    eoq::WorkerOptions wo;
    wo.queues = {probe_worker ? "shop-probe" : "shop"};
    wo.concurrency = probe_worker ? 1 : opt.concurrency;
    wo.worker_id = probe_worker ? "probe-worker" : "worker-" + std::to_string(w + 1);
    // "sold out" is an expected outcome, logged as a warning per task: keep errors only.
    wo.logger = [](eoq::LogLevel level, std::string_view message) {
      if (level == eoq::LogLevel::error)
        std::fprintf(stderr, "%.*s\n", static_cast<int>(message.size()), message.data());
    };
    workers.push_back(std::make_unique<eoq::Worker>(*stores.back(), wo));
    workers.back()->on("purchase", purchase).on("restock", restock);
    workers.back()->start();
  }

  // The read side runs through the whole purchase storm: readers read the
  // catalog through the cache, a probe buys a "probe" and times how soon a read
  // shows it once the buyer has seen the purchase succeed, and the cache's LISTEN
  // connection is killed once on the way.
  StockCache cache(url);
  std::atomic<bool> load_done{false};
  std::mutex latency_m;
  std::vector<double> read_ms, visible_ms;
  std::vector<std::jthread> side;
  for (int r = 0; r < opt.readers; ++r)
    side.emplace_back([&, r] {
      Db mine(url);
      std::vector<double> local;
      std::size_t n = static_cast<std::size_t>(r);
      while (!load_done) {
        const auto& sku = catalog[n++ % catalog.size()];
        auto t = std::chrono::steady_clock::now();
        cache.read(mine, sku);
        local.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
        std::this_thread::sleep_for(1ms);
      }
      std::lock_guard lk(latency_m);
      read_ms.insert(read_ms.end(), local.begin(), local.end());
    });
  std::string probe_error;  // a probe that cannot finish fails the run, not the process
  side.emplace_back([&] {
    try {
      Db mine(url);
      for (int n = 1; !load_done; ++n) {
        eoq::NewTask p;
        p.queue = "shop-probe";
        p.type = "purchase";
        p.key = "probe-" + std::to_string(n);
        p.payload = R"({"sku":"probe"})";
        auto id = store.submit(p).task.id;
        std::optional<eoq::Task> t;
        for (auto give_up = std::chrono::steady_clock::now() + 30s;
             !(t = store.get(id)) || t->status != eoq::TaskStatus::succeeded;) {
          if (std::chrono::steady_clock::now() > give_up) throw std::runtime_error("a probe purchase never succeeded");
          std::this_thread::sleep_for(1ms);
        }
        const auto seen = std::chrono::steady_clock::now();
        const auto& result = *t->result;
        const int expected = std::stoi(result.substr(result.find("\"qty_after\":") + 12));
        while (cache.read(mine, "probe") != expected) {
          // A cache that missed the invalidation would answer the old stock forever.
          if (std::chrono::steady_clock::now() > seen + 10s)
            throw std::runtime_error("a probe purchase was not visible to reads 10 s after it succeeded");
          std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
        {
          std::lock_guard lk(latency_m);
          visible_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - seen).count());
        }
        std::this_thread::sleep_for(50ms);
      }
    } catch (const std::exception& e) {
      std::lock_guard lk(latency_m);
      probe_error = e.what();
    }
  });
  side.emplace_back([&] {
    // Once the listener is up (on a loaded machine it can take longer than the
    // 300 ms this waits at least), and until the server says it ended it.
    std::this_thread::sleep_for(300ms);
    Db mine(url);
    for (int i = 0; i < 200 && !load_done; ++i) {
      if (!cache.available()) {
        std::this_thread::sleep_for(50ms);
        continue;
      }
      auto ended = mine.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              " WHERE application_name = 'inventory-cache-listener'");
      if (ended.size() == 1 && ended[0][0] == "t") break;
      std::this_thread::sleep_for(50ms);
    }
  });

  // Purchases go out in chunks of 100 from several threads at once; restock j sits
  // in the chunk at (j+1)/(restocks+1) of the stream, so purchases follow it.
  const auto t0 = std::chrono::steady_clock::now();
  const int chunk = 100, chunks = (opt.purchases + chunk - 1) / chunk;
  auto purchases_batch = [&](int c) {
    std::vector<eoq::NewTask> batch;
    for (int n = c * chunk; n < std::min(opt.purchases, (c + 1) * chunk); ++n) {
      for (int j = 0; j < opt.restocks; ++j)
        if (n == (j + 1) * opt.purchases / (opt.restocks + 1)) {
          eoq::NewTask r;
          r.queue = "shop";
          r.type = "restock";
          r.key = "restock-" + std::to_string(j + 1);
          r.payload = R"({"sku":"widget","qty":)" + std::to_string(opt.restock_size) + "}";
          batch.push_back(r);
        }
      batch.push_back(purchase_task(n));
    }
    return batch;
  };
  std::vector<std::jthread> submitters;
  for (int s = 0; s < opt.submitters; ++s)
    submitters.emplace_back([&, s] {
      for (int c = s; c < chunks; c += opt.submitters) store.submit_batch(purchases_batch(c));
    });
  submitters.clear();

  const auto give_up = t0 + std::chrono::seconds(opt.timeout_s);
  double seconds = 0;
  for (;;) {
    std::int64_t open = 0, settled = 0;
    for (const auto& s : store.stats())
      if (s.queue == "shop") {
        open = s.pending + s.running;
        settled = s.succeeded + s.failed;
      }
    const bool all_settled = open == 0 && settled == opt.purchases + opt.restocks;
    if (all_settled && seconds == 0)
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // The read side keeps going for at least 2 s, so that it sees the storm,
    // the outage and the recovery even when the storm is small.
    if (all_settled && std::chrono::steady_clock::now() > t0 + 2s) break;
    if (std::chrono::steady_clock::now() > give_up) throw std::runtime_error("timed out waiting for the tasks");
    std::this_thread::sleep_for(50ms);
  }
  load_done = true;
  side.clear();
  for (auto& w : workers) w->stop();
  const auto during = cache.counts();

  // Single flight: 32 readers of an entry just invalidated make one query.
  std::int64_t burst_loads = 0;
  std::set<int> burst_values;
  {
    const auto before = cache.counts();
    db.query("SELECT pg_notify('inventory_stock', 'sku-3')");
    for (auto until = std::chrono::steady_clock::now() + 10s;
         cache.counts().invalidations == before.invalidations && std::chrono::steady_clock::now() < until;)
      std::this_thread::sleep_for(1ms);
    std::vector<std::unique_ptr<Db>> conns;
    for (int i = 0; i < 32; ++i) conns.push_back(std::make_unique<Db>(url));
    std::latch go(32);
    std::mutex vm;
    std::vector<std::jthread> burst;
    for (int i = 0; i < 32; ++i)
      burst.emplace_back([&, i] {
        go.arrive_and_wait();
        int v = cache.read(*conns[static_cast<std::size_t>(i)], "sku-3");
        std::lock_guard lk(vm);
        burst_values.insert(v);
      });
    burst.clear();
    burst_loads = cache.counts().loads - before.loads;
  }

  // What eoq says happened, task by task.
  std::set<std::string> succeeded_ids;
  int bought = 0, sold_out = 0, restocked = 0, other = 0;
  std::vector<double> latency_all, latency_bought;
  eoq::ListQuery q;
  q.queue = "shop";
  const auto shop_tasks = example::all_tasks(store, q);
  for (const auto& t : shop_tasks) {
    bool ok = t.status == eoq::TaskStatus::succeeded;
    if (ok) succeeded_ids.insert(std::to_string(t.id));
    if (t.type == "restock") {
      restocked += ok ? opt.restock_size : 0;
      other += !ok;
      continue;
    }
    double ms = millis(t.created_at, *t.finished_at);
    latency_all.push_back(ms);
    if (ok) {
      ++bought;
      latency_bought.push_back(ms);
    } else if (t.last_error == "sold out") ++sold_out;
    else ++other;
  }
  int keys_twice = 0;
  for (const auto& [key, n] : example::tasks_per_key(shop_tasks)) keys_twice += n != 1;

  // What the audit trail says, counted in the database.
  std::set<std::string> audited;
  for (const auto& r : db.query("SELECT task_id FROM inventory.audit WHERE sku = 'widget'")) audited.insert(r[0]);
  auto widget = [&](const std::string& sql) { return std::stoi(db.one(sql)); };
  const auto audit_rows = widget("SELECT count(*) FROM inventory.audit WHERE sku = 'widget'");
  const auto final_qty = widget("SELECT qty FROM inventory.stock WHERE sku = 'widget'");
  const auto lowest = widget("SELECT coalesce(min(qty_after), 0) FROM inventory.audit WHERE sku = 'widget'");
  const auto sum = widget("SELECT coalesce(sum(delta), 0) FROM inventory.audit WHERE sku = 'widget'");
  // Replaying the trail in order must reproduce every balance it recorded.
  const auto inconsistent = db.one(
      "SELECT count(*) FROM (SELECT qty_after, $1::int + sum(delta) OVER (ORDER BY id)"
      " AS replayed FROM inventory.audit WHERE sku = 'widget') x WHERE qty_after <> replayed",
      {std::to_string(opt.stock)});

  // Every purchase again, with the same client keys: each is told it is a
  // duplicate, and nothing is bought, written or queued.
  int resubmitted_new = 0;
  for (int c = 0; c < chunks; ++c)
    for (const auto& r : store.submit_batch(purchases_batch(c))) resubmitted_new += !r.duplicate;
  const bool harmless = resubmitted_new == 0 && example::all_tasks(store, q).size() == shop_tasks.size() &&
                        widget("SELECT count(*) FROM inventory.audit WHERE sku = 'widget'") == audit_rows &&
                        widget("SELECT qty FROM inventory.stock WHERE sku = 'widget'") == final_qty;

  const int supply = opt.stock + restocked;
  std::printf(
      "stock %d, %d purchase tasks and %d restock(s) of %d, submitted by %d threads; %d workers x %d handlers\n",
      opt.stock, opt.purchases, opt.restocks, opt.restock_size, opt.submitters, opt.workers, opt.concurrency);
  std::printf("all settled in %.1f s (%.0f tasks/s)\n", seconds, (opt.purchases + opt.restocks) / seconds);
  std::printf("purchases: %d succeeded, %d failed \"sold out\", %d other (supply: %d in stock + %d restocked)\n",
              bought, sold_out, other, opt.stock, restocked);
  std::printf("stock now %d, lowest balance ever %d; %d audit rows for %zu succeeded tasks\n", final_qty, lowest,
              audit_rows, succeeded_ids.size());
  std::printf(
      "purchase latency, submit to settled: p50 %.0f ms, p99 %.0f ms (succeeded ones: p50 %.0f ms, p99 %.0f ms)\n",
      percentile(latency_all, 0.5), percentile(latency_all, 0.99), percentile(latency_bought, 0.5),
      percentile(latency_bought, 0.99));
  const auto reads = during.hits + during.coalesced + during.misses + during.fail_open;
  // Of the reads made while the cache listened: the ones made during the outage
  // go to the database by design, however long the outage lasts.
  const auto listened = reads - during.fail_open;
  const double cached_share =
      listened ? static_cast<double>(during.hits + during.coalesced) / static_cast<double>(listened) : 0;
  std::printf(
      "reads: %lld by %d readers and the probe over %zu catalog skus: %lld hits, %lld waited for a refill, %lld"
      " misses, %lld failed open to the database while the cache listened to nothing (%lld outage);"
      " %lld invalidations\n",
      static_cast<long long>(reads), opt.readers, catalog.size(), static_cast<long long>(during.hits),
      static_cast<long long>(during.coalesced), static_cast<long long>(during.misses),
      static_cast<long long>(during.fail_open), static_cast<long long>(during.outages),
      static_cast<long long>(during.invalidations));
  std::printf("read latency: p50 %.3f ms, p99 %.3f ms, max %.3f ms; a purchase visible to reads %.1f ms (max of %zu)"
              " after its buyer saw it succeed\n",
              percentile(read_ms, 0.5), percentile(read_ms, 0.99), percentile(read_ms, 1.0),
              percentile(visible_ms, 1.0), visible_ms.size());

  example::Checks check;
  // Without restocks every purchase meets the whole supply: exactly min(demand,
  // supply) sell. A restock can run after the purchases that would have taken
  // it (submitters and workers race), so then the rule is only: never more than
  // the supply, and what is not sold is still on the shelf (checked below).
  const int expected_sold = std::min(opt.purchases, supply);
  check((opt.restocks == 0 ? bought == expected_sold : bought <= expected_sold) &&
            restocked == opt.restocks * opt.restock_size && other == 0 && bought + sold_out == opt.purchases,
        std::to_string(bought) + " of " + std::to_string(opt.purchases) + " purchases sold against a supply of " +
            std::to_string(supply) +
            (opt.restocks == 0 ? ": exactly min(demand, supply)" : ": never more than the supply") +
            ", every other one failed sold out");
  check(final_qty == supply - bought && lowest >= 0 && opt.stock + sum == final_qty && inconsistent == "0",
        "the stock ends at " + std::to_string(final_qty) + ", never went negative, and the audit trail replays to it");
  check(audit_rows == static_cast<int>(audited.size()) && audited == succeeded_ids,
        "one audit row per succeeded task, none for a failed one");
  check(keys_twice == 0 && static_cast<int>(shop_tasks.size()) == opt.purchases + opt.restocks,
        std::to_string(shop_tasks.size()) + " tasks in the store, one per client key");
  check(harmless, "all " + std::to_string(opt.purchases) +
                      " purchases resubmitted with their client keys: all duplicates, nothing bought or queued");
  const double m = opt.timing_margin;
  if (!probe_error.empty()) std::printf("the read-your-write probe stopped: %s\n", probe_error.c_str());
  check(probe_error.empty() && visible_ms.size() >= 3 && percentile(visible_ms, 1.0) < 100 * m,
        "read-your-write: every probe purchase visible to a read within " + std::to_string(100 * opt.timing_margin) +
            " ms of its buyer seeing it succeed");
  check(!read_ms.empty() && percentile(read_ms, 0.99) < 5 * m,
        "p99 read latency under the mixed load below " + std::to_string(5 * opt.timing_margin) + " ms");
  check(cached_share > 0.9, "the cache answered " + std::to_string(static_cast<int>(cached_share * 1000) / 10.0).substr(0, 4) +
                                "% of reads while it listened without querying the database (above 90%)");
  check(burst_loads == 1 && burst_values.size() == 1,
        "32 readers of a just-invalidated entry made " + std::to_string(burst_loads) +
            " query: one refilled it while the others waited");
  check(during.outages >= 1 && during.fail_open > 0 && cache.available(),
        "with its LISTEN connection killed the cache failed open (" + std::to_string(during.fail_open) +
            " reads went to the database) and came back");
  return check.exit_code();
} catch (const std::exception& e) {
  std::fprintf(stderr, "inventory: %s\n", e.what());
  return 1;
}
