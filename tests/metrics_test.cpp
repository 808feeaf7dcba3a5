// eoq/metrics.hpp and the dashboard's /metrics, read back by a strict parser of
// the Prometheus text format 0.0.4: a text the parser refuses fails the test, as
// a scrape would refuse it, and the values are checked through what it parsed.
#include "support.hpp"

#include <eoq/dashboard.hpp>
#include <eoq/metrics.hpp>
#include <eoq/worker.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <cmath>
#include <map>
#include <set>
#include <stdexcept>
#include <cstring>
#include <thread>

using namespace std::chrono_literals;
using eoq::test::StoreKind;
using eoq::test::TestStore;

namespace {

// --- a strict parser of the text exposition format ---------------------------

using Labels = std::map<std::string, std::string>;

struct Sample {
  std::string name;
  Labels labels;
  double value = 0;
};

struct Family {
  std::string type;  // counter, gauge, histogram, summary, untyped
  std::string help;
  std::vector<Sample> samples;
};

struct Exposition {
  std::map<std::string, Family> families;
  // The value of the one sample with this name and labels; throws when absent.
  double value(const std::string& name, const Labels& labels = {}) const {
    for (const auto& [_, f] : families)
      for (const auto& s : f.samples)
        if (s.name == name && s.labels == labels) return s.value;
    throw std::runtime_error("no sample " + name);
  }
};

[[noreturn]] void reject(int line, const std::string& why) {
  throw std::runtime_error(fmt::format("line {}: {}", line, why));
}

bool name_start(char c, bool colon) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || (colon && c == ':'); }
bool name_char(char c, bool colon) { return name_start(c, colon) || std::isdigit(static_cast<unsigned char>(c)); }

std::string read_name(std::string_view s, std::size_t& at, bool colon, int line) {
  std::size_t from = at;
  if (at >= s.size() || !name_start(s[at], colon)) reject(line, "expected a name");
  while (at < s.size() && name_char(s[at], colon)) ++at;
  return std::string(s.substr(from, at - from));
}

double read_value(std::string_view text, int line) {
  if (text == "+Inf") return INFINITY;
  if (text == "-Inf") return -INFINITY;
  if (text == "NaN") return NAN;
  std::string t(text);
  char* end = nullptr;
  double v = std::strtod(t.c_str(), &end);
  if (t.empty() || end != t.c_str() + t.size() || t.find_first_of("xXpP") != std::string::npos ||
      t.find("inf") != std::string::npos || t.find("nan") != std::string::npos)
    reject(line, "not a float: '" + t + "'");
  return v;
}

// The family a sample belongs to: histograms own name_bucket, _sum and _count.
std::string family_of(const std::string& sample, const std::map<std::string, Family>& families) {
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    std::string_view s = sample;
    if (s.ends_with(suffix)) {
      std::string base(s.substr(0, s.size() - std::strlen(suffix)));
      auto f = families.find(base);
      if (f != families.end() && f->second.type == "histogram") return base;
    }
  }
  return sample;
}

void check_histogram(const std::string& name, const Family& f) {
  std::map<Labels, std::vector<std::pair<double, double>>> buckets;  // other labels -> (le, count)
  std::map<Labels, double> counts, sums;
  for (const auto& s : f.samples) {
    Labels rest = s.labels;
    if (s.name == name + "_bucket") {
      if (!rest.contains("le")) throw std::runtime_error(name + ": a bucket without le");
      double le = read_value(rest["le"], 0);
      rest.erase("le");
      buckets[rest].emplace_back(le, s.value);
    } else if (s.name == name + "_count") {
      counts[rest] = s.value;
    } else if (s.name == name + "_sum") {
      sums[rest] = s.value;
    } else {
      throw std::runtime_error(name + ": sample " + s.name + " in a histogram");
    }
  }
  for (const auto& [labels, bs] : buckets) {
    for (std::size_t i = 1; i < bs.size(); ++i) {
      if (!(bs[i].first > bs[i - 1].first)) throw std::runtime_error(name + ": le bounds not increasing");
      if (bs[i].second < bs[i - 1].second) throw std::runtime_error(name + ": bucket counts not cumulative");
    }
    if (bs.empty() || !std::isinf(bs.back().first)) throw std::runtime_error(name + ": no +Inf bucket");
    if (!counts.contains(labels) || counts[labels] != bs.back().second)
      throw std::runtime_error(name + ": _count missing or not the +Inf bucket");
    if (!sums.contains(labels)) throw std::runtime_error(name + ": no _sum");
  }
}

