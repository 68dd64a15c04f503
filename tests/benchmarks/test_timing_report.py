"""The CPU timing rule, the noise flag, the ratio rule and the plots' y axis, on synthetic
data and a fake clock (no benchmark is run here, except one trivially fast function)."""

import dataclasses
import importlib.util
import io
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks import common, report  # noqa: E402

FULL, QUICK = common.CPU_RULES[False], common.CPU_RULES[True]


class FakeClock:
    """A clock that only moves when a fake call runs (``seconds`` per call)."""

    def __init__(self, seconds: float):
        self.now, self.seconds, self.calls, self.resets = 0.0, seconds, 0, 0

    def __call__(self) -> float:
        return self.now

    def call(self) -> None:
        self.calls += 1
        self.now += self.seconds

    def reset(self) -> None:
        self.resets += 1


def run(seconds: float, rule):
    clock = FakeClock(seconds)
    times = common.cpu_samples(clock.call, rule, clock.reset, clock)
    return times, clock


# ------------------------------------------------------------------------- timing loop


def test_fast_calls_run_until_the_minimum_time():
    times, clock = run(0.001, FULL)  # 1 ms: 10 samples take 10 ms, the 0.5 s minimum decides
    assert len(times) == pytest.approx(FULL.min_s / 0.001, abs=1)
    assert all(t == pytest.approx(1.0) for t in times)  # ms
    assert clock.resets == clock.calls  # grads reset before every call, warm-up included
    times, _ = run(0.001, QUICK)
    assert len(times) == pytest.approx(QUICK.min_s / 0.001, abs=1)


def test_medium_calls_run_until_the_minimum_samples():
    times, _ = run(0.2, FULL)  # 0.5 s passes after 3 calls, but 10 samples are required (2 s < 3 s cap)
    assert len(times) == FULL.min_samples
    times, _ = run(0.1, QUICK)
    assert len(times) == QUICK.min_samples


def test_the_time_cap_stops_a_slow_case():
    times, _ = run(0.5, FULL)  # 10 samples would take 5 s: the 3 s cap stops it at 6
    assert len(times) == 6 and len(times) < FULL.min_samples
    times, _ = run(0.3, QUICK)  # quick cap 1 s: 4 samples
    assert len(times) == 4


def test_very_slow_calls_still_get_three_samples_within_ten_seconds():
    times, clock = run(2.0, FULL)  # one call is past the 3 s cap... once it has 2: still 3 samples
    assert len(times) == FULL.slow_min_samples == 3
    assert clock.calls == 4  # one warm-up call only: warmup_max_s stops the warm-up
    times, _ = run(4.0, FULL)  # a third sample would end at 12 s > 10 s: 2 samples, recorded as such
    assert len(times) == 2
    times, _ = run(20.0, QUICK)  # a second one would end at 40 s: one sample
    assert len(times) == 1


def test_the_sample_cap_stops_a_free_call():
    times, _ = run(1e-7, dataclasses.replace(FULL, warmup_s=0.0))
    assert len(times) == FULL.max_samples


def test_warm_up_reaches_its_minimum_calls_and_time():
    clock = FakeClock(0.001)
    common.cpu_samples(clock.call, common.CpuRule(warmup_calls=3, warmup_s=0.05, warmup_max_s=1.0, min_samples=1,
                                                  min_s=0.0, max_s=1.0, max_samples=1), clock.reset, clock)
    assert 50 <= clock.calls - 1 <= 51  # 0.05 s of 1 ms calls (float sums), then the one sample


def test_time_fn_on_a_trivially_fast_function():
    ctx = common.Context(device=torch.device("cpu"), dtype=torch.float32, quick=True, backends=(), statuses={})
    x = torch.ones(4)
    start = time.perf_counter()
    timing = common.time_fn(common.Bench(lambda: x + 1), ctx)
    # a few microseconds a call: the minimum time, or the sample cap first
    assert time.perf_counter() - start >= QUICK.min_s or timing.samples == QUICK.max_samples
    assert timing.samples >= QUICK.min_samples
    assert timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert timing.spread == pytest.approx((timing.p80_ms - timing.p20_ms) / timing.median_ms)
    start = time.perf_counter()
    timing = common.time_fn(common.Bench(lambda: time.sleep(0.002)), ctx)  # ~2 ms: the 0.2 s minimum decides
    assert time.perf_counter() - start >= QUICK.min_s
    assert QUICK.min_s / 0.002 / 3 <= timing.samples <= QUICK.min_s / 0.002 + 1


