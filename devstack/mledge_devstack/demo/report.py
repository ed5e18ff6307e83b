"""The demo's results: `summary.json` (numbers) and `report.html` (the same as charts).

The charts are inline SVG drawn here (no plotting library): a story timeline, the
fleet's uplink over time, the devices on each model version over time, the gate's
scores, bytes shipped per release, uplink per device before and after, and what the
devices flagged. docs/demo.md explains every field.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mledge_devstack.demo.record import decided_at, iso_to_epoch

if TYPE_CHECKING:
    from mledge_devstack.demo.display import Display
    from mledge_devstack.demo.record import DemoRecord, Snapshot

FINAL_PHASE = {"anomaly": "faults", "digits": "classify"}


# ------------------------------------------------------------------------ summary


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _tallies(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return stats.get("demo") or {}


def _uplink(entries: list[dict[str, Any]]) -> dict[str, Any]:
    readings = sum(int(e.get("readings", 0)) for e in entries)
    sent = sum(int(e.get("bytes", 0)) for e in entries)
    messages = sum(int(e.get("messages", 0)) for e in entries)
    return {"readings": readings, "messages": messages, "bytes": sent,
            "bytes_per_reading": round(sent / readings, 2) if readings else None}


def build_summary(demo: DemoRecord, snap: Snapshot | None, error: BaseException | None) -> dict[str, Any]:
    """Everything the run measured, as plain JSON."""
    options = demo.options
    model = demo.model
    versions = dict(sorted((snap.versions if snap else {}).items()))
    trainings = []
    for version, record in versions.items():
        metrics = record.metrics or {}
        data = metrics.get("data") or {}
        gate = record.gate or {}
        lineage = record.lineage or {}

        trainings.append({
            "version": version, "status": str(record.status),
            "trigger": lineage.get("trigger"), "new_records": lineage.get("new_records"),
            "records": data.get("records"), "train": data.get("train"),
            "holdout": data.get("holdout"),
            "metric": gate.get("metric", model.metric), "challenger": gate.get("challenger"),
            "champion": gate.get("champion"),
            "model": {k: v for k, v in (metrics.get("model") or {}).items()
                      if isinstance(v, int | float | str)},
            "gate": {"decision": gate.get("decision"), "reasons": gate.get("reasons", [])},
            "failure_reason": record.failure_reason,
            "detection": metrics.get("detection"),
            "started_s": demo.rel(iso_to_epoch(record.created_at)),
            "decided_s": demo.rel(decided_at(record)),
        })

    final_release = demo.releases[-1]["version"] if demo.releases else None
    final_key = f"{FINAL_PHASE[options.scenario]}/v{final_release}"
    per_device: dict[str, Any] = {}
    phases: dict[str, dict[str, Any]] = {}
    for name, stats in sorted((snap.devices if snap else {}).items()):
        tallies = _tallies(stats)
        before = _uplink([e for e in tallies.values() if int(e.get("version", 0)) == 0])
        after = _uplink([tallies[final_key]] if final_key in tallies else [])
        per_device[name] = {
            "before": before, "after": after,
            "reduction": (round(before["bytes_per_reading"] / after["bytes_per_reading"], 1)
                          if before["bytes_per_reading"] and after["bytes_per_reading"] else None),
            "serving_version": stats.get("serving_version"),
            "swaps": stats.get("swaps"),
            "updates": stats.get("updates"),
        }
        for key, entry in tallies.items():
            agg = phases.setdefault(key, {"phase": entry.get("phase"), "version": entry.get("version"),
                                          "readings": 0, "messages": 0, "bytes": 0, "kinds": {}})
            for field in ("readings", "messages", "bytes"):
                agg[field] += int(entry.get(field, 0))
            for kind, counts in (entry.get("kinds") or {}).items():
                into = agg["kinds"].setdefault(kind, {})
                for field, value in counts.items():
                    into[field] = into.get(field, 0) + int(value)
    phase_list = sorted(phases.values(), key=lambda p: (p.get("first_at", 0), p["version"]))
    order = {"stream": 0, "steady": 1, "shift": 2, "faults": 3, "stream-10": 0, "stream-70": 1,
             "classify": 2}
    phase_list.sort(key=lambda p: (order.get(str(p["phase"]), 9), p["version"]))
    for p in phase_list:
        p["bytes_per_reading"] = round(p["bytes"] / p["readings"], 2) if p["readings"] else None
        for counts in p["kinds"].values():
            counts["flagged_rate"] = _ratio(counts.get("flagged", 0), counts.get("predicted", 0))
            counts["sent_rate"] = _ratio(counts.get("sent", 0), counts.get("readings", 0))
            # On-device inference per prediction (the agent's onnxruntime call).
            counts["us_per_prediction"] = (round(counts.get("inference_us", 0)
                                                 / counts["predicted"], 1)
                                           if counts.get("predicted") else None)
            if counts.get("correct") or options.scenario == "digits":
                counts["accuracy"] = _ratio(counts.get("correct", 0), counts.get("predicted", 0))

    detection = _detection(phase_list)
    fleet_before = _uplink([d["before"] for d in per_device.values()])
    fleet_after = _uplink([d["after"] for d in per_device.values()])
    checks = _checks(options.scenario, trainings, demo.releases, per_device, phase_list,
                     detection)
    outcome = "passed" if error is None and all(c["passed"] for c in checks) else "failed"
    return {
        "scenario": options.scenario, "model": demo.model_name, "devices": options.devices,
        "fleet_rate_per_s": options.fleet_rate,
        "outcome": outcome,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "checks": checks,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(demo.started)),
        "wall_seconds": round(demo.elapsed(), 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "config": {"metric": model.metric, "threshold": model.threshold,
                   "min_improvement": model.min_improvement,
                   "min_train_records": model.min_train_records,
                   "min_new_records": model.min_new_records,
                   "uplink": model.uplink.to_document() if hasattr(model.uplink, "to_document")
                   else None,
                   "pipeline_config": str(options.pipeline_config)},
        "stages": demo.stages,
        "marks_s": {k: round(v, 2) for k, v in demo.marks.items()},
        "trainings": trainings,
        "releases": demo.releases,
        "uplink": {"fleet": {"before": fleet_before, "after": fleet_after,
                             "reduction": (round(fleet_before["bytes_per_reading"]
                                                 / fleet_after["bytes_per_reading"], 1)
                                           if fleet_before["bytes_per_reading"]
                                           and fleet_after["bytes_per_reading"] else None),
                             "after_phase": final_key},
                   "per_device": per_device},
        "phases": phase_list,
        "detection": detection,
        "labels": demo.labels,
        "timeline": demo.timeline,
        "logs": {"devices": str(options.workdir / "logs"),
                 "stack": str(options.workdir / "stack" / "logs")},
    }


# Fewer injected fault readings than this per version make its detection rate noise.
MIN_FAULTS_FOR_RATE = 20
DETECTION_SLACK = 0.05


def _detection(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per serving model version: the injected fault readings it saw and flagged."""
    per_version: dict[int, dict[str, int]] = {}
    for p in phases:
        counts = (p.get("kinds") or {}).get("fault") or {}
        if not counts.get("predicted") or not p.get("version"):
            continue
        into = per_version.setdefault(int(p["version"]), {"fault_readings": 0, "flagged": 0})
        into["fault_readings"] += int(counts.get("predicted", 0))
        into["flagged"] += int(counts.get("flagged", 0))
    return [{"version": v, **c, "rate": _ratio(c["flagged"], c["fault_readings"])}
            for v, c in sorted(per_version.items())]


