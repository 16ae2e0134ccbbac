"""benchmarks.machine_state: each reader on recorded texts and sysfs trees written here from the
documented formats (proc(5), the kernel's cpufreq and devfreq ABI, nvidia-smi --query-gpu csv,
nvpmodel -q, NVML's throttle-reason bits), and the flags they raise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.machine_state import (
    NVIDIA_SMI_FIELDS,
    CpuTimes,
    CpuUsageWatch,
    cpu_frequency_state,
    cpu_usage_between,
    decode_throttle_reasons,
    gpu_in_use,
    is_unknown,
    jetson_state,
    load_average,
    nvidia_gpu_state,
    parse_nvidia_smi,
    parse_nvpmodel_query,
    parse_proc_stat,
    parse_self_stat,
    runner_threads,
    state_flags,
    state_lines,
    usage_flags,
)


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _cpufreq(root: Path, cpu: int, governor: str, cur_khz: int, min_khz: int, max_khz: int) -> None:
    base = f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
    _write(root, f"{base}/scaling_governor", governor)
    _write(root, f"{base}/scaling_cur_freq", str(cur_khz))
    _write(root, f"{base}/scaling_min_freq", str(min_khz))
    _write(root, f"{base}/scaling_max_freq", str(max_khz))


# ----------------------------------------------------------------------------- CPU


def test_cpufreq_governor_and_frequency_range(tmp_path: Path) -> None:
    _cpufreq(tmp_path, 0, "performance", 3_000_000, 800_000, 3_500_000)
    _cpufreq(tmp_path, 1, "performance", 2_400_000, 800_000, 3_500_000)
    state = cpu_frequency_state(tmp_path)
    assert state == {
        "governor": "performance",
        "frequency_mhz": [2400.0, 3000.0],
        "min_max_mhz": [800.0, 3500.0],
    }
    assert state_flags({"cpu": state}) == []


def test_mixed_governors_are_named_and_flagged(tmp_path: Path) -> None:
    _cpufreq(tmp_path, 0, "performance", 3_000_000, 800_000, 3_500_000)
    _cpufreq(tmp_path, 1, "schedutil", 1_200_000, 800_000, 3_500_000)
    _cpufreq(tmp_path, 10, "schedutil", 1_200_000, 800_000, 3_500_000)
    state = cpu_frequency_state(tmp_path)
    assert state["governor"] == "performance: cpu0; schedutil: cpu1,cpu10"
    (flag,) = state_flags({"cpu": state})
    assert "not performance" in flag


def test_no_cpufreq_is_unknown_with_the_reason_and_flags_nothing(tmp_path: Path) -> None:
    (tmp_path / "sys/devices/system/cpu/cpu0").mkdir(parents=True)
    state = cpu_frequency_state(tmp_path)
    for name in ("governor", "frequency_mhz", "min_max_mhz"):
        assert is_unknown(state[name]) and "cpufreq" in state[name]["unknown"]
    assert state_flags({"cpu": state}) == []


def test_load_average(tmp_path: Path) -> None:
    _write(tmp_path, "proc/loadavg", "1.52 0.98 0.40 3/412 12345")
    assert load_average(tmp_path) == [1.52, 0.98, 0.40]
    assert is_unknown(load_average(tmp_path / "nowhere"))


# /proc/stat as proc(5) documents it: user nice system idle iowait irq softirq steal guest guest_nice.
PROC_STAT = """cpu  {user} 20 {system} {idle} 50 0 10 {steal} 0 0
cpu0 1000 10 500 40000 25 0 5 0 0 0
intr 123456 0 0
ctxt 987654
"""
# /proc/self/stat: a command name with a space and a parenthesis, utime 14 and stime 15.
SELF_STAT = "4242 (python (x) y) R 1 4242 4242 0 -1 4194304 100 0 0 0 {utime} {stime} 0 0 20 0 3 0"


def test_proc_stat_and_self_stat_parsers() -> None:
    total, idle, steal = parse_proc_stat(PROC_STAT.format(user=2000, system=1000, idle=80000, steal=30))
    assert (total, idle, steal) == (2000 + 20 + 1000 + 80000 + 50 + 0 + 10 + 30, 80050, 30)
    assert parse_self_stat(SELF_STAT.format(utime=70, stime=5)) == 75
    with pytest.raises(ValueError, match="no aggregate"):
        parse_proc_stat("cpu0 1 2 3 4 5 6 7 8\n")


def test_other_processes_share_is_busy_time_not_spent_by_this_process() -> None:
    before = CpuTimes(total=1000, idle=800, steal=0, own=100)
    # 200 ticks pass on all CPUs: 40 idle, 10 stolen, 150 busy, of which this process spent 60.
    after = CpuTimes(total=1200, idle=840, steal=10, own=160)
    usage = cpu_usage_between(before, after)
    assert usage == {"other_processes_share": 0.45, "own_share": 0.3, "steal_share": 0.05}
    flags = usage_flags(usage)
    assert len(flags) == 2 and "other processes used 45%" in flags[0] and "stole 5%" in flags[1]
    quiet = cpu_usage_between(before, CpuTimes(total=1200, idle=935, steal=0, own=160))
    assert quiet["other_processes_share"] == 0.025 and usage_flags(quiet) == []
    none_passed = cpu_usage_between(before, before)
    assert all(is_unknown(v) for v in none_passed.values()) and usage_flags(none_passed) == []


def test_the_watch_reads_proc_before_and_after(tmp_path: Path) -> None:
    _write(tmp_path, "proc/stat", PROC_STAT.format(user=2000, system=1000, idle=80000, steal=0))
    _write(tmp_path, "proc/self/stat", SELF_STAT.format(utime=70, stime=5))
    _write(tmp_path, "proc/loadavg", "2.00 1.00 0.50 3/412 12345")
    watch = CpuUsageWatch(tmp_path)
    watch.start()
    # 100 ticks: 20 idle, 80 busy, 30 of them this process's.
    _write(tmp_path, "proc/stat", PROC_STAT.format(user=2060, system=1020, idle=80020, steal=0))
    _write(tmp_path, "proc/self/stat", SELF_STAT.format(utime=95, stime=10))
    usage = watch.stop()
    assert usage == {
        "other_processes_share": 0.5,
        "own_share": 0.3,
        "steal_share": 0.0,
        "load_average": [2.0, 1.0, 0.5],
    }


def test_a_watch_without_proc_records_unknown_with_the_reason(tmp_path: Path) -> None:
    watch = CpuUsageWatch(tmp_path)
    watch.start()
    usage = watch.stop()
    assert (
        is_unknown(usage["other_processes_share"])
        and "proc/stat" in usage["other_processes_share"]["unknown"]
    )
    assert is_unknown(usage["load_average"])


def test_runner_threads_from_the_runner_or_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    class Reports:
        def thread_settings(self) -> dict[str, int]:
            return {"intra_op": 1, "inter_op": 0}

    class Silent:
        backend = "torch"

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runner_threads(Reports()) == {"intra_op": 1, "inter_op": 0, "OMP_NUM_THREADS": "2"}
    monkeypatch.delenv("OMP_NUM_THREADS")
    silent = runner_threads(Silent())
    assert "torch runner" in silent["runtime"]["unknown"] and is_unknown(silent["OMP_NUM_THREADS"])


# ----------------------------------------------------------------------------- NVIDIA GPUs

# nvidia-smi --query-gpu=<NVIDIA_SMI_FIELDS> --format=csv,noheader,nounits: an H100 at its default
# application clocks, idle; a T4 with application clocks set (nvidia-smi -ac) and capped by its power
# limit; a GeForce that supports neither application clocks nor the reasons query.
NVIDIA_SMI_CSV = (
    "0, NVIDIA H100 80GB HBM3, GPU-5e3a0c1d-0000-4a4a-9c9c-000000000000,"
    " 345, 2619, 1980, 2619, 1980, 2619, 700.00, Enabled, 0x0000000000000001\n"
    "1, Tesla T4, GPU-8d1b2e3f-1111-4b4b-8d8d-111111111111,"
    " 1590, 5000, 1590, 5001, 585, 5001, 70.00, Disabled, 0x0000000000000004\n"
    "2, NVIDIA GeForce RTX 3060, GPU-2c4d6e8f-2222-4c4c-9e9e-222222222222,"
    " 210, 405, [N/A], [N/A], [N/A], [N/A], 170.00, [N/A], [Not Supported]\n"
)


def test_nvidia_smi_csv() -> None:
    h100, t4, geforce = parse_nvidia_smi(NVIDIA_SMI_CSV)
    assert h100["name"] == "NVIDIA H100 80GB HBM3" and h100["sm_clock_mhz"] == 345.0
    assert h100["application_clocks_locked"] is False and h100["persistence_mode"] is True
    assert h100["throttle_reasons"] == ["gpu_idle"] and h100["power_limit_w"] == 700.0
    assert t4["application_clocks_locked"] is True and t4["application_clocks_mhz"] == [1590.0, 5001.0]
    assert t4["throttle_reasons"] == ["sw_power_cap"] and t4["persistence_mode"] is False
    assert geforce["throttle_reasons"] == {"unknown": "nvidia-smi says [Not Supported]"}
    assert is_unknown(geforce["application_clocks_locked"]) and is_unknown(geforce["persistence_mode"])
    assert t4["uuid"] == "GPU-8d1b2e3f-1111-4b4b-8d8d-111111111111"
    gpus = [h100, t4, geforce]
    assert state_flags({"nvidia_gpus": gpus}) == ["GPU 1 throttled: sw_power_cap"]
    # Only the GPU in use counts, named by its index or, under CUDA_VISIBLE_DEVICES=GPU-..., its UUID.
    assert state_flags({"nvidia_gpus": gpus, "gpu_in_use": 0}) == []
    assert state_flags({"nvidia_gpus": gpus, "gpu_in_use": t4["uuid"]}) == ["GPU 1 throttled: sw_power_cap"]
    assert state_flags({"nvidia_gpus": gpus, "gpu_in_use": {"unknown": "MIG"}}) == [
        "GPU 1 throttled: sw_power_cap"
    ]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_nvidia_smi("0, NVIDIA H100\n")


def test_throttle_reason_bits() -> None:
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x44) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_throttle_reasons(0x1000) == ["0x1000"]


class FakeNvml:
    """pynvml's calls this module makes, for one GPU on which power and throttle queries fail as
    NVML's NOT_SUPPORTED does on a Jetson Orin."""

    NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.shut_down = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"handle{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA A100-SXM4-40GB"

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return "GPU-0a0b0c0d-3333-4d4d-8f8f-333333333333"

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        return {1: 1410, 2: 1215}[clock]

    def nvmlDeviceGetApplicationsClock(self, handle: str, clock: int) -> int:
        return {0: 1095, 2: 1215}[clock]

    def nvmlDeviceGetDefaultApplicationsClock(self, handle: str, clock: int) -> int:
        return {0: 1095, 2: 1215}[clock]

    def nvmlDeviceGetPowerManagementLimit(self, handle: str) -> int:
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetPersistenceMode(self, handle: str) -> int:
        return 1

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: str) -> int:
        return 0x20


