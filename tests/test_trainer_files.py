"""dalle2-pytorch trainer files: `DiffusionPriorTrainer.save` of the real 0.11.5 code, holding
the EMA network (`ema_model`), the online one (`model`), the EMA wrapper, AdamW's state, the
scaler's state and a `packaging.version.Version`.

The network read from such a file must give 0.11.5's numbers for that network (the oracle loaded
with the same entry), by default the EMA one; the file must load without running code (the
version object becomes an inert stand-in, any other object is refused with one line); and
`prior weights convert` must turn it into the plain converted file without reading the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prior
from prior.checkpoint import read_checkpoint
from tests.compare import assert_close_relative
from tests.oracle import TINY, build_oracle, make_trainer_file, oracle_sample, oracle_text

PROMPT = "5!$ a lighthouse at dusk, oil on canvas"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WritesAMarker:
    """Pickles as a call to open(marker, "w"): unpickled unsafely, it would create the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def trainer_file(tmp_path_factory, tiny_checkpoint) -> Path:
    return make_trainer_file(tmp_path_factory.mktemp("trainer") / "trainer.pth", tiny_checkpoint, TINY)


@pytest.fixture(scope="module")
def old_trainer_file(tmp_path_factory, tiny_checkpoint) -> Path:
    """Its version pickled as packaging before 26.1 did (an object with __dict__ and Infinity markers)."""
    return make_trainer_file(tmp_path_factory.mktemp("trainer-old") / "trainer.pth", tiny_checkpoint, TINY,
                             old_packaging=True)


@pytest.fixture(scope="module")
def trainer_oracles(trainer_file):
    """The 0.11.5 oracle loaded strictly from each network of the trainer file."""
    saved = torch.load(trainer_file, map_location="cpu", weights_only=False)  # our own test file
    oracles = {}
    for entry in ("ema_model", "model"):
        oracle = build_oracle(TINY)
        oracle.load_state_dict(saved[entry], strict=True)
        oracles[entry] = oracle.float().eval()
    return oracles


def test_the_trainer_file_holds_what_the_trainer_saves(trainer_file):
    saved = torch.load(trainer_file, map_location="cpu", weights_only=False)
    assert {"ema_model", "model", "ema", "optimizer", "scaler", "version", "step"} <= set(saved)
    assert saved["optimizer"]["state"], "AdamW's state is there"
    assert type(saved["version"]).__module__ == "packaging.version"
    changed = [k for k in saved["model"] if not torch.equal(saved["model"][k], saved["ema_model"][k])]
    assert any(k.startswith("net.") for k in changed), "the online network differs from the EMA one"


@pytest.mark.parametrize("which", ["new_packaging", "old_packaging"])
def test_reads_the_ema_network_by_default(trainer_file, old_trainer_file, tiny_checkpoint, which):
    path = trainer_file if which == "new_packaging" else old_trainer_file
    weights, plain = read_checkpoint(path), read_checkpoint(tiny_checkpoint)
    assert (weights.trainer_entry, weights.saved_by) == ("ema_model", "0.11.5")
    assert (plain.trainer_entry, plain.saved_by) == (None, None)
    assert weights.prior_config == plain.prior_config
    assert weights.prior_state.keys() == plain.prior_state.keys()
    for name, tensor in plain.prior_state.items():  # the EMA network is the checkpoint's, upcast to float32
        assert torch.equal(weights.prior_state[name].float(), tensor.float()), name
    online = read_checkpoint(path, trainer_entry="model")
    assert online.trainer_entry == "model"
    assert not torch.equal(online.prior_state["blocks.0.attn.to_q.weight"], weights.prior_state["blocks.0.attn.to_q.weight"])


