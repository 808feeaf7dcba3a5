// The history checker of the chaos tests: see history.hpp.
#include "history.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <exception>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <type_traits>

namespace eoq::test::history {

namespace {

constexpr std::pair<Kind, std::string_view> kKinds[] = {
    {Kind::submit, "submit"},   {Kind::claim, "claim"},   {Kind::heartbeat, "heartbeat"}, {Kind::effect, "effect"},
    {Kind::complete, "complete"}, {Kind::fail, "fail"},   {Kind::release, "release"},     {Kind::expire, "expire"},
    {Kind::cancel, "cancel"},   {Kind::final, "final"},   {Kind::start, "start"},       {Kind::parent, "parent"},
    {Kind::end, "end"},         {Kind::limit, "limit"},
};

constexpr std::pair<ViolationKind, std::string_view> kViolations[] = {
    {ViolationKind::lost_task, "lost_task"},
    {ViolationKind::double_effect, "double_effect"},
    {ViolationKind::missing_effect, "missing_effect"},
    {ViolationKind::orphan_effect, "orphan_effect"},
    {ViolationKind::effect_version, "effect_version"},
    {ViolationKind::double_completion, "double_completion"},
    {ViolationKind::stale_completion, "stale_completion"},
    {ViolationKind::completion_not_recorded, "completion_not_recorded"},
    {ViolationKind::stale_lease, "stale_lease"},
    {ViolationKind::lease_overlap, "lease_overlap"},
    {ViolationKind::attempts_exceeded, "attempts_exceeded"},
    {ViolationKind::duplicate_key, "duplicate_key"},
    {ViolationKind::started_after_deadline, "started_after_deadline"},
    {ViolationKind::dependent_started_early, "dependent_started_early"},
    {ViolationKind::dependent_ran_after_failed_parent, "dependent_ran_after_failed_parent"},
    {ViolationKind::limit_exceeded, "limit_exceeded"},
};

// ------------------------------------------------------------ line format

std::string encode(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (c <= 0x20 || c == '%' || c == '=' || c == 0x7f)
      out += fmt::format("%{:02X}", static_cast<unsigned>(c));
    else
      out += static_cast<char>(c);
  }
  return out;
}

int hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string decode(std::string_view s, std::size_t line) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out += s[i];
      continue;
    }
    int hi = i + 1 < s.size() ? hex(s[i + 1]) : -1, lo = i + 2 < s.size() ? hex(s[i + 2]) : -1;
    if (hi < 0 || lo < 0) throw std::runtime_error(fmt::format("line {}: bad %-escape in '{}'", line, s));
    out += static_cast<char>(hi * 16 + lo);
    i += 2;
  }
  return out;
}

template <class Int>
Int parse_int(std::string_view v, std::string_view field, std::size_t line) {
  Int out{};
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || p != v.data() + v.size() || v.empty())
    throw std::runtime_error(fmt::format("line {}: {}={} is not an integer", line, field, v));
  return out;
}

Event parse_line(std::string_view text, std::size_t line) {
  std::vector<std::string_view> words;
  std::size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && (text[i] == ' ' || text[i] == '\t' || text[i] == '\r')) ++i;
    std::size_t j = i;
    while (j < text.size() && text[j] != ' ' && text[j] != '\t' && text[j] != '\r') ++j;
    if (j > i) words.push_back(text.substr(i, j - i));
    i = j;
  }
  Event e;
  auto kind = parse_kind(words.at(0));
  if (!kind) throw std::runtime_error(fmt::format("line {}: unknown event kind '{}'", line, words[0]));
  e.kind = *kind;
  bool has_task = false;
  for (std::size_t w = 1; w < words.size(); ++w) {
    auto eq = words[w].find('=');
    if (eq == std::string_view::npos)
      throw std::runtime_error(fmt::format("line {}: '{}' is not name=value", line, words[w]));
    auto name = words[w].substr(0, eq);
    auto raw = words[w].substr(eq + 1);
    auto value = decode(raw, line);
    if (name == "task") {
      e.task = parse_int<TaskId>(value, name, line);
      has_task = true;
    } else if (name == "version") {
      e.version = parse_int<std::int64_t>(value, name, line);
    } else if (name == "owner") {
      e.owner = value;
    } else if (name == "key") {
      e.key = value;
    } else if (name == "origin") {
      if (value == "client") e.origin = Origin::client;
      else if (value == "db") e.origin = Origin::db;
      else throw std::runtime_error(fmt::format("line {}: origin must be client or db, not '{}'", line, value));
    } else if (name == "ok") {
      if (value == "1" || value == "true") e.ok = true;
      else if (value == "0" || value == "false") e.ok = false;
      else throw std::runtime_error(fmt::format("line {}: ok must be 1, 0, true or false, not '{}'", line, value));
    } else if (name == "client") {
      e.client_us = parse_int<std::int64_t>(value, name, line);
    } else if (name == "db") {
      e.db_us = parse_int<std::int64_t>(value, name, line);
    } else if (name == "until") {
      e.until_us = parse_int<std::int64_t>(value, name, line);
    } else if (name == "status") {
      e.status = value;
    } else if (name == "attempt") {
      e.attempt = parse_int<int>(value, name, line);
    } else if (name == "max_attempts") {
      e.max_attempts = parse_int<int>(value, name, line);
    } else if (name == "deadline") {
      e.deadline_us = parse_int<std::int64_t>(value, name, line);
    } else if (name == "parent") {
      e.parent = parse_int<TaskId>(value, name, line);
    } else if (name == "queue") {
      e.queue = value;
    } else if (name == "partition") {
      e.partition = value;
    } else if (name == "per_partition") {
      if (value == "1" || value == "true") e.per_partition = true;
      else if (value == "0" || value == "false") e.per_partition = false;
      else throw std::runtime_error(fmt::format("line {}: per_partition must be 1, 0, true or false, not '{}'", line, value));
    } else if (name == "concurrency") {
      e.concurrency = parse_int<int>(value, name, line);
    } else {
      throw std::runtime_error(fmt::format("line {}: unknown field '{}'", line, name));
    }
  }
  if (e.kind == Kind::limit) {
    if (e.queue.empty()) throw std::runtime_error(fmt::format("line {}: a limit needs queue=", line));
    if (e.per_partition && !e.partition.empty())
      throw std::runtime_error(fmt::format("line {}: a limit names one partition or per_partition=1, not both", line));
  } else if (!has_task) {
    throw std::runtime_error(fmt::format("line {}: task= is missing", line));
  }
  return e;
}

