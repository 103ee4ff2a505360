"""Gadgetron Python gadgets for CDL-Λ: protocol fixes, acquisition buffering, image building, the handler that
Gadgetron runs, a warm server and offline replay."""
