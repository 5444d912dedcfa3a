"""Workload side of lepton-operator: training, compression and serving."""
