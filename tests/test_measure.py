"""measure.py's pure helpers, without a model."""

from lora_doctor.measure import MemoryStats, merged_memory


def test_merged_memory_keeps_larger_peaks_first_start_and_summed_time():
    first = MemoryStats(phase="train", device="cpu", peak_rss_bytes=500, start_rss_bytes=100, duration_s=1.5,
                        nvml_peak_used_bytes=None, peak_allocated_bytes=70)
    second = MemoryStats(phase="train", device="cpu", peak_rss_bytes=400, start_rss_bytes=300, duration_s=2.0,
                         nvml_peak_used_bytes=900, peak_allocated_bytes=None)
    m = merged_memory(first, second)
    assert (m.peak_rss_bytes, m.start_rss_bytes, m.duration_s) == (500, 100, 3.5)
    # A peak one window did not see (None) does not hide the other window's.
    assert (m.nvml_peak_used_bytes, m.peak_allocated_bytes, m.peak_reserved_bytes) == (900, 70, None)
    assert m.rss_delta_bytes == 400


def test_merged_memory_of_the_first_window_is_that_window():
    only = MemoryStats(phase="train", device="cpu", peak_rss_bytes=5)
    assert merged_memory(None, only) is only
