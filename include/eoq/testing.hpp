#pragma once
// A throwaway PostgreSQL server for tests, examples and benchmarks: initdb into
// a temporary directory, start on a Unix socket (and 127.0.0.1 if asked), stop
// by pid and delete everything in the destructor. When run as root, the server
// runs as the `postgres` user (PostgreSQL refuses to run as root).
#include <memory>
#include <string>

namespace eoq::testing {

struct TempPostgresOptions {
  std::string bin_dir;        // empty: pg_config --bindir, then /usr/lib/postgresql/<ver>/bin
  std::string parent_dir;     // empty: $TMPDIR or /tmp
  bool listen_tcp = false;    // also listen on 127.0.0.1 (a free port is chosen)
  bool fsync = true;          // false for fast unit tests; benchmarks keep it on
  int max_connections = 200;
  std::string extra_config;   // appended to postgresql.conf
  // Start as a streaming hot standby of the server at this connection string
  // (pg_basebackup of it, then standby.signal): read-only until promote(). It
  // connects as `standby_name`, the name synchronous_standby_names lists.
  std::string standby_of{};
  std::string standby_name = "standby1";
};

class TempPostgres {
 public:
  explicit TempPostgres(TempPostgresOptions options = {});
  ~TempPostgres();  // stops the server (by pid) and removes its directory
  TempPostgres(const TempPostgres&) = delete;
  TempPostgres& operator=(const TempPostgres&) = delete;

  // libpq connection string for the `postgres` database as the `postgres` user:
  // over 127.0.0.1 when listen_tcp is set, else over the Unix socket.
  const std::string& conninfo() const noexcept;
  // Creates a fresh database and returns its connection string.
  std::string create_database(const std::string& name);
  // Stops and starts the server again (same data, same address).
  void restart();
  void stop();
  // Stops the server like a power cut would (immediate shutdown, SIGQUIT: no
  // checkpoint, open transactions never finish); a restart recovers from WAL.
  void stop_immediate();
  // A standby becomes a primary (pg_promote, waiting until it accepts writes).
  void promote();
  int port() const noexcept;
  int pid() const noexcept;
  const std::string& data_dir() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// PgBouncer in front of a server, for tests and benchmarks of pooled
// connections: a config in a temporary directory, listening on 127.0.0.1 (a
// free port) only, run as the `postgres` user when we are root, stopped by pid.
struct TempPgBouncerOptions {
  std::string binary;         // empty: find_binary()
  std::string parent_dir;     // empty: $TMPDIR or /tmp
  std::string pool_mode = "transaction";
  int pool_size = 20;         // server connections per database and user
  int max_client_conn = 1000;
};

class TempPgBouncer {
 public:
  // Serves every database of the server at `server_conninfo` (its host, port
  // and user; trust authentication, as TempPostgres sets up).
  explicit TempPgBouncer(const std::string& server_conninfo, TempPgBouncerOptions options = {});
  ~TempPgBouncer();  // stops it (by pid) and removes its directory
  TempPgBouncer(const TempPgBouncer&) = delete;
  TempPgBouncer& operator=(const TempPgBouncer&) = delete;

  // The server's connection string with host and port replaced by PgBouncer's.
  const std::string& conninfo() const noexcept;
  int pid() const noexcept;
  const std::string& directory() const noexcept;  // its config and log
  void stop();
  // The pgbouncer program: on PATH, or /usr/sbin/pgbouncer (Debian's). Empty when not installed.
  static std::string find_binary();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// $var when set and non-empty, otherwise a TempPostgres started now and kept
// until process exit. Returns the connection string either way.
std::string database_url_or_temp(const char* env_var);

}  // namespace eoq::testing
