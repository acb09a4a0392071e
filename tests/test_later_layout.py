"""The later layout (dalle2-pytorch 0.23.1-1.8.x flat state dicts: laion/DALLE2-PyTorch prior/latest.pth and
best.pth, nousr/conditioned-prior aesthetic/best.pth) against its oracle, dalle2-pytorch 1.1.0.

The files are written by 1.1.0 itself (tests/oracle_later.py, in a subprocess with its own package
path) with a prior_config.json beside them, in two kinds: max_text_len 77 trained with
cond_drop_prob 0.2, and no max_text_len (256) with cond_drop_prob 0. Checked as the 0.11.5 parity
tests check: tokens, the text tower, single network passes, whole 1000-step samples with and
without guidance, 1e-4 relative. `--guidance original` is those versions' guidance, a no-op;
`standard` is compared with the oracle whose unconditional pass applies the text mask it computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import clip
import numpy as np
import pytest
import torch
from packaging import version

import prior
from prior import contract
from prior.checkpoint import read_checkpoint
from prior.weights import convert
from tests import oracle_later
from tests.compare import assert_close_relative
from tests.oracle_later import LATER_SHAPES
from tests.test_graphs import StandInGraph, stand_in_cuda  # noqa: F401 (a fixture, used by name)

BANG_PROMPT = "5!$ wow !% a lighthouse at dusk"  # "!" is token 0: the later versions mask by the end token instead
PROMPTS = [BANG_PROMPT, "a red cube on a table", "an astronaut riding a horse, oil on canvas " * 6]
PASS_ROWS, PASS_TIMESTEPS = torch.tensor([0, 1, 2, 0]), torch.tensor([999, 500, 1, 0])

# (file, prompt, candidates, cond_scale, seed, guidance)
SAMPLES = [
    ("later_77", PROMPTS[0], 2, 1.0, 0, "original"),
    ("later_77", PROMPTS[1], 1, 3.5, 1, "original"),
    ("later_77", PROMPTS[2], 2, 3.5, 2, "standard"),
    ("later_256", PROMPTS[0], 3, 1.0, 3, "original"),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def later_files(tmp_path_factory) -> dict[str, Path]:
    """One file per kind, each in its own folder beside its prior_config.json."""
    root = tmp_path_factory.mktemp("later")
    return {name: oracle_later.make(root / name / "best.pth", shape, seed=i)
            for i, (name, shape) in enumerate(LATER_SHAPES.items())}


@pytest.fixture(scope="module")
def answers(later_files, tmp_path_factory) -> dict[str, list[dict]]:
    """Everything the oracle is asked, one subprocess per file."""
    done = {}
    for name, path in later_files.items():
        tokens = clip.tokenize(PROMPTS, truncate=True)
        x_t = torch.randn(len(PASS_ROWS), LATER_SHAPES[name].dim, generator=torch.Generator().manual_seed(7))
        norm_x = torch.cat([x_t - 5, x_t * 1e-3 + 2])  # rows whose maximum is negative; rows of tiny variance
        requests = [{"kind": "text", "tokens": tokens},
                    {"kind": "pass", "tokens": tokens[PASS_ROWS], "x_t": x_t, "t": PASS_TIMESTEPS, "norm_x": norm_x}]
        requests += [{"kind": "sample", "tokens": clip.tokenize([p], truncate=True), "candidates": n, "cond_scale": s,
                      "seed": seed, "standard": g == "standard"} for f, p, n, s, seed, g in SAMPLES if f == name]
        if name == "later_256":  # trained without conditional dropout: guidance is refused at once
            requests.append({"kind": "sample", "tokens": clip.tokenize([PROMPTS[1]], truncate=True), "candidates": 2,
                             "cond_scale": 3.5, "seed": 9, "standard": False})
        done[name] = oracle_later.run(path, LATER_SHAPES[name], requests, tmp_path_factory.mktemp(f"answers-{name}"))
        done[name] = {"text": done[name][0], "pass": done[name][1], "samples": done[name][2:], "x_t": x_t,
                      "norm_x": norm_x}
    return done


@pytest.fixture(scope="module")
def models(later_files) -> dict[str, prior.Prior]:
    return {name: prior.load(path, device="cpu", dtype="float32") for name, path in later_files.items()}


def test_the_layout_and_its_configuration_are_read(models):
    for name, model in models.items():
        shape, c = LATER_SHAPES[name], model.config
        assert model.layout == contract.LAYOUT_LATER
        assert model.cond_drop_prob == shape.cond_drop_prob
        assert (c.dim, c.depth, c.heads, c.dim_head, c.ff_inner) == (
            shape.dim, shape.depth, shape.heads, shape.dim_head, shape.ff_mult * shape.dim)
        assert c.text_len == (shape.max_text_len or 256)
        assert (c.learned_padding, c.norm_bias, c.stable_norm_out, c.rel_pos_scale) == (True, False, True, 128.0)


@pytest.mark.parametrize("name", list(LATER_SHAPES))
def test_text_features_match_oracle(models, answers, name):
    tokens = clip.tokenize(PROMPTS, truncate=True)
    ours = models[name].text.encode(tokens)
    expected = answers[name]["text"]
    assert_close_relative(ours.raw, expected["raw"])
    assert_close_relative(ours.embed, expected["embed"])
    n = ours.states.shape[1]  # the oracle zeroes each row after its end token
    up_to_end = torch.arange(n)[None, :] <= tokens.argmax(dim=-1)[:, None]
    assert_close_relative(ours.states * up_to_end[..., None], expected["encodings"][:, :n])
    assert not expected["encodings"][:, n:].any()


@pytest.mark.parametrize("name", list(LATER_SHAPES))
@torch.no_grad()
def test_network_pass_matches_oracle(models, answers, name):
    """At t = 999, 500, 1, 0 for three prompts: the conditional pass, and the unconditional pass of
    `standard` guidance against the oracle with its computed text mask applied."""
    model, expected = models[name], answers[name]["pass"]
    tokens = clip.tokenize(PROMPTS, truncate=True)[PASS_ROWS]
    text = model.text.encode(tokens)
    args = (answers[name]["x_t"], PASS_TIMESTEPS, text.states, text.embed, text.mask)
    rows = len(PASS_ROWS)
    assert_close_relative(model.network(*args, torch.ones(rows, dtype=torch.bool)), expected["conditional"])
    assert_close_relative(model.network(*args, torch.zeros(rows, dtype=torch.bool)), expected["standard_null"])
    # the "stable" final LayerNorm (x / max(x) first) shows only where the maximum is negative or eps matters
    assert_close_relative(model.network.norm_out(answers[name]["norm_x"]), expected["final_norm"])
    # the no-op the original guidance is: the oracle's dropped pass is its conditional pass, to the bit
    assert torch.equal(expected["dropped"], expected["conditional"])
    assert not torch.allclose(expected["standard_null"], expected["conditional"], rtol=1e-3)


@pytest.mark.parametrize(("name", "prompt", "candidates", "cond_scale", "seed", "guidance"), SAMPLES,
                         ids=[f"{s[0]}-n{s[2]}-s{s[3]}-{s[5]}" for s in SAMPLES])
def test_embed_matches_oracle(models, answers, name, prompt, candidates, cond_scale, seed, guidance):
    index = [s for s in SAMPLES if s[0] == name].index((name, prompt, candidates, cond_scale, seed, guidance))
    assert "image" in answers[name]["samples"][index], "the oracle sampled (guided with cond_drop_prob 0.2)"
    expected = answers[name]["samples"][index]["image"]
    result = models[name].embed(prompt, candidates=candidates, cond_scale=cond_scale, steps=1000, seed=seed,
                                guidance=guidance, sampler="ddpm")
    tokens = clip.tokenize([prompt], truncate=True)
    assert np.array_equal(result.tokens, tokens.numpy())
    assert_close_relative(result.image_embedding, expected)


def test_original_guidance_is_the_conditional_pass(models):
    model = models["later_77"]
    once = model.embed(PROMPTS[1], candidates=2, cond_scale=1.0, steps=20, seed=5).candidates
    guided = model.embed(PROMPTS[1], candidates=2, cond_scale=3.5, steps=20, seed=5).candidates
    standard = model.embed(PROMPTS[1], candidates=2, cond_scale=3.5, steps=20, seed=5, guidance="standard").candidates
    np.testing.assert_array_equal(guided, once)
    assert np.abs(standard - once).max() > 1e-3


def test_no_guidance_without_conditional_dropout(models, answers):
    """A file trained with cond_drop_prob 0: 1.1.0 refuses cond_scale != 1; so do we, whatever the guidance."""
    assert "classifier free guidance" in answers["later_256"]["samples"][-1]["refused"]
    for guidance in contract.GUIDANCE:
        with pytest.raises(contract.ArgumentError, match="cond_scale"):
            models["later_256"].embed("a cat", cond_scale=3.5, steps=2, guidance=guidance)


def test_converted_file_keeps_the_configuration(tmp_path, later_files, models):
    source = later_files["later_77"]
    converted = convert(source, tmp_path / "alone" / "later.safetensors")  # no config beside it
    weights = read_checkpoint(converted)
    assert (weights.layout, weights.cond_drop_prob) == (contract.LAYOUT_LATER, 0.2)
    ours = prior.load(converted, device="cpu", dtype="float32").embed(PROMPTS[0], steps=16, seed=3, cond_scale=2.0,
                                                                       guidance="standard")
    expected = models["later_77"].embed(PROMPTS[0], steps=16, seed=3, cond_scale=2.0, guidance="standard")
    np.testing.assert_allclose(ours.image_embedding, expected.image_embedding, rtol=0, atol=1e-6)


def test_without_a_config_the_sizes_come_from_the_tensors(tmp_path, later_files, models):
    path = tmp_path / "latest.pth"
    shutil.copy(later_files["later_77"], path)
    model = prior.load(path, device="cpu", dtype="float32")
    assert model.config == models["later_77"].config
    assert model.cond_drop_prob == 0.0  # dalle2-pytorch's default: no guidance unless a config says so
    with pytest.raises(contract.ArgumentError, match="cond_scale"):
        model.embed("a cat", cond_scale=2.0, steps=2)


def _copy_with_config(folder: Path, source: Path, edit) -> Path:
    folder.mkdir()
    path = folder / "best.pth"
    shutil.copy(source, path)
    config = json.loads((source.parent / "prior_config.json").read_text())
    text = edit(config)
    (folder / "prior_config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return path


def _saved(folder: Path, obj) -> Path:
    folder.mkdir()
    path = folder / "file.pth"
    torch.save(obj, path)
    return path


def _bad_files(root: Path, source: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a file refused with exit 1, what its one line must say)."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    renamed = {k.replace("null_text_embed", "null_text_encodings"): v for k, v in state.items()}
    return {
        "config_depth": (_copy_with_config(root / "depth", source, lambda c: c["prior"]["net"].update(depth=5)),
                         "net.depth is 5"),
        "config_max_text_len": (_copy_with_config(root / "len", source, lambda c: c["prior"]["net"].update(
            max_text_len=256)), "net.max_text_len is 256"),
        "config_option": (_copy_with_config(root / "norm_in", source, lambda c: c["prior"]["net"].update(norm_in=True)),
                          "net.norm_in"),
        "config_not_json": (_copy_with_config(root / "json", source, lambda c: "{not json"), "not a readable JSON"),
        "keys_of_1_9": (_saved(root / "v1_9", {**renamed, "net.null_image_embed": torch.zeros(1, 64)}), "1.9.0"),
        "cosine_sim_trainer": (_saved(root / "v1_5", {"ema_model": state, "version": version.parse("1.5.0")}),
                               "1.5.0"),
        "masked_trainer": (_saved(root / "v0_20", {"ema_model": state, "version": version.parse("0.20.0")}),
                           "0.20.0"),
    }


def test_bad_later_files_give_one_line_and_exit_1(tmp_path, later_files):
    cases = _bad_files(tmp_path, later_files["later_77"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, (path, says) in cases.items():
        out = path.parent / "out"
        done = subprocess.run([sys.executable, "-m", "prior", "embed", "a cat", "--weights", str(path), "--steps", "2",
                               "--quiet", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
        lines = done.stderr.splitlines()
        assert done.returncode == 1, (name, done.stderr)
        assert len(lines) == 1 and says in lines[0], (name, lines)
        assert str(path.parent) in lines[0], (name, lines)  # the file, or the config beside it
        assert not out.exists()


def test_a_trainer_file_of_a_supported_version_is_read(tmp_path, later_files, models):
    state = torch.load(later_files["later_77"], map_location="cpu", weights_only=True)
    path = _saved(tmp_path / "v1_1", {"ema_model": state, "model": state, "version": version.parse("1.1.0"),
                                      "optimizer": {"state": {}, "param_groups": []}, "step": torch.tensor([3])})
    model = prior.load(path, device="cpu", dtype="float32")
    assert (model.layout, model.saved_by, model.trainer_entry) == (contract.LAYOUT_LATER, "1.1.0", "ema_model")
    assert dataclasses.asdict(model.config) == dataclasses.asdict(models["later_77"].config)


def test_cli_matches_oracle_and_names_the_layout(tmp_path, later_files, answers):
    name, prompt, candidates, cond_scale, seed, guidance = SAMPLES[2]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "prior", "embed", prompt, "--weights", str(later_files[name]),
                           "--candidates", str(candidates), "--cond-scale", str(cond_scale), "--seed", str(seed),
                           "--guidance", guidance, "--steps", "1000", "--sampler", "ddpm",
                           "--device", "cpu", "--dtype", "float32", "--quiet",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert_close_relative(np.load(out / "image_embedding.npy"), answers[name]["samples"][2]["image"])
    record = json.loads((out / "result.json").read_text())
    assert (record["weights_layout"], record["weights_trainer_entry"], record["weights_saved_by"]) == (
        contract.LAYOUT_LATER, None, None)


def test_verify_names_the_layout(tmp_path, later_files, capsys):
    from prior import weights

    cases = _bad_files(tmp_path, later_files["later_77"])
    expected = {later_files["later_77"]: "layout: dalle2-pytorch 0.23.1-1.8.x state dict",
                cases["keys_of_1_9"][0]: "layout: not recognised (made by dalle2-pytorch 1.9.0 or later",
                cases["cosine_sim_trainer"][0]: "layout: not recognised (made by dalle2-pytorch 1.5.0"}
    for path, says in expected.items():
        digest = contract.sha256_of(path)
        assert weights.main(["verify", str(path), "--sha256", digest]) == 0  # the hash is what verify checks
        assert capsys.readouterr().out.startswith(f"{path}: OK (SHA-256 {digest}); {says}")


def test_embed_through_cuda_graph_bookkeeping_equals_eager(later_files, stand_in_cuda):  # noqa: F811
    """The graphed step (tests/test_graphs.py's CPU stand-in) pads every condition to the later
    layout's prefix (max_text_len + 1), the unconditional pass's empty one included."""
    from prior.graphs import GraphedDenoiser

    model = prior.load(later_files["later_77"], device="cpu", dtype="float32")
    kwargs = dict(candidates=3, cond_scale=3.0, steps=8, seed=5, guidance="standard")
    expected = model.embed(PROMPTS[:2], **kwargs)
    stand_in_cuda(model.network)
    model._denoise_step = GraphedDenoiser(model.network)
    result = model.embed(PROMPTS[:2], **kwargs)
    np.testing.assert_allclose(result.candidates, expected.candidates, rtol=1e-5, atol=1e-6)
    assert StandInGraph.replays == 8
