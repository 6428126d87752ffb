"""Local tooling for `make run`, the tests and the benchmarks: start and stop real processes."""
