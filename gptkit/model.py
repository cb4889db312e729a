"""The GPT nn.Module: embeddings, attention, MLP, norms, blocks and LM head.
(The KV cache lives in kv_cache.py, CPU decoding's weight layout in cpu.py, int8 layers in
quantize.py, adapters in peft.py.)

Shapes use B = batch, T = new tokens in this call, S = all key positions (cache + new),
C = n_embd, H = query heads, Hkv = key/value heads, D = head_dim, V = vocab.

Parameter names (what checkpoints store):
  tok_emb.weight                      [V, C]
  pos_emb.weight                      [block_size, C]   (positions="learned" only)
  blocks.{i}.norm1 / norm2            LayerNorm or RMSNorm over C
  blocks.{i}.attn.qkv.weight          [(H + 2*Hkv) * D, C]   q, k, v stacked in that order
  blocks.{i}.attn.proj.weight         [C, H * D]
  blocks.{i}.mlp.fc.weight            [I, C], or [2 * I, C] for SwiGLU (gate rows, then up rows)
  blocks.{i}.mlp.proj.weight          [C, I]
  norm_f                              final norm (pre-norm models only)
  lm_head.weight                      [V, C]   (shares tok_emb.weight when tied; not stored then)
  score.weight (score.bias)           [L, C] ([L])  instead of lm_head for classify / tag heads
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .kv_cache import KVCache


class ContextLengthError(ValueError):
    """More tokens than the model's context (block_size) can hold."""


