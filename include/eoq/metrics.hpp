#pragma once
// eoq's numbers in the Prometheus text exposition format (version 0.0.4), for a
// host that serves its own /metrics: what its workers did, and how deep its
// queues are. The dashboard serves the queue part at /metrics itself.
//
//   std::string body = eoq::prometheus_text(worker);          // one worker
//   body += eoq::prometheus_text(store.stats());              // its queues
//   // serve `body` as "text/plain; version=0.0.4; charset=utf-8"
//
// Each call writes whole metric families (HELP, TYPE, samples), so the texts of
// calls for different things (workers, queues) may be concatenated; two calls
// for workers may not (a family must appear once): pass all workers to one call.
#include <eoq/task.hpp>
#include <eoq/worker.hpp>

#include <span>
#include <string>
#include <vector>

namespace eoq {

// The content type a scrape expects for these texts.
inline constexpr const char* prometheus_content_type = "text/plain; version=0.0.4; charset=utf-8";

struct WorkerMetrics {
  std::string worker{};  // the value of the `worker` label (Worker::id())
  WorkerCounters counters{};
};

// Per worker: eoq_worker_claimed_total, eoq_worker_outcomes_total{outcome=...}
// (succeeded, failed, retried, cancelled, expired, lease_lost, released,
// abandoned, snoozed), eoq_worker_in_flight, eoq_worker_store_errors_total and the
// histogram eoq_worker_handler_duration_seconds (buckets from
// WorkerCounters::duration_bounds).
std::string prometheus_text(std::span<const WorkerMetrics> workers);
std::string prometheus_text(const Worker& worker);

// Per queue: eoq_queue_tasks{queue, status} (a gauge of the tasks stored, every
// status, waiting and zeros included: retention lowers the finished ones),
// eoq_queue_oldest_pending_age_seconds (0 when nothing is due), eoq_queue_paused (0 or 1),
// eoq_queue_finished_total{queue, outcome} (a counter of tasks that finished:
// succeeded, failed, cancelled, expired; never lowered, so rate() works), and
// eoq_queue_finished_last_minute{queue, outcome} (succeeded and failed in the
// last minute, a gauge).
std::string prometheus_text(std::span<const QueueStats> queues);
// eoq_build_info{version="..."} 1.
std::string prometheus_build_info();
inline std::string prometheus_text(const std::vector<QueueStats>& queues) {
  return prometheus_text(std::span<const QueueStats>(queues));
}

}  // namespace eoq
