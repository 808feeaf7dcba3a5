// Cron expressions, TZif time zones, and the next fire time in a zone.
#include "worker/cron.hpp"

#include <eoq/errors.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace eoq::detail::cron {

namespace {

constexpr Seconds kDay = 86400;

Seconds floor_div(Seconds a, Seconds b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }
Seconds ceil_div(Seconds a, Seconds b) { return -floor_div(-a, b); }

// Days since 1970-01-01 <-> calendar dates (proleptic Gregorian).
std::chrono::year_month_day date_of(Seconds days) {
  return std::chrono::year_month_day{std::chrono::sys_days{std::chrono::days{days}}};
}
Seconds days_of(std::chrono::year_month_day ymd) { return std::chrono::sys_days{ymd}.time_since_epoch().count(); }
Seconds days_of(int y, unsigned m, unsigned d) {
  return days_of(std::chrono::year{y} / std::chrono::month{m} / std::chrono::day{d});
}
unsigned weekday_of(Seconds days) {
  return std::chrono::weekday{std::chrono::sys_days{std::chrono::days{days}}}.c_encoding();
}
unsigned month_length(int y, unsigned m) {
  return unsigned((std::chrono::year{y} / std::chrono::month{m} / std::chrono::last).day());
}
std::int64_t year_of(Seconds instant) { return int(date_of(floor_div(instant, kDay)).year()); }

// The first set bit at or after `from`, or `end`.
int next_bit(std::uint64_t set, int from, int end) {
  for (int i = from; i < end; ++i)
    if (set >> i & 1) return i;
  return end;
}

[[noreturn]] void bad_zone(std::string_view name, std::string_view why) {
  throw InvalidArgument("time_zone", fmt::format("'{}' is not a usable time zone: {}", name, why));
}

}  // namespace

// ----------------------------------------------------------------- POSIX TZ rules

struct Zone::Rule {
  // A day of the year, in the three forms POSIX allows.
  struct Date {
    char kind = 'M';  // 'J': Jn, 1..365 without Feb 29; 'N': n, 0..365 with it; 'M': Mm.w.d
    int n = 0, month = 0, week = 0, weekday = 0;
  };
  std::int32_t std_off = 0;  // seconds east of UTC
  std::int32_t dst_off = 0;
  bool has_dst = false;
  Date start, end;
  std::int32_t start_time = 7200, end_time = 7200;  // wall clock, before the change

  Seconds day(const Date& d, int y) const {
    if (d.kind == 'J') {
      bool leap = std::chrono::year{y}.is_leap();
      return days_of(y, 1, 1) + (d.n - 1) + (leap && d.n >= 60 ? 1 : 0);
    }
    if (d.kind == 'N') return days_of(y, 1, 1) + d.n;
    const Seconds first = days_of(y, unsigned(d.month), 1);
    Seconds dd = (d.weekday - int(weekday_of(first)) + 7) % 7 + 7 * (d.week - 1);
    // Week 5 means the last such weekday, which may be the fourth.
    while (dd >= Seconds(month_length(y, unsigned(d.month)))) dd -= 7;
    return first + dd;
  }

  struct Change {
    Seconds at;
    std::int32_t after;
    std::int64_t year;
  };
  // Both changes of each year in [first, last], ascending. Two at the same
  // instant (a rule for all-year daylight time, "EST5EDT,0/0,J365/25", ends one
  // year's DST where the next begins) keep the later one, the year's start.
  std::vector<Change> changes(std::int64_t first, std::int64_t last) const {
    std::vector<Change> out;
    for (std::int64_t y = first; y <= last; ++y) {
      out.push_back({day(start, int(y)) * kDay + start_time - std_off, dst_off, y});
      out.push_back({day(end, int(y)) * kDay + end_time - dst_off, std_off, y});
    }
    std::stable_sort(out.begin(), out.end(), [](const Change& a, const Change& b) { return a.at < b.at; });
    std::vector<Change> kept;
    for (const auto& c : out) {
      if (!kept.empty() && kept.back().at == c.at) kept.back() = c;
      else kept.push_back(c);
    }
    return kept;
  }

  std::int32_t offset_at(Seconds instant) const {
    if (!has_dst) return std_off;
    const auto y = year_of(instant);
    auto cs = changes(y - 2, y + 1);
    std::int32_t off = cs.front().after == dst_off ? std_off : dst_off;
    for (const auto& c : cs) {
      if (c.at > instant) break;
      off = c.after;
    }
    return off;
  }
};

