"""The audio encoder over every 2-second window of a batch at once, one attention call per layer.

Qwen2.5-Omni's audio encoder attends within 2 s windows (n_window * 2 mel frames). transformers 5.x runs
attention window by window (about 90 calls per layer for a 3-minute song); 4.57 builds one dense mask over
every window of a call. Here the windows of all clips are stacked into one batch, (windows, heads, 100,
head_dim), so each layer is one attention call whatever the audio's length, and windows are independent,
so a call can take any subset of them: memory is bounded by `windows_per_call`. Convolutions, norms,
projections and MLPs are the checkpoint's own modules; the windows' rows come out in the library's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_audio(
    tower,
    features: torch.Tensor,
    frames: list[int],
    windows_per_call: int = 512,
    layer_outputs: list[list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The encoder's output rows (audio tokens, output_dim) of a batch, clips concatenated.

    features: (clips, mels, frames) in the tower's dtype; `frames[i]`: clip i's frame count (frames past it
    are never read). `layer_outputs`, if given, gets each layer's output rows (clips concatenated) appended
    to its list per layer, as a forward hook on the library's layers would see them.
    """
    width = 2 * tower.n_window  # mel frames in a window
    # (clip, first frame, frames) of every window, full windows apart from each clip's shorter last one:
    # full windows need no attention mask, so their attention can run on the fastest kernel.
    windows = [
        (clip, start, min(width, count - start))
        for clip, count in enumerate(frames)
        for start in range(0, count, width)
    ]
    full = [i for i, w in enumerate(windows) if w[2] == width]
    short = [i for i, w in enumerate(windows) if w[2] < width]
    rows: list[torch.Tensor | None] = [None] * len(windows)  # each window's output rows, before pooling
    layer_rows: list[list[torch.Tensor | None]] = [[None] * len(windows) for _ in tower.layers]
    for group in (full, short):
        for begin in range(0, len(group), max(1, windows_per_call)):
            call = group[begin : begin + windows_per_call]
            batch = torch.zeros(len(call), features.shape[1], width, dtype=features.dtype, device=features.device)
            for slot, index in enumerate(call):
                clip, start, length = windows[index]
                batch[slot, :, :length] = features[clip, :, start : start + length]
            lengths = torch.tensor([windows[i][2] for i in call], device=features.device)
            hidden, kept, per_layer = _windows(tower, batch, lengths, layer_outputs is not None)
            for slot, index in enumerate(call):
                rows[index] = hidden[slot, : kept[slot]]
                for layer, out in enumerate(per_layer):
                    layer_rows[layer][index] = out[slot, : kept[slot]]
    if layer_outputs is not None:
        for layer, outs in enumerate(layer_rows):
            layer_outputs[layer].append(torch.cat(outs))
    # Pairs of rows are averaged per clip (the library's stride-2 pooling), then normed and projected.
    pooled = []
    first = 0
    for count in frames:
        last = first + -(-count // width)
        clip_rows = torch.cat(rows[first:last])
        first = last
        pairs = len(clip_rows) // 2
        pooled.append((clip_rows[0 : 2 * pairs : 2] + clip_rows[1 : 2 * pairs : 2]) / 2)
    return tower.proj(tower.ln_post(torch.cat(pooled)))


def _windows(tower, batch: torch.Tensor, lengths: torch.Tensor, keep_layers: bool):
    """Windows (n, mels, width) through the convolutions and every layer: (n, tokens, d_model), each
    window's row count, and each layer's output when asked."""
    frame_mask = torch.arange(batch.shape[-1], device=batch.device) < lengths[:, None]
    hidden = F.gelu(tower.conv1(batch)) * frame_mask[:, None, :]
    hidden = F.gelu(tower.conv2(hidden)).transpose(1, 2)
    tokens = hidden.shape[1]
    hidden = hidden + tower.positional_embedding.positional_embedding[:tokens].unsqueeze(0).to(hidden.dtype)
    kept = ((lengths - 1) // 2 + 1).tolist()
    key_mask = None
    if min(kept) < tokens:  # short windows: their padding rows must not be attended to
        key_mask = torch.arange(tokens, device=batch.device) < torch.tensor(kept, device=batch.device)[:, None]
        key_mask = key_mask[:, None, None, :]
    per_layer = []
    for layer in tower.layers:
        hidden = _layer(layer, hidden, key_mask)
        if keep_layers:
            per_layer.append(hidden)
    return hidden, kept, per_layer


def _layer(layer, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """One encoder layer over (windows, tokens, d_model), attention within each window."""
    attention = layer.self_attn
    windows, tokens, width = hidden.shape
    heads = attention.num_heads
    normed = layer.self_attn_layer_norm(hidden)

    def split(projection) -> torch.Tensor:
        return projection(normed).view(windows, tokens, heads, width // heads).transpose(1, 2)

    q, k, v = split(attention.q_proj), split(attention.k_proj), split(attention.v_proj)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=attention.scaling)
    hidden = hidden + attention.out_proj(out.transpose(1, 2).reshape(windows, tokens, width))
    hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
    if hidden.dtype == torch.float16:  # as the library does, so fp16 cannot overflow to inf
        limit = torch.finfo(hidden.dtype).max - 1000
        hidden = torch.clamp(hidden, min=-limit, max=limit)
    return hidden
