"""HF export / import against transformers itself: same keys as save_pretrained, equal logits and greedy
tokens, bit-exact round trips, sharded files, the byte tokenizer, refusals naming the field."""
import json

import pytest
import torch
from safetensors import safe_open

from moelab.checkpoint import load_model, save_checkpoint
from moelab.config import ModelConfig, MoEConfig
from moelab.hf_archs import pick_arch
from moelab.hf_convert import Source, export_hf, import_hf
from moelab.model import BOS_ID, MoELM, generate
from moelab.presets import get_preset

transformers = pytest.importorskip("transformers")


def cfg(moe: dict, **kw) -> ModelConfig:
    m = MoEConfig(**{"d_model": 32, "d_expert": 16, "n_experts": 4, "top_k": 2, **moe})
    return ModelConfig(**{"moe": m, "d_model": 32, "n_layers": 3, "n_heads": 4, "d_dense": 40, "max_seq_len": 48,
                          **kw})


CASES = {  # arch -> a config using what that architecture can express
    "llama": cfg({}, first_dense=3, n_kv_heads=2, tie_embeddings=True),
    "qwen3": cfg({}, first_dense=3, qk_norm=True, head_dim=16, tie_embeddings=False),
    "mixtral": cfg({"score_order": "topk_softmax"}, n_kv_heads=2, head_dim=12, sliding_window=7,
                   tie_embeddings=False),
    "qwen3_moe": cfg({"renormalize": False}, first_dense=1, moe_every=2, qk_norm=True, n_kv_heads=2,
                     tie_embeddings=True, rope_theta=5e5, sliding_window=5),
    "glm4_moe": cfg({"router": "sigmoid_group", "n_experts": 8, "n_group": 4, "topk_group": 2, "top_k": 3,
                     "n_shared": 2, "routed_scaling_factor": 2.5, "balance": "loss_free"},
                    first_dense=1, qk_norm=True, qkv_bias=True, rope_fraction=0.5, n_kv_heads=2,
                    tie_embeddings=False),
    "dots1": cfg({"router": "sigmoid_group", "n_experts": 8, "n_group": 2, "topk_group": 1, "top_k": 2,
                  "n_shared": 1, "renormalize": False, "balance": "loss_free"},
                 first_dense=1, qk_norm=True, sliding_window=6, tie_embeddings=False),
}


def random_run(tmp_path, c: ModelConfig, seed: int = 0):
    """A run folder whose checkpoint holds a model with every tensor random (norm gains, biases, the
    loss-free bias too), so each mapped tensor matters."""
    torch.manual_seed(seed)
    model = MoELM(c)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.is_floating_point() and "load_E" not in k:
                t.copy_(torch.randn_like(t) * (0.2 if t.ndim > 1 else 1.0))
    run = tmp_path / "run"
    save_checkpoint(run, 1, model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1), extra={},
                    meta={"model_config": c.to_dict()}, keep_last=1)
    return run, model.eval()


def tensors(path) -> dict[str, torch.Tensor]:
    from contextlib import ExitStack
    with ExitStack() as st:
        src = Source(path, st)
        return {k: src.get(k) for k in src.keys()}  # noqa: SIM118 (Source.keys is a method)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_export_loads_in_transformers_with_equal_logits_keys_and_greedy_tokens(tmp_path, arch):
    c = CASES[arch]
    run, model = random_run(tmp_path, c)
    assert export_hf(run, tmp_path / "hf", arch=arch, verbose=False).name == arch
    hm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hm).__name__ == pick_arch(c, arch).model_class
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ours, theirs = model(ids).logits_BSV, hm(ids).logits
    assert (ours - theirs).abs().max() < 1e-5
    # the files hold exactly what transformers' own save_pretrained writes for this model
    hm.save_pretrained(str(tmp_path / "resaved"))
    mine, ref = tensors(tmp_path / "hf"), tensors(tmp_path / "resaved")
    assert sorted(mine) == sorted(ref)
    assert all(torch.equal(mine[k], ref[k]) for k in ref)
    conf = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("hf", "resaved")]
    assert conf[0] == conf[1]
    # greedy generation: same tokens (the generation config suppresses PAD/BOS/EOS)
    prompt = torch.tensor([BOS_ID, 100, 101, 102])
    want = generate(model, prompt, max_new_tokens=12, temperature=0)
    got = hm.generate(prompt[None], max_new_tokens=12, do_sample=False)[0, 4:]
    assert torch.equal(got, want)


