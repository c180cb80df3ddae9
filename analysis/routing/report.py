"""Assemble the routing report: one JSON (machine-readable), Markdown summary and a
self-contained HTML page (figures embedded as base64 PNG, no external resources)."""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path

import numpy as np

from moedit.analysis.routing import metrics as rm
from moedit.analysis.routing import plots
from moedit.analysis.routing import sources

FORMAT = "moedit-routing-report-v1"
TABLE_KEYS = ("tokens_per_expert_by_noise", "tokens_per_expert_by_class", "tokens_per_expert_by_prompt")
SOURCES = (("logs", "training logs"), ("probe", "offline probe"), ("samples", "moedit sample"))


def jsonable(value):
    """numpy -> Python, NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def analyse_logs(run: sources.RunLogs, last: int | None) -> dict:
    """Metrics of the last `last` log intervals (summed) plus the history over training."""
    merged, window = sources.merged_window(run, last)
    layers = []
    for layer in merged["layers"]:
        metrics = rm.layer_metrics(layer)
        for key in TABLE_KEYS:
            metrics[key] = layer.get(key)
        layers.append(metrics)
    return {"noise_bin_edges": merged["noise_bin_edges"], "window": window, "layers": layers,
            "summary": rm.summarise_layers(layers), "history": sources.history(run)}


def analyse_samples(samples: dict) -> dict:
    """Metrics of the routing statistics a `moedit sample` JSON recorded (sources.read_samples), with
    its per-prompt expert load (tokens_per_expert_by_prompt: a row per prompt, the last the null caption)."""
    layers = []
    for layer in samples["routing"]["layers"]:
        metrics = rm.layer_metrics(layer)
        for key in TABLE_KEYS:
            metrics[key] = layer.get(key)
        layers.append(metrics)
    return {"noise_bin_edges": samples["routing"]["noise_bin_edges"], "file": samples["file"],
            "num_samples": samples.get("num_samples"), "prompts": samples.get("prompts"),
            "layers": layers, "summary": rm.summarise_layers(layers)}


def run_entry(run: sources.RunLogs, last: int | None, probe: dict | None, samples: dict | None = None) -> dict:
    return jsonable({"name": run.name, "path": str(run.path), "model": sources.describe_model(run),
                     "logs": analyse_logs(run, last) if run.routing else None, "probe": probe,
                     "samples": analyse_samples(samples) if samples else None})


def build_report(entries: list[dict]) -> dict:
    comparison = []
    for entry in entries:
        row = {"run": entry["name"], **{k: entry["model"].get(k) for k in ("router", "num_experts")}}
        for source, _ in SOURCES:
            if entry.get(source):
                row.update({f"{source}/{k}": v for k, v in entry[source]["summary"].items()})
        comparison.append(row)
    return {"format": FORMAT, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": entries, "comparison": comparison}


def _bin_ticks(edges: list[float]) -> list[str]:
    return [f"{a:.2f}-{b:.2f}" for a, b in zip(edges, edges[1:])]


def figures(report: dict) -> list[tuple[str, str, bytes]]:
    """(section, caption, png) for every figure that has data."""
    out = []
    runs = report["runs"]
    multi = len(runs) > 1
    if multi:
        summaries = [(r["name"], (r["logs"] or r["probe"] or r["samples"])["summary"]) for r in runs]
        out.append(("Comparison", "Headline metrics per run.", plots.comparison_plot(summaries)))
        out.append(("Comparison", "Load balance over training, all runs.",
                    plots.history_plot([(r["name"], r["logs"]["history"]) for r in runs
                                        if r["logs"]])))
        out.append(("Comparison", "Capacity vs noise level (probe), all runs.",
                    plots.capacity_curves([(r["name"], r["probe"]["layers"]) for r in runs
                                           if r["probe"]])))
    for run in runs:
        for source, label in SOURCES:
            data = run.get(source)
            if not data:
                continue
            section = f"{run['name']}: {label}"
            layers, edges = data["layers"], data["noise_bin_edges"]
            out.append((section, "Expert utilisation per MoE layer.",
                        plots.layer_expert_heatmap(layers, f"{run['name']} ({label})")))
            out.append((section, "Noise-bin x expert routing share per layer.",
                        plots.table_heatmaps(layers, "tokens_per_expert_by_noise",
                                             "noise level bin (1 = pure noise)",
                                             _bin_ticks(edges), "noise level x expert")))
            out.append((section, "Class x expert routing share per layer.",
                        plots.table_heatmaps(layers, "tokens_per_expert_by_class",
                                             "class label", None, "class x expert")))
            prompts = data.get("prompts") if source == "samples" else None
            if prompts:
                ticks = [p if len(p) <= 24 else p[:21] + "..." for p in prompts] + ["(null caption)"]
                out.append((section, "Prompt x expert routing share per layer (last row: the null caption "
                            "of guidance's unconditional forwards).",
                            plots.table_heatmaps(layers, "tokens_per_expert_by_prompt", "prompt", ticks,
                                                 "prompt x expert")))
            if source == "logs" and not multi:
                out.append((section, "Load-balance metrics over training steps.",
                            plots.history_plot([(run["name"], data["history"])])))
            if source == "probe":
                out.append((section, "Capacity actually used vs noise level.",
                            plots.capacity_curves([(run["name"], layers)])))
                out.append((section, "Capacity used per class.", plots.class_capacity_plot(layers)))
                out.append((section, "Capacity-predictor reliability diagram.",
                            plots.calibration_plot(layers)))
                out.append((section, "Routing consistency between adjacent sampling steps.",
                            plots.step_consistency_plot(layers)))
                if data.get("repa"):
                    repa = data["repa"]
                    out.append((section, "REPA similarity bin x expert routing share per layer (bins: quantiles "
                                "of the tokens' REPA similarity, low to high).",
                                plots.table_heatmaps(repa["layers"], "load_by_bin", "REPA similarity bin",
                                                     _similarity_ticks(repa), "REPA similarity x expert")))
    return [(s, c, png) for s, c, png in out if png]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


LAYER_COLUMNS = [("block", "block"), ("tokens", "tokens"), ("cv_population", "CV pop"),
                 ("cv_sample", "CV sample"), ("max_over_mean", "max/mean"),
                 ("max_violation", "MaxVio"), ("dead_fraction", "dead"),
                 ("router_entropy_norm", "entropy/logE"), ("drop_rate", "drop rate"),
                 ("capacity_used", "capacity"), ("mi_noise_nats", "MI noise [nats]"),
                 ("mi_class_nats", "MI class [nats]"), ("mi_prompt_nats", "MI prompt [nats]")]


def _layer_rows(layers: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = [(k, h) for k, h in LAYER_COLUMNS if any(m.get(k) is not None for m in layers)]
    extra = []
    if any(m.get("predictor") for m in layers):
        extra = [("precision", "pred. precision"), ("recall", "pred. recall")]
    if any(m.get("next_layer") for m in layers):
        extra.append(("jaccard_next", "Jaccard next layer"))
    if any(m.get("adjacent_steps") for m in layers):
        extra.append(("jaccard_steps", "Jaccard adj. steps"))
    rows = []
    for m in layers:
        row = [_fmt(m.get(k)) for k, _ in columns]
        for key, _ in extra:
            if key in ("precision", "recall"):
                row.append(_fmt((m.get("predictor") or {}).get(key)))
            elif key == "jaccard_next":
                row.append(_fmt((m.get("next_layer") or {}).get("jaccard_best_match")))
            else:
                row.append(_fmt((m.get("adjacent_steps") or {}).get("mean")))
        rows.append(row)
    return [h for _, h in columns] + [h for _, h in extra], rows


def _summary_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    keys = ["run", "router", "num_experts", "logs/cv_population_mean", "logs/max_violation_max",
            "logs/dead_fraction_mean", "logs/router_entropy_norm_mean", "logs/drop_rate_mean",
            "logs/mi_noise_nats_mean", "probe/cv_population_mean", "probe/capacity_used_mean",
            "probe/mi_noise_nats_mean", "probe/mi_class_nats_mean", "samples/capacity_used_mean",
            "samples/mi_prompt_nats_mean"]
    keys = [k for k in keys if any(row.get(k) is not None for row in report["comparison"])]
    return keys, [[_fmt(row.get(k)) for k in keys] for row in report["comparison"]]


REPA_NOTES = ("REPA similarity s = cos(projector(h), encoder feature) per token, h = the hidden tokens after "
              "block repa_depth (the training-only projector, from the checkpoint). Bins: quantiles of s over "
              "the probed tokens (edges on a 0.01 grid; ties merge bins). Share = the bin's assignments to "
              "the expert / all the bin's assignments x E (1 = fair share); experts/token = the bin's "
              "assignments / its tokens. r = Pearson correlation of s and a token's number of experts "
              "(capacity routers); MI(expert; s bin) in nats from the bin x expert assignments.")


def _similarity_ticks(repa: dict) -> list[str]:
    edges = repa["similarity_edges"]
    return [f"{a:.2f}..{b:.2f}" for a, b in zip(edges, edges[1:])]


def repa_tables(repa: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the REPA-similarity section: one summary row per MoE layer, then
    per layer a row per similarity bin (its range, tokens, experts per token, each expert's share)
    and a last row with each expert's mean similarity."""
    header = ["block", "router", "tokens", "r(s, experts/token)", "MI(expert; s bin) [nats]", "MI norm",
              "mean s of experts (min..max)"]
    rows = []
    for m in repa["layers"]:
        means = [v for v in m["mean_similarity_by_expert"] if v is not None]
        spread = f"{min(means):.3f}..{max(means):.3f}" if means else "-"
        rows.append([_fmt(m["block"]), _fmt(m["router"]), _fmt(int(m["tokens"])), _fmt(m["corr_similarity_experts"]),
                     _fmt(m["mi_nats"]), _fmt(m["mi_norm"]), spread])
    tables = [(f"REPA similarity: per layer ({_fmt(int(repa['tokens']))} tokens, mean s "
               f"{_fmt(repa['mean_similarity'])}, aligned block {repa.get('depth')})", header, rows)]
    ticks = _similarity_ticks(repa)
    for m in repa["layers"]:
        experts = m["num_experts"]
        header = ["s bin", "similarity", "tokens", "experts/token", *[f"e{e} share" for e in range(experts)]]
        rows = [[str(b), tick, _fmt(int(tokens)), _fmt(per_token), *[_fmt(v) for v in share]]
                for b, (tick, tokens, per_token, share) in enumerate(zip(
                    ticks, repa["tokens_by_bin"], m["experts_per_token_by_bin"], m["share_by_bin"]))]
        rows.append(["mean s", "", "", "", *[_fmt(v) for v in m["mean_similarity_by_expert"]]])
        tables.append((f"REPA similarity: block {m['block']}", header, rows))
    return tables


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


