"""The serving benchmark's report: `results.json`, `results.md` (tables) and `throughput.png`.

`write_report(results, out)` writes all three from what `loadtest.serving.bench_serving`
returned. `results.md` has one table per workload × images per request × TextNorm: one row per
system (columns: img/s and p50 / p99 latency at each concurrency, and the errors), the ceiling
rows (at batch = images per request × concurrency), then the ratio rows (img/s ÷ naive,
÷ LitServe, ÷ the best image + prompt ceiling, ÷ the best ceiling doing the system's own work
per image: images only for the stack's cached rl prompts, the counting set for cold TextNorm
on), and below it where the
CPU was spent (server CPU ms per image, the stack split into gateway and Triton). It is meant
to be pasted into the README as is. The plot shows the best image + prompt ceiling as a dashed
line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.cpu_time import IDLE_SERVERS, LOAD_GENERATOR
from loadtest.serving import BASELINES, LABELS, SERVED, best_ceiling

CEILING_ROWS = ("pair", "image", "pair_textnorm")
RATIO_LABEL = {
    "naive": "naive",
    "litserve": "LitServe",
    "ceiling": "best ceiling",
    "ceiling_same_work": "best same-work ceiling",
}


def _rate(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def sections(results: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(workload, images, textnorm) of every table, in run order."""
    seen: dict[tuple[str, int, str], None] = {}
    for p in results["points"]:
        seen.setdefault((p["workload"], p["images"], p["textnorm"]), None)
    if not seen and results["ceiling"]:  # ceiling only: one table per workload
        meta = results["meta"]
        for w in meta["workloads"]:
            for i in meta["images"]:
                for t in meta["textnorm"]:
                    seen.setdefault((w, i, t), None)
    return list(seen)


def table(results: dict[str, Any], workload: str, images: int, textnorm: str) -> list[list[str]]:
    """One table as rows of cells, the header first."""
    levels = results["meta"]["concurrency"]
    header = ["system"]
    for c in levels:
        header += [f"C={c} img/s", f"C={c} p50 / p99 ms"]
    header.append("errors")
    rows = [header]
    here = [
        p
        for p in results["points"]
        if (p["workload"], p["images"], p["textnorm"]) == (workload, images, textnorm)
    ]
    systems = [s for s in SERVED if any(p["system"] == s for p in here)]
    for system in systems:
        at = {p["concurrency"]: p for p in here if p["system"] == system}
        row = [LABELS[system]]
        for c in levels:
            p = at.get(c)
            row += [
                _rate(p["img_s"]) if p else "–",
                f"{_ms(p['p50_ms'])} / {_ms(p['p99_ms'])}" if p else "–",
            ]
        row.append(str(sum(p["errors"] for p in at.values())))
        rows.append(row)
    ceiling = {(c["variant"], c["batch"]): c for c in results["ceiling"]}
    for variant in CEILING_ROWS:
        if variant == "pair_textnorm" and (workload, textnorm) != ("cold", "on"):
            continue
        if not any((variant, images * c) in ceiling for c in levels):
            continue
        batch = "C" if images == 1 else f"{images}·C"
        row = [f"{LABELS[f'ceiling:{variant}']} (batch = {batch})"]
        for c in levels:
            m = ceiling.get((variant, images * c))
            row += [
                _rate(m["pairs_s"]) if m else "–",
                f"{_ms(m['p50_ms'])} / {_ms(m['p99_ms'])}" if m else "–",
            ]
        row.append("–")
        rows.append(row)
    ratios = [
        r
        for r in results["ratios"]
        if (r["workload"], r["images"], r["textnorm"]) == (workload, images, textnorm)
    ]
    for system in [*systems, "ceiling"]:
        for baseline in (*BASELINES, "ceiling", "ceiling_same_work"):
            at = {
                r["concurrency"]: r["ratio"]
                for r in ratios
                if r["system"] == system and r["baseline"] == baseline
            }
            if not at:
                continue
            name = system
            if system == "ceiling":
                name = "ceiling (batch = C)" if images == 1 else f"ceiling (batch = {images}·C)"
            row = [f"{name} ÷ {RATIO_LABEL[baseline]}"]
            for c in levels:
                row += [f"{at[c]:.2f}×" if c in at else "–", ""]
            row.append("")
            rows.append(row)
    return rows


