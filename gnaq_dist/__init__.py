"""gnaq-dist: LightGCN with node-aware quantized embeddings (GNAQ), distributed on Ray.

Importing the package is cheap and needs no GPU, no running Ray and no network:
heavy modules (torch, DGL, Ray) are imported by the submodules that use them.
"""

__version__ = "0.1.0"
