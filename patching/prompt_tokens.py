"""Token positions of chosen words in a prompt, read from the text encoder's tokenizer itself.

Shared by every control that looks at a word's attention (mask guidance, attention maps,
MCA-Ctrl's automatic target mask). A position is an index into the text context ComfyUI's
encoder gives the model, so where each tokenizer's tokens land depends on the encoder:

- CLIP (SD1.5 / SD2.x / SDXL): the CLIP tokens, 77 per chunk (SDXL's CLIP-L and CLIP-G share
  positions);
- Flux.1 (``FluxClipModel``): the T5-XXL tokens only (CLIP-L gives the pooled vector);
- SD3 / SD3.5 (``SD3ClipModel``): the CLIP-L/G tokens (77 per chunk) first, then the T5-XXL
  tokens when the encoder has T5.
"""

from __future__ import annotations

import comfy.text_encoders.flux
import comfy.text_encoders.sd3_clip

T5 = "t5xxl"


def _ids(chunks) -> list[int]:
    """Flatten ComfyUI's token chunks to ids; a textual-inversion embedding (a tensor)
    counts as an id that never matches a word."""
    ids = []
    for chunk in chunks:
        for entry in chunk:
            token = entry[0]
            ids.append(int(token) if isinstance(token, int) else -1)
    return ids


def _first_key(tokens: dict) -> str:
    # SDXL tokenizes with clip_l and clip_g; both are CLIP BPE with the same positions.
    return "l" if "l" in tokens else next(iter(tokens))


def context_parts(clip, tokens: dict) -> list[tuple[str, int]]:
    """How the encoder of ``clip`` lays its context out from ``tokens`` (the tokenizer's output
    by encoder key): ``[(key, first position), ...]``, the parts in context order."""
    model = getattr(clip, "cond_stage_model", None)
    if isinstance(model, comfy.text_encoders.flux.FluxClipModel):
        return [(T5, 0)]
    if isinstance(model, comfy.text_encoders.sd3_clip.SD3ClipModel):
        parts, offset = [], 0
        clip_keys = [key for key, present in (("l", model.clip_l is not None), ("g", model.clip_g is not None))
                     if present and key in tokens]
        if clip_keys:
            parts.append((clip_keys[0], 0))
            offset = len(_ids(tokens[clip_keys[0]]))
        if model.t5xxl is not None and T5 in tokens:
            parts.append((T5, offset))
        return parts
    return [(_first_key(tokens), 0)]


def prompt_token_count(clip, text: str) -> int:
    """Context length ComfyUI gives ``text`` (CLIP: 77 per chunk)."""
    tokens = clip.tokenize(text)
    key, offset = context_parts(clip, tokens)[-1]
    return offset + len(_ids(tokens[key]))


def word_token_positions(clip, text: str, words: str, node: str = "QKV") -> list[int]:
    """Positions (in the encoded context, see the module docstring) of every token of every
    comma-separated entry of ``words`` in ``text``; every occurrence counts, in each part of the
    context (SD3 with T5: the CLIP and the T5 tokens of the word).

    A word is tokenized on its own (its tokens are those the tokenizer marks with a word
    id) and searched as a token sequence in the prompt, so "sneaker" matches however the
    tokenizer splits it. A word missing from the prompt is an error naming both.
    """
    prompt = clip.tokenize(text)
    parts = context_parts(clip, prompt)
    positions: set[int] = set()
    for word in (w.strip() for w in words.split(",")):
        if not word:
            continue
        alone = clip.tokenize(word, return_word_ids=True)
        found = False
        for key, offset in parts:
            word_ids = [int(e[0]) for chunk in alone[key] for e in chunk
                        if len(e) > 2 and e[2] != 0 and isinstance(e[0], int)]
            if not word_ids:
                raise ValueError(f"{node}: expected a word with tokens, got '{word}'")
            prompt_ids = _ids(prompt[key])
            n = len(word_ids)
            hits = [i for i in range(len(prompt_ids) - n + 1) if prompt_ids[i:i + n] == word_ids]
            for i in hits:
                positions.update(range(offset + i, offset + i + n))
            found = found or bool(hits)
        if not found:
            raise ValueError(f"{node}: expected the word '{word}' in the prompt, got the prompt '{text}'")
    if not positions:
        raise ValueError(f"{node}: expected at least one word (comma-separated), got '{words}'")
    return sorted(positions)


def expand_positions(positions: list[int], context_tokens: int, key_tokens: int) -> list[int]:
    """Positions in keys made of the context repeated to ``key_tokens`` tokens (ComfyUI
    repeats contexts to a common length when conds of different lengths are batched)."""
    if key_tokens % context_tokens:
        return [p for p in positions if p < key_tokens]
    return [p + r * context_tokens for r in range(key_tokens // context_tokens) for p in positions]


def positions_in_text(positions: list[int], text_tokens: int) -> list[int]:
    """Positions among a diffusion transformer's text tokens (zero-padded, never repeated: see
    ``branch_rows.pad_contexts``): those inside the ``text_tokens`` of the row's own text."""
    return [p for p in positions if p < text_tokens]
