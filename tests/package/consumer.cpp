// Built by the package tests exactly as a host would build against eoq.
#include <eoq/eoq.hpp>

#include <iostream>

int main(int argc, char** argv) {
  if (argc > 1) {  // never in the tests: here so that the link needs libpq and fmt as a real host's does
    eoq::PostgresStore pg(argv[1]);
    pg.migrate();
  }
  eoq::MemoryStore store;
  eoq::NewTask t;
  t.type = "hello";
  t.key = "once";
  auto a = store.submit(t);
  auto b = store.submit(t);
  std::cout << "task " << a.task.id << ", duplicate on resubmit: " << std::boolalpha << b.duplicate << "\n";
  return (a.task.id == b.task.id && b.duplicate) ? 0 : 1;
}
