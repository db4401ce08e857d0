"""Token positions of chosen words in a prompt, read from the CLIP tokenizer itself.

Shared by every control that looks at a word's cross-attention (mask guidance, attention
maps, MCA-Ctrl's automatic target mask)."""

from __future__ import annotations


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


def prompt_token_count(clip, text: str) -> int:
    """Context length ComfyUI gives ``text`` (77 per chunk)."""
    tokens = clip.tokenize(text)
    return len(_ids(tokens[_first_key(tokens)]))


def word_token_positions(clip, text: str, words: str, node: str = "QKV") -> list[int]:
    """Positions (in the encoded context, 77 per chunk) of every token of every
    comma-separated entry of ``words`` in ``text``; every occurrence counts.

    A word is tokenized on its own (its tokens are those the tokenizer marks with a word
    id) and searched as a token sequence in the prompt, so "sneaker" matches however
    CLIP's BPE splits it. A word missing from the prompt is an error naming both.
    """
    prompt = clip.tokenize(text)
    key = _first_key(prompt)
    prompt_ids = _ids(prompt[key])
    positions: set[int] = set()
    for word in (w.strip() for w in words.split(",")):
        if not word:
            continue
        alone = clip.tokenize(word, return_word_ids=True)[key]
        word_ids = [int(e[0]) for chunk in alone for e in chunk if len(e) > 2 and e[2] != 0 and isinstance(e[0], int)]
        if not word_ids:
            raise ValueError(f"{node}: expected a word with tokens, got '{word}'")
        n = len(word_ids)
        hits = [i for i in range(len(prompt_ids) - n + 1) if prompt_ids[i:i + n] == word_ids]
        if not hits:
            raise ValueError(f"{node}: expected the word '{word}' in the prompt, got the prompt '{text}'")
        for i in hits:
            positions.update(range(i, i + n))
    if not positions:
        raise ValueError(f"{node}: expected at least one word (comma-separated), got '{words}'")
    return sorted(positions)


def expand_positions(positions: list[int], context_tokens: int, key_tokens: int) -> list[int]:
    """Positions in keys made of the context repeated to ``key_tokens`` tokens (ComfyUI
    repeats contexts to a common length when conds of different lengths are batched)."""
    if key_tokens % context_tokens:
        return [p for p in positions if p < key_tokens]
    return [p + r * context_tokens for r in range(key_tokens // context_tokens) for p in positions]