def cpu_table(
    results: dict[str, Any], workload: str, images: int, textnorm: str
) -> list[list[str]]:
    """CPU milliseconds per image in the windows, per system and concurrency: the server's
    total, split by role where it has several ("gateway + triton"); the header first. Only the
    header when the results predate the CPU readings."""
    levels = results["meta"]["concurrency"]
    rows = [["system", *(f"C={c} server CPU ms/img" for c in levels)]]
    here = [
        p
        for p in results["points"]
        if (p["workload"], p["images"], p["textnorm"]) == (workload, images, textnorm)
        and p.get("cpu_ms_per_img")
    ]
    for system in SERVED:
        at = {p["concurrency"]: p["cpu_ms_per_img"] for p in here if p["system"] == system}
        if at:
            rows.append([LABELS[system], *(_cpu_cell(at.get(c)) for c in levels)])
    return rows


def _cpu_cell(per_role: dict[str, float] | None) -> str:
    if not per_role:
        return "–"
    server = {r: ms for r, ms in per_role.items() if r not in (IDLE_SERVERS, LOAD_GENERATOR)}
    total = _ms(sum(server.values()))
    if len(server) == 1:
        return total
    return f"{total} = " + " + ".join(f"{_ms(ms)} {role}" for role, ms in server.items())


def _bystanders_line(results: dict[str, Any]) -> str | None:
    """What shared the cores with the system measured: the other servers, the clients."""
    points = [p for p in results["points"] if p.get("cpu_cores")]
    if not points:
        return None
    idle = [p["cpu_cores"][IDLE_SERVERS] for p in points]
    client = [p["cpu_ms_per_img"][LOAD_GENERATOR] for p in points]
    paused = "baselines not measured paused" if results["meta"].get("pause_idle") else "none paused"
    return (
        f"Meanwhile the servers not measured ({paused}) kept {max(idle):.3f} cores busy at "
        f"most, and the load generator itself (the benchmark's process, on the same cores) used "
        f"{_ms(min(client))}–{_ms(max(client))} ms of CPU per image."
    )


def _markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |"]
    lines.append("| --- |" + " ---: |" * (len(rows[0]) - 1))
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _title(results: dict[str, Any], workload: str, images: int, textnorm: str) -> str:
    rule = results["meta"]["rules"].get(workload)
    tn = f"TextNorm on (rule `{rule}`)" if textnorm == "on" else "TextNorm off"
    what = {"rl": "RL: prompts from a pool of 16", "cold": "cold: every prompt new"}[workload]
    plural = "image" if images == 1 else "images"
    return f"{what} · {images} {plural} per request · {tn}"


def _warmup(meta: dict[str, Any]) -> str:
    """How a point warmed up: seconds, and answers per client (1 before the setting existed)."""
    return (
        f"≥ {meta.get('warmup_s', 2.0):g} s and {meta.get('warmup_answers', 1)} answers per client"
    )


