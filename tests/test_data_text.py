"""Word-level corpora: tokenisation, vocabulary, segments, download with checksum verification."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
import torch

from median_sgd.data import text
from median_sgd.data.text import (
    EOS,
    UNK,
    ChecksumError,
    build_vocab,
    corpus_from_files,
    corpus_from_lines,
    download_file,
    fetch_text_dataset,
    load_text_corpus,
    normalize_to_ptb_format,
    pydoc_corpus,
    segment_ids,
    tokenize_lines,
    verify_file,
)

# Three tiny splits in the PTB format (lower case, <unk>, N, one sentence per line).
PTB_LIKE = {
    "train": [" the cat sat on the mat ", " the dog sat <unk> ", " N cats "],
    "valid": [" the cat ran "],
    "test": [" a dog "],
}


def _digests(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}


def test_tokenize_lines_appends_eos_like_the_standard_pipeline():
    assert tokenize_lines([" a b  c ", "", "D e"]) == [["a", "b", "c", EOS], [EOS], ["D", "e", EOS]]
    assert tokenize_lines(["D e"], lower_case=True) == [["d", "e", EOS]]


def test_vocab_is_eos_then_frequency_order_with_ties_by_first_appearance():
    vocab = build_vocab([["b", "a", EOS], ["a", "c", "b", "a", EOS]])
    assert vocab == (EOS, "a", "b", "c")


def test_corpus_ids_decode_back_to_the_text_and_are_frequency_ranks():
    corpus = corpus_from_lines("tiny", PTB_LIKE)
    assert set(corpus.splits) == {"train", "valid", "test"}
    words = " ".join(" ".join(line.split() + [EOS]) for line in PTB_LIKE["train"])
    assert corpus.decode(corpus["train"]) == words
    # A brute-force count over all splits: ids sorted by decreasing frequency after <eos>.
    all_ids = torch.cat([corpus[s] for s in ("train", "valid", "test")])
    counts = torch.bincount(all_ids, minlength=corpus.vocab_size)[1:]
    assert bool((counts[:-1] >= counts[1:]).all())
    assert corpus.vocab[0] == EOS and corpus.vocab[1] == "the"
    assert all(t.dtype == torch.long for t in corpus.splits.values())
    with pytest.raises(KeyError, match="no split"):
        corpus["dev"]


def test_fingerprint_changes_with_the_text():
    a = corpus_from_lines("x", {"train": ["a b"]})
    b = corpus_from_lines("x", {"train": ["a c"]})
    assert a.fingerprint != b.fingerprint and len(a.fingerprint) == 64


def test_corpus_from_files_reads_the_ptb_format(tmp_path):
    paths = {}
    for split, lines in PTB_LIKE.items():
        paths[split] = tmp_path / f"ptb.{split}.txt"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    from_files = corpus_from_files("ptb", paths)
    from_lines = corpus_from_lines("ptb", PTB_LIKE)
    assert from_files.vocab == from_lines.vocab
    for split in PTB_LIKE:
        assert torch.equal(from_files[split], from_lines[split])


def test_normalize_to_ptb_format():
    raw = ("The Cat's 2 hats.  It sat on 3.5 mats!\nA wrapped\nline here.\n\n"
           "New paragraph: the cat, the hats -- *markup*.")
    lines = normalize_to_ptb_format(raw, min_count=1)
    assert lines == [
        "the cat 's N hats",
        "it sat on N mats",
        "a wrapped line here",
        "new paragraph the cat the hats markup",
    ]
    rare = normalize_to_ptb_format(raw, min_count=2)
    assert rare[0] == f"the cat {UNK} N hats"
    assert all(w in {"the", "cat", "hats", "N", UNK} for line in rare for w in line.split())
    with pytest.raises(ValueError, match="min_count"):
        normalize_to_ptb_format(raw, min_count=0)


def test_pydoc_corpus_is_offline_english_in_ptb_format():
    corpus = pydoc_corpus()
    ids = corpus["train"]
    assert ids.numel() > 30_000 and 1_000 < corpus.vocab_size < 10_000
    assert corpus.vocab[0] == EOS and UNK in corpus.vocab
    assert {"the", "is", "of", "N"} <= set(corpus.vocab[:20])
    # Zipf's law, roughly: the most frequent word is far more frequent than the 100th.
    counts = torch.bincount(ids, minlength=corpus.vocab_size)
    assert counts[1] > 20 * counts[100]
    assert load_text_corpus("pydoc").fingerprint == corpus.fingerprint


def test_segment_ids_are_non_overlapping_windows():
    ids = torch.arange(23)
    seg = segment_ids(ids, 5)
    assert seg.shape == (4, 6)
    for i in range(4):  # brute force
        assert seg[i].tolist() == list(range(5 * i, 5 * i + 6))
    # every token but the first is a target exactly once
    assert sorted(seg[:, 1:].reshape(-1).tolist()) == list(range(1, 21))
    seg[0, 0] = 99
    assert ids[0] == 0  # a copy, not a view of ids
    with pytest.raises(ValueError, match="too few"):
        segment_ids(torch.arange(3), 5)
    with pytest.raises(ValueError, match="length"):
        segment_ids(ids, 0)
    with pytest.raises(TypeError, match="LongTensor"):
        segment_ids(ids.float(), 5)


# ----------------------------------------------------------------------------------------------
# Checksums and downloads (no network: file:// URLs and a fake opener)
# ----------------------------------------------------------------------------------------------


def test_verify_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"hello\n")
    good = _digests(b"hello\n")
    assert verify_file(path, good) == good
    assert verify_file(path, {"md5": good["md5"].upper()})["md5"] == good["md5"]
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        verify_file(path, {"sha256": "0" * 64})
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        verify_file(path, {"sha256": good["sha256"], "md5": "f" * 32})
    with pytest.raises(ValueError, match="no checksum"):
        verify_file(path, {})
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        verify_file(path, {"crc32": "00000000"})
    with pytest.raises(ValueError, match="64 hex digits"):
        verify_file(path, {"sha256": "abc"})
    assert issubclass(ChecksumError, ValueError)


def test_download_file_from_a_file_url(tmp_path):
    src = tmp_path / "remote" / "ptb.train.txt"
    src.parent.mkdir()
    data = b" the cat sat \n"
    src.write_bytes(data)
    dest = tmp_path / "cache" / "ptb.train.txt"
    out = download_file(src.as_uri(), dest, {"sha256": _digests(data)["sha256"]})
    assert out == dest and dest.read_bytes() == data


def test_download_file_checksum_mismatch_leaves_nothing_behind(tmp_path):
    src = tmp_path / "remote.txt"
    src.write_bytes(b"tampered")
    dest = tmp_path / "cache" / "file.txt"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download_file(src.as_uri(), dest, {"sha256": _digests(b"original")["sha256"]})
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no partial file either


def test_download_file_falls_back_to_the_next_url_and_reports_all_failures(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes(b"data")
    missing = (tmp_path / "missing.txt").as_uri()
    dest = tmp_path / "cache" / "x.txt"
    download_file([missing, good.as_uri()], dest, {"md5": _digests(b"data")["md5"]})
    assert dest.read_bytes() == b"data"
    with pytest.raises(OSError, match="could not download"):
        download_file([missing], tmp_path / "cache" / "y.txt", {"md5": _digests(b"data")["md5"]})
    with pytest.raises(ValueError, match="no checksum"):
        download_file(good.as_uri(), tmp_path / "z.txt", {})


class FakeOpener:
    """Serves fixed bytes per URL and records the requests (and their User-Agent)."""

    def __init__(self, payloads):
        self.payloads, self.requests = payloads, []

    def __call__(self, request, timeout=None):
        self.requests.append(request)
        url = request.full_url
        if url not in self.payloads:
            raise OSError(f"404 for {url}")
        return io.BytesIO(self.payloads[url])


def _fake_ptb():
    spec = text.TEXT_DATASETS["ptb"]
    payloads, checksums = {}, {}
    for remote in spec.files:
        split = remote.name.split(".")[1]
        data = ("\n".join(PTB_LIKE[split]) + "\n").encode()
        payloads[remote.urls[-1]] = data  # only the mirror answers
        checksums[remote.name] = {"sha256": _digests(data)["sha256"]}
    return payloads, checksums


def test_fetch_ptb_with_a_fake_opener_then_from_the_cache(tmp_path):
    payloads, checksums = _fake_ptb()
    opener = FakeOpener(payloads)
    paths = fetch_text_dataset("ptb", root=tmp_path, checksums=checksums, opener=opener)
    assert set(paths) == {"train", "valid", "test"}
    assert all(r.get_header("User-agent", "").startswith("Mozilla") for r in opener.requests)
    corpus = load_text_corpus("ptb", root=tmp_path, download=False, checksums=checksums)
    assert torch.equal(corpus["valid"], corpus_from_lines("ptb", PTB_LIKE)["valid"])
    assert (tmp_path / "ptb" / "ptb.train.txt.sha256").read_text().split()[0] == \
        checksums["ptb.train.txt"]["sha256"]
    # A cached file is verified again each time it is used.
    (tmp_path / "ptb" / "ptb.test.txt").write_text("corrupted\n")
    with pytest.raises(ChecksumError, match="mismatch"):
        fetch_text_dataset("ptb", root=tmp_path, checksums=checksums, download=False)


def test_fetch_with_the_builtin_checksums_rejects_files_that_are_not_the_real_ones(tmp_path):
    payloads, _ = _fake_ptb()
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        fetch_text_dataset("ptb", root=tmp_path, opener=FakeOpener(payloads))
    assert not any((tmp_path / "ptb").glob("ptb.*.txt"))


def test_fetch_wikitext2_extracts_a_verified_archive(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2/wiki.{split}.tokens", " = Title = \n\n The Cat <unk> . \n")
    data = buf.getvalue()
    spec = text.TEXT_DATASETS["wikitext2"]
    remote = spec.files[0]
    opener = FakeOpener({remote.urls[0]: data})
    sums = {remote.name: _digests(data)}
    paths = fetch_text_dataset("wikitext2", root=tmp_path, checksums=sums, opener=opener)
    assert paths["train"].read_text() == " = Title = \n\n The Cat <unk> . \n"
    corpus = load_text_corpus("wikitext2", root=tmp_path, checksums=sums, download=False)
    # WikiText keeps case; an empty line is a lone <eos>.
    assert corpus.decode(corpus["train"]) == "= Title = <eos> <eos> The Cat <unk> . <eos>"


def test_fetch_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown text dataset"):
        fetch_text_dataset("imdb", root=tmp_path)
    with pytest.raises(ValueError, match="unknown text corpus"):
        load_text_corpus("imdb", root=tmp_path)
    with pytest.raises(ValueError, match="does not have"):
        fetch_text_dataset("ptb", root=tmp_path, checksums={"other.txt": {"md5": "0" * 32}})
    with pytest.raises(FileNotFoundError, match="download=False"):
        fetch_text_dataset("ptb", root=tmp_path, download=False)


def test_builtin_checksums_are_well_formed():
    for spec in text.TEXT_DATASETS.values():
        for remote in spec.files:
            assert remote.checksums and remote.urls
            text._check_checksums(remote.checksums, remote.name)
            assert all(u.startswith("https://") for u in remote.urls)


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDIAN_SGD_DATA", str(tmp_path))
    assert text.default_cache_dir() == Path(tmp_path)
    monkeypatch.delenv("MEDIAN_SGD_DATA")
    assert text.default_cache_dir().name == "median_sgd"
