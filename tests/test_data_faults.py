"""User data faults, one specification each: what is loaded, what is skipped and said, and that no user file
is touched. Binary / empty / Latin-1 / symlinks / duplicate content / tiny files / missing paths / split rules."""
import hashlib
import math
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from moelab.data import (
    CONTROL_BYTES,
    Document,
    build_corpus,
    builtin_documents,
    document_text,
    format_report,
    is_binary,
    load_documents,
)
from moelab.model import EOS_ID


def snapshot(root: Path) -> dict:
    """Every entry under root (links not followed): kind, bytes, mtime and mode, or the link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            q = Path(dirpath, n)
            st = q.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(q)] = ("link", os.readlink(q))
            elif stat.S_ISREG(st.st_mode):
                with open(q, "rb") as f:  # not Path.read_bytes, which a test patches
                    out[str(q)] = ("file", f.read(), st.st_mtime_ns, st.st_mode)
            else:
                out[str(q)] = ("other", stat.S_IFMT(st.st_mode), st.st_mtime_ns, st.st_mode)
    return out


@contextmanager
def unchanged(root: Path):
    """Loading must only read: the tree under root is the same afterwards, nothing added or removed."""
    before = snapshot(root)
    yield
    assert snapshot(root) == before


def write(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return root


def texts_of(ids: torch.Tensor) -> list[bytes]:
    """A stream back to its documents' bytes (EOS closes each)."""
    out, cur = [], bytearray()
    for t in ids.tolist():
        if t == EOS_ID:
            out.append(bytes(cur))
            cur = bytearray()
        else:
            cur.append(t)
    assert not cur, "every document ends in EOS"
    return out


def unit_hash(b: bytes) -> float:
    return int(hashlib.sha256(b).hexdigest()[:16], 16) / 2 ** 64


# ---------------------------------------------------------------- the binary rule, by hand

def test_binary_rule_worked_by_hand():
    expected = (set(range(32)) - {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1B}) | {0x7F}
    assert set(CONTROL_BYTES) == expected and len(CONTROL_BYTES) == len(expected)
    assert not is_binary(b"a" * 90 + b"\x01" * 10)  # exactly 10% control bytes: text
    assert is_binary(b"a" * 89 + b"\x01" * 11)  # 11%: binary
    assert not is_binary(b"\t\n\r\x0b\x0c\x1b[0m" * 100)  # whitespace and ANSI escapes are text
    assert not is_binary(bytes(range(0x80, 0x100)) * 10)  # high bytes (any encoding) are text
    assert is_binary(b"a" * 8191 + b"\x00")  # a NUL inside the first 8192 bytes
    assert not is_binary(b"a" * 8192 + b"\x00")  # ... and just past them
    assert not is_binary(b"a" * 8192 + b"\x01" * 9000)  # only the head is looked at
    assert is_binary("utf-16 text".encode("utf-16"))  # NUL bytes: UTF-16 counts as binary
    assert not is_binary(b"")


# ---------------------------------------------------------------- a folder: what is kept, skipped and said

def test_folder_skips_binary_empty_and_duplicate_and_says_so(tmp_path):
    d = write(tmp_path / "d", {
        "a.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "b.bin": b"\x01\x02" * 50 + b"x" * 10,  # no NUL, 100 of 110 bytes are control bytes
        "e.txt": b"",
        "keep.txt": "hello world\n",
        "latin.txt": "caf\xe9\n".encode("latin-1"),
        "orig.txt": "some text\n",
        "w.txt": " \n\t\n",
        "x_copy.txt": "some text\n",
    })
    with unchanged(tmp_path):
        c = build_corpus([str(d)], val_fraction=0.3)
    r = c.report
    assert (r.n_files, r.n_bytes, r.split_version) == (3, 12 + 5 + 10, 2)
    assert r.skipped == {"binary": ("d/a.png", "d/b.bin"), "empty": ("d/e.txt", "d/w.txt"),
                         "duplicate": ("d/x_copy.txt",)}
    assert r.same_as == {"d/x_copy.txt": "d/orig.txt"}
    assert format_report(r) == ("data: 3 files (27 bytes, split v2), skipped 2 binary (d/a.png, d/b.bin), "
                                "2 empty (d/e.txt, d/w.txt), 1 duplicate (d/x_copy.txt = d/orig.txt)")
    got = texts_of(c.train["d"]) + texts_of(c.val["d"])
    assert sorted(got) == sorted([b"hello world\n", "caf\xe9\n".encode("latin-1"), b"some text\n"])


