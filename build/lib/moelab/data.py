"""Byte-level corpus that ships with Python itself, plus the user's own files.

Domains: code (stdlib .py sources), prose (pydoc_data help topics), c (CPython C headers, when present);
user data: the name of each --data folder (a file's parent folder). B=sequences, S=positions.

Which files are loaded and how they are split is a versioned rule (`split_version`, recorded in a run so a
run keeps its split):
  2 (default) every file is trained as raw bytes whatever its encoding (moelab models bytes, so Latin-1 or
    any other text needs no decoding), except binary files (a NUL byte, or more than BINARY_CONTROL_SHARE
    control bytes, among the first BINARY_SNIFF_BYTES bytes), empty ones (nothing but ASCII whitespace) and
    hidden ones (a name starting with "."). Symlinks are followed, and a file reached twice (same resolved
    path) or holding the same bytes as one loaded before is loaded once. Split by a SHA-256 of the bytes:
    a copy can never straddle train/validation, and renaming a file keeps its side.
  1 the earlier rule, kept exactly so runs made with it keep their data and split: folders keep UTF-8 files
    without a NUL in the first 8192 bytes, duplicates stay, split by a SHA-256 of the file's name.
Every skipped file is reported (`DataReport`, one line from `format_report`); user files are only read.
"""
from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from moelab.model import EOS_ID, PAD_ID

