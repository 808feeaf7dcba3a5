#include "postgres/connection.hpp"

#include <arpa/inet.h>
#include <fmt/format.h>

#include <cstring>
#include <thread>

namespace eoq::pg {

namespace {

// PostgreSQL's binary timestamps count microseconds from 2000-01-01 UTC.
constexpr std::int64_t kPgEpochOffsetUs = 946684800LL * 1000000LL;

std::uint64_t be64(const char* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return be64toh(v);
}

}  // namespace

std::int64_t Result::affected() const {
  const char* n = PQcmdTuples(r_.get());
  return (n && *n) ? std::stoll(n) : 0;
}

const char* Result::raw(int row, int col, int expect_len) const {
  if (expect_len >= 0 && PQgetlength(r_.get(), row, col) != expect_len)
    throw Error(fmt::format("eoq internal: column {} has {} bytes, expected {}", PQfname(r_.get(), col),
                            PQgetlength(r_.get(), row, col), expect_len));
  return PQgetvalue(r_.get(), row, col);
}

std::int64_t Result::i64(int row, int col) const { return static_cast<std::int64_t>(be64(raw(row, col, 8))); }

std::int32_t Result::i32(int row, int col) const {
  std::uint32_t v;
  std::memcpy(&v, raw(row, col, 4), 4);
  return static_cast<std::int32_t>(ntohl(v));
}

double Result::f64(int row, int col) const {
  std::uint64_t v = be64(raw(row, col, 8));
  double d;
  std::memcpy(&d, &v, 8);
  return d;
}

bool Result::boolean(int row, int col) const { return raw(row, col, 1)[0] != 0; }

std::vector<std::int64_t> Result::i64_array(int row, int col) const {
  // The binary array format: dimensions, a has-NULLs flag, the element type,
  // (length, lower bound) per dimension, then (byte length, value) per element.
  const auto len = static_cast<std::size_t>(PQgetlength(r_.get(), row, col));
  const char* p = PQgetvalue(r_.get(), row, col);
  auto i32_at = [&](std::size_t at) {
    std::uint32_t v;
    std::memcpy(&v, p + at, 4);
    return static_cast<std::int32_t>(ntohl(v));
  };
  auto bad = [&] { return Error(fmt::format("eoq internal: column {} is not a bigint[] of one dimension without NULLs",
                                            PQfname(r_.get(), col))); };
  if (len < 12) throw bad();
  const std::int32_t dims = i32_at(0);
  if (dims == 0) return {};
  if (dims != 1 || i32_at(4) != 0 || i32_at(8) != 20 || len < 20) throw bad();
  const auto n = static_cast<std::size_t>(i32_at(12));
  if (len != 20 + n * 12) throw bad();
  std::vector<std::int64_t> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (i32_at(20 + i * 12) != 8) throw bad();
    out[i] = static_cast<std::int64_t>(be64(p + 20 + i * 12 + 4));
  }
  return out;
}

std::string Result::text(int row, int col) const {
  return std::string(PQgetvalue(r_.get(), row, col), static_cast<std::size_t>(PQgetlength(r_.get(), row, col)));
}

TimePoint Result::time(int row, int col) const {
  return TimePoint(std::chrono::microseconds(i64(row, col) + kPgEpochOffsetUs));
}

std::optional<std::string> Result::opt_text(int row, int col) const {
  if (null(row, col)) return std::nullopt;
  return text(row, col);
}
std::optional<TimePoint> Result::opt_time(int row, int col) const {
  if (null(row, col)) return std::nullopt;
  return time(row, col);
}

bool is_transient_sqlstate(std::string_view s) noexcept {
  return s.starts_with("08") || s.starts_with("40") || s == "57P01" || s == "57P02" || s == "57P03" ||
         s == "53300" /* too many connections */ || s == "25P03" /* idle-in-transaction timeout */;
}

