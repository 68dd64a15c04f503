"""Reports of a benchmark run: printed tables, JSON, CSV, Markdown with PNG plots, --compare.

A run's result is one JSON-able dict (``SCHEMA``): the environment, the ceilings, the
settings, the backends, and one row per (op, pass, implementation, configuration); see
``benchmarks/NOTES.md`` for the fields. Tables pivot the rows: one table per (op, pass),
one line per configuration, one column per implementation, cells in the op's unit
(TFLOP/s, GB/s, Mtok/s), and ours annotated with the ratio to the best peer measured in
the same run (> 1: faster than every peer).

Plots need matplotlib; without it the report says so and everything else is written.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, TextIO

from benchmarks.common import NOISY_MIN_SAMPLES, NOISY_SPREAD, config_label

SCHEMA = "fast_attn.benchmarks/1"
COMPARE_THRESHOLD = 0.05  # --compare reports changes of more than 5% in the median time
ROW_KEY = ("op", "pass", "impl", "config", "dtype")

# Columns of the CSV, in order; the shape fields follow, prefixed "shape.".
CSV_FIELDS = ("op", "pass", "impl", "ours", "config", "dtype", "device", "status", "median_ms",
              "p20_ms", "p80_ms", "samples", "spread", "noisy", "unit", "throughput", "ceiling_fraction",
              "peak_mem_mb", "best_peer", "ratio_to_best_peer", "ratio_note", "note")
# Shape fields tried, in order, as a plot's x axis (the first one that varies).
X_AXIS_FIELDS = ("seqlen", "cache_len", "seqlen_k", "width", "rows", "tokens", "batch")
PASS_ORDER = ("fwd", "bwd", "fwd+bwd")
OURS_STYLE = {"linewidth": 2.2, "marker": "o"}  # ours stand out: thick solid lines
PEER_STYLE = {"linewidth": 1.2, "marker": ".", "linestyle": "--"}
PASS_TITLES = {"block": {"fwd": "inference (fwd)", "fwd+bwd": "training step (fwd+bwd)"}}
NOISY_MARK = "~"  # before a noisy cell's value
NOISE_LEGEND = (f"{NOISY_MARK} noisy: the 20th-80th percentile spread of its timed calls exceeds "
                f"{NOISY_SPREAD:.0%} of the median, or it has fewer than {NOISY_MIN_SAMPLES} of them; "
                "shown, not ranked (no ratio to a peer, left out of the summary)")
# Plots: the y axis spans the data with this margin; the ceiling is drawn as a line only
# when it is below CEILING_DRAW_FACTOR x the data's maximum, else written in the panel.
Y_MARGIN = 1.15
CEILING_DRAW_FACTOR = 1.5


def row_key(row: Mapping) -> tuple:
    return tuple(row[k] for k in ROW_KEY)


# ------------------------------------------------------------------------------- ratios


def add_ratios(rows: Sequence[dict]) -> None:
    """Sets ``best_peer`` (the successful peer with the lowest median on the same work) on
    every successful row of ours, and ``ratio_to_best_peer`` (its time / ours) only when
    neither row is ``noisy``; otherwise ``ratio_note`` says which was noisy. A noisy
    fastest peer withholds the ratio rather than ranking us against a slower, steadier
    peer (which would flatter us)."""
    best: dict = {}
    for row in rows:
        if row["ours"] or row["status"] != "ok":
            continue
        key = (row["op"], row["pass"], row["config"], row["dtype"], row["device"])
        if key not in best or row["median_ms"] < best[key]["median_ms"]:
            best[key] = row
    for row in rows:
        if not row["ours"] or row["status"] != "ok":
            continue
        row["ratio_to_best_peer"] = None
        peer = best.get((row["op"], row["pass"], row["config"], row["dtype"], row["device"]))
        if peer is None or not row["median_ms"] > 0:
            continue
        row["best_peer"] = peer["impl"]
        noisy = [who for who, r in (("ours", row), (f"peer {peer['impl']}", peer)) if r.get("noisy")]
        if noisy:
            row["ratio_note"] = "no ratio: noisy (" + " and ".join(noisy) + ")"
        else:
            row["ratio_to_best_peer"] = peer["median_ms"] / row["median_ms"]


def headline(rows: Sequence[dict]) -> list[dict]:
    """Per (op, pass, our impl): the geometric mean and minimum of the ratio to the best
    peer over the configurations with a ratio, and how many were left out as noisy."""
    groups: dict = OrderedDict()
    for row in rows:
        if not row["ours"] or row["status"] != "ok" or not row.get("best_peer"):
            continue
        group = groups.setdefault((row["op"], row["pass"], row["impl"]), {"ratios": [], "noisy": 0})
        if row.get("ratio_to_best_peer"):
            group["ratios"].append(row["ratio_to_best_peer"])
        else:
            group["noisy"] += 1
    return [
        {"op": op, "pass": pass_, "impl": impl, "configs": len(g["ratios"]), "noisy": g["noisy"],
         "geomean_ratio": math.exp(sum(math.log(r) for r in g["ratios"]) / len(g["ratios"])) if g["ratios"] else None,
         "min_ratio": min(g["ratios"]) if g["ratios"] else None}
        for (op, pass_, impl), g in groups.items()
    ]


def _headline_lines(heads: Sequence[dict]) -> list[list[str]]:
    ratio = lambda value: f"{value:.2f}x" if value is not None else "-"  # noqa: E731
    return [[h["op"], h["pass"], h["impl"], str(h["configs"]), str(h.get("noisy", 0)),
             ratio(h["geomean_ratio"]), ratio(h["min_ratio"])] for h in heads]


HEADLINE_HEADER = ["op", "pass", "impl", "configs", "left out (noisy)", "geomean", "worst"]


def noise_summary(rows: Sequence[dict]) -> Optional[str]:
    """One line: how many measured rows are noisy, and the largest spread (None on GPU runs
    and runs that measured nothing)."""
    measured = [r for r in rows if r["status"] == "ok" and r.get("spread") is not None and r["device"] == "cpu"]
    if not measured:
        return None
    noisy = sum(bool(r.get("noisy")) for r in measured)
    widest = max(measured, key=lambda r: r["spread"])
    fewest = min(r["samples"] for r in measured if r.get("samples") is not None)
    return (f"{noisy} of {len(measured)} measured rows are noisy (marked {NOISY_MARK}, not ranked); "
            f"largest spread {widest['spread']:.0%} ({widest['op']} {widest['pass']} {widest['impl']} "
            f"{widest['config']}); fewest samples {fewest}")


# ------------------------------------------------------------------------------ pivots


def _ordered(values: Iterable) -> list:
    return list(OrderedDict.fromkeys(values))


def _groups(rows: Sequence[dict]) -> "OrderedDict[tuple, list]":
    """Rows by (op, pass), ops in run order, passes fwd / bwd / fwd+bwd."""
    ops = _ordered(r["op"] for r in rows)
    groups: OrderedDict = OrderedDict()
    for op in ops:
        for pass_ in PASS_ORDER:
            chosen = [r for r in rows if r["op"] == op and r["pass"] == pass_]
            if chosen:
                groups[(op, pass_)] = chosen
    return groups


def _format_value(value: Optional[float]) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cell(row: Optional[dict]) -> str:
    if row is None:
        return ""
    if row["status"] == "skipped":
        return "-"
    if row["status"] == "error":
        return "err"
    text = _format_value(row["throughput"]) if row["throughput"] is not None else f"{row['median_ms']:.3g}ms"
    if row.get("ratio_to_best_peer"):
        text += f" ({row['ratio_to_best_peer']:.2f}x)"
    if row.get("noisy"):
        samples = row.get("samples")
        why = (f"{samples} sample{'s' if samples != 1 else ''}" if samples is not None and samples < NOISY_MIN_SAMPLES
               else f"spread {row['spread']:.0%}" if row.get("spread") is not None else "noisy")
        text = f"{NOISY_MARK}{text} ({why})"
    return text


def pivot(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, lines): one line per configuration, one column per implementation that
    ran at least once (ours first); impls that never ran are left to the notes."""
    impls = _ordered(r["impl"] for r in sorted(rows, key=lambda r: not r["ours"]))
    impls = [i for i in impls if any(r["impl"] == i and r["status"] != "skipped" for r in rows)]
    by_config: OrderedDict = OrderedDict()
    for row in rows:
        by_config.setdefault(row["config"], {})[row["impl"]] = row
    header = ["config"] + impls
    lines = [[config] + [_cell(cells.get(impl)) for impl in impls] for config, cells in by_config.items()]
    return header, lines


