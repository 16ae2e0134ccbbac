"""Energy per inference: power rails and energy counters read over a measurement, less an idle
baseline read just before it.

Sources, each used where this machine has it (torch-free; sysfs, a subprocess, pynvml):
- Jetson power rails (INA3221 monitors), sampled by a background thread every RAIL_INTERVAL_S:
  - the hwmon layout of L4T 34 and later (upstream `ina3221` driver): /sys/class/hwmon/hwmon*/ whose
    `name` is ina3221, with `in<N>_label` (rail name), `in<N>_input` (bus mV), `curr<N>_input` (mA)
    and, where a driver provides it, `power<N>_input` (uW); power = mV x mA / 1000 otherwise;
  - the IIO layout of L4T 32 (`ina3221x` driver): iio:device*/ under /sys/bus/i2c/drivers/ina3221x/,
    with `rail_name_<N>` and `in_power<N>_input` (mW);
  - else `tegrastats`, one line per interval (`parse_tegrastats_line`: "RAIL cur/avg" in mW, with the
    "mW" suffix from L4T 34 on);
- NVIDIA GPUs: NVML's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ; Volta and
  later, NOT_SUPPORTED on a Jetson);
- CPUs: RAPL through powercap, /sys/class/powercap/intel-rapl:<N>/energy_uj, which wraps around at
  max_energy_range_uj (often readable by root only).

Each rail or counter gives: idle power (mean over the baseline), power under the measurement, and
(busy - idle) x duration / images as millijoules per image; the total is the board's input rail
where the format has one (POM_5V_IN, VDD_IN), else the sum of the rails. Nothing found is recorded
as unknown with every source's reason, never as zero.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from benchmarks.machine_state import unknown
from deploy.optional import optional_module

RAIL_INTERVAL_S = 0.02
TEGRASTATS_INTERVAL_MS = 50
# The idle baseline read before each measurement where a source was found.
BASELINE_SECONDS = 1.0
# Rails that carry the whole board's input power, by tegrastats/INA3221 name: Nano's, then Xavier NX's
# and the Orin Nano/NX's. Other modules (AGX Xavier, AGX Orin) monitor no input rail: the total is the
# sum of their rails.
INPUT_RAILS = ("POM_5V_IN", "VDD_IN")

# "NAME cur/avg", optionally with an mW suffix on each (L4T 34+); the lookahead keeps "RAM 1523/3964MB"
# and "IRAM 0/252kB" out.
_TEGRASTATS_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w%/])")


def parse_tegrastats_line(line: str) -> dict[str, float]:
    """{rail: current mW} of one tegrastats line, in any of the documented formats: Nano
    ("POM_5V_IN 1275/1275"), Xavier ("GPU 0/0 CPU 311/311 SOC 933/933", "VDD_IN 3882/3882"),
    Orin ("VDD_GPU_SOC 2394mW/2394mW"). Each rail reads "current/average"; the average is
    tegrastats' own since it started, so only the current value is kept. {} when the line has no rail.
    """
    return {name: float(current) for name, current, _ in _TEGRASTATS_RAIL.findall(line)}


class RailReader(Protocol):
    """Reads every rail's power now, in mW."""

    description: str

    def read(self) -> dict[str, float]:
        """{rail name: mW}."""
        ...


def _read_int(path: Path) -> int:
    return int(path.read_text(encoding="utf-8").strip())


@dataclass
class HwmonRails:
    """INA3221 channels through hwmon (L4T 34+): label, bus voltage and current, or power."""

    channels: dict[str, tuple[Path, int]]  # rail -> (hwmon dir, channel)
    description: str = "INA3221 (hwmon)"

    def read(self) -> dict[str, float]:
        rails = {}
        for rail, (hwmon, n) in self.channels.items():
            power = hwmon / f"power{n}_input"
            if power.is_file():
                rails[rail] = _read_int(power) / 1000.0  # uW
            else:
                rails[rail] = _read_int(hwmon / f"in{n}_input") * _read_int(hwmon / f"curr{n}_input") / 1000.0
        return rails


@dataclass
class IioRails:
    """INA3221 channels through the L4T 32 IIO driver: rail_name_<N> and in_power<N>_input (mW)."""

    channels: dict[str, Path]  # rail -> its in_power file
    description: str = "INA3221 (iio, ina3221x)"

    def read(self) -> dict[str, float]:
        return {rail: float(_read_int(path)) for rail, path in self.channels.items()}