namespace {

// Reads a POSIX TZ string as RFC 8536 (section 3.3) extends it: hours of a
// rule's time may be negative or up to 167.
class PosixParser {
 public:
  PosixParser(std::string_view s, std::string_view zone) : s_(s), zone_(zone) {}

  Zone::Rule parse() {
    Zone::Rule r;
    name();
    r.std_off = -offset(24);
    if (i_ == s_.size()) return r;
    name();
    r.has_dst = true;
    r.dst_off = r.std_off + 3600;
    if (i_ < s_.size() && s_[i_] != ',') r.dst_off = -offset(24);
    // zic always writes the rule; POSIX leaves a missing one to the implementation.
    if (i_ == s_.size()) fail("daylight time without a rule");
    expect(',');
    r.start = date();
    if (i_ < s_.size() && s_[i_] == '/') ++i_, r.start_time = offset(167);
    expect(',');
    r.end = date();
    if (i_ < s_.size() && s_[i_] == '/') ++i_, r.end_time = offset(167);
    if (i_ != s_.size()) fail("text after the rule");
    return r;
  }

 private:
  std::string_view s_, zone_;
  std::size_t i_ = 0;

  [[noreturn]] void fail(std::string_view why) const {
    bad_zone(zone_, fmt::format("its TZ rule '{}' is malformed ({})", s_, why));
  }
  void expect(char c) {
    if (i_ >= s_.size() || s_[i_] != c) fail(fmt::format("expected '{}' at position {}", c, i_));
    ++i_;
  }
  void name() {
    if (i_ < s_.size() && s_[i_] == '<') {
      auto close = s_.find('>', i_);
      if (close == std::string_view::npos || close == i_ + 1) fail("unterminated <name>");
      i_ = close + 1;
      return;
    }
    std::size_t start = i_;
    while (i_ < s_.size() && std::isalpha(static_cast<unsigned char>(s_[i_]))) ++i_;
    if (i_ - start < 3) fail("a zone abbreviation needs three letters");
  }
  long number(long max) {
    std::size_t start = i_;
    long v = 0;
    while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_])) && i_ - start < 4)
      v = v * 10 + (s_[i_++] - '0');
    if (i_ == start || v > max) fail(fmt::format("number out of range at position {}", start));
    return v;
  }
  // [+-]hh[:mm[:ss]] in seconds, sign as written (POSIX: positive is west).
  std::int32_t offset(long max_hours) {
    int sign = 1;
    if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) sign = s_[i_++] == '-' ? -1 : 1;
    long v = number(max_hours) * 3600;
    if (i_ < s_.size() && s_[i_] == ':') {
      ++i_;
      v += number(59) * 60;
      if (i_ < s_.size() && s_[i_] == ':') ++i_, v += number(59);
    }
    return static_cast<std::int32_t>(sign * v);
  }
  Zone::Rule::Date date() {
    Zone::Rule::Date d;
    if (i_ < s_.size() && s_[i_] == 'J') {
      ++i_;
      d.kind = 'J';
      d.n = int(number(365));
      if (d.n < 1) fail("Jn counts from 1");
    } else if (i_ < s_.size() && s_[i_] == 'M') {
      ++i_;
      d.kind = 'M';
      d.month = int(number(12));
      expect('.');
      d.week = int(number(5));
      expect('.');
      d.weekday = int(number(6));
      if (d.month < 1 || d.week < 1) fail("Mm.w.d counts months and weeks from 1");
    } else {
      d.kind = 'N';
      d.n = int(number(365));
    }
    return d;
  }
};

// Big-endian fields of a TZif file, bounds-checked.
class Bytes {
 public:
  Bytes(std::string_view b, std::string_view zone) : b_(b), zone_(zone) {}
  std::size_t pos = 0;
  void need(std::uint64_t n) const {
    if (n > b_.size() - pos) bad_zone(zone_, "the TZif file is truncated");
  }
  std::uint64_t unsigned_be(int n) {
    need(std::uint64_t(n));
    std::uint64_t v = 0;
    for (int k = 0; k < n; ++k) v = v << 8 | static_cast<unsigned char>(b_[pos++]);
    return v;
  }
  std::int64_t i64() { return static_cast<std::int64_t>(unsigned_be(8)); }
  std::int32_t i32() { return static_cast<std::int32_t>(static_cast<std::uint32_t>(unsigned_be(4))); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(unsigned_be(4)); }
  std::uint8_t u8() { return static_cast<std::uint8_t>(unsigned_be(1)); }
  std::string_view rest() const { return b_.substr(pos); }
  char at(std::size_t i) const { return b_[i]; }
  std::size_t size() const { return b_.size(); }