def _problems(rows: Sequence[dict]) -> list[str]:
    """One line per (impl, status, reason): why cells are "-" or "err"."""
    counts: OrderedDict = OrderedDict()
    for row in rows:
        if row["status"] != "ok":
            key = (row["impl"], row["status"], row["note"])
            counts[key] = counts.get(key, 0) + 1
    return [f"{impl} {status} ({n} row{'s' if n > 1 else ''}): {note}"
            for (impl, status, note), n in counts.items()]


def _unit(rows: Sequence[dict]) -> str:
    units = [r["unit"] for r in rows if r["unit"]]
    return units[0] if units else "ms"


def _title(op: str, pass_: str) -> str:
    return f"{op} {PASS_TITLES.get(op, {}).get(pass_, pass_)}"


# ------------------------------------------------------------------------------ printed


def _text_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(header), "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def _load_text(env: Mapping) -> str:
    """ "1-minute load average 0.4 at the start of the run, 1.9 at the end" (what is known)."""
    start, end = env.get("loadavg_1m_start"), env.get("loadavg_1m_end")
    fmt = lambda value: "unknown" if value is None else f"{value:.2f}"  # noqa: E731
    text = f"1-minute load average {fmt(start)} at the start of the run"
    return text + (f", {fmt(end)} at the end" if end is not None else "")


