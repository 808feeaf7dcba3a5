// The Prometheus text exposition format, version 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/).
#include <eoq/metrics.hpp>

#include <fmt/format.h>

#include <array>
#include <cstdint>
#include <utility>

namespace eoq {
namespace {

// Label values may hold anything (queue names are restricted, worker ids are
// not): backslash, double quote and newline must be escaped.
std::string label_value(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

void family(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

double seconds(std::chrono::microseconds us) { return static_cast<double>(us.count()) / 1e6; }

}  // namespace

std::string prometheus_text(std::span<const WorkerMetrics> workers) {
  std::string out;
  auto each = [&](auto&& sample) {
    for (const auto& w : workers) sample(label_value(w.worker), w.counters);
  };
  family(out, "eoq_worker_claimed_total", "counter", "Leases the worker took.");
  each([&](const std::string& id, const WorkerCounters& c) {
    out += fmt::format("eoq_worker_claimed_total{{worker=\"{}\"}} {}\n", id, c.claimed);
  });
  family(out, "eoq_worker_outcomes_total", "counter",
         "Leases the worker ended, by outcome (claimed = sum of outcomes + in_flight).");
  each([&](const std::string& id, const WorkerCounters& c) {
    const std::array<std::pair<const char*, std::uint64_t>, 9> outcomes{{{"succeeded", c.succeeded},
                                                                         {"failed", c.failed},
                                                                         {"retried", c.retried},
                                                                         {"cancelled", c.cancelled},
                                                                         {"expired", c.expired},
                                                                         {"lease_lost", c.lease_lost},
                                                                         {"released", c.released},
                                                                         {"abandoned", c.abandoned},
                                                                         {"snoozed", c.snoozed}}};
    for (const auto& [name, n] : outcomes)
      out += fmt::format("eoq_worker_outcomes_total{{worker=\"{}\",outcome=\"{}\"}} {}\n", id, name, n);
  });
  family(out, "eoq_worker_in_flight", "gauge", "Leases the worker holds now (buffered, running or being settled).");
  each([&](const std::string& id, const WorkerCounters& c) {
    out += fmt::format("eoq_worker_in_flight{{worker=\"{}\"}} {}\n", id, c.in_flight);
  });
  family(out, "eoq_worker_store_errors_total", "counter", "Failed store calls (retried or given up on).");
  each([&](const std::string& id, const WorkerCounters& c) {
    out += fmt::format("eoq_worker_store_errors_total{{worker=\"{}\"}} {}\n", id, c.store_errors);
  });
  family(out, "eoq_worker_handler_duration_seconds", "histogram", "Handler run time.");
  each([&](const std::string& id, const WorkerCounters& c) {
    // The worker's buckets are per range and are read one by one while handlers
    // finish: the count is their sum, so +Inf always equals _count.
    std::uint64_t cumulative = 0;
    const auto& bounds = WorkerCounters::duration_bounds;
    for (std::size_t i = 0; i < bounds.size(); ++i) {
      cumulative += c.handler_duration_buckets[i];
      out += fmt::format("eoq_worker_handler_duration_seconds_bucket{{worker=\"{}\",le=\"{}\"}} {}\n", id,
                         static_cast<double>(bounds[i].count()) / 1e3, cumulative);
    }
    cumulative += c.handler_duration_buckets[bounds.size()];
    out += fmt::format("eoq_worker_handler_duration_seconds_bucket{{worker=\"{}\",le=\"+Inf\"}} {}\n", id, cumulative);
    out += fmt::format("eoq_worker_handler_duration_seconds_sum{{worker=\"{}\"}} {}\n", id,
                       seconds(c.handler_time_total));
    out += fmt::format("eoq_worker_handler_duration_seconds_count{{worker=\"{}\"}} {}\n", id, cumulative);
  });
  return out;
}

std::string prometheus_build_info() {
  std::string out;
  family(out, "eoq_build_info", "gauge", "The eoq library serving these metrics (always 1).");
  out += fmt::format("eoq_build_info{{version=\"{}\"}} 1\n", label_value(version()));
  return out;
}

std::string prometheus_text(const Worker& worker) {
  WorkerMetrics one{worker.id(), worker.counters()};
  return prometheus_text(std::span<const WorkerMetrics>(&one, 1));
}

std::string prometheus_text(std::span<const QueueStats> queues) {
  std::string out;
  family(out, "eoq_queue_tasks", "gauge", "Tasks in the store by queue and status (finished ones until retention).");
  for (const auto& q : queues) {
    const auto name = label_value(q.queue);
    const std::array<std::pair<TaskStatus, std::int64_t>, 7> by_status{{{TaskStatus::pending, q.pending},
                                                                        {TaskStatus::running, q.running},
                                                                        {TaskStatus::waiting, q.waiting},
                                                                        {TaskStatus::succeeded, q.succeeded},
                                                                        {TaskStatus::failed, q.failed},
                                                                        {TaskStatus::cancelled, q.cancelled},
                                                                        {TaskStatus::expired, q.expired}}};
    for (const auto& [status, n] : by_status)
      out += fmt::format("eoq_queue_tasks{{queue=\"{}\",status=\"{}\"}} {}\n", name, to_string(status), n);
  }
  family(out, "eoq_queue_paused", "gauge", "1 while the queue is paused (claims take none of its tasks).");
  for (const auto& q : queues)
    out += fmt::format("eoq_queue_paused{{queue=\"{}\"}} {}\n", label_value(q.queue), q.paused ? 1 : 0);
  family(out, "eoq_queue_limit", "gauge",
         "A queue's limit (TaskStore::set_limits), by kind: concurrency and partition_concurrency (tasks "
         "running at once), rate and partition_rate (starts per rate_period_seconds). No sample: no such limit.");
  for (const auto& q : queues) {
    const auto name = label_value(q.queue);
    const auto& l = q.limits;
    if (l.concurrency) out += fmt::format("eoq_queue_limit{{queue=\"{}\",kind=\"concurrency\"}} {}\n", name, *l.concurrency);
    if (l.partition_concurrency)
      out += fmt::format("eoq_queue_limit{{queue=\"{}\",kind=\"partition_concurrency\"}} {}\n", name,
                         *l.partition_concurrency);
    if (l.rate) out += fmt::format("eoq_queue_limit{{queue=\"{}\",kind=\"rate\"}} {}\n", name, l.rate->limit);
    if (l.partition_rate)
      out += fmt::format("eoq_queue_limit{{queue=\"{}\",kind=\"partition_rate\"}} {}\n", name, l.partition_rate->limit);
  }
  family(out, "eoq_queue_limit_rate_period_seconds", "gauge", "The period of a queue's rate limit, by kind.");
  for (const auto& q : queues) {
    const auto name = label_value(q.queue);
    if (q.limits.rate)
      out += fmt::format("eoq_queue_limit_rate_period_seconds{{queue=\"{}\",kind=\"rate\"}} {}\n", name,
                         static_cast<double>(q.limits.rate->period.count()) / 1e3);
    if (q.limits.partition_rate)
      out += fmt::format("eoq_queue_limit_rate_period_seconds{{queue=\"{}\",kind=\"partition_rate\"}} {}\n", name,
                         static_cast<double>(q.limits.partition_rate->period.count()) / 1e3);
  }
  family(out, "eoq_queue_oldest_pending_age_seconds", "gauge",
         "How long the oldest due pending task has waited (0: none waits).");
  for (const auto& q : queues)
    out += fmt::format("eoq_queue_oldest_pending_age_seconds{{queue=\"{}\"}} {}\n", label_value(q.queue),
                       q.oldest_pending_age ? static_cast<double>(q.oldest_pending_age->count()) / 1e3 : 0.0);
  // Counters, so that rate() and increase() see every task, whatever happens
  // between two scrapes, and retention does not lower them.
  family(out, "eoq_queue_finished_total", "counter", "Tasks that finished, by queue and outcome.");
  for (const auto& q : queues) {
    const auto name = label_value(q.queue);
    const std::array<std::pair<const char*, std::int64_t>, 4> outcomes{{{"succeeded", q.succeeded_total},
                                                                        {"failed", q.failed_total},
                                                                        {"cancelled", q.cancelled_total},
                                                                        {"expired", q.expired_total}}};
    for (const auto& [outcome, n] : outcomes)
      out += fmt::format("eoq_queue_finished_total{{queue=\"{}\",outcome=\"{}\"}} {}\n", name, outcome, n);
  }
  family(out, "eoq_queue_finished_last_minute", "gauge",
         "Tasks that finished in the last minute (50 to 60 s), by outcome; rate(eoq_queue_finished_total) is exact.");
  for (const auto& q : queues) {
    const auto name = label_value(q.queue);
    out += fmt::format("eoq_queue_finished_last_minute{{queue=\"{}\",outcome=\"succeeded\"}} {}\n", name,
                       q.succeeded_last_minute);
    out += fmt::format("eoq_queue_finished_last_minute{{queue=\"{}\",outcome=\"failed\"}} {}\n", name,
                       q.failed_last_minute);
  }
  return out;
}

}  // namespace eoq
