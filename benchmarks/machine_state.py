"""The machine's state beside every latency result, and the flags that say when it undermines them.

A latency is a property of a model *and* a machine state: the CPU governor and frequency, other load,
thread pools, the GPU's clocks, power limit and throttling, a Jetson's power mode and clocks. This
module reads each of them (torch-free; sysfs, procfs, NVML through pynvml where importable, else
`nvidia-smi`) and records a field it cannot read as `{"unknown": "<why>"}`, never as a default.

Two kinds of record:
- `machine_state()`: a snapshot (CPU, NVIDIA GPU, Jetson) taken per format after its measurements,
  so throttling during the run shows;
- `CpuUsageWatch`: /proc/stat and /proc/self/stat read before and after one measurement, giving
  other processes' share of the machine's CPU time over exactly that measurement.

`state_flags` and `usage_flags` turn either into lines saying what undermines the numbers; bench
adds them to the measurement's `noisy` reasons. The thresholds are the constants below.

Every reader takes the filesystem root (or the command's text) so the tests run them on recorded
files in a temporary tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.gpu import GpuProbeError, visible_device
from deploy.optional import optional_module

# Other processes' share of all CPUs' time during a measurement above which it is flagged: at 10% on
# a 2-core machine, some other process held a core a fifth of the time, long enough to preempt calls.
OTHER_CPU_SHARE_LIMIT = 0.10
# Time the hypervisor gave to other guests (steal) above which a measurement is flagged.
STEAL_SHARE_LIMIT = 0.02
# The governors that keep a CPU at a fixed (its highest) frequency.
STEADY_GOVERNORS = ("performance",)
# NVML's clock-throttle reason bits (nvml.h, nvmlClocksThrottleReasons / nvmlClocksEventReasons).
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# The reasons that slow a busy GPU below the clock it was asked for: a measurement under any is flagged.
SLOWING_THROTTLE_REASONS = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
)
NVIDIA_SMI_TIMEOUT_S = 10.0
# nvidia-smi --query-gpu fields, in the order the parser reads them.
NVIDIA_SMI_FIELDS: tuple[str, ...] = (
    "index",
    "name",
    "uuid",
    "clocks.sm",
    "clocks.mem",
    "clocks.applications.graphics",
    "clocks.applications.memory",
    "clocks.default_applications.graphics",
    "clocks.default_applications.memory",
    "power.limit",
    "persistence_mode",
    "clocks_throttle_reasons.active",
)
# Where a Jetson's GPU devfreq node lives: Nano (gp10b/gm20b at 57000000.gpu), Xavier (gv11b), Orin (ga10b).
JETSON_GPU_DEVFREQ_NAMES = ("57000000.gpu", "17000000.gv11b", "17000000.ga10b", "gpu.0")
# The EMC (memory) clock: debugfs, readable by root only.
JETSON_EMC_RATE_FILES = (
    "sys/kernel/debug/bpmp/debug/clk/emc/rate",
    "sys/kernel/debug/clk/emc/clk_rate",
    "sys/kernel/debug/clock/emc/rate",
)


def unknown(reason: str) -> dict[str, str]:
    """A field that could not be read: {"unknown": reason}."""
    return {"unknown": reason}


def is_unknown(value: object) -> bool:
    """True for a field recorded with `unknown`."""
    return isinstance(value, Mapping) and set(value) == {"unknown"}


def field_text(value: object) -> str:
    """A field as text: its value ("yes"/"no" for a flag), or "unknown (why)"."""
    if isinstance(value, Mapping) and set(value) == {"unknown"}:
        return f"unknown ({value['unknown']})"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _why(exc: OSError) -> str:
    return f"{exc.filename}: {exc.strerror or type(exc).__name__}"


# ----------------------------------------------------------------------------- CPU


def _cpu_dirs(root: Path) -> list[Path]:
    base = root / "sys/devices/system/cpu"
    found = [p for p in base.glob("cpu*") if re.fullmatch(r"cpu\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[3:]))


def cpu_frequency_state(root: Path = Path("/")) -> dict[str, Any]:
    """The CPUs' governors and current frequencies from sysfs cpufreq.

    Returns {"governor": one name, or "a: cpu0,cpu1; b: cpu2" when they differ, "frequency_mhz":
    [lowest, highest] current frequency over the CPUs, "min_max_mhz": [scaling min, max] of cpu0};
    each unknown with the reason when cpufreq is absent (VMs and containers often hide it).
    """
    cpus = [d for d in _cpu_dirs(root) if (d / "cpufreq").is_dir()]
    if not cpus:
        reason = f"no {root / 'sys/devices/system/cpu/cpu*/cpufreq'} (frequency scaling not exposed here)"
        return {"governor": unknown(reason), "frequency_mhz": unknown(reason), "min_max_mhz": unknown(reason)}
    governors: dict[str, list[str]] = {}
    frequencies: list[float] = []
    problems: list[str] = []
    for cpu in cpus:
        try:
            governors.setdefault(_read(cpu / "cpufreq/scaling_governor"), []).append(cpu.name)
        except OSError as exc:
            problems.append(_why(exc))
        try:
            frequencies.append(int(_read(cpu / "cpufreq/scaling_cur_freq")) / 1000.0)
        except (OSError, ValueError) as exc:
            problems.append(_why(exc) if isinstance(exc, OSError) else f"{cpu.name}: {exc}")
    state: dict[str, Any] = {}
    if not governors:
        state["governor"] = unknown("; ".join(problems))
    elif len(governors) == 1:
        state["governor"] = next(iter(governors))
    else:
        state["governor"] = "; ".join(f"{name}: {','.join(names)}" for name, names in governors.items())
    state["frequency_mhz"] = (
        [min(frequencies), max(frequencies)] if frequencies else unknown("; ".join(problems))
    )
    try:
        low, high = (int(_read(cpus[0] / f"cpufreq/scaling_{end}_freq")) / 1000.0 for end in ("min", "max"))
        state["min_max_mhz"] = [low, high]
    except (OSError, ValueError) as exc:
        state["min_max_mhz"] = unknown(_why(exc) if isinstance(exc, OSError) else str(exc))
    return state


def load_average(root: Path = Path("/")) -> list[float] | dict[str, str]:
    """The 1, 5 and 15 minute load averages from /proc/loadavg."""
    path = root / "proc/loadavg"
    try:
        return [float(v) for v in _read(path).split()[:3]]
    except OSError as exc:
        return unknown(_why(exc))
    except ValueError:
        return unknown(f"{path}: not the 'load1 load5 load15 ...' line expected")


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU time in clock ticks: all CPUs together from /proc/stat, and this process's."""

    total: int
    idle: int  # idle + iowait
    steal: int
    own: int  # this process's user + system time, all its threads


