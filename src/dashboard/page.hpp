#pragma once
// The dashboard's one page (src/dashboard/page.html), compiled in by
// cmake/EmbedFile.cmake so the server needs no files at run time.
#include <string_view>

namespace eoq::detail {
std::string_view dashboard_page() noexcept;
}  // namespace eoq::detail