Exposition parse(std::string_view text) {
  Exposition out;
  if (!text.empty() && text.back() != '\n') throw std::runtime_error("the text must end with a newline");
  std::set<std::string> closed;  // families whose samples ended: one may not come back
  std::string current;
  std::set<std::pair<std::string, Labels>> seen;
  int n = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    auto end = text.find('\n', pos);
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++n;
    if (line.empty()) continue;
    if (line.starts_with("#")) {
      std::size_t at = 1;
      while (at < line.size() && line[at] == ' ') ++at;
      auto word_end = line.find(' ', at);
      auto word = line.substr(at, word_end == std::string_view::npos ? std::string_view::npos : word_end - at);
      if (word != "HELP" && word != "TYPE") continue;  // a plain comment
      at = word_end + 1;
      auto name = read_name(line, at, true, n);
      if (at < line.size() && line[at] != ' ') reject(n, "junk after the metric name");
      std::string rest(at < line.size() ? line.substr(at + 1) : std::string_view{});
      if (closed.contains(name)) reject(n, name + " comes back after other families");
      auto& f = out.families[name];
      if (word == "TYPE") {
        static const std::set<std::string> types{"counter", "gauge", "histogram", "summary", "untyped"};
        if (!types.contains(rest)) reject(n, "unknown type '" + rest + "'");
        if (!f.type.empty()) reject(n, "a second TYPE for " + name);
        if (!f.samples.empty()) reject(n, "TYPE after samples of " + name);
        f.type = rest;
      } else {
        if (!f.help.empty()) reject(n, "a second HELP for " + name);
        for (std::size_t i = 0; i < rest.size(); ++i)
          if (rest[i] == '\\' && (i + 1 >= rest.size() || (rest[i + 1] != '\\' && rest[i + 1] != 'n')))
            reject(n, "bad escape in HELP");
        f.help = rest;
      }
      if (current != name && !current.empty()) closed.insert(current);
      current = name;
      continue;
    }
    Sample s;
    std::size_t at = 0;
    s.name = read_name(line, at, true, n);
    if (at < line.size() && line[at] == '{') {
      ++at;
      while (at < line.size() && line[at] != '}') {
        auto label = read_name(line, at, false, n);
        if (at >= line.size() || line[at] != '=') reject(n, "expected '=' after " + label);
        if (++at >= line.size() || line[at] != '"') reject(n, "expected '\"'");
        ++at;
        std::string value;
        for (;;) {
          if (at >= line.size()) reject(n, "unterminated label value");
          char c = line[at++];
          if (c == '"') break;
          if (c == '\\') {
            if (at >= line.size()) reject(n, "unterminated escape");
            char e = line[at++];
            if (e == 'n') value += '\n';
            else if (e == '\\' || e == '"') value += e;
            else reject(n, std::string("bad escape \\") + e);
          } else {
            value += c;
          }
        }
        if (!s.labels.emplace(label, value).second) reject(n, "label " + label + " twice");
        if (at < line.size() && line[at] == ',') ++at;
        else if (at < line.size() && line[at] != '}') reject(n, "expected ',' or '}'");
      }
      if (at >= line.size()) reject(n, "unterminated label set");
      ++at;
    }
    if (at >= line.size() || line[at] != ' ') reject(n, "expected a space before the value");
    auto rest = line.substr(at + 1);
    auto space = rest.find(' ');
    s.value = read_value(rest.substr(0, space), n);
    if (space != std::string_view::npos) {
      auto ts = std::string(rest.substr(space + 1));
      if (ts.empty() || ts.find_first_not_of("-0123456789") != std::string::npos) reject(n, "bad timestamp");
    }
    auto fam = family_of(s.name, out.families);
    if (closed.contains(fam)) reject(n, fam + " comes back after other families");
    if (current != fam && !current.empty()) closed.insert(current);
    current = fam;
    if (!seen.emplace(s.name, s.labels).second) reject(n, "a second sample of the same series " + s.name);
    auto& f = out.families[fam];
    if (f.type == "counter" && (s.value < 0 || std::isnan(s.value))) reject(n, "a counter below zero");
    f.samples.push_back(std::move(s));
  }
  for (const auto& [name, f] : out.families)
    if (f.type == "histogram") check_histogram(name, f);
  return out;
}

eoq::NewTask task(std::string queue, std::string type = "t") {
  eoq::NewTask t;
  t.queue = std::move(queue);
  t.type = std::move(type);
  return t;
}

}  // namespace

