"""CLIP text side: OpenAI's BPE tokenizer and the ViT-L/14 text tower, through open-clip.

`encode` returns, explicitly, everything the prior needs from CLIP: the raw text embedding
(encode_text's output), its L2-normalised copy, the 77 final-LayerNorm states and the mask.
dalle2-pytorch 0.11.5 captured the states with a forward hook; here they are simply the
tower's intermediate value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import regex
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn


@dataclass(frozen=True)
class TextConfig:
    width: int = 768
    layers: int = 12
    heads: int = 12  # width // 64, as OpenAI's CLIP
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 768  # text_projection's output == the prior's width


@dataclass
class TextFeatures:
    raw: torch.Tensor  # (B, E) encode_text output, not normalised
    embed: torch.Tensor  # (B, E) L2-normalised: what conditions the prior
    states: torch.Tensor  # (B, 77, W) ln_final outputs at every position
    mask: torch.Tensor  # (B, 77) bool, tokens != 0


class Tokenizer:
    """OpenAI CLIP tokenization: `clip.tokenize(texts, truncate=True)`, and whether it truncated."""

    def __init__(self, context_length: int = 77):
        self.context_length = context_length
        self._bpe = _openai_special_tokens(SimpleTokenizer(context_length=context_length))

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """(B, 77) int64 tokens; over-long prompts are cut, keeping the end token last."""
        tokens = self._bpe(list(prompts), context_length=self.context_length)
        # start + BPE tokens + end: longer than the context means the tail was cut
        truncated = [len(self._bpe.encode(p)) + 2 > self.context_length for p in prompts]
        return tokens, truncated


def _openai_special_tokens(bpe: SimpleTokenizer) -> SimpleTokenizer:
    """Make open-clip's BPE read special tokens as OpenAI's `clip` does: the text
    '<|startoftext|>' / '<|endoftext|>' (any case) is the start / end token, and open-clip's own
    '<start_of_text>' / '<end_of_text>' are plain text."""
    for openai, open_clip in (("<|startoftext|>", "<start_of_text>"), ("<|endoftext|>", "<end_of_text>")):
        bpe.encoder[openai] = bpe.encoder.pop(open_clip)
        bpe.cache.pop(open_clip, None)
        bpe.cache[openai] = openai
    bpe.pat = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    return bpe


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.tower = TextTransformer(
            context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
            heads=cfg.heads, layers=cfg.layers, output_dim=cfg.embed_dim, act_layer=QuickGELU,
        )
        del self.tower.attn_mask  # not in the file; built per call below (a 77x77 triangle)

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor) -> TextFeatures:
        tower = self.tower
        dtype = tower.token_embedding.weight.dtype
        x = tower.token_embedding(tokens) + tower.positional_embedding.to(dtype)
        n = tokens.shape[1]
        causal = torch.full((n, n), float("-inf"), device=tokens.device, dtype=dtype).triu(1)
        x = tower.transformer(x, attn_mask=causal)
        states = tower.ln_final(x)  # (B, 77, W)
        end = tokens.argmax(dim=-1)  # the end token has the largest id
        raw = states[torch.arange(len(tokens), device=tokens.device), end] @ tower.text_projection
        return TextFeatures(raw=raw, embed=F.normalize(raw.float(), dim=-1), states=states, mask=tokens != 0)
