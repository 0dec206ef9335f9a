"""ZeRO-3 in the trainer on a real DeepSpeed engine: two gloo ranks on CPU (fp32), the tiny model, no Ray.

On the same batch ZeRO-3's loss, gradients (every backbone parameter's, averaged over the ranks; the norm of the
indexer's) and updated weights equal ZeRO-1's; a ZeRO-3 run resumed from its
checkpoint continues with the very same steps; its consolidated checkpoint loads in keel's loader and in
transformers. The ranks run once per stage (the `runs` fixture); each test checks one thing of what they wrote.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_trainer import GRPO, TRAINER, sampled_batch  # tests/ is on sys.path (pytest's rootdir-relative import)
from test_trainer_optim import ADVANTAGES, LR, _initial_checkpoint, _split, spawn_ranks
from transformers import DeepseekV32Config

from rl.model.checkpoint import build_model, load_model
from rl.model.presets import preset
from trainer import sharding

pytestmark = pytest.mark.slow

WORLD = 2


def _batches() -> list:
    sampler = build_model(DeepseekV32Config(**preset("tiny", initializer_range=0.1)), seed=0).eval()
    return [sampled_batch(sampler, 8, ADVANTAGES[i:] + ADVANTAGES[:i]) for i in range(3)]


def _capture_grads(w) -> dict:
    """Record every engine-owned parameter's whole averaged gradient where each stage holds it once reduced:
    ZeRO-1/2 before the step (`get_full_hp_grad`), ZeRO-3 when its step takes the gradient norm (its averaged
    partitions, gathered here). Each step records into the returned dict."""
    import torch.distributed as dist

    grads: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in w.model.named_parameters()}
    opt = w.optimizer

    def record_zero3():
        for i, group in enumerate(opt.fp16_groups):
            for p, part in zip(group, opt.averaged_gradients[i], strict=True):
                pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
                dist.all_gather(pieces, part.contiguous())
                grads[names[id(p)]] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape).clone()

    def record_zero1():
        for name, p in w.model.named_parameters():
            if p.requires_grad and ".indexer." not in name:
                grads[name] = p.get_full_hp_grad().detach().clone()

    hooked, method, record = (opt, "_get_norm_groups", record_zero3) if w.zero3 else (w.engine, "step", record_zero1)
    real = getattr(hooked, method)

    def wrapped(*args, **kwargs):
        record()
        return real(*args, **kwargs)

    setattr(hooked, method, wrapped)
    return grads


def _rank_main(rank: int, port: int, checkpoint: str, zero_stage: int, out: str) -> None:
    """Step on batch 0; under ZeRO-3 then save, steps on batches 1 and 2, load the save and
    the steps on batches 1 and 2 again. Every rank writes what it saw; rank 0 also the consolidated weights."""
    from trainer.worker import TrainerWorker

    torch.set_num_threads(1)
    trainer = dataclasses.replace(TRAINER, num_ranks=WORLD, zero_stage=zero_stage)
    grpo = dataclasses.replace(GRPO, mini_batch_size=8)  # each rank's shard is one mini-batch: one update a step
    w = TrainerWorker(rank, WORLD, "127.0.0.1", port, checkpoint, checkpoint, grpo, trainer, lr=LR, seed=0)
    per = 8 // WORLD
    shards = [b.slice(rank * per, per) for b in _batches()]
    grads = _capture_grads(w)
    first = w.grpo_step(shards[0])
    grads = dict(grads)  # the first step's (later steps record theirs into the captured dict)
    after_first = w.state_dict()
    local = {n: (p.ds_tensor if hasattr(p, "ds_id") else p).numel() for n, p in w.model.named_parameters()}
    if zero_stage != 3:  # the reference for the first step only
        torch.save({"first": first, "grads": grads, "after_first": after_first}, f"{out}/rank{rank}.pt")
        return w.shutdown()
    w.save(f"{out}/ckpt")
    handle = w.publish_weights(1)  # every rank gathers, rank 0 writes the file bucket by bucket
    published = None
    if handle is not None:
        from safetensors.torch import load_file

        published = {"tensors": load_file(handle.path), "shapes": handle.shapes}
    # CUDA weight sync's stream, without the NCCL broadcast: rank 0 iterates what vLLM's sender would send while the
    # other rank gathers along; 4 KB buckets, so the tiny model takes many gathers.
    streamed = None
    if rank == 0:
        stream = sharding.weight_stream(w.model, torch.bfloat16, 4096)
        streamed = {"shapes": stream.shapes(), "tensors": {n: t.clone() for n, t in stream}}
    else:
        sharding.follow_weight_stream(w.model, 4096)
    went_on = [(w.grpo_step(shards[1]), w.state_dict()), (w.grpo_step(shards[2]), w.state_dict())]
    w.load_optimizer(f"{out}/ckpt")
    resumed = [(w.grpo_step(shards[1]), w.state_dict()), (w.grpo_step(shards[2]), w.state_dict())]
    torch.save({"first": first, "grads": grads, "after_first": after_first, "went_on": went_on,
                "resumed": resumed, "local_numel": local,
                "published": published, "streamed": streamed}, f"{out}/rank{rank}.pt")
    w.shutdown()


def _run(checkpoint: Path, zero_stage: int, out: Path) -> list[dict]:
    out.mkdir()
    return spawn_ranks(_rank_main, WORLD, (str(checkpoint), zero_stage, str(out)), out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zero3")
    checkpoint = _initial_checkpoint(root / "init")
    return {"root": root, 1: _run(checkpoint, 1, root / "z1"), 3: _run(checkpoint, 3, root / "z3")}


def test_zero3_shards_every_parameter(runs):
    """Each rank holds half of every parameter (rounded up: ZeRO-3 pads each to a multiple of the ranks), the
    indexer's included (its own optimiser keeps whole fp32 masters beside: trainer.indexer_optim)."""
    (r0, r1), whole = runs[3], runs[3][0]["after_first"]
    for name, n in r0["local_numel"].items():
        assert n == r1["local_numel"][name] == -(-whole[name].numel() // WORLD), name


def test_zero3_weight_stream_gathers_each_bucket(runs):
    """The stream the CUDA weight sync sends (trainer.sharding.weight_stream) under ZeRO-3, rank 0 sending while
    rank 1 gathers along: every tensor whole, in the announced names, order and shapes, cast to the wire dtype."""
    r0 = runs[3][0]
    streamed, whole = r0["streamed"], r0["after_first"]  # no update between the two
    assert [n for n, _ in streamed["shapes"]] == list(streamed["tensors"]) == list(whole)
    for name, shape in streamed["shapes"]:
        assert tuple(whole[name].shape) == shape, name
        assert torch.equal(streamed["tensors"][name], whole[name].to(torch.bfloat16)), name


def test_zero3_step_equals_zero1(runs):
    z1, z3 = runs[1][0], runs[3][0]
    for k in ("loss", "grad_norm", "indexer_grad_norm", "indexer_kl"):
        assert z3["first"][k] == pytest.approx(z1["first"][k], rel=1e-5, abs=1e-7), k
    assert z1["first"]["grad_norm"] > GRPO.grad_clip  # a real gradient (and the clip acts in both)
    assert z3["grads"].keys() == z1["grads"].keys() and len(z1["grads"]) > 40  # every backbone parameter
    for name, g in z1["grads"].items():
        torch.testing.assert_close(z3["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
    norm = torch.cat([g.flatten() for g in z3["grads"].values()]).norm().item()
    assert norm == pytest.approx(z1["first"]["grad_norm"], rel=1e-4)  # the averaged gradient, not one rank's
    # AdamW's first step moves each weight by ~lr * sign(g): an element whose gradient is ~eps may differ by a
    # fraction of lr after the rounding of the two reductions (as in test_trainer_optim's ZeRO-1/2 comparison).
    for name, v in z1["after_first"].items():
        torch.testing.assert_close(z3["after_first"][name], v, rtol=1e-5, atol=1e-5, msg=name)


def test_zero3_resumes_exactly(runs):
    """From the save after step 1, the next two steps are the ones the run took without stopping, bit for bit."""
    for rank in runs[3]:
        for (m_on, w_on), (m_re, w_re) in zip(rank["went_on"], rank["resumed"], strict=True):
            numbers = [k for k in m_on if not k.startswith("time/")]
            assert [m_re[k] for k in numbers] == pytest.approx([m_on[k] for k in numbers], rel=0, abs=0, nan_ok=True)
            assert w_re is None or all(torch.equal(w_re[k], w_on[k]) for k in w_on)
    on, _ = _split(runs[3][0]["went_on"][1][1])
    first, _ = _split(runs[3][0]["after_first"])
    assert any(not torch.equal(on[k], first[k]) for k in on)  # the steps after the save did move the weights


def test_zero3_checkpoint_loads_in_keel_and_transformers(runs):
    from transformers import DeepseekV32ForCausalLM

    path = runs["root"] / "z3" / "ckpt" / "model"
    model = load_model(path).eval()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in runs[3][0]["after_first"].items())
    hf = DeepseekV32ForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    ids = torch.randint(3, 54, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.logits(model(ids).hidden), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4 and theirs.abs().max().item() > 0.1


def test_zero3_publishes_the_gathered_weights(runs):
    """Rank 0's published file (gathered per bucket, streamed to the file) holds exactly the whole weights."""
    r0, r1 = runs[3]
    assert r1["published"] is None
    tensors, whole = r0["published"]["tensors"], r0["after_first"]
    assert r0["published"]["shapes"] == {k: tuple(v.shape) for k, v in whole.items()}
    assert tensors.keys() == whole.keys() and all(torch.equal(tensors[k], v) for k, v in whole.items())

