"""DeepSeek-V3.2 in one file: MLA with DeepSeek Sparse Attention (lightning indexer + top-k) and DeepSeekMoE.

Module and parameter names follow the Hugging Face `deepseek_v32` checkpoint, so a real DeepSeek-V3.2
checkpoint loads unchanged and a keel checkpoint loads in transformers and vLLM. The configuration is
transformers' `DeepseekV32Config` (it parses config.json and the RoPE variants); `rl.model.checkpoint` validates it.

Two things the RL recipe needs from the forward pass, beyond logits:
  Keep Routing   every MoE layer can return the expert ids it chose and can be given ids to use
                 instead; gate weights are then the current router's at the given experts, so the
                 router still receives gradient.
  Indexer loss   each DSA layer can return the KL between the main attention and the indexer
                 (kernels.indexer_kl_loss); the indexer sees detached inputs, so the LM loss never
                 reaches it and its loss never reaches the rest.

Packed rows (several samples in one row, for SFT) pass `segment_ids`: a token then attends only to earlier
tokens of its own segment and RoPE positions restart at each segment, so every sample computes exactly what
it would alone. Without them the model is the plain causal LM and none of this costs anything.

Attention runs in the absorbed shared-latent form: W_UK is folded into the queries, so every head
attends over the same 576-wide per-token entry [c_kv | k_rope] and the output latent is mapped by W_UV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV32Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kernels import indexer_kl_loss, indexer_scores, sparse_mla_attention, topk_indices
from kernels.topk import selection_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(config: DeepseekV32Config, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim / 2] and the attention scaling of the configured RoPE type."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        dim, base = config.qk_rope_head_dim, config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., T, heads, d] by position. cos, sin: [B or 1, T, d/2].

    MLA pairs interleaved dims (x0, x1), (x2, x3), ...; the indexer pairs the two halves (x_i, x_{i+d/2}).
    The output is laid out [first of each pair | second of each pair] in both cases, which only permutes
    dims identically for queries and keys, so every dot product is that of the rotated vectors.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def segment_attention(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, T], mask [B, T, T] bool) of packed rows; a segment is a run of equal ids.

    Key s is visible to query t when start(t) <= s <= t, start(t) being where t's segment begins: causal
    and same segment. The position of t is t - start(t), so RoPE sees every sample as if it began the row.
    """
    t = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(is_start, t, 0).cummax(dim=1).values
    mask = (start[:, :, None] <= t[None, None, :]) & (t[None, None, :] <= t[None, :, None])
    return t - start, mask


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """The positions True in mask [B, T, S] as a top-k style selection [B, T, K], -1 in unused slots."""
    k = int(mask.sum(-1).max())
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return positions.masked_fill(~mask, -1).topk(k, dim=-1).values


