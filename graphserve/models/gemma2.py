"""Gemma 2: Gemma 3's layer without the q/k norms (four Gemma norms per layer, GeGLU, the query_pre_attn_scalar
scale, alternating sliding-window and global layers), with attention logits soft-capped (`attn_logit_softcapping`,
PAGED_ATTN only) and final logits soft-capped (`final_logit_softcapping`)."""
from __future__ import annotations

from graphserve.models.gemma3 import Gemma3ForCausalLM


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 2 causal LM."""

    qk_norm = False