 private:
  std::string_view b_, zone_;
};

struct Header {
  char version;
  std::uint32_t isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt;
  std::uint64_t data_size(int time_bytes) const {
    return std::uint64_t(timecnt) * (time_bytes + 1) + std::uint64_t(typecnt) * 6 + charcnt +
           std::uint64_t(leapcnt) * (time_bytes + 4) + isstdcnt + isutcnt;
  }
};

Header header(Bytes& in, std::string_view zone) {
  in.need(44);
  if (in.rest().substr(0, 4) != "TZif") bad_zone(zone, "the file is not TZif (it does not begin with \"TZif\")");
  in.pos += 4;
  Header h{};
  h.version = static_cast<char>(in.u8());
  in.pos += 15;
  h.isutcnt = in.u32();
  h.isstdcnt = in.u32();
  h.leapcnt = in.u32();
  h.timecnt = in.u32();
  h.typecnt = in.u32();
  h.charcnt = in.u32();
  if (h.typecnt == 0 || (h.isutcnt != 0 && h.isutcnt != h.typecnt) || (h.isstdcnt != 0 && h.isstdcnt != h.typecnt))
    bad_zone(zone, "the TZif header's counts are inconsistent");
  return h;
}

}  // namespace

// ----------------------------------------------------------------- Zone

Zone::Zone() = default;
Zone::~Zone() = default;

std::shared_ptr<const Zone> Zone::utc() {
  static const std::shared_ptr<const Zone> zone = [] {
    auto z = std::make_shared<Zone>();
    z->name_ = "UTC";
    return z;
  }();
  return zone;
}

std::shared_ptr<const Zone> Zone::from_posix(std::string_view tz, std::string name) {
  auto z = std::make_shared<Zone>();
  z->rule_ = std::make_unique<Rule>(PosixParser(tz, name).parse());
  z->initial_ = z->rule_->std_off;
  z->name_ = std::move(name);
  return z;
}

std::shared_ptr<const Zone> Zone::from_tzif(std::string_view bytes, std::string name) {
  Bytes in(bytes, name);
  Header h = header(in, name);
  int time_bytes = 4;
  if (h.version >= '2') {
    // Skip the 32-bit data: the 64-bit copy after it covers all of time.
    in.need(h.data_size(4));
    in.pos += h.data_size(4);
    h = header(in, name);
    time_bytes = 8;
  }
  in.need(h.data_size(time_bytes));
  if (h.leapcnt != 0)
    bad_zone(name, "it counts leap seconds (a right/ zone); use the zone of the same name outside right/");
  auto z = std::make_shared<Zone>();
  z->name_ = std::move(name);
  std::vector<Seconds> at(h.timecnt);
  for (auto& t : at) t = time_bytes == 8 ? in.i64() : in.i32();
  std::vector<std::uint8_t> type(h.timecnt);
  for (auto& t : type) t = in.u8();
  std::vector<std::int32_t> utoff(h.typecnt);
  for (auto& u : utoff) {
    u = in.i32();
    in.pos += 2;  // isdst, abbreviation index: a schedule needs neither
    // RFC 8536's range; anything wider is a damaged file, not a place on Earth.
    if (u < -89999 || u > 93599) bad_zone(z->name_, fmt::format("a UTC offset of {} s is out of range", u));
  }
  in.pos += h.charcnt + std::uint64_t(h.isstdcnt) + h.isutcnt;
  for (std::size_t i = 0; i < at.size(); ++i) {
    if (type[i] >= h.typecnt) bad_zone(z->name_, "a transition names a type the file does not have");
    if (i > 0 && at[i] <= at[i - 1]) bad_zone(z->name_, "its transition times are not ascending");
  }
  z->at_ = std::move(at);
  z->off_.reserve(type.size());
  for (auto t : type) z->off_.push_back(utoff[t]);
  z->initial_ = utoff[0];
  if (time_bytes == 8) {
    // The footer: "\n<POSIX TZ string>\n"; empty means no rule.
    if (in.pos >= in.size() || in.at(in.pos) != '\n') bad_zone(z->name_, "the TZif footer is missing");
    auto rest = in.rest().substr(1);
    auto nl = rest.find('\n');
    if (nl == std::string_view::npos) bad_zone(z->name_, "the TZif footer is unterminated");
    if (nl > 0) z->rule_ = std::make_unique<Rule>(PosixParser(rest.substr(0, nl), z->name_).parse());
    if (z->rule_ && z->at_.empty()) z->initial_ = z->rule_->std_off;
  }
  return z;
}

