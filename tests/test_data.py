"""Corpus: built-in domains, deterministic split by file, user data, clear errors, sampling, unigram baseline."""
import math
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch

from moelab.data import build_corpus, builtin_documents, is_validation, is_validation_content
from moelab.model import EOS_ID, PAD_ID


@pytest.fixture(scope="module")
def builtin():
    return build_corpus()


def test_builtin_domains_found(builtin):
    expected = {"code", "prose"}
    if list(Path(sysconfig.get_paths()["include"]).rglob("*.h")):
        expected.add("c")
    assert set(builtin.domains) == expected
    for d in builtin.domains:
        n_tr, n_va = builtin.n_files[d]
        assert n_tr > 0 and n_va > 0
        assert builtin.train[d].numel() > 10_000 and builtin.val[d].numel() > 1_000


def test_builtin_split_by_file_is_disjoint_and_follows_the_name_hash():
    docs = builtin_documents()
    for dom in ("code", "prose"):
        names = [d.name for d in docs if d.domain == dom]
        val = {n for n in names if is_validation(n, 0.1)}
        assert 0 < len(val) < len(names)
    assert is_validation("abc.py", 0.1) == is_validation("abc.py", 0.1)
    # the share of held-out names is near the requested fraction
    names = [f"file_{i}.txt" for i in range(2000)]
    share = sum(is_validation(n, 0.2) for n in names) / len(names)
    assert abs(share - 0.2) < 0.03


def make_folder(root: Path, name: str, files: dict[str, str]) -> Path:
    d = root / name
    d.mkdir()
    for fn, text in files.items():
        (d / fn).write_text(text)
    return d


@pytest.mark.parametrize("version", [1, 2])
def test_user_folders_become_domains_and_split_deterministically(tmp_path, version):
    a = make_folder(tmp_path, "poems", {f"p{i}.txt": f"poem number {i} " * 20 for i in range(12)})
    b = make_folder(tmp_path, "notes", {f"n{i}.md": f"note {i}: " + "x" * (30 + i) for i in range(12)})
    c1 = build_corpus([str(a), str(b)], val_fraction=0.25, split_version=version)
    c2 = build_corpus([str(b), str(a)], val_fraction=0.25, split_version=version)
    assert c1.domains == c2.domains == ["notes", "poems"]
    for d in c1.domains:
        assert torch.equal(c1.train[d], c2.train[d]) and torch.equal(c1.val[d], c2.val[d])
    # every file lands wholly in one split: the one its name's hash (rule 1) or its bytes' hash (rule 2) picks
    tr, va = _decode(c1.train["poems"]), _decode(c1.val["poems"])
    texts = {i: f"poem number {i} " * 20 for i in range(12)}
    held = {i for i in range(12) if (is_validation(f"p{i}.txt", 0.25) if version == 1
                                     else is_validation_content(texts[i].encode(), 0.25))}
    assert held, "pick names so that the hash holds some out"
    for i in range(12):
        assert (texts[i] in va) == (i in held) and (texts[i] in tr) == (i not in held)


def test_content_hash_is_an_independent_sha256():
    import hashlib
    for data in (b"a", b"hello world", bytes(range(256))):
        u = int(hashlib.sha256(data).hexdigest()[:16], 16) / 2 ** 64
        assert is_validation_content(data, u + 1e-12) and not is_validation_content(data, u - 1e-12)


def _decode(ids: torch.Tensor) -> str:
    return bytes(t for t in ids.tolist() if t < 256).decode()


def test_single_file_is_split_by_bytes(tmp_path):
    d = make_folder(tmp_path, "one", {"only.txt": "abcdefghij" * 10})
    c = build_corpus([str(d / "only.txt")], val_fraction=0.1)
    assert c.domains == ["one"]
    assert _decode(c.train["one"]) + _decode(c.val["one"]) == "abcdefghij" * 10
    assert len(_decode(c.val["one"])) == 10


