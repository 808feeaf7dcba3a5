// graphile-worker, "handlers that write": a drain of N jobs whose handler inserts one row keyed by its
// job (one tab-separated row on stdout).
//   The handler runs `helpers.query(INSERT)`: a statement on a pooled connection, its own autocommit
//   transaction. graphile-worker completes the job afterwards in a separate, batched statement, so the
//   effect and the completion are not atomic (a crash between them runs the handler again).
//   drain: the N jobs, enqueued by addJobs in calls of 10,000, then VACUUM ANALYZE + CHECKPOINT; from
//   run() until the handler has run N times and no job is left in the table. Then the effect table
//   must hold exactly N rows.
// Usage: node graphile_effects.mjs URL N CONCURRENCY LOCALQUEUE(-1 = off)
// Row: system, config, drain/s.
import { run, makeWorkerUtils, Logger } from "graphile-worker";
import pg from "pg";

const [url, N = "20000", conc = "8", lq = "500"] = process.argv.slice(2);
if (!url) throw new Error("usage: node graphile_effects.mjs URL N CONCURRENCY LOCALQUEUE");
const n = Number(N), localQueue = Number(lq) > 0 ? Number(lq) : 0;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const rate = (count, t0) => count / ((performance.now() - t0) / 1000);

const utils = await makeWorkerUtils({ connectionString: url });
await utils.migrate();
const db = new pg.Client({ connectionString: url });
await db.connect();
const count = async (sql) => (await db.query(sql)).rows[0].c;
const jobs = () => count("select count(*)::int as c from graphile_worker._private_jobs");
await db.query("delete from graphile_worker._private_jobs");
await db.query("set client_min_messages = warning; drop table if exists fx_effects_gw;" +
  "create table fx_effects_gw (job_i bigint primary key, who text not null)");

for (let done = 0; done < n; done += 10000) {
  const batch = Array.from({ length: Math.min(10000, n - done) }, (_, k) => ({ identifier: "fx", payload: { i: done + k } }));
  await utils.addJobs(batch);
}
if ((await jobs()) !== n) throw new Error(`enqueue stored ${await jobs()} jobs, not ${n}`);
await db.query("vacuum analyze graphile_worker._private_jobs, fx_effects_gw");
await db.query("checkpoint");

let handled = 0, allHandled;
const everyJobHandled = new Promise((r) => (allHandled = r));
const taskList = {
  fx: async (payload, helpers) => {
    await helpers.query("insert into fx_effects_gw (job_i, who) values ($1, 'w')", [payload.i]);
    if (++handled === n) allHandled();
  },
};
const worker = localQueue ? { localQueue: { size: localQueue }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } : {};
const t0 = performance.now();
const runner = await run({
  connectionString: url, concurrency: Number(conc), noHandleSignals: true,
  logger: new Logger(() => () => {}), preset: { worker }, taskList,
});
await everyJobHandled;
while ((await jobs()) > 0) await sleep(5); // completions may still be in flight
const drain = rate(n, t0);
await runner.stop();
const effects = await count("select count(*)::int as c from fx_effects_gw");
await utils.release();
await db.end();
if (handled !== n) throw new Error(`the handler ran ${handled} times for ${n} jobs`);
if (effects !== n) throw new Error(`${effects} effect rows for ${n} jobs`);

const config = `effects: helpers.query(INSERT), own commit; concurrency ${conc}, ` +
  (localQueue ? `localQueue ${localQueue}, completeJobBatchDelay 0` : "no localQueue (its default)");
console.log(["graphile-worker 0.18", config, drain.toFixed(0)].join("\t"));
process.exit(0);
