"""irepa.metrics.spatial: the public name of the encoder spatial metrics (LDS, CDS, SRSS, RMSC).

They live beside the encoder analysis that uses them, in irepa/analysis/spatial.py; this name
is that same module object (not a copy), so everything in it is reachable from here too.
"""
import sys

from irepa.analysis import spatial as _spatial

sys.modules[__name__] = _spatial