def markdown(results: dict[str, Any]) -> str:
    """The whole `results.md`: how it was measured, then every table."""
    meta = results["meta"]
    out = ["# Serving benchmark", ""]
    if meta.get("command"):
        out += [f"`{meta['command']}`", ""]
    model = meta["model"]
    head = "with the learned head" if meta.get("head") else "no head"
    towers = f"{meta.get('precision', 'fp32')} towers"
    if meta.get("baseline_precision", "fp32") != "fp32":
        towers += f", baselines {meta['baseline_precision']}"
    out.append(
        f"Model `{model}` ({head}; {towers}; export `{meta.get('cache_key') or '–'}`), "
        f"{meta['cores']} cores ({meta['cpu']}; baselines with "
        f"{meta.get('baseline_threads', '?')} torch threads), {meta['started']}. "
        f"Medians of {meta['runs']} windows of "
        f"{meta['seconds']:g} s after warm-up ({_warmup(meta)}); "
        "closed-loop clients (C = concurrency); "
        f"{meta['image_px']}-px PNGs; every item carries its own prompt."
    )
    parity = results.get("parity") or {}
    if parity.get("max_abs_diff"):
        diffs = ", ".join(
            f"{k} {v:.1e}" for k, v in parity["max_abs_diff"].items() if k != parity["reference"]
        )
        out += ["", f"Same model everywhere: max |raw − {parity['reference']}'s raw| on 4 items: "]
        out[-1] += diffs or "–"
        if towers != "fp32 towers" and parity.get("tolerance"):
            tolerances = ", ".join(f"{k} {v:.0e}" for k, v in parity["tolerance"].items())
            out[-1] += f" (tolerances with {towers}: {tolerances})"
        if parity.get("errors"):
            out[-1] += f" (failed: {', '.join(parity['errors'])})"
    best = best_ceiling(results["ceiling"])
    best_batch = next(
        (c["batch"] for c in results["ceiling"] if c["variant"] == "pair" and c["pairs_s"] == best),
        None,
    )
    if results["ceiling"]:
        out += [
            "",
            f"Ceiling: {_ceiling_runtime(results)} in one process "
            f"({results.get('ceiling_threads')} threads), PNG decode + tokenisation + the "
            "exported image tower (preprocessing in-graph) and text tower, at batch = images "
            "per request × C, in (image, prompt) pairs/s; latency = one batch call. Best "
            f"image + prompt ceiling: {_rate(best)} pairs/s (batch {best_batch}). The "
            f"counting-set row encodes {results.get('texts_per_pair_textnorm', 0):.1f} "
            "prompts per pair.",
        ]
    out += [
        "",
        "img/s credits each request by the share of its duration inside a window; p50 / p99 "
        "pool the requests started in the windows; errors count every failed request of the "
        "point (warm-up and drain included). The baselines never compute TextNorm. Server "
        "CPU ms/img: the CPU seconds the server's processes used in the windows per image "
        "answered (the stack split into `gateway`, its own process, and `triton`, everything "
        "it started).",
    ]
    if meta.get("pause_idle"):
        out[-1] += (
            " While a system or the ceiling is measured, the baselines not measured are "
            "paused (SIGSTOP to their process group): idle, LitServe's workers poll."
        )
    for workload, images, textnorm in sections(results):
        out += ["", f"### {_title(results, workload, images, textnorm)}", ""]
        out.append(_markdown_table(table(results, workload, images, textnorm)))
        if textnorm == "off" and any(
            p["measured_under"] == "on" and p["textnorm"] == "off" for p in results["points"]
        ):
            out += ["", "Baselines: the TextNorm-on measurement (they ignore TextNorm)."]
        cpu = cpu_table(results, workload, images, textnorm)
        if len(cpu) > 1:
            out += ["", "CPU per image answered in the windows (ms):", ""]
            out.append(_markdown_table(cpu))
    line = _bystanders_line(results)
    if line:
        out += ["", line]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """img/s vs concurrency per system: one panel per workload × images × TextNorm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sections(results)
    workloads = list(dict.fromkeys(w for w, _, _ in panels))
    columns = list(dict.fromkeys((i, t) for _, i, t in panels))
    fig, axes = plt.subplots(
        len(workloads),
        len(columns),
        figsize=(4.2 * len(columns), 3.4 * len(workloads)),
        squeeze=False,
    )
    best = best_ceiling(results["ceiling"])
    levels = results["meta"]["concurrency"]
    for r, workload in enumerate(workloads):
        for k, (images, textnorm) in enumerate(columns):
            ax = axes[r][k]
            here = [
                p
                for p in results["points"]
                if (p["workload"], p["images"], p["textnorm"]) == (workload, images, textnorm)
            ]
            for system in SERVED:
                line = sorted((p["concurrency"], p["img_s"]) for p in here if p["system"] == system)
                if line:
                    ax.plot(*zip(*line, strict=True), marker="o", label=LABELS[system])
            if best:
                ax.axhline(best, color="k", linestyle="--", label="best ceiling: image + prompt")
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.minorticks_off()
            ax.set_xlabel("concurrency (clients)")
            ax.set_ylabel("images/s")
            ax.set_ylim(bottom=0)
            ax.set_title(f"{workload} · {images} img/req · TextNorm {textnorm}", fontsize=10)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"serving throughput — {Path(results['meta']['model']).name}", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend may reach past the axes
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write results.json, results.md and throughput.png into `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "plot": out / "throughput.png",
    }
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["plot"])
    return paths


def _ceiling_runtime(results: dict[str, Any]) -> str:
    """The runtime the ceiling ran the towers with: the served export's (bf16: OpenVINO)."""
    bf16 = results.get("meta", {}).get("precision") == "bf16"
    return "OpenVINO (bf16)" if bf16 else "ONNX Runtime"
