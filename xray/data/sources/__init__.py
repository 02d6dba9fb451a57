"""Dataset sources, one module each, chosen by URI scheme."""
