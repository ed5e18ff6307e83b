"""Telemetry sources for the agent and the demo: a simulated vibration sensor and
scikit-learn's bundled digits (the latter needs scikit-learn, an optional extra).

The vibration sensor synthesises a short accelerometer window per reading and
reduces it to the 8 features of the `vibration-anomaly` schema (pipeline.toml
order): rms, peak, crest_factor, kurtosis, band_low, band_mid, band_high,
temperature. The machine runs in a few operating modes (shaft speed, load);
faults are injected at `fault_rate`: impulses (a cracked race: spikes, high
kurtosis and crest factor), imbalance (a strong 1x shaft component: low band)
and bearing wear (broadband high-frequency energy and heat). Everything is
drawn from one seeded generator, so a seed replays the same readings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

VIBRATION_FEATURES = (
    "rms", "peak", "crest_factor", "kurtosis", "band_low", "band_mid", "band_high", "temperature",
)
FAULTS = ("impulses", "imbalance", "bearing_wear")

SAMPLE_RATE_HZ = 5120
WINDOW = 512


@dataclass(frozen=True)
class Reading:
    features: list[float]
    label: int | None = None  # ground truth where the source knows it (digits)
    fault: str | None = None  # injected fault (simulator ground truth; never sent as a label)
    mode: int | None = None


@dataclass(frozen=True)
class OperatingMode:
    shaft_hz: float
    load: float  # scales amplitudes
    base_temp_c: float


MODES = (
    OperatingMode(shaft_hz=25.0, load=0.6, base_temp_c=41.0),
    OperatingMode(shaft_hz=40.0, load=1.0, base_temp_c=48.0),
    OperatingMode(shaft_hz=60.0, load=1.4, base_temp_c=55.0),
)


class VibrationSensor:
    feature_names = VIBRATION_FEATURES

    def __init__(self, seed: int = 0, fault_rate: float = 0.02, mode_dwell: int = 200,
                 modes: tuple[OperatingMode, ...] = MODES) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        if not modes:
            raise ValueError("at least one operating mode is needed")
        self.rng = np.random.default_rng(seed)
        self.fault_rate = fault_rate
        self.mode_dwell = mode_dwell  # readings spent in one mode before it may change
        # The machine's operating modes; a host may replace them while running (a regime
        # shift, e.g. the demo's new line speed): the next mode change draws from the new set.
        self.modes = tuple(modes)
        self._mode = int(self.rng.integers(len(self.modes)))
        self._count = 0
        self._t = np.arange(WINDOW) / SAMPLE_RATE_HZ
        freqs = np.fft.rfftfreq(WINDOW, 1 / SAMPLE_RATE_HZ)
        self._bands = (freqs < 200, (freqs >= 200) & (freqs < 1000), freqs >= 1000)

    def read(self, fault: str | None = None) -> Reading:
        """One reading; `fault` forces a fault (else one is drawn at fault_rate)."""
        rng = self.rng
        self._count += 1
        if self._count % self.mode_dwell == 0 or self._mode >= len(self.modes):
            self._mode = int(rng.integers(len(self.modes)))
        mode = self.modes[self._mode]
        if fault is None and rng.random() < self.fault_rate:
            fault = FAULTS[int(rng.integers(len(FAULTS)))]
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
        t = self._t
        phase = rng.uniform(0, 2 * np.pi, 3)
        speed = mode.shaft_hz * rng.normal(1.0, 0.01)
        signal = mode.load * (
            0.50 * np.sin(2 * np.pi * speed * t + phase[0])
            + 0.20 * np.sin(2 * np.pi * 2 * speed * t + phase[1])
            + 0.08 * np.sin(2 * np.pi * 9.3 * speed * t + phase[2])  # gear mesh
        )
        signal += rng.normal(0, 0.05 * mode.load, WINDOW)
        temperature = mode.base_temp_c + rng.normal(0, 0.7)
        if fault == "impulses":
            hits = rng.choice(WINDOW, size=int(rng.integers(3, 8)), replace=False)
            signal[hits] += rng.choice([-1, 1], size=hits.size) * rng.uniform(3, 6, hits.size) * mode.load
        elif fault == "imbalance":
            signal += rng.uniform(2.5, 4.0) * mode.load * np.sin(2 * np.pi * speed * t + phase[0])
            temperature += rng.uniform(3, 6)
        elif fault == "bearing_wear":
            signal += rng.normal(0, rng.uniform(0.6, 1.0) * mode.load, WINDOW)
            temperature += rng.uniform(15, 25)
        return Reading(self._features(signal, temperature), fault=fault, mode=self._mode)

    def _features(self, signal: np.ndarray, temperature: float) -> list[float]:
        rms = float(np.sqrt(np.mean(signal**2)))
        peak = float(np.max(np.abs(signal)))
        centred = signal - signal.mean()
        variance = float(np.mean(centred**2))
        kurtosis = float(np.mean(centred**4) / variance**2) if variance > 0 else 0.0
        power = np.abs(np.fft.rfft(signal)) ** 2 / WINDOW
        total = float(power.sum()) or 1.0
        low, mid, high = (float(power[band].sum()) / total for band in self._bands)
        values = [rms, peak, peak / rms if rms else 0.0, kurtosis, low, mid, high, temperature]
        return [round(v, 6) for v in values]

    def __iter__(self) -> Iterator[Reading]:
        while True:
            yield self.read()


class DigitsSource:
    """scikit-learn's bundled 8x8 digits (64 features px0..px63, label 0-9), shuffled by seed."""

    def __init__(self, seed: int = 0) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:  # optional: only the simulator needs it
            raise RuntimeError("the digits source needs scikit-learn (pip install scikit-learn)") from exc
        data = load_digits()
        self._x = np.asarray(data.data, dtype=np.float64)
        self._y = np.asarray(data.target, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self._order = self.rng.permutation(len(self._y))
        self._pos = 0
        self.feature_names = tuple(f"px{i}" for i in range(self._x.shape[1]))

    def read(self) -> Reading:
        if self._pos >= len(self._order):
            self._order = self.rng.permutation(len(self._y))
            self._pos = 0
        index = int(self._order[self._pos])
        self._pos += 1
        return Reading([float(v) for v in self._x[index]], label=int(self._y[index]))

    def __iter__(self) -> Iterator[Reading]:
        while True:
            yield self.read()


def make_source(kind: str, seed: int = 0, fault_rate: float = 0.02) -> VibrationSensor | DigitsSource:
    if kind == "vibration":
        return VibrationSensor(seed=seed, fault_rate=fault_rate)
    if kind == "digits":
        return DigitsSource(seed=seed)
    raise ValueError(f"unknown sensor {kind!r} (vibration | digits)")
