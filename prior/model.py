"""The diffusion prior network of dalle2-pytorch 0.11.5, written for inference.

The network is a causal transformer over 81 tokens:

    position  0..76   CLIP text encodings (ln_final states), masked where the token id is 0
    position  77      the normalised CLIP text embedding ("keep" decides if it is attended)
    position  78      the timestep embedding (a lookup table)
    position  79      the noised image embedding x_t
    position  80      a learned query; the output at this position is the predicted x_0

Because attention is causal, the states of positions 0..77 never see the timestep or
x_t: they are the same at every one of the 1000 sampling steps. `encode_condition` runs
them once and keeps each layer's keys and values (a KV cache); `denoise` then runs only
the last three positions per step. That is the same arithmetic as running all 81 tokens,
in about 3/81 of the work. Positions whose keys are masked for every row (padding, and
the whole prefix of the unconditional pass) are not computed at all.

Keys and weights follow the checkpoint's tensors one to one; `prior/checkpoint.py` maps
the file's names to the names used here.

The same network as dalle2-pytorch 0.23.1-1.8.x saved it (the "later" layout) differs in a few
explicit places, each a PriorConfig flag whose default is 0.11.5's:
    learned_padding   text positions beyond the end token hold a learned `null_text_embed`
                      (1, text_len, dim) instead of being masked; every text position is attended
    text_len          the number of text positions (the later layout's max_text_len, 77 or 256)
    norm_bias         LayerNorms have a gain only, no bias
    stable_norm_out   the final LayerNorm first divides each row by its maximum
    rel_pos_scale     the relative-position bias counts 128 times (pb-relax: logits are computed
                      divided by 128, the bias added, then multiplied back)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TEXT_LEN = 77  # CLIP context length: the number of text-encoding tokens
PREFIX_LEN = TEXT_LEN + 1  # text encodings + text embedding: the step-independent tokens
STEP_LEN = 3  # timestep embedding, noised image embedding, learned query
SEQ_LEN = PREFIX_LEN + STEP_LEN  # 81


@dataclass(frozen=True)
class PriorConfig:
    dim: int = 768  # token width == CLIP embedding size
    depth: int = 24
    heads: int = 32  # query heads; keys and values are one shared head
    dim_head: int = 64
    ff_inner: int = 3072  # feed-forward width after SwiGLU (ff_mult * dim)
    num_timesteps: int = 1000
    rotary_dim: int = 32  # min(32, dim_head) leading dims of each head are rotated
    rel_pos_buckets: int = 32
    rel_pos_max_distance: int = 128
    # the later layout (dalle2-pytorch 0.23.1-1.8.x); see the module's docstring
    learned_padding: bool = False
    text_len: int = TEXT_LEN
    norm_bias: bool = True
    stable_norm_out: bool = False
    rel_pos_scale: float = 1.0

    @property
    def prefix_len(self) -> int:  # text positions + text embedding: the step-independent tokens
        return self.text_len + 1

    @property
    def seq_len(self) -> int:
        return self.prefix_len + STEP_LEN


def lookup_table(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its random init: the weights always come from the file, and on the
    meta device (where `_build` constructs) init's normal_ imports torch._dynamo, 1 s of start-up."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class LayerNorm(nn.Module):
    """LayerNorm with a gain and a bias, eps 1e-5 (0.11.5 keeps the bias as a buffer); the later
    layout has a gain only (`bias=False`), and its final norm is `stable`: x / max(x) first."""

    def __init__(self, dim: int, bias: bool = True, stable: bool = False):
        super().__init__()
        self.stable = stable
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class Attention(nn.Module):
    """Pre-norm multi-query attention: `heads` query heads, one key/value head, a learned
    null key/value always attended, rotary positions on q and k, out-projection + LayerNorm."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.norm = LayerNorm(cfg.dim, cfg.norm_bias)
        self.to_q = nn.Linear(cfg.dim, cfg.heads * cfg.dim_head, bias=False)
        self.to_kv = nn.Linear(cfg.dim, 2 * cfg.dim_head, bias=False)
        self.null_kv = nn.Parameter(torch.zeros(2, cfg.dim_head))
        self.to_out = nn.Linear(cfg.heads * cfg.dim_head, cfg.dim, bias=False)
        self.out_norm = LayerNorm(cfg.dim, cfg.norm_bias)

    def project(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]):
        """x (B, n, D) -> q (B, H, n, dh) scaled and rotated; k, v (B, n, dh), k rotated."""
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        q = q * self.dim_head**-0.5  # 0.11.5 scales before rotating; kept for equal rounding
        k, v = self.to_kv(x).chunk(2, dim=-1)
        return apply_rotary(q, *rotary), apply_rotary(k, *rotary), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q (B, H, n, dh); k, v (B, J, dh) with the null key first; bias (B, H, n, J),
        -inf where masked. Returns (B, n, D)."""
        b, h, n, dh = q.shape
        # One shared key/value head: fold the heads into the query axis, a single matmul.
        out = F.scaled_dot_product_attention(
            q.reshape(b, 1, h * n, dh), k.unsqueeze(1), v.unsqueeze(1),
            attn_mask=bias.reshape(b, 1, h * n, -1), scale=1.0,
        )
        out = out.view(b, h, n, dh).transpose(1, 2).reshape(b, n, h * dh)
        return self.out_norm(self.to_out(out))


class FeedForward(nn.Module):
    """Pre-norm SwiGLU feed-forward with a LayerNorm after the activation (normformer)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.norm_bias)
        self.proj_in = nn.Linear(cfg.dim, 2 * cfg.ff_inner, bias=False)
        self.inner_norm = LayerNorm(cfg.ff_inner, cfg.norm_bias)
        self.proj_out = nn.Linear(cfg.ff_inner, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(self.inner_norm(value * F.silu(gate)))


class Block(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.ff = FeedForward(cfg)


@dataclass
class Condition:
    """What a batch of text conditions contributes to every step, computed once.

    keys, values: (depth, B, 1 + P, dh) per layer: the null key/value, then the P prefix
    positions that any row can attend (keys rotated). step_bias: (B, H, STEP_LEN, 1 + P + STEP_LEN),
    the additive attention bias of the three step tokens over those keys and themselves:
    relative-position bias, -inf on masked keys and on causally hidden ones.
    """

    keys: torch.Tensor
    values: torch.Tensor
    step_bias: torch.Tensor

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def repeat_interleave(self, n: int | torch.Tensor) -> Condition:
        """Each row repeated n times in place (row i becomes rows i*n .. i*n+n-1); a tensor n
        (B,) repeats row i n[i] times."""
        return Condition(
            self.keys.repeat_interleave(n, dim=1),
            self.values.repeat_interleave(n, dim=1),
            self.step_bias.repeat_interleave(n, dim=0),
        )

    def padded(self, prefix_keys: int) -> Condition:
        """The same condition with masked dummy prefix keys appended, up to `prefix_keys`."""
        extra = prefix_keys - (self.keys.shape[2] - 1)
        if extra == 0:
            return self
        depth, b, _, dh = self.keys.shape
        zeros = self.keys.new_zeros(depth, b, extra, dh)
        hidden = self.step_bias.new_full((*self.step_bias.shape[:3], extra), float("-inf"))
        bias = torch.cat([self.step_bias[..., :-STEP_LEN], hidden, self.step_bias[..., -STEP_LEN:]], dim=-1)
        return Condition(torch.cat([self.keys, zeros], dim=2), torch.cat([self.values, zeros], dim=2), bias)

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        """Stack conditions along the batch, padding their prefixes to one length."""
        longest = max(c.keys.shape[2] - 1 for c in conditions)
        conditions = [c.padded(longest) for c in conditions]
        return Condition(
            torch.cat([c.keys for c in conditions], dim=1),
            torch.cat([c.values for c in conditions], dim=1),
            torch.cat([c.step_bias for c in conditions], dim=0),
        )


class PriorNetwork(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = lookup_table(cfg.num_timesteps, cfg.dim)
        self.learned_query = nn.Parameter(torch.zeros(cfg.dim))
        self.rel_pos_bias = lookup_table(cfg.rel_pos_buckets, cfg.heads)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = LayerNorm(cfg.dim, cfg.norm_bias, stable=cfg.stable_norm_out)
        self.project_out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        if cfg.learned_padding:
            self.null_text_embed = nn.Parameter(torch.zeros(1, cfg.text_len, cfg.dim))
        # The checkpoint's rotary frequencies (fp16-rounded), not recomputed ones.
        self.register_buffer("rotary_freqs", torch.zeros(cfg.rotary_dim // 2))

    # -- tables that depend only on positions, built once per condition -----------------

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin (len(positions), rotary_dim) at the given token positions, interleaved."""
        angles = positions.float()[:, None] * self.rotary_freqs.float()[None, :]
        angles = angles.repeat_interleave(2, dim=-1)  # one angle per (even, odd) pair
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def position_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(H, seq_len, 1 + seq_len) T5 bias plus -inf where causality hides a key.

        Keys are indexed with the null key at 0, exactly as 0.11.5 does: key j is token j-1,
        and the bucket is computed from (query index - key index), off by one included.
        """
        device, seq_len = self.rotary_freqs.device, self.cfg.seq_len
        q_pos = torch.arange(seq_len, device=device)
        k_pos = torch.arange(seq_len + 1, device=device)
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0)
        buckets = t5_bucket(distance, self.cfg.rel_pos_buckets, self.cfg.rel_pos_max_distance)
        bias = self.rel_pos_bias(buckets).permute(2, 0, 1).float()  # (H, n, n+1)
        if self.cfg.rel_pos_scale != 1:
            bias = bias * self.cfg.rel_pos_scale
        hidden = k_pos[None, :] > q_pos[:, None] + 1  # key j is token j-1: causal
        return bias.masked_fill(hidden, float("-inf")).to(dtype)

    # -- the two halves of a forward pass --------------------------------------------------

    def encode_condition(
        self, text_states: torch.Tensor, text_embed: torch.Tensor, text_mask: torch.Tensor, keep: torch.Tensor
    ) -> Condition:
        """Run the step-independent tokens once.

        text_states (B, n, D) with n <= 77 (the text tower stops at the last end token),
        text_embed (B, D) normalised, text_mask (B, n) bool (token ids != 0),
        keep (B,) bool: False drops the condition (classifier-free guidance's null pass).

        A prefix position whose key no row attends influences nothing: no query ever sees
        it. So only the text positions up to the last attended one, and the text-embedding
        position if any row keeps it, are computed. For a short prompt that is a few tokens
        instead of 78; for the unconditional pass it is none at all.
        """
        if self.cfg.learned_padding:
            text_states, text_mask = self.learned_padding(text_states, text_mask, keep)
        b, dtype, device = text_states.shape[0], text_states.dtype, text_states.device
        text_len, prefix_len, seq_len = self.cfg.text_len, self.cfg.prefix_len, self.cfg.seq_len
        text_keys = text_mask & keep[:, None]  # (B, n) text positions attended by anyone
        attended = text_keys.any(dim=0).nonzero()
        used = int(attended.max()) + 1 if len(attended) else 0
        with_embed = bool(keep.any())
        positions = torch.cat([
            torch.arange(used, device=device),
            torch.full((int(with_embed),), text_len, device=device),
        ])  # (P,) the prefix positions computed
        x = torch.cat([text_states[:, :used], text_embed[:, None, :][:, : int(with_embed)]], dim=1)  # (B, P, D)

        # attention bias over keys [null, prefix positions, 3 step tokens]
        step_positions = torch.arange(prefix_len, seq_len, device=device)
        key_columns = torch.cat([torch.zeros(1, dtype=torch.long, device=device), positions + 1, step_positions + 1])
        key_mask = torch.cat([
            torch.ones(b, 1, dtype=torch.bool, device=device),  # null key: always attended
            text_keys[:, :used],
            keep[:, None][:, : int(with_embed)],
            torch.ones(b, STEP_LEN, dtype=torch.bool, device=device),
        ], dim=1)
        bias = self.position_bias(dtype)[:, :, key_columns][None]
        bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))  # (B, H, seq_len, 1 + P + 3)
        n_prefix = len(positions)
        prefix_bias = bias[:, :, positions, : 1 + n_prefix]
        step_bias = bias[:, :, step_positions, :].contiguous()
        rotary = self.rotary_tables(positions, dtype)

        keys, values = [], []
        for i, block in enumerate(self.blocks):
            null_k, null_v = (kv.expand(b, 1, -1).to(dtype) for kv in block.attn.null_kv)
            if n_prefix == 0:
                keys.append(null_k)
                values.append(null_v)
                continue
            q, k, v = block.attn.project(x, rotary)
            k, v = torch.cat([null_k, k], dim=1), torch.cat([null_v, v], dim=1)
            keys.append(k)
            values.append(v)
            if i + 1 < len(self.blocks):  # the last layer's prefix outputs are never read
                x = x + block.attn.attend(q, k, v, prefix_bias)
                x = x + block.ff(x)
        return Condition(torch.stack(keys), torch.stack(values), step_bias)

    def learned_padding(self, text_states: torch.Tensor, text_mask: torch.Tensor, keep: torch.Tensor):
        """The later layout's text tokens: (B, text_len, D) states, the positions after each row's
        end token replaced by the learned null_text_embed, and which of them are attended: all
        of them (those versions apply no text mask), none where `keep` is False.

        The end token is the last non-zero token id, so the positions up to it are those with
        a True at or after them in `text_mask` ("!", token 0, inside the text is kept, as
        those versions' CLIP adapter keeps every position up to the end token).
        """
        b, n = text_mask.shape
        n = min(n, self.cfg.text_len)  # those versions cut the text encodings to max_text_len
        text_states, text_mask = text_states[:, :n], text_mask[:, :n]
        up_to_end = text_mask.flip(-1).cummax(dim=-1).values.flip(-1)  # (B, n)
        null = self.null_text_embed[0].to(text_states.dtype)  # (text_len, D)
        states = torch.where(up_to_end[..., None], text_states, null[:n])
        states = torch.cat([states, null[n:].expand(b, -1, -1)], dim=1)
        return states, keep[:, None].expand(b, self.cfg.text_len)

    def denoise(self, cond: Condition, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict x_0 (B, D) from x_t (B, D) at timesteps t (B,), given a Condition."""
        b = x_t.shape[0]
        x = torch.stack([self.time_embed(t), x_t, self.learned_query.expand(b, -1)], dim=1)
        rotary = self.rotary_tables(torch.arange(self.cfg.prefix_len, self.cfg.seq_len, device=x.device), x.dtype)
        for i, block in enumerate(self.blocks):
            q, k, v = block.attn.project(x, rotary)
            k = torch.cat([cond.keys[i], k], dim=1)
            v = torch.cat([cond.values[i], v], dim=1)
            x = x + block.attn.attend(q, k, v, cond.step_bias)
            x = x + block.ff(x)
        return self.project_out(self.norm_out(x[:, -1]))

    def forward(self, x_t, t, text_states, text_embed, text_mask, keep) -> torch.Tensor:
        """One whole network pass, as 0.11.5's DiffusionPriorNetwork.forward."""
        return self.denoise(self.encode_condition(text_states, text_embed, text_mask, keep), x_t, t)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) of the first cos.shape[-1] features by position."""
    d = cos.shape[-1]
    head, tail = x[..., :d], x[..., d:]
    pairs = head.unflatten(-1, (d // 2, 2))
    rotated_half = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return torch.cat([head * cos + rotated_half * sin, tail], dim=-1)


def t5_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal bucketing of non-negative distances: exact below num_buckets/2, log beyond."""
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(distance < max_exact, distance, large)