std::shared_ptr<const Zone> Zone::load(std::string_view name) {
  if (name == "UTC") return utc();
  const bool chars_ok = std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '/' || c == '_' || c == '-' || c == '+' || c == '.';
  });
  // The name becomes a path: nothing may lead it out of the zone directory.
  if (name.empty() || name.size() > 255 || !chars_ok || name.front() == '/' ||
      name.find("..") != std::string_view::npos)
    throw InvalidArgument("time_zone", fmt::format("'{}' is not an IANA time zone name such as \"America/New_York\" "
                                                   "(letters, digits, '/', '_', '-', '+', '.'; no leading '/', no '..')",
                                                   name));
  const char* env = std::getenv("TZDIR");
  const std::string dir = env && *env ? env : "/usr/share/zoneinfo";
  const std::filesystem::path path = std::filesystem::path(dir) / std::string(name);
  std::error_code ec;
  const bool is_file = std::filesystem::is_regular_file(path, ec);
  std::ifstream file;
  if (is_file) file.open(path, std::ios::binary);
  if (!is_file || !file)
    throw InvalidArgument("time_zone", fmt::format("unknown time zone '{}': no such zone file in {} (Debian's "
                                                   "tzdata package installs them; $TZDIR names another directory)",
                                                   name, dir));
  constexpr std::size_t kMaxFile = 1 << 20;
  std::string bytes;
  char buf[4096];
  while (file.read(buf, sizeof buf) || file.gcount() > 0) {
    bytes.append(buf, static_cast<std::size_t>(file.gcount()));
    if (bytes.size() > kMaxFile) bad_zone(name, "the file is larger than any TZif zone");
  }
  return from_tzif(bytes, std::string(name));
}

std::int32_t Zone::table_offset(Seconds instant) const {
  auto it = std::upper_bound(at_.begin(), at_.end(), instant);
  return it == at_.begin() ? initial_ : off_[std::size_t(it - at_.begin()) - 1];
}

bool Zone::rule_applies(Seconds instant) const { return rule_ && (at_.empty() || instant >= at_.back()); }

std::int32_t Zone::offset_at(Seconds instant) const {
  return rule_applies(instant) ? rule_->offset_at(instant) : table_offset(instant);
}

std::vector<Zone::Transition> Zone::rule_changes(std::int64_t first_year, std::int64_t last_year) const {
  std::vector<Transition> out;
  if (!rule_ || !rule_->has_dst) return out;
  // A year of run-up, so the first change of `first_year` knows the offset before it.
  auto cs = rule_->changes(first_year - 1, last_year);
  std::int32_t off = cs.front().after == rule_->dst_off ? rule_->std_off : rule_->dst_off;
  for (const auto& c : cs) {
    if (c.after != off && c.year >= first_year) out.push_back({c.at, off, c.after});
    off = c.after;
  }
  return out;
}

std::optional<Zone::Transition> Zone::next_transition(Seconds instant) const {
  if (!at_.empty() && instant < at_.back()) {
    for (auto i = std::size_t(std::upper_bound(at_.begin(), at_.end(), instant) - at_.begin()); i < at_.size(); ++i) {
      std::int32_t before = i == 0 ? initial_ : off_[i - 1];
      if (off_[i] != before) return Transition{at_[i], before, off_[i]};
    }
  }
  const Seconds from = at_.empty() ? instant : std::max(instant, at_.back());
  const auto y = year_of(from);
  for (const auto& c : rule_changes(y - 1, y + 2))
    if (c.at > from) return c;
  return std::nullopt;
}

