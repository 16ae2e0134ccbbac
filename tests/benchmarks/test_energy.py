"""benchmarks.energy: the tegrastats formats, the INA3221 sysfs layouts and RAPL in temporary trees
written from their documentation, the per-image arithmetic, and "unknown, because" when nothing is found."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.energy import (
    EnergyMeter,
    RaplCounter,
    TegrastatsRails,
    detect_energy_meter,
    energy_per_image,
    find_ina3221,
    find_nvml_energy,
    find_rapl,
    parse_tegrastats_line,
    rapl_delta_mj,
)
from benchmarks.machine_state import is_unknown

# One line of each documented tegrastats format (NVIDIA's Jetson Linux developer guide, "tegrastats
# Utility"): rails read "<name> <current>/<average>" in mW, with an "mW" suffix from L4T 34 (Orin) on.
TEGRASTATS_NANO = (
    "RAM 1523/3964MB (lfb 4x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB)"
    " CPU [2%@102,1%@102,0%@102,0%@102] EMC_FREQ 0% GR3D_FREQ 0% PLL@24C CPU@26C PMIC@100C GPU@26C"
    " AO@32C thermal@26.25C POM_5V_IN 1275/1275 POM_5V_GPU 0/0 POM_5V_CPU 163/163"
)
TEGRASTATS_AGX_XAVIER = (
    "RAM 2477/15692MB (lfb 2865x4MB) SWAP 0/7846MB (cached 0MB) CPU [1%@1190,0%@1190,0%@1190,0%@1190,"
    "off,off,off,off] EMC_FREQ 0% GR3D_FREQ 0% AUX@32C CPU@34.5C thermal@33.3C Tboard@33C AO@33.5C"
    " GPU@33C Tdiode@35C PMIC@100C GPU 0/0 CPU 311/311 SOC 933/933 CV 0/0 VDDRQ 155/155 SYS5V 1470/1470"
)
TEGRASTATS_XAVIER_NX = (
    "RAM 1945/7764MB (lfb 1024x4MB) SWAP 0/3882MB (cached 0MB) CPU [4%@1190,2%@1190,off,off,off,off]"
    " EMC_FREQ 0% GR3D_FREQ 0% AO@36C GPU@35.5C PMIC@100C AUX@35.5C CPU@37C thermal@36.15C"
    " VDD_IN 3882/3882 VDD_CPU_GPU_CV 496/496 VDD_SOC 1199/1199"
)
TEGRASTATS_AGX_ORIN = (
    "11-21-2023 10:12:01 RAM 4722/30536MB (lfb 5923x4MB) SWAP 0/15268MB (cached 0MB)"
    " CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0]"
    " VIC_FREQ 729 APE 174 CV0@-256C CPU@44.781C Tboard@33C SOC2@41.156C Tdiode@34.5C SOC0@41.593C"
    " CV1@-256C GPU@-256C tj@45.031C SOC1@40.875C CV2@-256C VDD_GPU_SOC 2394mW/2394mW"
    " VDD_CPU_CV 399mW/399mW VIN_SYS_5V0 2018mW/2018mW VDDQ_VDD2_1V8AO 302mW/302mW"
)
TEGRASTATS_ORIN_NANO = (
    "RAM 2039/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,0%@729,0%@729,0%@729,0%@729,"
    "0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] NVENC off NVDEC off NVJPG off NVJPG1 off VIC off OFA off"
    " APE 200 cpu@47.625C soc2@46.5C soc0@46.593C gpu@47.5C tj@48.218C soc1@48.218C"
    " VDD_IN 4962mW/4962mW VDD_CPU_GPU_CV 598mW/598mW VDD_SOC 1395mW/1395mW"
)


@pytest.mark.parametrize(
    ("line", "rails"),
    [
        (TEGRASTATS_NANO, {"POM_5V_IN": 1275.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 163.0}),
        (
            TEGRASTATS_AGX_XAVIER,
            {"GPU": 0.0, "CPU": 311.0, "SOC": 933.0, "CV": 0.0, "VDDRQ": 155.0, "SYS5V": 1470.0},
        ),
        (TEGRASTATS_XAVIER_NX, {"VDD_IN": 3882.0, "VDD_CPU_GPU_CV": 496.0, "VDD_SOC": 1199.0}),
        (
            TEGRASTATS_AGX_ORIN,
            {"VDD_GPU_SOC": 2394.0, "VDD_CPU_CV": 399.0, "VIN_SYS_5V0": 2018.0, "VDDQ_VDD2_1V8AO": 302.0},
        ),
        (TEGRASTATS_ORIN_NANO, {"VDD_IN": 4962.0, "VDD_CPU_GPU_CV": 598.0, "VDD_SOC": 1395.0}),
        ("RAM 1523/3964MB SWAP 0/1982MB (cached 0MB) EMC_FREQ 0% GR3D_FREQ 0%", {}),
    ],
    ids=["nano", "agx-xavier", "xavier-nx", "agx-orin", "orin-nano", "no-rails"],
)
def test_each_tegrastats_format(line: str, rails: dict[str, float]) -> None:
    assert parse_tegrastats_line(line) == rails


def test_the_current_value_is_kept_not_tegrastats_own_average() -> None:
    assert parse_tegrastats_line("VDD_IN 5210mW/4962mW VDD_SOC 1400mW/1395mW") == {
        "VDD_IN": 5210.0,
        "VDD_SOC": 1400.0,
    }


def test_tegrastats_rails_follow_the_latest_line() -> None:
    stream = io.StringIO(
        f"{TEGRASTATS_ORIN_NANO}\nRAM 1/2MB\n{TEGRASTATS_ORIN_NANO.replace('4962mW/', '6000mW/')}\n"
    )
    rails = TegrastatsRails(stream)
    deadline = time.monotonic() + 5
    while rails.read().get("VDD_IN") != 6000.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rails.read() == {"VDD_IN": 6000.0, "VDD_CPU_GPU_CV": 598.0, "VDD_SOC": 1395.0}


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_ina3221_hwmon_layout_of_l4t_34_and_later(tmp_path: Path) -> None:
    # The upstream ina3221 driver: in<N>_label, bus voltage in<N>_input (mV), curr<N>_input (mA);
    # in4-6 are the shunt voltages, without labels. A second hwmon of another chip is ignored.
    hwmon = "sys/class/hwmon/hwmon1"
    _write(tmp_path, f"{hwmon}/name", "ina3221")
    for n, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1000), ("VDD_CPU_GPU_CV", 5008, 120)], start=1):
        _write(tmp_path, f"{hwmon}/in{n}_label", label)
        _write(tmp_path, f"{hwmon}/in{n}_input", str(mv))
        _write(tmp_path, f"{hwmon}/curr{n}_input", str(ma))
    _write(tmp_path, f"{hwmon}/in4_input", "12")
    _write(tmp_path, "sys/class/hwmon/hwmon0/name", "cpu_thermal")
    _write(tmp_path, "sys/class/hwmon/hwmon0/in1_label", "NOT_A_RAIL")
    reader, why = find_ina3221(tmp_path)
    assert reader is not None and why == ""
    assert reader.read() == {"VDD_IN": 5000.0, "VDD_CPU_GPU_CV": pytest.approx(600.96)}


def test_a_hwmon_power_file_is_read_in_microwatts(tmp_path: Path) -> None:
    hwmon = "sys/class/hwmon/hwmon3"
    _write(tmp_path, f"{hwmon}/name", "ina3221")
    _write(tmp_path, f"{hwmon}/in1_label", "VDD_IN")
    _write(tmp_path, f"{hwmon}/power1_input", "4962000")
    reader, _ = find_ina3221(tmp_path)
    assert reader is not None and reader.read() == {"VDD_IN": 4962.0}


def test_ina3221_iio_layout_of_l4t_32(tmp_path: Path) -> None:
    device = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, (rail, mw) in enumerate([("POM_5V_IN", 1275), ("POM_5V_GPU", 0), ("POM_5V_CPU", 163)]):
        _write(tmp_path, f"{device}/rail_name_{n}", rail)
        _write(tmp_path, f"{device}/in_power{n}_input", str(mw))
        _write(tmp_path, f"{device}/in_current{n}_input", "1")
    reader, _ = find_ina3221(tmp_path)
    assert reader is not None and reader.description == "INA3221 (iio, ina3221x)"
    assert reader.read() == {"POM_5V_IN": 1275.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 163.0}


def test_no_ina3221_says_where_it_looked(tmp_path: Path) -> None:
    reader, why = find_ina3221(tmp_path)
    assert reader is None and "ina3221" in why and "/sys/class/hwmon" in why


def test_rapl_domains_and_wraparound(tmp_path: Path) -> None:
    _write(tmp_path, "sys/class/powercap/intel-rapl:0/name", "package-0")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0/energy_uj", "262143000000")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0/max_energy_range_uj", "262143328850")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0:0/name", "core")  # a subdomain: inside package-0
    counters, why = find_rapl(tmp_path)
    assert [c.name for c in counters] == ["rapl:package-0"] and why == ""
    assert counters[0].read_mj() == 262143000.0
    # Past the top of its range the counter restarts from 0.
    assert rapl_delta_mj(262143000.0, 1000.0, 262143328850) == pytest.approx(1000.0 + 328.85)
    assert rapl_delta_mj(1000.0, 1500.0, 262143328850) == 500.0


def test_unreadable_or_absent_rapl_is_a_reason(tmp_path: Path) -> None:
    counters, why = find_rapl(tmp_path)
    assert counters == [] and "no RAPL domain" in why
    _write(tmp_path, "sys/class/powercap/intel-rapl:0/name", "package-0")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0/max_energy_range_uj", "262143328850")
    counters, why = find_rapl(tmp_path)  # energy_uj missing, as when only root may read it
    assert counters == [] and "energy_uj" in why and "root" in why


def test_nvml_energy_counter_or_why_not() -> None:
    class Nvml:
        def __init__(self, supported: bool) -> None:
            self.supported = supported

        def nvmlInit(self) -> None:
            pass

        def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
            return "h"

        def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
            if not self.supported:
                raise RuntimeError("Not Supported")
            return 123456

    (counter,), why = find_nvml_energy(Nvml(True))
    assert counter.read_mj() == 123456.0 and why == ""
    counters, why = find_nvml_energy(Nvml(False))
    assert counters == [] and why == "NVML total energy of GPU 0: Not Supported"


def test_energy_per_image_subtracts_the_idle_baseline_and_totals_the_input_rail() -> None:
    busy = {"VDD_IN": 6000.0, "VDD_CPU_GPU_CV": 1600.0, "VDD_SOC": 1500.0}
    idle = {"VDD_IN": 4000.0, "VDD_CPU_GPU_CV": 600.0, "VDD_SOC": 1400.0}
    # 2 s at 2000 mW above idle on the input rail = 4000 mJ, over 400 images = 10 mJ each.
    energy = energy_per_image(busy, idle, 2.0, 400, 100, ["INA3221 (hwmon)"])
    assert energy["per_source"]["VDD_IN"] == {"busy_mw": 6000.0, "idle_mw": 4000.0, "mj_per_image": 10.0}
    assert energy["per_source"]["VDD_CPU_GPU_CV"]["mj_per_image"] == 5.0
    assert (energy["total_mj_per_image"], energy["total_of"]) == (10.0, "VDD_IN")


def test_without_an_input_rail_the_total_sums_the_rails_not_the_counters() -> None:
    busy = {"GPU": 3000.0, "CPU": 1311.0, "rapl:package-0": 9999.0}
    idle = {"GPU": 0.0, "CPU": 311.0, "rapl:package-0": 0.0}
    energy = energy_per_image(busy, idle, 1.0, 100, 50, ["tegrastats"], counter_names={"rapl:package-0"})
    assert energy["total_mj_per_image"] == 40.0 and energy["total_of"] == "sum of GPU, CPU"
    only_counter = energy_per_image({"nvml:gpu0": 250.0}, None, 1.0, 50, 0, ["nvml:gpu0"], {"nvml:gpu0"})
    assert only_counter["total_mj_per_image"] == 5.0 and is_unknown(
        only_counter["per_source"]["nvml:gpu0"]["idle_mw"]
    )


class ConstantRails:
    description = "fake rails"

    def __init__(self, rails: dict[str, float]) -> None:
        self.rails = rails

    def read(self) -> dict[str, float]:
        return dict(self.rails)


class FakeCounter:
    """A counter gaining `mw` mJ per second of the fake clock."""

    name = "rapl:package-0"

    def __init__(self, clock: list[float], mw: float) -> None:
        self.clock, self.mw = clock, mw

    def read_mj(self) -> float:
        return self.clock[0] * self.mw  # mW x s = mJ

    def delta_mj(self, before: float, after: float) -> float:
        return after - before


def test_the_meter_reads_an_idle_baseline_then_the_measurement() -> None:
    now = [0.0]
    rails = ConstantRails({"VDD_IN": 3000.0})
    counter = FakeCounter(now, 10_000.0)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    meter = EnergyMeter(rails=rails, counters=[counter], clock=lambda: now[0], sleep=sleep)
    meter.measure_idle(1.0)
    rails.rails = {"VDD_IN": 5000.0}
    counter.mw = 30_000.0
    meter.start()
    now[0] += 2.0
    energy: Any = meter.stop(images=100)
    assert energy["sources"] == ["fake rails", "rapl:package-0"] and energy["rail_samples"] >= 1
    assert energy["per_source"]["VDD_IN"] == {"busy_mw": 5000.0, "idle_mw": 3000.0, "mj_per_image": 40.0}
    assert energy["per_source"]["rapl:package-0"]["mj_per_image"] == 400.0
    assert energy["total_of"] == "VDD_IN" and energy["total_mj_per_image"] == 40.0


def test_no_source_is_unknown_with_every_reason_never_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("benchmarks.energy.shutil.which", lambda name: None)
    with detect_energy_meter(tmp_path) as meter:
        assert not meter.found
        meter.measure_idle()
        meter.start()
        energy = meter.stop(images=10)
    assert is_unknown(energy)
    why = energy["unknown"]
    assert "no INA3221" in why and "tegrastats is not on PATH" in why and "no RAPL domain" in why
    assert "NVML energy not read: the measurement ran on the CPU" in why


def test_a_rapl_counter_in_a_tree_meters_a_measurement(tmp_path: Path) -> None:
    energy_file = tmp_path / "energy_uj"
    energy_file.write_text("1000000\n")
    counter = RaplCounter("rapl:package-0", energy_file, 262143328850)
    now = [0.0]
    meter = EnergyMeter(counters=[counter], clock=lambda: now[0])
    meter.start()
    energy_file.write_text("3000000\n")  # 2 J
    now[0] = 0.5
    energy: Any = meter.stop(images=20)
    assert energy["per_source"]["rapl:package-0"]["busy_mw"] == 4000.0
    assert energy["total_mj_per_image"] == 100.0 and energy["baseline"] == {"unknown": "not read"}


def test_a_rail_that_fails_during_the_measurement_is_unknown_with_the_error() -> None:
    class Failing(ConstantRails):
        def read(self) -> dict[str, float]:
            if self.rails.get("fail"):
                raise OSError("Remote I/O error")
            return {"VDD_IN": 5000.0}

    rails = Failing({})
    meter = EnergyMeter(rails=rails)
    meter.start()
    rails.rails = {"fail": 1.0}
    energy = meter.stop(images=10)
    assert energy == {"unknown": "reading the sources failed: fake rails: Remote I/O error"}


def test_an_unreadable_counter_is_unknown_and_never_stops_the_measurement(tmp_path: Path) -> None:
    counter = RaplCounter("rapl:package-0", tmp_path / "energy_uj", 262143328850)  # the file is gone
    meter = EnergyMeter(counters=[counter], sleep=lambda seconds: None)
    meter.measure_idle(0.0)  # no exception: the latency measurement goes on
    meter.start()
    energy = meter.stop(images=10)
    assert is_unknown(energy) and "energy_uj" in energy["unknown"]
