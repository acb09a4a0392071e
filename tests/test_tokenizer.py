"""Our tokenizer against the original's: `clip.tokenize(prompt, truncate=True)` (clip-anytorch), and
against open-clip's tokenizer, a second independent implementation.

The original predictor tokenized with OpenAI's `clip` package; prior/text.py has its own
implementation of the same BPE (importing a CLIP package costs seconds of start-up). Details
that only awkward text reaches are where tokenizers part, so the corpus below is built to
reach them: Unicode of every kind, "!" runs (token id 0, masked
like padding by 0.11.5), odd whitespace, HTML entities, mojibake, the special-token names of
both libraries, and prompts far over 77 tokens. Part of it is generated from a fixed seed.
"""

from __future__ import annotations

import random

import clip
import pytest
import torch

from prior.text import Tokenizer

HANDWRITTEN = [
    # plain, case, numbers, punctuation
    "a cat", "A CAT", "a CaT iN a HaT", "an astronaut riding a horse, oil on canvas, 4k, trending on artstation",
    "3.14159 26535 89793", "1,000,000 dollars", "2024-01-31T23:59:59Z", "0", "007", "1/2 + 3/4 = 5/4",
    "...", "?!?!", "¿¡what!?", "a--b---c", "(((nested)))", "[brackets] {braces} <angles>", "semi;colon:colon",
    "'quotes' \"double\" `back`", "it's they're we've I'm you'll he'd", "IT'S THEY'RE", "don't won't can't",
    "#hashtag @mention $100 %50 ^caret &amp *star", "~tilde_underscore|pipe\\backslash/slash",
    # "!" runs: "!" inside an unmerged punctuation run is token id 0
    "5!$ wow !%", "!", "!!", "!!!", "!!!!!!!!!!!!!!!!!!!!", "wow!!!", "!wow", "a!b!c", "!?!?!", "!" * 200,
    "hello! world!", "$!$!$!", "!.!.!", "yes!!! no!!! maybe!!!",
    # whitespace of every kind
    "  leading and trailing  ", "tab\tseparated\twords", "new\nline", "carriage\r\nreturn", "nbsp\u00a0space",
    "em\u2003space and thin\u2009space", "zero\u200bwidth\u200bspace", "\u200b", "ideographic\u3000space",
    "vertical\x0btab\x0cformfeed", "many      spaces      between", "\t\n mixed \u00a0\u2003 whitespace \n\t",
    # accents, combining marks, normalisation
    "café", "cafe\u0301", "naïve façade", "Ångström", "ﬁligree ﬂower", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "ℌ𝔢𝔩𝔩𝔬 𝕨𝕠𝕣𝕝𝕕",
    "Z\u0351\u0352a\u0353l\u0354g\u0355o\u0356", "e\u0301\u0302\u0303\u0304\u0305", "straße", "ǅungla", "İstanbul ı",
    # scripts
    "一只猫坐在垫子上", "東京の夜景、ネオン、雨", "고양이가 매트 위에 앉아 있다", "Кошка сидит на коврике", "Η γάτα κάθεται",
    "القطة تجلس على السجادة", "החתול יושב על השטיח", "mixed English עברית and العربية", "\u202eright-to-left override",
    "बिल्ली चटाई पर बैठी है", "แมวนั่งบนเสื่อ", "ქართული", "ᚠᚢᚦᚨᚱᚲ", "𓀀𓀁𓀂 hieroglyphs", "Ꭰ Ꭱ Ꭲ cherokee",
    # emoji, ZWJ sequences, flags, skin tones, variation selectors
    "🐱", "a cat 🐱 on a mat", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "👍🏽👍🏿", "🇫🇷🇯🇵🇺🇸", "❤️ heart", "☕\ufe0e text style",
    "🧑‍🚀 astronaut", "🐈‍⬛ black cat", "1️⃣ keycap", "🤷‍♀️🤷‍♂️", "🔥" * 50,
    # HTML entities and mojibake (ftfy and html.unescape both run)
    "&amp;", "cats &amp; dogs", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;lt;", "&#39;quoted&#39;", "&#x1F431;", "&nbsp;a",
    "&copy; 2024", "&notanentity;", "cafÃ©", "â€œsmart quotesâ€\x9d", "<b>raw html</b>", "<img src=x onerror=alert(1)>",
    # the special-token names of both libraries, typed by a user
    "<|endoftext|>", "<|startoftext|>", "a <|endoftext|> b", "<|endoftext|><|endoftext|>", "<end_of_text>",
    "<start_of_text>", "x <start_of_text> y <end_of_text> z", "<|ENDOFTEXT|>", "<|endoftext", "endoftext|>",
    # URLs, paths, code
    "https://example.com/path?query=1&b=2#frag", "http://xn--n3h.com", "www.laion.ai", "file:///etc/passwd",
    "C:\\Users\\me\\Desktop", "user@example.com", "def f(x): return x**2", "SELECT * FROM t;", "{\"json\": [1, 2]}",
    # control characters and oddities
    "bell\x07char", "null\x00byte", "escape\x1b[31mred", "del\x7f", "\ufeffbom first", "surrogate-free 𝌆", "\ufffd",
    "soft\u00adhyphen", "word\u2060joiner", "a\u034fb combining grapheme joiner",
    # truncation boundaries: "a" is one token, 75 of them fit exactly between start and end
    " ".join(["a"] * 74), " ".join(["a"] * 75), " ".join(["a"] * 76), " ".join(["a"] * 77), " ".join(["cat"] * 300),
    "antidisestablishmentarianism " * 40, "x" * 1000, "🐱" * 100, "一" * 200, "5!$ " * 60,
    "a photo of " + ", ".join(f"item {i}" for i in range(60)),
]

