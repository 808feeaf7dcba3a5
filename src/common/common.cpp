#include "validate.hpp"

#include <eoq/errors.hpp>
#include <eoq/task_store.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fmt/format.h>
#include <random>
#include <string_view>
#include <tuple>
#include <vector>

namespace eoq {

const char* version() noexcept { return EOQ_VERSION; }

std::string_view to_string(TaskStatus s) noexcept {
  switch (s) {
    case TaskStatus::pending: return "pending";
    case TaskStatus::running: return "running";
    case TaskStatus::succeeded: return "succeeded";
    case TaskStatus::failed: return "failed";
    case TaskStatus::cancelled: return "cancelled";
    case TaskStatus::expired: return "expired";
    case TaskStatus::waiting: return "waiting";
  }
  return "unknown";
}

std::string_view to_string(CancelOutcome o) noexcept {
  switch (o) {
    case CancelOutcome::cancelled: return "cancelled";
    case CancelOutcome::cancel_requested: return "cancel_requested";
    case CancelOutcome::already_finished: return "already_finished";
    case CancelOutcome::not_found: return "not_found";
  }
  return "unknown";
}

std::string_view to_string(RemoveOutcome o) noexcept {
  switch (o) {
    case RemoveOutcome::removed: return "removed";
    case RemoveOutcome::running: return "running";
    case RemoveOutcome::not_found: return "not_found";
  }
  return "unknown";
}

std::string_view to_string(RetryOutcome o) noexcept {
  switch (o) {
    case RetryOutcome::retried: return "retried";
    case RetryOutcome::not_retryable: return "not_retryable";
    case RetryOutcome::not_found: return "not_found";
  }
  return "unknown";
}

std::string_view to_string(TotalKind k) noexcept {
  switch (k) {
    case TotalKind::exact: return "exact";
    case TotalKind::at_least: return "at_least";
    case TotalKind::estimate: return "estimate";
  }
  return "unknown";
}

TaskStatus parse_status(std::string_view name) {
  for (auto s : {TaskStatus::pending, TaskStatus::running, TaskStatus::succeeded, TaskStatus::failed,
                 TaskStatus::cancelled, TaskStatus::expired, TaskStatus::waiting})
    if (to_string(s) == name) return s;
  throw InvalidArgument("status", fmt::format("'{}' is not one of pending, running, succeeded, failed, "
                                              "cancelled, expired, waiting", name));
}

Millis RetryPolicy::delay_after(int failed_attempts, double unit_random) const noexcept {
  double base = static_cast<double>(initial_delay.count());
  if (backoff == Backoff::exponential && failed_attempts > 1) {
    // 2^62 ms is far past any cap; stop doubling there instead of overflowing.
    base *= std::ldexp(1.0, std::min(failed_attempts - 1, 62));
  }
  base = std::min(base, static_cast<double>(max_delay.count()));
  double j = std::clamp(jitter, 0.0, 1.0);
  double u = std::clamp(unit_random, 0.0, 1.0);
  double delay = base * (1.0 + j * (2.0 * u - 1.0));
  // Validation caps max_delay far below this; the clamp keeps the cast defined anyway.
  delay = std::clamp(std::round(delay), 0.0, 9.0e15);
  return Millis(static_cast<Millis::rep>(delay));
}

std::vector<bool> TaskStore::release_batch(std::span<const Lease> leases) {
  std::vector<bool> out;
  out.reserve(leases.size());
  for (const auto& lease : leases) {
    try {
      release(lease);
      out.push_back(true);
    } catch (const LeaseLost&) {
      out.push_back(false);
    }
  }
  return out;
}

const std::vector<std::optional<std::string>>& Rows::one_row() const {
  if (rows.size() != 1)
    throw UsageError(fmt::format("expected exactly one row, got {}", rows.size()));
  return rows.front();
}

std::optional<std::string> Rows::scalar() const {
  const auto& row = one_row();
  if (row.size() != 1) throw UsageError(fmt::format("expected exactly one column, got {}", row.size()));
  return row.front();
}

RowView Rows::operator[](std::size_t row) const {
  if (row >= rows.size()) throw UsageError(fmt::format("row {} does not exist: the result has {} row(s)", row, rows.size()));
  return RowView(rows[row], columns);
}

const std::optional<std::string>& RowView::operator[](std::size_t column) const {
  if (column >= cells_->size())
    throw UsageError(fmt::format("column {} does not exist: the row has {} column(s)", column, cells_->size()));
  return (*cells_)[column];
}

std::string_view RowView::name(std::size_t column) const noexcept {
  return column < columns_->size() ? std::string_view((*columns_)[column]) : std::string_view("?");
}

std::size_t RowView::index_of(std::string_view column) const {
  for (std::size_t i = 0; i < columns_->size(); ++i)
    if ((*columns_)[i] == column) return i;
  throw UsageError(fmt::format("column \"{}\" is not in the result (columns: {})", column, fmt::join(*columns_, ", ")));
}

namespace detail {
void bad_cell(std::string_view name, std::size_t index, std::string_view type, const std::string* text,
              std::string_view why) {
  std::string shown;
  if (text) shown = text->size() > 64 ? fmt::format("\"{}...\" ", text->substr(0, 64)) : fmt::format("\"{}\" ", *text);
  throw UsageError(fmt::format("column \"{}\" ({}) read as {}: {}{}", name, index, type, shown, why));
}
}  // namespace detail

namespace detail {

std::size_t utf8_sequence(std::string_view s, std::size_t i) noexcept {
  auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  int n = (c >= 0xF0 && c <= 0xF4) ? 3 : (c >= 0xE0 && c <= 0xEF) ? 2 : (c >= 0xC2 && c <= 0xDF) ? 1 : -1;
  if (n < 0 || i + static_cast<std::size_t>(n) >= s.size()) return 0;
  unsigned cp = c & (0x3F >> n);
  for (int k = 1; k <= n; ++k) {
    auto cc = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
    if ((cc & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (cc & 0x3F);
  }
  if ((n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
    return 0;
  return static_cast<std::size_t>(n) + 1;
}

bool is_utf8(std::string_view s) noexcept {
  for (std::size_t i = 0; i < s.size();) {
    std::size_t n = utf8_sequence(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

TimePoint now() noexcept { return std::chrono::time_point_cast<std::chrono::microseconds>(Clock::now()); }

std::string key_difference(const NewTask& submitted, std::string_view type, std::string_view payload) {
  const bool t = submitted.type != type, p = !json_equal(submitted.payload, payload);
  return t && p ? "type and payload" : t ? "type" : p ? "payload" : "";
}

void check_key_reuse(const NewTask& submitted, std::optional<std::size_t> batch_index, std::string_view type,
                     std::string_view payload, const std::string& holder_name, TaskId holder_id) {
  if (submitted.key_reuse != KeyReuse::strict || !submitted.key) return;
  auto differs = key_difference(submitted, type, payload);
  if (differs.empty()) return;
  throw KeyConflict(batch_index ? fmt::format("tasks[{}].key", *batch_index) : std::string("key"), *submitted.key,
                    std::move(differs), holder_name, holder_id);
}

double unit_random() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.0, 1.0)(gen);
}

bool check_batch_keys(std::span<const NewTask> tasks) {
  // The keyed tasks sorted by a hash of the key, then (key, queue, tenant,
  // position): equal keys end up side by side, the first of each run being
  // the key's first task. Sorted, not hashed into a table: keys come from
  // clients, and a batch of colliding keys must not cost quadratic time; here
  // colliding hashes only bring back the string comparisons. The hash lets
  // most comparisons read no string: sorting through the tasks themselves cost
  // 4 ms of a 10,000-task batch (a cache miss per comparison), and sorting by
  // the keys' first eight bytes still compared strings wherever keys share a
  // prefix, as "order-1234" and "order-1299" do.
  struct Entry {
    std::size_t hash;
    std::string_view key, queue, tenant;
    std::size_t index;
    auto id() const { return std::tie(key, queue, tenant); }
  };
  std::vector<Entry> keyed;
  keyed.reserve(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    const NewTask& t = tasks[i];
    if (!t.key) continue;
    keyed.push_back({std::hash<std::string_view>{}(*t.key), *t.key, t.queue,
                     t.tenant ? std::string_view(*t.tenant) : std::string_view(), i});
  }
  std::sort(keyed.begin(), keyed.end(), [](const Entry& a, const Entry& b) {
    if (a.hash != b.hash) return a.hash < b.hash;
    if (int c = a.key.compare(b.key)) return c < 0;
    if (int c = a.queue.compare(b.queue)) return c < 0;
    if (int c = a.tenant.compare(b.tenant)) return c < 0;
    return a.index < b.index;
  });
  // (task, the first task with its key), checked in input order so the error
  // names the same task whichever order the sort left.
  std::vector<std::pair<std::size_t, std::size_t>> repeats;
  for (std::size_t j = 1, first = 0; j < keyed.size(); ++j) {
    if (keyed[j].id() != keyed[first].id()) first = j;
    else repeats.emplace_back(keyed[j].index, keyed[first].index);
  }
  std::sort(repeats.begin(), repeats.end());
  for (const auto& [i, holder] : repeats)
    check_key_reuse(tasks[i], i, tasks[holder].type, tasks[holder].payload,
                    fmt::format("tasks[{}] of this batch", holder), 0);
  return !repeats.empty();
}

namespace {

struct JsonParser {
  std::string_view s;
  std::size_t i = 0;
  int depth = 0;

  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool lit(std::string_view w) {
    if (s.substr(i, w.size()) != w) return false;
    i += w.size();
    return true;
  }
  bool digits() {
    std::size_t start = i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    return i > start;
  }
  bool number() {
    const std::size_t start = i;
    if (!number_syntax()) return false;
    // RFC 8259 leaves the range to implementations; a number beyond a double
    // (1e400) breaks most readers of the task later, so it is refused here.
    // Only an exponent or more than 300 digits can get there: the common
    // number is let through without a copy.
    std::string_view text = s.substr(start, i - start);
    if (text.size() <= 300 && text.find_first_of("eE") == std::string_view::npos) return true;
    try {
      std::string copy(text);  // strtod needs a terminator
      return std::isfinite(std::strtod(copy.c_str(), nullptr));
    } catch (...) {
      return false;  // out of memory: call it invalid rather than terminate
    }
  }
  bool number_syntax() {
    if (i < s.size() && s[i] == '-') ++i;
    if (i >= s.size()) return false;
    if (s[i] == '0') ++i;
    else if (!digits()) return false;
    if (i < s.size() && s[i] == '.') {
      ++i;
      if (!digits()) return false;
    }
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
      ++i;
      if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
      if (!digits()) return false;
    }
    return true;
  }
  static bool hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
  }
  unsigned hex4(std::size_t at) const {
    unsigned v = 0;
    for (std::size_t k = at; k < at + 4; ++k) {
      char c = s[k];
      v = v * 16 + static_cast<unsigned>(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
    }
    return v;
  }
  bool string() {
    if (i >= s.size() || s[i] != '"') return false;
    ++i;
    while (i < s.size()) {
      auto c = static_cast<unsigned char>(s[i]);
      if (c == '"') {
        ++i;
        return true;
      }
      if (c < 0x20) return false;
      if (c == '\\') {
        if (++i >= s.size()) return false;
        char e = s[i];
        if (e == 'u') {
          if (i + 4 >= s.size() + 0 || !hex(s[i + 1]) || !hex(s[i + 2]) || !hex(s[i + 3]) || !hex(s[i + 4]))
            return false;
          unsigned cp = hex4(i + 1);
          i += 5;
          // PostgreSQL's jsonb refuses \u0000 and unpaired surrogates; so do we.
          if (cp == 0) return false;
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (i + 6 > s.size() || s[i] != '\\' || s[i + 1] != 'u' || !hex(s[i + 2]) || !hex(s[i + 3]) ||
                !hex(s[i + 4]) || !hex(s[i + 5]))
              return false;
            unsigned lo = hex4(i + 2);
            if (lo < 0xDC00 || lo > 0xDFFF) return false;
            i += 6;
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return false;
          }
          continue;
        }
        if (e != '"' && e != '\\' && e != '/' && e != 'b' && e != 'f' && e != 'n' && e != 'r' && e != 't')
          return false;
        ++i;
        continue;
      }
      if (c < 0x80) {
        ++i;
        continue;
      }
      // UTF-8: PostgreSQL rejects invalid sequences, so refuse them here too.
      std::size_t n = utf8_sequence(s, i);
      if (n == 0) return false;
      i += n;
    }
    return false;
  }
  bool value() {
    ws();
    if (i >= s.size()) return false;
    char c = s[i];
    if (c == '{' || c == '[') {
      if (++depth > 512) return false;
      char close = c == '{' ? '}' : ']';
      ++i;
      ws();
      if (i < s.size() && s[i] == close) {
        ++i;
        --depth;
        return true;
      }
      for (;;) {
        if (c == '{') {
          ws();
          if (!string()) return false;
          ws();
          if (i >= s.size() || s[i] != ':') return false;
          ++i;
        }
        if (!value()) return false;
        ws();
        if (i >= s.size()) return false;
        if (s[i] == ',') {
          ++i;
          continue;
        }
        if (s[i] != close) return false;
        ++i;
        --depth;
        return true;
      }
    }
    if (c == '"') return string();
    if (c == 't') return lit("true");
    if (c == 'f') return lit("false");
    if (c == 'n') return lit("null");
    return number();
  }
};

}  // namespace

bool is_json(std::string_view text) noexcept {
  JsonParser p{text};
  if (!p.value()) return false;
  p.ws();
  return p.i == text.size();
}

namespace {

// Writes a JSON text (already valid: is_json) in one form per value, the way
// jsonb equality sees it: no whitespace, object members sorted by name with the
// last of a repeated name kept, strings with escapes decoded, numbers as
// digits and exponent without redundant zeros (1.50, 15e-1 and 1.5 are one
// value, as -0 and 0 are).
struct Canonical {
  std::string_view s;
  std::size_t i = 0;

  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  unsigned hex4() {
    unsigned v = 0;
    for (int k = 0; k < 4; ++k, ++i) {
      char c = s[i];
      v = v * 16 + static_cast<unsigned>(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
    }
    return v;
  }
  // The decoded text of a string, quoted, with only '"', '\\' and control
  // characters escaped.
  void string(std::string& out) {
    std::string raw;
    ++i;  // "
    while (s[i] != '"') {
      if (s[i] != '\\') {
        raw += s[i++];
        continue;
      }
      char e = s[++i];
      ++i;
      switch (e) {
        case 'b': raw += '\b'; break;
        case 'f': raw += '\f'; break;
        case 'n': raw += '\n'; break;
        case 'r': raw += '\r'; break;
        case 't': raw += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            i += 2;  // \u of the low half, which is_json has checked
            cp = 0x10000 + ((cp - 0xD800) << 10) + (hex4() - 0xDC00);
          }
          put_utf8(raw, cp);
          break;
        }
        default: raw += e;  // " \ /
      }
    }
    ++i;
    out += '"';
    for (char c : raw) {
      if (c == '"' || c == '\\') {
        out += '\\';
        out += c;
      } else if (static_cast<unsigned char>(c) < 0x20) {
        out += fmt::format("\\u{:04x}", static_cast<unsigned>(c));
      } else {
        out += c;
      }
    }
    out += '"';
  }
  void number(std::string& out) {
    bool negative = false;
    if (s[i] == '-') {
      negative = true;
      ++i;
    }
    std::string digits;
    long long exponent = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') digits += s[i++];
    if (i < s.size() && s[i] == '.') {
      ++i;
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
        digits += s[i++];
        --exponent;
      }
    }
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
      ++i;
      bool minus = false;
      if (s[i] == '+' || s[i] == '-') minus = s[i++] == '-';
      // Saturates: exponents beyond 10^15 are not numbers anyone compares.
      long long e = 0;
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
        if (e < 1'000'000'000'000'000) e = e * 10 + (s[i] - '0');
        ++i;
      }
      exponent += minus ? -e : e;
    }
    const auto first = digits.find_first_not_of('0');
    if (first == std::string::npos) {
      out += '0';
      return;
    }
    auto last = digits.find_last_not_of('0');
    exponent += static_cast<long long>(digits.size() - 1 - last);
    if (negative) out += '-';
    out.append(digits, first, last - first + 1);
    if (exponent != 0) out += fmt::format("e{}", exponent);
  }
  void value(std::string& out) {
    ws();
    char c = s[i];
    if (c == '{') {
      ++i;
      std::vector<std::pair<std::string, std::string>> members;
      ws();
      while (s[i] != '}') {
        std::pair<std::string, std::string> m;
        ws();
        string(m.first);
        ws();
        ++i;  // :
        value(m.second);
        members.push_back(std::move(m));
        ws();
        if (s[i] == ',') ++i;
      }
      ++i;
      // Stable: of a repeated name the last member is the one kept.
      std::stable_sort(members.begin(), members.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      bool comma = false;
      for (std::size_t k = 0; k < members.size(); ++k) {
        if (k + 1 < members.size() && members[k + 1].first == members[k].first) continue;
        if (comma) out += ',';
        comma = true;
        out += members[k].first;
        out += ':';
        out += members[k].second;
      }
      out += '}';
    } else if (c == '[') {
      ++i;
      out += '[';
      ws();
      bool comma = false;
      while (s[i] != ']') {
        if (comma) out += ',';
        comma = true;
        value(out);
        ws();
        if (s[i] == ',') ++i;
        ws();
      }
      ++i;
      out += ']';
    } else if (c == '"') {
      string(out);
    } else if (c == 't' || c == 'n') {
      out.append(s.substr(i, 4));
      i += 4;
    } else if (c == 'f') {
      out += "false";
      i += 5;
    } else {
      number(out);
    }
  }
};

}  // namespace

namespace {

// A JSON value as a tree, scalars in Canonical's form, object members sorted by
// name with the last of a repeated name kept: what containment walks.
struct JsonNode {
  char kind = 's';  // 'o' object, 'a' array, 's' scalar (string, number, true, false, null)
  std::string scalar;
  std::vector<std::pair<std::string, JsonNode>> members;
  std::vector<JsonNode> items;
};

JsonNode json_tree(Canonical& c) {
  JsonNode n;
  c.ws();
  const char ch = c.s[c.i];
  if (ch == '{') {
    n.kind = 'o';
    ++c.i;
    c.ws();
    while (c.s[c.i] != '}') {
      std::pair<std::string, JsonNode> m;
      c.ws();
      c.string(m.first);
      c.ws();
      ++c.i;  // :
      m.second = json_tree(c);
      n.members.push_back(std::move(m));
      c.ws();
      if (c.s[c.i] == ',') ++c.i;
    }
    ++c.i;
    std::stable_sort(n.members.begin(), n.members.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<std::pair<std::string, JsonNode>> kept;
    for (std::size_t k = 0; k < n.members.size(); ++k)
      if (k + 1 == n.members.size() || n.members[k + 1].first != n.members[k].first)
        kept.push_back(std::move(n.members[k]));
    n.members = std::move(kept);
  } else if (ch == '[') {
    n.kind = 'a';
    ++c.i;
    c.ws();
    while (c.s[c.i] != ']') {
      n.items.push_back(json_tree(c));
      c.ws();
      if (c.s[c.i] == ',') ++c.i;
      c.ws();
    }
    ++c.i;
  } else {
    c.value(n.scalar);
  }
  return n;
}

// jsonb's @>, below the top level.
bool contains(const JsonNode& a, const JsonNode& b) {
  if (a.kind != b.kind) return false;
  if (a.kind == 's') return a.scalar == b.scalar;
  if (a.kind == 'o') {
    for (const auto& [name, value] : b.members) {
      auto it = std::lower_bound(a.members.begin(), a.members.end(), name,
                                 [](const auto& m, const std::string& n) { return m.first < n; });
      if (it == a.members.end() || it->first != name || !contains(it->second, value)) return false;
    }
    return true;
  }
  for (const auto& want : b.items)
    if (std::none_of(a.items.begin(), a.items.end(), [&](const JsonNode& have) { return contains(have, want); }))
      return false;
  return true;
}

}  // namespace

bool json_contains(std::string_view container, std::string_view contained) {
  if (!is_json(container) || !is_json(contained)) return false;
  Canonical ca{container}, cb{contained};
  const JsonNode a = json_tree(ca), b = json_tree(cb);
  // At the top level, and only there, an array contains a scalar it holds.
  if (a.kind == 'a' && b.kind == 's')
    return std::any_of(a.items.begin(), a.items.end(), [&](const JsonNode& x) { return contains(x, b); });
  return contains(a, b);
}

bool json_equal(std::string_view a, std::string_view b) {
  if (a == b) return true;
  // Text that is not JSON (a store fed around validation) compares as text.
  if (!is_json(a) || !is_json(b)) return false;
  std::string ca, cb;
  Canonical{a}.value(ca);
  Canonical{b}.value(cb);
  return ca == cb;
}

void validate_queue(std::string_view field, std::string_view queue) {
  if (queue.empty()) throw InvalidArgument(std::string(field), "must not be empty");
  if (queue.size() > 128) throw InvalidArgument(std::string(field), "must be at most 128 characters");
  for (char c : queue) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-' || c == '.' || c == ':';
    if (!ok)
      throw InvalidArgument(std::string(field),
                            fmt::format("'{}' may contain only letters, digits, '_', '-', '.' and ':'", queue));
  }
}

void validate_json(std::string_view field, std::string_view text, std::size_t max_bytes) {
  if (text.size() > max_bytes)
    throw InvalidArgument(std::string(field),
                          fmt::format("is {} bytes, more than the limit of {} bytes", text.size(), max_bytes));
  if (!is_json(text)) throw InvalidArgument(std::string(field), "must be valid JSON text (and its numbers within the range of a double)");
}

namespace {
// Bounds that keep every time computation far from overflow. A handler that
// runs longer than a week keeps its lease by heartbeats, not by one long lease.
constexpr Millis kMaxLease = std::chrono::hours(24 * 7);
constexpr Millis kMaxDelay = std::chrono::hours(24 * 365);
constexpr std::size_t kMaxParents = 10000;  // a fan-in of ten thousand, as measured in bench/

void validate_text(std::string_view field, std::string_view value, std::size_t max) {
  if (value.empty()) throw InvalidArgument(std::string(field), "must not be empty");
  if (value.size() > max) throw InvalidArgument(std::string(field), fmt::format("must be at most {} bytes", max));
  for (char c : value)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      throw InvalidArgument(std::string(field), "must not contain control characters");
}
}  // namespace

void validate_new_task(const NewTask& t, std::size_t max_payload_bytes, TimePoint now) {
  validate_queue("queue", t.queue);
  validate_text("type", t.type, 256);
  if (t.key) validate_text("key", *t.key, 512);
  if (t.tenant) validate_text("tenant", *t.tenant, 256);
  validate_json("payload", t.payload, max_payload_bytes);
  if (t.priority < -32768 || t.priority > 32767)
    throw InvalidArgument("priority", "must be between -32768 and 32767");
  // PostgreSQL's earliest timestamp, 4714-11-24 00:00 UTC BC, in microseconds
  // since the Unix epoch: Postgres refuses anything earlier, so both stores do.
  constexpr std::int64_t kEarliestUs = -210866803200000000;
  if (t.run_at && t.run_at->time_since_epoch().count() < kEarliestUs)
    throw InvalidArgument("run_at", "is before 4714-11-24 BC, the earliest time PostgreSQL stores");
  if (t.deadline && *t.deadline <= now) throw InvalidArgument("deadline", "is in the past");
  if (t.deadline && t.run_at && *t.run_at > *t.deadline) throw InvalidArgument("run_at", "is after the deadline");
  const auto& r = t.retry;
  if (r.max_attempts < 1 || r.max_attempts > 1000)
    throw InvalidArgument("retry.max_attempts", "must be between 1 and 1000");
  if (r.initial_delay.count() < 0) throw InvalidArgument("retry.initial_delay", "must not be negative");
  if (r.max_delay > kMaxDelay) throw InvalidArgument("retry.max_delay", "must be at most 365 days");
  if (r.max_delay < r.initial_delay)
    throw InvalidArgument("retry.max_delay", "must not be less than retry.initial_delay");
  if (!(r.jitter >= 0.0 && r.jitter <= 1.0)) throw InvalidArgument("retry.jitter", "must be between 0 and 1");
  if (t.parents.size() + t.parent_keys.size() > kMaxParents)
    throw InvalidArgument("parents", fmt::format("at most {} parents (ids and keys together)", kMaxParents));
  for (std::size_t i = 0; i < t.parents.size(); ++i)
    if (t.parents[i] <= 0) throw InvalidArgument(fmt::format("parents[{}]", i), "must be a positive task id");
  for (std::size_t i = 0; i < t.parent_keys.size(); ++i)
    validate_text(fmt::format("parent_keys[{}]", i), t.parent_keys[i], 512);
  if (t.partition) validate_text("partition", *t.partition, 512);
  if (t.timeout) validate_positive("timeout", *t.timeout);
}

void validate_new_tasks(std::span<const NewTask> tasks, bool is_batch, std::size_t max_payload_bytes) {
  const TimePoint checked_at = now();
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    try {
      validate_new_task(tasks[i], max_payload_bytes, checked_at);
    } catch (const InvalidArgument& e) {
      if (!is_batch) throw;
      throw InvalidArgument(fmt::format("tasks[{}].{}", i, e.field()), e.rule());
    }
  }
}

void validate_owner(std::string_view owner) { validate_text("owner", owner, 256); }

void validate_throughput_minutes(int minutes) {
  if (minutes < 1 || minutes > 1440)
    throw InvalidArgument("minutes", fmt::format("must be 1..1440 (a day), not {}", minutes));
}

void validate_scope(const Scope& scope) {
  if (scope.tenant) validate_text("scope.tenant", *scope.tenant, 256);
}

void validate_positive(std::string_view field, Millis value) {
  if (value.count() <= 0) throw InvalidArgument(std::string(field), "must be positive");
  if (value > kMaxLease) throw InvalidArgument(std::string(field), "must be at most 7 days");
}

void validate_snooze_delay(Millis delay) {
  if (delay.count() < 0) throw InvalidArgument("delay", "must not be negative");
  if (delay > kMaxDelay) throw InvalidArgument("delay", "must be at most 365 days");
}

void validate_claim(const ClaimRequest& r) {
  if (r.queues.empty()) throw InvalidArgument("queues", "must name at least one queue");
  for (const auto& q : r.queues) validate_queue("queues", q);
  validate_owner(r.owner);
  if (r.limit < 1 || r.limit > 10000) throw InvalidArgument("limit", "must be between 1 and 10000");
  validate_positive("lease", r.lease);
}

void validate_limits(std::string_view queue, const QueueLimits& l) {
  validate_queue("queue", queue);
  auto count = [](const char* field, const std::optional<int>& n) {
    if (n && (*n < 0 || *n > 1000000))
      throw InvalidArgument(field, fmt::format("must be between 0 and 1000000, not {}", *n));
  };
  count("limits.concurrency", l.concurrency);
  count("limits.partition_concurrency", l.partition_concurrency);
  auto rate = [&](const char* field, const char* period, const std::optional<RateLimit>& r) {
    if (!r) return;
    count(field, r->limit);
    if (r->period.count() <= 0)
      throw InvalidArgument(period, fmt::format("must be positive, not {} ms", r->period.count()));
    if (r->period > kMaxLease) throw InvalidArgument(period, "must be at most 7 days");
  };
  rate("limits.rate.limit", "limits.rate.period", l.rate);
  rate("limits.partition_rate.limit", "limits.partition_rate.period", l.partition_rate);
}

void validate_progress(int percent, std::string_view stage) {
  if (percent < 0 || percent > 100) throw InvalidArgument("progress", "must be between 0 and 100");
  if (stage.size() > 256) throw InvalidArgument("stage", "must be at most 256 bytes");
}

void validate_prune(Millis older_than, int batch_size) {
  if (older_than.count() < 0) throw InvalidArgument("older_than", "must not be negative");
  if (batch_size < 1 || batch_size > 100000) throw InvalidArgument("batch_size", "must be between 1 and 100000");
}

void validate_list(const ListQuery& q) {
  if (q.limit < 1 || q.limit > 1000) throw InvalidArgument("limit", "must be between 1 and 1000");
  if (q.count_up_to < 0 || q.count_up_to > kMaxCountUpTo)
    throw InvalidArgument("count_up_to", "must be between 0 and 1000000");
  if (q.queue) validate_queue("queue", *q.queue);
  if (q.key) validate_text("key", *q.key, 512);
  if (q.key_prefix) validate_text("key_prefix", *q.key_prefix, 512);
  if (q.type_prefix) validate_text("type_prefix", *q.type_prefix, 256);
  if (q.error_contains) validate_text("error_contains", *q.error_contains, 1024);
  if (q.payload_contains) validate_json("payload_contains", *q.payload_contains, 64 * 1024);
}

void validate_completions(std::span<const Completion> completions, std::size_t max_payload_bytes,
                          bool one_reads_as_result) {
  for (std::size_t i = 0; i < completions.size(); ++i) {
    if (!completions[i].lease) throw InvalidArgument(fmt::format("completions[{}].lease", i), "must not be null");
    validate_json(completions.size() == 1 && one_reads_as_result ? "result" : fmt::format("completions[{}].result", i),
                  completions[i].result, max_payload_bytes);
  }
}

void validate_complete_all(std::span<const Completion> completions, std::size_t max_payload_bytes) {
  if (completions.empty() || completions.size() > 10000)
    throw InvalidArgument("completions", fmt::format("must hold 1 to 10000 completions, not {}", completions.size()));
  validate_completions(completions, max_payload_bytes, false);
}

void validate_batch_size(std::size_t tasks) {
  if (tasks > kMaxBatch) throw InvalidArgument("tasks", fmt::format("at most {} tasks per batch", kMaxBatch));
}

}  // namespace detail
}  // namespace eoq
