"""``steerscale report DIR``: Markdown (and a self-contained HTML page) with tables and PNG plots of runs.

Tables: one row per run (task, model, steering, strategy, n, score with 95% interval, failures, KL cost,
perplexity ratio, seconds), then paired comparisons of every steered run against the unsteered run of the same
model and task on the shared examples. Plots: score per configuration with intervals, per task; and when a
task has runs at several steering scales of one vector, a scale sweep (score and KL against scale).
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path

from ..errors import SteerscaleError
from .runs import example_scores, load_runs
from .stats import align, paired_compare


def steer_label(summary: dict) -> str:
    cfg = summary["config"]
    parts = [f"{Path(s.get('path', 'vector')).stem}:{s['scale']:g}" for s in cfg.get("steer", [])]
    parts += [f"{iv['edit']}@{iv['site']}" for iv in cfg.get("interventions", [])]
    return " + ".join(parts) or "none"


def _fmt_ci(e: dict | None) -> str:
    return "-" if not e else f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def rows(runs: list[dict]) -> list[dict]:
    out = []
    for s in runs:
        c = s["config"]
        cost = s.get("cost") or {}
        out.append({"task": s["task"], "model": c["model"], "mode": c["mode"], "steer": steer_label(s),
                    "strategy": c.get("strategy") or "-", "limit": c.get("limit") or "all", "n": s["n_ok"],
                    "failed": s["n_failed"], "metric": s["primary"], "score": _fmt_ci(s.get("score")),
                    "kl": _fmt_ci(cost.get("kl")), "ppl_ratio": f"{cost['ppl_ratio']:.3f}" if cost else "-",
                    "seconds": f"{s.get('seconds', 0):.1f}", "dir": s["dir"]})
    return out


def comparisons(runs: list[dict]) -> list[dict]:
    """Each steered/strategy run against the plain run with the same model, task and mode."""
    base = {}
    for s in runs:
        c = s["config"]
        if not c.get("steer") and not c.get("interventions") and not c.get("strategy"):
            base.setdefault((s["task"], c["model"], c["mode"]), s)
    out = []
    for s in runs:
        c = s["config"]
        b = base.get((s["task"], c["model"], c["mode"]))
        if b is None or b is s:
            continue
        try:
            keys, x, y = align(example_scores(b["dir"]), example_scores(s["dir"]))
        except SteerscaleError:
            continue
        cmp = paired_compare(x, y)
        out.append({"task": s["task"], "model": c["model"], "config": steer_label(s), "n": cmp.n,
                    "diff": f"{cmp.diff:+.3f} [{cmp.lo:+.3f}, {cmp.hi:+.3f}]", "p_perm": f"{cmp.p_permutation:.3g}",
                    "p_sign": f"{cmp.p_sign:.3g}", "wins/losses": f"{cmp.wins}/{cmp.losses}"})
    return out


def _table(rs: list[dict], cols: list[str]) -> str:
    if not rs:
        return "_none_\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rs]
    return "\n".join(lines) + "\n"


def _plots(runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_task = defaultdict(list)
    for s in runs:
        if s.get("score"):
            by_task[s["task"]].append(s)
    for task, rs in sorted(by_task.items()):
        labels = [f"{r['config']['model']}\n{steer_label(r)}" for r in rs]
        means = [r["score"]["mean"] for r in rs]
        err = [[m - r["score"]["lo"] for m, r in zip(means, rs)], [r["score"]["hi"] - m for m, r in zip(means, rs)]]
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rs) + 2), 3.5))
        ax.bar(range(len(rs)), means, yerr=err, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(rs)), labels, fontsize=7, rotation=20, ha="right")
        ax.set_ylabel(rs[0]["primary"])
        ax.set_title(f"{task} (95% bootstrap CI)")
        fig.tight_layout()
        p = out / f"score_{task.replace(':', '_')}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
        # scale sweep: runs of one task whose only steering is one vector at different scales (0 = baseline)
        sweep = defaultdict(dict)
        for r in rs:
            st = r["config"].get("steer", [])
            if len(st) == 1 and not r["config"].get("interventions"):
                sweep[(r["config"]["model"], st[0].get("sha") or st[0].get("path"), Path(st[0].get("path", "v")).stem)][st[0]["scale"]] = r
        for (model, _, vname), pts in sweep.items():
            if len(pts) < 2:
                continue
            xs = sorted(pts)
            fig, ax = plt.subplots(figsize=(5, 3.5))
            m = [pts[x]["score"]["mean"] for x in xs]
            ax.errorbar(xs, m, yerr=[[v - pts[x]["score"]["lo"] for v, x in zip(m, xs)],
                                     [pts[x]["score"]["hi"] - v for v, x in zip(m, xs)]], marker="o", capsize=3,
                        label=f"effect ({rs[0]['primary']})")
            ax.set_xlabel(f"scale of {vname}")
            ax.set_ylabel(rs[0]["primary"])
            kl = [(x, pts[x]["cost"]["kl"]["mean"]) for x in xs if pts[x].get("cost")]
            if kl:
                ax2 = ax.twinx()
                ax2.plot([k for k, _ in kl], [v for _, v in kl], "s--", color="#c44e52", label="KL (nats)")
                ax2.set_ylabel("KL on neutral text", color="#c44e52")
            ax.set_title(f"{task}: scale sweep ({model})")
            fig.tight_layout()
            p = out / f"sweep_{task.replace(':', '_')}_{vname}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def render(root: str | Path, out: str | Path | None = None) -> dict:
    """Write ``report.md``, ``report.html`` and PNGs into ``out`` (default ``root``); return their paths."""
    runs = load_runs(root)
    if not runs:
        raise SteerscaleError(f"no evaluation runs under {root}", "run `steerscale eval ... -o DIR` first")
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    rs = rows(runs)
    cmps = comparisons(runs)
    plots = _plots(runs, out)
    cols = ["task", "model", "mode", "steer", "strategy", "limit", "n", "failed", "metric", "score", "kl", "ppl_ratio",
            "seconds"]
    md = ["# steerscale evaluation report", "", f"{len(runs)} run(s) under `{root}`. Scores: mean [95% bootstrap "
          "interval]; KL: mean per-token KL(base || steered) on the shipped neutral texts.", "", "## Runs", "",
          _table(rs, cols), "## Paired comparisons against the unsteered run", "",
          _table(cmps, ["task", "model", "config", "n", "diff", "p_perm", "p_sign", "wins/losses"]), "## Plots", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    body = ["<h1>steerscale evaluation report</h1>", _html_table(rs, cols), "<h2>Paired comparisons</h2>",
            _html_table(cmps, ["task", "model", "config", "n", "diff", "p_perm", "p_sign", "wins/losses"])]
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(f'<p><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}"></p>')
    html_path = out / "report.html"
    html_path.write_text("<!doctype html><meta charset='utf-8'><title>steerscale report</title>"
                         "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}"
                         "table{border-collapse:collapse}</style>" + "\n".join(body))
    return {"markdown": md_path, "html": html_path, "plots": plots, "rows": rs, "comparisons": cmps}


def _html_table(rs: list[dict], cols: list[str]) -> str:
    if not rs:
        return "<p><i>none</i></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rs)
    return f"<table><tr>{head}</tr>{body}</table>"