def _checks(scenario: str, trainings: list[dict[str, Any]], releases: list[dict[str, Any]],
            per_device: dict[str, Any], phases: list[dict[str, Any]],
            detection: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The outcome the story promises, each as a named pass/fail."""
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, detail: str) -> None:
        checks.append({"name": name, "passed": bool(passed), "detail": detail})

    first = trainings[0] if trainings else None
    check("first training rejected by the gate", bool(first and first["status"] == "REJECTED"),
          "; ".join(r for r in first["gate"]["reasons"] if r.endswith("FAIL")) if first
          else "no training")
    wanted = 2 if scenario == "anomaly" else 1
    check(f"{wanted} release(s) installed on every device",
          len(releases) >= wanted and all(r["devices_updated"] == r["devices"] for r in releases),
          ", ".join(f"v{r['version']}: {r['devices_updated']}/{r['devices']}" for r in releases))
    if scenario == "anomaly" and releases:
        last = releases[-1]
        via_delta = all(str(info.get("codec", "")).startswith("delta:")
                        for info in last["per_device"].values())
        check("final release applied as a delta on every device", via_delta,
              json.dumps(last["updated_via"]))
        serving = {d["serving_version"] for d in per_device.values()}
        check("every device serves the final release", serving == {last["version"]},
              f"serving {sorted(str(s) for s in serving)}")
    stale = [f"v{t['version']}" for t in trainings
             if any(r.endswith("FAIL") and ("fleet now runs" in r
                                           or "metrics.json has no champion score" in r)
                    for r in t["gate"]["reasons"])]
    check("no training rejected for a stale or missing champion", not stale,
          ", ".join(stale) or "0 such rejections")
    if scenario == "anomaly":
        measured = [d for d in detection or [] if d["fault_readings"] >= MIN_FAULTS_FOR_RATE]
        worse = [f"v{b['version']} {b['rate']:.0%} < v{a['version']} {a['rate']:.0%}"
                 for a, b in itertools.pairwise(measured)
                 if b["rate"] is not None and a["rate"] is not None
                 and b["rate"] < a["rate"] - DETECTION_SLACK]
        check("no released model flags fewer faults than its predecessor", not worse,
              "; ".join(worse) or ", ".join(f"v{d['version']} {d['rate']:.0%} of "
                                            f"{d['fault_readings']}" for d in measured)
              or "no version saw faults")
    lower = [name for name, d in per_device.items()
             if d["before"]["bytes_per_reading"] and d["after"]["bytes_per_reading"] is not None
             and d["after"]["bytes_per_reading"] < d["before"]["bytes_per_reading"]]
    check("uplink per reading lower after than before on every device",
          bool(per_device) and len(lower) == len(per_device),
          f"{len(lower)}/{len(per_device)} devices")
    return checks


def write_outputs(summary: dict[str, Any], output: Path) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = {"summary": output / "summary.json", "report": output / "report.html"}
    paths["summary"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["report"].write_text(render_html(summary))
    return paths


def print_summary(summary: dict[str, Any], d: Display) -> None:
    """The end-of-run recap in the terminal."""
    d.write("")
    d.write(d.bold(f"Summary ({summary['scenario']}, {summary['devices']} devices, "
                   f"{summary['wall_seconds']:.0f} s)"))
    for t in summary["trainings"]:
        score = t.get("challenger")
        champion = t.get("champion")
        shown = f"{t['metric']} {score:.3f}" if isinstance(score, float) else ""
        vs = f" vs champion {champion:.3f}" if isinstance(champion, float) else ""
        d.write(f"  v{t['version']}: {t['status']:<10} on {t.get('records')} records; {shown}{vs}")
    for r in summary["releases"]:
        deltas = ", ".join(f"{x['codec']} from v{x['from_version']} {x['size']} B" for x in r["deltas"])
        d.write(f"  release v{r['version']}: full {r['full']['size']} B"
                + (f"; deltas {deltas}" if deltas else "; no delta base")
                + f"; shipped {r['bytes_shipped']['total']:,} B to {r['devices_updated']} devices "
                  f"({', '.join(r['updated_via'])}); threshold to whole fleet "
                  f"{r['seconds_threshold_to_fleet']} s")
    fleet = summary["uplink"]["fleet"]
    d.write(f"  uplink per reading: {fleet['before']['bytes_per_reading']} B before a model, "
            f"{fleet['after']['bytes_per_reading']} B after ({fleet['reduction']}x less)")
    for p in summary["phases"]:
        kinds = "; ".join(
            f"{kind}: {c.get('readings', 0)} read, "
            + (f"{c['flagged_rate']:.0%} flagged, " if c.get("flagged_rate") is not None
               and kind != "digit" else "")
            + (f"{c['accuracy']:.1%} correct, " if c.get("accuracy") is not None else "")
            + (f"{c['us_per_prediction']:.0f} us/prediction, "
               if c.get("us_per_prediction") is not None else "")
            + f"{(c.get('sent_rate') or 0):.0%} sent"
            for kind, c in sorted(p["kinds"].items()))
        d.write(f"  {p['phase']:<9} v{p['version']}: {kinds}")
    for det in summary.get("detection") or []:
        d.write(f"  v{det['version']} flagged {det['flagged']}/{det['fault_readings']} injected "
                f"fault readings ({_pct(det['rate'])})")
    for c in summary["checks"]:
        mark = d.good("PASS") if c["passed"] else d.bad("FAIL")
        d.write(f"  {mark} {c['name']} ({c['detail']})")
    outcome = summary["outcome"]
    d.write(d.bold("outcome: ") + (d.good(outcome) if outcome == "passed" else d.bad(outcome)))


# ------------------------------------------------------------------------ SVG charts

PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6",
           "#9d755d", "#bab0ac", "#eeca3b"]
UPLINK_COLOR = "#f58518"
VERSION_COLORS = ["#4c78a8", "#54a24b", "#b279a2", "#72b7b2", "#9d755d", "#e45756"]
STAGE_COLORS = ["#eef3fb", "#fdf1e4", "#eaf6e8", "#fbeaea", "#eef8f7", "#f6eff5", "#f4f4f4"]
FONT = "font-family='system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif'"


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return step * exp
    return 10 * exp


def _fmt(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


class Svg:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.parts: list[str] = []

    def add(self, part: str) -> None:
        self.parts.append(part)

    def text(self, x: float, y: float, text: Any, *, size: int = 12, anchor: str = "start",
             color: str = "#333", weight: str = "normal", rotate: float | None = None) -> None:
        transform = f" transform='rotate({rotate} {x:.1f} {y:.1f})'" if rotate else ""
        self.add(f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' "
                 f"fill='{color}' font-weight='{weight}' {FONT}{transform}>{_esc(text)}</text>")

    def rect(self, x: float, y: float, w: float, h: float, fill: str, title: str = "",
             stroke: str = "none") -> None:
        tip = f"<title>{_esc(title)}</title>" if title else ""
        self.add(f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(0.0, w):.1f}' "
                 f"height='{max(0.0, h):.1f}' fill='{fill}' stroke='{stroke}'>{tip}</rect>")

    def line(self, x1: float, y1: float, x2: float, y2: float, color: str = "#999",
             width: float = 1, dash: str = "") -> None:
        style = f" stroke-dasharray='{dash}'" if dash else ""
        self.add(f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' "
                 f"stroke='{color}' stroke-width='{width}'{style}/>")

    def polyline(self, points: list[tuple[float, float]], color: str, width: float = 2) -> None:
        if len(points) < 2:
            return
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self.add(f"<polyline points='{coords}' fill='none' stroke='{color}' "
                 f"stroke-width='{width}' stroke-linejoin='round'/>")

    def circle(self, x: float, y: float, r: float, fill: str, title: str = "") -> None:
        tip = f"<title>{_esc(title)}</title>" if title else ""
        self.add(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{r}' fill='{fill}'>{tip}</circle>")

    def render(self) -> str:
        return (f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {self.width} {self.height}' "
                f"width='100%' style='max-width:{self.width}px' role='img'>"
                + "".join(self.parts) + "</svg>")


def _axes(svg: Svg, left: float, top: float, width: float, height: float, y_max: float,
          y_label: str, ticks: int = 4) -> None:
    for i in range(ticks + 1):
        value = y_max * i / ticks
        y = top + height - height * i / ticks
        svg.line(left, y, left + width, y, "#e3e3e3")
        svg.text(left - 6, y + 4, _fmt(value), size=11, anchor="end", color="#666")
    svg.line(left, top + height, left + width, top + height, "#888")
    svg.text(14, top + height / 2, y_label, size=11, anchor="middle", color="#555", rotate=-90)


def _legend(svg: Svg, x: float, y: float, items: list[tuple[str, str]]) -> None:
    for label, color in items:
        svg.rect(x, y - 9, 12, 12, color)
        svg.text(x + 17, y + 1, label, size=12)
        x += 24 + 7.2 * len(label)


def chart_story(summary: dict[str, Any]) -> str:
    """Stages as bands; trainings (threshold -> decision) and rollouts (release -> fleet)."""
    total = max(1.0, float(summary.get("wall_seconds") or 1))
    width, left, right = 960, 120, 20
    rows = summary["trainings"]
    height = 90 + 26 * (len(rows) + 1)
    svg = Svg(width, height)
    plot_w = width - left - right

    def x(t: float | None) -> float:
        return left + plot_w * min(max(t or 0.0, 0.0), total) / total

    for i, stage in enumerate(summary["stages"]):
        start, end = stage["started_s"], stage["ended_s"] if stage["ended_s"] is not None else total
        if x(end) - x(start) < 1:
            continue
        svg.rect(x(start), 28, x(end) - x(start), height - 58, STAGE_COLORS[i % len(STAGE_COLORS)],
                 title=f"{stage['name']}: {stage['text']}")
        if x(end) - x(start) >= 24:
            svg.text(x(start) + 3, 24 if i % 2 else 12, stage["name"], size=11, color="#555")
    releases = {r["version"]: r for r in summary["releases"]}
    y = 48
    for t in rows:
        color = {"REJECTED": "#e45756", "FAILED": "#999"}.get(t["status"], "#54a24b")
        svg.text(left - 8, y + 12, f"v{t['version']} {t['status'].lower()}", size=12,
                 anchor="end")
        start, end = t.get("started_s"), t.get("decided_s")
        if start is not None:
            svg.rect(x(start), y + 2, max(3.0, x(end or start) - x(start)), 14, color,
                     title=f"v{t['version']}: training {start}s -> decision {end}s")
        release = releases.get(t["version"])
        if release:
            times = release["times_s"]
            if times.get("released") is not None and times.get("fleet_swapped") is not None:
                svg.rect(x(times["released"]), y + 5, max(3.0, x(times["fleet_swapped"]) -
                                                          x(times["released"])), 8, "#4c78a8",
                         title=f"v{t['version']}: released {times['released']}s, whole fleet "
                               f"{times['fleet_swapped']}s")
                label = (f"fleet on v{t['version']}: {release['seconds_threshold_to_fleet']} s "
                         "from threshold")
                near_end = x(times["fleet_swapped"]) > left + plot_w * 0.7
                svg.text(x(start or times["released"]) - 4 if near_end
                         else x(times["fleet_swapped"]) + 4,
                         y + 13, label, size=11, color="#333",
                         anchor="end" if near_end else "start")
        y += 26
    axis_y = height - 30
    svg.line(left, axis_y, left + plot_w, axis_y, "#888")
    step = _nice_max(total / 8)
    tick = 0.0
    while tick <= total:
        svg.line(x(tick), axis_y, x(tick), axis_y + 4, "#888")
        svg.text(x(tick), axis_y + 16, f"{tick:g}s", size=11, anchor="middle", color="#666")
        tick += step
    _legend(svg, left, height - 4, [("training -> gate decision (approved)", "#54a24b"),
                                    ("(rejected)", "#e45756"),
                                    ("release -> whole fleet swapped", "#4c78a8")])
    return svg.render()


def chart_timeline(summary: dict[str, Any]) -> str:
    """Fleet uplink (bytes/s) and devices per serving version, over time."""
    samples = summary.get("timeline") or []
    total = max(1.0, float(summary.get("wall_seconds") or 1))
    width, height, left, right, top = 960, 330, 70, 20, 20
    plot_w, plot_h = width - left - right, 170
    svg = Svg(width, height)

    def x(t: float) -> float:
        return left + plot_w * min(max(t, 0.0), total) / total

    rates: list[tuple[float, float]] = []
    for prev, cur in itertools.pairwise(samples):
        dt = cur["t"] - prev["t"]
        if dt > 0:
            rates.append((cur["t"], max(0.0, (cur["bytes"] - prev["bytes"]) / dt)))
    smooth = [(t, sum(r for _, r in rates[max(0, i - 2): i + 1]) / len(rates[max(0, i - 2): i + 1]))
              for i, (t, _) in enumerate(rates)]
    y_max = _nice_max(max((r for _, r in smooth), default=1.0))
    for i, stage in enumerate(summary["stages"]):
        end = stage["ended_s"] if stage["ended_s"] is not None else total
        if x(end) - x(stage["started_s"]) < 1:
            continue
        svg.rect(x(stage["started_s"]), top, x(end) - x(stage["started_s"]), plot_h,
                 STAGE_COLORS[i % len(STAGE_COLORS)], title=stage["text"])
        if x(end) - x(stage["started_s"]) >= 24:
            svg.text(x(stage["started_s"]) + 3, top + (24 if i % 2 else 12), stage["name"],
                     size=10, color="#777")
    _axes(svg, left, top, plot_w, plot_h, y_max, "fleet uplink, bytes/s")
    svg.polyline([(x(t), top + plot_h - plot_h * r / y_max) for t, r in smooth], UPLINK_COLOR)
    # devices per serving version (step lines)
    top2, plot_h2 = top + plot_h + 25, 80
    versions = sorted({k for s in samples for k in s.get("serving", {})}, key=int)
    devices = max(1, int(summary.get("devices") or 1))
    svg.line(left, top2 + plot_h2, left + plot_w, top2 + plot_h2, "#888")
    svg.text(left - 6, top2 + 8, str(devices), size=11, anchor="end", color="#666")
    svg.text(left - 6, top2 + plot_h2, "0", size=11, anchor="end", color="#666")
    svg.text(14, top2 + plot_h2 / 2, "devices", size=11, anchor="middle", color="#555", rotate=-90)
    legend = []
    for i, version in enumerate(versions):
        color = "#bbb" if version == "0" else VERSION_COLORS[i % len(VERSION_COLORS)]
        points: list[tuple[float, float]] = []
        for s in samples:
            count = s.get("serving", {}).get(version, 0)
            y = top2 + plot_h2 - plot_h2 * count / devices
            if points:
                points.append((x(s["t"]), points[-1][1]))
            points.append((x(s["t"]), y))
        svg.polyline(points, color)
        legend.append(("no model" if version == "0" else f"serving v{version}", color))
    legend.append(("uplink bytes/s", UPLINK_COLOR))
    _legend(svg, left, height - 8, legend)
    return svg.render()


def chart_bars(groups: list[tuple[str, list[float]]], series: list[str], y_label: str, *,
               width: int = 960, height: int = 280, value_fmt: str = "{:,.0f}",
               colors: list[str] | None = None) -> str:
    """Grouped bars: one group per label, one bar per series, the value above each bar."""
    colors = colors or PALETTE
    left, right, top, bottom = 70, 20, 20, 60
    plot_w, plot_h = width - left - right, height - top - bottom
    svg = Svg(width, height)
    y_max = _nice_max(max((v for _, values in groups for v in values if v), default=1.0))
    _axes(svg, left, top, plot_w, plot_h, y_max, y_label)
    group_w = plot_w / max(1, len(groups))
    bar_w = min(40.0, group_w * 0.8 / max(1, len(series)))
    for g, (label, values) in enumerate(groups):
        gx = left + g * group_w + (group_w - bar_w * len(series)) / 2
        for i, value in enumerate(values):
            h = plot_h * (value or 0) / y_max
            bx = gx + i * bar_w
            svg.rect(bx + 1, top + plot_h - h, bar_w - 2, h, colors[i % len(colors)],
                     title=f"{label} {series[i]}: {value_fmt.format(value or 0)}")
            if len(groups) * len(series) <= 24:
                svg.text(bx + bar_w / 2, top + plot_h - h - 3, value_fmt.format(value or 0),
                         size=10, anchor="middle", color="#444")
        svg.text(left + g * group_w + group_w / 2, top + plot_h + 15, label, size=11,
                 anchor="middle", rotate=-20 if len(groups) > 8 else None)
    _legend(svg, left, height - 6, list(zip(series, colors, strict=False)))
    return svg.render()


def chart_gate(summary: dict[str, Any]) -> str:
    """Each training's challenger and champion score, the threshold, the decision."""
    rows = summary["trainings"]
    config = summary["config"]
    width, height, left, right, top, bottom = 960, 260, 70, 20, 20, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    svg = Svg(width, height)
    values = [v for t in rows for v in (t.get("challenger"), t.get("champion"))
              if isinstance(v, int | float)] + [float(config["threshold"])]
    y_max = _nice_max(max(values) * 1.1) if values else 1.0
    y_max = min(y_max, 1.0) if max(values, default=0) <= 1.0 else y_max
    _axes(svg, left, top, plot_w, plot_h, y_max, config["metric"])

    def y(v: float) -> float:
        return top + plot_h - plot_h * max(0.0, v) / y_max

    svg.line(left, y(config["threshold"]), left + plot_w, y(config["threshold"]), "#e45756", 1.5, "6 4")
    svg.text(left + plot_w - 4, y(config["threshold"]) - 4, f"threshold {config['threshold']}",
             size=11, anchor="end", color="#e45756")
    step = plot_w / max(1, len(rows))
    for i, t in enumerate(rows):
        cx = left + step * (i + 0.5)
        color = "#e45756" if t["status"] == "REJECTED" else "#54a24b"
        if isinstance(t.get("champion"), int | float):
            svg.circle(cx - 10, y(t["champion"]), 6, "#9d755d",
                       title=f"v{t['version']} champion {t['champion']:.4f}")
            need = t["champion"] + float(config["min_improvement"])
            svg.line(cx - 22, y(need), cx + 22, y(need), "#9d755d", 1.5, "3 3")
        if isinstance(t.get("challenger"), int | float):
            svg.circle(cx + 10, y(t["challenger"]), 7, color,
                       title=f"v{t['version']} challenger {t['challenger']:.4f}")
            svg.text(cx + 20, y(t["challenger"]) + 4, f"{t['challenger']:.3f}", size=11)
        svg.text(cx, top + plot_h + 16, f"v{t['version']} {t['status'].lower()}", size=12,
                 anchor="middle", color=color)
        if t.get("train") is not None:
            svg.text(cx, top + plot_h + 30, f"{t['train']} train rows", size=10,
                     anchor="middle", color="#666")
    _legend(svg, left, height - 4, [("challenger (approved)", "#54a24b"), ("(rejected)", "#e45756"),
                                    ("champion on the same holdout (dot); + min_improvement "
                                     "(dashed)", "#9d755d")])
    return svg.render()


# ------------------------------------------------------------------------ HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1000px;color:#222;line-height:1.45;padding:0 12px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;
padding-bottom:4px} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:8px 0;font-size:13px} td,th{border:1px solid #ddd;
padding:4px 8px;text-align:right} th{background:#f6f6f6} td.l,th.l{text-align:left}
.pass{color:#2e7d32;font-weight:600} .fail{color:#c62828;font-weight:600}
.note{color:#555;font-size:13px} code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
"""


def _table(headers: list[str], rows: list[list[Any]], left: set[int] | None = None) -> str:
    """A table; columns in `left` (text) align left, the others (numbers) right."""
    left = {0} if left is None else left

    def cls(i: int) -> str:
        return " class='l'" if i in left else ""

    head = "".join(f"<th{cls(i)}>{_esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{'' if c is None else _esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _gate_text(gate: dict[str, Any]) -> str:
    reasons = gate.get("reasons") or []
    failed = [r for r in reasons if r.endswith("FAIL")]
    if failed:
        return "rejected: " + " | ".join(failed)
    return f"approved: all {len(reasons)} rules pass" if reasons else ""


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def render_html(summary: dict[str, Any]) -> str:
    s = summary
    fleet = s["uplink"]["fleet"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>MLEdgeDeploy demo report</title><style>{CSS}</style></head><body>",
             f"<h1>MLEdgeDeploy demo: {_esc(s['scenario'])}</h1>",
             f"<p class='sub'>{s['devices']} simulated devices running the real agent, "
             f"{s['fleet_rate_per_s']:g} readings/s across the fleet, {s['wall_seconds']:.0f} s "
             f"wall time, started {_esc(s['started_at'])} on {s['machine']['cpus']} CPUs. "
             f"Outcome: <span class='{'pass' if s['outcome'] == 'passed' else 'fail'}'>"
             f"{_esc(s['outcome'])}</span>"
             + (f" ({_esc(s['error'])})" if s.get("error") else "") + "</p>"]
    parts.append(_table(["check", "result", "detail"],
                        [[c["name"], "PASS" if c["passed"] else "FAIL", c["detail"]]
                         for c in s["checks"]], left={0, 1, 2}))

    parts.append("<h2>The story</h2><p class='note'>Shaded bands are the demo's stages. Each "
                 "row is one trained version: from the moment the data threshold started its "
                 "training to the gate's decision, then (blue) from its release to the moment "
                 "the last device swapped to it.</p>")
    parts.append(chart_story(s))
    parts.append(_table(
        ["stage", "from s", "to s", "what happens"],
        [[st["name"], st["started_s"], st["ended_s"], st["text"]] for st in s["stages"]],
        left={0, 3}))

    parts.append("<h2>Gate decisions</h2><p class='note'>The challenger and the champion (the "
                 "model the fleet runs) are scored on the same holdout. Approval needs the "
                 "threshold, the champion + min_improvement, ONNX parity and enough training "
                 "records.</p>")
    parts.append(chart_gate(s))
    parts.append(_table(
        ["version", "status", "records", "train", s["config"]["metric"], "champion",
         "trigger", "gate reasons"],
        [[f"v{t['version']}", t["status"], t.get("records"), t.get("train"),
          "" if t.get("challenger") is None else f"{t['challenger']:.4f}",
          "" if t.get("champion") is None else f"{t['champion']:.4f}", t.get("trigger"),
          _gate_text(t["gate"])] for t in s["trainings"]], left={0, 1, 6, 7}))

    if s["releases"]:
        parts.append("<h2>Releases: bytes shipped</h2><p class='note'>What the fleet downloaded "
                     "(sum of each device's <code>bytes_downloaded</code> status detail) beside "
                     "what shipping the full model to every device would have cost.</p>")
        parts.append(chart_bars(
            [(f"v{r['version']}", [r["bytes_shipped"]["if_all_full"], r["bytes_shipped"]["total"]])
             for r in s["releases"]],
            ["full model x devices", "shipped (what devices downloaded)"], "bytes",
            width=640, colors=["#bab0ac", "#4c78a8"]))
        parts.append(_table(
            ["release", "model bytes", "full (zstd)", "deltas offered", "devices via",
             "shipped", "threshold → fleet s"],
            [[f"v{r['version']}", r.get("model_bytes"), r["full"]["size"],
              ", ".join(f"{d['codec']} from v{d['from_version']}: {d['size']} B"
                        for d in r["deltas"]) or "none (first release)",
              ", ".join(f"{k} x{v}" for k, v in r["updated_via"].items()),
              r["bytes_shipped"]["total"], r["seconds_threshold_to_fleet"]]
             for r in s["releases"]], left={0, 3, 4}))

    if s.get("detection") or s.get("labels"):
        labels = s.get("labels") or {}
        parts.append("<h2>Fault detection per model version</h2><p class='note'>Injected "
                     "fault readings each serving version saw on the devices and the share it "
                     "flagged (the simulator's ground truth). The demo's operator labelled "
                     f"{labels.get('labelled', 0)} of the {labels.get('fault_readings_sent', 0)} "
                     "fault readings sent as faults (<code>mledge label</code>) and asked for a "
                     f"retrain (v{labels.get('retrain_version', '?')}); its gate compared both "
                     "models on the labelled faults.</p>")
        parts.append(_table(["version", "fault readings", "flagged", "detection"],
                            [[f"v{d['version']}", d["fault_readings"], d["flagged"],
                              _pct(d["rate"])] for d in s.get("detection") or []], left={0}))
        judged = [t for t in s["trainings"] if (t.get("detection") or {}).get("labelled_faults")]
        if judged:
            parts.append(_table(
                ["training", "status", "labelled faults", "challenger detects",
                 "champion detects"],
                [[f"v{t['version']}", t["status"], t["detection"]["labelled_faults"],
                  _pct((t["detection"].get("challenger") or {}).get("fault_detection")),
                  _pct((t["detection"].get("champion") or {}).get("fault_detection"))]
                 for t in judged], left={0, 1}))

    parts.append("<h2>Fleet over time</h2><p class='note'>Top: bytes per second the whole fleet "
                 "sent (telemetry and summaries, topic + payload). Bottom: how many devices "
                 "serve each model version.</p>")
    parts.append(chart_timeline(s))

    per_device = s["uplink"]["per_device"]
    parts.append(f"<h2>Uplink per device: before and after</h2><p class='note'>Bytes sent per "
                 f"reading with no model (every reading goes up) and in the final phase "
                 f"(<code>{_esc(fleet['after_phase'])}</code>: the final model serves). Fleet: "
                 f"{fleet['before']['bytes_per_reading']} B → {fleet['after']['bytes_per_reading']} "
                 f"B per reading, {fleet['reduction']}x less.</p>")
    parts.append(chart_bars(
        [(name.rsplit("-", 1)[-1], [d["before"]["bytes_per_reading"] or 0,
                                    d["after"]["bytes_per_reading"] or 0])
         for name, d in per_device.items()],
        ["before: no model", "after: final model"], "bytes per reading", value_fmt="{:,.1f}",
        colors=["#bab0ac", "#54a24b"]))
    parts.append(_table(
        ["device", "readings before", "bytes before", "B/reading", "readings after",
         "bytes after", "B/reading", "x less"],
        [[name, d["before"]["readings"], d["before"]["bytes"], d["before"]["bytes_per_reading"],
          d["after"]["readings"], d["after"]["bytes"], d["after"]["bytes_per_reading"],
          d["reduction"]] for name, d in per_device.items()]))

    parts.append("<h2>What the devices flagged</h2><p class='note'>Per phase and serving "
                 "version, from the simulator's ground truth (injected faults, the new "
                 "operating mode, digit labels), which the agents never see.</p>")
    rows = []
    for p in s["phases"]:
        for kind, c in sorted(p["kinds"].items()):
            rows.append([p["phase"], f"v{p['version']}" if p["version"] else "no model", kind,
                         c.get("readings", 0), _pct(c.get("flagged_rate")),
                         _pct(c.get("accuracy")), c.get("us_per_prediction"),
                         _pct(c.get("sent_rate")), p.get("bytes_per_reading")])
    parts.append(_table(["phase", "model", "readings of", "readings", "flagged", "correct",
                         "µs/prediction", "sent", "B/reading (phase)"], rows, left={0, 1, 2}))
    parts.append(f"<p class='note'>summary.json holds every number on this page. Logs: "
                 f"<code>{_esc(s['logs']['devices'])}</code>, "
                 f"<code>{_esc(s['logs']['stack'])}</code>.</p></body></html>")
    return "\n".join(parts)
