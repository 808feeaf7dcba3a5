#include "dashboard/metrics.hpp"

#include <eoq/metrics.hpp>

namespace eoq::detail {

HttpResponse metrics_response(TaskStore& store, const Scope& scope) {
  HttpResponse r;
  r.content_type = prometheus_content_type;
  r.body = prometheus_text(store.stats(scope)) + prometheus_build_info();
  // Numbers of now: a cache in between would hand a scrape old ones.
  r.headers["Cache-Control"] = "no-store";
  return r;
}

}  // namespace eoq::detail
