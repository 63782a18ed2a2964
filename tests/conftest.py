"""Shared fixtures: a tiny model built in seconds, a fresh config and store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach for a hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every machine runs the suite in the same precision: [model] dtype = "auto"
# measures whether this CPU is faster in bfloat16 (tuneloop/engine/device.py).
os.environ.setdefault("TUNELOOP_CPU_DTYPE", "float32")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny GPT built by the starter recipe with tiny sizes.

    Built once per machine into the tuneloop cache, keyed by its recipe like
    the starter itself, so test runs (and parallel runs) share one build.
    Read-only: a test that changes weights copies the folder first.
    """
    from trainer.starter import TINY, ensure_starter

    return ensure_starter(recipe=TINY, progress=False)


def write_tiny_gguf(path: Path, seed: int = 0):
    """A tiny Llama (2 layers, width 64, grouped KV heads, tied embeddings) written as a GGUF file.

    Tensors are laid out as llama.cpp's converter writes them (q/k rows
    permuted for its rope), the tokenizer is a byte-level BPE with a ChatML
    template, all carried by the file, as a real GGUF carries them. Returns
    the transformers model the file was written from, to compare against.
    """
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_chars = list(bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "Ġ t", "Ġt he"]
    tokens = specials + byte_chars + [m.replace(" ", "") for m in merges]
    heads, kv_heads, hidden = 4, 2, 64
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm lost in conversion shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)

    def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(128)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(specials)
                           + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> tuple[Path, object]:
    """A tiny Llama as a GGUF file, and the transformers model it was written from."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)
