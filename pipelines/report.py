"""`report.html`: a run's stages, curves and scores on one self-contained page.

The page opens offline from the run folder (or an attachment): plots are inline SVG drawn
here, the confusion matrix is the evaluate stage's PNG as a data URI, there is no script
and no network reference. Every text that comes from a file or a config is escaped.

    write_report(results, dest)            # results: what `pipelines.dag.run` returns
    report_from_folders(pretrain_run_dir, finetune_run_dir, evaluate_dir, dest=...)

Sources: metrics.csv / eval.csv of the training stages (`read_metrics`, local or URI),
memory.json, the evaluate stage's eval.json + confusion.png, the data manifest, and
optionally the learning-quality results (benchmarks/quality.jsonl, committed: the cells BENCHMARKS.md reports).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import statistics
from typing import Any, Iterable

from .storage import is_uri, join_path, read_bytes, write_atomic
from .train.metrics import best_eval, read_metrics

STAGES = ("data", "pretrain", "finetune", "evaluate", "score", "deploy", "request")  # as pipelines.dag
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
SKIP_COLUMNS = {"step", "time", "epoch", "batch_index"}  # bookkeeping, not results
MAX_POINTS = 600  # longer series are thinned evenly (the last point kept): the page stays small


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: float) -> str:
    """A table number: 1,143,067 / 20,289 / 7.691 / 0.04860."""
    if abs(v) >= 1000 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _tick(v: float) -> str:
    """An axis label: 12.5k, 0.05, 7."""
    return f"{v / 1e3:g}k" if abs(v) >= 1e4 else f"{v:g}"


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About `n` round tick values (steps of 1, 2 or 5 x 10^k; whole numbers if `integer`,
    as steps are) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = max((hi - lo) / n, 1.0 if integer else 0.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step)
    return [round(k * step, 12) for k in range(first, math.ceil(hi / step - 1e-9) + 1)]


def svg_plot(title: str, series: dict[str, list[tuple[float, float]]], *, xlabel: str = "step",
             ylabel: str = "", from_zero: bool = False, width: int = 560, height: int = 300) -> str:
    """A line plot: axes with round ticks, light grid, one polyline per series (markers too
    when a series is short, as held-out evaluations are), a legend under the title. Points
    that are not finite are dropped; a plot with no point left is a note instead."""
    series = {name: [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return f'<p class="note">{_e(title)}: nothing recorded.</p>'
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    xt = nice_ticks(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
    yt = nice_ticks(0.0 if from_zero and min(ys) >= 0 else min(ys), max(ys))
    left, right, top, bottom = 62, 14, 48 + 16 * ((len(series) - 1) // 4), 42
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def py(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" data-plot="{_e(title)}"><title>{_e(title)}</title>',
           f'<text x="{width / 2}" y="18" class="ptitle">{_e(title)}</text>']
    for x in xt:
        out.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{top + ph}" class="grid"/>'
                   f'<text x="{px(x):.1f}" y="{top + ph + 16}" class="xt">{_tick(x)}</text>')
    for y in yt:
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{py(y) + 4:.1f}" class="yt">{_tick(y)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>'
               f'<text x="{left + pw / 2}" y="{height - 6}" class="xl">{_e(xlabel)}</text>'
               f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" class="xl">{_e(ylabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if len(pts) > MAX_POINTS:
            pts = pts[::math.ceil(len(pts) / MAX_POINTS)] + [pts[-1]]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline data-series="{_e(name)}" points="{coords}" fill="none" stroke="{color}" '
                   f'stroke-width="1.8"><title>{_e(name)}</title></polyline>')
        if len(pts) <= 40:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.8" fill="{color}"/>' for x, y in pts]
        lx, ly = left + (i % 4) * (pw / 4), 36 + 16 * (i // 4)
        out.append(f'<rect x="{lx:.1f}" y="{ly - 8}" width="14" height="4" fill="{color}"/>'
                   f'<text x="{lx + 18:.1f}" y="{ly - 2}" class="legend">{_e(name)}</text>')
    return "\n".join(out) + "</svg>"


def _curves(rows: list[dict], columns: Iterable[str], scale: float = 1.0) -> dict[str, list[tuple[float, float]]]:
    return {c: [(r["step"], r[c] * scale) for r in rows if c in r] for c in columns}


def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """A table; float cells formatted, every cell escaped."""
    def cell(v: Any) -> str:
        return _e(_num(v) if isinstance(v, float) else v)

    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return (f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{body}</tbody></table>")


def _final_table(train: list[dict], evals: list[dict]) -> str:
    """Each recorded metric at the first and at the last row (training, then held-out)."""
    rows = []
    for name, src in (("training", train), ("held-out", evals)):
        if src:
            first, last = src[0], src[-1]
            rows.append([f"{name} step", first["step"], last["step"]])
            rows += [[c, first.get(c, ""), last[c]] for c in last if c not in SKIP_COLUMNS]
    return _table(["metric", "first", "final"], rows, "final")


def _wall_s(train: list[dict], evals: list[dict]) -> float | None:
    """The training loop's wall time from its rows' timestamps (the step-0 evaluation on)."""
    times = [r["time"] for r in (*evals, *train) if "time" in r]
    return max(times) - min(times) if len(times) > 1 else None


def _training_section(kind: str, run_dir: str) -> tuple[str, float | None]:
    """Plots and the final-metrics table of a pretraining or fine-tuning run folder."""
    train, evals = read_metrics(run_dir, "metrics.csv"), read_metrics(run_dir, "eval.csv")
    losses = [c for c in (train[-1] if train else {}) if c.endswith("/loss")]
    if len(losses) != 1:  # the total is worth a line only beside two or more objectives
        losses = ["loss", *losses]
    held = [c for c in (evals[-1] if evals else {}) if c.startswith("eval/") and not c.endswith("loss")]
    tps = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    plots = [svg_plot(f"{kind}: training loss per objective", _curves(train, losses), ylabel="loss"),
             svg_plot(f"{kind}: held-out {'accuracy per objective' if kind == 'pretraining' else 'dev scores'}",
                      {c[len("eval/"):]: pts for c, pts in _curves(evals, held).items()}, ylabel="score",
                      from_zero=True),
             svg_plot(f"{kind}: throughput" + (f" (median {_num(statistics.median(tps))} tokens/s)" if tps else ""),
                      _curves(train, ["tokens_per_s"]), ylabel="tokens/s", from_zero=True),
             svg_plot(f"{kind}: model FLOPs utilisation", {"MFU %": _curves(train, ["mfu"], 100.0)["mfu"]},
                      ylabel="MFU (%)", from_zero=True)]
    memory = read_bytes(join_path(run_dir, "memory.json"))
    note = ""
    if memory is not None:
        m = json.loads(memory)
        note = (f'<p class="note">memory ({_e(m.get("measured", ""))}): {_e(_num(m.get("parameters", 0)))} parameters, '
                f'ZeRO-{_e(m.get("zero_stage"))}, {_e(m.get("precision"))}, peak RSS per rank '
                + _e(", ".join(f"{b / 2**20:.0f} MiB" for b in m.get("max_rss_bytes", []))) + "</p>")
    wall = _wall_s(train, evals)
    html_ = (f'<p class="path">{_e(run_dir)}</p><div class="plots">{"".join(plots)}</div>{note}'
             f'<h3>final metrics</h3>{_final_table(train, evals)}')
    return html_, wall


def _test_section(evaluate_dir: str) -> str:
    body = read_bytes(join_path(evaluate_dir, "eval.json"))
    if body is None:
        return f'<p class="note">no eval.json in {_e(evaluate_dir)}</p>'
    r = json.loads(body)
    head = (f'<p class="path">{_e(r.get("model", ""))} on {_e(r.get("data", ""))}: '
            f'{_e(r.get("examples", r.get("n", "")))} examples</p>')
    if "per_type" in r:  # token task: entity scores
        o = r["overall"]
        summary = _table(["entity F1", "precision", "recall", "token accuracy"],
                         [[o["f1"], o["precision"], o["recall"], r.get("token_accuracy", "")]], "summary")
        per = _table(["type", "precision", "recall", "F1", "support"],
                     [[t, s["precision"], s["recall"], s["f1"], s["support"]] for t, s in r["per_type"].items()])
    else:
        summary = _table(["accuracy", "macro-F1", "weighted F1"],
                         [[r["accuracy"], r["macro_f1"], r.get("weighted_f1", "")]], "summary")
        per = _table(["class", "precision", "recall", "F1", "support"],
                     [[c, s["precision"], s["recall"], s["f1"], s["support"]] for c, s in r["per_class"].items()])
    png = read_bytes(join_path(evaluate_dir, "confusion.png"))
    image = ("" if png is None else '<figure><img class="confusion" alt="confusion matrix (rows gold, columns '
             f'predicted)" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'
             "<figcaption>confusion matrix: rows gold, columns predicted</figcaption></figure>")
    return f'{head}{summary}<div class="side">{per}{image}</div>'


def _quality_section(path: str) -> str:
    """The learning-quality table: mean [min-max] (n seeds) per starting point and task."""
    body = read_bytes(path)
    if body is None:
        return f'<p class="note">no learning-quality results at {_e(path)}</p>'
    from .quality import label_rows_by_init, quality_cells

    results = label_rows_by_init([json.loads(line) for line in body.decode().splitlines() if line.strip()])
    rows = list(dict.fromkeys(r["row"] for r in results))
    columns = list(dict.fromkeys(r["column"] for r in results))
    cells = quality_cells(results)
    return (f'<p class="path">{_e(path)}: test accuracy (conll2003: entity F1), mean [min-max] over seeds, '
            f'each seed at the encoder learning rate that did best on dev</p>'
            + _table(["starting point", *columns], [[row, *(cells.get((row, c), "not run") for c in columns)] for row in rows],
                     "quality"))


def stage_headline(name: str, out: dict) -> str:
    """One stage's figure: its console line in `cloze run` and its row in the report. `out`
    is the stage's result (a cached stage's too: the data stage's manifest may be on disk only)."""
    if name == "data":
        manifest = out.get("manifest")
        if manifest is None:
            raw = read_bytes(join_path(out["data_dir"], "manifest.json"))
            manifest = json.loads(raw) if raw else {}
        examples = manifest.get("examples")
        return f"{_num(sum(examples.values()) if isinstance(examples, dict) else examples)} examples" if examples else ""
    if name == "pretrain":
        acc = [e for e in out.get("evals") or [] if "eval/mlm/acc" in e]
        if acc:
            return f"held-out MLM acc {acc[0]['eval/mlm/acc']:.3f} -> {acc[-1]['eval/mlm/acc']:.3f}"
        loss = (out.get("metrics") or {}).get("loss")
        return f"loss {loss:.3f}" if loss is not None else ""
    if name == "finetune":
        return f"best dev F1 {out['dev_f1']:.3f}" if out.get("dev_f1") is not None else ""
    if name == "evaluate":
        if "accuracy" in out:
            return f"test accuracy {out['accuracy']:.3f}, macro-F1 {out['macro_f1']:.3f}"
        return f"test entity F1 {out['f1']:.3f}" if "f1" in out else out.get("why", "")
    if name == "deploy":
        return f"{out.get('url', '')} (Ray Serve app {out.get('app', '')!r})"
    if name == "score":
        line = f"{_num(out.get('rows', 0))} rows scored ({_num(out.get('errors', 0))} with an error)"
        if out.get("rows_per_s") and not out.get("skipped"):
            line += f", {out['rows_per_s']:.0f} rows/s on {out['actors']} actor(s)"
        return line
    if name != "request":
        return ""
    answer = out.get("answer", {})
    first = (answer.get("results") or [answer])[0] if isinstance(answer, dict) else {}
    said = f"label: {first['label']}" if "label" in first else json.dumps(answer)[:80]
    return f"POST {out.get('route', '')} {json.dumps(out.get('text', '')[:50])} -> {said}"


