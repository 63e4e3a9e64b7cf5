"""The BERT-style encoder in plain PyTorch.

Post-LN transformer layers with the parameter shapes of BERT checkpoints (so `encoder.hf`
maps them 1:1), with three speed levers that do not change the math:

* padding tokens are removed before the layers run: every Linear / LayerNorm / GELU works
  on the N real tokens of the batch, not on B x T; only attention scores see the padded
  layout (SDPA with a key-padding mask);
* Q, K and V come from one fused (3H, H) projection;
* attention is `torch.nn.functional.scaled_dot_product_attention`.

Padding positions of the returned hidden states are exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EncoderConfig


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


class Unpadder:
    """Index bookkeeping between the padded (B, T) layout and the packed (N,) real tokens."""

    def __init__(self, attention_mask: torch.Tensor | None, batch: int, seq: int, device: torch.device,
                 enabled: bool = True):
        self.batch, self.seq = batch, seq
        self.index = self.key_mask = None  # index None: the packed layout is the flat padded one
        self.num_tokens = batch * seq
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.to(device=device, dtype=torch.bool)
            self.key_mask = keep[:, None, None, :]  # (B, 1, 1, T): True = may attend
            if enabled:  # disabled only to measure what unpadding buys (benchmarks/encoder_step.py)
                self.index = keep.flatten().nonzero().squeeze(1)  # (N,)
                self.num_tokens = int(self.index.numel())

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        flat = x.reshape(self.batch * self.seq, *x.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros where there was padding."""
        if self.index is not None:
            x = x.new_zeros(self.batch * self.seq, *x.shape[1:]).index_copy(0, self.index, x)
        return x.view(self.batch, self.seq, *x.shape[1:])


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        H = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, H)
        self.LayerNorm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, unpad: Unpadder) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.max_positions:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.max_positions}")
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        ids, pos, types = unpad.pack(input_ids), unpad.pack(positions), unpad.pack(token_type_ids)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(x))  # (N, H)


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(H, 3 * H)  # fused; rows are [query; key; value] as in BERT's three
        self.out = nn.Linear(H, H)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, unpad: Unpadder) -> torch.Tensor:
        # x: (N, H) packed real tokens
        B, T, nh, hd = unpad.batch, unpad.seq, self.num_heads, self.head_dim
        qkv = unpad.unpack(self.qkv(x))  # (B, T, 3H)
        q, k, v = qkv.view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=unpad.key_mask, dropout_p=self.dropout_p if self.training else 0.0
        )  # (B, nh, T, hd)
        y = unpad.pack(y.transpose(1, 2).reshape(B, T, nh * hd))  # (N, H)
        return self.out(y)


class TransformerLayer(nn.Module):
    """Post-LN block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        H = config.hidden_size
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(H, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, H)
        self.output_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor, unpad: Unpadder) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, unpad)))
        return self.output_norm(x + self.dropout(self.output(self.act(self.intermediate(x)))))


class Pooler(nn.Module):
    """tanh(W h_cls + b): BERT's pooled [CLS] representation."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, h_cls: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, H)
        return torch.tanh(self.dense(h_cls))


class TransformerStack(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, unpad: Unpadder) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, unpad)
        return x


class Encoder(nn.Module):
    """Token ids -> hidden states (B, T, H). `pooler` gives BERT's pooled h_cls for heads."""

    def __init__(self, config: EncoderConfig, add_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.stack = TransformerStack(config)
        self.pooler = Pooler(config.hidden_size) if add_pooler else None
        self.unpad = True  # drop padding before the layers; same math either way
        init_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) long
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = padding
        token_type_ids: torch.Tensor | None = None,  # (B, T) segment 0 / 1
    ) -> torch.Tensor:
        B, T = input_ids.shape
        unpad = Unpadder(attention_mask, B, T, input_ids.device, self.unpad)
        x = self.embeddings(input_ids, token_type_ids, unpad)  # (N, H)
        return unpad.unpack(self.stack(x, unpad))  # (B, T, H)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pooler is None:
            raise RuntimeError("this encoder was built without a pooler")
        return self.pooler(hidden[:, 0])

    def set_frozen(self, frozen: bool = True) -> "Encoder":
        """Frozen = a feature extractor: no parameter of the encoder receives gradients."""
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """The one place weights are initialized: BERT's truncated-free normal(0, std) scheme."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def flops_per_token(config: EncoderConfig, seq_len: int) -> float:
    """Training FLOPs per token (fwd + bwd = 3 x fwd) of the encoder layers, dense + attention."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    dense = 2 * (4 * H * H + 2 * H * I)  # qkv + out + ffn, 2 FLOPs per MAC
    attn = 2 * 2 * seq_len * H  # scores + weighted sum
    return 3.0 * L * (dense + attn)