@pytest.mark.parametrize("preset,arch", [("tiny", "mixtral"), ("qwen3-moe-like", "qwen3_moe"),
                                         ("glm4-moe-like", "glm4_moe"), ("deepseek-v3-like", "glm4_moe")])
def test_presets_export_to_their_architecture(tmp_path, preset, arch):
    run, model = random_run(tmp_path, get_preset(preset))
    assert export_hf(run, tmp_path / "hf", verbose=False).name == arch
    hm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        assert (model(ids).logits_BSV - hm(ids).logits).abs().max() < 1e-5


def test_auto_arch_preference_and_refusals_name_the_field(tmp_path):
    assert pick_arch(get_preset("tiny")).name == "mixtral"  # the demo model exports
    assert pick_arch(CASES["llama"]).name == "llama" and pick_arch(CASES["qwen3"]).name == "qwen3"
    with pytest.raises(ValueError, match="first_dense=0"):
        pick_arch(get_preset("tiny"), "llama")
    assert pick_arch(get_preset("mixtral-like")).name == "mixtral"
    assert pick_arch(get_preset("deepseek-v3-like")).name == "glm4_moe"
    assert pick_arch(CASES["qwen3_moe"]).name == "qwen3_moe"
    assert pick_arch(CASES["dots1"]).name == "dots1"  # glm4_moe has no sliding window
    assert pick_arch(CASES["dots1"].replace(sliding_window=None)).name == "glm4_moe"
    with pytest.raises(ValueError, match="cannot express qk_norm=True"):
        pick_arch(cfg({}, qk_norm=True), "mixtral")
    with pytest.raises(ValueError, match="moe.router='sigmoid_group'"):
        pick_arch(CASES["glm4_moe"], "qwen3_moe")
    with pytest.raises(ValueError, match="moe.n_zero=1"):
        pick_arch(cfg({"n_zero": 1}), "mixtral")
    with pytest.raises(ValueError, match="moe.capacity_factor"):
        pick_arch(cfg({"capacity_factor": 1.0}))
    with pytest.raises(ValueError, match="sliding_window"):
        pick_arch(CASES["glm4_moe"].replace(sliding_window=4), "glm4_moe")
    with pytest.raises(ValueError, match="--arch='gpt2' is unknown"):
        pick_arch(CASES["mixtral"], "gpt2")


