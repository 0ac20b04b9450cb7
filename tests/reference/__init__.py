"""PyTorch twins of minimoe's layers and model, written from the papers (never by calling minimoe). They load
minimoe's state dict, so the two can be compared number for number in float64."""