// ------------------------------------------------------------ Postgres

void check_ident(const std::string& s, const char* what) {
  bool ok = !s.empty() && s.size() <= 63 && ((s[0] >= 'a' && s[0] <= 'z') || s[0] == '_');
  for (char c : s) ok = ok && ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_');
  if (!ok) throw std::invalid_argument(fmt::format("load_postgres: {} '{}' must match [a-z_][a-z0-9_]*", what, s));
}

struct PgResult {
  PGresult* r = nullptr;
  PgResult() = default;
  PgResult(const PgResult&) = delete;
  PgResult& operator=(const PgResult&) = delete;
  ~PgResult() { PQclear(r); }
  int rows() const { return PQntuples(r); }
  bool null(int i, int c) const { return PQgetisnull(r, i, c) != 0; }
  std::string text(int i, int c) const { return PQgetvalue(r, i, c); }
  std::int64_t i64(int i, int c) const { return std::stoll(text(i, c)); }
  std::optional<std::int64_t> opt(int i, int c) const {
    if (null(i, c)) return std::nullopt;
    return i64(i, c);
  }
};

std::unique_ptr<PgResult> query(PGconn* conn, const std::string& sql, std::string* sqlstate = nullptr) {
  auto r = std::make_unique<PgResult>();
  r->r = PQexec(conn, sql.c_str());
  if (PQresultStatus(r->r) != PGRES_TUPLES_OK) {
    const char* st = PQresultErrorField(r->r, PG_DIAG_SQLSTATE);
    if (sqlstate) {
      *sqlstate = st ? st : "";
      return nullptr;
    }
    throw std::runtime_error(fmt::format("load_postgres: {}", PQerrorMessage(conn)));
  }
  return r;
}

#define US(col) "floor(extract(epoch FROM " col ") * 1000000)::bigint"

// ------------------------------------------------------------ verify helpers

bool is_terminal_status(std::string_view s) {
  return s == "succeeded" || s == "failed" || s == "cancelled" || s == "expired";
}

std::string ms(std::int64_t us) { return fmt::format("{:.6f} s", static_cast<double>(us) / 1e6); }

struct Lease {
  std::optional<std::int64_t> start;   // claim's database time
  std::optional<std::int64_t> until;   // latest known lease_expires_at
  std::optional<std::int64_t> ended;   // earliest database time of what ended it
  std::string_view ended_by;           // the kind of that event
  // For the limits: the claim's commit is bounded above by the client's clock
  // once claim() returned, and below by its database time; the lease's first
  // expiry is the claim's.
  std::optional<std::int64_t> claim_returned, claim_db, first_until;
};

// A lease while it surely ran, for the limits (history.hpp).
struct Run {
  TaskId task = 0;
  std::int64_t version = 0, start = 0, end = 0;
  const std::string* queue = nullptr;
  const std::string* partition = nullptr;
};

template <class T>
void keep_min(std::optional<T>& at, T t) {
  if (!at || t < *at) at = t;
}
template <class T>
void keep_max(std::optional<T>& at, T t) {
  if (!at || t > *at) at = t;
}

}  // namespace

std::string_view to_string(Kind k) noexcept {
  for (auto& [kind, name] : kKinds)
    if (kind == k) return name;
  return "?";
}

std::optional<Kind> parse_kind(std::string_view name) noexcept {
  for (auto& [kind, n] : kKinds)
    if (n == name) return kind;
  return std::nullopt;
}

std::string_view to_string(ViolationKind k) noexcept {
  for (auto& [kind, name] : kViolations)
    if (kind == k) return name;
  return "?";
}

std::string to_line(const Event& e) {
  std::string s(to_string(e.kind));
  if (e.kind != Kind::limit || e.task) s += fmt::format(" task={}", e.task);
  if (e.version) s += fmt::format(" version={}", e.version);
  if (!e.owner.empty()) s += " owner=" + encode(e.owner);
  if (!e.key.empty()) s += " key=" + encode(e.key);
  s += e.origin == Origin::db ? " origin=db" : " origin=client";
  if (!e.ok) s += " ok=0";
  if (e.client_us) s += fmt::format(" client={}", *e.client_us);
  if (e.db_us) s += fmt::format(" db={}", *e.db_us);
  if (e.until_us) s += fmt::format(" until={}", *e.until_us);
  if (!e.status.empty()) s += " status=" + encode(e.status);
  if (e.attempt) s += fmt::format(" attempt={}", e.attempt);
  if (e.max_attempts) s += fmt::format(" max_attempts={}", e.max_attempts);
  if (e.deadline_us) s += fmt::format(" deadline={}", *e.deadline_us);
  if (e.parent) s += fmt::format(" parent={}", e.parent);
  if (!e.queue.empty()) s += " queue=" + encode(e.queue);
  if (!e.partition.empty()) s += " partition=" + encode(e.partition);
  if (e.per_partition) s += " per_partition=1";
  if (e.concurrency) s += fmt::format(" concurrency={}", *e.concurrency);
  return s;
}

std::vector<Event> parse(std::istream& in) {
  std::vector<Event> out;
  std::string line;
  std::size_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos || line[first] == '#') continue;
    out.push_back(parse_line(line, n));
  }
  return out;
}

std::vector<Event> parse(std::string_view text) {
  std::istringstream in{std::string(text)};
  return parse(in);
}

std::vector<Event> load_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open history file " + path);
  return parse(in);
}

void save_file(const std::string& path, const std::vector<Event>& events) {
  std::ofstream out(path, std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write history file " + path);
  for (const auto& e : events) out << to_line(e) << '\n';
  if (!out.flush()) throw std::runtime_error("cannot write history file " + path);
}

Recorder::Recorder(const std::string& path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) throw std::runtime_error(fmt::format("cannot open history file {}: {}", path, std::strerror(errno)));
}

Recorder::~Recorder() {
  if (fd_ >= 0) ::close(fd_);
}