# --------------------------------------------------------------------------- noise flag


def test_noise_flag():
    steady = common.Timing(1.0, 0.95, 1.1, samples=50)
    assert common.noise_of(steady, "cpu") is None
    wide = common.Timing(1.0, 0.5, 1.5, samples=50)
    assert "spread 100%" in common.noise_of(wide, "cpu")
    few = common.Timing(1.0, 1.0, 1.0, samples=common.NOISY_MIN_SAMPLES - 1)
    assert "samples" in common.noise_of(few, "cpu")
    single = common.Timing(1.0, 1.0, 1.0, samples=1)
    assert common.noise_of(single, "cpu") == f"1 sample (< {common.NOISY_MIN_SAMPLES})"
    assert common.noise_of(wide, "cuda") is None  # GPU rows (do_bench) are not flagged


def _row(impl, ours, ms, noisy=False, status="ok", config="N=1024", op="rms_norm"):
    return {"op": op, "pass": "fwd", "impl": impl, "ours": ours, "config": config, "shape": {"width": 1024},
            "dtype": "fp32", "device": "cpu", "status": status, "note": "", "median_ms": ms,
            "p20_ms": ms * 0.9 if ms else None, "p80_ms": ms * (2 if noisy else 1.1) if ms else None,
            "samples": 20 if ms else None, "spread": (1.1 if noisy else 0.2) if ms else None, "noisy": noisy,
            "unit": "GB/s", "throughput": 1 / ms if ms else None, "best_peer": None, "ratio_to_best_peer": None,
            "ratio_note": None}


def test_no_ratio_when_ours_is_noisy():
    rows = [_row("fast_attn:torch", True, 0.5, noisy=True), _row("torch:eager", False, 1.0)]
    report.add_ratios(rows)
    assert rows[0]["ratio_to_best_peer"] is None and rows[0]["best_peer"] == "torch:eager"
    assert rows[0]["ratio_note"] == "no ratio: noisy (ours)"


def test_no_ratio_when_the_fastest_peer_is_noisy():
    """A steadier but slower peer must not stand in for the fastest (it would flatter us)."""
    rows = [_row("fast_attn:torch", True, 1.0), _row("torch:eager", False, 0.5, noisy=True),
            _row("torch.compile", False, 2.0)]
    report.add_ratios(rows)
    assert rows[0]["best_peer"] == "torch:eager" and rows[0]["ratio_to_best_peer"] is None
    assert "peer torch:eager" in rows[0]["ratio_note"]


def test_ratio_when_neither_is_noisy():
    rows = [_row("fast_attn:torch", True, 0.5), _row("torch:eager", False, 1.0, noisy=False)]
    report.add_ratios(rows)
    assert rows[0]["ratio_to_best_peer"] == 2.0 and rows[0]["ratio_note"] is None


def test_headline_uses_only_steady_ratios_and_counts_the_rest():
    rows = []
    for config, ours_ms, noisy in (("N=1", 0.5, False), ("N=2", 2.0, False), ("N=3", 0.01, True)):
        rows += [_row("fast_attn:torch", True, ours_ms, noisy=noisy, config=config),
                 _row("torch:eager", False, 1.0, config=config)]
    report.add_ratios(rows)
    (head,) = report.headline(rows)
    assert head["configs"] == 2 and head["noisy"] == 1
    assert head["geomean_ratio"] == pytest.approx(1.0)  # sqrt(2 x 0.5); the noisy 100x is left out
    assert head["min_ratio"] == pytest.approx(0.5)
    only_noisy = [_row("fast_attn:torch", True, 0.5, noisy=True), _row("torch:eager", False, 1.0)]
    report.add_ratios(only_noisy)
    (head,) = report.headline(only_noisy)
    assert head["configs"] == 0 and head["noisy"] == 1 and head["geomean_ratio"] is None


