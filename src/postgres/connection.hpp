#pragma once
// libpq ownership, binary row decoding, error classification and a small pool.
// Nothing here knows about tasks.
#include <eoq/errors.hpp>
#include <eoq/task.hpp>

#include <libpq-fe.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace eoq::pg {

struct ConnDeleter {
  void operator()(PGconn* c) const noexcept { PQfinish(c); }
};
struct ResultDeleter {
  void operator()(PGresult* r) const noexcept { PQclear(r); }
};
using ConnPtr = std::unique_ptr<PGconn, ConnDeleter>;

// A statement prepared once per connection under its name. `generic`: its
// plan does not depend on its parameters' values (queries.sql says `-- plan:
// generic`), so on a connection that allows it the server may skip planning it.
struct Statement {
  const char* name;
  std::string sql;
  bool generic = false;
};

// Text-format parameters; an empty optional is SQL NULL.
using Param = std::optional<std::string>;

// One statement of Connection::pipeline: a Statement of queries.sql (prepared
// where the connection prepares), or text (handler SQL, BEGIN, SET LOCAL ...)
// sent unnamed, or under a name of the connection's statement cache when
// `cache` is set and the connection prepares.
struct Step {
  const Statement* st = nullptr;
  std::string_view sql{};
  const std::vector<Param>* params = nullptr;
  bool binary = true;
  bool cache = false;
  std::string_view label{};
};

// A query result in binary format (see decode helpers), or text for handler SQL.
class Result {
 public:
  Result() = default;
  explicit Result(PGresult* r) : r_(r) {}
  PGresult* get() const noexcept { return r_.get(); }
  int rows() const noexcept { return PQntuples(r_.get()); }
  int columns() const noexcept { return PQnfields(r_.get()); }
  bool null(int row, int col) const noexcept { return PQgetisnull(r_.get(), row, col) != 0; }
  std::int64_t affected() const;

  // Binary decoders; the column's SQL type must match.
  std::int64_t i64(int row, int col) const;
  std::int32_t i32(int row, int col) const;
  double f64(int row, int col) const;
  bool boolean(int row, int col) const;
  std::string text(int row, int col) const;
  TimePoint time(int row, int col) const;     // timestamptz: microseconds since 2000-01-01
  std::vector<std::int64_t> i64_array(int row, int col) const;  // bigint[] of one dimension, no NULLs
  std::optional<std::string> opt_text(int row, int col) const;
  std::optional<TimePoint> opt_time(int row, int col) const;

 private:
  const char* raw(int row, int col, int expect_len) const;
  std::unique_ptr<PGresult, ResultDeleter> r_;
};

// SQLSTATE classes a caller may retry after: connection exceptions (08),
// operator intervention (57: shutdown, cannot connect now), rollbacks (40:
// serialization failure, deadlock).
bool is_transient_sqlstate(std::string_view sqlstate) noexcept;

// Throws the matching eoq error for a failed result (or a dead connection).
[[noreturn]] void throw_error(PGconn* conn, const PGresult* result, std::string_view statement);

// Throws InvalidArgument(field, libpq's reason) for a string libpq cannot
// parse, so it is reported as bad input when the store is made, not later as
// an outage.
void check_conninfo(const std::string& conninfo, const char* field = "conninfo");

class Connection {
 public:
  // `conninfo` as passed by check_conninfo. prepare: statements are prepared
  // once under their names; otherwise each call sends its text unnamed (for
  // transaction-pooling proxies). generic_plans: outside transactions, run
  // Statement::generic ones under plan_cache_mode = force_generic_plan with
  // sequential and bitmap scans and JIT off, the others and every transaction
  // (begin()) under the session's defaults; only for connections that never
  // carry a caller's SQL.
  Connection(const std::string& conninfo, const std::string& application_name, bool prepare = true,
             bool generic_plans = false);
  PGconn* get() const noexcept { return c_.get(); }
  bool ok() const noexcept { return PQstatus(c_.get()) == CONNECTION_OK; }