void Recorder::add(Event e) {
  std::lock_guard lk(m_);
  if (fd_ >= 0) {
    auto line = to_line(e) + '\n';
    for (std::size_t done = 0; done < line.size();) {
      auto n = ::write(fd_, line.data() + done, line.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw std::runtime_error(fmt::format("cannot write history file: {}", std::strerror(errno)));
      done += static_cast<std::size_t>(n);
    }
  }
  events_.push_back(std::move(e));
}

std::vector<Event> Recorder::events() const {
  std::lock_guard lk(m_);
  return events_;
}

void Recorder::save(const std::string& path) const { save_file(path, events()); }

std::vector<Event> load_log(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  std::stringstream ss;
  ss << in.rdbuf();
  auto text = ss.str();
  auto end = text.rfind('\n');
  text.resize(end == std::string::npos ? 0 : end + 1);
  return parse(text);
}

std::vector<Event> load_logs(const std::string& dir) {
  std::vector<std::string> paths;
  for (const auto& f : std::filesystem::directory_iterator(dir))
    if (f.is_regular_file() && f.path().extension() == ".history") paths.push_back(f.path().string());
  std::sort(paths.begin(), paths.end());
  std::vector<Event> out;
  for (const auto& p : paths) {
    auto more = load_log(p);
    out.insert(out.end(), more.begin(), more.end());
  }
  return out;
}

// ------------------------------------------------------------ RecordingStore

namespace {

std::int64_t client_now() { return micros(std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now())); }

Event client_event(Kind kind, const eoq::Lease& lease) {
  Event e;
  e.kind = kind;
  e.task = lease.id();
  e.version = lease.token;
  e.owner = lease.owner;
  e.client_us = client_now();
  return e;
}

std::string_view fail_status(TaskStatus s) {
  return s == TaskStatus::pending ? "retry" : to_string(s);
}

std::string_view cancel_status(CancelOutcome c) {
  switch (c) {
    case CancelOutcome::cancelled: return "cancelled";
    case CancelOutcome::cancel_requested: return "cancel_requested";
    case CancelOutcome::already_finished: return "already_finished";
    case CancelOutcome::not_found: return "not_found";
  }
  return "unknown";
}

void record_submit(Recorder& rec, const SubmitResult& r) {
  Event e;
  e.task = r.task.id;
  if (r.task.key) e.key = r.task.queue + "/" + *r.task.key;
  e.max_attempts = r.task.retry.max_attempts;
  if (r.task.deadline) e.deadline_us = micros(*r.task.deadline);
  e.queue = r.task.queue;
  e.partition = r.task.partition.value_or("");
  e.client_us = client_now();
  rec.add(std::move(e));
}

// Runs op(e) and records `e` (which op may fill in from the answer), with ok =
// whether op returned; op's exception goes on to the caller.
template <class Op>
auto recorded(Recorder& rec, Event e, Op&& op) -> decltype(op(e)) {
  using R = decltype(op(e));
  std::exception_ptr failed;
  std::optional<std::conditional_t<std::is_void_v<R>, bool, R>> out;
  try {
    if constexpr (std::is_void_v<R>) {
      op(e);
      out = true;
    } else {
      out.emplace(op(e));
    }
  } catch (...) {
    failed = std::current_exception();
  }
  e.ok = !failed;
  rec.add(std::move(e));
  if (failed) std::rethrow_exception(failed);
  if constexpr (!std::is_void_v<R>) return std::move(*out);
}

class RecordingTransaction final : public LeaseTransaction {
 public:
  RecordingTransaction(std::unique_ptr<LeaseTransaction> inner, const eoq::Lease& lease, Recorder& rec)
      : inner_(std::move(inner)), lease_(lease), rec_(rec) {}
  Rows exec(std::string_view sql, const Params& params) override { return inner_->exec(sql, params); }
  void send(std::string_view sql, const Params& params) override { inner_->send(sql, params); }
  void interrupt() noexcept override { inner_->interrupt(); }
  // What a handler submits exists only once its transaction commits: recorded then.
  SubmitResult submit(const NewTask& task) override {
    auto r = inner_->submit(task);
    submitted_.push_back(r);
    return r;
  }
  std::vector<SubmitResult> submit_batch(std::span<const NewTask> tasks) override {
    auto rs = inner_->submit_batch(tasks);
    submitted_.insert(submitted_.end(), rs.begin(), rs.end());
    return rs;
  }
  void complete(std::string_view result_json) override {
    recorded(rec_, client_event(Kind::complete, lease_), [&](Event&) { inner_->complete(result_json); });
    record_submitted();
  }
  // One complete event per lease, all with the outcome of the one commit.
  void complete_all(std::span<const Completion> completions) override {
    const auto before = client_now();  // a lower bound of the commit, as for every settlement
    std::exception_ptr failed;
    try {
      inner_->complete_all(completions);
    } catch (...) {
      failed = std::current_exception();
    }
    for (const auto& c : completions) {
      auto e = client_event(Kind::complete, *c.lease);
      e.client_us = before;
      e.ok = !failed;
      rec_.add(std::move(e));
    }
    if (failed) std::rethrow_exception(failed);
    record_submitted();
  }
  FailOutcome fail(const Failure& failure) override {
    auto outcome = recorded(rec_, client_event(Kind::fail, lease_), [&](Event& e) {
      auto out = inner_->fail(failure);
      e.status = fail_status(out.status);
      return out;
    });
    record_submitted();
    return outcome;
  }
  void checkpoint(std::string_view stage, std::string_view state_json) override {
    inner_->checkpoint(stage, state_json);
    record_submitted();
  }
  bool open() const noexcept override { return inner_->open(); }

 private:
  void record_submitted() {
    for (const auto& r : submitted_) record_submit(rec_, r);
    submitted_.clear();
  }

  std::unique_ptr<LeaseTransaction> inner_;
  eoq::Lease lease_;
  Recorder& rec_;
  std::vector<SubmitResult> submitted_;
};

}  // namespace

Event effect_of(const eoq::Lease& lease) { return client_event(Kind::effect, lease); }

Event start_of(const eoq::Lease& lease) { return client_event(Kind::start, lease); }

Event end_of(const eoq::Lease& lease, bool ok) {
  auto e = client_event(Kind::end, lease);
  e.ok = ok;
  return e;
}

// The parents a new task names by id (those named by key come from the
// database's edges), with its on_parent_failure.
void record_parents(Recorder& rec, const NewTask& task, const SubmitResult& r) {
  if (r.duplicate) return;
  for (TaskId p : task.parents) {
    Event e;
    e.kind = Kind::parent;
    e.task = r.task.id;
    e.parent = p;
    if (task.on_parent_failure == eoq::ParentFailure::run) e.status = "run";
    rec.add(std::move(e));
  }
}