@pytest.mark.parametrize("entry", ["ema_model", "model"])
@pytest.mark.parametrize("conditional", [True, False], ids=["conditional", "unconditional"])
@torch.no_grad()
def test_network_pass_matches_oracle(trainer_file, trainer_oracles, entry, conditional):
    model = prior.load(trainer_file, device="cpu", dtype="float32", trainer_entry=entry)
    oracle = trainer_oracles[entry]
    tokens = clip.tokenize([PROMPT, "a red cube"], truncate=True)
    raw, states, mask = oracle_text(oracle, tokens)
    t = torch.tensor([999, 500, 1, 0])
    rows = torch.tensor([0, 1, 0, 1])
    x_t = torch.randn(4, TINY.dim, generator=torch.Generator().manual_seed(1))
    embed = F.normalize(raw, dim=-1)
    expected = oracle.net(x_t, t, text_embed=embed[rows], text_encodings=states[rows], mask=mask[rows].clone(),
                          cond_drop_prob=0.0 if conditional else 1.0)
    ours = model.network(x_t, t, states[rows], embed[rows], mask[rows], torch.full((4,), conditional))
    assert_close_relative(ours, expected)


@pytest.mark.parametrize(("entry", "candidates", "cond_scale", "seed"),
                         [("ema_model", 2, 1.0, 0), ("ema_model", 2, 3.5, 1), ("model", 1, 3.5, 2), ("model", 5, 1.0, 3)])
def test_embed_matches_oracle(trainer_file, trainer_oracles, entry, candidates, cond_scale, seed):
    """The exact 1000-step sampler, as the parity tests of the plain file."""
    model = prior.load(trainer_file, device="cpu", dtype="float32", trainer_entry=entry)
    oracle = trainer_oracles[entry]
    tokens = clip.tokenize([PROMPT], truncate=True)
    result = model.embed(PROMPT, candidates=candidates, cond_scale=cond_scale, steps=1000, seed=seed,
                         sampler="ddpm")
    raw, _, _ = oracle_text(oracle, tokens)
    assert np.array_equal(result.tokens, tokens.numpy())
    assert_close_relative(result.text_embedding, raw)
    assert_close_relative(result.image_embedding, oracle_sample(oracle, tokens, seed, candidates, cond_scale))


