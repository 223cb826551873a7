"""Byte-level corpus that ships with Python itself, plus the user's own text files.

Domains: code (stdlib .py sources), prose (pydoc_data help topics), c (CPython C headers, when present).
Split by file, deterministically (a hash of the file's name), so validation text is never trained on.
B=sequences, S=positions.
"""
from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from moelab.model import EOS_ID, PAD_ID

BUILTIN = "builtin"


class Document(NamedTuple):
    domain: str   # domain label (folder name for user data)
    name: str     # stable name used for the split (relative path or topic key)
    data: bytes   # raw UTF-8 bytes


class Batch(NamedTuple):
    idx_BS: Tensor       # input ids (long)
    targets_BS: Tensor   # next ids (long)
    valid_BS: Tensor     # bool, False at right padding
    domain_B: Tensor     # domain index of each sequence (into Corpus.domains)


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split by file: a SHA-256 of the name, independent of file order and PYTHONHASHSEED."""
    return _name_hash(name) < val_fraction


def _name_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0 ** 64


def builtin_documents() -> list[Document]:
    """The three domains found from the running interpreter (no download)."""
    docs: list[Document] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py")):
        docs.append(Document("code", p.name, p.read_bytes()))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        docs.append(Document("prose", key, topics[key].encode("utf-8")))
    include = Path(sysconfig.get_paths()["include"])
    if include.is_dir():
        for p in sorted(include.rglob("*.h")):
            docs.append(Document("c", str(p.relative_to(include)), p.read_bytes()))
    return [d for d in docs if d.data]


def _text_or_none(p: Path) -> bytes | None:
    data = p.read_bytes()
    if b"\x00" in data[:8192]:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def user_documents(paths: list[str]) -> list[Document]:
    """Text files or folders of them; domain = the folder's name (a file's parent folder).
    Raises ValueError for a missing path, a binary file, or a folder without text."""
    docs: list[Document] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ValueError(f"--data path {raw!r} does not exist")
        if p.is_file():
            data = _text_or_none(p)
            if data is None:
                raise ValueError(f"--data file {raw!r} is not UTF-8 text (binary or another encoding)")
            if not data.strip():
                raise ValueError(f"--data file {raw!r} is empty")
            docs.append(Document(p.resolve().parent.name or "text", p.name, data))
            continue
        found = 0
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            data = _text_or_none(f)
            if data is not None and data.strip():
                docs.append(Document(p.resolve().name or "text", str(f.relative_to(p)), data))
                found += 1
        if not found:
            raise ValueError(f"--data folder {raw!r} holds no non-empty UTF-8 text file")
    return docs


def _stream(docs: list[Document]) -> Tensor:
    """Documents concatenated, each followed by EOS -> 1-D int16 ids."""
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

    def sample(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        """Random training windows; each sequence picks a domain uniformly, then a start position."""
        dom_B = torch.randint(len(self.domains), (batch_size,), generator=gen)
        rows = []
        for d in dom_B.tolist():
            s = self.train[self.domains[d]]
            hi = max(s.numel() - seq_len - 1, 0)
            start = int(torch.randint(hi + 1, (1,), generator=gen))
            rows.append(s[start:start + seq_len + 1])
        return _pack(rows, dom_B, seq_len)

    def val_batches(self, domain: str, batch_size: int, seq_len: int, max_batches: int) -> list[Batch]:
        """Fixed, evenly spaced validation windows of one domain (no randomness)."""
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
        tr = torch.bincount(self.train[domain].long(), minlength=EOS_ID + 1).double() + 1.0
        va = torch.bincount(self.val[domain].long(), minlength=EOS_ID + 1).double()
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


def build_corpus(paths: list[str] | None = None, *, val_fraction: float = 0.1) -> Corpus:
    """`paths` None or ["builtin"]: the Python-shipped corpus; else the user's files and folders."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is invalid: allowed 0 < val_fraction < 1")
    docs = builtin_documents() if not paths or paths == [BUILTIN] else user_documents(paths)
    if not docs:
        raise ValueError("no text found: the built-in corpus is missing; pass --data PATH")
    domains = sorted({d.domain for d in docs})
    train, val, n_files = {}, {}, {}
    for dom in domains:
        ds = [d for d in docs if d.domain == dom]
        va = [d for d in ds if is_validation(d.name, val_fraction)]
        if not va and len(ds) > 1:  # keep at least one validation file: the one with the smallest hash
            va = [min(ds, key=lambda d: _name_hash(d.name))]
        va_names = {d.name for d in va}
        tr = [d for d in ds if d.name not in va_names]
        if not tr or not va:  # a single file: split its bytes instead (last val_fraction for validation)
            one = ds[0]
            cut = math.floor(len(one.data) * (1 - val_fraction))
            tr, va = [one._replace(data=one.data[:cut])], [one._replace(data=one.data[cut:])]
        train[dom], val[dom] = _stream(tr), _stream(va)
        n_files[dom] = (len(tr), len(va))
    return Corpus(domains, train, val, n_files)
