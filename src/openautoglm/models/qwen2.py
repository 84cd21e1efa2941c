"""Qwen2: the Llama block with biases on q/k/v (``attention_bias`` defaults to True for this model_type).

Follows transformers' ``modeling_qwen2.py``. Sliding-window attention is off in every released Qwen2
checkpoint (``use_sliding_window: false``) and is not implemented.
"""

from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
