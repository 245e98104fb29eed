"""lm-evaluation-harness's ``local-completions`` against the running server (tiny random Llama, real
socket), unchanged: the loglikelihood task (echo + logprobs on token-id prompts, several prompts per
request) and the generate_until task shipped in evals/wiki/. Skipped where lm-eval is not installed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server import running_server, tiny_settings

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]
TASKS = Path(__file__).resolve().parents[1] / "evals" / "wiki"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:  # noqa: F811
    with running_server(tiny_settings(tiny_model_dir, queue_size=64, max_prompt_tokens=120)) as url:
        yield url


def test_lm_eval_local_completions_runs_both_tasks(server: str, tiny_model_dir: Path,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = (f"model=tiny-llama,base_url={server}/v1/completions,tokenizer={tiny_model_dir},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,batch_size=4")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                  tasks=["onejump_wiki_lastword", "onejump_wiki_continue"],
                                  task_manager=TaskManager(include_path=str(TASKS)), limit=12, log_samples=False)
    assert out is not None
    results = out["results"]
    assert 0.0 <= results["onejump_wiki_lastword"]["acc,none"] <= 1.0
    assert 0.0 <= results["onejump_wiki_continue"]["exact_match,first-words"] <= 1.0
