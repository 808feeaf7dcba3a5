// serve.hpp: the `--serve [HOST:PORT]` mode of the scenario examples: eoq's
// dashboard on loopback, without tokens, over the example's own store, so a user
// watches the run live and submits tasks of their own from the page while the
// example's workers keep running. Needs eoq::dashboard (built with
// EOQ_BUILD_TOOLS); like example_support.hpp it is not part of eoq's API.
#pragma once

#ifndef EOQ_EXAMPLE_NO_DASHBOARD
#include <eoq/dashboard.hpp>
#endif
#include <eoq/task_store.hpp>

#include <signal.h>

#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>

namespace example {

constexpr const char* kDefaultServe = "127.0.0.1:8080";

// "--serve" with an optional HOST:PORT after it (the next argument, unless it is
// another flag). Removes it from argv so the example's own flag parsing never
// sees it. Empty when absent.
inline std::optional<std::string> take_serve_flag(int& argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) != "--serve") continue;
    bool has_value = i + 1 < argc && argv[i + 1][0] != '-';
    std::string listen = has_value ? argv[i + 1] : kDefaultServe;
    int drop = has_value ? 2 : 1;
    for (int j = i; j + drop <= argc; ++j) argv[j] = argv[j + drop];
    argc -= drop;
    return listen;
  }
  return std::nullopt;
}

// SIGTERM and SIGINT blocked in this thread and every thread started after it,
// so that only sigwait sees them: stopping workers and a server is no job for a
// signal handler. Call before starting any thread.
inline sigset_t block_stop_signals() {
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGTERM);
  sigaddset(&s, SIGINT);
  pthread_sigmask(SIG_BLOCK, &s, nullptr);
  return s;
}

#ifndef EOQ_EXAMPLE_NO_DASHBOARD
// The dashboard of `store`, served from construction until destruction. Only a
// loopback address is accepted (DashboardServer refuses no_auth elsewhere, and
// says so naming "listen"): the page can submit, cancel and retry, and it has no
// tokens here.
class Serve {
 public:
  Serve(eoq::TaskStore& store, const std::string& listen)
      : server_(store, no_auth(), listen) {
    server_.start();
    auto host = listen.substr(0, listen.rfind(':'));
    url_ = "http://" + host + ":" + std::to_string(server_.port()) + "/";
    // The line a script (or the browser test) waits for; flushed at once.
    std::printf("serving the dashboard on %s\n", url_.c_str());
    std::fflush(stdout);
  }
  const std::string& url() const noexcept { return url_; }

  // Blocks until SIGTERM or SIGINT (blocked beforehand by block_stop_signals).
  void wait_for_stop_signal(const sigset_t& signals) {
    std::printf("the workers keep running; submit from the page at %s, Ctrl-C to stop\n", url_.c_str());
    std::fflush(stdout);
    int sig = 0;
    sigwait(&signals, &sig);
    std::printf("got %s, stopping\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  }

 private:
  static eoq::DashboardOptions no_auth() {
    eoq::DashboardOptions o;
    o.no_auth = true;
    return o;
  }
  eoq::DashboardServer server_;
  std::string url_;
};

#else
// Built without eoq::dashboard (EOQ_BUILD_TOOLS=OFF): --serve says so.
class Serve {
 public:
  Serve(eoq::TaskStore&, const std::string&) {
    throw std::runtime_error("--serve: this build has no dashboard (configure with EOQ_BUILD_TOOLS=ON)");
  }
  const std::string& url() const noexcept { return url_; }
  void wait_for_stop_signal(const sigset_t&) {}

 private:
  std::string url_;
};
#endif

}  // namespace example