def rope_tables(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [block_size, D] in the half-split layout Llama checkpoints use, the first half
    of sin negated (see apply_rope). Built on the CPU whatever the default device, so every
    device gets the same numbers (and a meta-device model does not import torch._dynamo)."""
    D = config.head_dim
    arange = functools.partial(torch.arange, dtype=torch.float32, device="cpu")
    inv_freq = 1.0 / (config.rope_theta ** (arange(0, D, 2) / D))
    angles = torch.outer(arange(config.block_size), inv_freq)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, D] by position; cos/sin are [B, T, 1, D] (rope_tables).

    Llama's rotate_half(x) = cat(-x2, x1) times sin equals roll(x, D/2) = cat(x2, x1) times
    sin with its first half negated, to the bit; the table holds that sign, so a step costs
    one roll instead of a chunk, a negation and a cat."""
    y = x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin
    return y if y.dtype == x.dtype else y.to(x.dtype)


def sinusoidal_table(block_size: int, n_embd: int) -> torch.Tensor:
    """The fixed sin/cos position encodings of "Attention Is All You Need", [block_size, C]."""
    arange = functools.partial(torch.arange, dtype=torch.float32, device="cpu")  # as rope_tables
    pos = arange(block_size)[:, None]
    div = torch.exp(arange(0, n_embd, 2) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(block_size, n_embd, device="cpu")
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : n_embd // 2]
    return table


class _RMSNormFunction(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight with a hand-written backward. On a CPU, autograd's
    backward through the composite (pow, mean, rsqrt, two muls) costs ~2.8x a LayerNorm's;
    this one ~1.5x (Llama-style training steps are ~5% faster)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        x_hat = x * r
        ctx.save_for_backward(x_hat, weight, r)
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad):
        x_hat, weight, r = ctx.saved_tensors
        g_hat = grad * weight
        # d(x * r)/dx: r * (g - x_hat * mean(g * x_hat)), r depending on x through mean(x^2)
        grad_x = r * (g_hat - x_hat * (g_hat * x_hat).mean(-1, keepdim=True))
        grad_weight = (grad * x_hat).reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_weight, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and results), with a faster backward on the CPU; forward
    alone (inference) is F.rms_norm, one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled():
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


def _dropout(p: float) -> nn.Dropout | None:
    """nn.Dropout(p), or None when p is 0: even an nn.Identity is a module call (~1.7 us on a
    CPU), and a decoding step would make 61 of them (2 per layer) for nothing."""
    return nn.Dropout(p) if p > 0 else None


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = (
            config.n_head,
            config.n_kv_head,
            config.head_dim,
        )
        qkv_out = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = _dropout(config.dropout)
        # Prefix tuning (peft.py) sets a module here that prepends learned keys and values.
        self.register_module("prefix", None)
        # explain.py sets a callable here to see each layer's queries, keys and mask.
        self.probe = None

    def forward(self, x, rope, mask, is_causal: bool, cache: KVCache | None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D)
        qk, v = qkv[:, :, : H + Hkv], qkv[:, :, H + Hkv :]
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated in one pass
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, T, D]
        k = qk[:, :, H:].transpose(1, 2)  # [B, Hkv, T, D]
        v = v.transpose(1, 2)  # [B, Hkv, T, D]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, Hkv, S, D]
        if self.prefix is not None:
            k, v, mask, is_causal = self.prefix(k, v, mask, is_causal)  # S grows by the prefix
        if self.probe is not None:
            self.probe(q, k, mask, is_causal)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=Hkv != H,
        )  # [B, H, T, D]
        y = self.proj(y.transpose(1, 2).reshape(B, T, H * D))
        return y if self.resid_dropout is None else self.resid_dropout(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.activation = config.activation
        hidden = config.intermediate_size
        fc_out = 2 * hidden if config.activation == "swiglu" else hidden
        self.fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = _dropout(config.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        h = self.proj(h)
        return h if self.dropout is None else self.dropout(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.prenorm = config.prenorm
        # GPT-3 alternates dense and locally banded attention: odd layers are the banded ones.
        self.local = config.attention == "alternating" and layer % 2 == 1
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope, masks, cache):
        mask, is_causal = masks[self.local]
        if self.prenorm:
            x = x + self.attn(self.norm1(x), rope, mask, is_causal, cache)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, mask, is_causal, cache))
        return self.norm2(x + self.mlp(x))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding, but on the meta device without its N(0, 1) init, which there imports
    torch._dynamo (1.3 s). Elsewhere the init still runs (init_weights overwrites it), so a
    seeded model draws the same random numbers, and gets the same weights, as it always did."""
    weight = torch.empty(rows, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(rows, dim, _weight=weight)


class GPT(nn.Module):
    # A native single-token decoding step (cpu_step.NativeStep, set by cpu.use_decode_layout):
    # forward asks it first for a pass through a KV cache; it returns None for one it does not
    # serve, which then runs here as always.
    native_step = None

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = _embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.pos_emb = _embedding(config.block_size, config.n_embd)
        self._make_buffers()
        self.drop = _dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # Prompt tuning (peft.py) sets a module here: learned embeddings before every sequence.
        self.register_module("prompt", None)
        self.norm_f = make_norm(config) if config.prenorm else nn.Identity()
        if config.head == "lm":
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
        else:  # "score" is the name Hugging Face's classification heads use
            self.score = nn.Linear(config.n_embd, len(config.labels), bias=config.score_bias)
        if self.tok_emb.weight.device.type != "meta":  # a shape-only model has nothing to init
            self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and residual projections
        scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with
        depth."""
        self.apply(self.init_module)
        std = self.config.init_std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std)

    @classmethod
    def skeleton(cls, config: GPTConfig) -> GPT:
        """A GPT on the meta device: the structure and shapes, no memory. Give it weights
        with `assign` (after adding adapters, say, whose weights are to load too)."""
        with torch.device("meta"):
            return cls(config)

    def assign(self, state: dict[str, torch.Tensor], device="cpu", dtype=torch.float32) -> GPT:
        """Make the tensors of `state` this model's parameters (moved to device/dtype if they
        are not there): loading holds one copy of the weights, not two. Names and shapes must
        match (a tied lm_head may be absent; check them first, as nothing here does)."""
        # Floats take dtype; int8 weights (a quantized checkpoint: quantize.py) stay int8.
        state = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in state.items()
        }
        self.load_state_dict(state, strict=False, assign=True)  # strict=False: the tied head
        self._make_buffers()
        tied = self.config.head == "lm" and self.config.tie_embeddings
        if tied and isinstance(self.lm_head, nn.Linear):  # still meta; an int8 head has its own
            self.lm_head.weight = self.tok_emb.weight
        return self

    @classmethod
    def from_state_dict(
        cls, config: GPTConfig, state: dict[str, torch.Tensor], device="cpu", dtype=torch.float32
    ) -> GPT:
        """A GPT whose parameters *are* the tensors of `state` (see `assign`)."""
        return cls.skeleton(config).assign(state, device, dtype)

    @property
    def context(self) -> int:
        """Positions an input may take: the context, less a soft prompt's (peft.py)."""
        return self.config.block_size - (self.prompt.length if self.prompt is not None else 0)

    @property
    def head(self) -> nn.Linear:
        """The output layer: lm_head, or score for classify / tag models."""
        return self.lm_head if self.config.head == "lm" else self.score

    def _make_buffers(self) -> None:
        """Position tables derived from the config (never stored in checkpoints)."""
        config, device = self.config, self.tok_emb.weight.device
        if config.positions == "sinusoidal":
            table = sinusoidal_table(config.block_size, config.n_embd).to(device)
            self.register_buffer("pos_table", table, persistent=False)
        elif config.positions == "rope":
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def init_module(self, module: nn.Module) -> None:
        """GPT-2's initialisation of one Linear or Embedding (see init_weights)."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once (works on the meta device)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.config.positions == "learned":
                n -= self.pos_emb.weight.numel()
        return n

    def new_cache(
        self, batch_size: int, max_len: int | None = None, pad: list[int] | None = None
    ) -> KVCache:
        """An empty cache for batch_size rows of max_len positions (default: the context);
        pad: each row's leading padding columns (left-padded prompts, see kv_cache.py)."""
        c, p = self.config, self.tok_emb.weight
        max_len = max_len or c.block_size
        return KVCache(
            c.n_layer, batch_size, c.n_kv_head, c.head_dim, max_len, p.device, p.dtype, pad
        )

    def _masks(
        self,
        B: int,
        T: int,
        start: int,
        key_mask: torch.Tensor | None,
        device,
        causal=True,
        columns: torch.Tensor | None = None,
    ):
        """(mask, is_causal) for dense layers and for banded layers, shared by all blocks.

        The common cases need no mask tensor: a prefill from position 0 is plain causal, a
        single decode step may attend to every cached key, and a bidirectional (masked-LM)
        pass sees everything. Otherwise we build a boolean [B or 1, 1, T, S] mask
        (True = may attend). columns [B, T]: where each row's new tokens sit in a cache whose
        rows have different lengths (default start..S-1 for every row).
        """
        S = start + T
        banded = self.config.attention == "alternating" and self.config.local_window < S
        if key_mask is None and not banded and (start == 0 or T == 1 or not causal):
            plain = (None, causal and start == 0 and T > 1)
            return {False: plain, True: plain}
        if columns is None:
            columns = torch.arange(start, S, device=device)[None]  # [1, T]
        q_pos = columns[:, None, :, None]  # [B or 1, 1, T, 1]
        k_pos = torch.arange(S, device=device)  # [S]
        allowed = k_pos <= q_pos if causal else (k_pos >= 0) & (q_pos >= 0)  # [B|1, 1, T, S]
        if key_mask is not None:
            # Padding keys are hidden. A query that would then see nothing (a padding query)
            # sees itself, since an all-masked softmax row would be NaN.
            allowed = allowed & key_mask[:, None, None, :S]
            allowed = allowed | (~allowed.any(-1, keepdim=True) & (k_pos == q_pos))
        local = allowed & ((q_pos - k_pos).abs() < self.config.local_window)
        return {False: (allowed, False), True: (local, False)}

    def features(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """Final hidden states [B, T, C] for token ids idx [B, T].

        cache: continue after the cache's filled positions (and fill it with this call); the
          cache gives the position ids and key mask.
        positions: without a cache, [B, T] position ids; default 0..T-1.
        key_mask: without a cache, [B, T] bool, False for padding that no query may attend to.
        causal: False lets every token attend to every other (the masked-LM objective).
        """
        B, T = idx.shape
        if cache is not None and (positions is not None or key_mask is not None):
            raise ValueError("a pass through a KV cache takes its positions and mask from it")
        # A soft prompt takes the first positions; its keys and values go before every layer's.
        offset = self.prompt.attach(self) if self.prompt is not None else 0
        start = cache.length if cache is not None else 0
        limit = self.config.block_size - offset
        limit = min(limit, cache.max_len) if cache is not None else limit
        if start + T > limit:
            raise ContextLengthError(
                f"{start + T} tokens do not fit the context of {limit} positions; "
                "shorten the prompt or max_new_tokens"
            )
        columns = None
        if cache is not None:
            positions, key_mask = cache.positions(T), cache.key_mask(T)
            columns = cache.columns(T)
        elif positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        if offset:
            positions = positions + offset
        x, rope = self.embed(self.tok_emb(idx), positions)  # [B, T, C]
        masks = self._masks(B, T, start, key_mask, idx.device, causal, columns)
        for block in self.blocks:
            x = block(x, rope, masks, cache)
        return self.norm_f(x)

    def embed(self, x: torch.Tensor, positions: torch.Tensor):
        """(the first block's input [B, T, C], rope tables or None) for token embeddings
        x [B, T, C] at positions [B, T]."""
        rope = None
        if self.config.positions == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[positions]
        else:
            rope = (self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None])
        return (x if self.drop is None else self.drop(x)), rope

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
        causal: bool = True,
    ):
        """Logits [B, T, V]; with targets [B, T] (-100 = ignore), returns (logits, loss).

        Every head is trained through this one loss: a classifier's target is its label at
        the sequence's last token (-100 elsewhere), a tagger's a label per scored token. A
        classifier of F fields takes targets [B, T, F], each within its field's labels.

        last_only computes logits for the last position only ([B, 1, V]), which is all a
        generation step needs and saves a [T, V] matmul on long prompts. keep [B, T] (bool)
        computes them only where it is True, [N, V] in row-major order: DPO scores a reply's
        tokens, not the prompt's or the padding's (the head is a fifth of SmolLM2's FLOPs).
        """
        plain = targets is None and keep is None and positions is None and key_mask is None
        if self.native_step is not None and cache is not None and plain:
            logits = self.native_step(idx, cache, last_only)
            if logits is not None:
                return logits
        x = self.features(idx, cache=cache, positions=positions, key_mask=key_mask, causal=causal)
        if last_only:
            x = x[:, -1:]
        if keep is not None:
            if targets is not None:
                raise ValueError("keep= returns the kept positions' logits; score them yourself")
            return self.head(x[keep])  # [N, V]
        logits = self.head(x)  # [B, T, V], or [B, T, L] for a classify / tag head
        if targets is None:
            return logits
        if targets.dim() == 3:  # [B, T, F]: F label fields, a cross-entropy each, summed
            parts = logits.float().split(self.config.label_sizes, dim=-1)
            loss = logits.new_zeros((), dtype=torch.float32)
            for k, part in enumerate(parts):
                y = targets[..., k].flatten()
                # a mean over the rows labelled for this field (a batch may have none)
                total = F.cross_entropy(part.flatten(0, 1), y, ignore_index=-100, reduction="sum")
                loss = loss + total / (y != -100).sum().clamp(min=1)
            return logits, loss
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )
        return logits, loss
