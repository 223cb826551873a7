"""Real offloaded generation: same tokens as the in-memory model, the simulator's replay counts the same hits and
misses as the store on the same routing, experts never materialised beyond the cache, the CLI."""
import argparse
import inspect

import pytest
import torch
from safetensors.torch import save_file

from moelab.checkpoint import save_checkpoint
from moelab.cli_offload import register
from moelab.model import BOS_ID, MoELM, generate
from moelab.offload import Requests, build_requests, replay
from moelab.offload_policies import EVICTIONS
from moelab.offload_store import (
    ExpertStore,
    OffloadedExperts,
    experts_unallocated,
    load_offloaded,
    memory_now,
    offload_model,
    parse_cache_experts,
    parse_offload_policy,
)
from moelab.resolver import resolve

E, K, L = 16, 4, 2
PROMPT = torch.tensor([BOS_ID] + list(b"int main"))


def _cfg():
    return resolve("olmoe-like", None, {"model.d_model": 32, "moe.d_expert": 16, "moe.n_experts": E,
                                        "moe.top_k": K, "model.n_layers": L, "model.n_heads": 2}).model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    m = MoELM(_cfg()).eval()
    with torch.no_grad():  # sharper routers than the init's, so cached experts get reused and evicted
        for blk in m.blocks:
            blk.ffn.gate.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("off") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return m, path


def _offloaded(path, capacity, policy):
    with experts_unallocated():
        m = MoELM(_cfg())
    return m.eval(), offload_model(m, path, capacity=capacity, policy=policy)


def _gen(m, n=16, **kw):
    return generate(m, PROMPT, max_new_tokens=n, **kw)


@pytest.mark.parametrize("policy", ["lru", "lfu", "least_stale", "fifo", "prefetch"])
@pytest.mark.parametrize("capacity", [0, K, 2 * K, E])
def test_offloaded_generation_equals_in_memory(model_file, policy, capacity):
    ref_model, path = model_file
    m, store = _offloaded(path, capacity, policy)
    try:
        assert torch.equal(_gen(m, temperature=0), _gen(ref_model, temperature=0))
    finally:
        store.close()
    assert store.stats.peak_resident <= capacity * L  # never more materialised than the cache holds


