"""Local tooling shared by `make run`, the tests and the benchmarks: start and stop real processes."""
