#include "json/task_json.hpp"

#include <eoq/errors.hpp>

#include <fmt/format.h>

#include <charconv>
#include <ctime>

namespace eoq::json {
namespace {

using nlohmann::json;

json opt(const std::optional<std::string>& s) { return s ? json(*s) : json(nullptr); }
json opt_time(const std::optional<TimePoint>& t) { return t ? json(format_time(*t)) : json(nullptr); }
// Stored JSON text is valid by construction (both stores validate it on the way in).
json embedded(const std::optional<std::string>& text) {
  if (!text) return nullptr;
  try {
    return json::parse(*text);
  } catch (const json::exception&) {
    // Stored before the stores refused numbers beyond a double: show the text
    // rather than fail every listing that contains the task.
    return *text;
  }
}

[[noreturn]] void bad(std::string_view field, std::string rule) {
  throw InvalidArgument(std::string(field), std::move(rule));
}

const char* type_name(const json& v) { return v.type_name(); }

std::string want_string(std::string_view field, const json& v) {
  if (!v.is_string()) bad(field, fmt::format("must be a string, not {}", type_name(v)));
  return v.get<std::string>();
}

std::int64_t want_integer(std::string_view field, const json& v, std::int64_t lo, std::int64_t hi) {
  if (!v.is_number_integer()) bad(field, fmt::format("must be an integer, not {}", type_name(v)));
  if (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(hi))
    bad(field, fmt::format("must be between {} and {}", lo, hi));
  auto n = v.get<std::int64_t>();
  if (n < lo || n > hi) bad(field, fmt::format("must be between {} and {}", lo, hi));
  return n;
}

int parse_int(std::string_view s, std::size_t pos, std::size_t len, bool& ok) {
  int value = 0;
  if (pos + len > s.size()) { ok = false; return 0; }
  auto [p, ec] = std::from_chars(s.data() + pos, s.data() + pos + len, value);
  if (ec != std::errc() || p != s.data() + pos + len) ok = false;
  return value;
}

}  // namespace

std::string format_time(TimePoint t) {
  auto us = t.time_since_epoch().count();
  auto secs = us / 1000000;
  auto frac = us % 1000000;
  if (frac < 0) { frac += 1000000; --secs; }
  std::time_t tt = static_cast<std::time_t>(secs);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                     tm.tm_hour, tm.tm_min, tm.tm_sec, frac);
}

TimePoint parse_time(std::string_view field, std::string_view s) {
  const auto rule = "must be an RFC 3339 time such as 2026-11-23T10:00:00Z";
  bool ok = s.size() >= 20 && s[4] == '-' && s[7] == '-' && (s[10] == 'T' || s[10] == 't' || s[10] == ' ') &&
            s[13] == ':' && s[16] == ':';
  if (!ok) bad(field, rule);
  std::tm tm{};
  tm.tm_year = parse_int(s, 0, 4, ok) - 1900;
  tm.tm_mon = parse_int(s, 5, 2, ok) - 1;
  tm.tm_mday = parse_int(s, 8, 2, ok);
  tm.tm_hour = parse_int(s, 11, 2, ok);
  tm.tm_min = parse_int(s, 14, 2, ok);
  tm.tm_sec = parse_int(s, 17, 2, ok);
  if (!ok || tm.tm_mon < 0 || tm.tm_mon > 11 || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23 ||
      tm.tm_min > 59 || tm.tm_sec > 60)
    bad(field, rule);
  std::size_t pos = 19;
  std::int64_t micros = 0;
  if (pos < s.size() && s[pos] == '.') {
    ++pos;
    int digits = 0;
    while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') {
      if (digits < 6) micros = micros * 10 + (s[pos] - '0');
      ++digits;
      ++pos;
    }
    if (digits == 0) bad(field, rule);
    for (int d = digits; d < 6; ++d) micros *= 10;
  }
  std::int64_t offset_s = 0;
  if (pos < s.size() && (s[pos] == 'Z' || s[pos] == 'z')) {
    ++pos;
  } else if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) {
    int sign = s[pos] == '-' ? -1 : 1;
    if (pos + 6 != s.size() || s[pos + 3] != ':') bad(field, rule);
    int hh = parse_int(s, pos + 1, 2, ok), mm = parse_int(s, pos + 4, 2, ok);
    if (!ok || hh > 23 || mm > 59) bad(field, rule);
    offset_s = sign * (hh * 3600 + mm * 60);
    pos += 6;
  } else {
    bad(field, std::string(rule) + " (the time zone is required)");
  }
  if (pos != s.size()) bad(field, rule);
  std::int64_t secs = timegm(&tm) - offset_s;
  return TimePoint(std::chrono::microseconds(secs * 1000000 + micros));
}

