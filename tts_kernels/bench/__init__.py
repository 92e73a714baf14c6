"""Benchmarks shipped with the package, so `tts-kernels bench` runs on any machine."""