def test_clear_errors_for_missing_empty_and_binary(tmp_path):
    # rule 2: Latin-1 text is trained as bytes (rule 1 refused it), the folder error lists what was skipped
    with pytest.raises(ValueError, match="does not exist"):
        build_corpus([str(tmp_path / "nope")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        build_corpus([str(tmp_path / "empty.txt")])
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="blob.bin.*binary"):
        build_corpus([str(tmp_path / "blob.bin")])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    c = build_corpus([str(tmp_path / "latin1.txt")])
    assert bytes(t for t in torch.cat([c.train[c.domains[0]], c.val[c.domains[0]]]).tolist() if t < 256) == \
        "caf\xe9 cr\xe8me".encode("latin-1")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        build_corpus([str(tmp_path / "latin1.txt")], split_version=1)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "img.png").write_bytes(b"\x89PNG\x00\x00")
    with pytest.raises(ValueError, match=r"nothing.*no file to train on \(skipped 1 binary \(nothing/img.png\)\)"):
        build_corpus([str(empty_dir)])
    with pytest.raises(ValueError, match="nothing.*no non-empty UTF-8 text"):
        build_corpus([str(empty_dir)], split_version=1)
    with pytest.raises(ValueError, match="val_fraction"):
        build_corpus([str(tmp_path / "latin1.txt")], val_fraction=1.5)


def test_sample_is_seeded_shifted_and_labelled(tmp_path):
    a = make_folder(tmp_path, "aa", {f"{i}.txt": "hello world " * 40 for i in range(5)})
    b = make_folder(tmp_path, "bb", {f"{i}.txt": "0123456789" * 40 for i in range(5)})
    c = build_corpus([str(a), str(b)], val_fraction=0.3)
    b1 = c.sample(8, 16, torch.Generator().manual_seed(3))
    b2 = c.sample(8, 16, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    assert torch.equal(b1.idx_BS[:, 1:], b1.targets_BS[:, :-1])
    assert b1.valid_BS.all()
    for row, d in zip(b1.idx_BS.tolist(), b1.domain_B.tolist()):
        text = bytes(t for t in row if t < 256).decode()
        assert set(text) <= (set("helo wrd") if c.domains[d] == "aa" else set("0123456789"))


def test_short_domain_is_right_padded(tmp_path):
    d = make_folder(tmp_path, "short", {"a.txt": "tiny", "b.txt": "text"})
    c = build_corpus([str(d)], val_fraction=0.5)
    b = c.sample(2, 32, torch.Generator().manual_seed(0))
    n = c.train["short"].numel()  # 4 bytes + EOS
    assert b.valid_BS[:, :n - 1].all() and not b.valid_BS[:, n - 1:].any()
    assert (b.idx_BS[:, n:] == PAD_ID).all()


def test_val_batches_are_fixed_and_cover_the_stream(builtin):
    v1 = builtin.val_batches("prose", 4, 64, 2)
    v2 = builtin.val_batches("prose", 4, 64, 2)
    assert len(v1) == 2 and all(torch.equal(x.idx_BS, y.idx_BS) for x, y in zip(v1, v2))
    assert (v1[0].domain_B == builtin.domains.index("prose")).all()


def test_unigram_baseline_matches_hand_count(tmp_path):
    d = make_folder(tmp_path, "u", {"x.txt": "aab" * 30 + "c" * 10})
    c = build_corpus([str(d / "x.txt")], val_fraction=0.1)
    tr, va = _decode(c.train["u"]), _decode(c.val["u"])
    counts = Counter(tr)
    total = len(tr) + 1 + (EOS_ID + 1)  # + EOS once, + add-one over 259 ids
    logp = {ch: math.log((counts[ch] + 1) / total) for ch in set(va)}
    expected = -(sum(logp[ch] for ch in va) + math.log(2 / total)) / (len(va) + 1)  # val stream ends in EOS
    assert c.unigram_loss("u") == pytest.approx(expected, rel=1e-9)