# Fragments the generator joins; each reaches a different tokenizer path.
FRAGMENTS = [
    "cat", "Dog", "HOUSE", "rainbow", "a", "the", "of", "photo", "4k", "1999", "3.5", "42", "x2", "ok",
    "!", "!!", "5!$", "!%", "?", "...", ",", ";", "-", "--", "'s", "n't", "\"", "(", ")", "#", "@", "&", "%", "/",
    "&amp;", "&lt;", "&#39;", "&nbsp;", "é", "e\u0301", "ß", "ﬁ", "Ω", "ж", "λ", "中", "猫", "の", "한", "ع", "ש", "क",
    "🐱", "🔥", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "🇯🇵", "❤️", "\u200b", "\u00a0", "\t", "\n", "\u3000", "\u0301", "\u202e",
    "https://a.b/c", "<|endoftext|>", "<end_of_text>", "\ufeff", "\x00", "ǅ", "İ", "𝕏",
]
SEPARATORS = ["", " ", " ", " ", "  ", "\t", "\n", "\u00a0", ", ", "!", "-"]


def generated_prompts(count: int, seed: int = 20240) -> list[str]:
    """`count` prompts from FRAGMENTS, lengths from 1 fragment to far over 77 tokens."""
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        n = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 70, 120]) if i % 5 else rng.randint(60, 200)
        parts = [rng.choice(FRAGMENTS) for _ in range(n)]
        prompts.append("".join(part + rng.choice(SEPARATORS) for part in parts))
    return prompts


CORPUS = HANDWRITTEN + generated_prompts(250)


def original_tokens(prompts: list[str]) -> torch.Tensor:
    return clip.tokenize(prompts, truncate=True)


def original_would_truncate(prompt: str) -> bool:
    """True when clip.tokenize without truncate=True refuses the prompt as too long."""
    try:
        clip.tokenize(prompt, truncate=False)
    except RuntimeError:
        return True
    return False


@pytest.fixture(scope="module")
def ours() -> tuple[torch.Tensor, list[bool]]:
    return Tokenizer()(CORPUS)


def test_corpus_is_large_and_reaches_truncation():
    assert len(CORPUS) >= 200
    assert len(set(CORPUS)) >= 200
    flags = [original_would_truncate(p) for p in CORPUS]
    assert sum(flags) >= 20, "the corpus should hold many over-long prompts"
    assert len(flags) - sum(flags) >= 100
    assert (original_tokens(CORPUS) == 0).any(dim=1).sum() >= 20, "the corpus should hold many '!' (id 0) tokens"


