"""Benchmarks, the roofline model and the prepared GPU call. Run each as a module from the
repository root, e.g. `python -m perf.bench_step --quick --device cpu`; the shared plumbing
(commit, CSV rows, RESULTS.md blocks, quantiles, device state) is perf.common."""
