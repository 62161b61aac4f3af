"""The LongCat-Flash model on a moeport Runtime (or on its own, one process on the CPU).

    from moeport.model import load_pretrained
    m = load_pretrained("path/to/hf/dir")            # or load_pretrained(path, runtime)
    logits = m(input_ids)                            # [B, T, vocab]
    tokens = m.generate(input_ids, max_new_tokens=8)  # [B, T + 8], greedy

    engine = Engine(m, max_batch=8, max_length=512)  # continuous batching: requests join and leave
    engine.add(prompt_ids, max_new_tokens=32)
    finished = engine.run()                          # FinishedRequest(id, prompt, tokens, reason)

What the model needs of the machine comes through a ModelContext (context.py); it
imports no backend. docs/design.md walks through the files.
"""

from moeport.model.checkpoint import load_pretrained, save_pretrained
from moeport.model.config import PRESETS, LongcatConfig, parameter_counts
from moeport.model.context import ModelContext
from moeport.model.engine import Engine, FinishedRequest, Sampling
from moeport.model.lm import LongcatForCausalLM

__all__ = ["Engine", "FinishedRequest", "LongcatConfig", "LongcatForCausalLM", "ModelContext", "PRESETS", "Sampling",
           "load_pretrained", "parameter_counts", "save_pretrained"]