def _threads_text(env: Mapping) -> str:
    threads = env.get("torch_threads")
    return f"{threads if threads is not None else '?'} torch thread{'' if threads == 1 else 's'}"


def cpu_note(env: Mapping) -> str:
    """What a CPU run's figures are, and are not (the first note of a CPU report)."""
    return (f"no CUDA GPU here: these are CPU timings, at small sizes, of the torch backend and torch's "
            f"eager peers on this machine ({env.get('cpu') or 'CPU'}, {env.get('cpu_count')} cores, "
            f"{_threads_text(env)} (the idle cores); {_load_text(env)}; other processes "
            "share the cores). They show that the suite works and how "
            "those implementations compare on this machine at this load; they say nothing about the GPU "
            "kernels (cuda, triton). GPU figures need a GPU.")


def _has_cpu_timings(rows: Sequence[Mapping]) -> bool:
    return any(r["status"] == "ok" and r.get("device") == "cpu" and r.get("spread") is not None for r in rows)


def environment_lines(result: Mapping) -> list[str]:
    env, ceilings = result["env"], result["ceilings"]
    device = f"{env['gpu']} ({env['sm_count']} SMs, {env['gpu_memory_gib']} GiB)" if env["gpu"] else \
        f"CPU ({env['cpu_count']} cores, {_threads_text(env)}; {_load_text(env)})"
    lines = [
        f"device: {device}",
        f"software: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"python {env['python']}, fast_attn {env['fast_attn']} ({env['git_commit']})",
        f"peers installed: flash_attn {env['flash_attn'] or 'no'}, liger_kernel {env['liger_kernel'] or 'no'}",
    ]
    copy = ceilings.get("copy_gbps")
    mm = ceilings.get("matmul_tflops")
    lines.append(
        "ceilings: copy " + (f"{copy:.0f} GB/s" if copy else f"n/a ({ceilings.get('copy_error')})")
        + f", {ceilings.get('dtype')} matmul "
        + (f"{mm:.3g} TFLOP/s {tuple(ceilings['matmul_shape'])}" if mm
           else f"n/a ({ceilings.get('matmul_error')})"))
    noisy = [f"{name} spread {ceilings[f'{name}_spread']:.0%}" for name in ("copy", "matmul")
             if (ceilings.get(f"{name}_spread") or 0) > NOISY_SPREAD and not env["gpu"]]
    if noisy:
        lines[-1] += f" (noisy: {', '.join(noisy)})"
    for name, info in result["backends"].items():
        lines.append(f"backend {name}: " + ("measured" if info["measured"] else f"not measured: {info['reason']}"))
    return lines


