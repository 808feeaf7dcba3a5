// graphile-worker, measured the way bench/peers/README.md describes (one tab-separated row on stdout):
//   single  1,000 sequential addJob calls from one client
//   bulk    N jobs through addJobs, in calls of 10,000
//   drain   the N bulk jobs, after VACUUM ANALYZE + CHECKPOINT: from run() until the handler has run N
//           times and no job is left in the table (graphile-worker deletes a job when it completes)
//   idle    submit-to-start on the same worker, now idle: SAMPLES single jobs with random 0-100 ms gaps
// Usage: node graphile.mjs URL N CONCURRENCY LOCALQUEUE(-1 = off) [SAMPLES=50]
// Row: system, config, drain/s, single/s, bulk/s, idle p50 ms, p90 ms, max ms.
import { run, makeWorkerUtils, Logger } from "graphile-worker";
import pg from "pg";

const [url, N = "50000", conc = "8", lq = "-1", S = "50"] = process.argv.slice(2);
if (!url) throw new Error("usage: node graphile.mjs URL N CONCURRENCY LOCALQUEUE [SAMPLES]");
const n = Number(N), samples = Number(S), localQueue = Number(lq) > 0 ? Number(lq) : 0;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const rate = (count, t0) => count / ((performance.now() - t0) / 1000);
const pct = (sorted, q) => sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)];

const utils = await makeWorkerUtils({ connectionString: url });
await utils.migrate();
const db = new pg.Client({ connectionString: url });
await db.connect();
const jobs = async () => (await db.query("select count(*)::int as c from graphile_worker._private_jobs")).rows[0].c;
const clear = () => db.query("delete from graphile_worker._private_jobs");

// Enqueue: one at a time, then in bulk.
for (let i = 0; i < 20; i++) await utils.addJob("noop", { i }); // warm-up
await clear();
let t0 = performance.now();
for (let i = 0; i < 1000; i++) await utils.addJob("noop", { i });
const single = rate(1000, t0);
await clear();
t0 = performance.now();
for (let done = 0; done < n; done += 10000) {
  const batch = Array.from({ length: Math.min(10000, n - done) }, (_, k) => ({ identifier: "noop", payload: { i: done + k } }));
  await utils.addJobs(batch);
}
const bulk = rate(n, t0);
if ((await jobs()) !== n) throw new Error(`bulk enqueue stored ${await jobs()} jobs, not ${n}`);
await db.query("vacuum analyze graphile_worker._private_jobs");
await db.query("checkpoint");

// Drain.
let handled = 0, allHandled, onPing;
const everyJobHandled = new Promise((r) => (allHandled = r));
const taskList = {
  noop: async () => { if (++handled === n) allHandled(); },
  ping: async () => onPing(performance.now()),
};
const worker = localQueue ? { localQueue: { size: localQueue }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } : {};
t0 = performance.now();
const runner = await run({
  connectionString: url, concurrency: Number(conc), noHandleSignals: true,
  logger: new Logger(() => () => {}), preset: { worker }, taskList,
});
await everyJobHandled;
while ((await jobs()) > 0) await sleep(5); // completions may still be in flight
const drain = rate(n, t0);
if (handled !== n) throw new Error(`the handler ran ${handled} times for ${n} jobs`);

// Idle submit-to-start.
await sleep(500);
const lat = [];
for (let i = 0; i < samples; i++) {
  await sleep(Math.random() * 100);
  const started = new Promise((r) => (onPing = r));
  const t = performance.now();
  await utils.addJob("ping", { i });
  lat.push((await started) - t);
}
lat.sort((a, b) => a - b);
await runner.stop();
await utils.release();
await db.end();

const config = `concurrency ${conc}, ` +
  (localQueue ? `localQueue ${localQueue}, completeJobBatchDelay 0` : "no localQueue (its default)");
console.log(["graphile-worker 0.18", config, drain.toFixed(0), single.toFixed(0), bulk.toFixed(0),
  pct(lat, 0.5).toFixed(2), pct(lat, 0.9).toFixed(2), lat[lat.length - 1].toFixed(2)].join("\t"));
process.exit(0);
