"""Parity with the original, dalle2-pytorch 0.11.5, on tiny random checkpoints.

On the CPU, in float32, with the same seed and the exact 1000-step sampler, `Prior.embed`
must give the oracle's tokens, raw text embedding and chosen image embedding to 1e-4
relative. The oracle (tests/oracle.py) is the original predictor's code path:
`torch.manual_seed(seed)` then `DiffusionPrior.sample(clip.tokenize(prompt, truncate=True))`.

A 1000-step oracle sample takes seconds even on tiny shapes, so the matrix is lean: every
tiny shape, cond_scale 1 and 3.5, and candidates 1, 2 and 5 each appear, not every product.
"""

from __future__ import annotations

import os
import subprocess
import sys

import clip
import numpy as np
import pytest
import torch

import prior
from tests.compare import assert_close_relative, assert_text_features_match
from tests.oracle import SCHEDULE_SHAPES, TINY_SHAPES, load_oracle, oracle_sample, oracle_text

LONG_PROMPT = "a very detailed painting of " + ", ".join(f"a small {c} bird number {i}" for i, c in
                                                        enumerate(["red", "green", "blue", "gold"] * 8))
BANG_PROMPT = "5!$ wow !%"  # "!" inside these runs is token id 0: masked like padding by 0.11.5

# (shape, prompt, candidates, cond_scale, seed): each shape, each candidates value and each
# cond_scale appear, with "!" runs and an over-long prompt among the prompts.
CASES = [
    ("tiny", "a red cube on a table", 2, 1.0, 0),
    ("tiny", BANG_PROMPT, 5, 3.5, 1),
    ("tiny_wide_heads", LONG_PROMPT, 1, 3.5, 2),
    ("tiny_deep", "!!! 5!$ zoom !% a lighthouse at dusk", 2, 3.5, 3),
    ("tiny_deep", "a cat 🐱 on a mat", 1, 1.0, 4),
    ("tiny_big_head", BANG_PROMPT + " " + LONG_PROMPT, 5, 1.0, 5),
]

TEXT_PROMPTS = ["a cat", BANG_PROMPT, "!!!!", "Ünïcödé 東京 🐱‍👤 &amp; tabs\tand\nlines", LONG_PROMPT]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def oracles(tiny_checkpoints):
    """Oracles loaded on first use, one per tiny shape."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_oracle(tiny_checkpoints[name], TINY_SHAPES[name])
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def models(tiny_checkpoints):
    """Our Prior, float32 on the CPU, loaded on first use, one per tiny shape."""
    loaded = {}

    def get(name: str) -> prior.Prior:
        if name not in loaded:
            loaded[name] = prior.load(tiny_checkpoints[name], device="cpu", dtype="float32")
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def oracle_embedding(oracles):
    """The oracle's chosen image embedding for a case, computed once per session."""
    done = {}

    def get(name: str, prompt: str, candidates: int, cond_scale: float, seed: int) -> np.ndarray:
        key = (name, prompt, candidates, cond_scale, seed)
        if key not in done:
            tokens = clip.tokenize([prompt], truncate=True)
            done[key] = oracle_sample(oracles(name), tokens, seed, candidates, cond_scale).numpy()
        return done[key]

    return get


def test_cases_cover_the_matrix():
    assert {c[0] for c in CASES} == set(TINY_SHAPES)
    assert {c[2] for c in CASES} == {1, 2, 5}
    assert {c[3] for c in CASES} == {1.0, 3.5}
    assert {(c[2], c[3]) for c in CASES} == {(n, s) for n in (1, 2, 5) for s in (1.0, 3.5)}


@pytest.mark.parametrize(("name", "prompt", "candidates", "cond_scale", "seed"), CASES,
                         ids=[f"{c[0]}-n{c[2]}-s{c[3]}" for c in CASES])
def test_embed_matches_oracle(models, oracles, oracle_embedding, name, prompt, candidates, cond_scale, seed):
    result = models(name).embed(prompt, candidates=candidates, cond_scale=cond_scale, steps=1000, seed=seed,
                                sampler="ddpm")
    tokens = clip.tokenize([prompt], truncate=True)
    raw_text, _, _ = oracle_text(oracles(name), tokens)

    assert np.array_equal(result.tokens, tokens.numpy())
    assert result.truncated == [LONG_PROMPT in prompt]
    assert_close_relative(result.text_embedding, raw_text)
    assert_close_relative(result.image_embedding, oracle_embedding(name, prompt, candidates, cond_scale, seed))


@pytest.mark.parametrize("prompts", [TEXT_PROMPTS, TEXT_PROMPTS[:-1]], ids=["with-truncated", "short"])
@pytest.mark.parametrize("name", list(TINY_SHAPES))
def test_text_features_match_oracle(models, oracles, name, prompts):
    """Tokens, raw embedding, final-LayerNorm states and mask for a batch of awkward prompts."""
    model = models(name)
    tokens = clip.tokenize(prompts, truncate=True)
    raw, states, mask = oracle_text(oracles(name), tokens)

    result = model.embed(prompts, candidates=1, steps=1, seed=0)
    assert np.array_equal(result.tokens, tokens.numpy())
    assert_close_relative(result.text_embedding, raw)

    assert_text_features_match(model.text.encode(torch.from_numpy(result.tokens)), tokens, raw, states, mask)
    assert (tokens[1] == 0)[: int(tokens[1].argmax())].any(), "'!' runs give id 0 inside the text"


def test_cli_matches_oracle(tmp_path, tiny_checkpoints, oracles, oracle_embedding):
    name, prompt, candidates, cond_scale, seed = CASES[1]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "prior", "embed", prompt, "--weights", str(tiny_checkpoints[name]),
               "--candidates", str(candidates), "--cond-scale", str(cond_scale), "--steps", "1000", "--sampler", "ddpm",
               "--seed", str(seed), "--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr

    tokens = clip.tokenize([prompt], truncate=True)
    raw_text, _, _ = oracle_text(oracles(name), tokens)
    assert np.array_equal(np.load(out / "text_tokens.npy"), tokens.numpy())
    assert_close_relative(np.load(out / "text_embedding.npy"), raw_text)
    assert_close_relative(np.load(out / "image_embedding.npy"), oracle_embedding(name, prompt, candidates, cond_scale, seed))


@pytest.mark.parametrize("name", list(SCHEDULE_SHAPES))
def test_exact_sampler_on_other_schedules(schedule_checkpoints, name):
    """A checkpoint trained with T timesteps: steps=T is its exact sampler, whatever T is."""
    shape, path = SCHEDULE_SHAPES[name], schedule_checkpoints[name]
    prompt, tokens = "a lighthouse ! at dusk", clip.tokenize(["a lighthouse ! at dusk"], truncate=True)
    expected = oracle_sample(load_oracle(path, shape), tokens, 11, 2, 2.5)
    model = prior.load(path, device="cpu", dtype="float32")
    assert model.config.num_timesteps == shape.timesteps
    result = model.embed(prompt, candidates=2, cond_scale=2.5, steps=shape.timesteps, seed=11, sampler="ddpm")
    assert result.steps == shape.timesteps
    assert_close_relative(result.image_embedding, expected)
