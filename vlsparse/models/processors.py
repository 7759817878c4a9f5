"""Processors and prompt formats by family name (offline, without torchvision).

Each family class (``vlsparse.models.families``) holds its own processor loading and
prompt format; these functions take the family's name, as profiles and configs record it.
"""

from __future__ import annotations

from pathlib import Path

from vlsparse.models.families import family_named


def load_processor(folder: Path, family: str, trust_remote_code: bool = False):
    """The processor (VLMs) or tokenizer (LMs) saved in ``folder``."""
    return family_named(family).load_processor(folder, trust_remote_code=trust_remote_code)


def format_prompt(processor, family: str, question: str, n_images: int) -> str:
    """The prompt in the model's own format: its chat template, else the family's convention."""
    return family_named(family).format_prompt(processor, question, n_images)


def prepare_inputs(processor, family: str, images: list, question: str):
    """Model inputs (a ``BatchFeature`` of tensors) for images + question."""
    return family_named(family).prepare_inputs(processor, images, question)


ENGLISH_PROBE = ("The interpreter reads each statement of the program, evaluates the expression on the right "
                 "and binds the result to the name on the left before it continues with the next line")


def reads_english(processor) -> bool:
    """Whether the tokenizer spells ordinary English: at most a tenth of ``ENGLISH_PROBE``'s words unknown.
    The demo model's closed vocabulary does not (it calibrates on demo scenes); byte-level tokenizers do."""
    import re

    words = re.findall(r"\w+", ENGLISH_PROBE)
    return len(unknown_words(processor, ENGLISH_PROBE)) <= len(words) // 10


def unknown_words(processor, text: str) -> list[str]:
    """The words of ``text`` the tokenizer cannot spell: they become its unknown token, or nothing at all.

    A closed-vocabulary tokenizer (the demo model's) turns "object" into ``<unk>`` without a word;
    byte-level tokenizers spell every word and give [].
    """
    import re

    from vlsparse.models.families.base import tokenizer_of

    tokenizer = tokenizer_of(processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    found: list[str] = []
    for word in re.findall(r"\w+", text):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if (not ids or (unk is not None and unk in ids)) and word not in found:
            found.append(word)
    return found
