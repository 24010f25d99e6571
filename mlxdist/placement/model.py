"""What a model costs, from its config.json alone: bytes per layer part at a given
quantization, and KV-cache bytes per token.

The byte counts follow what mlx-lm allocates after `mlx_lm.utils.quantize_model` with
MLX affine quantization: a quantized matrix of shape (out, in) takes out*in*bits/8 bytes
of packed weights plus one scale and one bias per group of `group_size` inputs, stored
in the model's float dtype. Matrices whose input size is not a multiple of the group
size, norms, biases and DeepSeek's router stay in the float dtype (the router's
`e_score_correction_bias` stays float32). tests/placement/test_placement_model.py checks
these numbers against a real mlx-lm model of every supported architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxdist.errors import UserError

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Quant:
    bits: int = 4  # 0 or 16 means unquantized
    group_size: int = 64
    dtype_bytes: int = 2  # float dtype of scales, biases, norms and activations

    def matrix(self, out_dims: int, in_dims: int, *, bits: int | None = None, group_size: int | None = None) -> int:
        """Bytes of one (out, in) weight matrix as mlx-lm stores it."""
        b = self.bits if bits is None else bits
        gs = self.group_size if group_size is None else group_size
        if b in (0, 16) or in_dims % gs:
            return out_dims * in_dims * self.dtype_bytes
        groups = out_dims * (in_dims // gs)
        return out_dims * in_dims * b // 8 + 2 * groups * self.dtype_bytes


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer. Every byte count is for the whole layer; `routed_experts` is
    all routed experts together (each is routed_experts // n_routed bytes)."""

    index: int
    attention: int  # attention projections and both layer norms
    dense_mlp: int  # the MLP of a dense layer (0 in a MoE layer)
    shared_experts: int  # DeepSeek's shared experts (0 elsewhere)
    router: int  # the gate that picks experts (0 in a dense layer)
    routed_experts: int  # all routed experts together (0 in a dense layer)
    n_routed: int  # number of routed experts (0 in a dense layer)
    experts_per_token: int  # experts each token reads (0 in a dense layer)
    kv_bytes_per_token: int  # KV cache this layer holds per token of context
    params_active: int  # weights one token multiplies (for the FLOP count)
    expert_params: int = 0  # weights of one routed expert
    attn_flops_per_position: int = 0  # attention FLOPs per token per cached position

    @property
    def is_moe(self) -> bool:
        return self.n_routed > 0

    @property
    def expert_bytes(self) -> int:
        return self.routed_experts // self.n_routed if self.n_routed else 0

    @property
    def replicated_bytes(self) -> int:
        """What every member of an expert-parallel group holds for this layer."""
        return self.attention + self.dense_mlp + self.shared_experts + self.router

    @property
    def total_bytes(self) -> int:
        return self.replicated_bytes + self.routed_experts


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    hidden_size: int
    vocab_size: int
    quant: Quant
    layers: tuple[LayerSpec, ...]
    embedding: int  # bytes of the token embedding (first stage)
    head: int  # final norm + lm_head (last stage); a copy of the embedding when tied
    tied_embeddings: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_bytes(self) -> int:
        """Weights on disk / in one process (a tied head is stored once)."""
        head = self.hidden_size * self.quant.dtype_bytes if self.tied_embeddings else self.head
        return self.embedding + head + sum(layer.total_bytes for layer in self.layers)

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(layer.kv_bytes_per_token for layer in self.layers)

    @property
    def activation_bytes_per_token(self) -> int:
        """Hidden state handed between stages per token."""
        return self.hidden_size * self.quant.dtype_bytes


def _dense_attention(c: dict[str, Any], q: Quant, *, qkv_bias: bool, qk_norm: bool) -> tuple[int, int, int, int]:
    d = c["hidden_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or d // heads
    b = q.dtype_bytes
    total = q.matrix(heads * head_dim, d) + 2 * q.matrix(kv_heads * head_dim, d)
    total += q.matrix(d, heads * head_dim)
    if qkv_bias:
        total += (heads + 2 * kv_heads) * head_dim * b
    if c.get("attention_bias") and not qkv_bias:  # llama's optional bias on all four
        total += ((heads + 2 * kv_heads) * head_dim + d) * b
    if qk_norm:
        total += 2 * head_dim * b
    total += 2 * d * b  # input and post-attention RMSNorm
    kv = 2 * kv_heads * head_dim * b
    params = d * head_dim * (2 * heads + 2 * kv_heads)
    return total, kv, params, 4 * heads * head_dim


def _glu(q: Quant, d: int, inner: int, *, bias: bool = False) -> int:
    total = 2 * q.matrix(inner, d) + q.matrix(d, inner)
    if bias:
        total += (2 * inner + d) * q.dtype_bytes
    return total


def _mla_attention(c: dict[str, Any], q: Quant) -> tuple[int, int, int, int]:
    d = c["hidden_size"]
    h = c["num_attention_heads"]
    rope, nope, v = c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]
    kv_rank, q_rank = c["kv_lora_rank"], c.get("q_lora_rank")
    b = q.dtype_bytes
    q_head = nope + rope
    if q_rank is None:
        total = q.matrix(h * q_head, d)
        params = h * q_head * d
    else:
        total = q.matrix(q_rank, d) + q_rank * b + q.matrix(h * q_head, q_rank)
        params = q_rank * d + h * q_head * q_rank
    total += q.matrix(kv_rank + rope, d) + kv_rank * b
    # kv_b_proj is split by mlx-lm into embed_q (h, kv_rank, nope) and
    # unembed_out (h, v, kv_rank): MultiLinear, quantized along their last axis.
    total += q.matrix(h * kv_rank, nope) + q.matrix(h * v, kv_rank)
    total += q.matrix(d, h * v) + 2 * d * b
    if c.get("attention_bias"):
        total += (kv_rank + rope + (q_rank or 0) + d) * b
    params += (kv_rank + rope) * d + h * kv_rank * (nope + v) + d * h * v
    # mlx-lm's DeepseekV3Attention caches the compressed latent (kv_rank) and the
    # shared rope key (rope) per token -- not expanded keys/values.
    kv = (kv_rank + rope) * b
    return total, kv, params, 2 * h * (2 * kv_rank + rope)