def test_nvml_is_asked_first_and_a_failing_query_is_unknown() -> None:
    nvml = FakeNvml()
    (gpu,) = nvidia_gpu_state(run=lambda command: pytest.fail("nvidia-smi asked"), pynvml=nvml)  # type: ignore[misc]
    assert gpu["source"] == "nvml" and gpu["name"] == "NVIDIA A100-SXM4-40GB"
    assert gpu["uuid"] == "GPU-0a0b0c0d-3333-4d4d-8f8f-333333333333"
    assert gpu["sm_clock_mhz"] == 1410 and gpu["application_clocks_locked"] is False
    assert gpu["power_limit_w"] == {"unknown": "NVML nvmlDeviceGetPowerManagementLimit: Not Supported"}
    assert gpu["throttle_reasons"] == ["sw_thermal_slowdown"] and nvml.shut_down


def test_nvidia_smi_answers_when_nvml_cannot_and_neither_is_unknown() -> None:
    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("Driver Not Loaded")

    asked: list[list[str]] = []

    def smi(command: Any) -> str:
        asked.append(list(command))
        return NVIDIA_SMI_CSV.splitlines()[0]

    (gpu,) = nvidia_gpu_state(run=smi, pynvml=NoDriver())  # type: ignore[misc]
    assert gpu["source"] == "nvidia-smi"
    assert asked[0][1] == f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}"

    def broken(command: Any) -> str:
        raise OSError("nvidia-smi: not found")

    state = nvidia_gpu_state(run=broken, pynvml=NoDriver())
    assert is_unknown(state) and "Driver Not Loaded" in state["unknown"] and "not found" in state["unknown"]  # type: ignore[index]


