"""Log-probabilities of given tokens, chunked over positions, with Keep Sampling Mask.

Only a [chunk, vocab] block of logits exists at a time: each chunk's head projection and log-softmax
is recomputed in backward (activation checkpointing) instead of being stored. The head is the lm_head module
(or its weight): called as a module, a ZeRO-3-sharded weight is gathered for each chunk's projection, since
DeepSpeed gathers a parameter only inside its own module's forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_sampling_mask(logits: torch.Tensor, kept_ids: torch.Tensor) -> torch.Tensor:
    """Keep Sampling Mask: logits outside each position's kept set become -inf.

    logits [N, V]; kept_ids [N, K] token ids that survived top-k/top-p at sampling time, padded with -1.
    A row whose kept_ids are all -1 is left untouched (sampling did not truncate there). Log-softmax of
    the result is pi renormalised over the kept set: log pi(a) - log sum_{b in kept} pi(b).
    """
    untruncated = (kept_ids < 0).all(-1, keepdim=True)
    vocab = logits.shape[-1]
    # Padding (-1) scatters into an extra column that is dropped, never into a real token id.
    keep = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    keep.scatter_(1, kept_ids.masked_fill(kept_ids < 0, vocab), True)
    keep = keep[:, :vocab] | untruncated
    return logits.masked_fill(~keep, float("-inf"))


def _chunk_logprobs(
    hidden: torch.Tensor, head: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
    kept_ids: torch.Tensor | None, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, head) if isinstance(head, torch.Tensor) else head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if kept_ids is not None:
        logits = apply_sampling_mask(logits, kept_ids)
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    p_all = logp_all.exp()
    entropy = -(p_all * torch.where(p_all > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, entropy


def token_logprobs(
    hidden: torch.Tensor,
    head: torch.Tensor | nn.Module,
    targets: torch.Tensor,
    kept_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(targets) and the entropy of pi at every position, shapes = targets.shape.

    hidden [..., D] final hidden states, head the lm_head (module, or its weight [V, D]), targets [...] token
    ids, kept_ids [..., K] (-1 padded) or None.
    pi = softmax(logits / temperature), renormalised over the kept set where one is given.
    """
    lead = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).long()
    kept = None if kept_ids is None else kept_ids.reshape(-1, kept_ids.shape[-1]).long()
    params = [head] if isinstance(head, torch.Tensor) else list(head.parameters())
    head_grad = any(p.requires_grad for p in params)
    logps, entropies = [], []
    for start in range(0, targets.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], head, targets[sl], None if kept is None else kept[sl], temperature)
        if torch.is_grad_enabled() and (hidden.requires_grad or head_grad):
            logp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(ent)
    return torch.cat(logps).view(lead), torch.cat(entropies).view(lead)
