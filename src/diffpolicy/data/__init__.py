"""Episode storage, windowed sequence datasets and normalization."""