void throw_error(PGconn* conn, const PGresult* result, std::string_view statement) {
  const char* state = result ? PQresultErrorField(result, PG_DIAG_SQLSTATE) : nullptr;
  std::string sqlstate = state ? state : "";
  std::string message = result ? PQresultErrorMessage(result) : "";
  if (message.empty() && conn) message = PQerrorMessage(conn);
  while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
  bool lost = conn && PQstatus(conn) == CONNECTION_BAD;
  if (lost && sqlstate.empty()) sqlstate = "08006";  // libpq reports a dropped socket without a SQLSTATE
  std::string what = fmt::format("PostgreSQL error in {}: {}{}", statement, message,
                                 sqlstate.empty() ? "" : fmt::format(" (SQLSTATE {})", sqlstate));
  if (lost || is_transient_sqlstate(sqlstate)) throw TransientError(what, sqlstate, std::string(statement));
  throw DatabaseError(what, sqlstate, std::string(statement));
}

void check_conninfo(const std::string& conninfo, const char* field) {
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (!opts) {
    std::string why = err ? err : "cannot be parsed";
    if (err) PQfreemem(err);
    while (!why.empty() && why.back() == '\n') why.pop_back();
    throw InvalidArgument(field, why);
  }
  PQconninfoFree(opts);
}

Connection::Connection(const std::string& conninfo, const std::string& application_name, bool prepare,
                       bool generic_plans)
    : prepare_(prepare), generic_plans_(prepare && generic_plans) {
  const char* keys[] = {"dbname", "application_name", "fallback_application_name", nullptr};
  const char* values[] = {conninfo.c_str(), nullptr, application_name.c_str(), nullptr};
  // expand_dbname=1: the first dbname is the whole connection string.
  c_.reset(PQconnectdbParams(keys, values, 1));
  if (!c_) throw TransientError("PostgreSQL: out of memory while connecting", "08001", "connect");
  if (PQstatus(c_.get()) != CONNECTION_OK) {
    std::string m = PQerrorMessage(c_.get());
    while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
    // libpq hands no SQLSTATE for a refused connection, only the server's
    // words. Refusals that no retry can cure must not be retried (and hidden)
    // like a server that is down: match the server's English messages.
    auto has = [&](const char* text) { return m.find(text) != std::string::npos; };
    const char* refused = has("password authentication failed")          ? "28P01"
                          : has("database \"") && has("does not exist")  ? "3D000"
                          : has("role \"") && has("does not exist")      ? "28000"
                          : has("no pg_hba.conf entry") || has("authentication failed") ? "28000"
                                                                                         : nullptr;
    if (refused) throw DatabaseError("PostgreSQL refused the connection: " + m, refused, "connect");
    throw TransientError("cannot connect to PostgreSQL: " + m, "08001", "connect");
  }
}

// A statement whose best plan is the same for all parameter values (the claim:
// always the claim index, then the primary key) is still planned afresh on
// every call once the server's plan cache prefers custom plans, and it does
// for the claim: a generic LIMIT $2 is priced at a tenth of the table. That
// planning cost 0.4-0.8 ms of an idle claim's 1 ms. A generic plan is built
// from the statistics of its moment, though, and kept until they change:
// built on a table analyzed while empty it would scan and sort the whole table
// for every claim until the next ANALYZE. With sequential and bitmap scans
// off it can only walk the indexes in order, whatever the statistics said.
// Sorts stay allowed: with them off the completion's generic plan joined its
// thousand rows by a nested loop (a batch then took 60 ms instead of 10). JIT
// is off, since a plan priced with a disabled node passes 10^10 and would be
// compiled on every call (650 ms).
// The session settings change only between statements of different kinds and
// outside a transaction (a SET in one would be undone by its rollback), so a
// worker's connections, running claims and settlements, switch about never.
namespace {
constexpr const char* kGenericPlans =
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET enable_bitmapscan = off; "
    "SET jit = off";
constexpr const char* kDefaultPlans = "RESET plan_cache_mode; RESET enable_seqscan; RESET enable_bitmapscan; RESET jit";
}  // namespace

void Connection::plan_for(const Statement& st) {
  if (!generic_plans_ || st.generic == generic_now_ || PQtransactionStatus(c_.get()) != PQTRANS_IDLE) return;
  command(st.generic ? kGenericPlans : kDefaultPlans);
  generic_now_ = st.generic;
}

// Two round trips when the session was in generic mode: a BEGIN sent in the
// same query string would take the RESETs into its transaction, and a
// rollback would then undo them behind generic_now_'s back.
void Connection::begin() {
  if (generic_now_ && PQtransactionStatus(c_.get()) == PQTRANS_IDLE) {
    command(kDefaultPlans);
    generic_now_ = false;
  }
  command("BEGIN");
}

