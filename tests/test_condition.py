"""The KV-cached condition: trimming and padding the prefix change no number.

These guard the two shortcuts of prior/model.py that parity tests exercise only indirectly:
prefix positions nobody attends are skipped, and conditions of different prefix lengths are
padded with masked keys (for batching, and to the full static length for CUDA graphs).
"""

import torch

from prior.model import PREFIX_LEN, Condition
from prior.pipeline import load


def _inputs(model, prompts):
    tokens, _ = model.tokenizer(prompts)
    text = model.text.encode(tokens)
    return text.states, text.embed, text.mask


def test_padding_to_the_static_length_changes_nothing(tiny_checkpoint):
    model = load(tiny_checkpoint, device="cpu")
    states, embed, mask = _inputs(model, ["a short prompt", "a somewhat longer prompt with more words in it"])
    cond = model.network.encode_condition(states, embed, mask, torch.ones(2, dtype=torch.bool))
    assert cond.keys.shape[2] < 1 + PREFIX_LEN  # padding positions were skipped
    padded = cond.padded(PREFIX_LEN)
    assert padded.keys.shape[2] == 1 + PREFIX_LEN
    x, t = torch.randn(2, model.config.dim), torch.tensor([999, 3])
    torch.testing.assert_close(model.network.denoise(padded, x, t), model.network.denoise(cond, x, t), rtol=1e-5, atol=1e-6)


def test_unconditional_pass_ignores_the_text(tiny_checkpoint):
    model = load(tiny_checkpoint, device="cpu")
    drop = torch.zeros(2, dtype=torch.bool)
    states, embed, mask = _inputs(model, ["one prompt", "a completely different one"])
    cond = model.network.encode_condition(states, embed, mask, drop)
    assert cond.keys.shape[2] == 1  # only the null key: nothing of the text is computed
    x, t = torch.randn(1, model.config.dim).expand(2, -1), torch.tensor([10, 10])
    out = model.network.denoise(cond, x, t)
    torch.testing.assert_close(out[0], out[1])


def test_cat_pads_conditions_of_different_lengths(tiny_checkpoint):
    model = load(tiny_checkpoint, device="cpu")
    states, embed, mask = _inputs(model, ["a much longer prompt than the other one here"])
    yes, no = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
    full = model.network.encode_condition(states, embed, mask, yes)
    null = model.network.encode_condition(states, embed, mask, no)
    both = Condition.cat([full, null])
    x, t = torch.randn(1, model.config.dim), torch.tensor([42])
    out = model.network.denoise(both, torch.cat([x, x]), torch.cat([t, t]))
    torch.testing.assert_close(out[0], model.network.denoise(full, x, t)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], model.network.denoise(null, x, t)[0], rtol=1e-5, atol=1e-6)
