"""Where a word sits in a tokenized prompt (for MCA-Ctrl's automatic target mask)."""

from __future__ import annotations


def _first_sequence(tokens: dict) -> list[int]:
    """Token ids of the first 77-token chunk of the first encoder (``l`` for SD1.5,
    ``g``/``l`` for SDXL: both encoders tokenize the same words at the same positions)."""
    key = "l" if "l" in tokens else sorted(tokens)[0]
    return [int(t[0]) for t in tokens[key][0]]


def word_token_indices(clip, prompt: str, word: str, node: str = "MCA-Ctrl") -> list[int]:
    """Positions of ``word``'s tokens in the first chunk of ``prompt``'s tokens (BOS at 0).

    Raises a ValueError naming both when the word is not in the prompt.
    """
    word = word.strip()
    if not word:
        raise ValueError(f"{node}: expected a subject word from the condition prompt, got an empty string")
    prompt_ids = _first_sequence(clip.tokenize(prompt))
    word_ids = _first_sequence(clip.tokenize(word))
    # Drop the word's BOS and its trailing end/padding tokens (the value that fills the tail).
    end = word_ids[-1]
    inner = word_ids[1:]
    while inner and inner[-1] == end:
        inner.pop()
    if not inner:
        raise ValueError(f"{node}: expected a subject word that tokenizes to something, got '{word}'")
    n = len(inner)
    for start in range(1, len(prompt_ids) - n + 1):
        if prompt_ids[start:start + n] == inner:
            return list(range(start, start + n))
    raise ValueError(f"{node}: expected the subject word '{word}' in the condition prompt, got prompt '{prompt}'")
