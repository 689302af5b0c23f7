"""Tests for tedjax.data: tokenizer, token files, batches, stdlib corpus."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import train_fork

from tedjax import data

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def _write_docs(root: Path) -> list[Path]:
    """A few text documents, in a nested directory, with non-ASCII text."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "日本", "theta", "def", "import"]
    files = []
    for i, rel in enumerate(["a.txt", "sub/b.py", "sub/deeper/c.md", "z.txt"]):
        lines = [" ".join(rng.choice(words, size=8)) for _ in range(60 + 20 * i)]
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(p)
    (root / "ignored.bin").write_bytes(b"\x00\x01binary")  # not matched by the pattern
    (root / "empty.txt").write_text("")  # skipped
    return files


def _snapshot(d: Path) -> dict:
    return {
        p.relative_to(d).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _write_token_dir(d: Path, tokens: np.ndarray, vocab: int = 256, val=None, dtype="uint16"):
    d.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens, dtype=dtype)
    val = tokens[:10] if val is None else np.asarray(val, dtype=dtype)
    tokens.tofile(d / "train.bin")
    val.tofile(d / "val.bin")
    meta = {
        "vocab_size": vocab,
        "dtype": dtype,
        "n_train_tokens": int(tokens.size),
        "n_val_tokens": int(val.size),
    }
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    files = _write_docs(root)
    out = tmp_path_factory.mktemp("tok") / "corpus"
    meta = data.prepare([root], out, val_fraction=0.1)
    return root, files, out, meta


# --------------------------------------------------------------------------- tokenizer


def test_encode_decode_round_trip():
    text = "def f(x):\n    return 'héllo wörld ✓ 日本語 🚀'\n"
    ids = data.encode(text)
    assert ids.dtype == np.uint8
    assert ids.size == len(text.encode("utf-8")) > len(text)  # multi-byte chars
    assert data.decode(ids) == text
    assert data.decode(ids.astype(np.int32).tolist()) == text
    assert data.decode(np.asarray(ids, np.uint16)) == text
    assert data.BYTE_VOCAB_SIZE == 256 and int(ids.max()) < data.BYTE_VOCAB_SIZE


def test_decode_replaces_invalid_bytes_and_out_of_range_ids():
    ids = np.concatenate([data.encode("ab"), [0xE6], data.encode("c"), [300, -1], data.encode("d")])
    assert data.decode(ids) == "ab\ufffdc\ufffd\ufffdd"
    with pytest.raises(ValueError, match="1-D"):
        data.decode(np.zeros((2, 3), np.int32))


# --------------------------------------------------------------------------- prepare


