/* The floor of bulk submit: what one libpq client reaches putting N tasks into a task table, in batches of
   B, with no queue library in the way. Each task has a JSON payload; the table has an identity id, a claim
   index and fillfactor 50, as a queue's would. Three ways, each on fresh tables:
     unnest      one INSERT ... SELECT FROM unnest($keys, $payloads) per batch, which also records each
                 task's idempotency key in an insert-only keys table in the same statement
     COPY        per batch, in one transaction: COPY into a temporary stage, then one INSERT ... SELECT
                 into the task table that also records the keys
     COPY, no keys   the same without the keys table
   Usage: bulk_floor URL [N=50000] [B=10000]
   Prints one tab-separated row per way: system, config, drain, single, bulk tasks/s (drain and single "-").
   Build: gcc -O2 -o bulk_floor bulk_floor.c -I"$(pg_config --includedir)" -lpq */
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static PGconn *conn;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void check(PGresult *r, const char *what) {
  ExecStatusType s = PQresultStatus(r);
  if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
    fprintf(stderr, "bulk_floor: %s: %s", what, PQerrorMessage(conn));
    exit(1);
  }
  PQclear(r);
}

static void exec(const char *sql) { check(PQexec(conn, sql), sql); }

static void fresh_tables(void) {
  exec("DROP TABLE IF EXISTS floor_tasks, floor_keys");
  exec("CREATE TABLE floor_tasks (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
       " queue text NOT NULL DEFAULT 'default', type text NOT NULL DEFAULT 'noop', key text,"
       " payload json NOT NULL, status text NOT NULL DEFAULT 'pending', priority int NOT NULL DEFAULT 0,"
       " run_at timestamptz NOT NULL DEFAULT now(), version bigint NOT NULL DEFAULT 1) WITH (fillfactor = 50)");
  exec("CREATE INDEX floor_tasks_claim ON floor_tasks (queue, priority, run_at, id)");
  exec("CREATE TABLE floor_keys (queue text NOT NULL, key text NOT NULL, task_id bigint NOT NULL,"
       " PRIMARY KEY (queue, key))");
  exec("CHECKPOINT");
}

static long count_tasks(void) {
  PGresult *r = PQexec(conn, "SELECT count(*) FROM floor_tasks");
  if (PQresultStatus(r) != PGRES_TUPLES_OK) check(r, "count");
  long n = atol(PQgetvalue(r, 0, 0));
  PQclear(r);
  return n;
}

static double by_unnest(int n, int b, char *keys, char *pays) {
  fresh_tables();
  check(PQprepare(conn, "ins",
                  "WITH t AS (INSERT INTO floor_tasks (key, payload) SELECT k, p::json"
                  " FROM unnest($1::text[], $2::text[]) AS u(k, p) RETURNING id, key)"
                  " INSERT INTO floor_keys (queue, key, task_id) SELECT 'default', key, id FROM t",
                  2, NULL),
        "prepare");
  double t0 = now_s();
  for (int s = 0; s < n; s += b) {
    char *k = keys, *p = pays;
    *k++ = '{';
    *p++ = '{';
    for (int i = s; i < s + b && i < n; i++) {
      k += sprintf(k, "%sk%d", i > s ? "," : "", i);
      p += sprintf(p, "%s\"{\\\"n\\\":%d}\"", i > s ? "," : "", i);
    }
    strcpy(k, "}");
    strcpy(p, "}");
    const char *v[2] = {keys, pays};
    check(PQexecPrepared(conn, "ins", 2, v, NULL, NULL, 0), "unnest insert");
  }
  double rate = n / (now_s() - t0);
  exec("DEALLOCATE ins");
  return rate;
}

static double by_copy(int n, int b, int with_keys, char *buf) {
  fresh_tables();
  exec("DROP TABLE IF EXISTS pg_temp.floor_stage");
  exec("CREATE TEMP TABLE floor_stage (key text, payload json) ON COMMIT DELETE ROWS");
  const char *move = with_keys
      ? "WITH t AS (INSERT INTO floor_tasks (key, payload) SELECT key, payload FROM floor_stage RETURNING id, key)"
        " INSERT INTO floor_keys (queue, key, task_id) SELECT 'default', key, id FROM t"
      : "INSERT INTO floor_tasks (payload) SELECT payload FROM floor_stage";
  double t0 = now_s();
  for (int s = 0; s < n; s += b) {
    exec("BEGIN");
    PGresult *r = PQexec(conn, "COPY floor_stage (key, payload) FROM STDIN");
    if (PQresultStatus(r) != PGRES_COPY_IN) check(r, "COPY");
    PQclear(r);
    char *q = buf;
    for (int i = s; i < s + b && i < n; i++) q += sprintf(q, "k%d\t{\"n\":%d}\n", i, i);
    if (PQputCopyData(conn, buf, (int)(q - buf)) != 1 || PQputCopyEnd(conn, NULL) != 1) {
      fprintf(stderr, "bulk_floor: COPY: %s", PQerrorMessage(conn));
      exit(1);
    }
    check(PQgetResult(conn), "COPY end");
    exec(move);
    exec("COMMIT");
  }
  return n / (now_s() - t0);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bulk_floor URL [N=50000] [B=10000]\n");
    return 2;
  }
  int n = argc > 2 ? atoi(argv[2]) : 50000, b = argc > 3 ? atoi(argv[3]) : 10000;
  if (n <= 0 || b <= 0) {
    fprintf(stderr, "bulk_floor: N and B must be positive\n");
    return 2;
  }
  conn = PQconnectdb(argv[1]);
  if (PQstatus(conn) != CONNECTION_OK) {
    fprintf(stderr, "bulk_floor: connect: %s", PQerrorMessage(conn));
    return 1;
  }
  exec("SET client_min_messages = warning");
  char *keys = malloc((size_t)b * 24 + 2), *pays = malloc((size_t)b * 40 + 2), *buf = malloc((size_t)b * 40 + 1);
  if (!keys || !pays || !buf) return 1;

  double unnest = by_unnest(n, b, keys, pays);
  if (count_tasks() != n) { fprintf(stderr, "bulk_floor: unnest stored the wrong count\n"); return 1; }
  double copy = by_copy(n, b, 1, buf);
  if (count_tasks() != n) { fprintf(stderr, "bulk_floor: COPY stored the wrong count\n"); return 1; }
  double copy_nokeys = by_copy(n, b, 0, buf);
  if (count_tasks() != n) { fprintf(stderr, "bulk_floor: COPY (no keys) stored the wrong count\n"); return 1; }
  exec("DROP TABLE floor_tasks, floor_keys");

  printf("bulk floor (libpq)\tunnest INSERT per batch of %d, with keys table\t-\t-\t%.0f\n", b, unnest);
  printf("bulk floor (libpq)\tCOPY to stage + INSERT...SELECT per batch of %d, with keys table\t-\t-\t%.0f\n", b, copy);
  printf("bulk floor (libpq)\tCOPY to stage + INSERT...SELECT per batch of %d, no keys\t-\t-\t%.0f\n", b, copy_nokeys);
  free(keys);
  free(pays);
  free(buf);
  PQfinish(conn);
  return 0;
}
