// pg-boss, measured the way bench/peers/README.md describes (one tab-separated row on stdout):
//   single  1,000 sequential send calls from one client
//   bulk    N jobs through insert, in calls of 10,000
//   drain   the N bulk jobs, after VACUUM ANALYZE + CHECKPOINT: from work() until the handler has seen N
//           jobs and every one of them is in state 'completed'
//   idle    submit-to-start: SAMPLES single jobs to an idle batchSize-1 worker, random gaps of 0-100 ms
//           (with NOTIFY) or up to one polling interval (without)
// Usage: node pgboss.mjs URL N BATCH_SIZE LOCAL_CONCURRENCY NOTIFY(0|1) [SAMPLES=50]
//   NOTIFY=1: useListenNotify on the instance and `notify` on both queues (pg-boss 12's LISTEN/NOTIFY wake-up).
// Row: system, config, drain/s, single/s, bulk/s, idle p50 ms, p90 ms, max ms.
import { PgBoss } from "pg-boss";
import pg from "pg";

const [url, N = "50000", batch = "500", lc = "8", nf = "1", S = "50"] = process.argv.slice(2);
if (!url) throw new Error("usage: node pgboss.mjs URL N BATCH_SIZE LOCAL_CONCURRENCY NOTIFY [SAMPLES]");
const n = Number(N), samples = Number(S), notify = nf === "1";
const poll = 0.5; // seconds: pg-boss's minimum polling interval (its default is 2)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const rate = (count, t0) => count / ((performance.now() - t0) / 1000);
const pct = (sorted, q) => sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)];

const boss = new PgBoss({ connectionString: url, max: 20, useListenNotify: notify });
let bossError = null;
boss.on("error", (e) => { bossError = e; console.error("pg-boss error:", e.message); });
await boss.start();
const db = new pg.Client({ connectionString: url });
await db.connect();
const open = async () =>
  (await db.query("select count(*)::int as c from pgboss.job where name = 'noop' and state <> 'completed'")).rows[0].c;
for (const q of ["noop", "ping"]) {
  await boss.deleteQueue(q).catch(() => {});
  await boss.createQueue(q, { notify });
}

// Enqueue: one at a time, then in bulk.
for (let i = 0; i < 20; i++) await boss.send("noop", { i }); // warm-up
await boss.deleteAllJobs("noop");
let t0 = performance.now();
for (let i = 0; i < 1000; i++) await boss.send("noop", { i });
const single = rate(1000, t0);
await boss.deleteAllJobs("noop");
t0 = performance.now();
for (let done = 0; done < n; done += 10000)
  await boss.insert("noop", Array.from({ length: Math.min(10000, n - done) }, (_, k) => ({ data: { i: done + k } })));
const bulk = rate(n, t0);
if ((await open()) !== n) throw new Error(`bulk enqueue stored ${await open()} jobs, not ${n}`);
await db.query("vacuum analyze pgboss.job");
await db.query("checkpoint");

// Drain.
let handled = 0, allHandled, onPing;
const everyJobHandled = new Promise((r) => (allHandled = r));
t0 = performance.now();
await boss.work("noop",
  { batchSize: Number(batch), localConcurrency: Number(lc), pollingIntervalSeconds: poll, burstWhenBatchFull: true },
  async (jobs) => { if ((handled += jobs.length) === n) allHandled(); });
await everyJobHandled;
while ((await open()) > 0) await sleep(5); // a batch is completed after its handler returns
const drain = rate(n, t0);
await boss.offWork("noop");
if (handled !== n) throw new Error(`the handler saw ${handled} jobs for ${n}`);

// Idle submit-to-start.
await boss.work("ping", { batchSize: 1, pollingIntervalSeconds: poll }, async () => onPing(performance.now()));
await sleep(1000);
const lat = [];
for (let i = 0; i < samples; i++) {
  await sleep(Math.random() * (notify ? 100 : poll * 1000));
  const started = new Promise((r) => (onPing = r));
  const t = performance.now();
  await boss.send("ping", { i });
  lat.push((await started) - t);
}
lat.sort((a, b) => a - b);
await boss.stop({ graceful: false, wait: false }).catch(() => {});
await db.end();
if (bossError) throw bossError;

const config = `batchSize ${batch}, localConcurrency ${lc}, burstWhenBatchFull, ` +
  (notify ? "LISTEN/NOTIFY" : `polling every ${poll} s, no NOTIFY`);
console.log(["pg-boss 12", config, drain.toFixed(0), single.toFixed(0), bulk.toFixed(0),
  pct(lat, 0.5).toFixed(2), pct(lat, 0.9).toFixed(2), lat[lat.length - 1].toFixed(2)].join("\t"));
process.exit(0);
