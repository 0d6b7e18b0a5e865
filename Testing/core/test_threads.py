"""The thread-count policy (:mod:`TextSegLib.core.threads`): cgroup quotas read from real files laid out as the
kernel does, the affinity mask of a real process, the environment's overrides and passive waiting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

from TextSegLib.core import threads
from TextSegLib.core.errors import UsageError
from TextSegLib.core.threads import available_cpus, cgroup_cpu_limit, configure, thread_count


def cgroup(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """``(root, proc_cgroup)``: a cgroup tree under ``tmp_path`` holding ``files`` (paths relative to the root) and
    a ``/proc/self/cgroup`` that says ``membership``."""
    root = tmp_path / "cgroup"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text + "\n", encoding="latin-1")  # "\xff\xfe": bytes that are not ASCII
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership + "\n")
    return root, proc


def test_cgroup_v2_quota_of_the_process_s_own_cgroup(tmp_path):
    root, proc = cgroup(tmp_path, "0::/user.slice/job-7", {"user.slice/job-7/cpu.max": "150000 100000",
                                                            "cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert available_cpus(root, proc) == 1  # rounded down, and never more than the affinity mask allows


def test_cgroup_v2_without_a_quota_and_a_container_that_sees_its_cgroup_at_the_root(tmp_path):
    root, proc = cgroup(tmp_path, "0::/", {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(root, proc) == len(os.sched_getaffinity(0))
    # The host's path is not mounted inside the container: the root's files are its own.
    root, proc = cgroup(tmp_path / "container", "0::/kubepods/burstable/pod1/abc", {"cpu.max": "50000 100000"})
    assert cgroup_cpu_limit(root, proc) == 0.5
    assert available_cpus(root, proc) == 1  # at least one


def test_cgroup_v1_cfs_quota(tmp_path):
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc"
    root, proc = cgroup(tmp_path, membership, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
                                               "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) == 3.0
    root, proc = cgroup(tmp_path / "unlimited", membership, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1",
                                                             "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) is None


@pytest.mark.parametrize("text", ["", "garbage", "150000", "-5 100000", "100000 0", "\xff\xfe"])
def test_a_damaged_or_missing_quota_means_no_limit(tmp_path, text):
    root, proc = cgroup(tmp_path, "0::/job", {"job/cpu.max": text})
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "no-proc-file") is None


def test_the_affinity_mask_of_a_real_process_limits_the_threads(tmp_path):
    """A process allowed one CPU (as ``taskset -c 0`` starts it) computes with one thread."""
    root, proc = cgroup(tmp_path, "0::/", {"cpu.max": "max 100000"})
    code = ("import os, sys\nfrom pathlib import Path\nfrom TextSegLib.core.threads import available_cpus\n"
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "print(available_cpus(Path(sys.argv[1]), Path(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(root), str(proc)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "1"


def test_the_option_then_textseg_threads_then_omp_num_threads_then_the_cpus():
    assert thread_count(3, {"TEXTSEG_THREADS": "2", "OMP_NUM_THREADS": "5"}, cpus=8) == (3, "--threads")
    assert thread_count(None, {"TEXTSEG_THREADS": " 2 ", "OMP_NUM_THREADS": "5"}, cpus=8) == (2, "$TEXTSEG_THREADS")
    assert thread_count(None, {"OMP_NUM_THREADS": "4,2"}, cpus=8) == (4, "$OMP_NUM_THREADS")
    assert thread_count(None, {"OMP_NUM_THREADS": "many", "TEXTSEG_THREADS": ""}, cpus=8)[0] == 8
    assert thread_count(None, {}, cpus=6) == (6, "the CPUs this process may use")


@pytest.mark.parametrize(("option", "environment", "message"), [
    (0, {}, "--threads must be a whole number of at least 1, not 0."),
    (None, {"TEXTSEG_THREADS": "two"}, "$TEXTSEG_THREADS must be a whole number of at least 1, not 'two'"),
    (None, {"TEXTSEG_THREADS": "0"}, "$TEXTSEG_THREADS must be a whole number of at least 1, not '0'"),
])
def test_a_thread_count_that_is_no_count_is_the_user_s_error(option, environment, message):
    with pytest.raises(UsageError) as error:
        thread_count(option, environment, cpus=2)
    assert str(error.value).startswith(message)


def test_configure_makes_waiting_threads_sleep_unless_the_user_said_otherwise(monkeypatch):
    monkeypatch.setattr(threads, "_configured", None)  # this process's engines keep their threads
    environment = {"OMP_WAIT_POLICY": "ACTIVE", "TEXTSEG_THREADS": "3"}
    assert configure(None, environment) == 3
    assert environment == {"OMP_WAIT_POLICY": "ACTIVE", "TEXTSEG_THREADS": "3", "KMP_BLOCKTIME": "0"}
    environment = {}
    configure(2, environment)
    assert environment == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert threads.configured_threads() == 2
