"""Model code: the tiny offline models, loading and batched generation, CLIP scoring."""