def test_report_line_shows_the_first_names_then_a_count(tmp_path):
    d = write(tmp_path / "d", {**{f"{i}.bin": b"\x00" for i in range(5)}, "t.txt": "x" * 2000})
    with unchanged(tmp_path):
        r = load_documents([str(d)]).report
    assert format_report(r) == ("data: 1 file (2.0 KiB, split v2), "
                                "skipped 5 binary (d/0.bin, d/1.bin, d/2.bin, +2 more)")
    assert r.skipped["binary"] == tuple(f"d/{i}.bin" for i in range(5))  # all names kept in the report


def test_hidden_fifo_and_broken_link_are_reported_not_read(tmp_path):
    d = write(tmp_path / "d", {"t.txt": "text", ".env": "SECRET=1", ".git/config": "[core]", "sub/.x": "y"})
    os.symlink("missing.txt", d / "gone.txt")
    os.mkfifo(d / "pipe")  # reading it would block forever
    with unchanged(tmp_path):
        r = load_documents([str(d)]).report
    assert r.n_files == 1
    assert r.skipped == {"hidden": ("d/.git/", "d/.env", "d/sub/.x"), "not a regular file": ("d/pipe",),
                         "broken link": ("d/gone.txt",)}


def test_unreadable_file_is_reported_in_a_folder_and_an_error_when_named(tmp_path, monkeypatch):
    d = write(tmp_path / "d", {"ok.txt": "fine text", "secret.txt": "locked"})
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with unchanged(tmp_path):
        r = load_documents([str(d)]).report
        assert (r.n_files, r.skipped) == (1, {"unreadable": ("d/secret.txt",)})
        with pytest.raises(ValueError) as e:
            load_documents([str(d / "secret.txt")])
    assert str(e.value) == (f"--data file {str(d / 'secret.txt')!r} cannot be read (Permission denied): "
                            "check its permissions")


def test_folder_with_nothing_to_train_names_what_was_skipped(tmp_path):
    n = write(tmp_path / "n", {"img.png": b"\x89PNG\x00\x00", "e.txt": ""})
    (tmp_path / "void").mkdir()
    with unchanged(tmp_path):
        with pytest.raises(ValueError) as e:
            build_corpus([str(n)])
        with pytest.raises(ValueError) as e2:
            build_corpus([str(tmp_path / "void")])
    assert str(e.value) == (f"--data folder {str(n)!r} holds no file to train on (skipped 1 binary (n/img.png), "
                            "1 empty (n/e.txt)): give a folder with text files")
    assert str(e2.value) == (f"--data folder {str(tmp_path / 'void')!r} holds no file to train on "
                             "(no file at all): "
                             "give a folder with text files")


# ---------------------------------------------------------------- encodings: bytes in, the same bytes trained

def test_latin1_and_other_encodings_train_as_their_raw_bytes(tmp_path):
    files = {"fr.txt": "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"),
             "ru.txt": "\u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440\n".encode("cp1251"),
             "ok.txt": b"plain ascii\n", "u16.txt": "wide".encode("utf-16")}
    d = write(tmp_path / "enc", files)
    with unchanged(tmp_path):
        loaded = load_documents([str(d)])
        old = load_documents([str(d)], split_version=1)
    kept = ("fr.txt", "ok.txt", "ru.txt")
    assert {doc.name: doc.data for doc in loaded.documents} == {k: files[k] for k in kept}
    assert loaded.report.skipped == {"binary": ("enc/u16.txt",)}
    # rule 1 (kept for old runs) skipped them; now it says so
    assert [doc.name for doc in old.documents] == ["ok.txt"]
    assert old.report.skipped == {"binary": ("enc/u16.txt",), "not UTF-8": ("enc/fr.txt", "enc/ru.txt")}
    with unchanged(tmp_path):
        c = build_corpus([str(d / "fr.txt")], val_fraction=0.2)
    (dom,) = c.domains
    assert b"".join(texts_of(c.train[dom]) + texts_of(c.val[dom])) == files["fr.txt"]


# ---------------------------------------------------------------- symlinks and copies: loaded once, one side

