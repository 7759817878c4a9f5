"""The PaliGemma family: ``PaliGemmaForConditionalGeneration``.

A SigLIP vision tower (``model.vision_tower``), a linear projector
(``model.multi_modal_projector``) and a Gemma language model. The processor puts each
image's ``image_seq_length`` ``<image>`` tokens (the tower's square patch grid) at the
very start of the prompt, then BOS, the prompt and a newline. PaliGemma is a prefix-LM:
image and prompt tokens (``token_type_ids`` 0) attend to each other bidirectionally,
only the suffix (the answer) is causal, so a prompt's prefill rows do not follow the
causal kernels' contract: the runtime runs those rows as the model does (dense, under
its mask) and only suffix rows can be sparse (``vlsparse.kernels.runtime``).
"""

from __future__ import annotations

from typing import ClassVar

from vlsparse.models.families.base import VisionLanguageAdapter, square_image_grids


class PaliGemmaAdapter(VisionLanguageAdapter):
    """PaliGemma: SigLIP tower + linear projector + Gemma LM, image and prompt as a bidirectional prefix."""

    family: ClassVar[str] = "paligemma"
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("paligemma",)
    SUPPORTED: ClassVar[str] = "PaliGemma"

    @classmethod
    def format_prompt(cls, processor, question: str, n_images: int) -> str:
        """The image tokens first, then the question (the processor adds BOS after the images and a newline)."""
        return cls.plain_prompt(processor, question, n_images)

    @classmethod
    def plain_prompt(cls, processor, question: str, n_images: int) -> str:
        return getattr(processor, "image_token", "<image>") * n_images + question

    @classmethod
    def prepare_inputs(cls, processor, images: list, question: str):
        """The processor's inputs without the training ``labels`` it adds."""
        inputs = super().prepare_inputs(processor, images, question)
        inputs.pop("labels", None)
        return inputs

    def image_grids(self, inputs) -> list[tuple[int, int, int, int]] | None:
        """The tower's square patch grid per image (``image_size / patch_size`` a side)."""
        vision = self.model.config.vision_config
        return square_image_grids(inputs, int(vision.image_size) // int(vision.patch_size), self.image_token_id)
