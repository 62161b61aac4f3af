"""The LongCat-Flash model on a moeport Runtime (or on its own, one process on the CPU).

    from moeport.model import load_pretrained
    m = load_pretrained("path/to/hf/dir")            # or load_pretrained(path, runtime)
    logits = m(input_ids)                            # [B, T, vocab]
    tokens = m.generate(input_ids, max_new_tokens=8)  # [B, T + 8], greedy

What the model needs of the machine comes through a ModelContext (context.py); it
imports no backend. docs/design.md walks through the files.
"""

from moeport.model.checkpoint import load_pretrained, save_pretrained
from moeport.model.config import PRESETS, LongcatConfig, parameter_counts
from moeport.model.context import ModelContext
from moeport.model.lm import LongcatForCausalLM

__all__ = ["LongcatConfig", "LongcatForCausalLM", "ModelContext", "PRESETS", "load_pretrained", "parameter_counts",
           "save_pretrained"]