def test_tokens_shape_and_dtype(ours):
    tokens, truncated = ours
    assert tokens.shape == (len(CORPUS), 77)
    assert tokens.dtype == torch.int64
    assert isinstance(truncated, list) and len(truncated) == len(CORPUS)
    assert all(isinstance(flag, bool) for flag in truncated)


def test_tokens_equal_clip_tokenize(ours):
    tokens, _ = ours
    expected = original_tokens(CORPUS)
    differing = [(p, tokens[i, :12].tolist(), expected[i, :12].tolist())
                 for i, p in enumerate(CORPUS) if not torch.equal(tokens[i], expected[i])]
    assert not differing, f"{len(differing)} of {len(CORPUS)} prompts tokenize differently, e.g. {differing[:5]}"


# The special-token names: clip's, then open-clip's. Each library reads its own pair as the start
# and end tokens and the other pair as plain text.
SPECIAL_NAMES = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


def open_clip_tokens(prompts: list[str]) -> torch.Tensor:
    """open-clip's tokenizer for ViT-L-14-quickgelu: a second implementation of OpenAI's BPE."""
    import open_clip

    return open_clip.get_tokenizer("ViT-L-14-quickgelu")(prompts)


def test_tokens_equal_open_clip(ours):
    tokens, _ = ours
    plain = [i for i, p in enumerate(CORPUS) if not any(name in p.lower() for name in SPECIAL_NAMES)]
    assert len(plain) >= 250, "most of the corpus holds no special-token name"
    expected = open_clip_tokens([CORPUS[i] for i in plain])
    differing = [(CORPUS[i], tokens[i, :12].tolist(), expected[j, :12].tolist())
                 for j, i in enumerate(plain) if not torch.equal(tokens[i], expected[j])]
    assert not differing, f"{len(differing)} of {len(plain)} prompts tokenize differently, e.g. {differing[:5]}"


def test_special_token_names_mean_the_same_ids_in_open_clip():
    """Where the two libraries part (which names are special), they agree on what the names mean."""
    ours, _ = Tokenizer()(["a <|startoftext|> b <|ENDOFTEXT|> c", "<end_of_text> x"])
    theirs = open_clip_tokens(["a <start_of_text> b <END_OF_TEXT> c", "<|endoftext|> x"])
    assert torch.equal(ours[0], theirs[0])
    assert not torch.equal(ours[1], theirs[1])  # each reads the other's names as plain text, and they differ


def test_truncated_flag_says_whether_clip_tokenize_would_refuse(ours):
    _, truncated = ours
    differing = [p[:60] for p, flag in zip(CORPUS, truncated, strict=True) if flag != original_would_truncate(p)]
    assert not differing, f"truncated flag wrong for {len(differing)} prompts, e.g. {differing[:5]}"


@pytest.mark.parametrize(("words", "cut"), [(74, False), (75, False), (76, True), (300, True)])
def test_truncation_boundary_keeps_end_token(words, cut):
    prompt = " ".join(["a"] * words)
    tokens, truncated = Tokenizer()([prompt])
    assert truncated == [cut]
    end = 49407
    length = min(words + 2, 77)
    assert tokens[0, length - 1].item() == end
    assert (tokens[0, length:] == 0).all()
    assert torch.equal(tokens, original_tokens([prompt]))


def test_batch_equals_one_by_one():
    tokenizer = Tokenizer()
    sample = CORPUS[::17]
    batch, flags = tokenizer(sample)
    for i, prompt in enumerate(sample):
        one, flag = tokenizer([prompt])
        assert torch.equal(one[0], batch[i])
        assert flag == [flags[i]]


@pytest.mark.parametrize("prompt", ["<|endoftext|>", "a <|startoftext|> b", "<|ENDOFTEXT|>", "<end_of_text>",
                                    "x <start_of_text> y"])
def test_special_token_names_are_read_as_clip_reads_them(prompt):
    """clip reads the text '<|endoftext|>' (any case) as the end token and '<end_of_text>' as
    plain punctuation and letters (open-clip's tokenizer reads them the other way round)."""
    tokens, _ = Tokenizer()([prompt])
    assert tokens[0].tolist() == original_tokens([prompt])[0].tolist()