void Connection::prepare(const Statement& st) {
  plan_for(st);
  if (prepared_.contains(st.name)) return;
  Result r(PQprepare(c_.get(), st.name, st.sql.c_str(), 0, nullptr));
  if (PQresultStatus(r.get()) != PGRES_COMMAND_OK) throw_error(c_.get(), r.get(), st.name);
  prepared_.insert(st.name);
}

Result Connection::exec(const Statement& st, const std::vector<Param>& params) {
  if (!prepare_) return exec_params(st.sql, params, true, st.name);
  prepare(st);
  std::vector<const char*> values(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) values[i] = params[i] ? params[i]->c_str() : nullptr;
  Result r(PQexecPrepared(c_.get(), st.name, static_cast<int>(values.size()), values.data(), nullptr, nullptr, 1));
  auto s = PQresultStatus(r.get());
  if (s != PGRES_TUPLES_OK && s != PGRES_COMMAND_OK) throw_error(c_.get(), r.get(), st.name);
  return r;
}

Result Connection::exec(const Statement& st, const std::vector<Param>& params, const std::function<void()>& meanwhile) {
  if (prepare_) prepare(st);
  std::vector<const char*> values(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) values[i] = params[i] ? params[i]->c_str() : nullptr;
  const int n = static_cast<int>(values.size());
  const int sent = prepare_ ? PQsendQueryPrepared(c_.get(), st.name, n, values.data(), nullptr, nullptr, 1)
                            : PQsendQueryParams(c_.get(), st.sql.c_str(), n, nullptr, values.data(), nullptr, nullptr, 1);
  if (sent != 1) throw_error(c_.get(), nullptr, st.name);
  // Whatever happens meanwhile, the answer is read to its end: the connection
  // is then ready for the caller's ROLLBACK.
  auto drain = [&] {
    while (PGresult* rest = PQgetResult(c_.get())) PQclear(rest);
  };
  try {
    meanwhile();
  } catch (...) {
    drain();
    throw;
  }
  // As PQexecPrepared: an error that follows the answer (a commit-time one,
  // outside a transaction) is the outcome.
  Result r(PQgetResult(c_.get()));
  while (PGresult* rest = PQgetResult(c_.get())) {
    if (PQresultStatus(rest) == PGRES_FATAL_ERROR) r = Result(rest);
    else PQclear(rest);
  }
  auto s = PQresultStatus(r.get());
  if (s != PGRES_TUPLES_OK && s != PGRES_COMMAND_OK) throw_error(c_.get(), r.get(), st.name);
  return r;
}

Result Connection::exec_params(std::string_view sql, const std::vector<Param>& params, bool binary,
                               std::string_view label) {
  std::string text(sql);
  std::vector<const char*> values(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) values[i] = params[i] ? params[i]->c_str() : nullptr;
  Result r(PQexecParams(c_.get(), text.c_str(), static_cast<int>(values.size()), nullptr, values.data(), nullptr,
                        nullptr, binary ? 1 : 0));
  auto s = PQresultStatus(r.get());
  if (s != PGRES_TUPLES_OK && s != PGRES_COMMAND_OK) throw_error(c_.get(), r.get(), label);
  return r;
}