NOTES = ("CV pop = population std / mean of per-expert load (ddof 0); CV sample uses ddof 1. "
         "MaxVio = max load / ideal - 1, ideal = tokens x k / E (k = top-k or capacity). "
         "Entropy = mean per-token router entropy / log E. MI in nats (plug-in estimate, "
         "biased upward for few tokens). Capacity = tokens processed / (S/E) = mean experts "
         "per token. Log metrics sum the last logging intervals of the window.")


def to_markdown(report: dict) -> str:
    parts = ["# Routing report", "", f"Generated {report['created']} ({FORMAT}).", "",
             "## Summary", "", _md_table(*_summary_rows(report)), "", NOTES, ""]
    for run in report["runs"]:
        parts += [f"## {run['name']}", "", f"Path: `{run['path']}`; model: "
                  + ", ".join(f"{k} {v}" for k, v in run["model"].items() if v is not None), ""]
        for source, _ in SOURCES:
            data = run.get(source)
            if not data:
                continue
            if source == "logs":
                where = (f"training steps {data['window']['first_step']}..{data['window']['last_step']}"
                         f" ({data['window']['intervals']} intervals)")
            elif source == "probe":
                where = f"{data['forwards']} forwards, {_fmt(data['samples'])} samples"
            else:
                where = f"{data['file']}, {_fmt(data['num_samples'])} images"
            parts += [f"### {source} ({where})", "", _md_table(*_layer_rows(data["layers"])), ""]
            if source == "probe" and data.get("repa"):
                parts += ["### REPA similarity", "", REPA_NOTES, ""]
                for title, header, rows in repa_tables(data["repa"]):
                    parts += [f"{title}:", "", _md_table(header, rows), ""]
            if source == "samples" and data.get("prompts"):
                parts += ["Expert load by prompt (share of the prompt's tokens per expert, summed over layers):",
                          "", _md_table(*prompt_load_rows(data)), ""]
    parts += ["Figures: see routing_report.html (self-contained).", ""]
    return "\n".join(parts)