SubmitResult RecordingStore::submit(const NewTask& task) {
  auto r = inner_.submit(task);
  record_submit(rec_, r);
  record_parents(rec_, task, r);
  return r;
}

std::vector<SubmitResult> RecordingStore::submit_batch(std::span<const NewTask> tasks) {
  auto rs = inner_.submit_batch(tasks);
  for (std::size_t i = 0; i < rs.size(); ++i) {
    record_submit(rec_, rs[i]);
    record_parents(rec_, tasks[i], rs[i]);
  }
  return rs;
}

std::vector<eoq::Lease> RecordingStore::claim(const ClaimRequest& request) {
  auto leases = inner_.claim(request);
  for (const auto& l : leases) {
    auto e = client_event(Kind::claim, l);
    e.db_us = micros(l.task.updated_at);
    e.until_us = micros(l.expires_at);
    e.attempt = l.attempt();
    rec_.add(std::move(e));
  }
  return leases;
}

void RecordingStore::complete(const eoq::Lease& lease, std::string_view result_json) {
  recorded(rec_, client_event(Kind::complete, lease), [&](Event&) { inner_.complete(lease, result_json); });
}

FailOutcome RecordingStore::fail(const eoq::Lease& lease, const Failure& failure) {
  return recorded(rec_, client_event(Kind::fail, lease), [&](Event& e) {
    auto out = inner_.fail(lease, failure);
    e.status = fail_status(out.status);
    return out;
  });
}

HeartbeatResult RecordingStore::heartbeat(const eoq::Lease& lease, Millis extension) {
  return recorded(rec_, client_event(Kind::heartbeat, lease), [&](Event& e) {
    auto r = inner_.heartbeat(lease, extension);
    e.until_us = micros(r.expires_at);
    e.db_us = micros(r.expires_at - extension);  // the expiry is now() + extension
    // After the commit: only a heartbeat surely committed before the lease
    // expired kept it running for the limits (a claim after the expiry
    // counted it ended).
    e.client_us = client_now();
    return r;
  });
}

void RecordingStore::release(const eoq::Lease& lease) {
  auto e = client_event(Kind::release, lease);
  e.db_us = e.client_us;
  recorded(rec_, std::move(e), [&](Event&) { inner_.release(lease); });
}

bool RecordingStore::expire_if_overdue(const eoq::Lease& lease) {
  // Only an expiry ends the lease; "not overdue yet" leaves no trace.
  auto e = client_event(Kind::fail, lease);
  e.status = "expired";
  bool expired = false;
  try {
    expired = inner_.expire_if_overdue(lease);
  } catch (...) {
    e.ok = false;
    rec_.add(std::move(e));
    throw;
  }
  if (expired) rec_.add(std::move(e));
  return expired;
}

void RecordingStore::cancel_running(const eoq::Lease& lease, std::string_view reason) {
  auto e = client_event(Kind::fail, lease);
  e.status = "cancelled";
  recorded(rec_, std::move(e), [&](Event&) { inner_.cancel_running(lease, reason); });
}

FailOutcome RecordingStore::snooze(const eoq::Lease& lease, Millis delay) {
  // Ends the lease as a failure does; "snoozed" (not terminal) when the task runs again.
  return recorded(rec_, client_event(Kind::fail, lease), [&](Event& e) {
    auto out = inner_.snooze(lease, delay);
    e.status = out.status == TaskStatus::pending ? "snoozed" : to_string(out.status);
    return out;
  });
}

void RecordingStore::progress(const eoq::Lease& lease, int percent, std::string_view stage) {
  inner_.progress(lease, percent, stage);
}

void RecordingStore::checkpoint(const eoq::Lease& lease, std::string_view stage, std::string_view state_json) {
  inner_.checkpoint(lease, stage, state_json);
}

std::vector<bool> RecordingStore::complete_batch(std::span<const Completion> completions) {
  const auto before = client_now();  // a lower bound of the commit, as for every settlement
  std::vector<bool> applied;
  try {
    applied = inner_.complete_batch(completions);
  } catch (...) {
    for (const auto& c : completions) {
      auto e = client_event(Kind::complete, *c.lease);
      e.client_us = before;
      e.ok = false;
      rec_.add(std::move(e));
    }
    throw;
  }
  for (std::size_t i = 0; i < completions.size(); ++i) {
    auto e = client_event(Kind::complete, *completions[i].lease);
    e.client_us = before;
    e.ok = i < applied.size() && applied[i];
    rec_.add(std::move(e));
  }
  return applied;
}

std::unique_ptr<LeaseTransaction> RecordingStore::begin(const eoq::Lease& lease) {
  return std::make_unique<RecordingTransaction>(inner_.begin(lease), lease, rec_);
}

std::unique_ptr<LeaseTransaction> RecordingStore::begin(const eoq::Lease& lease, const TransactionOptions& options) {
  return std::make_unique<RecordingTransaction>(inner_.begin(lease, options), lease, rec_);
}

void RecordingStore::set_limits(std::string_view queue, const eoq::QueueLimits& limits) {
  inner_.set_limits(queue, limits);
  // Once it returned: every claim from then on is bound by it.
  const auto at = client_now();
  for (bool per_partition : {false, true}) {
    Event e;
    e.kind = Kind::limit;
    e.queue = std::string(queue);
    e.per_partition = per_partition;
    e.concurrency = per_partition ? limits.partition_concurrency : limits.concurrency;
    e.client_us = at;
    rec_.add(std::move(e));
  }
}

CancelOutcome RecordingStore::cancel(TaskId id, const Scope& scope) {
  auto out = inner_.cancel(id, scope);
  Event e;
  e.kind = Kind::cancel;
  e.task = id;
  e.status = cancel_status(out);
  e.client_us = client_now();
  rec_.add(std::move(e));
  return out;
}

