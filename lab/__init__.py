"""The research package beside the product: simulation, training and evaluation. Builds on recon; nothing in
recon or gadgets imports it."""
