"""Detection's training side: the torch Dataset and augmentation, the embedded default data set,
the detectors, and ReviewKD over their FPN levels."""
