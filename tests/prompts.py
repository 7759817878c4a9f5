"""Prompts and greedy generation shared by the runtime tests."""

from __future__ import annotations

import torch
from PIL import Image

COLOURS = ["red", "blue", "green", "white", "black", "yellow"]


def textured_inputs(loaded, n_images: int = 4, second_pixel: bool = False):
    """``n_images`` small single-colour images with a pixel or two of texture (so image tokens differ
    within an image), and one question."""
    images = [Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)]) for i in range(n_images)]
    for i, image in enumerate(images):
        image.putpixel((i, 3 * i % 16), (255, 0, 255))
        if second_pixel:
            image.putpixel((15 - i, i), (0, 255, 255))
    return loaded.prepare(images, "what color is the circle ?")


def generate_with_logits(loaded, inputs, n: int = 4):
    """Exactly ``n`` greedy tokens: (sequences, logits [n, B, V] in fp32)."""
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits).float()
