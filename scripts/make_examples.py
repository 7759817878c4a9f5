"""Write the README's example images (held-out scenes) and their questions into examples/."""

from __future__ import annotations

from pathlib import Path

from vlsparse.demo import scenes

OUT = Path(__file__).resolve().parent.parent / "examples"


def first_scene_with(kind: str, start: int) -> tuple[int, list[scenes.Shape]]:
    """The first held-out scene (seed >= start) that holds a ``kind``."""
    seed = start
    while True:
        shapes = scenes.random_scene(scenes.sample_rng("example", scenes.EVAL_SEED_BASE + seed))
        if any(s.kind == kind for s in shapes):
            return seed, shapes
        seed += 1


def describe(shapes: list[scenes.Shape]) -> str:
    return ", ".join(f"{s.color} {s.kind} ({s.position})" for s in shapes)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    lines = ["# Example images", "", "Held-out scenes from `vlsparse.demo.scenes` (regenerate with "
             "`python scripts/make_examples.py`).", ""]
    for name, kind, start, questions in (
        ("scene.png", "circle", 0, ["What color is the circle?", "How many shapes are there?"]),
        ("scene2.png", "square", 100, ["Where is the square?", "What color is the square?"]),
    ):
        seed, shapes = first_scene_with(kind, start)
        scenes.render(shapes).save(OUT / name)
        target = next(s for s in shapes if s.kind == kind)
        questions = questions + [f"What shape is {target.color}?"]
        answers = {f"What shape is {target.color}?": target.kind, "What color is the circle?": target.color, "How many shapes are there?":
                   scenes.COUNT_WORDS[len(shapes) - 1], "Where is the square?": target.position,
                   "What color is the square?": target.color}
        lines += [f"## {name}", "", f"Shapes: {describe(shapes)}.", ""]
        lines += [f"- `vlsparse run examples/{name} \"{q}\"` -> **{answers[q]}**" for q in questions]
        lines.append("")
    (OUT / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