def _cpu_result(rows):
    env = {"gpu": None, "sm_count": None, "gpu_memory_gib": None, "cpu": "x86_64", "cpu_count": 2,
           "torch_threads": 1, "loadavg_1m_start": 0.42, "loadavg_1m_end": 1.5, "torch": "2", "triton": "3",
           "cuda": None, "cudnn": None, "python": "3.11", "fast_attn": "0.1", "git_commit": "abc",
           "flash_attn": None, "liger_kernel": None, "date": "2026-12-07T12:00:00"}
    return {"schema": report.SCHEMA, "env": env, "ceilings": {"dtype": "fp32", "copy_gbps": 40.0},
            "settings": {"dtype": "fp32", "quick": True, "command": "python -m benchmarks"},
            "backends": {}, "notes": [report.cpu_note(env)], "elapsed_s": 1.0, "rows": rows}


def test_tables_mark_noisy_cells_and_the_report_says_what_cpu_figures_are(tmp_path):
    rows = [_row("fast_attn:torch", True, 0.5, noisy=True), _row("torch:eager", False, 1.0)]
    report.add_ratios(rows)
    _, lines = report.pivot(rows)
    assert lines[0][1].startswith(report.NOISY_MARK) and "spread 110%" in lines[0][1]
    assert not lines[0][2].startswith(report.NOISY_MARK)
    result = _cpu_result(rows)
    stream = io.StringIO()
    report.print_report(result, file=stream)
    printed = stream.getvalue()
    for text in ("legend: ~ noisy", "2 cores", "load average 0.42 at the start of the run, 1.50 at the end",
                 "say nothing about the GPU kernels", "1 of 2 measured rows are noisy", "left out (noisy)"):
        assert text in printed, text
    report.write_markdown(result, tmp_path / "report.md", {}, None)
    markdown = (tmp_path / "report.md").read_text()
    assert "Legend: `~` noisy" in markdown and "say nothing about the GPU kernels" in markdown
    assert "\\~" in markdown  # the mark is escaped in Markdown tables


# --------------------------------------------------------------------------------- plots


def test_y_axis_is_scaled_to_the_data_not_the_ceiling():
    rows = [_row("a", True, 0.5), _row("b", False, 1.0)]  # throughputs 2 and 1 GB/s; bands to 2.22
    top, drawn = report.y_axis(rows, ceiling=100.0)
    assert not drawn  # 100 GB/s is far above the data: written in the panel, not drawn
    data_max = max(report.throughput_band(r)[1] for r in rows)
    assert top == pytest.approx(report.Y_MARGIN * data_max)
    top, drawn = report.y_axis(rows, ceiling=3.0)  # below 1.5 x the data's maximum: drawn, and on the axis
    assert drawn and top == pytest.approx(report.Y_MARGIN * 3.0)
    noisy = _row("c", False, 0.1, noisy=True)  # a noisy row's band does not stretch the axis
    top, _ = report.y_axis(rows + [noisy], ceiling=None)
    assert top == pytest.approx(report.Y_MARGIN * 10.0)
    assert report.y_axis([], ceiling=None) == (1.0, False)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed (the plots are optional: pip install matplotlib)")
def test_plot_is_written_with_data_scaled_axes(tmp_path):
    rows = []
    for width, noisy in ((1024, False), (4096, True)):
        for impl, ours, ms in (("fast_attn:torch", True, 0.5), ("torch:eager", False, 1.0)):
            row = _row(impl, ours, ms * width / 1024, noisy=noisy and ours, config=f"N={width}")
            row["shape"] = {"rows": 256, "width": width}
            rows.append(row)
    plots, note = report.write_plots(_cpu_result(rows), tmp_path / "plots")
    assert note is None and (tmp_path / plots["rms_norm"]).stat().st_size > 1000