def test_symlinked_file_and_folders_are_loaded_once(tmp_path):
    write(tmp_path / "other", {"o.txt": "text from elsewhere"})
    d = write(tmp_path / "d", {"a.txt": "alpha text"})
    os.symlink("a.txt", d / "link.txt")
    os.symlink("../other", d / "more")  # a linked folder is entered ...
    os.symlink(".", d / "loop")  # ... but a link back up is not (it would never end)
    with unchanged(tmp_path):
        loaded = load_documents([str(d)])
    assert [(doc.name, doc.data) for doc in loaded.documents] == [("a.txt", b"alpha text"),
                                                                   ("more/o.txt", b"text from elsewhere")]
    r = loaded.report
    assert r.skipped == {"duplicate": ("d/loop/", "d/link.txt")}
    assert format_report(r) == ("data: 2 files (29 bytes, split v2), "
                                "skipped 2 duplicate (d/loop/ = d/, d/link.txt = d/a.txt)")


def test_same_file_given_twice_or_by_overlapping_folders(tmp_path):
    c = write(tmp_path / "corpus", {"poems/a.txt": "roses are red", "poems/b.txt": "violets are blue",
                                    "top.txt": "the top file"})
    with unchanged(tmp_path):
        r = load_documents([str(c / "top.txt"), str(c / "top.txt")]).report
        with pytest.raises(ValueError) as e:
            load_documents([str(c), str(c / "poems")])
    assert (r.n_files, r.skipped["duplicate"]) == (1, (str(c / "top.txt"),))
    assert str(e.value) == (
        f"--data folder {str(c / 'poems')!r} holds no file to train on (skipped 2 duplicate "
        "(poems/a.txt = corpus/poems/a.txt, poems/b.txt = corpus/poems/b.txt)): "
        "give a folder with text files not loaded already")


def _pairs_folder(root: Path) -> tuple[Path, dict[int, bytes]]:
    """40 files, file i and file i + 20 hold the same text under different names."""
    texts = {i: f"document {i % 20} says something of its own, number {i % 20}.\n".encode() for i in range(40)}
    return write(root / "pairs", {f"f{i:02d}.txt": t for i, t in texts.items()}), texts


def test_a_copy_is_loaded_once_and_cannot_straddle_the_split(tmp_path):
    d, texts = _pairs_folder(tmp_path)
    with unchanged(tmp_path):
        c2 = build_corpus([str(d)], val_fraction=0.3)
        c1 = build_corpus([str(d)], val_fraction=0.3, split_version=1)
    tr, va = texts_of(c2.train["pairs"]), texts_of(c2.val["pairs"])
    assert sorted(tr + va) == sorted(set(texts.values()))  # each text exactly once
    assert set(va) == {t for t in set(texts.values()) if unit_hash(t) < 0.3}  # the side its bytes pick
    assert c2.report.skipped["duplicate"] == tuple(f"pairs/f{i:02d}.txt" for i in range(20, 40))
    assert c2.report.same_as["pairs/f25.txt"] == "pairs/f05.txt"
    # the old rule split by name: the same text lands on both sides (this is what rule 2 fixes)
    tr1, va1 = set(texts_of(c1.train["pairs"])), set(texts_of(c1.val["pairs"]))
    assert tr1 & va1
    assert format_report(c1.report).endswith(
        "nothing skipped, 20 duplicate kept by split v1 (pairs/f20.txt = pairs/f00.txt, "
        "pairs/f21.txt = pairs/f01.txt, pairs/f22.txt = pairs/f02.txt, +17 more)")


def test_renaming_files_keeps_their_side(tmp_path):
    texts = [f"note {i}: {'lorem ipsum ' * (i + 3)}\n".encode() for i in range(30)]
    a = write(tmp_path / "a" / "notes", {f"n{i}.txt": t for i, t in enumerate(texts)})
    b = write(tmp_path / "b" / "notes", {f"renamed_{29 - i}.md": t for i, t in enumerate(texts)})
    with unchanged(tmp_path):
        ca, cb = build_corpus([str(a)], val_fraction=0.25), build_corpus([str(b)], val_fraction=0.25)
        ca1 = build_corpus([str(a)], val_fraction=0.25, split_version=1)
        cb1 = build_corpus([str(b)], val_fraction=0.25, split_version=1)
    assert set(texts_of(ca.val["notes"])) == set(texts_of(cb.val["notes"])) != set()
    assert set(texts_of(ca1.val["notes"])) != set(texts_of(cb1.val["notes"]))  # rule 1 follows the names


# ---------------------------------------------------------------- too little text for one sequence

