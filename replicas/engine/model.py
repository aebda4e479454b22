"""The NLD transformer (Ministral3 layout): RMSNorm, GQA attention with YaRN RoPE and the
Llama-4 query scale, SwiGLU MLP, untied `diffusion_head`.

Contract: `NLDModel.forward(tokens, positions, cache, attn)` takes token ids [B, T], absolute
positions [B, T], a `KVCache` (or None: cache-free, for training) and an `AttentionInputs`, and
returns final hidden states [B, T, hidden]; `logits(h)` applies the head. With a cache, each
layer writes the K/V of every input token to its flat cache location (`attn.write_index`), then
attends group by group: the input's B x T tokens, flattened, are a sequence of groups of rows of
equal padded length (`AttentionGroup`), and each group reads its rows' first S columns through
their block tables and applies its boolean mask [rows, 1, tokens, S] in one
`scaled_dot_product_attention`. So one forward can pack AR tokens, canvases and prefill chunks
without padding them to one length. Without a cache, attention covers only the call's tokens
under `attn.mask` [B, 1, T, T]. The model knows no decoding mode: causal, bidirectional or any
other pattern is entirely the caller's mask. Optional `o_proj` LoRA adapters (the self-spec
draft adapter, and our denoise adapter for diffusion passes) apply only to the tokens whose
`AttentionInputs.lora_weight` names them (0 = none, `DRAFT_ADAPTER`, `DENOISE_ADAPTER`).
`fuse_projections()` (the engine calls it on the models it loads) stacks each layer's q/k/v and
gate/up weights into one matrix each; the unfused layout is the checkpoint's and training's.
Non-goals: weight loading (see `loader`), sampling, training-time dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .rope import apply_rotary, compute_inv_freq, llama4_query_scale, rotary_cos_sin


@dataclass
class AttentionGroup:
    """`rows` rows of `tokens` tokens each, starting at flat token `start` of the input."""

    start: int
    rows: int
    tokens: int
    block_tables: torch.Tensor  # [rows, NB] cache blocks of each row's columns
    mask: torch.Tensor  # [rows, 1, tokens, S] bool, True = may attend; S = columns read


DRAFT_ADAPTER = 1  # the checkpoint's `linear_spec_lora/`: self-speculation draft passes
DENOISE_ADAPTER = 2  # ours (`diffusion_lora/`): diffusion denoise passes


@dataclass
class AttentionInputs:
    """Per-forward attention metadata built by the runner (or a training loop, cache-free)."""

    mask: torch.Tensor | None = None  # cache-free: [B, 1, T, T] bool over the call's own tokens
    write_index: torch.Tensor | None = None  # with a cache: [B, T] flat cache location of each token
    groups: tuple[AttentionGroup, ...] = ()  # with a cache: tile the flattened B x T tokens in order
    lora_weight: torch.Tensor | None = None  # [B, T] float: the adapter each token takes (0.0 = none)
    lora_adapters: tuple[int, ...] | None = None  # the adapters lora_weight names (known on the host); None: all loaded


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel over float32 (x * rsqrt(mean(x^2) + eps)), the weight in x's dtype
        y = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.qkv_proj: nn.Linear | None = None  # `fuse()`: q, k and v as one matrix (inference)
        # adapter id -> its o_proj delta: (A [r, in], scale * B [out, r]), or one dense scale * B A
        # [out, in] where that is cheaper (a full-rank adapter), set by NLDModel.set_lora
        self.adapters: dict[int, tuple[torch.Tensor, ...]] = {}

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_scale: torch.Tensor | None,
        cache: KVCache | None,
        attn: AttentionInputs,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, hkv = self.n_heads, self.n_kv
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)  # [B, T, (H + 2 Hkv) D]
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        qkv = qkv.view(b, t, h + 2 * hkv, self.head_dim).transpose(1, 2)  # [B, H + 2 Hkv, T, D]
        qk = apply_rotary(qkv[:, : h + hkv], cos, sin)  # q's and k's heads in one pass
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + hkv :]  # [B, H, T, D], [B, Hkv, T, D] x 2
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        if cache is None:  # cache-free (training, references): attend over this call's tokens
            out = self.attend(q, k, v, attn.mask)  # [B, H, T, D]
            out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        else:
            cache.write(self.layer, attn.write_index, k, v)
            out = self.attend_groups(q, cache, attn).view(b, t, self.n_heads * self.head_dim)
        y = self.o_proj(out)
        if self.adapters and attn.lora_weight is not None:
            # every token computes the delta of each adapter the pass uses and keeps the one it
            # names: no data-dependent indexing, so no host sync (and the pass can be a CUDA graph)
            used = self.adapters if attn.lora_adapters is None else attn.lora_adapters
            for a_id in used:
                delta = self.adapters.get(a_id)
                if delta is None:
                    continue
                d = out @ delta[0].T if len(delta) == 1 else (out @ delta[0].T) @ delta[1].T  # [B, T, hidden]
                y = y + d * (attn.lora_weight == float(a_id)).to(d.dtype)[..., None]
        return y

    def fuse(self) -> None:
        """For inference: q_proj, k_proj and v_proj become one `qkv_proj` (their weights stacked,
        [(H + 2 Hkv) D, hidden]): one matmul instead of three. The three are dropped."""
        self.qkv_proj = _stacked(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def attend(self, q, keys, values, mask) -> torch.Tensor:
        """q [B, H, T, D], keys/values [B, Hkv, S, D], mask [B, 1, T, S] -> [B, H, T, D]."""
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=self.n_heads != self.n_kv
        )

    def attend_groups(self, q: torch.Tensor, cache: KVCache, attn: AttentionInputs) -> torch.Tensor:
        """q [B, H, T, D] -> attention output [B*T, H*D], group by group through the block tables."""
        h, d = self.n_heads, self.head_dim
        flat = q.transpose(1, 2).reshape(-1, h, d)  # [N, H, D]
        outs = []
        for g in attn.groups:
            qg = flat[g.start : g.start + g.rows * g.tokens].view(g.rows, g.tokens, h, d).transpose(1, 2)
            keys, values = cache.read(self.layer, g.block_tables, g.mask.shape[-1])  # [rows, Hkv, S, D]
            out = self.attend(qg, keys, values, g.mask)  # [rows, H, tokens, D]
            outs.append(out.transpose(1, 2).reshape(g.rows * g.tokens, h * d))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # `fuse()`: gate and up as one matrix (inference)

    def fuse(self) -> None:
        """For inference: gate_proj and up_proj become one `gate_up_proj` [2 I, hidden]."""
        self.gate_up_proj = _stacked(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [..., I] each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, q_scale, cache, attn):  # x [B, T, hidden]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, q_scale, cache, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Encoder(nn.Module):
    """The backbone, named as in the checkpoint (`encoder.*`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NLDModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", compute_inv_freq(cfg.rope, cfg.head_dim), persistent=False)
        self.attention_factor = cfg.rope.resolved_attention_factor()
        self._adapters: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # adapter id -> per-layer deltas

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, attn: AttentionInputs
    ) -> torch.Tensor:
        """tokens, positions [B, T] -> hidden [B, T, hidden] (after the final norm).

        With `cache=None` nothing is cached and attention covers only these T tokens under
        `attn.mask` [B, 1, T, T] (`write_index` and `groups` are ignored): the training path."""
        x = self.encoder.embed_tokens(tokens)
        cos, sin = rotary_cos_sin(positions, self.inv_freq, self.attention_factor, x.dtype)
        q_scale = llama4_query_scale(positions, self.config.rope)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, q_scale, cache, attn)
        return self.encoder.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> float32 logits [..., vocab]."""
        return self.diffusion_head(hidden).float()

    def fuse_projections(self) -> None:
        """For inference: every layer's q/k/v and gate/up projections become one matmul each (7
        matmuls per layer become 4; on a CPU the per-call overhead dominates small passes). Same values, so the same outputs up to float rounding; the parameter names change
        (`qkv_proj`, `gate_up_proj`): load checkpoints before, not after. Idempotent."""
        for layer in self.encoder.layers:
            if layer.self_attn.qkv_proj is None:
                layer.self_attn.fuse()
            if layer.mlp.gate_up_proj is None:
                layer.mlp.fuse()

    def set_lora(self, deltas: list[tuple[torch.Tensor, torch.Tensor]] | None, adapter: int = DRAFT_ADAPTER) -> None:
        """Install one adapter's per-layer (A [r, in], scale * B [out, r]) o_proj deltas under
        `adapter` (DRAFT_ADAPTER or DENOISE_ADAPTER), or remove it (None); others stay."""
        if adapter not in (DRAFT_ADAPTER, DENOISE_ADAPTER):
            raise ValueError(f"adapter: unknown adapter id {adapter!r}")
        adapters = dict(self._adapters)
        if deltas is None:
            adapters.pop(adapter, None)
        else:
            adapters[adapter] = deltas
        self._adapters = adapters
        for i, layer in enumerate(self.encoder.layers):
            layer.self_attn.adapters = {a_id: _delta(*adapters[a_id][i]) for a_id in sorted(adapters)}

    def has_adapter(self, adapter: int) -> bool:
        return adapter in self._adapters

    @property
    def has_lora(self) -> bool:
        """The self-speculation draft adapter is loaded."""
        return self.has_adapter(DRAFT_ADAPTER)


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One bias-free linear layer whose output is the given layers' outputs side by side."""
    w = torch.cat([lin.weight.detach() for lin in linears])  # [sum out, in]
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # no second allocation, no init
    fused.weight = nn.Parameter(w, requires_grad=False)
    return fused


def _delta(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An adapter's o_proj delta as applied: (A [r, in], scale * B [out, r]), or the dense
    scale * B A [out, in] when r * (in + out) >= in * out (one matmul instead of two larger ones)."""
    r, inner = a.shape
    if r * (inner + b.shape[0]) >= inner * b.shape[0]:
        return (b @ a,)
    return (a, b)