std::vector<Event> load_postgres(PGconn* conn, const std::string& schema, const std::string& effects_table,
                                 const std::string& effects_schema) {
  check_ident(schema, "schema");
  const std::string eschema = effects_schema.empty() ? schema : effects_schema;
  if (!effects_table.empty()) {
    check_ident(effects_table, "effects table");
    check_ident(eschema, "effects schema");
  }
  std::vector<Event> out;
  auto db = [](Kind k, TaskId id) {
    Event e;
    e.kind = k;
    e.origin = Origin::db;
    e.task = id;
    return e;
  };

  // Migration 0003 added the tables of workflows, 0010 partitions and limits.
  auto flows = query(conn, fmt::format("SELECT to_regclass('\"{0}\".edges') IS NOT NULL, "
                                       "to_regclass('\"{0}\".limits') IS NOT NULL",
                                       schema));
  const bool workflows = flows->text(0, 0) == "t";
  const bool limits = flows->text(0, 1) == "t";
  const std::string cols = "id, queue, key, max_attempts, status, attempts, version, lease_owner, " US("started_at") ", "
                           US("finished_at") ", " US("lease_expires_at") ", " US("created_at") ", " US("deadline") ", " +
                           std::string(limits ? "partition_key" : "''");
  auto tasks = query(conn, fmt::format("SELECT {0} FROM \"{1}\".tasks UNION ALL SELECT {0} FROM \"{1}\".finished{2}",
                                       cols, schema,
                                       workflows ? fmt::format(" UNION ALL SELECT {} FROM \"{}\".waiting", cols, schema)
                                                 : std::string()));
  if (workflows) {
    auto edges = query(conn, fmt::format("SELECT child_id, parent_id FROM \"{}\".edges", schema));
    for (int i = 0; i < edges->rows(); ++i) {
      auto e = db(Kind::parent, edges->i64(i, 0));
      e.parent = edges->i64(i, 1);
      out.push_back(e);
    }
  }
  for (int i = 0; i < tasks->rows(); ++i) {
    TaskId id = tasks->i64(i, 0);
    auto status = tasks->text(i, 4);
    int attempts = static_cast<int>(tasks->i64(i, 5));
    auto version = tasks->i64(i, 6);
    auto owner = tasks->null(i, 7) ? std::string() : tasks->text(i, 7);

    auto s = db(Kind::submit, id);
    if (!tasks->null(i, 2)) s.key = tasks->text(i, 1) + "/" + tasks->text(i, 2);
    s.max_attempts = static_cast<int>(tasks->i64(i, 3));
    s.db_us = tasks->opt(i, 11);
    s.deadline_us = tasks->opt(i, 12);
    s.queue = tasks->text(i, 1);
    s.partition = tasks->text(i, 13);
    out.push_back(s);

    auto f = db(Kind::final, id);
    f.status = status;
    f.attempt = attempts;
    f.owner = owner;
    f.db_us = tasks->opt(i, 9);
    out.push_back(f);

    // The attempt in progress, or the one that succeeded, is on the task row
    // itself; every other attempt has its row in eoq.attempts.
    if (status == "running" || status == "succeeded") {
      auto token = status == "running" ? version : version - 1;
      auto c = db(Kind::claim, id);
      c.version = token;
      c.owner = owner;
      c.attempt = attempts;
      c.db_us = tasks->opt(i, 8);
      if (status == "running") c.until_us = tasks->opt(i, 10);
      out.push_back(c);
      if (status == "succeeded") {
        auto d = db(Kind::complete, id);
        d.version = token;
        d.owner = owner;
        d.db_us = tasks->opt(i, 9);
        out.push_back(d);
      }
    }
  }

  auto attempts = query(conn, fmt::format("SELECT task_id, attempt, version, owner, " US("started_at") ", "
                                          US("finished_at") ", outcome FROM \"{}\".attempts",
                                          schema));
  for (int i = 0; i < attempts->rows(); ++i) {
    TaskId id = attempts->i64(i, 0);
    auto owner = attempts->null(i, 3) ? std::string() : attempts->text(i, 3);
    auto c = db(Kind::claim, id);
    c.version = attempts->i64(i, 2);
    c.owner = owner;
    c.attempt = static_cast<int>(attempts->i64(i, 1));
    c.db_us = attempts->opt(i, 4);
    out.push_back(c);
    auto outcome = attempts->text(i, 6);
    auto end = db(outcome == "lease_expired" ? Kind::expire : Kind::fail, id);
    end.version = c.version;
    end.owner = owner;
    end.db_us = attempts->opt(i, 5);  // lease_expired: lease_expires_at as last extended
    if (end.kind == Kind::fail) end.status = outcome;
    out.push_back(end);
  }

  if (limits) {
    auto rows = query(conn, fmt::format("SELECT queue, concurrency, partition_concurrency, " US("updated_at")
                                        " FROM \"{}\".limits",
                                        schema));
    for (int i = 0; i < rows->rows(); ++i) {
      for (bool per_partition : {false, true}) {
        const int col = per_partition ? 2 : 1;
        if (rows->null(i, col)) continue;
        Event e;
        e.kind = Kind::limit;
        e.origin = Origin::db;
        e.queue = rows->text(i, 0);
        e.per_partition = per_partition;
        e.concurrency = static_cast<int>(rows->i64(i, col));
        e.db_us = rows->opt(i, 3);
        out.push_back(std::move(e));
      }
    }
  }

  if (effects_table.empty()) return out;
  std::string state;
  auto fx = query(conn, fmt::format("SELECT task_id, version FROM \"{}\".\"{}\"", eschema, effects_table), &state);
  if (!fx && state == "42703")  // no version column: count rows only
    fx = query(conn, fmt::format("SELECT task_id, 0 FROM \"{}\".\"{}\"", eschema, effects_table));
  else if (!fx)
    throw std::runtime_error(fmt::format("load_postgres: {}", PQerrorMessage(conn)));
  for (int i = 0; i < fx->rows(); ++i) {
    auto e = db(Kind::effect, fx->i64(i, 0));
    e.version = fx->null(i, 1) ? 0 : fx->i64(i, 1);
    out.push_back(e);
  }
  return out;
}

std::int64_t Verdict::count(ViolationKind k) const noexcept {
  return std::count_if(violations.begin(), violations.end(), [&](const Violation& v) { return v.kind == k; });
}

std::string Verdict::format(std::size_t max_listed) const {
  std::string s = fmt::format(
      "history: {} tasks ({} succeeded, {} failed, {} cancelled, {} expired, {} not terminal), {} events, "
      "{} claims, {} completions, {} effects, {} lease handovers checked ({} without times), "
      "{} parent-dependent pairs checked",
      tasks, succeeded, failed, cancelled, expired, tasks - terminal, events, claims, completions, effects,
      handovers_checked, handovers_unchecked, edges_checked);
  if (handler_starts || handler_ends)
    s += fmt::format(", {} handler starts and {} ends", handler_starts, handler_ends);
  if (deadline_starts_checked) s += fmt::format(", {} starts checked against deadlines", deadline_starts_checked);
  if (limit_starts_checked || revived)
    s += fmt::format(", {} starts checked against limits ({} filled one), {} leases revived after expiry",
                     limit_starts_checked, limit_full, revived);
  s += ": ";
  if (ok()) return s + "OK";
  s += fmt::format("{} VIOLATION{}", violations.size(), violations.size() == 1 ? "" : "S");
  for (std::size_t i = 0; i < violations.size() && i < max_listed; ++i)
    s += fmt::format("\n  {} task {}: {}", to_string(violations[i].kind), violations[i].task, violations[i].detail);
  if (violations.size() > max_listed) s += fmt::format("\n  ... and {} more", violations.size() - max_listed);
  return s;
}

