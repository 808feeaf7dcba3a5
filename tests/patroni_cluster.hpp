#pragma once
// A throwaway Patroni cluster for the high-availability tests (tests/ha_test.cpp):
// one etcd and N PostgreSQL nodes, each under its own Patroni, on 127.0.0.1 only,
// in a fresh temporary directory, with ports chosen free at run time.
//
//   synchronous_mode: true        a commit returns once the sync standby has it
//   ttl 10 s, loop_wait 1 s,      a failover in seconds, not the defaults' half minute
//   retry_timeout 3 s
//   primary_start_timeout: 0      a crashed primary fails over instead of restarting in place
//   use_pg_rewind, wal_log_hints  the old primary rejoins as a replica
//
// Everything runs as the `postgres` user when we are root (PostgreSQL refuses
// root), in a session of its own, with SIGTERM as its parent-death signal (a
// test process that dies takes its Patroni nodes and etcd with it); every
// process is stopped by its pid. Patroni starts each postmaster detached, so
// the test process becomes a child subreaper for the cluster's lifetime and
// reaps the `postgres` user's orphans that land on it (a container's init may
// never reap them, and Patroni would take a zombie postmaster for a running one).
//
// Needs /usr/bin/patroni, /usr/bin/patronictl, /usr/bin/etcd (Debian: patroni,
// etcd-server) and PostgreSQL's binaries (/usr/lib/postgresql/<ver>/bin).
#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace eoq::test {

struct PatroniOptions {
  int nodes = 2;
  int ttl = 10;
  int loop_wait = 1;
  int retry_timeout = 3;
  // Where the etcd and Patroni logs go (Patroni's log includes its postmaster's
  // stderr); empty: the cluster's temporary directory, removed with it.
  std::string log_dir{};
  // PostgreSQL's bin directory; empty: pg_config --bindir, else the newest
  // /usr/lib/postgresql/<ver>/bin.
  std::string bin_dir{};
  // Extra `name: value` lines for bootstrap.dcs.postgresql.parameters.
  std::vector<std::string> parameters{};
};

class PatroniCluster {
 public:
  // Starts etcd, bootstraps node 0, then the replicas; returns once one node
  // leads and every other streams from it, one of them synchronous.
  explicit PatroniCluster(PatroniOptions options = {});
  ~PatroniCluster();  // stops every Patroni, postmaster and etcd by pid; removes the directory
  PatroniCluster(const PatroniCluster&) = delete;
  PatroniCluster& operator=(const PatroniCluster&) = delete;

  int nodes() const noexcept;
  std::string name(int node) const;  // "n0", "n1", ...
  // Every node in one libpq connection string, target_session_attrs=read-write:
  // libpq tries them in order and keeps the one that takes writes.
  std::string conninfo(int connect_timeout_s = 3) const;
  std::string node_conninfo(int node) const;  // one node, over TCP
  int pg_port(int node) const;
  int rest_port(int node) const;
  const std::string& directory() const noexcept;
  // The connection strings of the doc: the same as conninfo() but as a URL.
  std::string url() const;

  // Patroni's REST API on `node`: the HTTP status of GET `path` (0 when the
  // node does not answer). /primary answers 200 on the leader, /sync on the
  // synchronous standby, /replica on a running replica.
  int rest_status(int node, const std::string& path) const;
  // The node whose Patroni answers /primary with 200, or -1.
  int leader() const;
  // The node Patroni lists as synchronous standby (/sync), or -1.
  int sync_standby() const;
  // Waits until one node leads, takes writes, and (when more than one Patroni
  // runs) another is its synchronous standby streaming from it; returns the
  // leader. Throws after `timeout`.
  int wait_healthy(std::chrono::milliseconds timeout = std::chrono::seconds(120)) const;
  // Waits until a node other than `old_leader` leads and takes writes.
  int wait_new_leader(int old_leader, std::chrono::milliseconds timeout = std::chrono::seconds(60)) const;

  // The faults. Each acts on one process, by pid.
  int postmaster_pid(int node) const;  // from postmaster.pid; -1 when not running
  std::vector<int> walsender_pids(int node) const;  // a primary's WAL senders (pg_stat_replication)
  int patroni_pid(int node) const;     // -1 when stopped
  void kill_postmaster(int node);      // SIGKILL to the postmaster (Patroni keeps running)
  void stop_patroni(int node);         // SIGTERM to Patroni: it stops its PostgreSQL and exits; waits for that
  void signal_patroni(int node, int signal);  // only sends the signal
  void wait_patroni_exit(int node);           // waits (60 s) for Patroni to exit; SIGKILL after that
  void start_patroni(int node);        // starts Patroni on the node's existing data again
  // patronictl switchover --leader <leader> --candidate <to> --force; returns
  // patronictl's output, throws when it fails. Safe to run on another thread
  // while this one watches leader() (nothing else may run meanwhile).
  std::string switchover(int to);
  // patronictl list, for logs.
  std::string list() const;
  // The text of the node's Patroni log (with its postmaster's output).
  std::string log(int node) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace eoq::test