# ----------------------------------------------------------------------------- Jetson

# `nvpmodel -q` on a Jetson Orin and on a Nano: the mode's name, then its number.
NVPMODEL_ORIN = "NV Power Mode: MAXN\n0\n"
NVPMODEL_NANO = "NVPM WARN: fan mode is not set!\nNV Power Mode: 5W\n1\n"


def test_nvpmodel_query() -> None:
    assert parse_nvpmodel_query(NVPMODEL_ORIN) == {"name": "MAXN", "id": 0}
    assert parse_nvpmodel_query(NVPMODEL_NANO) == {"name": "5W", "id": 1}
    with pytest.raises(ValueError, match="NV Power Mode"):
        parse_nvpmodel_query("nvpmodel: permission denied\n")


def _jetson_tree(root: Path, gpu_min_hz: int, emc: bool) -> None:
    _write(root, "etc/nv_tegra_release", "# R36 (release), REVISION: 3.0")
    devfreq = "sys/class/devfreq/17000000.ga10b"
    _write(root, f"{devfreq}/cur_freq", "1300500000")
    _write(root, f"{devfreq}/min_freq", str(gpu_min_hz))
    _write(root, f"{devfreq}/max_freq", "1300500000")
    for cpu in range(2):
        _cpufreq(root, cpu, "schedutil", 2_201_600, 2_201_600, 2_201_600)
    if emc:
        _write(root, "sys/kernel/debug/bpmp/debug/clk/emc/rate", "3199000000")


