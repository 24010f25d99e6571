"""A llama-architecture GGUF file (as llama.cpp writes it) as a source.

MLX reads Q4_0/Q4_1/Q8_0 tensors natively as affine-quantized weight/scales/biases
(group 32), so those are kept as they are unless other bits are asked for. llama.cpp
permutes the rows of the Q and K projections for its rotary embedding; we undo it. The
permutation is over output rows and quantization groups run along input columns, so
permuting weight, scales and biases rows alike is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxdist.errors import UserError
from mlxdist.files import sha256_file
from quantize.safetensors_io import MX_TO_ST
from quantize.source_api import SourceTensor

# GGUF tensor name -> Hugging Face name (llama)
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _hf_name(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{suffix}"
    return None


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, mx.array) and v.ndim == 0 else v


def unpermute_rows(x: mx.array, n_head: int) -> mx.array:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py) over the rows of x."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


class GGUFSource:
    def __init__(self, path: Path):
        self.path = path
        try:
            weights, self.metadata = mx.load(str(path), return_metadata=True)
        except Exception as e:  # mlx raises RuntimeError/ValueError with a C++ message
            raise UserError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0]})") from None
        arch = _scalar(self.metadata.get("general.architecture"))
        if arch != "llama":
            raise UserError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
        self.config = self._config(weights)
        self.weights: dict[str, mx.array] = {}
        for name, arr in weights.items():
            hf = _hf_name(name)
            if hf is None:
                if name.endswith("rope_freqs.weight"):
                    continue
                raise UserError(f"{path}: unexpected tensor {name}")
            self.weights[hf] = arr
        # module -> (bits, group size) of weights MLX read already quantized
        self.native: dict[str, tuple[int, int]] = {}
        for n in self.weights:
            if n.endswith(".scales"):
                base = n[: -len(".scales")]
                w, s = self.weights[base + ".weight"], self.weights[n]
                group_size = 32  # Q4_0/Q4_1/Q8_0 all quantize blocks of 32
                self.native[base] = (w.shape[-1] * 32 // (s.shape[-1] * group_size), group_size)
        self.hashes: dict[str, str] = {}  # the file's sha256 stands for all of them
        self.tensors = {
            n: SourceTensor(n, tuple(a.shape), MX_TO_ST[a.dtype], a.nbytes)
            for n, a in sorted(self.weights.items())
        }

    def _config(self, weights: dict[str, mx.array]) -> dict[str, Any]:
        md = {k: _scalar(v) for k, v in self.metadata.items() if not k.startswith("tokenizer.ggml.")}
        try:
            hidden = int(md["llama.embedding_length"])
            heads = int(md["llama.attention.head_count"])
            config = {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": int(md["llama.feed_forward_length"]),
                "num_attention_heads": heads,
                "num_key_value_heads": int(md.get("llama.attention.head_count_kv", heads)),
                "num_hidden_layers": int(md["llama.block_count"]),
                "head_dim": int(md.get("llama.rope.dimension_count", hidden // heads)),
                "rms_norm_eps": float(md["llama.attention.layer_norm_rms_epsilon"]),
                "rope_theta": float(md.get("llama.rope.freq_base", 10000.0)),
                "vocab_size": int(weights["token_embd.weight"].shape[0]),
                "max_position_embeddings": int(md.get("llama.context_length", 2048)),
                "tie_word_embeddings": "output.weight" not in weights,
                "torch_dtype": "float16",
            }
        except KeyError as e:
            raise UserError(f"{self.path}: GGUF metadata lacks {e.args[0]}") from None
        for key in ("bos_token_id", "eos_token_id"):
            v = self.metadata.get(f"tokenizer.ggml.{key}")
            if v is not None:
                config[key] = int(_scalar(v))
        return config

    def read(self, name: str) -> mx.array:
        arr = self.weights[name]
        if ".self_attn.q_proj." in name:
            arr = unpermute_rows(arr, self.config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            arr = unpermute_rows(arr, self.config["num_key_value_heads"])
        return arr

    def write_tokenizer(self, dst: Path) -> None:
        """Rebuild a Hugging Face fast tokenizer from the GGUF metadata (vocabulary, merges,
        special tokens, chat template) with transformers' GGUF converter."""
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import gguf_tokenizer_mapping as g

        md = self.metadata

        def value(v: Any) -> Any:
            if isinstance(v, mx.array):
                return v.item() if v.ndim == 0 else v.tolist()
            return v

        grouped = {
            group: {new: value(md[f"tokenizer.{key}"]) for key, new in renames.items() if f"tokenizer.{key}" in md}
            for group, renames in g.GGUF_TOKENIZER_MAPPING.items()
        }
        tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
        if "tokens" not in tokenizer:
            raise UserError(f"{self.path}: GGUF has no tokenizer vocabulary")
        for name, key in g._SPECIAL_TOKENS.items():
            token_id = md.get(f"tokenizer.ggml.{key}")
            if token_id is not None:
                tokenizer_config[name] = tokenizer["tokens"][int(value(token_id))]
        backend, _ = g.convert_gguf_tokenizer(value(md["general.architecture"]), tokenizer)
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
        fast.save_pretrained(str(dst))

    def fingerprint(self) -> dict[str, Any]:
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "files": {self.path.name: [st.st_size, st.st_mtime_ns]}}

    def sha256(self) -> str:
        return sha256_file(self.path)
