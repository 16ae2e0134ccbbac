"""ReviewKD distillation: model zoo, feature taps, ABF, HCL and the distiller."""
