"""The trainer rank on a real DeepSpeed engine (gloo, fp32, ZeRO-1), without Ray: GRPO steps on batches
sampled from its own weights, NaN skipping, and the weights it hands to the rollout workers.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV32Config

from rl.algo.batch import make_rollout_batch, rollout_schema, with_columns
from rl.algo.config import GRPOConfig
from rl.model.checkpoint import build_model, save_checkpoint
from rl.model.presets import preset
from trainer.config import TrainerConfig

pytestmark = pytest.mark.slow

GRPO = GRPOConfig(
    lr=1e-3, weight_decay=0.0, grad_clip=1.0, mini_batch_size=4, epochs=1, clip_eps_low=0.2, clip_eps_high=0.2,
    normalize_std=False, kl_estimator="unbiased", kl_coef=0.01, offpolicy_delta=0.5, keep_routing=True,
    keep_sampling_mask=True, train_indexer=True, indexer_lr=1e-3, indexer_loss_coef=1.0, logprob_chunk=1024,
)
TRAINER = TrainerConfig(num_ranks=1, zero_stage=1, dtype="float32", cpus_per_rank=1.0, gpus_per_rank=0.0)


def sampled_batch(model, n: int, advantages: list[float]):
    """Rows as a rollout worker returns them: top-4 sampling from `model`, its log-probs, masks, routing."""
    gen = torch.Generator().manual_seed(n)
    rows = []
    for i in range(n):
        prompt = [1] + torch.randint(3, 54, (4,), generator=gen).tolist()
        seq, kept_sets, logps = list(prompt), [], []
        with torch.no_grad():
            for _ in range(4):
                top = model.logits(model(torch.tensor([seq])).hidden)[0, -1].topk(4)
                probs = top.values.softmax(-1)
                j = torch.multinomial(probs, 1, generator=gen).item()
                seq.append(top.indices[j].item())
                kept_sets.append(sorted(top.indices.tolist()))
                logps.append(probs[j].log().item())
            routing = model(torch.tensor([seq[:-1]]), return_routing=True).routing[0].sort(-1).values
        rows.append(dict(prompt_index=i // 2, sample_index=i % 2, prompt_ids=prompt, response_ids=seq[len(prompt):],
                         rollout_logprobs=logps, sampling_mask=kept_sets, routed_experts=routing.numpy(),
                         loss_mask=None, finish_reason="length", policy_version=0))
    c = model.config
    batch = make_rollout_batch(rows, rollout_schema(model.moe_layers, c.num_experts_per_tok, c.n_routed_experts))
    return with_columns(batch, advantage=advantages)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from trainer.worker import TrainerWorker

    model = build_model(DeepseekV32Config(**preset("tiny", initializer_range=0.1)), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "init"
    save_checkpoint(model, path)
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    w = TrainerWorker(0, 1, "127.0.0.1", port, str(path), str(path), dataclasses.replace(GRPO), TRAINER, lr=1e-3,
                      seed=0, temperature=1.0)
    return w, model.eval()


def test_grpo_step_on_own_samples(worker):
    w, model = worker
    batch = sampled_batch(model, 8, [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5])
    before = {k: v.clone() for k, v in w.state_dict().items()}
    w.grpo.mini_batch_size = 8  # one optimiser step: the loss is taken at the sampling weights
    try:
        m = w.grpo_step(batch)
    finally:
        w.grpo.mini_batch_size = GRPO.mini_batch_size
    assert m["routing_agreement"] == 1.0  # the trainer reproduces the sampler's routing exactly
    assert m["logp_mismatch_first"] < 1e-5  # and its kept-set renormalised log-probs
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert m["ratio_max"] == pytest.approx(1.0, abs=1e-4) and m["clip_frac"] == 0.0
    assert m["skipped_minibatches"] == 0 and m["indexer_kl"] > 0
    after = w.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert any("mlp.gate.weight" in k for k in changed)  # the router trains under Keep Routing
    assert any(".indexer." in k for k in changed)  # the indexer trains on its KL


def test_rank0_publishes_its_weights_and_releases_the_previous_version(worker):
    """What trainer rank 0 hands the rollout client: a handle on a file holding exactly its weights; publishing
    the next version deletes the previous file (the engines loaded it already)."""
    from safetensors.torch import load_file

    from rollout import weight_sync

    w, _ = worker
    first = w.publish_weights(1, file=True, blob=False)
    assert first.version == 1 and first.blob is None and first.node is None  # no Ray here
    back, state = load_file(first.path), w.state_dict()
    assert first.shapes == {k: tuple(v.shape) for k, v in state.items()}
    assert all(torch.equal(back[k], v) for k, v in state.items())
    second = w.publish_weights(2)
    assert not Path(first.path).exists() and Path(second.path).exists()
    weight_sync.release_weights(second)
    w.published = None


def test_nccl_weight_sync_is_refused_without_cuda(worker):
    """On CUDA rank 0 broadcasts over NCCL (`open_weight_sync`, `send_weights`); on CPU both refuse clearly."""
    w, _ = worker
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        w.open_weight_sync(None, 2, "bfloat16", 1)
    assert w.sender is None
    with pytest.raises(RuntimeError, match="before open_weight_sync"):
        w.send_weights(1)


def test_nan_loss_skips_the_step(worker):
    w, model = worker
    batch = sampled_batch(model, 8, [float("nan")] * 4 + [1.0, -1.0, 1.0, -1.0])
    before = {k: v.clone() for k, v in w.state_dict().items()}
    m = w.grpo_step(batch)
    assert m["skipped_minibatches"] == 1, m  # the first mini-batch of 4 has NaN advantages
    after = w.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the finite mini-batch still trained


def test_packed_sft_step_reports_the_padded_loss(worker):
    """sft_step with segment_ids (packed rows) trains on the same loss as on right-padded rows. lr=0: the
    backbone does not move between the two calls (AdamW's update and decay both scale with lr). The indexer's
    own param group keeps its lr and the momentum of the GRPO steps before, but these rows are shorter than
    index_topk, so it is not in the forward."""
    from rl.loop.data import pack_sft_sequences, pad_sft_sequences

    w, _ = worker
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(3, 54, (n,), generator=gen).tolist() for n in (9, 14, 6, 11, 7)]
    masks = [[0] * 3 + [1] * (len(s) - 3) for s in seqs]
    before = {k: v.clone() for k, v in w.state_dict().items()}
    padded = w.sft_step(*pad_sft_sequences(seqs, masks), lr=0.0)
    *tensors, segment_ids = pack_sft_sequences(seqs, masks, max_len=24)
    assert tensors[0].shape[0] < len(seqs)
    packed = w.sft_step(*tensors, lr=0.0, segment_ids=segment_ids)
    assert all(torch.equal(v, before[k]) for k, v in w.state_dict().items() if ".indexer." not in k)
    assert packed["skipped"] == padded["skipped"] == 0.0
    assert packed["sft_loss"] == pytest.approx(padded["sft_loss"], rel=1e-5)
