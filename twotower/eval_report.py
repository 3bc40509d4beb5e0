"""What `python -m twotower eval` writes: the summary table, report.md, the sweep's table and
plot, results.json and the per-prompt outputs (see twotower.evaluate for what is measured)."""
from __future__ import annotations

import csv
import json
import math
import platform
import sys
from pathlib import Path

import torch

from . import metrics
from .sampling import SamplerConfig


def device_name(device) -> str:
    """A readable name of the machine the run used."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(res: dict) -> str:
    """AR vs diffusion, one metric per row."""
    ar, diff, agree_n = res["ar"], res["diffusion"], res["settings"]["agree_tokens"]
    rows = [["QA accuracy", ar["qa"]["accuracy"], diff["qa"]["accuracy"]]]
    seen = res["settings"].get("qa_items_seen_in_training", [])
    if seen:
        rows.append([f"QA accuracy, the {res['settings']['qa_items'] - len(seen)} items not in its training",
                     ar["qa"]["accuracy_unseen"], diff["qa"]["accuracy_unseen"]])
    rows += [[f"QA accuracy: {c}", v, diff["qa"]["by_category"][c]] for c, v in ar["qa"]["by_category"].items()]
    for key, label in (("nll_per_token", "NLL/token (context tower)"), ("distinct_2", "distinct-2"),
                       ("distinct_3", "distinct-3"), ("longest_repeat", "longest repeated n-gram"),
                       ("mean_tokens", "tokens per reply")):
        rows.append([label, ar["open"][key], diff["open"][key]])
    rows.append(["tokens/NFE (open prompts)", ar["speed"]["open"]["tokens_per_nfe"],
                 diff["speed"]["open"]["tokens_per_nfe"]])
    if "tokens_per_pass_both_towers" in diff["speed"]["open"]:     # AR's NFE counts every pass already
        rows.append(["tokens per pass, context tower's counted too (open prompts)", ar["speed"]["open"]["tokens_per_nfe"],
                     diff["speed"]["open"]["tokens_per_pass_both_towers"]])
    rows.append(["batched tokens/s (open prompts)", ar["speed"]["open"]["batched_tokens_per_second"],
                 diff["speed"]["open"]["batched_tokens_per_second"]])
    if "wallclock" in ar:
        rows.append(["tokens/s, batch 1", ar["wallclock"]["tokens_per_second"], diff["wallclock"]["tokens_per_second"]])
    table = markdown_table(["metric", "AR", "diffusion"], rows)
    cmp = res["comparison"]
    lines = [f"- quality retention (QA accuracy diffusion / AR): {fmt(cmp['qa_retention'])}",
             *([f"- quality retention on the QA items not in its training corpus: {fmt(cmp['qa_retention_unseen'])} "
                f"({len(seen)} items were: {', '.join(seen)})"] if seen else []),
             f"- agreement with AR on the first {agree_n} tokens: {fmt(cmp['agreement'])}"]
    drafts = diff["speed"]["open"]
    if "draft_acceptance" in drafts:
        lines.append(f"- verify order, open prompts: {drafts['drafts_checked']} drafts checked, "
                     f"{fmt(drafts['draft_acceptance'])} of them kept (the AR model's own token)"
                     + (f"; draft trees: {fmt(drafts['rows_per_pass'])} block rows per pass, each tree counted "
                        "as deep as its longest path" if "rows_per_pass" in drafts else ""))
        if drafts.get("acceptance_by_depth"):
            lines.append("- acceptance by draft depth (of the d-th drafts the check reached, the share that held; "
                         "depth 1 = the first draft after the written text): "
                         + ", ".join(f"depth {d}: {fmt(a, 2)} ({n} reached)" for d, (a, n) in
                                     enumerate(zip(drafts["acceptance_by_depth"], drafts["drafts_reached_by_depth"]), 1)))
    if "speedup_tokens_per_second" in cmp:
        lines.append(f"- wall-clock speedup (batch 1): {fmt(cmp['speedup_tokens_per_second'], 2)}x")
    return table + "\n\n" + "\n".join(lines)


def guards_text(settings: dict) -> str:
    """'repetition penalty 1.1, no repeated 4-grams' or 'no repeat guards'."""
    return ", ".join(SamplerConfig.from_dict(settings).guard_phrases()) or "no repeat guards"


def report_markdown(res: dict) -> str:
    s = res["settings"]
    head = (f"# TwoTower evaluation: {res['model']['name']}\n\n"
            f"Device: {res['device']}. QA items: {s['qa_items']}, open prompts: {s['open_prompts']}. "
            f"Diffusion: block {s['block_size']}, steps {s['steps']}, threshold {s['threshold']}, "
            f"{s.get('remasking', 'confidence')} order. Both modes: greedy, seed {s['seed']}, {guards_text(s)}; "
            f"answers up to {s['answer_tokens']} tokens, free generations up to "
            f"{s['max_new_tokens']} tokens.\n\nQA rule: {QA_RULE}\n\n")
    body = summary_table(res)
    if res.get("sweep"):
        body += "\n\n## Sweep\n\n" + sweep_markdown(res["sweep"])
    return head + body + "\n"


QA_RULE = ("first sentence of the first non-empty line, lowercased, punctuation and articles removed, "
           "number words as digits; correct if any accepted answer occurs as whole words.")
SWEEP_COLUMNS = ["steps", "threshold", "qa_accuracy", "qa_retention", "agreement", "nll_per_token",
                 "distinct_2", "tokens_per_nfe", "qa_tokens_per_nfe", "batched_tokens_per_second"]


def sweep_columns(rows: list[dict]) -> list[str]:
    return SWEEP_COLUMNS + (["qa_retention_unseen"] if rows and "qa_retention_unseen" in rows[0] else [])


def sweep_markdown(rows: list[dict]) -> str:
    columns = sweep_columns(rows)
    return markdown_table(columns, [[r[c] for c in columns] for r in rows])


def sweep_figure(rows: list[dict], ar: dict):
    """Quality (QA retention, agreement) against tokens per NFE, one line per steps value.
    Retention is on the QA items not in the model's training when it names any."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    retention = "qa_retention_unseen" if "qa_retention_unseen" in sweep_columns(rows) else "qa_retention"
    title = "QA retention (items not in its training)" if retention.endswith("unseen") else "QA retention"
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"{title} vs tokens/NFE", "agreement with AR vs tokens/NFE"))
    for steps in sorted({r["steps"] for r in rows}):
        pts = sorted((r for r in rows if r["steps"] == steps), key=lambda r: r["threshold"])
        for col, key in ((1, retention), (2, "agreement")):
            fig.add_trace(go.Scatter(x=[r["tokens_per_nfe"] for r in pts], y=[r[key] for r in pts],
                                     mode="lines+markers+text", text=[f"{r['threshold']:g}" for r in pts],
                                     textposition="top center", name=f"steps={steps}", legendgroup=str(steps),
                                     showlegend=col == 1), row=1, col=col)
    ar_tpn = ar["speed"]["open"]["tokens_per_nfe"]
    fig.add_trace(go.Scatter(x=[ar_tpn], y=[1.0], mode="markers", marker_symbol="star", marker_size=12,
                             name="AR baseline"), row=1, col=1)
    fig.update_xaxes(title_text="tokens per NFE")
    fig.update_yaxes(title_text="diffusion / AR QA accuracy", row=1, col=1)
    fig.update_yaxes(title_text="fraction of the first tokens equal to AR", row=1, col=2)
    fig.update_layout(title="Diffusion quality vs speed (labels: confidence threshold)", width=1200, height=500)
    return fig


