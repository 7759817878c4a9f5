"""Tokenizer, processor, config and prompt format of the embedded demo VLM.

The model is a stock ``LlavaForConditionalGeneration`` (loads with plain
``AutoProcessor`` / ``LlavaForConditionalGeneration.from_pretrained``):

    CLIP vision tower   VISION_SIZE px input, PATCH_SIZE patches -> (96/8)^2 = 144 patches
                        (+ CLS, dropped: ``vision_feature_select_strategy="default"``), the
                        last layer's features (``vision_feature_layer=-1``); hidden 128, 4 layers
    projector           Linear -> GELU -> Linear (LLaVA-1.5)
    Llama LM            hidden 256, 4 layers, GQA 8 query / 2 KV heads (head_dim 32), SwiGLU
                        (intermediate 688), RMSNorm, RoPE theta 1e8: half of the 16 rotary
                        frequency pairs turn by less than half a radian over 4,600 tokens, so
                        heads can match content (an image number, a shape) across a 32-image
                        prompt; with theta 1e5 only 3 pairs did;
                        ``max_position_embeddings`` 32768; tied input/output embeddings

Each image becomes 144 ``<image>`` tokens; ``num_additional_image_tokens=1`` matches the
dropped CLS token (a mismatch raises "Image features and image tokens do not match").
Scenes are drawn at 64 px and the image processor resizes them (bicubic) to 96 px.

The tokenizer is word-level (``tokenizers`` WordLevel, lower-cased, split on whitespace and
punctuation) over the generator's closed vocabulary (128 entries), specials ``<pad> <unk>
<s> </s> <image>``. Prompt format (the chat template; several unlabelled images get
"image k :" labels, labelled ones keep theirs):

    USER: image 1 : <image> image 2 : <image> In image 2, what color is the circle? ASSISTANT:

and the answer follows as `` red </s>``; training conversations add further
``USER: ... ASSISTANT: ... </s>`` turns about the same images.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = "<image>"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS, IMAGE_TOKEN)
VISION_SIZE = 96
PATCH_SIZE = 8
MAX_NUMBER = 64
"""Numerals 1..MAX_NUMBER are words of the vocabulary (image indices, rows, columns)."""

CHAT_TEMPLATE = (
    "{%- set ns = namespace(images=0, labelled=false) -%}"
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}"
    "{%- elif item['type'] == 'text' and ' :' in item['text'] -%}{%- set ns.labelled = true -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "{%- set ns.k = 0 -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER:"
    "{%- if message['content'] is string -%} {{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.k = ns.k + 1 -%}"
    "{%- if ns.images > 1 and not ns.labelled %} image {{ ns.k }} :{%- endif %} <image>"
    "{%- else %} {{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- else %} ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }} </s> {% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %} ASSISTANT:{%- endif -%}"
)

QUESTION_WORDS = (
    "user assistant : ? , . what color is the shape how many shapes are there where in image row column "
    "a an of this picture which describe and it"
)


# ---------------------------------------------------------------- vocabulary and tokenizer


def vocabulary() -> list[str]:
    """Specials, chat and question words, shapes, colours, counts, positions, yes/no, 1..64."""
    from vlsparse.demo import scenes

    words = list(SPECIALS) + QUESTION_WORDS.split()
    words += list(scenes.SHAPES) + list(scenes.COLORS) + list(scenes.COUNT_WORDS)
    words += [p for row in scenes.POSITIONS for p in row] + ["yes", "no"]
    words += [str(k) for k in range(1, MAX_NUMBER + 1)]
    if len(set(words)) != len(words):
        raise ValueError("duplicate words in the demo vocabulary")
    return words


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast``: lower-case, split on whitespace and punctuation."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        image_token=IMAGE_TOKEN,
        extra_special_tokens=[],
    )


# ---------------------------------------------------------------- processor and config


def build_processor(tokenizer=None):
    """``LlavaProcessor``: CLIP images (PIL backend, no torchvision) at VISION_SIZE, CLS dropped."""
    from transformers import LlavaProcessor

    from vlsparse.compat import pil_image_processor_class

    images = pil_image_processor_class("CLIP")(
        size={"shortest_edge": VISION_SIZE},
        crop_size={"height": VISION_SIZE, "width": VISION_SIZE},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_config(
    tokenizer,
    *,
    vision_hidden: int = 128,
    vision_layers: int = 4,
    vision_heads: int = 4,
    lm_hidden: int = 256,
    lm_layers: int = 4,
    lm_heads: int = 8,
    lm_kv_heads: int = 2,
    head_dim: int = 32,
    lm_intermediate: int = 688,
    rope_theta: float = 1e8,
    max_positions: int = 32768,
):
    """``LlavaConfig``: CLIP vision tower + Llama LM (GQA, RoPE, SwiGLU); sizes as keywords.

    Token ids come from ``tokenizer``; the image size and patch size are fixed by the
    processor (VISION_SIZE, PATCH_SIZE), so any sizes here stay compatible with it.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=VISION_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=lm_hidden,
        intermediate_size=lm_intermediate,
        num_hidden_layers=lm_layers,
        num_attention_heads=lm_heads,
        num_key_value_heads=lm_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=True,
        pad_token_id=ids(PAD),
        bos_token_id=ids(BOS),
        eos_token_id=ids(EOS),
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


# ---------------------------------------------------------------- prompts


def user_content(question: str, labels: list[str]) -> list[dict]:
    """Chat content: each image after its text label (if any), then the question."""
    content: list[dict] = []
    for label in labels:
        if label:
            content.append({"type": "text", "text": label})
        content.append({"type": "image"})
    content.append({"type": "text", "text": question})
    return content


def sample_messages(sample, with_answers: bool = False) -> list[dict]:
    """Chat messages for a ``scenes.Sample`` (images as ``sample.model_images()`` gives them).

    Without answers: one user turn (the evaluation prompt). With answers: the answer
    and every follow-up question/answer turn (the training conversation).
    """
    _, labels = sample.model_images()
    messages = [{"role": "user", "content": user_content(sample.question, labels)}]
    if with_answers:
        messages.append({"role": "assistant", "content": sample.answer})
        for qa in sample.followups:
            messages += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
    return messages


def build_prompt(processor, sample) -> str:
    """The evaluation prompt of ``sample`` through ``processor``'s chat template."""
    return processor.apply_chat_template(sample_messages(sample), add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------- packaged weights


def demo_path() -> Path:
    """Folder of the packaged demo model (``vlsparse/demo/weights``)."""
    return Path(__file__).resolve().parent / "weights"


def save_demo(model, out_dir, processor=None) -> Path:
    """Write a ``from_pretrained``-loadable folder: config, generation config, safetensors, processor.

    Weights are written in fp32 (the model is ~15 MB): a plain ``from_pretrained`` then
    computes in fp32 (CPU fp16/bf16 matmuls are ~100x slower).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (processor if processor is not None else build_processor()).save_pretrained(out)
    return out