std::optional<Zone::Transition> Zone::last_transition(Seconds instant) const {
  if (rule_applies(instant)) {
    const auto y = year_of(instant);
    auto cs = rule_changes(y - 2, y + 1);
    for (auto it = cs.rbegin(); it != cs.rend(); ++it)
      if (it->at <= instant && (at_.empty() || it->at > at_.back())) return *it;
  }
  for (auto i = std::size_t(std::upper_bound(at_.begin(), at_.end(), instant) - at_.begin()); i-- > 0;) {
    std::int32_t before = i == 0 ? initial_ : off_[i - 1];
    if (off_[i] != before) return Transition{at_[i], before, off_[i]};
  }
  return std::nullopt;
}

// ----------------------------------------------------------------- parsing

namespace {

struct FieldSpec {
  const char* what;
  int lo, hi;
  const std::array<const char*, 12>* names;  // names[i] is value names_base + i
  int names_base;
};

constexpr std::array<const char*, 12> kMonths = {"jan", "feb", "mar", "apr", "may", "jun",
                                                 "jul", "aug", "sep", "oct", "nov", "dec"};
constexpr std::array<const char*, 12> kDays = {"sun", "mon", "tue", "wed", "thu", "fri", "sat", "", "", "", "", ""};

const FieldSpec kFields[5] = {
    {"minute", 0, 59, nullptr, 0},
    {"hour", 0, 23, nullptr, 0},
    {"day-of-month", 1, 31, nullptr, 0},
    {"month", 1, 12, &kMonths, 1},
    {"day-of-week", 0, 7, &kDays, 0},
};

struct Field {
  std::uint64_t bits = 0;
  bool star = false;  // begins with '*', the test cronie's day rule and DST handling use
};

[[noreturn]] void bad_field(const FieldSpec& f, std::string_view token, std::string_view why) {
  throw InvalidArgument("schedule", fmt::format("{} field '{}' {}", f.what, token, why));
}

int value(const FieldSpec& f, std::string_view token, std::string_view field_text) {
  if (!token.empty() && std::isdigit(static_cast<unsigned char>(token.front()))) {
    int v = 0;
    auto [p, ec] = std::from_chars(token.data(), token.data() + token.size(), v);
    if (ec == std::errc::result_out_of_range || (ec == std::errc() && p == token.data() + token.size())) {
      if (ec != std::errc() || v < f.lo || v > f.hi)
        bad_field(f, token, fmt::format("is out of range {}-{}", f.lo, f.hi));
      return v;
    }
  }
  if (f.names && token.size() == 3) {
    for (std::size_t i = 0; i < f.names->size(); ++i) {
      const char* n = (*f.names)[i];
      bool same = n[0] != '\0';
      for (std::size_t k = 0; same && k < 3; ++k)
        same = std::tolower(static_cast<unsigned char>(token[k])) == n[k];
      if (same) return f.names_base + int(i);
    }
  }
  bad_field(f, field_text,
            f.names == &kMonths  ? "is not a number or a month name (jan-dec)"
            : f.names == &kDays ? "is not a number or a day name (sun-sat)"
                                : "is not a number");
}

Field parse_field(const FieldSpec& f, std::string_view text) {
  Field out;
  out.star = text.front() == '*';
  std::size_t start = 0;
  for (;;) {
    auto comma = text.find(',', start);
    std::string_view item = text.substr(start, comma == std::string_view::npos ? text.npos : comma - start);
    if (item.empty()) bad_field(f, text, "has an empty list element");
    std::string_view range = item;
    int step = 1;
    bool has_step = false;
    if (auto slash = item.find('/'); slash != std::string_view::npos) {
      range = item.substr(0, slash);
      std::string_view s = item.substr(slash + 1);
      int v = 0;
      auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
      if (s.empty() || ec != std::errc() || p != s.data() + s.size()) bad_field(f, item, "has a step that is not a number");
      if (v < 1 || v > f.hi) bad_field(f, item, fmt::format("has a step out of range 1-{}", f.hi));
      step = v;
      has_step = true;
    }
    int lo = 0, hi = 0;
    if (range == "*") {
      lo = f.lo;
      hi = f.hi;
    } else if (auto dash = range.find('-'); dash != std::string_view::npos) {
      lo = value(f, range.substr(0, dash), item);
      hi = value(f, range.substr(dash + 1), item);
      if (hi < lo) bad_field(f, item, "is a range that runs backwards");
    } else {
      // cronie reads "5/15" as an error too; say what was likely meant.
      if (has_step) bad_field(f, item, fmt::format("has a step without a range (write {}-{}/{})", range, f.hi, step));
      lo = hi = value(f, range, item);
    }
    for (int v = lo; v <= hi; v += step) out.bits |= std::uint64_t{1} << v;
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace

Schedule Schedule::parse(std::string_view expression) {
  auto is_space = [](char c) { return c == ' ' || c == '\t'; };
  while (!expression.empty() && is_space(expression.front())) expression.remove_prefix(1);
  while (!expression.empty() && is_space(expression.back())) expression.remove_suffix(1);
  constexpr const char* kForms = "must have 5 fields (minute hour day-of-month month day-of-week) or be one of "
                                 "@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly";
  if (!expression.empty() && expression.front() == '@') {
    std::string lower;
    for (char c : expression) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    static constexpr std::pair<const char*, const char*> kNicknames[] = {
        {"@yearly", "0 0 1 1 *"}, {"@annually", "0 0 1 1 *"}, {"@monthly", "0 0 1 * *"}, {"@weekly", "0 0 * * 0"},
        {"@daily", "0 0 * * *"},  {"@midnight", "0 0 * * *"}, {"@hourly", "0 * * * *"}};
    for (const auto& [nick, expansion] : kNicknames)
      if (lower == nick) return parse(expansion);
    throw InvalidArgument("schedule", fmt::format("'{}' is not a known @-form: the schedule {}", expression, kForms));
  }
  std::vector<std::string_view> fields;
  for (std::size_t i = 0; i < expression.size();) {
    if (is_space(expression[i])) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < expression.size() && !is_space(expression[j])) ++j;
    fields.push_back(expression.substr(i, j - i));
    i = j;
  }
  if (fields.size() != 5)
    throw InvalidArgument("schedule", fmt::format("{}; '{}' has {} field{}", kForms, expression, fields.size(),
                                                  fields.size() == 1 ? "" : "s"));
  Field f[5];
  for (int i = 0; i < 5; ++i) f[i] = parse_field(kFields[i], fields[std::size_t(i)]);
  Schedule s;
  s.minute_ = f[0].bits;
  s.hour_ = static_cast<std::uint32_t>(f[1].bits);
  s.dom_ = static_cast<std::uint32_t>(f[2].bits);
  s.month_ = static_cast<std::uint32_t>(f[3].bits);
  s.dow_ = static_cast<std::uint32_t>((f[4].bits | f[4].bits >> 7) & 0x7f);  // 7 is Sunday too
  s.minute_star_ = f[0].star;
  s.hour_star_ = f[1].star;
  s.dom_star_ = f[2].star;
  s.dow_star_ = f[4].star;
  // When both day fields must match, a day of the month that no listed month
  // has (Feb 30, Apr 31) would make the search run to the horizon on every call.
  if (s.dom_star_ || s.dow_star_) {
    bool some = false;
    for (unsigned m = 1; m <= 12 && !some; ++m)
      if (s.month_ >> m & 1) some = next_bit(s.dom_, 1, int(month_length(2000, m)) + 1) <= int(month_length(2000, m));
    if (!some)
      throw InvalidArgument("schedule", fmt::format("day-of-month field '{}' names no day that the months of the "
                                                    "month field '{}' have: the schedule never fires",
                                                    fields[2], fields[3]));
  }
  return s;
}

// ----------------------------------------------------------------- matching and searching

bool Schedule::day_matches(std::int64_t days) const {
  const bool dom = dom_ >> unsigned(date_of(days).day()) & 1;
  const bool dow = dow_ >> weekday_of(days) & 1;
  return dom_star_ || dow_star_ ? dom && dow : dom || dow;
}

bool Schedule::matches(Seconds local) const {
  const Seconds days = floor_div(local, kDay);
  const Seconds sod = local - days * kDay;
  return (month_ >> unsigned(date_of(days).month()) & 1) && day_matches(days) && (hour_ >> (sod / 3600) & 1) &&
         (minute_ >> (sod % 3600 / 60) & 1);
}

std::optional<Seconds> Schedule::next_match(Seconds from, Seconds last) const {
  Seconds t = ceil_div(from, 60) * 60;
  while (t <= last) {
    const Seconds days = floor_div(t, kDay);
    const Seconds sod = t - days * kDay;
    const auto ymd = date_of(days);
    if (!(month_ >> unsigned(ymd.month()) & 1)) {
      t = days_of(std::chrono::year_month_day{ymd.year() / ymd.month() / 1} + std::chrono::months{1}) * kDay;
      continue;
    }
    if (!day_matches(days)) {
      t = (days + 1) * kDay;
      continue;
    }
    const int h = int(sod / 3600), m = int(sod % 3600 / 60);
    if (!(hour_ >> h & 1)) {
      int nh = next_bit(hour_, h + 1, 24);
      t = nh < 24 ? days * kDay + nh * 3600 : (days + 1) * kDay;
      continue;
    }
    if (!(minute_ >> m & 1)) {
      int nm = next_bit(minute_, m + 1, 60);
      t = nm < 60 ? days * kDay + h * 3600 + nm * 60 : days * kDay + (h + 1) * 3600;
      continue;
    }
    return t;
  }
  return std::nullopt;
}

// Daylight saving, decided once for all zones and transitions (cronie's rules,
// which split jobs the same way; Oban's Cron plugin has no special case and
// simply tests the wall clock each minute):
//
// * A fixed-time schedule (neither minute nor hour begins with '*': "30 2 * * *")
//   names wall-clock times to be reached. Each fires once, when the wall clock
//   first reaches it: a time skipped by a jump forward fires at the jump (the
//   first instant after the gap, 03:00 local for 02:30 in New York), a time
//   shown twice by a jump back fires at its first occurrence only. In the
//   wall clock's terms: it fires when the highest time shown so far passes it.
// * Any other schedule ("*/15 * * * *", "30 * * * *") runs with the clock: it
//   fires at every instant whose wall time matches. It skips the minutes a jump
//   forward removes and fires in both copies of a repeated hour, which are
//   distinct instants: "every 15 minutes" stays every 15 real minutes, "hourly"
//   stays hourly, across both transitions. cronie runs these jobs the same way.
//
// The search walks the zone's stretches of constant offset, in order: in each,
// the first matching wall time not below the floor (the high-water mark for
// fixed-time schedules) is the answer if it falls inside the stretch; between
// stretches, a jump forward fires a fixed-time schedule that matches inside it.
std::optional<Seconds> Schedule::next_after(Seconds instant, const Zone& zone) const {
  const Seconds x = instant + 1;
  const Seconds stop = x + kHorizon;
  const bool fixed = fixed_time();
  auto gap_fires = [&](const Zone::Transition& tr) {
    return fixed && tr.after > tr.before && next_match(tr.at + tr.before, tr.at + tr.after - 1).has_value();
  };
  std::int32_t off = zone.offset_at(x);
  Seconds floor = x + off;
  if (fixed) {
    if (auto last = zone.last_transition(x)) {
      if (last->at == x && gap_fires(*last)) return x;
      if (last->before > last->after) floor = std::max(floor, last->at + last->before);
    }
  }
  for (Seconds from = x;;) {
    auto next = zone.next_transition(from);
    const Seconds end = next ? std::min(next->at, stop) : stop;
    if (auto m = next_match(floor, end - 1 + off)) return *m - off;
    if (!next || next->at >= stop) return std::nullopt;
    if (gap_fires(*next)) return next->at;
    off = next->after;
    from = next->at;
    floor = fixed ? std::max(next->at + next->before, next->at + next->after) : next->at + next->after;
  }
}

// By bisection over next_after, which is monotonic: the latest fire time at or
// before `instant` is next_after(x) for the largest x whose next_after is not
// past `instant`. The window doubles twice per step until it holds a fire time.
std::optional<Seconds> Schedule::latest_at_or_before(Seconds instant, const Zone& zone) const {
  Seconds lo = 0, hi = instant;
  for (Seconds w = 60;; w *= 4) {
    if (w > kHorizon) return std::nullopt;
    auto f = next_after(instant - w, zone);
    if (f && *f <= instant) {
      lo = instant - w;
      break;
    }
    hi = instant - w;
  }
  while (hi - lo > 1) {
    const Seconds mid = lo + (hi - lo) / 2;
    auto f = next_after(mid, zone);
    if (f && *f <= instant) lo = mid;
    else hi = mid;
  }
  return next_after(lo, zone);
}

}  // namespace eoq::detail::cron
