"""The embedded dataset, as the data layer names it: the loader itself is irepa.digits (it imports
no irepa module, so the digits CNN target, an encoder, trains on it without importing this layer)."""
from irepa.digits import NUM_CLASSES, load_digits_images

__all__ = ["NUM_CLASSES", "load_digits_images"]
