"""Encoder analysis: spatial metrics over image sets, their correlation with gFID,
spatial-norm pictures. The CLI is launch/analyze.py.

  spatial           the spatial metrics LDS, CDS, SRSS, RMSC (public name: irepa.metrics.spatial)
  features          image sets (digits, folders), masks, per-image metrics, linear probe
  correlation       encoder tables (CSV), Pearson/Spearman r vs gFID, the Figure-4 plot
  spatialnorm_maps  anchor-patch cosine maps before/after spatial norm, their picture
"""
from irepa.analysis.correlation import (
    METRIC_COLUMNS, agg_pyplot, correlate_rows, join_column, plot_correlation, read_rows, write_rows,
)
from irepa.analysis.features import (
    IMAGE_EXTS, EncoderFn, ImageSet, digits_set, filter_by_mask, folder_set, ink_masks, linear_probe, measure,
    measure_encoders, read_mask, read_rgb, subset,
)
from irepa.analysis.spatialnorm_maps import (
    anchor_maps, default_anchors, encoder_anchor_maps, plot_spatialnorm,
)

__all__ = [
    "EncoderFn", "IMAGE_EXTS", "ImageSet", "METRIC_COLUMNS", "agg_pyplot", "anchor_maps",
    "correlate_rows", "default_anchors", "digits_set", "encoder_anchor_maps", "filter_by_mask", "folder_set",
    "ink_masks", "join_column", "linear_probe", "measure", "measure_encoders", "plot_correlation",
    "plot_spatialnorm", "read_mask", "read_rgb", "read_rows", "subset", "write_rows",
]
