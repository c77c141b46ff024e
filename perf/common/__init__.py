"""The plumbing every perf script shares: where a row comes from (provenance), CSV rows (rows),
the generated blocks of perf/RESULTS.md (results_md), quantiles (stats) and what the device was
doing while a row was measured (device_state)."""
from perf.common.provenance import ROOT, commit, device_name, env_info, write_commit_file
from perf.common.results_md import rewrite_block
from perf.common.rows import read_csv, write_rows
from perf.common.stats import quantile, quantiles

__all__ = ["ROOT", "commit", "device_name", "env_info", "write_commit_file", "rewrite_block", "read_csv",
           "write_rows", "quantile", "quantiles"]