class Fp32Linear(nn.Linear):
    """A bias-free linear layer computed in fp32 whatever the weight's dtype (the indexer's head weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class KVUpProjection(nn.Linear):
    """kv_b_proj: the latent c_kv -> per head [k_nope | v], and its two absorbed uses, all in this forward
    (ZeRO-3 gathers a sharded weight only for its own module's forward, so no other module reads it).

    absorb None: the plain projection; "query": q_nope [.., H, nope] -> W_UK^T q_nope [.., H, kv_lora_rank];
    "output": an output latent [.., H, kv_lora_rank] -> W_UV o [.., H, v].
    """

    def __init__(self, kv_lora_rank: int, n_heads: int, nope: int, v: int):
        super().__init__(kv_lora_rank, n_heads * (nope + v), bias=False)
        self.n_heads, self.nope, self.v = n_heads, nope, v

    def per_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, kv_lora_rank], W_UV [H, v, kv_lora_rank]): the weight split per head."""
        return self.weight.view(self.n_heads, self.nope + self.v, -1).split([self.nope, self.v], dim=1)

    def forward(self, x: torch.Tensor, absorb: str | None = None) -> torch.Tensor:
        if absorb is None:
            return super().forward(x)
        w_uk, w_uv = self.per_head()
        if absorb == "query":
            return torch.einsum("bthd,hdr->bthr", x, w_uk)
        return torch.einsum("bthr,hvr->bthv", x, w_uv)


class Indexer(nn.Module):
    """Lightning indexer: I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s]) over index_n_heads heads j.

    q from the MLA query latent (wq_b), one key per token from the hidden state (wk + LayerNorm), RoPE on
    the first qk_rope_head_dim dims ([rope | nope], non-interleaved), head weights from weights_proj in fp32.
    """

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Fp32Linear(config.hidden_size, self.n_heads, bias=False)

    def forward(
        self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [B, T, T] (fp32, -inf above the diagonal) for hidden states x and query latents.

        mask: [B, T, T] bool, True where key s is visible to query t (packed rows); the others are set to
        -inf too, so top-k never selects a token of another segment and the indexer loss never sees one.
        """
        q, k, w = self.project(x, q_latent, cos, sin)
        scores = indexer_scores(q, k, w)
        return scores if mask is None else scores.masked_fill(~mask, float("-inf"))

    def project(
        self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(queries [B, T, heads, d], keys [B, T, d], head weights [B, T, heads] with both scales folded in):
        what `indexer_scores` takes, and what a serving engine caches (the keys) token by token."""
        bsz, seqlen, _ = x.shape
        q = self.wq_b(q_latent).view(bsz, seqlen, self.n_heads, self.head_dim)
        q = torch.cat([apply_rope(q[..., : self.rope_dim], cos, sin, interleaved=False), q[..., self.rope_dim :]], -1)
        k = self.k_norm(self.wk(x))[:, :, None, :]
        k = torch.cat([apply_rope(k[..., : self.rope_dim], cos, sin, interleaved=False), k[..., self.rope_dim :]], -1)
        # Both scales fold into the head weights because ReLU(c * z) = c * ReLU(z) for c > 0.
        w = self.weights_proj(x)
        return q, k[:, :, 0, :], w * (self.n_heads**-0.5 * self.head_dim**-0.5)


class MLA(nn.Module):
    """Multi-head latent attention with DeepSeek Sparse Attention over the indexer's top-k tokens."""

    def __init__(self, config: DeepseekV32Config, with_indexer: bool = True):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.index_topk = config.index_topk
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim

        self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(self.q_lora_rank)
        self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = KVUpProjection(self.kv_lora_rank, self.n_heads, self.qk_nope_head_dim, self.v_head_dim)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, config.hidden_size, bias=False)
        self.indexer = Indexer(config) if with_indexer else None

        self.softmax_scale = qk_head_dim**-0.5
        rope = config.rope_parameters
        if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
            mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0
            self.softmax_scale *= mscale * mscale

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(q_latent, q_nope [B, T, H, nope], q_rope [B, T, H, rope], c_kv [B, T, kv_lora_rank], k_rope [B, T, rope]):
        the per-token projections, RoPE applied; c_kv and k_rope are what a serving engine caches."""
        bsz, seqlen, _ = x.shape
        q_latent = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_latent).view(bsz, seqlen, self.n_heads, -1)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, interleaved=True)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, interleaved=True)[:, :, 0, :]
        return q_latent, q_nope, q_rope, self.kv_a_layernorm(c_kv), k_rope

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, kv_lora_rank], W_UV [H, v, kv_lora_rank]): kv_b_proj split per head."""
        return self.kv_b_proj.per_head()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        sparse: bool,
        indexer_loss: bool,
        query_mask: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        selection: torch.Tensor | None = None,
        follow_selection: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(output, indexer loss or None, indexer agreement or None).

        mask: [B, T, T] bool attention mask of a packed row (causal and same segment), or None: causal.
        selection: [B, T, K] positions to attend to instead of the indexer's own top-k (Keep Indexer
        Selection: the engine's recorded choice, -1 in unused slots); the indexer loss is then taken over
        these sets, and the agreement returned is the mean overlap of the indexer's own top-k with them.
        follow_selection False: attend to the own top-k and only measure the agreement.
        """
        seqlen = x.shape[1]
        q_latent, q_nope, q_rope, c_kv, k_rope = self.project(x, cos, sin)
        # With no more tokens than index_topk, top-k keeps every earlier token: DSA is dense attention.
        select = sparse and seqlen > self.index_topk
        if not select:
            selection = None  # every earlier token is selected whatever was recorded
        use_indexer = self.indexer is not None and (indexer_loss or select)

        def absorbed() -> tuple[torch.Tensor, torch.Tensor]:
            # The MQA form: W_UK absorbed into the queries, q_nope . (W_UK c) = (W_UK^T q_nope) . c, so all
            # heads share one 576-wide latent key/value per token (what the sparse kernel and the indexer KL use).
            q_abs = torch.cat([self.kv_b_proj(q_nope, absorb="query"), q_rope], dim=-1)
            return q_abs, torch.cat([c_kv, k_rope], dim=-1)

        indices, loss, agreement = None, None, None
        if selection is not None and follow_selection:
            indices = selection
        if use_indexer:
            scores = self.indexer(x.detach(), q_latent.detach(), cos, sin, mask)
            if select:
                own = topk_indices(scores, self.index_topk)
                if indices is None:
                    indices = own
                if selection is not None:
                    agreement = selection_overlap(own, selection, self.index_topk, query_mask)
            if indexer_loss:
                q_abs, kv = absorbed()
                # The dense target of a packed row is attention over the query's own segment: given as an
                # explicit selection, the loss kernels (reference and Triton) need no separate mask.
                selected = visible_indices(mask) if indices is None and mask is not None else indices
                loss = indexer_kl_loss(q_abs.detach(), kv.detach(), self.softmax_scale, scores, selected, query_mask)

        if indices is None:
            # Dense: the per-head form (keys nope+rope wide, not 576) through SDPA, the cheap way to train.
            kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, -1))
            k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
            q_full = torch.cat([q_nope, q_rope], dim=-1)
            # SDPA takes either is_causal or a mask; a packed row's mask already holds the causal part.
            attn_mask = None if mask is None else mask[:, None]
            o = F.scaled_dot_product_attention(q_full.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=attn_mask, is_causal=mask is None,
                                               scale=self.softmax_scale).transpose(1, 2)
        else:
            # Top-k ran on scores that are -inf outside the query's segment, so the selection (and with it
            # this attention) already stays inside the segment.
            q_abs, kv = absorbed()
            o_latent, _ = sparse_mla_attention(q_abs, kv, indices, self.softmax_scale, self.kv_lora_rank)
            o = self.kv_b_proj(o_latent, absorb="output")
        return self.o_proj(o.flatten(2)), loss, agreement


def selection_overlap(own: torch.Tensor, recorded: torch.Tensor, k: int,
                      query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |own_t & recorded_t| / k over the queries t >= k (earlier ones select every token either way)
    that have a record (padding of a right-padded batch has none) and where query_mask [B, T] is 1: how often
    the indexer picks what the engine picked. own, recorded: [B, T, K] positions, -1 in unused slots."""
    s_len = own.shape[1]
    both = selection_mask(own, s_len) & selection_mask(recorded, s_len)
    overlap = both.sum(-1).float() / k  # [B, T]
    weight = ((torch.arange(s_len, device=own.device) >= k)[None] & (recorded >= 0).any(-1)).float()
    if query_mask is not None:
        weight = weight * query_mask.float()
    return (overlap * weight).sum() / weight.sum().clamp(min=1)


class MLP(nn.Module):
    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid router with aux-loss-free bias (noaux_tc) and group-limited top-k.

    s = sigmoid(x W^T); experts are chosen by s + e_score_correction_bias within the topk_group groups
    whose two best biased scores sum highest; the gate weights are s at the chosen experts (normalised if
    norm_topk_prob) times routed_scaling_factor. Given `forced_ids` (Keep Routing) the choice is skipped and
    the weights are taken at those ids, so d(weights)/dW still flows to the router.
    """

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        if forced_ids is None:
            with torch.no_grad():
                biased = scores + self.e_score_correction_bias
                grouped = biased.view(x.shape[0], self.n_group, -1)
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
                group_idx = group_scores.topk(self.topk_group, dim=-1).indices
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
                biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
                ids = biased.topk(self.top_k, dim=-1).indices
        else:
            ids = forced_ids.long()
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class MoE(nn.Module):
    """DeepSeekMoE: n_routed_experts fine-grained experts (num_experts_per_tok per token) + shared experts."""

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor, forced_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], forced_ids [B, T, top_k] or None -> (output [B, T, D], expert ids [B, T, top_k])."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x, None if forced_ids is None else forced_ids.reshape(-1, forced_ids.shape[-1]))
        y = torch.zeros_like(x)
        counts = torch.bincount(ids.flatten(), minlength=len(self.experts)).tolist()
        for e, expert in enumerate(self.experts):
            # Under autograd an unrouted expert still joins the graph, on zero tokens (its gradient is exactly 0):
            # the trainer's data-parallel ranks then all have a gradient for every expert, produced in the same
            # backward order, which ZeRO-1/2's bucketed reductions need (ranks' rows route to different experts).
            if counts[e] == 0 and not torch.is_grad_enabled():
                continue
            token, slot = torch.where(ids == e)
            y = y.index_add(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        y = y + self.shared_experts(x)
        return y.view(shape), ids.view(*shape[:-1], -1)


class Block(nn.Module):
    def __init__(self, config: DeepseekV32Config, layer_id: int, with_indexer: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, with_indexer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = layer_id >= config.first_k_dense_replace
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, forced_ids, sparse, indexer_loss, query_mask, mask=None, selection=None,
                follow_selection=True):
        h, index_loss, agreement = self.self_attn(self.input_layernorm(x), cos, sin, sparse, indexer_loss, query_mask,
                                                  mask, selection, follow_selection)
        x = x + h
        if self.is_moe:
            h, ids = self.mlp(self.post_attention_layernorm(x), forced_ids)
        else:
            h, ids = self.mlp(self.post_attention_layernorm(x)), None
        return x + h, ids, (index_loss, agreement)


class Backbone(nn.Module):
    def __init__(self, config: DeepseekV32Config, with_indexer: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, with_indexer) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # [B, T, hidden_size], after the final norm
    routing: torch.Tensor | None  # [B, T, moe_layers, top_k] int64 expert ids, if asked for
    indexer_loss: torch.Tensor | None  # mean over DSA layers of the indexer KL, if asked for
    indexer_agreement: torch.Tensor | None = None  # mean overlap of own and given top-k sets (Keep Indexer Selection)


class Transformer(nn.Module):
    """The causal LM. `forward` returns final hidden states; `logits` applies the head (see rl.algo.logprobs)."""

    def __init__(self, config: DeepseekV32Config, with_indexer: bool = True):
        super().__init__()
        self.config = config
        self.with_indexer = with_indexer
        self.model = Backbone(config, with_indexer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq, self.rope_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def moe_layers(self) -> int:
        return sum(block.is_moe for block in self.model.layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        routing: torch.Tensor | None = None,
        *,
        return_routing: bool = False,
        sparse: bool = True,
        indexer_loss: bool = False,
        query_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        index_selection: torch.Tensor | None = None,
        follow_selection: bool = True,
    ) -> ModelOutput:
        """Run the model on right-padded (or, with segment_ids, packed) input_ids [B, T].

        routing: [B, T, moe_layers, top_k] expert ids to force (Keep Routing), or None to route freely.
        sparse: DSA top-k attention (False: dense causal attention, the indexer's warm-up stage).
        indexer_loss: also return the indexer KL (dense target when sparse=False, else restricted to the
        selected sets), averaged over the queries where query_mask [B, T] is 1 and over layers.
        index_selection: [B, T, layers, index_topk] positions each DSA layer attends to instead of its own
        top-k (Keep Indexer Selection, -1 in unused slots); used where the sequence is longer than index_topk.
        With follow_selection False it is only compared with the model's own choice (indexer_agreement).
        segment_ids: [B, T] for packed rows: equal along each sample, different between neighbouring samples
        (e.g. 1 1 1 2 2 0 0: two samples and padding). Each token attends only to earlier tokens of its own
        segment and, unless `positions` is given, its RoPE position is its index within the segment.
        """
        bsz, seqlen = input_ids.shape
        mask = None
        if segment_ids is not None:
            if segment_ids.shape != input_ids.shape:
                raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected {tuple(input_ids.shape)}")
            segment_positions, mask = segment_attention(segment_ids)
            if positions is None:
                positions = segment_positions
        if positions is None:
            positions = torch.arange(seqlen, device=input_ids.device)[None].expand(bsz, -1)
        freqs = positions.float()[..., None] * self.inv_freq.float()
        cos, sin = freqs.cos() * self.rope_scaling, freqs.sin() * self.rope_scaling
        if routing is not None and routing.shape[:3] != (bsz, seqlen, self.moe_layers):
            raise ValueError(
                f"routing has shape {tuple(routing.shape)}; expected [{bsz}, {seqlen}, {self.moe_layers}, top_k]"
            )
        if indexer_loss and not self.with_indexer:
            raise ValueError("indexer_loss=True on a model built without an indexer")

        if index_selection is not None and index_selection.shape[:3] != (bsz, seqlen, len(self.model.layers)):
            raise ValueError(f"index_selection has shape {tuple(index_selection.shape)}; expected "
                             f"[{bsz}, {seqlen}, {len(self.model.layers)}, index_topk]")

        x = self.model.embed_tokens(input_ids)
        chosen, index_losses, agreements, moe_i = [], [], [], 0
        for i, block in enumerate(self.model.layers):
            forced = None
            if block.is_moe and routing is not None:
                forced = routing[:, :, moe_i]
            selection = None if index_selection is None else index_selection[:, :, i]
            x, ids, (index_loss, agreement) = block(x, cos, sin, forced, sparse, indexer_loss, query_mask, mask,
                                                    selection, follow_selection)
            if ids is not None:
                chosen.append(ids)
                moe_i += 1
            if index_loss is not None:
                index_losses.append(index_loss)
            if agreement is not None:
                agreements.append(agreement)
        return ModelOutput(
            hidden=self.model.norm(x),
            routing=torch.stack(chosen, dim=2) if return_routing and chosen else None,
            indexer_loss=torch.stack(index_losses).mean() if index_losses else None,
            indexer_agreement=torch.stack(agreements).mean() if agreements else None,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".indexer." in name]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".indexer." not in name]


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Fresh weights as transformers initialises them: N(0, initializer_range) linears, unit norms."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
    for module in model.modules():
        if isinstance(module, Gate):
            module.e_score_correction_bias.zero_()
