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
  int pid() const noexcept;
  const std::string& data_dir() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// $var when set and non-empty, otherwise a TempPostgres started now and kept
// until process exit. Returns the connection string either way.
std::string database_url_or_temp(const char* env_var);

}  // namespace eoq::testing