def test_three_byte_file_fails_check_with_seq_len_128(tmp_path):
    write(tmp_path / "tiny", {"abc.txt": "abc"})
    with unchanged(tmp_path):
        c = build_corpus([str(tmp_path / "tiny")], val_fraction=0.1)
    # 3 bytes split by bytes: floor(3 * 0.9) = 2 for training, 1 for validation
    assert texts_of(c.train["tiny"]) == [b"ab"] and texts_of(c.val["tiny"]) == [b"c"]
    with pytest.raises(ValueError) as e:
        c.check(128)
    assert str(e.value) == ("data: the training split of domain 'tiny' holds 2 bytes (the first 2 bytes of "
                            "tiny/abc.txt, a domain of one file, split by bytes), less than one sequence of "
                            "seq_len=128: give more text")
    b = c.sample(2, 128, torch.Generator().manual_seed(0))  # sampling itself still pads (check is the gate)
    assert b.valid_BS.sum() == 2 * 2


def test_small_validation_split_names_its_file_and_the_largest_seq_len_that_fits(tmp_path):
    big, small = b"b" * 300, b"s" * 40
    d = write(tmp_path / "few", {"big.txt": big, "small.txt": small})
    with unchanged(tmp_path):
        c = build_corpus([str(d)], val_fraction=0.01)
    # neither file hashes below 0.01, so the one with the smaller content hash (small.txt) is held out
    assert 0.01 < unit_hash(small) < unit_hash(big)
    assert texts_of(c.train["few"]) == [big] and texts_of(c.val["few"]) == [small]
    with pytest.raises(ValueError) as e:
        c.check(128)
    # validation is 40 bytes + EOS = 41 ids: windows of 40 + 1 ids fit there and in training (301 ids)
    assert str(e.value) == ("data: the validation split of domain 'few' holds 40 bytes (1 file: few/small.txt), "
                            "less than one sequence of seq_len=128: give more text, lower --seq-len to 40 or "
                            "less, or raise --val-fraction")
    c.check(40)
    with pytest.raises(ValueError, match="validation split of domain 'few' holds 40 bytes"):
        c.check(41)


def test_check_counts_eos_as_one_id_per_file(tmp_path):
    d = write(tmp_path / "m", {"x.txt": "x" * 10, "y.txt": "y" * 10, "z.txt": "z" * 10})
    with unchanged(tmp_path):
        c = build_corpus([str(d)], val_fraction=0.5)
    n_tr, n_va = c.train["m"].numel(), c.val["m"].numel()
    assert n_tr + n_va == 30 + 3  # 3 files, one EOS each
    c.check(min(n_tr, n_va) - 1)
    with pytest.raises(ValueError):
        c.check(min(n_tr, n_va))


# ---------------------------------------------------------------- paths and versions

def test_missing_path_and_mixed_builtin_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "d", {"t.txt": "text"})
    with unchanged(tmp_path):
        with pytest.raises(ValueError) as e:
            build_corpus([str(tmp_path / "d"), str(tmp_path / "nope")])
        with pytest.raises(ValueError) as e_mix:
            build_corpus(["builtin", str(tmp_path / "d")])
        with pytest.raises(ValueError) as e_ver:
            build_corpus([str(tmp_path / "d")], split_version=3)
    assert str(e.value) == (f"--data path {str(tmp_path / 'nope')!r} does not exist: "
                            "give an existing text file or folder")
    assert str(e_mix.value) == "--data builtin cannot be mixed with paths: give builtin alone, or only paths"
    assert str(e_ver.value) == "split_version=3 is invalid: allowed 1, 2"


def test_named_binary_and_empty_files_are_errors_that_say_what_to_do(tmp_path):
    write(tmp_path, {"x.bin": b"\x7fELF\x02\x01\x01\x00", "e.txt": "  \n"})
    with unchanged(tmp_path):
        with pytest.raises(ValueError) as e_bin:
            build_corpus([str(tmp_path / "x.bin")])
        with pytest.raises(ValueError) as e_empty:
            build_corpus([str(tmp_path / "e.txt")])
    assert str(e_bin.value) == (f"--data file {str(tmp_path / 'x.bin')!r} is binary (a NUL byte or more than 10% "
                                "control bytes in its first 8192 bytes): give a text file")
    assert str(e_empty.value) == (f"--data file {str(tmp_path / 'e.txt')!r} is empty (or only whitespace): "
                                  "give a file with text")