json to_json(const Task& t) {
  return json{
      {"id", t.id},
      {"queue", t.queue},
      {"type", t.type},
      {"key", opt(t.key)},
      {"tenant", opt(t.tenant)},
      {"status", to_string(t.status)},
      {"priority", t.priority},
      {"payload", embedded(t.payload)},
      {"run_at", format_time(t.run_at)},
      {"deadline", opt_time(t.deadline)},
      {"attempts", t.attempts},
      {"retry",
       {{"max_attempts", t.retry.max_attempts},
        {"backoff", t.retry.backoff == Backoff::fixed ? "fixed" : "exponential"},
        {"initial_delay_ms", t.retry.initial_delay.count()},
        {"max_delay_ms", t.retry.max_delay.count()},
        {"jitter", t.retry.jitter}}},
      {"version", t.version},
      {"lease_owner", opt(t.lease_owner)},
      {"lease_expires_at", opt_time(t.lease_expires_at)},
      {"started_at", opt_time(t.started_at)},
      {"cancel_requested", t.cancel_requested},
      {"progress", t.progress},
      {"stage", t.stage},
      {"checkpoint_stage", opt(t.checkpoint_stage)},
      {"checkpoint", embedded(t.checkpoint)},
      {"result", embedded(t.result)},
      {"last_error", opt(t.last_error)},
      {"created_at", format_time(t.created_at)},
      {"updated_at", format_time(t.updated_at)},
      {"finished_at", opt_time(t.finished_at)},
      {"partition", opt(t.partition)},
      {"timeout_ms", t.timeout ? json(t.timeout->count()) : json(nullptr)},
  };
}

json to_json(const QueueLimits& l) {
  auto rate = [](const std::optional<RateLimit>& r) {
    return r ? json{{"limit", r->limit}, {"period_ms", r->period.count()}} : json(nullptr);
  };
  auto count = [](const std::optional<int>& n) { return n ? json(*n) : json(nullptr); };
  return json{{"concurrency", count(l.concurrency)},
              {"partition_concurrency", count(l.partition_concurrency)},
              {"rate", rate(l.rate)},
              {"partition_rate", rate(l.partition_rate)}};
}

QueueLimits limits_from_json(const json& body) {
  if (!body.is_object()) bad("body", fmt::format("must be a JSON object, not {}", type_name(body)));
  QueueLimits l;
  auto rate = [](const std::string& field, const json& v) -> std::optional<RateLimit> {
    if (v.is_null()) return std::nullopt;
    if (!v.is_object()) bad(field, fmt::format("must be an object {{\"limit\": N, \"period_ms\": MS}} or null, not {}",
                                               type_name(v)));
    RateLimit r;
    bool has_limit = false, has_period = false;
    for (const auto& [n, x] : v.items()) {
      if (n == "limit") {
        r.limit = static_cast<int>(want_integer(field + ".limit", x, -2147483648LL, 2147483647LL));
        has_limit = true;
      } else if (n == "period_ms") {
        r.period = Millis(want_integer(field + ".period", x, -(1LL << 53), 1LL << 53));
        has_period = true;
      } else {
        bad(field + "." + n, "is not a known field (known: limit, period_ms)");
      }
    }
    if (!has_limit) bad(field + ".limit", "is required");
    if (!has_period) bad(field + ".period", "is required");
    return r;
  };
  for (const auto& [name, v] : body.items()) {
    const std::string field = "limits." + name;
    if (name == "concurrency" || name == "partition_concurrency") {
      std::optional<int> n;
      if (!v.is_null()) n = static_cast<int>(want_integer(field, v, -2147483648LL, 2147483647LL));
      (name == "concurrency" ? l.concurrency : l.partition_concurrency) = n;
    } else if (name == "rate") {
      l.rate = rate(field, v);
    } else if (name == "partition_rate") {
      l.partition_rate = rate(field, v);
    } else {
      bad(field, "is not a known field (known: concurrency, partition_concurrency, rate, partition_rate)");
    }
  }
  return l;
}

json to_json(const Relatives& r) {
  auto list = [](const std::vector<Relative>& rs) {
    json out = json::array();
    for (const auto& x : rs)
      out.push_back({{"id", x.id}, {"type", x.type}, {"status", to_string(x.status)}, {"result", embedded(x.result)}});
    return out;
  };
  return json{{"parents", list(r.parents)}, {"children", list(r.children)}};
}

