"""ccad: diffusion-based visual anomaly inspection (CCAD, PatchCore baseline)."""
__version__ = "0.1.0"
