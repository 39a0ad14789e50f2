"""MFU only where the device's peak is known; the arithmetic against the manifest's FLOPs."""

import pytest

from moec.observe.mfu import device_peak, mfu


def test_mfu_uses_the_dense_peak_of_the_named_device():
    assert device_peak("NVIDIA H100 80GB HBM3", "bf16") == ("H100", 989e12)
    assert device_peak("NVIDIA H100 PCIe", "bf16") == ("H100 PCIe", 756e12)
    name, fraction = mfu(100_000, 6e9, "NVIDIA A100-SXM4-80GB", "bf16")
    assert name == "A100" and fraction == pytest.approx(100_000 * 6e9 / 312e12)


def test_no_mfu_where_the_peak_is_unknown():
    assert mfu(1e5, 6e9, "cpu", "fp32") is None
    assert mfu(1e5, 6e9, "NVIDIA GeForce GTX 1080", "bf16") is None