json to_json(const Attempt& a) {
  return json{{"number", a.number},
              {"owner", a.owner},
              {"started_at", format_time(a.started_at)},
              {"finished_at", opt_time(a.finished_at)},
              {"outcome", a.outcome},
              {"error", opt(a.error)}};
}

json to_json(const QueueStats& s) {
  return json{{"queue", s.queue},
              {"pending", s.pending},
              {"running", s.running},
              {"succeeded", s.succeeded},
              {"failed", s.failed},
              {"cancelled", s.cancelled},
              {"expired", s.expired},
              {"waiting", s.waiting},
              {"oldest_pending_age_ms", s.oldest_pending_age ? json(s.oldest_pending_age->count()) : json(nullptr)},
              {"succeeded_last_minute", s.succeeded_last_minute},
              {"failed_last_minute", s.failed_last_minute},
              {"succeeded_total", s.succeeded_total},
              {"failed_total", s.failed_total},
              {"cancelled_total", s.cancelled_total},
              {"expired_total", s.expired_total},
              {"paused", s.paused},
              {"limits", to_json(s.limits)}};
}

json to_json(const TaskPage& page) {
  json tasks = json::array();
  for (const auto& t : page.tasks) tasks.push_back(to_json(t));
  return json{{"tasks", std::move(tasks)}, {"next_after", page.next_after ? json(*page.next_after) : json(nullptr)}};
}

NewTask new_task_from_json(const json& body) {
  if (!body.is_object()) bad("body", fmt::format("must be a JSON object, not {}", type_name(body)));
  NewTask t;
  bool has_type = false;
  for (const auto& [name, v] : body.items()) {
    if (name == "queue") {
      t.queue = want_string(name, v);
    } else if (name == "type") {
      t.type = want_string(name, v);
      has_type = true;
    } else if (name == "payload") {
      t.payload = v.dump();
    } else if (name == "key") {
      if (!v.is_null()) t.key = want_string(name, v);
    } else if (name == "tenant") {
      if (!v.is_null()) t.tenant = want_string(name, v);
    } else if (name == "partition") {
      if (!v.is_null()) t.partition = want_string(name, v);
    } else if (name == "timeout_ms") {
      if (!v.is_null()) t.timeout = Millis(want_integer("timeout", v, -(1LL << 53), 1LL << 53));
    } else if (name == "key_reuse") {
      auto k = want_string(name, v);
      if (k == "strict") t.key_reuse = KeyReuse::strict;
      else if (k == "lenient") t.key_reuse = KeyReuse::lenient;
      else bad(name, "must be \"strict\" or \"lenient\"");
    } else if (name == "priority") {
      t.priority = static_cast<int>(want_integer(name, v, -32768, 32767));
    } else if (name == "run_at") {
      if (!v.is_null()) t.run_at = parse_time(name, want_string(name, v));
    } else if (name == "deadline") {
      if (!v.is_null()) t.deadline = parse_time(name, want_string(name, v));
    } else if (name == "retry") {
      if (!v.is_object()) bad("retry", fmt::format("must be an object, not {}", type_name(v)));
      for (const auto& [rn, rv] : v.items()) {
        auto field = "retry." + rn;
        if (rn == "max_attempts") {
          t.retry.max_attempts = static_cast<int>(want_integer(field, rv, 1, 1000));
        } else if (rn == "backoff") {
          auto b = want_string(field, rv);
          if (b == "fixed") t.retry.backoff = Backoff::fixed;
          else if (b == "exponential") t.retry.backoff = Backoff::exponential;
          else bad(field, "must be \"fixed\" or \"exponential\"");
        } else if (rn == "initial_delay_ms") {
          t.retry.initial_delay = Millis(want_integer(field, rv, 0, 365LL * 24 * 3600 * 1000));
        } else if (rn == "max_delay_ms") {
          t.retry.max_delay = Millis(want_integer(field, rv, 0, 365LL * 24 * 3600 * 1000));
        } else if (rn == "jitter") {
          if (!rv.is_number()) bad(field, fmt::format("must be a number, not {}", type_name(rv)));
          t.retry.jitter = rv.get<double>();
        } else {
          bad(field, "is not a known field (known: max_attempts, backoff, initial_delay_ms, max_delay_ms, jitter)");
        }
      }
    } else {
      bad(name, "is not a known field (known: queue, type, payload, key, key_reuse, tenant, partition, priority, "
                "run_at, deadline, timeout_ms, retry)");
    }
  }
  if (!has_type) bad("type", "is required");
  return t;
}

}  // namespace eoq::json