def test_sampled_generation_equals_in_memory(model_file):
    ref_model, path = model_file
    m, _store = _offloaded(path, K, "lru")
    a = _gen(m, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    b = _gen(ref_model, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _record_requests(model, n):
    """Generate with the in-memory model, recording each MoE layer call's expert set (one request each)."""
    reqs, routing = [], []
    hooks = []
    for blk in model.blocks:
        def hook(mod, args, reqs=reqs, routing=routing):
            idx_TK = args[1]
            reqs.append(sorted({int(e) for e in idx_TK.reshape(-1).tolist() if 0 <= e < E}))
            routing.append(idx_TK.clone())
        hooks.append(blk.ffn.experts.register_forward_pre_hook(hook))
    try:
        out = _gen(model, n, temperature=0)
    finally:
        for h in hooks:
            h.remove()
    return out, reqs, routing


@pytest.mark.parametrize("policy", ["lru", "lfu", "least-stale", "fifo"])
@pytest.mark.parametrize("capacity", [K, K + 2, 2 * K])
def test_simulator_counts_equal_real_offloaded_generation(model_file, policy, capacity):
    ref_model, path = model_file
    out, reqs, _ = _record_requests(ref_model, 24)
    sim = replay(Requests.from_lists([[(i % L) * E + e for e in r] for i, r in enumerate(reqs)], E, L),
                 capacity, EVICTIONS[policy]())
    m, store = _offloaded(path, capacity, policy)
    assert torch.equal(_gen(m, 24, temperature=0), out)
    assert store.stats.hit_Q == sim.hit_Q.tolist()
    assert store.stats.miss_Q == sim.miss_Q.tolist()
    if policy == "lru":
        assert 0 < sum(store.stats.hit_Q) and 0 < sum(store.stats.miss_Q)  # the test exercises both


@pytest.mark.skipif("use_cache" not in inspect.signature(generate).parameters, reason="generate has no KV cache")
def test_lru_hits_equal_simulator_on_the_generated_trace(model_file):
    """With a KV cache the calls are one prefill of the prompt then one token each: exactly the simulator's decode
    order (moelab.offload.build_requests with prompt_len = the prompt)."""
    ref_model, path = model_file
    out, _, routing = _record_requests(ref_model, 24)
    idx_LNK = torch.stack([torch.cat(routing[l::L]) for l in range(L)]).numpy()
    N = idx_LNK.shape[1]
    assert N == PROMPT.numel() + 24 - 1  # the last token is never fed back
    import numpy as np
    reqs = build_requests(idx_LNK, np.zeros(N, np.int64), np.arange(N), E, PROMPT.numel())
    sim = replay(reqs, 2 * K, EVICTIONS["lru"]())
    m, store = _offloaded(path, 2 * K, "lru")
    assert torch.equal(_gen(m, 24, temperature=0), out)
    assert store.stats.hit_Q == sim.hit_Q.tolist()
    assert store.stats.tokens_Q[:L] == [PROMPT.numel()] * L and set(store.stats.tokens_Q[L:]) == {1}


def test_prefetch_loads_the_next_layers_pregate_picks(model_file):
    ref_model, path = model_file
    m, store = _offloaded(path, E, "prefetch")
    captured = []
    h = m.blocks[0].ffn.experts.register_forward_pre_hook(lambda mod, args: captured.append(args[0].clone()))
    try:
        _gen(m, 1, temperature=0)
    finally:
        h.remove()
        store.close()
    # layer 0's call prefetched into layer 1 exactly the top-k of layer 1's gate over layer 0's tokens
    x_TD = captured[0]
    want = set((x_TD @ m.blocks[1].ffn.gate.weight.T).topk(K, dim=-1).indices.reshape(-1).tolist())
    assert store.stats.prefetch_Q[0] == len(want)
    assert store.stats.prefetch_used == len(want & set(torch.nonzero(
        torch.bincount(ref_model(PROMPT[None]).moe[1].routing.expert_idx_TK.reshape(-1), minlength=E)
    ).flatten().tolist()))


def test_experts_never_materialised(model_file):
    _, path = model_file
    with experts_unallocated():
        m = MoELM(_cfg())
    assert all((p.numel() == 0) == ("experts" in n) for n, p in m.named_parameters())
    store = offload_model(m, path, capacity=K, policy="lru")
    assert all(p.numel() for p in m.parameters())
    assert not any("experts.weights" in n for n, _ in m.named_parameters())
    w = m.blocks[0].ffn.experts.weights
    assert isinstance(w, OffloadedExperts) and not w.resident
    with pytest.raises(ValueError, match="one by one"):
        w.stacked()
    one = 3 * 32 * 16 * 4  # (D*2F + F*D) fp32
    assert store.expert_bytes == one
    assert store.resident_experts == 0
    t = store.sources[1].read(5)  # a copy of just that expert (not a view of the whole mapped tensor)
    assert sum(x.untyped_storage().nbytes() for x in t if x is not None) == one
    from safetensors.torch import load_file
    sd = load_file(str(path))
    assert torch.equal(t.w_up, sd["blocks.1.ffn.experts.weights.w_up_EDG"][5])
    assert torch.equal(t.w_down, sd["blocks.1.ffn.experts.weights.w_down_EFD"][5])


def test_load_offloaded_from_a_run(model_file, tmp_path):
    ref_model, _ = model_file
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.0)
    save_checkpoint(tmp_path, 1, model=ref_model, opt=opt, extra={},
                    meta={"model_config": ref_model.cfg.to_dict()}, keep_last=1)
    m, store = load_offloaded(tmp_path, capacity="1x", policy="lfu")
    assert store.capacity == K
    assert torch.equal(_gen(m, 8, temperature=0), _gen(ref_model, 8, temperature=0))


def test_parsing_and_errors(model_file, tmp_path):
    assert parse_offload_policy("prefetch") == ("lru", "pregate")
    assert parse_offload_policy("least_stale") == ("least-stale", None)
    assert parse_offload_policy("lfu+pregate") == ("lfu", "pregate")
    for bad in ("belady", "static", "lru+affinity", "mru"):
        with pytest.raises(ValueError, match="--policy"):
            parse_offload_policy(bad)
    assert parse_cache_experts("16", 4, 1000, 8) == 16
    assert parse_cache_experts("2x", 4, 1000, 8) == 16
    assert parse_cache_experts("64KB", 4, 1000, 8) == 16  # 64000 B / 1000 B / 4 layers
    with pytest.raises(ValueError, match="--cache-experts"):
        parse_cache_experts("lots", 4, 1000, 8)
    with pytest.raises(ValueError, match="--cache-experts"):
        ExpertStore([], -1)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with experts_unallocated():
        m = MoELM(_cfg())
    with pytest.raises(ValueError, match="lacks"):
        offload_model(m, other, capacity=K)


def test_memory_now_reads_anonymous_memory():
    mem = memory_now()
    if not mem:
        pytest.skip("no /proc/self/smaps_rollup")
    before = memory_now()["anonymous"]
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    grown = memory_now()["anonymous"] - before
    assert grown >= 60 << 20
    del x


def test_cli_generate(model_file, tmp_path, capsys):
    ref_model, _ = model_file
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.0)
    save_checkpoint(tmp_path, 1, model=ref_model, opt=opt, extra={},
                    meta={"model_config": ref_model.cfg.to_dict()}, keep_last=1)
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["offload", "generate", str(tmp_path), "--prompt", "int main", "--max-new-tokens", "6",
                         "--temperature", "0", "--cache-experts", "8", "--policy", "prefetch"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    want = bytes(_gen(ref_model, 6, temperature=0).tolist()).decode("utf-8", errors="replace")
    assert out == "int main" + want + "\n"
    assert "tokens/s" in err and "hit rate" in err and "8/layer" in err
    args = p.parse_args(["offload", "generate"])
    with pytest.raises(ValueError, match="--hf"):
        args.func(args)
    args = p.parse_args(["offload", "generate", str(tmp_path), "--policy", "belady"])
    with pytest.raises(ValueError, match="--policy"):
        args.func(args)


@pytest.mark.parametrize("family,disk", [("olmoe", "per_expert"), ("qwen3_moe", "per_expert"), ("olmoe", "fused")])
def test_hf_offloaded_generation_equals_eager(family, disk, tmp_path):
    """Experts read from transformers' on-disk layout (one tensor per expert) or fused 3-D as the module holds them."""
    pytest.importorskip("transformers")
    pytest.importorskip("moelab.hf_backend")
    from transformers import AutoModelForCausalLM

    from moelab.hf import moe_blocks
    from moelab.hf_offload import offload_hf
    from tests.test_hf_trace import tiny_model
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in moe_blocks(model):
            for p in getattr(b.module, b.adapter.experts).parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, 50, (1, 6), generator=g)
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    off = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    folder = tmp_path
    if disk == "fused":
        folder = tmp_path / "fused"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if ".experts." in k},
                  str(folder / "model.safetensors"))
    store = offload_hf(off, folder, capacity=3, policy="lru")
    experts = [getattr(b.module, b.adapter.experts) for b in moe_blocks(off)]
    assert all(p.numel() == 0 for m in experts for p in m.parameters(recurse=False) if p.dim() == 3)
    reqs = []
    hooks = [m.__dict__["_moelab_routed_experts"].register_forward_pre_hook(
        lambda mod, args: reqs.append(sorted({int(e) for e in args[1].reshape(-1).tolist() if e >= 0})))
        for m in experts]
    out = off.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    for h in hooks:
        h.remove()
    assert torch.equal(out, ref)
    L_, E_ = len(experts), store.E
    sim = replay(Requests.from_lists([[(i % L_) * E_ + e for e in r] for i, r in enumerate(reqs)], E_, L_), 3,
                 EVICTIONS["lru"]())
    assert store.stats.hit_Q == sim.hit_Q.tolist() and sum(store.stats.hit_Q) > 0
    assert set(store.stats.tokens_Q[L_:]) == {1}  # transformers' KV cache: one token per decode call


def test_moelab_generate_offload_flag(model_file, tmp_path, capsys):
    """`moelab generate RUN --offload --cache-experts N --policy P`: the same text as without --offload."""
    from moelab.cli_run import register as register_run
    ref_model, _ = model_file
    save_checkpoint(tmp_path, 1, model=ref_model, opt=torch.optim.SGD(ref_model.parameters(), lr=0.0), extra={},
                    meta={"model_config": ref_model.cfg.to_dict()}, keep_last=1)
    p = argparse.ArgumentParser()
    register_run(p.add_subparsers(dest="cmd"))
    base = ["generate", str(tmp_path), "--prompt", "int", "--max-new-tokens", "5", "--temperature", "0"]
    texts = []
    for extra in ([], ["--offload", "--cache-experts", "4", "--policy", "lfu"]):
        args = p.parse_args(base + extra)
        assert args.func(args) == 0
        out, err = capsys.readouterr()
        texts.append(out)
        assert ("hit rate" in err) == bool(extra)
    assert texts[0] == texts[1]
