"""A sweep and reproducibility harness for industrial anomaly detection (anomalib 2.x)."""

__version__ = "0.1.0"