def test_prepare_meta_and_counts(prepared):
    root, files, out, meta = prepared
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint8"  # the smallest dtype for 256 byte ids
    # documents: sorted by relative path, pattern-filtered, empty file skipped
    assert meta["documents"] == [str(root / r) for r in ["a.txt", "sub/b.py", "sub/deeper/c.md", "z.txt"]]
    sizes = {s: (out / f"{s}.bin").stat().st_size for s in ("train", "val")}
    assert sizes["train"] == meta["n_train_tokens"] and sizes["val"] == meta["n_val_tokens"]  # 1 byte each
    # every document here has a train and a val piece, each followed by the separator
    n_text = sum(len(f.read_bytes()) for f in files)
    assert meta["n_train_tokens"] + meta["n_val_tokens"] == n_text + 2 * len(files) * len(data.DOC_SEPARATOR)
    # val is roughly val_fraction of the text
    assert 0.05 < meta["n_val_tokens"] / (meta["n_train_tokens"] + meta["n_val_tokens"]) < 0.15
    # the token streams are exactly the documents cut by the documented rule
    train_ref, val_ref = b"", b""
    for f in files:
        b = f.read_bytes()
        cut = data._split_point(b, 0.1)
        assert 0 < cut < len(b) and b[cut - 1 : cut] == b"\n"  # val starts at a line start
        train_ref += b[:cut] + data.DOC_SEPARATOR
        val_ref += b[cut:] + data.DOC_SEPARATOR
    train = data.load_tokens(out, "train")
    val = data.load_tokens(out, "val")
    assert train.dtype == np.dtype("u1")
    assert train.astype(np.uint8).tobytes() == train_ref
    assert val.astype(np.uint8).tobytes() == val_ref
    assert data.decode(train[: len(files[0].read_bytes()) // 2]) in files[0].read_text("utf-8")
    assert meta["unigram_entropy_train"] == pytest.approx(data.unigram_entropy(train))


def test_prepare_is_deterministic(prepared, tmp_path):
    root, _, out, meta = prepared
    meta2 = data.prepare([root], tmp_path / "again", val_fraction=0.1)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    assert meta2["sha256"] == meta["sha256"]
    assert meta2["n_train_tokens"] == meta["n_train_tokens"]


def test_prepare_explicit_files_pattern_and_max_bytes(prepared, tmp_path):
    root, files, _, _ = prepared
    # explicit file taken whatever its name; duplicates dropped; order = order given
    meta = data.prepare([files[3], root / "ignored.bin", files[3]], tmp_path / "x", val_fraction=0.0)
    assert meta["documents"] == [str(files[3]), str(root / "ignored.bin")]
    assert meta["n_val_tokens"] == 0 and (tmp_path / "x" / "val.bin").stat().st_size == 0
    # pattern restricts directory scans
    meta = data.prepare([root], tmp_path / "y", pattern="*.md|*.py")
    assert meta["documents"] == [str(root / "sub/b.py"), str(root / "sub/deeper/c.md")]
    # max_bytes: the document the cap falls in is cut after its last whole line that fits
    first = files[0].read_bytes()
    second = files[1].read_bytes()
    cap = len(first) + 4 + 100
    meta = data.prepare([root], tmp_path / "z", max_bytes=cap, val_fraction=0.0)
    assert meta["documents"] == [str(files[0]), str(files[1])]
    kept = second[: second.rfind(b"\n", 0, cap - len(first) - 4) + 1]
    assert 0 < len(kept) <= 100 and kept.endswith(b"\n")
    train = data.load_tokens(tmp_path / "z", "train").astype(np.uint8).tobytes()
    assert train == first + b"\n\n" + kept + b"\n\n"
    assert meta["n_train_tokens"] <= cap


def test_prepare_bad_inputs_write_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.prepare([tmp_path / "nope"], out)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="no files matching"):
        data.prepare([tmp_path / "d"], out)
    with pytest.raises(ValueError, match="val_fraction"):
        data.prepare([tmp_path / "d" / "x.bin"], out, val_fraction=1.0)
    with pytest.raises(ValueError, match="max-bytes"):
        data.prepare([tmp_path / "d" / "x.bin"], out, max_bytes=len(data.DOC_SEPARATOR))
    # one tiny line: its 1% tail rounds to nothing
    (tmp_path / "d" / "t.txt").write_text("hi\n")
    with pytest.raises(ValueError, match="0 validation tokens"):
        data.prepare([tmp_path / "d" / "t.txt"], out, val_fraction=0.01)
    assert not out.exists()


def test_prepare_replaces_atomically_and_concurrently(prepared, tmp_path):
    root, _, out, meta = prepared
    target = tmp_path / "race"
    errors = []

    def run():
        try:
            data.prepare([root], target, val_fraction=0.1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert (target / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
    data.TokenFile(target, "train")  # verifies sizes, ids and sha256


def test_cli_prepare(prepared, tmp_path):
    root, _, out, _ = prepared
    # `python -m tedjax.data prepare ...`, forked with its imports done (tests/train_fork.py)
    res = train_fork.run_script("-m tedjax.data", ["prepare", "--out", str(tmp_path / "cli"), str(root),
                                                   "--val-fraction", "0.1"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert "train" in res.stdout and "val tokens" in res.stdout
    assert (tmp_path / "cli" / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
    bad = train_fork.run_script("-m tedjax.data", ["prepare", "--out", str(tmp_path / "cli2"),
                                                   str(tmp_path / "missing")], timeout=60)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    assert not (tmp_path / "cli2").exists()


def test_module_imports_without_jax():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tdata', {str(REPO / 'tedjax' / 'data.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
        "assert m.decode(m.encode('ok')) == 'ok'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- loading errors


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*python -m tedjax.data prepare"):
        data.load_tokens(tmp_path / "nowhere", "train")
    assert not (tmp_path / "nowhere").exists()


def test_missing_meta(prepared, tmp_path):
    d = tmp_path / "nometa"
    d.mkdir()
    (d / "train.bin").write_bytes(b"\x01\x00" * 50)
    before = _snapshot(d)
    with pytest.raises(FileNotFoundError, match=r"meta\.json.*missing.*prepare"):
        data.load_tokens(d, "train")
    assert _snapshot(d) == before


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"vocab_size": 256, "dtype": "float32", "n_train_tokens": 5, "n_val_tokens": 5}), "dtype"),
        (json.dumps({"vocab_size": 256, "dtype": "uint16", "n_val_tokens": 5}), "n_train_tokens"),
        (json.dumps({"vocab_size": 70000, "dtype": "uint16", "n_train_tokens": 5, "n_val_tokens": 5}), "does not fit"),
        (json.dumps([1, 2]), "not an object"),
    ],
)
def test_corrupt_meta(tmp_path, content, problem):
    d = _write_token_dir(tmp_path / "c", np.arange(100) % 256)
    (d / "meta.json").write_text(content)
    before = _snapshot(d)
    with pytest.raises(ValueError, match=rf"meta\.json.*corrupt.*{problem}.*re-run prepare"):
        data.load_tokens(d, "train")
    assert _snapshot(d) == before


def test_size_mismatch(prepared, tmp_path):
    d = _write_token_dir(tmp_path / "s", np.arange(100) % 256)
    with open(d / "train.bin", "r+b") as f:
        f.truncate(150)  # 75 tokens, meta says 100
    before = _snapshot(d)
    with pytest.raises(ValueError, match=r"150 bytes.*100 tokens.*200 bytes.*re-run prepare"):
        data.load_tokens(d, "train")
    assert _snapshot(d) == before


def test_empty_file(tmp_path):
    d = _write_token_dir(tmp_path / "e", np.arange(100) % 256, val=[])
    before = _snapshot(d)
    with pytest.raises(ValueError, match=r"val\.bin.*empty.*--val-fraction"):
        data.load_tokens(d, "val")
    assert _snapshot(d) == before
    assert len(data.load_tokens(d, "train")) == 100


def test_too_short_for_one_sequence(tmp_path):
    d = _write_token_dir(tmp_path / "short", np.arange(64) % 256)
    before = _snapshot(d)
    with pytest.raises(ValueError, match=r"64 tokens, too short for one sequence of seq_len=64"):
        data.load_tokens(d, "train", seq_len=64)
    assert len(data.load_tokens(d, "train", seq_len=63)) == 64  # exactly one window fits
    with pytest.raises(ValueError, match="too short for one sequence"):
        data.BatchIterator(np.arange(64), batch_size=2, seq_len=64, seed=0)
    assert _snapshot(d) == before


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_ids_out_of_vocab(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "_CHUNK_TOKENS", chunk)
    toks = np.arange(100, dtype=np.uint16) % 256
    toks[97] = 300  # late in the file: a chunked scan must still see it
    d = _write_token_dir(tmp_path / "v", toks, vocab=256)
    before = _snapshot(d)
    with pytest.raises(ValueError, match=r"token id 300 but vocab_size is 256.*re-run prepare"):
        data.load_tokens(d, "train")
    assert _snapshot(d) == before
    assert len(data.load_tokens(d, "train", verify=False)) == 100  # cheap checks only
    json_meta = json.loads((d / "meta.json").read_text())
    json_meta["vocab_size"] = 512
    (d / "meta.json").write_text(json.dumps(json_meta))
    assert int(data.load_tokens(d, "train").max()) == 300


def test_hash_mismatch(prepared, tmp_path):
    _, _, out, _ = prepared
    d = tmp_path / "h"
    d.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (d / name).write_bytes((out / name).read_bytes())
    t = np.fromfile(d / "train.bin", dtype=json.loads((d / "meta.json").read_text())["dtype"])
    t[5] = (int(t[5]) + 1) % 256
    t.tofile(d / "train.bin")
    with pytest.raises(ValueError, match=r"sha256.*re-run prepare"):
        data.load_tokens(d, "train")
    assert len(data.load_tokens(d, "val")) > 0


# --------------------------------------------------------------------------- batches


def _tokens(n=5000, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=n).astype(np.uint16)


def test_batches_shapes_targets_and_windows():
    toks = _tokens()
    it = data.BatchIterator(toks, batch_size=4, seq_len=32, seed=3)
    assert it.n_windows == (5000 - 1) // 32
    b = next(it)
    assert b["inputs"].shape == b["targets"].shape == (4, 32)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    # each row is the contiguous window at a multiple of seq_len
    for row_in, row_t in zip(b["inputs"], b["targets"]):
        full = np.concatenate([row_in, row_t[-1:]])
        starts = [s for s in range(0, 5000 - 32, 32) if np.array_equal(toks[s : s + 33], full)]
        assert len(starts) == 1


def test_batches_epoch_is_a_permutation_and_deterministic():
    toks = np.arange(32 * 20 + 1, dtype=np.uint16)  # exactly 20 windows, start = token value
    it = data.BatchIterator(toks, batch_size=5, seq_len=32, seed=7)
    epoch0 = np.concatenate([next(it)["inputs"][:, 0] for _ in range(4)])
    assert sorted(epoch0.tolist()) == list(range(0, 640, 32))  # every window exactly once
    assert epoch0.tolist() != list(range(0, 640, 32))  # shuffled
    np.testing.assert_array_equal(
        epoch0 // 32, np.random.default_rng((7, 0)).permutation(20)
    )
    epoch1 = np.concatenate([next(it)["inputs"][:, 0] for _ in range(4)])
    assert sorted(epoch1.tolist()) == sorted(epoch0.tolist()) and epoch1.tolist() != epoch0.tolist()
    it2 = data.BatchIterator(toks, batch_size=5, seq_len=32, seed=7)
    again = np.concatenate([next(it2)["inputs"][:, 0] for _ in range(4)])
    np.testing.assert_array_equal(again, epoch0)
    other = data.BatchIterator(toks, batch_size=5, seq_len=32, seed=8)
    assert np.concatenate([next(other)["inputs"][:, 0] for _ in range(4)]).tolist() != epoch0.tolist()
    ordered = data.BatchIterator(toks, batch_size=5, seq_len=32, seed=7, shuffle=False)
    assert next(ordered)["inputs"][:, 0].tolist() == [0, 32, 64, 96, 128]


def test_batches_wrap_when_fewer_windows_than_batch():
    toks = np.arange(3 * 8 + 1, dtype=np.uint16)  # 3 windows
    it = data.BatchIterator(toks, batch_size=8, seq_len=8, seed=0)
    b = next(it)["inputs"]
    assert b.shape == (8, 8)
    firsts = b[:, 0].tolist()
    for e in range(2):  # rows 0..2 = epoch 0, rows 3..5 = epoch 1: each a full permutation
        assert sorted(firsts[3 * e : 3 * e + 3]) == [0, 8, 16]
    assert it.epoch == 2


def test_batches_resume_exactly():
    toks = _tokens()
    ref = data.BatchIterator(toks, batch_size=6, seq_len=16, seed=11)
    five = [next(ref) for _ in range(5)]
    first = data.BatchIterator(toks, batch_size=6, seq_len=16, seed=11)
    next(first), next(first)
    state = json.loads(json.dumps(first.state()))  # survives a JSON checkpoint
    assert state["step"] == 2 and state["seed"] == 11
    resumed = data.BatchIterator(toks, batch_size=6, seq_len=16, seed=11)
    resumed.restore(state)
    via_arg = data.BatchIterator(toks, batch_size=6, seq_len=16, seed=11, start_step=2)
    for want in five[2:]:
        for it in (resumed, via_arg):
            got = next(it)
            np.testing.assert_array_equal(got["inputs"], want["inputs"])
            np.testing.assert_array_equal(got["targets"], want["targets"])
    assert resumed.state()["step"] == 5
    wrong = data.BatchIterator(toks, batch_size=6, seq_len=16, seed=12)
    with pytest.raises(ValueError, match="seed: saved 11 vs now 12"):
        wrong.restore(state)
    shorter = data.BatchIterator(toks[:3000], batch_size=6, seq_len=16, seed=11)
    with pytest.raises(ValueError, match="n_windows"):
        shorter.restore(state)


def test_batches_process_sharding():
    toks = _tokens()
    whole = data.BatchIterator(toks, batch_size=8, seq_len=16, seed=5)
    parts = [
        data.BatchIterator(toks, batch_size=8, seq_len=16, seed=5, process_index=p, process_count=2)
        for p in range(2)
    ]
    for _ in range(4):
        w = next(whole)
        got = [next(p) for p in parts]
        assert got[0]["inputs"].shape == (4, 16)
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), w[key])
    # a 2-process checkpoint restores in a 1-process run (the step counts global batches)
    solo = data.BatchIterator(toks, batch_size=8, seq_len=16, seed=5)
    solo.restore(parts[1].state())
    np.testing.assert_array_equal(solo.batch(4)["inputs"][4:], parts[1].batch(4)["inputs"])
    with pytest.raises(ValueError, match="divisible"):
        data.BatchIterator(toks, batch_size=6, seq_len=16, seed=5, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.BatchIterator(toks, batch_size=8, seq_len=16, seed=5, process_index=2, process_count=2)


def test_batches_from_prepared_memmap(prepared):
    _, _, out, _ = prepared
    tf = data.TokenFile(out, "train", seq_len=64)
    it = data.BatchIterator(tf, batch_size=4, seq_len=64, seed=0)
    b = next(it)
    assert b["inputs"].shape == (4, 64) and int(b["inputs"].max()) < 256
    text = data.decode(np.concatenate([b["inputs"][0], b["targets"][0][-1:]]))
    corpus = data.decode(tf.tokens)
    assert text in corpus


# --------------------------------------------------------------------------- synthetic + entropy


def test_synthetic_batches_learnable_and_deterministic():
    V = 97
    a = data.synthetic_batches(V, batch_size=16, seq_len=64, seed=0)
    b = data.synthetic_batches(V, batch_size=16, seq_len=64, seed=0)
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert x["inputs"].shape == (16, 64) and x["inputs"].dtype == np.int32
    assert 0 <= x["inputs"].min() and x["inputs"].max() < V
    np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
    assert not np.array_equal(next(a)["inputs"], x["inputs"])  # fresh data each step
    # learnable: the next token given the previous one is far from uniform
    batches = [next(a) for _ in range(20)]
    delta = np.concatenate([(bt["targets"] - bt["inputs"]).ravel() % V for bt in batches])
    p = np.bincount(delta, minlength=V) / delta.size
    cond_entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert cond_entropy < 0.5 * np.log(V)
    c = data.synthetic_batches(V, batch_size=16, seq_len=64, seed=1)
    assert not np.array_equal(next(c)["inputs"], x["inputs"])


def test_unigram_entropy(monkeypatch):
    assert data.unigram_entropy(np.full(10, 7)) == pytest.approx(0.0)
    assert data.unigram_entropy(np.arange(256).repeat(3)) == pytest.approx(np.log(256))
    assert data.unigram_entropy([0, 0, 1, 1]) == pytest.approx(np.log(2))
    toks = np.random.default_rng(0).integers(0, 300, size=1000)
    full = data.unigram_entropy(toks)
    monkeypatch.setattr(data, "_CHUNK_TOKENS", 37)  # chunked counting gives the same answer
    assert data.unigram_entropy(toks) == pytest.approx(full)
    with pytest.raises(ValueError, match="empty"):
        data.unigram_entropy(np.array([], dtype=np.int32))


# --------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus(tmp_path):
    out = tmp_path / "stdlib"
    got = data.ensure_stdlib_corpus(out, max_bytes=200_000)
    assert got == out
    meta = data.read_meta(out)
    total = meta["n_train_tokens"] + meta["n_val_tokens"]
    assert meta["kind"] == "stdlib" and 199_000 < total <= 200_000
    docs = [Path(p) for p in meta["documents"]]
    src = data.stdlib_source_dir()
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in docs)
    rel = [p.relative_to(src).as_posix() for p in docs]
    assert rel == sorted(rel) and rel[0] == "__future__.py"
    train = data.load_tokens(out, "train", seq_len=128)
    first = docs[0].read_bytes()
    cut = data._split_point(first, 0.01)
    assert train[:cut].astype(np.uint8).tobytes() == first[:cut]
    text = data.decode(train[: 50_000])
    assert "def " in text and "import " in text
    # the first module's train head + val tail, decoded from tokens, is the module's Python source
    val = data.load_tokens(out, "val")
    rebuilt = data.decode(train[:cut]) + data.decode(val[: len(first) - cut])
    assert rebuilt == first.decode("utf-8")
    compile(rebuilt, str(docs[0]), "exec")
    assert 2.0 < meta["unigram_entropy_train"] < np.log(256)
    # idempotent: a second call leaves the files untouched
    before = _snapshot(out)
    assert data.ensure_stdlib_corpus(out, max_bytes=200_000) == out
    assert _snapshot(out) == before
    # different settings rebuild
    data.ensure_stdlib_corpus(out, max_bytes=100_000)
    assert data.read_meta(out)["max_bytes"] == 100_000
    assert data.load_tokens(out, "train").size < train.size