def describe(config: dict[str, Any], bits: int = 4, group_size: int = 64, name: str | None = None,
             dtype_bytes: int | None = None) -> ModelSpec:
    """A ModelSpec from an (HF or mlx-lm) config.json dict."""
    mt = config.get("model_type")
    if mt not in SUPPORTED:
        raise UserError(f"model_type {mt!r} is not supported by the planner (supported: {', '.join(SUPPORTED)})")
    if bits not in (2, 3, 4, 5, 6, 8, 16):
        raise UserError(f"--bits {bits}: MLX affine quantization takes 2, 3, 4, 5, 6 or 8 bits (16 = unquantized)")
    if dtype_bytes is None:
        dtype_bytes = DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2)
    q = Quant(bits=bits, group_size=group_size, dtype_bytes=dtype_bytes)
    c = config
    try:
        d, vocab, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
        layers = [_layer(mt, c, q, i) for i in range(n)]
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}, needed to size a {mt} model") from None
    tied = bool(c.get("tie_word_embeddings", mt in ("llama", "qwen2")))
    embedding = q.matrix(vocab, d)
    head = d * q.dtype_bytes + (embedding if tied else q.matrix(vocab, d))
    return ModelSpec(name=name or c.get("_name_or_path") or mt, model_type=mt, hidden_size=d,
                     vocab_size=vocab, quant=q, layers=tuple(layers), embedding=embedding,
                     head=head, tied_embeddings=tied)


def _layer(mt: str, c: dict[str, Any], q: Quant, i: int) -> LayerSpec:
    d = c["hidden_size"]
    if mt == "deepseek_v3":
        attn, kv, params, af = _mla_attention(c, q)
        moe = (c.get("n_routed_experts") is not None and i >= c.get("first_k_dense_replace", 0)
               and i % c.get("moe_layer_freq", 1) == 0)
        if not moe:
            inner = c["intermediate_size"]
            return LayerSpec(i, attn, _glu(q, d, inner), 0, 0, 0, 0, 0, kv, params + 3 * d * inner, 0, af)
        e, k, inner = c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]
        shared_inner = inner * (c.get("n_shared_experts") or 0)
        shared = _glu(q, d, shared_inner) if shared_inner else 0
        router = e * d * q.dtype_bytes + e * 4  # MoEGate weight (not quantized) + fp32 bias
        routed = e * _glu(q, d, inner)
        params += 3 * d * (shared_inner + k * inner) + e * d
        return LayerSpec(i, attn, 0, shared, router, routed, e, k, kv, params, 3 * d * inner, af)
    qkv_bias = mt == "qwen2"
    qk_norm = mt in ("qwen3", "qwen3_moe")
    attn, kv, params, af = _dense_attention(c, q, qkv_bias=qkv_bias, qk_norm=qk_norm)
    if mt == "qwen3_moe":
        e = c.get("num_experts", 0)
        sparse = (i not in c.get("mlp_only_layers", []) and e > 0
                  and (i + 1) % c.get("decoder_sparse_step", 1) == 0)
        if sparse:
            k, inner = c["num_experts_per_tok"], c["moe_intermediate_size"]
            # mlx-lm's quant_predicate quantizes the gate at 8 bits when it quantizes at all
            router = q.matrix(e, d, bits=8 if q.bits not in (0, 16) else 16, group_size=64)
            params += 3 * d * k * inner + e * d
            return LayerSpec(i, attn, 0, 0, router, e * _glu(q, d, inner), e, k, kv, params, 3 * d * inner, af)
    inner = c["intermediate_size"]
    mlp = _glu(q, d, inner, bias=bool(c.get("mlp_bias")) and mt == "llama")
    return LayerSpec(i, attn, mlp, 0, 0, 0, 0, 0, kv, params + 3 * d * inner, 0, af)


def load_model(spec: str, bits: int | None = None, group_size: int | None = None) -> ModelSpec:
    """MODEL as the CLI takes it: a config.json, a directory holding one, or a known name.
    `bits`/`group_size` default to the config's own "quantization" entry (an mlx-lm model
    already quantized), else 4 bits in groups of 64."""
    from mlxdist.placement.known_models import KNOWN_MODELS

    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        quant = config.get("quantization") or {}
        return describe(config, bits=bits or quant.get("bits", 4), group_size=group_size or quant.get("group_size", 64),
                        name=path.parent.name or str(path))
    if spec.lower() in KNOWN_MODELS:
        return describe(KNOWN_MODELS[spec.lower()], bits=bits or 4, group_size=group_size or 64, name=spec.lower())
    raise UserError(f"{spec!r} is neither a config.json, a directory holding one, nor a known model "
                    f"({', '.join(sorted(KNOWN_MODELS))})")