// Pipeline mode: every step is sent, then one sync, then the answers are read
// in order. After a failed step the server answers the rest "aborted" until
// the sync, so the first error is the one thrown. Every answer is read before
// leaving pipeline mode, so the connection is usable afterwards (for the
// caller's ROLLBACK) unless it broke.
std::vector<Result> Connection::pipeline(std::span<const Step> steps) {
  PGconn* c = c_.get();
  struct Sent {
    std::size_t step;
    bool parse;  // the cache's Parse of the step's text, before its execution
    std::string name;
  };
  std::vector<Sent> sent;
  sent.reserve(2 * steps.size());
  std::vector<const char*> values;
  std::string text;
  if (prepare_)  // once per connection, before the pipeline: PQprepare waits for its answer
    for (const Step& st : steps)
      if (st.st) prepare(*st.st);
  if (PQenterPipelineMode(c) != 1) throw_error(c, nullptr, "pipeline");
  auto leave = [&] {
    if (PQpipelineStatus(c) != PQ_PIPELINE_OFF && PQexitPipelineMode(c) != 1) {
      // Answers still unread: only a broken connection leaves them, and the caller discards it.
    }
  };
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const Step& st = steps[i];
    values.clear();
    if (st.params)
      for (const auto& p : *st.params) values.push_back(p ? p->c_str() : nullptr);
    const int n = static_cast<int>(values.size());
    const char* name = nullptr;
    std::string_view sql = st.st ? std::string_view(st.st->sql) : st.sql;
    if (prepare_ && st.st) {
      name = st.st->name;
    } else if (prepare_ && st.cache) {
      auto it = cached_.find(sql);
      if (it != cached_.end()) {
        name = it->second.c_str();
      } else if (cached_made_ < kCachedMax) {
        std::string fresh = "eoq_h" + std::to_string(cached_made_++);
        text.assign(sql);
        if (PQsendPrepare(c, fresh.c_str(), text.c_str(), 0, nullptr) != 1) {
          leave();
          throw_error(c, nullptr, st.label);
        }
        sent.push_back({i, true, fresh});
        name = sent.back().name.c_str();
      }
    }
    int ok;
    if (name) {
      ok = PQsendQueryPrepared(c, name, n, values.data(), nullptr, nullptr, st.binary ? 1 : 0);
    } else {
      text.assign(sql);
      ok = PQsendQueryParams(c, text.c_str(), n, nullptr, values.data(), nullptr, nullptr, st.binary ? 1 : 0);
    }
    if (ok != 1) {
      leave();
      throw_error(c, nullptr, st.label);
    }
    sent.push_back({i, false, {}});
  }
  if (PQpipelineSync(c) != 1) {
    leave();
    throw_error(c, nullptr, "pipeline sync");
  }
  std::vector<Result> out(steps.size());
  std::optional<std::size_t> failed;  // index into sent
  Result error;
  for (std::size_t k = 0; k < sent.size(); ++k) {
    Result r(PQgetResult(c));
    if (!r.get()) {  // the connection broke: nothing more will come
      failed = failed.value_or(k);
      break;
    }
    while (PGresult* rest = PQgetResult(c)) PQclear(rest);  // each answer ends with a null
    auto s = PQresultStatus(r.get());
    if (s == PGRES_TUPLES_OK || s == PGRES_COMMAND_OK) {
      if (sent[k].parse) cached_.emplace(std::string(steps[sent[k].step].sql), sent[k].name);
      else out[sent[k].step] = std::move(r);
    } else if (!failed) {
      failed = k;
      if (s == PGRES_FATAL_ERROR) error = std::move(r);
    }
  }
  if (PQstatus(c) == CONNECTION_OK) {
    for (;;) {  // the sync's answer
      Result r(PQgetResult(c));
      if (!r.get() || PQresultStatus(r.get()) == PGRES_PIPELINE_SYNC) break;
    }
  }
  leave();
  if (failed) {
    // A table under a cached statement changed its columns ("cached plan must
    // not change result type"): this transaction is lost, but the next one
    // prepares the text afresh rather than failing the same way until the
    // worker restarts.
    const Step& bad = steps[sent[*failed].step];
    const char* state = error.get() ? PQresultErrorField(error.get(), PG_DIAG_SQLSTATE) : nullptr;
    if (bad.cache && state && std::string_view(state) == "0A000")
      if (auto it = cached_.find(bad.sql); it != cached_.end()) cached_.erase(it);
    throw_error(c, error.get(), bad.label);
  }
  return out;
}

Result Connection::command(const char* sql) {
  Result r(PQexec(c_.get(), sql));
  auto s = PQresultStatus(r.get());
  if (s != PGRES_TUPLES_OK && s != PGRES_COMMAND_OK) throw_error(c_.get(), r.get(), sql);
  return r;
}

