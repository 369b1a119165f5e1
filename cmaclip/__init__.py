"""cmaclip: distributed training of CMA-CLIP (Cross-Modality Attention CLIP, arXiv 2112.03562)."""

__version__ = "0.1.0"