TEST_CASE("the test's exposition parser refuses what a scrape would refuse", "[metrics]") {
  const char* bad[] = {
      "m 1",                                                    // no final newline
      "m{a=\"1\",a=\"2\"} 1\n",                                 // a label twice
      "m{a=\"\\t\"} 1\n",                                       // an escape the format lacks
      "m 1\nm 2\n",                                             // the same series twice
      "a 1\nb 1\na 2\n",                                        // a family split in two
      "# TYPE c counter\nc -1\n",                               // a negative counter
      "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
      "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 3\nh_count 2\nh_sum 0\n",
      "m{a=\"1\"} one\n",
      "0m 1\n",
  };
  for (const char* text : bad) CHECK_THROWS(parse(text));
  auto ok = parse("# HELP m a help\\ntext\n# TYPE m gauge\nm{a=\"x\\\"y\\\\\\n\"} 1.5 1700000000000\n");
  CHECK(ok.value("m", {{"a", "x\"y\\\n"}}) == 1.5);
}

TEST_CASE("a worker's counters render as Prometheus counters and a cumulative histogram", "[metrics]") {
  eoq::WorkerCounters c;
  c.claimed = 14;
  c.succeeded = 6;
  c.failed = 1;
  c.retried = 2;
  c.snoozed = 4;
  c.in_flight = 1;
  c.store_errors = 3;
  c.handler_duration_buckets[0] = 4;   // <= 5 ms
  c.handler_duration_buckets[4] = 3;   // <= 100 ms
  c.handler_duration_buckets[12] = 2;  // beyond 60 s
  c.handler_runs = 9;
  c.handler_time_total = std::chrono::microseconds(121'500'000);
  // A worker id may hold anything, so the label must be escaped.
  std::vector<eoq::WorkerMetrics> workers{{"host:1:\"odd\\name\"\n", c}, {"other", {}}};
  auto m = parse(eoq::prometheus_text(workers));
  const std::string id = "host:1:\"odd\\name\"\n";
  CHECK(m.families.at("eoq_worker_claimed_total").type == "counter");
  CHECK(m.families.at("eoq_worker_handler_duration_seconds").type == "histogram");
  CHECK(m.value("eoq_worker_claimed_total", {{"worker", id}}) == 14);
  CHECK(m.value("eoq_worker_outcomes_total", {{"worker", id}, {"outcome", "succeeded"}}) == 6);
  CHECK(m.value("eoq_worker_outcomes_total", {{"worker", id}, {"outcome", "retried"}}) == 2);
  CHECK(m.value("eoq_worker_outcomes_total", {{"worker", id}, {"outcome", "abandoned"}}) == 0);
  CHECK(m.value("eoq_worker_outcomes_total", {{"worker", id}, {"outcome", "snoozed"}}) == 4);
  CHECK(m.value("eoq_worker_in_flight", {{"worker", id}}) == 1);
  CHECK(m.value("eoq_worker_store_errors_total", {{"worker", id}}) == 3);
  CHECK(m.value("eoq_worker_handler_duration_seconds_bucket", {{"worker", id}, {"le", "0.005"}}) == 4);
  CHECK(m.value("eoq_worker_handler_duration_seconds_bucket", {{"worker", id}, {"le", "0.05"}}) == 4);
  CHECK(m.value("eoq_worker_handler_duration_seconds_bucket", {{"worker", id}, {"le", "0.1"}}) == 7);
  CHECK(m.value("eoq_worker_handler_duration_seconds_bucket", {{"worker", id}, {"le", "60"}}) == 7);
  CHECK(m.value("eoq_worker_handler_duration_seconds_bucket", {{"worker", id}, {"le", "+Inf"}}) == 9);
  CHECK(m.value("eoq_worker_handler_duration_seconds_count", {{"worker", id}}) == 9);
  CHECK(m.value("eoq_worker_handler_duration_seconds_sum", {{"worker", id}}) == Approx(121.5));
  CHECK(m.value("eoq_worker_handler_duration_seconds_count", {{"worker", "other"}}) == 0);
}

