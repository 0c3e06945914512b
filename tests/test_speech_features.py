"""Log-mel features (librosa) against an independent float64 NumPy computation, and their normalisation.

The reference below frames, windows, transforms and filters with plain NumPy from the textbook definitions
(centred frames with zero padding, periodic Hann window, |rfft|², Slaney's mel scale with triangular,
area-normalised filters), sharing no code with librosa. Tolerances: float32 features of a composite
computation, 1e-4 (absolute, on the log scale).
"""

import numpy as np
import pytest

from moe_jax.data import speech


def _hz_to_mel(f):
    """Slaney (Auditory Toolbox) mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    return np.where(
        f < 1000.0, 3.0 * f / 200.0, 15.0 + 27.0 * np.log(np.maximum(f, 1e-12) / 1000.0) / np.log(6.4)
    )


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def reference_log_mel(y, sr, n_mels):
    window, hop = int(round(sr * 0.025)), int(round(sr * 0.010))
    y = np.asarray(y, np.float64)
    padded = np.pad(y, window // 2)
    n_frames = 1 + len(y) // hop
    n = np.arange(window)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / window)  # periodic
    frames = np.stack([padded[t * hop : t * hop + window] * hann for t in range(n_frames)])
    power_TK = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs_K = np.arange(window // 2 + 1) * sr / window
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fb_FK = np.zeros((n_mels, len(freqs_K)))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        rise = (freqs_K - lo) / (mid - lo)
        fall = (hi - freqs_K) / (hi - mid)
        fb_FK[i] = np.maximum(0.0, np.minimum(rise, fall)) * 2.0 / (hi - lo)
    return np.log(power_TK @ fb_FK.T + speech.LOG_OFFSET)


def _signal(sr, seconds=0.73, seed=0):
    t = np.arange(int(sr * seconds)) / sr
    chirp = 0.5 * np.sin(2 * np.pi * (200 * t + 1500 * t**2))
    noise = 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    return (chirp + noise).astype(np.float32)


@pytest.mark.parametrize("sr,n_mels", [(16_000, 80), (16_000, 40), (8_000, 40), (22_050, 64)])
def test_log_mel_matches_float64_numpy_reference(sr, n_mels):
    y = _signal(sr)
    ours = speech.log_mel(y, sr, n_mels)
    ref = reference_log_mel(y, sr, n_mels)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (speech.num_frames(len(y), sr), n_mels)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_frame_parameters_at_16k():
    assert speech.frame_params(16_000) == (400, 160)
    assert speech.num_frames(16_000, 16_000) == 101  # 1 s: centred frames every 10 ms


def test_normalisation_is_per_bin_standardisation():
    feats = speech.log_mel(_signal(16_000), 16_000, 40)
    z = speech.normalize_features(feats)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-3)
    # A gain adds a constant to the log power (above the 1e-6 floor): it cancels exactly.
    np.testing.assert_allclose(speech.normalize_features(feats + np.log(100.0)), z, atol=1e-5)


def test_int16_samples_scale_to_unit_range():
    x = np.array([-32768, 0, 16384], np.int16)
    np.testing.assert_array_equal(speech.as_float_samples(x), np.array([-1.0, 0.0, 0.5], np.float32))
