#include "cli/text.hpp"

#include "json/task_json.hpp"

#include <eoq/errors.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>

namespace eoq::cli {
namespace {

constexpr std::string_view kDurationRule = "must be a duration such as 7d, 12h, 30m, 45s, 500ms or 1h30m";

bool is_digit(char c) { return c >= '0' && c <= '9'; }

}  // namespace

Millis parse_duration(std::string_view field, std::string_view text) {
  auto bad = [&](std::string_view why = {}) -> Millis {
    throw InvalidArgument(std::string(field), why.empty() ? std::string(kDurationRule)
                                                          : fmt::format("{} ({})", kDurationRule, why));
  };
  if (text.empty()) return bad();
  // A century is far past any retention or delay anyone means, and keeps the
  // sum well inside 64 bits.
  constexpr std::int64_t kMaxMs = 100LL * 366 * 24 * 3600 * 1000;
  std::int64_t total = 0;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t start = i;
    std::int64_t n = 0;
    while (i < text.size() && is_digit(text[i])) {
      n = n * 10 + (text[i] - '0');
      if (n > kMaxMs) return bad("too long");
      ++i;
    }
    if (i == start) return bad();
    std::size_t unit_start = i;
    while (i < text.size() && !is_digit(text[i])) ++i;
    auto unit = text.substr(unit_start, i - unit_start);
    std::int64_t scale = 0;
    if (unit == "ms") scale = 1;
    else if (unit == "s") scale = 1000;
    else if (unit == "m") scale = 60 * 1000;
    else if (unit == "h") scale = 3600 * 1000;
    else if (unit == "d") scale = 24 * 3600 * 1000;
    else if (unit == "w") scale = 7 * 24 * 3600 * 1000;
    else if (unit.empty()) return bad(fmt::format("'{}' has no unit", text));
    else return bad(fmt::format("unknown unit '{}'", unit));
    if (n > (kMaxMs - total) / scale) return bad("too long");
    total += n * scale;
  }
  return Millis(total);
}

TimePoint parse_when(std::string_view field, std::string_view text, TimePoint now) {
  if (text == "now") return now;
  if (!text.empty() && text[0] == '+') {
    try {
      return now + parse_duration(field, text.substr(1));
    } catch (const InvalidArgument&) {
      throw InvalidArgument(std::string(field), "a relative time must be '+' and a duration such as +30s, +10m, "
                                                "+2h or +1d12h");
    }
  }
  try {
    return json::parse_time(field, text);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(e.field(), e.rule() + ", or relative to now such as +30s, +10m, +2h");
  }
}

std::string format_duration(Millis d) {
  std::int64_t ms = std::llabs(d.count());
  if (ms < 1000) return fmt::format("{}ms", ms);
  std::int64_t s = ms / 1000;
  if (s < 60) return fmt::format("{}s", s);
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  if (s < 86400) return fmt::format("{}h{:02}m", s / 3600, s % 3600 / 60);
  return fmt::format("{}d{:02}h", s / 86400, s % 86400 / 3600);
}

std::string relative(TimePoint t, TimePoint now) {
  auto diff = std::chrono::duration_cast<Millis>(t - now);
  if (diff > Millis(-1000) && diff < Millis(1000)) return "now";
  return diff.count() > 0 ? "in " + format_duration(diff) : format_duration(diff) + " ago";
}

std::string clean(std::string_view text, bool keep_newlines) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    auto c = static_cast<unsigned char>(text[i]);
    if (c == '\n' && keep_newlines) {
      out += '\n';
    } else if (c == '\n' || c == '\r' || c == '\t') {
      out += ' ';
    } else if (c < 0x20 || c == 0x7f) {
      out += '?';
    } else if (c == 0xC2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) >= 0x80 &&
               static_cast<unsigned char>(text[i + 1]) <= 0x9F) {
      // U+0080..U+009F: the C1 controls, which include an 8-bit CSI.
      out += '?';
      ++i;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::size_t display_width(std::string_view text) {
  return static_cast<std::size_t>(
      std::count_if(text.begin(), text.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; }));
}

std::string truncate(std::string_view text, std::size_t width, bool unicode) {
  if (display_width(text) <= width) return std::string(text);
  std::string_view ellipsis = unicode ? "…" : "...";
  std::size_t keep = width > display_width(ellipsis) ? width - display_width(ellipsis) : 0;
  std::size_t i = 0, cols = 0;
  while (i < text.size()) {
    bool starts = (static_cast<unsigned char>(text[i]) & 0xC0) != 0x80;
    if (starts && cols == keep) break;
    if (starts) ++cols;
    ++i;
  }
  return std::string(text.substr(0, i)) + std::string(ellipsis);
}

std::string progress_bar(int percent, std::string_view stage, int width, bool unicode) {
  percent = std::clamp(percent, 0, 100);
  int filled = percent * width / 100;
  std::string bar = "[";
  for (int i = 0; i < width; ++i) bar += i < filled ? (unicode ? "█" : "#") : (unicode ? "░" : ".");
  bar += fmt::format("] {:>3}%", percent);
  if (!stage.empty()) bar += " " + clean(stage);
  return bar;
}

Table::Table(std::vector<Column> columns, bool unicode) : columns_(std::move(columns)), unicode_(unicode) {}

void Table::add(std::vector<std::string> cells) {
  cells.resize(columns_.size());
  for (std::size_t i = 0; i < cells.size(); ++i) {
    auto text = clean(cells[i]);
    cells[i] = truncate(text.empty() ? "-" : text, columns_[i].max_width, unicode_);
  }
  rows_.push_back(std::move(cells));
}

std::string Table::render(std::string_view indent) const {
  std::vector<std::size_t> width(columns_.size());
  for (std::size_t i = 0; i < columns_.size(); ++i) {
    width[i] = display_width(columns_[i].header);
    for (const auto& row : rows_) width[i] = std::max(width[i], display_width(row[i]));
  }
  std::string out;
  auto line = [&](auto cell_of) {
    std::string l(indent);
    for (std::size_t i = 0; i < columns_.size(); ++i) {
      const std::string& cell = cell_of(i);
      std::string pad(width[i] - display_width(cell), ' ');
      if (i) l += "  ";
      l += columns_[i].right ? pad + cell : cell + pad;
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l + '\n';
  };
  line([&](std::size_t i) -> const std::string& { return columns_[i].header; });
  for (const auto& row : rows_) line([&](std::size_t i) -> const std::string& { return row[i]; });
  return out;
}

}  // namespace eoq::cli