def _long_words() -> list[str]:
    rng = random.Random(7)
    return [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000)),  # rescanned per merge: slow in OpenAI's
        "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(800)),  # 3 bytes a character
        "".join(chr(rng.randrange(0x21, 0x2FFF)) for _ in range(1500)),  # byte soup, unknown pairs
        "ab" * 1500, "a" * 3001, "the" * 1000, "ing" * 777 + "s",
        "".join(rng.choice(["the", "cat", "photo", "ing", "ed", "s", "anti", "dis", "ment"]) for _ in range(1000)),
    ]


@pytest.mark.parametrize("word", _long_words(), ids=lambda w: f"{w[:6]}..x{len(w)}")
def test_merges_equal_openai_bpe_on_whole_long_words(word):
    """Our heap-ordered merges against OpenAI's rescanning loop, on one word's entire result."""
    from clip.simple_tokenizer import SimpleTokenizer

    ours = Tokenizer()
    symbols = "".join(ours.byte_symbols[b] for b in word.encode("utf-8"))
    assert " ".join(ours._merge(symbols)) == SimpleTokenizer().bpe(symbols)


def test_a_huge_prompt_is_read_only_as_far_as_77_tokens_need():
    """An 800,000-character prompt: the same tokens and flag as clip.tokenize, which encodes all of it."""
    rng = random.Random(3)
    prompt = " ".join("".join(rng.choice("abcdefghij") for _ in range(7)) for _ in range(100_000))
    tokens, truncated = Tokenizer()([prompt, "x " * 74, "x " * 75, "x " * 76])
    assert torch.equal(tokens, original_tokens([prompt, "x " * 74, "x " * 75, "x " * 76]))
    assert truncated == [True, False, False, True]


def _long_texts() -> list[str]:
    """Texts over PIECE characters, with lines under it, where the first tokens sit in every
    kind of place: at the start, after a long run of whitespace or invisible text, after many
    short lines, in the second and third piece."""
    rng = random.Random(11)
    corpus_text = "\n".join(rng.choice(CORPUS) for _ in range(2000))  # many awkward lines
    return [
        corpus_text,
        " " * 70_000 + "a cat on a mat " * 20,  # the tokens start in the second piece
        " " * 65_530 + "antidisestablishmentarianism " * 30,  # ... and straddle the first cut
        "\n" * 65_534 + "cafÃ© &amp; 5!$ " * 30,  # a line's mojibake and entities across it
        "\n" * 100_000 + "&amp; cafÃ© 5!$ " * 30,  # ... after only line breaks
        "\u200b " * 40_000 + "a red cube",  # invisible text first: it makes no tokens
        "\t".join(["word"] * 30_000),  # no line break at all: cut at whitespace
        ("x" * 60_000 + "\n") * 3 + "tail",  # lines just under PIECE
        "\n".join(" ".join(rng.choice(FRAGMENTS) for _ in range(200)) for _ in range(400)),
    ]


@pytest.mark.parametrize("text", _long_texts(), ids=lambda t: f"{t[:8]!r}..x{len(t)}")
def test_a_long_text_read_in_pieces_gives_clip_tokenizes_tokens(text):
    """Past PIECE characters the tokenizer cleans a piece at a time and stops once 77 tokens are
    known: for any text whose lines are under PIECE characters, the result is exactly
    clip.tokenize's, which cleans the whole text."""
    from prior.text import PIECE

    assert len(text) > PIECE
    tokens, truncated = Tokenizer()([text])
    assert torch.equal(tokens, original_tokens([text]))
    assert truncated == [original_would_truncate(text)]


def test_a_100_mb_prompt_costs_what_its_first_piece_costs(tiny_checkpoint):
    """Through the Python API: under a second and about no memory beyond the prompt itself."""
    import time
    import tracemalloc

    import prior

    model = prior.load(tiny_checkpoint, device="cpu")
    for prompt in ("a painting of a lighthouse " * 4_000_000, " " * 100_000_000 + "cat", "x" * 100_000_000):
        tracemalloc.start()
        started = time.perf_counter()
        result = model.embed(prompt, steps=1, seed=0)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seconds < 1.0, seconds
        assert peak < 100e6, peak
        assert result.tokens.shape == (1, 77)
