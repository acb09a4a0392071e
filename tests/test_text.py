"""prior/text.py on its own: the vocabulary file is checked, and the runtime imports no CLIP package.

Tokens are compared with OpenAI's `clip.tokenize` in test_tokenizer.py, and the text tower with
the oracle's in test_parity.py and test_full_size.py.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

import prior.text
from prior.text import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_a_changed_vocabulary_file_is_refused(tmp_path, monkeypatch):
    lines = gzip.decompress(prior.text.VOCAB_FILE.read_bytes()).decode().split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges swapped: every token id stays valid
    changed = tmp_path / "bpe.txt.gz"
    changed.write_bytes(gzip.compress("\n".join(lines).encode()))
    monkeypatch.setattr(prior.text, "VOCAB_FILE", changed)
    with pytest.raises(RuntimeError, match=f"{changed}: not OpenAI's CLIP vocabulary"):
        Tokenizer()


def test_loading_and_embedding_import_no_torchvision_and_no_clip_package(tiny_checkpoint):
    """open-clip and torchvision took about 1.5 s of every cold start; the runtime needs neither."""
    script = (
        "import json, sys, prior\n"
        f"prior.load({str(tiny_checkpoint)!r}, device='cpu').embed('a cat', steps=2, seed=0)\n"
        "import prior.predictor\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torchvision', 'open_clip', 'clip', 'timm', 'dalle2_pytorch'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          check=True, cwd=ROOT)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
