"""Tests of the runtime measurement helpers (the executor's tests run them on real commands)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from packsched.resources import Resources
from packsched.stats.runtime import (
    TreeSampler,
    directory_size,
    find_processes,
    machine_capacity,
    own_peak_rss,
    sample_interval,
    start_statistics,
)


def test_directory_size_counts_files_once_and_skips_links(tmp_path: Path) -> None:
    """Apparent sizes of regular files, hard links once, symlinks not followed."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b").write_bytes(b"y" * 500)
    os.link(tmp_path / "a", tmp_path / "sub" / "a-again")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_bytes(b"z" * 10_000)
    os.symlink(outside, tmp_path / "link")
    assert directory_size(tmp_path) == 1500
    assert directory_size(tmp_path / "missing") == 0


def test_sample_interval_slows_down_with_age() -> None:
    """Sampling is fast at first and slower as a command ages."""
    ages = [0.0, 0.1, 0.5, 5.0, 120.0]
    intervals = [sample_interval(a) for a in ages]
    assert intervals == sorted(intervals)
    assert intervals[0] <= 0.02 and intervals[-1] <= 1.0


def test_sampler_sees_a_session_and_its_peaks(tmp_path: Path) -> None:
    """A sampler of a session leader sees its children and keeps their peaks after they end."""
    code = "import time; b = b'x' * (50 * 2**20); time.sleep(0.3)"
    proc = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{code}"'], start_new_session=True)
    try:
        sampler = TreeSampler(proc.pid, tmp_path, session=proc.pid)
        deadline = time.monotonic() + 10
        while sampler.peak_process < 50 * 2**20 and time.monotonic() < deadline:
            sampler.sample(disk=True)
            time.sleep(0.01)
        assert sampler.peak_memory >= 50 * 2**20
        assert sampler.peak_process >= 50 * 2**20
        assert len(sampler.processes()) == 1  # the python child; never the main process
    finally:
        proc.wait()
    stats = sampler.finish(
        duration=1.0,
        rusage_cpu=0.0,
        rusage_maxrss=10**12,
        spawner_peak=10**12,  # not above the spawner's peak: ignored
        start=start_statistics(tmp_path, None),
    )
    assert 50 * 2**20 <= stats.memory < 10**12


def test_find_processes_by_marker(tmp_path: Path) -> None:
    """A process that left the session is still found by the marker in its environment."""
    env = {**os.environ, "PACKSCHED_TEST_MARKER": "abc123"}
    started = psutil.Process().create_time()
    proc = subprocess.Popen(["sleep", "30"], env=env, start_new_session=True)
    try:
        # Until the child has exec'd, /proc shows the parent's environment: poll a while.
        deadline = time.monotonic() + 10
        while True:
            found = find_processes(
                session=None, marker=("PACKSCHED_TEST_MARKER", "abc123"), started_after=started
            )
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert [p.pid for p in found] == [proc.pid]
        assert (
            find_processes(session=proc.pid, marker=None, started_after=started)[0].pid == proc.pid
        )
        assert (
            find_processes(
                session=None, marker=("PACKSCHED_TEST_MARKER", "other"), started_after=started
            )
            == []
        )
    finally:
        proc.kill()
        proc.wait()


def test_capacity_and_start_statistics(tmp_path: Path) -> None:
    """The machine's capacity less the reserve; availability clipped to an alloc."""
    cap = machine_capacity(reserve_mem=0, disk_path=tmp_path / "not" / "yet")
    assert cap.mem == psutil.virtual_memory().total
    assert cap.cpu >= 1 and cap.disk > 0
    clipped = start_statistics(tmp_path, Resources(cpu=1.5, mem=1000, disk=2000))
    assert (clipped.cpu_count, clipped.available_memory, clipped.available_disk_space) == (
        1.5,
        1000,
        2000,
    )
    assert own_peak_rss() > 0
