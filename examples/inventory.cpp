// inventory: a stock of 100 items, 10,000 purchase tasks at once, and not one item
// sold twice or sold short.
//
// What it shows:
//  - a purchase handler takes one item (an UPDATE that only matches while qty > 0)
//    and writes an audit row, both in the transaction that completes its task: a
//    purchase succeeds with its audit row, or fails "sold out" with nothing written.
//  - restock tasks, interleaved with the purchases, add items the same way.
//  - checked by counting rows: succeeded purchases == stock + restocked, the stock
//    ends at 0 and never went below it (every audit row carries the balance it left),
//    and every succeeded task has exactly one audit row and no other task has one.
//  - p50/p99 purchase latency, from submit to settled (the tasks' own timestamps).
//
//   inventory [--stock 100] [--purchases 10000] [--restocks 4] [--restock-size 25]
//             [--submitters 4] [--workers 2] [--concurrency 8] [--timeout-s 300]
//
// Runs on EOQ_DATABASE_URL, or on a throwaway PostgreSQL it starts and stops itself.
#include <eoq/eoq.hpp>
#include <eoq/testing.hpp>
#include <eoq/worker.hpp>

#include "example_support.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
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
  int stock = 100, purchases = 10000, restocks = 4, restock_size = 25;
  int submitters = 4, workers = 2, concurrency = 8, timeout_s = 300;
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
                                   {"--timeout-s", &o.timeout_s}};
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!ints.count(argv[i])) throw std::invalid_argument(std::string("unknown flag ") + argv[i]);
    *ints[argv[i]] = std::stoi(argv[i + 1]);
  }
  // Demand must outrun supply, or "the stock ends at 0" would not hold.
  if (o.purchases < 4 * (o.stock + o.restocks * o.restock_size) || o.submitters < 1 || o.workers < 1 ||
      o.concurrency < 1)
    throw std::invalid_argument("need purchases >= 4 x (stock + restocks x restock-size), and at least one of each");
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

}  // namespace

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
  db.query("INSERT INTO inventory.stock VALUES ('widget', $1)", {std::to_string(opt.stock)});

  auto store_options = [&](int pool_size) { return example::store_options("inventory_eoq", url, pool_size); };
  eoq::PostgresStore store(store_options(opt.submitters));
  store.migrate();

  // The stock row's lock orders every change, so each audit row's qty_after is the
  // balance right after that change, and audit ids follow the same order.
  auto purchase = [](eoq::TaskContext& ctx) {
    auto taken = ctx.exec(
        "UPDATE inventory.stock SET qty = qty - 1 WHERE sku = $1::json->>'sku' AND qty > 0"
        " RETURNING sku, qty",
        {ctx.payload()});
    if (taken.empty()) throw eoq::PermanentError("sold out");
    ctx.exec("INSERT INTO inventory.audit (task_id, sku, delta, qty_after) VALUES ($1, $2, -1, $3)",
             {std::to_string(ctx.id()), taken.rows[0][0], taken.rows[0][1]});
    ctx.set_result(R"({"bought":1})");
  };
  auto restock = [](eoq::TaskContext& ctx) {
    auto added = ctx.exec(
        "UPDATE inventory.stock SET qty = qty + ($1::json->>'qty')::int"
        " WHERE sku = $1::json->>'sku' RETURNING sku, qty, ($1::json->>'qty')",
        {ctx.payload()});
    ctx.exec("INSERT INTO inventory.audit (task_id, sku, delta, qty_after) VALUES ($1, $2, $3, $4)",
             {std::to_string(ctx.id()), *added.rows.at(0)[0], *added.rows[0][2], *added.rows[0][1]});
  };

  std::vector<std::unique_ptr<eoq::PostgresStore>> stores;
  std::vector<std::unique_ptr<eoq::Worker>> workers;
  for (int w = 0; w < opt.workers; ++w) {
    stores.push_back(std::make_unique<eoq::PostgresStore>(store_options(opt.concurrency)));
    eoq::WorkerOptions wo;
    wo.queues = {"shop"};
    wo.concurrency = opt.concurrency;
    wo.worker_id = "worker-" + std::to_string(w + 1);
    // "sold out" is an expected outcome, logged as a warning per task: keep errors only.
    wo.logger = [](eoq::LogLevel level, std::string_view message) {
      if (level == eoq::LogLevel::error)
        std::fprintf(stderr, "%.*s\n", static_cast<int>(message.size()), message.data());
    };
    workers.push_back(std::make_unique<eoq::Worker>(*stores.back(), wo));
    workers.back()->on("purchase", purchase).on("restock", restock);
    workers.back()->start();
  }

  // Purchases go out in chunks of 100 from several threads at once; restock j sits
  // in the chunk at (j+1)/(restocks+1) of the stream, so purchases follow it.
  const auto t0 = std::chrono::steady_clock::now();
  const int chunk = 100, chunks = (opt.purchases + chunk - 1) / chunk;
  std::vector<std::jthread> submitters;
  for (int s = 0; s < opt.submitters; ++s)
    submitters.emplace_back([&, s] {
      for (int c = s; c < chunks; c += opt.submitters) {
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
          eoq::NewTask p;
          p.queue = "shop";
          p.type = "purchase";
          p.key = "purchase-" + std::to_string(n + 1);  // the client's id: a resubmit buys nothing more
          p.payload = R"({"sku":"widget","customer":)" + std::to_string(n + 1) + "}";
          batch.push_back(p);
        }
        store.submit_batch(batch);
      }
    });
  submitters.clear();

  const auto give_up = t0 + std::chrono::seconds(opt.timeout_s);
  for (;;) {
    std::int64_t open = 0, settled = 0;
    for (const auto& s : store.stats())
      if (s.queue == "shop") {
        open = s.pending + s.running;
        settled = s.succeeded + s.failed;
      }
    if (open == 0 && settled == opt.purchases + opt.restocks) break;
    if (std::chrono::steady_clock::now() > give_up) throw std::runtime_error("timed out waiting for the tasks");
    std::this_thread::sleep_for(50ms);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto& w : workers) w->stop();

  // What eoq says happened, task by task.
  std::set<std::string> succeeded_ids;
  int bought = 0, sold_out = 0, restocked = 0, other = 0;
  std::vector<double> latency_all, latency_bought;
  eoq::ListQuery q;
  q.queue = "shop";
  q.limit = 1000;
  for (;;) {
    auto page = store.list(q);
    for (const auto& t : page.tasks) {
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
    if (!page.next_after) break;
    q.after = page.next_after;
  }

  // What the audit trail says, counted in the database.
  std::set<std::string> audited;
  for (const auto& r : db.query("SELECT task_id FROM inventory.audit")) audited.insert(r[0]);
  const auto audit_rows = std::stoi(db.one("SELECT count(*) FROM inventory.audit"));
  const auto final_qty = std::stoi(db.one("SELECT qty FROM inventory.stock"));
  const auto lowest = std::stoi(db.one("SELECT coalesce(min(qty_after), 0) FROM inventory.audit"));
  const auto sum = std::stoi(db.one("SELECT coalesce(sum(delta), 0) FROM inventory.audit"));
  // Replaying the trail in order must reproduce every balance it recorded.
  const auto inconsistent = db.one(
      "SELECT count(*) FROM (SELECT qty_after, $1::int + sum(delta) OVER (ORDER BY id)"
      " AS replayed FROM inventory.audit) x WHERE qty_after <> replayed",
      {std::to_string(opt.stock)});

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

  bool ok = true;
  auto check = [&](bool good, const char* what) {
    std::printf("%s %s\n", good ? "ok  " : "FAIL", what);
    ok = ok && good;
  };
  check(bought == opt.stock + restocked && restocked == opt.restocks * opt.restock_size && other == 0,
        "exactly stock + restocked purchases succeeded, every other one failed sold out");
  check(final_qty == 0 && lowest >= 0 && opt.stock + sum == final_qty && inconsistent == "0",
        "the stock ends at 0, never went negative, and the audit trail replays to it");
  check(audit_rows == static_cast<int>(audited.size()) && audited == succeeded_ids,
        "one audit row per succeeded task, none for a failed one");
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "inventory: %s\n", e.what());
  return 1;
}
