// pg-boss, "handlers that write": a drain of N jobs whose handler inserts one row per job, keyed by the
// job (one tab-separated row on stdout).
//   work() hands the handler a batch of up to BATCH_SIZE jobs; the handler inserts their rows one after
//   another, each an autocommit INSERT through pg-boss's own pool (boss.getDb().executeSql), so
//   LOCAL_CONCURRENCY handlers write at once, as graphile-worker's CONCURRENCY handlers do. pg-boss
//   then completes the whole batch in one statement of its own (work()'s default, not `transactional`),
//   so the effects and the completion are not atomic.
//   drain: the N jobs, enqueued by insert in calls of 10,000, then VACUUM ANALYZE + CHECKPOINT; from
//   work() until the handler has seen N jobs and every one of them is in state 'completed'. Then the
//   effect table must hold exactly N rows.
// Usage: node pgboss_effects.mjs URL N BATCH_SIZE LOCAL_CONCURRENCY NOTIFY(0|1)
//   NOTIFY=1: useListenNotify on the instance and `notify` on the queue, as pgboss.mjs's tuned row.
// Row: system, config, drain/s.
import { PgBoss } from "pg-boss";
import pg from "pg";

const [url, N = "20000", batch = "500", lc = "8", nf = "1"] = process.argv.slice(2);
if (!url) throw new Error("usage: node pgboss_effects.mjs URL N BATCH_SIZE LOCAL_CONCURRENCY NOTIFY");
const n = Number(N), notify = nf === "1";
const poll = 0.5; // seconds: pg-boss's minimum polling interval (its default is 2)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const rate = (count, t0) => count / ((performance.now() - t0) / 1000);

const boss = new PgBoss({ connectionString: url, max: 20, useListenNotify: notify });
let bossError = null;
boss.on("error", (e) => { bossError = e; console.error("pg-boss error:", e.message); });
await boss.start();
const db = new pg.Client({ connectionString: url });
await db.connect();
const count = async (sql) => (await db.query(sql)).rows[0].c;
const open = () => count("select count(*)::int as c from pgboss.job where name = 'fx' and state <> 'completed'");
await boss.deleteQueue("fx").catch(() => {});
await boss.createQueue("fx", { notify });
await db.query("set client_min_messages = warning; drop table if exists fx_effects_boss;" +
  "create table fx_effects_boss (job_i bigint primary key, who text not null)");

for (let done = 0; done < n; done += 10000)
  await boss.insert("fx", Array.from({ length: Math.min(10000, n - done) }, (_, k) => ({ data: { i: done + k } })));
if ((await open()) !== n) throw new Error(`enqueue stored ${await open()} jobs, not ${n}`);
await db.query("vacuum analyze pgboss.job, fx_effects_boss");
await db.query("checkpoint");

const bossDb = boss.getDb();
const insert = "insert into fx_effects_boss (job_i, who) values ($1, 'w')";
let handled = 0, allHandled;
const everyJobHandled = new Promise((r) => (allHandled = r));
const t0 = performance.now();
await boss.work("fx",
  { batchSize: Number(batch), localConcurrency: Number(lc), pollingIntervalSeconds: poll, burstWhenBatchFull: true },
  async (jobs) => {
    for (const job of jobs) await bossDb.executeSql(insert, [job.data.i]);
    if ((handled += jobs.length) === n) allHandled();
  });
await everyJobHandled;
while ((await open()) > 0) await sleep(5); // a batch is completed after its handler returns
const drain = rate(n, t0);
await boss.offWork("fx");
const effects = await count("select count(*)::int as c from fx_effects_boss");
await boss.stop({ graceful: false, wait: false }).catch(() => {});
await db.end();
if (bossError) throw bossError;
if (handled !== n) throw new Error(`the handler saw ${handled} jobs for ${n}`);
if (effects !== n) throw new Error(`${effects} effect rows for ${n} jobs`);

const config = `effects: one INSERT per job through its pool, own commit; batchSize ${batch}, ` +
  `localConcurrency ${lc}, burstWhenBatchFull, ` + (notify ? "LISTEN/NOTIFY" : `polling every ${poll} s, no NOTIFY`);
console.log(["pg-boss 12", config, drain.toFixed(0)].join("\t"));
process.exit(0);
