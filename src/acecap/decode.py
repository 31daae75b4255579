"""Fast batched generation: each clip is prefilled unpadded into its own row of a static KV cache, then one
decode step serves the whole batch per token (on CUDA replayed as a CUDA graph).

transformers' generate() pays per step for what batching should amortise: its cache grows by copying
(torch.cat) every step, and a padded batch expands the grouped KV heads to all query heads in every layer.
Here the cache is allocated once, attention reads each KV head once, rows need no padding, and the language
model's head runs on the last prompt token only. Norms, projections, MLPs and the audio encoder are the
checkpoint's own modules; only attention, the rotary embedding and the cache are written out here.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from . import compat, devices
from .generate import Decoding

DECODERS = ("auto", "static", "compiled", "graphs", "transformers")
log = logging.getLogger("acecap")


def choose_decoder(decoder: str, device: torch.device) -> str:
    """'auto' is CUDA graphs on CUDA (the step is launch-bound there) and the static cache elsewhere."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    if decoder == "graphs" and device.type != "cuda":
        raise ValueError(f"--decoder graphs needs a CUDA device, not {device.type}")
    if decoder == "compiled":
        backend, reason = devices.compiler(device)
        if backend is None:
            log.warning("decoding eagerly (static) on %s: %s", device, reason)
            return "static"
    if decoder == "auto":
        return "graphs" if device.type == "cuda" else "static"
    return decoder


def cache_bytes_per_token(thinker) -> int:
    """KV cache bytes one token of context takes in every layer."""
    config = compat.text_model(thinker).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = thinker.lm_head.weight.element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Rows whose cache lengths are within this factor share one cache tensor; attention reads each group's
# own length, so a short clip batched with long ones costs its own length, not the longest's.
GROUP_SLACK = 1.25


def length_groups(capacities: list[int], slack: float = GROUP_SLACK) -> list[tuple[int, int]]:
    """[start, end) ranges over capacities sorted ascending, each group's largest within `slack` of its first."""
    groups, start = [], 0
    for row in range(1, len(capacities) + 1):
        if row == len(capacities) or capacities[row] > slack * capacities[start]:
            groups.append((start, row))
            start = row
    return groups


def cache_slots(capacities: list[int]) -> int:
    """Token slots a Decoder with these row capacities (ascending) allocates: each group at its largest."""
    return sum((end - start) * capacities[end - 1] for start, end in length_groups(capacities))


# Prompt tokens one prefill pass takes by default: enough for the matrix products to run near the device's
# peak (a 3-minute song is ~4,500 tokens), small enough that a pass's activations stay ~2 GB at the 7B shapes.
PREFILL_TOKENS = 16384


def pack(lengths: list[int], budget: int, together: bool = True) -> list[list[tuple[int, int, int]]]:
    """Prompts cut into passes of at most `budget` tokens: per pass, (prompt index, start, end) segments.

    Prompts keep their order; one that does not fit what is left of a pass continues in the next, so every
    pass but the last is full and a prompt's segments come in order. With `together` False, a prompt never
    shares a pass with another.
    """
    if budget < 1:
        raise ValueError("the prefill budget must be at least one token")
    passes, current, room = [], [], budget
    for index, length in enumerate(lengths):
        if current and not together:
            passes.append(current)
            current, room = [], budget
        start = 0
        while start < length:
            end = min(length, start + room)
            current.append((index, start, end))
            room -= end - start
            start = end
            if room == 0:
                passes.append(current)
                current, room = [], budget
    if current:
        passes.append(current)
    return passes


