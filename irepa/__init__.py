"""iREPA: representation alignment for diffusion transformers."""