def print_report(result: Mapping, file: TextIO = sys.stdout) -> None:
    """The printed tables and the headline ratios."""
    for note in result["notes"]:
        print(f"NOTE: {note}", file=file)
    for line in environment_lines(result):
        print(line, file=file)
    cpu = _has_cpu_timings(result["rows"])
    if cpu:
        print(f"legend: {NOISE_LEGEND}", file=file)
    for (op, pass_), rows in _groups(result["rows"]).items():
        header, lines = pivot(rows)
        print(f"\n== {_title(op, pass_)} [{_unit(rows)}; ours: (ratio to the best peer)]", file=file)
        if len(header) > 1:
            print(_text_table(header, lines), file=file)
        for problem in _problems(rows):
            print(f"  {problem}", file=file)
    heads = headline(result["rows"])
    if heads:
        print("\n== ours against the best peer (geometric mean / worst ratio over the configurations "
              "with a ratio; noisy ones left out)", file=file)
        print(_text_table(HEADLINE_HEADER, _headline_lines(heads)), file=file)
    summary = noise_summary(result["rows"])
    if summary:
        print(f"\n{summary}", file=file)
    for note in result["notes"]:
        print(f"NOTE: {note}", file=file)


# ------------------------------------------------------------------------------- files


def write_json(result: Mapping, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def write_csv(rows: Sequence[Mapping], path: Path) -> None:
    shape_fields = _ordered(k for row in rows for k in row["shape"])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(list(CSV_FIELDS) + [f"shape.{k}" for k in shape_fields])
        for row in rows:
            writer.writerow([_csv_value(row.get(k)) for k in CSV_FIELDS]
                            + [_csv_value(row["shape"].get(k)) for k in shape_fields])


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _md_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    escape = lambda s: str(s).replace("|", "\\|").replace(NOISY_MARK, "\\" + NOISY_MARK)  # noqa: E731
    out = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(escape(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def write_markdown(result: Mapping, path: Path, plots: Mapping[str, str], plot_note: Optional[str]) -> None:
    """report.md: environment, ceilings, headline ratios, one section per op with its
    tables and plot; ``plots`` maps op -> image path relative to the report."""
    env = result["env"]
    title = env["gpu"] or "CPU"
    out = [f"# fast_attn benchmarks: {title}, {env['date'][:10]}", ""]
    for note in result["notes"]:
        out += [f"> **Note.** {note}", ""]
    out += [f"- {line}" for line in environment_lines(result)]
    settings = result["settings"]
    out += [f"- settings: dtype {settings['dtype']}, {'quick' if settings['quick'] else 'full'} run, "
            f"{result['elapsed_s']:.0f} s; command: `{settings['command']}`", ""]
    out += ["Cells: throughput in the section's unit; ours also show (best peer's time / ours): "
            "above 1.00x is faster than every peer measured in this run. `-` skipped, `err` failed "
            "(reasons under each table). FLOP and byte counts: `benchmarks/formulas.py`. "
            "Times, percentiles, samples, spreads and peak memory: `results.csv` / `results.json`.", ""]
    if _has_cpu_timings(result["rows"]):
        out += [f"Legend: `{NOISY_MARK}` {NOISE_LEGEND[len(NOISY_MARK) + 1:]}.", ""]
        summary = noise_summary(result["rows"])
        if summary:
            out += [summary.replace(NOISY_MARK, f"`{NOISY_MARK}`") + ".", ""]
    heads = headline(result["rows"])
    if heads:
        out += ["## Ours against the best peer", "",
                "Geometric mean and worst ratio over the configurations with a ratio; "
                "noisy configurations are left out and counted.", "",
                _md_table(HEADLINE_HEADER, _headline_lines(heads)), ""]
    if plot_note:
        out += [f"Plots: {plot_note}", ""]
    for op in _ordered(r["op"] for r in result["rows"]):
        out += [f"## {op}", ""]
        if op in plots:
            out += [f"![{op}]({plots[op]})", ""]
        for (group_op, pass_), rows in _groups(result["rows"]).items():
            if group_op != op:
                continue
            header, lines = pivot(rows)
            out += [f"### {_title(op, pass_)} ({_unit(rows)})", ""]
            if len(header) > 1:
                out += [_md_table(header, lines), ""]
            out += [f"- {p}" for p in _problems(rows)]
            out += [""]
    if result.get("uncovered_ops"):
        out += [f"Ops without a benchmark yet: {', '.join(result['uncovered_ops'])}.", ""]
    path.write_text("\n".join(out))


# ------------------------------------------------------------------------------- plots


def _x_field(rows: Sequence[dict]) -> Optional[str]:
    for field in X_AXIS_FIELDS:
        if len({r["shape"].get(field) for r in rows}) > 1:
            return field
    return None


def _panel_fields(rows: Sequence[dict], x_field: Optional[str]) -> list[str]:
    """The shape fields that split an op's rows into panels: those that vary, minus the
    x axis and minus any field the others determine (attention's batch follows seqlen,
    its heads follow head_dim, so its panels are head_dim x causal)."""
    varying = [f for f in _ordered(k for r in rows for k in r["shape"])
               if f != x_field and len({str(r["shape"].get(f)) for r in rows}) > 1]
    kept = list(varying)
    for field in varying:
        others = [f for f in kept if f != field] + ([x_field] if x_field else [])
        values: dict = {}
        for row in rows:
            values.setdefault(tuple(str(row["shape"].get(f)) for f in others), set()).add(
                str(row["shape"].get(field)))
        if all(len(v) == 1 for v in values.values()):
            kept.remove(field)
    return kept


def _short_number(value: int) -> str:
    """16384 -> "16k", 512 -> "512" (axis labels)."""
    return f"{value // 1024}k" if value >= 1024 and value % 1024 == 0 else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def throughput_band(row: Mapping) -> Optional[tuple[float, float]]:
    """The row's p80 and p20 times as throughputs (low, high); None without both."""
    if not row.get("throughput") or not row.get("p20_ms") or not row.get("p80_ms"):
        return None
    scale = row["throughput"] * row["median_ms"]
    return scale / row["p80_ms"], scale / row["p20_ms"]


def y_axis(rows: Sequence[Mapping], ceiling: Optional[float]) -> tuple[float, bool]:
    """(top of the y axis, whether the ceiling is drawn as a line) for a panel of rows.

    The axis spans the plotted data: the medians' throughputs and the p20-p80 bands of
    the rows that are not noisy (a noisy row's band is drawn but may be cut off), times
    ``Y_MARGIN``. The ceiling joins the axis only when it is below
    ``CEILING_DRAW_FACTOR`` x the data's maximum; otherwise it is written in the panel."""
    values = [r["throughput"] for r in rows if r.get("throughput")]
    values += [band[1] for r in rows if not r.get("noisy") and (band := throughput_band(r))]
    data_max = max(values, default=0.0)
    if data_max <= 0:
        return (Y_MARGIN * ceiling if ceiling else 1.0), bool(ceiling)
    drawn = bool(ceiling) and ceiling <= CEILING_DRAW_FACTOR * data_max
    return Y_MARGIN * (max(data_max, ceiling) if drawn else data_max), drawn


def write_plots(result: Mapping, folder: Path) -> tuple[dict, Optional[str]]:
    """One PNG per op: a column per panel (shape fields other than the x axis), a row per
    pass; throughput against the x-axis field, a line per implementation with its p20-p80
    band shaded, noisy points circled. The y axis is scaled to the data (``y_axis``);
    the ceiling is a dotted line when it is near the data, else a number in the panel.
    Returns ({op: file name}, None) or ({}, why no plots)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "skipped: matplotlib is not installed (pip install matplotlib, or fast_attn[bench])"
    folder.mkdir(parents=True, exist_ok=True)
    ceilings = result["ceilings"]
    ceiling_of = {"TFLOP/s": ceilings.get("matmul_tflops"), "GB/s": ceilings.get("copy_gbps")}
    written = {}
    for op in _ordered(r["op"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["op"] == op and r["status"] == "ok" and r["throughput"]]
        if not rows:
            continue
        passes = [p for p in PASS_ORDER if any(r["pass"] == p for r in rows)]
        x_field = _x_field(rows)
        panel_fields = _panel_fields(rows, x_field)
        panel_key = lambda r: tuple((f, r["shape"].get(f)) for f in panel_fields)  # noqa: E731
        panels = _ordered(panel_key(r) for r in rows)
        colors = {impl: f"C{i % 10}" for i, impl in
                  enumerate(_ordered(r["impl"] for r in sorted(rows, key=lambda r: not r["ours"])))}
        fig, axes = plt.subplots(len(passes), len(panels), squeeze=False,
                                 figsize=(3.6 * len(panels) + 1, 3.0 * len(passes) + 0.6))
        for i, pass_ in enumerate(passes):
            for j, panel in enumerate(panels):
                ax = axes[i][j]
                chosen = [r for r in rows if r["pass"] == pass_ and panel_key(r) == panel]
                unit = _unit(chosen) if chosen else ""
                for impl in _ordered(r["impl"] for r in sorted(chosen, key=lambda r: not r["ours"])):
                    points = [r for r in chosen if r["impl"] == impl]
                    style = OURS_STYLE if points[0]["ours"] else PEER_STYLE
                    noisy = [r for r in points if r.get("noisy")]
                    if x_field:
                        points.sort(key=lambda r: r["shape"][x_field])
                        xs = [r["shape"][x_field] for r in points]
                        ax.plot(xs, [r["throughput"] for r in points], label=impl, color=colors[impl], **style)
                        bands = [throughput_band(r) for r in points]
                        if all(bands):
                            ax.fill_between(xs, [b[0] for b in bands], [b[1] for b in bands],
                                            color=colors[impl], alpha=0.15, linewidth=0)
                        if noisy:
                            ax.plot([r["shape"][x_field] for r in noisy], [r["throughput"] for r in noisy],
                                    linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                                    markeredgecolor="red", label="noisy (not ranked)")
                    else:
                        row = points[0]
                        band = throughput_band(row)
                        error = [[row["throughput"] - band[0]], [band[1] - row["throughput"]]] if band else None
                        ax.bar([impl], [row["throughput"]], yerr=error, capsize=4, label=impl, color=colors[impl])
                        if row.get("noisy"):  # hatched over the bar
                            ax.bar([impl], [row["throughput"]], fill=False, hatch="//", edgecolor="red",
                                   linewidth=0, label="noisy (not ranked)")
                top, draw_ceiling = y_axis(chosen, ceiling_of.get(unit))
                if x_field:
                    ax.set_xscale("log", base=2)
                    ticks = sorted({r["shape"][x_field] for r in chosen})
                    ax.set_xticks(ticks, [_short_number(t) for t in ticks])
                    ax.minorticks_off()
                    ax.set_xlabel(x_field)
                else:
                    ax.tick_params(axis="x", labelrotation=30)
                if draw_ceiling:
                    ax.axhline(ceiling_of[unit], color="gray", linestyle=":", linewidth=1, label="ceiling")
                elif ceiling_of.get(unit):
                    ax.text(0.02, 0.97, f"ceiling {_format_value(ceiling_of[unit])} {unit} (off chart)",
                            transform=ax.transAxes, va="top", ha="left", fontsize=7, color="dimgray")
                ax.set_ylabel(unit)
                ax.set_ylim(0, top)
                name = config_label(dict(panel))
                ax.set_title(f"{_title(op, pass_)}" + (f"\n{name}" if name else ""), fontsize=9)
                ax.grid(True, alpha=0.3)
        handles: OrderedDict = OrderedDict()
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
                   ncol=min(len(handles), 6), fontsize=8)
        env = result["env"]
        where = env["gpu"] or (f"CPU, {env.get('cpu_count')} cores, load {env.get('loadavg_1m_start')}"
                               f"-{env.get('loadavg_1m_end')}")
        title = f"{op}: {where}, {result['settings']['dtype']}"
        if not env["gpu"]:
            title += "\ntorch backend and eager peers, not the GPU kernels"
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 0.95 if env["gpu"] else 0.93))
        file_name = f"{_slug(op)}.png"
        fig.savefig(folder / file_name, dpi=110)
        plt.close(fig)
        written[op] = f"{folder.name}/{file_name}"
    return written, None


def write_all(result: Mapping, out: Path) -> dict:
    """results.json, results.csv, report.md and plots/ under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots, plot_note = write_plots(result, out / "plots")
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "report.md"}
    write_json(result, paths["json"])
    write_csv(result["rows"], paths["csv"])
    write_markdown(result, paths["markdown"], plots, plot_note)
    paths["plots"] = [out / p for p in plots.values()]
    paths["plot_note"] = plot_note
    return paths


# ------------------------------------------------------------------------------ compare


def load(path: Path) -> dict:
    """A results.json, checked to be one of ours."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path} is not a benchmark results file (no 'rows')")
    return data


def compare(old: Mapping, new: Mapping, threshold: float = COMPARE_THRESHOLD) -> dict:
    """Rows present in both runs and successful in both, split by the change of their
    median time: ``faster``/``slower`` by more than ``threshold``, else ``unchanged``.
    Each change is (row key, old ms, new ms, speed-up = old / new). Rows noisy in either
    run are listed under ``noisy``, not compared. Also lists rows only in one run and rows
    whose status changed."""
    old_rows = {row_key(r): r for r in old["rows"]}
    new_rows = {row_key(r): r for r in new["rows"]}
    out = {"faster": [], "slower": [], "unchanged": 0, "noisy": [], "status_changed": [],
           "only_old": [k for k in old_rows if k not in new_rows],
           "only_new": [k for k in new_rows if k not in old_rows]}
    for key, new_row in new_rows.items():
        old_row = old_rows.get(key)
        if old_row is None:
            continue
        if old_row["status"] != new_row["status"]:
            out["status_changed"].append((key, old_row["status"], new_row["status"]))
            continue
        if new_row["status"] != "ok":
            continue
        if old_row.get("noisy") or new_row.get("noisy"):  # a change within the noise is not a change
            out["noisy"].append(key)
            continue
        old_ms, new_ms = old_row["median_ms"], new_row["median_ms"]
        speedup = old_ms / new_ms
        if speedup > 1 + threshold:
            out["faster"].append((key, old_ms, new_ms, speedup))
        elif 1 / speedup > 1 + threshold:
            out["slower"].append((key, old_ms, new_ms, speedup))
        else:
            out["unchanged"] += 1
    out["faster"].sort(key=lambda c: -c[3])
    out["slower"].sort(key=lambda c: c[3])
    return out


def print_compare(old: Mapping, new: Mapping, threshold: float = COMPARE_THRESHOLD,
                  file: TextIO = sys.stdout) -> dict:
    """Prints what got faster or slower by more than ``threshold`` (median time)."""
    diff = compare(old, new, threshold)
    describe = lambda key: " ".join(str(k) for k in key)  # noqa: E731
    print(f"\n== compare: {old['env'].get('gpu') or 'CPU'} {old['env'].get('date', '')[:10]} -> "
          f"{new['env'].get('gpu') or 'CPU'} {new['env'].get('date', '')[:10]} "
          f"(changes of more than {threshold:.0%} in the median time)", file=file)
    for field in ("gpu", "torch", "triton", "cuda", "cudnn"):
        if old["env"].get(field) != new["env"].get(field):
            print(f"  warning: {field} differs: {old['env'].get(field)} -> {new['env'].get(field)}", file=file)
    for label in ("faster", "slower"):
        print(f"{label}: {len(diff[label])}", file=file)
        for key, old_ms, new_ms, speedup in diff[label]:
            print(f"  {label:6s} {describe(key)}: {old_ms:.4g} -> {new_ms:.4g} ms ({speedup:.2f}x)", file=file)
    print(f"unchanged: {diff['unchanged']}", file=file)
    if diff["noisy"]:
        print(f"not compared, noisy in either run: {len(diff['noisy'])}", file=file)
    for key, was, now in diff["status_changed"]:
        print(f"  status {describe(key)}: {was} -> {now}", file=file)
    if diff["only_old"] or diff["only_new"]:
        print(f"rows only in the old run: {len(diff['only_old'])}; only in the new run: {len(diff['only_new'])}",
              file=file)
    return diff

