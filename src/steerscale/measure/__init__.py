"""The evaluation harness: tasks, fast log-likelihood scoring, statistics, cost metrics, runs and reports.

    >>> from steerscale.measure import evaluate
    >>> res = evaluate(load_model("smollm2-135m-instruct"), "arc_easy", limit=100, steer=["v.safetensors:4"])
    >>> res.summary["score"]   # {"mean", "lo", "hi", "n"}: 95% bootstrap interval
"""

from .cost import neutral_prompts, steering_cost
from .mc import score_choices
from .runs import RunResult, evaluate, example_scores, load_runs
from .stats import align, bootstrap_ci, kfold, paired_compare
from .tasks import Example, Task, get_task, list_tasks, load_labelled, load_pairs

__all__ = ["Example", "RunResult", "Task", "align", "bootstrap_ci", "evaluate", "example_scores", "get_task", "kfold",
           "list_tasks", "load_labelled", "load_pairs", "load_runs", "neutral_prompts", "paired_compare",
           "score_choices", "steering_cost"]