def write_sweep(out: Path, rows: list[dict], ar: dict) -> list[str]:
    """sweep.csv, sweep.md, sweep.html and (with kaleido) sweep.png; returns the names written."""
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep_columns(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.md").write_text(sweep_markdown(rows) + "\n")
    fig = sweep_figure(rows, ar)
    fig.write_html(out / "sweep.html", include_plotlyjs=True)
    written = ["sweep.csv", "sweep.md", "sweep.html"]
    try:
        import kaleido  # noqa: F401
        fig.write_image(out / "sweep.png")
        written.append("sweep.png")
    except Exception as e:  # kaleido missing or without a browser: the HTML suffices
        print(f"[eval] sweep.png skipped ({type(e).__name__}: {e})", file=sys.stderr)
    return written


def public(res: dict) -> dict:
    """The result without the raw generations (JSON-ready; nan becomes null)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not k.startswith("_") and k not in ("correct", "per_prompt_nll")}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and math.isnan(x) else x
    return clean(res)


def write_outputs(out: Path, res: dict, qa: list[dict], open_prompts: list[str]) -> None:
    """results.json, report.md, qa_outputs.jsonl (per QA item) and open_outputs.jsonl (per open prompt)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(public(res), indent=2))
    (out / "report.md").write_text(report_markdown(res))
    ar, diff, n = res["ar"], res["diffusion"], res["settings"]["agree_tokens"]
    with open(out / "qa_outputs.jsonl", "w") as f:
        for i, item in enumerate(qa):
            f.write(json.dumps({**item, "ar": ar["_gen"]["qa"].texts[i], "diffusion": diff["_gen"]["qa"].texts[i],
                                "ar_correct": ar["qa"]["correct"][i],
                                "diffusion_correct": diff["qa"]["correct"][i]}) + "\n")
    with open(out / "open_outputs.jsonl", "w") as f:
        for i, prompt in enumerate(open_prompts):
            a, d = ar["_gen"]["open"], diff["_gen"]["open"]
            f.write(json.dumps({"prompt": prompt, "ar": a.texts[i], "diffusion": d.texts[i],
                                "agreement": metrics.agreement(d.ids[i], a.ids[i], n),
                                "ar_nll": ar["open"]["per_prompt_nll"][i],
                                "diffusion_nll": diff["open"]["per_prompt_nll"][i]}) + "\n")
