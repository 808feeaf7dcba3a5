// Cron schedules: the expression parser, the TZif zone reader, the next fire
// time in a zone (daylight-saving days of 2026 worked out by hand, and a few
// hundred random cases against a brute-force scan through glibc's own reading
// of the same zone files), and Scheduler::cron / Worker::cron on both stores.
#include <catch2/catch.hpp>

#include "support.hpp"
#include "worker/cron.hpp"

#include <eoq/eoq.hpp>

#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <mutex>
#include <random>
#include <set>
#include <thread>

using namespace std::chrono_literals;
using eoq::test::StoreKind;
namespace cron = eoq::detail::cron;
using cron::Seconds;

// Runs the rest of the test case once per store (as worker_test.cpp does).
#define EOQ_EACH_STORE(store)                                                      \
  const StoreKind store##_kind = GENERATE(StoreKind::memory, StoreKind::postgres); \
  INFO("store: " << eoq::test::to_string(store##_kind));                          \
  eoq::test::TestStore store##_owner(store##_kind);                                \
  eoq::TaskStore& store = *store##_owner

namespace {

Seconds utc(int y, int mo, int d, int h = 0, int mi = 0, int s = 0) {
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = s;
  return static_cast<Seconds>(timegm(&tm));
}

std::string iso(std::optional<Seconds> t) {
  if (!t) return "never";
  std::time_t tt = static_cast<std::time_t>(*t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::optional<Seconds> next(std::string_view expr, std::string_view zone, Seconds after) {
  return cron::Schedule::parse(expr).next_after(after, *cron::Zone::load(zone));
}

// The next n fire times after `after`, as ISO strings.
std::vector<std::string> fires(std::string_view expr, std::string_view zone, Seconds after, int n) {
  auto s = cron::Schedule::parse(expr);
  auto z = cron::Zone::load(zone);
  std::vector<std::string> out;
  std::optional<Seconds> t = after;
  for (int i = 0; i < n && t; ++i) {
    t = s.next_after(*t, *z);
    out.push_back(iso(t));
  }
  return out;
}

// The rule of the InvalidArgument a call throws, with its field: "field: rule".
template <class F>
std::string refusal(F&& f) {
  try {
    f();
  } catch (const eoq::InvalidArgument& e) {
    return e.field() + ": " + e.rule();
  }
  return "accepted";
}

std::string schedule_error(std::string_view expr) {
  return refusal([&] { cron::Schedule::parse(expr); });
}

// The values of one field a schedule matches, read through matches() on a
// wall-clock time that the other fields match.
std::set<int> minutes(std::string_view expr) {
  auto s = cron::Schedule::parse(expr);
  std::set<int> out;
  for (int m = 0; m < 60; ++m)
    if (s.matches(utc(2026, 1, 5, 0, m))) out.insert(m);
  return out;
}
std::set<int> hours(std::string_view expr) {
  auto s = cron::Schedule::parse(expr);
  std::set<int> out;
  for (int h = 0; h < 24; ++h)
    if (s.matches(utc(2026, 1, 5, h, 0))) out.insert(h);
  return out;
}
std::set<int> months(std::string_view expr) {
  auto s = cron::Schedule::parse(expr);
  std::set<int> out;
  for (int m = 1; m <= 12; ++m)
    if (s.matches(utc(2026, m, 1))) out.insert(m);
  return out;
}
// Days of March 2026 (the 1st is a Sunday, so day d is weekday (d - 1) % 7).
std::set<int> march_days(std::string_view expr) {
  auto s = cron::Schedule::parse(expr);
  std::set<int> out;
  for (int d = 1; d <= 31; ++d)
    if (s.matches(utc(2026, 3, d))) out.insert(d);
  return out;
}

}  // namespace

// ------------------------------------------------------------------ parsing

TEST_CASE("cron fields: values, lists, ranges, steps", "[cron]") {
  CHECK(minutes("* 0 * * *").size() == 60);
  CHECK(minutes("7 0 * * *") == std::set<int>{7});
  CHECK(minutes("1,2,5-7 0 * * *") == std::set<int>{1, 2, 5, 6, 7});
  CHECK(minutes("*/15 0 * * *") == std::set<int>{0, 15, 30, 45});
  CHECK(minutes("1-30/5 0 * * *") == std::set<int>{1, 6, 11, 16, 21, 26});
  CHECK(minutes("0-59/20,7 0 * * *") == std::set<int>{0, 7, 20, 40});
  CHECK(minutes("*/59 0 * * *") == std::set<int>{0, 59});
  CHECK(hours("0 */6 * * *") == std::set<int>{0, 6, 12, 18});
  CHECK(hours("0 9-17/4 * * *") == std::set<int>{9, 13, 17});
  CHECK(hours("0 23 * * *") == std::set<int>{23});
  CHECK(months("0 0 1 */3 *") == std::set<int>{1, 4, 7, 10});
  CHECK(march_days("0 0 1-31/10 * *") == std::set<int>{1, 11, 21, 31});
  // Tabs and extra spaces separate fields too.
  CHECK(minutes("  5\t0  * *   * ") == std::set<int>{5});
}

TEST_CASE("cron names: months and days in any case, and 0 and 7 both Sunday", "[cron]") {
  CHECK(months("0 0 1 jan,MAR,Dec *") == std::set<int>{1, 3, 12});
  CHECK(months("0 0 1 feb-APR *") == std::set<int>{2, 3, 4});
  CHECK(months("0 0 1 jan-dec/5 *") == std::set<int>{1, 6, 11});
  const std::set<int> sundays{1, 8, 15, 22, 29};
  CHECK(march_days("0 0 * * 0") == sundays);
  CHECK(march_days("0 0 * * 7") == sundays);
  CHECK(march_days("0 0 * * Sun") == sundays);
  CHECK(march_days("0 0 * * mon-FRI") == std::set<int>{2,  3,  4,  5,  6,  9,  10, 11, 12, 13, 16,
                                                      17, 18, 19, 20, 23, 24, 25, 26, 27, 30, 31});
  CHECK(march_days("0 0 * * 5-7") == std::set<int>{1, 6, 7, 8, 13, 14, 15, 20, 21, 22, 27, 28, 29});
  CHECK(march_days("0 0 * * sat,sun") == std::set<int>{1, 7, 8, 14, 15, 21, 22, 28, 29});
}

TEST_CASE("cron days: with both day fields restricted either matches (Vixie), else both must", "[cron]") {
  // The 1st, the 15th, and every Monday.
  CHECK(march_days("0 0 1,15 * mon") == std::set<int>{1, 2, 9, 15, 16, 23, 30});
  // A field that begins with '*' is not a restriction of its own: both must match.
  CHECK(march_days("0 0 */2 * mon") == std::set<int>{9, 23});
  CHECK(march_days("0 0 13 * *") == std::set<int>{13});
  CHECK(march_days("0 0 * * fri") == std::set<int>{6, 13, 20, 27});
  // "*/7" is Sunday (0 and 7) but begins with '*': the first Sunday of the month, not days 1-7 and Sundays.
  CHECK(march_days("0 0 1-7 * */7") == std::set<int>{1});
  CHECK(march_days("0 0 1-7 * 0") == std::set<int>{1, 2, 3, 4, 5, 6, 7, 8, 15, 22, 29});
}

TEST_CASE("cron @-forms are the expressions they stand for", "[cron]") {
  const Seconds from = utc(2026, 5, 17, 13, 7);
  auto same = [&](std::string_view nick, std::string_view expr) {
    INFO(nick);
    CHECK(fires(nick, "Europe/Berlin", from, 5) == fires(expr, "Europe/Berlin", from, 5));
  };
  same("@yearly", "0 0 1 1 *");
  same("@annually", "0 0 1 1 *");
  same("@monthly", "0 0 1 * *");
  same("@weekly", "0 0 * * 0");
  same("@daily", "0 0 * * *");
  same("@midnight", "0 0 * * *");
  same("@hourly", "0 * * * *");
  same("@DAILY", "0 0 * * *");
  CHECK(fires("@weekly", "UTC", from, 2) == std::vector<std::string>{"2026-05-24T00:00:00Z", "2026-05-31T00:00:00Z"});
  CHECK(fires("@hourly", "UTC", from, 1) == std::vector<std::string>{"2026-05-17T14:00:00Z"});
}

TEST_CASE("cron expressions that are malformed are refused naming the field", "[cron]") {
  CHECK(schedule_error("61 * * * *") == "schedule: minute field '61' is out of range 0-59");
  CHECK(schedule_error("0 24 * * *") == "schedule: hour field '24' is out of range 0-23");
  CHECK(schedule_error("0 0 0 * *") == "schedule: day-of-month field '0' is out of range 1-31");
  CHECK(schedule_error("0 0 32 * *") == "schedule: day-of-month field '32' is out of range 1-31");
  CHECK(schedule_error("0 0 * 13 *") == "schedule: month field '13' is out of range 1-12");
  CHECK(schedule_error("0 0 * * 8") == "schedule: day-of-week field '8' is out of range 0-7");
  CHECK(schedule_error("0 0 * foo *") == "schedule: month field 'foo' is not a number or a month name (jan-dec)");
  CHECK(schedule_error("0 0 * * monday") ==
        "schedule: day-of-week field 'monday' is not a number or a day name (sun-sat)");
  CHECK(schedule_error("0 0 jan * *") == "schedule: day-of-month field 'jan' is not a number");
  CHECK(schedule_error("1,,2 * * * *") == "schedule: minute field '1,,2' has an empty list element");
  CHECK(schedule_error("5-2 * * * *") == "schedule: minute field '5-2' is a range that runs backwards");
  CHECK(schedule_error("*/0 * * * *") == "schedule: minute field '*/0' has a step out of range 1-59");
  CHECK(schedule_error("0 */x * * *") == "schedule: hour field '*/x' has a step that is not a number");
  CHECK(schedule_error("5/15 * * * *") == "schedule: minute field '5/15' has a step without a range (write 5-59/15)");
  CHECK(schedule_error("L * * * *") == "schedule: minute field 'L' is not a number");
  CHECK(schedule_error("0 0 ? * *") == "schedule: day-of-month field '?' is not a number");
  CHECK(schedule_error("0 0 * * 1#2") == "schedule: day-of-week field '1#2' is not a number or a day name (sun-sat)");
  CHECK(schedule_error("* * * *").starts_with("schedule: must have 5 fields"));
  CHECK(schedule_error("* * * *").ends_with("'* * * *' has 4 fields"));
  CHECK(schedule_error("0 * * * * *").ends_with("has 6 fields"));
  CHECK(schedule_error("").ends_with("has 0 fields"));
  CHECK(schedule_error("@reboot").starts_with("schedule: '@reboot' is not a known @-form"));
  // Never fires: no month of the month field has that day.
  CHECK(schedule_error("0 0 30 2 *").starts_with("schedule: day-of-month field '30' names no day"));
  CHECK(schedule_error("0 0 31 apr,jun,sep,nov *").ends_with("the schedule never fires"));
  // ...but with a day-of-week as well, the weekdays fire (Vixie's either-or).
  CHECK(schedule_error("0 0 30 2 mon") == "accepted");
  CHECK(schedule_error("0 0 29 2 *") == "accepted");
}

// ------------------------------------------------------------------ zones

TEST_CASE("TZif zones: offsets from the table and from the footer rule", "[cron][zone]") {
  auto ny = cron::Zone::load("America/New_York");
  CHECK(ny->offset_at(utc(2026, 1, 15)) == -5 * 3600);
  CHECK(ny->offset_at(utc(2026, 7, 15)) == -4 * 3600);
  CHECK(ny->offset_at(utc(2026, 3, 8, 6, 59, 59)) == -5 * 3600);
  CHECK(ny->offset_at(utc(2026, 3, 8, 7)) == -4 * 3600);
  auto tr = ny->next_transition(utc(2026, 1, 1));
  REQUIRE(tr);
  CHECK(iso(tr->at) == "2026-03-08T07:00:00Z");
  CHECK(tr->before == -5 * 3600);
  CHECK(tr->after == -4 * 3600);
  tr = ny->last_transition(utc(2026, 12, 1));
  REQUIRE(tr);
  CHECK(iso(tr->at) == "2026-11-01T06:00:00Z");
  // Past the table (Debian's files end in 2037): the footer's rule, "EST5EDT,M3.2.0,M11.1.0".
  tr = ny->next_transition(utc(2100, 1, 1));
  REQUIRE(tr);
  CHECK(iso(tr->at) == "2100-03-14T07:00:00Z");
  tr = ny->last_transition(utc(2100, 12, 31));
  REQUIRE(tr);
  CHECK(iso(tr->at) == "2100-11-07T06:00:00Z");
  auto rule = cron::Zone::from_posix("EST5EDT,M3.2.0,M11.1.0", "rule");
  for (Seconds t = utc(2090, 1, 1); t < utc(2110, 1, 1); t += 86400 * 7 + 3607) {
    INFO(iso(t));
    CHECK(ny->offset_at(t) == rule->offset_at(t));
  }
  // Before the table: the file's first type (local mean time, -4:56:02).
  CHECK(ny->offset_at(utc(1850, 1, 1)) == -(4 * 3600 + 56 * 60 + 2));

  CHECK(cron::Zone::load("Asia/Kathmandu")->offset_at(utc(2026, 6, 1)) == 5 * 3600 + 45 * 60);
  auto lh = cron::Zone::load("Australia/Lord_Howe");
  CHECK(lh->offset_at(utc(2026, 7, 1)) == 10 * 3600 + 30 * 60);
  CHECK(lh->offset_at(utc(2026, 12, 1)) == 11 * 3600);
  CHECK(lh->offset_at(utc(2101, 1, 1)) == 11 * 3600);  // southern summer, from the footer
  CHECK(cron::Zone::load("UTC")->offset_at(utc(2026, 6, 1)) == 0);
  CHECK(cron::Zone::load("Etc/GMT-14")->offset_at(utc(2026, 6, 1)) == 14 * 3600);
}

TEST_CASE("time zone names are checked: unknown, escaping, or not TZif", "[cron][zone]") {
  auto zone_error = [](std::string_view name) { return refusal([&] { cron::Zone::load(name); }); };
  CHECK(zone_error("Mars/Olympus_Mons").starts_with("time_zone: unknown time zone 'Mars/Olympus_Mons'"));
  CHECK(zone_error("../../etc/passwd").starts_with("time_zone: '../../etc/passwd' is not an IANA time zone name"));
  CHECK(zone_error("America/../UTC").starts_with("time_zone: 'America/../UTC' is not an IANA time zone name"));
  CHECK(zone_error("/usr/share/zoneinfo/UTC").starts_with("time_zone: '/usr/share/zoneinfo/UTC' is not an IANA"));
  CHECK(zone_error("").starts_with("time_zone: '' is not an IANA time zone name"));
  CHECK(zone_error("Europe/Berlin ").starts_with("time_zone: 'Europe/Berlin ' is not an IANA"));
  CHECK(zone_error("America").starts_with("time_zone: unknown time zone 'America'"));  // a directory
  CHECK(zone_error("zone.tab") ==
        "time_zone: 'zone.tab' is not a usable time zone: the file is not TZif (it does not begin with \"TZif\")");
  CHECK(zone_error("right/UTC").find("leap seconds") != std::string::npos);

  std::ifstream in("/usr/share/zoneinfo/America/New_York", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(bytes.size() > 1000);
  CHECK(refusal([&] { cron::Zone::from_tzif(bytes.substr(0, 700), "cut"); }) ==
        "time_zone: 'cut' is not a usable time zone: the TZif file is truncated");
  CHECK(refusal([&] { cron::Zone::from_tzif(bytes.substr(0, bytes.size() - 1), "cut"); }) ==
        "time_zone: 'cut' is not a usable time zone: the TZif footer is unterminated");
  CHECK(refusal([&] { cron::Zone::from_posix("EST5EDT,M3.2", "bad"); }).starts_with(
      "time_zone: 'bad' is not a usable time zone: its TZ rule 'EST5EDT,M3.2' is malformed"));
  CHECK(refusal([&] { cron::Zone::from_posix("EST5EDT", "bad"); }).ends_with("(daylight time without a rule)"));
}

TEST_CASE("time zones are read from $TZDIR when it is set", "[cron][zone]") {
  // Single-threaded here: setenv is safe.
  auto dir = std::filesystem::temp_directory_path() / fmt::format("eoq-tzdir-{}", ::getpid());
  std::filesystem::create_directories(dir / "Test");
  std::filesystem::copy_file("/usr/share/zoneinfo/Asia/Kathmandu", dir / "Test" / "Somewhere",
                             std::filesystem::copy_options::overwrite_existing);
  const char* old = std::getenv("TZDIR");
  std::string saved = old ? old : "";
  ::setenv("TZDIR", dir.c_str(), 1);
  auto restore = [&] {
    if (old) ::setenv("TZDIR", saved.c_str(), 1);
    else ::unsetenv("TZDIR");
  };
  std::string found, missing;
  try {
    found = std::to_string(cron::Zone::load("Test/Somewhere")->offset_at(utc(2026, 1, 1)));
    missing = refusal([] { cron::Zone::load("Europe/Berlin"); });
  } catch (...) {
    restore();
    throw;
  }
  restore();
  std::filesystem::remove_all(dir);
  CHECK(found == std::to_string(5 * 3600 + 45 * 60));
  CHECK(missing.starts_with("time_zone: unknown time zone 'Europe/Berlin': no such zone file in " + dir.string()));
  CHECK(cron::Zone::load("UTC")->name() == "UTC");  // needs no file, wherever TZDIR points
}

// ------------------------------------------------------------------ next fire times

TEST_CASE("next fire times in UTC: short months, leap days, weekdays", "[cron][next]") {
  CHECK(iso(next("30 2 * * *", "UTC", utc(2026, 3, 8))) == "2026-03-08T02:30:00Z");
  CHECK(iso(next("30 2 * * *", "UTC", utc(2026, 3, 8, 2, 30))) == "2026-03-09T02:30:00Z");  // strictly after
  CHECK(iso(next("30 2 * * *", "UTC", utc(2026, 3, 8, 2, 29, 59))) == "2026-03-08T02:30:00Z");
  // Day 31 skips the months without one.
  CHECK(fires("0 0 31 * *", "UTC", utc(2026, 1, 31), 4) ==
        std::vector<std::string>{"2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z", "2026-07-31T00:00:00Z",
                                 "2026-08-31T00:00:00Z"});
  // Feb 29 waits for the next leap year, and 2100 is not one.
  CHECK(iso(next("0 12 29 2 *", "UTC", utc(2026, 1, 1))) == "2028-02-29T12:00:00Z");
  CHECK(iso(next("0 12 29 2 *", "UTC", utc(2096, 3, 1))) == "2104-02-29T12:00:00Z");
  // Friday the 13th or any Friday (Vixie), and only Fridays that are the 13th (a '*' field).
  CHECK(iso(next("0 0 13 * fri", "UTC", utc(2026, 1, 3))) == "2026-01-09T00:00:00Z");
  CHECK(iso(next("0 0 13 2 *", "UTC", utc(2026, 1, 3))) == "2026-02-13T00:00:00Z");
  CHECK(iso(next("0 0 */31 2 fri", "UTC", utc(2026, 1, 1))) == "2030-02-01T00:00:00Z");
  // The year's end.
  CHECK(iso(next("59 23 31 12 *", "UTC", utc(2026, 12, 31, 23, 59))) == "2027-12-31T23:59:00Z");
  CHECK(iso(next("* * * * *", "UTC", utc(2026, 12, 31, 23, 59, 30))) == "2027-01-01T00:00:00Z");
  // latest_at_or_before: the fire time a bucket begins at.
  auto s = cron::Schedule::parse("0 12 29 2 *");
  CHECK(iso(s.latest_at_or_before(utc(2104, 1, 1), *cron::Zone::utc())) == "2096-02-29T12:00:00Z");
  CHECK(iso(s.latest_at_or_before(utc(2028, 2, 29, 12), *cron::Zone::utc())) == "2028-02-29T12:00:00Z");
}

TEST_CASE("next fire times on the daylight-saving days of 2026: New York", "[cron][next][dst]") {
  // 2026-03-08: 02:00 EST (07:00Z) becomes 03:00 EDT; 02:30 does not exist.
  // A fixed time in the gap fires once, at the first instant after it (03:00 EDT).
  CHECK(fires("30 2 * * *", "America/New_York", utc(2026, 3, 7, 12), 2) ==
        std::vector<std::string>{"2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"});
  // Every minute of the missing hour, named: still once.
  CHECK(fires("0-59 2 * * *", "America/New_York", utc(2026, 3, 8, 6), 2) ==
        std::vector<std::string>{"2026-03-08T07:00:00Z", "2026-03-09T06:00:00Z"});
  // The gap's own transition instant as the starting point: the gap fire is strictly after it or not at all.
  CHECK(iso(next("30 2 * * *", "America/New_York", utc(2026, 3, 8, 6, 59, 59))) == "2026-03-08T07:00:00Z");
  CHECK(iso(next("30 2 * * *", "America/New_York", utc(2026, 3, 8, 7))) == "2026-03-09T06:30:00Z");
  // "Every 15 minutes" runs with the clock: 01:45 EST, then 03:00 EDT, 15 real minutes apart.
  CHECK(fires("*/15 * * * *", "America/New_York", utc(2026, 3, 8, 6, 40), 4) ==
        std::vector<std::string>{"2026-03-08T06:45:00Z", "2026-03-08T07:00:00Z", "2026-03-08T07:15:00Z",
                                 "2026-03-08T07:30:00Z"});
  // Hourly at :30 stays an hour apart: 01:30 EST, 03:30 EDT (02:30 does not exist).
  CHECK(fires("30 * * * *", "America/New_York", utc(2026, 3, 8, 6), 2) ==
        std::vector<std::string>{"2026-03-08T06:30:00Z", "2026-03-08T07:30:00Z"});

  // 2026-11-01: 02:00 EDT (06:00Z) becomes 01:00 EST; 01:00-01:59 happen twice.
  // A fixed time in the repeated hour fires once, at its first occurrence (EDT).
  CHECK(fires("30 1 * * *", "America/New_York", utc(2026, 10, 31, 12), 2) ==
        std::vector<std::string>{"2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"});
  CHECK(fires("0-59/20 1 * * *", "America/New_York", utc(2026, 11, 1, 4, 59), 4) ==
        std::vector<std::string>{"2026-11-01T05:00:00Z", "2026-11-01T05:20:00Z", "2026-11-01T05:40:00Z",
                                 "2026-11-02T06:00:00Z"});
  // Asked from inside the second occurrence: not again today.
  CHECK(iso(next("30 1 * * *", "America/New_York", utc(2026, 11, 1, 6, 10))) == "2026-11-02T06:30:00Z");
  CHECK(iso(next("0 2 * * *", "America/New_York", utc(2026, 11, 1, 6, 10))) == "2026-11-01T07:00:00Z");
  // Clock-following schedules fire in both copies, every 15 real minutes.
  CHECK(fires("*/15 * * * *", "America/New_York", utc(2026, 11, 1, 5, 40), 6) ==
        std::vector<std::string>{"2026-11-01T05:45:00Z", "2026-11-01T06:00:00Z", "2026-11-01T06:15:00Z",
                                 "2026-11-01T06:30:00Z", "2026-11-01T06:45:00Z", "2026-11-01T07:00:00Z"});
  CHECK(fires("30 * * * *", "America/New_York", utc(2026, 11, 1, 5), 3) ==
        std::vector<std::string>{"2026-11-01T05:30:00Z", "2026-11-01T06:30:00Z", "2026-11-01T07:30:00Z"});
  CHECK(iso(next("30 * * * *", "America/New_York", utc(2026, 11, 1, 6, 10))) == "2026-11-01T06:30:00Z");

  // The bucket a scheduler would submit at each moment.
  auto s = cron::Schedule::parse("30 1 * * *");
  auto ny = cron::Zone::load("America/New_York");
  CHECK(iso(s.latest_at_or_before(utc(2026, 11, 1, 6, 45), *ny)) == "2026-11-01T05:30:00Z");
  auto gap = cron::Schedule::parse("30 2 * * *");
  CHECK(iso(gap.latest_at_or_before(utc(2026, 3, 8, 7, 10), *ny)) == "2026-03-08T07:00:00Z");
  CHECK(iso(gap.latest_at_or_before(utc(2026, 3, 8, 6, 59), *ny)) == "2026-03-07T07:30:00Z");
}

TEST_CASE("next fire times on the daylight-saving days of 2026: Berlin", "[cron][next][dst]") {
  // 2026-03-29: 02:00 CET (01:00Z) becomes 03:00 CEST.
  CHECK(fires("30 2 * * *", "Europe/Berlin", utc(2026, 3, 28, 12), 2) ==
        std::vector<std::string>{"2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"});
  CHECK(fires("30 2 29 3 *", "Europe/Berlin", utc(2026, 1, 1), 2) ==
        std::vector<std::string>{"2026-03-29T01:00:00Z", "2027-03-29T00:30:00Z"});
  CHECK(fires("*/30 * * * *", "Europe/Berlin", utc(2026, 3, 29, 0, 15), 3) ==
        std::vector<std::string>{"2026-03-29T00:30:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z"});
  // 2026-10-25: 03:00 CEST (01:00Z) becomes 02:00 CET; 02:30 happens twice, fires once.
  CHECK(fires("30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12), 2) ==
        std::vector<std::string>{"2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"});
  CHECK(fires("30 2 * * *", "Europe/Berlin", utc(2026, 10, 25, 0, 30), 1) ==
        std::vector<std::string>{"2026-10-26T01:30:00Z"});
  CHECK(fires("*/30 2 * * *", "Europe/Berlin", utc(2026, 10, 25, 0, 30), 1) ==  // begins with '*': both copies
        std::vector<std::string>{"2026-10-25T01:00:00Z"});
}

TEST_CASE("next fire times with half-hour DST and quarter-hour offsets", "[cron][next][dst]") {
  // Lord Howe: +10:30 standard, +11 in summer. 2026-10-04 02:00 becomes 02:30 (15:30Z the day before).
  CHECK(fires("15 2 * * *", "Australia/Lord_Howe", utc(2026, 10, 3, 12), 2) ==
        std::vector<std::string>{"2026-10-03T15:30:00Z", "2026-10-04T15:15:00Z"});
  CHECK(fires("*/10 * * * *", "Australia/Lord_Howe", utc(2026, 10, 3, 15, 15), 3) ==
        std::vector<std::string>{"2026-10-03T15:20:00Z", "2026-10-03T15:30:00Z", "2026-10-03T15:40:00Z"});
  // 2026-04-05 02:00 (+11) becomes 01:30 (+10:30): 01:45 happens twice.
  CHECK(fires("45 1 * * *", "Australia/Lord_Howe", utc(2026, 4, 4, 12), 2) ==
        std::vector<std::string>{"2026-04-04T14:45:00Z", "2026-04-05T15:15:00Z"});
  CHECK(fires("45 * * * *", "Australia/Lord_Howe", utc(2026, 4, 4, 14), 2) ==
        std::vector<std::string>{"2026-04-04T14:45:00Z", "2026-04-04T15:15:00Z"});
  // Kathmandu, +05:45 all year: 09:00 local is 03:15Z.
  CHECK(fires("0 9 * * *", "Asia/Kathmandu", utc(2026, 1, 1), 2) ==
        std::vector<std::string>{"2026-01-01T03:15:00Z", "2026-01-02T03:15:00Z"});
  CHECK(fires("*/30 * * * *", "Asia/Kathmandu", utc(2026, 1, 1), 2) ==
        std::vector<std::string>{"2026-01-01T00:15:00Z", "2026-01-01T00:45:00Z"});
  // Its one jump: 1986-01-01 00:00 +05:30 became 00:15 +05:45, a 15-minute gap.
  CHECK(fires("5 0 1 1 *", "Asia/Kathmandu", utc(1985, 6, 1), 2) ==
        std::vector<std::string>{"1985-12-31T18:30:00Z", "1986-12-31T18:20:00Z"});
}

TEST_CASE("next fire times far past the zone table follow its footer rule", "[cron][next][dst]") {
  // 2100-03-14 is New York's spring-forward day; the table ends in 2037.
  CHECK(fires("30 2 * * *", "America/New_York", utc(2100, 3, 13, 12), 2) ==
        std::vector<std::string>{"2100-03-14T07:00:00Z", "2100-03-15T06:30:00Z"});
  CHECK(fires("30 1 * * *", "America/New_York", utc(2100, 11, 6, 12), 2) ==
        std::vector<std::string>{"2100-11-07T05:30:00Z", "2100-11-08T06:30:00Z"});
  CHECK(fires("30 2 * * *", "Europe/Berlin", utc(2100, 3, 27, 12), 2) ==
        std::vector<std::string>{"2100-03-28T01:00:00Z", "2100-03-29T00:30:00Z"});
  // The same answers from the rule alone.
  auto rule = cron::Zone::from_posix("EST5EDT,M3.2.0,M11.1.0", "rule");
  CHECK(iso(cron::Schedule::parse("30 2 * * *").next_after(utc(2100, 3, 13, 12), *rule)) == "2100-03-14T07:00:00Z");
}

// ------------------------------------------------------------------ against glibc

namespace {

// glibc's reading of a zone (TZ set, tzset, localtime_r): the oracle's clock.
// Tests run single-threaded here, so setting TZ is safe.
class GlibcZone {
 public:
  explicit GlibcZone(const std::string& tz) {
    if (const char* old = std::getenv("TZ")) saved_ = old;
    ::setenv("TZ", tz.c_str(), 1);
    ::tzset();
  }
  ~GlibcZone() {
    if (saved_) ::setenv("TZ", saved_->c_str(), 1);
    else ::unsetenv("TZ");
    ::tzset();
  }
  GlibcZone(const GlibcZone&) = delete;
  GlibcZone& operator=(const GlibcZone&) = delete;
  Seconds offset(Seconds u) const {
    std::time_t t = static_cast<std::time_t>(u);
    std::tm tm{};
    localtime_r(&t, &tm);
    return tm.tm_gmtoff;
  }
  Seconds local(Seconds u) const { return u + offset(u); }

 private:
  std::optional<std::string> saved_;
};

// A schedule as the generator wrote it: the text, and the sets it means.
struct Expected {
  std::string text;
  std::uint64_t minute = 0;
  std::uint32_t hour = 0, dom = 0, month = 0, dow = 0;
  bool minute_star = false, hour_star = false, dom_star = false, dow_star = false;
};

bool oracle_matches(const Expected& e, Seconds local) {
  std::time_t t = static_cast<std::time_t>(local);
  std::tm tm{};
  gmtime_r(&t, &tm);
  bool dom = e.dom >> tm.tm_mday & 1, dow = e.dow >> tm.tm_wday & 1;
  bool day = e.dom_star || e.dow_star ? dom && dow : dom || dow;
  return (e.month >> (tm.tm_mon + 1) & 1) && day && (e.hour >> tm.tm_hour & 1) && (e.minute >> tm.tm_min & 1);
}

// Minute by minute through real time from `t` (zones since 1970 change offset
// on whole minutes). A clock-following schedule fires when the wall clock
// shows a matching minute; a fixed-time one when the wall clock first reaches
// a matching minute: some minute above every earlier reading, up to this one.
std::optional<Seconds> oracle_next(const Expected& e, const GlibcZone& z, Seconds t, Seconds limit) {
  const bool fixed = !e.minute_star && !e.hour_star;
  Seconds u = (t / 60 + 1) * 60;
  Seconds high = std::numeric_limits<Seconds>::min();
  if (fixed)
    for (Seconds v = u - 60; v >= u - 60 - 2 * 86400; v -= 60) high = std::max(high, z.local(v));
  for (; u <= limit; u += 60) {
    const Seconds l = z.local(u);
    if (!fixed) {
      if (oracle_matches(e, l)) return u;
      continue;
    }
    bool fire = false;
    for (Seconds m = std::max(high + 60, l - 2 * 86400); m <= l && !fire; m += 60) fire = oracle_matches(e, m);
    high = std::max(high, l);
    if (fire) return u;
  }
  return std::nullopt;
}

class Generator {
 public:
  explicit Generator(std::uint64_t seed) : rng_(seed) {}
  int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  bool chance(double p) { return std::bernoulli_distribution(p)(rng_); }
  std::int64_t uniform64(std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng_);
  }
  template <class T>
  const T& pick(const std::vector<T>& v) {
    return v[std::size_t(uniform(0, int(v.size()) - 1))];
  }

  // One field: its text and the values it means. `near`, when set, is a value
  // worth hitting (the local hour of a transition).
  std::string field(int lo, int hi, const char* const* names, int names_count, std::uint64_t& bits,
                    std::optional<int> near = {}) {
    auto name_or_number = [&](int v) {
      if (names && v < names_count && chance(0.3)) {
        std::string n = names[v];
        for (auto& c : n)
          if (chance(0.3)) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        return n;
      }
      return std::to_string(v + (names == kMonthNames ? 1 : 0));
    };
    // Names are indexed from 0; months count from 1.
    const int base = names == kMonthNames ? 1 : 0;
    auto value_near = [&] {
      if (near && chance(0.6)) return std::clamp(*near + uniform(-1, 1), lo, hi);
      return uniform(lo, hi);
    };
    auto item = [&](int form) -> std::string {
      switch (form) {
        case 0: {  // a value
          int v = value_near();
          bits |= std::uint64_t{1} << v;
          return name_or_number(v - base);
        }
        case 1: {  // a range
          int a = value_near(), b = std::clamp(a + uniform(0, (hi - lo) / 3 + 1), lo, hi);
          for (int v = a; v <= b; ++v) bits |= std::uint64_t{1} << v;
          return name_or_number(a - base) + "-" + name_or_number(b - base);
        }
        default: {  // a range with a step
          int a = uniform(lo, hi), b = uniform(a, hi), k = uniform(1, std::max(1, (hi - lo) / 2));
          for (int v = a; v <= b; v += k) bits |= std::uint64_t{1} << v;
          return fmt::format("{}-{}/{}", a, b, k);
        }
      }
    };
    const int form = uniform(0, 9);
    if (form <= 2) {  // '*'
      for (int v = lo; v <= hi; ++v) bits |= std::uint64_t{1} << v;
      return "*";
    }
    if (form == 3) {  // '*' with a step
      int k = uniform(1, std::max(1, std::min(hi, 20)));
      for (int v = lo; v <= hi; v += k) bits |= std::uint64_t{1} << v;
      return fmt::format("*/{}", k);
    }
    if (form <= 6) return item(form - 4);
    std::string text = item(uniform(0, 2));
    for (int n = uniform(1, 2); n > 0; --n) text += "," + item(uniform(0, 2));
    return text;
  }

  Expected schedule(std::optional<int> near_hour) {
    Expected e;
    std::string f[5];
    f[0] = field(0, 59, nullptr, 0, e.minute);
    std::uint64_t h = 0, dom = 0, mon = 0, dow = 0;
    f[1] = field(0, 23, nullptr, 0, h, near_hour);
    // Day and month fields mostly '*', so that most schedules fire within the
    // oracle's reach; restricted ones still come often enough to be checked.
    if (chance(0.5)) f[2] = "*", dom = ~std::uint64_t{0} & 0xfffffffe;
    else f[2] = field(1, 31, nullptr, 0, dom);
    if (chance(0.7)) f[3] = "*", mon = 0x1ffe;
    else f[3] = field(1, 12, kMonthNames, 12, mon);
    if (chance(0.5)) f[4] = "*", dow = 0xff;
    else f[4] = field(0, 7, kDayNames, 7, dow);
    e.hour = static_cast<std::uint32_t>(h);
    e.dom = static_cast<std::uint32_t>(dom);
    e.month = static_cast<std::uint32_t>(mon);
    e.dow = static_cast<std::uint32_t>((dow | dow >> 7) & 0x7f);
    e.minute_star = f[0][0] == '*';
    e.hour_star = f[1][0] == '*';
    e.dom_star = f[2][0] == '*';
    e.dow_star = f[4][0] == '*';
    e.text = fmt::format("{} {} {} {} {}", f[0], f[1], f[2], f[3], f[4]);
    return e;
  }

  static constexpr const char* kMonthNames[12] = {"jan", "feb", "mar", "apr", "may", "jun",
                                                  "jul", "aug", "sep", "oct", "nov", "dec"};
  static constexpr const char* kDayNames[7] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"};

 private:
  std::mt19937_64 rng_;
};

}  // namespace

TEST_CASE("next fire times agree with a minute-by-minute scan through glibc", "[cron][oracle]") {
  // Zones with every kind of jump: none, an hour each way (north and south),
  // half an hour (Lord Howe), two hours (Troll), 45-minute offsets (Chatham,
  // Kathmandu), DST abolished (Sao Paulo), standard time in summer (Dublin's
  // negative DST), midnight transitions (Santiago, Havana), frequent ones (Casablanca).
  const std::vector<std::string> zones = {
      "UTC",           "America/New_York",  "Europe/Berlin",     "Australia/Lord_Howe", "Asia/Kathmandu",
      "Pacific/Chatham", "Antarctica/Troll", "America/Sao_Paulo", "Europe/Dublin",       "America/Santiago",
      "America/Havana", "Africa/Casablanca", "America/St_Johns",  "Asia/Tehran",         "Australia/Sydney"};
  std::uint64_t seed = 20260308;
  if (const char* s = std::getenv("EOQ_CRON_SEED")) seed = std::stoull(s);
  INFO("seed " << seed << " (EOQ_CRON_SEED)");
  Generator gen(seed);
  const Seconds reach = 200 * 86400;  // the oracle's scan, forward from the instant
  int compared = 0, beyond = 0, near_transitions = 0, fixed = 0;
  for (int i = 0; i < 400; ++i) {
    const std::string& zone_name = gen.pick(zones);
    GlibcZone glibc(zone_name);
    auto zone = cron::Zone::load(zone_name);
    // The instant: anywhere from 1971 to 2060 or around 2100 (past every zone
    // table), and in half the cases within hours of a change of offset.
    Seconds t = gen.chance(0.85) ? gen.uniform64(utc(1971, 1, 1), utc(2060, 1, 1))
                                 : gen.uniform64(utc(2095, 1, 1), utc(2110, 1, 1));
    std::optional<int> near_hour;
    if (gen.chance(0.5)) {
      for (Seconds u = t; u < t + 400 * 86400; u += 1800) {
        if (glibc.offset(u) != glibc.offset(u + 1800)) {
          Seconds jump = u;
          while (glibc.offset(jump) == glibc.offset(u)) jump += 60;
          t = jump + gen.uniform64(-4 * 3600, 4 * 3600);
          std::time_t lt = static_cast<std::time_t>(glibc.local(jump));
          std::tm tm{};
          gmtime_r(&lt, &tm);
          near_hour = tm.tm_hour;
          ++near_transitions;
          break;
        }
      }
    }
    const Expected e = gen.schedule(near_hour);
    INFO("case " << i << ": '" << e.text << "' in " << zone_name << " after " << iso(t) << " (" << t << ")");
    std::optional<cron::Schedule> parsed;
    try {
      parsed = cron::Schedule::parse(e.text);
    } catch (const eoq::InvalidArgument& ex) {
      // The generator can write a day-of-month its months lack ("31" in "feb")
      // with a '*' day-of-week: refused, rightly, and nothing to compare.
      INFO(ex.what());
      CHECK(ex.rule().ends_with("the schedule never fires"));
      CHECK((e.dom_star || e.dow_star));
      continue;
    }
    const cron::Schedule& s = *parsed;
    if (s.fixed_time() != (!e.minute_star && !e.hour_star)) FAIL("fixed_time() disagrees with the text");
    if (s.fixed_time()) ++fixed;
    const auto ours = s.next_after(t, *zone);
    const auto oracle = oracle_next(e, glibc, t, t + reach);
    if (oracle) {
      ++compared;
      CHECK(iso(ours) == iso(oracle));
    } else {
      ++beyond;
      CHECK((!ours || *ours > t + reach));
    }
    if (ours) {
      // The bucket rule's other half: no fire time between t and ours.
      auto before = s.latest_at_or_before(*ours - 1, *zone);
      CHECK(iso(s.latest_at_or_before(*ours, *zone)) == iso(ours));
      if (before) {
        CHECK(*before <= t);
        CHECK(iso(s.next_after(*before, *zone)) == iso(ours));
      }
    }
  }
  INFO(compared << " compared, " << beyond << " beyond the scan, " << near_transitions << " near a transition, "
                << fixed << " fixed-time");
  CHECK(compared >= 300);
  CHECK(near_transitions >= 100);  // UTC, Kathmandu and the zones that gave DST up have none lately
  CHECK(fixed >= 80);
}

TEST_CASE("POSIX TZ rules agree with glibc's reading of the same strings", "[cron][zone][oracle]") {
  // Footers of every shape: northern and southern DST, a rule time past 24 and
  // a negative one (RFC 8536 extensions), Jn and n dates, quoted names.
  const std::vector<std::string> rules = {
      "EST5EDT,M3.2.0,M11.1.0",           "CET-1CEST,M3.5.0,M10.5.0/3",      "<+1030>-10:30<+11>-11,M10.1.0,M4.1.0",
      "<-02>2<-01>,M3.5.0/-1,M10.5.0/0",  "IST-2IDT,M3.4.4/26,M10.5.0",      "<-03>3<-02>,M3.5.0/-2,M10.5.0/-1",
      "XXX3YYY,J60/2,J300/2",             "XXX-5YYY-6,59/1:30,300/0",        "<+0545>-5:45",
      "NZST-12NZDT,M9.5.0,M4.1.0/3"};
  std::mt19937_64 rng(7);
  for (const auto& r : rules) {
    INFO(r);
    GlibcZone glibc(r);
    auto zone = cron::Zone::from_posix(r, r);
    for (int i = 0; i < 2000; ++i) {
      Seconds t = std::uniform_int_distribution<Seconds>(utc(1990, 1, 1), utc(2120, 1, 1))(rng);
      INFO(iso(t));
      REQUIRE(zone->offset_at(t) == glibc.offset(t));
    }
  }
}

// ------------------------------------------------------------------ Scheduler::cron, Worker::cron

namespace {

eoq::NewTask task(std::string type) {
  eoq::NewTask t;
  t.type = std::move(type);
  return t;
}

std::vector<eoq::Task> cron_tasks(eoq::TaskStore& store, const std::string& name) {
  std::vector<eoq::Task> out;
  for (auto& t : store.list(eoq::ListQuery{.limit = 1000}).tasks)
    if (t.key && t.key->starts_with("cron:" + name + ":")) out.push_back(t);
  return out;
}
std::set<Seconds> fire_times(eoq::TaskStore& store, const std::string& name) {
  std::set<Seconds> out;
  for (auto& t : cron_tasks(store, name)) out.insert(std::stoll(t.key->substr(t.key->rfind(':') + 1)));
  return out;
}
Seconds seconds_of(eoq::TimePoint t) { return std::chrono::floor<std::chrono::seconds>(t.time_since_epoch()).count(); }

struct Lines {
  std::mutex mu;
  std::vector<std::string> lines;
  eoq::Logger logger() {
    return [this](eoq::LogLevel level, std::string_view m) {
      std::lock_guard lk(mu);
      lines.push_back(std::string(eoq::to_string(level)) + ": " + std::string(m));
    };
  }
  bool contains(std::string_view s) {
    std::lock_guard lk(mu);
    return std::any_of(lines.begin(), lines.end(), [&](auto& l) { return l.find(s) != std::string::npos; });
  }
};

}  // namespace

TEST_CASE("a cron registration submits its current fire time once, keyed by it, from any number of schedulers",
          "[cron][scheduler]") {
  EOQ_EACH_STORE(store);
  Lines log;
  eoq::Scheduler one(store, {.logger = log.logger(), .log_level = eoq::LogLevel::debug});
  one.cron("quarter", "*/15 * * * *", task("report"));
  // Kathmandu's :15 is :30 UTC; a scheduler that ignored the zone would name :15.
  one.cron(eoq::CronTask{.name = "ktm", .schedule = "15 * * * *", .time_zone = "Asia/Kathmandu",
                         .task = task("report")});
  const auto before = seconds_of(store.now());
  const auto wait = one.tick();
  const auto after = seconds_of(store.now());

  auto quarter = fire_times(store, "quarter");
  REQUIRE(quarter.size() == 1);
  const Seconds q = *quarter.begin();
  CHECK(q % 900 == 0);
  CHECK((q == before - before % 900 || q == after - after % 900));
  auto ktm = fire_times(store, "ktm");
  REQUIRE(ktm.size() == 1);
  const Seconds k = *ktm.begin();
  CHECK(k % 3600 == 1800);
  CHECK(k <= after);
  CHECK(k > before - 3600);
  // Until the next fire time of either, by the store's clock.
  const Seconds next_fire = std::min(q + 900, k + 3600);
  CHECK(wait.count() > 0);
  CHECK(wait <= std::chrono::seconds(next_fire - before) + 1s);
  CHECK(wait >= std::chrono::seconds(next_fire - after) - 1s);

  // Again, and from a second scheduler (another process): still one task each, quietly.
  one.tick();
  eoq::Scheduler two(store, {.logger = log.logger()});
  two.cron("quarter", "*/15 * * * *", task("report"));
  two.cron("ktm", "15 * * * *", task("report"), "Asia/Kathmandu");
  two.tick();
  if (fire_times(store, "quarter").size() == 2) {
    // The quarter hour turned between the two schedulers' ticks: the second one is the next fire time.
    CHECK(*fire_times(store, "quarter").rbegin() == q + 900);
  } else {
    CHECK(fire_times(store, "quarter") == quarter);
  }
  CHECK(fire_times(store, "ktm").size() <= 2);
  CHECK_FALSE(log.contains("warning"));
  CHECK_FALSE(log.contains("error"));
  for (auto& t : cron_tasks(store, "quarter")) CHECK(t.type == "report");
}

TEST_CASE("with catch_up a cron registration submits the latest fire time missed while none ran",
          "[cron][scheduler]") {
  EOQ_EACH_STORE(store);
  // 00:05 every hour in Berlin is :05 UTC too (whole-hour offsets).
  // Not in the last seconds before a fire time, so that the hour does not turn under the test.
  if (((seconds_of(store.now()) - 300) % 3600 + 3600) % 3600 >= 3595) std::this_thread::sleep_for(6s);
  const auto now_s = seconds_of(store.now());
  const Seconds current = now_s - ((now_s - 300) % 3600 + 3600) % 3600;
  auto earlier = [&](const std::string& name, Seconds fire) {
    auto t = task("digest");
    t.key = fmt::format("cron:{}:{}", name, fire);
    store.submit(t);
  };
  Lines log;
  auto make = [&](bool catch_up) {
    auto s = std::make_unique<eoq::Scheduler>(store, eoq::SchedulerOptions{.catch_up = catch_up,
                                                                           .logger = log.logger()});
    s->cron("digest", "5 * * * *", task("digest"), "Europe/Berlin");
    return s;
  };
  auto tick = [](eoq::Scheduler& s) { s.tick(); };

  SECTION("three fire times missed: one task for the latest of them, then the current one") {
    earlier("digest", current - 4 * 3600);
    auto s = make(true);
    tick(*s);
    CHECK(fire_times(store, "digest") == std::set<Seconds>{current - 4 * 3600, current - 3600, current});
    CHECK(log.contains("were missed"));
    auto again = make(true);
    again->tick();
    CHECK(fire_times(store, "digest").size() == 3);
  }
  SECTION("off by default: missed fire times stay missed") {
    earlier("digest", current - 4 * 3600);
    auto s = make(false);
    tick(*s);
    CHECK(fire_times(store, "digest") == std::set<Seconds>{current - 4 * 3600, current});
  }
  SECTION("nothing missed, or nothing known: no catch-up") {
    earlier("digest", current - 3600);
    auto s = make(true);
    s->cron("fresh", "5 * * * *", task("digest"), "Europe/Berlin");
    tick(*s);
    CHECK(fire_times(store, "digest") == std::set<Seconds>{current - 3600, current});
    CHECK(fire_times(store, "fresh").size() == 1);
    CHECK_FALSE(log.contains("were missed"));
  }
}

TEST_CASE("cron registrations are refused naming the field, and share names with every()", "[cron][scheduler]") {
  eoq::MemoryStore store;
  eoq::Scheduler s(store);
  auto field = [&](eoq::CronTask c) {
    try {
      s.cron(std::move(c));
    } catch (const eoq::InvalidArgument& e) {
      return e.field();
    }
    return std::string("accepted");
  };
  CHECK(field({"c", "61 * * * *", "UTC", task("t")}) == "schedule");
  CHECK(field({"c", "@reboot", "UTC", task("t")}) == "schedule");
  CHECK(field({"c", "* * * * *", "Nowhere/Special", task("t")}) == "time_zone");
  CHECK(field({"c", "* * * * *", "../zoneinfo/UTC", task("t")}) == "time_zone");
  CHECK(field({"c", "* * * * *", "/etc/localtime", task("t")}) == "time_zone");
  CHECK(field({"bad name", "* * * * *", "UTC", task("t")}) == "name");
  auto keyed = task("t");
  keyed.key = "k";
  CHECK(field({"c", "* * * * *", "UTC", keyed}) == "key");
  CHECK(field({"c", "* * * * *", "UTC", task("")}) == "type");
  CHECK(s.empty());
  CHECK(field({"c", "* * * * *", "America/New_York", task("t")}) == "accepted");
  CHECK(field({"c", "0 * * * *", "UTC", task("t")}) == "name");
  CHECK_THROWS_AS(s.every("c", 60s, task("t")), eoq::InvalidArgument);
  s.every("p", 60s, task("t"));
  CHECK(field({"p", "* * * * *", "UTC", task("t")}) == "name");
  CHECK_FALSE(s.empty());
}

TEST_CASE("Worker::cron runs a scheduler inside the worker", "[cron][worker]") {
  eoq::MemoryStore store;
  Lines log;
  eoq::WorkerOptions o;
  o.poll_interval = 50ms;
  o.maintenance_interval = 0ms;
  o.logger = log.logger();
  eoq::Worker worker(store, o);
  std::atomic<int> runs{0};
  worker.on("minutely", [&](eoq::TaskContext&) { ++runs; });
  worker.cron("minutely", "* * * * *", task("minutely"), "Australia/Lord_Howe");
  CHECK_THROWS_AS(worker.every("minutely", 60s, task("minutely")), eoq::InvalidArgument);
  CHECK_THROWS_AS(worker.cron("bad", "* * * *", task("t")), eoq::InvalidArgument);
  CHECK_THROWS_AS(worker.cron(eoq::CronTask{"bad", "* * * * *", "Atlantis", task("t")}), eoq::InvalidArgument);
  const auto before = seconds_of(store.now());
  worker.start();
  CHECK_THROWS_AS(worker.cron("late", "* * * * *", task("t")), eoq::UsageError);
  REQUIRE(eoq::test::eventually([&] { return runs.load() >= 1; }));
  worker.stop();
  auto fired = fire_times(store, "minutely");
  REQUIRE(!fired.empty());
  CHECK(*fired.begin() % 60 == 0);
  CHECK(*fired.begin() >= before - before % 60);
}
