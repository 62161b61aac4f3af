"""moeport: a LongCat-Flash-style Mixture-of-Experts and its ScMoE overlap schedule on any accelerator."""

__version__ = "0.1.0"