def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """(total, idle + iowait, steal) ticks of /proc/stat's aggregate "cpu" line (proc(5): user nice
    system idle iowait irq softirq steal; guest time is already inside user and nice)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:9]]
            if len(values) < 8:
                raise ValueError("the 'cpu' line of /proc/stat has fewer than 8 fields")
            user, nice, system, idle, iowait, irq, softirq, steal = values
            return user + nice + system + idle + iowait + irq + softirq + steal, idle + iowait, steal
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


def parse_self_stat(text: str) -> int:
    """utime + stime ticks of /proc/<pid>/stat (fields 14 and 15; the command name in parentheses,
    field 2, may hold spaces, so fields are counted after its closing parenthesis)."""
    rest = text[text.rindex(")") + 1 :].split()
    # rest[0] is field 3 (state): field n is rest[n - 3].
    return int(rest[14 - 3]) + int(rest[15 - 3])


def read_cpu_times(proc: Path = Path("/proc")) -> CpuTimes:
    """The machine's and this process's CPU times now (OSError or ValueError when unreadable)."""
    total, idle, steal = parse_proc_stat(_read(proc / "stat"))
    return CpuTimes(total, idle, steal, parse_self_stat(_read(proc / "self/stat")))


def cpu_usage_between(before: CpuTimes, after: CpuTimes) -> dict[str, Any]:
    """Shares of all CPUs' time between two readings: other processes', this process's, and steal.

    Other processes' share is the busy time (neither idle, iowait nor steal) not spent by this
    process; each share is of the time of all CPUs together, so 0.5 on 2 cores is one core.
    """
    elapsed = after.total - before.total
    if elapsed <= 0:
        reason = "no clock tick passed between the readings (the measurement was shorter than a tick)"
        return {
            "other_processes_share": unknown(reason),
            "own_share": unknown(reason),
            "steal_share": unknown(reason),
        }
    busy = elapsed - (after.idle - before.idle) - (after.steal - before.steal)
    own = after.own - before.own
    return {
        "other_processes_share": round(max(0, busy - own) / elapsed, 4),
        "own_share": round(own / elapsed, 4),
        "steal_share": round((after.steal - before.steal) / elapsed, 4),
    }


class CpuUsageWatch:
    """Other processes' CPU share over one measurement: `start()` before it, `stop()` after.

    `stop()` returns `cpu_usage_between`'s shares plus "load_average" at the end; every share is
    unknown, with the reason, where /proc cannot be read.
    """

    def __init__(self, root: Path = Path("/")) -> None:
        self._root = root
        self._before: CpuTimes | None = None
        self._error: str | None = None

    def start(self) -> None:
        """Read the CPU times before the measurement."""
        try:
            self._before = read_cpu_times(self._root / "proc")
        except (OSError, ValueError, IndexError) as exc:
            self._error = _why(exc) if isinstance(exc, OSError) else f"/proc unreadable: {exc}"

    def stop(self) -> dict[str, Any]:
        """The shares since `start()` and the load average now."""
        usage: dict[str, Any]
        try:
            if self._before is None:
                raise ValueError(self._error or "the watch was not started")
            usage = cpu_usage_between(self._before, read_cpu_times(self._root / "proc"))
        except (OSError, ValueError, IndexError) as exc:
            reason = _why(exc) if isinstance(exc, OSError) else str(exc)
            usage = {name: unknown(reason) for name in ("other_processes_share", "own_share", "steal_share")}
        usage["load_average"] = load_average(self._root)
        return usage


def usage_flags(usage: Mapping[str, Any]) -> list[str]:
    """What in a measurement's CPU usage undermines it (empty when nothing does or it is unknown)."""
    flags = []
    other = usage.get("other_processes_share")
    if isinstance(other, int | float) and other > OTHER_CPU_SHARE_LIMIT:
        flags.append(
            f"other processes used {other:.0%} of the CPUs' time during the measurement"
            f" (> {OTHER_CPU_SHARE_LIMIT:.0%})"
        )
    steal = usage.get("steal_share")
    if isinstance(steal, int | float) and steal > STEAL_SHARE_LIMIT:
        flags.append(f"the hypervisor stole {steal:.0%} of the CPUs' time (> {STEAL_SHARE_LIMIT:.0%})")
    return flags


