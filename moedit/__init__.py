"""moedit: train and study Mixture-of-Experts Diffusion Transformers."""

__version__ = "0.1.0"
