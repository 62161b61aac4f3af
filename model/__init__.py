"""The LongCat-Flash model on a moeport Runtime.

    from moeport.model import load_pretrained
    m = load_pretrained("path/to/hf/dir")
    logits = m(input_ids)                            # [B, T, vocab]
    tokens = m.generate(input_ids, max_new_tokens=8)  # [B, T + 8], greedy
"""

from moeport.model.checkpoint import load_pretrained, save_pretrained
from moeport.model.config import PRESETS, LongcatConfig, parameter_counts
from moeport.model.lm import LongcatForCausalLM

__all__ = ["LongcatConfig", "LongcatForCausalLM", "PRESETS", "load_pretrained", "parameter_counts", "save_pretrained"]
