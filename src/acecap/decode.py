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
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import compat, devices
from .generate import Decoding, Generated

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


class Decoder:
    """The thinker's language model run over static KV caches, one block per group of similar lengths.

    Rows must come sorted by prompt length; each holds its prompt and up to `new_tokens` more.
    Audio-only prompts get sequential positions on all three rotary axes (Qwen2.5-Omni's 3-D positions
    differ only for images and video), so the rotary embedding is the plain one and a token's position is
    its cache slot.
    """

    def __init__(self, thinker, prompt_lengths: list[int], new_tokens: int, compile_backend=None):
        """`compile_backend`: what torch.compile takes as backend (a name, or torchair's function); None: eager."""
        if prompt_lengths != sorted(prompt_lengths):
            raise ValueError("Decoder rows must be sorted by prompt length")
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
        capacities = [n + new_tokens for n in prompt_lengths]
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
        self.layout = torch.tensor(layout)  # on the CPU: read by Python, never a device sync
        self.row_start = torch.tensor(row_start, device=device)
        self.row_capacity = torch.tensor(row_capacity, device=device)
        self.keys = [torch.zeros(size, dtype=self.dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(size, dtype=self.dtype, device=device) for _ in self.layers]
        self.slots = torch.arange(capacities[-1], device=device)
        self.run_step = compiled_step(compile_backend, device.type) if compile_backend else decode_step

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos() * self.rope_scale, angles.sin() * self.rope_scale
        return cos.to(self.dtype), sin.to(self.dtype)

    def prefill(self, row: int, embeds: torch.Tensor) -> torch.Tensor:
        """Run one prompt's embeddings (tokens, hidden) into its cache row; the last token's logits (fp32)."""
        start, end, capacity, offset = next(g for g in self.layout.tolist() if g[0] <= row < g[1])
        tokens = embeds.shape[0]
        hidden = embeds[None]
        cos, sin = self._rope(self.slots[:tokens])
        repeats = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = _qkv(layer, hidden, cos, sin, self.shape)
            _block(self.keys[i], start, end, capacity, offset, k)[row - start, :, :tokens] = k[0]
            _block(self.values[i], start, end, capacity, offset, v)[row - start, :, :tokens] = v[0]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.self_attn.scaling)
            hidden = _finish(layer, hidden, out.transpose(1, 2).reshape(1, tokens, -1))
        return self.head(self.norm(hidden[:, -1])).float()[0]

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


def generate_static(
    thinker,
    prompts: list[torch.Tensor],
    embeds: list[torch.Tensor],
    decoding: Decoding,
    end_ids: list[int],
    pad_id: int,
    decoder: str = "static",
    on_step: Callable[[list[int]], None] | None = None,
) -> Generated:
    """Generate for a batch of prompts (token ids and their embeddings, audio merged in), one row each.

    `on_step` gets each row's new token after every step, in the caller's row order.
    """
    device = thinker.device
    start = devices.now(device)
    rows = len(prompts)
    order = sorted(range(rows), key=lambda r: len(prompts[r]))  # the decoder groups rows of similar length
    position = [order.index(r) for r in range(rows)]  # where each caller's row sits in the decoder
    prompts, embeds = [prompts[r] for r in order], [embeds[r] for r in order]
    backend = devices.compiler(device)[0] if decoder == "compiled" else None
    # On CUDA the compiled step is captured too: fused kernels, and no launches left to pay for.
    graphs = decoder == "graphs" or (decoder == "compiled" and device.type == "cuda")
    decoder = Decoder(thinker, [len(p) for p in prompts], decoding.max_new_tokens, backend)
    vocab = thinker.lm_head.out_features
    ends = torch.tensor(end_ids, device=device)
    with torch.inference_mode():
        logits = torch.stack([decoder.prefill(row, e) for row, e in enumerate(embeds)])
        first = devices.now(device)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        if decoding.repetition_penalty != 1.0:
            for row, ids in enumerate(prompts):
                seen[row, ids] = True
        generator = None
        if decoding.temperature > 0:
            generator = torch.Generator(device=device)
            if decoding.seed is not None:
                generator.manual_seed(decoding.seed)
        step = None
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        batch_rows = torch.arange(rows, device=device)
        out = []
        for n in range(decoding.max_new_tokens):
            if decoding.ignore_eos:
                logits[:, ends] = float("-inf")
            tokens = pick(logits, decoding, seen, generator)
            tokens = torch.where(done, pad_id, tokens)
            out.append(tokens)
            if on_step is not None:
                picked = tokens.tolist()
                on_step([picked[p] for p in position])
            done |= torch.isin(tokens, ends)
            if n == decoding.max_new_tokens - 1 or bool(done.all()):
                break
            seen[batch_rows, tokens] = True
            if graphs:
                step = step or GraphedStep(decoder, tokens, lengths)
                logits = step(tokens, lengths)
            else:
                logits = decoder.step(tokens, lengths)
            lengths = lengths + 1
        end = devices.now(device)
    table = torch.stack(out, dim=1).tolist()
    tokens, finished = [], []
    for row in [table[p] for p in position]:
        stop = next((i for i, token in enumerate(row) if token in end_ids), None)
        finished.append(stop is not None)
        tokens.append(row if stop is None else row[: stop + 1])
    return Generated(tokens=tokens, finished=finished, first_token_s=first - start, total_s=end - start)