namespace {

// The limit in force at `t` (empty: none), from one scope's limit events in
// time order; an event without a time holds from the start.
std::optional<int> limit_at(const std::vector<const Event*>& timeline, std::int64_t t) {
  std::optional<int> out;
  for (const Event* e : timeline) {
    auto from = e->db_us ? e->db_us : e->client_us;
    if (from && *from > t) break;
    out = e->concurrency;
  }
  return out;
}

// At each run's start, the runs of `group` under way then (itself included)
// must not outnumber the limit in force. Only starts are checked: the count
// rises only there, and a lowered limit stops nothing already running.
void sweep(Verdict& v, std::vector<const Run*> group, const std::vector<const Event*>& timeline,
           const std::string& scope, std::int64_t slack) {
  std::sort(group.begin(), group.end(), [](const Run* a, const Run* b) { return a->start < b->start; });
  std::multimap<std::int64_t, const Run*> under_way;  // by end
  for (std::size_t i = 0; i < group.size();) {
    const auto t = group[i]->start;
    std::size_t j = i;
    for (; j < group.size() && group[j]->start == t; ++j) under_way.emplace(group[j]->end, group[j]);
    under_way.erase(under_way.begin(), under_way.upper_bound(t + slack));
    const auto limit = limit_at(timeline, t);
    for (; limit && i < j; ++i) {
      const Run& r = *group[i];
      const auto n = static_cast<std::int64_t>(under_way.size()) + (r.end <= t + slack ? 1 : 0);
      ++v.limit_starts_checked;
      if (n == *limit) ++v.limit_full;
      if (n <= *limit) continue;
      std::vector<std::pair<TaskId, std::int64_t>> others;
      for (const auto& [_, o] : under_way)
        if (o != &r) others.emplace_back(o->task, o->version);
      std::sort(others.begin(), others.end());
      std::string list;
      for (std::size_t k = 0; k < others.size() && k < 8; ++k)
        list += fmt::format("{}{} (version {})", k ? ", " : "", others[k].first, others[k].second);
      if (others.size() > 8) list += fmt::format(" and {} more", others.size() - 8);
      v.violations.push_back({ViolationKind::limit_exceeded, r.task,
                              fmt::format("version {} started while {} ran ({} at once, limit {}): {}", r.version,
                                          scope, n, *limit, list)});
    }
    i = j;
  }
}

void check_limits(Verdict& v, const std::vector<Run>& runs, const std::vector<const Event*>& limit_events,
                  std::int64_t slack) {
  if (limit_events.empty()) return;
  // Scopes: (queue, partition, per_partition) -> its limit events in time order.
  std::map<std::tuple<std::string, std::string, bool>, std::vector<const Event*>> scopes;
  for (const Event* e : limit_events) scopes[{e->queue, e->partition, e->per_partition}].push_back(e);
  for (auto& [key, timeline] : scopes) {
    std::stable_sort(timeline.begin(), timeline.end(), [](const Event* a, const Event* b) {
      auto at = [](const Event* e) { return e->db_us ? e->db_us : e->client_us; };
      return at(a) < at(b);  // an event without a time (nullopt) first
    });
    const auto& [queue, partition, per_partition] = key;
    std::map<std::string, std::vector<const Run*>> groups;  // by partition when per_partition, else one
    for (const Run& r : runs) {
      if (*r.queue != queue || (!partition.empty() && *r.partition != partition)) continue;
      groups[per_partition ? *r.partition : std::string()].push_back(&r);
    }
    for (auto& [p, group] : groups) {
      const auto scope = per_partition || !partition.empty()
                             ? fmt::format("queue '{}' partition '{}'", queue, per_partition ? p : partition)
                             : fmt::format("queue '{}'", queue);
      sweep(v, std::move(group), timeline, scope, slack);
    }
  }
}

}  // namespace