TEST_CASE("a running worker's text adds up: every claim is an outcome or in flight", "[metrics]") {
  TestStore s(StoreKind::memory);
  for (int i = 0; i < 20; ++i) s->submit(task("m", i % 4 == 0 ? "bad" : "good"));
  eoq::WorkerOptions o;
  o.queues = {"m"};
  o.concurrency = 2;
  o.logger = [](eoq::LogLevel, std::string_view) {};
  eoq::Worker worker(*s, o);
  worker.on("good", [](eoq::TaskContext&) {});
  worker.on("bad", [](eoq::TaskContext&) { throw eoq::PermanentError("no"); });
  worker.start();
  while (s->stats()[0].succeeded + s->stats()[0].failed < 20) std::this_thread::sleep_for(5ms);
  worker.stop();
  auto m = parse(eoq::prometheus_text(worker));
  Labels w{{"worker", worker.id()}};
  auto outcome = [&](const char* o) {
    return m.value("eoq_worker_outcomes_total", {{"worker", worker.id()}, {"outcome", o}});
  };
  CHECK(outcome("succeeded") == 15);
  CHECK(outcome("failed") == 5);
  CHECK(m.value("eoq_worker_claimed_total", w) == 20);
  CHECK(m.value("eoq_worker_in_flight", w) == 0);
  CHECK(m.value("eoq_worker_handler_duration_seconds_count", w) == 20);
}

TEST_CASE("the dashboard's /metrics gives each queue's depth by status, oldest wait and throughput",
          "[metrics][dashboard]") {
  auto kind = GENERATE(StoreKind::memory, StoreKind::postgres);
  TestStore s(kind);
  for (int i = 0; i < 3; ++i) s->submit(task("mail"));
  s->submit(task("bulk.v2"));
  eoq::ClaimRequest claim;
  claim.queues = {"mail"};
  claim.limit = 2;
  claim.owner = "w";
  auto leases = s->claim(claim);
  REQUIRE(leases.size() == 2);
  s->complete(leases[0]);

  eoq::DashboardOptions opts;
  opts.tokens = {{"reader-token-0123456789", std::nullopt, false}};
  eoq::Dashboard dashboard(*s, opts);
  eoq::HttpRequest req{"GET", "/metrics", "", {}, ""};
  CHECK(dashboard.handle(req).status == 401);
  req.headers["Authorization"] = "Bearer reader-token-0123456789";
  auto r = dashboard.handle(req);
  REQUIRE(r.status == 200);
  CHECK(r.content_type == eoq::prometheus_content_type);
  INFO(r.body);
  auto m = parse(r.body);
  CHECK(m.families.at("eoq_queue_tasks").type == "gauge");
  auto tasks = [&](const char* q, const char* status) {
    return m.value("eoq_queue_tasks", {{"queue", q}, {"status", status}});
  };
  CHECK(tasks("mail", "pending") == 1);
  CHECK(tasks("mail", "running") == 1);
  CHECK(tasks("mail", "succeeded") == 1);
  CHECK(tasks("mail", "failed") == 0);
  CHECK(tasks("bulk.v2", "pending") == 1);
  CHECK(tasks("bulk.v2", "running") == 0);
  CHECK(m.value("eoq_queue_finished_last_minute", {{"queue", "mail"}, {"outcome", "succeeded"}}) == 1);
  CHECK(m.value("eoq_queue_finished_last_minute", {{"queue", "mail"}, {"outcome", "failed"}}) == 0);
  CHECK(m.value("eoq_queue_oldest_pending_age_seconds", {{"queue", "mail"}}) >= 0);
  CHECK(tasks("mail", "waiting") == 0);
  // Counters of finished tasks, which retention does not lower: rate() works.
  CHECK(m.families.at("eoq_queue_finished_total").type == "counter");
  CHECK(m.value("eoq_queue_finished_total", {{"queue", "mail"}, {"outcome", "succeeded"}}) == 1);
  CHECK(m.value("eoq_queue_finished_total", {{"queue", "mail"}, {"outcome", "failed"}}) == 0);
  CHECK(m.value("eoq_queue_finished_total", {{"queue", "mail"}, {"outcome", "expired"}}) == 0);
  CHECK(m.value("eoq_build_info", {{"version", eoq::version()}}) == 1);
  s->prune(0ms);
  auto after = parse(dashboard.handle(req).body);
  CHECK(after.value("eoq_queue_tasks", {{"queue", "mail"}, {"status", "succeeded"}}) == 0);
  CHECK(after.value("eoq_queue_finished_total", {{"queue", "mail"}, {"outcome", "succeeded"}}) == 1);

  // A child waiting for its parent is counted as waiting.
  eoq::NewTask child = task("mail");
  child.parents = {leases[1].id()};
  s->submit(child);
  auto waiting = parse(dashboard.handle(req).body);
  CHECK(waiting.value("eoq_queue_tasks", {{"queue", "mail"}, {"status", "waiting"}}) == 1);
}
