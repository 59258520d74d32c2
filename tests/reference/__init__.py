"""Small, obviously-correct float64 references written for the tests (loops and DPs).

One module per family; nothing here imports tri_losses.
"""
