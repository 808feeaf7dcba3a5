#pragma once
// Cron expressions and the time zones they are read in, for Scheduler::cron.
// Internal: the public face is CronTask (eoq/worker.hpp) and Scheduler::cron.
//
// Everything here counts seconds since 1970-01-01 00:00, either as an instant
// (UTC) or as a wall-clock reading in some zone ("civil" seconds: the same
// count a UTC clock showing that date and time would have). Keeping both in one
// integer type makes "wall time = instant + offset" plain arithmetic.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace eoq::detail::cron {

using Seconds = std::int64_t;

// Searches give up this far ahead (or back). A schedule that can fire at all
// fires within 40 years (Feb 29 on a given weekday, across 2100), so 400 is
// only a guard against looping for ever, never a limit a real schedule meets.
inline constexpr Seconds kHorizon = Seconds{400} * 366 * 86400;

// An IANA time zone: the offsets of a TZif file's 64-bit table, then its
// footer's POSIX TZ rule for the instants past the table (or for all, when
// the table is empty). Abbreviations and isdst are not kept: a schedule needs
// only the offset, and a transition that changes nothing else is no transition.
class Zone {
 public:
  // Reads <$TZDIR or /usr/share/zoneinfo>/<name>. "UTC" needs no file, so the
  // default works where tzdata is not installed. Throws
  // InvalidArgument("time_zone", ...) for a bad or unknown name or a file that
  // is not TZif (or has leap seconds: the right/ zones count seconds that a
  // schedule in wall-clock time must not see).
  static std::shared_ptr<const Zone> load(std::string_view name);
  static std::shared_ptr<const Zone> utc();
  // From a TZif file's bytes / from a POSIX TZ string alone ("EST5EDT,M3.2.0,M11.1.0").
  // Both throw InvalidArgument("time_zone", ...) naming `name`.
  static std::shared_ptr<const Zone> from_tzif(std::string_view bytes, std::string name);
  static std::shared_ptr<const Zone> from_posix(std::string_view tz, std::string name);

  const std::string& name() const noexcept { return name_; }
  // Seconds east of UTC in effect at `instant`.
  std::int32_t offset_at(Seconds instant) const;

  struct Transition {
    Seconds at;            // the first instant with the new offset
    std::int32_t before;   // the offset until then
    std::int32_t after;
  };
  // The first change of offset strictly after `instant`, if any.
  std::optional<Transition> next_transition(Seconds instant) const;
  // The last change of offset at or before `instant`, if any.
  std::optional<Transition> last_transition(Seconds instant) const;

  struct Rule;  // the POSIX TZ footer, parsed
  Zone();
  ~Zone();

 private:
  std::string name_;
  std::vector<Seconds> at_;        // the table's transition instants, ascending
  std::vector<std::int32_t> off_;  // the offset from at_[i] on
  std::int32_t initial_ = 0;       // before at_[0]: the file's first type, as RFC 8536 says
  std::unique_ptr<Rule> rule_;     // for instants from at_.back() on

  std::int32_t table_offset(Seconds instant) const;
  bool rule_applies(Seconds instant) const;
  // The rule's changes in the years [first, last], ascending, no-ops dropped.
  std::vector<Transition> rule_changes(std::int64_t first_year, std::int64_t last_year) const;
};

// A parsed 5-field expression. Field sets as cronie keeps them, and its rule
// for day-of-month and day-of-week: when both fields are restricted (neither
// begins with '*'), a day matching either fires; otherwise both must match.
class Schedule {
 public:
  // Throws InvalidArgument("schedule", rule naming the field), also for an
  // expression that can never fire ("0 0 30 2 *").
  static Schedule parse(std::string_view expression);

  // The first fire time strictly after `instant` in `zone`; none only past kHorizon.
  std::optional<Seconds> next_after(Seconds instant, const Zone& zone) const;
  // The last fire time at or before `instant`; none only past kHorizon.
  std::optional<Seconds> latest_at_or_before(Seconds instant, const Zone& zone) const;

  // cronie's "fixed-time" job: neither the minute nor the hour field begins
  // with '*'. It decides what a daylight-saving transition does (cron.cpp).
  bool fixed_time() const noexcept { return !minute_star_ && !hour_star_; }
  // Whether the wall-clock minute at civil seconds `local` matches (seconds ignored).
  bool matches(Seconds local) const;
  // The first whole wall-clock minute in [from, last] that matches.
  std::optional<Seconds> next_match(Seconds from, Seconds last) const;

 private:
  std::uint64_t minute_ = 0;  // bit i: minute i
  std::uint32_t hour_ = 0;
  std::uint32_t dom_ = 0;     // bit d: day d of the month, 1..31
  std::uint32_t month_ = 0;   // bit m: month m, 1..12
  std::uint32_t dow_ = 0;     // bit d: weekday d, 0 = Sunday (7 is folded into 0)
  bool minute_star_ = false, hour_star_ = false, dom_star_ = false, dow_star_ = false;

  bool day_matches(std::int64_t days) const;  // days since 1970-01-01
};

}  // namespace eoq::detail::cron
