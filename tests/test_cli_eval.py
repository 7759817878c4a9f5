"""`vlsparse eval` on tiny models."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vlsparse.cli.main import build_app

runner = CliRunner()


def test_eval_pydoc_perplexity_json(llama_dir):
    result = runner.invoke(build_app(), ["eval", "--model", str(llama_dir), "--task", "pydoc-ppl", "--json",
                                         "--seq-len", "256"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == "pydoc-ppl" and data["perplexity"] > 1.0 and data["windows"] >= 1


def test_eval_rejects_unknown_task_and_ppl_on_vlm(llava_dir):
    result = runner.invoke(build_app(), ["eval", "--model", str(llava_dir), "--task", "imagenet"])
    assert result.exit_code == 1 and "unknown task" in result.stderr
    result = runner.invoke(build_app(), ["eval", "--model", str(llava_dir), "--task", "pydoc-ppl"])
    assert result.exit_code == 1 and "language models" in result.stderr
