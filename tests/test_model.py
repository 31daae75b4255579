import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

from acecap import compat
from acecap.model import (
    RESIDENT_PARAMETERS_7B,
    TASKS,
    AudioThinker,
    load_processor,
    load_thinker,
    parameter_count,
    render_prompt,
    resident_parameters,
    thinker_config,
)

SEVEN_B = Path(__file__).parent / "data" / "qwen2_5_omni_7b_config.json"
# The seed's reference caption (NPU output); the seed reports 48 tokens with the end token.
SEED_CAPTION = (
    "A single, sustained, and heavily distorted sawtooth synthesizer note creates a harsh, buzzing texture. "
    "The sound is static and monolithic, with a gritty, abrasive character and a very long, abrupt decay "
    "that ends in silence."
)


@pytest.fixture(scope="module")
def seven_b_folder(tmp_path_factory) -> Path:
    """A folder with the full 7B config.json and no weights."""
    folder = tmp_path_factory.mktemp("qwen7b")
    shutil.copy(SEVEN_B, folder / "config.json")
    return folder


def test_7b_shapes_keep_at_most_8_26_billion_parameters(seven_b_folder):
    with torch.device("meta"):
        lean = AudioThinker(thinker_config(seven_b_folder))
        full = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig.from_pretrained(seven_b_folder))
    # The reference: the whole checkpoint the seed loads, and its parts.
    assert parameter_count(full) == 10_732_225_408
    assert parameter_count(full.thinker) == 8_931_813_888
    assert parameter_count(lean) == 8_931_813_888 - 676_550_144 == RESIDENT_PARAMETERS_7B  # minus the vision tower
    assert parameter_count(lean) <= 8.26e9
    names = [name for name, _ in lean.named_parameters()]
    assert not any("visual" in n or "talker" in n or "token2wav" in n for n in names)
    assert any("audio_tower" in n for n in names) and "lm_head.weight" in names


def test_tiny_checkpoint_has_the_full_official_layout(tiny_model):
    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())["weight_map"]
    prefixes = {".".join(key.split(".")[:2]) for key in index}
    assert {"thinker.audio_tower", "thinker.visual", "thinker.model", "thinker.lm_head"} <= prefixes
    assert any(p.startswith("talker.") for p in prefixes) and any(p.startswith("token2wav.") for p in prefixes)
    for name in ("spk_dict.pt", "chat_template.json", "preprocessor_config.json", "tokenizer.json", "vocab.json"):
        assert (tiny_model / name).is_file()


def test_loading_leaves_only_audio_and_text_weights_on_the_device(tiny_model):
    model = load_thinker(tiny_model, torch.device("cpu"), torch.float32)
    names = [name for name, _ in model.named_parameters()]
    assert not any("visual" in n or "talker" in n or "token2wav" in n for n in names)
    # Every weight equals the checkpoint's (loaded through the renames of either transformers line).
    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())["weight_map"]
    thinker_keys = [k for k in index if k.startswith("thinker.") and ".visual." not in k]
    assert len(thinker_keys) == len(names)
    state = dict(model.named_parameters())
    for key in thinker_keys:
        with safe_open(tiny_model / index[key], "pt") as shard:
            expected = shard.get_tensor(key)
        assert torch.equal(state[loaded_name(key)].to(expected.dtype), expected), key


def loaded_name(key: str) -> str:
    """Where a checkpoint weight lives in the loaded model on this transformers line."""
    key = key.removeprefix("thinker.")
    if compat.NESTED_THINKER:
        key = re.sub(r"^(audio_tower)\.", r"model.\1.", key)
        key = re.sub(r"^model\.(?!audio_tower)", "model.language_model.", key)
    return key


def test_prompt_is_the_model_cards_chat(tiny_model):
    processor = load_processor(tiny_model)
    text = render_prompt(processor, TASKS["caption"].prompt)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "*Task* Describe this audio in detail<|audio_bos|><|AUDIO|><|audio_eos|><|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [{"role": "user", "content": [{"type": "text", "text": TASKS["caption"].prompt}, {"type": "audio"}]}]
    assert text == processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def test_real_tokenizer_counts_the_seed_caption_like_the_seed(tiny_model):
    tokenizer = load_processor(tiny_model).tokenizer
    ids = tokenizer(SEED_CAPTION)["input_ids"]
    assert len(ids) == 47 and len(ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]) == 48
    assert tokenizer.decode(ids) == SEED_CAPTION


def test_tasks_use_the_published_prompts_and_models():
    assert TASKS["caption"].prompt == "*Task* Describe this audio in detail"
    assert TASKS["caption"].model_id == "ACE-Step/acestep-captioner"
    assert TASKS["lyrics"].prompt == "*Task* Transcribe this audio in detail"
    assert TASKS["lyrics"].model_id == "ACE-Step/acestep-transcriber"


def test_features_padded_to_the_clip_equal_the_processors_300_s_padding(tiny_model):
    from acecap.captioner import FEATURE_MARGIN

    processor = load_processor(tiny_model)
    text = render_prompt(processor, TASKS["caption"].prompt)
    clip = np.random.default_rng(0).standard_normal(16000 * 7 + 123).astype(np.float32) * 0.1
    default = processor(text=[text], audio=[clip], return_tensors="pt")
    short = processor(
        text=[text], audio=[clip], return_tensors="pt",
        audio_kwargs={"sampling_rate": 16000, "max_length": len(clip) + FEATURE_MARGIN, "truncation": True},
    )  # fmt: skip
    frames = int(short["feature_attention_mask"].sum())
    assert frames == int(default["feature_attention_mask"].sum())
    assert default["input_features"].shape[-1] == 30000 and short["input_features"].shape[-1] < 800
    assert torch.equal(short["input_features"][..., :frames], default["input_features"][..., :frames])
    assert torch.equal(short["input_ids"], default["input_ids"])


def test_resident_parameters_are_read_from_the_checkpoint_headers(tiny_model):
    model = load_thinker(tiny_model, torch.device("cpu"), torch.float32)
    assert resident_parameters(tiny_model) == parameter_count(model)