def test_jetson_with_jetson_clocks_on(tmp_path: Path) -> None:
    _jetson_tree(tmp_path, gpu_min_hz=1_300_500_000, emc=True)
    state = jetson_state(tmp_path, run=lambda command: NVPMODEL_ORIN)
    assert state["nvpmodel"] == {"name": "MAXN", "id": 0}
    assert state["gpu_frequency_mhz"] == 1300.5 and state["gpu_min_max_mhz"] == [1300.5, 1300.5]
    assert state["jetson_clocks"] is True and state["emc_frequency_mhz"] == 3199.0
    assert state_flags({"jetson": state}) == []


def test_jetson_clocks_off_is_flagged_and_emc_without_root_is_unknown(tmp_path: Path) -> None:
    _jetson_tree(tmp_path, gpu_min_hz=306_000_000, emc=False)

    def denied(command: Any) -> str:
        raise PermissionError("nvpmodel: permission denied")

    state = jetson_state(tmp_path, run=denied)
    assert state["jetson_clocks"] is False and "permission denied" in state["nvpmodel"]["unknown"]
    assert "needs root" in state["emc_frequency_mhz"]["unknown"]
    assert state_flags({"jetson": state}) == [
        "jetson_clocks is off: the GPU, CPU and EMC clocks scale with load"
    ]


def test_a_jetson_without_a_gpu_devfreq_node_is_unknown(tmp_path: Path) -> None:
    state = jetson_state(tmp_path, run=lambda command: NVPMODEL_ORIN)
    assert is_unknown(state["gpu_frequency_mhz"]) and is_unknown(state["jetson_clocks"])
    assert state_flags({"jetson": state}) == []


def test_state_lines_say_each_part_and_each_unknown(tmp_path: Path) -> None:
    _jetson_tree(tmp_path, gpu_min_hz=1_300_500_000, emc=False)
    state = {
        "cpu": {**cpu_frequency_state(tmp_path), "load_average": [0.5, 0.25, 0.1]},
        "nvidia_gpus": parse_nvidia_smi(NVIDIA_SMI_CSV.splitlines()[1]),
        "jetson": jetson_state(tmp_path, run=lambda command: NVPMODEL_ORIN),
    }
    cpu, gpu, jetson = state_lines(state)
    assert cpu == "CPU: governor schedutil, frequency 2201.6 MHz, load average 0.5 0.25 0.1"
    assert gpu == (
        "NVIDIA GPU 1 (Tesla T4, nvidia-smi): SM 1590.0 MHz, memory 5000.0 MHz, application clocks locked"
        " yes, power limit 70.0 W, persistence no, throttle reasons sw_power_cap"
    )
    assert jetson.startswith("Jetson: nvpmodel MAXN (0), jetson_clocks yes, GPU 1300.5 MHz, EMC unknown (")
    partial = state_lines({"cpu": {}, "nvidia_gpus": {"unknown": "nvidia-smi is not on PATH"}})
    assert partial[1:] == ["NVIDIA GPUs: unknown (nvidia-smi is not on PATH)"]  # no Jetson part, no line


def test_the_gpu_in_use_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_in_use(1) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-abc")
    assert "MIG instance" in gpu_in_use(0)["unknown"]  # type: ignore[index]