  // Prepared (once per connection) and executed with binary results.
  Result exec(const Statement& st, const std::vector<Param>& params);
  // The same, running `meanwhile` on this thread while the server works: for
  // client work that does not need the answer (and must not use this connection).
  Result exec(const Statement& st, const std::vector<Param>& params, const std::function<void()>& meanwhile);
  // Unnamed statement; `binary` selects the result format.
  Result exec_params(std::string_view sql, const std::vector<Param>& params, bool binary,
                     std::string_view label);
  // The steps in libpq's pipeline mode, behind one sync: one round trip for
  // all. Answers each step's result; throws the first step's error that
  // failed (the server skips the steps after it, and an open transaction is
  // left aborted for the caller's ROLLBACK).
  std::vector<Result> pipeline(std::span<const Step> steps);
  // Simple query, no parameters (COMMIT, SET ...; several statements allowed):
  // the last statement's answer, in text format.
  Result command(const char* sql);
  // BEGIN, with the session's own plan settings back first: plan_for cannot
  // switch inside a transaction, and a transaction may run statements of
  // either kind.
  void begin();
  // COPY ... FROM STDIN; `next` appends the next slice of the data, in the
  // COPY's format, to the (empty) string it is given and answers whether more
  // follows. Each slice is sent as it is made, so the server parses one while
  // the caller makes the next.
  void copy_in(const char* sql, const std::function<bool(std::string&)>& next);

 private:
  void plan_for(const Statement& st);
  void prepare(const Statement& st);  // plan_for, and PQprepare once per connection
  ConnPtr c_;
  bool prepare_ = true;
  bool generic_plans_ = false;
  bool generic_now_ = false;  // the session runs under plan_for's generic settings
  std::unordered_set<std::string> prepared_;
  // Handler SQL prepared on this connection, by text: parsed once per
  // connection, and planned once the server's plan cache settles on a generic
  // plan, instead of on every call. Bounded: past kCachedMax names made (a
  // handler that formats values into its SQL), the rest go unnamed.
  static constexpr std::size_t kCachedMax = 256;
  struct TextHash {  // finds a text without copying it into a std::string
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, std::string, TextHash, std::equal_to<>> cached_;
  std::size_t cached_made_ = 0;  // names are never reused: a dropped entry's statement stays on the server
};

// Connections kept open for reuse; callers beyond `size` wait. A connection
// that broke is dropped instead of returned.
class Pool {
 public:
  Pool(std::string conninfo, std::string application_name, int size, bool prepare = true, bool generic_plans = false);
  ~Pool();

  class Borrowed {
   public:
    Borrowed(Pool* pool, std::unique_ptr<Connection> c, bool spare = false)
        : pool_(pool), c_(std::move(c)), spare_(spare) {}
    Borrowed(Borrowed&& o) noexcept
        : pool_(std::exchange(o.pool_, nullptr)), c_(std::move(o.c_)), spare_(o.spare_) {}
    // Returns (or frees the slot of) the connection held, then holds o's.
    Borrowed& operator=(Borrowed&& o) noexcept {
      if (this != &o) {
        if (pool_) pool_->put(std::move(c_), spare_);
        pool_ = std::exchange(o.pool_, nullptr);
        c_ = std::move(o.c_);
        spare_ = o.spare_;
      }
      return *this;
    }
    // Returns the connection, or after discard() frees its slot.
    ~Borrowed() {
      if (pool_) pool_->put(std::move(c_), spare_);
    }
    Connection& operator*() const noexcept { return *c_; }
    Connection* operator->() const noexcept { return c_.get(); }
    Connection* get() const noexcept { return c_.get(); }  // null after discard()
    // Closes the connection instead of returning it (after an error that may
    // have left it in an unknown state).
    void discard() noexcept { c_.reset(); }

   private:
    Pool* pool_;
    std::unique_ptr<Connection> c_;
    bool spare_;
  };

  // The most recently returned connection: the warmest (its statements
  // prepared, its session's temporary stage made).
  Borrowed acquire();
  // For work in the background: a connection the foreground's next acquire()
  // will not want. The longest idle when another is idle too, else a new one
  // while the pool has room, and either goes back at the cold end; else what
  // acquire() would give, which goes back where acquire()'s do. (Taking the
  // warm one made the next submit_batch open a connection, make its stage and
  // plan its insert again.)
  Borrowed acquire_spare();
  const std::string& conninfo() const noexcept { return conninfo_; }

