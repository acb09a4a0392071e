"""CLIP text side: OpenAI's BPE tokenizer and the ViT-L/14 text tower, in plain torch.

`encode` returns, explicitly, everything the prior needs from CLIP: the raw text embedding
(encode_text's output), its L2-normalised copy, the final-LayerNorm states and the mask
(up to the batch's last end token).
dalle2-pytorch 0.11.5 captured the states with a forward hook; here they are simply the
tower's intermediate value.

Both halves are written here rather than imported from open-clip: importing open-clip pulls
in torchvision and timm, which cost more start-up time than loading the weights. The module
names match OpenAI's CLIP, so the checkpoint's `clip.clip.*` text tensors load as they are.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import html
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn

from .model import lookup_table

VOCAB_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"  # OpenAI's, see data/LICENSE-CLIP
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
START, END = "<|startoftext|>", "<|endoftext|>"


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
    states: torch.Tensor  # (B, n, W) ln_final outputs up to the batch's last end token (n <= 77)
    mask: torch.Tensor  # (B, n) bool, tokens != 0: the prior attends to no position beyond n


# -- tokenizer ---------------------------------------------------------------------------------

# A word is a special-token name, an English contraction, a run of letters, one digit, or a
# run of other non-space characters. Matched on lower-cased text.
_WORD = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
                      regex.IGNORECASE)
_SPACES = regex.compile(r"\s+")  # the `regex` module's \s, as OpenAI's tokenizer uses


@cache
def _byte_symbols() -> list[str]:
    """One printable character per byte value, the table GPT-2's byte-level BPE uses: bytes that
    are printable Latin-1 stand for themselves, the other 68 take the characters from U+0100 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _read_merges(vocab_size: int) -> list[tuple[str, str]]:
    data = VOCAB_FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise RuntimeError(f"{VOCAB_FILE}: not OpenAI's CLIP vocabulary (SHA-256 differs); reinstall the package")
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # line 0 is a version header; the vocabulary is 2 x 256 byte symbols, the merges, and 2 specials
    return [tuple(line.split()) for line in lines[1 : 1 + vocab_size - 512 - 2]]


PIECE = 65_536  # characters of a long text cleaned at a time, when only its first tokens are needed