def write_report(results: dict, dest: str, quality: str | None = None) -> str:
    """Write `report.html` for a `pipelines.dag.run` result into folder `dest` (or to `dest`
    itself when it ends in .html; local or URI); returns its path. `results["stages"]`, when
    the DAG gives it, maps a stage to {"status", "elapsed_s"}; otherwise a stage's status is
    done / cached and a training stage's time is its loop's wall time from its metrics.
    `quality`: a quality.jsonl of benchmarks/quality.py (its table is added)."""
    given = results.get("stages", {})
    outs = {"data": results if results.get("data_dir") else None, "pretrain": results if results.get("run_dir") else None,
            **{s: results.get(s) for s in STAGES[2:]}}
    sections, walls = [], {}
    for name, kind in (("pretrain", "pretraining"), ("finetune", "fine-tuning")):
        if outs[name] and outs[name].get("run_dir"):
            body, walls[name] = _training_section(kind, outs[name]["run_dir"])
            sections.append(f'<section id="{name}"><h2>{kind}</h2>{body}</section>')
    if outs["evaluate"] and outs["evaluate"].get("output"):
        sections.append(f'<section id="test"><h2>test report</h2>{_test_section(outs["evaluate"]["output"])}</section>')
    if quality:
        sections.append(f'<section id="quality"><h2>learning quality</h2>{_quality_section(quality)}</section>')
    rows = []
    for name in STAGES:
        out = outs[name]
        if out is None:
            rows.append([name, "not run", "", "", ""])
            continue
        status = given.get(name, {}).get("status") or ("cached" if out.get("skipped") else "done")
        if given.get(name, {}).get("elapsed_s") is not None:
            took = f"{given[name]['elapsed_s']:.0f} s"
        else:
            took = f"{walls[name]:.0f} s (training loop)" if walls.get(name) is not None else ""
        where = out.get("data_dir") if name == "data" else out.get("model_dir") or out.get("output") or out.get("run_dir") or ""
        rows.append([name, status, took, stage_headline(name, out), where])
    title = "cloze run report"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"
            f'<p class="path">written {_e(datetime.datetime.now().isoformat(timespec="seconds"))}</p>'
            f'<section id="stages"><h2>stages</h2>{_table(["stage", "status", "time", "headline", "output"], rows, "stages")}'
            f"</section>{''.join(sections)}</body></html>\n")
    path = dest if dest.endswith(".html") else join_path(dest, "report.html")
    if not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, page.encode())
    return path


