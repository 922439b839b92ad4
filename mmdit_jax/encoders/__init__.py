"""Frozen encoders SD3 conditions on and trains through: CLIP-L, OpenCLIP bigG, T5-XXL, the 16-channel VAE."""