class Decoder:
    """The thinker's language model run over static KV caches, one block per group of similar lengths.

    Rows come sorted by capacity (the cache slots of a prompt and its new tokens); a row whose clip has
    ended can be filled again with any prompt that fits its capacity.
    Audio-only prompts get sequential positions on all three rotary axes (Qwen2.5-Omni's 3-D positions
    differ only for images and video), so the rotary embedding is the plain one and a token's position is
    its cache slot.
    """

    def __init__(self, thinker, capacities: list[int], compile_backend=None, pack_prompts: bool | None = None):
        """`capacities`: each row's cache slots (its prompt and new tokens), ascending. `compile_backend`: what
        torch.compile takes as backend (a name, or torchair's function); None: eager. `pack_prompts`: several
        prompts in one prefill pass (None: where the device gains by it, devices.packs_prompts)."""
        if capacities != sorted(capacities):
            raise ValueError("Decoder rows must be sorted by capacity")
        text = compat.text_model(thinker)
        config = text.config
        self.embed = text.embed_tokens
        self.layers = list(text.layers)
        self.norm = text.norm
        self.head = thinker.lm_head
        self.inv_freq = text.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(text.rotary_emb, "attention_scaling", 1.0))
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.shape = (self.heads, self.kv_heads, self.head_dim)
        self.dtype = self.embed.weight.dtype
        device = self.embed.weight.device
        self.pack_prompts = devices.packs_prompts(device) if pack_prompts is None else pack_prompts
        # Each layer's keys (and values) live in one flat tensor of group blocks, (rows, kv_heads, capacity,
        # head_dim) each; the layout rows say where: start row, end row, capacity, offset. The layout is a
        # tensor, not Python structure, so one compiled step serves every batch.
        # Each row's own block start and capacity too, so that a step's writes are one index_copy_ per layer,
        # inside a compiled graph rather than in the attention operator.
        layout, size, row_start, row_capacity = [], 0, [], []
        for start, end in length_groups(capacities):
            capacity = capacities[end - 1]
            row_size = self.kv_heads * capacity * self.head_dim
            layout.append((start, end, capacity, size))
            row_start += [size + row * row_size for row in range(end - start)]
            row_capacity += [capacity] * (end - start)
            size += (end - start) * row_size
        self.capacities = row_capacity  # on the host, for choosing which clip a free row can take
        self.layout = torch.tensor(layout)  # on the CPU: read by Python, never a device sync
        self.row_start = torch.tensor(row_start, device=device)
        self.row_capacity = torch.tensor(row_capacity, device=device)
        self.groups = [(start, end, capacity, offset) for start, end, capacity, offset in layout]
        self.keys = [torch.zeros(size, dtype=self.dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(size, dtype=self.dtype, device=device) for _ in self.layers]
        self.slots = torch.arange(capacities[-1], device=device)
        self.run_step = compiled_step(compile_backend, device.type) if compile_backend else decode_step

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos() * self.rope_scale, angles.sin() * self.rope_scale
        return cos.to(self.dtype), sin.to(self.dtype)

    def prefill(self, rows: list[int], embeds: list[torch.Tensor], budget: int = PREFILL_TOKENS) -> torch.Tensor:
        """Run prompts (tokens, hidden) into their rows' caches; each prompt's last-token logits (fp32).

        The prompts are packed into passes of at most `budget` tokens (with pack_prompts): the projections
        and MLPs of a pass are one matrix product over all its tokens, and attention runs per prompt, causal
        within it. A prompt longer than what is left of a pass continues in the next one, attending to what
        is already in its cache, so memory stays bounded for any prompt length.
        """
        logits: list[torch.Tensor | None] = [None] * len(rows)
        for segments in pack([len(e) for e in embeds], budget, self.pack_prompts):
            hidden = torch.cat([embeds[i][start:end] for i, start, end in segments])[None]
            cos, sin = self._rope(torch.cat([self.slots[start:end] for _, start, end in segments]))
            for layer_index, layer in enumerate(self.layers):
                q, k, v = _qkv(layer, hidden, cos, sin, self.shape)
                outs, at = [], 0
                for i, start, end in segments:
                    count = end - start
                    outs.append(self._attend_prompt(layer_index, rows[i], start, end, q, k, v, at))
                    at += count
                attended = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, hidden.shape[1], -1)
                hidden = _finish(layer, hidden, attended)
            at = 0
            for i, start, end in segments:
                at += end - start
                if end == len(embeds[i]):  # the prompt's last token: its logits start the decoding
                    logits[i] = self.head(self.norm(hidden[:, at - 1])).float()[0]
        return torch.stack(logits)

    def _attend_prompt(self, layer_index, row, start, end, q, k, v, at) -> torch.Tensor:
        """Store one prompt segment's keys and values in its row, and its attention (1, heads, tokens, head_dim)."""
        group = next(g for g in self.groups if g[0] <= row < g[1])
        count = end - start
        keys = _block(self.keys[layer_index], *group, k)[row - group[0]]
        values = _block(self.values[layer_index], *group, v)[row - group[0]]
        keys[:, start:end] = k[0, :, at : at + count]
        values[:, start:end] = v[0, :, at : at + count]
        scale = self.layers[layer_index].self_attn.scaling
        repeats = self.heads // self.kv_heads
        query = q[:, :, at : at + count]
        if start == 0:  # the whole prompt so far is this segment: plain causal attention over it
            seg_k = k[:, :, at : at + count].repeat_interleave(repeats, dim=1)
            seg_v = v[:, :, at : at + count].repeat_interleave(repeats, dim=1)
            return F.scaled_dot_product_attention(query, seg_k, seg_v, is_causal=True, scale=scale)
        # A continuation: its queries see the row's cache up to themselves (bottom-right causal).
        seen_k = keys[None, :, :end].repeat_interleave(repeats, dim=1)
        seen_v = values[None, :, :end].repeat_interleave(repeats, dim=1)
        visible = self.slots[:end][None, :] <= self.slots[start:end][:, None]
        return F.scaled_dot_product_attention(query, seen_k, seen_v, attn_mask=visible, scale=scale)

    def step(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at slot `lengths[row]`; the next logits (rows, vocab) in fp32.

        Shapes never change between steps, so the whole step can be captured as one CUDA graph.
        """
        return self.run_step(self, tokens, lengths)


def decode_step(decoder: Decoder, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One decode step of every layer; a plain function of the decoder, so that it can be compiled whole."""
    cos, sin = decoder._rope(lengths[:, None])  # (rows, 1, head_dim)
    cos, sin = cos[:, None], sin[:, None]
    visible = decoder.slots[None, :] <= lengths[:, None]  # (rows, largest capacity): each row's filled slots
    written = _cache_places(decoder, lengths)
    # Compilers see one opaque operator; eager calls skip its dispatch (~0.1 ms a call on the CPU).
    attention = attend if torch.compiler.is_compiling() else attend_groups
    hidden = decoder.embed(tokens)[:, None]
    for i, layer in enumerate(decoder.layers):
        q, k, v = _qkv(layer, hidden, cos, sin, decoder.shape)
        keys, values = decoder.keys[i], decoder.values[i]
        keys.index_copy_(0, written, k.flatten())
        values.index_copy_(0, written, v.flatten())
        query = q.reshape(len(tokens), decoder.kv_heads, -1, decoder.head_dim)
        attended = attention(query, visible, keys, values, decoder.layout, layer.self_attn.scaling)
        hidden = _finish(layer, hidden, attended)
    return decoder.head(decoder.norm(hidden[:, 0])).float()


def _cache_places(decoder: Decoder, lengths: torch.Tensor) -> torch.Tensor:
    """Where each element of a step's keys (rows, kv_heads, 1, head_dim), flattened, goes in a flat layer cache."""
    heads = torch.arange(decoder.kv_heads, device=lengths.device)[:, None]
    slots = heads * decoder.row_capacity[:, None, None] + lengths[:, None, None]  # (rows, kv_heads, 1)
    dims = torch.arange(decoder.head_dim, device=lengths.device)
    return (decoder.row_start[:, None, None] + slots * decoder.head_dim + dims).flatten()


def _block(cache: torch.Tensor, start: int, end: int, capacity: int, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A group's block of a flat layer cache, (rows, kv_heads, capacity, head_dim); `like` gives the heads."""
    _, kv_heads, _, head_dim = like.shape
    return cache[offset : offset + (end - start) * kv_heads * capacity * head_dim].view(
        end - start, kv_heads, capacity, head_dim
    )


def attend_groups(
    query: torch.Tensor,
    visible: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attend over each group's own length of a layer's flat cache, this step's keys and values already in it.

    One opaque operator to compilers: the number of groups and their sizes never enter a compiled graph.
    query: (rows, kv_heads, heads per KV head, head_dim), so that each KV head is read once for its group of
    query heads (no expansion to all heads); returns (rows, 1, heads * head_dim).
    """
    outs = []
    for start, end, capacity, offset in layout.tolist():
        group_keys = _block(keys, start, end, capacity, offset, query)
        group_values = _block(values, start, end, capacity, offset, query)
        # The fused kernel reads the cache once, where two matmuls and a softmax read it twice.
        out = F.scaled_dot_product_attention(
            query[start:end], group_keys, group_values, attn_mask=visible[start:end, None, None, :capacity], scale=scale
        )
        outs.append(out.reshape(end - start, 1, -1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


attend = torch.library.custom_op("acecap::attend", attend_groups, mutates_args=())


@attend.register_fake
def _(query, visible, keys, values, layout, scale):
    rows, kv_heads, group, head_dim = query.shape
    return query.new_empty(rows, 1, kv_heads * group * head_dim)


def _qkv(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shape: tuple[int, int, int]):
    """A layer's normed projections of (rows, tokens, hidden) to (rows, heads, tokens, head_dim), q and k rotated."""
    heads, kv_heads, head_dim = shape
    attention = layer.self_attn
    rows, tokens, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    q = attention.q_proj(normed).view(rows, tokens, heads, head_dim).transpose(1, 2)
    k = attention.k_proj(normed).view(rows, tokens, kv_heads, head_dim).transpose(1, 2)
    v = attention.v_proj(normed).view(rows, tokens, kv_heads, head_dim).transpose(1, 2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _finish(layer, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a layer after attention: output projection and residual, then the MLP and residual."""
    hidden = hidden + layer.self_attn.o_proj(attended)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@functools.cache
def compiled_step(backend, device_type: str):
    """decode_step compiled once per process: shapes dynamic, the batch layout a tensor, so batches reuse it."""
    compiled = torch.compile(decode_step, backend=backend, dynamic=True)
    config = devices.compile_config(device_type)

    def run(decoder: Decoder, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Both read while tracing, inside the call. Without duck sizing, a batch whose group count equals
        # its row count would tie the two sizes, and the next batch would compile again.
        with torch._inductor.config.patch(config), torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(decoder, tokens, lengths)

    return run


class GraphedStep:
    """Decoder.step captured once as a CUDA graph for a fixed number of rows, then replayed every token."""

    def __init__(self, decoder: Decoder, tokens: torch.Tensor, lengths: torch.Tensor):
        self.tokens, self.lengths = tokens.clone(), lengths.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs require
            decoder.step(self.tokens, self.lengths)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step(self.tokens, self.lengths)

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.lengths.copy_(lengths)
        self.graph.replay()
        return self.logits


def pick(logits: torch.Tensor, decoding: Decoding, seen: torch.Tensor, generator) -> torch.Tensor:
    """Next token per row, in the order transformers applies them: repetition penalty, temperature, top-p."""
    if decoding.repetition_penalty != 1.0:
        penalised = torch.where(logits < 0, logits * decoding.repetition_penalty, logits / decoding.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if decoding.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / decoding.temperature
    if decoding.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the more likely ones already hold top_p; the most likely one always stays.
        drop = cumulative - ordered.softmax(dim=-1) > decoding.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
