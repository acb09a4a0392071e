"""The converted .safetensors file: same numbers, checked by its sidecar, fast to reload."""

import os
import stat

import numpy as np
import pytest
import torch

import prior
from prior.checkpoint import convert_to_safetensors


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_converted_file_gives_the_same_embedding(tiny_checkpoint, tmp_path, dtype):
    converted = convert_to_safetensors(tiny_checkpoint, tmp_path / "prior.safetensors", dtype=dtype)
    a = prior.load(tiny_checkpoint, device="cpu").embed("a red cube", steps=6, seed=4)
    b = prior.load(converted, device="cpu").embed("a red cube", steps=6, seed=4)
    np.testing.assert_array_equal(a.image_embedding, b.image_embedding)
    np.testing.assert_array_equal(a.text_embedding, b.text_embedding)


def test_a_changed_file_is_caught_after_it_was_verified(tiny_checkpoint, tmp_path):
    converted = convert_to_safetensors(tiny_checkpoint, tmp_path / "prior.safetensors")
    prior.load(converted, device="cpu")  # full check; remembers it in a .verified stamp
    stamp = converted.with_name(converted.name + ".verified")
    assert stamp.is_file()
    prior.load(converted, device="cpu")  # the stamp matches: no re-hash needed, still loads

    data = bytearray(converted.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit pattern inside a tensor, same size
    converted.write_bytes(bytes(data))
    with pytest.raises(prior.WeightsError, match="SHA-256 is .* expected"):
        prior.load(converted, device="cpu")


def test_a_forged_stamp_does_not_skip_the_check(tiny_checkpoint, tmp_path):
    converted = convert_to_safetensors(tiny_checkpoint, tmp_path / "prior.safetensors")
    data = bytearray(converted.read_bytes())
    data[-100] ^= 0xFF
    converted.write_bytes(bytes(data))
    stamp = converted.with_name(converted.name + ".verified")
    stamp.write_text('{"size": 1, "mtime_ns": 1, "inode": 1, "sha256": "0"}\n')
    with pytest.raises(prior.WeightsError, match="SHA-256"):
        prior.load(converted, device="cpu")


def test_converted_file_is_readable_like_the_others(tiny_checkpoint, tmp_path):
    """safetensors writes 0600; a service account reading the weights needs the umask's mode."""
    before = os.umask(0o022)
    try:
        converted = convert_to_safetensors(tiny_checkpoint, tmp_path / "prior.safetensors")
    finally:
        os.umask(before)
    assert stat.S_IMODE(converted.stat().st_mode) == 0o644
    assert stat.S_IMODE(converted.with_name(converted.name + ".sha256").stat().st_mode) == 0o644


def test_a_write_error_names_the_file(tiny_checkpoint, tmp_path):
    """Called directly, convert_to_safetensors does not create folders: safetensors' own error,
    cut to one line naming the destination."""
    dst = tmp_path / "missing" / "x.safetensors"
    with pytest.raises(prior.WeightsError) as caught:
        convert_to_safetensors(tiny_checkpoint, dst)
    assert str(caught.value) == f"{dst}: cannot write the converted file (No such file or directory)"