def test_old_packaging_file_gives_the_same_numbers(trainer_file, old_trainer_file):
    ours = [prior.load(p, device="cpu", dtype="float32").embed(PROMPT, steps=8, seed=4).image_embedding
            for p in (trainer_file, old_trainer_file)]
    np.testing.assert_array_equal(ours[0], ours[1])


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_convert_keeps_the_chosen_network(tmp_path, trainer_file, tiny_checkpoint):
    for entry in ("ema_model", "model"):
        dst = tmp_path / f"{entry}.safetensors"
        done = _run("-m", "prior.weights", "convert", str(trainer_file), str(dst), "--trainer-entry", entry, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        converted, source = read_checkpoint(dst), read_checkpoint(trainer_file, trainer_entry=entry)
        assert (converted.trainer_entry, converted.saved_by) == (entry, "0.11.5")
        for name, tensor in source.prior_state.items():
            assert torch.equal(converted.prior_state[name], tensor), name
    # the default is the EMA network, and it loads as the plain checkpoint does
    done = _run("-m", "prior.weights", "convert", str(trainer_file), str(tmp_path / "default.safetensors"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    embeddings = [prior.load(p, device="cpu", dtype="float32").embed(PROMPT, steps=8, seed=5).image_embedding
                  for p in (tmp_path / "default.safetensors", tiny_checkpoint)]
    np.testing.assert_allclose(embeddings[0], embeddings[1], rtol=0, atol=1e-6)
    # a conversion holds one network: asking it for the other is an error, not a silent substitute
    with pytest.raises(prior.WeightsError, match="'ema_model'"):
        prior.load(tmp_path / "ema_model.safetensors", device="cpu", trainer_entry="model")


def test_a_conversion_beside_the_trainer_file_is_used_only_for_its_entry(tmp_path, trainer_file):
    source = tmp_path / "trainer.pth"
    source.write_bytes(trainer_file.read_bytes())
    done = _run("-m", "prior.weights", "convert", str(source), cwd=tmp_path)  # the EMA network, beside it
    assert done.returncode == 0, done.stderr
    assert prior.load(source, device="cpu").weights_path.suffix == ".safetensors"
    online = prior.load(source, device="cpu", trainer_entry="model")
    assert (online.weights_path, online.trainer_entry) == (source, "model")


@torch.no_grad()
def _big_trainer_file(folder: Path, checkpoint: Path, megabytes: int) -> Path:
    """A trainer file whose optimizer state holds `megabytes` of float32 nobody needs."""
    junk = {"state": {0: {"exp_avg": torch.ones(megabytes * 2**18)}}, "param_groups": []}
    return make_trainer_file(folder / f"big-{megabytes}.pth", checkpoint, TINY, extra={"optimizer": junk})


# VmHWM, this process's own peak resident memory (ru_maxrss would include the parent's at the fork)
_PEAK_RSS = """
import sys
from prior.weights import convert
convert(sys.argv[1], sys.argv[2])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) // 1024)
"""


def test_convert_reads_only_the_network_it_keeps(tmp_path, tiny_checkpoint):
    """Peak memory of converting a trainer file with 400 MB of optimizer state stays within
    that of converting one without: the file is memory-mapped and only the kept tensors are read."""
    peaks = {}
    for megabytes in (0, 400):
        source = _big_trainer_file(tmp_path, tiny_checkpoint, megabytes)
        done = _run("-c", _PEAK_RSS, str(source), str(tmp_path / f"out-{megabytes}.safetensors"), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        peaks[megabytes] = int(done.stdout.split()[-1])
    assert (tmp_path / "big-400.pth").stat().st_size > 400e6
    assert peaks[400] - peaks[0] < 100, f"peak RSS {peaks} MB"


@pytest.mark.parametrize("case", ["namespace", "code", "entry_of_a_plain_file"])
def test_refused_files_give_one_line_and_exit_1(tmp_path, trainer_file, tiny_checkpoint, case):
    import argparse

    if case == "namespace":  # training scripts often save their arguments like this: an object, refused
        path = make_trainer_file(tmp_path / "args.pth", tiny_checkpoint, TINY, extra={"args": argparse.Namespace(lr=1)})
        extra, says = (), "'argparse.Namespace'"
    elif case == "code":
        path = make_trainer_file(tmp_path / "code.pth", tiny_checkpoint, TINY,
                                 extra={"warmup_scheduler": WritesAMarker(tmp_path / "MARKER")})
        extra, says = (), "refused"
    else:
        path, extra, says = tiny_checkpoint, ("--trainer-entry", "model"), "not a trainer file"
    out = tmp_path / "out"
    done = _run("-m", "prior", "embed", "a cat", "--weights", str(path), "--steps", "2", "--quiet", "--out", str(out),
                *extra, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and str(path) in lines[0] and says in lines[0], lines
    assert not out.exists() and not (tmp_path / "MARKER").exists()


def test_a_bad_trainer_entry_is_exit_2(tmp_path, trainer_file):
    done = _run("-m", "prior", "embed", "a cat", "--weights", str(trainer_file), "--trainer-entry", "online",
                "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2 and "--trainer-entry" in done.stderr and len(done.stderr.splitlines()) == 1
    with pytest.raises(ValueError, match="trainer_entry"):
        prior.load(trainer_file, device="cpu", trainer_entry="online")



def test_result_json_and_verify_name_the_layout(tmp_path, trainer_file, tiny_checkpoint, capsys):
    from prior import contract, weights

    out = tmp_path / "out"
    done = _run("-m", "prior", "embed", "a cat", "--weights", str(trainer_file), "--trainer-entry", "model",
                "--steps", "2", "--quiet", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "result.json").read_text())
    assert (record["weights_layout"], record["weights_trainer_entry"], record["weights_saved_by"]) == (
        contract.LAYOUT_0_11_5, "model", "0.11.5")
    expected = {trainer_file: "layout: dalle2-pytorch 0.11.5 network 'ema_model' of a trainer file saved by "
                              "dalle2-pytorch 0.11.5",
                tiny_checkpoint: "layout: dalle2-pytorch 0.11.5 state dict"}
    for path, says in expected.items():
        digest = contract.sha256_of(path)
        assert weights.main(["verify", str(path), "--sha256", digest]) == 0
        assert capsys.readouterr().out == f"{path}: OK (SHA-256 {digest}); {says}\n"
