"""One ``--calib`` reader (``vlsparse.calibration``) for prune, profile and calibrate: the same sources,
the same source strings, the same errors."""

from __future__ import annotations

import json

import pytest

from vlsparse.calibration import demo_items, parse_calib, read_calib
from vlsparse.errors import InputError

TEXT = "red circle blue square green triangle " * 60


def test_sources_and_their_recorded_names(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": TEXT}))
    (tmp_path / "c.txt").write_text(TEXT)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(TEXT)
    cases = {None: ("demo", "demo:multi+grid"), "demo:grid": ("demo", "demo:grid"),
             tmp_path / "c.jsonl": ("jsonl", "jsonl:c.jsonl"), tmp_path / "c.txt": ("file", "text:c.txt"),
             tmp_path / "texts": ("folder", "text:texts")}
    for calib, (kind, name) in cases.items():
        source = parse_calib(calib, vlm=True, default_tasks=("multi", "grid"), demo_tasks=("multi", "grid"))
        assert (source.kind, source.name) == (kind, name)
    assert parse_calib(None, vlm=False, default_tasks=("vqa",)).name == "pydoc"
    assert read_calib(parse_calib(tmp_path / "texts", vlm=False, default_tasks=())).text == TEXT
    with pytest.raises(InputError, match="unknown demo calibration 'demo:vqa'"):
        parse_calib("demo:vqa", vlm=True, default_tasks=(), demo_tasks=("multi", "grid"))
    with pytest.raises(InputError, match="needs a vision-language model") as info:
        parse_calib("demo:multi", vlm=False, default_tasks=(), demo_tasks=("multi",))
    assert info.value.option == "calib" and "--calib demo:multi" in info.value.one_line(flags=True)


def test_prune_demo_seeds_are_the_training_split_ones():
    from vlsparse.demo.scenes import TRAIN_SEED_BASE, generate

    items = demo_items(("vqa",), 3, seed=2)
    reference = generate("vqa", 3, TRAIN_SEED_BASE + 900_000_000 + 2)
    assert [(i.prompt, i.answer) for i in items] == [(s.question, s.answer) for s in reference]
    assert [i.images[0].tobytes() for i in items] == [s.images[0].tobytes() for s in reference]


def test_prune_and_profile_read_a_file_alike(llama, tmp_path):
    from vlsparse.compress.calibration import build_calibration
    from vlsparse.search.calibration import calibration_from

    for name, content in (("c.jsonl", json.dumps({"text": TEXT})), ("c.txt", TEXT)):
        path = tmp_path / name
        path.write_text(content)
        pruning = build_calibration(llama.adapter, llama.processor, path, samples=2, seq_len=16, seed=0)
        profiling = calibration_from(llama, path, samples=2, seq_len=128)
        assert pruning.source == profiling.source == parse_calib(path, vlm=False, default_tasks=()).name
    missing = tmp_path / "nope.jsonl"
    messages = []
    for call in (lambda: build_calibration(llama.adapter, llama.processor, missing, 2, 16, 0),
                 lambda: calibration_from(llama, missing)):
        with pytest.raises(InputError) as info:
            call()
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "not found" in messages[0]


def test_image_entries_for_a_text_model_are_one_error_for_both(llama, tmp_path, image_file):
    from vlsparse.compress.calibration import build_calibration
    from vlsparse.search.calibration import calibration_from

    path = tmp_path / "img.jsonl"
    path.write_text(json.dumps({"image": str(image_file), "prompt": "what is this?"}))
    with pytest.raises(InputError, match="img.jsonl line 1 has images, which a text-only model cannot read"):
        build_calibration(llama.adapter, llama.processor, path, samples=2, seq_len=16, seed=0)
    with pytest.raises(InputError, match="img.jsonl line 1 has images, which a text-only model cannot read"):
        calibration_from(llama, path, samples=1, seq_len=128)


def test_prune_refuses_plain_text_for_a_vision_language_model(llava, tmp_path):
    from vlsparse.compress.calibration import build_calibration

    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    with pytest.raises(InputError, match="c.txt is plain text") as info:
        build_calibration(llava.adapter, llava.processor, path, samples=2, seq_len=16, seed=0)
    assert "\n" not in info.value.one_line()