 private:
  void put(std::unique_ptr<Connection> c, bool spare);
  Borrowed open(std::unique_lock<std::mutex>& lk, bool spare);
  std::string conninfo_, application_name_;
  int size_;
  bool prepare_, generic_plans_;
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Connection>> idle_;
  int open_ = 0;
};

// Runs f(connection) and retries transient failures up to `retries` times with
// backoff, on a fresh connection each time. `retried` is set when a retry
// happened, so a caller can tell "my first try may have applied" apart.
template <class F>
auto with_retry(Pool& pool, int retries, F&& f, bool* retried = nullptr) -> decltype(f(std::declval<Connection&>()));

// Rows in COPY's binary format (COPY ... FROM STDIN (FORMAT binary)), appended
// to a slice for Connection::copy_in. Each field's bytes must be what the
// column's type receives in binary: the server rejects the COPY otherwise.
// Inline: a batch of 10,000 tasks writes 150,000 fields.
class BinaryCopy {
 public:
  // The file header, before the first row.
  static void header(std::string& out) {
    out.append("PGCOPY\n\377\r\n\0", 11);
    be32(out, 0);  // flags: no OIDs
    be32(out, 0);  // no header extension
  }
  // The trailer, after the last row.
  static void trailer(std::string& out) { be16(out, 0xffff); }
  // A row of `fields` fields, appended one by one below.
  static void row(std::string& out, std::uint16_t fields) { be16(out, fields); }
  static void null(std::string& out) { be32(out, 0xffffffff); }
  static void text(std::string& out, std::string_view v) {  // text and json alike
    be32(out, static_cast<std::uint32_t>(v.size()));
    out.append(v);
  }
  static void opt_text(std::string& out, const std::optional<std::string>& v) {
    if (v) text(out, *v);
    else null(out);
  }
  static void i32(std::string& out, std::int32_t v) {
    be32(out, 4);
    be32(out, static_cast<std::uint32_t>(v));
  }
  static void i64(std::string& out, std::int64_t v) {
    be32(out, 8);
    be64(out, static_cast<std::uint64_t>(v));
  }
  static void f64(std::string& out, double v) {
    std::uint64_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    be32(out, 8);
    be64(out, bits);
  }
  // timestamptz: microseconds since 2000-01-01.
  static void time(std::string& out, const std::optional<TimePoint>& t) {
    if (t) i64(out, t->time_since_epoch().count() - kPgEpochOffsetUs);
    else null(out);
  }

 private:
  static constexpr std::int64_t kPgEpochOffsetUs = 946684800LL * 1000000LL;
  static void be16(std::string& out, std::uint16_t v) {
    const char b[2] = {static_cast<char>(v >> 8), static_cast<char>(v)};
    out.append(b, 2);
  }
  static void be32(std::string& out, std::uint32_t v) {
    const char b[4] = {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                       static_cast<char>(v)};
    out.append(b, 4);
  }
  static void be64(std::string& out, std::uint64_t v) {
    be32(out, static_cast<std::uint32_t>(v >> 32));
    be32(out, static_cast<std::uint32_t>(v));
  }
};

// Bracketed text array literal for text parameters ({"a","b",NULL}).
std::string text_array(const std::vector<Param>& items);
std::string time_param(TimePoint t);  // microseconds since the Unix epoch, as text

void sleep_backoff(int attempt);

template <class F>
auto with_retry(Pool& pool, int retries, F&& f, bool* retried) -> decltype(f(std::declval<Connection&>())) {
  for (int attempt = 0;; ++attempt) {
    try {
      auto conn = pool.acquire();
      try {
        return f(*conn);
      } catch (const TransientError&) {
        conn.discard();
        throw;
      }
    } catch (const CommitInDoubt&) {
      throw;  // repeating could apply the change twice: the caller decides
    } catch (const TransientError&) {
      if (attempt >= retries) throw;
      if (retried) *retried = true;
      sleep_backoff(attempt);
    }
  }
}

}  // namespace eoq::pg
