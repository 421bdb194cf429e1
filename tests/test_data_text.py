"""Word-level corpora: tokenisation, vocabulary, segments, download with checksum verification."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import os
import threading
import time
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
    docstrings_corpus,
    normalize_to_ptb_format,
    pydoc_corpus,
    segment_ids,
    stdlib_docstrings,
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


def test_stdlib_docstrings_are_read_without_importing_and_drop_examples(tmp_path):
    (tmp_path / "alpha.py").write_text(
        '"""Alpha module.\n\nIt has two paragraphs."""\n'
        'import this_module_does_not_exist\n'
        'class A:\n    """A class.\n\n    >>> A()\n    ... more\n    Kept line."""\n'
        '    def f(self):\n        """Method doc."""\n', encoding="utf-8")
    (tmp_path / "_private.py").write_text('"""Private, left out."""\n', encoding="utf-8")
    (tmp_path / "broken.py").write_text('"""Broken."""\ndef (:\n', encoding="utf-8")
    docs = stdlib_docstrings(tmp_path)
    assert docs == ["Alpha module.\n\nIt has two paragraphs.", "A class.\n\nKept line.",
                    "Method doc."]
    with pytest.raises(FileNotFoundError, match="no standard-library modules"):
        stdlib_docstrings(tmp_path / "empty")


def test_docstrings_corpus_is_a_second_offline_english_text_larger_than_pydoc(monkeypatch):
    corpus, pydoc = docstrings_corpus(), pydoc_corpus()
    assert corpus.name == "docstrings" and corpus.vocab[0] == EOS and UNK in corpus.vocab
    assert {"the", "a", "of", "to"} <= set(corpus.vocab[:20])
    # a different text: most of its words are not in the help topics, and it is larger
    new = set(corpus.vocab) - set(pydoc.vocab)
    assert len(new) > 0.5 * corpus.vocab_size
    assert corpus["train"].numel() > 1.5 * pydoc["train"].numel()
    assert corpus.vocab_size > 1.5 * pydoc.vocab_size
    assert not any(">>>" in w for w in corpus.vocab)
    counts = torch.bincount(corpus["train"], minlength=corpus.vocab_size)
    assert counts[1] > 20 * counts[100]
    monkeypatch.setattr(text, "docstrings_corpus", lambda: corpus)
    assert load_text_corpus("docstrings") is corpus


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


# ----------------------------------------------------------------------------------------------
# Every mirror is tried; nothing partial is left behind; extracted files are verified
# ----------------------------------------------------------------------------------------------


class BrokenResponse(io.BytesIO):
    """A response that delivers ``data[:cut]`` and then fails with ``exc`` (a dropped connection)."""

    def __init__(self, data, cut, exc):
        super().__init__(data)
        self.cut, self.exc = cut, exc

    def read(self, n=-1):
        if self.tell() >= self.cut:
            raise self.exc
        return super().read(min(n if n >= 0 else self.cut, self.cut - self.tell()))


class ScriptedOpener(FakeOpener):
    """Serves bytes per URL, or a response that breaks off with the exception given for that URL."""

    def __init__(self, payloads, broken=None):
        super().__init__(payloads)
        self.broken = broken or {}

    def __call__(self, request, timeout=None):
        url = request.full_url
        if url in self.broken:
            self.requests.append(request)
            data, exc = self.broken[url]
            return BrokenResponse(data, len(data) // 2, exc)
        return super().__call__(request, timeout)


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.mark.parametrize("exc", [http.client.IncompleteRead(b"partial", 100),
                                 ConnectionResetError("connection reset by peer"),
                                 TimeoutError("timed out")])
def test_a_dropped_connection_moves_on_to_the_next_mirror_and_leaves_no_part_file(tmp_path, exc):
    data = b"the whole file\n" * 100
    opener = ScriptedOpener({"https://b/f.txt": data}, broken={"https://a/f.txt": (data, exc)})
    dest = tmp_path / "cache" / "f.txt"
    download_file(["https://a/f.txt", "https://b/f.txt"], dest, _digests(data), opener=opener)
    assert dest.read_bytes() == data
    assert [r.full_url for r in opener.requests] == ["https://a/f.txt", "https://b/f.txt"]
    assert _leftovers(dest.parent) == ["f.txt"]


def test_a_checksum_mismatch_on_one_mirror_moves_on_to_the_next(tmp_path):
    data = b"the real file\n"
    opener = FakeOpener({"https://a/f.txt": b"an old version\n", "https://b/f.txt": data})
    dest = tmp_path / "cache" / "f.txt"
    download_file(["https://a/f.txt", "https://b/f.txt"], dest, _digests(data), opener=opener)
    assert dest.read_bytes() == data and _leftovers(dest.parent) == ["f.txt"]


def test_when_every_mirror_fails_the_error_lists_each_failure(tmp_path):
    data = b"the real file\n"
    urls = ["https://a/f.txt", "https://b/f.txt", "https://c/f.txt"]
    opener = ScriptedOpener({urls[1]: b"tampered\n"},
                            broken={urls[2]: (data, http.client.IncompleteRead(b"", 10))})
    dest = tmp_path / "cache" / "f.txt"
    # one mirror served the wrong bytes: a ChecksumError (a ValueError), listing all three
    with pytest.raises(ChecksumError) as info:
        download_file(urls, dest, {"sha256": _digests(data)["sha256"]}, opener=opener)
    message = str(info.value)
    assert all(u in message for u in urls)
    assert "404" in message and "sha256 mismatch" in message and "IncompleteRead" in message
    assert _leftovers(dest.parent) == []
    # no mirror answered at all: an OSError
    with pytest.raises(OSError, match="could not download f.txt from any of its 2 URLs") as info:
        download_file(urls[:1] + ["https://d/f.txt"], dest, _digests(data), opener=opener)
    assert "https://d/f.txt" in str(info.value) and not isinstance(info.value, ChecksumError)


def test_an_interrupted_download_leaves_no_part_file(tmp_path):
    data = b"x" * 1000
    opener = ScriptedOpener({}, broken={"https://a/f.txt": (data, KeyboardInterrupt())})
    dest = tmp_path / "cache" / "f.txt"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in a notebook: stops, does not try the mirror
        download_file(["https://a/f.txt", "https://b/f.txt"], dest, _digests(data), opener=opener)
    assert len(opener.requests) == 1
    assert _leftovers(dest.parent) == []


def test_part_files_of_a_killed_download_are_swept_when_stale(tmp_path):
    data = b"data\n"
    dest = tmp_path / "f.txt"
    stale, fresh, other = (tmp_path / "f.txt.abc123.part", tmp_path / "f.txt.def456.part",
                           tmp_path / "g.txt.abc123.part")
    for p in (stale, fresh, other):
        p.write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    os.utime(other, (two_hours_ago, two_hours_ago))
    download_file("https://a/f.txt", dest, _digests(data), opener=FakeOpener({"https://a/f.txt": data}))
    # the stale part of this file goes; a recent one may be another process's live download
    assert _leftovers(tmp_path) == ["f.txt", "f.txt.def456.part", "g.txt.abc123.part"]


class _Server(http.server.BaseHTTPRequestHandler):
    """/good: the file; /short: a Content-Length longer than the body; /chunked: a chunked body
    cut off mid-stream; anything else: 404. Records each request's User-Agent."""

    protocol_version = "HTTP/1.1"
    data = b"0123456789abcdef" * 4096
    agents: list = []

    def do_GET(self):  # noqa: N802 - the name http.server calls
        self.agents.append(self.headers.get("User-Agent", ""))
        if self.path == "/good":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.data)))
            self.end_headers()
            self.wfile.write(self.data)
        elif self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.data)))
            self.end_headers()
            self.wfile.write(self.data[:1000])
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (1000, self.data[:1000]))
        else:
            self.send_error(404)
            return
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Server.agents.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_over_real_http_survives_truncated_mirrors(tmp_path, local_server):
    urls = [f"{local_server}/{p}" for p in ("missing", "chunked", "short", "good")]
    dest = tmp_path / "cache" / "f.bin"
    download_file(urls, dest, _digests(_Server.data), timeout=10)
    assert dest.read_bytes() == _Server.data
    assert _leftovers(dest.parent) == ["f.bin"]
    assert len(_Server.agents) == 4 and all(a.startswith("Mozilla") for a in _Server.agents)
    with pytest.raises(ChecksumError) as info:
        download_file(urls[:3], tmp_path / "cache" / "g.bin", _digests(_Server.data), timeout=10)
    message = str(info.value)
    assert "404" in message and "IncompleteRead" in message and "mismatch" in message
    assert _leftovers(dest.parent) == ["f.bin"]


