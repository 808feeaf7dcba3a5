#pragma once
// What `eoq` needs to read times and durations from a command line and to lay
// values out for a human: aligned tables, ages, progress bars. Pure functions,
// no store and no terminal, so each can be reasoned about on its own.
#include <eoq/task.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace eoq::cli {

// "7d", "12h", "30m", "45s", "500ms", "2w", or sums such as "1h30m". A bare
// number is refused: "7" could mean anything. Throws InvalidArgument(field, ...).
Millis parse_duration(std::string_view field, std::string_view text);

// "now", "+30s" (any parse_duration text after '+'), or an RFC 3339 time.
TimePoint parse_when(std::string_view field, std::string_view text, TimePoint now);

// Compact, for tables: "850ms", "45s", "3m12s", "2h05m", "3d04h".
std::string format_duration(Millis d);
// "in 3m12s", "3m12s ago" or "now" (within a second).
std::string relative(TimePoint t, TimePoint now);

// Task text is written by whoever submits or runs a task. Control characters
// (ESC above all) would let it move the cursor or restyle an operator's
// terminal, so they are shown as '?'; newlines too unless keep_newlines.
std::string clean(std::string_view text, bool keep_newlines = false);
// Columns a UTF-8 string takes up (one per code point: good enough for tables).
std::size_t display_width(std::string_view text);
// At most `width` columns, ending in an ellipsis when cut.
std::string truncate(std::string_view text, std::size_t width, bool unicode);

// "[########............]  40% resize" (width counts the cells between brackets).
std::string progress_bar(int percent, std::string_view stage, int width, bool unicode);

// Columns padded to their widest cell; numbers right-aligned. Cells are cleaned
// and cut to max_width.
class Table {
 public:
  struct Column {
    std::string header;
    bool right = false;
    std::size_t max_width = 40;
  };
  explicit Table(std::vector<Column> columns, bool unicode = false);
  void add(std::vector<std::string> cells);
  bool empty() const noexcept { return rows_.empty(); }
  // One line per row, the header first; each line ends in '\n', no trailing blanks.
  std::string render(std::string_view indent = "") const;

 private:
  std::vector<Column> columns_;
  std::vector<std::vector<std::string>> rows_;
  bool unicode_;
};

}  // namespace eoq::cli
