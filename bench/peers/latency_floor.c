/* The floor of idle submit-to-start latency: what one libpq submitter and one libpq listener reach on this
   server with no queue library in the way. The submitter commits an INSERT and a pg_notify in one
   transaction; the listener, blocked in poll() on its LISTEN connection, wakes on the notification and
   claims the row with one UPDATE ... FOR UPDATE SKIP LOCKED RETURNING (its own commit). The clock runs from
   the submit call to the claimed row, on one monotonic clock (two threads of one process). Each sample is
   sent 2-5 ms after the previous one was claimed, as eoq's harness does.
   Usage: latency_floor URL [SAMPLES=1000]
   Prints one tab-separated row: system, config, drain, single, bulk ("-"), then p50, p99 and max ms.
   Build: gcc -O2 -pthread -o latency_floor latency_floor.c -I"$(pg_config --includedir)" -lpq */
#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int claimed;    /* samples the listener has claimed */
static int samples;
static double *started; /* per sample: when the submit call began */
static double *taken;   /* per sample: when its row came back claimed */
static const char *url;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static PGconn *connect_or_die(void) {
  PGconn *c = PQconnectdb(url);
  if (PQstatus(c) != CONNECTION_OK) {
    fprintf(stderr, "latency_floor: connect: %s", PQerrorMessage(c));
    exit(1);
  }
  return c;
}

static PGresult *must(PGconn *c, PGresult *r, const char *what) {
  ExecStatusType s = PQresultStatus(r);
  if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) {
    fprintf(stderr, "latency_floor: %s: %s", what, PQerrorMessage(c));
    exit(1);
  }
  return r;
}

static void *listener(void *arg) {
  PGconn *c = arg;
  while (claimed < samples) {
    /* A notification that arrived during the last claim is already in libpq's queue, not on the
       socket: look there before blocking. */
    if (!PQconsumeInput(c)) {
      fprintf(stderr, "latency_floor: listener: %s", PQerrorMessage(c));
      exit(1);
    }
    PGnotify *n;
    int woken = 0;
    while ((n = PQnotifies(c)) != NULL) {
      woken = 1;
      PQfreemem(n);
    }
    if (!woken) {
      struct pollfd p = {PQsocket(c), POLLIN, 0};
      poll(&p, 1, 1000);
      continue;
    }
    for (;;) {  /* every row there is: a notification may stand for more than one */
      PGresult *r = must(c, PQexec(c, "UPDATE lat_floor SET status = 1 WHERE id = (SELECT id FROM lat_floor "
                                      "WHERE status = 0 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"),
                         "claim");
      double at = now_s();
      int rows = PQntuples(r);
      int id = rows ? atoi(PQgetvalue(r, 0, 0)) : 0;
      PQclear(r);
      if (!rows) break;
      pthread_mutex_lock(&m);
      if (id >= 1 && id <= samples) taken[id - 1] = at;
      claimed++;
      pthread_cond_signal(&cv);
      pthread_mutex_unlock(&m);
    }
  }
  return NULL;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: latency_floor URL [SAMPLES=1000]\n");
    return 2;
  }
  url = argv[1];
  samples = argc > 2 ? atoi(argv[2]) : 1000;
  if (samples <= 0) {
    fprintf(stderr, "latency_floor: SAMPLES must be positive\n");
    return 2;
  }
  started = calloc((size_t)samples, sizeof(double));
  taken = calloc((size_t)samples, sizeof(double));
  double *lat = calloc((size_t)samples, sizeof(double));
  if (!started || !taken || !lat) return 1;
  PGconn *sub = connect_or_die(), *lis = connect_or_die();
  PQclear(must(sub, PQexec(sub, "SET client_min_messages = warning; DROP TABLE IF EXISTS lat_floor; "
                                "CREATE TABLE lat_floor (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                                "status int NOT NULL DEFAULT 0, payload json NOT NULL DEFAULT '{}')"),
               "create"));
  PQclear(must(lis, PQexec(lis, "LISTEN lat_floor"), "listen"));
  pthread_t t;
  if (pthread_create(&t, NULL, listener, lis) != 0) return 1;
  srand(1);
  for (int i = 0; i < samples; i++) {
    struct timespec gap = {0, (2 + rand() % 4) * 1000000L};
    nanosleep(&gap, NULL);
    started[i] = now_s();
    /* One simple query: one implicit transaction, one commit, the notification sent at commit. */
    PQclear(must(sub, PQexec(sub, "INSERT INTO lat_floor DEFAULT VALUES; SELECT pg_notify('lat_floor', '')"),
                 "submit"));
    pthread_mutex_lock(&m);
    while (claimed <= i) pthread_cond_wait(&cv, &m);
    pthread_mutex_unlock(&m);
  }
  pthread_join(t, NULL);
  for (int i = 0; i < samples; i++) lat[i] = (taken[i] - started[i]) * 1000.0;
  qsort(lat, (size_t)samples, sizeof(double), by_value);
  PQclear(must(sub, PQexec(sub, "DROP TABLE lat_floor"), "drop"));
  printf("latency floor (libpq)\tINSERT + NOTIFY; LISTEN, then one SKIP LOCKED claim (%d samples)\t-\t-\t-\t%.2f\t%.2f\t%.2f\n",
         samples, lat[samples / 2], lat[(int)(samples * 0.99)], lat[samples - 1]);
  PQfinish(sub);
  PQfinish(lis);
  free(started);
  free(taken);
  free(lat);
  return 0;
}