def prompt_load_rows(samples: dict) -> tuple[list[str], list[list[str]]]:
    """A row per prompt (and the null caption): its tokens and each expert's share of them, summed
    over the MoE layers that recorded tokens_per_expert_by_prompt."""
    tables = [np.asarray(m["tokens_per_expert_by_prompt"], dtype=float) for m in samples["layers"]
              if m.get("tokens_per_expert_by_prompt") is not None]
    if not tables or len({t.shape for t in tables}) != 1:
        return ["prompt"], []
    total = np.sum(tables, axis=0)  # (P + 1, E)
    names = [*samples["prompts"], "(null caption)"]
    header = ["prompt", "tokens", *[f"expert {e}" for e in range(total.shape[1])]]
    rows = []
    for name, row in zip(names, total):
        share = row / row.sum() if row.sum() else row
        rows.append([name, _fmt(int(row.sum())), *[_fmt(float(v)) for v in share]])
    return header, rows


CSS = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#111;background:#fff}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0}td,th{border:1px solid #bbb;
padding:2px 6px;text-align:right}th{background:#eee}img{max-width:100%;display:block}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0.5em 0;flex:1 1 540px}figcaption{font-size:12px;color:#444}
.note{font-size:12px;color:#333}"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(report: dict, figs: list[tuple[str, str, bytes]]) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>moedit routing report"
             f"</title><style>{CSS}</style></head><body><h1>moedit routing report</h1>",
             f"<p class='note'>Generated {html.escape(report['created'])}.</p><h2>Summary</h2>",
             _html_table(*_summary_rows(report)), f"<p class='note'>{html.escape(NOTES)}</p>"]
    for run in report["runs"]:
        parts.append(f"<h2>{html.escape(run['name'])}</h2><p class='note'>"
                     f"{html.escape(run['path'])}</p>")
        for source, _ in SOURCES:
            if run.get(source):
                parts.append(f"<h3>{source}: per layer</h3>")
                parts.append(_html_table(*_layer_rows(run[source]["layers"])))
                if source == "probe" and run[source].get("repa"):
                    parts.append(f"<h3>REPA similarity</h3><p class='note'>{html.escape(REPA_NOTES)}</p>")
                    for title, header, rows in repa_tables(run[source]["repa"]):
                        parts.append(f"<h4>{html.escape(title)}</h4>" + _html_table(header, rows))
                if source == "samples" and run[source].get("prompts"):
                    parts.append("<h3>samples: expert load by prompt (shares, summed over layers)</h3>")
                    parts.append(_html_table(*prompt_load_rows(run[source])))
    section = None
    for name, caption, png in figs:
        if name != section:
            parts.append(("</div>" if section is not None else "")
                         + f"<h2>Figures: {html.escape(name)}</h2><div class='figs'>")
            section = name
        data = base64.b64encode(png).decode("ascii")
        width = int.from_bytes(png[16:20], "big")  # PNG IHDR width: wide figures get a full row
        style = " style='flex-basis:100%'" if width > 800 else ""
        parts.append(f"<figure{style}><img alt='{html.escape(caption)}' src='data:image/png;base64,"
                     f"{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append(("</div>" if section is not None else "") + "</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out_dir: str | Path, write_html: bool = True) -> dict[str, Path]:
    """Write routing_report.{json,md,html} into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "routing_report.json", "markdown": out_dir / "routing_report.md"}
    paths["json"].write_text(json.dumps(jsonable(report), indent=1, allow_nan=False))
    paths["markdown"].write_text(to_markdown(report))
    if write_html:
        paths["html"] = out_dir / "routing_report.html"
        paths["html"].write_text(to_html(report, figures(report)))
    return paths