def runner_threads(runner: object) -> dict[str, Any]:
    """The thread pools a runner's runtime uses (`thread_settings()` where the runner has it), with
    the OpenMP variable that sizes pools behind the runtimes' backs."""
    report = getattr(runner, "thread_settings", None)
    threads: dict[str, Any] = (
        dict(report())
        if callable(report)
        else {
            "runtime": unknown(
                f"the {getattr(runner, 'backend', '?')} runner does not report its thread pools"
            )
        }
    )
    threads["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or unknown(
        "not set: each runtime's default"
    )
    return threads


# ----------------------------------------------------------------------------- NVIDIA GPUs


def decode_throttle_reasons(mask: int) -> list[str]:
    """The names of the bits set in an NVML clock-throttle (clock-event) reason mask."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_REASONS)
    return names + ([f"0x{rest:x}"] if rest else [])


def _smi_value(raw: str, convert: Callable[[str], Any]) -> Any:
    text = raw.strip()
    if text.startswith("[") or not text:
        return unknown(f"nvidia-smi says {text or 'nothing'}")
    try:
        return convert(text)
    except ValueError:
        return unknown(f"nvidia-smi gave {text!r}")


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """The GPUs of `nvidia-smi --query-gpu=<NVIDIA_SMI_FIELDS> --format=csv,noheader,nounits` output.

    Clocks are MHz, the power limit W; "[N/A]" or "[Not Supported]" become unknown with that text.
    """
    gpus = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(NVIDIA_SMI_FIELDS):
            raise ValueError(
                f"nvidia-smi line {line!r}: expected {len(NVIDIA_SMI_FIELDS)} comma-separated fields"
            )
        raw = dict(zip(NVIDIA_SMI_FIELDS, cells, strict=True))
        mask = _smi_value(raw["clocks_throttle_reasons.active"], lambda t: int(t, 16))
        gpus.append(
            _gpu_record(
                index=_smi_value(raw["index"], int),
                name=raw["name"],
                uuid=raw["uuid"],
                sm_mhz=_smi_value(raw["clocks.sm"], float),
                memory_mhz=_smi_value(raw["clocks.mem"], float),
                app=(
                    _smi_value(raw["clocks.applications.graphics"], float),
                    _smi_value(raw["clocks.applications.memory"], float),
                ),
                default_app=(
                    _smi_value(raw["clocks.default_applications.graphics"], float),
                    _smi_value(raw["clocks.default_applications.memory"], float),
                ),
                power_limit_w=_smi_value(raw["power.limit"], float),
                persistence=_smi_value(
                    raw["persistence_mode"], lambda t: {"Enabled": True, "Disabled": False}[t]
                ),
                throttle_mask=mask,
                source="nvidia-smi",
            )
        )
    return gpus


def _gpu_record(
    *,
    index: Any,
    name: str,
    uuid: str,
    sm_mhz: Any,
    memory_mhz: Any,
    app: tuple[Any, Any],
    default_app: tuple[Any, Any],
    power_limit_w: Any,
    persistence: Any,
    throttle_mask: Any,
    source: str,
) -> dict[str, Any]:
    known = not any(is_unknown(v) for v in (*app, *default_app))
    return {
        "index": index,
        "name": name,
        "uuid": uuid,
        "sm_clock_mhz": sm_mhz,
        "memory_clock_mhz": memory_mhz,
        "application_clocks_mhz": list(app)
        if known
        else next(v for v in (*app, *default_app) if is_unknown(v)),
        # Application clocks other than the defaults were set (nvidia-smi -ac): the clocks are pinned.
        "application_clocks_locked": (tuple(app) != tuple(default_app))
        if known
        else unknown("application clocks not reported"),
        "power_limit_w": power_limit_w,
        "persistence_mode": persistence,
        "throttle_reasons": throttle_mask
        if is_unknown(throttle_mask)
        else decode_throttle_reasons(throttle_mask),
        "source": source,
    }


def _nvml_call(function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except Exception as exc:  # pynvml raises NVMLError subclasses, e.g. NOT_SUPPORTED on Jetson Orin
        return unknown(f"NVML {getattr(function, '__name__', 'call')}: {exc}")


def nvml_gpu_state(pynvml: Any, index: int) -> dict[str, Any]:
    """One GPU's clocks, limits and throttling through pynvml (already initialised) at NVML `index`."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    graphics, memory = pynvml.NVML_CLOCK_GRAPHICS, pynvml.NVML_CLOCK_MEM
    limit_mw = _nvml_call(pynvml.nvmlDeviceGetPowerManagementLimit, handle)
    persistence = _nvml_call(pynvml.nvmlDeviceGetPersistenceMode, handle)
    return _gpu_record(
        index=index,
        name=name.decode() if isinstance(name, bytes) else str(name),
        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
        sm_mhz=_nvml_call(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
        memory_mhz=_nvml_call(pynvml.nvmlDeviceGetClockInfo, handle, memory),
        app=(
            _nvml_call(pynvml.nvmlDeviceGetApplicationsClock, handle, graphics),
            _nvml_call(pynvml.nvmlDeviceGetApplicationsClock, handle, memory),
        ),
        default_app=(
            _nvml_call(pynvml.nvmlDeviceGetDefaultApplicationsClock, handle, graphics),
            _nvml_call(pynvml.nvmlDeviceGetDefaultApplicationsClock, handle, memory),
        ),
        power_limit_w=limit_mw if is_unknown(limit_mw) else limit_mw / 1000.0,
        persistence=persistence if is_unknown(persistence) else bool(persistence),
        throttle_mask=_nvml_call(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle),
        source="nvml",
    )


def nvidia_gpu_state(
    run: Callable[[Sequence[str]], str] | None = None, pynvml: Any = None
) -> list[dict[str, Any]] | dict[str, str]:
    """Every NVIDIA GPU's state: NVML through pynvml where importable, else nvidia-smi; unknown with
    the reason where neither answers. `run` (the nvidia-smi caller) and `pynvml` are for tests."""
    reasons = []
    module = pynvml if pynvml is not None else optional_module("pynvml")
    if module is None:
        reasons.append("pynvml is not installed (pip install nvidia-ml-py)")
    if module is not None:
        try:
            module.nvmlInit()
            try:
                return [nvml_gpu_state(module, i) for i in range(module.nvmlDeviceGetCount())]
            finally:
                module.nvmlShutdown()
        except Exception as exc:  # NVMLError: no driver, no device
            reasons.append(f"NVML: {exc}")
    if run is None:
        if shutil.which("nvidia-smi") is None:
            return unknown("; ".join([*reasons, "nvidia-smi is not on PATH"]))
        run = _run_command
    try:
        return parse_nvidia_smi(
            run(["nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits"])
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return unknown("; ".join([*reasons, f"nvidia-smi: {exc}"]))


def _run_command(command: Sequence[str]) -> str:
    return subprocess.run(
        list(command), capture_output=True, text=True, check=True, timeout=NVIDIA_SMI_TIMEOUT_S
    ).stdout


# ----------------------------------------------------------------------------- Jetson


def is_jetson(root: Path = Path("/")) -> bool:
    """True on an NVIDIA Jetson (L4T writes /etc/nv_tegra_release)."""
    return (root / "etc/nv_tegra_release").is_file()


def parse_nvpmodel_query(text: str) -> dict[str, Any]:
    """The mode of `nvpmodel -q` output: "NV Power Mode: MAXN" then the mode number on its own line."""
    match = re.search(r"NV Power Mode:\s*(\S.*?)\s*$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"no 'NV Power Mode:' line in {text.strip()!r}")
    number = re.search(r"^\s*(\d+)\s*$", text[match.end() :], re.MULTILINE)
    return {
        "name": match.group(1),
        "id": int(number.group(1)) if number else unknown("no mode number printed"),
    }


def _devfreq(root: Path) -> Path | None:
    """The GPU's devfreq node: every devfreq device is linked under /sys/class/devfreq by name."""
    for name in JETSON_GPU_DEVFREQ_NAMES:
        node = root / "sys/class/devfreq" / name
        if (node / "cur_freq").is_file():
            return node
    return None


def jetson_state(root: Path = Path("/"), run: Callable[[Sequence[str]], str] | None = None) -> dict[str, Any]:
    """A Jetson's power mode (`nvpmodel -q`), whether jetson_clocks is on (every CPU's and the GPU's
    minimum frequency raised to its maximum, which is what jetson_clocks does) and the GPU and EMC
    frequencies from sysfs/debugfs."""
    state: dict[str, Any] = {}
    if run is None and shutil.which("nvpmodel") is None:
        state["nvpmodel"] = unknown("nvpmodel is not on PATH")
    else:
        try:
            state["nvpmodel"] = parse_nvpmodel_query((run or _run_command)(["nvpmodel", "-q"]))
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            state["nvpmodel"] = unknown(f"nvpmodel -q: {exc}")
    pinned: list[bool] = []
    gpu = _devfreq(root)
    if gpu is None:
        names = ", ".join(JETSON_GPU_DEVFREQ_NAMES)
        state["gpu_frequency_mhz"] = unknown(f"no GPU devfreq node under /sys/class/devfreq ({names})")
    else:
        try:
            current, low, high = (int(_read(gpu / f)) / 1e6 for f in ("cur_freq", "min_freq", "max_freq"))
            state["gpu_frequency_mhz"] = current
            state["gpu_min_max_mhz"] = [low, high]
            pinned.append(low == high)
        except (OSError, ValueError) as exc:
            state["gpu_frequency_mhz"] = unknown(_why(exc) if isinstance(exc, OSError) else str(exc))
    cpu_pinned = []
    for cpu in _cpu_dirs(root):
        try:
            cpu_pinned.append(
                _read(cpu / "cpufreq/scaling_min_freq") == _read(cpu / "cpufreq/scaling_max_freq")
            )
        except OSError:
            continue
    pinned.extend(cpu_pinned)
    if gpu is None or not cpu_pinned:
        state["jetson_clocks"] = unknown("the GPU's or the CPUs' min/max frequencies are unreadable")
    else:
        state["jetson_clocks"] = all(pinned)
    state["emc_frequency_mhz"] = unknown(
        "debugfs EMC clock unreadable (needs root): " + ", ".join(JETSON_EMC_RATE_FILES)
    )
    for relative in JETSON_EMC_RATE_FILES:
        try:
            state["emc_frequency_mhz"] = int(_read(root / relative)) / 1e6
            break
        except (OSError, ValueError):
            continue
    return state


# ----------------------------------------------------------------------------- the snapshot and its flags


def gpu_in_use(device_index: int) -> int | str | dict[str, str]:
    """The physical GPU (NVML index or "GPU-..." UUID) behind CUDA device `device_index`, as
    CUDA_VISIBLE_DEVICES maps it, or unknown with why (deploy.gpu.visible_device)."""
    try:
        return visible_device(device_index)
    except GpuProbeError as exc:
        return unknown(str(exc))


def machine_state(
    root: Path = Path("/"), *, gpus: bool = True, device_index: int | None = None
) -> dict[str, Any]:
    """The snapshot: {"cpu": frequencies and governor plus "load_average", "nvidia_gpus": a list or
    unknown, "gpu_in_use": the physical GPU behind CUDA device `device_index` (when given), "jetson":
    its state or unknown}. `gpus` False skips the NVIDIA probe (a CPU-only measurement, where
    nvidia-smi's start-up would only cost time)."""
    cpu = cpu_frequency_state(root)
    cpu["load_average"] = load_average(root)
    state: dict[str, Any] = {"cpu": cpu}
    if gpus and device_index is not None:
        state["gpu_in_use"] = gpu_in_use(device_index)
    state["nvidia_gpus"] = (
        nvidia_gpu_state() if gpus else unknown("not probed: the measurement ran on the CPU")
    )
    state["jetson"] = (
        jetson_state(root) if is_jetson(root) else unknown("not a Jetson (no /etc/nv_tegra_release)")
    )
    return state


def state_flags(state: Mapping[str, Any]) -> list[str]:
    """What in a snapshot undermines the numbers: a CPU governor other than performance, the GPU in
    use (every GPU when the snapshot does not say which) slowed by power or heat, a Jetson without
    jetson_clocks. Unknown fields flag nothing (they are recorded as unknown)."""
    flags = []
    governor = (state.get("cpu") or {}).get("governor")
    if isinstance(governor, str) and governor not in STEADY_GOVERNORS:
        flags.append(f"CPU governor {governor}, not performance: the frequency may change between calls")
    gpus = state.get("nvidia_gpus")
    in_use = state.get("gpu_in_use")
    for gpu in gpus if isinstance(gpus, list) else []:
        if isinstance(in_use, int | str) and in_use not in (gpu.get("index"), gpu.get("uuid")):
            continue
        reasons = gpu.get("throttle_reasons")
        slowing = sorted(SLOWING_THROTTLE_REASONS & set(reasons)) if isinstance(reasons, list) else []
        if slowing:
            flags.append(f"GPU {gpu.get('index')} throttled: {', '.join(slowing)}")
    jetson = state.get("jetson") or {}
    if jetson.get("jetson_clocks") is False:
        flags.append("jetson_clocks is off: the GPU, CPU and EMC clocks scale with load")
    return flags


def _range_text(value: object, unit: str) -> str:
    if isinstance(value, list):
        low, high = value
        return f"{low:g} {unit}" if low == high else f"{low:g}-{high:g} {unit}"
    return field_text(value)


def _gpu_text(gpu: Mapping[str, Any]) -> str:
    reasons = gpu.get("throttle_reasons")
    throttle = (", ".join(reasons) or "none") if isinstance(reasons, list) else field_text(reasons)
    return (
        f"NVIDIA GPU {gpu.get('index')} ({gpu.get('name')}, {gpu.get('source')}): SM"
        f" {field_text(gpu.get('sm_clock_mhz'))} MHz, memory {field_text(gpu.get('memory_clock_mhz'))} MHz,"
        f" application clocks locked {field_text(gpu.get('application_clocks_locked'))}, power limit"
        f" {field_text(gpu.get('power_limit_w'))} W, persistence {field_text(gpu.get('persistence_mode'))},"
        f" throttle reasons {throttle}"
    )


def state_lines(state: Mapping[str, Any]) -> list[str]:
    """A snapshot as lines of text: the CPUs, each NVIDIA GPU (or why none was read), the Jetson (or
    why it is not one); a part the snapshot lacks has no line."""
    cpu = state.get("cpu") or {}
    load = cpu.get("load_average")
    lines = [
        f"CPU: governor {field_text(cpu.get('governor'))},"
        f" frequency {_range_text(cpu.get('frequency_mhz'), 'MHz')},"
        f" load average {' '.join(map(str, load)) if isinstance(load, list) else field_text(load)}"
    ]
    gpus = state.get("nvidia_gpus")
    if isinstance(gpus, list):
        lines.extend(_gpu_text(gpu) for gpu in gpus)
    elif "nvidia_gpus" in state:
        lines.append(f"NVIDIA GPUs: {field_text(gpus)}")
    jetson = state.get("jetson")
    if isinstance(jetson, Mapping) and not is_unknown(jetson):
        mode = jetson.get("nvpmodel")
        mode_text = (
            f"{mode['name']} ({field_text(mode['id'])})"
            if isinstance(mode, Mapping) and "name" in mode
            else field_text(mode)
        )
        lines.append(
            f"Jetson: nvpmodel {mode_text}, jetson_clocks {field_text(jetson.get('jetson_clocks'))},"
            f" GPU {field_text(jetson.get('gpu_frequency_mhz'))} MHz,"
            f" EMC {field_text(jetson.get('emc_frequency_mhz'))} MHz"
        )
    elif "jetson" in state:
        lines.append(f"Jetson: {field_text(jetson)}")
    return lines


def usage_text(usage: Mapping[str, Any]) -> str:
    """Other processes' CPU share over a measurement as a percentage, or "unknown (why)"."""
    other = usage.get("other_processes_share")
    return f"{other:.0%}" if isinstance(other, int | float) else field_text(other)