Verdict verify(const std::vector<Event>& events, const Options& options) {
  Verdict v;
  v.events = static_cast<std::int64_t>(events.size());
  const auto slack = options.slack_us;
  auto violate = [&](ViolationKind k, TaskId t, std::string detail) {
    v.violations.push_back({k, t, std::move(detail)});
  };

  std::map<TaskId, std::vector<const Event*>> by_task;
  std::map<std::string, std::set<TaskId>> by_key;
  // Dependents: child -> its parents; whether it runs whatever they did.
  std::map<TaskId, std::set<TaskId>> parents_of;
  std::set<TaskId> run_anyway;
  // What the dependents' check needs of every task: how it ended, when it
  // first ended (database time) and when it was first claimed.
  struct Outcome {
    std::string status;
    std::optional<std::int64_t> ended, first_claim;
  };
  std::map<TaskId, Outcome> outcomes;
  std::vector<const Event*> limit_events;
  std::vector<Run> runs;
  for (const auto& e : events) {
    if (e.kind == Kind::parent) {
      parents_of[e.task].insert(e.parent);
      if (e.status == "run") run_anyway.insert(e.task);
      continue;
    }
    if (e.kind == Kind::limit) {
      limit_events.push_back(&e);
      continue;
    }
    if (e.kind == Kind::start) ++v.handler_starts;
    if (e.kind == Kind::end) ++v.handler_ends;
    by_task[e.task].push_back(&e);
    if (e.kind == Kind::submit && !e.key.empty()) by_key[e.key].insert(e.task);
  }
  for (const auto& [key, ids] : by_key) {
    if (ids.size() < 2) continue;
    std::string list;
    for (auto id : ids) list += (list.empty() ? "" : ", ") + std::to_string(id);
    violate(ViolationKind::duplicate_key, *std::next(ids.begin()), fmt::format("key '{}' names tasks {}", key, list));
  }

  for (const auto& [id, evs] : by_task) {
    ++v.tasks;
    bool submitted = false;
    int max_attempts = 0;
    std::optional<std::int64_t> deadline;
    std::string final_db, final_client, derived;
    std::map<std::int64_t, Lease> leases;  // committed claims by version
    const std::string* queue = nullptr;      // and partition: where the limits count the task
    const std::string* partition = nullptr;
    std::map<std::int64_t, std::optional<std::int64_t>> completions;  // committed, version -> db time
    std::vector<const Event*> effects;

    for (const Event* e : evs) {
      if (e->kind == Kind::submit) {
        submitted = true;
        if (!queue && !e->queue.empty()) {
          queue = &e->queue;
          partition = &e->partition;
        }
        max_attempts = std::max(max_attempts, e->max_attempts);
        if (e->deadline_us) deadline = deadline ? std::min(*deadline, *e->deadline_us) : *e->deadline_us;
      }
      if (e->kind == Kind::final) (e->origin == Origin::db ? final_db : final_client) = e->status;
      if (e->kind == Kind::effect && e->origin == Origin::db) effects.push_back(e);
      if (!e->committed()) continue;
      switch (e->kind) {
        case Kind::claim: {
          auto& l = leases[e->version];
          if (e->db_us) l.start = l.start ? std::min(*l.start, *e->db_us) : *e->db_us;
          if (e->until_us) l.until = l.until ? std::max(*l.until, *e->until_us) : *e->until_us;
          if (e->origin == Origin::client && e->client_us) keep_min(l.claim_returned, *e->client_us);
          if (e->db_us) keep_max(l.claim_db, *e->db_us);
          if (e->until_us) keep_min(l.first_until, *e->until_us);
          break;
        }
        case Kind::complete: {
          auto& c = completions[e->version];
          if (e->db_us) c = c ? std::min(*c, *e->db_us) : *e->db_us;
          derived = "succeeded";
          break;
        }
        case Kind::fail:
          if (e->status == "failed" || e->status == "cancelled" || e->status == "expired") derived = e->status;
          break;
        case Kind::cancel:
          if (e->status == "cancelled") derived = "cancelled";
          break;
        default: break;
      }
    }
    if (submitted) ++v.submitted;

    // Every task ends terminal.
    std::string status = !final_db.empty() ? final_db : !final_client.empty() ? final_client : derived;
    if (is_terminal_status(status)) {
      ++v.terminal;
      if (status == "succeeded") ++v.succeeded;
      if (status == "failed") ++v.failed;
      if (status == "cancelled") ++v.cancelled;
      if (status == "expired") ++v.expired;
    } else {
      violate(ViolationKind::lost_task, id,
              status.empty() ? std::string("never reached a terminal state (no final state recorded)")
                             : fmt::format("ended {}, not terminal", status));
    }

    // Attempts within the limit.
    if (max_attempts > 0) {
      for (const Event* e : evs)
        if ((e->kind == Kind::claim && e->committed()) || e->kind == Kind::final)
          if (e->attempt > max_attempts) {
            violate(ViolationKind::attempts_exceeded, id,
                    fmt::format("{} with attempt {} > max_attempts {}", to_string(e->kind), e->attempt, max_attempts));
            break;
          }
    }

    // Never claimed or started at or after the deadline: a claim past it must
    // expire the task instead, and so must a worker whose buffer held the lease
    // past it. A handler start known only by the client's clock is judged by it.
    if (deadline) {
      for (const Event* e : evs) {
        if (!e->committed() || (e->kind != Kind::claim && e->kind != Kind::start)) continue;
        auto at = e->db_us ? e->db_us : e->kind == Kind::start ? e->client_us : std::nullopt;
        if (at) ++v.deadline_starts_checked;
        if (at && *at >= *deadline + slack) {
          violate(ViolationKind::started_after_deadline, id,
                  fmt::format("{} of version {} {} after the deadline", e->kind == Kind::claim ? "claim" : "start",
                              e->version, ms(*at - *deadline)));
          break;
        }
      }
    }

    // Heartbeats extend, settlements end the leases they name.
    for (const Event* e : evs) {
      if (!e->committed() || !leases.count(e->version)) continue;
      auto& l = leases[e->version];
      if (e->kind == Kind::heartbeat && e->until_us) l.until = l.until ? std::max(*l.until, *e->until_us) : *e->until_us;
      bool ends = e->kind == Kind::complete || e->kind == Kind::fail || e->kind == Kind::release ||
                  e->kind == Kind::expire;
      if (ends && e->db_us && (!l.ended || *e->db_us < *l.ended)) {
        l.ended = *e->db_us;
        l.ended_by = to_string(e->kind);
      }
    }

    // The runs the limits count: each lease from the latest bound of its
    // claim's commit to the earliest bound its records give of its end. A
    // settlement's commit is bounded below by its database time (now() of its
    // transaction) and by the client's clock before the call; expiry is exact,
    // and a heartbeat kept the lease only if it surely committed before the
    // lease expired (its client time once it returned, else its database time).
    if (queue) {
      for (const auto& [ver, l] : leases) {
        auto start = l.claim_returned ? l.claim_returned : l.claim_db;
        std::map<Kind, std::int64_t> settled;  // per kind of end: the latest lower bound
        std::vector<const Event*> beats;
        for (const Event* e : evs) {
          if (!e->committed() || e->version != ver) continue;
          if (e->kind == Kind::heartbeat && e->db_us && e->until_us) beats.push_back(e);
          if (e->kind != Kind::complete && e->kind != Kind::fail && e->kind != Kind::release && e->kind != Kind::expire)
            continue;
          std::optional<std::int64_t> at;
          if (e->db_us) keep_max(at, *e->db_us);
          if (e->kind != Kind::expire && e->origin == Origin::client && e->client_us) keep_max(at, *e->client_us);
          if (!at) continue;
          auto [it, fresh] = settled.emplace(e->kind, *at);
          if (!fresh) it->second = std::max(it->second, *at);
        }
        std::optional<std::int64_t> end;
        for (const auto& [_, at] : settled) keep_min(end, at);
        if (l.first_until) {
          std::sort(beats.begin(), beats.end(), [](const Event* a, const Event* b) { return *a->db_us < *b->db_us; });
          auto expiry = *l.first_until;
          for (const Event* b : beats) {
            const auto sure = b->origin == Origin::client && b->client_us ? std::max(*b->client_us, *b->db_us) : *b->db_us;
            if (sure >= expiry) {
              ++v.revived;
              break;
            }
            expiry = std::max(expiry, *b->until_us);
          }
          keep_min(end, expiry);
        }
        // Without both bounds, or with nothing between them, it surely ran at no instant.
        if (start && end && *end > *start) runs.push_back(Run{id, ver, *start, *end, queue, partition});
      }
    }

    {
      auto& o = outcomes[id];
      o.status = status;
      auto earliest = [](std::optional<std::int64_t>& at, std::optional<std::int64_t> t) {
        if (t && (!at || *t < *at)) at = t;
      };
      for (const auto& [_, c] : completions) earliest(o.ended, c);
      for (const Event* e : evs)
        if (e->kind == Kind::final && e->origin == Origin::db && is_terminal_status(e->status)) earliest(o.ended, e->db_us);
      for (const auto& [_, l] : leases) earliest(o.first_claim, l.start);
    }

    v.claims += static_cast<std::int64_t>(leases.size());
    v.completions += static_cast<std::int64_t>(completions.size());
    v.effects += static_cast<std::int64_t>(effects.size());

    // Completions: at most one, by the latest lease.
    if (completions.size() > 1) {
      std::string list;
      for (auto& [ver, _] : completions) list += (list.empty() ? "" : ", ") + std::to_string(ver);
      violate(ViolationKind::double_completion, id, fmt::format("completed by versions {}", list));
    }
    if (!leases.empty()) {
      auto latest = leases.rbegin()->first;
      for (auto& [ver, _] : completions)
        if (ver != latest)
          violate(ViolationKind::stale_completion, id,
                  leases.count(ver) ? fmt::format("completed by version {}, but version {} was claimed later", ver, latest)
                                    : fmt::format("completed by version {}, which no recorded claim handed out "
                                                  "(latest claim: version {})",
                                                  ver, latest));
    }
    if (!completions.empty() && is_terminal_status(status) && status != "succeeded")
      violate(ViolationKind::completion_not_recorded, id,
              fmt::format("a completion by version {} was reported committed, but the task ended {}",
                          completions.begin()->first, status));

    // Effects: exactly one for a succeeded task, none otherwise.
    if (effects.size() > 1) {
      std::string list;
      for (auto* e : effects) list += (list.empty() ? "" : ", ") + std::to_string(e->version);
      violate(ViolationKind::double_effect, id, fmt::format("{} effect rows (versions {})", effects.size(), list));
    }
    if (status == "succeeded" && effects.empty() && options.require_effects)
      violate(ViolationKind::missing_effect, id, "succeeded without an effect row");
    if (is_terminal_status(status) && status != "succeeded" && !effects.empty())
      violate(ViolationKind::orphan_effect, id, fmt::format("ended {} but has {} effect row(s)", status, effects.size()));
    if (completions.size() == 1 && effects.size() == 1 && effects[0]->version != 0 &&
        effects[0]->version != completions.begin()->first)
      violate(ViolationKind::effect_version, id,
              fmt::format("effect written by version {}, completed by version {}", effects[0]->version,
                          completions.begin()->first));

    // No operation of a lease commits after a newer lease was handed out.
    for (const Event* e : evs) {
      if (!e->committed() || !e->db_us || e->kind == Kind::claim || e->kind == Kind::submit ||
          e->kind == Kind::final || e->kind == Kind::cancel || e->kind == Kind::expire || e->version == 0)
        continue;
      for (auto it = leases.upper_bound(e->version); it != leases.end(); ++it) {
        if (it->second.start && *it->second.start + slack < *e->db_us) {
          violate(ViolationKind::stale_lease, id,
                  fmt::format("{} by version {} committed {} after version {} was claimed", to_string(e->kind),
                              e->version, ms(*e->db_us - *it->second.start), it->first));
          break;
        }
      }
    }

    // Consecutive leases do not overlap in database time.
    for (auto it = leases.begin(); it != leases.end(); ++it) {
      auto next = std::next(it);
      if (next == leases.end()) break;
      const Lease& a = it->second;
      const Lease& b = next->second;
      auto end = a.ended ? a.ended : a.until;
      if (!b.start || !end) {
        ++v.handovers_unchecked;
        continue;
      }
      ++v.handovers_checked;
      if (*b.start + slack < *end)
        violate(ViolationKind::lease_overlap, id,
                fmt::format("version {} was claimed {} before version {} ended ({})", next->first,
                            ms(*end - *b.start), it->first,
                            a.ended ? fmt::format("by {}", a.ended_by) : std::string("its lease expiry, as last extended")));
    }
  }

  // Dependents wait for their parents: never claimed before every parent
  // succeeded (a run-anyway dependent: ended), and one whose parent ended
  // otherwise never runs and ends cancelled. A parent the history does not
  // know the end of (retention deleted it) leaves its pair unchecked.
  for (const auto& [child, parents] : parents_of) {
    const auto& c = outcomes[child];
    const bool anyway = run_anyway.count(child) > 0;
    bool doomed = false;
    for (TaskId p : parents) {
      const auto& po = outcomes[p];
      if (po.status.empty()) continue;
      if (!is_terminal_status(po.status)) {
        if (c.first_claim)
          violate(ViolationKind::dependent_started_early, child,
                  fmt::format("claimed while parent {} had not ended ({})", p, po.status));
        continue;
      }
      ++v.edges_checked;
      const bool counts = anyway || po.status == "succeeded";
      if (!counts) doomed = true;
      if (c.first_claim && counts && po.ended && *c.first_claim + slack < *po.ended)
        violate(ViolationKind::dependent_started_early, child,
                fmt::format("claimed {} before parent {} ended {}", ms(*po.ended - *c.first_claim), p, po.status));
    }
    if (doomed && (c.first_claim || (is_terminal_status(c.status) && c.status != "cancelled")))
      violate(ViolationKind::dependent_ran_after_failed_parent, child,
              fmt::format("a parent ended other than succeeded, yet the task {}",
                          c.first_claim ? "was claimed" : "ended " + c.status));
  }

  check_limits(v, runs, limit_events, slack);
  return v;
}

Verdict verify_and_print(std::string_view label, const std::vector<Event>& events, const Options& options) {
  auto v = verify(events, options);
  std::printf("%.*s: %s\n", static_cast<int>(label.size()), label.data(), v.format().c_str());
  std::fflush(stdout);
  return v;
}

}  // namespace eoq::test::history