def find_ina3221(root: Path = Path("/")) -> tuple[RailReader | None, str]:
    """The INA3221 rails under `root`, hwmon layout first, or None with the reason none was found."""
    hwmon_channels: dict[str, tuple[Path, int]] = {}
    for hwmon in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        try:
            if (hwmon / "name").read_text(encoding="utf-8").strip() != "ina3221":
                continue
        except OSError:
            continue
        for label in sorted(hwmon.glob("in*_label")):
            n = int(label.name[2:].split("_")[0])
            if (hwmon / f"curr{n}_input").is_file() or (hwmon / f"power{n}_input").is_file():
                rail = label.read_text(encoding="utf-8").strip()
                hwmon_channels[rail if rail not in hwmon_channels else f"{rail}@{hwmon.name}"] = (hwmon, n)
    if hwmon_channels:
        return HwmonRails(hwmon_channels), ""
    iio_channels: dict[str, Path] = {}
    for device in sorted((root / "sys/bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
        for name_file in sorted(device.glob("rail_name_*")):
            channel = name_file.name.rsplit("_", 1)[1]
            power = device / f"in_power{channel}_input"
            if power.is_file():
                iio_channels[name_file.read_text(encoding="utf-8").strip()] = power
    if iio_channels:
        return IioRails(iio_channels), ""
    return None, "no INA3221 under /sys/class/hwmon (name ina3221) or /sys/bus/i2c/drivers/ina3221x"


class TegrastatsRails:
    """The rails of a running `tegrastats --interval TEGRASTATS_INTERVAL_MS`, its latest line."""

    description = "tegrastats"

    def __init__(self, stream: IO[str], process: subprocess.Popen[str] | None = None) -> None:
        self._process = process
        self._latest: dict[str, float] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._follow, args=(stream,), daemon=True)
        self._thread.start()

    @classmethod
    def start(cls) -> TegrastatsRails:
        """Start tegrastats (OSError when it cannot run)."""
        process = subprocess.Popen(
            ["tegrastats", "--interval", str(TEGRASTATS_INTERVAL_MS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert process.stdout is not None
        return cls(process.stdout, process)

    def _follow(self, stream: Iterable[str]) -> None:
        for line in stream:
            rails = parse_tegrastats_line(line)
            if rails:
                with self._lock:
                    self._latest = rails

    def read(self) -> dict[str, float]:
        with self._lock:
            return dict(self._latest)

    def close(self) -> None:
        """Stop tegrastats."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


class RailSampler:
    """Samples a RailReader on a background thread every `interval` seconds between `start()` and
    `stop()`, which returns each rail's mean mW over the samples (and how many there were)."""

    def __init__(self, reader: RailReader, interval: float = RAIL_INTERVAL_S) -> None:
        self._reader = reader
        self._interval = interval
        self._samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def _sample(self) -> bool:
        """Append one reading; False (the error kept) when the reader fails."""
        try:
            sample = self._reader.read()
        except (OSError, ValueError) as exc:
            self._error = f"{self._reader.description}: {exc}"
            return False
        if sample:
            self._samples.append(sample)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval) and self._sample():
            pass

    def start(self) -> None:
        """Read once now, then every `interval` on the thread."""
        self._samples, self._error = [], None
        self._stop.clear()
        if self._sample():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> tuple[dict[str, float], int]:
        """Read once more, then ({rail: mean mW}, samples); ValueError saying why when the reader
        failed or gave nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._sample()
        if self._error is not None or not self._samples:
            raise ValueError(self._error or f"{self._reader.description} gave no reading")
        rails = {name for sample in self._samples for name in sample}
        means = {
            rail: sum(s[rail] for s in self._samples if rail in s) / sum(rail in s for s in self._samples)
            for rail in sorted(rails)
        }
        return means, len(self._samples)


class EnergyCounter(Protocol):
    """A cumulative energy counter in millijoules (RAPL, NVML)."""

    name: str

    def read_mj(self) -> float: ...

    def delta_mj(self, before: float, after: float) -> float: ...


@dataclass
class RaplCounter:
    """One RAPL domain through powercap: energy_uj, wrapping around at max_energy_range_uj."""

    name: str
    energy_file: Path
    max_range_uj: int

    def read_mj(self) -> float:
        return _read_int(self.energy_file) / 1000.0

    def delta_mj(self, before: float, after: float) -> float:
        return rapl_delta_mj(before, after, self.max_range_uj)


def rapl_delta_mj(before_mj: float, after_mj: float, max_range_uj: int) -> float:
    """Energy between two RAPL readings (mJ), across one wraparound of the counter at `max_range_uj`."""
    delta = after_mj - before_mj
    return delta + max_range_uj / 1000.0 if delta < 0 else delta


def find_rapl(root: Path = Path("/")) -> tuple[list[RaplCounter], str]:
    """The readable top-level RAPL domains (intel-rapl:<N>: packages, psys), or the reason there are none."""
    base = root / "sys/class/powercap"
    domains = sorted(p for p in base.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", p.name))
    if not domains:
        return [], f"no RAPL domain under {base} (not an x86 host exposing powercap, or hidden in this VM)"
    counters, problems = [], []
    for domain in domains:
        try:
            name = (domain / "name").read_text(encoding="utf-8").strip()
            counter = RaplCounter(
                f"rapl:{name}", domain / "energy_uj", _read_int(domain / "max_energy_range_uj")
            )
            counter.read_mj()
        except (OSError, ValueError) as exc:
            problems.append(f"{domain / 'energy_uj'}: {getattr(exc, 'strerror', None) or exc}")
            continue
        counters.append(counter)
    return counters, "; ".join(problems) + (" (RAPL is often readable by root only)" if problems else "")


@dataclass
class NvmlEnergyCounter:
    """NVML's total energy since the driver loaded, mJ, of one GPU."""

    name: str
    pynvml: Any
    handle: Any

    def read_mj(self) -> float:
        return float(self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def delta_mj(self, before: float, after: float) -> float:
        return after - before


def find_nvml_energy(pynvml: Any = None, index: int = 0) -> tuple[list[NvmlEnergyCounter], str]:
    """GPU `index`'s NVML energy counter (pynvml initialised here and left so), or the reason not."""
    module = pynvml if pynvml is not None else optional_module("pynvml")
    if module is None:
        return [], "pynvml is not installed (pip install nvidia-ml-py)"
    try:
        module.nvmlInit()
        handle = module.nvmlDeviceGetHandleByIndex(index)
        counter = NvmlEnergyCounter(f"nvml:gpu{index}", module, handle)
        counter.read_mj()
    except Exception as exc:  # NVMLError: no driver, or NOT_SUPPORTED (pre-Volta GPUs, Jetson)
        return [], f"NVML total energy of GPU {index}: {exc}"
    return [counter], ""


@dataclass
class EnergyMeter:
    """The sources found here; `measure_idle()` then `start()` / `stop(images)` around a measurement.
    A context manager: leaving it stops the tegrastats it may have started."""

    rails: RailReader | None = None
    counters: list[EnergyCounter] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # why each absent source is absent
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _idle: dict[str, float] | None = None  # mW per rail or counter
    _sampler: RailSampler | None = None
    _start: tuple[float, dict[str, float]] | None = None
    _start_error: str | None = None

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop what the meter started (tegrastats)."""
        if isinstance(self.rails, TegrastatsRails):
            self.rails.close()

    @property
    def found(self) -> bool:
        return self.rails is not None or bool(self.counters)

    def _counter_readings(self) -> dict[str, float]:
        return {counter.name: counter.read_mj() for counter in self.counters}

    def _counter_powers(
        self, before: Mapping[str, float], after: Mapping[str, float], seconds: float
    ) -> dict[str, float]:
        return {
            c.name: c.delta_mj(before[c.name], after[c.name]) / seconds for c in self.counters
        }  # mJ/s = mW

    def measure_idle(self, seconds: float = BASELINE_SECONDS) -> None:
        """Read every source over `seconds` of idleness: the baseline `stop` subtracts."""
        if not self.found:
            return
        self._idle = None
        self.start()
        self.sleep(seconds)
        try:
            self._idle, _, _ = self._finish()
        except (OSError, ValueError):
            # The measurement's own reading will fail the same way and say why.
            self._idle = None

    def start(self) -> None:
        """Start reading: the rails' sampler and the counters' first readings."""
        if self.rails is not None:
            self._sampler = RailSampler(self.rails)
            self._sampler.start()
        try:
            self._start = (self.clock(), self._counter_readings())
        except (OSError, ValueError) as exc:
            self._start, self._start_error = None, str(exc)

    def _finish(self) -> tuple[dict[str, float], float, int]:
        if self._start is None:
            if self._sampler is not None:
                self._sampler.stop()
            raise ValueError(self._start_error or "the meter was not started")
        started, before = self._start
        powers: dict[str, float] = {}
        samples = 0
        if self._sampler is not None:
            powers, samples = self._sampler.stop()
        seconds = self.clock() - started
        if seconds > 0:
            powers.update(self._counter_powers(before, self._counter_readings(), seconds))
        return powers, seconds, samples

    def stop(self, images: int) -> dict[str, Any]:
        """Energy of the `images` processed since `start()`: per source its idle and busy mW and
        mJ per image above idle, and the total; unknown with the reasons when no source was found."""
        if not self.found:
            return unknown("no power rail or energy counter found: " + "; ".join(self.missing))
        try:
            busy, seconds, samples = self._finish()
        except (OSError, ValueError) as exc:
            return unknown(f"reading the sources failed: {exc}")
        counters = {c.name for c in self.counters}
        return energy_per_image(busy, self._idle, seconds, images, samples, self.sources, counters)

    @property
    def sources(self) -> list[str]:
        names = [self.rails.description] if self.rails is not None else []
        return names + [c.name for c in self.counters]


def energy_per_image(
    busy_mw: Mapping[str, float],
    idle_mw: Mapping[str, float] | None,
    seconds: float,
    images: int,
    samples: int,
    sources: list[str],
    counter_names: Collection[str] = (),
) -> dict[str, Any]:
    """mJ per image per rail or counter (those named in `counter_names`), (busy - idle) mW x seconds
    / images, and the total: the input rail (INPUT_RAILS) where there is one, else the sum of the
    rails, else of the counters."""
    if images < 1 or seconds <= 0:
        raise ValueError("energy_per_image needs at least one image and a positive duration")
    per_source: dict[str, Any] = {}
    for name, power in busy_mw.items():
        idle = (idle_mw or {}).get(name)
        above = power - idle if idle is not None else power
        per_source[name] = {
            "busy_mw": round(power, 3),
            "idle_mw": round(idle, 3) if idle is not None else unknown("no idle baseline was read"),
            "mj_per_image": round(above * seconds / images, 6),
        }
    input_rail = next((rail for rail in INPUT_RAILS if rail in per_source), None)
    counters = [name for name in per_source if name in counter_names]
    rails = [name for name in per_source if name not in counter_names]
    if input_rail is not None:
        total, total_of = per_source[input_rail]["mj_per_image"], input_rail
    elif rails or counters:
        chosen = rails or counters
        total, total_of = sum(per_source[n]["mj_per_image"] for n in chosen), "sum of " + ", ".join(chosen)
    else:
        total, total_of = unknown("the sources gave no reading"), None
    return {
        "sources": sources,
        "seconds": round(seconds, 4),
        "images": images,
        "rail_samples": samples,
        "baseline": "idle, read just before" if idle_mw is not None else unknown("not read"),
        "per_source": per_source,
        "total_mj_per_image": round(total, 6) if isinstance(total, float) else total,
        "total_of": total_of,
    }


def detect_energy_meter(root: Path = Path("/"), *, gpu: bool = False, pynvml: Any = None) -> EnergyMeter:
    """The energy sources of this machine: INA3221 rails (or tegrastats), RAPL, and NVML's counter
    when `gpu` (the measurement runs on an NVIDIA GPU); every absent one says why in `missing`."""
    meter = EnergyMeter()
    rails, why = find_ina3221(root)
    if rails is None and shutil.which("tegrastats") is not None:
        try:
            rails = TegrastatsRails.start()
        except OSError as exc:
            why += f"; tegrastats: {exc}"
    elif rails is None:
        why += "; tegrastats is not on PATH"
    meter.rails = rails
    if rails is None:
        meter.missing.append(why)
    rapl, why = find_rapl(root)
    meter.counters.extend(rapl)
    if not rapl:
        meter.missing.append(why)
    if gpu:
        nvml, why = find_nvml_energy(pynvml)
        meter.counters.extend(nvml)
        if not nvml:
            meter.missing.append(why)
    else:
        meter.missing.append("NVML energy not read: the measurement ran on the CPU")
    return meter
