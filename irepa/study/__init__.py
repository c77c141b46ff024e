"""The paper's question on the digits, end to end: does generation quality follow a target's
spatial structure (LDS, CDS, SRSS, RMSC) or its global information (linear probe)?

`launch/analyze.py study` is the entry point. spec (targets x methods x seeds, evaluated at
fixed steps) -> runner (an irepa.compare comparison of every run, the targets' metrics by
irepa.analysis) -> stats (Pearson / Spearman with bootstrap intervals and permutation p) ->
report (tables, scatter plots). The targets include learned ones trained here
(irepa.encoders.digits_cnn) and controls (irepa.encoders.controls).
"""
from .spec import StudySpec, digits_default

__all__ = ["StudySpec", "digits_default"]
