"""Pure-PyTorch implementations (the "torch" backend), one module per family."""
