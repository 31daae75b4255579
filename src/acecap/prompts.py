"""What a served request's prompt may hold, and whether it fits the model's context beside its audio and
its max_tokens: checked per request, before it can join a batch (one bad request would fail the batch).
"""

from __future__ import annotations

import copy
import re
import weakref

from .chat import APIError
from .features import audio_tokens, feature_frames
from .model import render_prompt

_made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # captioner -> its PromptRules


class PromptRules:
    """A request's text refused when it holds the model's control tokens or cannot fit the context.

    Control tokens (<|AUDIO|>, <|im_end|>, …) are refused rather than escaped, as tiktoken refuses them by
    default: the tokenizer would read them as markup, not text (an extra <|AUDIO|> breaks the audio
    merge; <|im_end|> ends the user's turn), and a caption prompt has no use for them as text.
    """

    def __init__(self, captioner):
        self.processor = captioner.processor
        # The tokenizer's engine, a copy of our own with no padding or truncation, only ever read: the
        # batcher's tokenizer changes such settings, and the engine refuses to encode in one thread while
        # another changes them.
        self.tokenizer = copy.deepcopy(captioner.processor.tokenizer.backend_tokenizer)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.context = captioner.context
        self.default_prompt = captioner.prompt
        self.default_tokens = captioner.prompt_tokens - 1  # its one <|AUDIO|> placeholder aside
        self.hop_length = self.processor.feature_extractor.hop_length
        added = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values()), key=len, reverse=True)
        self.control = re.compile("|".join(map(re.escape, added))) if added else None
        # Byte-level BPE: a token spans at most this many characters, so longer texts need no tokenizing.
        self.longest_token = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)))

    @classmethod
    def of(cls, captioner) -> PromptRules:
        """The rules for `captioner`, made once (copying the tokenizer takes seconds) for every app serving it."""
        rules = _made.get(captioner)
        if rules is None:
            rules = _made[captioner] = cls(captioner)
        return rules

    def text_tokens(self, prompt: str | None, max_tokens: int) -> int:
        """The chat text's tokens for `prompt` (None: the task's own), the audio aside; 400 when it holds a
        control token or leaves no room for the shortest audio and `max_tokens`."""
        if prompt is None or prompt == self.default_prompt:
            return self.default_tokens
        found = self.control.search(prompt) if self.control else None
        if found:
            raise APIError(400, f"the text holds {found.group()!r}, one of the model's control tokens; they are "
                           "refused, not read as text", param="messages")  # fmt: skip
        room = self.context - max_tokens - 1  # the shortest audio is one token
        if len(prompt) > room * self.longest_token:
            raise APIError(400, f"the text is {len(prompt)} characters: with max_tokens {max_tokens} it cannot fit "
                           f"the model's context of {self.context} tokens", param="messages")  # fmt: skip
        tokens = len(self.tokenizer.encode(render_prompt(self.processor, prompt)).ids) - 1
        if tokens > room:
            raise APIError(400, f"the text makes a prompt of {tokens} tokens: with max_tokens {max_tokens} and "
                           f"the audio it cannot fit the model's context of {self.context} tokens",
                           param="messages")  # fmt: skip
        return tokens

    def check_total(self, text_tokens: int, samples: int, max_tokens: int) -> int:
        """The whole prompt's tokens (text and audio); 400 when prompt and max_tokens pass the context. (Audio
        too short to make a token was refused as it was decoded: audio.MIN_SAMPLES.)"""
        audio = audio_tokens(feature_frames(samples, self.hop_length))
        if text_tokens + audio + max_tokens > self.context:
            raise APIError(400, f"the prompt is {text_tokens} text and {audio} audio tokens: with max_tokens "
                           f"{max_tokens} it passes the model's context of {self.context} tokens; send shorter "
                           "audio, text or max_tokens")  # fmt: skip
        return text_tokens + audio
