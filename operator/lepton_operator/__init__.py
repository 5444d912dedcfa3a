"""lepton-operator: a kopf operator for elastic PyTorch training and compressed inference."""