def report_from_folders(pretrain_run_dir: str, finetune_run_dir: str | None = None, evaluate_dir: str | None = None,
                        *, dest: str, quality: str | None = None, data_dir: str | None = None) -> str:
    """The same report from run folders alone (no DAG result): stage rows from the folders."""
    results: dict[str, Any] = {"run_dir": pretrain_run_dir, "evals": read_metrics(pretrain_run_dir, "eval.csv")}
    if data_dir:
        results["data_dir"] = data_dir
    if finetune_run_dir:
        best = best_eval(finetune_run_dir) or {}
        results["finetune"] = {"run_dir": finetune_run_dir, "dev_f1": best.get("eval/f1")}
    if evaluate_dir:
        body = read_bytes(join_path(evaluate_dir, "eval.json"))
        report = json.loads(body) if body else {}
        results["evaluate"] = {"output": evaluate_dir, **{k: report[k] for k in ("f1", "accuracy", "macro_f1")
                                                           if k in report}}
    return write_report(results, dest, quality)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"DejaVu Sans",sans-serif;color:#222;margin:24px auto;max-width:1200px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
h3{font-size:15px;margin:14px 0 6px}.path,.note{color:#666;font-size:12px;word-break:break-all}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plot{border:1px solid #eee;background:#fff}
.plot text{font-size:11px;fill:#333}.plot .ptitle{font-size:13px;font-weight:600;text-anchor:middle}
.plot .xt{text-anchor:middle}.plot .yt{text-anchor:end}.plot .xl{text-anchor:middle;fill:#555}
.plot .grid{stroke:#eee}.plot .frame{fill:none;stroke:#999}
.side{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}figure{margin:6px 0}
figcaption{font-size:12px;color:#666}img.confusion{border:1px solid #eee;max-width:560px}
"""