def test_byte_tokenizer_and_generation_config(tmp_path):
    run, _ = random_run(tmp_path, CASES["mixtral"])
    export_hf(run, tmp_path / "hf", verbose=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "def f(x):\n\treturn 'héllo €' + x  "
    ids = tok(text).input_ids
    assert ids == [BOS_ID] + list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == [256, 257, 258] and gen["bos_token_id"] == BOS_ID


def test_sharded_export_index_and_load(tmp_path):
    run, model = random_run(tmp_path, CASES["glm4_moe"])
    export_hf(run, tmp_path / "hf", max_shard_bytes=20_000, verbose=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for s in shards:  # every shard is at most the limit unless it holds a single larger tensor
        with safe_open(str(tmp_path / "hf" / s), "pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * 4 for k in keys)
        assert size <= 20_000 or len(keys) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors(tmp_path / "hf").values())
    hm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert (model(ids).logits_BSV - hm(ids).logits).abs().max() < 1e-5


def hf_random(arch: str, tmp_path, **kw):
    """A tiny random transformers model of `arch`, saved with its own save_pretrained."""
    common = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts_per_tok": 2}
    extra = {"llama": {"intermediate_size": 24},
             "qwen3": {"intermediate_size": 24, "head_dim": 16},
             "mixtral": {"intermediate_size": 24, "num_local_experts": 4},
             "qwen3_moe": {"intermediate_size": 40, "moe_intermediate_size": 16, "num_experts": 4,
                           "mlp_only_layers": [0], "norm_topk_prob": True},
             "glm4_moe": {"intermediate_size": 40, "moe_intermediate_size": 16, "n_routed_experts": 8, "n_group": 2,
                          "topk_group": 1, "n_shared_experts": 1, "first_k_dense_replace": 1,
                          "routed_scaling_factor": 1.5, "use_qk_norm": True, "attention_bias": True},
             "dots1": {"intermediate_size": 40, "moe_intermediate_size": 16, "n_routed_experts": 8, "n_group": 4,
                       "topk_group": 2, "n_shared_experts": 2, "first_k_dense_replace": 1, "norm_topk_prob": True,
                       "sliding_window": 5, "max_window_layers": 0}}[arch]
    hf_cfg = transformers.AutoConfig.for_model(arch, **{**common, **extra, **kw})
    torch.manual_seed(1)
    hm = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for name, t in list(hm.named_parameters()) + list(hm.named_buffers()):
            if t.is_floating_point() and "inv_freq" not in name:  # rotary tables stay the config's
                t.copy_(torch.randn_like(t) * 0.2)
    hm.save_pretrained(str(tmp_path / f"src_{arch}"))
    return hm, tmp_path / f"src_{arch}"


@pytest.mark.parametrize("arch", sorted(CASES))
def test_import_runs_and_round_trips_bit_exact(tmp_path, arch):
    hm, src = hf_random(arch, tmp_path)
    import_hf(src, tmp_path / "run", verbose=False)
    model, meta = load_model(tmp_path / "run")
    assert meta["step"] == 0 and meta["source"]["arch"] == arch
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert (model(ids).logits_BSV - hm(ids).logits).abs().max() < 1e-5
    export_hf(tmp_path / "run", tmp_path / "back", verbose=False)
    a, b = tensors(src), tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


# ---- the CLI and sparse upcycling --------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch):
    """moelab's CLI, which lists the convert commands."""
    from moelab import cli as cli_mod
    from moelab import cli_convert
    assert cli_convert in cli_mod.AREAS
    return cli_mod.main


DENSE = cfg({}, first_dense=3, n_kv_heads=2)  # d_dense = 40


@pytest.mark.parametrize("E,k,g,n,fd", [(4, 2, 1, 0, 0), (8, 4, 2, 0, 1), (6, 3, 4, 1, 0), (12, 6, 5, 2, 0)])
def test_upcycled_logits_equal_dense_at_step_0(tmp_path, E, k, g, n, fd):
    from moelab.hf_upcycle import upcycle
    run, dense = random_run(tmp_path, DENSE)
    upcycle(run, tmp_path / "up", n_experts=E, top_k=k, granularity=g, shared=n, first_dense=fd, verbose=False)
    up, meta = load_model(tmp_path / "up")
    m = up.cfg.moe
    assert up.cfg.moe_layer_ids == list(range(fd, 3)) and (m.n_experts, m.top_k, m.n_shared) == (E, k, n)
    assert m.d_expert == 40 // g and meta["source"]["granularity"] == g
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        out = up(ids)
        assert (out.logits_BSV - dense(ids).logits_BSV).abs().max() < 1e-5
    assert out.moe[fd].routing.expert_idx_TK.unique().numel() > k  # tokens pick different experts
    w_up = up.blocks[fd].ffn.experts.weights.w_up_EDG
    assert (g - n == 1) == torch.equal(w_up[0], w_up[1])  # slices differ, copies are equal


def test_upcycle_from_transformers_llama_and_refusals(tmp_path, cli, capsys):
    hm, src = hf_random("llama", tmp_path)
    assert cli(["upcycle", "--hf", str(src), "--experts", "4", "--top-k", "2", "--granularity", "2",
                "--out", str(tmp_path / "up")]) == 0
    up, _ = load_model(tmp_path / "up")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert (up(ids).logits_BSV - hm(ids).logits).abs().max() < 1e-5
    capsys.readouterr()
    for extra, msg in ((["--top-k", "3", "--granularity", "2"], "--top-k=3"),
                       (["--top-k", "2", "--granularity", "5"], "--granularity=5"),
                       (["--top-k", "2", "--granularity", "2", "--shared", "2"], "--shared=2")):
        assert cli(["upcycle", "--hf", str(src), "--experts", "4", "--out", str(tmp_path / "x")] + extra) == 2
        assert msg in capsys.readouterr().err
    assert cli(["upcycle", "--hf", str(tmp_path / "up"), "--experts", "4", "--top-k", "2",
                "--out", str(tmp_path / "y")]) == 2
    assert "upcycle source has MoE layers" in capsys.readouterr().err


SMALL_TRAIN = ["--train.batch_size", "4", "--train.seq_len", "32", "--train.eval_batches", "2",
               "--train.log_every", "100"]


def test_cli_export_import_and_train_init_from(tmp_path, cli, capsys):
    """export (sharded) -> import -> train --init-from with lr 0 keeps the weights; shape mismatches name the
    tensor; the trained run exports again."""
    run, model = random_run(tmp_path, CASES["mixtral"])
    assert cli(["export", str(run), "--to-hf", str(tmp_path / "hf"), "--max-shard-size", "20KB"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert cli(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert cli(["train", "--init-from", str(tmp_path / "back"), "--train.steps", "1", "--train.lr", "0",
                "--out", str(tmp_path / "t")] + SMALL_TRAIN) == 0
    got = tensors(tmp_path / "t" / "ckpt" / "step_00000001" / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items() if ".state." not in k)
    capsys.readouterr()
    assert cli(["train", "--preset", "tiny", "--init-from", str(tmp_path / "back"), "--train.steps", "1",
                "--out", str(tmp_path / "bad")] + SMALL_TRAIN) == 2
    assert "--init-from" in (err := capsys.readouterr().err) and "tensor blocks.0." in err
    assert cli(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 2
    assert cli(["export", str(run), "--to-hf", str(tmp_path / "hf")]) == 2
    assert "already holds model weights" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "t"), "--to-hf", str(tmp_path / "hf2"), "--arch", "glm4_moe"]) == 2
    assert "moe.router='topk'" in capsys.readouterr().err


def test_train_init_from_upcycled_starts_at_trained_dense_val_loss(tmp_path, cli):
    """A trained dense run -> upcycle (granular, 8 experts top-4) -> train --init-from with lr 0 (so the final
    evaluation sees step 0's weights): the validation loss per domain equals the dense run's."""
    dense = tmp_path / "dense"
    assert cli(["train", "--preset", "tiny", "--model.n_layers", "2", "--model.first_dense", "2",
                "--train.steps", "12", "--out", str(dense)] + SMALL_TRAIN) == 0
    dense_val = json.loads((dense / "summary.json").read_text())["val_loss"]
    assert cli(["upcycle", "--hf", str(dense), "--experts", "8", "--top-k", "4", "--granularity", "2",
                "--out", str(tmp_path / "up")]) == 0
    assert cli(["train", "--init-from", str(tmp_path / "up"), "--train.steps", "1", "--train.lr", "0",
                "--out", str(tmp_path / "moe")]) == 0
    moe_val = json.loads((tmp_path / "moe" / "summary.json").read_text())["val_loss"]
    assert dense_val.keys() == moe_val.keys()
    assert all(abs(dense_val[d] - moe_val[d]) < 1e-4 for d in dense_val)


def bpe_tokenizer(folder, vocab_size: int = 320):
    """A small byte-level BPE (trained here on a few sentences) saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["def hello(world):\n    return world + 1\n", "The quick brown fox jumps over the lazy dog. " * 3,
            "for i in range(10):\n    print(i * i)\n"] * 5
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


def test_bpe_tokenizer_travels_through_import_generate_export_and_upcycle(tmp_path, cli, capsys):
    hm, src = hf_random("qwen3_moe", tmp_path, vocab_size=320)
    tok = bpe_tokenizer(src)
    assert cli(["import", "--hf", str(src), "--out", str(tmp_path / "run")]) == 0
    model, _ = load_model(tmp_path / "run")
    assert model.cfg.tokenizer == "tokenizer" and (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    prompt = "def hello(world):"
    capsys.readouterr()
    assert cli(["generate", str(tmp_path / "run"), "--prompt", prompt, "--temperature", "0",
                "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids])
    never = sorted({tok.pad_token_id, tok.bos_token_id} | set(range(len(tok), 320)))
    want = hm.generate(ids, max_new_tokens=10, do_sample=False, suppress_tokens=never)[0, ids.shape[1]:]
    assert out == prompt + tok.decode(want, skip_special_tokens=True) + "\n"
    export_hf(tmp_path / "run", tmp_path / "hf", verbose=False)
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "The lazy fox: print(i)"
    assert back(text).input_ids == tok(text).input_ids
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == never and gen["eos_token_id"] == tok.eos_token_id
    assert cli(["train", "--init-from", str(tmp_path / "run"), "--train.steps", "1", "--out",
                str(tmp_path / "trained")] + SMALL_TRAIN) == 0
    assert (tmp_path / "trained" / "tokenizer" / "tokenizer.json").exists()
    capsys.readouterr()
    assert cli(["generate", str(tmp_path / "trained"), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    _, src_l = hf_random("llama", tmp_path, vocab_size=320)
    bpe_tokenizer(src_l)
    assert cli(["upcycle", "--hf", str(src_l), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "up")]) == 0
    up, _ = load_model(tmp_path / "up")
    assert up.cfg.tokenizer == "tokenizer" and (tmp_path / "up" / "tokenizer" / "tokenizer.json").exists()


def test_tokenizer_streams_and_bits_per_byte(tmp_path):
    """Byte ids: the stream is the UTF-8 bytes + EOS per document, and bits per byte = nats per token / ln 2.
    BPE: the byte lengths of a document's tokens sum to its UTF-8 length, so bits per byte measures the text."""
    import math

    from moelab.hf_tokenizer import BYTES, HFTokenizer, bits_per_byte, encode_documents, load_tokenizer
    texts = ["héllo wörld\n", "def f(x):\n    return x\n"]
    bt = load_tokenizer(BYTES)
    stream = encode_documents(texts, bt)
    want = [b for t in texts for b in [*t.encode("utf-8"), 258]]
    assert stream.tolist() == want and bt.decode(stream) == "".join(texts)
    nats = torch.rand(len(want))
    assert math.isclose(bits_per_byte(nats_T=nats, targets_T=stream, byte_len_V=bt.byte_lengths(259)),
                        float(nats.mean()) / math.log(2), rel_tol=1e-6)
    bpe_tokenizer(tmp_path / "tok")
    ht = HFTokenizer(tmp_path / "tok")
    stream = encode_documents(texts, ht)
    assert len(stream) < len(want)  # merges: fewer tokens than bytes
    lens = ht.byte_lengths(320)
    assert int(lens[stream.long()].sum()) == sum(len(t.encode("utf-8")) + 1 for t in texts)  # + 1 per EOS
    assert ht.decode(stream) == "".join(texts)


def test_conversion_reads_one_expert_at_a_time(tmp_path, monkeypatch):
    """Export reads each expert's slice of the stacked moelab weights (never a whole layer), import reads the
    per-expert transformers tensors: no expert read is bigger than one expert."""
    from moelab import hf_convert
    expert_reads: list[int] = []
    get, rows = hf_convert.Source.get, hf_convert.Source.rows

    def spy_get(self, name):
        t = get(self, name)
        if "experts" in name and "shared" not in name:
            expert_reads.append(t.numel())
        return t

    def spy_rows(self, name, a, b):
        t = rows(self, name, a, b)
        if "experts" in name and "shared" not in name:
            expert_reads.append(t.numel())
        return t

    monkeypatch.setattr(hf_convert.Source, "get", spy_get)
    monkeypatch.setattr(hf_convert.Source, "rows", spy_rows)
    c = CASES["glm4_moe"]
    run, _ = random_run(tmp_path, c)
    export_hf(run, tmp_path / "hf", max_shard_bytes=20_000, verbose=False)
    one_expert = c.d_model * 2 * c.moe.d_expert
    n_moe = len(c.moe_layer_ids)
    assert len(expert_reads) == n_moe * c.moe.n_experts * 3 and max(expert_reads) <= one_expert
    expert_reads.clear()
    import_hf(tmp_path / "hf", tmp_path / "back", verbose=False)
    assert len(expert_reads) == n_moe * c.moe.n_experts * 3 and max(expert_reads) <= one_expert // 2


def test_a_bpe_run_reads_its_data_in_its_own_ids_and_reports_bits_per_byte(tmp_path):
    """ModelConfig.tokenizer = a transformers tokenizer folder: the corpus holds that tokenizer's ids (the same
    text as the byte corpus, same split), and validation bits per byte = summed nats over the target ids' bytes."""
    import math

    from moelab.config import ModelConfig, MoEConfig, TrainConfig
    from moelab.data import build_corpus
    from moelab.hf_tokenizer import HFTokenizer
    from moelab.model import MoELM, lm_loss
    from moelab.train import corpus_for, evaluate
    bpe_tokenizer(tmp_path / "tok")
    data = tmp_path / "data" / "code"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"{i}.py").write_text(f"def hello(world):\n    return world + {i}\n" * 12)
    mcfg = ModelConfig(moe=MoEConfig(d_model=16, d_expert=16, n_experts=4, top_k=2), d_model=16, n_layers=1,
                       n_heads=2, d_dense=16, max_seq_len=32, vocab_size=320, tokenizer=str(tmp_path / "tok"))
    cfg = TrainConfig(data=(str(data),), batch_size=2, seq_len=16, eval_batches=2)
    corpus, by_bytes = corpus_for(mcfg, cfg), build_corpus([str(data)])
    tok = HFTokenizer(tmp_path / "tok")
    for split in ("train", "val"):
        ids, raw = getattr(corpus, split)["code"], getattr(by_bytes, split)["code"]
        assert int(ids.max()) < 320 and len(ids) < len(raw)  # BPE merges
        assert tok.decode(ids) == bytes(raw[raw < 256].to(torch.uint8).tolist()).decode()
    torch.manual_seed(0)
    model = MoELM(mcfg).eval()
    ev = evaluate(model, corpus, cfg)
    nats = n_bytes = 0.0
    with torch.no_grad():
        for b in corpus.val_batches("code", 2, 16, 2):
            k = float(b.valid_BS.sum())
            nats += float(lm_loss(logits_BSV=model(b.idx_BS, valid_BS=b.valid_BS).logits_BSV,
                                  targets_BS=b.targets_BS, valid_BS=b.valid_BS)) * k
            n_bytes += float(tok.byte_lengths(320)[b.targets_BS[b.valid_BS]].sum())
    assert ev["val_bpb"]["code"] == pytest.approx(nats / n_bytes / math.log(2), rel=1e-5)