def _pieces(text: str) -> Iterator[str]:
    """`text` in consecutive pieces of at most PIECE characters, each ending just after a line
    break when its second half has one (ftfy repairs a text line by line), else just after
    whitespace (no word, HTML entity or special-token name spans whitespace, so the words are
    those of the whole text), else at PIECE (a "word" that long is cut: its first tokens are
    all CLIP reads of it). So for every text whose lines are under PIECE characters, the
    tokens are exactly those of cleaning the whole text; ftfy itself cuts longer lines at
    1,000,000 characters, we at PIECE."""
    start = 0
    while start < len(text):
        end = min(start + PIECE, len(text))
        if end < len(text):
            cut = text.rfind("\n", start + PIECE // 2, end)
            if cut < 0:
                cut = next((i for i in range(end - 1, start + PIECE // 2, -1) if text[i].isspace()), end - 1)
            end = cut + 1
        yield text[start:end]
        start = end


class Tokenizer:
    """OpenAI CLIP tokenization: `clip.tokenize(texts, truncate=True)`, and whether it truncated."""

    def __init__(self, context_length: int = 77, vocab_size: int = 49408):
        self.context_length = context_length
        self.byte_symbols = _byte_symbols()
        merges = _read_merges(vocab_size)
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        # Ids: the 256 byte symbols in code-point order (printable bytes first), the same with the
        # end-of-word mark, one per merge in rank order, then the two special tokens.
        singles = sorted(self.byte_symbols)
        vocab = [*singles, *(s + "</w>" for s in singles), *("".join(m) for m in merges), START, END]
        self.token_id = {piece: i for i, piece in enumerate(vocab)}
        self.start_id, self.end_id = self.token_id[START], self.token_id[END]
        # per-word results; bounded, so that a server fed endless new words keeps its memory
        self._pieces = lru_cache(maxsize=1 << 16)(self._merge)

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """(B, 77) int64 tokens; over-long prompts are cut, keeping the end token last."""
        tokens = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        truncated = []
        for row, prompt in enumerate(prompts):
            # context_length - 1 text tokens already mean "cut": no need to read further
            ids = [self.start_id, *self.encode(prompt, enough=self.context_length - 1), self.end_id]
            truncated.append(len(ids) > self.context_length)
            ids = ids[: self.context_length]
            ids[-1] = self.end_id
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens, truncated

    def encode(self, text: str, enough: int | None = None) -> list[int]:
        """BPE token ids of one text, without the start and end tokens.

        With `enough`, stops after the word that reaches that many (words are encoded
        independently, so the ids up to there are the same), and a text longer than PIECE
        characters is cleaned a piece at a time (see _pieces), so only the prefix that gives
        the tokens is read: a 100 MB prompt costs what its first piece costs.
        """
        if enough is None or len(text) <= PIECE:
            return self._encode_clean(text, enough)
        ids: list[int] = []
        for piece in _pieces(text):
            if not piece.isspace():
                ids.extend(self._encode_clean(piece, enough - len(ids)))
                if len(ids) >= enough:
                    break
        return ids

    def _encode_clean(self, text: str, enough: int | None) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # OpenAI's "basic_clean"
        text = _SPACES.sub(" ", text).strip().lower()
        ids = []
        for match in _WORD.finditer(text):
            word = match.group()
            if word in (START, END):  # typed special-token names are those tokens, as in OpenAI's
                ids.append(self.token_id[word])
            else:
                symbols = "".join(self.byte_symbols[b] for b in word.encode("utf-8"))
                ids.extend(self.token_id[piece] for piece in self._pieces(symbols))
            if enough is not None and len(ids) >= enough:
                break
        return ids

    def _merge(self, word: str) -> tuple[str, ...]:
        """Byte-pair merges of one word: the known adjacent pair of lowest rank, every occurrence
        left to right, then the next rank, until no known pair is left.

        OpenAI's loop rescans the word for every merge, quadratic in its length (a 32,000-letter
        word took 22 s). Here a heap of (rank, position) gives the same merges in n log n: a
        merged pair only ever forms pairs of higher rank (BPE learned it after its parts), so
        taking the lowest entry, leftmost first, is the same order."""
        parts: list[str | None] = [*word[:-1], word[-1] + "</w>"]  # the last symbol carries end-of-word
        n = len(parts)
        after, before = list(range(1, n + 1)), list(range(-1, n - 1))  # a linked list over `parts`
        heap = []

        def rank_at(i: int) -> int | None:  # the merge rank of the pair starting at live part i, if known
            if i < 0 or parts[i] is None or after[i] >= n:
                return None
            return self.merge_rank.get((parts[i], parts[after[i]]))

        def push(i: int) -> None:
            if (rank := rank_at(i)) is not None:
                heapq.heappush(heap, (rank, i))

        for i in range(n - 1):
            push(i)
        while heap:
            rank, i = heapq.heappop(heap)
            if rank_at(i) != rank:
                continue  # stale: a part of this pair was merged into another since
            j = after[i]
            parts[i], parts[j] = parts[i] + parts[j], None
            after[i] = after[j]
            if after[i] < n:
                before[after[i]] = i
            push(before[i])
            push(i)
        return tuple(p for p in parts if p is not None)


# -- text tower ----------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (the file's names), computed with SDPA and a causal mask."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))  # q, k, v stacked
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.view(b, n, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, n, w/H)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, n, w/H)
        return self.out_proj(attended.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.c_proj = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.c_fc(x)
        return self.c_proj(hidden * torch.sigmoid(1.702 * hidden))  # QuickGELU, as CLIP was trained


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm block of OpenAI's CLIP."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    """The text half of OpenAI's CLIP, named as in the checkpoint under `clip.clip.`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = lookup_table(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor) -> TextFeatures:
        """tokens (B, 77) -> TextFeatures; runs in the tower's own dtype.

        Attention is causal, so no position sees the ones after it: the tower runs only up to
        the batch's last end token (n positions). The padding after it, which the prior masks
        and never reads, is not computed: a short prompt costs a few positions, not 77.
        """
        end = tokens.argmax(dim=-1)  # the end token has the largest id
        n = int(end.max()) + 1
        x = self.token_embedding(tokens[:, :n]) + self.positional_embedding[:n]  # (B, n, W)
        for block in self.transformer.resblocks:
            x = block(x)
        states = self.ln_final(x)  # (B, n, W)
        raw = states[torch.arange(len(tokens), device=tokens.device), end] @ self.text_projection
        return TextFeatures(raw=raw, embed=F.normalize(raw.float(), dim=-1), states=states, mask=tokens[:, :n] != 0)
