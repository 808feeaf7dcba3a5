// Placeholder until the dashboard lands.
#include <eoq/dashboard.hpp>

namespace eoq {
struct Dashboard::Impl {};
struct DashboardServer::Impl {};
std::vector<ApiToken> load_tokens(const std::string&) { throw UsageError("dashboard not built yet"); }
Dashboard::Dashboard(TaskStore&, DashboardOptions) { throw UsageError("dashboard not built yet"); }
Dashboard::~Dashboard() = default;
HttpResponse Dashboard::handle(const HttpRequest&) const { return {}; }
DashboardServer::DashboardServer(TaskStore&, DashboardOptions, std::string) {
  throw UsageError("dashboard not built yet");
}
DashboardServer::~DashboardServer() = default;
void DashboardServer::start() {}
int DashboardServer::port() const noexcept { return 0; }
void DashboardServer::stop() {}
}  // namespace eoq