def _wiki_zip(words: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-2/wiki.{split}.tokens", f" = {split} = \n\n {words} . \n")
    return buf.getvalue()


def _fetch_wiki(root, data, **kw):
    remote = text.TEXT_DATASETS["wikitext2"].files[0]
    opener = FakeOpener({remote.urls[0]: data})
    return fetch_text_dataset("wikitext2", root=root, checksums={remote.name: _digests(data)},
                              opener=opener, **kw)


def test_extracted_wikitext_files_are_verified_each_time_and_re_extracted(tmp_path):
    data = _wiki_zip("The Cat <unk>")
    paths = _fetch_wiki(tmp_path, data)
    good = {split: p.read_bytes() for split, p in paths.items()}
    folder = paths["train"].parent
    # a truncated or edited extracted file is replaced by the archive's copy, without a download
    paths["train"].write_bytes(good["train"][:5])
    paths["valid"].write_bytes(good["valid"].replace(b"Cat", b"Dog"))
    again = _fetch_wiki(tmp_path, data, download=False)
    assert {split: p.read_bytes() for split, p in again.items()} == good
    assert not any(p.name.endswith(".part") for p in folder.iterdir())
    # the digest of each extracted file is recorded next to it
    assert (folder / "wiki.train.tokens.sha256").read_text().split() == \
        [hashlib.sha256(good["train"]).hexdigest(), "wiki.train.tokens"]


def test_extracted_files_of_an_older_archive_are_replaced(tmp_path):
    old, new = _wiki_zip("The Cat"), _wiki_zip("The Dog")
    _fetch_wiki(tmp_path, old)
    (tmp_path / "wikitext2" / "wikitext-2-v1.zip").unlink()  # a new version of the archive
    paths = _fetch_wiki(tmp_path, new)
    assert b"The Dog" in paths["test"].read_bytes()
    corpus = load_text_corpus("wikitext2", root=tmp_path, download=False,
                              checksums={"wikitext-2-v1.zip": _digests(new)})
    assert "Dog" in corpus.vocab and "Cat" not in corpus.vocab


def test_a_cached_archive_that_fails_its_checksum_is_not_extracted(tmp_path):
    data = _wiki_zip("The Cat")
    paths = _fetch_wiki(tmp_path, data)
    before = paths["train"].read_bytes()
    archive = tmp_path / "wikitext2" / "wikitext-2-v1.zip"
    archive.write_bytes(_wiki_zip("The Dog"))
    paths["train"].unlink()
    with pytest.raises(ChecksumError, match="mismatch"):
        _fetch_wiki(tmp_path, data, download=False)
    assert not paths["train"].exists()  # nothing came out of the unverified archive
    archive.unlink()
    assert _fetch_wiki(tmp_path, data)["train"].read_bytes() == before