def _old_build(paths: list[str], val_fraction: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The loader and split as they were before split rule 2, copied verbatim in behaviour (the reference)."""
    docs = []
    for raw in paths:
        p = Path(raw)
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            data = f.read_bytes()
            if b"\x00" in data[:8192]:
                continue
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if data.strip():
                docs.append(Document(p.resolve().name or "text", str(f.relative_to(p)), data))

    def h(name):
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0 ** 64

    def stream(ds):
        return torch.tensor([b for d in ds for b in [*d.data, EOS_ID]], dtype=torch.int16)
    out = {}
    for dom in sorted({d.domain for d in docs}):
        ds = [d for d in docs if d.domain == dom]
        va = [d for d in ds if h(d.name) < val_fraction]
        if not va and len(ds) > 1:
            va = [min(ds, key=lambda d: h(d.name))]
        names = {d.name for d in va}
        tr = [d for d in ds if d.name not in names]
        if not tr or not va:
            cut = math.floor(len(ds[0].data) * (1 - val_fraction))
            tr, va = [ds[0]._replace(data=ds[0].data[:cut])], [ds[0]._replace(data=ds[0].data[cut:])]
        out[dom] = (stream(tr), stream(va))
    return out


@pytest.mark.parametrize("val_fraction", [0.1, 0.4])
def test_split_version_1_reproduces_the_old_corpus_exactly(tmp_path, val_fraction):
    write(tmp_path / "elsewhere", {"far.txt": "far away text " * 5})
    mess = write(tmp_path / "mess", {
        **{f"t{i}.txt": f"text {i} " * (5 + i) for i in range(12)},
        "lat.txt": "caf\xe9".encode("latin-1"), "nul.bin": b"ab\x00cd", "ctrl.txt": b"\x01\x02\x03abc",
        "ws.txt": " \n", ".hidden": "hidden text", ".git/HEAD": "ref: refs/heads/main", "deep/er/x.md": "deep",
        "dup.txt": "text 0 " * 5})
    os.symlink("t1.txt", mess / "link.txt")
    os.symlink("../elsewhere", mess / "linked_dir")  # rule 1 never entered linked folders
    single = write(tmp_path / "one", {"only.txt": "a single file of text " * 4})
    paths = [str(mess), str(single)]
    with unchanged(tmp_path):
        new = build_corpus(paths, val_fraction=val_fraction, split_version=1)
    ref = _old_build(paths, val_fraction)
    assert new.domains == sorted(ref)
    for dom, (tr, va) in ref.items():
        assert torch.equal(new.train[dom], tr) and torch.equal(new.val[dom], va)
    r = new.report
    assert r.skipped == {"binary": ("mess/nul.bin",), "empty": ("mess/ws.txt",), "hidden": ("mess/.hidden",),
                         "not UTF-8": ("mess/lat.txt",)}
    assert r.same_as == {"mess/t0.txt": "mess/dup.txt", "mess/t1.txt": "mess/link.txt"}  # first in name order


def test_builtin_corpus_is_deduplicated_and_reported():
    docs = builtin_documents()
    distinct = {hashlib.sha256(d.data).digest() for d in docs}
    r = load_documents(None).report
    assert r.builtin and r.n_files == len(distinct)
    assert len(r.skipped.get("duplicate", ())) == len(docs) - len(distinct)
    assert format_report(r).startswith(f"data: built-in corpus, {len(distinct)} files (")
    r1 = load_documents(["builtin"], split_version=1).report
    assert r1.n_files == len(docs) and "duplicate" not in r1.skipped


def test_a_path_that_is_neither_file_nor_folder_is_an_error(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with unchanged(tmp_path), pytest.raises(ValueError) as e:
        load_documents([str(tmp_path / "pipe")])
    assert str(e.value) == (f"--data path {str(tmp_path / 'pipe')!r} is not a regular file or folder: "
                            "give a text file or folder")


def test_document_text_keeps_every_byte_for_a_tokenizer():
    latin = "caf\xe9 cr\xe8me".encode("latin-1")
    assert document_text(latin) == "caf\xe9 cr\xe8me" and document_text(latin).encode("latin-1") == latin
    assert document_text("na\u00efve \u2603".encode()) == "na\u00efve \u2603"  # UTF-8 decodes as UTF-8
    every = bytes(range(256))
    assert "\ufffd" not in document_text(every) and len(document_text(every)) == 256
