"""detbalance: remedies for sample imbalance in object detection.

Import from the subpackages: ``detbalance.losses``, ``detbalance.sampling``,
``detbalance.detectors``, ``detbalance.data``, ``detbalance.engine``, ``detbalance.analysis``.
"""

__version__ = "0.1.0"
