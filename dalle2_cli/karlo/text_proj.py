"""Karlo's text projection: how the decoder is conditioned on CLIP's image embedding and text.

Re-implemented (diffusers has it only in its deprecated unCLIP pipeline) with the same parameter
names, so `text_proj/diffusion_pytorch_model.*` loads into it as it is. From the image
embedding and the text embedding it makes a vector added to the unet's time embedding, and
`extra_tokens` context tokens put before the projected, normalised per-token text encodings.
Guidance's null branch replaces the image embedding by a learned one.
"""

from __future__ import annotations

import torch
from torch import nn


class TextProjection(nn.Module):
    def __init__(
        self,
        *,
        clip_extra_context_tokens: int = 4,
        clip_embeddings_dim: int = 768,
        time_embed_dim: int,
        cross_attention_dim: int,
    ):
        super().__init__()
        self.extra_tokens = clip_extra_context_tokens
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip_embeddings_dim))
        self.embedding_proj = nn.Linear(clip_embeddings_dim, time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip_embeddings_dim, time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(
            clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim
        )
        self.encoder_hidden_states_proj = nn.Linear(clip_embeddings_dim, cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_attention_dim)

    def null_image_embeds(self, rows: int) -> torch.Tensor:
        """The learned image embedding of guidance's null branch, for `rows` rows."""
        return self.learned_classifier_free_guidance_embeddings.unsqueeze(0).expand(rows, -1)

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_encodings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context tokens for the unet's cross-attention, a vector added to its time embedding)."""
        batch = text_embeds.shape[0]
        time_added = self.clip_image_embeddings_project_to_time_embeddings(image_embeds) + self.embedding_proj(
            text_embeds
        )
        extra = self.clip_extra_context_tokens_proj(image_embeds).reshape(batch, -1, self.extra_tokens).permute(0, 2, 1)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_encodings))
        return torch.cat([extra, text], dim=1), time_added