BUILTIN = "builtin"
SPLIT_VERSIONS = (1, 2)      # data rules load_documents / build_corpus know (see the module docstring)
DEFAULT_SPLIT_VERSION = 2    # what a new run uses
BINARY_SNIFF_BYTES = 8192    # the head of a file that decides whether it is binary (git looks at 8000)
BINARY_CONTROL_SHARE = 0.10  # binary when more than this share of the head is control bytes
CONTROL_BYTES = bytes([*range(0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])  # C0 but \t\n\v\f\r ESC; DEL
REPORT_NAMES = 3             # names shown per skip reason in a report line
SKIP_REASONS = ("binary", "empty", "duplicate", "hidden", "not UTF-8", "not a regular file", "broken link",
                "unreadable")  # every reason a file is skipped, in the order a report lists them


class Document(NamedTuple):
    domain: str     # domain label (folder name for user data)
    name: str       # name inside its folder (relative path or topic key); split rule 1 hashes it
    data: bytes     # raw bytes, any encoding
    path: str = ""  # name shown in reports and errors: "<folder>/<relative path>", or the --data file as given


class Batch(NamedTuple):
    idx_BS: Tensor       # input ids (long)
    targets_BS: Tensor   # next ids (long)
    valid_BS: Tensor     # bool, False at right padding
    domain_B: Tensor     # domain index of each sequence (into Corpus.domains)


@dataclass(frozen=True)
class DataReport:
    """What one load kept and skipped; `format_report` turns it into the line the trainer prints."""
    n_files: int                         # documents loaded
    n_bytes: int                         # their bytes
    split_version: int                   # the data rule used (SPLIT_VERSIONS)
    skipped: dict[str, tuple[str, ...]]  # reason (SKIP_REASONS) -> names, in the order found
    same_as: dict[str, str]              # duplicate name -> the name loaded first with the same file or bytes
    builtin: bool = False                # the built-in corpus (not --data paths)


class Loaded(NamedTuple):
    documents: list[Document]  # what will be trained / validated on, in a fixed order
    report: DataReport         # what was skipped, and why


def is_binary(data: bytes) -> bool:
    """Binary: a NUL byte, or more than BINARY_CONTROL_SHARE control bytes (CONTROL_BYTES), among the first
    BINARY_SNIFF_BYTES bytes. Bytes >= 0x80 never count: Latin-1, UTF-8 and other encodings stay text."""
    head = data[:BINARY_SNIFF_BYTES]
    if b"\x00" in head:
        return True
    return len(head) - len(head.translate(None, CONTROL_BYTES)) > BINARY_CONTROL_SHARE * len(head)


def is_validation(name: str, val_fraction: float) -> bool:
    """Split rule 1: a SHA-256 of the name, independent of file order and PYTHONHASHSEED."""
    return _name_hash(name) < val_fraction


def is_validation_content(data: bytes, val_fraction: float) -> bool:
    """Split rule 2: a SHA-256 of the bytes, so identical files always land on the same side."""
    return _unit_hash(data) < val_fraction


def _unit_hash(b: bytes) -> float:
    return int.from_bytes(hashlib.sha256(b).digest()[:8], "big") / 2.0 ** 64


def _name_hash(name: str) -> float:
    return _unit_hash(name.encode())


def builtin_documents() -> list[Document]:
    """The three domains found from the running interpreter (no download)."""
    docs: list[Document] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py")):
        docs.append(Document("code", p.name, p.read_bytes(), f"code/{p.name}"))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        docs.append(Document("prose", key, topics[key].encode("utf-8"), f"prose/{key}"))
    include = Path(sysconfig.get_paths()["include"])
    if include.is_dir():
        for p in sorted(include.rglob("*.h")):
            rel = str(p.relative_to(include))
            docs.append(Document("c", rel, p.read_bytes(), f"c/{rel}"))
    return [d for d in docs if d.data]


# ---------------------------------------------------------------- loading user files, one rule version per run

class _Scan:
    """One load: kept documents, skip records in order, and what was seen (for de-duplication)."""

    def __init__(self, split_version: int):
        self.version = split_version
        self.docs: list[Document] = []
        self.records: list[tuple[str, str]] = []  # (reason, name)
        self.same_as: dict[str, str] = {}
        self.by_path: dict[str, str] = {}  # resolved path -> name loaded
        self.by_hash: dict[bytes, str] = {}  # SHA-256 of the bytes -> name loaded

    def skip(self, reason: str, name: str) -> None:
        self.records.append((reason, name))

    def add(self, doc: Document, real: str) -> None:
        """Keep `doc` unless (rule 2) its file or its bytes were loaded already; rule 1 keeps and notes it."""
        digest = hashlib.sha256(doc.data).digest()
        first = self.by_path.get(real) or self.by_hash.get(digest)
        if first is not None:
            self.same_as[doc.path] = first
            if self.version >= 2:
                self.skip("duplicate", doc.path)
                return
        self.by_path.setdefault(real, doc.path)
        self.by_hash.setdefault(digest, doc.path)
        self.docs.append(doc)

    def report(self, builtin: bool = False) -> DataReport:
        return DataReport(len(self.docs), sum(len(d.data) for d in self.docs), self.version,
                          _group(self.records), dict(self.same_as), builtin)


def _group(records: list[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    return {r: tuple(n for q, n in records if q == r) for r in SKIP_REASONS if any(q == r for q, _ in records)}


def _classify(data: bytes, version: int) -> str | None:
    """The skip reason for these bytes under the rule `version`, None to keep them."""
    if version == 1:
        if b"\x00" in data[:8192]:
            return "binary"
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return "not UTF-8"
    elif is_binary(data):
        return "binary"
    return None if data.strip() else "empty"


def _add_file(raw: str, scan: _Scan) -> None:
    """One --data file named by the user: a binary, empty or unreadable one is an error, not a skip."""
    p = Path(raw)
    v1 = scan.version == 1
    try:
        data = p.read_bytes()
    except OSError as e:
        why = e.strerror or e
        raise ValueError(f"--data file {raw!r} cannot be read ({why}): check its permissions") from None
    reason = _classify(data, scan.version)
    if reason in ("binary", "not UTF-8"):
        raise ValueError(f"--data file {raw!r} is not UTF-8 text (binary or another encoding)" if v1 else
                         f"--data file {raw!r} is binary (a NUL byte or more than {BINARY_CONTROL_SHARE:.0%} "
                         f"control bytes in its first {BINARY_SNIFF_BYTES} bytes): give a text file")
    if reason == "empty":
        raise ValueError(f"--data file {raw!r} is empty" + ("" if v1 else " (or only whitespace): give a "
                                                                          "file with text"))
    parent = (p.resolve() if v1 else Path(os.path.abspath(p))).parent.name
    scan.add(Document(parent or "text", p.name, data, raw), os.path.realpath(p))


def _folder_files_v1(p: Path, label: str, scan: _Scan) -> list[Path]:
    """Rule 1's walk, unchanged: every regular file below `p` (symlinked folders not entered), sorted."""
    files = []
    for q in sorted(p.rglob("*")):
        if q.is_file():
            if q.name.startswith("."):
                scan.skip("hidden", f"{label}/{q.relative_to(p).as_posix()}")
            else:
                files.append(q)
    return files


def _folder_files_v2(p: Path, label: str, scan: _Scan) -> list[Path]:
    """Every regular file below `p`, sorted by relative path; symlinked folders are entered once (a folder
    reached again, e.g. a link back up, is a reported duplicate); hidden files and folders are reported."""
    found: list[tuple[tuple[str, ...], Path]] = []
    seen_dirs = {os.path.realpath(p): f"{label}/"}
    for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
        rel = Path(dirpath).relative_to(p)
        keep = []
        for d in sorted(dirnames):
            shown, real = f"{label}/{(rel / d).as_posix()}/", os.path.realpath(Path(dirpath, d))
            if d.startswith("."):
                scan.skip("hidden", shown)
            elif real in seen_dirs:
                scan.same_as[shown] = seen_dirs[real]
                scan.skip("duplicate", shown)
            else:
                seen_dirs[real] = shown
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            q, shown = Path(dirpath, f), f"{label}/{(rel / f).as_posix()}"
            if f.startswith("."):
                scan.skip("hidden", shown)
            elif not q.exists():
                scan.skip("broken link", shown)
            elif not q.is_file():
                scan.skip("not a regular file", shown)
            else:
                found.append(((rel / f).parts, q))
    return [q for _, q in sorted(found)]


def _add_folder(raw: str, scan: _Scan) -> None:
    p, v1 = Path(raw), scan.version == 1
    domain = (p.resolve() if v1 else Path(os.path.abspath(p))).name or "text"
    n_docs, n_records = len(scan.docs), len(scan.records)
    for q in (_folder_files_v1 if v1 else _folder_files_v2)(p, domain, scan):
        shown = f"{domain}/{q.relative_to(p).as_posix()}"
        try:
            data = q.read_bytes()
        except OSError:
            scan.skip("unreadable", shown)
            continue
        reason = _classify(data, scan.version)
        if reason is not None:
            scan.skip(reason, shown)
        else:
            scan.add(Document(domain, str(q.relative_to(p)), data, shown), os.path.realpath(q))
    if len(scan.docs) == n_docs:
        if v1:
            raise ValueError(f"--data folder {raw!r} holds no non-empty UTF-8 text file")
        skipped = _group(scan.records[n_records:])
        fix = "text files not loaded already" if "duplicate" in skipped else "text files"
        raise ValueError(f"--data folder {raw!r} holds no file to train on "
                         f"({_skip_text(skipped, scan.same_as) or 'no file at all'}): give a folder with {fix}")


def load_documents(paths: list[str] | None = None, *, split_version: int = DEFAULT_SPLIT_VERSION) -> Loaded:
    """`paths` None or ["builtin"]: the Python-shipped corpus; else text files and folders (domain = the
    folder's name, a file's parent folder), loaded by the rule `split_version`. Raises ValueError (one line)
    for a missing path, an unusable file named directly, or a folder without a file to train on."""
    if split_version not in SPLIT_VERSIONS:
        allowed = ", ".join(map(str, SPLIT_VERSIONS))
        raise ValueError(f"split_version={split_version!r} is invalid: allowed {allowed}")
    scan = _Scan(split_version)
    if not paths or list(paths) == [BUILTIN]:
        for d in builtin_documents():
            scan.add(d, f"{BUILTIN}:{d.path}")
        return Loaded(scan.docs, scan.report(builtin=True))
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            if split_version == 1:
                raise ValueError(f"--data path {raw!r} does not exist")
            if raw == BUILTIN:
                raise ValueError(f"--data {BUILTIN} cannot be mixed with paths: give {BUILTIN} alone, "
                                 "or only paths")
            raise ValueError(f"--data path {raw!r} does not exist: give an existing text file or folder")
        if split_version >= 2 and not (p.is_file() or p.is_dir()):
            raise ValueError(f"--data path {raw!r} is not a regular file or folder: give a text file or folder")
        (_add_file if p.is_file() else _add_folder)(raw, scan)
    return Loaded(scan.docs, scan.report())


def user_documents(paths: list[str], *, split_version: int = DEFAULT_SPLIT_VERSION) -> list[Document]:
    """The documents of `load_documents(paths)` (its report dropped: prefer load_documents)."""
    return load_documents(paths, split_version=split_version).documents


def document_text(data: bytes) -> str:
    """A document's bytes as text for a tokenizer (moelab trace --hf): UTF-8 when they decode, else Latin-1,
    which maps each byte to one character, so other encodings arrive without replacement characters."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _names(names: tuple[str, ...], same_as: dict[str, str]) -> str:
    shown = [f"{n} = {same_as[n]}" if n in same_as else n for n in names[:REPORT_NAMES]]
    more = len(names) - REPORT_NAMES
    return ", ".join(shown + ([f"+{more} more"] if more > 0 else []))


def _skip_text(skipped: dict[str, tuple[str, ...]], same_as: dict[str, str]) -> str:
    parts = [f"{len(n)} {r} ({_names(n, same_as)})" for r, n in skipped.items()]
    return "skipped " + ", ".join(parts) if parts else ""


def format_report(report: DataReport) -> str:
    """One line, e.g. `data: 12 files (48.2 KiB, split v2), skipped 2 binary (a/x.png, a/y.bin),
    1 empty (a/e.txt), 1 duplicate (a/copy.txt = a/orig.txt)`."""
    n = report.n_bytes
    size_text = (f"{n} bytes" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024 ** 2
                 else f"{n / 1024 ** 2:.1f} MiB")
    files = f"{report.n_files} file{'s' * (report.n_files != 1)}"
    head = f"data: {'built-in corpus, ' if report.builtin else ''}{files} ({size_text}, split v{report.split_version})"
    skips = _skip_text(report.skipped, report.same_as) or "nothing skipped"
    kept = tuple(n for n in report.same_as if n not in report.skipped.get("duplicate", ()))
    twice = f", {len(kept)} duplicate kept by split v1 ({_names(kept, report.same_as)})" if kept else ""
    return f"{head}, {skips}{twice}"


# ---------------------------------------------------------------- id streams, sampling, the split

def _stream(docs: list[Document], tokenizer=None) -> Tensor:
    """Documents concatenated, each followed by EOS -> 1-D int16 byte ids; with a transformers `tokenizer`
    (moelab.hf_tokenizer), its int32 ids of each document's text."""
    if tokenizer is not None:
        from moelab.hf_tokenizer import encode_documents
        return encode_documents([document_text(d.data) for d in docs], tokenizer)
    parts = []
    for d in docs:
        parts.append(torch.frombuffer(bytearray(d.data), dtype=torch.uint8).to(torch.int16))
        parts.append(torch.tensor([EOS_ID], dtype=torch.int16))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int16)


@dataclass
class Corpus:
    """Per-domain train and validation id streams."""
    domains: list[str]                # domain names, sorted; Batch.domain_B indexes this list
    train: dict[str, Tensor]          # domain -> 1-D int16 ids
    val: dict[str, Tensor]            # domain -> 1-D int16 ids
    n_files: dict[str, tuple[int, int]]  # domain -> (train files, validation files)
    files: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)  # domain ->
    #                                 (train, validation) Document.path of each file, for messages
    report: DataReport | None = None  # what loading kept and skipped (format_report prints it)
    byte_len_V: Tensor | None = None  # UTF-8 bytes each id stands for (a transformers tokenizer); None: byte ids

    def check(self, seq_len: int) -> None:
        """Raise ValueError (one line) when a domain's training or validation stream holds fewer than
        seq_len + 1 ids (bytes plus one EOS per file), i.e. not one full window of inputs and next-byte
        targets. sample / val_batches right-pad such a stream instead of failing, so call this before
        training or evaluating: a 3-byte file must not quietly train with seq_len 128."""
        for dom in self.domains:
            for k, (split, s) in enumerate((("training", self.train[dom]), ("validation", self.val[dom]))):
                if s.numel() >= seq_len + 1:
                    continue
                names = self.files.get(dom, ((), ()))[k]
                n_bytes = s.numel() - int((s == EOS_ID).sum())
                if len(names) == 1 and self.files[dom][0] == self.files[dom][1]:
                    part = "the first" if k == 0 else "the last"
                    src = f"{part} {n_bytes} bytes of {names[0]}, a domain of one file, split by bytes"
                else:
                    src = f"{len(names)} file{'s' * (len(names) != 1)}: {_names(names, {}) or 'none'}"
                fit = min(t.numel() for t in [*self.train.values(), *self.val.values()]) - 1  # fits every split
                fixes = ["give more text"] + ([f"lower --seq-len to {fit} or less"] if fit >= 2 else [])
                fixes += ["raise --val-fraction"] if k == 1 else []
                todo = fixes[0] if len(fixes) == 1 else \
                    f"{', '.join(fixes[:-1])}{',' * (len(fixes) > 2)} or {fixes[-1]}"
                raise ValueError(f"data: the {split} split of domain {dom!r} holds {n_bytes} bytes ({src}), "
                                 f"less than one sequence of seq_len={seq_len}: {todo}")

    def sample(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        """Random training windows; each sequence picks a domain uniformly, then a start position.
        A stream shorter than seq_len + 1 gives right-padded rows (`check` refuses such a corpus)."""
        dom_B = torch.randint(len(self.domains), (batch_size,), generator=gen)
        rows = []
        for d in dom_B.tolist():
            s = self.train[self.domains[d]]
            hi = max(s.numel() - seq_len - 1, 0)
            start = int(torch.randint(hi + 1, (1,), generator=gen))
            rows.append(s[start:start + seq_len + 1])
        return _pack(rows, dom_B, seq_len)

    def val_batches(self, domain: str, batch_size: int, seq_len: int, max_batches: int) -> list[Batch]:
        """Fixed, evenly spaced validation windows of one domain (no randomness); right-padded as in sample."""
        s = self.val[domain]
        n_win = max(1, min(max_batches * batch_size, (s.numel() - 1) // seq_len))
        starts = torch.linspace(0, max(s.numel() - seq_len - 1, 0), n_win).long().tolist()
        d = self.domains.index(domain)
        out = []
        for i in range(0, n_win, batch_size):
            rows = [s[a:a + seq_len + 1] for a in starts[i:i + batch_size]]
            out.append(_pack(rows, torch.full((len(rows),), d), seq_len))
        return out

    def unigram_loss(self, domain: str) -> float:
        """Cross-entropy (nats/token) of the domain's validation ids under its training unigram
        distribution with add-one smoothing over the 256 bytes + EOS: the baseline to beat."""
        V = max([EOS_ID] + [int(s.max()) for s in (self.train[domain], self.val[domain]) if s.numel()]) + 1
        tr = torch.bincount(self.train[domain].long(), minlength=V).double() + 1.0
        va = torch.bincount(self.val[domain].long(), minlength=V).double()
        logp = (tr / tr.sum()).log()
        return float(-(va * logp).sum() / va.sum().clamp_min(1.0))


def _pack(rows: list[Tensor], dom_B: Tensor, seq_len: int) -> Batch:
    """Right-pad rows shorter than seq_len + 1 with PAD (masked out)."""
    buf = torch.full((len(rows), seq_len + 1), PAD_ID, dtype=torch.long)
    valid = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for i, r in enumerate(rows):
        buf[i, :r.numel()] = r.long()
        valid[i, :max(r.numel() - 1, 0)] = True
    return Batch(buf[:, :-1], buf[:, 1:], valid, dom_B.long())


def split_documents(docs: list[Document], val_fraction: float, split_version: int
                    ) -> tuple[list[Document], list[Document]]:
    """One domain's documents -> (train, validation) by the rule `split_version` (1: name hash, 2: content
    hash). At least one validation file when there are two or more (the smallest hash); a single file is
    split by bytes instead (its last val_fraction)."""
    key = (lambda d: _name_hash(d.name)) if split_version == 1 else (lambda d: _unit_hash(d.data))
    held = [i for i, d in enumerate(docs) if key(d) < val_fraction]
    if not held and len(docs) > 1:
        held = [min(range(len(docs)), key=lambda i: key(docs[i]))]
    va = [docs[i] for i in held]
    if split_version == 1:  # rule 1 drops every file whose name is held out, kept exactly
        va_names = {d.name for d in va}
        tr = [d for d in docs if d.name not in va_names]
    else:
        tr = [d for i, d in enumerate(docs) if i not in set(held)]
    if not tr or not va:
        one = docs[0]
        cut = math.floor(len(one.data) * (1 - val_fraction))
        tr, va = [one._replace(data=one.data[:cut])], [one._replace(data=one.data[cut:])]
    return tr, va


def build_corpus(paths: list[str] | None = None, *, val_fraction: float = 0.1,
                 split_version: int = DEFAULT_SPLIT_VERSION, tokenizer=None, vocab_size: int = 0) -> Corpus:
    """`paths` None or ["builtin"]: the Python-shipped corpus; else the user's files and folders, loaded and
    split by the rule `split_version` (a run records it: 1 for runs made before rule 2 existed). `tokenizer`:
    a transformers tokenizer (moelab.hf_tokenizer) for a run with a BPE vocabulary of `vocab_size` ids."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is invalid: allowed 0 < val_fraction < 1")
    loaded = load_documents(paths, split_version=split_version)
    docs = loaded.documents
    if not docs:
        raise ValueError("no text found: the built-in corpus is missing; pass --data PATH")
    domains = sorted({d.domain for d in docs})
    train, val, n_files, files = {}, {}, {}, {}
    for dom in domains:
        tr, va = split_documents([d for d in docs if d.domain == dom], val_fraction, split_version)
        train[dom], val[dom] = _stream(tr, tokenizer), _stream(va, tokenizer)
        n_files[dom] = (len(tr), len(va))
        files[dom] = (tuple(d.path for d in tr), tuple(d.path for d in va))
    byte_len_V = None if tokenizer is None else tokenizer.byte_lengths(vocab_size)
    return Corpus(domains, train, val, n_files, files, loaded.report, byte_len_V)
