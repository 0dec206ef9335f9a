"""keel's DSA-MoE model against transformers' DeepseekV32ForCausalLM, Keep Routing, indexer losses, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

from kernels import topk_indices
from rl.algo.logprobs import apply_sampling_mask, token_logprobs
from rl.model.checkpoint import CheckpointError, build_model, load_config, load_model, save_checkpoint
from rl.model.presets import preset
from rl.model.transformer import Indexer, Transformer


def oracle_config(**overrides) -> DeepseekV32Config:
    """The tiny preset with a small index_topk so 40-token sequences use the sparse path."""
    fields = preset("tiny", index_topk=8, initializer_range=0.15)
    fields.update(overrides)
    return DeepseekV32Config(**fields)


def randomized_model(config: DeepseekV32Config, seed: int = 0) -> Transformer:
    """Random weights big enough that routing, top-k and norms all matter."""
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                bias = module.e_score_correction_bias
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def keel_and_hf(tmp_path_factory):
    config = oracle_config()
    model = randomized_model(config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, path)
    hf = DeepseekV32ForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    return model, hf, path


@pytest.mark.parametrize("seqlen", [8, 40])
def test_logits_match_transformers(keel_and_hf, seqlen):
    model, hf, _ = keel_and_hf
    assert seqlen <= model.config.index_topk or seqlen >= 4 * model.config.index_topk
    ids = torch.randint(3, 54, (2, seqlen), generator=torch.Generator().manual_seed(seqlen))
    with torch.no_grad():
        ours = model.logits(model(ids).hidden)
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert theirs.abs().max().item() > 0.1  # not a trivially small comparison


def test_sparse_path_changes_logits_and_topk_sets_agree(keel_and_hf):
    model, hf, _ = keel_and_hf
    k = model.config.index_topk
    ids = torch.randint(3, 54, (1, 40), generator=torch.Generator().manual_seed(7))
    hf_selected, ours_scores = [], []
    hooks = [
        layer.self_attn.indexer.register_forward_hook(lambda m, a, out: hf_selected.append(out.long()))
        for layer in hf.model.layers
    ]
    hooks += [
        mod.register_forward_hook(lambda m, a, out: ours_scores.append(out))
        for mod in model.modules() if isinstance(mod, Indexer)
    ]
    with torch.no_grad():
        sparse = model.logits(model(ids, sparse=True).hidden)
        hf(ids)
        dense = model.logits(model(ids, sparse=False).hidden)
    for h in hooks:
        h.remove()
    assert (sparse - dense).abs().max().item() > 1e-3, "the sparse path must matter at 5x index_topk"
    assert len(hf_selected) == len(ours_scores) == model.config.num_hidden_layers
    for theirs, scores in zip(hf_selected, ours_scores, strict=True):
        ours = topk_indices(scores, k)
        for t in range(k, 40):  # rows with more than k candidates: the selection is a real choice
            # Tie-aware: the selected multisets of scores must be equal.
            a = scores[0, t, ours[0, t]].sort().values
            b = scores[0, t, theirs[0, t]].sort().values
            torch.testing.assert_close(a, b)
            assert len(set(ours[0, t].tolist()) ^ set(theirs[0, t].tolist())) <= 2 * int((a == 0).sum())
        # Rows with <= k visible tokens select exactly the causal prefix.
        for t in range(k):
            assert sorted(i for i in ours[0, t].tolist() if i >= 0) == list(range(t + 1))


def test_routing_replay():
    model = randomized_model(oracle_config())
    ids = torch.randint(3, 54, (2, 12), generator=torch.Generator().manual_seed(1))
    free = model(ids, return_routing=True)
    assert free.routing.shape == (2, 12, model.moe_layers, model.config.num_experts_per_tok)
    replay = model(ids, routing=free.routing, return_routing=True)
    assert torch.equal(replay.hidden, free.hidden)
    assert torch.equal(replay.routing, free.routing)
    # Force other experts: the output must change.
    other = (free.routing + 1) % model.config.n_routed_experts
    changed = model(ids, routing=other)
    assert (changed.hidden - free.hidden).abs().max().item() > 1e-4
    # Under replay the router still gets gradient (gate weights at the forced experts).
    model.zero_grad()
    model.logits(model(ids, routing=free.routing).hidden).logsumexp(-1).sum().backward()
    gate = model.model.layers[1].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum().item() > 0


def test_indexer_loss_gradients_reach_only_the_indexer():
    model = randomized_model(oracle_config())
    model.train()
    ids = torch.randint(3, 54, (2, 40), generator=torch.Generator().manual_seed(2))
    out = model(ids, indexer_loss=True, sparse=True)
    assert out.indexer_loss is not None and out.indexer_loss.item() > 0
    out.indexer_loss.backward()
    for name, p in model.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum().item() > 0
        if ".indexer." in name and "k_norm.bias" not in name:
            assert touched, f"indexer parameter {name} got no gradient from its KL loss"
        if ".indexer." not in name:
            assert not touched, f"{name} got gradient from the indexer loss"
    # And the LM loss never reaches the indexer.
    model.zero_grad()
    out = model(ids, sparse=True)
    model.logits(out.hidden).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:
            assert p.grad is None or p.grad.abs().sum().item() == 0, name


def test_indexer_loss_is_zero_when_indexer_matches_target():
    from kernels import indexer_kl_loss

    torch.manual_seed(0)
    q, kv = torch.randn(1, 6, 3, 8, dtype=torch.float64), torch.randn(1, 6, 8, dtype=torch.float64)
    scale = 0.5
    probs = (torch.einsum("bthd,bsd->bths", q, kv) * scale).masked_fill(
        ~torch.ones(6, 6, dtype=torch.bool).tril()[None, :, None, :], float("-inf")
    ).softmax(-1)
    target = probs.sum(2) / probs.sum(2).sum(-1, keepdim=True)
    perfect = target.log()  # softmax(log p) = p; -inf above the diagonal
    assert indexer_kl_loss(q, kv, scale, perfect, None).abs().item() < 1e-6  # fp32 inside
    assert indexer_kl_loss(q, kv, scale, torch.zeros_like(perfect).masked_fill(perfect == float("-inf"),
                                                                               float("-inf")), None).item() > 1e-3


def test_dense_warmup_lowers_indexer_kl():
    torch.manual_seed(0)
    model = randomized_model(oracle_config())
    opt = torch.optim.Adam(model.indexer_parameters(), lr=3e-3)
    ids = torch.randint(3, 54, (4, 24), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(200):
        loss = model(ids, sparse=False, indexer_loss=True).indexer_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])


def test_token_logprobs_chunked_with_sampling_mask():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 16, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 5))
    kept = torch.full((3, 5, 4), -1)
    kept[0, :, 0] = targets[0]
    kept[0, :, 1:3] = torch.tensor([5, 6])  # the last slot stays -1: padding must not keep token 0
    logp, ent = token_logprobs(hidden, weight, targets, kept, temperature=0.7, chunk_size=4)
    logits = (hidden @ weight.T) / 0.7
    full = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    # Untruncated rows equal the plain log-softmax.
    torch.testing.assert_close(logp[1:], full[1:])
    # Truncated row: renormalised over the kept set {target, 0, 1, 2}.
    for t in range(5):
        ids = sorted({targets[0, t].item(), 5, 6})
        expected = logits[0, t, targets[0, t]] - logits[0, t, ids].logsumexp(-1)
        torch.testing.assert_close(logp[0, t], expected)
    assert (ent[0] <= torch.log(torch.tensor(3.0, dtype=torch.float64)) + 1e-9).all()
    logp.sum().backward()
    grad_chunked = hidden.grad.clone()
    hidden.grad = None
    ref = apply_sampling_mask(logits.reshape(-1, 11), kept.reshape(-1, 4)).log_softmax(-1)
    ref.gather(1, targets.reshape(-1, 1)).sum().backward()
    torch.testing.assert_close(grad_chunked, hidden.grad)


def test_checkpoint_roundtrip_and_sharding(tmp_path):
    model = randomized_model(oracle_config())
    save_checkpoint(model, tmp_path / "a", max_shard_size="200KB")
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    loaded = load_model(tmp_path / "a")
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b), n1
    # Overwriting is atomic: the directory always holds a whole checkpoint.
    save_checkpoint(loaded, tmp_path / "a")
    assert load_config(tmp_path / "a").hidden_size == model.config.hidden_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fp8_block_checkpoint_dequantizes(tmp_path):
    from safetensors.torch import save_file

    from rl.model.checkpoint import dequantize_fp8_blocks

    def quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
        scale = torch.zeros(rows, cols)
        q = torch.zeros_like(w, dtype=torch.float8_e4m3fn)
        for i in range(rows):
            for j in range(cols):
                tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
                scale[i, j] = w[tile].abs().max() / 448.0
                q[tile] = (w[tile] / scale[i, j]).to(torch.float8_e4m3fn)
        return q, scale

    w = torch.randn(300, 200)
    q, scale = quantize(w)
    deq = dequantize_fp8_blocks(q, scale, (128, 128))
    assert ((deq - w).abs() <= 0.07 * w.abs() + 1e-3).all()
    # And through a checkpoint directory, as a released DeepSeek-V3.2 stores it.
    model = randomized_model(oracle_config())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "model.layers.0.self_attn.q_b_proj.weight"
    wq = state[name]
    state[name], state[name + "_scale_inv"] = quantize(wq)
    state["model.layers.61.eh_proj.weight"] = torch.zeros(2, 2)  # MTP layer: ignored
    save_file(state, tmp_path / "model.safetensors")
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path)
    got = loaded.state_dict()[name]
    assert ((got - wq).abs() <= 0.07 * wq.abs() + 1e-3).all() and not torch.equal(got, wq)


def test_config_errors_name_the_field(tmp_path):
    model = randomized_model(oracle_config())
    save_checkpoint(model, tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())

    bad = dict(cfg)
    del bad["hidden_size"]
    (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_config(tmp_path / "ok")

    bad = dict(cfg, n_group=3)
    (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="n_group"):
        load_config(tmp_path / "ok")

    (tmp_path / "ok" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(tmp_path / "ok")

    # Tensors that do not fit the config: the error names the tensor and both shapes.
    (tmp_path / "ok" / "config.json").write_text(json.dumps(dict(cfg, moe_intermediate_size=48)))
    with pytest.raises(CheckpointError, match=r"experts\.0\.down_proj\.weight has shape \(64, 32\).*\(64, 48\)"):
        load_model(tmp_path / "ok")

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path / "missing")


def test_full_preset_parameter_count():
    with torch.device("meta"):
        model = Transformer(DeepseekV32Config(**preset("full")))
    total = sum(p.numel() for p in model.parameters())
    indexer = sum(p.numel() for p in model.indexer_parameters())
    assert 670e9 < total - indexer < 672e9  # DeepSeek-V3's 671B (without the MTP module)
    assert 0.8e9 < indexer < 0.9e9  # 61 layers x (wq_b 1536x8192 + wk + k_norm + weights_proj)
