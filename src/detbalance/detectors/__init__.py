"""Adapters that put the imbalance remedies into torchvision detectors, small backbones, a recorder."""

from detbalance.detectors.recorder import BalanceRecorder

__all__ = ["BalanceRecorder"]
