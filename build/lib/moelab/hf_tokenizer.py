"""Tokenizers a run records (ModelConfig.tokenizer): moelab's bytes (UTF-8 byte b -> id b, then PAD/BOS/EOS),
or a local transformers tokenizer folder (a BPE vocabulary of an imported or upcycled model). transformers is
imported only when a folder tokenizer is loaded.

Both give encode(text) -> ids (no specials), decode(ids) -> text, bos_id / eos_id / pad_id, and the ids
generation never samples. Bits per byte stay comparable across tokenizers when measured as nats summed over
tokens / (ln 2 * UTF-8 bytes of the decoded text).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from moelab.config import N_BYTES
from moelab.model import BOS_ID, EOS_ID, PAD_ID

BYTES = "bytes"  # ModelConfig.tokenizer value of moelab's byte ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


class ByteTokenizer:
    """moelab's ids: UTF-8 bytes 0..255, PAD 256, BOS 257, EOS 258."""
    name = BYTES
    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < N_BYTES).decode("utf-8", errors="replace")

    def never_sampled(self, vocab_size: int) -> Tensor:
        """Everything above the 256 bytes (PAD, BOS, EOS and unused rows)."""
        return torch.arange(N_BYTES, vocab_size)


    def byte_lengths(self, vocab_size: int) -> Tensor:
        """UTF-8 bytes each id stands for: 1 per byte and for EOS (the document separator, as moelab's bits per
        byte has always counted it), 0 for PAD / BOS / unused ids."""
        n_V = torch.zeros(vocab_size, dtype=torch.long)
        n_V[:N_BYTES] = 1
        n_V[EOS_ID] = 1
        return n_V


class HFTokenizer:
    """A transformers tokenizer folder (AutoTokenizer, no remote code)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer
        self.name = str(folder)
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def never_sampled(self, vocab_size: int) -> Tensor:
        """PAD and BOS, and embedding rows beyond the tokenizer's vocabulary."""
        ids = {i for i in (self.pad_id, self.bos_id) if i is not None and i != self.eos_id}
        ids |= set(range(len(self.tok), vocab_size))
        return torch.tensor(sorted(ids), dtype=torch.long)


    def byte_lengths(self, vocab_size: int) -> Tensor:
        """UTF-8 bytes each id stands for (byte-level BPE: its bytes exactly; otherwise its decoded text), EOS 1
        (the document separator), other special and unused ids 0."""
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        special = set(self.tok.all_special_ids)
        n_V = torch.zeros(vocab_size, dtype=torch.long)
        for i, piece in enumerate(self.tok.convert_ids_to_tokens(list(range(min(len(self.tok), vocab_size))))):
            if i in special or piece is None:
                continue
            n_V[i] = len(piece) if all(c in byte_of for c in piece) else len(self.tok.decode([i]).encode("utf-8"))
        if self.eos_id is not None and self.eos_id < vocab_size:
            n_V[self.eos_id] = 1
        return n_V


def encode_documents(texts: list[str], tok) -> Tensor:
    """Documents -> one id stream, each document followed by EOS (int32: BPE vocabularies exceed int16)."""
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t)
        ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def bits_per_byte(*, nats_T: Tensor, targets_T: Tensor, byte_len_V: Tensor) -> float:
    """Bits per UTF-8 byte of the predicted text: summed next-token loss (nats) / (ln 2 * bytes the target
    ids stand for); equals nats per token / ln 2 for moelab's byte ids."""
    import math
    n_bytes = int(byte_len_V[targets_T.long()].sum())
    return float(nats_T.sum()) / (math.log(2) * max(n_bytes, 1))


def load_tokenizer(spec: str, run: str | Path | None = None) -> ByteTokenizer | HFTokenizer:
    """ModelConfig.tokenizer -> a tokenizer; a relative folder is relative to the run folder `run`."""
    if spec == BYTES:
        return ByteTokenizer()
    path = Path(spec) if run is None or Path(spec).is_absolute() else Path(run) / spec
    if not path.is_dir():
        raise ValueError(f"ModelConfig.tokenizer={spec!r}: no tokenizer folder at {path} (allowed 'bytes' or a "
                         "transformers tokenizer folder, relative to the run folder)")
    return HFTokenizer(path)


def prompt_ids(tok, text: str) -> Tensor:
    """A generation prompt: BOS (when the tokenizer has one) then the text's ids."""
    ids = tok.encode(text)
    return torch.tensor(([tok.bos_id] if tok.bos_id is not None else []) + ids, dtype=torch.long)


def is_byte_tokenizer(folder: str | Path) -> bool:
    """True when `folder` holds the byte tokenizer `export_hf` writes (byte-level BPE with no merges and
    every byte at its own id), so importing it gives ModelConfig.tokenizer='bytes' again."""
    f = Path(folder) / "tokenizer.json"
    if not f.exists():
        return False
    model = json.loads(f.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE" or model.get("merges"):
        return False
    vocab = model.get("vocab", {})
    return all(vocab.get(ch) == b for b, ch in bytes_to_unicode().items())


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of folder `src` into `dst`; returns the names copied."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    done = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            done.append(name)
    return done


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def write_byte_tokenizer(out: Path, vocab_size: int) -> None:
    """A tokenizer.json (tokenizers' own format, no custom code) mapping text to moelab's ids: each UTF-8 byte
    b -> id b (GPT-2 byte-to-unicode alphabet, no merges), <|pad|> 256, <|bos|> 257 (prepended), <|eos|> 258,
    and <|unused_i|> fillers up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    alphabet = ByteLevel.alphabet()
    byte_chars = bytes_to_unicode()
    assert set(byte_chars.values()) == set(alphabet)
    vocab = {byte_chars[b]: b for b in range(N_BYTES)}
    specials = {PAD_ID: "<|pad|>", BOS_ID: "<|bos|>", EOS_ID: "<|eos|>"}
    specials.update({i: f"<|unused_{i}|>" for i in range(N_BYTES, vocab_size) if i not in specials})
    vocab.update({tok: i for i, tok in specials.items()})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([specials[i] for i in sorted(specials)])
    tk.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", model_max_length=None)
    fast.save_pretrained(str(out))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (Radford et al. 2019, encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---- the two directions -----------------------------------------------------------------------------