void Connection::copy_in(const char* sql, const std::function<bool(std::string&)>& next) {
  Result start(PQexec(c_.get(), sql));
  if (PQresultStatus(start.get()) != PGRES_COPY_IN) throw_error(c_.get(), start.get(), sql);
  try {
    std::string slice;
    for (bool more = true; more;) {
      slice.clear();
      more = next(slice);
      // PQputCopyData takes an int length: a large slice goes in parts.
      constexpr std::size_t kPart = 1 << 20;
      for (std::size_t at = 0; at < slice.size(); at += kPart) {
        auto n = std::min(kPart, slice.size() - at);
        if (PQputCopyData(c_.get(), slice.data() + at, static_cast<int>(n)) != 1) throw_error(c_.get(), nullptr, sql);
      }
    }
  } catch (...) {
    // Leave COPY IN, so the connection is not stuck in it: the server fails the
    // COPY (and its transaction), which the caller rolls back or drops.
    if (PQputCopyEnd(c_.get(), "eoq: the client stopped sending rows") == 1)
      while (PGresult* rest = PQgetResult(c_.get())) PQclear(rest);
    throw;
  }
  if (PQputCopyEnd(c_.get(), nullptr) != 1) throw_error(c_.get(), nullptr, sql);
  // The answer is read to its end before a failure is thrown, so the
  // connection is ready for the caller's ROLLBACK (TO SAVEPOINT).
  Result end(PQgetResult(c_.get()));
  while (PGresult* rest = PQgetResult(c_.get())) PQclear(rest);
  if (PQresultStatus(end.get()) != PGRES_COMMAND_OK) throw_error(c_.get(), end.get(), sql);
}

Pool::Pool(std::string conninfo, std::string application_name, int size, bool prepare, bool generic_plans)
    : conninfo_(std::move(conninfo)),
      application_name_(std::move(application_name)),
      size_(size),
      prepare_(prepare),
      generic_plans_(generic_plans) {}

Pool::~Pool() = default;

Pool::Borrowed Pool::acquire() {
  std::unique_lock lk(m_);
  cv_.wait(lk, [&] { return !idle_.empty() || open_ < size_; });
  if (!idle_.empty()) {
    auto c = std::move(idle_.back());
    idle_.pop_back();
    return Borrowed(this, std::move(c));
  }
  return open(lk, false);
}

Pool::Borrowed Pool::acquire_spare() {
  std::unique_lock lk(m_);
  if (idle_.size() >= 2) {
    auto c = std::move(idle_.front());
    idle_.erase(idle_.begin());
    return Borrowed(this, std::move(c), true);
  }
  if (open_ < size_) return open(lk, true);
  lk.unlock();
  return acquire();
}

// Called with lk held and open_ < size_; connects without it.
Pool::Borrowed Pool::open(std::unique_lock<std::mutex>& lk, bool spare) {
  ++open_;
  lk.unlock();
  try {
    return Borrowed(this, std::make_unique<Connection>(conninfo_, application_name_, prepare_, generic_plans_), spare);
  } catch (...) {
    lk.lock();
    --open_;
    cv_.notify_one();
    throw;
  }
}

void Pool::put(std::unique_ptr<Connection> c, bool spare) {
  std::lock_guard lk(m_);
  if (c && c->ok() && PQtransactionStatus(c->get()) == PQTRANS_IDLE) {
    if (spare) idle_.insert(idle_.begin(), std::move(c));
    else idle_.push_back(std::move(c));
  } else {
    c.reset();
    --open_;
  }
  cv_.notify_one();
}

namespace {
// One element of a text[] literal: quoted, `"` and `\` escaped; nullptr is NULL.
// An element can be a megabyte of JSON (a result): plain runs go in whole.
void append_array_element(std::string& out, const std::string* v) {
  if (!v) {
    out += "NULL";
    return;
  }
  out += '"';
  std::string_view rest(*v);
  for (;;) {
    std::size_t plain = 0;
    while (plain < rest.size() && rest[plain] != '"' && rest[plain] != '\\') ++plain;
    out.append(rest.substr(0, plain));
    if (plain == rest.size()) break;
    out += '\\';
    out += rest[plain];
    rest.remove_prefix(plain + 1);
  }
  out += '"';
}
}  // namespace

std::string text_array(const std::vector<Param>& items) {
  std::string out = "{";
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i) out += ',';
    append_array_element(out, items[i] ? &*items[i] : nullptr);
  }
  out += '}';
  return out;
}

std::string time_param(TimePoint t) { return std::to_string(t.time_since_epoch().count()); }

void sleep_backoff(int attempt) {
  std::this_thread::sleep_for(std::chrono::milliseconds(50) * (1 << std::min(attempt, 5)));
}

}  // namespace eoq::pg
