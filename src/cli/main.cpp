// Placeholder until the command-line tool lands.
#include <cstdio>
int main() {
  std::puts("eoq: not built yet");
  return 2;
}