def test_default_corpus_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TEDJAX_DATA_DIR", str(tmp_path))
    d = data.default_corpus_dir()
    assert d.parent == tmp_path and d.name.startswith("stdlib-py")
    monkeypatch.delenv("TEDJAX_DATA_DIR")
    assert data.default_corpus_dir().name == d.name


# --------------------------------------------------------------------------- record files (issue 25)


def _record_texts() -> list[str]:
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "délta", "日本", "def", "import"]
    return ["\n".join(" ".join(rng.choice(words, size=6)) for _ in range(30 + 10 * i)) + "\n" for i in range(5)]


def _write_records(root: Path, texts: list[str], field: str = "text") -> dict[str, Path]:
    """The same rows as .jsonl, .parquet and .arrow (stream format, as `datasets.save_to_disk` writes), with an
    extra column and a null row, which is skipped like an empty file."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, field: t} for i, t in enumerate(texts)] + [{"id": len(texts), field: None}]
    paths = {"jsonl": root / "rows.jsonl"}
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    import pyarrow as pa  # in the test extra: parquet / arrow records are checked in CI
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    paths["parquet"] = root / "rows.parquet"
    pq.write_table(table, paths["parquet"], row_group_size=2)  # several row groups
    paths["arrow"] = root / "data-00000-of-00001.arrow"
    with pa.OSFile(str(paths["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)
    paths["arrow-file"] = root / "rows.arrow"  # the Arrow IPC file format (random access), as pyarrow writes
    with pa.OSFile(str(paths["arrow-file"]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow", "arrow-file"])
def test_prepare_record_files_equal_the_same_text_files(tmp_path, kind):
    texts = _record_texts()
    text_dir = tmp_path / "txt"
    text_dir.mkdir()
    for i, t in enumerate(texts):
        (text_dir / f"{i}.txt").write_text(t, encoding="utf-8")
    reference = data.prepare([text_dir], tmp_path / "ref", val_fraction=0.1)
    records = _write_records(tmp_path / "rec", texts, field="content")
    meta = data.prepare([records[kind]], tmp_path / kind, val_fraction=0.1, text_field="content")
    for split in ("train", "val"):  # one document per row, split by the same rule: the same bytes
        assert (tmp_path / kind / f"{split}.bin").read_bytes() == (tmp_path / "ref" / f"{split}.bin").read_bytes()
    assert meta["n_documents"] == reference["n_documents"] == len(texts)
    assert meta["documents"] == [str(records[kind])] and meta["dtype"] == "uint8"


def test_record_file_errors_name_the_row_and_the_fix(tmp_path):
    records = _write_records(tmp_path / "rec", _record_texts()[:2])
    for path in records.values():
        with pytest.raises(ValueError, match=r"no (field|column) 'body'.*--text-field"):
            data.prepare([path], tmp_path / "out", text_field="body")
        with pytest.raises(ValueError, match=r"field 'id' is a int, not text.*--text-field"):
            data.prepare([path], tmp_path / "out", text_field="id")
    assert not (tmp_path / "out").exists()  # nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        data.prepare([bad], tmp_path / "out")


def test_prepare_cli_reads_records_with_text_field(tmp_path, capsys):
    records = _write_records(tmp_path / "rec", _record_texts(), field="content")
    assert data.main(["prepare", "--out", str(tmp_path / "out"), "--text-field", "content", "--val-fraction", "0.1",
                      "--no-progress", str(records["jsonl"])]) == 0
    assert "5 documents" in capsys.readouterr().out
    assert data.read_meta(tmp_path / "out")["dtype"] == "uint8"


def test_tokenizer_workers_write_the_same_files(tmp_path, monkeypatch):
    import tokenizers  # noqa: F401  (in the test extra)
    monkeypatch.setattr(data, "_BATCH_BYTES", 2048)  # many small encoding batches, several in flight at once
    texts = _record_texts() * 4
    records = _write_records(tmp_path / "rec", texts)
    fixture = REPO / "tests" / "fixtures" / "hf" / "mixtral"
    one = data.prepare([records["jsonl"]], tmp_path / "one", tokenizer=fixture, workers=1)
    two = data.prepare([records["jsonl"]], tmp_path / "two", tokenizer=fixture, workers=2)
    assert one["sha256"] == two["sha256"] and one["dtype"] == "uint16"  # 512 ids: uint16, the smallest that fits
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == (tmp_path / "two" / f"{split}.bin").read_bytes()


def test_older_uint16_token_files_give_the_same_batches(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 256, size=4000)
    old = data.TokenFile(_write_token_dir(tmp_path / "old", tokens, dtype="uint16"), "train")
    new = data.TokenFile(_write_token_dir(tmp_path / "new", tokens, dtype="uint8"), "train")
    a, b = (data.BatchIterator(t.tokens, 8, 32, seed=3) for t in (old, new))
    for step in (0, 5, 40):
        assert all(np.array_equal(a.batch(step)[k], b.batch(step)[k]) for k in ("inputs", "targets"))
    sizes = (2, 256, 257, 65536, 65537)
    assert [data.smallest_dtype(v) for v in sizes] == ["uint8", "uint8", "uint16", "uint16", "uint32"]
