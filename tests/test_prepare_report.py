"""`prepare` reports what it left out or changed; a run start checks a cheap fingerprint, not every byte."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import train_fork

from tedjax import data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sources(tmp_path):
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "a.txt").write_text("hello\nworld\n" * 50)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\nsecond line\n".encode("latin-1") * 20)
    (root / "notes.json").write_text("{}")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / "sub" / "empty.md").write_text("")
    (root / "__pycache__" / "a.cpython-311.txt").write_text("cached")
    return root


def test_prepare_reports_skipped_and_non_utf8_files(sources, tmp_path):
    out = tmp_path / "tokens"
    # `python -m tedjax.data prepare ...`, forked with its imports done (tests/train_fork.py)
    res = train_fork.run_script("-m tedjax.data", ["prepare", "--out", str(out), str(sources), "--val-fraction", "0.1"],
                                timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out}: 2 documents")
    assert lines[1].startswith("skipped 3 files/directories not matching --pattern '*.py|*.txt|*.md' (or in ")
    assert f"{sources}/__pycache__/" in lines[1] and "image.png" in lines[1] and "notes.json" in lines[1]
    assert lines[2] == f"skipped 1 empty files: {sources}/sub/empty.md"
    assert lines[3] == (f"1 files were not valid UTF-8; their 40 invalid bytes became U+FFFD (bytes EF BF BD): "
                        f"{sources}/latin1.txt (40 bytes)")  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert meta["not_utf8_files"] == {f"{sources}/latin1.txt": 40}
    assert meta["empty_files"] == [f"{sources}/sub/empty.md"]
    assert len(meta["skipped_files"]) == 3
    help_text = train_fork.run_script("-m tedjax.data", ["prepare", "--help"], timeout=60).stdout
    assert "'*.py|*.txt|*.md'" in help_text and "__pycache__" in help_text and "not UTF-8" in " ".join(help_text.split())


def test_start_checks_a_fingerprint_not_every_byte(tmp_path, monkeypatch):
    text = "".join(f"line {i}: {'x' * (i % 50)}\n" for i in range(100_000))  # ~3.5 MB of tokens (uint16: x2)
    (tmp_path / "big.txt").write_text(text)
    out = tmp_path / "tokens"
    data.prepare([tmp_path / "big.txt"], out, val_fraction=0.01, dtype="uint16")
    hashed = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def update(self, chunk):
            hashed.append(len(chunk))
            self.inner.update(chunk)

        def hexdigest(self):
            return self.inner.hexdigest()

    real_sha256 = hashlib.sha256
    monkeypatch.setattr(data.hashlib, "sha256", lambda *a: Counting(real_sha256(*a)))
    size = (out / "train.bin").stat().st_size
    data.TokenFile(out, "train", verify="fingerprint")
    assert size > 5_000_000 and sum(hashed) <= 64 * 4096 + 8  # 256 KiB read, not the whole file
    hashed.clear()
    data.TokenFile(out, "train")  # the full check stays available (and is prepare's default verification)
    assert sum(hashed) == size
    # a changed byte inside a fingerprint block, and a regenerated file of the same size, are caught at start
    tokens = np.fromfile(out / "train.bin", dtype="<u2")
    tokens[1] ^= 1
    tokens.tofile(out / "train.bin")
    with pytest.raises(ValueError, match="does not match the fingerprint recorded in meta.json"):
        data.TokenFile(out, "train", verify="fingerprint")
    # a directory without a fingerprint (older or hand-made) gets the full check at start
    meta = json.loads((out / "meta.json").read_text())
    del meta["fingerprint"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the sha256 recorded in meta.json"):
        data.TokenFile(out, "train", verify="fingerprint")
