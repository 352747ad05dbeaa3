"""Noise-prediction networks and observation encoders."""
